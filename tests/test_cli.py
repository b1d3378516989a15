"""The `munet` command: the acceptance sequence, clear one-line errors that store nothing,
the quickstart, fsck, pins, gc, JSON output and the registry other modules extend.

The acceptance paths run the installed `munet` command in a subprocess with a fresh
MUNET_HOME; the many small error cases call `munet.cli.main` in-process for speed.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import select

from conftest import SHARED_DATA, make_settings
from munet import cli
from munet.storage import commit
from munet.storage.schema import Task
from munet.system import System

LITE0_PARAMS = 4_652_008
LITE0_ROOT_PARAMS = LITE0_PARAMS - (1280 * 1000 + 1000)


# -- helpers ------------------------------------------------------------------------------

def munet(home: Path, *args: str, debug: bool = False) -> subprocess.CompletedProcess:
    """Run the installed `munet` command (or `python -m munet.cli` when not on PATH)."""
    exe = shutil.which("munet")
    cmd = [exe] if exe else [sys.executable, "-m", "munet.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUNET_")}
    env["MUNET_HOME"] = str(home)
    if debug:
        env["MUNET_DEBUG"] = "1"
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, timeout=300)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def assert_one_error_line(rc: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("munet: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def make_npz(path: Path, classes: int = 3, per_class: int = 6, side: int = 8, channels: int = 1, **override) -> Path:
    rng = np.random.default_rng(0)
    n = classes * per_class
    arrays = {
        "x_train": rng.integers(0, 256, size=(n, side, side, channels), dtype=np.uint8),
        "y_train": np.repeat(np.arange(classes), per_class).astype(np.int16),
        "x_test": rng.integers(0, 256, size=(classes * 2, side, side, channels), dtype=np.uint8),
        "y_test": np.repeat(np.arange(classes), 2).astype(np.int16),
        "classes": np.array([f"class{i}" for i in range(classes)]),
    }
    arrays.update(override)
    np.savez_compressed(path, **arrays)
    return path


def run_main(monkeypatch, capsys, home: Path, *args: str) -> tuple[int, str, str]:
    """`munet ARGS` in this process (MUNET_HOME restored afterwards)."""
    for key in [k for k in os.environ if k.startswith("MUNET_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MUNET_HOME", str(home))
    rc = cli.main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def snapshot(home: Path) -> tuple[list[str], list[str]]:
    """What a failed command must not change: stored data sets and task rows."""
    data = sorted(p.name for p in (home / "datasets").iterdir())
    system = System(make_settings(home))
    try:
        with system.Session() as s:
            tasks = sorted(s.scalars(select(Task.name)))
    finally:
        system.engine.dispose()
    return data, tasks


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A home with the packaged root `lite0` (made once, through the Python API)."""
    home = tmp_path_factory.mktemp("installed")
    system = System(make_settings(home))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    system.engine.dispose()
    return home


@pytest.fixture
def home_copy(installed, tmp_path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(installed, home)
    return home


# -- the acceptance sequence ----------------------------------------------------------------

def test_init_root_task_system_sequence_in_a_fresh_home(tmp_path):
    home = tmp_path / "fresh"
    data = SHARED_DATA / "mnist.npz"
    if not data.exists():  # the shared data sets are optional: a small generated one does
        data = make_npz(tmp_path / "small.npz", classes=4)
    ok(munet(home, "init"))
    root = json.loads(ok(munet(home, "root", "add", "lite0", "--timm", "tf_efficientnet_lite0",
                                "--weights", "packaged", "--json")).stdout)
    assert root["params"] == LITE0_PARAMS and root["root_params"] == LITE0_ROOT_PARAMS
    assert root["components"] == 20
    added = json.loads(ok(munet(home, "task", "add", "mnist", "--data", str(data), "--json")).stdout)
    with np.load(data) as d:
        assert added["n_train"] == len(d["y_train"]) and added["n_test"] == len(d["y_test"])
        assert [row["train"] for row in added["per_class"]] == np.bincount(d["y_train"]).tolist()
        assert [row["test"] for row in added["per_class"]] == np.bincount(d["y_test"]).tolist()
    assert added["root"] == "lite0" and added["status"] == "queued"
    summary = json.loads(ok(munet(home, "system", "--json")).stdout)
    assert {"roots", "tasks", "components", "unique_params", "params_per_task"} <= set(summary)
    assert summary["roots"] == [{"name": "lite0", "timm": "tf_efficientnet_lite0", "params": LITE0_PARAMS,
                                 "root_params": LITE0_ROOT_PARAMS}]
    assert summary["tasks"] == 1 and summary["components"] == 20
    # The human form says the same.
    human = cli_main_stdout(home, "system")
    assert "4,652,008" in human and "4.65M" in human and "3.37M" in human


def test_task_list_and_show_agree_in_json_and_print_tables(home_copy, tmp_path, monkeypatch, capsys):
    data = make_npz(tmp_path / "d.npz")
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "add", "small", "--data", str(data))
    flat = " ".join(out.split())
    assert rc == 0 and "class2" in out and "18 train / 6 test images, 3 classes, image shape 8x8x1" in flat
    assert "25% of train held for validation" in flat  # 18 images: a quarter, the most a small set gives up
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "list", "--json")
    tasks = json.loads(out)
    assert [t["name"] for t in tasks] == ["small"]
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "--json", "task", "show", "small")
    shown = json.loads(out)
    assert shown == tasks[0] and shown["live_path"] is None and shown["status"] == "queued"
    assert shown["val_fraction"] == 0.25
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "show", "small")
    assert rc == 0 and "small" in out and "none yet" in out and "about 4 of the training images (25%)" in out
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "list")
    assert rc == 0 and "small" in out and "queued" in out


