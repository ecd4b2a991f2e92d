"""Tidegate's control plane: a kopf operator for EgressPolicy and EgressGateway.

It validates policies, compiles every policy bound to a gateway into one versioned bundle
in a ConfigMap (which the gateway pods hot-reload), renders each gateway's workload
(Deployment, Service, PodDisruptionBudget, HorizontalPodAutoscaler, ServiceAccount, RBAC)
and reports status and Events. ``tidegate operator --help`` lists its settings.

This folder is a namespace package on purpose (no ``__init__.py``): it is imported as
``tidegate.operator`` and must never shadow the standard library's ``operator``.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import re
import secrets
import sys
from collections.abc import Sequence

from tidegate.gateway.cli import listen_address
from tidegate.gateway.kubeaccess import KubeConfigError, load_access
from tidegate.gateway.logshape import use_shared_shape

from .render import DEFAULT_IMAGE


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return int(text)


# kopf logs one INFO line per handler run ("Handler 'x' succeeded.") and one per processed
# cause ("Update is processed: 2 succeeded; 0 failed."), i.e. for nearly every watch event.
_CHATTER = re.compile(
    r"Handler '[^']*' succeeded\.|[A-Z][a-z]+(?: [a-z]+)* is processed: \d+ succeeded; \d+ failed\."
)


class HandlerChatterFilter(logging.Filter):
    """Demote kopf's per-handler success lines to DEBUG (shown only with ``--verbose``).

    Attached to kopf's ``kopf.objects`` logger. Warnings and errors, kopf's other lines and
    the operator's own ``tidegate.operator`` logs pass untouched.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not _CHATTER.fullmatch(record.getMessage()):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


def quiet_kopf_chatter() -> None:
    """Install :class:`HandlerChatterFilter` once on kopf's per-object logger."""
    logger = logging.getLogger("kopf.objects")
    if not any(isinstance(f, HandlerChatterFilter) for f in logger.filters):
        logger.addFilter(HandlerChatterFilter())


def _cidr(text: str) -> str:
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a CIDR: {exc}") from None


