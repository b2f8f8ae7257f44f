"""The Kubernetes objects one ElastuneJob needs, as pure functions of its spec.

For an ElastuneJob NAME the operator keeps three objects, each owned by it (Kubernetes deletes
them with it): the ConfigMap NAME-spec holding the job spec the Ray job runs (paths placed on
the shared volume, metrics served where the operator reads them), the NetworkPolicy NAME-ray
around its Ray pods, and the RayJob NAME whose own RayCluster (head + one autoscaled worker
group sized from scaling.min_workers..max_workers) runs `python -m elastune run` on that spec.
Checkpoints live outside all three (the volume or a bucket), so they outlast the resource.
What the operator refuses to do for a job (the trust boundary: deleting outside its own prefix,
an image off the allowlist) is decided by the pure rules in elastune.kube.trust.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import ValidationError

from elastune.errors import ElastuneError, SpecError
from elastune.kube.crd import GROUP, KIND, VERSION
from elastune.kube.models import K8S_FIELDS, ClusterSpec
from elastune.kube.trust import (
    Egress,
    check_prefix_template,
    deletable_root,
    expand_prefix,
    image_allowed,
    parse_egress,
    parse_image_prefixes,
    refusal,
)
from elastune.spec import JobSpec
from elastune.spec.load import validate_spec

MOUNT = "/mnt/elastune"  # the shared volume on every Ray pod
SPEC_DIR = "/etc/elastune/job"  # the spec ConfigMap on the head
METRICS_PORT = 9400  # the run's exporter on the head (the job's metrics.port)
RAY_VERSION = "2.60.0"
SUBMITTER, RAY = "submitter", "ray"  # the elastune.io/role of the pods the NetworkPolicy tells apart
# Every pod: the image's non-root user (uid 1000, gid 100), nothing it could escalate to.
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 1000,
    "runAsGroup": 100,
    "fsGroup": 100,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
# Object stores over HTTPS anywhere (s3://, gs:// work as they are); the Kubernetes API for the
# autoscaler sidecar: its Service's address is rewritten to the API server's own (443 on managed
# clusters, 6443 on kubeadm and kind) before a NetworkPolicy sees it, and no selector names that.
STORAGE_EGRESS = "0.0.0.0/0:443,::/0:443"
KUBE_API_EGRESS = "0.0.0.0/0:443,::/0:443,0.0.0.0/0:6443,::/0:6443"
# The projected service-account token the autoscaler sidecar reads (Ray's KubeRay node provider
# opens /var/run/secrets/kubernetes.io/serviceaccount/token): mounted in that container only, so
# the Ray containers, where job code runs, hold no token (the pods set automountServiceAccountToken: false).
KUBE_API_ACCESS = {
    "name": "kube-api-access",
    "projected": {
        "defaultMode": 420,
        "sources": [
            {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
            {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
            {
                "downwardAPI": {
                    "items": [{"path": "namespace", "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]
                }
            },
        ],
    },
}
KUBE_API_MOUNT = {"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": True}


@dataclass(frozen=True)
class Settings:
    """The operator's own configuration (its Deployment's environment)."""

    image: str = "elastune:0.1.0"
    kuberay_namespace: str = "kuberay-system"  # KubeRay's operator reads job status from the dashboard
    monitoring_namespace: str = "monitoring"  # Prometheus scrapes the metrics ports
    metrics_url: str = "http://{cluster}-head-svc.{namespace}.svc:" + str(METRICS_PORT) + "/metrics"
    allowed_images: tuple[str, ...] = ()  # registry/repository prefixes; empty: any image
    checkpoint_prefix: str | None = None  # an object-store job's own prefix, e.g. s3://bucket/elastune/{namespace}/{name}
    storage_egress: tuple[Egress, ...] = parse_egress(STORAGE_EGRESS, "STORAGE_EGRESS")
    kube_api_egress: tuple[Egress, ...] = parse_egress(KUBE_API_EGRESS, "KUBE_API_EGRESS")
    dns_egress: tuple[Egress, ...] = ()  # DNS servers beside kube-system's pods (NodeLocal DNSCache, GKE's Cloud DNS)

    def __post_init__(self) -> None:
        if self.checkpoint_prefix is not None:
            object.__setattr__(self, "checkpoint_prefix", check_prefix_template(self.checkpoint_prefix))
        if not image_allowed(self.image, self.allowed_images):
            raise ElastuneError(
                f"ELASTUNE_IMAGE {self.image!r} is not admitted by ELASTUNE_ALLOWED_IMAGES "
                f"({', '.join(self.allowed_images)}): every job that names no image would be refused; "
                "add its repository to ELASTUNE_ALLOWED_IMAGES or change ELASTUNE_IMAGE"
            )

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Unset or empty variables keep the defaults; a malformed one is an ElastuneError (the
        operator does not start)."""
        names = {
            "image": "ELASTUNE_IMAGE",
            "kuberay_namespace": "ELASTUNE_KUBERAY_NAMESPACE",
            "monitoring_namespace": "ELASTUNE_MONITORING_NAMESPACE",
            "metrics_url": "ELASTUNE_METRICS_URL",
            "checkpoint_prefix": "ELASTUNE_CHECKPOINT_PREFIX",
        }
        out: dict[str, Any] = {field: env[var] for field, var in names.items() if env.get(var)}
        if env.get("ELASTUNE_ALLOWED_IMAGES"):
            out["allowed_images"] = parse_image_prefixes(env["ELASTUNE_ALLOWED_IMAGES"])
        for field, var in (
            ("storage_egress", "ELASTUNE_STORAGE_EGRESS"),
            ("kube_api_egress", "ELASTUNE_KUBE_API_EGRESS"),
            ("dns_egress", "ELASTUNE_DNS_EGRESS"),
        ):
            if env.get(var):
                out[field] = parse_egress(env[var], var)
        if any(e.port for e in out.get("dns_egress", ())):
            raise ElastuneError("ELASTUNE_DNS_EGRESS takes CIDRs without a port (DNS is UDP and TCP 53); e.g. 169.254.20.10/32")
        return cls(**out)


