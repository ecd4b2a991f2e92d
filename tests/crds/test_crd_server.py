"""The CRDs against a real kube-apiserver: they install, defaults apply, CEL rules reject
mistakes with a clear message, and the printer columns show in ``kubectl get``.

Uses the session-wide ``control_plane`` fixture (tests/fixtures_kube.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.kube

ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = sorted((ROOT / "crds").glob("tidegate.io_*.yaml"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"
NS = "crd-test"


@pytest.fixture(scope="module")
def kube(control_plane: Any) -> Any:
    """The control plane with the CRDs installed and established, and a test namespace."""
    for path in CRD_FILES:
        control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(path))
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in CRD_FILES]
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names]
    )
    for ns in (NS, "ci", "team-a", "tidegate-system", "shared"):
        control_plane.ensure_namespace(ns)
    return control_plane


def create(kube: Any, obj: dict[str, Any], *, dry_run: bool = True) -> Any:
    args = ["create", "-o", "json", "-f", "-"]
    if dry_run:
        args.insert(1, "--dry-run=server")
    return kube.kubectl(*args, input=json.dumps(obj), check=False)


def policy(spec: dict[str, Any], name: str = "p") -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def gateway(spec: dict[str, Any], name: str = "g") -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def test_crds_established(kube: Any) -> None:
    out = kube.kubectl("api-resources", "--api-group=tidegate.io", "-o", "wide").stdout
    assert "egp" in out and "egw" in out
    assert "tidegate" in out  # category


def test_fixtures_accepted(kube: Any) -> None:
    docs = [d for d in yaml.safe_load_all((FIXTURES / "valid.yaml").read_text()) if d]
    for doc in docs:
        proc = create(kube, doc)
        assert proc.returncode == 0, proc.stderr


def test_examples_accepted(kube: Any) -> None:
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and str(doc.get("apiVersion", "")).startswith("tidegate.io/"):
                doc = copy.deepcopy(doc)
                ns = doc.setdefault("metadata", {}).setdefault("namespace", NS)
                kube.ensure_namespace(ns)
                proc = create(kube, doc)
                assert proc.returncode == 0, f"{path}: {proc.stderr}"


def test_gateway_defaults_applied(kube: Any) -> None:
    proc = create(kube, gateway({}, name="defaults"))
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert spec["mode"] == "Enforce"
    assert spec["defaultAction"] == "Deny"
    assert spec["defaultPorts"] == [80, 443]
    assert spec["blockPrivateDestinations"] is True
    assert spec["replicas"] == 2
    assert spec["allowedPolicyNamespaces"] == {"from": "All"}
    assert spec["dns"]["cache"] == {"enabled": True, "minTTLSeconds": 5, "maxTTLSeconds": 300}
    assert spec["service"]["type"] == "LoadBalancer"
    assert spec["service"]["scheme"] == "internal"
    assert spec["service"]["targetType"] == "ip"
    assert spec["proxyEnv"] == {}
    assert "egressGuard" not in spec
    assert spec["topologySpread"] == "zone"
    assert spec["tls"] == {"requireSNIMatch": True}
    assert "image" not in spec  # the operator's --gateway-image applies


def test_internet_facing_opt_in_accepted_with_source_ranges(kube: Any) -> None:
    spec = {
        "service": {
            "scheme": "internet-facing",
            "loadBalancerSourceRanges": ["198.51.100.0/24"],
            "eipAllocations": ["eipalloc-0a1"],
            "subnets": ["subnet-1"],
        },
        "egressGuard": {
            "namespaceSelector": {"matchExpressions": [{"key": "team", "operator": "Exists"}]}
        },
    }
    proc = create(kube, gateway(spec, name="public"))
    assert proc.returncode == 0, proc.stderr
    created = json.loads(proc.stdout)["spec"]
    assert created["service"]["scheme"] == "internet-facing"
    assert created["egressGuard"]["dns"] == {
        "namespace": "kube-system",
        "podLabels": {"k8s-app": "kube-dns"},
    }
    # a ClusterIP gateway has no load balancer, so no ranges are needed whatever the scheme
    proc = create(kube, gateway({"service": {"type": "ClusterIP", "scheme": "internet-facing"}}))
    assert proc.returncode == 0, proc.stderr


def test_gateway_image_and_tls_accepted(kube: Any) -> None:
    proc = create(kube, gateway({"image": "tidegate:1.2.3", "tls": {"requireSNIMatch": False}}))
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    assert spec["image"] == "tidegate:1.2.3"
    assert spec["tls"] == {"requireSNIMatch": False}


def test_policy_mode_default(kube: Any) -> None:
    proc = create(kube, policy({"allow": [{"host": "github.com"}]}))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["spec"]["mode"] == "Enforce"


def cluster_policy(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "ClusterEgressPolicy",
        "metadata": {"name": "bad-cluster"},
        "spec": spec,
    }


CEL_REJECTS = [
    pytest.param(
        policy({"sources": {"cidrs": ["0.0.0.0/0"]}, "allow": [{"host": "a.com"}]}),
        ["ClusterEgressPolicy"],
        id="namespaced-sources",
    ),
    pytest.param(
        policy({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}}),
        ["In and NotIn need values"],
        id="selector-values",
    ),
    pytest.param(
        cluster_policy({"allow": [{"host": "a.com"}]}), ["selects no clients"], id="cluster-nobody"
    ),
    pytest.param(
        cluster_policy({"namespaceSelector": {}, "gatewayRef": {"name": "x"}}),
        ["namespace"],
        id="cluster-ref-namespace",
    ),
    pytest.param(
        policy({"allow": [{"host": "*"}]}),
        ['"*" alone is not allowed', "should match"],
        id="bare-star",
    ),
    pytest.param(
        policy({"deny": [{"host": "https://github.com"}]}), ["without a scheme"], id="scheme"
    ),
    pytest.param(policy({"allow": [{"host": "github.com:443"}]}), ["port"], id="host-port"),
    pytest.param(policy({"allow": [{"host": "github.com/x"}]}), ["without a path"], id="path"),
    pytest.param(
        policy({"allow": [{"host": "git hub.com"}]}),
        ["host must be a domain name like"],
        id="space",
    ),
    pytest.param(
        policy({"allow": [{"host": "*.*.example.com"}]}), ["whole label"], id="two-wildcards"
    ),
    pytest.param(policy({"allow": [{"host": "foo*.example.com"}]}), ["whole label"], id="partial"),
    # The OpenAPI oneOf fails first, so the server skips the CEL rule and says this instead.
    pytest.param(
        policy({"allow": [{"ports": [443]}]}),
        ["exactly one of host or cidr", "must validate one and only one schema (oneOf)"],
        id="none",
    ),
    pytest.param(
        policy({"allow": [{"host": "a.com", "cidr": "10.0.0.0/8"}]}),
        ["exactly one of host or cidr"],
        id="both",
    ),
    pytest.param(
        policy({"allow": [{"host": "a.com", "ports": [70000]}]}), ["65535"], id="port-range"
    ),
    pytest.param(
        gateway(
            {"service": {"eipAllocations": ["eipalloc-0a1", "eipalloc-0b2"], "subnets": ["s"]}}
        ),
        ["as many subnets"],
        id="eip-subnet-count",
    ),
    pytest.param(
        gateway({"service": {"scheme": "internal", "eipAllocations": ["eipalloc-0a1"]}}),
        ["internet-facing"],
        id="eip-internal",
    ),
    pytest.param(
        gateway({"service": {"scheme": "internet-facing"}}),
        ["internet-facing needs service.loadBalancerSourceRanges"],
        id="internet-facing-without-ranges",
    ),
    pytest.param(
        gateway({"service": {"scheme": "internet-facing", "loadBalancerSourceRanges": []}}),
        ["internet-facing needs service.loadBalancerSourceRanges"],
        id="internet-facing-empty-ranges",
    ),
    pytest.param(
        gateway(
            {
                "service": {
                    "scheme": "internet-facing",
                    "eipAllocations": ["eipalloc-0a1"],
                    "subnets": ["subnet-1"],
                }
            }
        ),
        ["internet-facing needs service.loadBalancerSourceRanges"],
        id="eips-without-ranges",
    ),
    pytest.param(
        gateway(
            {
                "service": {
                    "annotations": {
                        "service.beta.kubernetes.io/aws-load-balancer-scheme": "internet-facing"
                    }
                }
            }
        ),
        ["set the load balancer scheme with service.scheme"],
        id="scheme-by-annotation",
    ),
    pytest.param(
        gateway({"egressGuard": {"namespaceSelector": {}}}),
        ["egressGuard.namespaceSelector must not be empty"],
        id="guard-empty-selector",
    ),
    pytest.param(
        gateway({"egressGuard": {"namespaceSelector": {"matchLabels": {}}}}),
        ["egressGuard.namespaceSelector must not be empty"],
        id="guard-empty-match-labels",
    ),
    pytest.param(
        gateway({"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}),
        ["minReplicas must not exceed"],
        id="autoscaling",
    ),
    pytest.param(
        gateway({"allowedPolicyNamespaces": {"from": "Selector"}}),
        ["requires a selector"],
        id="selector",
    ),
    pytest.param(
        gateway({"dns": {"cache": {"minTTLSeconds": 600, "maxTTLSeconds": 60}}}),
        ["minTTLSeconds must not exceed"],
        id="dns-ttl",
    ),
    pytest.param(gateway({"image": ""}), ["at least 1 chars long"], id="empty-image"),
    pytest.param(
        gateway({"tls": {"requireSNIMatch": "yes"}}), ["must be of type boolean"], id="sni-type"
    ),
]


@pytest.mark.parametrize(("obj", "messages"), CEL_REJECTS)
def test_invalid_objects_rejected(kube: Any, obj: dict[str, Any], messages: list[str]) -> None:
    proc = create(kube, obj)
    assert proc.returncode != 0, f"accepted: {obj}"
    assert "is invalid" in proc.stderr or "Invalid" in proc.stderr, proc.stderr
    assert any(m in proc.stderr for m in messages), proc.stderr
    assert "should match" not in proc.stderr, "a refusal must not quote a regex"


def test_explain_teaches_the_api(kube: Any) -> None:
    out = kube.kubectl("explain", "egp.spec.allow.host").stdout
    assert "ec2.*.amazonaws.com" in out
    # kubectl wraps descriptions at any space, so compare with whitespace collapsed.
    out = " ".join(kube.kubectl("explain", "egw.spec.service").stdout.split())
    assert "not the source address destinations see" in out
    out = kube.kubectl("explain", "egw.spec.image").stdout
    assert "--gateway-image" in out


def _set_status(kube: Any, kind: str, name: str, status: dict[str, Any]) -> None:
    kube.kubectl(
        "patch",
        kind,
        name,
        "-n",
        NS,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


CONDITION = {
    "type": "Ready",
    "status": "True",
    "reason": "Accepted",
    "message": "2 rules bound",
    "lastTransitionTime": "2025-01-01T00:00:00Z",
}


def test_printer_columns(kube: Any) -> None:
    kube.kubectl("delete", "egp,egw", "--all", "-n", NS, "--ignore-not-found")
    pol = policy({"mode": "Audit", "allow": [{"host": "github.com"}]}, name="cols")
    gw = gateway({"mode": "Enforce"}, name="cols")
    kube.kubectl(
        "create",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": [pol, gw]}),
    )
    _set_status(
        kube,
        "egp",
        "cols",
        {
            "gateway": f"{NS}/cols",
            "rules": 2,
            "observedGeneration": 1,
            "conditions": [CONDITION],
            "audit": {
                "wouldDeny": 7,
                "destinations": [{"host": "a.test", "port": 443, "count": 7}],
            },
        },
    )
    _set_status(
        kube,
        "egw",
        "cols",
        {
            "readyReplicas": 2,
            "addresses": ["203.0.113.10", "203.0.113.11"],
            "policies": 1,
            "bundle": {
                "generation": 3,
                "sha256": "ab" * 32,
                "bytes": 1234,
                "configMaps": 1,
                "compressed": False,
            },
            "conditions": [CONDITION],
        },
    )
    out = kube.kubectl("get", "egp", "-A").stdout.splitlines()
    assert out[0].split() == [
        "NAMESPACE",
        "NAME",
        "MODE",
        "GATEWAY",
        "RULES",
        "READY",
        "WOULD-DENY",
        "AGE",
    ]
    row = next(line.split() for line in out[1:] if line.split()[:2] == [NS, "cols"])
    assert row[2:7] == ["Audit", f"{NS}/cols", "2", "True", "7"]

    out = kube.kubectl("get", "egw", "-n", NS).stdout.splitlines()
    assert out[0].split() == ["NAME", "MODE", "REPLICAS", "ADDRESSES", "POLICIES", "READY", "AGE"]
    line = next(line for line in out[1:] if line.startswith("cols "))
    assert "Enforce" in line and "203.0.113.10" in line and "True" in line

    # The category lists both kinds.
    out = kube.kubectl("get", "tidegate", "-n", NS).stdout
    assert "egresspolicy.tidegate.io/cols" in out and "egressgateway.tidegate.io/cols" in out
    kube.kubectl("delete", "egp,egw", "cols", "-n", NS)
