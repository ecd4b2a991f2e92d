"""``tidegate suggest``: from what the gateway let through to a policy that allows it.

Run policies (or the gateway) in Audit mode, keep the JSON access log, and this turns it
into EgressPolicy YAML: one policy per client namespace (when the log lines carry one) or
per client range, each rule with its ports and, as comments, its request count and when
it was last seen. What it trusts and what it refuses to do:

- only lines the gateway let through count: ``allow``, and ``audit`` (would-deny). A
  ``deny`` line is never turned into an allow rule, and neither is an ``audit`` line that
  a *deny rule* caught (an Audit policy's deny: enforcing it is the point);
- a wildcard ``*.P`` is suggested only when ``threshold`` or more distinct names sit
  directly under ``P``, and never when ``P`` is a public suffix or above one (the Public
  Suffix List, private section included: no ``*.co.uk``, ``*.github.io``,
  ``*.herokuapp.com``, ``*.s3.amazonaws.com``, ``*.amazonaws.com``);
- a wildcard never covers a name that a line shows denied, nor a deny rule of the
  policies given with ``--against`` (``*.github.com`` is not suggested when
  ``gist.github.com`` was refused: the names are listed one by one instead).

With ``--against`` (a folder of policies or a bundle file) the current policies are put
in Enforce mode and every request seen is judged again: what they would deny is the
breakage enforcement would cause. The report lists it, the YAML then allows only that
difference, and ``--check`` makes the exit status say whether anything seen recently
would break.

Input is streamed (files, gzip files, or stdin), so a day of logs never sits in memory;
what is kept is one small counter per distinct (client group, client, host, port).
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import ipaddress
import json
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, cast

from .addresses import IPAddress
from .auditrecord import rfc3339
from .bundle import Bundle
from .engine import REASON_RULE_DENY, Engine
from .hosts import Host, HostError, HostPattern, normalize_host
from .identity import IdentityTable, pod_identity
from .logshape import TIME, epoch_of
from .model import Policy
from .suffixes import Suffixes, default_suffixes

# Access-log field names this reads (written by the gateway's access record).
F_DECISION, F_REASON, F_HOST, F_PORT = "decision", "reason", "host", "port"
F_CLIENT, F_TS, F_POLICY, F_RULE = "client", "ts", "policy", "rule"
#: The client's namespace and pod name, when the gateway knows the pod behind the address.
F_CLIENT_NAMESPACE = "client_namespace"
F_CLIENT_POD = "client_pod"

LET_THROUGH = frozenset({"allow", "audit"})
#: Denials that say nothing about the destination (a wildcard may still cover those names).
NOT_ABOUT_DESTINATION = frozenset(
    {
        "client_not_allowed",
        "bad_request",
        "header_too_large",
        "header_timeout",
        "overloaded",
        "not_ready",
        "internal_error",
    }
)
DEFAULT_THRESHOLD = 3
DEFAULT_PREFIX_V4 = 24
DEFAULT_PREFIX_V6 = 64
DEFAULT_SINCE_HOURS = 24.0
#: Show a progress bar on a terminal when the input is at least this large (or stdin).
PROGRESS_MIN_BYTES = 8 * 1024 * 1024
PROGRESS_INTERVAL = 0.2
GroupBy = Literal["auto", "namespace", "range", "none"]


# --- reading -----------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, redrawn at most every PROGRESS_INTERVAL seconds."""

    def __init__(self, total: int | None, stream: IO[str]) -> None:
        self.total = total
        self.stream = stream
        self.done = 0
        self.lines = 0
        self._last = 0.0

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        self.lines += 1
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self.draw()

    def draw(self) -> None:
        mib = self.done / (1024 * 1024)
        if self.total:
            share = min(self.done / self.total, 1.0)
            bar = "#" * int(share * 30)
            text = f"\r[{bar:<30}] {share:4.0%} {mib:.1f} MiB, {self.lines} lines"
        else:
            text = f"\r{mib:.1f} MiB, {self.lines} lines"
        self.stream.write(text)
        self.stream.flush()

    def close(self) -> None:
        self.draw()
        self.stream.write("\n")
        self.stream.flush()


def _open_binary(path: Path | None) -> tuple[IO[bytes], IO[bytes]]:
    """(what to read lines from, the underlying file whose position tracks progress)."""
    raw: IO[bytes] = sys.stdin.buffer if path is None else path.open("rb")
    peek = raw.peek(2)[:2] if isinstance(raw, io.BufferedReader) else b""
    if peek == b"\x1f\x8b":
        return cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb")), raw
    return raw, raw


