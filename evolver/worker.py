"""The evolver worker: claim one task at a time through a lease in SQL, run one visit,
commit, publish, release. Many workers on many machines never run the same task at once:
a claim is a conditional UPDATE (row-locked on PostgreSQL), and the lease's fencing token
is checked again inside the commit transaction, so a worker whose lease expired and was
taken over cannot commit."""
from __future__ import annotations

import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import torch
from sqlalchemy import case, or_, select, update

from munet.settings import Settings
from munet.storage import signals
from munet.storage.schema import Task, Visit as VisitRow, utcnow

from .config import EvolverConfig
from .metrics import CANDIDATES, VISITS, start_metrics, stop_metrics
from .train import PrefixCache
from .visit import Visit

log = logging.getLogger("munet.evolver")


@dataclass
class Lease:
    task: str
    task_id: int
    token: int


def claim(Session, worker: str, ttl: float, eligible: set[str] | None = None, targets: dict[str, int] | None = None) -> Lease | None:
    """Take the lease of the most deserving free task: new tasks first, then fewest visits."""
    now = utcnow()
    free = or_(Task.lease_until.is_(None), Task.lease_until < now)
    with Session.begin() as s:
        q = select(Task).where(Task.status != "deleted", free)
        if eligible is not None:
            q = q.where(Task.name.in_(eligible))
        q = q.order_by(case((Task.live_path_id.is_(None), 0), else_=1), Task.visits, Task.id)
        if s.bind.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        for task in s.scalars(q):
            if targets is not None and task.visits >= targets.get(task.name, 0):
                continue
            done = s.execute(update(Task).where(Task.id == task.id, free).values(
                lease_owner=worker, lease_until=now + dt.timedelta(seconds=ttl),
                lease_token=Task.lease_token + 1, status="evolving"))
            if done.rowcount == 1:
                token = s.scalar(select(Task.lease_token).where(Task.id == task.id))
                return Lease(task.name, task.id, token)
    return None


def renew(Session, lease: Lease, ttl: float) -> bool:
    with Session.begin() as s:
        done = s.execute(update(Task).where(Task.id == lease.task_id, Task.lease_token == lease.token).values(
            lease_until=utcnow() + dt.timedelta(seconds=ttl)))
        return done.rowcount == 1


def release(Session, lease: Lease, visited: bool, error: str | None = None) -> None:
    with Session.begin() as s:
        task = s.get(Task, lease.task_id)
        if task is None or task.lease_token != lease.token:
            return  # taken over: the new owner decides
        task.lease_owner, task.lease_until = None, None
        if task.status != "deleted":
            task.status = "ready" if task.live_path_id else ("failed" if error else "queued")
        task.error = error
        if visited:
            task.visits += 1


class Heartbeat(threading.Thread):
    """Renews the lease while a visit runs; flags the loss of it so the visit stops early."""

    def __init__(self, Session, lease: Lease, ttl: float):
        super().__init__(daemon=True)
        self.Session, self.lease, self.ttl = Session, lease, ttl
        self.lost = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.ttl / 3):
            try:
                if not renew(self.Session, self.lease, self.ttl):
                    self.lost.set()
                    return
            except Exception as e:  # noqa: BLE001 - a DB blip: keep trying until the lease runs out
                log.warning("lease renewal failed: %s", e)


def visit_targets(Session, names: list[str] | None, iterations: int | None) -> dict[str, int] | None:
    """How many visits each task should have when this run ends (None: forever)."""
    if iterations is None:
        return None
    with Session() as s:
        q = select(Task.name, Task.visits).where(Task.status != "deleted")
        if names:
            q = q.where(Task.name.in_(names))
        return {n: v + iterations for n, v in s.execute(q)}


def run_worker(system, cfg: EvolverConfig, *, names: list[str] | None = None, iterations: int | None = 1,
               worker: str | None = None, ttl: float = 120.0, poll: float = 5.0, progress: bool = True,
               targets: dict[str, int] | None = None, idle_exit: bool | None = None) -> list[dict]:
    """Visit tasks until the targets are met (or forever). Returns one summary per visit."""
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    if targets is None:
        targets = visit_targets(system.Session, names, iterations)
    cache, modules, summaries = PrefixCache(cfg.prefix_cache_bytes), {}, []
    wake = _TaskWaker(system.settings.redis_url)
    while True:
        eligible = set(names) if names else None
        if targets is not None and iterations is not None:
            targets.update({k: iterations for k in _new_tasks(system, targets, names)})
        lease = claim(system.Session, worker, ttl, eligible, targets)
        if lease is None:
            if targets is not None and _all_done(system, targets):
                return summaries
            wake.wait(poll)
            continue
        summaries.append(_visit(system, cfg, lease, worker, ttl, cache, modules, progress))
        if len(modules) > 2000:
            modules.clear()


