"""Where bundles come from, and how changes are noticed.

- ``DirectorySource``: a folder of EgressPolicy / EgressGateway YAML (standalone mode).
- ``BundleFileSource``: a compiled bundle file, typically a mounted ConfigMap. The kubelet
  updates those by swapping a ``..data`` symlink, so we compare what the path resolves
  to (inode, size, mtime), not the symlink itself.
- ``ConfigMapSource``: in a cluster, watch the bundle ConfigMap through the API server,
  which delivers a change within a second instead of the kubelet's sync period. When the
  API is unreachable the file source keeps working and the last good bundle stays.

Client identities (which pod is behind which address, ``identity.py``) come the same two
ways: ``IdentityFileSource`` reads ClientIdentities files beside the policies (standalone),
``IdentityConfigMaps`` watches the gateway's identities index ConfigMap and its shards
with the same watch loop as the bundle (``ConfigMapWatch``).

Polling (once a second by default) is deliberate for files: it is portable, survives the
directory being replaced wholesale, and costs a few ``stat`` calls. Every source hands
its result to ``GatewayState.apply``; a broken update is rejected there with a log line
and a metric, and the bundle in force stays.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path

import aiohttp

from .addresses import IPAddress
from .bundle import Bundle, compile_bundle, load_bundle, maybe_decompress
from .documents import Documents, PolicyError, merge_documents, parse_documents
from .identity import (
    ClientIdentity,
    IdentityDocument,
    IdentityTable,
    build_table,
    layout_of,
    load_identity_text,
)
from .kubeaccess import KubeAccess
from .model import Gateway
from .state import GatewayState

log = logging.getLogger("tidegate.gateway.sources")

ACCEPT_JSON = {"Accept": "application/json"}


def policy_files(directory: Path) -> list[Path]:
    """``*.yaml`` / ``*.yml`` in the folder and its subfolders, sorted.

    Subfolders are read so that settings meant only for the standalone gateway (the
    ``examples/standalone/`` EgressGateway) can sit next to policies that ``kubectl apply -f
    DIR`` - which does not descend without ``-R`` - applies to a cluster. Hidden names are
    skipped: a mounted ConfigMap's ``..data`` and timestamped folders would repeat files.
    """
    out = []
    for path in directory.rglob("*"):
        relative = path.relative_to(directory).parts
        if any(part.startswith(".") for part in relative):
            continue
        if path.suffix in (".yaml", ".yml") and path.is_file():
            out.append(path)
    return sorted(out)


def read_policy_dir(directory: Path) -> Documents:
    if not directory.is_dir():
        raise NotADirectoryError(f"{directory}: not a directory")
    files = policy_files(directory)
    parts = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        parts.append((str(path), parse_documents(text, source=str(path))))
    return merge_documents(parts)


def bundle_from_documents(docs: Documents, *, generation: int) -> Bundle:
    """Compile folder contents into a bundle exactly as the operator would."""
    gateway = docs.gateway or Gateway()
    data = compile_bundle(gateway=gateway, policies=docs.policies, generation=generation)
    return load_bundle(data, source="<compiled>")


def _signature(paths: list[Path]) -> tuple[tuple[str, int, int, int], ...]:
    out = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


class _Polling:
    """Check a file source every ``interval`` seconds; ``load_once`` does the work."""

    interval: float
    _signature: object = None

    async def load_once(self) -> bool:
        raise NotImplementedError

    async def reload(self) -> bool:
        """Read the source now even if it looks unchanged (SIGHUP)."""
        self._signature = None
        return await self.load_once()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.load_once()


class DirectorySource(_Polling):
    def __init__(self, directory: Path, state: GatewayState, *, interval: float = 1.0) -> None:
        self.directory = directory
        self.state = state
        self.interval = interval
        self._signature: object = None
        self._generation = 0

    def _files(self) -> list[Path]:
        try:
            return policy_files(self.directory)
        except OSError:
            return []

    def _folders(self) -> list[Path]:
        return [self.directory, *sorted({p.parent for p in self._files()})]

    async def load_once(self) -> bool:
        signature = (_signature(self._files()), _signature(self._folders()))
        if signature == self._signature:
            return False
        self._signature = signature
        source = str(self.directory)
        try:
            docs = read_policy_dir(self.directory)
            bundle = bundle_from_documents(docs, generation=self._generation + 1)
        except (PolicyError, OSError, UnicodeDecodeError) as exc:
            self.state.reject(exc, source=source)
            return False
        if bundle.sha256 == self.state.sha256:
            return False
        self._generation += 1
        return await self.state.apply(bundle, source=source)


class BundleFileSource(_Polling):
    def __init__(self, path: Path, state: GatewayState, *, interval: float = 1.0) -> None:
        self.path = path
        self.state = state
        self.interval = interval
        self._signature: object = None

    def _candidates(self) -> list[Path]:
        return [self.path, self.path.with_name(self.path.name + ".gz")]

    async def load_once(self) -> bool:
        signature = _signature(self._candidates())
        if signature == self._signature:
            return False
        self._signature = signature
        for path in self._candidates():
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                self.state.reject(exc, source=str(path))
                return False
            try:
                bundle = load_bundle(data, source=str(path))
            except PolicyError as exc:
                self.state.reject(exc, source=str(path))
                return False
            return await self.state.apply(bundle, source=str(path))
        return False


def bundle_bytes_from_configmap(obj: dict[str, object]) -> bytes | None:
    data = obj.get("data") or {}
    binary = obj.get("binaryData") or {}
    assert isinstance(data, dict) and isinstance(binary, dict)
    if "bundle.json" in data:
        return str(data["bundle.json"]).encode()
    if "bundle.json.gz" in binary:
        return base64.b64decode(str(binary["bundle.json.gz"]))
    return None


class ConfigMapWatch:
    """Watch one ConfigMap with the pod's ServiceAccount (get/list/watch on it only).

    ``_apply`` receives every version of the object the API server sends (the initial
    listing, then each ADDED / MODIFIED event) and ``_deleted`` a deletion; subclasses
    decide what the payload means.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        state: GatewayState,
        *,
        access: KubeAccess,
        retry_interval: float = 1.0,
        max_retry_interval: float = 2.0,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.state = state
        self.access = access
        self.retry_interval = retry_interval
        # Short on purpose: after an API outage the next bundle arrives within seconds.
        self.max_retry_interval = max_retry_interval

    what = "version"

    async def _apply(self, obj: dict[str, object]) -> None:
        raise NotImplementedError

    async def _deleted(self) -> None:
        return None

    async def run(self) -> None:
        url = f"{self.access.server}/api/v1/namespaces/{self.namespace}/configmaps"
        selector = f"metadata.name={self.name}"
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=330)
        delay = self.retry_interval
        while True:
            try:
                async with self.access.session(timeout=timeout, limit=2) as session:
                    params = {"fieldSelector": selector}
                    async with session.get(url, params=params, headers=ACCEPT_JSON) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"list: HTTP {resp.status} {await resp.text()}")
                        listing = await resp.json()
                    for item in listing.get("items", []):
                        await self._apply(item)
                    version = listing["metadata"]["resourceVersion"]
                    params = {
                        "fieldSelector": selector,
                        "watch": "1",
                        "resourceVersion": version,
                        "allowWatchBookmarks": "true",
                        "timeoutSeconds": "300",
                    }
                    async with session.get(url, params=params, headers=ACCEPT_JSON) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"watch: HTTP {resp.status}")
                        async for line in resp.content:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            if event.get("type") in ("ADDED", "MODIFIED"):
                                await self._apply(event["object"])
                            elif event.get("type") == "DELETED":
                                await self._deleted()
                            elif event.get("type") == "ERROR":
                                break  # e.g. 410 Gone: list again
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "watching configmap %s/%s failed (%s); the last good %s stays in force;"
                    " retrying in %.0fs",
                    self.namespace,
                    self.name,
                    exc,
                    self.what,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_retry_interval)
                continue
            delay = self.retry_interval


