"""``tidegate suggest`` as a pure function and as a command (no sockets).

The round trip: every suggestion is compiled with the gateway's own loader and judged by
the engine (what ``tidegate check`` does), so a wildcard that opens too much or an allow
that re-admits a refused name fails here, not only in review.
"""

from __future__ import annotations

import gzip
import io
import ipaddress
import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tidegate.gateway.documents import parse_documents, parse_gateway
from tidegate.gateway.engine import Engine
from tidegate.gateway.hosts import normalize_host
from tidegate.gateway.identity import pod_identity
from tidegate.gateway.logshape import iso_time
from tidegate.gateway.suffixes import default_suffixes
from tidegate.gateway.suggest import (
    Progress,
    observe,
    parse_line,
    read_log_lines,
    render,
    suggest_policy,
)

TIDEGATE = str(Path(sys.executable).with_name("tidegate"))
NOW = time.time()
GATEWAY = {
    "apiVersion": "tidegate.io/v1alpha1",
    "kind": "EgressGateway",
    "metadata": {"name": "default", "namespace": "tidegate-system"},
    "spec": {"clientCIDRs": ["10.0.0.0/8", "fd00::/8"]},
}


def line(
    host: str,
    port: int = 443,
    decision: str = "allow",
    reason: str = "allow_rule",
    client: str = "10.1.2.3:40000",
    ts: float = NOW,
    **extra: Any,
) -> str:
    record = {"client": client, "method": "CONNECT", "host": host, "port": port}
    record |= {"decision": decision, "reason": reason, "ts": ts, **extra}
    return json.dumps(record)


def engine_of(text: str) -> Engine:
    docs = parse_documents(text)
    return Engine(parse_gateway(GATEWAY), docs.policies)


def decide(engine: Engine, client: str, host: str, port: int, namespace: str = "default") -> str:
    """As a pod of ``namespace`` at ``client`` (suggested EgressPolicies govern pods)."""
    identity = pod_identity(namespace, "pod", {}, {})
    return engine.decide(ipaddress.ip_address(client), normalize_host(host), port, identity).verdict


def allow_hosts(text: str) -> set[str]:
    out = set()
    for doc in yaml.safe_load_all(text):
        for rule in (doc or {}).get("spec", {}).get("allow") or []:
            out.add(rule.get("host") or rule.get("cidr"))
    return out


# --- wildcards and the Public Suffix List -------------------------------------------------


@pytest.mark.parametrize(
    ("parent", "allowed"),
    [
        ("co.uk", False),  # ICANN section
        ("github.io", False),  # private section
        ("herokuapp.com", False),
        ("s3.amazonaws.com", False),
        ("amazonaws.com", False),  # above s3.amazonaws.com: covers other owners' buckets
        ("com", False),
        ("example.co.uk", True),
        ("myorg.github.io", True),
        ("github.com", True),
        ("svc.example.com", True),
    ],
)
def test_wildcard_never_at_or_above_a_public_suffix(parent: str, allowed: bool) -> None:
    assert default_suffixes().wildcard_allowed(parent) is allowed


@pytest.mark.parametrize(
    "parent", ["co.uk", "github.io", "herokuapp.com", "s3.amazonaws.com", "amazonaws.com"]
)
def test_suggest_lists_names_one_by_one_under_a_public_suffix(parent: str) -> None:
    names = [f"site{i}.{parent}" for i in range(5)]
    text = suggest_policy([line(n) for n in names], group_by="none")
    assert allow_hosts(text) == set(names)
    assert f"*.{parent}" not in text.replace(f"not *.{parent}", "")
    engine = engine_of(text)
    assert decide(engine, "10.1.2.3", f"stranger.{parent}", 443) == "deny"


def test_threshold_edges() -> None:
    two = suggest_policy([line("a.example.com"), line("b.example.com")], threshold=3)
    assert allow_hosts(two) == {"a.example.com", "b.example.com"}
    three = [line("a.example.com"), line("b.example.com"), line("c.example.com")]
    assert allow_hosts(suggest_policy(three, threshold=3)) == {"*.example.com"}
    assert allow_hosts(suggest_policy(three, threshold=4)) == {
        "a.example.com",
        "b.example.com",
        "c.example.com",
    }
    # Repeats of one name are not siblings.
    same = [line("a.example.com")] * 5 + [line("b.example.com")]
    assert "*.example.com" not in allow_hosts(suggest_policy(same, threshold=3))
    # The apex is not covered by *.example.com, so it stays a rule of its own.
    apex = [*three, line("example.com")]
    assert allow_hosts(suggest_policy(apex)) == {"*.example.com", "example.com"}


