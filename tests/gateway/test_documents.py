"""Document validation errors name the file, the document, the object, the field and why;
bundles are stable and verified."""

from __future__ import annotations

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import yaml

from tidegate.gateway.bundle import compile_bundle, load_bundle
from tidegate.gateway.documents import PolicyError, parse_documents
from tidegate.gateway.model import Gateway
from tidegate.gateway.sources import bundle_from_documents, read_policy_dir

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

HEADER = "apiVersion: tidegate.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: p, namespace: n}\n"


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ("spec: {allow: [{host: '*'}]}", ["spec.allow[0].host", "bare '*'"]),
        (
            "spec: {allow: [{host: a.com, ports: [70000]}]}",
            ["spec.allow[0].ports[0]", "out of range"],
        ),
        ("spec: {allow: [{host: a.com, ports: []}]}", ["spec.allow[0].ports", "at least one"]),
        ("spec: {allow: [{ports: [443]}]}", ["spec.allow[0]", "exactly one of 'host' or 'cidr'"]),
        ("spec: {allow: [{host: a.com, cidr: 1.0.0.0/8}]}", ["exactly one"]),
        ("spec: {deny: [{cidr: 10.0.0.1/8}]}", ["spec.deny[0].cidr", "invalid CIDR"]),
        ("spec: {allow: [{hots: a.com}]}", ["spec.allow[0]", "unknown field(s) hots"]),
        ("spec: {mode: Enforcing}", ["spec.mode", "'Enforcing' is not one of Enforce, Audit"]),
        ("spec: {sources: {cidrs: []}}", ["spec.sources", "ClusterEgressPolicy"]),
        ("spec: {podSelector: {matchLabels: [a]}}", ["spec.podSelector.matchLabels", "mapping"]),
        ("spec: {allow: {host: a.com}}", ["spec.allow", "must be a list"]),
        ("spec: {alow: []}", ["spec", "unknown field(s) alow"]),
        ("spec: {allow: [{host: 'a.*.*.com'}]}", ["spec.allow[0].host", "one '*'"]),
    ],
)
def test_policy_errors_are_located(spec: str, fragments: list[str]) -> None:
    text = "---\n" + HEADER + "spec: {}\n---\n" + HEADER.replace("name: p", "name: q") + spec
    with pytest.raises(PolicyError) as info:
        parse_documents(text, source="policies/team.yaml")
    message = str(info.value)
    assert message.startswith("policies/team.yaml: document 1: EgressPolicy n/q: "), message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("kind: EgressPolicy\nmetadata: {name: x}", "apiVersion None is not tidegate.io/v1alpha1"),
        ("apiVersion: tidegate.io/v1alpha1\nkind: Pod\nmetadata: {name: x}", "kind 'Pod'"),
        ("a: [", "invalid YAML"),
        ("- 1\n- 2", "must be a mapping"),
        (
            "apiVersion: tidegate.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: g}\n"
            "spec: {dns: {servers: [dns.example:53]}}",
            "spec.dns.servers[0]",
        ),
        (
            "apiVersion: tidegate.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: g}\n"
            "spec: {dns: {cache: {minTTLSeconds: 10, maxTTLSeconds: 5}}}",
            "minTTLSeconds",
        ),
        (
            "apiVersion: tidegate.io/v1alpha1\nkind: EgressGateway\nmetadata: {name: g}\n"
            "spec: {allowedPolicyNamespaces: {from: Selector}}",
            "needs a selector",
        ),
    ],
)
def test_document_errors(text: str, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_documents(text, source="f.yaml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("f.yaml")


def test_examples_parse_and_compile() -> None:
    docs = read_policy_dir(EXAMPLES)
    assert docs.gateway is not None
    assert {p.key for p in docs.policies} >= {"ci/ci-runners", "package-registries"}
    bundle = bundle_from_documents(docs, generation=7)
    assert bundle.generation == 7 and len(bundle.sha256) == 64


def test_bundle_is_stable_under_reordering_and_roundtrips() -> None:
    docs = read_policy_dir(EXAMPLES)
    assert docs.gateway is not None
    a = compile_bundle(gateway=docs.gateway, policies=docs.policies, generation=1)
    b = compile_bundle(gateway=docs.gateway, policies=tuple(reversed(docs.policies)), generation=1)
    assert a == b
    loaded = load_bundle(a)
    # The bundle drops gatewayRef: binding is settled before compiling.
    unbound = [dataclasses.replace(p, gateway_ref=None) for p in docs.policies]
    assert loaded.policies == tuple(sorted(unbound, key=lambda p: p.key))
    assert loaded.gateway.client_cidrs == docs.gateway.client_cidrs
    again = compile_bundle(gateway=loaded.gateway, policies=loaded.policies, generation=1)
    assert again == a
    assert load_bundle(gzip.compress(a)).sha256 == loaded.sha256


def test_bundle_sha_ignores_generation_but_not_content() -> None:
    gw = Gateway()
    one = json.loads(compile_bundle(gateway=gw, policies=(), generation=1))
    two = json.loads(compile_bundle(gateway=gw, policies=(), generation=2))
    assert one["sha256"] == two["sha256"]
    other = json.loads(compile_bundle(gateway=Gateway(mode="Audit"), policies=(), generation=1))
    assert other["sha256"] != one["sha256"]


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d.update(sha256="0" * 64), "sha256 does not match"),
        (lambda d: d.update(format=99), "unsupported bundle format"),
        (lambda d: d.update(kind="ConfigMap"), "not a PolicyBundle"),
    ],
)
def test_load_bundle_rejects_tampering(mutate: object, fragment: str) -> None:
    doc = json.loads(compile_bundle(gateway=Gateway(), policies=(), generation=1))
    mutate(doc)  # type: ignore[operator]
    with pytest.raises(PolicyError) as info:
        load_bundle(json.dumps(doc).encode(), source="cm/bundle.json")
    assert fragment in str(info.value) and "cm/bundle.json" in str(info.value)