def _size(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return path.stat().st_size
    except OSError:
        return None


def read_log_lines(
    paths: Iterable[Path | None], *, progress: IO[str] | None = None
) -> Iterator[str]:
    """Lines of each file (``None`` or ``-`` for stdin), gunzipped when they are gzip.

    ``progress``: a terminal stream to draw a progress bar on, for large inputs only
    (sizes are on-disk bytes, so a gzip file's bar follows the compressed bytes read).
    """
    paths = [None if p is None or str(p) == "-" else p for p in paths]
    sizes = [_size(p) for p in paths]
    total = None if any(s is None for s in sizes) else sum(s or 0 for s in sizes)
    bar = None
    if progress is not None and (total is None or total >= PROGRESS_MIN_BYTES):
        bar = Progress(total, progress)
    try:
        for path in paths:
            binary, raw = _open_binary(path)
            position = 0
            try:
                for line in binary:
                    if bar is not None:
                        where = raw.tell() if raw.seekable() else position + len(line)
                        bar.advance(where - position)
                        position = where
                    yield line.decode("utf-8", "replace")
            finally:
                if path is not None:
                    binary.close()
                    raw.close()
    finally:
        if bar is not None:
            bar.close()


@dataclass(frozen=True, slots=True)
class Line:
    """The parts of one access line that matter here."""

    verdict: str
    reason: str
    host: Host
    port: int
    client: IPAddress | None
    namespace: str | None
    ts: float
    policy: str | None = None
    rule: str | None = None
    pod: str | None = None


def _peer_address(peer: object) -> IPAddress | None:
    """The address of a ``client`` field: ``10.0.0.5:41000`` or ``[fd00::5]:41000``."""
    if not isinstance(peer, str):
        return None
    if peer.startswith("["):
        text = peer[1 : peer.find("]")]
    else:
        text = peer.rpartition(":")[0] if peer.count(":") == 1 else peer
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def parse_line(text: str) -> Line | None:
    """One access line, or None when it is not one (other log lines are mixed in)."""
    text = text.strip()
    if not text.startswith("{"):
        return None
    try:
        record = json.loads(text)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    verdict, reason = record.get(F_DECISION), record.get(F_REASON)
    raw_host, port = record.get(F_HOST), record.get(F_PORT)
    if not isinstance(verdict, str) or not isinstance(raw_host, str):
        return None
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        return None
    try:
        host = normalize_host(raw_host)
    except HostError:
        return None
    client = _peer_address(record.get(F_CLIENT))
    namespace = record.get(F_CLIENT_NAMESPACE)
    ts = epoch_of(record.get(TIME, record.get(F_TS)))  # older lines carry an epoch "ts"
    pod = record.get(F_CLIENT_POD)
    return Line(
        verdict=verdict,
        reason=reason if isinstance(reason, str) else "",
        host=host,
        port=port,
        client=client,
        namespace=namespace if isinstance(namespace, str) and namespace else None,
        ts=ts or 0.0,
        policy=record.get(F_POLICY) if isinstance(record.get(F_POLICY), str) else None,
        rule=record.get(F_RULE) if isinstance(record.get(F_RULE), str) else None,
        pod=pod if isinstance(pod, str) and pod else None,
    )


# --- what was seen -----------------------------------------------------------------------------


@dataclass(slots=True)
class Stat:
    count: int = 0
    last: float = 0.0

    def add(self, ts: float, n: int = 1) -> None:
        self.count += n
        self.last = max(self.last, ts)


@dataclass(frozen=True, slots=True, order=True)
class Group:
    """Who a suggested policy is for: a namespace, a client range, or everyone."""

    kind: Literal["namespace", "range", "all"]
    value: str = ""

    @property
    def label(self) -> str:
        return {"namespace": "namespace ", "range": "clients ", "all": ""}[self.kind] + (
            self.value or "all clients"
        )


@dataclass
class Observed:
    """Everything ``suggest`` keeps from the logs, bounded by distinct destinations."""

    #: allowed, and would-deny for want of an allow: (group, client, host, port)
    let_through: dict[tuple[Group, str, str, int], Stat] = field(default_factory=dict)
    #: would-deny because an Audit policy's deny rule matched: let through, never suggested
    caught: dict[tuple[Group, str, str, int], Stat] = field(default_factory=dict)
    #: (group, host, port) that a deny rule refused or caught: never suggested for the group
    refused_by_rule: dict[tuple[Group, str, int], Stat] = field(default_factory=dict)
    refused_names: set[str] = field(default_factory=set)  # any destination denial, any group
    ips: dict[str, Host] = field(default_factory=dict)
    #: client address -> (namespace, pod) the gateway logged for it (the latest line)
    pods: dict[str, tuple[str, str]] = field(default_factory=dict)
    lines: int = 0
    used: int = 0


def _group_of(line: Line, group_by: GroupBy, prefix_v4: int, prefix_v6: int) -> Group:
    if group_by == "none":
        return Group("all")
    if group_by in ("auto", "namespace") and line.namespace:
        return Group("namespace", line.namespace)
    if group_by == "namespace":
        return Group("namespace", "unknown")
    if line.client is None:
        return Group("all")
    prefix = prefix_v4 if line.client.version == 4 else prefix_v6
    network = ipaddress.ip_network(f"{line.client}/{prefix}", strict=False)
    return Group("range", str(network))


def observe(
    lines: Iterable[str],
    *,
    group_by: GroupBy = "auto",
    prefix_v4: int = DEFAULT_PREFIX_V4,
    prefix_v6: int = DEFAULT_PREFIX_V6,
) -> Observed:
    seen = Observed()
    for text in lines:
        seen.lines += 1
        line = parse_line(text)
        if line is None:
            continue
        seen.used += 1
        group = _group_of(line, group_by, prefix_v4, prefix_v6)
        host = line.host.name
        if line.host.kind == "ip":
            seen.ips[host] = line.host
        client = str(line.client) if line.client is not None else ""
        if client and line.namespace:
            seen.pods[client] = (line.namespace, line.pod or "")
        if line.verdict in LET_THROUGH:
            table = seen.caught if line.reason == REASON_RULE_DENY else seen.let_through
            table.setdefault((group, client, host, line.port), Stat()).add(line.ts)
            if line.reason != REASON_RULE_DENY:
                continue
        elif line.reason in NOT_ABOUT_DESTINATION:
            continue
        seen.refused_names.add(host)
        if line.reason == REASON_RULE_DENY:
            seen.refused_by_rule.setdefault((group, host, line.port), Stat()).add(line.ts)
    return seen


# --- against the current policies --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Breakage:
    group: Group
    host: str
    port: int
    count: int
    last: float
    clients: int
    reason: str
    policy: str | None
    rule: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "group": self.group.label,
            "host": self.host,
            "port": self.port,
            "count": self.count,
            "lastSeen": rfc3339(self.last) if self.last else None,
            "clients": self.clients,
            "reason": self.reason,
            "policy": self.policy,
            "rule": self.rule,
        }


