"""The pure rules behind the operator and the CRD: the generated schema is structural and admits
every job spec the project ships, refuses what the job spec refuses where a schema can say it;
paths are placed on the shared volume; pods are sized from the scaling section; the status
follows KubeRay's states and the run's metrics; the trust boundary holds (deleteOnFinish only
inside the job's own prefix, the image allowlist, egress)."""

from __future__ import annotations

import dataclasses
import itertools
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from elastune.errors import ElastuneError, SpecError
from elastune.events import Row
from elastune.kube.crd import crd, spec_schema
from elastune.kube.objects import Owner, Settings, cleanup_job, desired, job_spec, on_volume
from elastune.kube.status import next_status, phase_of, progress_of
from elastune.kube.trust import Egress, deletable_root, image_allowed
from elastune.metrics.exporter import RunMetrics
from tests.k8s.schemas import Invalid, validate

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("j", "team-a", "0000-uid")
JUNCTORS = ("oneOf", "anyOf", "allOf", "not")


def walk(node, path="spec"):
    yield path, node
    for key, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{key}")
    for key in ("items", "additionalProperties"):
        if isinstance(node.get(key), dict):
            yield from walk(node[key], f"{path}[]")


def test_the_schema_is_structural():
    """What the API server demands of a CRD schema: a type everywhere (or explicitly any value, or
    int-or-string), no references, no junctors, no defaults (the stored object stays as written)."""
    nodes = list(walk(spec_schema()))
    assert len(nodes) > 100
    for path, node in nodes:
        assert node.get("type") or node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-int-or-string"), (
            path
        )
        assert not (node.get("type") and node.get("x-kubernetes-int-or-string")), path
        assert not {"$ref", "$defs", "default", "const", "prefixItems", *JUNCTORS} & set(node), (path, set(node))
        assert not ("properties" in node and "additionalProperties" in node), path
        assert isinstance(node.get("exclusiveMinimum", False), bool) and isinstance(node.get("exclusiveMaximum", False), bool), (
            path
        )
    assert crd()["spec"]["versions"][0]["subresources"] == {"status": {}}


def resource(spec: dict) -> dict:
    return {
        "apiVersion": "elastune.io/v1alpha1",
        "kind": "ElastuneJob",
        "metadata": {"name": "j", "namespace": "team-a"},
        "spec": spec,
    }


