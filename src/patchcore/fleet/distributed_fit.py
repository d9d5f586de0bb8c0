"""One model from more photos than one machine can process: the fit on a Ray cluster.

The training photos are cut into chunks of whole photos (:mod:`patchcore.engine.chunks`). Ray
Data hands the chunks to a pool of actors; each actor holds the network once, turns a chunk's
photos into patch features (on its own disk, as the local fit does), reduces them to the patches
greedy keeps of that chunk, and sends back only those, with where each came from and a small
sample for the reference scores. The driver merges the chunks' picks with the same greedy step as
the local chunked fit and finishes the model as a local fit does: the same chunking and seed give
the same bank as ``PatchCore.fit_patches(..., chunking=...)`` on one machine.

Memory stays bounded: a worker holds one chunk at a time, the driver the union of the chunks'
picks (about twice the bank) and the list of training photos. An actor that dies is restarted
and its chunk redone by Ray (Ray Data's actors retry their tasks); a photo that cannot be read is
reported with its address, and left out when the caller takes the error (``on_error``), as in the
local fit.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, replace
from typing import Callable, Iterable

from ..engine.backbone_specs import BackboneSpec
from ..engine.chunks import ChunkCoreset, ChunkPlan, first_photo_rows, merge_chunks, reduce_chunk, store_photo_keys
from ..engine.coreset import Chunking
from ..engine.cpus import free_cpus
from ..engine.model import REFERENCE_PATCHES, PatchCore
from ..engine.settings import ModelSettings
from ..errors import ImageLoadError
from .photo_addresses import photo_addresses, photo_source
from .ray_runtime import connect


class ChunkReducer:
    """A Ray Data actor: holds the network once; turns each chunk of photos into the chunk's coreset."""

    def __init__(self, settings: dict, spec: dict, graph: list, plan: dict, chunking: dict, threads: int) -> None:
        import ray

        record = ModelSettings.from_json(settings, "the driver's settings")
        # The worker's own cores and temporary folder: the driver's folder may not exist here.
        self.model = PatchCore(**vars(record.replace(threads=threads, scratch_dir=None, progress=False)))
        self.model.build_network(BackboneSpec.from_json(spec), ray.get(graph[0]))
        self.plan = ChunkPlan(**plan)
        self.chunking = Chunking(**chunking)
        self.threads = threads

    def __call__(self, batch: dict) -> dict:
        results: dict[str, list] = {"chunk": [], "coreset": [], "errors": [], "timings": []}
        for chunk, addresses in zip(batch["chunk"], batch["addresses"]):
            coreset, errors, timings = reduce_photos(self.model, int(chunk), [str(a) for a in addresses], self.plan,
                                                     self.chunking, self.threads)
            results["chunk"].append(int(chunk))
            results["coreset"].append(coreset.to_bytes())
            results["errors"].append(json.dumps(errors))
            results["timings"].append(json.dumps(timings))
        return results


def reduce_photos(model: PatchCore, chunk: int, addresses: list[str], plan: ChunkPlan, chunking: Chunking,
                  threads: int) -> tuple[ChunkCoreset, list[list[str]], dict]:
    """One chunk: its photos' patches (on this worker's disk), reduced to the chunk's coreset; the
    photos that could not be read as ``[address, problem]``; seconds by step."""
    errors: list[list[str]] = []
    started = time.perf_counter()
    sources = [photo_source(address) for address in addresses]
    try:
        store = model.extract_patches(sources, on_error=lambda error: errors.append([error.source, error.problem]))
    except ValueError:
        if len(errors) != len(addresses):
            raise
        store = None  # every photo of the chunk was bad: an empty chunk
    features = time.perf_counter() - started
    try:
        if store is None:
            coreset = ChunkCoreset.empty(chunk, model.network_.width)
        else:
            keys, _ = store_photo_keys(store)
            coreset = reduce_chunk(store, keys, chunk, plan, model.coreset_settings(), chunking, REFERENCE_PATCHES,
                                   threads, position_offset=plan.photos(chunk).start)
    finally:
        if store is not None:
            store.close()
    return coreset, errors, {"features": features, "coreset": time.perf_counter() - started - features,
                             "photos": len(addresses), "worker": f"{socket.gethostname()}:{os.getpid()}",
                             "peak_rss": _peak_rss_bytes()}


