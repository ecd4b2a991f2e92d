"""Kubeconfigs for the sign-in tests: an exec credential plugin user, ``*-data`` fields.

The exec plugin (``exec_credential_plugin.py``) hands out ServiceAccount tokens minted with
the TokenRequest API, each bound to a Secret of its own, so deleting the Secret revokes
exactly that token on the real API server - which is how the tests check that a client
really moved on to the next token.
"""

from __future__ import annotations

import base64
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
import yaml
from fixtures_kube import ControlPlane

PLUGIN = Path(__file__).parent / "kube" / "exec_credential_plugin.py"
EXEC_API = "client.authentication.k8s.io/v1beta1"


@dataclass
class ExecUser:
    cp: ControlPlane
    namespace: str
    serviceaccount: str
    state: Path
    tokens: list[str]

    def runs(self) -> int:
        path = self.state / "runs"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def revoke(self, index: int) -> None:
        """Delete the Secret token ``index`` is bound to; wait until the API refuses it."""
        self.cp.kubectl("delete", "secret", f"token-{index}", "-n", self.namespace)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.status_with(self.tokens[index]) == 401:
                return
            time.sleep(0.2)
        raise AssertionError(f"token {index} still accepted 30 s after its Secret was deleted")

    def status_with(self, token: str) -> int:
        s = requests.Session()
        s.trust_env = False
        s.verify = str(self.cp.ca_path)
        url = f"{self.cp.server}/api/v1/namespaces/{self.namespace}/configmaps"
        return s.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).status_code


def exec_user(
    cp: ControlPlane,
    workdir: Path,
    *,
    namespace: str,
    serviceaccount: str,
    count: int,
    rbac: list[dict[str, Any]] | None = None,
) -> ExecUser:
    """A ServiceAccount with ``count`` revocable tokens (and ``rbac`` bound to it, or admin
    over ConfigMaps in ``namespace``), handed out one per plugin run."""
    if rbac is None:
        rbac = [
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": {"name": f"{serviceaccount}-cm", "namespace": namespace},
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["configmaps"],
                        "verbs": ["get", "list", "watch", "create", "update", "patch"],
                    }
                ],
            }
        ]
    cp.serviceaccount_kubeconfig(namespace, serviceaccount, rbac)
    tokens = []
    for i in range(count):
        cp.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": {"name": f"token-{i}", "namespace": namespace},
                    "type": "Opaque",
                }
            ]
        )
        tokens.append(
            cp.kubectl(
                "create",
                "token",
                serviceaccount,
                "-n",
                namespace,
                "--duration=1h",
                "--bound-object-kind=Secret",
                f"--bound-object-name=token-{i}",
            ).stdout.strip()
        )
    state = workdir / f"exec-{namespace}-{serviceaccount}"
    state.mkdir(parents=True, exist_ok=True)
    (state / "tokens").write_text("\n".join(tokens) + "\n")
    return ExecUser(cp, namespace, serviceaccount, state, tokens)


def exec_kubeconfig(user: ExecUser, path: Path, *, lifetime: float, **cluster: Any) -> Path:
    """A kubeconfig whose user is the exec plugin (as an EKS kubeconfig's is)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {
                    "server": user.cp.server,
                    "certificate-authority": str(user.cp.ca_path),
                    **cluster,
                },
            }
        ],
        "users": [
            {
                "name": "exec",
                "user": {
                    "exec": {
                        "apiVersion": EXEC_API,
                        "command": sys.executable,
                        "args": [str(PLUGIN), str(user.state)],
                        "env": [{"name": "TOKEN_LIFETIME", "value": str(lifetime)}],
                        "interactiveMode": "Never",
                    }
                },
            }
        ],
        "contexts": [
            {
                "name": "exec",
                "context": {"cluster": "test", "user": "exec", "namespace": user.namespace},
            }
        ],
        "current-context": "exec",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def data_kubeconfig(cp: ControlPlane, path: Path) -> Path:
    """The admin kubeconfig with the CA and client certificate inline (``*-data``)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "test",
                "cluster": {"server": cp.server, "certificate-authority-data": b64(cp.ca_path)},
            }
        ],
        "users": [
            {
                "name": "admin",
                "user": {
                    "client-certificate-data": b64(cp.admin_cert),
                    "client-key-data": b64(cp.admin_key),
                },
            }
        ],
        "contexts": [{"name": "admin", "context": {"cluster": "test", "user": "admin"}}],
        "current-context": "admin",
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path
