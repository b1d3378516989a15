"""What every model family provides, and the skeleton cache the families share.

A root is described by a plain JSON `config` (see `describe`), a path's architecture by a
plain dict `arch` = {"blocks": [...], "adapters": {i: width}, "image_size": S,
"num_classes": K}. Families turn these into ordered component names and modules.
"""
from __future__ import annotations

import copy
import functools
import json

import timm
import torch
from torch import nn

from munet.names import adapter_name, parse_name  # noqa: F401  (re-exported)


@functools.lru_cache(maxsize=8)
def _skeleton(timm_name: str, kwargs_json: str, device: str) -> nn.Module:
    with torch.device(device):
        return timm.create_model(timm_name, pretrained=False, **json.loads(kwargs_json)).eval()


def skeleton(config: dict) -> nn.Module:
    """An uninitialised-weights timm model of the root's architecture, built once per process
    and default device: under `torch.device("meta")` it holds no memory (components whose
    weights are loaded next need none)."""
    device = str(torch.empty(0).device)
    return _skeleton(config["timm"], json.dumps(config.get("model_kwargs", {}), sort_keys=True), device)


def copy_of(module: nn.Module) -> nn.Module:
    return copy.deepcopy(module)


def default_arch(config: dict, num_classes: int, image_size: int | None = None) -> dict:
    return {
        "blocks": list(range(config["depth"])),
        "adapters": {},
        "image_size": int(image_size or config["image_size"]),
        "num_classes": int(num_classes),
    }


def adapters_of(arch: dict) -> dict[int, int]:
    # JSON turns int keys into strings; accept both.
    return {int(k): int(v) for k, v in arch.get("adapters", {}).items()}
