"""Small real tasks and tiny budgets so evolver tests train real candidates in seconds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from munet.evolver.config import cpu_preset


def digits_npz(path: Path, n_train: int = 300, n_test: int = 100, offset: int = 0, classes: int = 10) -> Path:
    """scikit-learn's 8x8 digits at 16x16 (uint8, greyscale); `offset` rotates labels so
    two tasks built from it differ."""
    d = load_digits()
    keep = d.target < classes
    x = (d.images[keep] * (255 / 16)).astype(np.uint8)
    x = np.kron(x, np.ones((2, 2), dtype=np.uint8))[..., None]
    y = (d.target[keep] + offset) % classes
    rng = np.random.RandomState(offset)
    idx = rng.permutation(len(x))
    tr, te = idx[:n_train], idx[n_train:n_train + n_test]
    np.savez(path, x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te],
             classes=np.array([f"c{i}" for i in range(classes)]))
    return path


def tiny_config(**changes):
    """The cpu preset shrunk: 32 px, one epoch in every visit, few candidates, and no trained
    root seed (a whole network trained per first visit; its own tests turn it on)."""
    cfg = cpu_preset().replace(generations=1, candidates=2, max_epochs=1.0, batch_size=32, image_sizes=[32, 48],
                               eval_batch_size=256, seed=0, visit_epochs=(), trained_root_seed=False)
    cfg.defaults.update({"image_size": 32})
    return cfg.replace(**changes)
