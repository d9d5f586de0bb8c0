"""The paper's baselines, SPADE and PaDiM, on the same backbone features as PatchCore.

Both have the part of PatchCore's interface that :func:`patchcore.evaluation.evaluate.evaluate_dataset`
uses: settings in the constructor, ``fit(images) -> self``, ``predict`` / ``iter_predict``
returning :class:`patchcore.engine.prediction.Prediction` objects (anomaly maps at the original image size,
made by :func:`patchcore.engine.scoring.anomaly_map` as PatchCore's are), ``memory_bank_`` (what the
model keeps, rows x width), ``backbone``, ``coreset_ratio`` (always 1.0) and ``fit_timings_``.
They cannot be saved (no ``save``/``load``).

Patch features are :class:`patchcore.engine.features.PatchFeatures` of the chosen backbone stages, with
the same defaults as PatchCore (the backbone's stride-8/16 stages, neighbourhood 3), so that the
comparison isolates the method.

- :class:`Spade` (Cohen & Hoshen 2020): a global feature per image (the deepest chosen stage,
  average-pooled); the image score is the mean distance to its ``k`` nearest training images'
  global features (paper: k = 50; fewer when there are fewer training images); the anomaly map
  is each test patch's distance to the nearest patch of those ``k`` images (pixel kNN, kappa = 1).
- :class:`Padim` (Defard et al. 2020): ``d`` channels chosen at random (seeded; 100 or fewer), a
  Gaussian per patch position over the training images with covariance regularised by
  ``0.01 * I``; the patch score is the Mahalanobis distance, the image score the largest patch
  score.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from ..engine.backbone_specs import DEFAULT_BACKBONE, IMAGENET_WEIGHTS, resolve_spec
from ..engine.backbones import create_backbone
from ..engine.detector import embed_batches, photo_grid
from ..engine.embedding import feature_pipeline
from ..engine.images import ImageSource, expand_sources
from ..engine.prediction import ErrorHandler, Prediction
from ..engine.scoring import anomaly_map
from ..engine.search import MemoryBankIndex
from ..errors import NotFittedError

METHODS = ("patchcore", "spade", "padim")
_ONE_SIZE = ("{name} compares patches position by position, so every training image must give the same network input: "
             "set resize to an exact size (e.g. 384x256) or use a crop")


class _FeatureDetector:
    """Shared plumbing: backbone, patch features, batches, maps, thresholds."""

    #: Baselines keep every training vector (evaluate reports it as the coreset ratio).
    coreset_ratio = 1.0

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
        layers: Sequence[str] | None = None,
        *,
        feature_width: int | None = None,
        neighbourhood: int = 3,
        resize: int | tuple[int, int] | None = 256,
        crop: int | None = None,
        smoothing_sigma: float = 4.0,
        weights: str | os.PathLike = IMAGENET_WEIGHTS,
        feature_location: str | None = None,
        batch_size: int = 8,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.backbone = backbone
        self.layers = layers
        self.feature_width = feature_width
        self.neighbourhood = neighbourhood
        self.resize = resize
        self.crop = crop
        self.smoothing_sigma = smoothing_sigma
        self.weights = weights
        self.feature_location = feature_location
        self.batch_size = batch_size
        self.seed = seed
        self.progress = progress

    def __repr__(self) -> str:
        return f"{type(self).__name__}(backbone={self.backbone!r})"

    def _prepare(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")
        spec = resolve_spec(self.backbone, self.layers, self.feature_location)
        self.backbone_spec_ = spec
        self.backbone_ = create_backbone(spec, self.weights)
        network, _, self.transform_ = feature_pipeline(
            spec, self.backbone_, self.feature_width, self.neighbourhood, self.resize, self.crop
        )
        self.patch_features_ = network.patch_features

    def _batches(self, sources: list, description: str, on_error: ErrorHandler | None, keep_images: bool = False):
        """Yield (batch, stage maps, patch features (B, H, W, D))."""
        # The stages are needed besides the patch features: embed with the network's pieces.
        def embedder(pixels):
            with torch.inference_mode():
                stages = self.backbone_(torch.from_numpy(pixels))
                return stages, self.patch_features_(stages)

        for batch, (stages, features) in embed_batches(sources, self.transform_, embedder, self.batch_size,
                                                       description=description, progress=self.progress,
                                                       on_error=on_error, keep_images=keep_images):
            yield batch, stages, features

    def _check_fitted(self) -> None:
        if not hasattr(self, "fit_timings_"):
            raise NotFittedError(f"this {type(self).__name__} model is not fitted yet: call fit(good_images) first")

    def predict(self, images: ImageSource | Iterable[ImageSource], maps: bool = True,
                on_error: ErrorHandler | None = None, keep_images: bool = False) -> list[Prediction]:
        """Score images; with ``maps`` also return each anomaly map at the image's original size."""
        self._check_fitted()
        return list(self.iter_predict(images, maps, on_error, keep_images))

    def iter_predict(self, images: ImageSource | Iterable[ImageSource], maps: bool = True,
                     on_error: ErrorHandler | None = None, keep_images: bool = False) -> Iterator[Prediction]:
        self._check_fitted()
        sources = expand_sources(images)
        started = time.perf_counter()
        for batch, stages, features in self._batches(sources, "predict", on_error, keep_images):
            backbone_seconds = (time.perf_counter() - started) / len(batch.names)
            for i, name in enumerate(batch.names):
                t0 = time.perf_counter()
                score, grid = self._score_one(stages, features, i)
                grid = photo_grid(grid, batch.placements[i])  # maps cover the photo's cells, not the padding
                t1 = time.perf_counter()
                pixel_map = None
                if maps:
                    pixel_map = anomaly_map(grid, batch.placements[i], self.smoothing_sigma)
                t2 = time.perf_counter()
                prediction = Prediction(name, float(score), pixel_map, grid,
                                        {"backbone": backbone_seconds, "search": t1 - t0, "map": t2 - t1},
                                        placement=batch.placements[i], image=batch.images[i])
                yield prediction.decide(getattr(self, "threshold_", None), None)
            started = time.perf_counter()

    def set_threshold(self, threshold: float) -> "_FeatureDetector":
        self.threshold_ = float(threshold)
        return self

    def _score_one(self, stages, features, i) -> tuple[float, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError


class Spade(_FeatureDetector):
    """SPADE: kNN of global image features, then pixel kNN against the patches of those images.

    ``k``: nearest training images (paper: 50; capped at the number of training images).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, layers: Sequence[str] | None = None, *, k: int = 50, **settings) -> None:
        super().__init__(backbone, layers, **settings)
        self.k = k

    def fit(self, images: ImageSource | Iterable[ImageSource], on_error: ErrorHandler | None = None) -> "Spade":
        if self.k < 1:
            raise ValueError(f"k must be at least 1, got {self.k}")
        started = time.perf_counter()
        self._prepare()
        timings = {"backbone_load": time.perf_counter() - started}
        started = time.perf_counter()
        global_features, patch_features = [], []
        for _, stages, features in self._batches(expand_sources(images), "features", on_error):
            global_features.append(stages[-1].mean(dim=(2, 3)).numpy())
            if patch_features and features.shape[1:] != patch_features[0].shape[1:]:
                raise ValueError(_ONE_SIZE.format(name="SPADE"))
            patch_features.append(features.numpy())
        if not patch_features:
            raise ValueError("no usable training images: every image was skipped")
        self.global_features_ = np.ascontiguousarray(np.concatenate(global_features), dtype=np.float32)
        self.train_patches_ = np.ascontiguousarray(np.concatenate(patch_features), dtype=np.float32)  # (N, H, W, D)
        self.feature_grid_ = tuple(self.train_patches_.shape[1:3])
        self.n_training_images_ = self.train_patches_.shape[0]
        self.global_index_ = MemoryBankIndex(self.global_features_)
        timings["features"] = time.perf_counter() - started
        self.fit_timings_ = timings
        return self

    @property
    def memory_bank_(self) -> np.ndarray:
        """Every training patch (N * H * W, D): SPADE searches them all (k images at a time)."""
        return self.train_patches_.reshape(-1, self.train_patches_.shape[-1])

    def _score_one(self, stages, features, i):
        k = min(self.k, self.n_training_images_)
        global_feature = stages[-1][i].mean(dim=(1, 2)).numpy()[None]
        distances, nearest = self.global_index_.search(global_feature, k)
        score = float(distances[0].mean())
        gallery = self.train_patches_[np.sort(nearest[0])].reshape(-1, self.train_patches_.shape[-1])
        queries = features[i].reshape(-1, features.shape[-1]).numpy()
        patch_distances, _ = MemoryBankIndex(gallery).search(queries, 1)
        return score, patch_distances[:, 0].reshape(features.shape[1:3])


class Padim(_FeatureDetector):
    """PaDiM: a Gaussian per patch position; Mahalanobis distance as the patch score.

    ``d``: channels kept, chosen at random with ``seed`` (paper: 100; all when fewer).
    ``epsilon``: covariance regularisation ``epsilon * I`` (paper: 0.01).
    """

    def __init__(self, backbone: str = DEFAULT_BACKBONE, layers: Sequence[str] | None = None, *, d: int = 100,
                 epsilon: float = 0.01, **settings) -> None:
        super().__init__(backbone, layers, **settings)
        self.d = d
        self.epsilon = epsilon

    def fit(self, images: ImageSource | Iterable[ImageSource], on_error: ErrorHandler | None = None) -> "Padim":
        if self.d < 1:
            raise ValueError(f"d must be at least 1, got {self.d}")
        started = time.perf_counter()
        self._prepare()
        width = self.patch_features_.width
        rng = np.random.default_rng(self.seed)
        self.channels_ = np.sort(rng.choice(width, size=min(self.d, width), replace=False))
        channels = torch.from_numpy(self.channels_)
        timings = {"backbone_load": time.perf_counter() - started}
        started = time.perf_counter()
        total = outer = None
        count = 0
        for _, _, features in self._batches(expand_sources(images), "features", on_error):
            x = features[..., channels].double()  # (B, H, W, d)
            x = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, P, d)
            if total is not None and x.shape[1:] != total.shape:
                raise ValueError(_ONE_SIZE.format(name="PaDiM"))
            if total is None:
                self.feature_grid_ = tuple(features.shape[1:3])
                total = torch.zeros(x.shape[1:], dtype=torch.float64)
                outer = torch.zeros((x.shape[1], x.shape[2], x.shape[2]), dtype=torch.float64)
            total += x.sum(dim=0)
            outer += torch.einsum("bpi,bpj->pij", x, x)
            count += x.shape[0]
        if total is None:
            raise ValueError("no usable training images: every image was skipped")
        mean = total / count
        covariance = (outer - count * torch.einsum("pi,pj->pij", mean, mean)) / max(count - 1, 1)
        covariance += self.epsilon * torch.eye(covariance.shape[-1], dtype=torch.float64)
        self.mean_ = mean.float()
        self.precision_ = torch.linalg.inv(covariance).float()  # (P, d, d)
        self.n_training_images_ = count
        timings["gaussians"] = time.perf_counter() - started
        self.fit_timings_ = timings
        return self

    @property
    def memory_bank_(self) -> np.ndarray:
        """The Gaussians' means (positions, d): one Gaussian (with a d x d covariance) per position."""
        return self.mean_.numpy()

    def _score_one(self, stages, features, i):
        x = features[i][..., torch.from_numpy(self.channels_)].reshape(-1, len(self.channels_)).float()
        delta = x - self.mean_
        squared = torch.einsum("pi,pij,pj->p", delta, self.precision_, delta).clamp_min(0.0)
        grid = torch.sqrt(squared).reshape(features.shape[1:3]).numpy()
        return float(grid.max()), grid


def create_detector(method: str, **settings):
    """A detector by method name: ``patchcore`` (with every PatchCore setting), ``spade`` or ``padim``
    (settings PatchCore-only, such as ``coreset_ratio``, are dropped for the baselines)."""
    if method == "patchcore":
        from ..engine.model import PatchCore

        return PatchCore(**settings)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    if settings.get("network_precision", "float32") != "float32":
        raise ValueError(f"{method} runs its network in float32 with torch: network_precision "
                         f"{settings['network_precision']!r} is for patchcore only")
    cls = Spade if method == "spade" else Padim
    shared = ("feature_width", "neighbourhood", "resize", "crop", "smoothing_sigma", "weights", "feature_location",
              "batch_size", "seed", "progress")
    kwargs = {key: settings[key] for key in shared if key in settings}
    return cls(settings.get("backbone", DEFAULT_BACKBONE), settings.get("layers"), **kwargs)
