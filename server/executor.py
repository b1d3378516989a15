"""The executor: the table of served paths, one module cache, and cross-task batching.

A batch holds images of many tasks. Each image is preprocessed with its path's own
settings (`models.preprocess`, the evaluator's function), then images are grouped by input
shape and every group walks the paths' stages (`models.stages`) from the bottom: while the
component ids of the group's paths agree at a position, that component runs once on the
union of their inputs; where they diverge the batch splits and each part continues alone
(parts are not merged again if their paths converge later). Outputs match running each
request alone up to float rounding (atol 1e-4, same top-1; bit equality across batch
sizes is not achievable on CPU).

The table is replaced, never mutated: a reader takes one snapshot per batch, so a swap is
atomic and an in-flight batch finishes on the path it started with. A swapped-out path is
kept `grace` seconds so that requests already routed to it finish on it too; after that
its components are released from the cache unless another served path uses them.

Activations of a batch are freed when it ends, but glibc keeps freed heap pages (measured:
~77 MB of an executor's resident memory after a burst of mixed batches was free heap).
`HeapTrimmer` hands them back to the OS at most every `MUNET_MALLOC_TRIM_S` seconds (~1 ms
a call), and once more that long after the last batch, so resident memory follows the
tasks served rather than the largest burst seen.

Served components have their BatchNorms folded into the convolutions before them
(`models.fold_batchnorm`, before the probe check, so the check sees what will serve): a
third fewer ops per block, 1.08-1.17x faster forwards in-process (batch 1, 16, and 16 paths
x 1 image), outputs within ~1e-6 of the evolver's.

oneDNN, which runs PyTorch's CPU convolutions, caches a compiled primitive per layer and
input shape, 1024 by default; mixed batches bring many shapes (every batch size for every
image size), and that cache alone grew an executor by ~400 MB (benchmarks/README.md).
`ONEDNN_PRIMITIVE_CACHE_CAPACITY` defaults to 128 here (oneDNN reads it when it makes its
first primitive, after this import); set it to override.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from munet import models

from . import metrics
from .protocol import Item, Result  # noqa: F401  (the executor's side of them)

log = logging.getLogger("munet.server")

ONEDNN_CACHE_CAPACITY = os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")


class HeapTrimmer:
    """Return free heap pages to the OS (glibc `malloc_trim`), at most every `interval` s."""

    def __init__(self, interval: float | None = None):
        self.interval = float(os.environ.get("MUNET_MALLOC_TRIM_S", "0.5")) if interval is None else interval
        self.last = 0.0
        self._trim = None
        self._lock = threading.Lock()
        self._pending: threading.Timer | None = None
        name = ctypes.util.find_library("c")
        if self.interval > 0 and name:
            try:
                self._trim = ctypes.CDLL(name).malloc_trim  # glibc only; elsewhere a no-op
            except (OSError, AttributeError):
                self._trim = None

    def __call__(self, force: bool = False) -> bool:
        now = time.monotonic()
        if self._trim is None:
            return False
        with self._lock:
            if not force and now - self.last < self.interval:
                # Skipped: trim once the interval is over, so the heap of the last batches
                # before the load stops goes back too (not only at the next request).
                if self._pending is None:
                    self._pending = threading.Timer(self.interval - (now - self.last), self._deferred)
                    self._pending.daemon = True
                    self._pending.start()
                return False
            self.last = now
        self._trim(0)
        return True

    def _deferred(self) -> None:
        with self._lock:
            self._pending = None
        self(force=True)


@dataclass(frozen=True)
class Served:
    """One path in service for one task."""

    task: str
    path_id: str
    path: models.Path
    channels: int  # 1 for tasks trained on greyscale images, else 3
    score: float | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    accounted_params: float | None = None
    since: float = field(default_factory=time.time)

    @property
    def image_size(self) -> int:
        return self.path.image_size

    @property
    def classes(self) -> list[str]:
        return self.path.classes

    @property
    def ids(self) -> list[str]:
        return self.path.ids


@dataclass(frozen=True)
class TaskState:
    """What the executor knows about a task that exists in SQL (served or not)."""

    name: str
    status: str
    live_path_id: str | None
    channels: int
    classes: tuple[str, ...]
    error: str | None = None  # why its live path is not served (probe mismatch, load error)


@dataclass(frozen=True)
class Table:
    tasks: dict[str, TaskState]          # every active task
    current: dict[str, Served]           # task -> served path
    held: dict[str, Served]              # path id -> served path (current and retiring)
    retiring: dict[str, float]           # path id -> release time
    version: int = 0


@dataclass
class Stats:
    runs: int = 0
    saved: int = 0
    runs_by_component: dict[str, int] = field(default_factory=dict)


@dataclass
class _Job:
    ids: list[str]
    modules: list[nn.Module]
    x: torch.Tensor


@torch.inference_mode()
def run_shared(jobs: list[tuple[list[str], list[nn.Module], torch.Tensor]], stats: Stats | None = None) -> list[torch.Tensor]:
    """Run (component ids, modules, preprocessed input) jobs; each component runs once on the
    union of the jobs that reach it with inputs of the same shape. Returns one output per job.

    Jobs walk their paths from the bottom. A group is a set of jobs whose activations sit in
    one tensor; before every step groups split where their next components differ. The next
    component to run is one that no job needs later in its path (paths list components in
    one global order: stem, blocks by index, neck, final norm, head), so paths that diverge
    (a dropped block, a private clone) and converge again share the later stages too.
    """
    stats = stats if stats is not None else Stats()
    work = [_Job(list(ids), list(mods), x) for ids, mods, x in jobs]
    out: list[torch.Tensor | None] = [None] * len(work)
    ptr = [0] * len(work)
    groups: list[tuple[list[int], torch.Tensor]] = [([i], job.x) for i, job in enumerate(work)]
    while True:
        # Split groups whose members go different ways; finished jobs leave.
        split: list[tuple[list[int], torch.Tensor]] = []
        for members, h in groups:
            parts = h.split([work[m].x.shape[0] for m in members]) if len(members) > 1 else (h,)
            by_next: OrderedDict[str | None, list[tuple[int, torch.Tensor]]] = OrderedDict()
            for m, part in zip(members, parts):
                nxt = work[m].ids[ptr[m]] if ptr[m] < len(work[m].ids) else None
                by_next.setdefault(nxt, []).append((m, part))
            for nxt, pairs in by_next.items():
                if nxt is None:
                    for m, part in pairs:
                        out[m] = part
                elif len(pairs) == len(members):
                    split.append((members, h))
                else:
                    split.append(([m for m, _ in pairs], torch.cat([p for _, p in pairs]) if len(pairs) > 1 else pairs[0][1]))
        groups = split
        if not groups:
            return out  # type: ignore[return-value]
        later = {cid for members, _ in groups for m in members for cid in work[m].ids[ptr[m] + 1:]}
        first = next((g for g in groups if work[g[0][0]].ids[ptr[g[0][0]]] not in later), groups[0])
        cid = work[first[0][0]].ids[ptr[first[0][0]]]
        shape = tuple(first[1].shape[1:])
        chosen = [g for g in groups if work[g[0][0]].ids[ptr[g[0][0]]] == cid and tuple(g[1].shape[1:]) == shape]
        rest = [g for g in groups if not any(g is c for c in chosen)]
        members = [m for g in chosen for m in g[0]]
        h = torch.cat([g[1] for g in chosen]) if len(chosen) > 1 else chosen[0][1]
        h = work[members[0]].modules[ptr[members[0]]](h)
        stats.runs += 1
        stats.runs_by_component[cid] = stats.runs_by_component.get(cid, 0) + 1
        # Running each distinct path alone would have run this component once per path.
        stats.saved += len({tuple(work[m].ids) for m in members}) - 1
        for m in members:
            ptr[m] += 1
        groups = rest + [(members, h)]


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


class Executor:
    """Holds the table and the module cache; `infer` runs one batch of items."""

    def __init__(self, grace: float = 30.0):
        self.grace = grace
        self.cache: dict[str, nn.Module] = {}
        self.table = Table({}, {}, {}, {})
        self._lock = threading.RLock()  # writers only; readers take `self.table` once
        self.last_stats = Stats()
        self.trim_heap = HeapTrimmer()

    # -- the table (written by the swap listener) ----------------------------------------------
    def snapshot(self) -> Table:
        return self.table

    def _publish(self, tasks=None, current=None, held=None, retiring=None) -> None:
        t = self.table
        self.table = Table(t.tasks if tasks is None else tasks, t.current if current is None else current,
                           t.held if held is None else held, t.retiring if retiring is None else retiring,
                           t.version + 1)

    def set_tasks(self, tasks: dict[str, TaskState]) -> None:
        with self._lock:
            if tasks != self.table.tasks:
                self._publish(tasks=tasks)

    def prepare(self, modules: dict[str, nn.Module]) -> None:
        """Fold BatchNorms into convolutions and store weights channels-last in components not
        served yet (in place; those in the cache are prepared already). Before the probe
        check, so the check sees what will serve.

        Channels-last, in process on one thread, 16 tasks x 1 image at 64 px: 65 -> 44 ms;
        one task's 16 images: 24 -> 22 ms (`/tmp` script over `run_shared`, 2026-11-29)."""
        for cid, module in modules.items():
            if cid not in self.cache:
                models.fold_batchnorm(module)
                module.to(memory_format=torch.channels_last)

    def install(self, served: Served, modules: dict[str, nn.Module]) -> Served | None:
        """Make `served` the task's path (atomically); returns the path it replaced."""
        self.prepare({cid: modules[cid] for cid in served.ids})
        with self._lock:
            t = self.table
            for cid in served.ids:
                self.cache.setdefault(cid, modules[cid])
            old = t.current.get(served.task)
            current = dict(t.current)
            current[served.task] = served
            held = dict(t.held)
            held[served.path_id] = served
            retiring = dict(t.retiring)
            retiring.pop(served.path_id, None)
            if old is not None and old.path_id != served.path_id:
                retiring[old.path_id] = time.monotonic() + self.grace
            self._publish(current=current, held=held, retiring=retiring)
            self._gauges()
            return old

    def remove(self, task: str) -> Served | None:
        """Stop serving a task (deleted); its path retires like a swapped-out one."""
        with self._lock:
            t = self.table
            old = t.current.get(task)
            if old is None:
                return None
            current = {k: v for k, v in t.current.items() if k != task}
            retiring = dict(t.retiring)
            retiring[old.path_id] = time.monotonic() + self.grace
            self._publish(current=current, retiring=retiring)
            self._gauges()
            return old

    def release(self, now: float | None = None) -> int:
        """Drop retired paths past their grace and the components no held path uses."""
        now = time.monotonic() if now is None else now
        with self._lock:
            t = self.table
            expired = [pid for pid, until in t.retiring.items() if until <= now]
            if expired:
                current_ids = {s.path_id for s in t.current.values()}
                held = {pid: s for pid, s in t.held.items() if pid not in expired or pid in current_ids}
                retiring = {pid: u for pid, u in t.retiring.items() if pid not in expired}
                self._publish(held=held, retiring=retiring)
            used = {cid for s in self.table.held.values() for cid in s.ids}
            dropped = [cid for cid in self.cache if cid not in used]
            for cid in dropped:
                del self.cache[cid]
            if dropped or expired:
                self._gauges()
        if dropped:
            self.trim_heap(force=True)
        return len(dropped)

    def _gauges(self) -> None:
        metrics.SERVED_TASKS.set(len(self.table.current))
        metrics.CACHE_COMPONENTS.set(len(self.cache))
        metrics.CACHE_BYTES.set(sum(module_bytes(m) for m in self.cache.values()))

    def cache_bytes(self) -> int:
        return sum(module_bytes(m) for m in list(self.cache.values()))

    # -- execution ------------------------------------------------------------------------------
    def resolve(self, table: Table, task: str, path_id: str | None) -> Served | Result:
        served = table.held.get(path_id) if path_id else None
        if served is not None and served.task == task:
            return served
        served = table.current.get(task)
        if served is not None:
            return served
        state = table.tasks.get(task)
        if state is None:
            return Result(error="unknown_task", detail=f"no task named {task!r}")
        return Result(error="no_live_path", detail=no_path_detail(state))

    def run_paths(self, requests: list[tuple[Served, torch.Tensor]], stats: Stats | None = None) -> list[torch.Tensor]:
        """uint8 [n, H, W, C] batches, one per served path -> logits, via shared execution."""
        jobs = []
        for served, x in requests:
            p = served.path
            x = models.preprocess(x, p.image_size, p.mean, p.std).contiguous(memory_format=torch.channels_last)
            jobs.append((p.ids, p.modules, x))
        return run_shared(jobs, stats)

    def infer(self, items: list[Item]) -> list[Result]:
        """One batch of images of any tasks. Never raises for an item: errors are per item."""
        t0 = time.perf_counter()
        table = self.table
        results: list[Result | None] = [None] * len(items)
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        chosen: dict[int, Served] = {}
        for i, item in enumerate(items):
            got = self.resolve(table, item.task, item.path_id)
            if isinstance(got, Result):
                results[i] = got
                continue
            px = item.pixels
            if not isinstance(px, np.ndarray) or px.dtype != np.uint8 or px.ndim != 3 or px.shape[2] not in (1, 3) \
                    or px.shape[0] < 1 or px.shape[1] < 1:
                results[i] = Result(error="invalid_image", detail="pixels must be uint8 [H, W, 1 or 3]")
                continue
            chosen[i] = got
            groups.setdefault((got.path_id, px.shape), []).append(i)
        if groups:
            requests, members = [], []
            for (pid, _shape), idx in groups.items():
                x = torch.from_numpy(np.stack([items[i].pixels for i in idx]))
                requests.append((chosen[idx[0]], x))
                members.append(idx)
            stats = Stats()
            logits = self.run_paths(requests, stats)
            self.last_stats = stats
            metrics.STAGE_RUNS.inc(stats.runs)
            metrics.STAGE_RUNS_SAVED.inc(stats.saved)
            for idx, lg in zip(members, logits):
                probs = torch.softmax(lg.float(), dim=1)
                for row, i in enumerate(idx):
                    k = max(1, min(int(items[i].top), probs.shape[1]))
                    values, labels = probs[row].topk(k)
                    results[i] = Result(path_id=chosen[i].path_id,
                                        top=[(int(lab), float(v)) for lab, v in zip(labels.tolist(), values.tolist())])
            n = sum(len(idx) for idx in members)
            metrics.BATCH_SIZE.observe(n)
            metrics.BATCH_TASKS.observe(len({chosen[i].task for i in chosen}))
        metrics.BATCH_LATENCY.observe(time.perf_counter() - t0)
        self.trim_heap()
        return results  # type: ignore[return-value]

    def logits_of(self, served: Served, x_uint8: torch.Tensor) -> torch.Tensor:
        """One path alone on uint8 [n, H, W, C] (the probe check and warm-up)."""
        return self.run_paths([(served, x_uint8)])[0].float()


def no_path_detail(state: TaskState) -> str:
    if state.error:
        return f"task {state.name!r} ({state.status}) has no servable path: {state.error}"
    if state.live_path_id:
        return f"task {state.name!r} ({state.status}): its live path is being loaded; retry shortly"
    return f"task {state.name!r} has no live path yet (status {state.status}); the evolver makes the first one"