class ConfigMapSource(ConfigMapWatch):
    """The bundle ConfigMap."""

    what = "bundle"

    async def _apply(self, obj: dict[str, object]) -> None:
        source = f"configmap {self.namespace}/{self.name}"
        data = bundle_bytes_from_configmap(obj)
        if data is None:
            self.state.reject(PolicyError("no bundle.json key"), source=source)
            return
        try:
            bundle = load_bundle(data, source=source)
        except PolicyError as exc:
            self.state.reject(exc, source=source)
            return
        await self.state.apply(bundle, source=source)


# --- client identities ----------------------------------------------------------------------

IDENTITIES_KEY = "identities.json"
IDENTITIES_GZ_KEY = "identities.json.gz"


def identity_bytes_from_configmap(obj: dict[str, object]) -> bytes | None:
    data = obj.get("data") or {}
    binary = obj.get("binaryData") or {}
    assert isinstance(data, dict) and isinstance(binary, dict)
    if IDENTITIES_KEY in data:
        return str(data[IDENTITIES_KEY]).encode()
    if IDENTITIES_GZ_KEY in binary:
        return maybe_decompress(base64.b64decode(str(binary[IDENTITIES_GZ_KEY])))
    return None


#: Standalone identities files: YAML, but not a Kubernetes object, so not ``.yaml`` (which
#: ``kubectl apply -R -f`` would try to apply).
IDENTITIES_SUFFIX = ".identities"