def enforced(bundle: Bundle) -> Engine:
    """The bundle's engine with the gateway and every policy switched to Enforce."""
    gateway = dataclasses.replace(bundle.gateway, mode="Enforce")
    policies = tuple(dataclasses.replace(p, mode="Enforce") for p in bundle.policies)
    return Engine(gateway, policies)


def would_break(
    seen: Observed, engine: Engine, *, identities: IdentityTable | None = None
) -> list[Breakage]:
    """What the (enforced) engine denies among what was let through or caught by a rule.

    ``identities`` (the ClientIdentities of the cluster, when at hand) give a logged pod
    its labels, so podSelector-narrowed policies are judged as the gateway would.
    """
    found: dict[tuple[Group, str, int], tuple[Stat, set[str], str, str | None, str | None]] = {}
    candidates = [*seen.let_through.items(), *seen.caught.items()]
    for (group, client, host_name, port), stat in candidates:
        if not client:
            continue
        host = seen.ips.get(host_name) or Host("name", host_name)
        # The pod the gateway logged behind the address (its labels are not in the log:
        # a podSelector-narrowed policy is judged as not selecting it - the cautious side).
        pod = seen.pods.get(client)
        address = ipaddress.ip_address(client)
        identity = pod_identity(pod[0], pod[1], {}, {}) if pod is not None else None
        known = identities.lookup(address) if identities is not None else None
        if known is not None and (pod is None or known.namespace == pod[0]):
            identity = known
        decision = engine.decide(address, host, port, identity)
        if decision.allowed:
            continue
        key = (group, host_name, port)
        entry = found.get(key)
        if entry is None:
            entry = found[key] = (Stat(), set(), decision.reason, decision.policy, decision.rule)
        entry[0].add(stat.last, stat.count)
        entry[1].add(client)
    out = [
        Breakage(g, h, p, s.count, s.last, len(c), reason, policy, rule)
        for (g, h, p), (s, c, reason, policy, rule) in found.items()
    ]
    out.sort(key=lambda b: (b.group, -b.count, b.host, b.port))
    return out


