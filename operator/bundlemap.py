"""The bundle ConfigMap: how a compiled bundle is stored, and read back.

A ConfigMap holds at most 1 MiB. Bundles up to ``PLAIN_LIMIT`` are stored as plain JSON
under ``bundle.json`` (readable with kubectl); larger ones are gzip-compressed under
``binaryData["bundle.json.gz"]``. A bundle that is too large even compressed is not
written at all: the previous one stays in force and the gateway reports BundleTooLarge.
"""

from __future__ import annotations

import base64
import gzip
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tidegate.gateway.bundle import bundle_content, compile_bundle, content_sha256
from tidegate.gateway.model import Gateway, Policy

from .render import (
    ANN_BUNDLE_GENERATION,
    ANN_BUNDLE_SHA,
    BUNDLE_GZ_KEY,
    BUNDLE_KEY,
    Names,
    Owner,
    object_meta,
)

PLAIN_LIMIT = 900 * 1024
STORED_LIMIT = 900 * 1024


class BundleTooLarge(Exception):
    def __init__(self, raw: int, compressed: int) -> None:
        super().__init__(
            f"the bundle is {raw} bytes ({compressed} gzip-compressed), over the "
            f"{STORED_LIMIT}-byte ConfigMap budget; the previous bundle stays in force"
        )
        self.raw = raw
        self.compressed = compressed


@dataclass(frozen=True, slots=True)
class StoredBundle:
    """What a bundle ConfigMap currently holds (from its annotations and data)."""

    sha256: str | None
    generation: int
    payload: bytes | None
    compressed: bool
    resource_version: str | None

    @property
    def raw(self) -> bytes | None:
        if self.payload is None:
            return None
        return gzip.decompress(self.payload) if self.compressed else self.payload


EMPTY = StoredBundle(None, 0, None, False, None)


def read_stored(configmap: Mapping[str, Any] | None) -> StoredBundle:
    if not configmap:
        return EMPTY
    meta = configmap.get("metadata") or {}
    annotations = meta.get("annotations") or {}
    try:
        generation = int(annotations.get(ANN_BUNDLE_GENERATION, 0))
    except (TypeError, ValueError):
        generation = 0
    data = configmap.get("data") or {}
    binary = configmap.get("binaryData") or {}
    payload: bytes | None = None
    compressed = False
    if BUNDLE_KEY in data:
        payload = str(data[BUNDLE_KEY]).encode()
    elif BUNDLE_GZ_KEY in binary:
        try:
            payload = base64.b64decode(binary[BUNDLE_GZ_KEY])
            compressed = True
        except (ValueError, TypeError):
            payload = None
    return StoredBundle(
        sha256=annotations.get(ANN_BUNDLE_SHA),
        generation=generation,
        payload=payload,
        compressed=compressed,
        resource_version=meta.get("resourceVersion"),
    )


@dataclass(frozen=True, slots=True)
class Compiled:
    """A bundle ready to publish (or already published, when ``changed`` is False)."""

    sha256: str
    generation: int
    raw: bytes
    stored: bytes
    compressed: bool
    changed: bool

    @property
    def bytes(self) -> int:
        return len(self.raw)


def compile_for_store(
    gateway: Gateway,
    policies: list[Policy],
    stored: StoredBundle,
    *,
    known_generation: int = 0,
) -> Compiled:
    """Compile; bump the generation only when the content differs from what is stored.

    ``known_generation`` is the generation last reported in the gateway's status, so a
    deleted-and-recreated ConfigMap never makes the generation go backwards. A stored
    payload that differs from what its annotations claim (a hand edit) is rewritten.
    """
    sha = content_sha256(bundle_content(gateway, policies))
    if sha == stored.sha256 and stored.payload is not None:
        raw = compile_bundle(gateway=gateway, policies=policies, generation=stored.generation)
        if stored.raw == raw:
            return Compiled(sha, stored.generation, raw, stored.payload, stored.compressed, False)
    generation = max(stored.generation, known_generation) + 1
    raw = compile_bundle(gateway=gateway, policies=policies, generation=generation)
    if len(raw) <= PLAIN_LIMIT:
        return Compiled(sha, generation, raw, raw, False, True)
    packed = gzip.compress(raw, compresslevel=9, mtime=0)
    if len(packed) > STORED_LIMIT:
        raise BundleTooLarge(len(raw), len(packed))
    return Compiled(sha, generation, raw, packed, True, True)


def render_bundle_configmap(
    names: Names, compiled: Compiled, owner: Owner | None = None
) -> dict[str, Any]:
    meta = object_meta(names, owner, names.bundle)
    meta["annotations"] = {
        ANN_BUNDLE_SHA: compiled.sha256,
        ANN_BUNDLE_GENERATION: str(compiled.generation),
    }
    obj: dict[str, Any] = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
    if compiled.compressed:
        obj["binaryData"] = {BUNDLE_GZ_KEY: base64.b64encode(compiled.stored).decode()}
    else:
        obj["data"] = {BUNDLE_KEY: compiled.stored.decode()}
    return obj
