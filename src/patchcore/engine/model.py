"""The PatchCore model, with scikit-learn's contract: settings in, ``fit`` -> self, state ends in ``_``."""

from __future__ import annotations

import inspect
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from ..errors import ModelFormatError, NotFittedError
from . import network_cache, persistence
from .approximate_search import KINDS as APPROXIMATE_KINDS
from .backbone_specs import BackboneSpec, resolve_spec
from .chunks import CoresetSettings, ChosenBank, in_store_order, merge_chunks, reduce_store
from .coreset import SAMPLERS, Chunking, coreset_size, select_coreset
from .cpus import free_cpus
from .augmentation import ValidRows, augmenter, parse_augment
from .detector import Detector, embed_batches, store_image, training_records, training_store
from .devices import wants_cuda
from .geometry import InputTransform, parse_resize
from .images import ImageSource, expand_sources
from .network_cache import NetworkParts, PatchGraph
from .onnx_network import OnnxNetwork, onnxruntime_available
from .patch_store import ArrayRows, PatchStore
from .prediction import ErrorHandler
from .scoring import parse_aggregation
from .search import BACKENDS
from .self_calibration import CALIBRATIONS, photo_groups
from .settings import DEFAULTS, DEVICES, PRECISIONS, PRESETS, RUNTIMES, ModelSettings, read_settings  # noqa: F401  (PRESETS: API)
from .tiling import TiledEmbedding

#: Modules only the torch half needs (building a graph once per backbone, the GPU, ``runtime="torch"``).
TORCH_MODULES = ("torch", "timm", "torchvision")

#: Training patches drawn (seeded) to measure the scale of normal patch scores after fitting.
REFERENCE_PATCHES = 10_000
#: Training photos that calibrate an int8 network (evenly spaced over the list, always the same:
#: :func:`~patchcore.engine.quantization.calibration_inputs`): each activation's range is the
#: min / max over them, measured in a few seconds (``benchmarks/bench_fit.py --part int8``).
CALIBRATION_PHOTOS = 8


def _torch_half(what: str):
    """:mod:`.embedding` (torch and timm), imported only on the paths that need it; where torch is
    missing, an error saying that it is needed once per backbone, and how to install it."""
    try:
        from . import embedding
    except ImportError as error:
        if (error.name or "").split(".")[0] in TORCH_MODULES:
            raise network_cache.torch_needed(what, error) from None
        raise
    return embedding


#: Why an int8 network cannot run on the GPU or with torch.
_INT8_RUNS_ON_ONNXRUNTIME = ("network_precision 'int8' runs the network with ONNX Runtime on the CPU: use device 'auto' or "
                             "'cpu' and runtime 'auto' or 'onnxruntime' (or network_precision 'float32' on the GPU)")


def _not_built(pixels: np.ndarray) -> np.ndarray:  # pragma: no cover - replaced before any use
    raise RuntimeError("the network is not set up yet")


class EstimatorParams:
    """scikit-learn's estimator protocol: the constructor's arguments are the settings, read with
    :meth:`get_params` and changed with :meth:`set_params`, so that ``sklearn.base.clone`` works.

    Written out rather than inherited from ``sklearn.base.BaseEstimator``: importing scikit-learn
    (and the scipy.stats it pulls in) cost a served model 120 MB of its 345, and scikit-learn is
    not in the base install, which serves saved models.
    """

    @classmethod
    def _get_param_names(cls) -> list[str]:
        parameters = inspect.signature(cls.__init__).parameters.values()
        return sorted(p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The settings by name (``deep`` as in scikit-learn: no setting is itself an estimator)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any):
        """Change settings by name; an unknown name is a ``ValueError``. Returns the estimator."""
        valid = self._get_param_names()
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"Invalid parameter {name!r} for estimator {type(self).__name__}. "
                                 f"Valid parameters are: {valid!r}.")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {p.name: p.default for p in inspect.signature(type(self).__init__).parameters.values()}
        changed = [f"{name}={value!r}" for name, value in self.get_params().items() if repr(value) != repr(defaults[name])]
        return f"{type(self).__name__}({', '.join(changed)})"