def cli_main_stdout(home: Path, *args: str) -> str:
    """`munet ARGS` in this process, for checks that need no fresh interpreter."""
    import contextlib
    import io

    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(buf):
        for key in [k for k in os.environ if k.startswith("MUNET_")]:
            mp.delenv(key)
        mp.setenv("MUNET_HOME", str(home))
        assert cli.main(list(args)) == 0
    return buf.getvalue()


def test_help_lists_every_command_with_an_example(tmp_path):
    text = ok(munet(tmp_path, "--help")).stdout
    for command in ("init", "root add", "task add", "task list", "task show", "task pin", "task unpin", "system",
                    "gc", "fsck", "quickstart"):
        assert f"munet {command}" in text, command
    assert not (tmp_path / "munet.db").exists()


def test_commands_before_init_fail_clearly_and_create_nothing(tmp_path):
    home = tmp_path / "nothing"
    proc = munet(home, "system")
    assert_one_error_line(proc.returncode, proc.stderr, "munet init")
    assert not home.exists()


def test_quickstart_works_in_a_fresh_home_and_twice(tmp_path, monkeypatch, capsys):
    home = tmp_path / "qs"
    first = ok(munet(home, "quickstart"))
    assert "digits" in first.stdout and "lite0" in first.stdout
    second = ok(munet(home, "quickstart"))
    assert "there already" in second.stdout
    rc, out, _ = run_main(monkeypatch, capsys, home, "system", "--json")
    summary = json.loads(out)
    assert [r["name"] for r in summary["roots"]] == ["lite0"] and summary["tasks"] == 1
    rc, out, _ = run_main(monkeypatch, capsys, home, "task", "show", "digits", "--json")
    task = json.loads(out)
    assert task["classes"] == [str(i) for i in range(10)]
    assert task["n_train"] + task["n_test"] == 1797
    rc, out, _ = run_main(monkeypatch, capsys, home, "task", "show", "digits")
    assert rc == 0 and "training line" in out and "epochs of the training split" in " ".join(out.split())


def test_fsck_passes_then_fails_after_corrupting_a_blob(home_copy):
    report = json.loads(ok(munet(home_copy, "fsck", "--json")).stdout)
    assert report["ok"] and report["blobs"] == report["components"] == 20 and report["problems"] == []
    blob = sorted((home_copy / "layers").rglob("*.safetensors"))[3]
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    proc = munet(home_copy, "fsck")
    assert proc.returncode != 0
    assert blob.stem in proc.stderr and "does not match its hash" in proc.stderr
    blob.unlink()


def test_fsck_reports_a_missing_blob(home_copy, monkeypatch, capsys):
    sorted((home_copy / "layers").rglob("*.safetensors"))[0].unlink()
    rc, out, err = run_main(monkeypatch, capsys, home_copy, "fsck", "--json")
    report = json.loads(out)
    assert rc == 1 and not report["ok"] and len(report["problems"]) == 1 and "missing" in report["problems"][0]


# -- bad input: one clear line, nothing stored -------------------------------------------------

def test_task_add_with_a_single_class_data_set_fails_with_one_line_and_stores_nothing(installed, tmp_path):
    bad = make_npz(tmp_path / "one.npz", classes=1)
    before = snapshot(installed)
    proc = munet(installed, "task", "add", "solo", "--data", str(bad))
    assert_one_error_line(proc.returncode, proc.stderr, "at least 2 classes")
    assert snapshot(installed) == before


