"""The alternative the serving benchmark compares munet with: one BentoML service holding N
separately fine-tuned timm models, one per task (what a user without munet would deploy).

    SEPARATE_TASKS=t00:10,t01:43 bentoml serve separate_models:SeparateModels --working-dir benchmarks

Each model is a whole `tf_efficientnet_lite0` with the task's head; random weights are
enough, since the benchmark measures memory and speed, not accuracy. Inputs are handled as
munet's evaluator does: resized to SEPARATE_IMAGE_SIZE (default 64) and normalised with
mean = std = 0.5. The batchable API groups each adaptive batch by task and runs every
task's model once on its part, the best a separate-models service can do.
"""
from __future__ import annotations

import base64
import io
import os

import bentoml
import numpy as np
from pydantic import BaseModel


class Request(BaseModel):
    task: str
    image: str  # base64-encoded image file


class Answer(BaseModel):
    task: str
    label: int = -1
    score: float = 0.0
    error: str | None = None


@bentoml.service(name="SeparateModels", workers=1, traffic={"timeout": 120})
class SeparateModels:
    def __init__(self) -> None:
        import timm
        import torch

        torch.set_num_threads(int(os.environ.get("SEPARATE_THREADS", os.cpu_count() or 1)))
        self.size = int(os.environ.get("SEPARATE_IMAGE_SIZE", 64))
        self.models = {}
        for spec in filter(None, os.environ.get("SEPARATE_TASKS", "").split(",")):
            name, k = spec.split(":")
            self.models[name] = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=int(k)).eval()

    def _pixels(self, b64: str) -> np.ndarray:
        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            return np.asarray(im.convert("RGB"))

    @bentoml.api(batchable=True, max_batch_size=64, max_latency_ms=5000)
    def predict(self, items: list[Request]) -> list[Answer]:
        import torch
        import torch.nn.functional as F

        out: list[Answer | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for i, it in enumerate(items):
            if it.task in self.models:
                groups.setdefault(it.task, []).append(i)
            else:
                out[i] = Answer(task=it.task, error="unknown_task")
        with torch.inference_mode():
            for task, idx in groups.items():
                x = torch.from_numpy(np.stack([self._pixels(items[i].image) for i in idx])).permute(0, 3, 1, 2).float()
                x = F.interpolate(x / 255.0, size=(self.size, self.size), mode="bilinear", align_corners=False)
                probs = self.models[task]((x - 0.5) / 0.5).softmax(1)
                score, label = probs.max(1)
                for row, i in enumerate(idx):
                    out[i] = Answer(task=task, label=int(label[row]), score=float(score[row]))
        return out  # type: ignore[return-value]