SHIPPED = sorted(ROOT.glob("jobs/*.yaml")) + sorted(ROOT.glob("k8s/**/jobs/*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_job_spec_is_an_elastunejob_spec(path):
    validate(resource(yaml.safe_load(path.read_text())))


def _quickstart() -> dict:
    return yaml.safe_load((ROOT / "jobs" / "quickstart.yaml").read_text())


REFUSED = {  # what the CRD refuses, and what its refusal names
    "a misspelled section": (lambda s: s.update(schedul={"name": "wsd"}), "'schedul' was unexpected"),
    "a count as text": (lambda s: s["batch"].update(global_batch_size="32"), "global_batch_size"),
    "below a minimum": (lambda s: s["batch"].update(micro_batch_size=0), "micro_batch_size"),
    "an unknown schedule": (lambda s: s["schedule"].update(name="step"), "schedule.name"),
    "a field of another schedule": (
        lambda s: s.update(schedule={"name": "cosine", "decay_fraction": 0.2}),
        "decay_fraction applies only with name wsd",
    ),
    "a schedule without what it needs": (lambda s: s.update(schedule={"name": "cyclical"}), "name cyclical needs cycle_samples"),
    "two model kinds": (lambda s: s["model"].update(factory="pkg.mod:fn"), "exactly one of recipe, factory"),
    "a fault's field on another": (
        lambda s: s.update(faults=[{"action": "kill_rank", "rank": 0, "at_step": 3, "seconds": 2}]),
        "seconds applies only with action delay_rank",
    ),
    "a worker pod quantity": (lambda s: s.update(cluster={"workers": {"cpu": "two"}}), "cpu"),
    "suspend as text": (lambda s: s.update(suspend="yes"), "suspend"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_the_crd_refuses_what_the_schema_can_tell(case):
    edit, said = REFUSED[case]
    spec = _quickstart()
    validate(resource(spec))
    edit(spec)
    with pytest.raises(Invalid, match=said):
        validate(resource(spec))


def test_paths_are_placed_on_the_shared_volume_and_metrics_where_the_operator_reads():
    spec = _quickstart()
    del spec["name"]  # defaults to the resource's
    spec["data"]["source"] = ["corpus/*.txt", "/data/extra.jsonl"]
    spec["metrics"] = {"enabled": False, "host": "127.0.0.1"}
    job = job_spec(OWNER, spec)
    assert job.name == "j" and job.data.path == "/mnt/elastune/.elastune/data/stdlib-w65"
    assert job.data.source == ["/mnt/elastune/corpus/*.txt", "/data/extra.jsonl"]
    assert job.checkpoint_path == "/mnt/elastune/checkpoints/team-a/j" and job.output_dir == "/mnt/elastune/runs"
    assert (job.metrics.enabled, job.metrics.host, job.metrics.port) == (True, "0.0.0.0", 9400)
    spec["checkpoint"] = {"path": "s3://bucket/ckpt/j", "deleteOnFinish": True}
    spec["name"] = "renamed"
    job = job_spec(OWNER, spec)
    assert job.checkpoint_path == "s3://bucket/ckpt/j" and job.name == "renamed"


def test_an_invalid_job_is_explained_with_the_job_spec_rules():
    spec = _quickstart()
    spec["batch"]["micro_batch_size"] = 64  # larger than the global batch
    with pytest.raises(SpecError, match=r"(?s)ElastuneJob team-a/j.*batch.micro_batch_size = 64.*fix:"):
        desired(OWNER, spec, Settings())


def test_worker_pods_are_sized_from_the_scaling_section():
    spec = {**_quickstart(), "scaling": {"min_workers": 1, "max_workers": 4, "cpus_per_worker": 1}}
    groups = lambda s: desired(OWNER, s, Settings())[2]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]  # noqa: E731
    assert (groups({**spec, "cluster": {"workers": {"cpu": "1"}}})["maxReplicas"]) == 4
    wide = groups({**spec, "cluster": {"workers": {"cpu": "3"}}})
    assert (wide["minReplicas"], wide["maxReplicas"]) == (1, 2)  # 3 workers a pod: 1..4 workers need 1..2 pods
    with pytest.raises(SpecError, match=r"spec.cluster.workers \(cpu 500m.*cpus_per_worker 1"):
        groups({**spec, "cluster": {"workers": {"cpu": "500m"}}})
    gpu = {**spec, "scaling": {**spec["scaling"], "gpus_per_worker": 1}}
    with pytest.raises(SpecError, match="gpus_per_worker 1"):
        groups({**gpu, "cluster": {"workers": {"cpu": "8"}}})
    group = groups({**gpu, "cluster": {"workers": {"cpu": "8", "gpu": 1}, "storage": {"credentialsSecret": "s3-creds"}}})
    container = group["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["envFrom"] == [
        {"secretRef": {"name": "s3-creds"}}
    ]
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_the_head_trains_nothing_but_hosts_live_recoverys_lighthouse():
    head = lambda s: desired(OWNER, s, Settings())[2]["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"]  # noqa: E731
    spec = _quickstart()
    assert head(spec) == "0"
    assert head({**spec, "scaling": {**spec["scaling"], "recovery": "live"}}) == "1"


@pytest.mark.parametrize(
    "status, suspend, phase",
    [
        (None, False, "Pending"),
        (None, True, "Suspended"),
        ({"jobDeploymentStatus": "Initializing"}, False, "Starting"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "PENDING"}, False, "Starting"),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, False, "Running"),
        ({"jobDeploymentStatus": "Suspending", "jobStatus": "RUNNING"}, True, "Suspended"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, False, "Succeeded"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "FAILED"}, False, "Failed"),
        ({"jobDeploymentStatus": "Failed"}, False, "Failed"),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, False, "Stopped"),
    ],
)
def test_phase_follows_kuberay(status, suspend, phase):
    assert phase_of(status, suspend)[0] == phase


