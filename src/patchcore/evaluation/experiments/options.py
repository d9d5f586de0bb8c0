"""What each experiment varies, as plain data (the command line reads it without importing torch)."""

from __future__ import annotations

import dataclasses

EXPERIMENTS = ("coreset", "layers", "backbones", "speed", "shots", "methods", "resolution")


@dataclasses.dataclass
class ExperimentOptions:
    """What each experiment varies (the command line's experiment options)."""

    ratios: list[float] = dataclasses.field(default_factory=lambda: [0.001, 0.01, 0.1, 0.25, 1.0])
    layer_sets: list[list[str]] | None = None
    neighbourhoods: list[int] = dataclasses.field(default_factory=lambda: [1, 3, 5, 7])
    backbones: list[str] = dataclasses.field(
        default_factory=lambda: ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
    indexes: list[str] = dataclasses.field(default_factory=lambda: ["exact", "hnsw", "ivfpq"])
    shots: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 5, 10, 16, 20, 50])
    seeds: int = 3
    methods: list[str] = dataclasses.field(default_factory=lambda: ["patchcore", "spade", "padim"])
    sizes: list[str] = dataclasses.field(default_factory=lambda: ["224", "256", "320", "384", "448", "none"])
    geometries: list[str] = dataclasses.field(default_factory=lambda: ["whole", "crop", "tiled"])
    tile: int = 256
    tile_overlap: float = 0.25
