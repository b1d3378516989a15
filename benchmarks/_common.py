"""Helpers shared by the benchmark scripts: a throwaway installation, tables, JSON."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

# MUNET_BENCH_RESULTS: where results go instead (the test suite's --quick run writes to a temp dir).
RESULTS = Path(os.environ.get("MUNET_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# The six data sets of ../shared/data that the quality benchmark and its analyses cover.
SHARED_TASKS = ("cifar", "gtsrb", "natural_images", "mnist", "notmnist", "elpv")


def one_task(home: str, task_name: str) -> tuple:
    """A fresh installation in `home` with the packaged root and one shared data set:
    (system, root row, task row, its training data as the evolver splits it)."""
    from sqlalchemy import select

    from munet.evolver.train import TaskData
    from munet.settings import Settings
    from munet.storage.schema import Root, Task
    from munet.system import System

    system = System(Settings.from_env(home))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    system.add_task(task_name, str(SHARED_DATA / f"{task_name}.npz"))
    with system.Session() as s:
        task = s.scalar(select(Task))
        root = s.get(Root, task.root_id)
    data = TaskData.from_arrays(task.name, system.dataset(task), task.val_fraction, task.split_seed,
                                root.config["mean"], root.config["std"])
    return system, root, task, data


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}


def table(rows: list[dict], columns: list[str]) -> str:
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str))
    return path
