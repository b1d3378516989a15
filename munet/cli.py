"""The `munet` command.

Every command is a small builder function that adds one sub-parser and points it at a
handler `handler(ctx) -> int | None`. The evolver and server issues add their commands
(`evolve`, `serve`, `predict`) from their own modules: if `munet.evolver.cli` or
`munet.server.cli` exists, its `register(subparsers)` is called, and it may also append
help examples (`EXAMPLES`) and quickstart steps (`add_quickstart_step`).

Schema policy: only `munet init` and `munet quickstart` create an installation. Any other
command on a home without a database stops with "run `munet init` first" (so a mistyped
`--home` never silently creates a second, empty installation); a database made by an
older munet is migrated (Alembic upgrade) automatically.

Errors print one line on stderr, `munet: error: ...`, and exit non-zero. Unexpected
exceptions print the same one line; set `MUNET_DEBUG=1` to see their traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import json
import os
import socket
import sys
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import Any, Callable

from rich import box
from rich.console import Console
from rich.table import Table

Handler = Callable[["Context"], "int | None"]

# Modules of other parts of the product that add commands; each defines `register(subparsers)`.
EXTENSION_MODULES = ("munet.evolver.cli", "munet.server.cli")

# (command line, what it does) shown by `munet --help`; extensions append their own.
EXAMPLES: list[tuple[str, str]] = [
    ("munet quickstart", "init, the packaged root and a demo task, all on embedded defaults"),
    ("munet init", "create the database and stores under MUNET_HOME (default ./munet-data)"),
    ("munet root add lite0 --timm tf_efficientnet_lite0 --weights packaged", "decompose a pretrained root"),
    ("munet root list", "roots with their parameters and how many tasks build on each"),
    ("munet task add mnist --data mnist.npz [--root lite0]", "submit a task (.npz, ImageFolder folder, zip or tar)"),
    ("munet task list", "all tasks with status and live score"),
    ("munet task show mnist --json", "one task: live path, metrics, history"),
    ("munet task pin mnist PATH_ID", "hold a task on one of its paths (rollback)"),
    ("munet task unpin mnist", "let evolution move the task again"),
    ("munet system --json", "roots, tasks, components, unique parameters, parameters per task"),
    ("munet gc --grace 3600 --dry-run", "collect unreferenced blobs older than the grace period"),
    ("munet fsck", "verify every blob against its hash and every row against the store"),
]


class CliError(Exception):
    """A user-facing failure: printed as one `munet: error:` line."""


class Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors: a usage mistake prints `munet: error: ...`
    and where to find the options, not the whole usage block (exit status 2, as argparse)."""

    def error(self, message: str):
        sub = self.prog.split(" ", 1)[1] + ": " if " " in self.prog else ""
        self.exit(2, f"munet: error: {sub}{message} (see `{self.prog} --help`)\n")


def make_console() -> Console:
    # Piped output (scripts, logs, tests) gets a wide fixed width instead of rich's
    # 80 columns, so no cell is cut short; a terminal uses its own width and folds.
    return Console(highlight=False, soft_wrap=False, width=None if sys.stdout.isatty() else 200)