@dataclass(frozen=True)
class Owner:
    """The ElastuneJob the objects belong to."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def labels(self, role: str | None = None) -> dict[str, str]:
        out = {
            "app.kubernetes.io/name": "elastune",
            "app.kubernetes.io/managed-by": "elastune-operator",
            "elastune.io/job": self.name,
        }
        return {**out, "elastune.io/role": role} if role else out

    def meta(self, name: str) -> dict[str, Any]:
        return {"name": name, "namespace": self.namespace, "labels": self.labels(), "ownerReferences": [self.reference()]}

    @property
    def source(self) -> str:
        """How errors name the resource."""
        return f"{KIND} {self.namespace}/{self.name}"


def on_volume(path: str) -> str:
    """Relative paths of a job resolve on the shared volume; absolute paths and URIs stay."""
    return path if "://" in path or path.startswith("/") else f"{MOUNT}/{path}"


def job_spec(owner: Owner, spec: Mapping[str, Any]) -> JobSpec:
    """The job spec the Ray job runs: the resource's job fields with their paths placed and its
    metrics served for the operator. SpecError (field, value, rule, fix) when it is invalid."""
    raw = copy.deepcopy({k: v for k, v in spec.items() if k not in K8S_FIELDS})
    raw.setdefault("name", owner.name)
    checkpoint = dict(raw.get("checkpoint") or {})
    checkpoint.pop("deleteOnFinish", None)
    checkpoint["path"] = on_volume(checkpoint.get("path") or default_checkpoint_path(owner))
    raw["checkpoint"] = checkpoint
    data = raw.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("path"), str):
            data["path"] = on_volume(data["path"])
        source = data.get("source")
        if isinstance(source, (str, list)):
            paths = [source] if isinstance(source, str) else source
            placed = [p if p == "stdlib" or not isinstance(p, str) else on_volume(p) for p in paths]
            data["source"] = placed[0] if isinstance(source, str) else placed
    raw["output_dir"] = on_volume(str(raw.get("output_dir", "runs")))
    raw["metrics"] = {**(raw.get("metrics") or {}), "enabled": True, "host": "0.0.0.0", "port": METRICS_PORT}
    return validate_spec(raw, source=owner.source)


def default_checkpoint_path(owner: Owner) -> str:
    """Relative to the shared volume; it is also the job's own prefix there (trust.deletable_root)."""
    return f"checkpoints/{owner.namespace}/{owner.name}"


def deletes_checkpoints(spec: Mapping[str, Any]) -> bool:
    return bool((spec.get("checkpoint") or {}).get("deleteOnFinish"))


