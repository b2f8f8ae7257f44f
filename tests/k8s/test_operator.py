"""The ElastuneJob operator end to end: the operator Deployment's own command (`kopf run ...
operators/elastune_operator.py`, logged in through a kubeconfig) against an in-memory Kubernetes
API (tests/k8s/emulator.py), with a real Elastune metrics exporter's text standing in for a
job's head. Create an ElastuneJob, see the RayJob appear with its owner,
patch the RayJob's status and see the ElastuneJob's follow, suspend and resume, refuse an
invalid job and ones across the trust boundary (an image off the allowlist, deleteOnFinish
outside the job's own prefix), delete (keeping or deleting checkpoints, never outside the
prefix); every request the operator made is one its Role in k8s/operator/rbac.yaml allows.
The operator runs once, with its Deployment's environment and these test settings on top."""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import kmock
import pytest
import yaml
from prometheus_client import generate_latest

from elastune.metrics.exporter import RunMetrics
from elastune.spec.load import validate_spec
from tests.helpers import ev, free_port, row
from tests.k8s.emulator import emulator
from tests.k8s.schemas import Invalid, validate

ROOT = Path(__file__).resolve().parents[2]
NS = "elastune"
EJ, RJ, CM, NP, JOB = (
    "elastune.io/v1alpha1/elastunejobs",
    "ray.io/v1/rayjobs",
    "v1/configmaps",
    "networking.k8s.io/v1/networkpolicies",
    "batch/v1/jobs",
)
MERGE = {"Content-Type": "application/merge-patch+json"}
SETTINGS = {  # on top of the Deployment's environment; every case below runs under these
    "ELASTUNE_IMAGE": "registry.example/elastune:test",
    "ELASTUNE_ALLOWED_IMAGES": "registry.example/elastune",
    "ELASTUNE_CHECKPOINT_PREFIX": "s3://ckpt/elastune/{namespace}/{name}",
    "ELASTUNE_STORAGE_EGRESS": "10.0.0.0/8:9000,0.0.0.0/0:443",
    "ELASTUNE_STATUS_SECONDS": "0.2",
}


def quickstart(**extra) -> dict:
    """The spec of the shipped example (k8s/examples/elastunejob-quickstart.yaml)."""
    example = yaml.safe_load((ROOT / "k8s" / "examples" / "elastunejob-quickstart.yaml").read_text())
    return {**example["spec"], **extra}


def resource(name: str, spec: dict) -> dict:
    return {
        "apiVersion": "elastune.io/v1alpha1",
        "kind": "ElastuneJob",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


class Head:
    """A job's head as the operator sees it: the run's exporter text on an HTTP port."""

    def __init__(self):
        self.metrics, self.asked = RunMetrics("quickstart", "r1"), []
        head = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                head.asked.append(self.path)
                body = generate_latest(head.metrics.registry)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/" + "{namespace}/{cluster}/metrics"


@pytest.fixture(scope="module")
def head():
    head = Head()
    yield head
    head.server.shutdown()


def _operator_container() -> dict:
    deployment = yaml.safe_load((ROOT / "k8s" / "operator" / "deployment.yaml").read_text())
    return deployment["spec"]["template"]["spec"]["containers"][0]


def operator_env() -> dict[str, str]:
    """The Deployment's literal environment (POD_NAMESPACE comes from the API: --namespace has it)."""
    return {e["name"]: e["value"] for e in _operator_container()["env"] if "value" in e}


def operator_command(liveness_port: int) -> list[str]:
    """The Deployment's command, run from this checkout instead of the image's /opt/elastune."""
    command = _operator_container()["command"]
    swap = {
        "$(POD_NAMESPACE)": NS,
        "0.0.0.0:8081": f"127.0.0.1:{liveness_port}",
        "/opt/elastune/operators": str(ROOT / "operators"),
    }
    out = []
    for word in command:
        arg = word
        for old, new in swap.items():
            arg = arg.replace(old, new)
        out.append(arg)
    assert out[0] == "kopf" and out[-1].endswith("operators/elastune_operator.py") and f"--namespace={NS}" in out
    return [str(Path(sys.executable).parent / "kopf"), *out[1:]]


async def eventually(check, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)
    return value


def test_operator_end_to_end(head, tmp_path):
    requests = asyncio.run(_scenario(head, tmp_path))
    allowed = _role_rules()
    made = {
        (r.resource.group or "", r.resource.plural + (f"/{r.subresource}" if r.subresource else ""), VERB[r.action])
        for r in requests
    }
    assert ("ray.io", "rayjobs", "create") in made and ("elastune.io", "elastunejobs/status", "patch") in made
    refused = sorted(m for m in made if not any(m[0] in g and m[1] in res and m[2] in verbs for g, res, verbs in allowed))
    assert not refused, f"the operator made requests its Role does not allow: {refused}"
    granted = {(g, res, verb) for gs, ress, verbs in allowed for g in gs for res in ress for verb in verbs}
    assert granted == made, f"least privilege: the Role grants what the operator used, no more: {granted - made}"


VERB = {
    kmock.action.LIST: "list",
    kmock.action.WATCH: "watch",
    kmock.action.FETCH: "get",
    kmock.action.CREATE: "create",
    kmock.action.UPDATE: "patch",
    kmock.action.DELETE: "delete",
}


def _role_rules():
    role = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "operator" / "rbac.yaml").read_text()) if d["kind"] == "Role")
    return [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]]


