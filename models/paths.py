"""A path as a runnable module, and the preprocessing every consumer of a path shares.

`stages(path)` is the one place that says in which order a path's components run; the
assembled module, the evolver's prefix cache and the server's batch executor all use it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torchvision.transforms.v2.functional as TF
from torch import nn


@dataclass
class Path:
    """An ordered list of components (id, name, module) plus its input settings."""

    ids: list[str]
    names: list[str]
    modules: list[nn.Module]
    image_size: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    classes: list[str] = field(default_factory=list)


def stages(path: Path) -> list[tuple[str, nn.Module]]:
    """The ordered (component id, module) pairs of a path."""
    if not (len(path.ids) == len(path.names) == len(path.modules)):
        raise ValueError("a path needs one id, one name and one module per component")
    return list(zip(path.ids, path.modules))


class PathModel(nn.Module):
    """A path assembled into one module: its stages run in order."""

    def __init__(self, path: Path):
        super().__init__()
        self.component_ids = [cid for cid, _ in stages(path)]
        self.stages = nn.ModuleList(module for _, module in stages(path))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x


def assemble(path: Path) -> PathModel:
    return PathModel(path)


def preprocess(images: torch.Tensor, image_size: int, mean, std) -> torch.Tensor:
    """uint8 images [N, H, W, C] (C = 1 or 3) -> normalised float [N, 3, S, S].

    The evolver validates with this function and the server predicts with it, so a path
    sees exactly the inputs it was selected on.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError("expected uint8 images shaped [N, H, W, C]")
    x = images.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    x = x.float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = TF.resize(x, [image_size, image_size], antialias=True)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
