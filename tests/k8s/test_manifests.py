"""k8s/: every object kustomize renders for each overlay is valid for the Kubernetes API and the
KubeRay CRDs, broken ones are refused, and the pieces fit each other (ports, labels, paths);
egress is limited and only the autoscaler sidecar holds a Kubernetes API token."""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from elastune.kube.crd import crd_yaml
from elastune.kube.objects import Owner, Settings
from elastune.spec.load import validate_spec
from tests.k8s.schemas import NO_SCHEMA, Invalid, validate

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("cpu-dev", "gpu")


def render(overlay: str) -> list[dict]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(ROOT / "k8s" / "overlays" / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in render(request.param)}


def pod_templates(obj: dict) -> list[dict]:
    spec = obj.get("spec", {})
    if obj["kind"] in ("Deployment", "Job"):
        return [spec["template"]]
    if obj["kind"] == "RayCluster":
        return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if obj["kind"] == "RayJob":
        return [spec["submitterPodTemplate"]] + (
            pod_templates({"kind": "RayCluster", "spec": spec["rayClusterSpec"]}) if "rayClusterSpec" in spec else []
        )
    return []


def test_every_rendered_object_is_valid(objects):
    kinds = {kind for kind, _ in objects}
    assert {"RayCluster", "RayJob", "CustomResourceDefinition", "Deployment", "Role", "NetworkPolicy", "PodMonitor"} <= kinds
    for obj in objects.values():
        if (obj["apiVersion"], obj["kind"]) not in NO_SCHEMA:
            validate(obj)


def _break(objects, kind, name, edit):
    obj = copy.deepcopy(objects[(kind, name)])
    edit(obj)
    return obj


