"""An in-memory Kubernetes API for the operator's end-to-end test: kmock's KubernetesEmulator
with the API server behaviour kopf relies on and kmock 0.8 leaves out.

- Creation fills in what an API server adds: the namespace from the URL, a name from
  generateName, uid, creationTimestamp, generation; every write gets a resourceVersion from one
  counter (kopf's JSON patches test it).
- LIST answers with the current resourceVersion, and a WATCH from a resourceVersion replays only
  the objects written after it (kmock replays everything as new, which makes kopf run handlers
  twice); the watch subscribes before it takes its snapshot, so no write in between is lost.
- A failed JSON-patch `test` is a 422 Conflict-like answer (kmock: 500), which kopf retries.
- Changing a spec bumps metadata.generation, as the API server does for custom resources.

No garbage collection: owned objects stay when their owner goes (the test checks the owner
references instead).
"""

from __future__ import annotations

import datetime
import uuid

import jsonpatch
import kmock

VERBS = {"list", "watch", "get", "create", "patch", "update", "delete"}


class Emulator(kmock.KubernetesEmulator):
    rv = 0

    async def _handle(self, request):
        data = request.data
        if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            self.rv += 1
            rv = str(self.rv)
            if isinstance(data, dict) and request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                if "name" not in meta and meta.get("generateName"):  # kopf's events
                    meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)
                meta.setdefault("uid", str(uuid.uuid4()))
                meta.setdefault("creationTimestamp", datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
                meta.setdefault("generation", 1)
                meta["resourceVersion"] = rv
            elif isinstance(data, dict):  # a merge patch, to the object or its /status
                meta = data.setdefault("metadata", {})
                meta["resourceVersion"] = rv
                if "spec" in data and request.subresource is None:
                    current = self._current(request)
                    meta["generation"] = int((current or {}).get("metadata", {}).get("generation", 1)) + 1
            elif isinstance(data, list):  # a JSON patch: kopf's `test` operations come first
                data.append({"op": "replace", "path": "/metadata/resourceVersion", "value": rv})
        try:
            return await super()._handle(request)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
            raise kmock.KubernetesError(status=422, reason="Invalid", message=str(exc)) from exc

    def _current(self, request):
        key = (request.resource, request.namespace, request.name)
        return self.objects[key].raw if key in self.objects and not self.objects[key].deleted else None

    async def _serve_list(self, request):
        answer = await super()._serve_list(request)
        answer["metadata"]["resourceVersion"] = str(self.rv)
        return answer

    async def _serve_watch(self, request):
        yield b""  # the headers now: the client waits for them
        since = int(request.params.get("resourceVersion") or 0)
        async with self._lock:  # writes publish under this lock: subscribe and snapshot at once
            mark = await self._buses[request.resource].mark()
            replay = [
                obj.raw
                for (res, ns, _), obj in self.objects.items()
                if res == request.resource
                and not obj.deleted
                and request.namespace in (None, ns)
                and int(obj.raw.get("metadata", {}).get("resourceVersion") or 0) > since
            ]
        for raw in replay:
            yield {"type": "ADDED", "object": raw}
        async for event in mark:
            if request.namespace in (None, event["object"].get("metadata", {}).get("namespace")):
                yield event


def emulator(*resources: tuple[str, str, set[str]]) -> Emulator:
    """resources: (group/version/plural, Kind, subresources); v1/namespaces is always there
    (kopf waits for it), v1/events takes kopf's events."""
    k8s = Emulator()
    k8s.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs=VERBS)
    k8s.resources["v1/events"] = kmock.ResourceInfo(kind="Event", singular="event", namespaced=True, verbs=VERBS)
    for path, kind, subresources in resources:
        k8s.resources[path] = kmock.ResourceInfo(
            kind=kind, singular=kind.lower(), namespaced=True, verbs=VERBS, subresources=subresources
        )
    return k8s
