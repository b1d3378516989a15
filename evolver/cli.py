"""`munet evolve`: run evolver workers (registered into the `munet` command)."""
from __future__ import annotations

import json

from munet import cli

from .config import PRESETS, default_config


def check_args(a) -> None:
    """Reject impossible settings with one line before any worker starts."""
    positive = {"--workers": a.workers, "--iterations": a.iterations, "--generations": a.generations,
                "--candidates": a.candidates, "--threads": a.threads}
    for option, value in positive.items():
        if value is not None and value < 1:
            raise cli.CliError(f"{option} must be 1 or more")
    if a.image_size is not None and not 16 <= a.image_size <= 1024:
        raise cli.CliError("--image-size must be between 16 and 1024 pixels")
    if a.max_epochs is not None and not a.max_epochs > 0:
        raise cli.CliError("--max-epochs must be more than 0")
    if a.base is not None and not 0 < a.base <= 1:
        raise cli.CliError("--base must be in (0, 1]: 1 means no size pressure")
    if not a.lease_ttl >= 3:
        raise cli.CliError("--lease-ttl must be at least 3 seconds (it is renewed every third of it)")
    if not -20 <= a.nice <= 19:
        raise cli.CliError("--nice must be between -20 and 19")
    if a.device:
        import torch

        if a.device.split(":")[0] not in ("cpu", "cuda"):
            raise cli.CliError(f"--device must be cpu or cuda, not {a.device!r}")
        if a.device.startswith("cuda") and not torch.cuda.is_available():
            raise cli.CliError("--device cuda, but torch sees no CUDA device here (use --device cpu)")
    if a.metrics_port is not None:
        if not 0 < a.metrics_port < 65536:
            raise cli.CliError("--metrics-port must be between 1 and 65535")
        cli.check_bindable("0.0.0.0", a.metrics_port, "--metrics-port")


def print_summaries(ctx: "cli.Context", summaries: list[dict]) -> None:
    """The run's visits as one table (the visit lines above it came as they finished)."""
    if not summaries:
        ctx.console.print("no visits: no task needed one (add tasks with `munet task add`, or use --forever)")
        return
    from rich.table import Table

    table = Table(title=f"{len(summaries)} visit(s)", title_justify="left")
    for col, justify in (("task", "left"), ("candidates", "right"), ("improved", "right"), ("seconds", "right"),
                         ("score", "right"), ("val acc", "right"), ("test acc", "right"), ("params", "right"),
                         ("live path", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for r in summaries:
        if r.get("error"):
            table.add_row(r["task"], "-", "-", "-", "-", "-", "-", "-", f"FAILED: {r['error']}", style="red")
            continue
        table.add_row(r["task"], str(r.get("candidates", "-")), str(r.get("improved", "-")),
                      cli._fmt(float(r["seconds"]), 0) if r.get("seconds") is not None else "-",
                      cli._fmt(r.get("score")), cli._fmt(r.get("val_acc")), cli._fmt(r.get("test_acc")),
                      cli._fmt_params(r.get("accounted_params")), "new" if r.get("moved") else "unchanged")
    ctx.console.print(table)


def config_from_args(a):
    """The preset with the command line's settings on top."""
    cfg = PRESETS[a.preset]() if a.preset else default_config()
    changes = {k: v for k, v in {"base": a.base, "seed": a.seed, "generations": a.generations,
                                 "candidates": a.candidates, "max_epochs": a.max_epochs,
                                 "threads": a.threads}.items() if v is not None}
    if a.device:
        changes["device"] = a.device
    if a.max_epochs is not None:
        changes["visit_epochs"] = ()  # asked for one length: every visit trains it
    cfg = cfg.replace(**changes)
    if a.image_size:
        cfg.defaults["image_size"] = a.image_size
    return cfg


def cmd_evolve(ctx: "cli.Context") -> int:
    a = ctx.args
    check_args(a)
    system = ctx.system()
    cfg = config_from_args(a)
    names = a.task or None
    if names:
        known = {t["name"] for t in system.tasks_json()}
        missing = [n for n in names if n not in known]
        if missing:
            raise cli.CliError(f"no task named {missing[0]!r}")
    from .worker import run_workers

    summaries = run_workers(system, cfg, a.workers, nice=a.nice, metrics_port=a.metrics_port, names=names, ttl=a.lease_ttl,
                            iterations=None if a.forever else a.iterations, progress=not ctx.json)
    if ctx.json:
        ctx.print_json(summaries or [])
    else:
        print_summaries(ctx, summaries or [])
    return 0 if not any(s.get("error") for s in summaries or []) else 1


QUICKSTART_BUDGET = {"generations": 2, "candidates": 3}


def qs_evolve(ctx: "cli.Context") -> None:
    """Quickstart: evolve the demo task once (a short visit) unless it already has a live path."""
    system = ctx.system()
    info = system.task_json(cli.QUICKSTART_TASK)
    if info["live_path"]:
        ctx.console.print(f"[bold]4.[/] task {info['name']} is evolved already (score {info['live_path']['score']:.4f}); "
                          "`munet evolve` improves it further")
        return
    from .worker import run_workers

    ctx.console.print(f"[bold]4.[/] evolving {info['name']}: one short muNet visit "
                      f"({QUICKSTART_BUDGET['generations']} generations x {QUICKSTART_BUDGET['candidates']} candidates)")
    cfg = default_config().replace(**QUICKSTART_BUDGET)
    run_workers(system, cfg, 1, names=[info["name"]], iterations=1, progress=True)


def register(subparsers) -> None:
    cli.add_quickstart_step("evolve", qs_evolve)
    p = cli.add_command(subparsers, "evolve", cmd_evolve,
                        "evolve tasks with muNet: claim a task, run one visit, commit the winner, repeat",
                        json_flag=True)
    p.add_argument("--task", action="append", metavar="NAME", help="only these tasks (repeatable; default all)")
    p.add_argument("--iterations", type=int, default=1, metavar="N", help="visits per task in this run (default 1)")
    p.add_argument("--forever", action="store_true", help="keep visiting tasks, and wake up for new ones")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="worker processes on this machine (default 1)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="cpu (DESIGN.md) or munet (MUNET.md); default: cpu without CUDA")
    p.add_argument("--base", type=float, help="size pressure: score = accuracy x base^(params/root params); default 1.0")
    p.add_argument("--generations", type=int, metavar="G", help="generations per visit")
    p.add_argument("--candidates", type=int, metavar="C", help="candidates per generation")
    p.add_argument("--max-epochs", type=float, metavar="E", help="passes over the training split per candidate")
    p.add_argument("--image-size", type=int, metavar="PX", help="image size of new paths (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--seed", type=int)
    p.add_argument("--nice", type=int, default=10, help="lower the workers' priority so a server on the same machine stays fast (default 10)")
    p.add_argument("--lease-ttl", type=float, default=120.0, metavar="SECONDS",
                   help="a dead worker's task is free again after this long (default 120; renewed every third of it)")
    p.add_argument("--metrics-port", type=int, metavar="PORT", help="serve Prometheus metrics of this evolver")
    cli.EXAMPLES.extend([
        ("munet evolve --iterations 1", "one visit of every task with the cpu preset"),
        ("munet evolve --forever --workers 2", "keep improving all tasks, picking up new ones"),
    ])
