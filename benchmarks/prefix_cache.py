"""Prefix caching: candidates per hour with and without reusing frozen-prefix activations.

Candidates of each kind (default: `top:2`, the top two blocks and a new head, everything
else frozen and referenced, as issue 3 asks; `head`, a new head only) train with and
without the cache on the same data; the cached arm computes the frozen prefix once and
reuses it across epochs and candidates, the other runs it for every batch.

`speedup` counts every candidate, the first one's filling of the cache included;
`later_speedup` compares the candidates after the first (the cache already filled), what a
worker gains on each further candidate sharing that prefix and image size.

Beside the measured ratios the table gives the FLOP ratio of caching for that candidate:
(prefix forward + suffix training) / suffix training FLOPs per training image, counting a
backward pass as one forward for input gradients (every component above the lowest
trainable one) plus one for weight gradients (trainable ones). It is not a bound on the
time ratio: the prefix's large-map convolutions run at a higher FLOP rate than the
suffix's tiny-map ones.

    python benchmarks/prefix_cache.py [--task cifar] [--candidates 3] [--size 64] [--kinds top:2 head]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, one_task, table, write  # noqa: E402

from munet.evolver import baselines, search  # noqa: E402
from munet.evolver.config import cpu_preset  # noqa: E402
from munet.evolver.train import PrefixCache, train_candidate  # noqa: E402


def measure(system, root, task, data, kind: str, args) -> list[dict]:
    rows = []
    for reuse in (True, False):
        cfg = cpu_preset().replace(max_epochs=args.epochs, reuse_prefix=reuse)
        cfg.defaults["image_size"] = args.size
        cache = PrefixCache(cfg.prefix_cache_bytes)
        hp = search.initial_hparams(cfg, root.config, data.num_classes)
        template, _ = baselines._build(system, root, task, kind, hp)
        t0, examples, accs, each = time.perf_counter(), 0, [], []
        for i in tqdm(range(args.candidates), desc=f"{kind}, prefix cache {'on' if reuse else 'off'}"):
            cand = copy.deepcopy(template)  # fresh clones each time, same frozen prefix
            cand.hparams["opt"]["lr"] = [0.01, 0.02, 0.005][i % 3]
            r = train_candidate(cand, data, cfg, cache, 1.0, float("-inf"))
            examples += r.examples
            accs.append(r.val_acc)
            each.append(r.seconds)
        secs = time.perf_counter() - t0
        rows.append({"candidate": kind, "prefix_cache": "on" if reuse else "off", "candidates": args.candidates,
                     "seconds": secs, "candidates_per_hour": 3600 * args.candidates / secs,
                     "train_images_per_s": examples / secs, "mean_val_acc": sum(accs) / len(accs),
                     "first_s": each[0], "later_mean_s": sum(each[1:]) / max(1, len(each) - 1), "per_candidate_s": each})
    rows[0]["speedup"] = rows[0]["candidates_per_hour"] / rows[1]["candidates_per_hour"]
    # Once the cache holds the prefix (the first candidate fills it), what every later
    # candidate sharing that prefix and image size gains: the rate of a long-running worker.
    rows[0]["later_speedup"] = rows[1]["later_mean_s"] / rows[0]["later_mean_s"] if args.candidates > 1 else None
    rows[0]["flop_ratio"] = flop_ratio(template, args.size)
    return rows


def flop_ratio(cand, size: int) -> float:
    """Per-image FLOPs without the cache over FLOPs with it."""
    k, h, fwd = cand.first_trainable, torch.zeros(1, 3, size, size), []
    with torch.no_grad():
        for m in cand.modules:
            with FlopCounterMode(display=False) as counter:
                h = m.eval()(h)
            fwd.append(counter.get_total_flops())
    suffix = sum(f * (1 + (i > k) + t) for i, (f, t) in enumerate(zip(fwd[k:], cand.trainable[k:]), start=k))
    return (sum(fwd[:k]) + suffix) / suffix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="cifar")
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", default=["top:2", "head"], help="baseline plans (evolver/baselines.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_file = SHARED_DATA / f"{args.task}.npz"
    if not data_file.exists():
        sys.exit(f"prefix_cache: {data_file} is absent")
    with tempfile.TemporaryDirectory() as home:
        system, root, task, data = one_task(home, args.task)
        rows = []
        for kind in args.kinds:
            rows += measure(system, root, task, data, kind, args)
    cols = ["candidate", "prefix_cache", "candidates", "seconds", "candidates_per_hour", "train_images_per_s",
            "mean_val_acc", "first_s", "later_mean_s", "speedup", "later_speedup", "flop_ratio"]
    print(f"\nPrefix caching, {args.task} at {args.size}px, {args.epochs} epochs per candidate\n")
    print(table(rows, cols))
    path = write("prefix_cache", {"args": vars(args), "rows": rows})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
