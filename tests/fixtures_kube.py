"""A real Kubernetes test control plane (etcd + kube-apiserver + kube-controller-manager).

Why: the operator's behaviour depends on what a real API server does — OpenAPI and CEL
validation, the status subresource, resourceVersion conflicts, watches, RBAC, ownerReference
garbage collection — which no in-memory fake reproduces. The binaries are compiled from
published Go modules by ``hack/control-plane/build.sh`` into a cache outside the repository;
this plugin builds them when they are missing (once per machine, many minutes), then starts
the servers on free loopback ports in a few seconds per test session.

Fixtures:
  ``control_plane`` (session): a running :class:`ControlPlane`.

Tests that use it are marked ``@pytest.mark.kube``. ``TIDEGATE_SKIP_KUBE=1`` skips them.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import copy
import ctypes
import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO_ROOT = Path(__file__).resolve().parents[1]
CP_DIR = REPO_ROOT / "hack" / "control-plane"
BUILD_SCRIPT = CP_DIR / "build.sh"
BINARIES = ("etcd", "kube-apiserver", "kubectl", "helm", "kube-controller-manager")
REQUIRED_BINARIES = ("etcd", "kube-apiserver", "kubectl", "helm")
SKIP_ENV = "TIDEGATE_SKIP_KUBE"

#: Controllers worth running without nodes: GC of owned objects, Deployment -> ReplicaSet,
#: namespace deletion, the per-namespace "default" ServiceAccount and its CA ConfigMap.
CONTROLLERS = (
    "garbage-collector-controller",
    "deployment-controller",
    "replicaset-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",
)

RBAC_KINDS = frozenset({"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"})

#: What the API server's audit log records: every request made by a ServiceAccount, at
#: Metadata level (who, verb, resource, namespace, name, response code; never bodies). The
#: RBAC test reads it to compare what the operator used with what the chart grants.
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived"],
    "rules": [
        {"level": "Metadata", "userGroups": ["system:serviceaccounts"]},
        {"level": "None"},
    ],
}

#: The audit log of every control plane started in this test session, in start order.
AUDIT_LOGS: list[Path] = []


# --------------------------------------------------------------------------- binaries


def pinned_versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for line in (CP_DIR / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def bin_dir() -> Path:
    """Where build.sh puts the binaries of the pinned versions."""
    root = os.environ.get("TIDEGATE_CP_CACHE") or str(
        Path.home() / ".cache" / "tidegate" / "control-plane"
    )
    return Path(root) / pinned_versions()["CP_VERSION"] / "bin"


def _missing_binaries() -> list[str]:
    bdir = bin_dir()
    return [b for b in BINARIES if not (bdir / b).is_file() or not (bdir / f".{b}.stamp").is_file()]


def ensure_binaries(config: pytest.Config | None = None) -> Path:
    """Run build.sh when a binary is missing, with its progress shown on the terminal
    (pytest's output capture is suspended for it when ``config`` is given)."""
    if _missing_binaries():
        capman = config.pluginmanager.getplugin("capturemanager") if config else None
        ctx = capman.global_and_fixture_disabled() if capman else contextlib.nullcontext()
        with ctx:
            print(
                f"\n[fixtures_kube] building the test control plane: {BUILD_SCRIPT}",
                file=sys.stderr,
                flush=True,
            )
            rc = subprocess.call(["bash", str(BUILD_SCRIPT)], stdout=sys.stderr)
        missing = [b for b in _missing_binaries() if b in REQUIRED_BINARIES]
        if rc != 0 and missing:
            raise RuntimeError(
                f"{BUILD_SCRIPT} failed (exit {rc}); missing {missing}. See its output above, "
                f"or set {SKIP_ENV}=1 to skip the kube tests."
            )
    return bin_dir()


def _skip_reason() -> str | None:
    if os.environ.get(SKIP_ENV) == "1":
        return f"{SKIP_ENV}=1: the real test control plane is disabled"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _skip_reason()
    # Tests that read what the whole session did (the API audit log) run after all others.
    items.sort(key=lambda item: item.get_closest_marker("after_kube") is not None)
    for item in items:
        if "control_plane" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kube)
        if reason and item.get_closest_marker("kube"):
            item.add_marker(pytest.mark.skip(reason=reason))