class PatchCore(EstimatorParams, Detector):
    """PatchCore anomaly detector (Roth et al., CVPR 2022).

    Fit it on images of good products only; it then scores new images (higher = more anomalous)
    and localises anomalies with a per-pixel map.

    Parameters
    ----------
    backbone: registry name (``efficientnet_lite0``, ``wide_resnet50_2``, ...) or any timm model.
    layers: feature stages to use, shallow to deep (default: the backbone's stride-8/16 stages).
    feature_width: width of the patch features (default per backbone; never wider than its channels).
    neighbourhood: side of the local neighbourhood averaged around each patch (paper: 3).
    coreset_ratio: share of training patches kept in the memory bank, 0.001 to 1 (paper: 0.1).
    max_bank_size: the most vectors the memory bank keeps, whatever the ratio (``None``: no cap). It
        bounds the search time of every prediction and keeps fitting linear in the training set.
    sampler: ``"greedy"`` k-center coreset (the paper's) or ``"random"`` (the paper's baseline).
    projection_dim: dimensions of the random projection used by the coreset selection (paper: 128).
    num_neighbours: ``b`` of the paper's eq. 7 re-weighting (paper: 9); ``reweight=False`` uses the plain maximum.
    aggregation: how an image's patch scores make its score: ``"max"`` (the paper's: the largest, re-weighted
        by eq. 7), ``"top<k>"`` (the mean of the ``k`` largest, each re-weighted) or ``"top<p>%"`` (of the
        largest ``p`` percent of the image's patches).
    resize: the photo's shorter side is resized to this many pixels (aspect ratio kept), or the photo
        to an exact ``(width, height)``, or ``None`` keeps its own size.
    crop: side of a centred square crop after the resize, or ``None`` (default) to inspect the whole
        photo. The paper's protocol is ``resize=256, crop=224`` (:data:`PRESETS` ``"paper"``).
    augment: fill the bank from turned and mirrored copies of every training photo too, for parts that
        lie at any orientation: ``"none"`` (default), ``"flip"`` (mirrored both ways, 4 copies), ``"rot90"``
        (quarter turns, 4), ``"dihedral"`` (both, 8) or ``"rotate<N>"`` (N turns 360/N degrees apart; cells
        outside the turned photo never enter the bank). Teach-in applies it too (:mod:`.augmentation`).
    tile_size, tile_overlap: cut network inputs larger than ``tile_size`` pixels into overlapping
        square tiles (sharing at least ``tile_overlap`` of a side) and stitch their patch features;
        with ``resize=None`` this inspects large photos at their native resolution in bounded memory.
    smoothing_sigma: Gaussian smoothing of the anomaly map, in network-input pixels (paper: 4).
    weights: ``"imagenet"`` (packaged or downloaded), a local state-dict file, or ``"random"``.
    feature_location: timm feature location, e.g. ``"expansion"`` for EfficientNets (default per backbone).
    network_precision: ``"float32"`` (default) or ``"int8"``: the network's convolutions on 8-bit integers
        (ONNX Runtime's static quantisation of the float graph, calibrated at fit on
        :data:`CALIBRATION_PHOTOS` training photos spread over the list; the bank and every later
        photo go through the same int8 graph, which saved models and exports keep). CPU with ONNX
        Runtime only; quantising needs the ``onnx`` package (training extra), running it does not.
    search_backend: ``"auto"``: exact up to 1,000 bank vectors, HNSW above; exact nearest-neighbour search
        with ``"numpy"`` (blocked BLAS products, faster here) or ``"faiss"`` (IndexFlatL2), or approximate
        search with faiss ``"hnsw"`` or ``"ivfpq"`` (faster for large banks, scores may rise slightly; the
        share of exact nearest neighbours found is measured at fit: ``search_recall_``).
    calibration: ``"self"`` (default): at fit, set the image and pixel thresholds from the training
        photos themselves, each of ``calibration_photos`` of them (a seeded sample; ``None``: all)
        scored against the bank without the vectors that came from it (leave one photo out:
        :mod:`.self_calibration`), flagging at most ``max_fpr`` of them and ``max_pixel_fpr`` of
        their pixels; what was done is recorded in ``calibration_``. ``"none"``: no thresholds
        until :meth:`calibrate_threshold` (held-out good photos, which always take precedence) or
        :meth:`set_threshold`.
    device: where the network runs: ``"auto"`` (a GPU when torch sees one, else the CPU; torch is not
        imported where there is no NVIDIA driver), ``"cpu"`` or ``"cuda"``.
    runtime: what runs the network on the CPU: ``"auto"`` (ONNX Runtime when installed: 3-4x faster
        than torch there, same features to 1e-6), ``"onnxruntime"`` or ``"torch"``. ONNX Runtime runs
        the backbone's graph from the network cache (:mod:`.network_cache`): torch and timm are
        imported only to build it, once per backbone and weights.
    threads: CPU threads for the network (default: every core).
    scratch_dir: folder for the training patches while fitting (default: the system's temporary
        folder; a warning says when that is RAM-backed, e.g. tmpfs).
    batch_size, seed, progress: images per forward pass, coreset seed, progress bars.
    """

    def __init__(
        self,
        backbone: str = DEFAULTS["backbone"],
        layers: Sequence[str] | None = DEFAULTS["layers"],
        *,
        feature_width: int | None = DEFAULTS["feature_width"],
        neighbourhood: int = DEFAULTS["neighbourhood"],
        coreset_ratio: float = DEFAULTS["coreset_ratio"],
        max_bank_size: int | None = DEFAULTS["max_bank_size"],
        sampler: str = DEFAULTS["sampler"],
        projection_dim: int = DEFAULTS["projection_dim"],
        num_neighbours: int = DEFAULTS["num_neighbours"],
        reweight: bool = DEFAULTS["reweight"],
        aggregation: str = DEFAULTS["aggregation"],
        resize: int | tuple[int, int] | None = DEFAULTS["resize"],
        crop: int | None = DEFAULTS["crop"],
        augment: str = DEFAULTS["augment"],
        tile_size: int | None = DEFAULTS["tile_size"],
        tile_overlap: float = DEFAULTS["tile_overlap"],
        smoothing_sigma: float = DEFAULTS["smoothing_sigma"],
        weights: str | os.PathLike = DEFAULTS["weights"],
        feature_location: str | None = DEFAULTS["feature_location"],
        network_precision: str = DEFAULTS["network_precision"],
        search_backend: str = DEFAULTS["search_backend"],
        calibration: str = DEFAULTS["calibration"],
        calibration_photos: int | None = DEFAULTS["calibration_photos"],
        max_fpr: float = DEFAULTS["max_fpr"],
        max_pixel_fpr: float = DEFAULTS["max_pixel_fpr"],
        batch_size: int = DEFAULTS["batch_size"],
        seed: int = DEFAULTS["seed"],
        device: str = DEFAULTS["device"],
        runtime: str = DEFAULTS["runtime"],
        threads: int | None = DEFAULTS["threads"],
        scratch_dir: str | os.PathLike | None = DEFAULTS["scratch_dir"],
        progress: bool = DEFAULTS["progress"],
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.feature_width = feature_width
        self.neighbourhood = neighbourhood
        self.coreset_ratio = coreset_ratio
        self.max_bank_size = max_bank_size
        self.sampler = sampler
        self.projection_dim = projection_dim
        self.num_neighbours = num_neighbours
        self.reweight = reweight
        self.aggregation = aggregation
        self.resize = resize
        self.crop = crop
        self.augment = augment
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.smoothing_sigma = smoothing_sigma
        self.weights = weights
        self.feature_location = feature_location
        self.network_precision = network_precision
        self.search_backend = search_backend
        self.calibration = calibration
        self.calibration_photos = calibration_photos
        self.max_fpr = max_fpr
        self.max_pixel_fpr = max_pixel_fpr
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.runtime = runtime
        self.threads = threads
        self.scratch_dir = scratch_dir
        self.progress = progress

    # -- settings ---------------------------------------------------------------------------

    def settings(self) -> ModelSettings:
        """The constructor's settings as the typed record that saved models and exports keep."""
        return ModelSettings.from_params(self.get_params(deep=False))

    def _validate_settings(self) -> None:
        coreset_size(1, self.coreset_ratio, self.max_bank_size)  # raises on an out-of-range ratio or cap
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.num_neighbours < 1:
            raise ValueError(f"num_neighbours must be at least 1, got {self.num_neighbours}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be at least 1, got {self.projection_dim}")
        if self.search_backend not in ("auto",) + BACKENDS + APPROXIMATE_KINDS:
            choices = ", ".join(("auto",) + BACKENDS + APPROXIMATE_KINDS)
            raise ValueError(f"search_backend must be one of {choices}, got {self.search_backend!r}")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must not be negative, got {self.smoothing_sigma}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.network_precision not in PRECISIONS:
            raise ValueError(f"network_precision must be one of {', '.join(PRECISIONS)}, got {self.network_precision!r}")
        if self.network_precision == "int8" and (self.device == "cuda" or self.runtime == "torch"):
            raise ValueError(_INT8_RUNS_ON_ONNXRUNTIME)
        if self.calibration not in CALIBRATIONS:
            raise ValueError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if self.calibration_photos is not None and self.calibration_photos < 2:
            raise ValueError(f"calibration_photos must be at least 2 (or None: all), got {self.calibration_photos}")
        for name in ("max_fpr", "max_pixel_fpr"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        parse_resize(self.resize)  # raises on a bad size
        parse_augment(self.augment)  # raises on an unknown augmentation
        parse_aggregation(self.aggregation)  # raises on an unknown aggregation

    def _reset(self) -> None:
        """Forget everything learned: every attribute ending in ``_``."""
        for name in [name for name in vars(self) if name.endswith("_") and not name.startswith("__")]:
            delattr(self, name)

    def _build(self, spec: BackboneSpec, graph: PatchGraph, torch_network=None) -> None:
        """Set the fitted pieces that follow from the settings and the network's graph;
        ``torch_network`` is the torch module when it was just built (kept if it runs)."""
        self.backbone_spec_ = spec
        self.network_ = graph
        if torch_network is not None:
            self.torch_network_ = torch_network
        self.transform_ = InputTransform(self.resize, self.crop, spec.mean, spec.std, stride=graph.stride, cell=graph.cell)
        self.embedding_ = TiledEmbedding(_not_built, graph.stride, graph.cell, self.tile_size, self.tile_overlap,
                                         self.batch_size)
        self.device_ = self._run_network_on(self.device)
        if self.device_ == "onnxruntime":
            self.__dict__.pop("torch_network_", None)  # not needed: free its memory

    def _patch_graph(self, spec: BackboneSpec) -> tuple[PatchGraph, object]:
        """The graph of the backbone with the model's weights: cached, else built with torch once."""
        def build() -> NetworkParts:
            embedding = _torch_half(f"the network graph of {spec.name} with weights {self.weights!r}")
            return embedding.network_parts(spec, self.weights, self.feature_width, self.neighbourhood)

        return network_cache.patch_graph(spec, self.weights, self.feature_width, self.neighbourhood, build)

    def _int8_graph(self, spec: BackboneSpec, graph: PatchGraph, sources: list, skip_unreadable: bool) -> PatchGraph:
        """The int8 quantisation of float ``graph``, calibrated on :data:`CALIBRATION_PHOTOS` of
        ``sources`` (as the model transforms them; photos that cannot be read are left out when
        ``skip_unreadable``, the fit reports them)."""
        from .quantization import calibration_inputs, quantize_graph

        transform = InputTransform(self.resize, self.crop, spec.mean, spec.std, stride=graph.stride, cell=graph.cell)
        inputs = calibration_inputs(sources, transform, CALIBRATION_PHOTOS, skip_unreadable=skip_unreadable)
        try:
            return graph.derived(quantize_graph(graph.graph_bytes(), inputs))
        except ImportError as error:  # the quantiser needs onnx (training extra); running the int8 graph does not
            raise ImportError(f"network_precision 'int8' needs {error.name} to quantise the network: pip install "
                              "'patchcore[train]' (a saved int8 model runs without it)", name=error.name) from None

    def _torch_network(self):
        """The patch network as a torch module (GPU, ``runtime="torch"``), made from the graph's weights."""
        if not hasattr(self, "torch_network_"):
            embedding = _torch_half("the torch network (device cuda or runtime torch)")
            self.torch_network_ = embedding.network_from_arrays(
                self.backbone_spec_, self.network_.weight_arrays(), self.feature_width, self.neighbourhood,
                f"backbone weights of {self.backbone_spec_.name}")
        return self.torch_network_

    def _run_network_on(self, device: str) -> str:
        """Point the embedding at the network on ``device``; returns what ran: cuda, onnxruntime or torch.
        Only cuda and the torch runtime import torch; an int8 network runs on ONNX Runtime only."""
        if self.network_precision == "int8":
            if device == "cuda" or self.runtime == "torch" or not onnxruntime_available():
                raise ValueError(_INT8_RUNS_ON_ONNXRUNTIME)
            self.embedding_.network = OnnxNetwork(self.network_.graph_bytes(), self.threads)
            return "onnxruntime"
        if wants_cuda(device):
            import torch

            if self.threads is not None:
                torch.set_num_threads(self.threads)
            network = self._torch_network().to("cuda")

            def on_gpu(pixels: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return network(torch.from_numpy(pixels).to("cuda", non_blocking=True)).float().cpu().numpy()

            self.embedding_.network = on_gpu
            return "cuda"
        if self.runtime == "onnxruntime" or (self.runtime == "auto" and onnxruntime_available()):
            self.embedding_.network = OnnxNetwork(self.network_.graph_bytes(), self.threads)
            return "onnxruntime"
        import torch

        if self.threads is not None:
            torch.set_num_threads(self.threads)
        self.embedding_.network = self._torch_network().cpu().numpy
        return "torch"

    def feature_layers(self) -> list[str]:
        """The backbone stages the patch features come from (the backbone's defaults resolved)."""
        return list(self.backbone_spec_.layers)

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, images: ImageSource | Iterable[ImageSource], on_error: ErrorHandler | None = None) -> "PatchCore":
        """Build the memory bank from images of good products: paths, folders, PIL images or arrays.

        Every fitted attribute is reset first. Memory stays bounded whatever the number of images:
        the training patches wait on disk in an anonymous temporary file (:class:`PatchStore`,
        gone when the fit ends, however it ends). A bad image raises :class:`ImageLoadError` naming
        it, unless ``on_error`` takes it (then it is skipped). With ``calibration="self"`` the
        thresholds are then set from the training photos (:meth:`calibrate_from_patches`).
        """
        self._reset()
        with self.extract_patches(images, on_error) as patches:
            self.fit_patches(patches)
            return self.calibrate_from_patches(patches)

    def extract_patches(self, images: ImageSource | Iterable[ImageSource],
                        on_error: ErrorHandler | None = None) -> PatchStore | ValidRows:
        """The patch features of training images, with where each came from, in a :class:`PatchStore`
        (close it when done: ``with model.extract_patches(images) as patches: ...``). With
        ``augment``, every copy of each photo too (a :class:`ValidRows` when turns by other angles
        than quarter turns leave cells outside the photo).

        Loads the backbone first if needed. :meth:`fit` is ``fit_patches(extract_patches(images))``;
        the two steps are public so that experiments can study the patches themselves.
        """
        sources = expand_sources(images)
        timings = self.prepare_network(sources, skip_unreadable=on_error is not None)  # validates the settings
        started = time.perf_counter()
        # With augment, each photo's copies are made as it is decoded and stored as images of their own.
        augment = augmenter(self.augment, self.transform_)
        store = training_store(self.network_.width, augment, self.scratch_dir)
        store.photo_count = len(sources)
        try:
            for batch, features in embed_batches(sources, self.transform_, self.embedding_, self.batch_size,
                                                 progress=self.progress, on_error=on_error, augment=augment):
                for name, grid, placement, key in zip(batch.names, features, batch.placements, batch.keys):
                    store_image(store, name, grid, placement, key)
        except BaseException:
            store.close()
            raise
        if not len(store):
            store.close()
            raise ValueError("no usable training images: every image was skipped")
        timings["features"] = time.perf_counter() - started
        self.extract_timings_ = timings
        return store

    def prepare_network(self, sources: list, skip_unreadable: bool = False) -> dict[str, float]:
        """Set up the backbone's network for the settings, unless done already (int8: calibrated on
        ``sources``, leaving out those that cannot be read when ``skip_unreadable``); returns the
        seconds it took, by step. The first step of :meth:`extract_patches`."""
        self._validate_settings()
        timings: dict[str, float] = {}
        if not hasattr(self, "embedding_"):
            started = time.perf_counter()
            spec = resolve_spec(self.backbone, self.layers, self.feature_location)
            graph, torch_network = self._patch_graph(spec)
            if self.network_precision == "int8":  # every patch, of the bank and of later photos, from this graph
                quantize_started = time.perf_counter()
                graph, torch_network = self._int8_graph(spec, graph, sources, skip_unreadable), None
                timings["quantize"] = time.perf_counter() - quantize_started
            self._build(spec, graph, torch_network)
            timings["backbone_load"] = time.perf_counter() - started - timings.get("quantize", 0.0)
        return timings

    def build_network(self, spec: BackboneSpec, graph: PatchGraph) -> None:
        """Set up the network from a graph made elsewhere (a Ray worker, from the driver's graph)."""
        self._validate_settings()
        self._build(spec, graph)

    def fit_patches(self, patches: PatchStore | ValidRows | np.ndarray, chunking: Chunking = Chunking()) -> "PatchCore":
        """Choose the memory bank from training patches made by :meth:`extract_patches` (or a
        plain feature matrix, whose rows then have no training image to point back to).

        ``chunking``: above ``chunking.exact_limit`` patches the greedy coreset runs per chunk of
        photos, then over the union of the chunks' picks (:mod:`.chunks`): the bank a fit on Ray
        with the same chunking chooses (:mod:`patchcore.fleet.distributed_fit`).
        """
        self._validate_settings()
        if not hasattr(self, "embedding_"):
            raise NotFittedError("fit_patches needs the backbone: call extract_patches(images) first")
        source = ArrayRows(patches) if isinstance(patches, np.ndarray) else patches
        timings = dict(self.extract_timings_) if hasattr(self, "extract_timings_") else {}
        started = time.perf_counter()
        from_images = isinstance(source, (PatchStore, ValidRows))
        if from_images and self.sampler == "greedy" and len(source) > chunking.exact_limit:
            settings, threads = self.coreset_settings(), free_cpus()
            chunk_coresets = reduce_store(source, settings, chunking, REFERENCE_PATCHES, threads)
            merged = merge_chunks(chunk_coresets, settings, self.progress, threads)
            timings["coreset"] = time.perf_counter() - started
            return self.set_fitted_bank(in_store_order(merged, source), timings)
        n_select = coreset_size(len(source), self.coreset_ratio, self.max_bank_size)
        kept = np.sort(select_coreset(source, n_select, self.sampler, self.projection_dim, self.seed, self.progress,
                                      chunking.exact_limit, chunking.chunk_size))
        timings["coreset"] = time.perf_counter() - started
        # The reference: a seeded sample of the training patches (the scale of "normal").
        rng = np.random.default_rng(self.seed)
        reference = source.take(np.sort(rng.choice(len(source), min(len(source), REFERENCE_PATCHES), replace=False)))
        images = None
        if from_images:
            images = training_records(source.image_names, source.image_sizes, source.image_views)
        return self.set_fitted_bank(ChosenBank(source.take(kept), source.origins(kept) if from_images else None, kept,
                                               images, len(source), reference), timings)

    def coreset_settings(self) -> CoresetSettings:
        """The settings the coreset of a chunked fit reads."""
        return CoresetSettings(self.coreset_ratio, self.max_bank_size, self.projection_dim, self.seed)

    def set_fitted_bank(self, bank: ChosenBank, timings: dict[str, float]) -> "PatchCore":
        """End a fit with the bank chosen (here, or by Ray workers and their driver): the index,
        the training images it points back to, and the scale of normal patch scores. Returns self."""
        started = time.perf_counter()
        self.n_training_patches_ = bank.n_patches
        self.coreset_indices_ = np.asarray(bank.indices)
        self._set_memory_bank(bank.memory_bank)
        self._start_bank_state()
        timings["index"] = time.perf_counter() - started
        self.n_training_images_ = None
        if bank.images is not None:  # where each bank vector came from (a photo, or a copy of one): evidence for verdicts
            self.training_images_ = bank.images
            self.memory_bank_origin_ = np.asarray(bank.origins, dtype=np.int32)
            self.n_training_images_ = sum(1 for record in self.training_images_ if "view" not in record)
        # Patch scores of good training patches: the scale of "normal", for comparing models.
        reference_scores = self.score_patches(bank.reference)[0]
        self.search_recall_ = self.search_recall(bank.reference)
        self.normal_patch_score_mean_ = float(reference_scores.mean())
        self.normal_patch_score_std_ = float(max(reference_scores.std(), 1e-12))
        self.fit_timings_ = timings
        return self

    def calibrate_from_patches(self, patches: PatchStore | ValidRows) -> "PatchCore":
        """The last step of :meth:`fit` with ``calibration="self"``: set the thresholds from the
        training photos whose patches ``patches`` holds (those :meth:`fit_patches` just chose the
        bank from), each left out of the bank in turn (:meth:`self_calibrate_threshold`), from the
        stored patches: no second pass through the network. Returns self."""
        return self.calibrate_at_fit(lambda images: (patches.image_grid(i) for i in images))

    def calibrate_at_fit(self, grids: Callable[[list[int]], Iterable[np.ndarray]]) -> "PatchCore":
        """With ``calibration="self"``, :meth:`self_calibrate_threshold` from ``grids`` (the patch
        features of training images by index), timed in ``fit_timings_``; nothing with
        ``calibration="none"`` or fewer than 2 photos. A fit on Ray passes the photos' patches as
        the driver's network makes them again. Returns self."""
        if (self.calibration == "self" and self.memory_bank_origin_ is not None
                and len(photo_groups(self.training_images_)) >= 2):
            started = time.perf_counter()
            self.self_calibrate_threshold(grids)
            self.fit_timings_["calibration"] = time.perf_counter() - started
        return self

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        """Patch features ``(batch, grid height, grid width, width)`` of normalised input pixels."""
        return self.embedding_(np.asarray(pixels, dtype=np.float32))

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, event: dict[str, Any] | None = None,
             keep_versions: int = persistence.KEEP_VERSIONS) -> None:
        """Write the fitted model to ``directory`` (safetensors + JSON) as its new version,
        atomically; ``event`` (``action``, ``who``) is what the directory's history records."""
        self._check_fitted()
        spec = self.backbone_spec_.to_json()
        persistence.write_model(
            directory,
            settings=self.settings().to_json(),
            state={"backbone_spec": spec, "network": self.network_.state(), **self.decision_state(), **self.bank_state()},
            tensors={"memory_bank": self.bank_tensors(), "backbone": self.network_.weight_arrays()},
            # The graph that scores it, so that loading needs no torch (content-addressed: versions share it).
            blobs={"network": (".onnx", self.network_.graph_bytes())},
            event=self.version_event(event),
            keep_versions=keep_versions,
        )

    def _saved_graph(self, directory: str | os.PathLike, spec: BackboneSpec, manifest: dict[str, Any],
                     arrays: dict[str, np.ndarray], paths: dict[str, Path]) -> tuple[PatchGraph, object]:
        """The graph of a saved model: its own (which also fills the network cache), or for models
        saved before they kept it, the cached graph of its backbone weights (built with torch the
        first time)."""
        state = manifest["state"]
        if "network" in paths and state.get("network") is not None:
            graph = PatchGraph.of_saved_model(state["network"], paths["network"], manifest["files"]["network"]["sha256"],
                                              arrays)
            # The cache's copy when it is this graph: files that outlive the model directory, and
            # the weights stay on disk instead of in memory.
            cached = network_cache.remember(graph, {"backbone": spec.name, "from_saved_model": str(directory)})
            return cached or graph, None
        if self.network_precision == "int8":  # written since format 5, which always keeps the graph
            raise ValueError("an int8 model saved without its network graph (network-*.onnx)")

        def build() -> NetworkParts:
            embedding = _torch_half(f"{directory}: saved without its network graph, the graph of {spec.name}")
            return embedding.parts_from_arrays(spec, arrays, self.feature_width, self.neighbourhood,
                                               f"{directory}: backbone weights")

        return network_cache.graph_of_weights(spec, manifest["files"]["backbone"]["sha256"], self.feature_width,
                                              self.neighbourhood, build)

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = None) -> "PatchCore":
        """Read a model written by :meth:`save`; scores are bit-identical to the saved model's.
        ``threads`` overrides the CPU threads of the network. Runs without torch (from the graph
        the model keeps; models saved before it kept one need torch once, then the cache)."""
        manifest, tensors, paths = persistence.read_model(directory)
        if manifest["format"] != persistence.FORMAT_NAME:
            raise ModelFormatError(f"{directory}: an exported model (runs without torch): load it with "
                                   "patchcore.load_model or patchcore.ExportedModel.load")
        try:
            settings, _ = read_settings(manifest["settings"], f"{directory}", manifest["format_version"])
            settings = settings.replace(progress=False, **({"threads": threads} if threads is not None else {}))
            model = cls(**vars(settings))
            state = manifest["state"]
            spec = BackboneSpec.from_json(state["backbone_spec"])
            model._build(spec, *model._saved_graph(directory, spec, manifest, tensors["backbone"], paths))
            model.restore_bank(tensors["memory_bank"], state)
            model.restore_decision_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{directory}: saved model is inconsistent ({type(exc).__name__}: {exc})") from exc
        return model
