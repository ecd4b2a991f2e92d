"""Signing in to the real kube-apiserver through the shared credentials path.

``tidegate.gateway.kubeaccess`` is what the gateway's ConfigMap watch, the operator's writes
and kopf use. These tests run it against the real API server with the kubeconfigs adopters
have: an exec credential plugin whose tokens expire (as ``aws eks get-token``'s do), a
multi-path ``$KUBECONFIG``, inline ``*-data`` certificates, ``tls-server-name`` and
``proxy-url``. Tokens are real ServiceAccount tokens, each revocable on its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest
import yaml
from credhelpers import data_kubeconfig, exec_kubeconfig, exec_user
from fixtures_kube import ControlPlane

from tidegate.gateway.bundle import compile_bundle
from tidegate.gateway.documents import parse_gateway, parse_policy
from tidegate.gateway.kubeaccess import KubeAccess, KubeConfigError, load_access

pytestmark = pytest.mark.kube

TIDEGATE = Path(sys.executable).parent / "tidegate"


async def list_configmaps(access: KubeAccess, namespace: str) -> int:
    async with access.session() as session:
        url = f"{access.server}/api/v1/namespaces/{namespace}/configmaps"
        async with session.get(url) as resp:
            await resp.read()
            return resp.status


# --- exec credential plugins --------------------------------------------------------------


def test_exec_plugin_token_refreshed_before_expiry_and_after_a_401(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    ns = "cred-exec"
    user = exec_user(control_plane, tmp_path, namespace=ns, serviceaccount="laptop", count=4)
    kubeconfig = exec_kubeconfig(user, tmp_path / "exec.yaml", lifetime=6)

    async def scenario() -> None:
        access = await load_access(str(kubeconfig))
        assert user.runs() == 1
        assert access.default_namespace == ns
        assert await list_configmaps(access, ns) == 200
        assert user.runs() == 1  # cached while valid: not one plugin run per request

        # Revoked before it expires (a rotated key, a removed user): 401, then the plugin
        # runs again and the same request is retried with the new token.
        user.revoke(0)
        assert await list_configmaps(access, ns) == 200
        assert user.runs() == 2
        assert access.reloads == 1

        # Expiring: refreshed *before* the request, so no 401 is ever seen. Token 1 stays
        # valid on the server; only the expirationTimestamp makes the client move on.
        await asyncio.sleep(6)
        assert await list_configmaps(access, ns) == 200
        assert user.runs() == 3
        assert access.reloads == 2

    asyncio.run(scenario())
    info = json.loads((user.state / "exec-info.json").read_text())
    assert info["kind"] == "ExecCredential"  # KUBERNETES_EXEC_INFO, as client-go sets it


def test_a_failing_exec_plugin_is_one_clear_error(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    user = exec_user(control_plane, tmp_path, namespace="cred-fail", serviceaccount="ci", count=1)
    (user.state / "fail").touch()
    kubeconfig = exec_kubeconfig(user, tmp_path / "exec.yaml", lifetime=60)
    with pytest.raises(KubeConfigError, match="identity provider is unreachable"):
        asyncio.run(load_access(str(kubeconfig)))
    proc = subprocess.run(
        [str(TIDEGATE), "operator", "--standalone", "--kubeconfig", str(kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "KUBECONFIG"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "identity provider is unreachable" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_in_cluster_token_file_rotation(control_plane: ControlPlane, tmp_path: Path) -> None:
    """In a pod: the ServiceAccount files and KUBERNETES_SERVICE_*; the kubelet rotates the
    projected token file and the old token stops working: the new one is read."""
    cp, ns = control_plane, "cred-incluster"
    user = exec_user(cp, tmp_path, namespace=ns, serviceaccount="pod", count=2)
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(user.tokens[0])
    (sa / "ca.crt").write_bytes(cp.ca_path.read_bytes())
    (sa / "namespace").write_text(ns)
    port = cp.server.rsplit(":", 1)[1]
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port}

    async def scenario() -> None:
        access = await load_access(environ=env, sa_dir=sa)
        assert access.source.kubeconfig is None and access.default_namespace == ns
        assert access.server == f"https://127.0.0.1:{port}"
        assert await list_configmaps(access, ns) == 200
        (sa / "token").write_text(user.tokens[1])  # the kubelet's rotation
        user.revoke(0)
        assert await list_configmaps(access, ns) == 200
        assert access.reloads == 1  # a 401, then the file read again

    asyncio.run(scenario())


# --- kubeconfig shapes --------------------------------------------------------------------


def test_multi_path_kubeconfig_is_merged(control_plane: ControlPlane, tmp_path: Path) -> None:
    """Cluster and context in one file, the user in another, a missing path between."""
    cp = control_plane
    clusters = tmp_path / "clusters.yaml"
    users = tmp_path / "users.yaml"
    clusters.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "test",
                        "cluster": {"server": cp.server, "certificate-authority": str(cp.ca_path)},
                    }
                ],
                "contexts": [{"name": "t", "context": {"cluster": "test", "user": "me"}}],
                "current-context": "t",
            }
        )
    )
    users.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "users": [{"name": "me", "user": {"token": cp.admin_token}}],
            }
        )
    )
    paths = os.pathsep.join([str(clusters), str(tmp_path / "missing.yaml"), str(users)])

    async def scenario() -> None:
        access = await load_access(environ={"KUBECONFIG": paths})
        assert access.source.kubeconfig == paths
        assert await list_configmaps(access, "default") == 200

    asyncio.run(scenario())


def test_tls_server_name_is_honoured(control_plane: ControlPlane, tmp_path: Path) -> None:
    cp = control_plane

    def config(name: str) -> Path:
        path = tmp_path / f"tls-{name}.yaml"
        data_kubeconfig(cp, path)
        doc = yaml.safe_load(path.read_text())
        doc["clusters"][0]["cluster"]["tls-server-name"] = name
        path.write_text(yaml.safe_dump(doc))
        return path

    async def scenario() -> None:
        good = await load_access(str(config("kubernetes.default.svc")))
        assert await list_configmaps(good, "default") == 200
        wrong = await load_access(str(config("not-the-apiserver.example")))
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await list_configmaps(wrong, "default")

    asyncio.run(scenario())


def test_proxy_url_is_honoured(control_plane: ControlPlane, tmp_path: Path) -> None:
    """A loopback CONNECT relay stands in for a corporate proxy: it must see the tunnel."""
    cp = control_plane
    seen: list[bytes] = []

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        host, port = head.split()[1].decode().rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def scenario() -> None:
        server = await asyncio.start_server(relay, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        path = data_kubeconfig(cp, tmp_path / "proxy.yaml")
        doc = yaml.safe_load(path.read_text())
        doc["clusters"][0]["cluster"]["proxy-url"] = f"http://127.0.0.1:{port}"
        path.write_text(yaml.safe_dump(doc))
        access = await load_access(str(path))
        assert await list_configmaps(access, "default") == 200
        server.close()

    asyncio.run(scenario())
    api_port = cp.server.rsplit(":", 1)[1]
    assert seen == [f"CONNECT 127.0.0.1:{api_port} HTTP/1.1".encode()]


# --- the gateway's ConfigMap watch ---------------------------------------------------------


def _bundle(generation: int) -> str:
    gateway = parse_gateway({"metadata": {"name": "g"}, "spec": {"clientCIDRs": ["127.0.0.0/8"]}})
    policy = parse_policy(
        {
            "metadata": {"name": "p", "namespace": "n"},
            "spec": {"allow": [{"host": f"g{generation}.example"}]},  # new content, new sha
        }
    )
    return compile_bundle(gateway=gateway, policies=[policy], generation=generation).decode()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _generation(metrics: int) -> float | None:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2).read()
    except OSError:
        return None
    for line in text.decode().splitlines():
        if line.startswith("tidegate_bundle_generation "):
            return float(line.split()[1])
    return None


def _wait_generation(metrics: int, want: float, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while _generation(metrics) != want:
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)


def _set_bundle(cp: ControlPlane, ns: str, generation: int) -> None:
    cp.apply(
        [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "g-bundle", "namespace": ns},
                "data": {"bundle.json": _bundle(generation)},
            }
        ]
    )


def _start_gateway(
    kubeconfig: list[str], env: dict[str, str], ns: str, log: Path
) -> tuple[subprocess.Popen[bytes], int]:
    metrics = _free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(TIDEGATE),
                "gateway",
                "--configmap",
                f"{ns}/g-bundle",
                *kubeconfig,
                "--listen",
                f"127.0.0.1:{_free_port()}",
                "--metrics-listen",
                f"127.0.0.1:{metrics}",
                "--access-log",
                "off",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return proc, metrics


def test_gateway_watch_with_inline_certificates_leaves_no_temp_files(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """``*-data`` fields go to one private directory, removed when the gateway stops."""
    cp, ns = control_plane, "cred-tmp"
    cp.ensure_namespace(ns)
    _set_bundle(cp, ns, 1)
    kubeconfig = data_kubeconfig(cp, tmp_path / "inline.yaml")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"} | {"TMPDIR": str(tmp)}
    log = tmp_path / "gw.log"
    proc, metrics = _start_gateway(["--kubeconfig", str(kubeconfig)], env, ns, log)
    try:
        _wait_generation(metrics, 1, proc, log)
        for generation in (2, 3):
            _set_bundle(cp, ns, generation)
            _wait_generation(metrics, generation, proc, log)
        dirs = list(tmp.iterdir())
        assert len(dirs) == 1 and dirs[0].name.startswith("tidegate-kube-")
        assert oct(dirs[0].stat().st_mode & 0o777) == "0o700"
        files = sorted(p.read_bytes() for p in dirs[0].iterdir())
        assert len(files) == 3  # CA, certificate, key: once each, not per connection
        assert cp.ca_path.read_bytes() in files
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
    assert list(tmp.iterdir()) == [], "the gateway left temp files behind"


def test_gateway_watch_signs_in_with_a_multi_path_kubeconfig(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    """``tidegate gateway --configmap`` with ``$KUBECONFIG=a:b`` and no ``--kubeconfig``."""
    cp, ns = control_plane, "cred-env"
    user = exec_user(cp, tmp_path, namespace=ns, serviceaccount="gw", count=1)
    _set_bundle(cp, ns, 4)
    cluster_file = tmp_path / "cluster.yaml"
    user_file = tmp_path / "user.yaml"
    full = yaml.safe_load(exec_kubeconfig(user, tmp_path / "full.yaml", lifetime=600).read_text())
    cluster_file.write_text(yaml.safe_dump({k: v for k, v in full.items() if k != "users"}))
    only_users = {"apiVersion": "v1", "kind": "Config", "users": full["users"]}
    user_file.write_text(yaml.safe_dump(only_users))
    env = dict(os.environ) | {"KUBECONFIG": f"{cluster_file}{os.pathsep}{user_file}"}
    log = tmp_path / "gw-env.log"
    proc, metrics = _start_gateway([], env, ns, log)
    try:
        _wait_generation(metrics, 4, proc, log)
        assert user.runs() == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()