def _peak_rss_bytes() -> int:
    """This process's peak resident memory so far (the worker's, when called in one)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def fit_on_ray(model: PatchCore, images: Iterable[str | os.PathLike], *, address: str | None = None, workers: int = 2,
               cpus_per_worker: int = 1, on_error: Callable[[ImageLoadError], None] | None = None,
               chunking: Chunking = Chunking(), progress: bool = True) -> PatchCore:
    """Fit ``model``'s settings on ``images`` (local files or folders, or URIs that pyarrow reads,
    such as ``s3://bucket/folder``) on Ray; returns a new fitted :class:`PatchCore` (``model`` is
    left as it was). Without ``address`` a local Ray with ``workers * cpus_per_worker`` cores starts.

    ``workers`` actors of ``cpus_per_worker`` cores each reduce chunks of photos; a bad photo
    raises :class:`ImageLoadError` naming it, unless ``on_error`` takes it (then it is left out).
    The coreset is always the chunked one (``chunking``; greedy sampler only). ``fit_timings_``
    says where the time went: ``setup`` (the network and the first photo, on the driver),
    ``chunks`` (wall time of the workers' part) with the seconds the workers spent on
    ``features`` and on ``chunk_coreset``, ``merge``, ``index`` and ``calibration`` (on the driver:
    with ``calibration="self"``, the thresholds from the training photos, as a local fit sets them);
    ``ray_workers_`` what each worker process did: chunks, photos and its peak resident memory.
    """
    fitted = PatchCore(**model.get_params())
    if fitted.sampler != "greedy":
        raise ValueError("a fit on Ray chooses the bank with the greedy sampler (chunk by chunk): sampler 'random' "
                         "draws from every patch at once; fit it on one machine")
    started = time.perf_counter()
    addresses = photo_addresses(images)
    sources = [photo_source(address) for address in addresses]
    fitted.prepare_network(sources, skip_unreadable=on_error is not None)
    plan = ChunkPlan.for_photos(len(addresses), _first_photo_rows(fitted, sources, on_error is not None), chunking)
    timings = {"setup": time.perf_counter() - started}
    ray = connect(address, None if address else workers * cpus_per_worker)
    graph = fitted.network_
    # What the workers need of the network: the graph itself (and the weights where torch runs it).
    portable = replace(graph, graph=graph.graph_bytes(),
                       weights=graph.weight_arrays() if fitted.device_ != "onnxruntime" else {})
    spec = fitted.backbone_spec_.to_json()
    graph_ref = ray.put(portable)  # held here until the fit ends: a restarted actor reads it again
    dataset = ray.data.from_items([{"chunk": chunk, "addresses": [addresses[p] for p in plan.photos(chunk)]}
                                   for chunk in range(plan.n_chunks)])
    reduced = dataset.map_batches(
        ChunkReducer,
        fn_constructor_kwargs={"settings": fitted.settings().to_json(), "spec": spec, "graph": [graph_ref],
                               "plan": asdict(plan), "chunking": asdict(chunking), "threads": cpus_per_worker},
        # No more actors than chunks: each would load the network for nothing.
        compute=ray.data.ActorPoolStrategy(size=min(workers, plan.n_chunks)), num_cpus=cpus_per_worker, batch_size=1,
        batch_format="numpy")
    chunks_started = time.perf_counter()
    coresets, worker_seconds, workers_seen = _gather(reduced, plan, on_error, progress)
    timings["chunks"] = time.perf_counter() - chunks_started
    del graph_ref
    timings.update(worker_seconds)
    merge_started = time.perf_counter()
    merged = merge_chunks(coresets, fitted.coreset_settings(), False, free_cpus())
    timings["merge"] = time.perf_counter() - merge_started
    fitted.set_fitted_bank(merged, timings)
    fitted.ray_workers_ = workers_seen
    # Thresholds from the training photos (calibration "self"): the sampled photos' patches made
    # again by the driver's network (a few dozen photos), as the workers made them.
    return fitted.calibrate_at_fit(lambda images: fitted.photo_grids(
        [photo_source(fitted.training_images_[i]["name"]) for i in images]))


def _gather(reduced, plan: ChunkPlan, on_error: Callable[[ImageLoadError], None] | None,
            progress: bool) -> tuple[list[ChunkCoreset], dict[str, float], dict[str, dict]]:
    """The chunks' coresets as the workers finish them; the bad photos each reports go to
    ``on_error`` (without it, the first raises); the seconds the workers spent, by step; what
    each worker process did."""
    coresets, worker_seconds, workers_seen = [], {"features": 0.0, "chunk_coreset": 0.0}, {}
    for batch in reduced.iter_batches(batch_size=None, batch_format="numpy"):
        for chunk, payload, errors, chunk_timings in zip(batch["chunk"], batch["coreset"], batch["errors"],
                                                          batch["timings"]):
            for source, problem in json.loads(str(errors)):
                error = ImageLoadError(source, problem)
                if on_error is None:
                    raise error
                on_error(error)
            coresets.append(ChunkCoreset.from_bytes(bytes(payload)))
            spent = json.loads(str(chunk_timings))
            worker_seconds["features"] += spent["features"]
            worker_seconds["chunk_coreset"] += spent["coreset"]
            seen = workers_seen.setdefault(spent["worker"], {"chunks": 0, "photos": 0, "peak_rss_bytes": 0})
            seen["chunks"] += 1
            seen["photos"] += spent["photos"]
            seen["peak_rss_bytes"] = max(seen["peak_rss_bytes"], spent["peak_rss"])
            if progress:
                print(f"chunk {int(chunk) + 1} of {plan.n_chunks} reduced ({len(coresets)} done; {spent['photos']} photos, "
                      f"{spent['features']:.1f} s features, {spent['coreset']:.1f} s coreset)", flush=True)
    return coresets, worker_seconds, workers_seen


def _first_photo_rows(model: PatchCore, sources: list, skip_unreadable: bool) -> int:
    """Patches of the first photo that can be read (all its copies): what sizes the chunks, as in
    the local chunked fit. A bad photo before it raises unless skipped (the worker reports it)."""
    for source in sources:
        try:
            store = model.extract_patches([source])
        except ImageLoadError:
            if not skip_unreadable:
                raise
            continue
        with store:
            keys, _ = store_photo_keys(store)
            del model.extract_timings_  # of this one photo, not of the fit
            return first_photo_rows(store, keys)
    raise ValueError("no usable training images: every image was skipped")