def check_bindable(host: str, port: int, option: str) -> None:
    """Fail with one line before a server starts (and dies with a traceback) when the
    address is taken or not ours. A race with another process remains possible."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise CliError(f"cannot listen on {host!r}: not a known address ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            sock.bind(addr)
        except OSError as e:
            hint = f" (another program listens there: choose another {option})" if e.errno == errno.EADDRINUSE else ""
            raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None


# -- context ----------------------------------------------------------------------

@dataclass
class Context:
    """What a handler gets: parsed arguments, the console and a lazily opened System."""

    args: argparse.Namespace
    console: Console = field(default_factory=lambda: make_console())
    _system: Any = None

    @property
    def json(self) -> bool:
        return bool(getattr(self.args, "json", False))

    @property
    def settings(self):
        from munet.settings import Settings

        return Settings.from_env()

    def system(self, require_schema: bool = True):
        """The installation under MUNET_HOME; without `require_schema` nothing is checked."""
        if self._system is None:
            from munet.system import System

            self._system = System(self.settings)
        if require_schema:
            ensure_schema(self._system)
        return self._system

    def print_json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        sys.stdout.flush()

    def close(self) -> None:
        if self._system is not None:
            self._system.engine.dispose()


def ensure_schema(system) -> None:
    """Fail clearly on a home without a database; migrate an older schema to the newest."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from munet.storage import db

    url = system.engine.url
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        if not FilePath(url.database).exists():
            raise CliError(f"no munet installation at {system.settings.home}: run `munet init` first")
    with system.engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current is None:
        raise CliError(f"the database {url.render_as_string(hide_password=True)} has no munet schema: "
                       "run `munet init` first")
    head = ScriptDirectory.from_config(db.alembic_config(system.engine)).get_current_head()
    if current != head:
        db.upgrade(system.engine)


# -- output helpers -----------------------------------------------------------------

def _fmt_params(n: float | int | None) -> str:
    if n is None:
        return "-"
    if abs(n) >= 1e6:
        return f"{n / 1e6:.2f}M"
    if abs(n) >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}" if isinstance(n, float) else str(n)


