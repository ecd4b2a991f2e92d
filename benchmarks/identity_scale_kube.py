"""Identity scale on the real kube-apiserver: pods, namespaces and policies end to end.

benchmarks/identity_scale.py measures the pure parts; this one runs the whole path on the
test control plane (etcd + kube-apiserver + controller-manager, tests/fixtures_kube.py):
the CRDs, ``tidegate operator`` with the Helm chart's RBAC and one EgressGateway, then M
namespaces, P policies and N pod objects. There is no kubelet: each pod's ``status.podIP``
and phase are written through the status subresource, as the kube tests do.

It measures:

* seconds from the last status patch until the identities ConfigMaps (index + shards)
  hold every pod address (polled, parsed with the gateway's own parser);
* bytes of the identities ConfigMaps and of the bundle - what a gateway loads;
* the operator's RSS (psutil): peak while converging, at rest afterwards;
* one pod's label change: seconds until published, ConfigMaps and bytes rewritten;
* the gateway side with the published documents: parse + table build time, and the
  decision cost with the published bundle's policies (as identity_scale.py does).

Run by hand, not a test:
    .venv/bin/python benchmarks/identity_scale_kube.py --pods 1000 --namespaces 200 --policies 1000
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import requests
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "src"), str(REPO / "tests"), str(REPO / "tests" / "operator")]

from fixtures_kube import ControlPlane, ensure_binaries, start_control_plane  # noqa: E402
from kubehelpers import OperatorProcess, install_crds, operator_kubeconfig  # noqa: E402

from tidegate.gateway.bundle import load_bundle  # noqa: E402
from tidegate.gateway.engine import Engine  # noqa: E402
from tidegate.gateway.hosts import normalize_host  # noqa: E402
from tidegate.gateway.identity import (  # noqa: E402
    IdentityDocument,
    build_table,
    load_identity_text,
)

NS = "tidegate-system"
GATEWAY = "default"
IDENTITIES = f"{GATEWAY}-identities"
IDENTITIES_KEY = "identities.json"
BUNDLE = f"{GATEWAY}-bundle"
FIRST_ADDRESS = int(ipaddress.ip_address("10.128.0.0"))
#: Parallel API requests while creating pods (the API server and the operator share the
#: same 2 cores with this process).
WORKERS = 8
#: Bounds: no phase waits longer than this.
PHASE_TIMEOUT_S = 900.0
POLL_S = 0.5


def namespace_name(i: int) -> str:
    return f"sc-{i:03d}"


def pod_address(j: int) -> str:
    return str(ipaddress.ip_address(FIRST_ADDRESS + j))


def pod_labels(j: int, ns: str) -> dict[str, str]:
    return {"app": f"app{j % 7}", "pod-template-hash": f"h{j % 50}", "team": ns}


def policies(count: int, namespaces: int) -> list[dict[str, Any]]:
    """EgressPolicies spread over the namespaces (a third narrowed by podSelector) and ten
    ClusterEgressPolicies by namespaceSelector - the shape identity_scale.py uses."""
    docs: list[dict[str, Any]] = []
    for i in range(count):
        spec: dict[str, Any] = {
            "allow": [{"host": f"h{i}.example.com"}, {"host": f"*.s{i}.example.net"}],
            "deny": [{"host": f"bad{i}.example.org"}],
        }
        if i % 3 == 0:
            spec["podSelector"] = {"matchLabels": {"app": f"app{i % 7}"}}
        docs.append(
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "EgressPolicy",
                "metadata": {"name": f"p{i}", "namespace": namespace_name(i % namespaces)},
                "spec": spec,
            }
        )
    for i in range(10):
        docs.append(
            {
                "apiVersion": "tidegate.io/v1alpha1",
                "kind": "ClusterEgressPolicy",
                "metadata": {"name": f"c{i}"},
                "spec": {
                    "namespaceSelector": {"matchLabels": {"env": "prod"}},
                    "allow": [{"host": f"mirror{i}.example"}],
                },
            }
        )
    return docs


class Api:
    """Admin requests to the API server, one requests.Session per thread."""

    def __init__(self, cp: ControlPlane) -> None:
        self.cp = cp
        self.local = threading.local()

    def session(self) -> requests.Session:
        s: requests.Session | None = getattr(self.local, "s", None)
        if s is None:
            s = self.cp.session()
            self.local.s = s
        return s

    def url(self, path: str) -> str:
        return f"{self.cp.server}{path}"

    def get(self, path: str) -> dict[str, Any]:
        r = self.session().get(self.url(path), timeout=120)
        r.raise_for_status()
        return dict(r.json())

    def post(self, path: str, body: dict[str, Any]) -> requests.Response:
        return self.session().post(self.url(path), json=body, timeout=60)

    def merge_patch(self, path: str, body: dict[str, Any]) -> None:
        r = self.session().patch(
            self.url(path),
            data=json.dumps(body),
            headers={"Content-Type": "application/merge-patch+json"},
            timeout=60,
        )
        r.raise_for_status()


def create_pod(api: Api, j: int, namespaces: int) -> None:
    """Create pod j, then write its address and phase through the status subresource."""
    ns = namespace_name(j % namespaces)
    name = f"pod-{j}"
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": pod_labels(j, ns)},
        "spec": {
            "automountServiceAccountToken": False,
            "containers": [{"name": "app", "image": "app:test"}],
        },
    }
    deadline = time.monotonic() + 60
    while True:
        r = api.post(f"/api/v1/namespaces/{ns}/pods", body)
        if r.status_code in (200, 201, 409):
            break
        # The namespace's default ServiceAccount appears a moment after the namespace.
        if time.monotonic() > deadline:
            raise RuntimeError(f"creating {ns}/{name}: {r.status_code} {r.text[:300]}")
        time.sleep(0.2)
    ip = pod_address(j)
    api.merge_patch(
        f"/api/v1/namespaces/{ns}/pods/{name}/status",
        {"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}},
    )


class Published:
    """The identities ConfigMaps as the gateway would read them, re-parsed only where
    their resourceVersion changed."""

    def __init__(self, api: Api) -> None:
        self.api = api
        self.parsed: dict[str, tuple[str, list[IdentityDocument], int]] = {}

    def refresh(self) -> dict[str, tuple[str, int]]:
        """Read them; returns name -> (resourceVersion, payload bytes) of the current layout."""
        listing = self.api.get(f"/api/v1/namespaces/{NS}/configmaps")
        seen: dict[str, tuple[str, int]] = {}
        for cm in listing["items"]:
            name = cm["metadata"]["name"]
            if name != IDENTITIES and not name.startswith(f"{IDENTITIES}-"):
                continue
            rv = cm["metadata"]["resourceVersion"]
            text = (cm.get("data") or {}).get(IDENTITIES_KEY) or ""
            cached = self.parsed.get(name)
            if cached is None or cached[0] != rv:
                docs = load_identity_text(text, source=name) if text else []
                self.parsed[name] = (rv, docs, len(text.encode()))
            seen[name] = (rv, self.parsed[name][2])
        return seen

    def documents(self) -> list[IdentityDocument]:
        """The index and the shards of the index's layout."""
        index = self.parsed.get(IDENTITIES)
        if index is None or not index[1]:
            return []
        shards = index[1][0].shards or 1
        docs = list(index[1])
        for i in range(shards):
            shard = self.parsed.get(f"{IDENTITIES}-{i}")
            if shard is None:
                return []
            docs += [d for d in shard[1] if d.shards == shards]
        return docs

    def addresses(self) -> set[str]:
        return {str(a) for d in self.documents() for p in d.pods for a in p.addresses}

    def labels_of(self, address: str) -> dict[str, str] | None:
        for d in self.documents():
            for p in d.pods:
                if address in {str(a) for a in p.addresses}:
                    return dict(p.labels)
        return None

    def layout_bytes(self, seen: dict[str, tuple[str, int]]) -> tuple[int, int]:
        """(ConfigMaps of the current layout, their payload bytes)."""
        index = self.parsed.get(IDENTITIES)
        shards = (index[1][0].shards or 1) if index and index[1] else 0
        names = [IDENTITIES, *(f"{IDENTITIES}-{i}" for i in range(shards))]
        return len(names), sum(seen[n][1] for n in names if n in seen)


