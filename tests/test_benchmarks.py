"""The quality benchmark's pipeline end to end (`--quick`: two tasks, tiny budgets), on the
shared data sets; it checks the pipeline, not the numbers."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def _script(name: str):
    """A benchmark script as a module: they are scripts, not a package."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def test_an_option_added_off_or_a_setting_removed_leaves_the_committed_parts_settings_digest_unchanged():
    from munet.evolver.config import EvolverConfig, cpu_preset

    quality = _script("quality")
    results = REPO / "benchmarks" / "results"
    digest = quality.config_digest(cpu_preset())  # the digest leaves base out: it names the method
    for base in ("1.0", "0.7", "0.3"):
        committed = json.loads((results / "quality_parts" / f"munet-base-{base}" / "cifar.json").read_text())
        assert committed["config"] == digest, f"the committed muNet base {base} parts ran with the cpu preset"
    # The runs before the cpu preset fixed flips off (benchmarks/HISTORY.md, "Flips a lineage
    # picks up") still hash to that preset with flips searchable.
    before_flips = cpu_preset().replace(fixed_hparams=tuple(k for k in cpu_preset().fixed_hparams if k != "hflip"))
    before = quality.config_digest(before_flips)
    for run in ("base-1.0-flips-searchable-2d447af", "base-0.7-flips-searchable-c4320ff",
                "base-0.3-flips-searchable-0aa571c"):
        older = json.loads((results / "quality_experiments" / run / "cifar.json").read_text())
        assert older["config"] == before != digest
    assert not set(quality.REMOVED) & set(EvolverConfig.__dataclass_fields__), "REMOVED holds only dropped settings"
    on = {"continue_best": True, "final_holdout": 0.3, "final_top": 5, "adapter_root_seed": 32, "line_soup": 3,
          "greedy_soup": True, "median_stop": 4, "plan_root_seed": "bottom:12+adapters:32", "root_shared": True}
    assert set(on) == set(quality.ADDED_OFF), "every added option has a value here that turns it on"
    for key, value in on.items():
        assert quality.config_digest(cpu_preset().replace(**{key: value})) != digest, f"{key} on is another setting"
    # The committed six-task runs with the plan seed (HISTORY.md, "The plan as a seed, base 0.9,
    # all six tasks" and "..., base 0.7") are the cpu preset with that one option on, on every task.
    seeded = quality.config_digest(cpu_preset().replace(plan_root_seed=on["plan_root_seed"]))
    for name in ("base-0.9-plan-seed-0bc3efd", "base-0.7-plan-seed-355190c"):
        run = results / "quality_experiments" / name
        assert {json.loads(p.read_text())["config"] for p in run.glob("*.json")} == {seeded}, name
    # ..., and with the root charged as shared by every task ("The root charged as shared by every
    # task, with the plan seed, base 0.7, all six tasks"): the two options on together.
    shared = quality.config_digest(cpu_preset().replace(plan_root_seed=on["plan_root_seed"], root_shared=True))
    run = results / "quality_experiments" / "base-0.7-plan-seed-root-shared-d824721"
    assert {json.loads(p.read_text())["config"] for p in run.glob("*.json")} == {shared} != seeded


def test_the_quality_report_names_munet_parts_that_ran_with_other_settings_than_its_command():
    from munet.evolver.config import cpu_preset

    quality = _script("quality")
    cfg, other = cpu_preset(), cpu_preset().replace(seed=7)
    now, then = quality.config_digest(cfg), quality.config_digest(other)
    rows = [{"method": "muNet base 1.0", "config": then}, {"method": "muNet base 1.0", "config": now},
            {"method": "muNet base 0.3", "config": now}, {"method": "muNet base 0.7"},  # from before digests
            {"method": "full fine-tuning", "config": then}]  # a baseline's settings are its plan, not the search's
    assert quality.stale_settings(rows, cfg) == [f"muNet base 1.0: its parts ran with evolver settings ['{then}'], "
                                                 f"the settings of this command hash to {now}"]
    assert quality.stale_settings(rows, other) == [f"muNet base 1.0: its parts ran with evolver settings ['{now}'], "
                                                   f"the settings of this command hash to {then}",
                                                   f"muNet base 0.3: its parts ran with evolver settings ['{now}'], "
                                                   f"the settings of this command hash to {then}"]


