"""The quality benchmark's pipeline end to end (`--quick`: two tasks, tiny budgets), on the
shared data sets; it checks the pipeline, not the numbers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.mark.skipif(not all((DATA / f"{t}.npz").exists() for t in ("mnist", "notmnist")),
                    reason="the shared data sets are not on this machine")
def test_quality_quick_runs_every_method_on_two_tasks_and_reports_them(tmp_path):
    env = {**os.environ, "MUNET_BENCH_RESULTS": str(tmp_path / "results")}
    run = subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--work", str(tmp_path / "work")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "quality_quick.json").read_text())
    methods = {a["method"] for a in report["averages"]}
    assert methods == {"muNet base 1.0", "muNet base 0.3", "full fine-tuning", "head only", "freeze bottom half",
                       "adapters w32"}, report["unfinished"]
    budget = {r["task"]: r["examples"] for r in report["rows"] if r["method"] == "muNet base 1.0"}
    assert set(budget) == {"mnist", "notmnist"} and all(budget.values())
    for row in report["rows"]:
        assert 0.0 <= row["test_acc"] <= 1.0 and row["params_per_task"] > 0
        if not row["method"].startswith("muNet"):  # every baseline spends muNet base 1.0's budget, to a batch
            assert abs(row["examples"] - budget[row["task"]]) <= 64, row
    assert (tmp_path / "results" / "quality_quick.png").stat().st_size > 0
    assert report["mixed_configs"] == [] and all(len(row["config"]) == 12 for row in report["rows"])

    # A part left by a run with other settings (a session that changed the preset) is named
    # in the report instead of averaging silently with the rest.
    stale = tmp_path / "work" / "parts" / "head-only" / "mnist.json"
    stale.write_text(json.dumps({**json.loads(stale.read_text()), "config": "0123456789ab"}))
    short = tmp_path / "work" / "parts" / "adapters-w32" / "notmnist.json"  # and one from another muNet budget
    short.write_text(json.dumps({**json.loads(short.read_text()), "budget": 7}))
    rerun = subprocess.run([sys.executable, "benchmarks/quality.py", "--quick", "--work", str(tmp_path / "work"),
                            "--only", "head only"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    mixed = json.loads((tmp_path / "results" / "quality_quick.json").read_text())["mixed_configs"]
    assert len(mixed) == 2 and mixed[0].startswith("head only: its tasks ran with 2 different evolver configs")
    assert mixed[1].startswith("adapters w32 notmnist: ran on a budget of 7 examples, muNet now sets")
    assert "mixed settings: head only" in rerun.stdout