def checkpoint_root_to_delete(owner: Owner, job: JobSpec, settings: Settings) -> str:
    """The root `ckpt clear` may delete for the job (deleteOnFinish): its checkpoint path when
    that is inside the job's own prefix, resolved; SpecError otherwise."""
    uri_prefix = expand_prefix(settings.checkpoint_prefix, owner.namespace, owner.name) if settings.checkpoint_prefix else None
    return deletable_root(job.checkpoint_path, on_volume(default_checkpoint_path(owner)), uri_prefix, owner.source)


def admitted_image(owner: Owner, cluster: ClusterSpec, settings: Settings) -> str:
    """The image of the job's pods, when the operator's allowlist admits it; SpecError otherwise."""
    image = cluster.image or settings.image
    if not image_allowed(image, settings.allowed_images):
        raise refusal(
            owner.source,
            "spec.cluster.image",
            image,
            f"this operator runs only images under ELASTUNE_ALLOWED_IMAGES ({', '.join(settings.allowed_images)}): "
            "an entry itself, or it followed by ':' and a tag, '@' and a digest, or '/' and a path below it",
            "use an image from one of those repositories, or have its repository added to the operator's ELASTUNE_ALLOWED_IMAGES",
        )
    return image


def cluster_spec(owner: Owner, spec: Mapping[str, Any]) -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(spec.get("cluster") or {})
    except ValidationError as exc:
        problems = "; ".join(f"spec.cluster.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise SpecError(f"{owner.source}: {problems}") from None


def cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def workers_per_pod(job: JobSpec, cluster: ClusterSpec) -> int:
    """Training workers one worker pod holds; SpecError when it holds none."""
    s = job.scaling
    fits = [math.floor(cpu_cores(cluster.workers.cpu) / s.cpus_per_worker + 1e-9)]
    if s.gpus_per_worker > 0:
        fits.append(math.floor(cluster.workers.gpu / s.gpus_per_worker + 1e-9))
    if min(fits) < 1:
        raise SpecError(
            f"spec.cluster.workers (cpu {cluster.workers.cpu}, gpu {cluster.workers.gpu}) holds no training worker of "
            f"scaling.cpus_per_worker {s.cpus_per_worker}, gpus_per_worker {s.gpus_per_worker}; give the worker pods at "
            f"least that much"
        )
    return min(fits)


def worker_pods(job: JobSpec, per_pod: int) -> tuple[int, int]:
    """(fewest, most) worker pods: the autoscaler runs when they differ."""
    low, high = (math.ceil(n / per_pod) for n in (job.scaling.min_workers, job.scaling.max_workers))
    return low, high


def desired(owner: Owner, spec: Mapping[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """ConfigMap, NetworkPolicy and RayJob for the resource; SpecError when its spec is invalid
    or crosses the trust boundary (an image off the allowlist, deleteOnFinish outside the job's
    own prefix): then nothing is made."""
    job, cluster = job_spec(owner, spec), cluster_spec(owner, spec)
    per_pod = workers_per_pod(job, cluster)
    image = admitted_image(owner, cluster, settings)
    if deletes_checkpoints(spec):
        checkpoint_root_to_delete(owner, job, settings)
    low, high = worker_pods(job, per_pod)
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": owner.meta(f"{owner.name}-spec"),
            "data": {"job.yaml": yaml.safe_dump(job.to_dict(), sort_keys=False)},
        },
        network_policy(owner, settings, autoscaling=high > low),
        ray_job(owner, job, cluster, image, (low, high), bool(spec.get("suspend", False))),
    ]


def update_of(obj: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that brings an existing object to `obj`. A RayJob takes only `suspend`:
    KubeRay fixes a job's entrypoint and cluster when it submits it, so the rest of a changed
    spec reaches the job through its ConfigMap at its next start (a resume after suspend, a
    retry); a changed `cluster` needs a new RayJob (delete and re-create the ElastuneJob: the
    checkpoints stay and it resumes)."""
    if obj["kind"] == "RayJob":
        return {"metadata": obj["metadata"], "spec": {"suspend": obj["spec"]["suspend"]}}
    return {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}


def ray_job(owner: Owner, job: JobSpec, cluster: ClusterSpec, image: str, pods: tuple[int, int], suspend: bool) -> dict[str, Any]:
    # The head trains nothing; live recovery's torchft lighthouse takes one CPU on the driver's node.
    head_cpus = "1" if job.scaling.recovery == "live" else "0"
    low, high = pods
    env_from = [{"secretRef": {"name": cluster.storage.credentialsSecret}}] if cluster.storage.credentialsSecret else []
    worker_limits: dict[str, str | int] = {"cpu": cluster.workers.cpu, "memory": cluster.workers.memory}
    if cluster.workers.gpu:
        worker_limits["nvidia.com/gpu"] = cluster.workers.gpu
    head = _pod(
        owner,
        image,
        "ray-head",
        {"cpu": cluster.head.cpu, "memory": cluster.head.memory},
        env_from,
        ports=[
            ("gcs-server", 6379),
            ("dashboard", 8265),
            ("client", 10001),
            ("metrics", 8080),
            ("elastune-metrics", METRICS_PORT),
        ],
        spec_volume=f"{owner.name}-spec",
        claim=cluster.storage.claimName,
    )
    worker = _pod(
        owner,
        image,
        "ray-worker",
        worker_limits,
        env_from,
        ports=[("metrics", 8080)],
        spec_volume=None,
        claim=cluster.storage.claimName,
    )
    if high > low:  # KubeRay adds the autoscaler sidecar to the head; only it gets the token
        head["spec"]["volumes"].append(copy.deepcopy(KUBE_API_ACCESS))
    if cluster.workers.gpu:
        worker["spec"]["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": owner.meta(owner.name),
        "spec": {
            # `elastune run` resumes from the newest checkpoint at checkpoint.path: a resumed
            # (unsuspended) or retried job continues where the last durable checkpoint left it.
            "entrypoint": f"python -m elastune run {SPEC_DIR}/job.yaml",
            "suspend": suspend,
            "shutdownAfterJobFinishes": True,  # the cluster goes when the job ends; checkpoints stay
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 2,  # a lost head: a new cluster, resumed from the last checkpoint
            "submissionMode": "K8sJobMode",
            "submitterConfig": {"backoffLimit": 0},
            "submitterPodTemplate": _submitter(owner, image),
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "authOptions": {"mode": "token"},
                "enableInTreeAutoscaling": high > low,
                **(
                    {
                        "autoscalerOptions": {
                            "upscalingMode": "Default",
                            "idleTimeoutSeconds": 120,
                            "securityContext": CONTAINER_SECURITY,
                            "volumeMounts": [dict(KUBE_API_MOUNT)],
                        }
                    }
                    if high > low
                    else {}
                ),
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": head_cpus, "dashboard-host": "0.0.0.0", "metrics-export-port": "8080"},
                    "template": head,
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "workers",
                        "replicas": low,
                        "minReplicas": low,
                        "maxReplicas": high,
                        "rayStartParams": {},
                        "template": worker,
                    }
                ],
            },
        },
    }


def _pod(
    owner: Owner,
    image: str,
    container: str,
    limits: dict[str, Any],
    env_from: list[dict[str, Any]],
    ports: list[tuple[str, int]],
    spec_volume: str | None,
    claim: str,
) -> dict[str, Any]:
    mounts: list[dict[str, str | bool]] = [
        {"name": "shared", "mountPath": MOUNT},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes = [
        {"name": "shared", "persistentVolumeClaim": {"claimName": claim}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
        {"name": "tmp", "emptyDir": {}},
    ]
    if spec_volume:
        mounts.append({"name": "spec", "mountPath": SPEC_DIR, "readOnly": True})
        volumes.append({"name": "spec", "configMap": {"name": spec_volume}})
    return {
        "metadata": {"labels": owner.labels(RAY)},
        "spec": {
            "automountServiceAccountToken": False,
            "securityContext": POD_SECURITY,
            "containers": [
                {
                    "name": container,
                    "image": image,
                    "ports": [{"name": n, "containerPort": p} for n, p in ports],
                    "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}],
                    **({"envFrom": env_from} if env_from else {}),
                    "resources": {"requests": dict(limits), "limits": limits},  # equal: Ray sizes itself by them
                    "securityContext": CONTAINER_SECURITY,
                    "volumeMounts": mounts,
                }
            ],
            "volumes": volumes,
        },
    }


def _submitter(owner: Owner, image: str) -> dict[str, Any]:
    return {
        "metadata": {"labels": owner.labels(SUBMITTER)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": {k: v for k, v in POD_SECURITY.items() if k != "fsGroup"},
            "containers": [
                {
                    "name": "submitter",
                    "image": image,  # KubeRay fills in `ray job submit ...`
                    "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"cpu": "500m", "memory": "512Mi"}},
                    "securityContext": CONTAINER_SECURITY,
                }
            ],
        },
    }


def network_policy(owner: Owner, settings: Settings, autoscaling: bool) -> dict[str, Any]:
    """In: the job's Ray ports answer its own Ray pods; the dashboard its submitter and KubeRay;
    the metrics ports Prometheus and this operator. Out: the job's Ray pods reach each other,
    the cluster's DNS, the storage endpoints (ELASTUNE_STORAGE_EGRESS) and, when its cluster
    autoscales, the Kubernetes API for the autoscaler sidecar (ELASTUNE_KUBE_API_EGRESS); nothing else."""
    ns = lambda name: {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}  # noqa: E731
    pods = lambda labels: {"podSelector": {"matchLabels": labels}}  # noqa: E731
    tcp = lambda *ports: [{"protocol": "TCP", "port": p} for p in ports]  # noqa: E731
    operator = {"app.kubernetes.io/name": "elastune", "app.kubernetes.io/component": "operator"}
    addresses = settings.storage_egress + (settings.kube_api_egress if autoscaling else ())
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": owner.meta(f"{owner.name}-ray"),
        "spec": {
            "podSelector": {"matchLabels": owner.labels(RAY)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [
                {"from": [pods(owner.labels(RAY))]},
                {"from": [pods(owner.labels(SUBMITTER)), ns(settings.kuberay_namespace)], "ports": tcp(8265)},
                {"from": [ns(settings.monitoring_namespace), pods(operator)], "ports": tcp(8080, METRICS_PORT)},
            ],
            "egress": [
                {"to": [pods(owner.labels(RAY))]},
                dns_egress(settings.dns_egress),
                *[a.rule() for a in dict.fromkeys(addresses)],  # once each: storage and the API may share 443
            ],
        },
    }


def dns_egress(servers: tuple[Egress, ...] = ()) -> dict[str, Any]:
    """DNS: UDP and TCP 53 to kube-system's pods. The kube-dns Service's address is rewritten to
    its pods' (CoreDNS or kube-dns, in kube-system on kubeadm, kind, EKS, GKE and AKS alike)
    before a NetworkPolicy sees it, so the rule names the pods' namespace, not the Service.
    `servers` (ELASTUNE_DNS_EGRESS) adds DNS servers off the pod network: NodeLocal DNSCache's
    169.254.20.10, GKE's Cloud DNS at 169.254.169.254."""
    to = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}}}]
    return {
        "to": to + [{"ipBlock": {"cidr": e.cidr}} for e in servers],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }


def cleanup_job(owner: Owner, spec: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """The Job that deletes a deleted ElastuneJob's checkpoints (checkpoint.deleteOnFinish), its
    checkpoint root resolved; SpecError, and no Job, when that root is outside the job's own
    prefix or its image off the allowlist (checked again here: the operator's settings or the
    spec may have changed since the job was made)."""
    job, cluster = job_spec(owner, spec), cluster_spec(owner, spec)
    image, root = admitted_image(owner, cluster, settings), checkpoint_root_to_delete(owner, job, settings)
    env_from = [{"secretRef": {"name": cluster.storage.credentialsSecret}}] if cluster.storage.credentialsSecret else []
    labels = owner.labels("cleanup")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{owner.name}-cleanup", "namespace": owner.namespace, "labels": labels},
        "spec": {
            "backoffLimit": 2,
            "ttlSecondsAfterFinished": 3600,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": False,
                    "securityContext": POD_SECURITY,
                    "containers": [
                        {
                            "name": "cleanup",
                            "image": image,
                            "command": ["python", "-m", "elastune", "ckpt", "clear", root, "--yes"],
                            **({"envFrom": env_from} if env_from else {}),
                            "resources": {
                                "requests": {"cpu": "100m", "memory": "256Mi"},
                                "limits": {"cpu": "500m", "memory": "512Mi"},
                            },
                            "securityContext": CONTAINER_SECURITY,
                            "volumeMounts": [{"name": "shared", "mountPath": MOUNT}],
                        }
                    ],
                    "volumes": [{"name": "shared", "persistentVolumeClaim": {"claimName": cluster.storage.claimName}}],
                },
            },
        },
    }