def _identity_files(path: Path) -> list[Path]:
    """One file, or a folder's ``*.identities``, ``*.json`` and policy files with
    subfolders (hidden ones skipped, as for policies)."""
    if path.is_file():
        return [path]
    try:
        found = policy_files(path)
        for extra in path.rglob("*"):
            relative = extra.relative_to(path).parts
            if any(part.startswith(".") for part in relative):
                continue
            if extra.suffix in (IDENTITIES_SUFFIX, ".json") and extra.is_file():
                found.append(extra)
        return sorted(found)
    except OSError:
        return []


def read_identity_files(path: Path) -> list[IdentityDocument]:
    """Every ClientIdentities document in ``path`` (other kinds, e.g. policies, skipped)."""
    docs: list[IdentityDocument] = []
    for file in _identity_files(path):
        docs.extend(load_identity_text(file.read_bytes(), source=str(file), others=True))
    return docs


def complete_layout(docs: list[IdentityDocument]) -> list[IdentityDocument] | None:
    """Hand-written files are used as they are; the operator's sharded files (an index with
    ``shards`` and its shards) only when every shard of the index's layout is there - the
    kubelet updates the files one ConfigMap at a time. None: not complete yet."""
    index = next((d for d in docs if d.shard is None and d.shards is not None), None)
    if index is None:
        return docs
    count = index.shards or 1
    shards = {d.shard: d for d in docs if d.shard is not None and d.shards == count}
    if len(shards) != count:
        return None
    return [index, *(shards[i] for i in range(count))]


class IdentityFileSource(_Polling):
    """ClientIdentities files (a folder or one file): standalone mode's client identities.

    A broken file is rejected with a log line and the identities in force stay; a folder
    that disappears leaves an empty table (every client unknown: fail closed).
    """

    def __init__(self, path: Path, state: GatewayState, *, interval: float = 1.0) -> None:
        self.path = path
        self.state = state
        self.interval = interval
        self._signature: object = None
        self._generation = 0

    async def load_once(self) -> bool:
        signature = (_signature(_identity_files(self.path)), _signature([self.path]))
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            found = read_identity_files(self.path)
        except (PolicyError, OSError, UnicodeDecodeError) as exc:
            self.state.reject_identities(exc, source=str(self.path))
            return False
        docs = complete_layout(found)
        if docs is None:
            log.debug("identities in %s: the shard layout is incomplete; waiting", self.path)
            return False
        published = max((d.generation for d in docs), default=0)
        if published:  # the operator's files: its generations order them with the API's
            if self.state.identities_loaded and published <= self.state.identities.generation:
                return False
            generation = published
        else:  # hand-written: every change is newer
            self._generation += 1
            generation = self._generation
        return self.state.install_identities(
            build_table(docs, generation=generation), source=str(self.path)
        )


