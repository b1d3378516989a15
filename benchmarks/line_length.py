"""How long a task's served line trained, against its accuracy, over every recorded quality run.

A served line is the chain of candidates whose weights the live path carries (the `training_line`
of a muNet quality part); its `examples` are what the served weights actually saw, a fraction of
the task's budget. This reads the committed parts only (no training, seconds to run): every muNet
base 1.0 part with a training line, under `results/quality_parts/` and `results/quality_experiments/`
(the experiments ran other settings of the search, so the spread is over methods as well as
seeds), and the full fine-tuning parts for their examples per run. It prints per task the
correlation of line length with test and validation accuracy and the test accuracy of the longer
and shorter half of the lines, how far validation overstates test (the selection's optimism: a
muNet run picks its path among dozens of candidates on the same validation images, a fine-tuning
part among two runs), and writes `results/line_length.json`.

    python benchmarks/line_length.py
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_TASKS as TASKS, table, write  # noqa: E402

SOURCES = (Path(__file__).resolve().parent / "results",)
# Every task validated on 10% of its training images until 2026-12-06 (parts without
# `val_fraction`); runs on another split trained and selected on other images, so they are
# left out rather than pooled.
SPLIT = 0.1


def on_split(row: dict) -> bool:
    return abs(row.get("val_fraction", 0.1) - SPLIT) < 1e-9


def parts(roots=SOURCES) -> list[tuple[str, dict]]:
    found = []
    for root in roots:
        for folder in ("quality_parts", "quality_experiments"):
            for path in sorted((root / folder).glob("**/*.json")):
                row = json.loads(path.read_text())
                if isinstance(row, dict) and row.get("task") in TASKS and on_split(row):
                    found.append((str(path.relative_to(root)), row))
    return found


def lines(found: list[tuple[str, dict]]) -> list[dict]:
    """muNet base 1.0 runs with a recorded served line, each once (a part copied between folders
    counts once). Runs with validation images held back (`final_holdout`: their visits record
    finalists) are left out: their validation accuracy counts part of the split only."""
    out, seen = [], set()
    for path, row in found:
        line = row.get("training_line") or {}
        held_back = any(v.get("finalists") for v in row.get("visits") or [])
        if row.get("method") != "muNet base 1.0" or not line.get("examples") or held_back:
            continue
        key = (row["task"], row["test_acc"], row["val_acc"], line["examples"])
        if key not in seen:
            seen.add(key)
            out.append({"part": path, "task": row["task"], "line_examples": line["examples"], "steps": line.get("steps"),
                        "val_acc": row["val_acc"], "test_acc": row["test_acc"], "examples": row["examples"]})
    return out


def correlation(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return None
    return float(np.corrcoef(xs, ys)[0, 1])


def summary(task: str, runs: list[dict], fine_tuning: list[dict]) -> dict:
    mine = [r for r in runs if r["task"] == task]
    ft = [r for r in fine_tuning if r["task"] == task]
    row = {"task": task, "runs": len(mine)}
    if mine:
        ex, val, test = ([r[k] for r in mine] for k in ("line_examples", "val_acc", "test_acc"))
        median = statistics.median(ex)
        longer = [r["test_acc"] for r in mine if r["line_examples"] > median]
        shorter = [r["test_acc"] for r in mine if r["line_examples"] <= median]
        row.update({"line_examples_median": int(median), "line_share_of_budget": median / statistics.median(r["examples"] for r in mine),
                    "r_line_test": correlation(ex, test), "r_line_val": correlation(ex, val), "r_val_test": correlation(val, test),
                    "test_longer_half": statistics.mean(longer) if longer else None,
                    "test_shorter_half": statistics.mean(shorter) if shorter else None,
                    "val_over_test": statistics.mean(v - t for v, t in zip(val, test))})
    if ft:
        row.update({"fine_tuning_examples_per_run": int(statistics.mean(r["examples"] / max(1, len(r.get("runs") or [1])) for r in ft)),
                    "fine_tuning_test": statistics.mean(r["test_acc"] for r in ft),
                    "fine_tuning_val_over_test": statistics.mean(r["val_acc"] - r["test_acc"] for r in ft)})
    return row


def main() -> int:
    found = parts()
    runs = lines(found)
    if not runs:
        print(f"line_length: no muNet base 1.0 parts with a served line under {SOURCES[0]}", file=sys.stderr)
        return 1
    fine_tuning = [row for _, row in found if row.get("method") == "full fine-tuning"]
    rows = [summary(t, runs, fine_tuning) for t in TASKS]
    print(f"\nServed-line length against accuracy, {len(runs)} muNet base 1.0 task runs\n")
    print(table([{k: (round(v, 3) if isinstance(v, float) else ("" if v is None else v)) for k, v in r.items()} for r in rows],
                ["task", "runs", "line_examples_median", "line_share_of_budget", "r_line_test", "r_line_val", "r_val_test",
                 "test_longer_half", "test_shorter_half", "val_over_test", "fine_tuning_examples_per_run", "fine_tuning_test",
                 "fine_tuning_val_over_test"]))
    path = write("line_length", {"tasks": rows, "runs": runs})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
