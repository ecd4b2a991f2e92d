"""The chart's alerts and dashboard, checked by Prometheus' own code (promtool).

1. Every rule of the rendered PrometheusRule and every dashboard query goes through
   promtool's PromQL parser (`promtool check rules`).
2. Every alert is evaluated by `promtool test rules` on a timeline made of /metrics scrapes
   of a real gateway process: an hour of quiet traffic, then a quarter of an hour of real
   incidents (deny and would-deny spikes, a broken policy file, names that do not resolve,
   tunnels held near the connection limit), each scrape placed one minute after the last.
   The operator's series come from its real metric registry (tidegate.operator.metrics),
   driven by hand: the operator itself needs an API server and is not run here. Each alert
   must fire when its condition is there, with its labels and rendered annotations, and stay
   silent before it and after it ends.

The target labels a Prometheus adds when scraping through the chart's PodMonitor and
ServiceMonitor (job, namespace, pod, gateway) are added to the scraped samples as the
scrape would; the rest is the gateway's own output.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fixtures_net import GatewayFactory, GatewayProcess, Net, connect, policy_doc, standard_policies
from helmlib import CHART, NO_HELM, by_kind, find_helm, render
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from toolslib import tool

from tidegate.operator.metrics import Metrics as OperatorMetrics

pytestmark = pytest.mark.skipif(find_helm() is None, reason=NO_HELM)

NS = "tidegate-system"
GATEWAY = f"{NS}/default"
POD = "default-gateway-7d9f8-abcde"
GATEWAY_TARGET = {"job": "tidegate-gateway", "namespace": NS, "pod": POD, "gateway": GATEWAY}
OPERATOR_TARGET = {"job": "tidegate", "namespace": NS, "pod": "tidegate-operator-5c6d7-fghij"}
QUIET_MINUTES = 70  # > the spike alerts' hour of history
INCIDENT_SCRAPES = 16  # one a minute
TOTAL_MINUTES = 100

Series = dict[str, dict[int, float]]  # 'name{labels}' -> minute -> value


def rule_groups() -> list[dict[str, Any]]:
    docs = render("metrics.prometheusRule.enabled=true")
    (rule,) = by_kind(docs, "PrometheusRule")
    groups: list[dict[str, Any]] = rule["spec"]["groups"]
    return groups


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_rules_parse(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule_groups()}))
    proc = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 8 rules found" in proc.stdout, proc.stdout
    # The check is a real parser: one unbalanced parenthesis and it says so.
    broken = rule_groups()
    broken[0]["rules"][0]["expr"] += ")"
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump({"groups": broken}))
    proc = promtool("check", "rules", "broken.yaml", cwd=tmp_path)
    assert proc.returncode != 0 and "parse error" in (proc.stdout + proc.stderr)


def dashboard_queries() -> list[str]:
    dashboard = json.loads((CHART / "dashboards" / "tidegate.json").read_text())
    queries = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if target.get("expr")
    ]
    # Grafana's label_values(<series selector>, label): the selector is PromQL.
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((.*), *\w+\)", variable["definition"])
            assert match, variable["definition"]
            queries.append(match.group(1))
    return queries


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, with Grafana's variables replaced by what Grafana would put there, is a
    valid PromQL expression (as a recording rule, which promtool parses and type-checks)."""
    queries = dashboard_queries()
    assert len(queries) >= 15
    substituted = [
        q.replace("$__rate_interval", "2m").replace("$gateway", "tidegate-system/default")
        for q in queries
    ]
    assert not [q for q in substituted if "$" in q], substituted
    rules = [{"record": f"dashboard:query_{i}", "expr": q} for i, q in enumerate(substituted)]
    (tmp_path / "dashboard.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]})
    )
    proc = promtool("check", "rules", "dashboard.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the recorded timeline ------------------------------------------------------------------


def _key(name: str, labels: dict[str, str]) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    body = ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items()))
    return f"{name}{{{body}}}"


