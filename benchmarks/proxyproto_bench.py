#!/usr/bin/env python3
"""What reading a PROXY protocol header costs: new-tunnel rate with and without it.

Runs the real gateway twice on loopback - plain, and with ``--proxy-protocol`` where the
clients connect from 127.0.0.2 (the trusted "load balancer") and prefix each connection with
a v2 header naming 198.51.100.7 - and opens as many short CONNECT tunnels to a local echo
server as it can for ``--duration`` seconds (``--concurrency`` at a time), alternating the two
modes ``--reps`` times. Also times the parser alone. Loopback only, bounded in time.

    .venv/bin/python benchmarks/proxyproto_bench.py [--duration 4] [--reps 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import struct
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

from tidegate.gateway.proxyproto import V2_SIGNATURE, parse_proxy_header

V1 = b"PROXY TCP4 198.51.100.7 10.0.0.5 51000 3128\r\n"
V2 = (
    V2_SIGNATURE
    + b"\x21\x11"
    + struct.pack("!H", 12 + 3 + 23)
    + bytes([198, 51, 100, 7, 10, 0, 0, 5])
    + struct.pack("!HH", 51000, 3128)
    + b"\xea\x00\x17\x01vpce-0123456789abcdef0"  # the TLV an AWS NLB adds
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


async def one_tunnel(proxy: int, target: int, header: bytes, source: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy, local_addr=(source, 0))
    writer.write(header + f"CONNECT 127.0.0.1:{target} HTTP/1.1\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    writer.write(b"x")
    await reader.readexactly(1)
    writer.close()


async def measure(
    proxy: int, target: int, header: bytes, source: str, args: argparse.Namespace
) -> float:
    done = 0
    stop = time.monotonic() + args.duration

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            await one_tunnel(proxy, target, header, source)
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return done / (time.monotonic() - started)


def write_policies(directory: Path, target: int) -> None:
    directory.mkdir()
    (directory / "p.yaml").write_text(
        f"""apiVersion: tidegate.io/v1alpha1
kind: EgressGateway
metadata: {{name: default, namespace: tidegate-system}}
spec:
  clientCIDRs: [127.0.0.0/8, 198.51.100.0/24]
  privateDestinationExceptions: [127.0.0.1/32]
---
apiVersion: tidegate.io/v1alpha1
kind: EgressPolicy
metadata: {{name: bench, namespace: t}}
spec:
  allow: [{{cidr: 127.0.0.1/32, ports: [{target}]}}]
"""
    )


def start_gateway(
    policies: Path, proxy: int, admin: int, work: Path, extra: list[str]
) -> subprocess.Popen[bytes]:
    tidegate = Path(sys.executable).parent / "tidegate"
    proc = subprocess.Popen(
        [str(tidegate), "gateway", "--policies", str(policies), "--listen", f"127.0.0.1:{proxy}",
         "--metrics-listen", f"127.0.0.1:{admin}", "--access-log", str(work / "access.log"),
         "--log-level", "warning", "--shutdown-grace", "2", *extra],
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", proxy)) == 0:
                return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the gateway did not start")


async def run(args: argparse.Namespace) -> None:
    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    target = server.sockets[0].getsockname()[1]
    work = Path(tempfile.mkdtemp(prefix="tidegate-ppbench-"))
    write_policies(work / "policies", target)
    modes = {
        "plain": ([], b"", "127.0.0.1"),
        "proxy-protocol v2": (
            ["--proxy-protocol", "--proxy-protocol-from", "127.0.0.2/32"],
            V2,
            "127.0.0.2",
        ),
    }
    rates: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.reps):
        for name, (extra, header, source) in modes.items():
            proxy, admin = free_port(), free_port()
            proc = start_gateway(work / "policies", proxy, admin, work, extra)
            try:
                rates[name].append(await measure(proxy, target, header, source, args))
            finally:
                proc.terminate()
                await asyncio.to_thread(proc.wait, 15)  # the echo server keeps serving
    server.close()
    for name, values in rates.items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"{name:18} tunnels/s: best {max(values):.0f} (runs: {shown})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    for name, data in (("v1", V1), ("v2 + AWS TLV", V2)):
        n = 50_000
        best = min(
            timeit.repeat(
                lambda d=data: parse_proxy_header(d, max_v2_bytes=4096),
                number=n,
                repeat=5,
                timer=time.process_time,  # CPU time: a busy machine inflates wall time
            )
        )
        print(f"parse {name:13} {best / n * 1e6:.2f} us CPU per header")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