async def _scenario(head: Head, tmp_path: Path):
    k8s = emulator(
        (EJ, "ElastuneJob", {"status"}),
        (RJ, "RayJob", {"status"}),
        (CM, "ConfigMap", set()),
        (NP, "NetworkPolicy", set()),
        (JOB, "Job", set()),
    )
    async with k8s, kmock.Server(k8s) as server:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "emulator",
                    "clusters": [{"name": "emulator", "cluster": {"server": str(server.url)}}],
                    "users": [{"name": "operator", "user": {}}],
                    "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": "operator", "namespace": NS}}],
                }
            )
        )
        env = {
            **os.environ,
            **operator_env(),
            **SETTINGS,
            "KUBECONFIG": str(kubeconfig),
            "ELASTUNE_METRICS_URL": head.url,
            "PYTHONPATH": str(ROOT),
        }
        liveness = free_port()
        with (tmp_path / "operator.log").open("w") as log:
            operator = await asyncio.create_subprocess_exec(
                *operator_command(liveness), env=env, stdout=log, stderr=subprocess.STDOUT
            )
        try:
            async with aiohttp.ClientSession(str(server.url)) as http:
                await eventually(
                    lambda: operator.returncode is not None or alive(liveness), "the operator's liveness endpoint", 30
                )
                assert operator.returncode is None, (tmp_path / "operator.log").read_text()
                await _steps(k8s, http, head)
        except BaseException:
            print((tmp_path / "operator.log").read_text())  # in pytest's report of the failure
            raise
        finally:
            if operator.returncode is None:
                operator.terminate()
            await asyncio.wait_for(operator.wait(), 15)
        assert operator.returncode in (0, -signal.SIGTERM), (tmp_path / "operator.log").read_text()
        return [
            r
            for r in k8s
            if r.resource is not None
            and r.resource.plural
            and r.headers.get("User-Agent", "").startswith(("kopf/", "elastune-operator"))
        ]


