"""The operator's identity documents, pure: pods in, withdrawn addresses, shards out."""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from tidegate.gateway.identity import build_table, load_identity_text, shard_of
from tidegate.operator.identities import (
    SHARD_TARGET_BYTES,
    PodRecord,
    build_documents,
    pod_record,
    resolve,
    shard_count,
)


def record(ns: str, name: str, *addresses: str, host: bool = False) -> PodRecord:
    return PodRecord(ns, name, (("app", name),), addresses, host)


def test_pod_record_keeps_a_few_fields_and_drops_finished_pods() -> None:
    status = {
        "phase": "Running",
        "podIP": "10.0.0.1",
        "podIPs": [{"ip": "10.0.0.1"}, {"ip": "fd00::1"}],
    }
    got = pod_record(namespace="a", name="p", labels={"x": "1"}, spec={}, status=status)
    assert got == PodRecord("a", "p", (("x", "1"),), ("10.0.0.1", "fd00::1"), False)
    for phase in ("Succeeded", "Failed"):
        assert (
            pod_record(
                namespace="a", name="p", labels={}, spec={}, status={**status, "phase": phase}
            )
            is None
        )
    assert (
        pod_record(namespace="a", name="p", labels={}, spec={}, status={"phase": "Pending"}) is None
    )
    host = pod_record(namespace="a", name="p", labels={}, spec={"hostNetwork": True}, status=status)
    assert host is not None and host.host_network


def test_an_address_claimed_twice_is_withdrawn_and_host_network_wins() -> None:
    claims = {
        "10.0.0.1": [record("a", "old", "10.0.0.1"), record("b", "new", "10.0.0.1")],
        "10.0.0.2": [record("a", "solo", "10.0.0.2")],
        "10.0.0.3": [
            record("kube-system", "agent", "10.0.0.3", host=True),
            record("b", "x", "10.0.0.3"),
        ],
    }
    resolved = resolve(claims)
    assert resolved.withdrawn == ("10.0.0.1",)
    assert resolved.host_network == ("10.0.0.3",)
    assert {k: a for k, (_, a) in resolved.pods.items()} == {"a/solo": ("10.0.0.2",)}
    # once the old pod leaves the index the address belongs to the new one
    claims["10.0.0.1"] = [record("b", "new", "10.0.0.1")]
    assert resolve(claims).pods["b/new"][1] == ("10.0.0.1",)


def test_documents_round_trip_through_the_gateway_and_shard_by_address() -> None:
    claims = {
        f"10.0.{i // 256}.{i % 256}": [record("ns", f"p{i}", f"10.0.{i // 256}.{i % 256}")]
        for i in range(600)
    }
    index, shards = build_documents(
        resolve(claims), {"ns": {"env": "prod"}}, index_name="g-identities", current_shards=4
    )
    # small: the count steps down from 4 to 2 (one step per pass, no flapping)
    assert len(shards) == 2 and [s.name for s in shards] == [f"g-identities-{i}" for i in range(2)]
    docs = [d for s in [index, *shards] for d in load_identity_text(s.payload(7), source="t")]
    for doc in docs[1:]:
        for pod in doc.pods:
            assert all(shard_of(a, 2) == doc.shard for a in pod.addresses)
    table = build_table(docs)
    found = table.lookup(ipaddress.ip_address("10.0.1.5"))
    assert found is not None and found.pod == "ns/p261" and found.namespace_labels["env"] == "prod"
    assert json.loads(index.payload(7))["generation"] == 7
    # the same input, the same shas (writes are skipped when nothing changed)
    again, shards2 = build_documents(
        resolve(claims), {"ns": {"env": "prod"}}, index_name="g-identities", current_shards=4
    )
    assert again.sha256 == index.sha256 and [s.sha256 for s in shards2] == [
        s.sha256 for s in shards
    ]


def test_shard_count_grows_with_size_and_shrinks_with_hysteresis() -> None:
    assert shard_count(1000) == 1
    assert shard_count(3 * SHARD_TARGET_BYTES) == 4
    assert shard_count(3 * SHARD_TARGET_BYTES, current=8) == 8  # no flapping just below
    assert shard_count(SHARD_TARGET_BYTES // 8, current=8) == 4  # shrinks a step at a time
    assert shard_count(10**12) == 32


def test_an_ipv4_mapped_pod_address_is_published_as_ipv4_in_its_gateway_shard() -> None:
    """The gateway judges ::ffff:a.b.c.d as a.b.c.d and checks each address's shard that
    way; an address published in its IPv6 form would land in the wrong shard and the whole
    shard - every pod in it - would be refused, leaving its previous owners in force."""
    found = None
    for i in range(1, 40):  # an address whose IPv4 and mapped forms hash apart
        mapped = f"::ffff:10.9.0.{i}"
        if shard_of(ipaddress.ip_address(mapped), 4) != shard_of(
            ipaddress.ip_address(f"10.9.0.{i}"), 4
        ):
            found = mapped
            break
    assert found is not None
    pod = pod_record(
        namespace="ns",
        name="p",
        labels={},
        spec={},
        status={"phase": "Running", "podIP": found, "podIPs": [{"ip": found}]},
    )
    assert pod is not None and pod.addresses == (found.removeprefix("::ffff:"),)
    claims = {a: [pod] for a in pod.addresses}
    index, shards = build_documents(resolve(claims), {"ns": {}}, index_name="g", current_shards=4)
    docs = [d for s in [index, *shards] for d in load_identity_text(s.payload(1), source="t")]
    assert build_table(docs).lookup(ipaddress.ip_address(found)) is not None


def test_a_pod_whose_namespace_is_not_known_yet_is_not_published() -> None:
    """Until the namespace (and so its labels) is in the index, a pod of it is left out -
    an unknown client - rather than published with no namespace labels, which a
    ClusterEgressPolicy's ``NotIn`` / ``DoesNotExist`` namespaceSelector would match
    (a namespace labelled ``restricted`` would briefly pass for an unrestricted one)."""
    claims = {"10.3.0.1": [record("fresh", "p", "10.3.0.1")]}

    def docs_of(namespaces: dict[str, dict[str, str]]) -> list[Any]:
        index, shards = build_documents(resolve(claims), namespaces, index_name="g")
        return [d for s in [index, *shards] for d in load_identity_text(s.payload(1), source="t")]

    address = ipaddress.ip_address("10.3.0.1")
    assert build_table(docs_of({"other": {}})).lookup(address) is None
    found = build_table(docs_of({"fresh": {"restricted": "yes"}})).lookup(address)
    assert found is not None and found.namespace_labels["restricted"] == "yes"
