"""What the gateway hands the executor and gets back, without torch: the gateway process
(and BentoML's arbiter, which imports the service module) stay free of torch and timm."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Item:
    """One image of a request, as the gateway hands it over."""

    task: str
    pixels: np.ndarray  # uint8 [H, W, C]
    path_id: str | None = None  # the path the gateway resolved for the request
    top: int = 5


@dataclass
class Result:
    path_id: str | None = None
    top: list[tuple[int, float]] = field(default_factory=list)  # (label, probability), best first
    error: str | None = None
    detail: str | None = None
