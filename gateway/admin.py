"""The admin server on its own port: /metrics, /healthz, /readyz, /audit (aiohttp).

``/audit`` is the per-policy record of denied and would-deny destinations (top ``?top=N``,
default 20, at most the record's capacity) as JSON; the operator gathers it from every
Ready gateway pod into the policies' status.

Kept apart from the proxy port so a client of the proxy can never reach it, and so a
saturated proxy port does not make the pod look dead.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .auditrecord import DEFAULT_TOP
from .observe import Metrics
from .state import GatewayState


class _MalformedRequestFilter(logging.Filter):
    """A malformed request on the admin port is the client's fault: aiohttp answers it
    with a 4xx and logs it with a traceback; keep one warning line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            message = " ".join(str(exc.message).split())[:200]
            record.msg = f"{record.getMessage()}: malformed request ({exc.code}): {message}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_FILTER = _MalformedRequestFilter()


def make_admin_app(*, state: GatewayState, metrics: Metrics) -> web.Application:
    server_log = logging.getLogger("aiohttp.server")
    if _FILTER not in server_log.filters:
        server_log.addFilter(_FILTER)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    def not_ready() -> str | None:
        if state.draining:
            return "draining"
        if state.engine is None:
            return "no policy bundle loaded"
        if not state.serving:
            return "no client identities loaded"
        return None

    async def readyz(request: web.Request) -> web.Response:
        why = not_ready()
        if why is not None:
            return web.Response(status=503, text=f"{why}\n")
        return web.Response(text=f"ready: bundle generation {state.generation}\n")

    async def metrics_handler(request: web.Request) -> web.Response:
        metrics.ready.set(0 if not_ready() else 1)  # the same answer as /readyz
        metrics.loop_tasks.set(len(asyncio.all_tasks()))
        body = generate_latest(metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def audit_handler(request: web.Request) -> web.Response:
        text = request.query.get("top", str(DEFAULT_TOP))
        if not (text.isascii() and text.isdigit()):
            return web.Response(status=400, text="top must be a whole number\n")
        top = min(int(text), metrics.audit.capacity)
        report = metrics.audit.report(top=top, now=time.time(), generation=state.generation)
        return web.json_response(report)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/audit", audit_handler)
    return app