def test_status_keeps_progress_and_transition_times():
    running = {
        "metadata": {"name": "j"},
        "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "j-abc"},
    }
    first = next_status(None, running, False, {"step": 10, "samples": 320}, 1, "T1")
    again = next_status(first, running, False, None, 1, "T2")  # a scrape that failed: progress stays
    assert (again["step"], again["samples"], again["phase"]) == (10, 320, "Running")
    assert {c["type"]: c["lastTransitionTime"] for c in again["conditions"]}["Running"] == "T1"
    done = next_status(
        again, {**running, "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}, False, None, 1, "T3"
    )
    times = {c["type"]: (c["status"], c["lastTransitionTime"]) for c in done["conditions"]}
    assert times["Running"] == ("False", "T3") and times["Succeeded"] == ("True", "T3") and times["Failed"] == ("False", "T1")


def test_progress_counts_from_the_start_of_training_not_of_this_run():
    """A run resumed at step 200 has done 3 steps itself; the status says 203."""
    metrics = RunMetrics("j", "resumed")
    rows = [
        Row(
            time=float(s),
            step=s,
            samples_seen=32 * s,
            loss=2.0,
            lr=1e-3,
            world_size=2,
            global_batch_size=32,
            micro_batches=(2, 2),
            step_seconds=0.1,
        )
        for s in (201, 202, 203)
    ]
    metrics.observe(rows, [])
    progress = progress_of(generate_latest(metrics.registry).decode())
    assert (progress["step"], progress["samples"], progress["worldSize"], progress["failuresSurvived"]) == (203, 203 * 32, 2, 0)
    assert "lastDurableCheckpoint" not in progress  # none in this run yet
    assert progress["loss"] == 2.0 and "evalLoss" not in progress  # no evaluation yet: the gauge is NaN, left out
    metrics.observe([dataclasses.replace(rows[-1], step=204, samples_seen=204 * 32, eval_loss=2.25)], [])
    assert progress_of(generate_latest(metrics.registry).decode())["evalLoss"] == 2.25


# The trust boundary (elastune.kube.trust): deleteOnFinish inside the job's own prefix, the image
# allowlist, egress. OWNER is team-a/j: its own prefixes are these two.
VOLUME_PREFIX, URI_TEMPLATE = "/mnt/elastune/checkpoints/team-a/j", "s3://bucket/elastune/{namespace}/{name}"
URI_PREFIX = "s3://bucket/elastune/team-a/j"
SEGMENTS = ("j", "j-2", "sub", "..", ".", "")  # the job, a name it prefixes, a folder, and what normalising removes


def resolved_inside(location: str, prefix: str) -> bool:
    """An independent reference: resolve segment by segment with a stack; a `..` above a URI's
    bucket escapes it (refused), one above / stays at / as on a POSIX disk."""
    scheme, sep, rest = location.partition("://")
    pre_scheme, _, pre_rest = prefix.partition("://")
    if sep and scheme != pre_scheme:
        return False
    stack: list[str] = []
    for seg in (rest if sep else location).split("/"):
        if seg in ("", "."):
            continue
        if seg == "..":
            if not stack and sep:
                return False
            stack = stack[:-1]
            continue
        stack.append(seg)
    want = [s for s in (pre_rest if sep else prefix).split("/") if s]
    return stack[: len(want)] == want


@pytest.mark.parametrize(
    "base, prefix", [("/mnt/elastune/checkpoints/team-a", VOLUME_PREFIX), ("s3://bucket/elastune/team-a", URI_PREFIX)]
)
def test_delete_on_finish_stays_inside_the_jobs_own_prefix_generated(base, prefix):
    """Every path of up to three segments from SEGMENTS below the namespace's folder: accepted
    exactly when the reference resolves it inside the job's prefix, and then to that resolution."""
    cases = [f"{base}/{'/'.join(p)}" for n in range(4) for p in itertools.product(SEGMENTS, repeat=n)]
    assert len(cases) == 259
    accepted = 0
    for location in cases:
        expect = resolved_inside(location, prefix)
        try:
            root = deletable_root(location, VOLUME_PREFIX, URI_PREFIX, "ElastuneJob team-a/j")
        except SpecError as exc:
            assert not expect, f"{location} refused: {exc}"
            assert f"spec.checkpoint.path = {location!r}" in str(exc) and "rule:" in str(exc) and "fix:" in str(exc), str(exc)
            continue
        assert expect, f"{location} accepted as {root}, outside {prefix}"
        assert root == prefix or root.startswith(prefix + "/"), (location, root)
        assert not {"..", ".", ""} & set(root.partition("://")[2 if "://" in root else 0].split("/")[1:]), root
        accepted += 1
    assert 40 < accepted < 200  # both kinds well represented


DELETABLE = [  # (checkpoint.path as written, the root ckpt clear gets, or None: refused)
    (None, VOLUME_PREFIX),  # the default
    ("checkpoints/team-a/j", VOLUME_PREFIX),
    ("checkpoints/team-a/j/run-1", f"{VOLUME_PREFIX}/run-1"),
    ("checkpoints//team-a/./j//run-1/", f"{VOLUME_PREFIX}/run-1"),
    ("checkpoints/team-a/j/a/../b", f"{VOLUME_PREFIX}/b"),
    (f"file://{VOLUME_PREFIX}/x", f"{VOLUME_PREFIX}/x"),
    (f"{VOLUME_PREFIX}/x", f"{VOLUME_PREFIX}/x"),
    (URI_PREFIX, URI_PREFIX),
    (f"{URI_PREFIX}/run-1", f"{URI_PREFIX}/run-1"),
    (f"{URI_PREFIX}/./run-1/../x/", f"{URI_PREFIX}/x"),
    ("checkpoints/team-a/j-2", None),  # prefix confusion: another job's name starting with this one's
    ("checkpoints/team-a/j2/x", None),
    ("checkpoints/team-a/other", None),
    ("checkpoints/team-b/j", None),  # another namespace
    ("checkpoints/team-a", None),  # the whole namespace
    ("checkpoints/team-a/j/../other", None),
    ("checkpoints/team-a/j/../../../../etc", None),
    ("../etc", None),
    ("/etc/elastune", None),
    ("/mnt/elastune", None),
    ("/tmp/ckpt/team-a/j", None),
    (f"file://host{VOLUME_PREFIX}", None),
    ("s3://other/elastune/team-a/j", None),  # another bucket
    ("s3://bucket-2/elastune/team-a/j", None),
    ("s3://bucket/../other/elastune/team-a/j", None),  # a `..` that leaves the bucket
    ("s3://bucket/elastune/team-a/j/../j-2", None),
    ("s3://bucket/elastune/team-a/j-2", None),
    ("s3://key@bucket/elastune/team-a/j", None),
    ("gs://bucket/elastune/team-a/j", None),  # another scheme
    (f"{URI_PREFIX}?endpoint_override=evil.example", None),  # pyarrow reads query options
    (f"{URI_PREFIX}/%2e%2e/j-2", None),
    (f"{URI_PREFIX}#x", None),
]


@pytest.mark.parametrize("path, root", DELETABLE, ids=str)
def test_delete_on_finish_is_refused_outside_the_jobs_own_prefix(path, root):
    spec = _quickstart()
    spec["checkpoint"] = {**spec["checkpoint"], "deleteOnFinish": True, **({"path": path} if path else {})}
    settings = Settings(checkpoint_prefix=URI_TEMPLATE)
    if root is None:
        # The job spec's own URI rules may refuse it first; either way nothing is made ...
        with pytest.raises(SpecError, match=r"(?s)ElastuneJob team-a/j.*checkpoint\.path = .*rule: .*fix:  "):
            desired(OWNER, spec, settings)
        with pytest.raises(SpecError):
            cleanup_job(OWNER, spec, settings)  # ... and at delete, checked again: no Job
        with pytest.raises(SpecError, match=r"(?s)spec\.checkpoint\.path = .*rule: .*deleteOnFinish.*fix:  "):
            deletable_root(on_volume(path), VOLUME_PREFIX, URI_PREFIX, "ElastuneJob team-a/j")  # the prefix rule alone refuses it
        return
    assert len(desired(OWNER, spec, settings)) == 3
    command = cleanup_job(OWNER, spec, settings)["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["python", "-m", "elastune", "ckpt", "clear", root, "--yes"]
    spec["checkpoint"]["deleteOnFinish"] = False
    desired(OWNER, spec, settings)  # where a job writes is not the rule's business; deleting is


def test_object_store_deletion_needs_the_operators_prefix():
    spec = _quickstart()
    spec["checkpoint"] = {"path": URI_PREFIX, "deleteOnFinish": True}
    with pytest.raises(SpecError, match="ELASTUNE_CHECKPOINT_PREFIX, and this operator has none"):
        desired(OWNER, spec, Settings())
    spec["checkpoint"]["path"] = "checkpoints/team-a/j"
    desired(OWNER, spec, Settings())


@pytest.mark.parametrize(
    "template, problem",
    [
        ("s3://bucket/elastune/{namespace}/{name}", None),
        ("gs://bucket/{namespace}/jobs/{name}/", None),
        ("s3://bucket/elastune/{name}", "{namespace} once"),
        ("s3://bucket/elastune/{namespace}", "{name} once"),
        ("s3://bucket/elastune/{namespace}-{name}", "as a whole component"),  # ns a-b/job c and ns a/job b-c would share one
        ("s3://{namespace}/{name}/x", "{namespace} once"),
        ("/mnt/elastune/{namespace}/{name}", "object-store URI"),
        ("file:///data/{namespace}/{name}", "object-store URI"),
        ("s3://bucket/../{namespace}/{name}", "no '.', '..'"),
        ("s3://bucket/x?region=eu/{namespace}/{name}", "no '?'"),
        ("s3://bucket/{namespace}/{name}/{job}", "the only fields"),
    ],
)
def test_the_checkpoint_prefix_template_is_checked(template, problem):
    if problem is None:
        assert Settings.from_env({"ELASTUNE_CHECKPOINT_PREFIX": template}).checkpoint_prefix == template.rstrip("/")
        return
    with pytest.raises(ElastuneError, match=re.escape(problem)):
        Settings.from_env({"ELASTUNE_CHECKPOINT_PREFIX": template})


ALLOWED = ("registry.example.com/elastune", "registry.example.com:5000/team", "elastune")
IMAGES = [  # (image, admitted by ALLOWED)
    ("registry.example.com/elastune", True),
    ("registry.example.com/elastune:1", True),
    ("registry.example.com/elastune:0.1.0-cu128", True),
    ("registry.example.com/elastune@sha256:" + "a" * 64, True),
    ("registry.example.com/elastune:1@sha256:" + "a" * 64, True),
    ("registry.example.com/elastune/tools:1", True),
    ("registry.example.com:5000/team/x:1", True),
    ("elastune:0.1.0", True),
    ("elastune/x:1", True),
    ("registry.example.com/elastune-evil:1", False),
    ("registry.example.com/elastuneevil", False),
    ("registry.example.com.evil.io/elastune:1", False),
    ("registry.example.com:5000/elastune:1", False),  # another port is another registry
    ("registry.example.com/other:1", False),
    ("registry.example.com:5000/teamx:1", False),
    ("registry.example.com:5000/team:1", True),
    ("evil.io/registry.example.com/elastune:1", False),
    ("Registry.example.com/elastune:1", False),
    ("docker.io/library/elastune:1", False),  # written differently: prefixes match the text
    ("elastune-evil:1", False),
    ("elastune:1/x", False),  # a ':' before a '/' is a port, and elastune a registry host here
]


@pytest.mark.parametrize("image, admitted", IMAGES, ids=str)
def test_the_image_allowlist_matches_whole_components(image, admitted):
    assert image_allowed(image, ALLOWED) is admitted
    assert image_allowed(image, ()) is True  # no allowlist: any image
    spec = {**_quickstart(), "cluster": {"image": image}}
    settings = Settings(allowed_images=ALLOWED)
    if admitted:
        assert desired(OWNER, spec, settings)[2]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"] == image
    else:
        with pytest.raises(SpecError, match=r"(?s)spec\.cluster\.image = .*rule: .*ELASTUNE_ALLOWED_IMAGES.*fix:  "):
            desired(OWNER, spec, settings)


def test_image_allowlist_settings():
    settings = Settings.from_env(
        {"ELASTUNE_ALLOWED_IMAGES": " registry.example.com/elastune/ , elastune,", "ELASTUNE_IMAGE": "elastune:0.1.0"}
    )
    assert settings.allowed_images == ("registry.example.com/elastune", "elastune")
    assert Settings.from_env({"ELASTUNE_ALLOWED_IMAGES": ""}).allowed_images == ()
    with pytest.raises(ElastuneError, match="ELASTUNE_IMAGE 'elastune:0.1.0' is not admitted"):
        Settings.from_env({"ELASTUNE_ALLOWED_IMAGES": "registry.example.com/elastune"})  # the default image, refused
    spec = _quickstart()  # no image: the operator's, checked like any
    refusing = Settings(image="registry.example.com/elastune:1", allowed_images=("registry.example.com/elastune",))
    assert (
        desired(OWNER, spec, refusing)[2]["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"]
        == "registry.example.com/elastune:1"
    )
    spec["checkpoint"] = {"deleteOnFinish": True}
    assert cleanup_job(OWNER, {**spec, "cluster": {"image": "registry.example.com/elastune:2"}}, refusing)
    with pytest.raises(SpecError, match="spec.cluster.image"):
        cleanup_job(OWNER, {**spec, "cluster": {"image": "evil.io/elastune:1"}}, refusing)  # no clean-up in another image


@pytest.mark.parametrize(
    "value, parsed",
    [
        ("10.0.0.0/8:9000,0.0.0.0/0:443", (Egress("10.0.0.0/8", 9000), Egress("0.0.0.0/0", 443))),
        (" 10.1.2.3/32 , ::/0:443, fd00::/8", (Egress("10.1.2.3/32"), Egress("::/0", 443), Egress("fd00::/8"))),
        ("10.1.2.3/8:9000", (Egress("10.0.0.0/8", 9000),)),
        ("none", ()),
        ("10.0.0.0:9000", "not CIDR[:PORT]"),
        ("10.0.0.0/8:0", "outside 1..65535"),
        ("10.0.0.0/8:http", "not CIDR[:PORT]"),
        ("10.0.0.300/8", "not CIDR[:PORT]"),
        ("minio.example.com/32:9000", "not CIDR[:PORT]"),
    ],
)
def test_storage_egress_settings(value, parsed):
    if isinstance(parsed, str):
        with pytest.raises(ElastuneError, match=rf"ELASTUNE_STORAGE_EGRESS entry .*{re.escape(parsed)}"):
            Settings.from_env({"ELASTUNE_STORAGE_EGRESS": value})
        return
    assert Settings.from_env({"ELASTUNE_STORAGE_EGRESS": value}).storage_egress == parsed


def _policy(spec, settings):
    return next(o for o in desired(OWNER, spec, settings) if o["kind"] == "NetworkPolicy")["spec"]


def test_egress_is_dns_the_jobs_own_ray_pods_and_storage():
    spec = {**_quickstart(), "scaling": {"min_workers": 2, "max_workers": 2, "cpus_per_worker": 1}}  # no autoscaler
    settings = Settings.from_env({"ELASTUNE_STORAGE_EGRESS": "10.0.0.0/8:9000"})
    policy = _policy(spec, settings)
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert all(rule.get("to") for rule in policy["egress"]), "an egress rule without `to` opens every address"
    assert policy["egress"] == [
        {"to": [{"podSelector": {"matchLabels": OWNER.labels("ray")}}]},
        {
            "to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
        },
        {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 9000}]},
    ]
    default = _policy(spec, Settings())["egress"][2:]
    assert [r["to"][0]["ipBlock"]["cidr"] for r in default] == ["0.0.0.0/0", "::/0"] and {
        r["ports"][0]["port"] for r in default
    } == {443}
    assert _policy(spec, Settings.from_env({"ELASTUNE_STORAGE_EGRESS": "none"}))["egress"][2:] == []
    nodelocal = _policy(spec, Settings.from_env({"ELASTUNE_DNS_EGRESS": "169.254.20.10/32"}))["egress"][1]
    assert nodelocal["to"][1:] == [{"ipBlock": {"cidr": "169.254.20.10/32"}}] and nodelocal["ports"][0] == {
        "protocol": "UDP",
        "port": 53,
    }
    with pytest.raises(ElastuneError, match="ELASTUNE_DNS_EGRESS takes CIDRs without a port"):
        Settings.from_env({"ELASTUNE_DNS_EGRESS": "169.254.20.10/32:53"})


