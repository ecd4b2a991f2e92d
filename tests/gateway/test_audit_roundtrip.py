"""From audit to enforce through the real gateway: its access log feeds ``tidegate
suggest``, the suggestion is judged by ``tidegate check``, and the gateway's own bounded
record (``GET /audit``, the per-policy counters) says what enforcing would break.

Traffic is real plain-HTTP proxy requests (``requests``) and raw sockets bound to a second
loopback address for a second client; every name resolves to the loopback upstream.
"""

from __future__ import annotations

import ipaddress
import json
import random
import socket
import subprocess
from pathlib import Path
from typing import Any

import requests
import yaml
from fixtures_net import (
    TIDEGATE,
    GatewayFactory,
    GatewayProcess,
    Net,
    cluster_policy_doc,
    connect,
    gateway_doc,
    policy_doc,
    read_reply,
    write_local_identities,
)

from tidegate.gateway.engine import Engine
from tidegate.gateway.hosts import normalize_host
from tidegate.gateway.identity import build_table, parse_identities
from tidegate.gateway.sources import bundle_from_documents, read_policy_dir

API_NAMES = ["a.api.example.test", "b.api.example.test", "c.api.example.test"]
CODE_NAMES = ["x.code.example.test", "y.code.example.test", "z.code.example.test"]
PAGES = ["one.github.io", "two.github.io", "three.github.io"]  # a public suffix (private section)
CAUGHT = "gist.code.example.test"  # an Audit policy's deny rule: let through, never suggested
DENIED = "evil.code.example.test"  # an Enforce deny rule for the second client


def _policies(net: Net) -> list[dict[str, Any]]:
    return [
        policy_doc(
            "svc",
            mode="Audit",
            allow=[{"host": "a.api.example.test", "ports": [net.http_port]}],
            deny=[{"host": CAUGHT}],
        ),
        cluster_policy_doc(  # the second client is no pod: chosen by its address
            "block",
            sources={"cidrs": ["127.0.0.2/32"]},
            deny=[{"host": DENIED}],
        ),
    ]


def _get(gw: GatewayProcess, net: Net, name: str) -> int:
    response = requests.get(
        f"http://{name}:{net.http_port}/x",
        proxies={"http": gw.proxy_url},
        timeout=10,
    )
    return response.status_code


def _get_from(gw: GatewayProcess, source: str, name: str, port: int) -> int:
    sock = socket.socket()
    sock.settimeout(5)
    sock.bind((source, 0))
    sock.connect(gw.proxy_addr)
    sock.sendall(f"GET http://{name}:{port}/ HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n".encode())
    return read_reply(sock).status


def _check(policies: Path, client: str, target: str) -> str:
    result = subprocess.run(
        [TIDEGATE, "check", "--policies", str(policies), "--client", client, "--json", target],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode in (0, 1), result.stderr
    return str(json.loads(result.stdout)["decision"])


def _engine(folder: Path) -> Engine:
    bundle = bundle_from_documents(read_policy_dir(folder), generation=1)
    return Engine(bundle.gateway, bundle.policies)


def _decide(engine: Engine, client: str, host: str, port: int) -> str:
    """As the gateway would: 127.0.0.1 is the pod t/local (write_local_identities)."""
    address = ipaddress.ip_address(client)
    identity = LOCAL.lookup(address)
    return engine.decide(address, normalize_host(host), port, identity).verdict


LOCAL = build_table(
    [
        parse_identities(
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "ClientIdentities",
                "pods": [
                    {
                        "namespace": "t",
                        "name": "local",
                        "labels": {"app": "test"},
                        "addresses": ["127.0.0.1", "::1"],
                    }
                ],
            }
        )
    ]
)


