"""Command line of the data plane: ``gateway``, ``check`` and ``suggest``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import sys
from pathlib import Path

from .addresses import IPAddress, IPNetwork, parse_network
from .bundle import Bundle, load_bundle
from .documents import PolicyError
from .engine import Engine
from .hosts import HostError, normalize_host, split_host_port
from .identity import ClientIdentity, IdentityTable, build_table, pod_identity
from .logshape import configure_logging
from .selectors import SelectorError, parse_labels
from .server import GatewayOptions, run_gateway
from .settings import Limits
from .sources import bundle_from_documents, read_identity_files, read_policy_dir


def listen_address(text: str) -> tuple[str, int]:
    """argparse type for ``HOST:PORT`` / ``[v6]:PORT`` listen flags (the operator uses it too)."""
    try:
        host, port = split_host_port(text)
    except HostError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return host.strip("[]"), port


def _network(text: str) -> IPNetwork:
    try:
        return parse_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _namespaced(text: str) -> tuple[str, str]:
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        raise argparse.ArgumentTypeError("expected NAMESPACE/NAME")
    return namespace, name


def add_gateway_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gateway", help="run the proxy")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--policies", type=Path, help="folder of EgressPolicy/EgressGateway YAML")
    src.add_argument("--bundle", type=Path, help="compiled bundle file (mounted ConfigMap)")
    p.add_argument(
        "--configmap", type=_namespaced, help="NAMESPACE/NAME: watch the bundle via the API too"
    )
    p.add_argument(
        "--identities",
        type=Path,
        help="ClientIdentities file or folder (default with --policies: that folder)",
    )
    p.add_argument(
        "--identities-configmap",
        type=_namespaced,
        help="NAMESPACE/NAME: watch the client identities index ConfigMap and its shards",
    )
    p.add_argument(
        "--kubeconfig",
        type=Path,
        help="with --configmap / --identities-configmap: API access (default: in-cluster)",
    )
    p.add_argument(
        "--listen",
        type=listen_address,
        default=("0.0.0.0", 3128),
        help="HOST:PORT of the proxy (default 0.0.0.0:3128)",
    )
    p.add_argument(
        "--metrics-listen",
        type=listen_address,
        default=("0.0.0.0", 9090),
        help="HOST:PORT of /metrics, /healthz, /readyz (default 0.0.0.0:9090)",
    )
    p.add_argument("--no-metrics", action="store_true", help="do not open the admin port")
    p.add_argument("--reload-interval", type=float, default=1.0, help="seconds between checks")
    p.add_argument(
        "--access-log", default="-", help="file for JSON access lines; - stdout, 'off' to disable"
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning, error")
    pp = p.add_argument_group("PROXY protocol (client addresses through a load balancer)")
    pp.add_argument(
        "--proxy-protocol",
        action="store_true",
        help="connections from --proxy-protocol-from must start with a PROXY protocol v1/v2"
        " header; its client address is the one judged and logged",
    )
    pp.add_argument(
        "--proxy-protocol-from",
        type=_network,
        nargs="+",
        action="extend",
        metavar="CIDR",
        help="the load balancer's addresses or subnets (required with --proxy-protocol);"
        " other peers are direct clients judged by their own address",
    )
    limits = p.add_argument_group("limits and timeouts")
    for spec in dataclasses.fields(Limits):
        limits.add_argument(
            "--" + spec.name.replace("_", "-"),
            type=type(spec.default),
            default=spec.default,
            metavar="N",
            help=f"{spec.metadata['help']} (default {spec.default})",
        )


def run_gateway_command(args: argparse.Namespace) -> int:
    configure_logging(args.log_level)
    if args.policies is None and args.bundle is None and args.configmap is None:
        print("error: give --policies DIR, --bundle FILE or --configmap NS/NAME", file=sys.stderr)
        return 2
    if args.proxy_protocol != bool(args.proxy_protocol_from):
        print(
            "error: --proxy-protocol and --proxy-protocol-from CIDR... go together: the ranges"
            " say which peers (the load balancer) may name a client address",
            file=sys.stderr,
        )
        return 2
    limits = Limits(**{name: getattr(args, name) for name in Limits.__dataclass_fields__})
    if args.access_log == "off":
        stream = None
    elif args.access_log == "-":
        stream = sys.stdout
    else:
        stream = open(args.access_log, "a", encoding="utf-8")
    options = GatewayOptions(
        listen=args.listen,
        metrics_listen=None if args.no_metrics else args.metrics_listen,
        policies=args.policies,
        bundle=args.bundle,
        configmap=args.configmap,
        identities=args.identities,
        identities_configmap=args.identities_configmap,
        kubeconfig=args.kubeconfig,
        reload_interval=args.reload_interval,
        limits=limits,
        access_log=stream,
        proxy_protocol_from=tuple(args.proxy_protocol_from) if args.proxy_protocol else None,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run_gateway(options))
    return uvloop.run(run_gateway(options))


def add_check_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "check",
        help="explain the decision for one request",
        description=(
            "Who asks: --client IP (looked up in the identities, else judged by address "
            "only), --pod NAMESPACE/NAME (a pod listed in the identities), or --namespace NS "
            "[--labels k=v,...] (any pod of that namespace with those labels)."
        ),
    )
    p.add_argument("--policies", type=Path, required=True)
    p.add_argument("--client", help="client IP address")
    p.add_argument("--pod", type=_namespaced, help="NAMESPACE/NAME of a pod in the identities")
    p.add_argument("--namespace", help="the client pod's namespace (with --labels)")
    p.add_argument("--labels", default="", help="the client pod's labels: k=v,k2=v2")
    p.add_argument(
        "--identities",
        type=Path,
        help="ClientIdentities file or folder (default: the --policies folder)",
    )
    p.add_argument("target", help="HOST:PORT")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")


def _check_identities(args: argparse.Namespace) -> IdentityTable:
    return build_table(read_identity_files(args.identities or args.policies))


def _check_client(
    args: argparse.Namespace, table: IdentityTable
) -> tuple[IPAddress | None, ClientIdentity | None]:
    """The client address and identity ``tidegate check`` judges; ValueError if unusable."""
    chosen = [f for f in ("client", "pod", "namespace") if getattr(args, f)]
    if args.pod and args.namespace:
        raise ValueError("give --pod or --namespace, not both")
    if not chosen:
        raise ValueError("give --client IP, --pod NAMESPACE/NAME or --namespace NS")
    if args.labels and not args.namespace:
        raise ValueError("--labels goes with --namespace")
    client = ipaddress.ip_address(args.client) if args.client else None
    if args.pod:
        namespace, name = args.pod
        found = table.find_pod(namespace, name)
        if found is None:
            raise ValueError(
                f"pod {namespace}/{name} is not in the identities; "
                "give --namespace NS --labels k=v instead"
            )
        if client is not None and table.lookup(client) != found[1]:
            raise ValueError(f"{client} is not an address of pod {namespace}/{name}")
        return client or found[0], found[1]
    if args.namespace:
        labels = parse_labels(args.labels)
        namespace_labels = table.namespaces.get(args.namespace, {})
        return client, pod_identity(args.namespace, "", labels, namespace_labels)
    assert client is not None
    return client, table.lookup(client)


def run_check_command(args: argparse.Namespace) -> int:
    try:
        docs = read_policy_dir(args.policies)
        bundle = bundle_from_documents(docs, generation=1)
        table = _check_identities(args)
        client, identity = _check_client(args, table)
        host_text, port = split_host_port(args.target)
        host = normalize_host(host_text)
    except (PolicyError, HostError, SelectorError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(bundle.gateway, bundle.policies)
    decision = engine.decide(client, host, port, identity)
    if identity is not None and identity.kind == "pod":
        who = f"pod {identity.namespace}/{identity.name or '*'}"
        if identity.labels:
            who += " {" + ",".join(f"{k}={v}" for k, v in sorted(identity.labels.items())) + "}"
        kind = "pod"
    else:
        kind = engine.client_kind(client, identity) if client is not None else "unknown_client"
        who = str(client)
    if client is not None and identity is not None and identity.kind == "pod":
        who += f" at {client}"
    governing = engine.governing_keys(client, identity)
    if args.json:
        print(
            json.dumps(
                {
                    "decision": decision.verdict,
                    "reason": decision.reason,
                    "message": decision.message,
                    "policy": decision.policy,
                    "rule": decision.rule,
                    "host": host.name,
                    "port": port,
                    "client": str(client) if client is not None else None,
                    "identity": kind,
                    "client_namespace": identity.namespace if identity else None,
                    "client_pod": (identity.name or None) if identity else None,
                    "governing_policies": governing,
                }
            )
        )
    else:
        print(f"{decision.verdict.upper()} {host.name}:{port} from {who}")
        print(f"  reason: {decision.reason} - {decision.message}")
        if decision.policy:
            print(f"  policy: {decision.policy}  rule: {decision.rule}")
        print(f"  client: {kind}; governed by: {', '.join(governing) or 'no policy'}")
        if host.kind == "ip" and host.ip is not None and client is not None:
            blocked = engine.destination_blocked(host.ip, client, identity, port=port)
            if blocked:
                print(f"  note: the address is {blocked}; the SSRF guard refuses it")
    return 0 if decision.allowed else 1


def _hours(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of hours")
    return value


def _threshold(text: str) -> int:
    if not text.isdigit() or int(text) < 2:
        raise argparse.ArgumentTypeError("the wildcard threshold is a whole number, at least 2")
    return int(text)


def add_suggest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from .suggest import DEFAULT_PREFIX_V4, DEFAULT_PREFIX_V6, DEFAULT_SINCE_HOURS

    p = sub.add_parser(
        "suggest",
        help="turn access logs into EgressPolicy YAML; with --against, what enforcing breaks",
        description="Read JSON access logs (files, gzip files, or stdin) and print EgressPolicy "
        "YAML allowing what the gateway let through (allowed and would-deny requests; never "
        "denied ones, never what a deny rule refused). With --against, print what enforcing "
        "the current policies would deny, and rules for exactly that difference.",
    )
    p.add_argument(
        "logs", nargs="*", type=Path, help="log files, gzip or plain (default or -: stdin)"
    )
    p.add_argument("--name", default="suggested", help="policy name (default: suggested)")
    p.add_argument(
        "--namespace", default="default", help="namespace of per-range policies (default: default)"
    )
    p.add_argument(
        "--wildcard-threshold",
        type=_threshold,
        default=3,
        metavar="N",
        help="N or more sibling names under one parent become *.parent, where the Public "
        "Suffix List allows a wildcard (default 3)",
    )
    p.add_argument(
        "--group-by",
        choices=("auto", "namespace", "range", "none"),
        default="auto",
        help="one policy per client namespace (when the log carries it), per client range, or "
        "one for all (default auto: namespace if known, else range)",
    )
    p.add_argument(
        "--prefix-v4",
        type=int,
        default=DEFAULT_PREFIX_V4,
        metavar="BITS",
        help=f"client range size for IPv4 clients (default /{DEFAULT_PREFIX_V4})",
    )
    p.add_argument(
        "--prefix-v6",
        type=int,
        default=DEFAULT_PREFIX_V6,
        metavar="BITS",
        help=f"client range size for IPv6 clients (default /{DEFAULT_PREFIX_V6})",
    )
    p.add_argument(
        "--against",
        type=Path,
        metavar="DIR|BUNDLE",
        help="the current policies (a folder of YAML, or a bundle file such as the bundle "
        "ConfigMap's content): report what enforcing them would deny",
    )
    p.add_argument(
        "--identities",
        type=Path,
        metavar="PATH",
        help="with --against: ClientIdentities file or folder, so logged pods are judged with "
        "their labels (default: those in the --against folder; else by namespace only)",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="with --against: exit 1 when enforcing would break anything seen in the last "
        "--since hours",
    )
    p.add_argument(
        "--since",
        type=_hours,
        default=DEFAULT_SINCE_HOURS,
        metavar="HOURS",
        help=f"window of --check (default {DEFAULT_SINCE_HOURS:g})",
    )
    p.add_argument("--json", action="store_true", help="with --against: the breakage as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on a terminal")


def _load_against(path: Path) -> Bundle:
    if path.is_dir():
        return bundle_from_documents(read_policy_dir(path), generation=1)
    return load_bundle(path.read_bytes(), source=str(path))


def run_suggest_command(args: argparse.Namespace) -> int:
    import time

    from .suggest import observe, read_log_lines, recent, render

    if args.check and args.against is None:
        print("error: --check needs --against DIR|BUNDLE", file=sys.stderr)
        return 2
    if not (0 <= args.prefix_v4 <= 32 and 0 <= args.prefix_v6 <= 128):
        print("error: --prefix-v4 is 0..32 and --prefix-v6 is 0..128", file=sys.stderr)
        return 2
    try:
        against = _load_against(args.against) if args.against is not None else None
        identities = None
        if against is not None and (args.identities or args.against.is_dir()):
            identities = build_table(read_identity_files(args.identities or args.against))
        progress = None if args.no_progress or not sys.stderr.isatty() else sys.stderr
        lines = read_log_lines(args.logs or [None], progress=progress)
        seen = observe(
            lines, group_by=args.group_by, prefix_v4=args.prefix_v4, prefix_v6=args.prefix_v6
        )
    except (PolicyError, OSError, EOFError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    text, breakage = render(
        seen,
        name=args.name,
        namespace=args.namespace,
        threshold=args.wildcard_threshold,
        against=against,
        identities=identities,
    )
    fresh = recent(breakage, since_hours=args.since, now=time.time())
    if args.json and against is not None:
        print(
            json.dumps(
                {
                    "breakage": [b.to_json() for b in breakage],
                    "recent": len(fresh),
                    "sinceHours": args.since,
                },
                indent=2,
            )
        )
    else:
        sys.stdout.write(text)
    if args.check and fresh:
        print(
            f"enforcing would break {len(fresh)} destinations seen in the last {args.since:g}h",
            file=sys.stderr,
        )
        return 1
    return 0
