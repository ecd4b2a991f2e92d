"""Who a client is: pod identities by address, looked up once per connection.

The operator watches Pods and Namespaces and publishes, per gateway, which address
belongs to which pod (namespace, name, labels) and which addresses are shared node
addresses (hostNetwork pods). Standalone, the same document is read from a file beside
the policies. The gateway keeps one dict from address to identity, so a lookup is a
single probe; selectors are evaluated by the engine, memoised per label set.

Wire format (one JSON or YAML document, ``kind: ClientIdentities``)::

    apiVersion: tidegate.io/v1alpha1
    kind: ClientIdentities
    generation: 7                      # grows with every change (per shard)
    shard: 0                           # optional: this document is shard 0 of 4
    shards: 4
    namespaces:                        # namespace labels (for namespaceSelector)
      team-a: {labels: {team: a}}
    pods:
      - {addresses: [10.1.2.3], namespace: team-a, name: web-1, labels: {app: web}}
    hostNetwork: [10.0.0.5]            # node addresses: matched only by cidr sources

In a cluster the namespaces travel in the index document (``<gw>-identities``) and the
pods in its shards (``<gw>-identities-<i>``); an address always hashes to the same shard
(``shard_of``), so a change of owner is one atomic update of one ConfigMap.

An address claimed twice is an error in a hand-written file, and is withdrawn (unknown:
fail closed) when two shards disagree.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from .addresses import IPAddress
from .documents import API_VERSION, IDENTITIES_KIND, PolicyError

log = logging.getLogger("tidegate.gateway.identity")

IDENTITIES_FORMAT = 1
MAX_ADDRESSES_PER_POD = 8

IdentityKind = Literal["pod", "host_network"]
# What a client is, for logs and the tidegate_clients_total metric (bounded values).
IDENTITY_POD = "pod"
IDENTITY_HOST_NETWORK = "host_network"
IDENTITY_CIDR = "cidr"
IDENTITY_UNKNOWN = "unknown_client"
IDENTITY_KINDS = (IDENTITY_POD, IDENTITY_HOST_NETWORK, IDENTITY_CIDR, IDENTITY_UNKNOWN)

LabelKey = tuple[tuple[str, str], ...]
# The operator's sharded layout a table was built from: (shard count, generation of each
# document by shard; the index is INDEX_PART). None for hand-written, unsharded files.
Layout = tuple[int, Mapping[int, int]]
INDEX_PART = -1


def label_key(labels: Mapping[str, str]) -> LabelKey:
    return tuple(sorted(labels.items()))


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """A known client address: a pod, or a node address shared by hostNetwork pods."""

    kind: IdentityKind
    namespace: str = ""
    name: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    # (namespace, namespace labels, pod labels): what selectors see; the engine's memo key.
    selector_key: tuple[str, LabelKey, LabelKey] = ("", (), ())

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.name}" if self.kind == "pod" else ""


HOST_NETWORK = ClientIdentity(kind="host_network")


# The API server sets this label on every namespace; selectors may rely on it.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def pod_identity(
    namespace: str,
    name: str,
    labels: Mapping[str, str],
    namespace_labels: Mapping[str, str],
) -> ClientIdentity:
    """A pod's identity; the namespace name label is always there, as on a real cluster."""
    if namespace_labels.get(NAMESPACE_NAME_LABEL) != namespace:
        namespace_labels = {**namespace_labels, NAMESPACE_NAME_LABEL: namespace}
    return ClientIdentity(
        kind="pod",
        namespace=namespace,
        name=name,
        labels=dict(labels),
        namespace_labels=namespace_labels,
        selector_key=(namespace, label_key(namespace_labels), label_key(labels)),
    )


@dataclass(frozen=True, slots=True)
class PodEntry:
    addresses: tuple[IPAddress, ...]
    namespace: str
    name: str
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class IdentityDocument:
    """One parsed ClientIdentities document (a whole file, an index, or a shard)."""

    generation: int = 0
    shard: int | None = None
    shards: int | None = None
    namespaces: Mapping[str, Mapping[str, str]] | None = None
    pods: tuple[PodEntry, ...] = ()
    host_network: tuple[IPAddress, ...] = ()


def shard_of(address: IPAddress, shards: int) -> int:
    """Which shard an address lives in: stable across processes and restarts."""
    return zlib.crc32(address.packed) % shards if shards > 1 else 0


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _address(value: object, path: str) -> IPAddress:
    if not isinstance(value, str):
        raise PolicyError("must be an IP address string", field=path)
    try:
        return _unmapped(ipaddress.ip_address(value))
    except ValueError:
        raise PolicyError(f"{value!r} is not an IP address", field=path) from None