@pytest.mark.parametrize("case", ["missing-file", "bad-name", "not-an-archive", "missing-array", "bad-labels",
                                  "unknown-root", "empty-folder", "float-pixels"])
def test_task_add_rejects_bad_input_with_one_line_and_stores_nothing(installed, tmp_path, monkeypatch, capsys, case):
    name, data, extra, fragment = "t", None, [], ""
    if case == "missing-file":
        data, fragment = tmp_path / "nope.npz", "no such file"
    elif case == "bad-name":
        name, data, fragment = "../x", make_npz(tmp_path / "d.npz"), "invalid task name"
    elif case == "not-an-archive":
        data = tmp_path / "d.npz"
        data.write_text("hello")
    elif case == "missing-array":
        data = tmp_path / "d.npz"
        np.savez(data, x_train=np.zeros((2, 8, 8), np.uint8))
        fragment = "y_train"
    elif case == "bad-labels":
        data, fragment = make_npz(tmp_path / "d.npz", y_test=np.full(6, 7, np.int16)), "label 7"
    elif case == "unknown-root":
        data, extra, fragment = make_npz(tmp_path / "d.npz"), ["--root", "nosuch"], "no root named 'nosuch'"
    elif case == "empty-folder":
        data = tmp_path / "folder"
        data.mkdir()
    elif case == "float-pixels":
        data = make_npz(tmp_path / "d.npz", x_train=np.zeros((18, 8, 8, 1), np.float32))
        fragment = "uint8"
    before = snapshot(installed)
    rc, _out, err = run_main(monkeypatch, capsys, installed, "task", "add", name, "--data", str(data), *extra)
    assert_one_error_line(rc, err, fragment)
    assert snapshot(installed) == before


def test_duplicate_task_name_is_rejected(home_copy, tmp_path, monkeypatch, capsys):
    data = make_npz(tmp_path / "d.npz")
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "add", "dup", "--data", str(data))
    assert rc == 0 and "dup" in out
    before = snapshot(home_copy)
    rc, _, err = run_main(monkeypatch, capsys, home_copy, "task", "add", "dup", "--data", str(data))
    assert_one_error_line(rc, err, "exists already")
    assert snapshot(home_copy) == before


@pytest.mark.parametrize("args,fragment", [
    (["task", "show", "nosuch"], "no task named 'nosuch'"),
    (["task", "pin", "nosuch", "abc"], "no task named 'nosuch'"),
    (["task", "unpin", "nosuch"], "no task named 'nosuch'"),
    (["root", "add", "lite0", "--timm", "tf_efficientnet_lite0"], "exists already"),
    (["root", "add", "r2", "--timm", "resnet18"], "no component family"),
    (["root", "add", "r2", "--timm", "no_such_model"], "timm has no model named 'no_such_model'"),
    (["root", "add", "r2", "--timm", "tf_efficientnet_lite0", "--weights", "/no/such.safetensors"], "--weights"),
    (["root", "add", "r2", "--timm", "vit_tiny_patch16_224", "--weights", "packaged"], "packaged"),
    (["root", "add", "Bad Name", "--timm", "tf_efficientnet_lite0"], "invalid task name"),
    (["root", "add", "r2", "--timm", "vit_tiny_patch16_224", "--model-kwargs", "[1]"], "JSON object"),
    (["gc", "--grace", "-1"], "--grace"),
])
def test_bad_commands_fail_with_one_clear_line(installed, monkeypatch, capsys, args, fragment):
    rc, _, err = run_main(monkeypatch, capsys, installed, *args)
    assert_one_error_line(rc, err, fragment)