def test_a_wildcard_never_covers_a_denied_name() -> None:
    logs = [
        line("api.github.com"),
        line("raw.github.com"),
        line("codeload.github.com"),
        line("gist.github.com", decision="deny", reason="deny_rule", policy="ci/runners"),
    ]
    text = suggest_policy(logs)
    assert allow_hosts(text) == {"api.github.com", "raw.github.com", "codeload.github.com"}
    assert "would cover refused gist.github.com" in text
    engine = engine_of(text)
    assert decide(engine, "10.1.2.3", "gist.github.com", 443) == "deny"
    assert decide(engine, "10.1.2.3", "api.github.com", 443) == "allow"


def test_denied_lines_never_become_rules_and_audit_deny_rules_are_not_re_allowed() -> None:
    logs = [
        line("ok.example.org"),
        line("blocked.example.net", decision="deny", reason="no_rule_matched"),
        line("caught.example.org", decision="audit", reason="deny_rule", policy="a/watch"),
        line("wanted.example.org", decision="audit", reason="no_rule_matched"),
    ]
    text = suggest_policy(logs)
    assert allow_hosts(text) == {"ok.example.org", "wanted.example.org"}
    assert "not allowed: caught.example.org:443 was refused by a deny rule" in text


def test_ports_are_listed_and_only_those() -> None:
    text = suggest_policy([line("git.example.org", port=22), line("git.example.org", port=443)])
    (doc,) = [d for d in yaml.safe_load_all(text) if d]
    assert doc["spec"]["allow"] == [{"host": "git.example.org", "ports": [22, 443]}]
    engine = engine_of(text)
    assert decide(engine, "10.1.2.3", "git.example.org", 80) == "deny"


def test_counts_and_last_seen_are_comments() -> None:
    logs = [line("a.example.org", ts=NOW - 60), line("a.example.org", ts=NOW - 5)]
    text = suggest_policy(logs)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 5))
    assert f'host: "a.example.org"  # 2 requests, last seen {stamp}' in text


def test_reads_the_shared_log_shapes_iso_time() -> None:
    """Access lines carry ``time`` (ISO 8601); older ones an epoch ``ts``: both count."""
    old = json.loads(line("a.example.org", ts=NOW - 60))
    new = json.loads(line("a.example.org"))
    del new["ts"]
    new = {"time": iso_time(NOW - 5), "level": "info", "logger": "tidegate.access"} | new
    text = suggest_policy([json.dumps(old), json.dumps(new)])
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(NOW - 5))
    assert f'host: "a.example.org"  # 2 requests, last seen {stamp}' in text


def test_one_policy_per_client_range_or_namespace() -> None:
    logs = [
        line("a.example.org", client="10.1.2.3:1"),
        line("b.example.org", client="10.9.9.9:1"),
        line("c.example.org", client="[fd00::5]:1"),
    ]
    docs = [d for d in yaml.safe_load_all(suggest_policy(logs, group_by="range")) if d]
    assert {d["kind"] for d in docs} == {"ClusterEgressPolicy"}  # only those select by address
    sources = {d["spec"]["sources"]["cidrs"][0]: allow_hosts(yaml.safe_dump(d)) for d in docs}
    assert sources == {
        "10.1.2.0/24": {"a.example.org"},
        "10.9.9.0/24": {"b.example.org"},
        "fd00::/64": {"c.example.org"},
    }
    engine = engine_of(suggest_policy(logs, group_by="range"))
    assert decide(engine, "10.1.2.200", "a.example.org", 443) == "allow"
    assert decide(engine, "10.1.2.200", "b.example.org", 443) == "deny"
    by_ns = [
        line("a.example.org", client_namespace="ci"),
        line("b.example.org", client_namespace="web"),
    ]
    docs = [d for d in yaml.safe_load_all(suggest_policy(by_ns)) if d]
    assert {d["metadata"]["namespace"] for d in docs} == {"ci", "web"}
    assert all("sources" not in d["spec"] for d in docs)