def test_quality_set_overrides_the_preset_adds_up_when_repeated_and_rejects_unknown_or_invalid_settings():
    quality = _script("quality")
    cfg = quality.preset_with(["final_holdout=0.5", "seed=3", "inputs_per=generation"])
    assert (cfg.final_holdout, cfg.seed, cfg.inputs_per) == (0.5, 3, "generation")
    assert quality.config_digest(cfg) != quality.config_digest(quality.preset_with([]))
    for bad in (["no_such_setting=1"], ["seed"], ["final_holdout=1.5"]):
        with pytest.raises(SystemExit) as e:
            quality.preset_with(bad)
        assert str(e.value).startswith("quality: --set"), e.value
    args = quality.parser().parse_args(["--set", "seed=3", "--only", "head only", "--set", "final_holdout=0.5"])
    assert args.set == ["seed=3", "final_holdout=0.5"], "a repeated --set adds its settings, it drops none"


def test_quality_experiment_points_average_only_munet_runs_that_finished_every_task(tmp_path):
    quality = _script("quality")

    def part(run, method, task, acc, ppt):
        (tmp_path / run).mkdir(exist_ok=True)
        row = {"method": method, "task": task, "test_acc": acc, "val_acc": acc + 0.01, "params_per_task": ppt}
        (tmp_path / run / f"{task}.json").write_text(json.dumps(row))

    part("pairs", "muNet base 0.7", "mnist", 0.98, 1.0e6)  # two installations: their sizes average
    part("pairs", "muNet base 0.7", "elpv", 0.70, 2.0e6)
    part("half-done", "muNet base 1.0", "mnist", 0.99, 3.0e6)
    part("baseline", "full fine-tuning", "mnist", 0.99, 3.4e6)
    part("baseline", "full fine-tuning", "elpv", 0.75, 3.4e6)
    points = quality.experiment_points(tmp_path, ["mnist", "elpv"])
    assert [p["experiment"] for p in points] == ["pairs"]
    assert points[0]["test_acc"] == pytest.approx(0.84) and points[0]["params_per_task"] == pytest.approx(1.5e6)
    rows = [{"method": m, "task": t, "test_acc": 0.9, "params_per_task": 3.4e6 if m == "full fine-tuning" else 1e6}
            for m in ("full fine-tuning", "muNet base 1.0") for t in ("mnist", "elpv")]
    quality.plot(rows, tmp_path / "experiments.png", points)
    assert (tmp_path / "experiments.png").stat().st_size > 0
    assert quality.experiment_points(tmp_path / "absent", ["mnist"]) == [], "no experiments folder, no points"


@pytest.mark.slow
@pytest.mark.skipif(not (DATA / "elpv.npz").exists(), reason="the shared data sets are not on this machine")
def test_step_time_times_every_trainer_arm_against_the_plain_timm_loop(monkeypatch):
    step_time = _script("step_time")
    written = {}
    monkeypatch.setattr(step_time, "write", lambda name, payload: written.update(payload) or name)
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--task", "elpv", "--sizes", "32", "--steps", "1",
                                      "--arms", "adapters w32, all trained"])
    step_time.main()
    timm_loop, trainer = written["rows"]
    assert (timm_loop["arm"], trainer["arm"]) == ("timm loop", "adapters w32, all trained")
    assert timm_loop["vs_timm"] == 1.0
    assert trainer["vs_timm"] == pytest.approx(timm_loop["seconds"] / trainer["seconds"])
    names = []
    monkeypatch.setattr(step_time, "write", lambda name, payload: names.append(name) or written.update(payload) or name)
    monkeypatch.setattr(sys, "argv", ["step_time.py", "--task", "elpv", "--sizes", "32", "--steps", "1",
                                      "--arms", "timm loop, bf16 autocast", "--name", "step_time_bf16"])
    step_time.main()
    assert names == ["step_time_bf16"], "an arm of its own goes to its own file, not over step_time.json"
    assert [r["arm"] for r in written["rows"]] == ["timm loop", "timm loop, bf16 autocast"]


