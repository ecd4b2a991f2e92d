"""Command line of the data plane: ``gateway``, ``check`` and ``suggest``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import sys
from pathlib import Path

from .documents import PolicyError
from .engine import Engine
from .hosts import HostError, normalize_host, split_host_port
from .server import GatewayOptions, run_gateway
from .settings import Limits
from .sources import bundle_from_documents, read_policy_dir


def listen_address(text: str) -> tuple[str, int]:
    """argparse type for ``HOST:PORT`` / ``[v6]:PORT`` listen flags (the operator uses it too)."""
    try:
        host, port = split_host_port(text)
    except HostError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return host.strip("[]"), port


def _namespaced(text: str) -> tuple[str, str]:
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name:
        raise argparse.ArgumentTypeError("expected NAMESPACE/NAME")
    return namespace, name


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def add_gateway_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("gateway", help="run the proxy")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--policies", type=Path, help="folder of EgressPolicy/EgressGateway YAML")
    src.add_argument("--bundle", type=Path, help="compiled bundle file (mounted ConfigMap)")
    p.add_argument(
        "--configmap", type=_namespaced, help="NAMESPACE/NAME: watch the bundle via the API too"
    )
    p.add_argument(
        "--kubeconfig", type=Path, help="with --configmap: API access (default: in-cluster)"
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
        kubeconfig=args.kubeconfig,
        reload_interval=args.reload_interval,
        limits=limits,
        access_log=stream,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(run_gateway(options))
    return uvloop.run(run_gateway(options))


def add_check_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("check", help="explain the decision for one request")
    p.add_argument("--policies", type=Path, required=True)
    p.add_argument("--client", required=True, help="client IP address")
    p.add_argument("target", help="HOST:PORT")
    p.add_argument("--json", action="store_true", help="print the decision as JSON")


def run_check_command(args: argparse.Namespace) -> int:
    try:
        docs = read_policy_dir(args.policies)
        bundle = bundle_from_documents(docs, generation=1)
        client = ipaddress.ip_address(args.client)
        host_text, port = split_host_port(args.target)
        host = normalize_host(host_text)
    except (PolicyError, HostError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = Engine(bundle.gateway, bundle.policies)
    decision = engine.decide(client, host, port)
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
                }
            )
        )
    else:
        print(f"{decision.verdict.upper()} {host.name}:{port} from {client}")
        print(f"  reason: {decision.reason} - {decision.message}")
        if decision.policy:
            print(f"  policy: {decision.policy}  rule: {decision.rule}")
        if host.kind == "ip" and host.ip is not None:
            blocked = engine.destination_blocked(host.ip, client)
            if blocked:
                print(f"  note: the address is {blocked}; the SSRF guard refuses it")
    return 0 if decision.allowed else 1


def add_suggest_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("suggest", help="turn access logs into an EgressPolicy")
    p.add_argument("logs", nargs="*", type=Path, help="log files (default: stdin)")
    p.add_argument("--name", default="suggested")
    p.add_argument("--namespace", default="default")
    p.add_argument(
        "--wildcard-threshold",
        type=int,
        default=3,
        help="this many sibling names under one parent become *.parent",
    )


def run_suggest_command(args: argparse.Namespace) -> int:
    from .suggest import read_log_lines, suggest_policy

    lines = read_log_lines(args.logs) if args.logs else sys.stdin
    sys.stdout.write(
        suggest_policy(
            lines, name=args.name, namespace=args.namespace, threshold=args.wildcard_threshold
        )
    )
    return 0
