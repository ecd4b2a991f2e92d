#!/usr/bin/env python3
"""Policy engine microbenchmark: decision cost against the number of rules.

    .venv/bin/python benchmarks/decide_bench.py [--sizes 1000,10000,100000]

For each size it builds a bundle of that many host rules (exact, ``*.x`` and ``a.*.b``
shapes, spread over policies of 5,000 rules), then times decisions for names that hit
each shape and for a miss. Prints build time, microseconds per decision and the ratio to
the smallest size: flat ratios are the point (lookup cost must not grow with rules).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import time

from tidegate.gateway.documents import parse_gateway, parse_policy
from tidegate.gateway.engine import Engine
from tidegate.gateway.hosts import normalize_host

GATEWAY = parse_gateway({"metadata": {"name": "g"}, "spec": {"clientCIDRs": ["10.0.0.0/8"]}})


def build(size: int) -> Engine:
    hosts = []
    for i in range(size):
        shape = i % 10
        if shape < 6:
            hosts.append(f"api{i}.example{i % 101}.com")
        elif shape < 9:
            hosts.append(f"*.w{i}.example.net")
        else:
            hosts.append(f"api.*.m{i}.example.org")
    per = 5000
    policies = tuple(
        parse_policy(
            {
                "metadata": {"name": f"p{k}", "namespace": f"team{k % 100}"},
                "spec": {"allow": [{"host": h} for h in hosts[k * per : (k + 1) * per]]},
            }
        )
        for k in range((size + per - 1) // per)
    )
    return Engine(GATEWAY, policies)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--decisions", type=int, default=200_000)
    a = ap.parse_args()
    client = ipaddress.ip_address("10.1.2.3")
    base = None
    for size in (int(s) for s in a.sizes.split(",")):
        started = time.perf_counter()
        engine = build(size)
        built = time.perf_counter() - started
        last = size - 1
        probes = [
            normalize_host(f"api{last - (last % 10)}.example{(last - (last % 10)) % 101}.com"),
            normalize_host(f"deep.sub.w{last - (last % 10) + 6}.example.net"),
            normalize_host(f"api.eu.m{last - (last % 10) + 9 - 10}.example.org"),
            normalize_host("nothing.example.com"),
        ]
        verdicts = [engine.decide(client, h, 443).verdict for h in probes]
        rounds = a.decisions // len(probes)
        started = time.perf_counter()
        for _ in range(rounds):
            for host in probes:
                engine.decide(client, host, 443)
        per_decision = (time.perf_counter() - started) / (rounds * len(probes)) * 1e6
        base = base or per_decision
        print(
            json.dumps(
                {
                    "rules": engine.rule_count,
                    "build_s": round(built, 2),
                    "us_per_decision": round(per_decision, 2),
                    "ratio_to_smallest": round(per_decision / base, 2),
                    "verdicts": verdicts,
                }
            )
        )


if __name__ == "__main__":
    main()