class _IdentityWatch(ConfigMapWatch):
    what = "identity table"

    def __init__(self, owner: IdentityConfigMaps, name: str, shard: int | None) -> None:
        super().__init__(
            owner.namespace,
            name,
            owner.state,
            access=owner.access,
            retry_interval=owner.retry_interval,
        )
        self.owner = owner
        self.shard = shard

    async def _apply(self, obj: dict[str, object]) -> None:
        source = f"configmap {self.namespace}/{self.name}"
        data = identity_bytes_from_configmap(obj)
        try:
            if data is None:
                raise PolicyError(f"no {IDENTITIES_KEY} key", source=source)
            docs = load_identity_text(data, source=source)
            if len(docs) != 1:
                raise PolicyError("expected exactly one ClientIdentities document", source=source)
        except (PolicyError, OSError, EOFError) as exc:
            self.state.reject_identities(exc, source=source)
            return
        self.owner.received(self.shard, docs[0], source=source)

    async def _deleted(self) -> None:
        self.owner.dropped(self.shard)


_Built = tuple[IdentityDocument, IdentityDocument, dict[IPAddress, ClientIdentity]]


class IdentityConfigMaps:
    """The identities index ConfigMap ``<name>`` and its shards ``<name>-<i>``.

    The index carries the namespaces' labels and the shard count; each shard the pods
    whose addresses hash to it (``identity.shard_of``). A table is installed only when the
    index and every shard of the index's layout are present, so a change of shard count
    never serves a half-built table; until then the previous table stays. Each document
    carries a generation; an older one than what is held is ignored.
    """

    def __init__(
        self,
        namespace: str,
        name: str,
        state: GatewayState,
        *,
        access: KubeAccess,
        retry_interval: float = 1.0,
    ) -> None:
        self.namespace = namespace
        self.name = name
        self.state = state
        self.access = access
        self.retry_interval = retry_interval
        self.index: IdentityDocument | None = None
        self.shards: dict[int, IdentityDocument] = {}
        self._watches: dict[int, asyncio.Task[None]] = {}
        # shard -> (the index and shard documents it was built from, its entries)
        self._built: dict[int | None, _Built] = {}

    def shard_name(self, shard: int) -> str:
        return f"{self.name}-{shard}"

    def received(self, shard: int | None, doc: IdentityDocument, *, source: str) -> None:
        held = self.index if shard is None else self.shards.get(shard)
        if held is not None and doc.generation < held.generation:
            self.state.metrics.identity_reloads.labels("stale").inc()
            return
        if shard is None:
            self.index = doc
            self._follow(doc.shards or 1)
        else:
            self.shards[shard] = doc
        self._install(source)

    def dropped(self, shard: int | None) -> None:
        if shard is not None:
            self.shards.pop(shard, None)

    def _follow(self, count: int) -> None:
        for shard in range(count):
            if shard not in self._watches:
                watch = _IdentityWatch(self, self.shard_name(shard), shard)
                self._watches[shard] = asyncio.create_task(
                    watch.run(), name=f"identities {self.shard_name(shard)}"
                )
        for shard in [s for s in self._watches if s >= count]:
            self._watches.pop(shard).cancel()
            self.shards.pop(shard, None)

    def _install(self, source: str) -> None:
        index = self.index
        if index is None:
            return
        count = index.shards or 1
        parts = [self.shards.get(i) for i in range(count)]
        complete = [p for p in parts if p is not None and (p.shards or 1) == count]
        if len(complete) != count:
            return  # wait for the rest of this layout; the table in force stays
        generation = max(d.generation for d in (index, *complete))
        if generation <= self.state.identities.generation and self.state.identities_loaded:
            return
        # Per shard, the identities are built once (again only when the shard or the
        # index - namespace labels - changes); a pod churning costs one shard's rebuild
        # and one dict merge, not the whole table. An address lives in one shard only
        # (parse_identities checks it), so the merge never hides a conflict.
        merged: dict[IPAddress, ClientIdentity] = {}
        for doc in complete:
            built = self._built.get(doc.shard)
            if built is None or built[0] is not index or built[1] is not doc:
                built = (index, doc, dict(build_table([index, doc]).by_address))
                self._built[doc.shard] = built
            merged.update(built[2])
        table = IdentityTable(
            merged,
            generation=generation,
            namespaces=index.namespaces,
            layout=layout_of([index, *complete]),
        )
        self.state.install_identities(table, source=source)

    async def run(self) -> None:
        index = _IdentityWatch(self, self.name, None)
        try:
            await index.run()
        finally:
            for task in self._watches.values():
                task.cancel()
            await asyncio.gather(*self._watches.values(), return_exceptions=True)
