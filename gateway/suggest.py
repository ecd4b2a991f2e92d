"""``tidegate suggest``: from audit logs to an allowlist.

Run a policy in Audit mode, collect the gateway's JSON access lines, and this prints an
EgressPolicy that would allow what was seen. Names are grouped under their parent: when
``threshold`` or more distinct names share a parent of at least two labels, they become
one ``*.parent`` rule. Ports 80/443 are the defaults and are not listed; any other port
seen is. Counts are comments, so a reviewer sees what each rule is worth.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

from .hosts import HostError, normalize_host

DEFAULT_PORTS = frozenset({80, 443})
_COUNTED = frozenset({"allow", "audit", "deny"})
_NOT_DESTINATION = frozenset({"client_not_allowed", "bad_request", "private_address"})


def read_log_lines(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        with path.open(encoding="utf-8", errors="replace") as f:
            yield from f


def _seen(lines: Iterable[str]) -> tuple[Counter[str], dict[str, set[int]], Counter[str]]:
    counts: Counter[str] = Counter()
    ports: dict[str, set[int]] = defaultdict(set)
    ips: Counter[str] = Counter()
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("decision") not in _COUNTED or record.get("reason") in _NOT_DESTINATION:
            continue
        raw_host, port = record.get("host"), record.get("port")
        if not isinstance(raw_host, str) or not isinstance(port, int):
            continue
        try:
            host = normalize_host(raw_host)
        except HostError:
            continue
        (ips if host.kind == "ip" else counts)[host.name] += 1
        ports[host.name].add(port)
    return counts, ports, ips


def suggest_policy(lines: Iterable[str], *, name: str, namespace: str, threshold: int = 3) -> str:
    counts, ports, ips = _seen(lines)
    by_parent: dict[str, list[str]] = defaultdict(list)
    for host in counts:
        parent = host.split(".", 1)[1] if host.count(".") >= 2 else ""
        by_parent[parent].append(host)
    rules: list[tuple[str, int, set[int], str]] = []  # (host, count, ports, comment)
    for parent, hosts in sorted(by_parent.items()):
        if parent and len(hosts) >= threshold:
            total = sum(counts[h] for h in hosts)
            seen_ports = set().union(*(ports[h] for h in hosts))
            rules.append((f"*.{parent}", total, seen_ports, f"{len(hosts)} names"))
        else:
            for host in sorted(hosts):
                rules.append((host, counts[host], ports[host], ""))
    out = [
        "# Suggested by `tidegate suggest` from access logs. Review before enforcing.",
        "apiVersion: tidegate.io/v1alpha1",
        "kind: EgressPolicy",
        "metadata:",
        f"  name: {name}",
        f"  namespace: {namespace}",
        "spec:",
        "  mode: Enforce",
        "  allow:" if rules or ips else "  allow: []",
    ]
    for host, count, seen_ports, comment in sorted(rules, key=lambda r: (-r[1], r[0])):
        note = f"  # {count} requests" + (f", {comment}" if comment else "")
        out.append(f'    - host: "{host}"{note}')
        if not seen_ports <= DEFAULT_PORTS:
            out.append(f"      ports: [{', '.join(str(p) for p in sorted(seen_ports))}]")
    for ip, count in sorted(ips.items(), key=lambda r: (-r[1], r[0])):
        prefix = 128 if ":" in ip else 32
        out.append(f'    - cidr: "{ip}/{prefix}"  # {count} requests')
        if not ports[ip] <= DEFAULT_PORTS:
            out.append(f"      ports: [{', '.join(str(p) for p in sorted(ports[ip]))}]")
    return "\n".join(out) + "\n"