BROKEN = {  # case: (kind, name, the edit, what the refusal names)
    "misspelled RayCluster field": (
        "RayCluster",
        "elastune",
        lambda o: o["spec"]["workerGroupSpecs"][0].update(maxReplica=4),
        "'maxReplica' was unexpected",
    ),
    "RayCluster replicas as text": (
        "RayCluster",
        "elastune",
        lambda o: o["spec"]["workerGroupSpecs"][0].update(minReplicas="one"),
        "minReplicas",
    ),
    "RayCluster auth mode": (
        "RayCluster",
        "elastune",
        lambda o: o["spec"]["authOptions"].update(mode="password"),
        "authOptions.mode",
    ),
    "RayJob deletion rule (CEL)": (
        "RayJob",
        "elastune-quickstart",
        lambda o: o["spec"].update(deletionStrategy={"onSuccess": {"policy": "DeleteCluster"}}),
        "deletionStrategy",
    ),
    "Deployment replicas as text": (
        "Deployment",
        "elastune-operator",
        lambda o: o["spec"].update(replicas="one"),
        "spec.replicas",
    ),
    "container field unknown": (
        "Deployment",
        "elastune-operator",
        lambda o: o["spec"]["template"]["spec"]["containers"][0].update(imagePolicy="Always"),
        "imagePolicy",
    ),
    "NetworkPolicy port as list": (
        "NetworkPolicy",
        "elastune-ray",
        lambda o: o["spec"]["ingress"][1]["ports"][0].update(port=[8265]),
        "port",
    ),
    "Role without verbs": ("Role", "elastune-operator", lambda o: o["rules"][0].pop("verbs"), "verbs"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_broken_manifest_is_refused(objects, case):
    kind, name, edit, said = BROKEN[case]
    validate(objects[(kind, name)])  # valid before the edit
    with pytest.raises(Invalid, match=said):
        validate(_break(objects, kind, name, edit))


def test_pods_run_as_non_root_with_no_capabilities(objects):
    templates = [(obj["kind"], t) for obj in objects.values() for t in pod_templates(obj)]
    assert len(templates) == 4  # head, workers, submitter, operator
    for kind, t in templates:
        pod = t["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, kind
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, kind
        assert pod["securityContext"].get("runAsUser", 1000) != 0, kind
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (kind, c["name"])
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}, (kind, c["name"])
        if kind != "Deployment":  # only the operator talks to the Kubernetes API
            assert pod["automountServiceAccountToken"] is False, kind
    autoscaler = objects[("RayCluster", "elastune")]["spec"]["autoscalerOptions"]["securityContext"]
    assert autoscaler["runAsNonRoot"] and autoscaler["capabilities"] == {"drop": ["ALL"]}


def test_rbac_is_namespaced_and_least_privilege(objects):
    assert not [k for k in objects if k[0] in ("ClusterRole", "ClusterRoleBinding")]
    role = objects[("Role", "elastune-operator")]
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"], rule
        assert "secrets" not in rule["resources"], "the operator never reads credentials"
        assert "delete" not in rule["verbs"], "owned objects go by garbage collection; checkpoints by a Job"
    binding = objects[("RoleBinding", "elastune-operator")]
    sa = objects[("ServiceAccount", "elastune-operator")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "elastune"}]
    assert (
        objects[("Deployment", "elastune-operator")]["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    )


@pytest.mark.parametrize("path", sorted((ROOT / "k8s" / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_are_valid(path):
    for obj in yaml.safe_load_all(path.read_text()):
        validate({**obj, "metadata": {**obj["metadata"], "namespace": "elastune"}})


def test_the_image_holds_what_the_manifests_run(objects):
    """k8s/image/Dockerfile (not built here: no container runtime) puts the operator where its
    Deployment runs it and runs as the user every pod's securityContext names."""
    dockerfile = (ROOT / "k8s" / "image" / "Dockerfile").read_text()
    copies = {line.split()[-2]: line.split()[-1] for line in dockerfile.splitlines() if line.startswith("COPY")}
    command = objects[("Deployment", "elastune-operator")]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:2] == ["kopf", "run"] and command[-1] == copies["operators"] + "/elastune_operator.py"
    assert (ROOT / "operators" / "elastune_operator.py").is_file() and (ROOT / "platform").is_dir()
    assert "USER 1000:100" in dockerfile
    images = {c["image"].split(":")[0] for obj in objects.values() for t in pod_templates(obj) for c in t["spec"]["containers"]}
    assert images == {"elastune"}, images


def test_the_crd_file_is_the_generated_one():
    assert (ROOT / "k8s" / "operator" / "crd.yaml").read_text() == crd_yaml(), (
        "run `elastune schema --crd > k8s/operator/crd.yaml`"
    )


def test_dashboards_are_the_ones_in_dashboards():
    source = sorted((ROOT / "dashboards" / "grafana").glob("*.json"))
    copies = sorted((ROOT / "k8s" / "base" / "dashboards").glob("*.json"))
    assert [p.name for p in copies] == [p.name for p in source], "run `make k8s-dashboards`"
    for a, b in zip(source, copies):
        assert a.read_bytes() == b.read_bytes(), f"{b} differs from {a}: run `make k8s-dashboards`"


def test_dashboards_config_map_is_labelled_for_grafana(objects):
    cm = objects[("ConfigMap", "elastune-dashboards")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert sorted(cm["data"]) == sorted(p.name for p in (ROOT / "dashboards" / "grafana").glob("*.json"))


def test_the_pieces_fit(objects):
    """Selectors select the pods they mean, named ports exist, the RayJob's spec is mounted and
    valid, its metrics port is the one the PodMonitor scrapes and the NetworkPolicy opens."""
    cluster = objects[("RayCluster", "elastune")]
    head = cluster["spec"]["headGroupSpec"]["template"]
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]
    head_ports = {p["name"]: p["containerPort"] for p in head["spec"]["containers"][0]["ports"]}
    assert cluster["spec"]["workerGroupSpecs"][0]["minReplicas"] < cluster["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    assert cluster["spec"]["enableInTreeAutoscaling"] is True

    monitor = objects[("PodMonitor", "elastune")]
    for template in (head, worker):
        assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        assert template["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    scraped = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert scraped <= set(head_ports), scraped

    policy = objects[("NetworkPolicy", "elastune-ray")]
    assert policy["spec"]["podSelector"]["matchLabels"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    opened = {p["port"] for rule in policy["spec"]["ingress"] for p in rule.get("ports", [])}
    assert {head_ports["dashboard"], head_ports["metrics"], head_ports["elastune-metrics"]} <= opened
    job = objects[("RayJob", "elastune-quickstart")]
    client = job["spec"]["submitterPodTemplate"]["metadata"]["labels"]
    assert any(
        f.get("podSelector", {}).get("matchLabels", {}).items() <= client.items() and f.get("podSelector")
        for rule in policy["spec"]["ingress"]
        for f in rule["from"]
    )
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}

    mounts = {m["name"]: m["mountPath"] for m in head["spec"]["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in head["spec"]["volumes"]}
    jobs = objects[("ConfigMap", volumes["jobs"]["configMap"]["name"])]
    spec_file = job["spec"]["entrypoint"].split()[-1]
    assert spec_file.startswith(mounts["jobs"] + "/") and spec_file.rsplit("/", 1)[1] in jobs["data"]
    spec = validate_spec(yaml.safe_load(jobs["data"][spec_file.rsplit("/", 1)[1]]), source=spec_file)
    assert spec.metrics.port == head_ports["elastune-metrics"] and spec.metrics.host == "0.0.0.0"
    for path in (spec.data.path, spec.output_dir, spec.checkpoint_path):
        assert "://" in path or path.startswith(mounts["shared"] + "/"), path
    claim = volumes["shared"]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objects
    if spec.scaling.gpus_per_worker:
        assert worker["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] >= spec.scaling.gpus_per_worker
        assert spec.checkpoint_path.startswith("s3://")
        assert worker["spec"]["containers"][0]["envFrom"] == [{"secretRef": {"name": "elastune-s3"}}]


DNS = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels, matchExpressions with In) against a pod's labels."""
    ok = selector.get("matchLabels", {}).items() <= labels.items()
    for e in selector.get("matchExpressions", []):
        assert e["operator"] == "In", e
        ok = ok and labels.get(e["key"]) in e["values"]
    return ok


def test_egress_is_limited_to_dns_ray_and_named_ports(objects):
    policies = {name: obj["spec"] for (kind, name), obj in objects.items() if kind == "NetworkPolicy"}
    assert sorted(policies) == ["elastune-job-helpers", "elastune-ray"]
    for name, policy in policies.items():
        assert "Egress" in policy["policyTypes"], name
        assert policy["egress"] and all(rule.get("to") for rule in policy["egress"]), (
            f"{name}: a rule without `to` ({{}} included) opens every address"
        )
        assert any(
            r["to"] == DNS and r["ports"] == [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
            for r in policy["egress"]
        ), name
        for rule in policy["egress"]:
            if any("ipBlock" in peer for peer in rule["to"]):
                assert rule.get("ports"), f"{name}: an address block is open on named ports only: {rule}"
    ray = policies["elastune-ray"]
    assert {"to": [{"podSelector": ray["podSelector"]}]} in ray["egress"], "Ray pods reach each other on every port"
    opened = {
        (peer["ipBlock"]["cidr"], port["port"])
        for r in ray["egress"]
        for peer in r["to"]
        if "ipBlock" in peer
        for port in r["ports"]
    }
    assert opened == {(c, p) for c in ("0.0.0.0/0", "::/0") for p in (443, 6443)}  # storage; the autoscaler's API server
    # The operator's own settings say the same for ElastuneJobs: its Deployment's values are valid and match.
    operator = objects[("Deployment", "elastune-operator")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in operator["env"] if "value" in e}
    assert {
        "ELASTUNE_ALLOWED_IMAGES",
        "ELASTUNE_CHECKPOINT_PREFIX",
        "ELASTUNE_STORAGE_EGRESS",
        "ELASTUNE_KUBE_API_EGRESS",
        "ELASTUNE_DNS_EGRESS",
    } <= set(env)
    settings = Settings.from_env(env)
    assert (settings.storage_egress, settings.kube_api_egress) == (Settings().storage_egress, Settings().kube_api_egress)
    assert {(e.cidr, e.port) for e in settings.storage_egress + settings.kube_api_egress} == opened


def test_the_job_helpers_policy_holds_the_operators_submitters_and_cleanups(objects):
    helpers = objects[("NetworkPolicy", "elastune-job-helpers")]["spec"]
    owner = Owner("j", "elastune", "uid")
    assert selects(helpers["podSelector"], owner.labels("submitter")) and selects(helpers["podSelector"], owner.labels("cleanup"))
    assert not selects(helpers["podSelector"], owner.labels("ray"))  # the job's own policy holds those
    assert "ingress" not in helpers and helpers["policyTypes"] == ["Ingress", "Egress"]  # nothing reaches them
    dashboard = next(r for r in helpers["egress"] if r["ports"] == [{"protocol": "TCP", "port": 8265}])
    assert selects(dashboard["to"][0]["podSelector"], owner.labels("ray"))


def test_only_the_autoscaler_sidecar_holds_a_token(objects):
    cluster = objects[("RayCluster", "elastune")]["spec"]
    assert cluster["enableInTreeAutoscaling"] is True
    (mount,) = cluster["autoscalerOptions"]["volumeMounts"]
    head = cluster["headGroupSpec"]["template"]["spec"]
    volume = {v["name"]: v for v in head["volumes"]}[mount["name"]]
    assert mount["mountPath"] == TOKEN_PATH and mount["readOnly"] is True
    assert [s for s in volume["projected"]["sources"] if "serviceAccountToken" in s] == [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}}
    ]
    for obj in objects.values():
        for t in pod_templates(obj):
            mounted = [m["mountPath"] for c in t["spec"]["containers"] for m in c.get("volumeMounts", [])]
            assert not [m for m in mounted if m.startswith("/var/run/secrets")], (obj["kind"], mounted)
