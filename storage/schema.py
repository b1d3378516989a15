"""The SQL schema: roots, tasks, components and their locks, paths, the live-pointer
history, candidates and visits. Every time is naive UTC."""
from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

TASK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TASK_STATUSES = ("queued", "evolving", "ready", "failed", "deleted")
ROOT_LOCK = "ROOT"


def validate_task_name(name: str) -> str:
    """The one rule for task names (DESIGN.md): lowercase letters, digits, '_' and '-',
    starting with a letter or digit, at most 63 characters. Safe in paths, URLs and SQL."""
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        raise ValueError(
            f"invalid task name {name!r}: use 1-63 characters from a-z, 0-9, '_' and '-', starting with a letter or digit"
        )
    return name


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def new_id() -> str:
    return uuid.uuid4().hex


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Root(Base):
    __tablename__ = "roots"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    timm_name: Mapped[str] = mapped_column(String(200))
    family: Mapped[str] = mapped_column(String(40))
    weights: Mapped[str] = mapped_column(String(400))
    config: Mapped[dict[str, Any]]
    root_params: Mapped[int] = mapped_column(Integer)  # excludes the root's own head
    total_params: Mapped[int] = mapped_column(Integer)
    root_path_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("paths.id", use_alter=True, name="fk_root_path"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Task(Base):
    __tablename__ = "tasks"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    root_id: Mapped[int] = mapped_column(ForeignKey("roots.id"))
    dataset_digest: Mapped[str] = mapped_column(String(64))
    classes: Mapped[list[Any]]
    n_train: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)
    image_shape: Mapped[list[Any]]
    val_fraction: Mapped[float] = mapped_column(Float, default=0.1)
    split_seed: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    live_path_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("paths.id", use_alter=True, name="fk_task_live_path"))
    pinned: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_until: Mapped[dt.datetime | None] = mapped_column(DateTime)
    lease_token: Mapped[int] = mapped_column(Integer, default=0)  # fencing token, bumped per claim
    visits: Mapped[int] = mapped_column(Integer, default=0)
    candidates_tried: Mapped[int] = mapped_column(Integer, default=0)
    last_improvement_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Component(Base):
    __tablename__ = "components"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    root_id: Mapped[int] = mapped_column(ForeignKey("roots.id"))
    name: Mapped[str] = mapped_column(String(100))
    meta: Mapped[dict[str, Any]]
    shapes: Mapped[dict[str, Any]]
    num_params: Mapped[int] = mapped_column(Integer)
    blob_hash: Mapped[str] = mapped_column(String(64), index=True)
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("components.id"))
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"))
    path_id: Mapped[str | None] = mapped_column(String(32), ForeignKey("paths.id", use_alter=True, name="fk_component_path"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class ComponentLock(Base):
    __tablename__ = "component_locks"
    component_id: Mapped[str] = mapped_column(ForeignKey("components.id"), primary_key=True)
    lock: Mapped[str] = mapped_column(String(63), primary_key=True)  # a task name or ROOT


class PathRow(Base):
    __tablename__ = "paths"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    task_id: Mapped[int | None] = mapped_column(ForeignKey("tasks.id"), index=True)  # None: a root path
    root_id: Mapped[int] = mapped_column(ForeignKey("roots.id"))
    parent_id: Mapped[str | None] = mapped_column(ForeignKey("paths.id"))
    hparams: Mapped[dict[str, Any]]
    image_size: Mapped[int] = mapped_column(Integer)
    val_acc: Mapped[float | None] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float)
    test_acc: Mapped[float | None] = mapped_column(Float)
    accounted_params: Mapped[float | None] = mapped_column(Float)
    flops: Mapped[float | None] = mapped_column(Float)
    train_examples: Mapped[int] = mapped_column(Integer, default=0)
    train_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    probe_hash: Mapped[str | None] = mapped_column(String(64))  # inputs + logits the server checks before a swap
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class PathComponent(Base):
    __tablename__ = "path_components"
    path_id: Mapped[str] = mapped_column(ForeignKey("paths.id"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    component_id: Mapped[str] = mapped_column(ForeignKey("components.id"), index=True)


class LiveHistory(Base):
    """Append-only: every move of a task's live pointer."""

    __tablename__ = "live_history"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    path_id: Mapped[str] = mapped_column(ForeignKey("paths.id"))
    previous_path_id: Mapped[str | None] = mapped_column(ForeignKey("paths.id"))
    score: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str] = mapped_column(String(200))
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Visit(Base):
    __tablename__ = "visits"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    worker: Mapped[str] = mapped_column(String(200))
    lease_token: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    outcome: Mapped[str | None] = mapped_column(String(40))
    best_score: Mapped[float | None] = mapped_column(Float)


class Candidate(Base):
    """Every candidate tried, kept or not (losers write no tensors)."""

    __tablename__ = "candidates"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id"), index=True)
    visit_id: Mapped[int | None] = mapped_column(ForeignKey("visits.id"))
    parent_path_id: Mapped[str | None] = mapped_column(ForeignKey("paths.id"))
    path_id: Mapped[str | None] = mapped_column(ForeignKey("paths.id"))
    generation: Mapped[int] = mapped_column(Integer, default=0)
    mutations: Mapped[list[Any]]
    hparams: Mapped[dict[str, Any]]
    val_curve: Mapped[list[Any]]
    val_acc: Mapped[float | None] = mapped_column(Float)
    score: Mapped[float | None] = mapped_column(Float)
    accounted_params: Mapped[float | None] = mapped_column(Float)
    examples: Mapped[int] = mapped_column(Integer, default=0)
    seconds: Mapped[float] = mapped_column(Float, default=0.0)
    outcome: Mapped[str] = mapped_column(String(40))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