def test_ip_destinations_become_host_cidrs() -> None:
    text = suggest_policy([line("192.0.2.7", port=8443), line("[2001:db8::1]", port=443)])
    assert allow_hosts(text) == {"192.0.2.7/32", "2001:db8::1/128"}


def test_garbage_lines_are_skipped() -> None:
    logs = ["", "not json", "[1]", '{"host": 5}', line("a.example.org", port=0), "{broken"]
    assert all(parse_line(text) is None for text in logs)
    assert allow_hosts(suggest_policy([*logs, line("ok.example.org")])) == {"ok.example.org"}


# --- against the current policies -----------------------------------------------------------

CURRENT = """
apiVersion: tidegate.io/v1alpha1
kind: EgressPolicy
metadata: {name: ci, namespace: ci}
spec:
  mode: Audit
  allow:
    - host: "*.example.com"
      ports: [443]
  deny:
    - host: secret.example.org
"""


def test_against_reports_what_enforcing_would_break(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(GATEWAY))
    (tmp_path / "ci.yaml").write_text(CURRENT)
    from tidegate.gateway.sources import bundle_from_documents, read_policy_dir

    bundle = bundle_from_documents(read_policy_dir(tmp_path), generation=1)
    ci = {"client_namespace": "ci", "client_pod": "runner"}  # the pod the gateway logged
    logs = [
        line("a.example.com", decision="allow", reason="allow_rule", **ci),
        line("new.example.org", decision="audit", reason="no_rule_matched", **ci),
        line("a.example.com", port=8080, decision="audit", reason="port_not_allowed", **ci),
        line("secret.example.org", decision="audit", reason="deny_rule", policy="ci/ci", **ci),
        line("old.example.org", decision="deny", reason="no_rule_matched", **ci),
    ]
    text, breakage = render(observe(logs), name="s", namespace="ci", threshold=3, against=bundle)
    broken = {(b.host, b.port, b.reason) for b in breakage}
    assert broken == {
        ("new.example.org", 443, "no_rule_matched"),
        ("a.example.com", 8080, "port_not_allowed"),
        ("secret.example.org", 443, "deny_rule"),
    }
    # The YAML allows the difference, never the deny rule's catch.
    assert allow_hosts(text) == {"new.example.org", "a.example.com"}
    assert "secret.example.org:443 for namespace ci" in text


def test_against_keeps_wildcards_off_current_deny_rules(tmp_path: Path) -> None:
    (tmp_path / "gw.yaml").write_text(yaml.safe_dump(GATEWAY))
    (tmp_path / "ci.yaml").write_text(CURRENT)
    from tidegate.gateway.sources import bundle_from_documents, read_policy_dir

    bundle = bundle_from_documents(read_policy_dir(tmp_path), generation=1)
    logs = [line(f"n{i}.example.org", decision="audit", reason="no_rule_matched") for i in range(4)]
    text, _ = render(observe(logs), name="s", namespace="ci", threshold=3, against=bundle)
    assert "*.example.org" not in allow_hosts(text)
    assert "would cover refused secret.example.org" in text


# --- the command -----------------------------------------------------------------------------


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [TIDEGATE, "suggest", *args], input=stdin, capture_output=True, timeout=60, check=False
    )


def test_files_gzip_and_stdin_read_the_same(tmp_path: Path) -> None:
    logs = "\n".join(line(f"h{i}.example.org") for i in range(4)) + "\n"
    plain = tmp_path / "a.log"
    plain.write_text(logs)
    packed = tmp_path / "a.log.gz"
    packed.write_bytes(gzip.compress(logs.encode()))
    outputs = {
        run(str(plain)).stdout,
        run(str(packed)).stdout,
        run(stdin=logs.encode()).stdout,
        run("-", stdin=gzip.compress(logs.encode())).stdout,
    }
    assert len(outputs) == 1
    assert b'host: "*.example.org"' in outputs.pop()


