"""A realistic policy set for benchmarks: many teams, many policies, mixed rule shapes.

Deterministic (seeded) so runs compare. The bench destination ``upstream.test`` is
allowed by one policy in the middle of the set, so every request walks the real index.
About 30% are ClusterEgressPolicies selecting peered-VPC ranges by cidr (and the one that
allows the loopback bench client); the rest are EgressPolicies for their namespace's pods.
"""

from __future__ import annotations

import random
from typing import Any

from tidegate.gateway.bundle import compile_bundle
from tidegate.gateway.documents import parse_gateway, parse_policy

WORDS = [
    "api",
    "cdn",
    "auth",
    "data",
    "files",
    "static",
    "login",
    "edge",
    "img",
    "sso",
    "repo",
    "pkg",
    "mirror",
    "docs",
    "status",
    "events",
    "push",
    "hooks",
    "web",
    "app",
]
TLDS = ["com", "net", "io", "org", "dev", "cloud"]


def policy_objects(
    count: int, *, seed: int = 7, rules_per_policy: int = 12
) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(count):
        team = f"team-{i % 100:03d}"
        allow: list[dict[str, Any]] = []
        for _ in range(rules_per_policy):
            shape = rng.random()
            domain = f"{rng.choice(WORDS)}{rng.randrange(10_000)}.{rng.choice(TLDS)}"
            if shape < 0.55:
                allow.append({"host": f"{rng.choice(WORDS)}.{domain}"})
            elif shape < 0.85:
                allow.append({"host": f"*.{domain}"})
            elif shape < 0.93:
                allow.append({"host": f"{rng.choice(WORDS)}.*.{domain}"})
            else:
                allow.append({"cidr": f"{rng.randrange(1, 223)}.{rng.randrange(256)}.0.0/16"})
            if rng.random() < 0.1:
                allow[-1]["ports"] = [443, rng.choice([22, 8443, 5432])]
        spec: dict[str, Any] = {"allow": allow}
        if rng.random() < 0.2:
            spec["deny"] = [{"host": f"gist.{rng.choice(WORDS)}{rng.randrange(100)}.com"}]
        if rng.random() < 0.3:
            spec["sources"] = {"cidrs": [f"10.{rng.randrange(256)}.0.0/16"]}
        if rng.random() < 0.05:
            spec["mode"] = "Audit"
        if i == count // 2:
            # The bench client is a loopback address the gateway knows no pod for, so only
            # cluster policies selecting it by cidr govern it (docs/policies.md).
            spec["sources"] = {"cidrs": ["127.0.0.0/8"]}
            spec["mode"] = "Enforce"
            allow.append({"host": "upstream.test", "ports": [9443, 9080, 9090, 443, 80]})
        name = f"policy-{i:04d}"
        if "sources" in spec:  # clients that are not pods: a ClusterEgressPolicy's business
            out.append({"kind": "ClusterEgressPolicy", "metadata": {"name": name}, "spec": spec})
        else:
            out.append({"metadata": {"name": name, "namespace": team}, "spec": spec})
    return out


def bench_bundle(count: int = 1000) -> bytes:
    gateway = parse_gateway(
        {
            "metadata": {"name": "bench", "namespace": "tidegate-system"},
            "spec": {
                "clientCIDRs": ["127.0.0.0/8", "10.0.0.0/8"],
                # the bench upstream lives on loopback; everything else stays guarded
                "privateDestinationExceptions": ["127.0.0.1/32"],
            },
        }
    )
    policies = [parse_policy(p) for p in policy_objects(count)]
    return compile_bundle(gateway=gateway, policies=policies, generation=1)
