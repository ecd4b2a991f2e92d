"""Pure tests: how each gateway is exposed, whether clients stay identifiable, proxy env."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import urllib.request
from typing import Any

import pytest
import requests.utils

from tidegate.gateway.documents import parse_gateway
from tidegate.operator.exposure import (
    assess_client_identity,
    merge_target_group_attributes,
    parse_attributes,
)
from tidegate.operator.proxyenv import ClusterNetwork, no_proxy_entries, proxy_env_data
from tidegate.operator.render import Names, Owner, render_service, render_workload

NAMES = Names("egress", "platform")
AWS = "service.beta.kubernetes.io/aws-load-balancer-"
NETWORK = ClusterNetwork(
    domain="cluster.local",
    service_cidrs=("10.96.0.0/12",),
    pod_cidrs=("10.244.0.0/16",),
    api_server_hosts=("10.96.0.1",),
)


def gw(service: dict[str, Any] | None = None, **spec: Any) -> Any:
    body = {"metadata": {"name": "egress", "namespace": "platform"}, "spec": dict(spec)}
    if service is not None:
        body["spec"]["service"] = service
    return parse_gateway(body)


def assess(service: dict[str, Any] | None = None) -> Any:
    return assess_client_identity(render_service(gw(service), NAMES))


# --- the rendered Services -------------------------------------------------------------------


def test_instance_targets_use_local_traffic_policy() -> None:
    svc = render_service(gw({"targetType": "instance"}), NAMES)
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert f"{AWS}target-group-attributes" not in svc["metadata"]["annotations"]
    assert "allocateLoadBalancerNodePorts" not in svc["spec"]  # instance targets need them
    assert svc["metadata"]["annotations"][f"{AWS}nlb-target-type"] == "instance"
    node_port = render_service(gw({"type": "NodePort"}), NAMES)
    assert node_port["spec"]["externalTrafficPolicy"] == "Local"


def test_user_target_group_attributes_are_merged_not_lost() -> None:
    svc = render_service(
        gw(
            {
                "annotations": {
                    f"{AWS}target-group-attributes": "deregistration_delay.timeout_seconds=30"
                }
            }
        ),
        NAMES,
    )
    attributes = parse_attributes(svc["metadata"]["annotations"][f"{AWS}target-group-attributes"])
    assert attributes == {
        "deregistration_delay.timeout_seconds": "30",
        "preserve_client_ip.enabled": "true",
    }
    # an explicit choice is kept (and then reported, see below)
    assert merge_target_group_attributes("preserve_client_ip.enabled=false") == (
        "preserve_client_ip.enabled=false"
    )


def test_proxy_protocol_replaces_client_ip_preservation() -> None:
    svc = render_service(gw({"proxyProtocol": {"trustedCIDRs": ["10.0.64.0/24"]}}), NAMES)
    annotations = svc["metadata"]["annotations"]
    assert annotations[f"{AWS}proxy-protocol"] == "*"
    assert annotations[f"{AWS}target-group-attributes"] == "preserve_client_ip.enabled=false"


def test_in_cluster_service_and_proxy_env_are_rendered() -> None:
    objects = render_workload(gw(), NAMES, owner=Owner("egress", "uid-9"), network=NETWORK)
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    lb = by_name[("Service", "egress-gateway")]
    internal = by_name[("Service", "egress-proxy")]
    assert lb["spec"]["type"] == "LoadBalancer"
    assert internal["spec"] == {
        "type": "ClusterIP",
        "selector": lb["spec"]["selector"],
        "ports": lb["spec"]["ports"],
    }
    assert "annotations" not in internal["metadata"]
    env = by_name[("ConfigMap", "egress-proxy-env")]
    assert env["metadata"]["ownerReferences"][0]["uid"] == "uid-9"
    assert env["metadata"]["labels"]["tidegate.io/gateway"] == "egress"
    url = "http://egress-proxy.platform.svc.cluster.local:3128"
    data = env["data"]
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        assert data[key] == url
    assert data["NO_PROXY"] == data["no_proxy"]
    entries = data["NO_PROXY"].split(",")
    for needed in (".cluster.local", ".svc", "10.96.0.0/12", "10.244.0.0/16", "10.96.0.1"):
        assert needed in entries
    assert "kubernetes.default.svc" in entries
    java = data["TIDEGATE_JAVA_OPTIONS"]
    assert "-Dhttps.proxyHost=egress-proxy.platform.svc.cluster.local" in java
    assert "-Dhttps.proxyPort=3128" in java
    non_proxy = java.split("-Dhttp.nonProxyHosts=")[1].split("|")
    assert "*.cluster.local" in non_proxy and "10.96.0.1" in non_proxy
    assert not any("/" in p for p in non_proxy)  # Java cannot say CIDRs
    assert " " not in java.split("-Dhttp.nonProxyHosts=")[1]


def test_proxy_env_extra_entries_and_domain() -> None:
    network = ClusterNetwork(domain="corp.internal")
    objects = render_workload(
        gw(proxyEnv={"noProxy": [".corp.example", "192.0.2.0/24"]}), NAMES, network=network
    )
    (env,) = [o for o in objects if o["metadata"]["name"] == "egress-proxy-env"]
    assert env["data"]["HTTPS_PROXY"] == "http://egress-proxy.platform.svc.corp.internal:3128"
    entries = env["data"]["NO_PROXY"].split(",")
    assert entries[-2:] == [".corp.example", "192.0.2.0/24"]
    assert ".corp.internal" in entries and ".cluster.local" not in entries
    assert len(entries) == len(set(entries))


def test_network_from_environment() -> None:
    network = ClusterNetwork.from_environment(
        domain="cluster.local.", environ={"KUBERNETES_SERVICE_HOST": "10.100.0.1"}
    )
    assert network.domain == "cluster.local"
    assert network.api_server_hosts == ("10.100.0.1",)
    assert ClusterNetwork.from_environment(environ={}).api_server_hosts == ()


# --- real clients read the variables the way the docs say ------------------------------------


def test_python_clients_honour_the_generated_no_proxy() -> None:
    data = proxy_env_data(
        host="egress-proxy.platform.svc.cluster.local", port=3128, network=NETWORK
    )
    env = {"NO_PROXY": data["NO_PROXY"], "HTTPS_PROXY": data["HTTPS_PROXY"]}
    old = {k: os.environ.get(k) for k in env}
    try:
        os.environ.update(env)
        # requests: names, suffixes and CIDRs bypass; the internet goes through the gateway
        assert requests.utils.should_bypass_proxies("https://db.data.svc.cluster.local/", None)
        assert requests.utils.should_bypass_proxies("https://kubernetes.default.svc/", None)
        assert requests.utils.should_bypass_proxies("http://10.244.3.7:8080/", None)
        assert requests.utils.should_bypass_proxies("https://10.96.0.1/", None)
        assert not requests.utils.should_bypass_proxies("https://pypi.example.org/", None)
        assert (
            requests.utils.get_environ_proxies("https://pypi.example.org/")["https"]
            == (data["HTTPS_PROXY"])
        )
        # urllib: suffixes and exact hosts (no CIDRs: the reason names are listed too)
        assert urllib.request.proxy_bypass_environment("db.data.svc.cluster.local")
        assert not urllib.request.proxy_bypass_environment("pypi.example.org")
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_curl_uses_the_proxy_and_bypasses_cluster_names(tmp_path: Any) -> None:
    """curl, with the ConfigMap as its environment, on a loopback listener playing the gateway."""
    import shutil
    import socket
    import threading

    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    seen: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    port = server.getsockname()[1]

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            seen.append(conn.recv(4096))
            conn.sendall(
                b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    data = proxy_env_data(host="127.0.0.1", port=port, network=NETWORK)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **data}
    proc = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "5",
            "https://pypi.example.org/simple/",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    thread.join(5)
    server.close()
    assert seen and seen[0].startswith(b"CONNECT pypi.example.org:443 HTTP/1.1"), (seen, proc)
    # a cluster name matches NO_PROXY: curl goes direct (and fails to resolve), no CONNECT
    proc = subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "--max-time",
            "3",
            "-v",
            "http://db.data.svc.cluster.local/",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert "Could not resolve host: db.data.svc.cluster.local" in proc.stderr, proc.stderr


# --- client identity: what is reported as a condition and Event -----------------------------


@pytest.mark.parametrize(
    ("service", "identified", "reason"),
    [
        (None, True, "ClientAddressPreserved"),
        ({"type": "ClusterIP"}, True, "InClusterOnly"),
        ({"type": "NodePort"}, True, "TrafficPolicyLocal"),
        ({"targetType": "instance"}, True, "TrafficPolicyLocal"),
        ({"proxyProtocol": {"trustedCIDRs": ["10.0.64.0/24"]}}, True, "ProxyProtocol"),
        (
            {"scheme": "internet-facing", "loadBalancerSourceRanges": ["198.51.100.0/24"]},
            True,
            "ClientAddressPreserved",
        ),
        # what a CEL rule cannot see: annotations that undo the safe defaults
        (
            {"annotations": {f"{AWS}target-group-attributes": "preserve_client_ip.enabled=false"}},
            False,
            "ClientAddressHidden",
        ),
        ({"annotations": {f"{AWS}type": "nlb"}}, False, "UnknownLoadBalancer"),
    ],
)
def test_client_identity(service: dict[str, Any] | None, identified: bool, reason: str) -> None:
    result = assess(service)
    assert (result.identified, result.reason) == (identified, reason), result.message
    assert result.message


def test_client_identity_of_hand_made_services() -> None:
    """The live Service is judged too: hand edits and other controllers count."""
    base = render_service(gw({"targetType": "instance"}), NAMES)
    base["spec"]["externalTrafficPolicy"] = "Cluster"
    assert assess_client_identity(base).reason == "NodePortSNAT"
    open_lb = render_service(gw(), NAMES)
    open_lb["metadata"]["annotations"][f"{AWS}scheme"] = "internet-facing"
    result = assess_client_identity(open_lb)
    assert (result.identified, result.reason) == (False, "OpenToInternet")
    open_lb["metadata"]["annotations"]["service.beta.kubernetes.io/load-balancer-source-ranges"] = (
        "198.51.100.0/24"
    )
    assert assess_client_identity(open_lb).identified
    node_port = {"spec": {"type": "NodePort"}}
    assert assess_client_identity(node_port).reason == "NodePortSNAT"
    assert assess_client_identity({}).reason == "InClusterOnly"


def test_no_proxy_entries_are_valid_and_unique() -> None:
    entries = no_proxy_entries(NETWORK, ["10.96.0.0/12", " extra.example "])
    assert len(entries) == len(set(entries))
    assert entries[-1] == "extra.example"
    for entry in entries:
        if "/" in entry:
            ipaddress.ip_network(entry)