def test_only_an_autoscaled_cluster_reaches_the_api_and_only_its_sidecar_holds_a_token():
    spec = {**_quickstart(), "scaling": {"min_workers": 1, "max_workers": 4, "cpus_per_worker": 1}}  # 1..4 pods: autoscaled
    objects = desired(OWNER, spec, Settings())
    ports = {(r["to"][0]["ipBlock"]["cidr"], r["ports"][0]["port"]) for r in objects[1]["spec"]["egress"][2:]}
    assert ports == {(c, p) for c in ("0.0.0.0/0", "::/0") for p in (443, 6443)}  # 443 once: storage and API share it
    cluster = objects[2]["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is False
    assert all("/var/run/secrets" not in m["mountPath"] for m in head["containers"][0]["volumeMounts"])
    (mount,) = cluster["autoscalerOptions"]["volumeMounts"]
    assert mount["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and mount["readOnly"] is True
    token = next(v for v in head["volumes"] if v["name"] == mount["name"])
    assert {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}} in token["projected"]["sources"]
    validate(objects[2])
    fixed = desired(OWNER, {**spec, "scaling": {"min_workers": 2, "max_workers": 2, "cpus_per_worker": 1}}, Settings())
    assert all(r["ports"][0]["port"] != 6443 for r in fixed[1]["spec"]["egress"][2:])
    assert "autoscalerOptions" not in fixed[2]["spec"]["rayClusterSpec"]
    assert all(
        v["name"] != "kube-api-access" for v in fixed[2]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"]
    )
