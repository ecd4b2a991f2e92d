"""Client identities, pure: pods in, the identities documents each gateway loads out.

The pod index (kopf) keeps, per client address, the few fields of every pod that claims
it (``PodRecord``: namespace, name, labels, addresses, hostNetwork). From that:

- an address claimed by exactly one running pod belongs to that pod;
- an address claimed by two pods (the next pod got a reused address while the deleted one
  is still listed) is **withdrawn**: published for neither, so the gateway treats it as
  unknown (fail closed) until the old pod is gone. So a deleted pod's address is never
  attributed to the next pod while the old one could still be behind it, and the new pod
  gets it only after the old one has left the index (ordering: docs/policies.md);
- a pod leaves the index when it is deleted, reaches phase Succeeded or Failed, or loses
  its address - whichever the API server reports first;
- a hostNetwork pod's address is the node's: published as ``hostNetwork`` (matched only
  by cidr sources, never by selectors), and it wins over any pod claim.

Documents are sharded by a stable hash of the address (``shard_of``), so one address's
owner changes in one ConfigMap write, and one pod's churn rewrites one small shard rather
than everything. The index document carries the namespaces' labels and the shard count.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from tidegate.gateway.documents import API_VERSION
from tidegate.gateway.identity import IDENTITIES_FORMAT, IDENTITIES_KIND, shard_of

# A shard's JSON aims below this; the shard count doubles (up to MAX_SHARDS) beyond it.
SHARD_TARGET_BYTES = 256 * 1024
MAX_SHARDS = 32
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


@dataclass(frozen=True, slots=True)
class PodRecord:
    """What the operator keeps of a pod: nothing else of the object is held."""

    namespace: str
    name: str
    labels: tuple[tuple[str, str], ...]
    addresses: tuple[str, ...]
    host_network: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def pod_record(
    *,
    namespace: str,
    name: str,
    labels: Mapping[str, str],
    spec: Mapping[str, Any],
    status: Mapping[str, Any],
) -> PodRecord | None:
    """The record of a pod that may be a client now, or None (no address, finished)."""
    if status.get("phase") in TERMINAL_PHASES:
        return None
    found: list[str] = []
    for item in status.get("podIPs") or ():
        ip = item.get("ip") if isinstance(item, Mapping) else None
        if isinstance(ip, str) and ip not in found:
            found.append(ip)
    single = status.get("podIP")
    if isinstance(single, str) and single and single not in found:
        found.insert(0, single)
    addresses: list[str] = []
    for text in found:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue  # nothing the API server would store; skip rather than fail the pod
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # as the gateway judges it, and so in the same shard
        if str(ip) not in addresses:
            addresses.append(str(ip))
    if not addresses:
        return None
    return PodRecord(
        namespace=namespace,
        name=name,
        labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())),
        addresses=tuple(addresses),
        host_network=bool(spec.get("hostNetwork")),
    )


@dataclass(frozen=True, slots=True)
class Resolved:
    """Who owns which address, after ambiguity and hostNetwork rules."""

    pods: dict[str, tuple[PodRecord, tuple[str, ...]]]  # pod key -> record, its addresses
    host_network: tuple[str, ...]
    withdrawn: tuple[str, ...]


def resolve(claims: Mapping[str, Iterable[PodRecord]]) -> Resolved:
    """Turn the index (address -> every record claiming it) into owners."""
    owned: dict[str, list[str]] = {}
    records: dict[str, PodRecord] = {}
    host: list[str] = []
    withdrawn: list[str] = []
    for address, claimants in claims.items():
        found = {r.key: r for r in claimants}
        if not found:
            continue
        if any(r.host_network for r in found.values()):
            host.append(address)
        elif len(found) > 1:
            withdrawn.append(address)
        else:
            (record,) = found.values()
            records[record.key] = record
            owned.setdefault(record.key, []).append(address)
    pods = {key: (records[key], tuple(sorted(addresses))) for key, addresses in owned.items()}
    return Resolved(pods, tuple(sorted(host)), tuple(sorted(withdrawn)))


@dataclass(frozen=True, slots=True)
class Document:
    """One identities ConfigMap's content (without its generation)."""

    name: str  # ConfigMap name
    content: dict[str, Any]
    sha256: str

    def payload(self, generation: int) -> str:
        return _dumps(
            {
                "apiVersion": API_VERSION,
                "kind": IDENTITIES_KIND,
                "format": IDENTITIES_FORMAT,
                "generation": generation,
                **self.content,
            }
        )


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _document(name: str, content: dict[str, Any]) -> Document:
    return Document(name, content, hashlib.sha256(_dumps(content).encode()).hexdigest())


