"""The swap listener: keeps the executor's table equal to the live paths in SQL.

SQL is the source of truth. A thread polls it every `poll_interval` seconds; a second
thread subscribes to Redis `munet:swaps` / `munet:tasks` (reconnecting with backoff) and
only wakes the poller early, so a lost message or a Redis outage delays a swap by at most
one poll interval. After every (re)connection the poller runs at once.

Loading a path (`System.load_path`) builds only the components the cache does not hold,
then checks the path before it goes live: its stored probe batch (`PathRow.probe_hash`,
inputs and the evaluator's logits) must give the same logits through the server's own
execution within tolerance; that forward pass also warms the path up. Only then is the
task's entry replaced, atomically. A refused or failed load changes nothing (the old path
keeps serving), is counted in `munet_swap_failures_total` and shown in GET /status; a
refused path (probe mismatch or missing probe) is not retried, since paths never change;
other failures are retried with backoff.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from dataclasses import dataclass

import torch
from sqlalchemy import func, select

from munet.storage import signals
from munet.storage.schema import LiveHistory, PathRow, Task

from . import metrics
from .executor import Executor, Served, TaskState

log = logging.getLogger("munet.server.swap")


class SwapRefused(Exception):
    def __init__(self, reason: str, detail: str, permanent: bool = True):
        super().__init__(detail)
        self.reason, self.detail, self.permanent = reason, detail, permanent


@dataclass
class Failure:
    task: str
    path_id: str
    reason: str
    detail: str
    at: float
    retry_at: float | None  # None: never retried (paths are immutable)
    attempts: int = 1


def _epoch(t: dt.datetime | None) -> float | None:
    return t.replace(tzinfo=dt.timezone.utc).timestamp() if t else None


class SwapListener:
    def __init__(self, system, executor: Executor, *, poll_interval: float = 2.0, probe_rtol: float = 1e-4,
                 probe_atol: float = 1e-4, redis_url: str | None = None):
        self.system, self.executor = system, executor
        self.poll_interval = poll_interval
        self.probe_rtol, self.probe_atol = probe_rtol, probe_atol
        self.redis_url = redis_url
        self.ready = threading.Event()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self._sync_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self.failures: dict[str, Failure] = {}
        self.committed_at: dict[tuple[str, str], float] = {}
        self.db_up: bool | None = None
        self.db_error: str | None = None
        self.redis_connected = False
        self.redis_error: str | None = None
        self.redis_messages = 0  # signals received: shows pub/sub works again after an outage
        self.last_poll: float | None = None
        self.swaps = 0
        metrics.REDIS_UP.set(0)

    # -- threads ------------------------------------------------------------------------------
    def start(self) -> None:
        self._spawn(self._poll_loop, "munet-swap-poll")
        if self.redis_url:
            self._spawn(self._redis_loop, "munet-swap-redis")

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self, timeout: float = 5.0) -> None:
        self.stopping.set()
        self.wake.set()
        for t in self._threads:
            t.join(timeout)

    def _poll_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.sync()
            except Exception:  # noqa: BLE001 - the listener must never die
                log.exception("swap poll failed")
            self.wake.wait(self.poll_interval)
            self.wake.clear()

    def _redis_loop(self) -> None:
        import redis

        backoff = 0.5
        while not self.stopping.is_set():
            client = pubsub = None
            try:
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=10,
                                              health_check_interval=5)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(signals.SWAPS, signals.TASKS)
                self.redis_connected, self.redis_error = True, None
                metrics.REDIS_UP.set(1)
                backoff = 0.5
                self.wake.set()  # poll SQL at once after every (re)connection
                while not self.stopping.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        self._on_message(message)
            except Exception as e:  # noqa: BLE001 - redis and socket errors of every kind
                self.redis_connected, self.redis_error = False, f"{type(e).__name__}: {e}"
                metrics.REDIS_UP.set(0)
                log.warning("redis subscription lost (%s); SQL polling continues, reconnecting in %.1fs", e, backoff)
                self.stopping.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                for thing in (pubsub, client):
                    try:
                        if thing is not None:
                            thing.close()
                    except Exception:  # noqa: BLE001
                        pass
        metrics.REDIS_UP.set(0)

    def _on_message(self, message: dict) -> None:
        try:
            payload = json.loads(message.get("data") or b"{}")
        except (ValueError, TypeError):
            return
        if not isinstance(payload, dict):
            return
        self.redis_messages += 1
        task, path_id, at = payload.get("task"), payload.get("path_id"), payload.get("committed_at")
        if isinstance(task, str) and isinstance(path_id, str) and isinstance(at, (int, float)):
            if len(self.committed_at) > 10_000:
                self.committed_at.clear()
            self.committed_at[(task, path_id)] = float(at)
        self.wake.set()

    # -- one poll -------------------------------------------------------------------------------
    def sync(self) -> dict:
        """Read the live paths from SQL and swap what changed; safe to call from any thread."""
        with self._sync_lock:
            return self._sync()

    def _sync(self) -> dict:
        try:
            with self.system.ReadSession() as s:
                rows = s.execute(select(Task.id, Task.name, Task.status, Task.live_path_id, Task.image_shape,
                                        Task.classes).where(Task.status != "deleted")).all()
        except Exception as e:  # noqa: BLE001 - database outage: keep serving what is loaded
            self.db_up, self.db_error = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            metrics.DB_UP.set(0)
            log.warning("SQL poll failed (%s); serving continues with the loaded paths", self.db_error)
            return {"db_up": False}
        self.db_up, self.db_error = True, None
        metrics.DB_UP.set(1)
        self.last_poll = time.time()
        metrics.LAST_POLL.set(self.last_poll)
        loaded, failed = [], []
        states: dict[str, TaskState] = {}
        for task_id, name, status, live_id, shape, classes in rows:
            channels = int(shape[-1]) if shape and int(shape[-1]) in (1, 3) else 3
            serving = self.executor.table.current.get(name)
            if live_id and (serving is None or serving.path_id != live_id) and not self.stopping.is_set():
                if self._due(live_id):
                    ok = self.load(name, task_id, live_id, channels)
                    (loaded if ok else failed).append(name)
            failure = self.failures.get(live_id) if live_id else None
            error = None
            if failure is not None and (self.executor.table.current.get(name) is None
                                        or self.executor.table.current[name].path_id != live_id):
                error = f"{failure.reason}: {failure.detail}"
            states[name] = TaskState(name, status, live_id, channels, tuple(str(c) for c in classes or ()), error)
        for name in list(self.executor.table.current):
            if name not in states:
                self.executor.remove(name)
                metrics.clear_live(name)
                log.info("task %s is deleted: no longer served", name)
        self.executor.set_tasks(states)
        self.executor.release()
        self.ready.set()
        return {"db_up": True, "loaded": loaded, "failed": failed}

    def _due(self, path_id: str) -> bool:
        failure = self.failures.get(path_id)
        return failure is None or (failure.retry_at is not None and time.time() >= failure.retry_at)

    # -- one load -------------------------------------------------------------------------------
    def load(self, task: str, task_id: int, path_id: str, channels: int) -> bool:
        t0 = time.time()
        staging = dict(self.executor.cache)
        try:
            path, row = self.system.load_path(path_id, staging)
            if row.task_id != task_id:
                raise SwapRefused("wrong_task", f"path {path_id} is not a path of task {task!r}")
            served = Served(task, path_id, path, channels, score=row.score, val_acc=row.val_acc,
                            test_acc=row.test_acc, accounted_params=row.accounted_params)
            self.executor.prepare({cid: staging[cid] for cid in path.ids})
            self.check_probe(served, row)
        except SwapRefused as e:
            return self._failed(task, path_id, e.reason, e.detail, e.permanent)
        except Exception as e:  # noqa: BLE001 - any load error leaves the old path serving
            log.exception("loading path %s of %s failed", path_id, task)
            return self._failed(task, path_id, "load_error", f"{type(e).__name__}: {str(e)[:300]}", False)
        committed = self.committed_at.pop((task, path_id), None) or self._committed_at(task_id, path_id)
        served = Served(task, path_id, path, channels, score=row.score, val_acc=row.val_acc, test_acc=row.test_acc,
                        accounted_params=row.accounted_params, since=time.time())
        built = len({c for c in path.ids if c not in self.executor.cache})
        old = self.executor.install(served, {cid: staging[cid] for cid in path.ids})
        self.failures.pop(path_id, None)
        self.swaps += 1
        metrics.SWAPS.labels(task=task).inc()
        if committed is not None:
            metrics.SWAP_LATENCY.observe(max(0.0, served.since - committed))
        metrics.set_live(task, row.score, row.val_acc, row.test_acc, row.accounted_params, served.since)
        log.info("task %s now served by path %s (was %s; %d of %d components loaded, the rest cached; "
                 "%.2fs to load and check)", task, path_id, old.path_id if old else None, built, len(set(path.ids)),
                 time.time() - t0)
        return True

    def check_probe(self, served: Served, row: PathRow) -> None:
        if not row.probe_hash:
            raise SwapRefused("probe_missing", f"path {served.path_id} has no stored probe batch to check")
        try:
            probe = self.system.store.get(row.probe_hash)
        except Exception as e:  # noqa: BLE001 - missing/corrupt blob, or a store outage
            raise SwapRefused("probe_unreadable", f"{type(e).__name__}: {str(e)[:200]}", permanent=False) from None
        inputs, expected = probe.get("inputs"), probe.get("logits")
        if inputs is None or expected is None or inputs.dtype != torch.uint8 or inputs.ndim != 4:
            raise SwapRefused("probe_invalid", "the probe blob needs uint8 'inputs' [N,H,W,C] and 'logits' [N,K]")
        if expected.ndim != 2 or expected.shape[0] != inputs.shape[0] or expected.shape[1] != len(served.classes):
            raise SwapRefused("probe_invalid", f"probe logits shaped {list(expected.shape)} do not fit "
                                               f"{inputs.shape[0]} inputs and {len(served.classes)} classes")
        got = self.executor.logits_of(served, inputs)  # also the warm-up forward pass
        expected = expected.float()
        # rtol is relative to the batch's largest |logit|, not each logit's own: float32
        # rounding differences (folded BatchNorms, another memory layout or thread count)
        # grow with the activations' scale, so a near-zero logit of a path whose logits reach
        # ~100 may move by 2e-4 while every weight is right; a wrong weight moves them by far more.
        limit = self.probe_atol + self.probe_rtol * (expected.abs().max().item() if expected.numel() else 0.0)
        diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("nan")
        if not diff <= limit:
            raise SwapRefused("probe_mismatch", f"logits on the probe batch differ from the evaluator's "
                                                f"(max |diff| {diff:.3g} > {limit:.3g}: atol {self.probe_atol:g} + rtol "
                                                f"{self.probe_rtol:g} x max |logit|)")

    def _failed(self, task: str, path_id: str, reason: str, detail: str, permanent: bool) -> bool:
        prev = self.failures.get(path_id)
        attempts = prev.attempts + 1 if prev else 1
        retry = None if permanent else time.time() + min(60.0, 2.0 * 2 ** (attempts - 1))
        self.failures[path_id] = Failure(task, path_id, reason, detail, time.time(), retry, attempts)
        if len(self.failures) > 1000:  # bounded: forget the oldest
            for key in sorted(self.failures, key=lambda k: self.failures[k].at)[:100]:
                del self.failures[key]
        metrics.SWAP_FAILURES.labels(task=task, reason=reason).inc()
        log.warning("refused path %s of task %s (%s: %s); the previous path keeps serving", path_id, task, reason, detail)
        return False

    def _committed_at(self, task_id: int, path_id: str) -> float | None:
        try:
            with self.system.ReadSession() as s:
                at = s.scalar(select(func.max(LiveHistory.at)).where(LiveHistory.task_id == task_id,
                                                                      LiveHistory.path_id == path_id))
            return _epoch(at)
        except Exception:  # noqa: BLE001
            return None

    # -- reports --------------------------------------------------------------------------------
    def health(self) -> dict:
        """What is down while serving continues (`/status`'s `degraded`, `/readyz`'s body):
        {"degraded": ["database", "redis"] (those down), "detail": text or None}."""
        down, why = [], []
        if self.db_up is False:
            down.append("database")
            why.append(f"the database is not reachable ({self.db_error}): loaded paths keep serving, "
                       "task routes answer 503 until it returns")
        if self.redis_url and not self.redis_connected:
            down.append("redis")
            why.append(f"Redis is not connected ({self.redis_error or 'connecting'}): swaps arrive by the SQL poll")
        return {"degraded": down, "detail": "; ".join(why) or None}

    def status(self) -> dict:
        table = self.executor.table
        tasks = {}
        for name, state in sorted(table.tasks.items()):
            serving = table.current.get(name)
            tasks[name] = {
                "status": state.status, "live_path_id": state.live_path_id,
                "serving_path_id": serving.path_id if serving else None,
                "image_size": serving.image_size if serving else None,
                "serving_since": serving.since if serving else None, "error": state.error,
            }
        return {
            "ready": self.ready.is_set(),
            "degraded": bool(self.health()["degraded"]),
            "database": {"up": self.db_up, "error": self.db_error, "last_poll": self.last_poll,
                         "poll_interval_s": self.poll_interval},
            "redis": {"configured": bool(self.redis_url), "connected": self.redis_connected, "error": self.redis_error,
                      "messages": self.redis_messages},
            "tasks": tasks,
            "served_tasks": len(table.current),
            "held_paths": len(table.held),
            "cache": {"components": len(self.executor.cache), "bytes": self.executor.cache_bytes()},
            "swaps": self.swaps,
            "failures": [{"task": f.task, "path_id": f.path_id, "reason": f.reason, "detail": f.detail,
                          "at": f.at, "attempts": f.attempts, "retry": f.retry_at is not None}
                         for f in sorted(self.failures.values(), key=lambda f: -f.at)[:20]],
        }


def route_table(executor: Executor, ready: bool, since: int = -1, health: dict | None = None) -> dict:
    """What the gateway needs to route a request: per task, the path in service (or why none),
    its image channels and class names. Unchanged since `since`: only the version. `health`
    (`SwapListener.health`) always comes along, so the gateway's /readyz knows what is down
    from the route table it polls anyway, without a database call per probe."""
    from .executor import no_path_detail

    t = executor.table
    if since == t.version:
        return {"version": t.version, "ready": ready, "health": health}
    tasks = {}
    for name, st in t.tasks.items():
        cur = t.current.get(name)
        tasks[name] = {"status": st.status, "path_id": cur.path_id if cur else None, "live_path_id": st.live_path_id,
                       "image_size": cur.image_size if cur else None, "channels": st.channels,
                       "classes": list(st.classes), "detail": None if cur else no_path_detail(st)}
    return {"version": t.version, "ready": ready, "health": health, "tasks": tasks}


class LocalBackend:
    """The executor in the gateway's own process (tests, and `Gateway` without BentoML):
    one batch at a time, no cross-request batching."""

    def __init__(self, executor: Executor, listener: SwapListener):
        self.executor, self.listener = executor, listener
        self._lock = threading.Lock()

    def _infer(self, items):
        with self._lock:
            return self.executor.infer(items)

    async def infer(self, items):
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self._infer, items)

    async def routes(self, since: int) -> dict:
        return route_table(self.executor, self.listener.ready.is_set(), since, self.listener.health())

    async def status(self) -> dict:
        return self.listener.status()

    async def refresh(self) -> dict:
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(self.listener.sync)