def test_audit_log_to_suggestion_round_trip(
    gateway_factory: GatewayFactory, net: Net, tmp_path: Path
) -> None:
    for name in [*API_NAMES, *CODE_NAMES, *PAGES, CAUGHT, DENIED]:
        net.dns.set(name, [(net.up, 60)])
    gw = gateway_factory(_policies(net))
    assert _get(gw, net, "a.api.example.test") == 200  # allowed by a rule
    assert _get(gw, net, "a.api.example.test") == 200
    for name in [*API_NAMES[1:], *CODE_NAMES, *PAGES, CAUGHT]:
        assert _get(gw, net, name) == 200, name  # would-deny: let through under Audit
    assert _get_from(gw, "127.0.0.2", DENIED, net.http_port) == 403

    # The gateway's record: per policy, bounded, what enforcing would break.
    status, body = gw.admin("/audit")
    assert status == 200
    record = json.loads(body)
    svc, block = record["policies"]["t/svc"], record["policies"]["block"]
    assert (svc["wouldDeny"], svc["denied"]) == (len(API_NAMES) - 1 + len(CODE_NAMES) + 4, 0)
    listed = {(d["host"], d["port"]): d for d in svc["destinations"]}
    assert listed[(CAUGHT, net.http_port)]["reason"] == "deny_rule"
    assert listed[("one.github.io", net.http_port)]["reason"] == "no_rule_matched"
    assert ("a.api.example.test", net.http_port) not in listed  # allowed: not in the record
    assert (block["denied"], block["destinations"][0]["host"]) == (1, DENIED)
    metrics = gw.metrics()
    assert metrics.get_value("tidegate_policy_would_deny_total", policy="t/svc") == 9
    assert metrics.get_value("tidegate_policy_denied_total", policy="block") == 1
    assert gw.stop() == 0

    # The access log, as written by the gateway, feeds suggest.
    result = subprocess.run(
        [TIDEGATE, "suggest", str(gw.log_path), "--namespace", "t"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    (policy,) = docs
    hosts = {r["host"] for r in policy["spec"]["allow"]}
    assert hosts == {"*.api.example.test", *CODE_NAMES, *PAGES}
    assert f"not *.code.example.test: it would cover refused {DENIED} (+1 more)" in result.stdout

    # Applied alone (no deny rule left to save us), it allows exactly what was let through
    # and nothing a deny rule refused.
    folder = tmp_path / "suggested"
    folder.mkdir()
    write_local_identities(folder)
    (folder / "gateway.yaml").write_text(yaml.safe_dump(gateway_doc(net)))
    (folder / "suggested.yaml").write_text(result.stdout)
    port = net.http_port
    engine = _engine(folder)  # what `tidegate check` builds; a few go through the command
    for name in [*API_NAMES, *CODE_NAMES, *PAGES]:
        assert _decide(engine, "127.0.0.1", name, port) == "allow", name
    for name in [CAUGHT, DENIED, "stranger.github.io", "w.code.example.test"]:
        assert _decide(engine, "127.0.0.2", name, port) == "deny", name
    assert _decide(engine, "127.0.0.1", "b.api.example.test", port + 1) == "deny"
    assert _decide(engine, "127.0.0.1", "q.api.example.test", port) == "allow"
    assert _check(folder, "127.0.0.1", f"one.github.io:{port}") == "allow"
    assert _check(folder, "127.0.0.1", f"{CAUGHT}:{port}") == "deny"
    assert _check(folder, "127.0.0.1", f"stranger.github.io:{port}") == "deny"


def test_against_and_check_on_the_gateway_log(
    gateway_factory: GatewayFactory, net: Net, tmp_path: Path
) -> None:
    for name in ["new.api.example.test", "a.api.example.test"]:
        net.dns.set(name, [(net.up, 60)])
    gw = gateway_factory(_policies(net))
    assert _get(gw, net, "a.api.example.test") == 200
    assert _get(gw, net, "new.api.example.test") == 200  # would-deny
    assert gw.stop() == 0
    folder = tmp_path / "current"
    folder.mkdir()
    write_local_identities(folder)
    (folder / "all.yaml").write_text(yaml.safe_dump_all([gateway_doc(net), *_policies(net)]))
    args = [TIDEGATE, "suggest", str(gw.log_path), "--against", str(folder), "--check"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert f"new.api.example.test:{net.http_port}" in result.stdout
    (policy,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert {r["host"] for r in policy["spec"]["allow"]} == {"new.api.example.test"}
    # Once the difference is part of the policies, enforcing breaks nothing.
    (folder / "fix.yaml").write_text(result.stdout)
    fixed = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_the_record_stays_bounded_under_a_flood_of_random_names(
    gateway_factory: GatewayFactory, net: Net
) -> None:
    net.dns.set("heavy.example.test", [(net.up, 60)])
    gw = gateway_factory(
        [policy_doc("svc", mode="Audit", allow=[])], extra_args=["--audit-destinations", "20"]
    )
    rng = random.Random(5)
    names = [f"{rng.getrandbits(48):012x}.flood.example.test" for _ in range(300)]
    names += ["heavy.example.test"] * 60
    rng.shuffle(names)
    for name in names:
        reply = connect(gw, f"{name}:{net.echo.port}")
        reply.sock.close()
    status, body = gw.admin("/audit?top=5")
    assert status == 200
    svc = json.loads(body)["policies"]["t/svc"]
    assert svc["wouldDeny"] == 360
    assert svc["tracked"] <= 20 and svc["evictions"] >= 280
    assert len(svc["destinations"]) == 5
    assert svc["destinations"][0]["host"] == "heavy.example.test"
    assert svc["others"] == 360 - sum(d["count"] for d in svc["destinations"])
    assert gw.admin("/audit?top=x")[0] == 400
