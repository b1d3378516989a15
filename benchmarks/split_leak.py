"""Whether a task's validation images lie nearer its training images than its test images do.

The evolver carves validation out of the training images at random (stratified, seeded). Where
the training set holds several shots of one object, a random split leaves shots of the same
object on both sides, and validation then rewards recognising the object, not the class: GTSRB's
training images are frames of about 30-frame tracks of one physical sign each, and its test
set comes from other signs. This measures that with the frozen packaged root only (no training,
a few minutes for the six tasks), per task and split seed:

- `probe_val` / `probe_test`: a linear probe (logistic regression on the root's pooled features
  at `--size` px) trained on the training part, scored on validation and on test: how far
  validation overstates test with no selection among candidates at all;
- `nn_val` / `nn_test`: the share of validation / test images whose nearest training image in
  feature space (cosine) has their label: shots of one object make this high on validation only;
- `px_val` / `px_test`: median distance from a validation / test image to its nearest training
  image in pixels (each image standardised), what the eye would call a near-duplicate.

`--group-radii`: also a validation split of whole groups per radius (images of one class whose
features lie within the radius, chained), the remedy one would try; `largest_group` says how far
the chains reach.

Prints a table and writes `results/split_leak.json` (`split_leak_grouped.json` with radii).

    python benchmarks/split_leak.py  (--tasks gtsrb --seeds 0 1 2 --size 96 --group-radii 0.04 0.08)
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.linear_model import LogisticRegression

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, SHARED_TASKS as TASKS, table, write  # noqa: E402

from munet.evolver.train import split_indices  # noqa: E402
from munet.models.paths import preprocess  # noqa: E402
from munet.models.roots import load_root_model  # noqa: E402
from munet.storage.commit import default_val_fraction  # noqa: E402

METRICS = ("probe_val", "probe_test", "nn_val", "nn_test", "px_val", "px_test")


def frozen_root(script: str, tasks: list[str]):
    """The packaged root without its classifier, pooled features out; exits when a task's data
    set is absent."""
    missing = [t for t in tasks if not (SHARED_DATA / f"{t}.npz").exists()]
    if missing:
        sys.exit(f"{script}: data sets absent from {SHARED_DATA}: {missing}")
    torch.set_num_threads(2)
    model = load_root_model("tf_efficientnet_lite0").eval()
    model.reset_classifier(0)
    return model


def features(model, images: np.ndarray, size: int, batch: int = 256) -> np.ndarray:
    x = torch.from_numpy(images if images.ndim == 4 else images[..., None])
    cfg = model.pretrained_cfg
    with torch.inference_mode():
        f = torch.cat([model(preprocess(x[i:i + batch], size, cfg["mean"], cfg["std"])) for i in range(0, len(x), batch)])
    return f.numpy()


def standardised_pixels(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32))
    return (x - x.mean(1, keepdim=True)) / (x.std(1, keepdim=True) + 1e-3) / x.shape[1] ** 0.5


def unit(f: np.ndarray) -> np.ndarray:
    return f / np.linalg.norm(f, axis=1, keepdims=True)


def nearest_label_agreement(f: np.ndarray, y: np.ndarray, f_train: np.ndarray, y_train: np.ndarray) -> float:
    return float((y_train[(unit(f) @ unit(f_train).T).argmax(1)] == y).mean())


def similarity_groups(f: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """Group id per image: images of one class within `radius` of each other in feature space
    (cosine distance) are linked, and links chain into groups."""
    linked = (1 - unit(f) @ unit(f).T < radius) & (y[:, None] == y[None, :])
    return connected_components(csr_matrix(linked), directed=False)[1]


def grouped_split(group: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """Validation made of whole groups (`similarity_groups`): each class gives validation
    whole groups, drawn at random, until it holds its share. Returns (train, val, largest
    group)."""
    rng, val = np.random.RandomState(seed), []
    for label in np.unique(y):
        want, taken = round((y == label).sum() * fraction), []
        for g in rng.permutation(np.unique(group[y == label])):
            if len(taken) >= want:
                break
            taken += list(np.flatnonzero(group == g))
        val += taken
    val = np.sort(np.asarray(val, dtype=np.int64))
    return np.setdiff1d(np.arange(len(y)), val), val, int(np.bincount(group).max())


def measure(task: str, model, seeds: list[int], size: int, radii: list[float]) -> list[dict]:
    d = np.load(SHARED_DATA / f"{task}.npz")
    views = {"train": (features(model, d["x_train"], size), standardised_pixels(d["x_train"])),
             "test": (features(model, d["x_test"], size), standardised_pixels(d["x_test"]))}
    return compare_splits(task, views, d["y_train"].astype(np.int64), d["y_test"].astype(np.int64), seeds, radii)


def compare_splits(task: str, views: dict, y: np.ndarray, y_test: np.ndarray, seeds: list[int],
                   radii: list[float] = ()) -> list[dict]:
    """One row per split seed, for the evolver's random split and a grouped one per radius;
    `views[split]` = (root features, standardised pixels)."""
    (f, px), (f_test, px_test) = views["train"], views["test"]
    fraction, rows = default_val_fraction(len(y)), []
    groups = {r: similarity_groups(f, y, r) for r in radii}  # the seed only draws among them
    for seed in seeds:
        splits = {"random": (*split_indices(y, fraction, seed), 1)}
        splits |= {f"grouped {r}": grouped_split(g, y, fraction, seed) for r, g in groups.items()}
        for split, (tr, va, largest) in splits.items():
            rows.append(_row(task, split, seed, largest, f, px, y, tr, va, f_test, px_test, y_test))
    return rows


def _row(task, split, seed, largest, f, px, y, tr, va, f_test, px_test, y_test) -> dict:
    probe = LogisticRegression(max_iter=2000).fit(f[tr], y[tr])
    return {"task": task, "split": split, "seed": seed, "val_images": len(va), "largest_group": largest,
            "probe_val": float((probe.predict(f[va]) == y[va]).mean()),
            "probe_test": float((probe.predict(f_test) == y_test).mean()),
            "nn_val": nearest_label_agreement(f[va], y[va], f[tr], y[tr]),
            "nn_test": nearest_label_agreement(f_test, y_test, f[tr], y[tr]),
            "px_val": float(torch.cdist(px[va], px[tr]).min(1).values.median()),
            "px_test": float(torch.cdist(px_test, px[tr]).min(1).values.median())}


def summary(rows: list[dict], tasks: list[str]) -> list[dict]:
    out = []
    for task in tasks:
        for split in dict.fromkeys(r["split"] for r in rows if r["task"] == task):
            mine = [r for r in rows if r["task"] == task and r["split"] == split]
            mean = {k: statistics.mean(r[k] for r in mine) for k in METRICS}
            out.append({"task": task, "split": split, "seeds": len(mine), "val_images": statistics.mean(r["val_images"] for r in mine),
                        "largest_group": max(r["largest_group"] for r in mine), **mean,
                        "probe_gap": mean["probe_val"] - mean["probe_test"], "nn_gap": mean["nn_val"] - mean["nn_test"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="split seeds (a task's default is 0)")
    ap.add_argument("--size", type=int, default=96, help="image size of the root's features")
    ap.add_argument("--group-radii", type=float, nargs="+", default=[], metavar="R",
                    help="also a split of whole groups per radius (cosine distance between root features)")
    args = ap.parse_args()
    model, rows = frozen_root("split_leak", args.tasks), []
    for task in args.tasks:
        rows += measure(task, model, args.seeds, args.size, args.group_radii)
        print(f"split_leak: {task} done", file=sys.stderr)
    means = summary(rows, args.tasks)
    print(f"\nValidation against test, frozen root at {args.size} px, mean over split seeds {args.seeds}\n")
    print(table(means, ["task", "split", "seeds", "val_images", "largest_group", "probe_val", "probe_test", "probe_gap", "nn_val", "nn_test", "nn_gap",
                        "px_val", "px_test"]))
    path = write("split_leak_grouped" if args.group_radii else "split_leak", {"args": vars(args), "rows": rows, "summary": means})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