def test_check_exit_status_follows_recent_breakage(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "gw.yaml").write_text(yaml.safe_dump(GATEWAY))
    (policies / "ci.yaml").write_text(CURRENT)
    ci = {"client_namespace": "ci", "client_pod": "runner"}
    old = line("new.example.org", decision="audit", reason="no_rule_matched", ts=NOW - 7200, **ci)
    fine = line("a.example.com", **ci)
    logs = tmp_path / "access.log"
    logs.write_text(f"{old}\n{fine}\n")
    against = ["--against", str(policies), "--check"]
    assert run(str(logs), *against, "--since", "1").returncode == 0
    failed = run(str(logs), *against, "--since", "3")
    assert failed.returncode == 1, failed.stderr
    assert b"enforcing would break 1 destinations" in failed.stderr
    as_json = json.loads(run(str(logs), *against, "--since", "3", "--json").stdout)
    assert as_json["recent"] == 1 and as_json["breakage"][0]["host"] == "new.example.org"
    assert run(str(logs), "--check").returncode == 2
    assert run(str(tmp_path / "missing.log")).returncode == 2
    assert run(str(logs), "--against", str(tmp_path / "nope")).returncode == 2


def test_progress_bar_for_streams_on_a_terminal() -> None:
    stream = io.StringIO()
    bar = Progress(None, stream)
    for _ in range(3):
        bar.advance(1024)
    bar.close()
    assert "3 lines" in stream.getvalue() and stream.getvalue().endswith("\n")
    sized = io.StringIO()
    bar = Progress(2048, sized)
    bar.advance(1024)
    bar.close()
    assert "50%" in sized.getvalue()


def test_read_log_lines_draws_progress_only_for_large_inputs(tmp_path: Path) -> None:
    small = tmp_path / "small.log"
    small.write_text(line("a.example.org") + "\n")
    stream = io.StringIO()
    assert len(list(read_log_lines([small], progress=stream))) == 1
    assert stream.getvalue() == ""


def test_progress_bar_on_a_terminal_goes_to_stderr_only() -> None:
    """stdin has no size, so a terminal on stderr gets the bar; stdout stays pure YAML."""
    master, slave = pty.openpty()
    logs = "\n".join(line(f"h{i}.example.org") for i in range(50)) + "\n"
    try:
        proc = subprocess.Popen(
            [TIDEGATE, "suggest"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=slave
        )
        os.close(slave)
        out, _ = proc.communicate(logs.encode(), timeout=60)
        drawn = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
    assert proc.returncode == 0
    assert b"50 lines" in drawn
    assert b"lines" not in out.split(b"\n---")[1] and b'host: "*.example.org"' in out
    quiet = run("--no-progress", stdin=logs.encode())
    assert quiet.stderr == b""


NARROWED = """
apiVersion: tidegate.io/v1alpha1
kind: EgressPolicy
metadata: {name: runners, namespace: ci}
spec:
  mode: Audit
  podSelector: {matchLabels: {app: runner}}
  allow:
    - host: "*.example.com"
      ports: [443]
"""

IDENTITIES = """
apiVersion: tidegate.io/v1alpha1
kind: ClientIdentities
pods:
  - {namespace: ci, name: runner-1, labels: {app: runner}, addresses: [10.1.2.3]}
"""


def test_against_judges_logged_pods_with_their_labels_from_identities(tmp_path: Path) -> None:
    """Without labels a podSelector cannot match (reported as breakage, the cautious side);
    with the identities in the --against folder, or given by --identities, it does."""
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "gw.yaml").write_text(yaml.safe_dump(GATEWAY))
    (policies / "ci.yaml").write_text(NARROWED)
    logs = tmp_path / "access.log"
    logs.write_text(line("a.example.com", client_namespace="ci", client_pod="runner-1") + "\n")
    against = ["--against", str(policies), "--check"]
    blind = run(str(logs), *against)
    assert blind.returncode == 1, blind.stderr
    assert b"a.example.com:443" in blind.stdout
    elsewhere = tmp_path / "identities.yaml"
    elsewhere.write_text(IDENTITIES)
    assert run(str(logs), *against, "--identities", str(elsewhere)).returncode == 0
    (policies / "pods.yaml").write_text(IDENTITIES)
    assert run(str(logs), *against).returncode == 0
    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: tidegate.io/v1alpha1\nkind: ClientIdentities\npods: 5\n")
    assert run(str(logs), *against, "--identities", str(broken)).returncode == 2