def _domain(text: str) -> str:
    name = text.strip().strip(".")
    if not name or not re.fullmatch(r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?", name):
        raise argparse.ArgumentTypeError(f"{text!r} is not a DNS domain")
    return name


def _namespaced_name(text: str) -> str:
    namespace, sep, name = text.partition("/")
    if not sep or not namespace or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAMESPACE/NAME")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tidegate operator",
        description="Run the Tidegate operator (control plane) against a Kubernetes cluster.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        "-n",
        action="append",
        dest="namespaces",
        metavar="NS",
        help="watch only this namespace (repeatable; globs allowed)",
    )
    scope.add_argument(
        "--all-namespaces",
        "-A",
        action="store_true",
        help="watch every namespace (the default)",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument(
        "--peering",
        default="tidegate",
        metavar="NAME",
        help="kopf peering object shared by replicas, so only one is active (default: tidegate)",
    )
    peering.add_argument(
        "--standalone", action="store_true", help="no peering: assume this is the only replica"
    )
    parser.add_argument(
        "--priority",
        type=int,
        default=None,
        help="peering priority: replicas pause in favour of a live peer with a higher one. "
        "kopf freezes every replica when priorities are equal, so the default is a random "
        "number drawn at start-up: replicas of one Deployment never tie",
    )
    parser.add_argument(
        "--peering-lifetime",
        type=_positive_int,
        default=60,
        metavar="SECONDS",
        help="how long a replica counts as alive after its last keep-alive, i.e. how soon a "
        "standby takes over from a killed peer (default: 60)",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        metavar="URL",
        help="liveness endpoint (default: http://0.0.0.0:8080/healthz)",
    )
    parser.add_argument(
        "--metrics-listen",
        type=listen_address,
        default=("0.0.0.0", 9090),
        metavar="HOST:PORT",
        help="where to serve Prometheus /metrics (default: 0.0.0.0:9090)",
    )
    parser.add_argument(
        "--gateway-image",
        default=DEFAULT_IMAGE,
        help=f"gateway image when the EgressGateway sets none (default: {DEFAULT_IMAGE})",
    )
    parser.add_argument(
        "--default-gateway",
        type=_namespaced_name,
        default="tidegate-system/default",
        metavar="NS/NAME",
        help="gateway of policies without gatewayRef (default: tidegate-system/default)",
    )
    parser.add_argument(
        "--gateway-namespace",
        action="append",
        dest="gateway_namespaces",
        metavar="NS",
        help="a namespace where EgressGateways may live (repeatable; the operator's write "
        "permissions end there); a gateway elsewhere is reported NotAllowed. "
        "Default: any namespace",
    )
    parser.add_argument(
        "--cluster-domain",
        type=_domain,
        default="cluster.local",
        help="the cluster's DNS domain, for the proxy-env ConfigMap (default: cluster.local)",
    )
    parser.add_argument(
        "--service-cidr",
        action="append",
        type=_cidr,
        default=[],
        dest="service_cidrs",
        metavar="CIDR",
        help="the cluster's Service range, put in NO_PROXY (repeatable)",
    )
    parser.add_argument(
        "--pod-cidr",
        action="append",
        type=_cidr,
        default=[],
        dest="pod_cidrs",
        metavar="CIDR",
        help="the cluster's pod range, put in NO_PROXY (repeatable)",
    )
    parser.add_argument(
        "--default-gateway-spec",
        type=_namespaced_name,
        default=None,
        metavar="NS/CONFIGMAP",
        help="create and update the --default-gateway from this ConfigMap's spec.yaml, owned "
        "by the ConfigMap (the Helm chart's; default: none)",
    )
    parser.add_argument(
        "--kubeconfig",
        help="kubeconfig file(s), :-separated (default: $KUBECONFIG, else in-cluster, else "
        "~/.kube/config)",
    )
    parser.add_argument(
        "--resync-seconds",
        type=float,
        default=60.0,
        help="re-check every gateway this often, whatever happens (default: 60)",
    )
    parser.add_argument(
        "--audit-interval",
        type=_positive_int,
        default=60,
        metavar="SECONDS",
        help="gather each gateway's denied/would-deny record from its Ready pods into the "
        "policies' status.audit this often (default: 60)",
    )
    parser.add_argument(
        "--ready-to-enforce-after",
        type=_positive_int,
        default=24 * 3600,
        metavar="SECONDS",
        help="an Audit policy whose gateway pods saw no would-deny for this long gets the "
        "condition ReadyToEnforce=True and an Event (default: 86400, one day)",
    )
    parser.add_argument(
        "--verbose",
        "-v",
        action="store_true",
        help="debug logging, including kopf's per-handler 'succeeded' lines",
    )
    return parser


def _priority(given: int | None) -> int:
    """Peers of equal priority all freeze (kopf's rule), so draw one unless told."""
    if given is not None:
        return given
    return secrets.randbelow(1_000_000) + 1


def run(argv: Sequence[str]) -> int:
    """``tidegate operator ...``: parse arguments, then run kopf until signalled."""
    args = build_parser().parse_args(list(argv))
    try:
        import kopf
    except ImportError:
        print("tidegate operator needs kopf: pip install 'tidegate[operator]'", file=sys.stderr)
        return 2
    from prometheus_client import start_http_server

    from . import handlers  # registers the handlers with kopf
    from .proxyenv import ClusterNetwork
    from .reconcile import Settings

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON, log_refkey="object")
    use_shared_shape()  # the gateway's JSON shape, kopf's object reference kept as "object"
    quiet_kopf_chatter()
    settings = kopf.OperatorSettings()
    settings.peering.lifetime = args.peering_lifetime
    runtime = handlers.Runtime(
        kubeconfig=args.kubeconfig,
        settings=Settings(
            gateway_image=args.gateway_image,
            default_gateway=args.default_gateway,
            audit_interval_seconds=float(args.audit_interval),
            ready_to_enforce_after_seconds=float(args.ready_to_enforce_after),
            gateway_namespaces=(
                frozenset(args.gateway_namespaces) if args.gateway_namespaces else None
            ),
            network=ClusterNetwork.from_environment(
                domain=args.cluster_domain,
                service_cidrs=args.service_cidrs,
                pod_cidrs=args.pod_cidrs,
            ),
        ),
        resync_seconds=args.resync_seconds,
        default_gateway_spec=args.default_gateway_spec,
    )
    host, port = args.metrics_listen
    start_http_server(port, addr=host, registry=runtime.metrics.registry)
    logging.getLogger("tidegate.operator").info(
        "metrics on %s:%d, liveness on %s", host, port, args.liveness
    )
    namespaces: list[str] = args.namespaces or []

    async def operate() -> int:
        try:  # sign in before kopf starts, so a bad kubeconfig is one line and exit 2
            runtime.access = await load_access(args.kubeconfig)
        except KubeConfigError as exc:
            logging.getLogger("tidegate.operator").error("cannot sign in: %s", exc)
            return 2
        await kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=True if args.standalone else None,
            peering_name=None if args.standalone else args.peering,
            priority=_priority(args.priority),
            settings=settings,
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(runtime=runtime),
        )
        return 0

    try:
        return asyncio.run(operate())
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run(sys.argv[1:]))
