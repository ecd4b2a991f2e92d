"""Offline checks of the CRDs in crds/: structure, documentation and OpenAPI validation.

The CRDs' openAPIV3Schema is (nearly) JSON Schema, so ``jsonschema`` checks what it can
express: types, enums, patterns, ranges, required and oneOf. CEL rules
(``x-kubernetes-validations``) need a real apiserver; see test_crd_server.py.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
FIXTURES = Path(__file__).resolve().parent / "fixtures"
KINDS = {
    "EgressPolicy": "egresspolicies",
    "ClusterEgressPolicy": "clusteregresspolicies",
    "EgressGateway": "egressgateways",
}


def load_crd(kind: str) -> dict[str, Any]:
    path = CRD_DIR / f"tidegate.io_{KINDS[kind]}.yaml"
    crd: dict[str, Any] = yaml.safe_load(path.read_text())
    return crd


def schema_of(kind: str) -> dict[str, Any]:
    versions = load_crd(kind)["spec"]["versions"]
    (version,) = [v for v in versions if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return _cel_patterns(schema)


_MATCHES = re.compile(r"^self\.matches\(r'(.*)'\)$", re.S)


def _cel_patterns(node: Any) -> Any:
    """Give jsonschema the CEL ``self.matches(r'...')`` form checks as patterns, so these
    pure tests still check host forms (the API server runs the CEL rule itself)."""
    if isinstance(node, dict):
        out = {k: _cel_patterns(v) for k, v in node.items()}
        for rule in node.get("x-kubernetes-validations") or []:
            m = _MATCHES.match(str(rule.get("rule", "")).strip())
            if m:
                out["pattern"] = m.group(1)
        return out
    if isinstance(node, list):
        return [_cel_patterns(v) for v in node]
    return node


def validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(schema_of(kind))


def errors(obj: dict[str, Any]) -> list[str]:
    return [e.message for e in validator(obj["kind"]).iter_errors(obj)]


def tidegate_documents() -> list[tuple[str, dict[str, Any]]]:
    """Every EgressPolicy/EgressGateway in examples/ and in this folder's fixtures."""
    files = sorted((ROOT / "examples").rglob("*.yaml")) + sorted((FIXTURES).glob("*.yaml"))
    docs = []
    for path in files:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if isinstance(doc, dict) and doc.get("kind") in KINDS:
                if str(doc.get("apiVersion", "")).startswith("tidegate.io/"):
                    name = doc.get("metadata", {}).get("name", i)
                    docs.append((f"{path.relative_to(ROOT)}:{doc['kind']}/{name}", doc))
    return docs


