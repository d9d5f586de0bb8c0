"""Where the network runs, decided without importing torch when there can be no GPU.

Importing torch costs about a second and 0.4 GB of memory; asking it whether CUDA works on a
machine without an NVIDIA driver only to hear "no" made every CPU-only fit and load pay that.
:func:`nvidia_driver_present` looks for the driver itself; only when it is there is torch asked.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: Files that exist where an NVIDIA driver is installed: Linux (also in containers given the
#: GPU), WSL 2 (the driver comes from Windows), and Windows itself.
_LINUX_DRIVER_FILES = ("/proc/driver/nvidia/version", "/usr/lib/wsl/lib/libcuda.so.1")


def nvidia_driver_present() -> bool:
    """Whether this machine has an NVIDIA driver, the precondition of any CUDA device (never imports torch)."""
    if sys.platform.startswith("linux"):
        return any(Path(path).exists() for path in _LINUX_DRIVER_FILES)
    if sys.platform == "win32":
        system = Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32"
        return (system / "nvcuda.dll").is_file()
    return False  # macOS and others: no CUDA


def cuda_usable() -> bool:
    """Whether torch can run on a CUDA GPU here: False at once without an NVIDIA driver (torch is
    then not imported), or where torch is not installed."""
    if not nvidia_driver_present():
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def wants_cuda(device: str) -> bool:
    """Whether ``device`` (``auto``, ``cpu`` or ``cuda``) means the GPU here; ``cuda`` without a
    usable GPU is an error that says so."""
    if device == "cpu":
        return False
    if device == "auto":
        return cuda_usable()
    import torch

    if not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no GPU (torch.cuda.is_available() is False)")
    return True
