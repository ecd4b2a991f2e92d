"""spec.service.proxyProtocol: validation, the gateway's flags and the Service annotations."""

from __future__ import annotations

import argparse
import ipaddress
from typing import Any

import pytest

from tidegate.gateway import cli
from tidegate.gateway.documents import PolicyError, parse_gateway
from tidegate.gateway.model import Gateway
from tidegate.operator.render import Names, render_deployment, render_service

NAMES = Names("edge", "tidegate-system")
AWS = "service.beta.kubernetes.io/aws-load-balancer-"


def gw(service: dict[str, Any] | None = None) -> Gateway:
    spec = {} if service is None else {"service": service}
    return parse_gateway(
        {"metadata": {"name": "edge", "namespace": "tidegate-system"}, "spec": spec}
    )


def command(gateway: Gateway) -> list[str]:
    dep = render_deployment(gateway, NAMES)
    return list(dep["spec"]["template"]["spec"]["containers"][0]["command"])


def test_off_by_default() -> None:
    gateway = gw()
    assert gateway.proxy_protocol_from is None
    assert not any(a.startswith("--proxy-protocol") for a in command(gateway))
    ann = render_service(gateway, NAMES)["metadata"].get("annotations") or {}
    assert f"{AWS}proxy-protocol" not in ann


def test_on_renders_flags_and_annotations() -> None:
    gateway = gw({"proxyProtocol": {"trustedCIDRs": ["10.0.64.0/24", "10.0.65.17/32", "fd00::/8"]}})
    assert gateway.proxy_protocol_from == (
        ipaddress.ip_network("10.0.64.0/24"),
        ipaddress.ip_network("10.0.65.17/32"),
        ipaddress.ip_network("fd00::/8"),
    )
    args = command(gateway)
    assert args[:2] == ["tidegate", "gateway"]
    i = args.index("--proxy-protocol")
    assert args[i + 1 : i + 5] == [
        "--proxy-protocol-from",
        "10.0.64.0/24",
        "10.0.65.17/32",
        "fd00::/8",
    ]
    ann = render_service(gateway, NAMES)["metadata"]["annotations"]
    assert ann[f"{AWS}proxy-protocol"] == "*"
    attrs = ann[f"{AWS}target-group-attributes"].split(",")
    assert "preserve_client_ip.enabled=false" in attrs
    assert "preserve_client_ip.enabled=true" not in attrs


def test_user_target_group_attributes_are_kept_but_preservation_is_off() -> None:
    gateway = gw(
        {
            "proxyProtocol": {"trustedCIDRs": ["10.0.64.0/24"]},
            "annotations": {
                f"{AWS}target-group-attributes": (
                    "deregistration_delay.timeout_seconds=30, preserve_client_ip.enabled=true"
                )
            },
        }
    )
    ann = render_service(gateway, NAMES)["metadata"]["annotations"]
    attrs = ann[f"{AWS}target-group-attributes"].split(",")
    assert attrs == ["deregistration_delay.timeout_seconds=30", "preserve_client_ip.enabled=false"]


def test_no_aws_annotation_without_a_load_balancer() -> None:
    gateway = gw({"type": "ClusterIP", "proxyProtocol": {"trustedCIDRs": ["10.0.64.0/24"]}})
    assert "--proxy-protocol" in command(gateway)  # e.g. another balancer in front
    ann = render_service(gateway, NAMES)["metadata"].get("annotations") or {}
    assert f"{AWS}proxy-protocol" not in ann


@pytest.mark.parametrize(
    ("proxy_protocol", "fragment"),
    [
        ({}, "at least one CIDR"),
        ({"trustedCIDRs": []}, "at least one CIDR"),
        ({"trustedCIDRs": ["10.0.64.1/24"]}, "invalid CIDR"),
        ({"trustedCIDRs": ["not-a-cidr"]}, "invalid CIDR"),
        ({"trustedCIDRs": ["10.0.0.0/8"], "enabled": True}, "unknown field(s) enabled"),
        (True, "must be a mapping"),
    ],
)
def test_invalid_settings_are_located(proxy_protocol: object, fragment: str) -> None:
    with pytest.raises(PolicyError) as info:
        gw({"proxyProtocol": proxy_protocol})
    assert "spec.service.proxyProtocol" in str(info.value)
    assert fragment in str(info.value)


def test_the_rendered_command_parses_with_the_gateways_own_cli() -> None:
    """The operator's flags are the gateway's flags: parse the rendered command with the
    real argument parser (the same one `tidegate gateway` runs)."""
    parser = argparse.ArgumentParser(prog="tidegate")
    cli.add_gateway_parser(parser.add_subparsers(dest="command", required=True))
    trusted = ["10.0.64.0/24", "fd00::/8"]
    args = parser.parse_args(command(gw({"proxyProtocol": {"trustedCIDRs": trusted}}))[1:])
    assert args.proxy_protocol is True
    assert [str(n) for n in args.proxy_protocol_from] == trusted
    assert args.listen == ("0.0.0.0", 3128)
    off = parser.parse_args(command(gw())[1:])
    assert off.proxy_protocol is False and off.proxy_protocol_from is None