def walk(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (path, schema) for every nested schema: properties, items, additionalProperties."""
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


# --- structure -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_crd_identity(kind: str) -> None:
    crd = load_crd(kind)
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["kind"] == "CustomResourceDefinition"
    spec = crd["spec"]
    assert crd["metadata"]["name"] == f"{KINDS[kind]}.tidegate.io"
    assert spec["group"] == "tidegate.io"
    assert spec["scope"] == ("Cluster" if kind == "ClusterEgressPolicy" else "Namespaced")
    assert spec["names"]["kind"] == kind
    assert spec["names"]["plural"] == KINDS[kind]
    short = {"EgressPolicy": "egp", "ClusterEgressPolicy": "cegp", "EgressGateway": "egw"}
    assert spec["names"]["shortNames"] == [short[kind]]
    assert spec["names"]["categories"] == ["tidegate"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] is True and version["storage"] is True
    assert version["subresources"] == {"status": {}}


@pytest.mark.parametrize(
    ("kind", "columns"),
    [
        ("EgressPolicy", ["Mode", "Gateway", "Rules", "Ready", "Would-Deny", "Age"]),
        ("ClusterEgressPolicy", ["Mode", "Gateway", "Rules", "Ready", "Would-Deny", "Age"]),
        ("EgressGateway", ["Mode", "Replicas", "Addresses", "Policies", "Ready", "Age"]),
    ],
)
def test_printer_columns(kind: str, columns: list[str]) -> None:
    (version,) = load_crd(kind)["spec"]["versions"]
    printed = version["additionalPrinterColumns"]
    assert [c["name"] for c in printed] == columns
    schema = schema_of(kind)
    for col in printed:
        path = col["jsonPath"]
        if path.startswith(".metadata"):
            continue
        # Every column points at a field the schema declares.
        node = schema
        for part in re.sub(r"\[.*\]", "", path).strip(".").split("."):
            if node.get("type") == "array":
                node = node["items"]
            assert part in node.get("properties", {}), f"{kind} column {col['name']}: {path}"
            node = node["properties"][part]
    ready = next(c for c in printed if c["name"] == "Ready")
    assert ready["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_field_has_a_description(kind: str) -> None:
    missing = [p for p, node in walk(schema_of(kind), kind) if not node.get("description")]
    assert not missing, f"fields without description (kubectl explain shows nothing): {missing}"


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_spec_is_bounded_for_cel_cost(kind: str) -> None:
    """Lists and free strings under spec carry maxItems/maxLength so CEL cost estimates fit."""
    unbounded = []
    for path, node in walk(schema_of(kind)["properties"]["spec"], f"{kind}.spec"):
        if node.get("type") == "array" and "maxItems" not in node:
            unbounded.append(path)
        if node.get("type") == "string" and "maxLength" not in node and "enum" not in node:
            # map values of passthrough annotations are never reached by a CEL rule
            if not path.endswith("annotations{}"):
                unbounded.append(path)
    assert not unbounded, unbounded


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_preserve_unknown_fields_only_where_needed(kind: str) -> None:
    allowed = {
        "EgressGateway.spec.resources",
        "EgressGateway.spec.affinity",
        "EgressGateway.spec.tolerations[]",
    }
    found = {
        p for p, n in walk(schema_of(kind), kind) if n.get("x-kubernetes-preserve-unknown-fields")
    }
    assert found <= allowed


def test_cel_rules_present() -> None:
    """The CEL rules the server test exercises exist where they should."""
    egp = schema_of("EgressPolicy")["properties"]["spec"]["properties"]
    for section in ("allow", "deny"):
        item = egp[section]["items"]
        assert any(
            "has(self.host) != has(self.cidr)" in r["rule"]
            for r in item["x-kubernetes-validations"]
        )
        host_rules = " ".join(
            r["rule"] for r in item["properties"]["host"]["x-kubernetes-validations"]
        )
        for needle in ("'*'", "'://'", "'/'", "':'", "matches"):
            assert needle in host_rules
    egw = schema_of("EgressGateway")["properties"]["spec"]["properties"]
    rules = {
        name: " ".join(r["rule"] for r in egw[name].get("x-kubernetes-validations", []))
        for name in ("service", "autoscaling", "allowedPolicyNamespaces")
    }
    assert "size(self.eipAllocations) == size(self.subnets)" in rules["service"]
    assert "size(self.loadBalancerSourceRanges) > 0" in rules["service"]
    assert "aws-load-balancer-scheme' in self.annotations" in rules["service"]
    guard = egw["egressGuard"]["properties"]["namespaceSelector"]["x-kubernetes-validations"]
    assert "size(self.matchLabels) > 0" in guard[0]["rule"]
    assert "self.minReplicas <= self.maxReplicas" in rules["autoscaling"]
    assert "has(self.selector)" in rules["allowedPolicyNamespaces"]
    for r in (
        rule
        for _, node in walk(schema_of("EgressGateway"), "egw")
        for rule in node.get("x-kubernetes-validations", [])
    ):
        assert r.get("message"), r


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (("mode",), "Enforce"),
        (("defaultAction",), "Deny"),
        (("defaultPorts",), [80, 443]),
        (("blockPrivateDestinations",), True),
        (("replicas",), 2),
        (("allowedPolicyNamespaces", "from"), "All"),
        (("dns", "cache", "enabled"), True),
        (("dns", "cache", "minTTLSeconds"), 5),
        (("dns", "cache", "maxTTLSeconds"), 300),
        (("service", "type"), "LoadBalancer"),
        (("service", "scheme"), "internal"),
        (("service", "targetType"), "ip"),
    ],
)
def test_gateway_defaults(field: tuple[str, ...], expected: object) -> None:
    node = schema_of("EgressGateway")["properties"]["spec"]
    for name in field:
        # Parents default to {} so the apiserver applies the nested defaults too.
        assert node.get("default") == {} or node is schema_of("EgressGateway")["properties"]["spec"]
        node = node["properties"][name]
    assert node["default"] == expected


def test_policy_mode_default() -> None:
    assert (
        schema_of("EgressPolicy")["properties"]["spec"]["properties"]["mode"]["default"]
        == "Enforce"
    )


# --- validation of good and bad objects ------------------------------------------------


def test_fixtures_found() -> None:
    kinds = {doc["kind"] for _, doc in tidegate_documents()}
    assert kinds == set(KINDS)


@pytest.mark.parametrize(
    ("where", "doc"), tidegate_documents(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_examples_validate(where: str, doc: dict[str, Any]) -> None:
    assert errors(doc) == [], where


POLICY: dict[str, Any] = {
    "apiVersion": "tidegate.io/v1alpha1",
    "kind": "EgressPolicy",
    "metadata": {"name": "p", "namespace": "ns"},
    "spec": {"allow": [{"host": "github.com"}]},
}
GATEWAY: dict[str, Any] = {
    "apiVersion": "tidegate.io/v1alpha1",
    "kind": "EgressGateway",
    "metadata": {"name": "g", "namespace": "ns"},
    "spec": {},
}


def policy_with_rule(rule: dict[str, Any], section: str = "allow") -> dict[str, Any]:
    obj = copy.deepcopy(POLICY)
    obj["spec"] = {section: [rule]}
    return obj


GOOD_HOSTS = [
    "github.com",
    "*.githubusercontent.com",
    "ec2.*.amazonaws.com",
    "a.b.*.c.d",
    "localhost",
    "GitHub.COM.",
    "xn--bcher-kva.example",
    "bücher.example",
    "*.co.uk",
]
BAD_HOSTS = [
    "*",
    "*.",
    "",
    "https://github.com",
    "github.com:443",
    "github.com/path",
    "foo*.example.com",
    "*foo.example.com",
    "*.*.example.com",
    "a.*.*.com",
    "example.*",
    "*.example.*",
    "github .com",
    "user@github.com",
    "github..com",
    ".github.com",
    "[::1]",
]


@pytest.mark.parametrize("host", GOOD_HOSTS)
@pytest.mark.parametrize("section", ["allow", "deny"])
def test_good_hosts(host: str, section: str) -> None:
    assert errors(policy_with_rule({"host": host}, section)) == []


@pytest.mark.parametrize("host", BAD_HOSTS)
@pytest.mark.parametrize("section", ["allow", "deny"])
def test_bad_hosts_rejected(host: str, section: str) -> None:
    assert errors(policy_with_rule({"host": host}, section)), host


@pytest.mark.parametrize(
    "rule",
    [
        {},
        {"ports": [443]},
        {"host": "github.com", "cidr": "10.0.0.0/8"},
        {"host": "github.com", "ports": [70000]},
        {"host": "github.com", "ports": [0]},
        {"host": "github.com", "ports": ["443"]},
        {"cidr": "10.0.0.0/8", "ports": [-1]},
        {"host": "github.com", "extra": True},
    ],
    ids=[
        "empty",
        "ports-only",
        "host-and-cidr",
        "port-70000",
        "port-0",
        "port-string",
        "port-neg",
        "ok-extra",
    ],
)
def test_bad_rules_rejected(rule: dict[str, Any]) -> None:
    obj = policy_with_rule(rule)
    if "extra" in rule:
        # Unknown fields are pruned by the apiserver, not rejected by the schema.
        assert errors(obj) == []
    else:
        assert errors(obj), rule


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("spec", "mode"), "enforce"),
        (("spec", "gatewayRef"), {"namespace": "x"}),
        (("spec", "sources", "cidrs"), "10.0.0.0/8"),
        (("spec", "allow"), [{"host": "a.com"}] * 513),
    ],
)
def test_bad_policy_fields(path: tuple[str, ...], value: object) -> None:
    obj = copy.deepcopy(POLICY)
    node = obj
    for p in path[:-1]:
        node = node.setdefault(p, {})
    node[path[-1]] = value
    assert errors(obj)


@pytest.mark.parametrize(
    "spec",
    [
        {"mode": "Permissive"},
        {"defaultAction": "Reject"},
        {"defaultPorts": [80, 65536]},
        {"allowedPolicyNamespaces": {"from": "Any"}},
        {"replicas": -1},
        {"autoscaling": {"minReplicas": 2}},
        {"autoscaling": {"maxReplicas": 5, "targetCPUUtilizationPercentage": 0}},
        {"service": {"type": "ExternalName"}},
        {"service": {"scheme": "public"}},
        {"service": {"eipAllocations": ["10.0.0.1"]}},
        {"service": {"targetType": "pod"}},
        {"egressGuard": {"allowedCIDRs": ["10.0.0.0/8"]}},
        {
            "egressGuard": {
                "namespaceSelector": {"matchLabels": {"a": "b"}},
                "dns": {"namespace": ""},
            }
        },
        {"proxyEnv": {"noProxy": [""]}},
        {"dns": {"cache": {"minTTLSeconds": -1}}},
        {"nodeSelector": {"pool": 1}},
        {"topologySpread": "region"},
        {"blockPrivateDestinations": "yes"},
    ],
)
def test_bad_gateway_specs(spec: dict[str, Any]) -> None:
    obj = copy.deepcopy(GATEWAY)
    obj["spec"] = spec
    assert errors(obj), spec
