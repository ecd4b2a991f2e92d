"""Name resolution for the proxy: a real async DNS client with a TTL-bounded cache.

Why not ``getaddrinfo``: it hides TTLs, runs in a thread pool, and cannot be pointed at
a chosen server. We ask A and AAAA in parallel through dnspython, keep each answer for
its TTL clamped to ``[min_ttl, max_ttl]`` (so a 0-second rebinding trick cannot force a
lookup per request, and a week-long TTL cannot pin a moved service), and cache failures
briefly. ``/etc/hosts`` is consulted first when no explicit servers are configured, as
the system resolver would.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from .addresses import IPAddress
from .model import DnsSettings

MAX_CACHE_ENTRIES = 50_000


class ResolveError(Exception):
    """The name has no usable address; ``timeout`` tells a slow server from NXDOMAIN."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(slots=True)
class _Entry:
    addresses: tuple[IPAddress, ...]
    expires: float
    error: str | None = None


def _nameserver(text: str) -> dns.nameserver.Do53Nameserver:
    try:
        ipaddress.ip_address(text)
        return dns.nameserver.Do53Nameserver(text)
    except ValueError:
        host, _, port = text.rpartition(":")
        return dns.nameserver.Do53Nameserver(host.strip("[]"), int(port))


class HostsFile:
    """``/etc/hosts``, re-read when its modification time changes."""

    def __init__(self, path: str = "/etc/hosts", *, check_interval: float = 1.0) -> None:
        self.path = path
        self.check_interval = check_interval
        self._mtime = -1.0
        self._checked = -1e9
        self._table: dict[str, tuple[IPAddress, ...]] = {}

    def lookup(self, name: str) -> tuple[IPAddress, ...]:
        now = time.monotonic()
        if now - self._checked >= self.check_interval:  # one stat a second, not per lookup
            self._checked = now
            try:
                mtime = os.stat(self.path).st_mtime
            except OSError:
                mtime = -2.0
            if mtime != self._mtime:
                self._mtime = mtime
                self._table = self._read() if mtime >= 0 else {}
        return self._table.get(name, ())

    def _read(self) -> dict[str, tuple[IPAddress, ...]]:
        table: dict[str, tuple[IPAddress, ...]] = {}
        try:
            with open(self.path, encoding="utf-8", errors="replace") as f:
                lines = f.readlines()
        except OSError:
            return table
        for line in lines:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            try:
                address = ipaddress.ip_address(fields[0].split("%", 1)[0])
            except ValueError:
                continue
            for name in fields[1:]:
                key = name.lower().rstrip(".")
                table[key] = (*table.get(key, ()), address)
        return table


class Resolver:
    def __init__(
        self,
        settings: DnsSettings,
        *,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        hosts: HostsFile | None = None,
    ) -> None:
        self.settings = settings
        self.timeout = timeout
        self._clock = clock
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Task[tuple[IPAddress, ...]]] = {}
        self._hosts = None if settings.servers else (hosts or HostsFile())
        if settings.servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = [_nameserver(s) for s in settings.servers]
        else:
            try:
                self._resolver = dns.asyncresolver.Resolver()
            except dns.resolver.NoResolverConfiguration:
                self._resolver = dns.asyncresolver.Resolver(configure=False)
                self._resolver.nameservers = ["127.0.0.1"]
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout
        self._resolver.cache = None  # our cache, with our TTL bounds

    def _clamp(self, ttl: float) -> float:
        return min(max(ttl, self.settings.min_ttl), self.settings.max_ttl)

    def cached(self, name: str) -> tuple[IPAddress, ...] | None:
        """Answer from /etc/hosts or a fresh cache entry without awaiting; None on a miss.

        The proxy calls this first so the common case costs no coroutine or task.
        """
        if self._hosts is not None:
            local = self._hosts.lookup(name)
            if local:
                return local
        if self.settings.cache_enabled:
            entry = self._cache.get(name)
            if entry is not None and entry.expires > self._clock():
                if entry.error is not None:
                    raise ResolveError(entry.error)
                return entry.addresses
        return None

    async def resolve(self, name: str) -> tuple[IPAddress, ...]:
        """Addresses for ``name`` (IPv4 first), from cache when fresh.

        Concurrent callers for one name share one lookup. The lookup runs as its own task,
        bounded by the resolver's lifetime, and every caller waits on it through a shield:
        a caller that gives up (its own timeout, its client gone) cancels only its wait,
        never the lookup the others are waiting for.
        """
        found = self.cached(name)
        if found is not None:
            return found
        task = self._inflight.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._lookup(name))
            self._inflight[name] = task
            task.add_done_callback(functools.partial(self._done, name))
        return await asyncio.shield(task)

    def _done(self, name: str, task: asyncio.Task[tuple[IPAddress, ...]]) -> None:
        if self._inflight.get(name) is task:
            del self._inflight[name]
        if not task.cancelled():
            task.exception()  # retrieved: each waiter re-raises it; nobody left is not an error

    async def _lookup(self, name: str) -> tuple[IPAddress, ...]:
        v4, v6 = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        addresses: list[IPAddress] = []
        ttls: list[float] = []
        errors: list[BaseException] = []
        for result in (v4, v6):
            if isinstance(result, BaseException):
                errors.append(result)
                continue
            records, ttl = result
            addresses.extend(records)
            if records:
                ttls.append(ttl)
        if not addresses:
            timeout = any(isinstance(e, dns.exception.Timeout) for e in errors)
            message = f"cannot resolve {name}" + (": DNS timeout" if timeout else "")
            if not timeout and self.settings.cache_enabled:
                self._store(name, _Entry((), self._clock() + self.settings.min_ttl, message))
            raise ResolveError(message, timeout=timeout)
        if self.settings.cache_enabled:
            self._store(name, _Entry(tuple(addresses), self._clock() + self._clamp(min(ttls))))
        return tuple(addresses)

    async def _query(self, name: str, rdtype: str) -> tuple[list[IPAddress], float]:
        try:
            answer = await self._resolver.resolve(name + ".", rdtype, search=False)
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            return [], 0.0
        rrset = answer.rrset
        if rrset is None:
            return [], 0.0
        return [ipaddress.ip_address(r.address) for r in rrset], float(rrset.ttl)

    def _store(self, name: str, entry: _Entry) -> None:
        if len(self._cache) >= MAX_CACHE_ENTRIES:
            now = self._clock()
            for key in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[key]
            if len(self._cache) >= MAX_CACHE_ENTRIES:
                self._cache.pop(next(iter(self._cache)))
        self._cache[name] = entry
