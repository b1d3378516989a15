"""Quality: muNet against fine-tuning baselines on the shared data sets (issue 5, part 1).

Every method gets the same per-task training budget, counted in training sample passes
(forward+backward through trainable components) summed over all candidates and runs:
muNet at base 1.0 runs first and its per-task budget is what each baseline spends, split
over R runs (different learning rates; best run by validation). Reported per task and on
average: test accuracy, parameters per task (unique parameters of all live paths / tasks),
accounted parameters, training examples and seconds; plus a plot of average accuracy
against parameters per task.

Resumable: every (method, task) result is a JSON file under --work, and muNet's progress
lives in its own installation there (visits already made are not repeated).

    python benchmarks/quality.py                 # all six tasks, full budget (hours on 2 CPU cores)
    python benchmarks/quality.py --quick         # two tasks, tiny budgets: checks the pipeline only
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SHARED_DATA, table, write  # noqa: E402

from munet.evolver.baselines import run_baseline  # noqa: E402
from munet.evolver.config import cpu_preset  # noqa: E402
from munet.evolver.worker import run_worker  # noqa: E402
from munet.settings import Settings  # noqa: E402
from munet.storage.schema import Candidate, Task  # noqa: E402
from munet.system import System  # noqa: E402

TASKS = ["cifar", "gtsrb", "natural_images", "mnist", "notmnist", "elpv"]
BASELINES = {"full fine-tuning": "full", "head only": "head", "freeze bottom half": "freeze:8", "adapters w32": "adapters:32"}


def installation(work: Path, name: str, tasks: list[str]) -> System:
    home = work / name
    system = System(Settings.from_env(str(home)))
    system.init()
    if not system.tasks_json() and not _roots(system):
        system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    existing = {t["name"] for t in system.tasks_json()}
    for t in tasks:
        if t not in existing:
            system.add_task(t, str(SHARED_DATA / f"{t}.npz"))
    return system


def _roots(system: System) -> list:
    return system.system_json()["roots"]


def examples_per_task(system: System) -> dict[str, int]:
    with system.Session() as s:
        rows = s.execute(select(Task.name, func.sum(Candidate.examples)).join(Candidate, Candidate.task_id == Task.id)
                         .group_by(Task.name)).all()
    return {n: int(v or 0) for n, v in rows}


def seconds_per_task(system: System) -> dict[str, float]:
    with system.Session() as s:
        rows = s.execute(select(Task.name, func.sum(Candidate.seconds)).join(Candidate, Candidate.task_id == Task.id)
                         .group_by(Task.name)).all()
    return {n: float(v or 0) for n, v in rows}


def run_munet(work: Path, base: float, tasks: list[str], cfg, visits: int) -> list[dict]:
    system = installation(work, f"munet-base{base}", tasks)
    cfg = cfg.replace(base=base)
    for round_ in range(1, visits + 1):  # round-robin, as muNet visits tasks
        for t in tasks:
            if system.task_json(t)["visits"] < round_:
                run_worker(system, cfg, names=[t], targets={t: round_}, progress=True)
    ex, secs, summary = examples_per_task(system), seconds_per_task(system), system.system_json()
    out = []
    for t in tasks:
        live = system.task_json(t)["live_path"]
        out.append({"method": f"muNet base {base}", "task": t, "test_acc": live["test_acc"], "val_acc": live["val_acc"],
                    "accounted_params": live["accounted_params"], "params_per_task": summary["params_per_task"],
                    "examples": ex.get(t, 0), "seconds": secs.get(t, 0.0)})
    return out


def run_baselines(work: Path, label: str, kind: str, tasks: list[str], cfg, budget: dict[str, int], runs: int) -> list[dict]:
    system = installation(work, f"baseline-{kind.replace(':', '')}", tasks)
    done_dir = work / "done"
    done_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for t in tasks:
        done = done_dir / f"{kind.replace(':', '')}-{t}.json"
        if done.exists():
            out.append(json.loads(done.read_text()))
            continue
        n_train = int(round(system.task_json(t)["n_train"] * 0.9))
        epochs = max(budget[t] / (runs * n_train), 1.0 / n_train)
        lrs = [0.01, 0.02, 0.005, 0.05][:runs]
        r = run_baseline(system, t, kind, cfg.replace(max_epochs=epochs, intervals=max(2, int(epochs) + 1)), lrs=lrs)
        row = {"method": label, "task": t, "test_acc": r["test_acc"], "val_acc": r["val_acc"],
               "accounted_params": r["accounted_params"], "examples": r["examples"], "seconds": r["seconds"]}
        done.write_text(json.dumps(row))
        out.append(row)
    ppt = system.system_json()["params_per_task"]
    for row in out:
        row["params_per_task"] = ppt
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        acc = statistics.mean(r["test_acc"] for r in mine)
        ppt = mine[0]["params_per_task"] / 1e6
        ax.scatter(ppt, acc, s=60, marker="*" if method.startswith("muNet") else "o")
        ax.annotate(method, (ppt, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("parameters per task (M): unique live parameters / tasks")
    ax.set_ylabel("average test accuracy")
    ax.set_title("muNet vs fine-tuning, EfficientNet-Lite0 root, equal budgets")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="two tasks, tiny budgets (CI: checks the pipeline only)")
    ap.add_argument("--tasks", nargs="+")
    ap.add_argument("--bases", type=float, nargs="+", default=[1.0, 0.7, 0.3])
    ap.add_argument("--visits", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2, help="baseline runs per task (best by validation)")
    ap.add_argument("--work", type=Path, help="where installations and partial results live (resumable)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    tasks = args.tasks or (["mnist", "notmnist"] if args.quick else TASKS)
    missing = [t for t in tasks if not (SHARED_DATA / f"{t}.npz").exists()]
    if missing:
        sys.exit(f"quality: data sets absent from {SHARED_DATA}: {missing}")
    name = "quality_quick" if args.quick else "quality"
    work = args.work or RESULTS / f"{name}-work"
    cfg = cpu_preset()
    if args.quick:
        cfg = cfg.replace(generations=1, candidates=2, max_epochs=0.2, image_sizes=[32, 48])
        cfg.defaults["image_size"] = 32
        args.visits, args.runs, args.bases = 1, 1, [1.0, 0.3]
    t0 = time.perf_counter()
    rows = []
    for base in sorted(args.bases, reverse=True):
        rows += run_munet(work, base, tasks, cfg, args.visits)
    budget = {r["task"]: r["examples"] for r in rows if r["method"] == f"muNet base {max(args.bases)}"}
    for label, kind in BASELINES.items():
        rows += run_baselines(work, label, kind, tasks, cfg, budget, args.runs)
    averages = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        averages.append({"method": method, "task": "average", **{k: statistics.mean(r[k] for r in mine)
                         for k in ("test_acc", "val_acc", "accounted_params", "params_per_task", "examples", "seconds")}})
    cols = ["method", "task", "test_acc", "val_acc", "params_per_task", "accounted_params", "examples", "seconds"]
    print(f"\nQuality, {len(tasks)} tasks, equal per-task budgets (muNet base {max(args.bases)} sets them)\n")
    print(table(rows, cols))
    print("\nAverages\n")
    print(table(averages, cols))
    png = RESULTS / f"{name}.png"
    plot(rows, png)
    path = write(name, {"args": {k: str(v) for k, v in vars(args).items()}, "tasks": tasks, "rows": rows,
                        "averages": averages, "wall_seconds": time.perf_counter() - t0, "plot": png.name})
    print(f"\nwrote {path} and {png}")


if __name__ == "__main__":
    main()
