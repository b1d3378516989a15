"""Issue 3 acceptance on real data: one muNet visit per task with the cpu preset, against
the root's head-only path trained with the same trainer and epochs.

    python benchmarks/first_visit.py [--tasks mnist notmnist] [--workers 1]

Runs `munet evolve --iterations 1` as a user would (wall time measured around it), then a
head-only baseline per task in a separate installation.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, table, write  # noqa: E402

from munet.evolver.baselines import run_baseline  # noqa: E402
from munet.evolver import search  # noqa: E402
from munet.evolver.config import cpu_preset  # noqa: E402
from munet.settings import Settings  # noqa: E402
from munet.system import System  # noqa: E402


def setup(home: str, tasks: list[str]) -> System:
    system = System(Settings.from_env(home))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    for t in tasks:
        system.add_task(t, str(SHARED_DATA / f"{t}.npz"))
    return system


def candidate_record(system: System) -> list[dict]:
    """Every candidate of the run: task, generation, mutations, image size, seconds, outcome."""
    from sqlalchemy import select

    from munet.storage.schema import Candidate, Task

    with system.Session() as s:
        names = {t.id: t.name for t in s.scalars(select(Task))}
        return [{"task": names[c.task_id], "generation": c.generation, "mutations": list(c.mutations or []),
                 "image_size": (c.hparams or {}).get("arch", {}).get("image_size"),
                 "augments": bool(search.augments(c.hparams)) if c.hparams else None,
                 "lowest_trainable": lowest_trainable(list(c.mutations or [])), "val_acc": c.val_acc,
                 "examples": c.examples, "seconds": c.seconds, "outcome": c.outcome}
                for c in s.scalars(select(Candidate).order_by(Candidate.id))]


def lowest_trainable(mutations: list[str]) -> int | None:
    """The lowest block a candidate's own mutations clone or give an adapter (None: none)."""
    # "clone:13", "adapter:2/w32"; clones of the neck, final norm or head name no block.
    targets = [m.split(":", 1)[1].split("/")[0] for m in mutations if m.startswith(("clone:", "adapter:"))]
    blocks = [int(t) for t in targets if t.isdigit()]
    return min(blocks) if blocks else None


def time_by_kind(candidates: list[dict]) -> list[dict]:
    """Seconds per kind of candidate: random augmentation (no prefix cache) or the lowest block
    its mutations clone or adapt, so a slow visit can be traced to the candidates that made it slow."""
    total = sum(c["seconds"] for c in candidates) or 1.0
    kinds: dict[str, list[float]] = {}
    for c in candidates:
        low = c["lowest_trainable"]
        kind = ("random augmentation" if c["augments"] else
                "no clone/adapter mutation" if low is None else f"clone/adapter at blocks {low // 4 * 4}-{low // 4 * 4 + 3}")
        kinds.setdefault(f"{kind}, {c['image_size']} px", []).append(c["seconds"])
    return [{"kind": k, "candidates": len(v), "seconds": sum(v), "mean_s": sum(v) / len(v), "share": sum(v) / total}
            for k, v in sorted(kinds.items(), key=lambda kv: -sum(kv[1]))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=["mnist", "notmnist"])
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 2)
    rows = []
    with tempfile.TemporaryDirectory() as home:
        system = setup(home, args.tasks)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "munet.cli", "evolve", "--iterations", "1", "--nice", "0",
                        "--workers", str(args.workers)], env=dict(os.environ, MUNET_HOME=home), check=True)
        wall = time.perf_counter() - t0
        candidates = candidate_record(system)
        for t in args.tasks:
            info = system.task_json(t)
            live = info["live_path"]
            rows.append({"task": t, "method": "muNet visit", "test_acc": live["test_acc"], "val_acc": live["val_acc"],
                         "accounted_params": live["accounted_params"], "candidates": info["candidates_tried"],
                         "image_size": live["image_size"]})
    with tempfile.TemporaryDirectory() as home:
        system = setup(home, args.tasks)
        for t in args.tasks:
            r = run_baseline(system, t, "head", cpu_preset(), commit=True)
            rows.append({"task": t, "method": "head only", "test_acc": r["test_acc"], "val_acc": r["val_acc"],
                         "accounted_params": r["accounted_params"], "candidates": 1, "image_size": 64})
    print(f"\nOne muNet visit per task (cpu preset), wall time {wall / 60:.1f} min for {len(args.tasks)} tasks\n")
    print(table(rows, ["task", "method", "test_acc", "val_acc", "accounted_params", "candidates", "image_size"]))
    print("\nWhere the wall time went: candidate seconds by what the candidate trains and sees\n")
    print(table(time_by_kind(candidates), ["kind", "candidates", "seconds", "mean_s", "share"]))
    path = write("first_visit", {"args": vars(args), "wall_seconds": wall, "rows": rows,
                                 "time_by_kind": time_by_kind(candidates), "candidates": candidates})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
