"""Starting or joining Ray, with a clear message when it is not installed."""

from __future__ import annotations

import logging


def ray_module():
    """The ``ray`` module; a :class:`RuntimeError` saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("--ray needs Ray, which is not installed: pip install 'patchcore[ray]'") from None
    return ray


def connect(address: str | None, num_cpus: int | None = None):
    """Join the Ray cluster at ``address``, or start a local Ray (``num_cpus`` of this machine's
    cores); returns the ``ray`` module. Reuses a connection this process already has."""
    ray = ray_module()
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    # The commands print their own progress; Ray Data's would repeat it in log lines and bars.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # incl. its warning that the bars are off
    return ray
