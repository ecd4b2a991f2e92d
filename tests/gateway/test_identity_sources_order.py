"""The two identity sources of a gateway in a cluster never move one shard backwards.

A gateway reads the operator's identities both through its ConfigMap watch and as files
of a projected volume (the kubelet's copy, which may lag one ConfigMap behind another).
Each shard moves forward on its own generation; a file view whose newest shard is newer
than anything the watch delivered, but whose other shard is older than the watch's copy,
must not put that older shard back in force: it would hand a withdrawn (reused) address
back to the pod that had it before - another tenant's pod - until the next write.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from pathlib import Path
from typing import Any

from tidegate.gateway.identity import parse_identities, shard_of
from tidegate.gateway.observe import Metrics
from tidegate.gateway.sources import IdentityConfigMaps, IdentityFileSource
from tidegate.gateway.state import GatewayState

API = "tidegate.io/v1alpha1"
REUSED = ipaddress.ip_address("10.0.0.7")
HOME = shard_of(REUSED, 2)
OTHER = 1 - HOME
OLD_OWNER = [{"namespace": "team-a", "name": "old", "addresses": [str(REUSED)]}]


def _doc(generation: int, shard: int | None, pods: list[dict[str, Any]] | None = None) -> Any:
    raw: dict[str, Any] = {"apiVersion": API, "kind": "ClientIdentities", "generation": generation}
    raw["shards"] = 2
    if shard is None:
        raw["namespaces"] = {"team-a": {"labels": {}}}
    else:
        raw["shard"], raw["pods"] = shard, pods or []
    return raw


def _write(folder: Path, docs: list[dict[str, Any]]) -> None:
    for i, doc in enumerate(docs):
        (folder / f"{i}.json").write_text(json.dumps(doc))


def test_a_lagging_file_copy_never_hands_a_withdrawn_address_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        state = GatewayState(metrics=Metrics())
        watch = IdentityConfigMaps("ns", "gw-identities", state, access=None)  # type: ignore[arg-type]
        done = asyncio.get_running_loop().create_future()
        done.cancel()
        watch._watches = {0: done, 1: done}  # no API here: the documents are handed in
        # Through the watch: the old pod's address, then its withdrawal (generation 6).
        watch.received(HOME, parse_identities(_doc(3, HOME, OLD_OWNER)), source="cm")
        watch.received(OTHER, parse_identities(_doc(4, OTHER)), source="cm")
        watch.received(None, parse_identities(_doc(5, None)), source="cm")
        assert state.identities.lookup(REUSED) is not None
        watch.received(HOME, parse_identities(_doc(6, HOME)), source="cm")
        assert state.identities.lookup(REUSED) is None
        # The kubelet's copy: the other shard moved on (7), the address's shard lags (3).
        _write(tmp_path, [_doc(5, None), _doc(3, HOME, OLD_OWNER), _doc(7, OTHER)])
        files = IdentityFileSource(tmp_path, state)
        await files.load_once()
        assert state.identities.lookup(REUSED) is None, "a stale shard came back in force"
        # Once the copy catches up, it is taken.
        _write(tmp_path, [_doc(5, None), _doc(6, HOME), _doc(8, OTHER, [])])
        await files.load_once()
        assert state.identities.generation == 8

    asyncio.run(scenario())
