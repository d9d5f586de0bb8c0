"""The paper's experiments, one command each: resumable grids of cells with tables and plots."""

from .options import EXPERIMENTS, ExperimentOptions

_LAZY = {"Spec": ".specs", "build_spec": ".specs", "run_cells": ".runner", "run_experiment": ".runner"}


def __getattr__(name: str):
    if name in _LAZY:  # the runner and specs need torch: imported on first use
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EXPERIMENTS", "ExperimentOptions", "Spec", "build_spec", "run_cells", "run_experiment"]
