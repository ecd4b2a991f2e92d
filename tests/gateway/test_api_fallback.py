"""In-cluster mode without an API server: the mounted bundle file serves, and keeps serving.

The gateway is started as its pod is (``--bundle`` + ``--configmap``) but with a kubeconfig
that points at a closed loopback port, as when the API server is down. It must load the
file, report ready, enforce the file's policy, pick up a kubelet-style ``..data`` swap of
the file, and log that the watch is failing - never crash or go unready.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tidegate.gateway.bundle import compile_bundle
from tidegate.gateway.documents import parse_gateway, parse_policy

TIDEGATE = Path(sys.executable).parent / "tidegate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bundle(hosts: list[str], generation: int) -> bytes:
    gateway = parse_gateway({"metadata": {"name": "g"}, "spec": {"clientCIDRs": ["127.0.0.0/8"]}})
    policy = parse_policy(
        {
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {"allow": [{"host": h} for h in hosts]},
        }
    )
    return compile_bundle(gateway=gateway, policies=[policy], generation=generation)


def status_of(port: int, target: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=3) as sock:
        sock.sendall(f"CONNECT {target} HTTP/1.1\r\n\r\n".encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_mounted_bundle_serves_while_the_api_is_unreachable(tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    first = mount / "..2026_11_25_1"
    first.mkdir()
    (first / "bundle.json").write_bytes(bundle(["one.example"], 1))
    os.symlink(first.name, mount / "..data")
    os.symlink("..data/bundle.json", mount / "bundle.json")
    dead = free_port()  # nothing listens here: the "API server" is down
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "k", "cluster": {"server": f"https://127.0.0.1:{dead}"}}],
                "users": [{"name": "u", "user": {"token": "x"}}],
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
            }
        )
    )
    port, metrics = free_port(), free_port()
    log = tmp_path / "gw.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(TIDEGATE),
                "gateway",
                "--bundle",
                str(mount / "bundle.json"),
                "--configmap",
                "ns/g-bundle",
                "--kubeconfig",
                str(kubeconfig),
                "--listen",
                f"127.0.0.1:{port}",
                "--metrics-listen",
                f"127.0.0.1:{metrics}",
                "--reload-interval",
                "0.2",
                "--access-log",
                "off",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/readyz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
        # "one.example" is allowed; it would be dialled, which we must not do: use a port
        # the policy does not allow to see the policy answer without any dial.
        assert status_of(port, "two.example:443") == 403
        # kubelet-style atomic swap of ..data
        second = mount / "..2026_11_25_2"
        second.mkdir()
        (second / "bundle.json").write_bytes(bundle(["one.example", "two.example"], 2))
        os.symlink(second.name, mount / "..data_tmp")
        os.replace(mount / "..data_tmp", mount / "..data")
        deadline = time.monotonic() + 10
        while (
            "tidegate_bundle_generation 2.0"
            not in urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2)
            .read()
            .decode()
        ):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        assert proc.poll() is None
        text = log.read_text()
        assert "watching configmap ns/g-bundle failed" in text
        assert "the last good bundle stays in force" in text
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