def _visit(system, cfg, lease: Lease, worker: str, ttl: float, cache, modules, progress: bool) -> dict:
    with system.Session.begin() as s:
        row = VisitRow(task_id=lease.task_id, worker=worker, lease_token=lease.token)
        s.add(row)
        s.flush()
        visit_id = row.id
    beat = Heartbeat(system.Session, lease, ttl)
    beat.start()
    error, summary = None, {"task": lease.task, "error": None}
    try:
        v = Visit(system, lease.task, cfg, cache=cache, modules=modules, lease_token=lease.token,
                  visit_id=visit_id, worker=worker, progress=progress, should_stop=beat.lost.is_set,
                  on_candidate=lambda task, outcome: CANDIDATES.labels(task=task, outcome=outcome, worker=worker).inc())
        summary = v.run()
    except Exception as e:  # noqa: BLE001 - one bad task must not take the worker down
        log.exception("visit of %s failed", lease.task)
        error = f"{type(e).__name__}: {e}"
        summary = {"task": lease.task, "error": error}
    except BaseException:  # Ctrl-C: hand the task back now instead of after the lease runs out
        beat.done.set()
        release(system.Session, lease, visited=False)
        raise
    finally:
        beat.done.set()
    release(system.Session, lease, visited=True, error=error)  # a failing task must not be retried forever
    with system.Session.begin() as s:
        row = s.get(VisitRow, visit_id)
        row.finished_at, row.outcome, row.best_score = utcnow(), "error" if error else "done", summary.get("score")
    VISITS.labels(task=lease.task, outcome="error" if error else "done", worker=worker).inc()
    # With progress bars off (--json) stdout is for the JSON result only.
    print(visit_line(summary), file=sys.stdout if progress else sys.stderr, flush=True)
    return summary


def visit_line(r: dict) -> str:
    if r.get("error"):
        return f"visit {r['task']}: FAILED {r['error']}"
    acc = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    params = r.get("accounted_params")
    rate = f"{3600 * r['candidates'] / r['seconds']:.0f} candidates/h, {r.get('examples', 0) / r['seconds']:.0f} train images/s"
    return (f"visit {r['task']}: {r['candidates']} candidates ({r['improved']} improved) in {r['seconds']:.0f}s ({rate}); "
            f"live score {acc(r.get('score'))} val {acc(r.get('val_acc'))} test {acc(r.get('test_acc'))} "
            f"params {params / 1e6 if params else 0:.2f}M {'(new live path)' if r.get('moved') else '(unchanged)'}")


def _new_tasks(system, targets: dict[str, int], names: list[str] | None) -> list[str]:
    with system.Session() as s:
        q = select(Task.name).where(Task.status != "deleted")
        found = [n for n in s.scalars(q) if n not in targets and (not names or n in names)]
    return found


def _all_done(system, targets: dict[str, int]) -> bool:
    with system.Session() as s:
        rows = dict(s.execute(select(Task.name, Task.visits).where(Task.status != "deleted")).all())
    return all(rows.get(n, t) >= t for n, t in targets.items())


class _TaskWaker:
    """Sleeps until a `munet:tasks` message arrives (or the poll interval passes)."""

    def __init__(self, redis_url: str | None):
        self.redis_url, self.pubsub = redis_url, None

    def wait(self, timeout: float) -> None:
        if not self.redis_url:
            time.sleep(timeout)
            return
        import redis

        try:
            if self.pubsub is None:
                self.pubsub = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2).pubsub(ignore_subscribe_messages=True)
                self.pubsub.subscribe(signals.TASKS)
            msg = self.pubsub.get_message(timeout=timeout)
            if msg:
                log.info("woken by new task %s", json.loads(msg["data"]).get("task"))
        except Exception as e:  # noqa: BLE001 - Redis down: fall back to polling SQL
            log.warning("redis unavailable (%s); polling", e)
            self.pubsub = None
            time.sleep(timeout)


def _spawned(settings: Settings, cfg: EvolverConfig, kwargs: dict, threads: int, nice: int, results) -> None:
    from munet.system import System

    if nice:
        os.nice(nice)
    torch.set_num_threads(threads)
    results.put(run_worker(System(settings), cfg, **kwargs))


def run_workers(system, cfg: EvolverConfig, workers: int, *, nice: int = 0, metrics_port: int | None = None, **kwargs) -> list[dict]:
    """`munet evolve --workers N`: N processes sharing one set of visit targets."""
    folder = start_metrics(metrics_port, spawned_workers=workers > 1) if metrics_port else None
    try:
        return _run_workers(system, cfg, workers, nice=nice, **kwargs)
    finally:
        stop_metrics(folder)


def _run_workers(system, cfg: EvolverConfig, workers: int, *, nice: int, **kwargs) -> list[dict]:
    threads = cfg.threads or max(1, (os.cpu_count() or 1) // workers)
    kwargs.setdefault("targets", visit_targets(system.Session, kwargs.get("names"), kwargs.get("iterations", 1)))
    if workers == 1:
        if nice:
            os.nice(nice)
        torch.set_num_threads(threads)
        return run_worker(system, cfg, **kwargs)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_spawned, args=(system.settings, cfg, dict(kwargs, worker=f"{socket.gethostname()}:{os.getpid()}:{i}"),
                                                threads, nice, results)) for i in range(workers)]
    for p in procs:
        p.start()
    summaries = []
    while any(p.is_alive() for p in procs) or not results.empty():
        try:
            summaries += results.get(timeout=1)
        except Exception:  # noqa: BLE001 - queue.Empty: keep waiting for the workers
            pass
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"{sum(1 for p in procs if p.exitcode)} of {workers} workers failed")
    return summaries