def _labels(value: object, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise PolicyError("must be a mapping of string to string", field=path)
    return dict(value)


def _str(value: object, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise PolicyError("must be a non-empty string", field=path)
    return value


def parse_identities(doc: object, *, source: str = "<identities>") -> IdentityDocument:
    """Validate one ClientIdentities document; raises PolicyError naming the field."""
    try:
        return _parse(doc)
    except PolicyError as exc:
        raise exc.located(source=source) from None


def _parse(doc: object) -> IdentityDocument:
    if not isinstance(doc, Mapping):
        raise PolicyError("a ClientIdentities document must be a mapping")
    if doc.get("apiVersion") != API_VERSION:
        raise PolicyError(f"apiVersion must be {API_VERSION}", field="apiVersion")
    if doc.get("kind") != IDENTITIES_KIND:
        raise PolicyError(f"kind must be {IDENTITIES_KIND}", field="kind")
    fmt = doc.get("format", IDENTITIES_FORMAT)
    if fmt != IDENTITIES_FORMAT:
        raise PolicyError(f"unsupported format {fmt!r}", field="format")
    known = {"apiVersion", "kind", "format", "generation", "shard", "shards"}
    known |= {"namespaces", "pods", "hostNetwork"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise PolicyError(f"unknown field(s) {', '.join(unknown)}")
    generation = doc.get("generation", 0)
    if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
        raise PolicyError("must be a non-negative integer", field="generation")
    shard, shards = doc.get("shard"), doc.get("shards")
    if shards is not None and (
        isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 1024
    ):
        raise PolicyError("must be an integer 1..1024", field="shards")
    if shard is not None and (
        isinstance(shard, bool)
        or not isinstance(shard, int)
        or shards is None
        or not 0 <= shard < shards
    ):
        raise PolicyError("must be an integer below shards", field="shard")
    namespaces: dict[str, Mapping[str, str]] | None = None
    if doc.get("namespaces") is not None:
        raw_ns = doc["namespaces"]
        if not isinstance(raw_ns, Mapping):
            raise PolicyError("must be a mapping of namespace to {labels}", field="namespaces")
        namespaces = {}
        for ns, info in raw_ns.items():
            path = f"namespaces.{ns}"
            if not isinstance(info, Mapping) or set(info) - {"labels"}:
                raise PolicyError("must be {labels: {...}}", field=path)
            namespaces[_str(ns, path)] = _labels(info.get("labels"), f"{path}.labels")
    seen: dict[IPAddress, str] = {}
    pods: list[PodEntry] = []
    raw_pods = doc.get("pods") or []
    if not isinstance(raw_pods, list):
        raise PolicyError("must be a list", field="pods")
    for i, raw in enumerate(raw_pods):
        path = f"pods[{i}]"
        if not isinstance(raw, Mapping):
            raise PolicyError("must be a mapping", field=path)
        extra = sorted(set(raw) - {"addresses", "namespace", "name", "labels"})
        if extra:
            raise PolicyError(f"unknown field(s) {', '.join(extra)}", field=path)
        namespace = _str(raw.get("namespace"), f"{path}.namespace")
        name = _str(raw.get("name"), f"{path}.name")
        raw_addresses = raw.get("addresses")
        if not isinstance(raw_addresses, list) or not raw_addresses:
            raise PolicyError("must list at least one address", field=f"{path}.addresses")
        if len(raw_addresses) > MAX_ADDRESSES_PER_POD:
            raise PolicyError(
                f"at most {MAX_ADDRESSES_PER_POD} addresses", field=f"{path}.addresses"
            )
        addresses = tuple(
            _address(a, f"{path}.addresses[{j}]") for j, a in enumerate(raw_addresses)
        )
        for j, address in enumerate(addresses):
            if address in seen:
                raise PolicyError(
                    f"address {address} is claimed by both {seen[address]} and {namespace}/{name}",
                    field=f"{path}.addresses[{j}]",
                )
            seen[address] = f"{namespace}/{name}"
            if shard is not None and shards is not None and shard_of(address, shards) != shard:
                raise PolicyError(
                    f"address {address} does not belong in shard {shard} of {shards}",
                    field=f"{path}.addresses[{j}]",
                )
        pods.append(PodEntry(addresses, namespace, name, _labels(raw.get("labels"), path)))
    raw_host = doc.get("hostNetwork") or []
    if not isinstance(raw_host, list):
        raise PolicyError("must be a list of addresses", field="hostNetwork")
    host = tuple(_address(a, f"hostNetwork[{i}]") for i, a in enumerate(raw_host))
    return IdentityDocument(generation, shard, shards, namespaces, tuple(pods), host)


def load_identity_text(
    text: str | bytes, *, source: str, others: bool = False
) -> list[IdentityDocument]:
    """A file or ConfigMap payload: JSON, or YAML (several documents allowed).

    ``others`` True (a policy folder): documents of other kinds are skipped, not errors."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        stripped = text.lstrip()
        if stripped.startswith("{"):
            raw_docs: list[Any] = [json.loads(text)]
        else:
            raw_docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (ValueError, yaml.YAMLError) as exc:
        raise PolicyError(f"not a ClientIdentities document: {exc}", source=source) from None
    if others:
        raw_docs = [
            d for d in raw_docs if isinstance(d, Mapping) and d.get("kind") == IDENTITIES_KIND
        ]
    return [parse_identities(d, source=source) for d in raw_docs]


class IdentityTable:
    """Immutable address -> identity map; build once per change, share freely."""

    __slots__ = ("by_address", "generation", "layout", "namespaces", "pods")

    def __init__(
        self,
        by_address: Mapping[IPAddress, ClientIdentity] | None = None,
        *,
        generation: int = 0,
        namespaces: Mapping[str, Mapping[str, str]] | None = None,
        layout: Layout | None = None,
    ) -> None:
        self.by_address: Mapping[IPAddress, ClientIdentity] = by_address or {}
        self.generation = generation
        self.layout = layout
        self.namespaces: Mapping[str, Mapping[str, str]] = namespaces or {}
        self.pods = sum(1 for i in self.by_address.values() if i.kind == "pod")

    def lookup(self, address: IPAddress) -> ClientIdentity | None:
        """The identity of ``address`` (IPv4-mapped IPv6 judged as IPv4), or None."""
        found = self.by_address.get(address)
        if found is None and isinstance(address, ipaddress.IPv6Address):
            mapped = address.ipv4_mapped
            if mapped is not None:
                return self.by_address.get(mapped)
        return found

    def find_pod(self, namespace: str, name: str) -> tuple[IPAddress, ClientIdentity] | None:
        """A pod by name (a scan: for ``tidegate check``, not the hot path)."""
        for address, identity in self.by_address.items():
            if identity.kind == "pod" and identity.namespace == namespace and identity.name == name:
                return address, identity
        return None

    def __len__(self) -> int:
        return len(self.by_address)


EMPTY_TABLE = IdentityTable()


def layout_of(documents: Iterable[IdentityDocument]) -> Layout | None:
    """The operator's layout (index + shards) these documents form, or None."""
    docs = list(documents)
    index = next((d for d in docs if d.shard is None and d.shards is not None), None)
    if index is None or index.shards is None:
        return None
    parts = {INDEX_PART if d.shard is None else d.shard: d.generation for d in docs}
    return index.shards, parts


def regresses(new: Layout | None, held: Layout | None) -> bool:
    """Whether ``new`` would put an older copy of some document of the same layout back in
    force than ``held`` has. Each shard moves forward on its own: two views (the API watch
    and the kubelet's files) may each be newest on a different shard, and taking a view by
    its newest document alone could revive a withdrawn address for its previous pod. A new
    layout is always written after, and newer than, every document of the old one."""
    if new is None or held is None or new[0] != held[0]:
        return False
    return any(generation < held[1].get(part, -1) for part, generation in new[1].items())


def build_table(documents: Iterable[IdentityDocument], *, generation: int = 0) -> IdentityTable:
    """Merge documents (an index and its shards, or files) into one table.

    An address claimed by two different documents is withdrawn (fail closed) and logged;
    a node address (hostNetwork) always wins over a pod claim, since its traffic can come
    from any hostNetwork pod on that node.
    """
    docs = list(documents)
    namespaces: dict[str, Mapping[str, str]] = {}
    for doc in docs:
        if doc.namespaces is not None:
            namespaces.update(doc.namespaces)
    by_address: dict[IPAddress, ClientIdentity] = {}
    conflicted: set[IPAddress] = set()
    for doc in docs:
        for pod in doc.pods:
            identity = pod_identity(
                pod.namespace, pod.name, pod.labels, namespaces.get(pod.namespace, {})
            )
            for address in pod.addresses:
                if address in by_address:
                    conflicted.add(address)
                by_address[address] = identity
    for address in conflicted:
        log.warning("address %s is claimed by two pods; it is withdrawn (unknown)", address)
        del by_address[address]
    for doc in docs:
        for address in doc.host_network:
            by_address[address] = HOST_NETWORK
    return IdentityTable(
        by_address, generation=generation, namespaces=namespaces, layout=layout_of(docs)
    )


__all__ = [
    "EMPTY_TABLE",
    "HOST_NETWORK",
    "IDENTITIES_KIND",
    "IDENTITY_CIDR",
    "IDENTITY_HOST_NETWORK",
    "IDENTITY_KINDS",
    "IDENTITY_POD",
    "IDENTITY_UNKNOWN",
    "ClientIdentity",
    "IdentityDocument",
    "IdentityTable",
    "PodEntry",
    "build_table",
    "layout_of",
    "load_identity_text",
    "parse_identities",
    "pod_identity",
    "regresses",
    "shard_of",
]