def test_line_length_counts_each_served_line_once_and_relates_its_length_to_accuracy(tmp_path):
    line_length = _script("line_length")

    def part(folder: str, method: str, line: int | None, test: float, **extra):
        path = tmp_path / folder / "elpv.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"method": method, "task": "elpv", "test_acc": test, "val_acc": test + 0.02,
                                    "examples": 56000, "training_line": {"examples": line, "steps": 3} if line else None,
                                    **extra}))

    part("quality_parts/munet-base-1.0", "muNet base 1.0", 4000, 0.70)
    part("quality_experiments/copy-of-current", "muNet base 1.0", 4000, 0.70)  # the same run, moved: counted once
    part("quality_experiments/a", "muNet base 1.0", 8000, 0.72)
    part("quality_experiments/b", "muNet base 1.0", 16000, 0.76)
    part("quality_parts/munet-base-0.3", "muNet base 0.3", 2000, 0.60)  # another base: not compared
    part("quality_experiments/held-back", "muNet base 1.0", 32000, 0.50,  # validation on part of the split: left out
         visits=[{"visit": 1, "finalists": [{"val_acc": 0.5, "holdout_acc": 0.4, "chosen": True}]}])
    part("quality_parts/full-fine-tuning", "full fine-tuning", None, 0.77, runs=[{"lr": 0.01}, {"lr": 0.02}], val_acc=0.775)
    part("quality_experiments/larger-split", "muNet base 1.0", 64000, 0.90, val_fraction=0.25)  # other images: left out
    part("quality_experiments/larger-split-ft", "full fine-tuning", None, 0.50, runs=[{"lr": 0.01}], val_fraction=0.25)

    found = line_length.parts((tmp_path,))
    runs = line_length.lines(found)
    assert sorted(r["line_examples"] for r in runs) == [4000, 8000, 16000]
    ft = [row for _, row in found if row["method"] == "full fine-tuning"]
    row = line_length.summary("elpv", runs, ft)
    assert row["runs"] == 3 and row["line_examples_median"] == 8000
    assert row["r_line_test"] == pytest.approx(1.0) and row["r_val_test"] == pytest.approx(1.0)
    assert row["test_longer_half"] == pytest.approx(0.76) and row["test_shorter_half"] == pytest.approx(0.71)
    assert row["fine_tuning_examples_per_run"] == 28000 and row["fine_tuning_test"] == pytest.approx(0.77)
    assert row["val_over_test"] == pytest.approx(0.02) and row["fine_tuning_val_over_test"] == pytest.approx(0.005)


def test_split_leak_tells_shots_of_one_object_on_both_sides_of_a_split_from_new_objects():
    split_leak = _script("split_leak")
    rng = np.random.default_rng(0)
    classes, objects, shots, dim = 10, 12, 5, 32
    centres = rng.normal(size=(classes, dim))
    # Objects of one class differ more than a class centre allows a nearest neighbour to tell;
    # shots of one object differ little, like the frames of one GTSRB track.
    protos = centres[:, None] + 2.5 * rng.normal(size=(classes, objects, dim))

    def sample(protos, n_shots):
        x = np.repeat(protos.reshape(-1, dim), n_shots, axis=0) + 0.1 * rng.normal(size=(protos[:, :, 0].size * n_shots, dim))
        y = np.repeat(np.arange(classes), protos.shape[1] * n_shots)
        f = x / np.linalg.norm(x, axis=1, keepdims=True)
        return (f.astype(np.float32), split_leak.standardised_pixels(x[:, :, None, None])), y

    train, y = sample(protos, shots)
    new_objects, y_new = sample(centres[:, None] + 2.5 * rng.normal(size=(classes, 4, dim)), shots)
    same_objects, y_same = sample(protos, 1)

    leaky = split_leak.compare_splits("t", {"train": train, "test": new_objects}, y, y_new, [0, 1])
    clean = split_leak.compare_splits("t", {"train": train, "test": same_objects}, y, y_same, [0, 1])
    summary = split_leak.summary(leaky + [{**r, "task": "u"} for r in clean], ["t", "u"])
    by_task = {row["task"]: row for row in summary if row["split"] == "random"}
    assert all(r["val_images"] == 150 for r in leaky)  # a quarter of 600 (default_val_fraction)
    leak, control = by_task["t"], by_task["u"]
    assert leak["nn_val"] > 0.9 and leak["nn_gap"] > 0.4  # val's neighbours are track-mates, test's are not
    assert leak["probe_gap"] > 0.2 and leak["px_val"] < leak["px_test"]
    assert abs(control["nn_gap"]) < 0.05 and abs(control["probe_gap"]) < 0.05  # the same objects on both sides