_build_error: str | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build before the first test runs, so a cold build is not cut by the per-test timeout.
    # A failure is reported by the fixture, i.e. by each kube test, not as a pytest crash.
    global _build_error
    if _skip_reason() or session.config.option.collectonly:
        return
    if any(item.get_closest_marker("kube") for item in session.items):
        try:
            ensure_binaries(session.config)
        except RuntimeError as exc:
            _build_error = str(exc)


# --------------------------------------------------------------------------- certificates


def _write_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _issue(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server_names: Sequence[str] = (),
    client: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if server_names:
        sans: list[x509.GeneralName] = []
        for name in server_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server_names else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class _Pki:
    ca: Path
    serving_cert: Path
    serving_key: Path
    admin_cert: Path
    admin_key: Path
    sa_key: Path
    sa_pub: Path


def _make_pki(d: Path) -> _Pki:
    """A CA, the apiserver's serving cert, an admin client cert and the SA signing key."""
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tidegate-test-ca")])
    ca = _issue(ca_name, ca_key, ca_name, ca_key, ca=True)
    pki = _Pki(
        ca=d / "ca.crt",
        serving_cert=d / "apiserver.crt",
        serving_key=d / "apiserver.key",
        admin_cert=d / "admin.crt",
        admin_key=d / "admin.key",
        sa_key=d / "sa.key",
        sa_pub=d / "sa.pub",
    )
    _write_cert(pki.ca, ca)

    serving_key = ec.generate_private_key(ec.SECP256R1())
    serving = _issue(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]),
        serving_key,
        ca_name,
        ca_key,
        server_names=(
            "127.0.0.1",
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
        ),
    )
    _write_cert(pki.serving_cert, serving)
    _write_key(pki.serving_key, serving_key)

    # O=system:masters is bound to cluster-admin by the bootstrap RBAC policy.
    admin_key = ec.generate_private_key(ec.SECP256R1())
    admin = _issue(
        x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "system:masters"),
                x509.NameAttribute(NameOID.COMMON_NAME, "tidegate-test-admin"),
            ]
        ),
        admin_key,
        ca_name,
        ca_key,
        client=True,
    )
    _write_cert(pki.admin_cert, admin)
    _write_key(pki.admin_key, admin_key)

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _write_key(pki.sa_key, sa_key)
    pki.sa_pub.write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pki


