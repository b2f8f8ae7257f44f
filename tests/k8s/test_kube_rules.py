"""The pure rules behind the operator and the CRD: the generated schema is structural and admits
every job spec the project ships, refuses what the job spec refuses where a schema can say it;
paths are placed on the shared volume; pods are sized from the scaling section; the status
follows KubeRay's states and the run's metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from elastune.errors import SpecError
from elastune.kube.crd import crd, spec_schema
from elastune.kube.objects import Owner, Settings, desired, job_spec
from elastune.kube.status import next_status, phase_of, progress_of
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
    """What the API server demands of a CRD schema: a type everywhere (or explicitly any value),
    no references, no junctors, no defaults (the stored object stays as written)."""
    nodes = list(walk(spec_schema()))
    assert len(nodes) > 100
    for path, node in nodes:
        assert node.get("type") or node.get("x-kubernetes-preserve-unknown-fields"), path
        assert not {"$ref", "$defs", "default", "const", "prefixItems", *JUNCTORS} & set(node), (path, set(node))
        assert not ("properties" in node and "additionalProperties" in node), path
        assert isinstance(node.get("exclusiveMinimum", False), bool) and isinstance(node.get("exclusiveMaximum", False), bool), path
    assert crd()["spec"]["versions"][0]["subresources"] == {"status": {}}


def resource(spec: dict) -> dict:
    return {"apiVersion": "elastune.io/v1alpha1", "kind": "ElastuneJob", "metadata": {"name": "j", "namespace": "team-a"}, "spec": spec}


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
    "a field of another schedule": (lambda s: s.update(schedule={"name": "cosine", "decay_fraction": 0.2}), "decay_fraction applies only with name wsd"),
    "a schedule without what it needs": (lambda s: s.update(schedule={"name": "cyclical"}), "name cyclical needs cycle_samples"),
    "two model kinds": (lambda s: s["model"].update(factory="pkg.mod:fn"), "exactly one of recipe, factory"),
    "a fault's field on another": (lambda s: s.update(faults=[{"action": "kill_rank", "rank": 0, "at_step": 3, "seconds": 2}]), "seconds applies only with action delay_rank"),
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
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and container["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    assert group["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_the_head_trains_nothing_but_hosts_live_recoverys_lighthouse():
    head = lambda s: desired(OWNER, s, Settings())[2]["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"]  # noqa: E731
    spec = _quickstart()
    assert head(spec) == "0"
    assert head({**spec, "scaling": {**spec["scaling"], "recovery": "live"}}) == "1"


@pytest.mark.parametrize("status, suspend, phase", [
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
])  # fmt: skip
def test_phase_follows_kuberay(status, suspend, phase):
    assert phase_of(status, suspend)[0] == phase


def test_status_keeps_progress_and_transition_times():
    running = {"metadata": {"name": "j"}, "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "j-abc"}}
    first = next_status(None, running, False, {"step": 10, "samples": 320}, 1, "T1")
    again = next_status(first, running, False, None, 1, "T2")  # a scrape that failed: progress stays
    assert (again["step"], again["samples"], again["phase"]) == (10, 320, "Running")
    assert {c["type"]: c["lastTransitionTime"] for c in again["conditions"]}["Running"] == "T1"
    done = next_status(again, {**running, "status": {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}}, False, None, 1, "T3")
    times = {c["type"]: (c["status"], c["lastTransitionTime"]) for c in done["conditions"]}
    assert times["Running"] == ("False", "T3") and times["Succeeded"] == ("True", "T3") and times["Failed"] == ("False", "T1")


def test_progress_counts_from_the_start_of_training_not_of_this_run():
    """A run resumed at step 200 has done 3 steps itself; the status says 203."""
    metrics = RunMetrics("j", "resumed")
    rows = [{"step": s, "samples_seen": 32 * s, "loss": 2.0, "lr": 1e-3, "world_size": 2, "global_batch_size": 32,
             "micro_batches": [2, 2], "step_seconds": 0.1} for s in (201, 202, 203)]  # fmt: skip
    metrics.observe(rows, [])
    progress = progress_of(generate_latest(metrics.registry).decode())
    assert (progress["step"], progress["samples"], progress["worldSize"], progress["failuresSurvived"]) == (203, 203 * 32, 2, 0)
    assert "lastDurableCheckpoint" not in progress  # none in this run yet