def deny_patterns(policies: Iterable[Policy]) -> list[str]:
    """A representative name for each deny host rule (``*`` read as one label ``x``)."""
    out = []
    for policy in policies:
        for rule in policy.deny:
            if isinstance(rule.host, HostPattern):
                out.append(rule.host.text.replace("*", "x"))
    return out


# --- the suggestion ----------------------------------------------------------------------------


@dataclass(slots=True)
class Suggested:
    host: str  # a name, "*.parent", or an IP literal
    ports: set[int]
    count: int
    last: float
    note: str = ""


def _covered(name: str, parent: str) -> bool:
    return name.endswith("." + parent)


def build_rules(
    destinations: Mapping[tuple[str, int], Stat],
    *,
    ips: Mapping[str, Host],
    refused: Iterable[str],
    threshold: int,
    suffixes: Suffixes,
) -> list[Suggested]:
    """Allow rules for one group's destinations: wildcards where safe, exact names else."""
    by_host: dict[str, Suggested] = {}
    for (host, port), stat in destinations.items():
        rule = by_host.setdefault(host, Suggested(host, set(), 0, 0.0))
        rule.ports.add(port)
        rule.count += stat.count
        rule.last = max(rule.last, stat.last)
    refused = sorted(set(refused))
    by_parent: dict[str, list[str]] = {}
    for host in by_host:
        if host in ips or host.count(".") < 2:
            continue
        by_parent.setdefault(host.split(".", 1)[1], []).append(host)
    rules: list[Suggested] = []
    merged: set[str] = set()
    for parent, names in sorted(by_parent.items()):
        if len(names) < threshold:
            continue
        if not suffixes.wildcard_allowed(parent):
            note = f"not *.{parent}: a public suffix or above one"
            for name in names:
                by_host[name].note = note
            continue
        blocking = [r for r in refused if _covered(r, parent)]
        if blocking:
            more = f" (+{len(blocking) - 1} more)" if len(blocking) > 1 else ""
            note = f"not *.{parent}: it would cover refused {blocking[0]}{more}"
            for name in names:
                by_host[name].note = note
            continue
        rule = Suggested(f"*.{parent}", set(), 0, 0.0, f"{len(names)} names")
        for name in names:
            part = by_host[name]
            rule.ports |= part.ports
            rule.count += part.count
            rule.last = max(rule.last, part.last)
            merged.add(name)
        rules.append(rule)
    rules.extend(r for h, r in by_host.items() if h not in merged)
    rules.sort(key=lambda r: (-r.count, r.host))
    return rules


def _policy_name(base: str, group: Group) -> str:
    if group.kind != "range":
        return base
    slug = "-".join(part for part in re.split(r"[.:/]+", group.value) if part)
    return f"{base}-{slug}"[:253].rstrip("-")


def _requests(n: int) -> str:
    return f"{n} request" + ("" if n == 1 else "s")


def render_policy(
    group: Group, rules: list[Suggested], *, name: str, namespace: str, ips: Mapping[str, Host]
) -> list[str]:
    """One policy document (YAML lines) allowing ``rules`` for ``group``: an EgressPolicy
    for a namespace's pods (or ``namespace``'s, for everyone), a ClusterEgressPolicy with
    ``sources.cidrs`` for a client range (only a cluster policy selects by address)."""
    if group.kind == "range":
        out = [
            "apiVersion: tidegate.io/v1alpha1",
            "kind: ClusterEgressPolicy",
            "metadata:",
            f"  name: {_policy_name(name, group)}",
            "spec:",
            "  mode: Enforce",
            "  sources:",
            f'    cidrs: ["{group.value}"]',
        ]
    else:
        out = [
            "apiVersion: tidegate.io/v1alpha1",
            "kind: EgressPolicy",
            "metadata:",
            f"  name: {_policy_name(name, group)}",
            f"  namespace: {group.value if group.kind == 'namespace' else namespace}",
            "spec:",
            "  mode: Enforce",
        ]
    if not rules:
        out.append("  allow: []")
        return out
    out.append("  allow:")
    for rule in rules:
        comment = f"{_requests(rule.count)}, last seen {rfc3339(rule.last) if rule.last else '?'}"
        if rule.note:
            comment += f"; {rule.note}"
        ip = ips.get(rule.host)
        if ip is not None and ip.ip is not None:
            bits = 32 if ip.ip.version == 4 else 128
            out.append(f'    - cidr: "{rule.host}/{bits}"  # {comment}')
        else:
            out.append(f'    - host: "{rule.host}"  # {comment}')
        out.append(f"      ports: [{', '.join(str(p) for p in sorted(rule.ports))}]")
    return out


