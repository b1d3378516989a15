"""Writing to the system: roots, tasks, and the one commit function for paths.

The commit protocol (DESIGN.md data flow step 2): tensors first (atomic, content-named
blobs), then a single transaction that inserts components, the path and its lineage,
and moves the live pointer only past a lower score. A crash anywhere leaves the previous
live path intact; orphaned blobs are collected by `gc`.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from .blobs import LayerStore
from .schema import (ROOT_LOCK, Candidate as CandidateRow, Component, ComponentLock, LiveHistory, PathComponent, PathRow, Root, Task,
                     new_id, utcnow, validate_task_name)

if TYPE_CHECKING:
    import torch


class CommitError(RuntimeError):
    pass


class LeaseLost(CommitError):
    """The worker's lease was taken over: its fencing token is stale, so it may not commit."""


@dataclass
class NewComponent:
    """A component created by a path: tensors to store plus its lineage."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    parent_id: str | None = None
    num_params: int = 0
    id: str = field(default_factory=new_id)


@dataclass
class PathRecord:
    task: str | None
    root_id: int
    component_ids: list[str]
    hparams: dict
    image_size: int
    parent_id: str | None = None
    val_acc: float | None = None
    score: float | None = None
    test_acc: float | None = None
    accounted_params: float | None = None
    flops: float | None = None
    train_examples: int = 0
    train_seconds: float = 0.0
    probe: dict[str, torch.Tensor] | None = None  # {"inputs", "logits"} checked by servers before a swap
    id: str = field(default_factory=new_id)


@dataclass
class CommitResult:
    path_id: str
    moved: bool
    previous_path_id: str | None
    score: float | None


def fault_point(name: str) -> None:
    """Die here, hard, when MUNET_FAULT names this point (the fault tests' kill switch)."""
    if os.environ.get("MUNET_FAULT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _store_components(store: LayerStore, components: list[NewComponent]) -> dict[str, str]:
    return {c.id: store.put(c.tensors) for c in components}


def _component_row(c: NewComponent, digest: str, root_id: int, task_id: int | None, path_id: str | None) -> Component:
    return Component(
        id=c.id, root_id=root_id, name=c.name, meta=c.meta, num_params=int(c.num_params),
        shapes={k: list(v.shape) for k, v in c.tensors.items()}, blob_hash=digest,
        parent_id=c.parent_id, task_id=task_id, path_id=path_id,
    )


def _path_row(record: PathRecord, task_id: int | None, probe_hash: str | None) -> PathRow:
    return PathRow(
        id=record.id, task_id=task_id, root_id=record.root_id, parent_id=record.parent_id,
        hparams=record.hparams, image_size=record.image_size, val_acc=record.val_acc, score=record.score,
        test_acc=record.test_acc, accounted_params=record.accounted_params, flops=record.flops,
        train_examples=record.train_examples, train_seconds=record.train_seconds, probe_hash=probe_hash,
    )


def add_root(Session: sessionmaker[Session], store: LayerStore, name: str, timm_name: str, weights: str,
             config: dict, components: list[NewComponent]) -> Root:
    """Record a decomposed root: its components (locked ROOT) and its root path."""
    validate_task_name(name)
    digests = _store_components(store, components)
    head = [c for c in components if c.name == "head"]
    total = sum(c.num_params for c in components)
    with Session.begin() as s:
        if s.scalar(select(Root).where(Root.name == name)):
            raise CommitError(f"a root named {name!r} exists already")
        root = Root(name=name, timm_name=timm_name, family=config["family"], weights=weights, config=config,
                    root_params=total - sum(c.num_params for c in head), total_params=total)
        s.add(root)
        s.flush()
        path = PathRecord(task=None, root_id=root.id, component_ids=[c.id for c in components],
                          hparams={"arch": {"blocks": list(range(config["depth"])), "adapters": {},
                                            "image_size": config["image_size"], "num_classes": head[0].meta["num_classes"]}},
                          image_size=config["image_size"])
        s.add(_path_row(path, None, None))
        s.flush()
        for c in components:
            s.add(_component_row(c, digests[c.id], root.id, None, path.id))
        s.flush()
        s.add_all(PathComponent(path_id=path.id, position=i, component_id=cid) for i, cid in enumerate(path.component_ids))
        s.add_all(ComponentLock(component_id=c.id, lock=ROOT_LOCK) for c in components)
        root.root_path_id = path.id
    return root


# Validation is 10% of the training images (MUNET.md §6), but never fewer than 500 where a
# quarter of the set allows: the search keeps the best of ~32 candidates by validation
# accuracy, and on a small split (elpv: 197 images, steps of 0.5 points) the winner is
# the luckiest candidate more than the best one (benchmarks/HISTORY.md, "A larger
# validation split for small tasks").
VAL_FRACTION, MIN_VAL_IMAGES, MAX_VAL_FRACTION = 0.1, 500, 0.25


def default_val_fraction(n_train: int) -> float:
    return max(VAL_FRACTION, min(MAX_VAL_FRACTION, MIN_VAL_IMAGES / max(n_train, 1)))


def val_images(n_train: int, val_fraction: float) -> int:
    """About how many images the split holds (the evolver's stratified split rounds per class)."""
    return round(n_train * val_fraction)


def add_task(Session: sessionmaker[Session], name: str, root_name: str, dataset: dict,
             val_fraction: float | None = None, split_seed: int = 0) -> Task:
    """A queued task; `val_fraction` None takes `default_val_fraction` of its training set."""
    validate_task_name(name)
    if val_fraction is None:
        val_fraction = default_val_fraction(dataset["n_train"])
    with Session.begin() as s:
        root = s.scalar(select(Root).where(Root.name == root_name))
        if root is None:
            raise CommitError(f"no root named {root_name!r}; add one with `munet root add`")
        existing = s.scalar(select(Task).where(Task.name == name))
        if existing is not None:
            raise CommitError(f"a task named {name!r} exists already")
        task = Task(name=name, root_id=root.id, dataset_digest=dataset["digest"], classes=list(dataset["classes"]),
                    n_train=dataset["n_train"], n_test=dataset["n_test"], image_shape=list(dataset["image_shape"]),
                    val_fraction=val_fraction, split_seed=split_seed, status="queued")
        s.add(task)
    return task


def commit_path(Session: sessionmaker[Session], store: LayerStore, record: PathRecord,
                new_components: list[NewComponent], *, lease_token: int | None = None,
                reason: str = "evolved", lock: bool = True, candidate_id: int | None = None,
                live_score: tuple[str, float] | None = None) -> CommitResult:
    """Commit a path of `record.task`; move the live pointer only to a higher score.

    `lease_token` fences out a worker whose lease expired and was claimed by another.
    `lock=False` moves the pointer without locking (a visit still running locks at its end).
    `live_score`: (path id, score) of the live path as the caller rescored it; it replaces
    the stored score while that path is still live, because a stored score counted its
    layers' sharers at its own commit and other tasks have moved since.
    """
    digests = _store_components(store, new_components)
    probe_hash = store.put(record.probe) if record.probe else None
    fault_point("after_blobs")
    with Session.begin() as s:
        task = s.scalar(select(Task).where(Task.name == record.task).with_for_update())
        if task is None or task.status == "deleted":
            raise CommitError(f"task {record.task!r} does not exist")
        if lease_token is not None and task.lease_token != lease_token:
            raise LeaseLost(f"lease of task {task.name!r} was taken over (token {lease_token} is stale)")
        known = set(s.scalars(select(Component.id).where(Component.id.in_(record.component_ids))))
        new_ids = {c.id for c in new_components}
        missing = set(record.component_ids) - known - new_ids
        if missing:
            raise CommitError(f"path references unknown components: {sorted(missing)[:3]}")
        s.add(_path_row(record, task.id, probe_hash))
        s.flush()
        s.add_all(_component_row(c, digests[c.id], record.root_id, task.id, record.id) for c in new_components)
        s.flush()
        s.add_all(PathComponent(path_id=record.id, position=i, component_id=cid)
                  for i, cid in enumerate(record.component_ids))
        fault_point("in_transaction")
        previous = task.live_path_id
        live = s.get(PathRow, previous) if previous else None
        current = live.score if live else None
        if live is not None and live_score and live_score[0] == live.id:
            current = live_score[1]
        moved = live is None or (not task.pinned and (record.score or 0.0) > (current or 0.0))
        if moved:
            _move_live(s, task, record.id, record.score, reason)
            if lock:
                _lock(s, task.name, record.component_ids)
        if candidate_id is not None:
            s.execute(update(CandidateRow).where(CandidateRow.id == candidate_id).values(path_id=record.id))
    fault_point("after_commit")
    return CommitResult(record.id, moved, previous, record.score)


def _move_live(s: Session, task: Task, path_id: str, score: float | None, reason: str) -> None:
    s.add(LiveHistory(task_id=task.id, path_id=path_id, previous_path_id=task.live_path_id, score=score, reason=reason))
    task.live_path_id = path_id
    task.last_improvement_at = utcnow()
    if task.status == "queued":
        task.status = "ready"


def _lock(s: Session, task_name: str, component_ids: list[str]) -> None:
    held = set(s.scalars(select(ComponentLock.component_id).where(
        ComponentLock.lock == task_name, ComponentLock.component_id.in_(component_ids))))
    s.add_all(ComponentLock(component_id=cid, lock=task_name) for cid in dict.fromkeys(component_ids) if cid not in held)


def release_locks(Session: sessionmaker[Session], task_name: str) -> None:
    """A visit starts by freeing the task's own locks (MUNET.md §5.1)."""
    with Session.begin() as s:
        for lock in s.scalars(select(ComponentLock).where(ComponentLock.lock == task_name)):
            s.delete(lock)


def lock_live(Session: sessionmaker[Session], task_name: str) -> None:
    """A visit ends by locking its live path's components with the task's name."""
    with Session.begin() as s:
        task = s.scalar(select(Task).where(Task.name == task_name))
        if task and task.live_path_id:
            ids = list(s.scalars(select(PathComponent.component_id).where(PathComponent.path_id == task.live_path_id)))
            _lock(s, task_name, ids)


def set_pin(Session: sessionmaker[Session], task_name: str, path_id: str | None) -> None:
    """Pin a task to one of its recorded paths (rollback), or unpin it (path_id None)."""
    with Session.begin() as s:
        task = s.scalar(select(Task).where(Task.name == task_name).with_for_update())
        if task is None:
            raise CommitError(f"no task named {task_name!r}")
        if path_id is None:
            task.pinned = False
            return
        path = s.get(PathRow, path_id)
        if path is None or path.task_id != task.id:
            raise CommitError(f"path {path_id} is not a path of task {task_name!r}")
        if task.live_path_id != path_id:
            _move_live(s, task, path_id, path.score, "pinned")
            _lock(s, task.name, list(s.scalars(select(PathComponent.component_id).where(PathComponent.path_id == path_id))))
        task.pinned = True
