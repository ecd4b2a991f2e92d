"""Identity generations never go back, even when the operator restarts after its
identities ConfigMaps were deleted (by hand, a restore, a re-created namespace's objects).

Gateways ignore documents older than the ones they hold, so an operator that started its
count again at 1 would be ignored by every running gateway: pod churn would stop reaching
them and a reused address would stay with its previous pod. The operator resumes from the
highest generation it finds stored, and never from below the wall clock in microseconds
(it writes far less than once a microsecond).

The ConfigMap store here is an in-memory stand-in for the API server (three calls: get,
create, replace); the real API server runs the publisher in test_tenancy_kube.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from tidegate.operator.identities import PodRecord, resolve
from tidegate.operator.identitypub import IDENTITIES_KEY, IdentityPublisher


class ConfigMapStore:
    """Stand-in: ConfigMaps by path, with resourceVersions."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.version = 0

    async def get(self, path: str) -> dict[str, Any] | None:
        return self.objects.get(path)

    def _path(self, obj: dict[str, Any]) -> str:
        meta = obj["metadata"]
        return f"/api/v1/namespaces/{meta['namespace']}/configmaps/{meta['name']}"

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.objects[self._path(obj)] = obj
        return obj

    async def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        return await self.create(obj)


def _generations(store: ConfigMapStore) -> list[int]:
    return [json.loads(o["data"][IDENTITIES_KEY])["generation"] for o in store.objects.values()]


def test_generations_keep_growing_across_a_restart_with_the_configmaps_gone() -> None:
    gateway = {"metadata": {"name": "gw", "namespace": "gwns", "uid": "u1"}}
    pod = PodRecord("team-a", "web", (), ("10.0.0.7",))

    async def scenario() -> None:
        store = ConfigMapStore()
        first = IdentityPublisher(store)  # type: ignore[arg-type]
        await first.publish("gwns/gw", gateway, resolve({"10.0.0.7": [pod]}), {"team-a": {}})
        held = max(_generations(store))
        store.objects.clear()  # the ConfigMaps are deleted; the operator restarts
        second = IdentityPublisher(store)  # type: ignore[arg-type]
        await second.publish("gwns/gw", gateway, resolve({}), {"team-a": {}})
        assert store.objects, "nothing published"
        assert min(_generations(store)) > held

    asyncio.run(scenario())
