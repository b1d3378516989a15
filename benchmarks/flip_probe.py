"""Whether a horizontal flip keeps each task's labels, measured with the frozen root only.

The search may turn random horizontal flips on (an input mutation, MUNET.md's `hflip`), and a
lineage keeps its parent's inputs. Where a mirror image is another class or no class at all
(GTSRB's keep left / keep right, digits, letters) flips teach the path wrong labels. Per task,
with a linear probe (logistic regression) on the root's pooled features at `--size` px, fitted
on the evolver's training split (seed 0):

- `test` / `test_flipped`: the probe on the test images and on their mirror images: how much of
  what the root sees for a class survives a mirror;
- `test_flip_trained`: a probe fitted on the training images and their mirror images, on test:
  what training with flips costs (or gains) where nothing else changes.

Prints a table and writes `results/flip_probe.json`; a few minutes for the six tasks.

    python benchmarks/flip_probe.py  (--tasks gtsrb mnist --size 96)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, SHARED_TASKS, table, write  # noqa: E402
from split_leak import features, frozen_root  # noqa: E402

from munet.evolver.train import split_indices  # noqa: E402
from munet.storage.commit import default_val_fraction  # noqa: E402


def mirror(images: np.ndarray) -> np.ndarray:
    """Left-right mirror of (N, H, W) or (N, H, W, C) images."""
    return np.ascontiguousarray(images[:, :, ::-1])


def flip_costs(task: str, f_train, f_train_flipped, y_train, f_test, f_test_flipped, y_test) -> dict:
    """Probe accuracies on test: fitted without flips (on test and on mirrored test), and fitted
    with the mirrored training images added under their own labels."""
    plain = LogisticRegression(max_iter=2000).fit(f_train, y_train)
    flipped = LogisticRegression(max_iter=2000).fit(np.concatenate([f_train, f_train_flipped]), np.concatenate([y_train, y_train]))
    row = {"task": task, "train_images": len(y_train), "test": float((plain.predict(f_test) == y_test).mean()),
           "test_flipped": float((plain.predict(f_test_flipped) == y_test).mean()),
           "test_flip_trained": float((flipped.predict(f_test) == y_test).mean())}
    return {**row, "mirror_drop": row["test"] - row["test_flipped"], "flip_training_cost": row["test"] - row["test_flip_trained"]}


def measure(task: str, model, size: int) -> dict:
    d = np.load(SHARED_DATA / f"{task}.npz")
    y = d["y_train"].astype(np.int64)
    train, _ = split_indices(y, default_val_fraction(len(y)), 0)
    x = d["x_train"][train]
    return flip_costs(task, features(model, x, size), features(model, mirror(x), size), y[train],
                      features(model, d["x_test"], size), features(model, mirror(d["x_test"]), size), d["y_test"].astype(np.int64))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(SHARED_TASKS))
    ap.add_argument("--size", type=int, default=96, help="image size of the root's features")
    args = ap.parse_args()
    model, rows = frozen_root("flip_probe", args.tasks), []
    for task in args.tasks:
        rows.append(measure(task, model, args.size))
        print(f"flip_probe: {task} done", file=sys.stderr)
    print(f"\nA linear probe on the frozen root's {args.size} px features, test accuracy\n")
    print(table(rows, ["task", "train_images", "test", "test_flipped", "mirror_drop", "test_flip_trained", "flip_training_cost"]))
    print(f"\nwrote {write('flip_probe', {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
