#!/usr/bin/env python3
"""Soak: mixed hostile-ish traffic through one gateway for a while; nothing may leak.

    .venv/bin/python benchmarks/soak.py            # 30 minutes
    .venv/bin/python benchmarks/soak.py --short    # 60 seconds (what the test suite runs)

Everything is on loopback: a DNS server (the test suite's, dnslib) that goes silent for one
name on every third query, and small upstreams - echo, a bulk source, a chatty one for
slow readers, one that accepts and never answers, a closed port, a port whose listen queue is
full (connects time out), a plain HTTP origin.
Bounded workers loop over the mix: new tunnels, bulk downloads, slow readers, refused
destinations (403), refused upstreams (502), upstreams whose connect times out (504), silent
upstreams, the flaky name, plain HTTP;
the policy folder is rewritten every few seconds (live reloads).

After a warm-up, and again after the traffic stops and the gateway has settled, it samples
the gateway's open file descriptors, RSS, asyncio task count and open connections. Every
5xx must be explained by its scenario (502 ``upstream_unreachable`` for the closed port,
504/502 DNS answers for the flaky name); any other is counted as unexplained. The report is
one JSON object on stdout; the exit status is 1 when something grew beyond noise or a 5xx
was unexplained.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures_net import DnsServer  # the test suite's DNS server, on loopback

HOST = "127.0.0.1"
TIDEGATE = str(Path(sys.executable).with_name("tidegate"))
NAMES = ("echo", "bulk", "chatty", "silent", "web", "closed", "stuck")
BULK_BYTES = 2 * 1024 * 1024
#: Growth allowed between the two samples (noise on a shared machine, not a leak).
MAX_FD_GROWTH = 8
MAX_TASK_GROWTH = 8
MAX_RSS_GROWTH_MIB = 24.0

# scenario -> the 5xx (status, reason) it can legitimately get
EXPLAINED_5XX: dict[str, set[tuple[int, str]]] = {
    "refused_upstream": {(502, "upstream_unreachable")},
    "timed_out_upstream": {(504, "upstream_timeout")},
    "flaky_dns": {
        (504, "dns_timeout"),
        (504, "dns_error"),
        (502, "dns_error"),
        (504, "gateway_timeout"),
    },
}


# --- upstreams ------------------------------------------------------------------------------


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _bulk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, ValueError):
        size = int(await reader.readline())
        block = os.urandom(65536)
        while size > 0:
            writer.write(block[: min(size, len(block))])
            size -= len(block)
            await writer.drain()
    writer.close()


async def _chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await reader.read(1)
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not writer.is_closing():
            writer.write(b"c" * 1024)
            await asyncio.sleep(0.001)
    writer.close()


async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while await reader.read(65536):
            pass
    writer.close()


async def _web(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
    writer.close()


class Upstreams:
    """The destinations, served by their own event loop in a thread."""

    def __init__(self) -> None:
        self.ports: dict[str, int] = {}
        self._loop = asyncio.new_event_loop()
        self._holder = socket.socket()
        self._holder.bind((HOST, 0))  # bound, never listening: a refused connect
        self.ports["closed"] = self._holder.getsockname()[1]
        # Listening, never accepting, its queue filled: further SYNs are dropped, so a
        # connect to it times out (a destination that does not answer).
        self._stuck = socket.socket()
        self._stuck.bind((HOST, 0))
        self._stuck.listen(0)
        self.ports["stuck"] = self._stuck.getsockname()[1]
        self._fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect((HOST, self.ports["stuck"]))
            self._fillers.append(filler)
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            for name, handler in (
                ("echo", _echo),
                ("bulk", _bulk),
                ("chatty", _chatty),
                ("silent", _silent),
                ("web", _web),
            ):
                server = await asyncio.start_server(handler, HOST, 0)
                self.ports[name] = server.sockets[0].getsockname()[1]
            ready.set()

        self._loop.run_until_complete(start())
        self._loop.run_forever()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        for sock in (self._holder, self._stuck, *self._fillers):
            sock.close()


# --- the gateway ----------------------------------------------------------------------------


def write_policies(directory: Path, dns: DnsServer, ports: dict[str, int], generation: int) -> None:
    gateway = {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressGateway",
        "metadata": {"name": "default", "namespace": "tidegate-system"},
        "spec": {
            "clientCIDRs": ["127.0.0.0/8"],
            "privateDestinationExceptions": ["127.0.0.1/32"],
            "dns": {
                "servers": [dns.address],
                "cache": {"enabled": True, "minTTLSeconds": 0, "maxTTLSeconds": 300},
            },
        },
    }
    allow = [{"host": f"{n}.soak.test", "ports": sorted(ports.values())} for n in NAMES]
    allow.append({"host": "flaky.soak.test", "ports": sorted(ports.values())})
    allow.append({"host": f"generation-{generation}.soak.test"})  # a change per reload
    policy = {
        "apiVersion": "tidegate.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "soak", "namespace": "soak"},
        "spec": {"allow": allow, "deny": [{"host": "denied.soak.test"}]},
    }
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / ".policies.tmp"
    tmp.write_text(yaml.safe_dump_all([gateway, policy], sort_keys=False))
    os.replace(tmp, directory / "policies.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    port: int
    admin: int

    def metrics(self) -> dict[str, float]:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://{HOST}:{self.admin}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#") and "{" not in line:
                name, _, value = line.partition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def sample(self) -> dict[str, float]:
        process = psutil.Process(self.proc.pid)
        metrics = self.metrics()  # first: the scrape itself costs a connection and a task
        return {
            "fds": process.num_fds(),
            "rss_mib": round(process.memory_info().rss / 2**20, 1),
            "tasks": metrics.get("tidegate_event_loop_tasks", -1),
            "connections": metrics.get("tidegate_connections_active", -1),
            "tunnels": metrics.get("tidegate_tunnels_active", -1),
        }


def start_gateway(policies: Path, workdir: Path) -> Gateway:
    port, admin = free_port(), free_port()
    command = [
        TIDEGATE,
        "gateway",
        "--policies",
        str(policies),
        "--listen",
        f"{HOST}:{port}",
        "--metrics-listen",
        f"{HOST}:{admin}",
        "--access-log",
        str(workdir / "access.log"),
        "--reload-interval",
        "0.2",
        "--dns-timeout",
        "1",
        "--connect-timeout",
        "1",
        "--working-timeout",
        "3",
        "--idle-timeout",
        "5",
        "--header-timeout",
        "3",
        "--sweep-interval",
        "0.2",
        "--log-level",
        "warning",
    ]
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with (workdir / "stderr.log").open("wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
    gw = Gateway(proc, port, admin)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError((workdir / "stderr.log").read_text())
        with contextlib.suppress(OSError):
            gw.metrics()
            return gw
        time.sleep(0.1)
    raise RuntimeError("the gateway did not start")


# --- traffic ----------------------------------------------------------------------------------


@dataclass
class Tally:
    by_scenario: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    unexplained_5xx: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)


async def _request(port: int, head: bytes) -> tuple[int, str, asyncio.StreamReader, Any]:
    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(head)
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    lines = raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    reason = ""
    for line in lines[1:]:
        if line.lower().startswith("x-tidegate-reason:"):
            reason = line.split(":", 1)[1].strip()
    return status, reason, reader, writer


def _connect(name: str, port: int) -> bytes:
    target = f"{name}.soak.test:{port}"
    return f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode()


async def scenario(kind: str, gw: Gateway, ports: dict[str, int], tally: Tally) -> None:
    if kind == "plain_http":
        host = f"web.soak.test:{ports['web']}"
        head = f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    elif kind == "denied":
        head = _connect("denied", 443)
    elif kind == "refused_upstream":
        head = _connect("closed", ports["closed"])
    elif kind == "timed_out_upstream":
        head = _connect("stuck", ports["stuck"])
    elif kind == "flaky_dns":
        head = _connect("flaky", ports["echo"])
    else:
        upstream = {"tunnel": "echo", "bulk": "bulk", "slow_reader": "chatty", "silent": "silent"}
        head = _connect(upstream[kind], ports[upstream[kind]])
    status, reason, reader, writer = await _request(gw.port, head)
    tally.by_scenario[kind] += 1
    tally.statuses[f"{kind} {status} {reason}".strip()] += 1
    if status >= 500 and (status, reason) not in EXPLAINED_5XX.get(kind, set()):
        tally.unexplained_5xx.append(f"{kind}: {status} {reason}")
    try:
        if status != 200:
            return
        if kind in ("tunnel", "flaky_dns"):
            writer.write(b"ping" * 64)
            assert await asyncio.wait_for(reader.readexactly(256), 5) == b"ping" * 64
        elif kind == "bulk":
            writer.write(b"%d\n" % BULK_BYTES)
            got = 0
            while got < BULK_BYTES:
                chunk = await asyncio.wait_for(reader.read(1 << 20), 10)
                if not chunk:
                    raise ConnectionError(f"bulk ended after {got} bytes")
                got += len(chunk)
        elif kind == "slow_reader":
            writer.write(b"g")
            for _ in range(20):
                await reader.read(2048)
                await asyncio.sleep(0.02)
        elif kind == "silent":
            writer.write(b"hello?")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.3)
        elif kind == "plain_http":
            await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


MIX = (
    ["tunnel"] * 8
    + ["bulk"] * 2
    + ["slow_reader"] * 2
    + ["silent"]
    + ["denied"] * 2
    + ["refused_upstream"]
    + ["timed_out_upstream"]
    + ["flaky_dns"]
    + ["plain_http"] * 2
)


async def traffic(
    gw: Gateway, ports: dict[str, int], tally: Tally, *, until: float, workers: int
) -> None:
    rng = random.Random(9)

    async def worker() -> None:
        while time.monotonic() < until:
            kind = rng.choice(MIX)
            try:
                await scenario(kind, gw, ports, tally)
            except (OSError, EOFError, TimeoutError, AssertionError, ValueError) as exc:
                tally.errors[f"{kind}: {type(exc).__name__}"] += 1

    await asyncio.gather(*(worker() for _ in range(workers)))


async def reloads(directory: Path, dns: DnsServer, ports: dict[str, int], *, until: float) -> int:
    generation = 0
    while time.monotonic() < until:
        await asyncio.sleep(3)
        generation += 1
        write_policies(directory, dns, ports, generation)
    return generation


# --- the run ----------------------------------------------------------------------------------


def run(*, duration: float, workers: int = 8, warmup: float = 5.0) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="tidegate-soak-"))
    dns = DnsServer()
    upstreams = Upstreams()
    ports = upstreams.ports
    for name in (*NAMES, "denied"):
        dns.set(f"{name}.soak.test", [(HOST, 300)])

    def flaky(n: int) -> list[tuple[str, int]]:
        if n % 3 == 2:
            time.sleep(1.5)  # longer than the gateway's DNS timeout: a silent server
        return [(HOST, 1)]

    dns.set("flaky.soak.test", flaky)
    write_policies(work / "policies", dns, ports, 0)
    gw = start_gateway(work / "policies", work)
    tally = Tally()
    try:
        loop_until = time.monotonic() + warmup
        asyncio.run(traffic(gw, ports, Tally(), until=loop_until, workers=workers))
        start = gw.sample()
        until = time.monotonic() + duration

        async def main() -> int:
            _, generations = await asyncio.gather(
                traffic(gw, ports, tally, until=until, workers=workers),
                reloads(work / "policies", dns, ports, until=until),
            )
            return generations

        reloaded = asyncio.run(main())
        time.sleep(2.0)  # let closes, linger and deadlines settle
        end = gw.sample()
        rss_growth = end["rss_mib"] - start["rss_mib"]
        verdicts = {
            "fds": end["fds"] - start["fds"] <= MAX_FD_GROWTH,
            "tasks": end["tasks"] - start["tasks"] <= MAX_TASK_GROWTH,
            "rss": rss_growth <= MAX_RSS_GROWTH_MIB,
            "connections_drained": end["connections"] <= 1 and end["tunnels"] == 0,
            "no_unexplained_5xx": not tally.unexplained_5xx,
            "alive": gw.proc.poll() is None,
        }
        stderr = (work / "stderr.log").read_text()
        verdicts["no_traceback"] = "Traceback" not in stderr
        return {
            "duration_s": duration,
            "workers": workers,
            "requests": sum(tally.by_scenario.values()),
            "by_scenario": dict(tally.by_scenario),
            "statuses": dict(tally.statuses),
            "client_errors": dict(tally.errors),
            "unexplained_5xx": tally.unexplained_5xx[:20],
            "policy_reloads": reloaded,
            "start": start,
            "end": end,
            "rss_growth_mib": round(rss_growth, 1),
            "verdicts": verdicts,
            "ok": all(verdicts.values()),
            "workdir": str(work),
        }
    finally:
        if gw.proc.poll() is None:
            gw.proc.send_signal(signal.SIGTERM)
            try:
                gw.proc.wait(15)
            except subprocess.TimeoutExpired:
                gw.proc.kill()
        upstreams.close()
        dns.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--short", action="store_true", help="60 seconds instead of 30 minutes")
    ap.add_argument("--duration", type=float, default=None, help="seconds (overrides --short)")
    ap.add_argument("--workers", type=int, default=8)
    a = ap.parse_args()
    duration = a.duration if a.duration is not None else (60.0 if a.short else 1800.0)
    report = run(duration=min(duration, 3600.0), workers=min(a.workers, 64))
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
