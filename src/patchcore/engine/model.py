"""The PatchCore model, with scikit-learn's contract: settings in, ``fit`` -> self, state ends in ``_``."""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator

from ..errors import ModelFormatError, NotFittedError
from . import persistence
from .approximate_search import KINDS as APPROXIMATE_KINDS
from .backbone_specs import BackboneSpec, resolve_spec
from .backbones import build_network, create_backbone
from .coreset import SAMPLERS, coreset_size, select_coreset
from .detector import Detector, embed_batches, photo_grid
from .embedding import feature_pipeline
from .geometry import parse_resize
from .images import ImageSource, expand_sources
from .onnx_network import OnnxNetwork, export_network, onnxruntime_available
from .patch_store import ArrayRows, PatchStore
from .prediction import ErrorHandler
from .search import BACKENDS
from .settings import DEFAULTS, DEVICES, PRESETS, RUNTIMES, ModelSettings, read_settings  # noqa: F401  (PRESETS: API)
from .weights import load_into

#: Training patches drawn (seeded) to measure the scale of normal patch scores after fitting.
REFERENCE_PATCHES = 10_000

class PatchCore(BaseEstimator, Detector):
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
    resize: the photo's shorter side is resized to this many pixels (aspect ratio kept), or the photo
        to an exact ``(width, height)``, or ``None`` keeps its own size.
    crop: side of a centred square crop after the resize, or ``None`` (default) to inspect the whole
        photo. The paper's protocol is ``resize=256, crop=224`` (:data:`PRESETS` ``"paper"``).
    tile_size, tile_overlap: cut network inputs larger than ``tile_size`` pixels into overlapping
        square tiles (sharing at least ``tile_overlap`` of a side) and stitch their patch features;
        with ``resize=None`` this inspects large photos at their native resolution in bounded memory.
    smoothing_sigma: Gaussian smoothing of the anomaly map, in network-input pixels (paper: 4).
    weights: ``"imagenet"`` (packaged or downloaded), a local state-dict file, or ``"random"``.
    feature_location: timm feature location, e.g. ``"expansion"`` for EfficientNets (default per backbone).
    search_backend: ``"auto"``: exact up to 4,096 bank vectors, HNSW above; exact nearest-neighbour search
        with ``"numpy"`` (blocked BLAS products, faster here) or ``"faiss"`` (IndexFlatL2), or approximate
        search with faiss ``"hnsw"`` or ``"ivfpq"`` (faster for large banks, scores may rise slightly; the
        share of exact nearest neighbours found is measured at fit: ``search_recall_``).
    device: where the network runs: ``"auto"`` (a GPU when torch sees one, else the CPU), ``"cpu"``
        or ``"cuda"``.
    runtime: what runs the network on the CPU: ``"auto"`` (ONNX Runtime when installed: 3-4x faster
        than torch there, same features to 1e-6), ``"onnxruntime"`` or ``"torch"``.
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
        resize: int | tuple[int, int] | None = DEFAULTS["resize"],
        crop: int | None = DEFAULTS["crop"],
        tile_size: int | None = DEFAULTS["tile_size"],
        tile_overlap: float = DEFAULTS["tile_overlap"],
        smoothing_sigma: float = DEFAULTS["smoothing_sigma"],
        weights: str | os.PathLike = DEFAULTS["weights"],
        feature_location: str | None = DEFAULTS["feature_location"],
        search_backend: str = DEFAULTS["search_backend"],
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
        self.resize = resize
        self.crop = crop
        self.tile_size = tile_size
        self.tile_overlap = tile_overlap
        self.smoothing_sigma = smoothing_sigma
        self.weights = weights
        self.feature_location = feature_location
        self.search_backend = search_backend
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
        parse_resize(self.resize)  # raises on a bad size

    def _reset(self) -> None:
        """Forget everything learned: every attribute ending in ``_``."""
        for name in [name for name in vars(self) if name.endswith("_") and not name.startswith("__")]:
            delattr(self, name)

    def _build(self, spec: BackboneSpec, backbone) -> None:
        """Set the fitted pieces that follow from the settings and the backbone."""
        self.backbone_spec_ = spec
        self.backbone_ = backbone
        self.network_, self.embedding_, self.transform_ = feature_pipeline(
            spec, backbone, self.feature_width, self.neighbourhood, self.resize, self.crop,
            self.tile_size, self.tile_overlap, self.batch_size,
        )
        self.device_ = self._run_network_on(self.device)

    def _run_network_on(self, device: str) -> str:
        """Point the embedding at the network on ``device``; returns what ran: cuda, onnxruntime or torch."""
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
            if not torch.cuda.is_available():
                raise ValueError("device 'cuda' was asked for, but torch sees no GPU (torch.cuda.is_available() is False)")
            network = self.network_.to("cuda")

            def on_gpu(pixels: np.ndarray) -> np.ndarray:
                with torch.inference_mode():
                    return network(torch.from_numpy(pixels).to("cuda", non_blocking=True)).float().cpu().numpy()

            self.embedding_.network = on_gpu
            return "cuda"
        if self.runtime == "onnxruntime" or (self.runtime == "auto" and onnxruntime_available()):
            self.embedding_.network = OnnxNetwork(export_network(self.network_.cpu()), self.threads)
            return "onnxruntime"
        self.embedding_.network = self.network_.numpy
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
        it, unless ``on_error`` takes it (then it is skipped).
        """
        self._reset()
        with self.extract_patches(images, on_error) as patches:
            return self.fit_patches(patches)

    def extract_patches(self, images: ImageSource | Iterable[ImageSource], on_error: ErrorHandler | None = None) -> PatchStore:
        """The patch features of training images, with where each came from, in a :class:`PatchStore`
        (close it when done: ``with model.extract_patches(images) as patches: ...``).

        Loads the backbone first if needed. :meth:`fit` is ``fit_patches(extract_patches(images))``;
        the two steps are public so that experiments can study the patches themselves.
        """
        self._validate_settings()
        timings: dict[str, float] = {}
        if not hasattr(self, "embedding_"):
            started = time.perf_counter()
            spec = resolve_spec(self.backbone, self.layers, self.feature_location)
            self._build(spec, create_backbone(spec, self.weights))
            timings["backbone_load"] = time.perf_counter() - started
        sources = expand_sources(images)
        started = time.perf_counter()
        store = PatchStore(self.network_.width, directory=self.scratch_dir)
        sizes = []
        try:
            for batch, features in embed_batches(sources, self.transform_, self.embedding_, self.batch_size,
                                                 progress=self.progress, on_error=on_error):
                for name, grid, placement in zip(batch.names, features, batch.placements):
                    store.append_image(name, photo_grid(grid, placement))
                    sizes.append(list(placement.image_size))
        except BaseException:
            store.close()
            raise
        if not len(store):
            store.close()
            raise ValueError("no usable training images: every image was skipped")
        timings["features"] = time.perf_counter() - started
        store.image_sizes = sizes
        self.extract_timings_ = timings
        return store

    def fit_patches(self, patches: PatchStore | np.ndarray) -> "PatchCore":
        """Choose the memory bank from training patches made by :meth:`extract_patches` (or a
        plain feature matrix, whose rows then have no training image to point back to)."""
        self._validate_settings()
        if not hasattr(self, "embedding_"):
            raise NotFittedError("fit_patches needs the backbone: call extract_patches(images) first")
        source = ArrayRows(patches) if isinstance(patches, np.ndarray) else patches
        timings = dict(self.extract_timings_) if hasattr(self, "extract_timings_") else {}
        started = time.perf_counter()
        n_select = coreset_size(len(source), self.coreset_ratio, self.max_bank_size)
        kept = select_coreset(source, n_select, self.sampler, self.projection_dim, self.seed, self.progress)
        timings["coreset"] = time.perf_counter() - started
        self.n_training_patches_ = len(source)
        self.coreset_indices_ = np.sort(kept)
        started = time.perf_counter()
        self._set_memory_bank(source.take(self.coreset_indices_))
        self._start_bank_state()
        timings["index"] = time.perf_counter() - started
        self.n_training_images_ = len(source.image_names) if isinstance(source, PatchStore) else None
        if isinstance(source, PatchStore):  # where each bank vector came from: evidence for verdicts
            self.training_images_ = [{"name": name, "size": size} for name, size in zip(source.image_names, source.image_sizes)]
            self.memory_bank_origin_ = source.origins(self.coreset_indices_)
        # Patch scores of good training patches: the scale of "normal", for comparing models.
        rng = np.random.default_rng(self.seed)
        reference = source.take(np.sort(rng.choice(len(source), min(len(source), REFERENCE_PATCHES), replace=False)))
        reference_scores = self.score_patches(reference)[0]
        self.search_recall_ = self.search_recall(reference)
        self.normal_patch_score_mean_ = float(reference_scores.mean())
        self.normal_patch_score_std_ = float(max(reference_scores.std(), 1e-12))
        self.fit_timings_ = timings
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
        spec = asdict(self.backbone_spec_)
        spec.pop("notes", None)
        persistence.write_model(
            directory,
            settings=self.settings().to_json(),
            state={"backbone_spec": spec, **self.decision_state(), **self.bank_state()},
            tensors={
                "memory_bank": self.bank_tensors(),
                # Batch-norm step counters only matter for training (and are 0-d, which numpy files widen).
                "backbone": {name: value.detach().cpu().numpy() for name, value in self.backbone_.network.state_dict().items()
                             if not name.endswith("num_batches_tracked")},
            },
            event=self.version_event(event),
            keep_versions=keep_versions,
        )

    @classmethod
    def load(cls, directory: str | os.PathLike, threads: int | None = None) -> "PatchCore":
        """Read a model written by :meth:`save`; scores are bit-identical to the saved model's.
        ``threads`` overrides the CPU threads of the network."""
        manifest, tensors, _ = persistence.read_model(directory)
        if manifest["format"] != persistence.FORMAT_NAME:
            raise ModelFormatError(f"{directory}: an exported model (runs without torch): load it with "
                                   "patchcore.load_model or patchcore.ExportedModel.load")
        try:
            settings, _ = read_settings(manifest["settings"], f"{directory}", manifest["format_version"])
            settings = settings.replace(progress=False, **({"threads": threads} if threads is not None else {}))
            model = cls(**vars(settings))
            state = manifest["state"]
            spec_fields = dict(state["backbone_spec"])
            for key in ("layers", "mean", "std"):
                spec_fields[key] = tuple(spec_fields[key])
            spec = BackboneSpec(**spec_fields)
            backbone = build_network(spec)
            weights = {name: torch.from_numpy(value) for name, value in tensors["backbone"].items()}
            load_into(backbone.network, weights, f"{directory}: backbone weights")
            model._build(spec, backbone)
            model.restore_bank(tensors["memory_bank"], state)
            model.restore_decision_state(state)
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{directory}: saved model is inconsistent ({type(exc).__name__}: {exc})") from exc
        return model