def test_unexpected_errors_show_a_traceback_only_with_munet_debug(installed, monkeypatch, capsys):
    def broken(ctx):
        raise TypeError("a real bug")

    monkeypatch.setattr(cli, "cmd_system", broken)
    rc, _, err = run_main(monkeypatch, capsys, installed, "system")
    assert_one_error_line(rc, err, "internal error", "TypeError", "a real bug", "MUNET_DEBUG=1")
    monkeypatch.setenv("MUNET_DEBUG", "1")
    rc = cli.main(["system"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" in err and "a real bug" in err


# -- pins, gc, json -------------------------------------------------------------------------------

def _fake_paths(home: Path) -> list[str]:
    """Task `p` with two committed paths (scores .5 then .7) on the packaged root."""
    system = System(make_settings(home))
    try:
        system.add_task("p", str(make_npz(home / "p.npz")), root="lite0")
        root = system.root(1)
        with system.Session() as s:
            from munet.storage import lineage

            ids = lineage.path_component_ids(s, root.root_path_id)
        out = []
        for seed, score in ((1, 0.5), (2, 0.7)):
            head = commit.NewComponent(name="head", meta={"num_classes": 3}, num_params=3 * 1281,
                                       tensors={"fc.weight": torch.full((3, 1280), float(seed)), "fc.bias": torch.zeros(3)})
            record = commit.PathRecord(task="p", root_id=root.id, component_ids=ids[:-1] + [head.id], hparams={},
                                       image_size=64, parent_id=root.root_path_id, val_acc=score, score=score)
            out.append(commit.commit_path(system.Session, system.store, record, [head]).path_id)
        return out
    finally:
        system.engine.dispose()


def test_task_pin_and_unpin(home_copy, monkeypatch, capsys):
    first, second = _fake_paths(home_copy)
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "show", "p", "--json")
    assert rc == 0 and json.loads(out)["live_path"]["id"] == second
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "pin", "p", first)
    assert rc == 0 and "pinned" in out
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "show", "p", "--json")
    view = json.loads(out)
    assert view["pinned"] is True and view["live_path"]["id"] == first and view["live_path"]["score"] == 0.5
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "show", "p")
    assert "live pointer history" in out and "pinned" in out
    rc, _, err = run_main(monkeypatch, capsys, home_copy, "task", "pin", "p", "0" * 32)
    assert_one_error_line(rc, err, "is not a path of task 'p'")
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "unpin", "p", "--json")
    assert rc == 0 and json.loads(out)["pinned"] is False
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "task", "list")
    assert rc == 0 and "p" in out and "0.5000" in out


def test_gc_reports_in_json_and_keeps_live_blobs(home_copy, monkeypatch, capsys):
    _fake_paths(home_copy)
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "gc", "--grace", "0", "--dry-run", "--json")
    dry = json.loads(out)
    assert rc == 0 and dry["dry_run"] is True and dry["deleted"] == 0 and dry["blobs"] == 22
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "gc", "--grace", "0")
    assert rc == 0 and "deleted 0" in out
    rc, out, _ = run_main(monkeypatch, capsys, home_copy, "fsck", "--json")
    assert rc == 0 and json.loads(out)["ok"]


@pytest.mark.parametrize("args", [["system", "--json"], ["--json", "system"], ["task", "list", "--json"],
                                  ["gc", "--json", "--dry-run"], ["fsck", "--json"], ["init", "--json"]])
def test_json_output_parses(installed, monkeypatch, capsys, args):
    rc, out, _ = run_main(monkeypatch, capsys, installed, *args)
    assert rc == 0
    json.loads(out)


def test_home_option_after_the_command_is_honoured(installed, tmp_path, monkeypatch, capsys):
    rc, out, _ = run_main(monkeypatch, capsys, tmp_path / "elsewhere", "system", "--json", "--home", str(installed))
    assert rc == 0 and json.loads(out)["roots"][0]["name"] == "lite0"


# -- the registry other modules extend ---------------------------------------------------------

def test_extension_modules_add_their_commands(installed, monkeypatch, capsys):
    fake = types.ModuleType("munet_fake_ext")
    calls = []

    def register(subparsers):
        p = cli.add_command(subparsers, "hello", lambda ctx: calls.append(ctx.args.who) or 3, "say hello", json_flag=True)
        p.add_argument("who")
        cli.EXAMPLES.append(("munet hello world", "an extension's example"))

    fake.register = register
    monkeypatch.setitem(sys.modules, "munet_fake_ext", fake)
    monkeypatch.setattr(cli, "EXTENSION_MODULES", ("munet_fake_ext", "munet_absent_ext"))
    monkeypatch.setattr(cli, "EXAMPLES", list(cli.EXAMPLES))
    assert "munet hello world" in cli.build_parser().format_help()
    rc, _, _ = run_main(monkeypatch, capsys, installed, "hello", "world")
    assert rc == 3 and calls == ["world"]


def test_extension_with_a_broken_import_is_not_silently_skipped(monkeypatch, tmp_path):
    (tmp_path / "munet_broken_ext.py").write_text("import munet_dependency_that_is_missing\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "EXTENSION_MODULES", ("munet_broken_ext",))
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()


def test_quickstart_steps_can_be_extended(monkeypatch):
    monkeypatch.setattr(cli, "QUICKSTART_STEPS", list(cli.QUICKSTART_STEPS))
    cli.add_quickstart_step("evolve", lambda ctx: None)
    cli.add_quickstart_step("serve", lambda ctx: None)
    assert [n for n, _ in cli.QUICKSTART_STEPS] == ["init", "root", "task", "evolve", "serve", "show"]