def suggest_policy(
    lines: Iterable[str],
    *,
    name: str = "suggested",
    namespace: str = "default",
    threshold: int = DEFAULT_THRESHOLD,
    group_by: GroupBy = "auto",
    prefix_v4: int = DEFAULT_PREFIX_V4,
    prefix_v6: int = DEFAULT_PREFIX_V6,
    against: Bundle | None = None,
    suffixes: Suffixes | None = None,
) -> str:
    """The YAML text (see the module docstring). Kept for callers that want one string."""
    seen = observe(lines, group_by=group_by, prefix_v4=prefix_v4, prefix_v6=prefix_v6)
    return render(
        seen,
        name=name,
        namespace=namespace,
        threshold=threshold,
        against=against,
        suffixes=suffixes,
    )[0]


def render(
    seen: Observed,
    *,
    name: str,
    namespace: str,
    threshold: int,
    against: Bundle | None = None,
    identities: IdentityTable | None = None,
    suffixes: Suffixes | None = None,
) -> tuple[str, list[Breakage]]:
    """(YAML text, what enforcing ``against`` would break; empty without ``against``)."""
    suffixes = suffixes or default_suffixes()
    refused = set(seen.refused_names)
    breakage: list[Breakage] = []
    wanted: dict[Group, dict[tuple[str, int], Stat]] = {}
    if against is None:
        for (group, _client, host, port), stat in seen.let_through.items():
            if (group, host, port) in seen.refused_by_rule:
                continue
            wanted.setdefault(group, {}).setdefault((host, port), Stat()).add(stat.last, stat.count)
    else:
        refused.update(deny_patterns(against.policies))
        breakage = would_break(seen, enforced(against), identities=identities)
        for b in breakage:
            if (
                b.reason != REASON_RULE_DENY
                and (b.group, b.host, b.port) not in seen.refused_by_rule
            ):
                wanted.setdefault(b.group, {})[(b.host, b.port)] = Stat(b.count, b.last)
    out = ["# Suggested by `tidegate suggest` from access logs. Review before enforcing."]
    out.append(
        f"# {seen.used} access lines read ({seen.lines} lines); only allowed and would-deny "
        "requests become rules, never what a deny rule refused."
    )
    if against is not None:
        out += _breakage_comment(breakage)
    for group in sorted(wanted):
        rules = build_rules(
            wanted[group], ips=seen.ips, refused=refused, threshold=threshold, suffixes=suffixes
        )
        out.append("---")
        out.append(f"# for {group.label}")
        refused_here = sorted(
            (h, p, s) for (g, h, p), s in seen.refused_by_rule.items() if g == group
        )
        for host, port, stat in refused_here:
            out.append(
                f"# not allowed: {host}:{port} was refused by a deny rule ({_requests(stat.count)})"
            )
        out += render_policy(group, rules, name=name, namespace=namespace, ips=seen.ips)
    return "\n".join(out) + "\n", breakage


def _breakage_comment(breakage: list[Breakage]) -> list[str]:
    if not breakage:
        return ["# Enforcing the current policies would deny nothing seen in these logs."]
    out = [f"# Enforcing the current policies would deny {len(breakage)} destinations seen:"]
    for b in breakage:
        where = f" by {b.policy} {b.rule}" if b.policy else ""
        last = rfc3339(b.last) if b.last else "?"
        out.append(
            f"#   {b.host}:{b.port} for {b.group.label}: {_requests(b.count)}, last {last}, "
            f"{b.reason}{where}"
        )
    out.append(
        "# The policies below allow the rest of that difference (not what a deny rule refused)."
    )
    return out


def recent(breakage: Iterable[Breakage], *, since_hours: float, now: float) -> list[Breakage]:
    """The breakage seen within the last ``since_hours`` (lines without a time count)."""
    cutoff = now - since_hours * 3600
    return [b for b in breakage if not b.last or b.last >= cutoff]


__all__ = [
    "Breakage",
    "Observed",
    "observe",
    "read_log_lines",
    "recent",
    "render",
    "suggest_policy",
    "would_break",
]
