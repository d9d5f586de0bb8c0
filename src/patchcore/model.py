"""The PatchCore model, with scikit-learn's contract: settings in, ``fit`` -> self, state ends in ``_``."""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from . import persistence
from .backbones import (
    DEFAULT_BACKBONE,
    IMAGENET_WEIGHTS,
    Backbone,
    BackboneSpec,
    build_network,
    create_backbone,
    resolve_spec,
)
from .coreset import coreset_size, greedy_coreset
from .errors import ImageLoadError, ModelFormatError, NotFittedError
from .features import PatchFeatures
from .embedding import PatchEmbedder
from .geometry import InputTransform, Placement, parse_resize
from .images import ImageSource, LoadedBatch, expand_sources, iterate_batches
from .scoring import anomaly_map, reweighted_image_score
from .approximate_search import KINDS as APPROXIMATE_KINDS
from .approximate_search import ApproximateIndex
from .search import BACKENDS, MemoryBankIndex
from .weights import load_into


def feature_pipeline(
    spec: BackboneSpec,
    backbone: Backbone,
    feature_width: int | None,
    neighbourhood: int,
    resize: int | tuple[int, int] | None,
    crop: int | None,
    tile_size: int | None = None,
    tile_overlap: float = 0.25,
    batch_size: int = 8,
) -> tuple[PatchEmbedder, InputTransform]:
    """The patch embedder and the input transform for ``backbone`` (width ``None``: the spec's default)."""
    width = feature_width if feature_width is not None else spec.feature_width
    embedder = PatchEmbedder(backbone, PatchFeatures(backbone.channels, width, neighbourhood), tile_size, tile_overlap, batch_size)
    return embedder, InputTransform(resize, crop, spec.mean, spec.std, stride=embedder.stride)


#: Training patches drawn (seeded) to measure the scale of normal patch scores after fitting.
REFERENCE_PATCHES = 10_000

#: Named settings one option away (``--preset``). ``paper``: the paper's MVTec AD protocol, shorter
#: side 256 and a centred 224x224 crop with a 10% memory bank, for figures comparable with the paper's.
PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"resize": 256, "crop": 224, "coreset_ratio": 0.1},
}

#: Receives each image that could not be read, instead of the error being raised.
ErrorHandler = Callable[[ImageLoadError], None]


@dataclass
class Prediction:
    """The result for one image."""

    name: str
    #: Image anomaly score (eq. 7 re-weighted maximum patch distance, or the plain maximum).
    score: float
    #: Per-pixel anomaly scores at the image's original size (height, width), float32.
    anomaly_map: np.ndarray | None
    #: Distances of each patch to the memory bank on the feature grid (grid height, grid width).
    patch_scores: np.ndarray
    #: Seconds spent per stage for this image (its share of the batch).
    timings: dict[str, float] = field(default_factory=dict)
    #: ``score >= threshold`` when the model has a threshold, else ``None``.
    is_anomalous: bool | None = None
    #: Pixels whose anomaly score reaches the pixel threshold (with a threshold and a map), else ``None``.
    mask: np.ndarray | None = None
    #: Where the network input came from in the photo (to make the map later without the photo).
    placement: Placement | None = None


