"""Dialling the destination: the checked addresses in order, each within its own timeout
and all within twice that, answering with the last failure when none connects.

Kept apart from the connection's state machine so it reads as one policy: IPv4 first (the
order admission gives), the next address when one refuses or times out, never a second DNS
lookup (the addresses are exactly the ones the SSRF guard checked).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from .addresses import IPAddress
from .observe import Metrics
from .settings import Limits

P = TypeVar("P", bound=asyncio.BaseProtocol)

REASON_UNREACHABLE = "upstream_unreachable"
REASON_CONNECT_TIMEOUT = "upstream_timeout"


@dataclass(frozen=True, slots=True)
class DialFailure:
    status: int  # 504 for a timeout, 502 for a refusal: the last failure decides
    reason: str
    message: str


async def dial(
    addresses: tuple[IPAddress, ...],
    port: int,
    *,
    factory: Callable[[], P],
    limits: Limits,
    metrics: Metrics,
) -> tuple[P, IPAddress] | DialFailure:
    loop = asyncio.get_running_loop()
    failure = DialFailure(502, REASON_UNREACHABLE, "no address")
    budget_end = time.monotonic() + 2 * limits.connect_timeout
    for address in addresses:
        remaining = min(limits.connect_timeout, budget_end - time.monotonic())
        if remaining <= 0:
            message = "connect budget used up: " + failure.message
            return DialFailure(504, REASON_CONNECT_TIMEOUT, message)
        started = time.monotonic()
        family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
        try:
            async with asyncio.timeout(remaining):  # no extra task, unlike wait_for
                _, protocol = await loop.create_connection(
                    factory, str(address), port, family=family
                )
        except TimeoutError:
            message = f"connect to {hostport(address, port)} timed out"
            failure = DialFailure(504, REASON_CONNECT_TIMEOUT, message)
            continue
        except OSError as exc:
            message = f"connect to {hostport(address, port)}: {exc.strerror or exc}"
            failure = DialFailure(502, REASON_UNREACHABLE, message)
            continue
        metrics.upstream_connect.observe(time.monotonic() - started)
        return protocol, address
    return failure


def hostport(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"