# --------------------------------------------------------------------------- processes


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _die_with_parent() -> None:
    """In the child: have Linux SIGKILL this server if pytest dies without tearing down."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # 1 = PR_SET_PDEATHSIG


@dataclass
class _Server:
    name: str
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


# --------------------------------------------------------------------------- the control plane


def _kubeconfig(server: str, ca: Path, user: Mapping[str, str], name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "cptest", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [{"name": name, "user": dict(user)}],
        "contexts": [{"name": name, "context": {"cluster": "cptest", "user": name}}],
        "current-context": name,
    }


def _load_docs(manifests: Iterable[Mapping[str, Any] | str | Path]) -> list[dict[str, Any]]:
    """Dicts, YAML text (multi-document) or YAML file paths -> list of object dicts."""
    docs: list[dict[str, Any]] = []
    for m in manifests:
        if isinstance(m, Mapping):
            docs.append(copy.deepcopy(dict(m)))
            continue
        text = m.read_text() if isinstance(m, Path) else m
        for doc in yaml.safe_load_all(text):
            if not doc:
                continue
            if doc.get("kind") == "List":
                docs.extend(doc.get("items") or [])
            else:
                docs.append(doc)
    return docs


@dataclass
class ControlPlane:
    """A running etcd + kube-apiserver (+ kube-controller-manager), admin by default."""

    workdir: Path
    bin_dir: Path
    server: str
    ca_path: Path
    kubeconfig: Path
    admin_cert: Path
    admin_key: Path
    admin_token: str
    has_controller_manager: bool
    audit_log: Path | None = None
    _servers: list[_Server] = field(default_factory=list, repr=False)

    # ----- binaries

    @property
    def kubectl_path(self) -> Path:
        return self.bin_dir / "kubectl"

    @property
    def helm_path(self) -> Path:
        return self.bin_dir / "helm"

    def _run(
        self,
        argv: list[str],
        *,
        input: str | None,
        check: bool,
        kubeconfig: Path | None,
        timeout: float,
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ)
        env["KUBECONFIG"] = str(kubeconfig or self.kubeconfig)
        helm_home = self.workdir / "helm"
        env.update(
            HELM_CACHE_HOME=str(helm_home / "cache"),
            HELM_CONFIG_HOME=str(helm_home / "config"),
            HELM_DATA_HOME=str(helm_home / "data"),
        )
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(argv)} exited {proc.returncode}\nstdout:\n{proc.stdout}\n"
                f"stderr:\n{proc.stderr}"
            )
        return proc

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl (as admin unless ``kubeconfig`` is given); raise on failure if check."""
        return self._run(
            [str(self.kubectl_path), *args],
            input=input,
            check=check,
            kubeconfig=kubeconfig,
            timeout=timeout,
        )

    def helm(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        """Run helm against this cluster, with its caches inside the work dir."""
        return self._run(
            [str(self.helm_path), *args],
            input=input,
            check=check,
            kubeconfig=kubeconfig,
            timeout=timeout,
        )

    def apply(self, manifests: Iterable[Mapping[str, Any] | str | Path]) -> None:
        """``kubectl apply`` the given dicts / YAML texts / YAML files as admin."""
        docs = _load_docs(manifests)
        if docs:
            self.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))

    def session(self) -> requests.Session:
        """A requests session that talks to ``self.server`` as admin (client cert)."""
        s = requests.Session()
        # Otherwise REQUESTS_CA_BUNDLE (and proxy variables) from the environment win over
        # the verify setting below.
        s.trust_env = False
        s.cert = (str(self.admin_cert), str(self.admin_key))
        s.verify = str(self.ca_path)
        return s

    # ----- identities

    def ensure_namespace(self, namespace: str) -> None:
        self.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}])

    def token_for(self, serviceaccount: str, namespace: str, *, duration: str = "2h") -> Path:
        """Create (if needed) the ServiceAccount, request a token for it through the
        TokenRequest API and return the path of a kubeconfig that uses that token."""
        self.ensure_namespace(namespace)
        self.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "ServiceAccount",
                    "metadata": {"name": serviceaccount, "namespace": namespace},
                }
            ]
        )
        token = self.kubectl(
            "create", "token", serviceaccount, "-n", namespace, f"--duration={duration}"
        ).stdout.strip()
        path = self.workdir / "kubeconfigs" / f"sa-{namespace}-{serviceaccount}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        user = f"system:serviceaccount:{namespace}:{serviceaccount}"
        path.write_text(
            yaml.safe_dump(_kubeconfig(self.server, self.ca_path, {"token": token}, user))
        )
        path.chmod(0o600)
        return path

    def serviceaccount_kubeconfig(
        self,
        namespace: str,
        name: str,
        role_manifests: Iterable[Mapping[str, Any] | str | Path],
    ) -> Path:
        """Grant the ServiceAccount ``namespace/name`` exactly the given RBAC and return a
        kubeconfig for it.

        ``role_manifests`` are dicts, YAML texts or YAML file paths (e.g. the output of
        ``helm template``); only Role, ClusterRole, RoleBinding and ClusterRoleBinding
        documents are used, the rest is ignored. Bindings are applied as given. Each Role or
        ClusterRole that no given binding refers to is bound to this ServiceAccount (a Role
        with no namespace is created in ``namespace``).
        """
        docs = [d for d in _load_docs(role_manifests) if d.get("kind") in RBAC_KINDS]
        self.ensure_namespace(namespace)
        for d in docs:  # namespaced kinds default to ``namespace``, as kubectl -n would
            meta = d.setdefault("metadata", {})
            if d["kind"] in ("Role", "RoleBinding"):
                meta.setdefault("namespace", namespace)
        bound = {
            (d["roleRef"]["kind"], d["roleRef"]["name"], d.get("metadata", {}).get("namespace"))
            for d in docs
            if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
        }
        bound_names = {(kind, rname) for kind, rname, _ in bound}
        subject = {"kind": "ServiceAccount", "name": name, "namespace": namespace}
        extra: list[dict[str, Any]] = []
        for d in docs:
            meta = d["metadata"]
            if d["kind"] == "Role":
                if ("Role", meta["name"], meta["namespace"]) not in bound:
                    extra.append(
                        {
                            "apiVersion": "rbac.authorization.k8s.io/v1",
                            "kind": "RoleBinding",
                            "metadata": {
                                "name": f"{meta['name']}-{name}"[:253],
                                "namespace": meta["namespace"],
                            },
                            "roleRef": {
                                "apiGroup": "rbac.authorization.k8s.io",
                                "kind": "Role",
                                "name": meta["name"],
                            },
                            "subjects": [subject],
                        }
                    )
            elif d["kind"] == "ClusterRole" and ("ClusterRole", meta["name"]) not in bound_names:
                extra.append(
                    {
                        "apiVersion": "rbac.authorization.k8s.io/v1",
                        "kind": "ClusterRoleBinding",
                        "metadata": {"name": f"{meta['name']}-{namespace}-{name}"[:253]},
                        "roleRef": {
                            "apiGroup": "rbac.authorization.k8s.io",
                            "kind": "ClusterRole",
                            "name": meta["name"],
                        },
                        "subjects": [subject],
                    }
                )
        self.apply(docs + extra)
        return self.token_for(name, namespace)

    # ----- lifecycle

    def _apiserver(self) -> _Server:
        return next(s for s in self._servers if s.name == "kube-apiserver")

    def stop_apiserver(self) -> None:
        """An API outage: stop kube-apiserver (etcd and the rest keep running)."""
        self._apiserver().stop()

    def start_apiserver(self, timeout: float = 90) -> None:
        """End the outage: the same kube-apiserver on the same port, back when ready."""
        server = self._apiserver()
        server.start()
        session = self.session()
        _wait(
            self,
            "kube-apiserver /readyz after a restart",
            lambda: session.get(f"{self.server}/readyz", timeout=2).status_code == 200,
            timeout,
            [server],
        )

    def stop(self) -> None:
        for server in reversed(self._servers):
            server.stop()

    def logs_tail(self, lines: int = 40) -> str:
        return "\n".join(
            f"----- {s.name} ({s.log}) -----\n{_tail(s.log, lines)}" for s in self._servers
        )


