"""Full fine-tuning at several image sizes, one run each with the quality benchmark's
per-run budget: is the 64 px fine-tuning baseline at its best fixed size, and how much does
a lineage lose by sitting at a smaller size (quality benchmark, gtsrb at 48 px)?

`--schedule restarts` trains the same run as a chain of one-epoch warm-up + cosine cycles,
validated after each: a muNet lineage's schedule (every child restarts its warm-up for one
epoch) without its selection or mutations. `--hflip off on`: the same run without and with random
horizontal flips, what a lineage trains with once the search's input mutation turns them on.
`--plans`: other fixed plans than full fine-tuning (`evolver/search.py`, `plan`: e.g. `bottom:12+adapters:32`,
the stem and blocks 0-11 cloned with adapters beside the shared top), with the weights each trains.

    python benchmarks/image_size.py                       # gtsrb at 48, 64 and 96 px
    python benchmarks/image_size.py --tasks cifar --sizes 64 96
    python benchmarks/image_size.py --sizes 64 --schedule cosine restarts --name schedule
    python benchmarks/image_size.py --tasks gtsrb mnist cifar --sizes 96 --hflip off on --name hflip
    python benchmarks/image_size.py --tasks gtsrb cifar --sizes 96 --plans full bottom:12+adapters:32 --name plans
"""
from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, table, write  # noqa: E402
from quality import PARTS, installation, load_part, train_images  # noqa: E402

from munet.evolver.baselines import run_baseline  # noqa: E402
from munet.evolver.search import plan as baseline_plan  # noqa: E402
from munet.evolver.config import cpu_preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["gtsrb"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[48, 64, 96])
    ap.add_argument("--lr", type=float, default=0.02, help="fine-tuning's pick by validation on 4 of 6 tasks")
    ap.add_argument("--runs-per-budget", type=int, default=2, help="the quality benchmark splits its budget over this many runs")
    ap.add_argument("--schedule", nargs="+", default=["cosine"], choices=["cosine", "restarts"],
                    help="cosine: one cycle over the run; restarts: one warm-up + cosine cycle per epoch")
    ap.add_argument("--hflip", nargs="+", default=["off"], choices=["off", "on"],
                    help="random horizontal flips while training (the cpu preset's default: off)")
    ap.add_argument("--plans", nargs="+", default=["full"], help="fixed plans (evolver.search.plan), default full fine-tuning")
    ap.add_argument("--name", default="image_size")
    args = ap.parse_args()
    for plan in args.plans:  # before any training: a typo in the last plan would waste the runs before it
        try:
            baseline_plan(plan, {"depth": 1})
        except ValueError as e:
            ap.error(str(e))
    torch.set_num_threads(2)
    missing = [t for t in args.tasks if not (SHARED_DATA / f"{t}.npz").exists() or not load_part(PARTS, "muNet base 1.0", t)]
    if missing:
        sys.exit(f"image_size: needs the data sets and the muNet base 1.0 quality parts (the budget) of {missing}")
    rows = []
    with tempfile.TemporaryDirectory() as work:
        system = installation(Path(work), "image-size", args.tasks)
        for t in args.tasks:
            budget = load_part(PARTS, "muNet base 1.0", t)["examples"]
            n_train = train_images(system.task_json(t))
            epochs = budget / (args.runs_per_budget * n_train)
            for size in args.sizes:
                for plan, schedule, hflip in itertools.product(args.plans, args.schedule, args.hflip):
                    # Restarts: one cycle per validation interval, so as many intervals as epochs.
                    intervals = max(2, int(epochs) + 1) if schedule == "cosine" else max(1, round(epochs))
                    cfg = cpu_preset().replace(max_epochs=epochs, intervals=intervals)
                    cfg.defaults.update({"image_size": size, "schedule": schedule, "hflip": hflip == "on"})
                    t0 = time.perf_counter()
                    r = run_baseline(system, t, plan, cfg, lrs=[args.lr], commit=False)
                    rows.append({"task": t, "plan": plan, "image_size": size, "schedule": schedule, "hflip": hflip, "lr": args.lr,
                                 "epochs": round(epochs, 2), "val_acc": r["val_acc"], "test_acc": r["test_acc"],
                                 "trained_params": r["trained_params"], "examples": r["examples"], "seconds": time.perf_counter() - t0})
                    print(f"image_size: {t} {plan} {size} px {schedule} hflip {hflip}: val {r['val_acc']:.3f} test {r['test_acc']:.3f} "
                          f"in {rows[-1]['seconds']:.0f} s", flush=True)
    print("\nFixed plans by image size, schedule and flips (one run, half the quality budget)\n")
    print(table(rows, ["task", "plan", "image_size", "schedule", "hflip", "lr", "epochs", "val_acc", "test_acc", "trained_params",
                       "examples", "seconds"]))
    print(f"\nwrote {write(args.name, {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
