"""Refusals people can read (issue 7 item 3): the reason is in the status line, so real
clients show it in their own error message - requests, httpx, curl - and it is bounded and
never echoes request input."""

from __future__ import annotations

import subprocess

import httpx
import pytest
import requests
from fixtures_net import GatewayProcess, Net, connect, send_raw

from tidegate.gateway.connection import MAX_PHRASE, status_line

EXPECTED = "403 Forbidden by tidegate: deny_rule (t/main deny[0])"


def test_requests_shows_the_reason_for_https(shared_gateway: GatewayProcess, net: Net) -> None:
    with requests.Session() as session, pytest.raises(requests.exceptions.ProxyError) as info:
        session.trust_env = False
        session.get(
            net.https_url("denied.test"),
            proxies={"https": shared_gateway.proxy_url},
            verify=str(net.ca_file),
            timeout=10,
        )
    assert EXPECTED in str(info.value)


def test_requests_shows_the_reason_for_plain_http(shared_gateway: GatewayProcess) -> None:
    with requests.Session() as session:
        session.trust_env = False
        resp = session.get(
            "http://denied.test/", proxies={"http": shared_gateway.proxy_url}, timeout=10
        )
        with pytest.raises(requests.HTTPError) as info:
            resp.raise_for_status()
    assert "403 Client Error: Forbidden by tidegate: deny_rule (t/main deny[0])" in str(info.value)


def test_httpx_shows_the_reason(shared_gateway: GatewayProcess, net: Net) -> None:
    with httpx.Client(
        proxy=shared_gateway.proxy_url, verify=net.ssl_context(), trust_env=False
    ) as client:
        with pytest.raises(httpx.ProxyError) as info:
            client.get(net.https_url("denied.test"), timeout=10)
        assert EXPECTED in str(info.value)
        resp = client.get("http://denied.test/", timeout=10)
        assert resp.reason_phrase == "Forbidden by tidegate: deny_rule (t/main deny[0])"


def test_curl_shows_the_reason(shared_gateway: GatewayProcess, net: Net) -> None:
    result = subprocess.run(
        [
            *("curl", "-sS", "-v", "--max-time", "10", "--noproxy", ""),
            *("-x", shared_gateway.proxy_url, "https://denied.test/"),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode != 0
    assert f"< HTTP/1.1 {EXPECTED}" in result.stderr, result.stderr


def test_the_phrase_never_echoes_request_input(shared_gateway: GatewayProcess) -> None:
    hostile = "evil\u202e.test"  # a host the client chose, with a bidi override
    reply = send_raw(shared_gateway, f"CONNECT {hostile}:443 HTTP/1.1\r\n\r\n".encode())
    assert reply.status == 400
    assert reply.reason_phrase == "Bad Request by tidegate: bad_request"
    reply = connect(shared_gateway, "nosuchname-" + "x" * 40 + ".test:443")
    assert "nosuchname" not in reply.reason_phrase


def test_status_line_is_printable_and_bounded() -> None:
    line = status_line(403, "deny_rule", "ns/" + "p" * 300, "deny[0]")
    assert len(line) <= len("HTTP/1.1 403 ") + MAX_PHRASE
    line = status_line(403, "deny_rule", "ns/caf\xe9\r\nX-Injected: 1", "deny[0]")
    assert "\r" not in line and "\n" not in line and "\xe9" not in line
    assert line.startswith("HTTP/1.1 403 Forbidden by tidegate: deny_rule (ns/caf?")
    assert status_line(502, "dns_error", "t/main", "allow[0]") == (
        "HTTP/1.1 502 Bad Gateway by tidegate: dns_error"
    )
