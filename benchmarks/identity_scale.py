"""Identity scale, the pure parts: 10,000 pods in 200 namespaces, 1,000 policies.

What it measures (no API server: a scaled-down stand-in for the full benchmark, which
would need 10,000 pod objects and 10,000 status patches on the shared 2-core machine):

- operator: time to turn the pod index into the identities documents, their sizes and
  shard count, and the cost of one pod churning (recompute; which shards change, bytes);
- gateway: time to parse and install every shard (the table), its memory;
- decision cost (microseconds) with 1,000 policies, warm memo and cold.

Run: .venv/bin/python benchmarks/identity_scale.py [--pods 10000 --namespaces 200 --policies 1000]
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import resource
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tidegate.gateway.documents import parse_gateway, parse_policy
from tidegate.gateway.engine import Engine
from tidegate.gateway.hosts import normalize_host
from tidegate.gateway.identity import build_table, load_identity_text
from tidegate.operator.identities import (
    PodRecord,
    build_documents,
    resolve,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--pods", type=int, default=10_000)
    p.add_argument("--namespaces", type=int, default=200)
    p.add_argument("--policies", type=int, default=1_000)
    args = p.parse_args()

    claims: dict[str, list[PodRecord]] = {}
    for j in range(args.pods):
        ns = f"ns{j % args.namespaces}"
        ip = str(ipaddress.ip_address(int(ipaddress.ip_address("10.128.0.0")) + j))
        labels = (("app", f"app{j % 7}"), ("pod-template-hash", f"h{j % 50}"), ("team", ns))
        claims[ip] = [PodRecord(ns, f"pod-{j}", labels, (ip,))]
    namespaces = {
        f"ns{i}": {"team": f"ns{i}", "env": "prod" if i % 2 else "dev"}
        for i in range(args.namespaces)
    }

    started = time.perf_counter()
    resolved = resolve(claims)
    index, shards = build_documents(resolved, namespaces, index_name="gw-identities")
    payloads = [index.payload(1), *(s.payload(1) for s in shards)]
    build_s = time.perf_counter() - started

    # one pod churns: deleted, a new one takes another address
    churn = dict(claims)
    gone = next(iter(churn))
    del churn[gone]
    churn["10.200.0.1"] = [PodRecord("ns3", "new-pod", (("app", "app3"),), ("10.200.0.1",))]
    started = time.perf_counter()
    index2, shards2 = build_documents(
        resolve(churn), namespaces, index_name="gw-identities", current_shards=len(shards)
    )
    churn_s = time.perf_counter() - started
    changed = [b for a, b in zip(shards, shards2, strict=True) if a.sha256 != b.sha256]

    # gateway: parse and install every shard
    tracemalloc.start()
    started = time.perf_counter()
    docs = [d for text in payloads for d in load_identity_text(text, source="bench")]
    table = build_table(docs, generation=1)
    load_s = time.perf_counter() - started
    table_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()

    gateway = parse_gateway(
        {"metadata": {"name": "g", "namespace": "gw"}, "spec": {"clientCIDRs": ["10.0.0.0/8"]}}
    )
    policies = []
    for i in range(args.policies):
        spec: dict[str, object] = {
            "allow": [{"host": f"h{i}.example.com"}, {"host": f"*.s{i}.example.net"}],
            "deny": [{"host": f"bad{i}.example.org"}],
        }
        if i % 3 == 0:
            spec["podSelector"] = {"matchLabels": {"app": f"app{i % 7}"}}
        policies.append(
            parse_policy(
                {
                    "metadata": {"name": f"p{i}", "namespace": f"ns{i % args.namespaces}"},
                    "spec": spec,
                }
            )
        )
    for i in range(10):
        policies.append(
            parse_policy(
                {
                    "kind": "ClusterEgressPolicy",
                    "metadata": {"name": f"c{i}"},
                    "spec": {
                        "namespaceSelector": {"matchLabels": {"env": "prod"}},
                        "allow": [{"host": f"mirror{i}.example"}],
                    },
                }
            )
        )
    engine = Engine(gateway, tuple(policies))
    clients = list(table.by_address)[:2000]
    host = normalize_host("h5.example.com")
    started = time.perf_counter()
    for c in clients:
        engine.decide(c, host, 443, table.lookup(c))
    cold_us = (time.perf_counter() - started) / len(clients) * 1e6
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        for c in clients:
            engine.decide(c, host, 443, table.lookup(c))
    warm_us = (time.perf_counter() - started) / (rounds * len(clients)) * 1e6

    report = {
        "pods": args.pods,
        "namespaces": args.namespaces,
        "policies": len(policies),
        "shards": len(shards),
        "bytes_total": sum(len(x) for x in payloads),
        "bytes_largest_shard": max(len(x) for x in payloads[1:]),
        "bytes_index": len(payloads[0]),
        "operator_build_s": round(build_s, 3),
        "one_pod_churn_recompute_s": round(churn_s, 3),
        "one_pod_churn_shards_rewritten": len(changed),
        "one_pod_churn_bytes_written": sum(len(s.payload(2)) for s in changed)
        + (0 if index2.sha256 == index.sha256 else len(index2.payload(2))),
        "gateway_load_s": round(load_s, 3),
        "gateway_table_mib": round(table_bytes / 2**20, 1),
        "decision_us_cold_memo": round(cold_us, 2),
        "decision_us_warm": round(warm_us, 2),
        "process_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
