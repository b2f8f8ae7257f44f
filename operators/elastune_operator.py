"""The ElastuneJob operator (kopf): `kopf run --standalone --namespace NS operators/elastune_operator.py`.

Thin on purpose: what an ElastuneJob needs (elastune.kube.objects.desired) and the status it
shows (elastune.kube.status.next_status) are pure functions tested on their own; the handlers
here only read, write and watch. Per ElastuneJob NAME:

- create / resume / a changed spec: apply the ConfigMap NAME-spec, the NetworkPolicy NAME-ray and
  the RayJob NAME (created, or brought up to date: `suspend: true` reaches the RayJob this way,
  and KubeRay then stops the job and deletes its cluster; `false` starts a new one, which resumes
  from the newest durable checkpoint with the spec as it is then). An invalid spec makes nothing and sets phase Invalid with
  the job spec's own explanation (field, value, rule, fix); it is retried when the spec changes.
  So does a spec across the trust boundary (elastune.kube.trust): an image off
  ELASTUNE_ALLOWED_IMAGES, or deleteOnFinish on a checkpoint path outside the job's own prefix.
- every ELASTUNE_STATUS_SECONDS: mirror the RayJob's status and the run's metrics (scraped from
  the exporter on the job's head) into `status`.
- delete: the owned objects go by Kubernetes' garbage collection; the checkpoints stay, unless
  spec.checkpoint.deleteOnFinish, when a Job deletes them, if the prefix rule still holds (checked
  again: otherwise no Job, a warning event). The resource carries the finalizer
  elastune.io/operator meanwhile (kopf's, for stopping the status timer and this clean-up): a
  resource deleted while no operator runs waits for one (or for the finalizer to be removed).

Configuration is the Deployment's environment (elastune.kube.objects.Settings): ELASTUNE_IMAGE,
ELASTUNE_KUBERAY_NAMESPACE, ELASTUNE_MONITORING_NAMESPACE, ELASTUNE_METRICS_URL,
ELASTUNE_STATUS_SECONDS, and the trust boundary's ELASTUNE_ALLOWED_IMAGES (image prefixes; unset:
any image), ELASTUNE_CHECKPOINT_PREFIX (an object-store job's own prefix, e.g.
s3://bucket/elastune/{namespace}/{name}; unset: deleteOnFinish only on the shared volume),
ELASTUNE_STORAGE_EGRESS, ELASTUNE_KUBE_API_EGRESS and ELASTUNE_DNS_EGRESS (CIDR[:PORT] lists the
Ray pods may reach).
A malformed setting stops the operator at its start, saying which and why.
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import aiohttp
import kopf

from elastune.errors import SpecError
from elastune.kube.crd import GROUP, PLURAL, VERSION
from elastune.kube.objects import Owner, Settings, cleanup_job, deletes_checkpoints, desired, update_of
from elastune.kube.status import invalid_status, next_status, progress_of

SETTINGS = Settings.from_env()
STATUS_SECONDS = float(os.environ.get("ELASTUNE_STATUS_SECONDS", "10"))
PLURALS = {"ConfigMap": "configmaps", "NetworkPolicy": "networkpolicies", "RayJob": "rayjobs", "Job": "jobs"}
MANAGED = {"app.kubernetes.io/managed-by": "elastune-operator"}
log = logging.getLogger("elastune.operator")


class Api:
    """The few Kubernetes API calls the handlers make, on the credentials kopf logged in with."""

    info: kopf.ConnectionInfo | None = None

    async def request(self, method: str, obj: dict[str, Any], name: str | None = None, body: Any = None) -> int:
        assert self.info is not None, "not logged in"
        group_version, ns = obj["apiVersion"], obj["metadata"]["namespace"]
        root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
        url = f"{self.info.server.rstrip('/')}{root}/namespaces/{ns}/{PLURALS[obj['kind']]}" + (f"/{name}" if name else "")
        kind = "application/merge-patch+json" if method == "PATCH" else "application/json"
        headers = {**self.info.as_http_headers(), "User-Agent": "elastune-operator", "Content-Type": kind}
        ssl = self.info.as_ssl_context() if url.startswith("https") else None
        async with aiohttp.ClientSession() as http:
            async with http.request(method, url, json=body, headers=headers, ssl=ssl) as response:
                if response.status >= 400 and response.status != 409:
                    raise kopf.TemporaryError(
                        f"{method} {obj['kind']} {ns}/{obj['metadata']['name']}: HTTP {response.status} {await response.text()}",
                        delay=5,
                    )
                return response.status

    async def apply(self, obj: dict[str, Any]) -> str:
        """Create the object, or bring the one that exists up to date (objects.update_of)."""
        if await self.request("POST", obj, body=obj) != 409:
            return "created"
        await self.request("PATCH", obj, name=obj["metadata"]["name"], body=update_of(obj))
        return "updated"


API = Api()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    API.info = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)
    return API.info


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # State in elastune.io/ annotations, not in status (which is the user's view).
    settings.persistence.finalizer = "elastune.io/operator"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="elastune.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="elastune.io", key="last-handled-spec")
    settings.scanning.disabled = True  # one namespace, named: no cluster-wide watches, no ClusterRole


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@kopf.index("ray.io", "v1", "rayjobs", labels=MANAGED)
def rayjobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    return {(namespace, name): {"metadata": {"name": name}, "status": dict(body.get("status") or {})}}


def _rayjob(index: kopf.Index, namespace: str, name: str) -> dict[str, Any] | None:
    return next(iter(index.get((namespace, name), [])), None)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def apply(
    name: str,
    namespace: str,
    uid: str,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    rayjobs: kopf.Index,
    **_: Any,
) -> None:
    try:
        objects = desired(Owner(name, namespace, uid), dict(spec), SETTINGS)
    except SpecError as exc:
        patch.status.update(invalid_status(str(exc), meta.get("generation"), dict(status), now()))
        kopf.warn(body, reason="InvalidSpec", message=str(exc))  # `kubectl describe ej` shows it
        raise kopf.PermanentError(str(exc)) from None
    done = [f"{await API.apply(obj)} {obj['kind']} {obj['metadata']['name']}" for obj in objects]
    log.info("%s/%s: %s", namespace, name, ", ".join(done))
    kopf.info(body, reason="Applied", message=", ".join(done))
    patch.status.update(
        next_status(
            dict(status), _rayjob(rayjobs, namespace, name), bool(spec.get("suspend")), None, meta.get("generation"), now()
        )
    )


@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_SECONDS)
async def mirror(
    name: str,
    namespace: str,
    spec: kopf.Spec,
    meta: kopf.Meta,
    status: kopf.Status,
    patch: kopf.Patch,
    rayjobs: kopf.Index,
    **_: Any,
) -> None:
    if status.get("phase") == "Invalid":
        return  # the spec has to change first (apply runs then)
    if status.get("observedGeneration") != meta.get("generation"):
        # apply has not handled this spec yet: kopf starts timers before handlers, and a status
        # written now could land after apply's (say Invalid) and hide it.
        return
    rayjob = _rayjob(rayjobs, namespace, name)
    progress = await scrape(rayjob, namespace)
    new = next_status(dict(status), rayjob, bool(spec.get("suspend")), progress, status.get("observedGeneration"), now())
    if new != dict(status):
        patch.status.update(new)


async def scrape(rayjob: dict[str, Any] | None, namespace: str) -> dict[str, Any] | None:
    """The run's progress from its exporter, or None while there is no cluster or no answer."""
    status = (rayjob or {}).get("status") or {}
    cluster = status.get("rayClusterName")
    if not cluster or status.get("jobDeploymentStatus") != "Running":
        return None  # no head to ask (not yet, suspended, or finished)
    url = SETTINGS.metrics_url.format(cluster=cluster, namespace=namespace)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            async with http.get(url) as response:
                return progress_of(await response.text()) if response.status == 200 else None
    except (aiohttp.ClientError, TimeoutError):
        return None


def _deletes_checkpoints(spec: kopf.Spec, **_: Any) -> bool:
    return deletes_checkpoints(spec)


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_deletes_checkpoints)
async def delete_checkpoints(name: str, namespace: str, uid: str, body: kopf.Body, spec: kopf.Spec, **_: Any) -> None:
    try:
        job = cleanup_job(Owner(name, namespace, uid), dict(spec), SETTINGS)
    except SpecError as exc:
        # Never a clean-up outside the job's own prefix, whatever the spec became since it ran.
        log.warning("%s/%s: its checkpoints stay, no clean-up Job: %s", namespace, name, exc)
        kopf.warn(body, reason="CheckpointsKept", message=f"no clean-up Job: {exc}")
        return
    if await API.request("POST", job, body=job) == 409:
        log.info("Job %s exists already", job["metadata"]["name"])
    kopf.info(
        body,
        reason="DeletingCheckpoints",
        message=f"Job {job['metadata']['name']} deletes {job['spec']['template']['spec']['containers'][0]['command'][-2]}",
    )