def alive(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def events(k8s) -> list[dict]:
    return [obj.raw for (res, _, _), obj in list(k8s.objects.items()) if res == kmock.resource("v1/events")]


async def _steps(k8s, http: aiohttp.ClientSession, head: Head) -> None:
    def get(res: str, name: str):
        key = (kmock.resource(res), NS, name)
        return k8s.objects[key].raw if key in k8s.objects and not k8s.objects[key].deleted else None

    async def call(method: str, res: str, name: str = "", body=None, sub: str = ""):
        group_version, plural = res.rsplit("/", 1)
        root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        url = f"{root}/namespaces/{NS}/{plural}" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")
        async with http.request(method, url, json=body, headers=MERGE if method == "PATCH" else None) as r:
            assert r.status in (200, 201), await r.text()

    def status(name: str) -> dict:
        return (get(EJ, name) or {}).get("status") or {}

    # 1. A job: its RayJob, spec ConfigMap and NetworkPolicy appear, owned by it and valid.
    job = resource("quickstart", quickstart())
    validate(job)  # what the API server would check with the generated CRD
    await call("POST", EJ, body=job)
    rayjob = await eventually(lambda: get(RJ, "quickstart"), "the RayJob")
    owner = get(EJ, "quickstart")
    for res, name in ((RJ, "quickstart"), (CM, "quickstart-spec"), (NP, "quickstart-ray")):
        obj = await eventually(lambda: get(res, name), name)
        ref = obj["metadata"]["ownerReferences"]
        assert ref == [
            {
                "apiVersion": "elastune.io/v1alpha1",
                "kind": "ElastuneJob",
                "name": "quickstart",
                "uid": owner["metadata"]["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        validate({k: v for k, v in obj.items() if k != "status"})
    spec = validate_spec(yaml.safe_load(get(CM, "quickstart-spec")["data"]["job.yaml"]), source="job.yaml")
    assert spec.name == "quickstart" and spec.checkpoint_path == f"/mnt/elastune/checkpoints/{NS}/quickstart"
    assert spec.data.path == "/mnt/elastune/data/stdlib-w65" and spec.metrics.port == 9400
    cluster = rayjob["spec"]["rayClusterSpec"]
    workers = cluster["workerGroupSpecs"][0]
    assert (workers["minReplicas"], workers["maxReplicas"]) == (1, 2)  # 1..4 workers, 2 per 2-CPU pod
    assert cluster["enableInTreeAutoscaling"] is True and rayjob["spec"]["suspend"] is False
    assert workers["template"]["spec"]["containers"][0]["image"] == "registry.example/elastune:test"
    egress = get(NP, "quickstart-ray")["spec"]["egress"]  # ELASTUNE_STORAGE_EGRESS, and the API for its autoscaler
    assert {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"protocol": "TCP", "port": 9000}]} in egress
    assert {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}], "ports": [{"protocol": "TCP", "port": 6443}]} in egress
    await eventually(lambda: status("quickstart").get("phase") == "Pending", "phase Pending")

    # 2. KubeRay reports the job running; the run's metrics say how far it got.
    head.metrics.observe(
        [
            row(
                time=1.0,
                step=250 + i,
                samples_seen=32 * (250 + i),
                loss=2.5,
                lr=1e-3,
                world_size=3,
                global_batch_size=32,
                micro_batches=(2, 1, 1),
                step_seconds=0.1,
                eval_loss=2.75 if i == 1 else None,  # step 251 evaluated
            )
            for i in (1, 2)
        ],
        [
            ev("checkpoint", time=1_790_000_000.0, step=200, seconds=0.2, bytes=10),
            ev("recovery", time=1.0, mttr_seconds=2.0, lost_steps=0, lost_samples=0),
        ],
    )
    await call(
        "PATCH",
        RJ,
        "quickstart",
        {
            "status": {
                "jobDeploymentStatus": "Running",
                "jobStatus": "RUNNING",
                "rayClusterName": "quickstart-x7k2p",
                "dashboardURL": "quickstart-x7k2p-head-svc:8265",
            }
        },
        "status",
    )
    got = await eventually(lambda: status("quickstart").get("step") == 252 and status("quickstart"), "progress in status")
    assert got["phase"] == "Running" and got["rayCluster"] == "quickstart-x7k2p"
    assert (got["samples"], got["worldSize"], got["failuresSurvived"]) == (252 * 32, 3, 1)
    assert (got["loss"], got["evalLoss"]) == (2.5, 2.75)  # the last step's, and the last evaluation's
    assert got["lastDurableCheckpoint"] == {"step": 200, "time": "2026-09-21T14:13:20Z"}
    assert {c["type"]: c["status"] for c in got["conditions"]} == {
        "Running": "True",
        "Suspended": "False",
        "Succeeded": "False",
        "Failed": "False",
    }
    assert f"/{NS}/quickstart-x7k2p/metrics" in head.asked
    validate(get(EJ, "quickstart"))  # the status fits the CRD's status schema

    # 3. Suspend: the RayJob is suspended; KubeRay's answer shows; progress stays. Resume.
    await call("PATCH", EJ, "quickstart", {"spec": {"suspend": True}})
    await eventually(lambda: get(RJ, "quickstart")["spec"]["suspend"] is True, "the RayJob suspended")
    await call(
        "PATCH",
        RJ,
        "quickstart",
        {"status": {"jobDeploymentStatus": "Suspended", "jobStatus": "STOPPED", "rayClusterName": None}},
        "status",
    )
    got = await eventually(lambda: status("quickstart").get("phase") == "Suspended" and status("quickstart"), "phase Suspended")
    assert got["step"] == 252 and got["lastDurableCheckpoint"]["step"] == 200
    made = copy.deepcopy(get(RJ, "quickstart")["spec"])
    await call(
        "PATCH", EJ, "quickstart", {"spec": {"suspend": False, "stop": {"max_steps": 4000}, "cluster": {"workers": {"cpu": "1"}}}}
    )
    await eventually(lambda: get(RJ, "quickstart")["spec"]["suspend"] is False, "the RayJob resumed")
    # The resumed job reads the changed spec from its ConfigMap; KubeRay's job keeps its cluster.
    await eventually(lambda: "max_steps: 4000" in get(CM, "quickstart-spec")["data"]["job.yaml"], "the changed spec")
    assert get(RJ, "quickstart")["spec"] == {**made, "suspend": False}

    # 4. A job the CRD admits but the job spec's rules refuse: nothing runs, the status says why.
    bad = quickstart(scaling={"min_workers": 1, "max_workers": 8})
    validate(resource("too-wide", bad))
    await call("POST", EJ, body=resource("too-wide", bad))
    got = await eventually(lambda: status("too-wide").get("phase") == "Invalid" and status("too-wide"), "phase Invalid")
    assert "scaling.max_workers = 8" in got["message"] and "fix:" in got["message"]
    warned = await eventually(lambda: [e for e in events(k8s) if e["reason"] == "InvalidSpec"], "the InvalidSpec event")
    assert warned[0]["type"] == "Warning" and warned[0]["involvedObject"]["name"] == "too-wide"
    assert get(RJ, "too-wide") is None and get(CM, "too-wide-spec") is None
    # ... and the same for the trust boundary: an image off ELASTUNE_ALLOWED_IMAGES, deleteOnFinish
    # on another job's checkpoints (here the running quickstart's, by a name it prefixes).
    outside = quickstart()
    outside["checkpoint"] = {**outside["checkpoint"], "path": "checkpoints/elastune/quickstart", "deleteOnFinish": True}
    for name, spec, said in (
        (
            "evil-image",
            quickstart(cluster={"image": "registry.example/elastune-evil:1"}),
            "spec.cluster.image = 'registry.example/elastune-evil:1'",
        ),
        ("quickstart-2", outside, "deletes only inside the job's own prefix /mnt/elastune/checkpoints/elastune/quickstart-2"),
    ):
        validate(resource(name, spec))
        await call("POST", EJ, body=resource(name, spec))
        got = await eventually(lambda: status(name).get("phase") == "Invalid" and status(name), f"{name} Invalid")
        assert said in got["message"] and "fix:" in got["message"], got["message"]
        warned = await eventually(
            lambda: [e for e in events(k8s) if e["reason"] == "InvalidSpec" and e["involvedObject"]["name"] == name],
            f"{name}'s event",
        )
        assert warned[0]["type"] == "Warning" and said in warned[0]["message"]
        assert get(RJ, name) is None and get(CM, f"{name}-spec") is None and get(NP, f"{name}-ray") is None
    # ... and one the CRD itself refuses (the API server's answer, before the operator sees it).
    with pytest.raises(Invalid, match="decay_fraction applies only with name wsd"):
        validate(resource("wrong", quickstart(schedule={"name": "cosine", "decay_fraction": 0.2})))

    # 5. Delete: the operator lets go (its finalizer removed); checkpoints stay by default (no
    #    clean-up Job), deleteOnFinish makes the Job that clears the job's checkpoint root.
    assert get(EJ, "quickstart")["metadata"]["finalizers"] == ["elastune.io/operator"]
    await call("DELETE", EJ, "quickstart")
    await eventually(lambda: get(EJ, "quickstart") is None, "the ElastuneJob gone")
    temp = quickstart()
    temp["checkpoint"] = {**temp["checkpoint"], "deleteOnFinish": True}
    await call("POST", EJ, body=resource("scratch", temp))
    await eventually(lambda: get(RJ, "scratch"), "the scratch RayJob")
    await eventually(lambda: get(EJ, "scratch")["metadata"].get("finalizers"), "the finalizer")
    await call("DELETE", EJ, "scratch")
    await eventually(lambda: get(EJ, "scratch") is None, "the scratch ElastuneJob gone")
    cleanup = get(JOB, "scratch-cleanup")
    assert cleanup["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "python",
        "-m",
        "elastune",
        "ckpt",
        "clear",
        f"/mnt/elastune/checkpoints/{NS}/scratch",
        "--yes",
    ]
    validate(cleanup)
    assert get(JOB, "quickstart-cleanup") is None

    # 6. The prefix rule again at delete: a job made inside its own prefix (s3://, under
    #    ELASTUNE_CHECKPOINT_PREFIX) whose spec then points elsewhere is refused (its RayJob keeps
    #    running as it was), and deleting it starts no clean-up: a warning event says why.
    drifted = quickstart()
    drifted["checkpoint"] = {**drifted["checkpoint"], "path": f"s3://ckpt/elastune/{NS}/drifted/run-1", "deleteOnFinish": True}
    await call("POST", EJ, body=resource("drifted", drifted))
    await eventually(lambda: get(RJ, "drifted"), "the drifted RayJob")
    await call("PATCH", EJ, "drifted", {"spec": {"checkpoint": {"path": f"s3://ckpt/elastune/{NS}/quickstart"}}})
    await eventually(lambda: status("drifted").get("phase") == "Invalid", "drifted Invalid")
    await call("DELETE", EJ, "drifted")
    await eventually(lambda: get(EJ, "drifted") is None, "the drifted ElastuneJob gone")
    kept = await eventually(lambda: [e for e in events(k8s) if e["reason"] == "CheckpointsKept"], "the CheckpointsKept event")
    assert kept[0]["type"] == "Warning" and kept[0]["involvedObject"]["name"] == "drifted"
    assert f"s3://ckpt/elastune/{NS}/quickstart" in kept[0]["message"] and "own prefix" in kept[0]["message"]
    assert get(JOB, "drifted-cleanup") is None