def test_load_bundle_rejects_truncation() -> None:
    data = compile_bundle(gateway=Gateway(), policies=(), generation=1)
    with pytest.raises(PolicyError, match="not a bundle"):
        load_bundle(data[:-10])


def test_omitted_client_cidrs_admit_nobody_like_no_gateway_at_all() -> None:
    """One rule for the default (issue 9): no clientCIDRs means no client, never the
    private ranges - behind a load balancer those are everyone."""
    import ipaddress

    from tidegate.gateway.engine import REASON_CLIENT, Engine
    from tidegate.gateway.hosts import normalize_host
    from tidegate.gateway.model import Gateway as GatewayModel

    text = (
        "apiVersion: tidegate.io/v1alpha1\nkind: EgressGateway\n"
        "metadata: {name: g, namespace: n}\nspec: {defaultAction: Allow}\n"
    )
    docs = parse_documents(text, source="g.yaml")
    assert docs.gateway is not None
    assert docs.gateway.client_cidrs == ()
    for gateway in (docs.gateway, GatewayModel()):
        engine = Engine(gateway, ())
        for client in ("10.0.0.5", "192.168.1.1", "127.0.0.1"):
            decision = engine.decide(ipaddress.ip_address(client), normalize_host("a.com"), 443)
            assert (decision.verdict, decision.reason) == ("deny", REASON_CLIENT)


def test_kubectl_apply_of_the_examples_folder_brings_no_gateway() -> None:
    """``kubectl apply -f examples/`` reads only the folder's own files: none may be an
    EgressGateway (the chart owns the cluster's), while the standalone gateway reads its
    settings from the subfolder."""
    kinds = [
        doc.get("kind")
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    assert "EgressGateway" not in kinds and "EgressPolicy" in kinds
    assert read_policy_dir(EXAMPLES).gateway is not None


def test_policy_folder_reads_subfolders_but_not_hidden_ones(tmp_path: Path) -> None:
    policy = (EXAMPLES / "package-registries.yaml").read_text()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "p.yaml").write_text(policy)
    (tmp_path / "..data").mkdir()  # a mounted ConfigMap's data folder: its files repeat
    (tmp_path / "..data" / "p.yaml").write_text(policy)
    assert [p.key for p in read_policy_dir(tmp_path).policies] == ["package-registries"]
