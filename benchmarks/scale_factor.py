"""Scale control: accounted parameters per task under base 1.0 and base 0.3, over seeds.

score = accuracy x base^(accounted_params / root_params), so base < 1 should steer the
search towards paths that share more and add less. Two tasks (scikit-learn digits, one
with rotated labels, at 32 px) each get V visits per (base, seed); the table reports the
live paths' accounted parameters per task and accuracy.

    python benchmarks/scale_factor.py [--seeds 0 1] [--visits 2]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import table, write  # noqa: E402
from evolver_support import digits_npz, tiny_config  # noqa: E402

from munet.evolver.visit import Visit  # noqa: E402
from munet.settings import Settings  # noqa: E402
from munet.system import System  # noqa: E402


def run(base: float, seed: int, visits: int, gens: int, cands: int) -> dict:
    with tempfile.TemporaryDirectory() as home:
        system = System(Settings.from_env(home))
        system.init()
        system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
        for i, name in enumerate(("a", "b")):
            system.add_task(name, str(digits_npz(Path(home) / f"{name}.npz", n_train=600, n_test=300, offset=3 * i)))
        cfg = tiny_config(generations=gens, candidates=cands, base=base, seed=seed, mu=0.2)
        for _ in range(visits):
            for name in ("a", "b"):
                Visit(system, name, cfg, progress=False).run()
        tasks = [system.task_json(n)["live_path"] for n in ("a", "b")]
        summary = system.system_json()
    return {"base": base, "seed": seed,
            "accounted_params_per_task": statistics.mean(t["accounted_params"] for t in tasks),
            "params_per_task": summary["params_per_task"],
            "mean_test_acc": statistics.mean(t["test_acc"] for t in tasks),
            "mean_val_acc": statistics.mean(t["val_acc"] for t in tasks)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--bases", type=float, nargs="+", default=[1.0, 0.3])
    ap.add_argument("--visits", type=int, default=2)
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    rows = [run(b, s, args.visits, args.generations, args.candidates) for s in args.seeds for b in args.bases]
    for r in rows:
        print(f"base {r['base']} seed {r['seed']}: {r['accounted_params_per_task'] / 1e6:.3f}M accounted per task", flush=True)
    print("\nScale factor: accounted parameters per task (2 tasks, digits at 32 px)\n")
    print(table(rows, ["base", "seed", "accounted_params_per_task", "params_per_task", "mean_val_acc", "mean_test_acc"]))
    by_base = {b: statistics.mean(r["accounted_params_per_task"] for r in rows if r["base"] == b) for b in args.bases}
    wins = all(min(r["accounted_params_per_task"] for r in rows if r["base"] == min(args.bases) and r["seed"] == s)
               < min(r["accounted_params_per_task"] for r in rows if r["base"] == max(args.bases) and r["seed"] == s)
               for s in args.seeds)
    print(f"\nmean accounted params per task by base: { {b: round(v) for b, v in by_base.items()} }; "
          f"lower base smaller on every seed: {wins}")
    print(f"wrote {write('scale_factor', {'args': vars(args), 'rows': rows, 'mean_by_base': by_base, 'smaller_on_every_seed': wins})}")


if __name__ == "__main__":
    main()