def bundle_bytes(api: Api) -> tuple[bytes, int]:
    """The bundle payload (uncompressed) and the bytes stored in its ConfigMap."""
    cm = api.get(f"/api/v1/namespaces/{NS}/configmaps/{BUNDLE}")
    data = cm.get("data") or {}
    if "bundle.json" in data:
        raw = str(data["bundle.json"]).encode()
        return raw, len(raw)
    stored = base64.b64decode((cm.get("binaryData") or {})["bundle.json.gz"])
    return stored, len(stored)


def wait_until(what: str, probe: Callable[[], bool], op: OperatorProcess) -> float:
    started = time.monotonic()
    while not probe():
        if not op.alive():
            raise RuntimeError(f"operator exited while waiting for {what}\n{op.tail()}")
        if time.monotonic() - started > PHASE_TIMEOUT_S:
            raise RuntimeError(f"timed out waiting for {what}\n{op.tail()}")
        time.sleep(POLL_S)
    return time.monotonic() - started


def decision_cost(
    bundle_raw: bytes, docs: list[IdentityDocument]
) -> tuple[float, float, float, int]:
    """Gateway side: (table build s, cold-memo µs, warm µs, policies in the bundle)."""
    started = time.perf_counter()
    table = build_table(docs, generation=1)
    build_s = time.perf_counter() - started
    bundle = load_bundle(bundle_raw, source=BUNDLE)
    engine = Engine(bundle.gateway, bundle.policies)
    clients = list(table.by_address)[:2000]
    host = normalize_host("h5.example.com")
    started = time.perf_counter()
    for c in clients:
        engine.decide(c, host, 443, table.lookup(c))
    cold_us = (time.perf_counter() - started) / len(clients) * 1e6
    rounds = 20
    started = time.perf_counter()
    for _ in range(rounds):
        for c in clients:
            engine.decide(c, host, 443, table.lookup(c))
    warm_us = (time.perf_counter() - started) / (rounds * len(clients)) * 1e6
    return build_s, cold_us, warm_us, len(bundle.policies)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=10_000)
    parser.add_argument("--namespaces", type=int, default=200)
    parser.add_argument("--policies", type=int, default=1_000)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tidegate-idscale-"))
    cp = start_control_plane(work / "cp", ensure_binaries())
    op: OperatorProcess | None = None
    done = threading.Event()
    try:
        api = Api(cp)
        install_crds(cp)
        cp.apply(
            [
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {
                        "name": namespace_name(i),
                        "labels": {"team": namespace_name(i), "env": "prod" if i % 2 else "dev"},
                    },
                }
                for i in range(args.namespaces)
            ]
        )
        op = OperatorProcess(cp, operator_kubeconfig(cp), work / "operator.log")
        op.start()
        assert op.proc is not None
        proc = psutil.Process(op.proc.pid)
        peak = [0]

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], proc.memory_info().rss)
                except psutil.Error:
                    return
                time.sleep(0.2)

        threading.Thread(target=sample, daemon=True).start()
        cp.kubectl("apply", "-f", str(REPO / "examples" / "standalone" / "gateway.yaml"))

        started = time.monotonic()
        cp.kubectl(
            "apply",
            "-f",
            "-",
            input=yaml.safe_dump_all(policies(args.policies, args.namespaces)),
            timeout=600,
        )
        want_policies = args.policies + 10

        def all_policies() -> bool:
            gw = api.get(f"/apis/tidegate.io/v1alpha1/namespaces/{NS}/egressgateways/{GATEWAY}")
            return bool((gw.get("status") or {}).get("policies") == want_policies)

        wait_until("every policy in the bundle", all_policies, op)
        policies_s = time.monotonic() - started
        idle_rss = proc.memory_info().rss

        started = time.monotonic()
        with ThreadPoolExecutor(WORKERS) as pool:
            list(pool.map(lambda j: create_pod(api, j, args.namespaces), range(args.pods)))
        last_patch = time.monotonic()
        pods_s = last_patch - started

        published = Published(api)
        want = {pod_address(j) for j in range(args.pods)}

        def converged() -> bool:
            published.refresh()
            return published.addresses() == want

        wait_until("every pod address published", converged, op)
        converge_s = time.monotonic() - last_patch
        time.sleep(10)  # at rest: the operator's resync passes and coalesced writes settle
        rest_rss = proc.memory_info().rss
        seen = published.refresh()
        configmaps, identities_bytes = published.layout_bytes(seen)
        bundle_raw, bundle_stored = bundle_bytes(api)

        # one pod churns: its label changes
        before = dict(seen)
        churn_ns, churn_ip = namespace_name(0), pod_address(0)
        t0 = time.monotonic()
        api.merge_patch(
            f"/api/v1/namespaces/{churn_ns}/pods/pod-0", {"metadata": {"labels": {"app": "moved"}}}
        )

        def relabelled() -> bool:
            published.refresh()
            return (published.labels_of(churn_ip) or {}).get("app") == "moved"

        wait_until("the relabelled pod published", relabelled, op)
        churn_s = time.monotonic() - t0
        time.sleep(5)  # writes of the same pass (the index follows its shards)
        after = published.refresh()
        rewritten = {n: v for n, v in after.items() if before.get(n, ("", 0))[0] != v[0]}
        done.set()

        build_s, cold_us, warm_us, bundle_policies = decision_cost(
            bundle_raw, published.documents()
        )
        parse_started = time.perf_counter()
        for name in (IDENTITIES, *(n for n in after if n != IDENTITIES)):
            cm = api.get(f"/api/v1/namespaces/{NS}/configmaps/{name}")
            text = (cm.get("data") or {}).get(IDENTITIES_KEY) or ""
            if text:
                load_identity_text(text, source=name)
        parse_s = time.perf_counter() - parse_started

        result = {
            "pods": args.pods,
            "namespaces": args.namespaces,
            "policies": want_policies,
            "policies_to_bundle_s": round(policies_s, 1),
            "pods_create_and_status_s": round(pods_s, 1),
            "last_status_patch_to_all_published_s": round(converge_s, 1),
            "identities_configmaps": configmaps,
            "identities_bytes": identities_bytes,
            "bundle_bytes": len(bundle_raw),
            "bundle_stored_bytes": bundle_stored,
            "operator_rss_before_pods_mib": round(idle_rss / 2**20, 1),
            "operator_rss_peak_mib": round(peak[0] / 2**20, 1),
            "operator_rss_at_rest_mib": round(rest_rss / 2**20, 1),
            "one_pod_relabel_to_published_s": round(churn_s, 2),
            "one_pod_relabel_configmaps_rewritten": len(rewritten),
            "one_pod_relabel_bytes_rewritten": sum(v[1] for v in rewritten.values()),
            "gateway_read_and_parse_s": round(parse_s, 2),
            "gateway_table_build_s": round(build_s, 3),
            "bundle_policies": bundle_policies,
            "decision_us_cold_memo": round(cold_us, 2),
            "decision_us_warm": round(warm_us, 2),
        }
        print(json.dumps(result, indent=2))
        return 0
    finally:
        done.set()
        if op is not None:
            op.stop()
        cp.stop()


if __name__ == "__main__":
    raise SystemExit(main())
