"""The paper's experiments, one command each: resumable grids of cells with tables and plots."""

from .runner import run_cells, run_experiment
from .specs import EXPERIMENTS, ExperimentOptions, Spec, build_spec

__all__ = ["EXPERIMENTS", "ExperimentOptions", "Spec", "build_spec", "run_cells", "run_experiment"]