def _wait(
    cp: ControlPlane, what: str, probe: Any, timeout: float, servers: Sequence[_Server]
) -> None:
    deadline = time.monotonic() + timeout
    last_error = ""
    while time.monotonic() < deadline:
        for s in servers:
            if not s.alive():
                raise RuntimeError(
                    f"{s.name} exited (code {s.proc.returncode if s.proc else '?'}) while "
                    f"waiting for {what}\n{cp.logs_tail()}"
                )
        try:
            if probe():
                return
        except requests.RequestException as exc:
            last_error = str(exc)
        time.sleep(0.2)
    raise RuntimeError(
        f"timed out after {timeout}s waiting for {what} ({last_error})\n{cp.logs_tail()}"
    )


def start_control_plane(workdir: Path, bins: Path, *, timeout: float = 90) -> ControlPlane:
    """Start etcd, kube-apiserver and (if built) kube-controller-manager under ``workdir``."""
    pki = _make_pki(workdir / "pki")
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    etcd_port, peer_port, api_port = _free_port(), _free_port(), _free_port()
    server = f"https://127.0.0.1:{api_port}"
    admin_token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    token_file = pki.ca.parent / "tokens.csv"
    token_file.write_text(
        f'{admin_token},tidegate-test-admin,tidegate-test-admin,"system:masters"\n'
    )
    token_file.chmod(0o600)

    kubeconfig = workdir / "admin.kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            _kubeconfig(
                server,
                pki.ca,
                {"client-certificate": str(pki.admin_cert), "client-key": str(pki.admin_key)},
                "admin",
            )
        )
    )
    kubeconfig.chmod(0o600)
    audit_policy = workdir / "audit-policy.yaml"
    audit_policy.write_text(yaml.safe_dump(AUDIT_POLICY))
    audit_log = logs / "audit.log"

    has_kcm = (bins / "kube-controller-manager").is_file()
    etcd_url = f"http://127.0.0.1:{etcd_port}"
    peer_url = f"http://127.0.0.1:{peer_port}"
    etcd = _Server(
        "etcd",
        [
            str(bins / "etcd"),
            "--name=default",
            f"--data-dir={workdir / 'etcd'}",
            f"--listen-client-urls={etcd_url}",
            f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ],
        logs / "etcd.log",
    )
    apiserver = _Server(
        "kube-apiserver",
        [
            str(bins / "kube-apiserver"),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={api_port}",
            f"--cert-dir={workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki.serving_cert}",
            f"--tls-private-key-file={pki.serving_key}",
            f"--client-ca-file={pki.ca}",
            f"--token-auth-file={token_file}",
            "--authorization-mode=RBAC",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={pki.sa_pub}",
            f"--service-account-signing-key-file={pki.sa_key}",
            "--allow-privileged=true",
            f"--audit-policy-file={audit_policy}",
            f"--audit-log-path={audit_log}",
            "--audit-log-maxsize=2000",
            "--audit-log-format=json",
            "--v=1",
            # Without the controller manager nobody creates the "default" ServiceAccount,
            # and its admission plugin would then reject every Pod.
            *([] if has_kcm else ["--disable-admission-plugins=ServiceAccount"]),
        ],
        logs / "kube-apiserver.log",
    )

    cp = ControlPlane(
        workdir=workdir,
        bin_dir=bins,
        server=server,
        ca_path=pki.ca,
        kubeconfig=kubeconfig,
        admin_cert=pki.admin_cert,
        admin_key=pki.admin_key,
        admin_token=admin_token,
        has_controller_manager=has_kcm,
        audit_log=audit_log,
        _servers=[etcd, apiserver],
    )
    AUDIT_LOGS.append(audit_log)
    atexit.register(cp.stop)  # in case the session dies before fixture teardown
    try:
        etcd.start()
        _wait(
            cp,
            "etcd /health",
            lambda: requests.get(f"{etcd_url}/health", timeout=2).ok,
            timeout,
            [etcd],
        )
        apiserver.start()
        session = cp.session()
        _wait(
            cp,
            "kube-apiserver /readyz",
            lambda: session.get(f"{server}/readyz", timeout=2).status_code == 200,
            timeout,
            [etcd, apiserver],
        )
        if cp.has_controller_manager:
            kcm = _Server(
                "kube-controller-manager",
                [
                    str(bins / "kube-controller-manager"),
                    f"--kubeconfig={kubeconfig}",
                    "--leader-elect=false",
                    "--secure-port=0",
                    f"--controllers={','.join(CONTROLLERS)}",
                    f"--service-account-private-key-file={pki.sa_key}",
                    f"--root-ca-file={pki.ca}",
                    "--v=1",
                ],
                logs / "kube-controller-manager.log",
            )
            cp._servers.append(kcm)
            kcm.start()
            # Its serviceaccount controller creates default/default once it is working.
            _wait(
                cp,
                "kube-controller-manager (ServiceAccount default/default)",
                lambda: (
                    session.get(
                        f"{server}/api/v1/namespaces/default/serviceaccounts/default", timeout=2
                    ).status_code
                    == 200
                ),
                timeout,
                cp._servers,
            )
    except BaseException:
        cp.stop()
        raise
    return cp


@pytest.fixture(scope="session")
def control_plane(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[ControlPlane]:
    """A real etcd + kube-apiserver (+ controller-manager) for this test session."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    if _build_error:
        raise RuntimeError(_build_error)
    bins = ensure_binaries(pytestconfig)
    if not shutil.which(str(bins / "kube-apiserver")):
        raise RuntimeError(f"kube-apiserver not found in {bins} after {BUILD_SCRIPT}")
    cp = start_control_plane(tmp_path_factory.mktemp("control-plane"), bins)
    try:
        yield cp
    finally:
        cp.stop()