def record(series: Series, text: str, minute: int, target: dict[str, str]) -> None:
    """One scrape's samples at ``minute``, with the scrape's target labels added."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            series.setdefault(_key(sample.name, {**sample.labels, **target}), {})[minute] = (
                sample.value
            )


def scrape(gw: GatewayProcess) -> str:
    status, text = gw.admin("/metrics")
    assert status == 200, text
    return text


def _ask(gw: GatewayProcess, target: str) -> int:
    reply = connect(gw, target)
    reply.sock.close()
    return reply.status


def _wait(what: str, probe: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not probe():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture
def recorded(gateway_factory: GatewayFactory, net: Net, tmp_path: Path) -> Iterator[Series]:
    policies = [
        *standard_policies(net),
        policy_doc("resolving", allow=[{"host": "*.unresolvable.test", "ports": [net.tls_port]}]),
    ]
    gw = gateway_factory(policies, extra_args=["--max-connections", "40", "--idle-timeout", "600"])
    tls = net.tls_port
    series: Series = {}
    # An hour of quiet: a few allowed requests and a deny, then nothing changes.
    for _ in range(5):
        assert _ask(gw, f"allowed.test:{tls}") == 200
    assert _ask(gw, f"denied.test:{tls}") == 403
    quiet = scrape(gw)
    for minute in range(QUIET_MINUTES):
        record(series, quiet, minute, GATEWAY_TARGET)

    # Incidents: 34 of 40 connections held open, then a minute's worth of each problem
    # between scrapes.
    held = [connect(gw, f"echo.test:{net.echo.port}") for _ in range(34)]
    try:
        assert all(r.status == 200 for r in held)
        policy_dir = gw.workdir / "policies"
        for i in range(INCIDENT_SCRAPES):
            for _ in range(20):
                assert _ask(gw, f"denied.test:{tls}") == 403
                assert _ask(gw, f"audit.test:{tls}") == 200  # Audit: allowed, would-deny
            for n in range(3):
                assert _ask(gw, f"n{i}-{n}.unresolvable.test:{tls}") == 502
            assert _ask(gw, f"allowed.test:{tls}") == 200
            if i == 2:  # a broken policy file: reload error, the last good bundle stays
                (policy_dir / "zz-broken.yaml").write_text("kind: EgressPolicy\nspec: [\n")
                _wait(
                    "a bundle reload error",
                    lambda: (
                        gw.metrics().get_value("tidegate_bundle_reloads_total", result="error") >= 1
                    ),
                )
                (policy_dir / "zz-broken.yaml").unlink()
            record(series, scrape(gw), QUIET_MINUTES + i, GATEWAY_TARGET)
    finally:
        for r in held:
            r.sock.close()
    # Over: the held connections are closed, traffic is back to nothing.
    _wait(
        "the held connections to close",
        lambda: gw.metrics().get_value("tidegate_connections_active") == 0,
    )
    after = scrape(gw)
    for minute in range(QUIET_MINUTES + INCIDENT_SCRAPES, TOTAL_MINUTES):
        record(series, after, minute, GATEWAY_TARGET)

    generation = int(gw.metrics().get_value("tidegate_bundle_generation"))
    assert generation >= 1
    # The operator's registry: it publishes the gateway's generation, then (from the
    # incident on) a newer one the pod never loads; it also publishes for a gateway that
    # has no pod at all; a fifth of its EgressGateway passes fail from the incident on.
    operator = OperatorMetrics()
    operator.published(f"{NS}/other", size=100, generation=1)
    for minute in range(TOTAL_MINUTES):
        incident = minute >= QUIET_MINUTES
        operator.published(GATEWAY, size=1000, generation=generation + (1 if incident else 0))
        for _ in range(10):
            operator.observe("EgressGateway", 0.01, ok=True)
            operator.observe("EgressPolicy", 0.01, ok=True)
        for _ in range(5 if incident else 0):
            operator.observe("EgressGateway", 0.01, ok=False)
        record(series, generate_latest(operator.registry).decode(), minute, OPERATOR_TARGET)
    yield series


def input_series(series: Series) -> list[dict[str, str]]:
    out = []
    for key, points in sorted(series.items()):
        values = [repr(points[m]) if m in points else "_" for m in range(TOTAL_MINUTES)]
        out.append({"series": key, "values": " ".join(values)})
    return out


def expected(rules: dict[str, dict[str, Any]], alert: str, labels: dict[str, str]) -> Any:
    """The alert as promtool must report it: its labels plus the rule's, and the rule's
    annotations with $labels filled in (the chart's templates use nothing else)."""
    rule = rules[alert]
    annotations = {
        k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], v)
        for k, v in rule["annotations"].items()
    }
    assert "{{" not in json.dumps(annotations), annotations
    return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": annotations}


def test_every_alert_fires_on_recorded_scrapes(recorded: Series, tmp_path: Path) -> None:
    groups = rule_groups()
    rules = {r["alert"]: r for g in groups for r in g["rules"]}
    gw = {"gateway": GATEWAY}
    pod = {"gateway": GATEWAY, "pod": POD}
    other = {"gateway": f"{NS}/other"}
    deny = {**gw, "policy": "t/main"}  # policies are <namespace>/<name>
    would_deny = {**gw, "policy": "t/watch"}
    firing: dict[int, dict[str, list[dict[str, str]]]] = {
        # An hour of quiet: only the gateway without any pod.
        65: {"TidegateGatewayNoReadyReplica": [other]},
        # 8 minutes in: spikes (for 2m), the reload error of minute 72 (within 10m), the
        # connections held since minute 70 (for 5m); lagging and DNS still pending (10m).
        78: {
            "TidegateGatewayNoReadyReplica": [other],
            "TidegateDenySpike": [deny],
            "TidegateWouldDenySpike": [would_deny],
            "TidegateBundleReloadErrors": [pod],
            "TidegateConnectionsNearLimit": [pod],
        },
        # 14 minutes in: the reload error is 12 minutes old; lagging and DNS now fire.
        84: {
            "TidegateGatewayNoReadyReplica": [other],
            "TidegateDenySpike": [deny],
            "TidegateWouldDenySpike": [would_deny],
            "TidegateConnectionsNearLimit": [pod],
            "TidegateDNSFailures": [gw],
            "TidegateBundleGenerationLagging": [pod],
        },
        # After the incident (over at minute 86): what remains is the lagging pod, the
        # gateway without pods, and the operator's errors, over a fifth for 15 minutes.
        97: {
            "TidegateGatewayNoReadyReplica": [other],
            "TidegateBundleGenerationLagging": [pod],
            "TidegateOperatorReconcileErrors": [{"kind": "EgressGateway"}],
        },
    }
    # Every alert is checked at every one of these times: absent means it must not fire.
    tests = [
        {
            "eval_time": f"{minute}m",
            "alertname": alert,
            "exp_alerts": [expected(rules, alert, labels) for labels in by_alert.get(alert, [])],
        }
        for minute, by_alert in firing.items()
        for alert in sorted(rules)
    ]
    assert {a for by_alert in firing.values() for a in by_alert} == set(rules), (
        "every alert must be seen firing at least once"
    )
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    (tmp_path / "test.yaml").write_text(
        yaml.safe_dump(
            {
                "rule_files": ["rules.yaml"],
                "evaluation_interval": "1m",
                "tests": [
                    {
                        "interval": "1m",
                        "input_series": input_series(recorded),
                        "alert_rule_test": tests,
                    }
                ],
            },
            width=10_000,
        )
    )
    proc = promtool("test", "rules", "test.yaml", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