def shard_count(total_bytes: int, current: int = 1) -> int:
    """Power of two keeping shards under the target; shrinks only below a quarter of it."""
    needed = 1
    while needed < MAX_SHARDS and total_bytes > needed * SHARD_TARGET_BYTES:
        needed *= 2
    if needed >= current:
        return needed
    if total_bytes < current * SHARD_TARGET_BYTES // 4:
        return max(needed, current // 2)
    return current


def build_documents(
    resolved: Resolved,
    namespaces: Mapping[str, Mapping[str, str]],
    *,
    index_name: str,
    current_shards: int = 1,
) -> tuple[Document, list[Document]]:
    """The index document and its shards (in order) for one gateway."""
    # Per shard a pod lists only its addresses in that shard (dual-stack pods may span two).
    pieces: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, PodRecord]] = []
    total = 0
    for record, addresses in resolved.pods.values():
        if record.namespace not in namespaces:
            # Its namespace's labels are not known yet (the namespace event comes on its
            # own watch): left out - an unknown client - until they are, rather than
            # published with none, which NotIn / DoesNotExist namespaceSelectors match.
            continue
        size = 80 + len(record.key) + sum(len(k) + len(v) + 6 for k, v in record.labels)
        for address in addresses:
            pieces.append((ipaddress.ip_address(address), record))
            total += size
    host = [ipaddress.ip_address(a) for a in resolved.host_network]
    total += 20 * len(host)
    shards = shard_count(total, current_shards)
    grouped: list[dict[str, dict[str, Any]]] = [{} for _ in range(shards)]
    host_grouped: list[list[str]] = [[] for _ in range(shards)]
    for ip, record in pieces:
        shard = shard_of(ip, shards)
        entry = grouped[shard].get(record.key)
        if entry is None:
            entry = grouped[shard][record.key] = {
                "namespace": record.namespace,
                "name": record.name,
                "labels": dict(record.labels),
                "addresses": [],
            }
        entry["addresses"].append(str(ip))
    for ip in host:
        host_grouped[shard_of(ip, shards)].append(str(ip))
    docs = []
    for i in range(shards):
        pods = [grouped[i][k] for k in sorted(grouped[i])]
        for pod in pods:
            pod["addresses"].sort()
        docs.append(
            _document(
                f"{index_name}-{i}",
                {
                    "shard": i,
                    "shards": shards,
                    "pods": pods,
                    "hostNetwork": sorted(host_grouped[i]),
                },
            )
        )
    index = _document(
        index_name,
        {
            "shards": shards,
            "namespaces": {
                ns: {"labels": dict(sorted(labels.items()))}
                for ns, labels in sorted(namespaces.items())
            },
        },
    )
    return index, docs


def retired_shard(name: str, shard: int, shards: int) -> Document:
    """An emptied shard of a layout no longer in use (``shards`` is that old layout)."""
    return _document(name, {"shard": shard, "shards": shards, "pods": [], "hostNetwork": []})


__all__ = [
    "MAX_SHARDS",
    "Document",
    "PodRecord",
    "Resolved",
    "build_documents",
    "pod_record",
    "resolve",
    "shard_count",
]