def _fmt(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in rows:
        table.add_row(key, value if isinstance(value, str) else _fmt(value))
    return table


# -- init, root ------------------------------------------------------------------------

def cmd_init(ctx: Context) -> None:
    system = ctx.system(require_schema=False)
    system.init()
    s = system.settings
    if ctx.json:
        ctx.print_json({"home": s.home, "db_url": _safe_url(s.db_url), "store_url": s.store_url, "data_url": s.data_url})
        return
    ctx.console.print(f"munet installation ready at {s.home}")
    ctx.console.print(f"  database: {_safe_url(s.db_url)}\n  layers:   {s.store_url}\n  datasets: {s.data_url}")


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for display
        return url


def root_json(root) -> dict:
    return {"name": root.name, "timm": root.timm_name, "family": root.family, "weights": root.weights,
            "params": root.total_params, "root_params": root.root_params, "root_path_id": root.root_path_id,
            "depth": root.config.get("depth"), "image_size": root.config.get("image_size")}


def cmd_root_add(ctx: Context) -> None:
    from sqlalchemy import select

    from munet.storage.schema import Root, validate_task_name

    a = ctx.args
    validate_task_name(a.name)
    system = ctx.system()
    with system.Session() as s:
        if s.scalar(select(Root).where(Root.name == a.name)):
            raise CliError(f"a root named {a.name!r} exists already")
    kwargs = _parse_kwargs(a.model_kwargs)
    import timm

    from munet import models

    if not timm.is_model(a.timm):
        raise CliError(f"timm has no model named {a.timm!r}")
    models.family_for(a.timm)  # fails before any weights are loaded
    if not ctx.json:
        ctx.console.print(f"loading {a.timm} ({a.weights} weights) ...")
    root = system.add_root(a.name, a.timm, a.weights, kwargs)
    out = root_json(root)
    out["components"] = len(_root_components(system, root))
    if ctx.json:
        ctx.print_json(out)
        return
    ctx.console.print(_kv_table(f"root {root.name}", [
        ("timm model", root.timm_name), ("weights", root.weights), ("family", root.family),
        ("components", str(out["components"])), ("blocks", str(out["depth"])),
        ("parameters", f"{root.total_params:,} ({_fmt_params(root.total_params)})"),
        ("without its head", f"{root.root_params:,} ({_fmt_params(root.root_params)})"),
        ("image size", str(out["image_size"])), ("root path", root.root_path_id),
    ]))


def cmd_root_list(ctx: Context) -> None:
    from sqlalchemy import func, select

    from munet.storage.schema import Root, Task

    with ctx.system().Session() as s:
        roots = list(s.scalars(select(Root).order_by(Root.id)))
        tasks = dict(s.execute(select(Task.root_id, func.count()).where(Task.status != "deleted").group_by(Task.root_id)).all())
        rows = [dict(root_json(r), tasks=int(tasks.get(r.id, 0))) for r in roots]
    if ctx.json:
        ctx.print_json(rows)
        return
    if not rows:
        ctx.console.print("no roots yet: add one with `munet root add lite0 --timm tf_efficientnet_lite0 --weights packaged`")
        return
    table = Table(title=f"{len(rows)} root(s)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    for col, justify in (("name", "left"), ("timm model", "left"), ("weights", "left"), ("family", "left"),
                         ("params", "right"), ("without head", "right"), ("blocks", "right"), ("image size", "right"),
                         ("tasks", "right")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["timm"], str(r["weights"]), r["family"], _fmt_params(r["params"]),
                      _fmt_params(r["root_params"]), _fmt(r["depth"]), _fmt(r["image_size"]), str(r["tasks"]))
    ctx.console.print(table)


def _root_components(system, root) -> list[str]:
    from munet.storage import lineage

    with system.Session() as s:
        return lineage.path_component_ids(s, root.root_path_id)


def _parse_kwargs(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f"--model-kwargs is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise CliError("--model-kwargs must be a JSON object, e.g. '{\"img_size\": 64}'")
    return value


# -- tasks --------------------------------------------------------------------------------

def class_counts(system, task) -> tuple[list[int], list[int]]:
    """Training and test images per class of a stored task's data set."""
    import numpy as np

    data = system.dataset(task)
    k = len(task.classes)
    train = np.bincount(np.asarray(data["y_train"]).astype(np.int64), minlength=k)
    test = np.bincount(np.asarray(data["y_test"]).astype(np.int64), minlength=k)
    return [int(x) for x in train], [int(x) for x in test]


def add_task_report(system, name: str, data: str | FilePath, root: str | None) -> dict:
    task = system.add_task(name, str(data), root=root)
    train, test = class_counts(system, task)
    return {
        "name": task.name, "root": root or system.default_root(), "status": task.status,
        "dataset": task.dataset_digest, "classes": list(task.classes), "image_shape": list(task.image_shape),
        "n_train": task.n_train, "n_test": task.n_test, "val_fraction": task.val_fraction,
        "per_class": [{"class": c, "train": tr, "test": te} for c, tr, te in zip(task.classes, train, test)],
    }


def print_task_added(ctx: Context, report: dict) -> None:
    table = Table(title=f"task {report['name']}: {len(report['classes'])} classes", title_justify="left")
    table.add_column("label", justify="right")
    table.add_column("class")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for i, row in enumerate(report["per_class"]):
        table.add_row(str(i), str(row["class"]), str(row["train"]), str(row["test"]))
    table.add_row("", "total", str(report["n_train"]), str(report["n_test"]), style="bold")
    ctx.console.print(table)
    shape = "x".join(str(d) for d in report["image_shape"])
    ctx.console.print(f"{report['n_train']} train / {report['n_test']} test images, {len(report['classes'])} classes, "
                      f"image shape {shape}; {report['val_fraction']:.0%} of train held for validation; "
                      f"root {report['root']}; status {report['status']}")


def cmd_task_add(ctx: Context) -> None:
    from munet.storage.schema import validate_task_name

    a = ctx.args
    validate_task_name(a.name)
    data = a.data
    if "://" not in data and not FilePath(data).exists():
        raise CliError(f"no such file or folder: {data}")
    report = add_task_report(ctx.system(), a.name, data, a.root)
    if ctx.json:
        ctx.print_json(report)
    else:
        print_task_added(ctx, report)


def cmd_task_list(ctx: Context) -> None:
    tasks = ctx.system().tasks_json()
    if ctx.json:
        ctx.print_json(tasks)
        return
    if not tasks:
        ctx.console.print("no tasks yet: add one with `munet task add NAME --data PATH`")
        return
    table = Table(title=f"{len(tasks)} task(s)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col, justify in (("name", "left"), ("status", "left"), ("classes", "right"), ("train/test", "right"),
                         ("score", "right"), ("val acc", "right"), ("test acc", "right"), ("params", "right"),
                         ("pin", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for t in tasks:
        live = t["live_path"] or {}
        table.add_row(t["name"], t["status"], str(len(t["classes"])), f"{t['n_train']}/{t['n_test']}",
                      _fmt(live.get("score")), _fmt(live.get("val_acc")), _fmt(live.get("test_acc")),
                      _fmt_params(live.get("accounted_params")), "yes" if t["pinned"] else "")
    ctx.console.print(table)


def _val_images(view: dict) -> int:
    from munet.storage.commit import val_images

    return val_images(view["n_train"], view["val_fraction"])


def cmd_task_show(ctx: Context) -> None:
    from sqlalchemy import select

    from munet.storage import lineage
    from munet.storage.schema import Task

    system = ctx.system()
    view = system.task_json(ctx.args.name)
    if ctx.json:
        ctx.print_json(view)
        return
    live = view["live_path"]
    rows = [("status", view["status"]), ("root", str(view["root"])),
            ("classes", f"{len(view['classes'])}: " + ", ".join(map(str, view["classes"][:12]))
             + (" ..." if len(view["classes"]) > 12 else "")),
            ("train / test", f"{view['n_train']} / {view['n_test']}"),
            ("validation", f"about {_val_images(view)} of the training images ({view['val_fraction']:.0%})"),
            ("data set", view["dataset"]),
            ("pinned", "yes" if view["pinned"] else "no"), ("visits", str(view["visits"])),
            ("candidates tried", str(view["candidates_tried"])), ("last improvement", view["last_improvement"] or "-"),
            ("created", view["created_at"] or "-")]
    if view["error"]:
        rows.append(("error", view["error"]))
    if live:
        with system.ReadSession() as s:
            line = lineage.training_line(s, live["id"])
        epochs = line["examples"] / max(1, view["n_train"] - _val_images(view))
        rows += [("live path", live["id"]), ("score", live["score"]), ("validation acc", live["val_acc"]),
                 ("test acc", live["test_acc"]), ("accounted params", _fmt_params(live["accounted_params"])),
                 ("image size", str(live["image_size"]))]
        if line["steps"]:
            rows.append(("training line", f"{line['steps']} candidates from a {line['starts_from']}, "
                         f"{line['examples']:,} examples ({epochs:.1f} epochs of the training split)"
                         + ("" if line["complete"] else ", older steps unrecorded")))
    else:
        rows.append(("live path", "none yet (the evolver makes the first one)"))
    ctx.console.print(_kv_table(f"task {view['name']}", rows))
    with system.Session() as s:
        task = s.scalar(select(Task).where(Task.name == view["name"]))
        history = lineage.live_history(s, task.id)
    if history:
        table = Table(title="live pointer history", title_justify="left")
        for col in ("when", "path", "score", "reason"):
            table.add_column(col)
        for h in history:
            table.add_row(str(h.at)[:19], h.path_id, _fmt(h.score), h.reason)
        ctx.console.print(table)


def _publish_swap(system, task_name: str) -> None:
    from munet.storage import signals

    view = system.task_json(task_name)
    live = view["live_path"]
    if live:
        signals.publish(system.settings.redis_url, signals.SWAPS, signals.swap_message(task_name, live["id"], live["score"]))


def cmd_task_pin(ctx: Context) -> None:
    from munet.storage import commit

    system = ctx.system()
    commit.set_pin(system.Session, ctx.args.name, ctx.args.path_id)
    _publish_swap(system, ctx.args.name)
    view = system.task_json(ctx.args.name)
    if ctx.json:
        ctx.print_json(view)
    else:
        ctx.console.print(f"task {ctx.args.name} pinned to path {ctx.args.path_id}")


def cmd_task_unpin(ctx: Context) -> None:
    from munet.storage import commit

    system = ctx.system()
    system.task_json(ctx.args.name)  # KeyError -> "no task named ..."
    commit.set_pin(system.Session, ctx.args.name, None)
    view = system.task_json(ctx.args.name)
    if ctx.json:
        ctx.print_json(view)
    else:
        ctx.console.print(f"task {ctx.args.name} unpinned: evolution may move its live path again")


# -- system, gc, fsck ---------------------------------------------------------------------

def print_system(ctx: Context, summary: dict) -> None:
    table = Table(title="roots", title_justify="left")
    for col, justify in (("name", "left"), ("timm", "left"), ("params", "right"), ("without head", "right")):
        table.add_column(col, justify=justify)
    for r in summary["roots"]:
        table.add_row(r["name"], r["timm"], f"{r['params']:,} ({_fmt_params(r['params'])})",
                      f"{r['root_params']:,} ({_fmt_params(r['root_params'])})")
    if summary["roots"]:
        ctx.console.print(table)
    else:
        ctx.console.print("no roots yet: add one with `munet root add lite0 --timm tf_efficientnet_lite0 --weights packaged`")
    ctx.console.print(_kv_table("system", [
        ("tasks", str(summary["tasks"])),
        ("tasks with a live path", str(summary.get("tasks_with_live_path", "-"))),
        ("components", str(summary["components"])),
        ("live components", str(summary.get("live_components", "-"))),
        ("shared components", str(summary.get("shared_components", "-"))),
        ("unique live params", f"{summary['unique_params']:,} ({_fmt_params(summary['unique_params'])})"),
        ("params per task", _fmt_params(summary["params_per_task"])),
    ]))


def cmd_system(ctx: Context) -> None:
    summary = ctx.system().system_json()
    if ctx.json:
        ctx.print_json(summary)
    else:
        print_system(ctx, summary)


def cmd_gc(ctx: Context) -> None:
    from munet.storage import gc

    if ctx.args.grace < 0:
        raise CliError("--grace must be zero or more seconds")
    system = ctx.system()
    result = gc.collect(system.Session, system.store, grace_seconds=ctx.args.grace, dry_run=ctx.args.dry_run)
    if ctx.json:
        ctx.print_json(result)
        return
    verb = "would delete" if result["dry_run"] else "deleted"
    ctx.console.print(f"{result['blobs']} blobs: kept {result['kept']}, {verb} {result['deleted']}"
                      + ("" if result["dry_run"] else f" ({result['bytes_freed']:,} bytes freed)"))


def _safetensors_shapes(data: bytes) -> dict[str, list[int]]:
    """Tensor shapes from a safetensors header (8-byte length, then JSON); never unpickles."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def fsck(system) -> dict:
    """Check the store and the rows: every blob matches its hash, every row's blob exists
    and (for components) holds tensors of the recorded shapes, every probe blob exists."""
    from sqlalchemy import select

    from munet.storage.blobs import BlobError
    from munet.storage.schema import Component, PathRow

    problems: list[str] = []
    shapes: dict[str, dict[str, list[int]]] = {}
    on_disk = system.store.digests()
    from tqdm import tqdm

    # A bar on a terminal only (disable=None): a large store on S3 takes minutes to hash.
    for digest in tqdm(sorted(on_disk), desc="checking blobs", unit="blob", disable=None, leave=False):
        try:
            data = system.store.read_bytes(digest)
            shapes[digest] = _safetensors_shapes(data)
        except BlobError as e:
            problems.append(str(e))
        except (ValueError, UnicodeDecodeError) as e:
            problems.append(f"blob {digest} is not a safetensors file ({e})")
    with system.Session() as s:
        components = list(s.execute(select(Component.id, Component.name, Component.blob_hash, Component.shapes)))
        probes = list(s.execute(select(PathRow.id, PathRow.probe_hash).where(PathRow.probe_hash.is_not(None))))
        referenced = set(s.scalars(select(Component.blob_hash))) | {p for _, p in probes}
    # A blob gc may delete is only a problem while a path of record still needs it.
    from munet.storage.gc import referenced_blobs

    with system.Session() as s:
        needed = referenced_blobs(s, grace_seconds=0)
    for cid, name, digest, recorded in components:
        if digest not in on_disk:
            if digest in needed:
                problems.append(f"component {cid} ({name}): blob {digest} is missing")
            continue
        if digest in shapes and {k: list(v) for k, v in recorded.items()} != shapes[digest]:
            problems.append(f"component {cid} ({name}): blob {digest} holds other tensors than recorded")
    for pid, digest in probes:
        if digest not in on_disk and digest in needed:
            problems.append(f"path {pid}: probe blob {digest} is missing")
    return {"ok": not problems, "blobs": len(on_disk), "components": len(components), "probes": len(probes),
            "unreferenced_blobs": len(set(on_disk) - referenced), "problems": problems}


def cmd_fsck(ctx: Context) -> int:
    report = fsck(ctx.system())
    if ctx.json:
        ctx.print_json(report)
    else:
        ctx.console.print(f"checked {report['blobs']} blobs, {report['components']} components, "
                          f"{report['probes']} probes ({report['unreferenced_blobs']} unreferenced blobs)")
        for problem in report["problems"]:
            sys.stderr.write(f"munet: fsck: {problem}\n")
        ctx.console.print("ok" if report["ok"] else f"{len(report['problems'])} problem(s) found")
    return 0 if report["ok"] else 1


# -- quickstart ----------------------------------------------------------------------------

QuickstartStep = tuple[str, Callable[[Context], None]]
QUICKSTART_ROOT = "lite0"
QUICKSTART_TASK = "digits"


def digits_npz(path: str | FilePath, test_fraction: float = 0.2, seed: int = 0) -> FilePath:
    """scikit-learn's 8x8 handwritten digits (shipped inside the package) as a munet .npz."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.clip(np.rint(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)[..., None]  # [N, 8, 8, 1]
    y = d.target.astype(np.int16)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    path = FilePath(path)
    np.savez_compressed(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
                        classes=np.array([str(c) for c in d.target_names]))
    return path


def qs_init(ctx: Context) -> None:
    ctx.system(require_schema=False).init()
    ctx.console.print(f"[bold]1.[/] installation at {ctx.settings.home}")


def qs_root(ctx: Context) -> None:
    from sqlalchemy import select

    from munet.storage.schema import Root

    system = ctx.system()
    with system.Session() as s:
        exists = s.scalar(select(Root).where(Root.name == QUICKSTART_ROOT)) is not None
    if exists:
        ctx.console.print(f"[bold]2.[/] root {QUICKSTART_ROOT} is there already")
        return
    root = system.add_root(QUICKSTART_ROOT, "tf_efficientnet_lite0", "packaged")
    ctx.console.print(f"[bold]2.[/] root {root.name}: tf_efficientnet_lite0 with its packaged ImageNet weights, "
                      f"{_fmt_params(root.total_params)} parameters")


def qs_task(ctx: Context) -> None:
    from sqlalchemy import select

    from munet.storage.schema import Task

    system = ctx.system()
    with system.Session() as s:
        exists = s.scalar(select(Task).where(Task.name == QUICKSTART_TASK)) is not None
    if exists:
        ctx.console.print(f"[bold]3.[/] task {QUICKSTART_TASK} is there already")
        return
    with tempfile.TemporaryDirectory(prefix="munet-quickstart-") as tmp:
        path = digits_npz(FilePath(tmp) / "digits.npz")
        report = add_task_report(system, QUICKSTART_TASK, path, QUICKSTART_ROOT)
    ctx.console.print(f"[bold]3.[/] task {QUICKSTART_TASK}: scikit-learn's handwritten digits, "
                      f"{report['n_train']} train / {report['n_test']} test images, {len(report['classes'])} classes")


def qs_show(ctx: Context) -> None:
    system = ctx.system()
    print_system(ctx, system.system_json())
    ctx.args.name = QUICKSTART_TASK
    cmd_task_show(ctx)


QUICKSTART_STEPS: list[QuickstartStep] = [("init", qs_init), ("root", qs_root), ("task", qs_task), ("show", qs_show)]


def add_quickstart_step(name: str, step: Callable[[Context], None], before: str | None = "show") -> None:
    """Extensions (evolver, server) insert their steps, by default before the final summary."""
    names = [n for n, _ in QUICKSTART_STEPS]
    if name in names:
        QUICKSTART_STEPS[names.index(name)] = (name, step)
        return
    index = names.index(before) if before in names else len(QUICKSTART_STEPS)
    QUICKSTART_STEPS.insert(index, (name, step))


def cmd_quickstart(ctx: Context) -> None:
    for _name, step in QUICKSTART_STEPS:
        step(ctx)


# -- parser --------------------------------------------------------------------------------

def _common(parser: argparse.ArgumentParser, json_flag: bool = False) -> argparse.ArgumentParser:
    # SUPPRESS: given after the command they override the global option, absent they leave it.
    parser.add_argument("--home", default=argparse.SUPPRESS, help="installation folder (sets MUNET_HOME)")
    if json_flag:
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print JSON instead of tables")
    return parser


def examples_epilog(examples: list[tuple[str, str]]) -> str:
    return "examples:\n" + "\n".join(f"  {cmd}\n      {what}" for cmd, what in examples)


def add_command(subparsers, name: str, handler: Handler, help: str, json_flag: bool = False,
                examples: list[tuple[str, str]] | None = None, **kwargs) -> argparse.ArgumentParser:
    """Add one command; extension modules use this too. `examples` (command line, what it
    does) end the command's --help after those of the global EXAMPLES that start with it."""
    parser = subparsers.add_parser(name, help=help, description=help, **kwargs)
    parser.set_defaults(examples=examples or [])
    _common(parser, json_flag)
    parser.set_defaults(func=handler)
    return parser


def register_builtin(subparsers) -> None:
    add_command(subparsers, "quickstart", cmd_quickstart,
                "init, the packaged root lite0 and a demo task (digits) on embedded defaults")
    add_command(subparsers, "init", cmd_init, "create the schema and the stores under MUNET_HOME", json_flag=True)

    root = subparsers.add_parser("root", help="pretrained roots", description="pretrained roots")
    root_sub = root.add_subparsers(dest="root_command", metavar="{add,list}", required=True)
    p = add_command(root_sub, "add", cmd_root_add, "decompose a timm model into stored components", json_flag=True,
                    examples=[("munet root add vit --timm vit_tiny_patch16_224 --weights random "
                                            "--model-kwargs '{\"img_size\": 64}'", "a small ViT with random weights")])
    p.add_argument("name", help="root name (a-z, 0-9, '_', '-')")
    p.add_argument("--timm", required=True, metavar="MODEL", help="timm model name, e.g. tf_efficientnet_lite0")
    p.add_argument("--weights", default="packaged", metavar="packaged|hub|random|FILE",
                   help="packaged (offline EfficientNet-Lite0), hub (timm pretrained), random, "
                        "or a .safetensors / timm checkpoint file (default: packaged)")
    p.add_argument("--model-kwargs", metavar="JSON", help="extra timm.create_model arguments, e.g. '{\"img_size\": 64}'")
    add_command(root_sub, "list", cmd_root_list, "list roots with their parameters and tasks", json_flag=True)

    task = subparsers.add_parser("task", help="tasks (data sets and their paths)", description="tasks")
    task_sub = task.add_subparsers(dest="task_command", metavar="{add,list,show,pin,unpin}", required=True)
    p = add_command(task_sub, "add", cmd_task_add, "submit a task: validate its data set, store it, queue it", json_flag=True)
    p.add_argument("name", help="task name (a-z, 0-9, '_', '-'; at most 63 characters)")
    p.add_argument("--data", required=True, metavar="PATH",
                   help=".npz with x_train, y_train, x_test, y_test, classes; an ImageFolder folder; or a zip/tar of one")
    p.add_argument("--root", metavar="NAME", help="root to build on (default: the first root added)")
    add_command(task_sub, "list", cmd_task_list, "list tasks", json_flag=True)
    p = add_command(task_sub, "show", cmd_task_show, "show one task", json_flag=True)
    p.add_argument("name")
    p = add_command(task_sub, "pin", cmd_task_pin, "hold a task on one of its recorded paths (rollback)", json_flag=True)
    p.add_argument("name")
    p.add_argument("path_id", metavar="PATH_ID")
    p = add_command(task_sub, "unpin", cmd_task_unpin, "release a pinned task", json_flag=True)
    p.add_argument("name")

    add_command(subparsers, "system", cmd_system, "roots, tasks, components and parameter totals", json_flag=True)
    p = add_command(subparsers, "gc", cmd_gc, "delete unreferenced blobs older than a grace period", json_flag=True)
    p.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS", help="minimum blob age (default 3600)")
    p.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    add_command(subparsers, "fsck", cmd_fsck, "verify every blob against its hash and every row against the store",
                json_flag=True)


def register_extensions(subparsers) -> None:
    for module_name in EXTENSION_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # that part of the product has no commands (yet)
                continue
            raise
        module.register(subparsers)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="munet",
        description="munet: one pretrained timm backbone grown into a multitask system of evolving paths.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--home", default=None, help="installation folder (sets MUNET_HOME; default ./munet-data)")
    parser.add_argument("--json", action="store_true", default=False, help="print JSON where a command supports it")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    register_builtin(subparsers)
    register_extensions(subparsers)
    _command_examples(parser)
    parser.epilog = examples_epilog(EXAMPLES) + (
        "\n\nsettings: MUNET_HOME, MUNET_DB_URL, MUNET_STORE_URL, MUNET_DATA_URL, MUNET_REDIS_URL, MUNET_API_TOKEN"
        "\nMUNET_DEBUG=1 shows tracebacks of unexpected errors.")
    return parser


def _command_examples(parser: argparse.ArgumentParser) -> None:
    """Every command's --help ends with its examples: the global ones that start with its
    name (`munet task add ...` for `munet task add`) and its own."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in action.choices.values():
            own = sub.get_default("examples") or []
            examples = [e for e in EXAMPLES if (e[0] + " ").startswith(sub.prog + " ") and e not in own] + own
            if examples and not sub.epilog:
                sub.epilog = examples_epilog(examples)
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
            _command_examples(sub)


# -- entry point --------------------------------------------------------------------------

def _error_line(e: BaseException) -> str:
    if isinstance(e, KeyError) and e.args:
        text = str(e.args[0])
    else:
        text = str(e)
    text = " ".join(text.split()) if "\n" not in text else text.strip().splitlines()[0]
    return text or type(e).__name__


def _expected_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import OperationalError

    from munet.storage.blobs import BlobError
    from munet.storage.commit import CommitError

    errors: list[type[BaseException]] = [CliError, ValueError, KeyError, CommitError, BlobError, OSError,
                                         OperationalError]
    try:
        from munet.storage.datasets import DatasetError

        errors.append(DatasetError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    debug = os.environ.get("MUNET_DEBUG") == "1"
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.home:
        os.environ["MUNET_HOME"] = str(FilePath(args.home).expanduser().resolve())
    ctx = Context(args)
    try:
        code = args.func(ctx)
    except KeyboardInterrupt:
        sys.stderr.write("munet: interrupted\n")
        return 130
    except Exception as e:  # noqa: BLE001 - the one place that turns failures into an exit code
        if debug:
            traceback.print_exc()
        if isinstance(e, _expected_errors()):
            sys.stderr.write(f"munet: error: {_error_line(e)}\n")
        else:
            sys.stderr.write(f"munet: error: internal error ({type(e).__name__}: {_error_line(e)}); "
                             "set MUNET_DEBUG=1 for a traceback\n")
        return 1
    finally:
        ctx.close()
    return int(code or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
