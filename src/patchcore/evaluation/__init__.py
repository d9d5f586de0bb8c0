"""Evaluation: data sets, metrics, the evaluate runner, the paper's experiments, baselines, reports."""
