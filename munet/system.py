"""The glue between `models` and `storage`: one handle on a munet installation.

Both the evolver and the server load paths through `System.load_path`, so a component is
always rebuilt the same way: the family builds the module, the store's verified blob
fills it with `strict=True`.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path as FilePath
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from munet.settings import Settings
from munet.storage import blobs, commit, datasets, db, lineage, signals
from munet.storage.schema import Candidate, Component, PathRow, Root, Task, validate_task_name

if TYPE_CHECKING:
    from torch import nn

    from munet import models


def _models():
    # torch and timm are imported on first use: the HTTP gateway holds a System for task
    # submission, status and lineage, and never builds a module (~700 MB less resident).
    from munet import models

    return models


class System:
    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings.from_env()
        self.engine = db.make_engine(self.settings.db_url)
        self.Session = db.sessions(self.engine)
        self.ReadSession = db.read_sessions(self.engine)
        self.store = blobs.LayerStore(self.settings.store_url)

    # -- setup -----------------------------------------------------------------
    def init(self) -> None:
        FilePath(self.settings.home).mkdir(parents=True, exist_ok=True)
        for url in (self.settings.store_url, self.settings.data_url):
            if "://" not in url:
                FilePath(url).mkdir(parents=True, exist_ok=True)
        db.upgrade(self.engine)

    def add_root(self, name: str, timm_name: str, weights: str = "packaged", model_kwargs: dict | None = None) -> Root:
        models = _models()
        model = models.load_root_model(timm_name, weights, model_kwargs)
        config, parts = models.decompose(model, timm_name, model_kwargs)
        components = [commit.NewComponent(name=n, meta=meta, tensors=dict(m.state_dict()),
                                          num_params=models.count_params(m)) for n, meta, m in parts]
        return commit.add_root(self.Session, self.store, name, timm_name, weights, config, components)

    def add_task(self, name: str, data, root: str | None = None, filename: str | None = None) -> Task:
        commit_root = root or self.default_root()
        validate_task_name(name)
        with self.Session() as s:
            if s.scalar(select(Task).where(Task.name == name)):
                raise commit.CommitError(f"a task named {name!r} exists already")
            # Checked before ingesting, so a bad root name stores no data set.
            if s.scalar(select(Root).where(Root.name == commit_root)) is None:
                raise commit.CommitError(f"no root named {commit_root!r}; add one with `munet root add`")
        info = datasets.ingest(data, self.settings.data_url, filename=filename)
        task = commit.add_task(self.Session, name, commit_root, info.to_json())
        signals.publish(self.settings.redis_url, signals.TASKS, {"task": name})
        return task

    def default_root(self) -> str:
        with self.Session() as s:
            names = list(s.scalars(select(Root.name).order_by(Root.id)))
        if not names:
            raise commit.CommitError("no root yet: run `munet root add NAME --timm tf_efficientnet_lite0 --weights packaged`")
        return names[0]

    # -- loading ---------------------------------------------------------------
    def root(self, root_id: int) -> Root:
        with self.Session() as s:
            return s.get(Root, root_id)

    def build_component(self, row: Component, config: dict) -> nn.Module:
        # Built on the meta device and given the stored tensors themselves (assign): no
        # initialised weights to copy over, no full-model skeleton resident in every process.
        import torch

        family = _models().family_for(config["timm"])
        with torch.device("meta"):
            module = family.build(config, row.name, row.meta)
        module.load_state_dict(self.store.get(row.blob_hash), strict=True, assign=True)
        if any(t.is_meta for t in (*module.parameters(), *module.buffers())):  # a buffer outside the state dict
            module = family.build(config, row.name, row.meta)
            module.load_state_dict(self.store.get(row.blob_hash), strict=True)
        return module.eval().requires_grad_(False)

    def load_path(self, path_id: str, cache: dict[str, nn.Module] | None = None) -> tuple[models.Path, PathRow]:
        """A runnable path; components found in `cache` (keyed by component id) are reused."""
        cache = {} if cache is None else cache
        with self.Session() as s:
            path = s.get(PathRow, path_id)
            if path is None:
                raise KeyError(f"no path {path_id}")
            root = s.get(Root, path.root_id)
            task = s.get(Task, path.task_id) if path.task_id else None
            ids = lineage.path_component_ids(s, path_id)
            rows = {c.id: c for c in s.scalars(select(Component).where(Component.id.in_(ids)))}
        for cid in ids:
            if cid not in cache:
                cache[cid] = self.build_component(rows[cid], root.config)
        runnable = _models().Path(ids=ids, names=[rows[c].name for c in ids], modules=[cache[c] for c in ids],
                               image_size=path.image_size, mean=tuple(root.config["mean"]), std=tuple(root.config["std"]),
                               classes=list(task.classes) if task else [])
        return runnable, path

    def dataset(self, task: Task) -> dict:
        return datasets.load(self.settings.data_url, task.dataset_digest)

    # -- views -----------------------------------------------------------------
    def task_json(self, name: str) -> dict:
        with self.ReadSession() as s:
            task = s.scalar(select(Task).where(Task.name == name))
            if task is None:
                raise KeyError(f"no task named {name!r}")
            return task_view(s, task)

    def tasks_json(self) -> list[dict]:
        with self.ReadSession() as s:
            return [task_view(s, t) for t in lineage.active_tasks(s)]

    def system_json(self) -> dict:
        with self.ReadSession() as s:
            return lineage.system_summary(s)


def _iso(t: dt.datetime | None) -> str | None:
    return t.replace(tzinfo=dt.timezone.utc).isoformat() if t else None


def task_view(s, task: Task) -> dict:
    """The one JSON shape of a task (CLI --json, HTTP, web page)."""
    live = s.get(PathRow, task.live_path_id) if task.live_path_id else None
    root = s.get(Root, task.root_id)
    tried = s.scalar(select(func.count()).select_from(Candidate).where(Candidate.task_id == task.id))
    return {
        "name": task.name,
        "status": task.status,
        "root": root.name if root else None,
        "classes": task.classes,
        "n_train": task.n_train,
        "n_test": task.n_test,
        "val_fraction": task.val_fraction,  # of n_train, carved out for validation (storage.commit.default_val_fraction)
        "dataset": task.dataset_digest,
        "live_path": None if live is None else {
            "id": live.id, "score": live.score, "val_acc": live.val_acc, "test_acc": live.test_acc,
            "accounted_params": live.accounted_params, "image_size": live.image_size, "flops": live.flops,
            "hparams": live.hparams, "train_examples": live.train_examples, "train_seconds": live.train_seconds,
        },
        "pinned": task.pinned,
        "visits": task.visits,
        "candidates_tried": int(tried or 0),
        "last_improvement": _iso(task.last_improvement_at),
        "created_at": _iso(task.created_at),
        "error": task.error,
    }