class PatchCore:
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
    search_backend: exact nearest-neighbour search with ``"torch"`` (faster here) or ``"faiss"`` (IndexFlatL2),
        or approximate search with faiss ``"hnsw"`` or ``"ivfpq"`` (faster for large banks, scores may rise slightly).
    batch_size, seed, progress: images per forward pass, coreset seed, progress bars.
    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] | None = None,
        *,
        feature_width: int | None = None,
        neighbourhood: int = 3,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_neighbours: int = 9,
        reweight: bool = True,
        resize: int | tuple[int, int] | None = 256,
        crop: int | None = None,
        tile_size: int | None = None,
        tile_overlap: float = 0.25,
        smoothing_sigma: float = 4.0,
        weights: str | os.PathLike = IMAGENET_WEIGHTS,
        feature_location: str | None = None,
        search_backend: str = "torch",
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.feature_width = feature_width
        self.neighbourhood = neighbourhood
        self.coreset_ratio = coreset_ratio
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
        self.progress = progress

    # -- settings ---------------------------------------------------------------------------

    def get_params(self) -> dict[str, Any]:
        """The constructor's settings, as scikit-learn's ``get_params``."""
        names = list(inspect.signature(type(self).__init__).parameters)[1:]
        params = {name: getattr(self, name) for name in names}
        params["layers"] = list(params["layers"]) if params["layers"] is not None else None
        params["weights"] = str(params["weights"])
        return params

    def __repr__(self) -> str:
        return f"PatchCore(backbone={self.backbone!r}, coreset_ratio={self.coreset_ratio})"

    def _validate_settings(self) -> None:
        coreset_size(1, self.coreset_ratio)  # raises on an out-of-range ratio
        if self.num_neighbours < 1:
            raise ValueError(f"num_neighbours must be at least 1, got {self.num_neighbours}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.projection_dim < 1:
            raise ValueError(f"projection_dim must be at least 1, got {self.projection_dim}")
        if self.search_backend not in BACKENDS + APPROXIMATE_KINDS:
            raise ValueError(f"search_backend must be one of {', '.join(BACKENDS + APPROXIMATE_KINDS)}, got {self.search_backend!r}")
        if self.smoothing_sigma < 0:
            raise ValueError(f"smoothing_sigma must not be negative, got {self.smoothing_sigma}")
        parse_resize(self.resize)  # raises on a bad size

    def _build(self, spec: BackboneSpec, backbone: Backbone) -> None:
        """Set the fitted pieces that follow from the settings and the backbone."""
        self.backbone_spec_ = spec
        self.backbone_ = backbone
        self.embedder_, self.transform_ = feature_pipeline(
            spec, backbone, self.feature_width, self.neighbourhood, self.resize, self.crop,
            self.tile_size, self.tile_overlap, self.batch_size,
        )

    # -- fitting ----------------------------------------------------------------------------

    def fit(self, images: ImageSource | Iterable[ImageSource], on_error: ErrorHandler | None = None) -> "PatchCore":
        """Build the memory bank from images of good products: paths, folders, PIL images or arrays.

        A bad image raises :class:`ImageLoadError` naming it, unless ``on_error`` takes it (then it is skipped).
        """
        self._validate_settings()
        sources = expand_sources(images)
        timings: dict[str, float] = {}
        started = time.perf_counter()
        spec = resolve_spec(self.backbone, self.layers, self.feature_location)
        self._build(spec, create_backbone(spec, self.weights))
        timings["backbone_load"] = time.perf_counter() - started

        started = time.perf_counter()
        features = None
        filled = used_images = 0
        for batch, batch_features in self._embed_batches(sources, "features", on_error):
            flat = batch_features.reshape(-1, batch_features.shape[-1]).numpy()
            if features is None:  # sized from the first batch: peak memory stays near the feature matrix
                per_image = len(flat) // len(batch.names)
                features = np.empty((len(sources) * per_image, flat.shape[1]), dtype=np.float32)
            if filled + len(flat) > len(features):  # photos of other sizes: grow geometrically
                grown = np.empty((max(filled + len(flat), int(len(features) * 1.5)), flat.shape[1]), dtype=np.float32)
                grown[:filled] = features[:filled]
                features = grown
            features[filled : filled + len(flat)] = flat
            filled += len(flat)
            used_images += len(batch.names)
        timings["features"] = time.perf_counter() - started
        if features is None:
            raise ValueError("no usable training images: every image was skipped")
        features = features[:filled]

        started = time.perf_counter()
        kept = greedy_coreset(features, self.coreset_ratio, self.projection_dim, self.seed, self.progress)
        timings["coreset"] = time.perf_counter() - started
        self.n_training_images_ = used_images
        self.n_training_patches_ = features.shape[0]
        memory_bank = features[np.sort(kept)]
        rng = np.random.default_rng(self.seed)
        reference = features[np.sort(rng.choice(len(features), min(len(features), REFERENCE_PATCHES), replace=False))]
        del features

        started = time.perf_counter()
        self._set_memory_bank(memory_bank)
        timings["index"] = time.perf_counter() - started
        # Patch scores of good training patches: the scale of "normal", for comparing models.
        reference_scores = self.score_patches(reference)[0]
        self.normal_patch_score_mean_ = float(reference_scores.mean())
        self.normal_patch_score_std_ = float(max(reference_scores.std(), 1e-12))
        self.fit_timings_ = timings
        return self

    def _set_memory_bank(self, memory_bank: np.ndarray) -> None:
        self.memory_bank_ = np.ascontiguousarray(memory_bank, dtype=np.float32)
        if self.search_backend in APPROXIMATE_KINDS:
            self.index_ = ApproximateIndex(self.memory_bank_, self.search_backend, seed=self.seed)
        else:
            self.index_ = MemoryBankIndex(self.memory_bank_, self.search_backend)

    # -- inference --------------------------------------------------------------------------

    def _check_fitted(self) -> None:
        if not hasattr(self, "memory_bank_"):
            raise NotFittedError(
                "this PatchCore model is not fitted yet: call fit(good_images) or PatchCore.load(model_dir) first"
            )

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch features ``(batch, grid height, grid width, width)`` of normalised input pixels."""
        return self.embedder_(pixels)

    def _embed_batches(
        self, sources: list[ImageSource], description: str, on_error: ErrorHandler | None = None
    ) -> Iterator[tuple[LoadedBatch, torch.Tensor]]:
        batches = iterate_batches(sources, self.transform_, self.batch_size, on_error=on_error)
        with tqdm(total=len(sources), desc=description, unit="img", disable=not self.progress) as bar:
            for batch in batches:
                yield batch, self.embed(batch.pixels)
                bar.update(len(batch.names))

    def score_patches(self, patch_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance of each patch ``(P, D)`` to its nearest memory-bank vector, and that vector's index."""
        self._check_fitted()
        distances, indices = self.index_.search(patch_features, 1)
        return distances[:, 0], indices[:, 0]

    def image_score(self, patch_scores: np.ndarray, nearest: np.ndarray, patch_features: np.ndarray) -> float:
        """Image score from one image's patch scores (eq. 7, or the maximum when ``reweight`` is off)."""
        if not self.reweight:
            return float(patch_scores.max())
        return float(reweighted_image_score(patch_scores, nearest, patch_features, self.index_, self.num_neighbours))

    def predict(
        self, images: ImageSource | Iterable[ImageSource], maps: bool = True, on_error: ErrorHandler | None = None
    ) -> list[Prediction]:
        """Score images; with ``maps`` also return each anomaly map at the image's original size.

        A bad image raises :class:`ImageLoadError` naming it, unless ``on_error`` takes it (then it is skipped).
        """
        self._check_fitted()
        return list(self.iter_predict(images, maps, on_error))

    def iter_predict(
        self, images: ImageSource | Iterable[ImageSource], maps: bool = True, on_error: ErrorHandler | None = None
    ) -> Iterator[Prediction]:
        """As :meth:`predict`, one result at a time, so that long runs keep what is done."""
        self._check_fitted()
        sources = expand_sources(images)
        started = time.perf_counter()
        for batch, batch_features in self._embed_batches(sources, "predict", on_error):
            backbone_seconds = (time.perf_counter() - started) / len(batch.names)
            features = batch_features.numpy()
            for i, name in enumerate(batch.names):
                patch_features = features[i].reshape(-1, features.shape[-1])
                t0 = time.perf_counter()
                patch_scores, nearest = self.score_patches(patch_features)
                score = self.image_score(patch_scores, nearest, patch_features)
                t1 = time.perf_counter()
                grid = patch_scores.reshape(features.shape[1:3])
                placement = batch.placements[i]
                pixel_map = anomaly_map(grid, placement, self.smoothing_sigma) if maps else None
                t2 = time.perf_counter()
                timings = {"backbone": backbone_seconds, "search": t1 - t0, "map": t2 - t1}
                yield self._decide(Prediction(name, score, pixel_map, grid, timings, placement=placement))
            started = time.perf_counter()

    def anomaly_map_of(self, prediction: Prediction) -> np.ndarray:
        """The anomaly map of a prediction made with ``maps=False``, over its whole photo."""
        self._check_fitted()
        if prediction.placement is None:
            raise ValueError(f"{prediction.name}: the prediction does not say where its input came from")
        return anomaly_map(prediction.patch_scores, prediction.placement, self.smoothing_sigma)

    # -- decisions ----------------------------------------------------------------------------

    def set_threshold(self, threshold: float, pixel_threshold: float | None = None, source: str = "user") -> "PatchCore":
        """Decide ``is_anomalous = score >= threshold``; pixels use ``pixel_threshold`` (default: the same)."""
        self._check_fitted()
        if not np.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold}")
        self.threshold_ = float(threshold)
        self.pixel_threshold_ = float(threshold if pixel_threshold is None else pixel_threshold)
        self.threshold_source_ = source
        return self

    def calibrate_threshold(self, good_images: ImageSource | Iterable[ImageSource], max_false_positive_rate: float = 0.01) -> "PatchCore":
        """Set the threshold from held-out good images only: at most ``max_false_positive_rate`` of
        them would be flagged (see :func:`patchcore.metrics.threshold_at_fpr`)."""
        from .metrics import threshold_at_fpr

        scores = [p.score for p in self.predict(good_images, maps=False)]
        highest_allowed = threshold_at_fpr(scores, max_false_positive_rate)
        # threshold_at_fpr flags scores strictly above it; ours flags scores at or above.
        threshold = float(np.nextafter(np.float32(highest_allowed), np.float32(np.inf)))
        return self.set_threshold(threshold, source=f"{len(scores)} good images, false-positive rate <= {max_false_positive_rate}")

    def _decide(self, prediction: Prediction) -> Prediction:
        threshold = getattr(self, "threshold_", None)
        if threshold is not None:
            prediction.is_anomalous = bool(prediction.score >= threshold)
            if prediction.anomaly_map is not None:
                prediction.mask = prediction.anomaly_map >= self.pixel_threshold_
        return prediction

    # -- persistence ------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> None:
        """Write the fitted model to ``directory`` (safetensors + JSON, atomically replaced)."""
        self._check_fitted()
        spec = asdict(self.backbone_spec_)
        spec.pop("notes", None)
        persistence.write_model(
            directory,
            settings=self.get_params(),
            state={
                "backbone_spec": spec,
                "n_training_images": self.n_training_images_,
                "n_training_patches": self.n_training_patches_,
                "normal_patch_score_mean": self.normal_patch_score_mean_,
                "normal_patch_score_std": self.normal_patch_score_std_,
                "threshold": getattr(self, "threshold_", None),
                "pixel_threshold": getattr(self, "pixel_threshold_", None),
                "threshold_source": getattr(self, "threshold_source_", None),
            },
            tensors={
                "memory_bank": {"memory_bank": torch.from_numpy(self.memory_bank_)},
                "backbone": self.backbone_.network.state_dict(),
            },
        )

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PatchCore":
        """Read a model written by :meth:`save`; scores are bit-identical to the saved model's."""
        manifest, tensors = persistence.read_model(directory)
        settings = dict(manifest["settings"])
        settings["progress"] = False
        if isinstance(settings.get("resize"), list):  # JSON has no tuples
            settings["resize"] = tuple(settings["resize"])
        try:
            model = cls(**settings)
            spec_fields = dict(manifest["state"]["backbone_spec"])
            for key in ("layers", "mean", "std"):
                spec_fields[key] = tuple(spec_fields[key])
            spec = BackboneSpec(**spec_fields)
            backbone = build_network(spec)
            load_into(backbone.network, tensors["backbone"], f"{directory}: backbone weights")
            model._build(spec, backbone)
            model.n_training_images_ = manifest["state"]["n_training_images"]
            model.n_training_patches_ = manifest["state"]["n_training_patches"]
            # Models saved before these were measured (format 1) compare as unscaled.
            model.normal_patch_score_mean_ = float(manifest["state"].get("normal_patch_score_mean", 0.0))
            model.normal_patch_score_std_ = float(manifest["state"].get("normal_patch_score_std", 1.0))
            model._set_memory_bank(tensors["memory_bank"]["memory_bank"].numpy())
            state = manifest["state"]
            if state.get("threshold") is not None:
                model.set_threshold(state["threshold"], state.get("pixel_threshold"), state.get("threshold_source") or "saved")
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelFormatError(f"{directory}: saved model is inconsistent ({type(exc).__name__}: {exc})") from exc
        return model
