"""An ensemble of PatchCore models on different backbones (the paper's ensemble idea).

Each member has its own memory bank. Distances from different backbones live on different
scales, so each member's patch scores are standardised with the mean and standard deviation of
its own good training patches' scores (measured in :meth:`PatchCore.fit`) before the members'
grids and image scores are averaged. The members share the input geometry, so their patch grids
line up cell for cell.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from ..errors import ImageLoadError, NotFittedError
from .geometry import Placement
from .images import ImageSource, expand_sources, read_image, source_name
from .model import PatchCore
from .prediction import ErrorHandler, Prediction
from .scoring import anomaly_map

DEFAULT_MEMBERS = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


class PatchCoreEnsemble:
    """PatchCore models on several ``backbones``, with the same ``member_settings``; scores averaged
    after standardising each member on its good training patches.
    """

    def __init__(self, backbones: Sequence[str] = DEFAULT_MEMBERS, member_settings: dict[str, Any] | None = None,
                 progress: bool = False) -> None:
        self.backbones = backbones
        self.member_settings = member_settings
        self.progress = progress

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {"backbones": list(self.backbones), "member_settings": dict(self.member_settings or {}),
                "progress": self.progress}

    @property
    def backbone(self) -> str:
        return "+".join(self.backbones)

    @property
    def coreset_ratio(self) -> float:
        return float((self.member_settings or {}).get("coreset_ratio", PatchCore().coreset_ratio))

    def fit(self, images: ImageSource | Iterable[ImageSource], on_error: ErrorHandler | None = None) -> "PatchCoreEnsemble":
        if len(self.backbones) < 1:
            raise ValueError("an ensemble needs at least one backbone")
        sources = expand_sources(images)
        # The ensemble decides on its averaged scores: its members' own thresholds would go unused.
        settings = {**(self.member_settings or {}), "progress": self.progress, "calibration": "none"}
        self.members_ = [PatchCore(backbone=name, **settings).fit(sources, on_error) for name in self.backbones]
        self.fit_timings_: dict[str, float] = {}
        for member in self.members_:
            for key, value in member.fit_timings_.items():
                self.fit_timings_[key] = self.fit_timings_.get(key, 0.0) + value
        self.memory_bank_size_ = sum(m.memory_bank_.shape[0] for m in self.members_)
        self.smoothing_sigma_ = self.members_[0].smoothing_sigma
        return self

    def _standardised(self, member: PatchCore, values: np.ndarray | float):
        return (values - member.normal_patch_score_mean_) / member.normal_patch_score_std_

    def predict(self, images: ImageSource | Iterable[ImageSource], maps: bool = True,
                on_error: ErrorHandler | None = None, keep_images: bool = False) -> list[Prediction]:
        return list(self.iter_predict(images, maps, on_error, keep_images))

    def iter_predict(self, images: ImageSource | Iterable[ImageSource], maps: bool = True,
                     on_error: ErrorHandler | None = None, keep_images: bool = False, chunk: int = 8) -> Iterator[Prediction]:
        """Each photo is decoded once, as at fit (a JPEG at the DCT scale the network needs), and
        scored by every member."""
        if not hasattr(self, "members_"):
            raise NotFittedError("this ensemble is not fitted yet: call fit(good_images) first")
        sources = expand_sources(images)
        needed_size = _needed_size(self.members_)
        for start in range(0, len(sources), chunk):
            decoded, names = [], []
            for position, source in enumerate(sources[start : start + chunk], start):
                try:
                    image = read_image(source, position, needed_size=needed_size)
                except ImageLoadError as error:
                    if on_error is None:
                        raise
                    on_error(error)
                    continue
                decoded.append(image)
                names.append(source_name(source, position))
            if not decoded:
                continue
            per_member = [member.predict(decoded, maps=False) for member in self.members_]
            for i, name in enumerate(names):
                t0 = time.perf_counter()
                results = [predictions[i] for predictions in per_member]
                grid = np.mean([self._standardised(m, r.patch_scores) for m, r in zip(self.members_, results)], axis=0)
                score = float(np.mean([self._standardised(m, r.score) for m, r in zip(self.members_, results)]))
                placement: Placement = results[0].placement
                pixel_map = anomaly_map(grid, placement, self.smoothing_sigma_) if maps else None
                timings = {key: sum(r.timings.get(key, 0.0) for r in results) for key in ("backbone", "search")}
                timings["map"] = time.perf_counter() - t0
                yield Prediction(name, score, pixel_map, grid.astype(np.float32), timings, placement=placement,
                                 image=decoded[i] if keep_images else None)


def _needed_size(members: Sequence[PatchCore]) -> Callable[[int, int], tuple[int, int]] | None:
    """The (width, height) a photo must have for every member's input transform: what each
    member's own ``predict`` decodes a JPEG to (the largest, should their settings differ)."""
    sizes = [m.transform_.needed_size for m in members if hasattr(m.transform_, "needed_size")]
    if not sizes:
        return None

    def needed(width: int, height: int) -> tuple[int, int]:
        wanted = [size(width, height) for size in sizes]
        return max(w for w, _ in wanted), max(h for _, h in wanted)

    return needed
