"""One JSON log shape for every line Tidegate writes: gateway logs, access log, operator.

Each line is one JSON object that starts with the same four fields::

    {"time":"2026-12-02T13:57:09.123Z","level":"info","logger":"tidegate.gateway","msg":"..."}

``time`` is RFC 3339 / ISO 8601 in UTC with milliseconds, which Elasticsearch's default
date detection and Loki's ``timestamp`` stage (format ``RFC3339``) read as a time without
further configuration. Access lines carry the same four fields (logger
``tidegate.access``, msg ``access``) followed by the access record; operator lines about a
Kubernetes object add ``object`` (apiVersion, kind, namespace, name, uid); a traceback goes
in ``error``. The field names are the constants below and nowhere else.
"""

from __future__ import annotations

import datetime
import json
import logging
import sys
from typing import IO, Any

TIME = "time"
LEVEL = "level"
LOGGER = "logger"
MESSAGE = "msg"
OBJECT = "object"
ERROR = "error"

ACCESS_LOGGER = "tidegate.access"
ACCESS_MESSAGE = "access"

_second: int | None = None
_prefix = ""


def iso_time(epoch: float) -> str:
    """``2026-12-02T13:57:09.123Z`` for a Unix time (the second's prefix is cached)."""
    global _second, _prefix
    second = int(epoch)
    if second != _second:
        moment = datetime.datetime.fromtimestamp(second, datetime.UTC)
        _prefix = moment.strftime("%Y-%m-%dT%H:%M:%S")
        _second = second
    millis = min(int((epoch - second) * 1000), 999)
    return f"{_prefix}.{millis:03d}Z"


def epoch_of(value: object) -> float | None:
    """A line's time as a Unix time: the ``time`` string, or an older line's epoch ``ts``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    return None


def head(epoch: float, level: str, logger: str, message: str) -> dict[str, Any]:
    """The four fields every line starts with, in order."""
    return {TIME: iso_time(epoch), LEVEL: level, LOGGER: logger, MESSAGE: message}


def access_prefix(epoch: float) -> str:
    """The JSON text an access line starts with (up to and including the comma)."""
    return (
        f'{{"{TIME}":"{iso_time(epoch)}","{LEVEL}":"info","{LOGGER}":"{ACCESS_LOGGER}",'
        f'"{MESSAGE}":"{ACCESS_MESSAGE}",'
    )


class JsonLogFormatter(logging.Formatter):
    """Python logging records in the shape above (kopf's object reference as ``object``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = head(record.created, record.levelname.lower(), record.name, record.getMessage())
        ref = getattr(record, "k8s_ref", None)
        if isinstance(ref, dict) and ref:
            out[OBJECT] = {k: v for k, v in ref.items() if v is not None}
        if record.exc_info:
            out[ERROR] = self.formatException(record.exc_info)
        return json.dumps(out, separators=(",", ":"), default=str)


def configure_logging(level: str, stream: IO[str] | None = None) -> None:
    """Root logging to ``stream`` (stderr) in the shared shape."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def use_shared_shape() -> None:
    """Put the shared formatter on every root handler (after kopf installed its own)."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonLogFormatter())


__all__ = [
    "ERROR",
    "LEVEL",
    "LOGGER",
    "MESSAGE",
    "OBJECT",
    "TIME",
    "JsonLogFormatter",
    "access_prefix",
    "configure_logging",
    "epoch_of",
    "iso_time",
    "use_shared_shape",
]