def test_a_grouped_split_keeps_shots_of_one_object_on_one_side():
    split_leak = _script("split_leak")
    rng = np.random.default_rng(1)
    objects = rng.normal(size=(40, 16))
    f = np.repeat(objects, 5, axis=0) + 0.01 * rng.normal(size=(200, 16))  # 5 shots per object
    y = np.repeat(np.arange(4), 50)
    train, val, largest = split_leak.grouped_split(split_leak.similarity_groups(f, y, 0.05), y, 0.25, seed=0)
    obj = np.repeat(np.arange(40), 5)
    assert largest == 5 and len(val) == 60 and not set(obj[train]) & set(obj[val])
    assert sorted(np.concatenate([train, val])) == list(range(200))
    assert all((y[val] == c).sum() == 15 for c in range(4))  # each class: whole objects until it holds its share (12 -> 3 objects)


def test_flip_probe_tells_labels_a_mirror_changes_from_labels_it_keeps():
    flip_probe = _script("flip_probe")
    rng = np.random.default_rng(2)
    classes, per_class, dim = 6, 60, 24
    centres = 3 * rng.normal(size=(classes, dim))

    def sample(n):
        y = np.repeat(np.arange(classes), n)
        return centres[y] + rng.normal(size=(len(y), dim)), y

    (f_train, y_train), (f_test, y_test) = sample(per_class), sample(20)
    # Mirrored, classes 0 and 1 look like each other (keep left / keep right), the rest like themselves.
    swap = np.array([1, 0, 2, 3, 4, 5])

    def mirrored(f, y):
        return f - centres[y] + centres[swap[y]]

    sensitive = flip_probe.flip_costs("signs", f_train, mirrored(f_train, y_train), y_train, f_test, mirrored(f_test, y_test), y_test)
    symmetric = flip_probe.flip_costs("photos", f_train, f_train.copy(), y_train, f_test, f_test.copy(), y_test)
    assert sensitive["test"] > 0.95 and sensitive["mirror_drop"] > 0.25  # two of six classes read as each other
    assert sensitive["flip_training_cost"] > 0.1  # flips taught the probe to confuse them
    assert abs(symmetric["mirror_drop"]) < 0.01 and abs(symmetric["flip_training_cost"]) < 0.02
    assert flip_probe.mirror(np.arange(6).reshape(1, 1, 6))[0, 0].tolist() == [5, 4, 3, 2, 1, 0]


def test_every_benchmark_section_the_code_cites_exists_in_the_notebook():
    # Comments justify settings by naming a run in benchmarks/HISTORY.md; a renamed or moved
    # section would leave the reason unfindable.
    notebook = " ".join((REPO / "benchmarks" / "HISTORY.md").read_text().split())
    cited = {}
    for path in [*REPO.glob("*/*.py"), REPO / "README.md"]:
        text = " ".join(path.read_text().replace("#", " ").split())
        for name in re.findall(r'benchmarks/HISTORY\.md, "([^"]+)"?', text):
            cited.setdefault(name, path.relative_to(REPO))
    assert len(cited) >= 5
    missing = {name: str(path) for name, path in cited.items() if name not in notebook}
    assert not missing
