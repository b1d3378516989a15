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


def parse_name(name: str) -> tuple[str, int | None, int | None]:
    """'adapter@3/w32' -> ('adapter', 3, 32); 'blocks.5' -> ('blocks', 5, None); 'pos_embed@64' -> ('pos_embed', 64, None)."""
    if name.startswith("blocks."):
        return "blocks", int(name.split(".", 1)[1]), None
    if name.startswith("adapter@"):
        pos, width = name[len("adapter@"):].split("/w")
        return "adapter", int(pos), int(width)
    if name.startswith("pos_embed@"):
        return "pos_embed", int(name.split("@", 1)[1]), None
    return name, None, None


def adapter_name(position: int, width: int) -> str:
    return f"adapter@{position}/w{width}"


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
