"""Real tools through the gateway: pip downloading from a package index and git cloning a
repository, each over plain HTTP (absolute-form requests) and HTTPS (CONNECT), from a small
static file server on the session's upstream address (loopback). curl, requests and httpx
are in ``test_proxy_policy.py`` and ``test_refusal_text.py``.

The index is a PEP 503 "simple" tree with one hand-built wheel; the repository is served
by git's "dumb" HTTP protocol (static files after ``git update-server-info``), so no CGI
and no network beyond loopback.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import ssl
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fixtures_net import GatewayFactory, GatewayProcess, Net, policy_doc

NAME = "pkgs.test"
WHEEL = "tgprobe-1.0-py3-none-any.whl"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class Origin:
    root: Path
    http_port: int
    https_port: int

    def url(self, scheme: str, path: str) -> str:
        port = self.http_port if scheme == "http" else self.https_port
        return f"{scheme}://{NAME}:{port}{path}"


def _wheel(path: Path) -> None:
    dist = "tgprobe-1.0.dist-info"
    files = {
        "tgprobe/__init__.py": "VALUE = 1\n",
        f"{dist}/METADATA": "Metadata-Version: 2.1\nName: tgprobe\nVersion: 1.0\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{dist}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
        archive.writestr(f"{dist}/RECORD", record)


def _git(*args: str, cwd: Path) -> None:
    env = {"HOME": str(cwd), "PATH": os.environ["PATH"], "GIT_CONFIG_NOSYSTEM": "1"}
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def _build_tree(root: Path) -> None:
    files = root / "files"
    files.mkdir(parents=True)
    _wheel(files / WHEEL)
    digest = hashlib.sha256((files / WHEEL).read_bytes()).hexdigest()
    project = root / "simple" / "tgprobe"
    project.mkdir(parents=True)
    (root / "simple" / "index.html").write_text('<a href="tgprobe/">tgprobe</a>\n')
    (project / "index.html").write_text(
        f'<a href="../../files/{WHEEL}#sha256={digest}">{WHEEL}</a>\n'
    )
    work = root.parent / "work"
    work.mkdir()
    _git("init", "-q", "-b", "main", cwd=work)
    (work / "README").write_text("through the gateway\n")
    _git("add", "README", cwd=work)
    _git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "one", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(root / "repo.git"), cwd=root)
    _git("update-server-info", cwd=root / "repo.git")


@pytest.fixture(scope="module")
def origin(net: Net, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Origin]:
    root = tmp_path_factory.mktemp("origin") / "www"
    _build_tree(root)
    handler = functools.partial(_Quiet, directory=str(root))
    plain = http.server.ThreadingHTTPServer((net.up, 0), handler)
    secure = http.server.ThreadingHTTPServer((net.up, 0), handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    net.ca.issue_cert(NAME).configure_cert(context)
    secure.socket = context.wrap_socket(secure.socket, server_side=True)
    for server in (plain, secure):
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}).start()
    net.dns.set(NAME, [(net.up, 60)])
    try:
        yield Origin(root, plain.server_address[1], secure.server_address[1])
    finally:
        for server in (plain, secure):
            server.shutdown()
            server.server_close()


@pytest.fixture
def gateway(gateway_factory: GatewayFactory, origin: Origin) -> GatewayProcess:
    ports = [origin.http_port, origin.https_port]
    return gateway_factory([policy_doc("tools", allow=[{"host": NAME, "ports": ports}])])


def _env(home: Path) -> dict[str, str]:
    """No proxy variables and no user or system configuration: only the flags count."""
    keep = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    keep = {k: v for k, v in keep.items() if not k.startswith(("PIP_", "GIT_"))}
    # CA variables (REQUESTS_CA_BUNDLE, SSL_CERT_FILE, ...) would override --cert
    keep = {k: v for k, v in keep.items() if "CA_" not in k and "SSL_CERT" not in k}
    return {
        **keep,
        "HOME": str(home),
        "PIP_CONFIG_FILE": os.devnull,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_TERMINAL_PROMPT": "0",
    }


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_pip_downloads_through_the_gateway(
    gateway: GatewayProcess, origin: Origin, net: Net, tmp_path: Path, scheme: str
) -> None:
    command = [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir"),
        *("--disable-pip-version-check", "--retries", "0", "--timeout", "20"),
        *("-d", str(tmp_path / "out"), "--index-url", origin.url(scheme, "/simple/")),
        *("--proxy", gateway.proxy_url, "--cert", str(net.ca_file)),
        *(("--trusted-host", NAME) if scheme == "http" else ()),
        "tgprobe==1.0",
    ]
    result = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "out" / WHEEL).read_bytes() == (origin.root / "files" / WHEEL).read_bytes()
    line = gateway.wait_log(lambda r: r.get("host") == NAME and r.get("status") == 200)
    assert line["method"] == ("GET" if scheme == "http" else "CONNECT")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_git_clones_through_the_gateway(
    gateway: GatewayProcess, origin: Origin, net: Net, tmp_path: Path, scheme: str
) -> None:
    command = [
        *("git", "-c", f"http.proxy={gateway.proxy_url}", "-c", f"http.sslCAInfo={net.ca_file}"),
        *("clone", "-q", origin.url(scheme, "/repo.git"), str(tmp_path / "clone")),
    ]
    result = subprocess.run(
        command, env=_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "clone" / "README").read_text() == "through the gateway\n"


def test_pip_shows_the_refusal(
    gateway_factory: GatewayFactory, origin: Origin, net: Net, tmp_path: Path
) -> None:
    """A policy without the index: pip's log names the gateway's reason (pip reports a
    failed index page at debug level, hence -vv)."""
    gw = gateway_factory([policy_doc("none", allow=[{"host": "other.test"}])])
    command = [
        *(sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir"),
        *("--disable-pip-version-check", "--retries", "0", "--timeout", "20"),
        *("-d", str(tmp_path / "out"), "--index-url", origin.url("https", "/simple/")),
        *("--proxy", gw.proxy_url, "--cert", str(net.ca_file), "-vv", "tgprobe==1.0"),
    ]
    result = subprocess.run(command, env=_env(tmp_path), capture_output=True, text=True)
    assert result.returncode != 0
    assert "403 Forbidden by tidegate: no_rule_matched" in result.stdout + result.stderr
