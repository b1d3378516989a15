"""Immunity, the product's central promise (issue 6): evolving one task never changes
another. Three tasks are evolved in turn for several visits with the real muNet visit on
PostgreSQL; after every commit of any task, every other task's logits on a fixed probe
set are bit-identical to what they were, whether its path is built fresh from the store
or from the evolver's own in-memory modules (which training must not have touched), the
store's blobs of its components are byte-identical, and no task's live validation score
ever went down."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from munet.evolver.train import PrefixCache, logits
from munet.evolver.visit import Visit
from munet.storage import lineage
from munet.storage.schema import Component, LiveHistory, PathRow, Task
from munet.system import System

from conftest import make_settings
from evolver_support import digits_npz, tiny_config
from server_support import task_images

TASKS = ["ta", "tb", "tc"]
ROUNDS = 2


class Snapshot:
    """What another task must keep: its live path, probe logits and component bytes."""

    def __init__(self, system: System, task: str, probe: torch.Tensor):
        self.task, self.probe = task, probe
        with system.Session() as s:
            t = s.scalar(select(Task).where(Task.name == task))
            self.path_id, self.val_acc = t.live_path_id, s.get(PathRow, t.live_path_id).val_acc
            ids = lineage.path_component_ids(s, self.path_id)
            self.blobs = {c.id: c.blob_hash for c in s.scalars(select(Component).where(Component.id.in_(ids)))}
        self.bytes = {h: _blob_bytes(system, h) for h in set(self.blobs.values())}
        self.logits = _logits(system, self.path_id, probe, cache={})


def _blob_bytes(system: System, digest: str) -> bytes:
    return system.store.fs.cat_file(system.store.path(digest))


def _logits(system: System, path_id: str, x: torch.Tensor, cache: dict) -> torch.Tensor:
    path, _ = system.load_path(path_id, cache=cache)
    return logits(path.modules, x, path.image_size, path.mean, path.std, 64, "cpu")


class CheckedVisit(Visit):
    """The real visit; after each of its commits, every other task is checked."""

    check = None

    def _commit(self, entry, reason: str, lock: bool):
        res = super()._commit(entry, reason, lock)
        type(self).check(self, res)
        return res


@pytest.fixture
def one_thread():
    """Bit-identical comparisons need one fixed reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_evolving_three_tasks_never_changes_another_tasks_outputs_or_blobs(pg_url, tmp_path, one_thread):
    system = System(make_settings(tmp_path, pg_url))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    for i, name in enumerate(TASKS):
        system.add_task(name, str(digits_npz(tmp_path / f"{name}.npz", n_train=150, n_test=40, offset=3 * i)))
    probes = {n: task_images(system, n, n=16) for n in TASKS}
    snapshots: dict[str, Snapshot] = {}
    best_val: dict[str, float] = {}
    commits: list[tuple[str, bool]] = []
    compared: list[int] = []  # per commit: how many other tasks were checked

    def check(visit: Visit, res) -> None:
        commits.append((visit.task_name, res.moved))
        checked = 0
        for other, snap in snapshots.items():
            if other == visit.task_name:
                continue
            assert system.task_json(other)["live_path"]["id"] == snap.path_id, f"{visit.task_name} moved {other}"
            for digest, data in snap.bytes.items():
                assert _blob_bytes(system, digest) == data, f"a blob of {other} changed"
            fresh = _logits(system, snap.path_id, snap.probe, cache={})
            assert torch.equal(fresh, snap.logits), f"{other}'s logits changed after a commit of {visit.task_name}"
            in_memory = _logits(system, snap.path_id, snap.probe, cache=dict(visit.modules))
            assert torch.equal(in_memory, snap.logits), f"training {visit.task_name} changed a module {other} uses"
            checked += 1
        compared.append(checked)
        live = system.task_json(visit.task_name)["live_path"]
        assert live["val_acc"] >= best_val.get(visit.task_name, 0.0), "a live validation score went down"
        best_val[visit.task_name] = live["val_acc"]

    CheckedVisit.check = check
    cfg = tiny_config(generations=2, candidates=2)
    cache, modules = PrefixCache(cfg.prefix_cache_bytes), {}
    for _ in range(ROUNDS):
        for name in TASKS:
            CheckedVisit(system, name, cfg, cache=cache, modules=modules, progress=False).run()
            snapshots[name] = Snapshot(system, name, probes[name])  # its new state is what others must keep
    assert {t for t, moved in commits if moved} == set(TASKS), commits
    # Not vacuous: commits were checked against other tasks, including once all three had paths.
    assert sum(compared) >= 4 and max(compared) == len(TASKS) - 1, compared
    with system.Session() as s:
        for t in s.scalars(select(Task)):
            history = list(s.scalars(select(LiveHistory).where(LiveHistory.task_id == t.id).order_by(LiveHistory.id)))
            scores = [h.score for h in history]
            assert scores == sorted(scores) and len(set(scores)) == len(scores), (t.name, scores)
            assert [h.previous_path_id for h in history] == [None] + [h.path_id for h in history[:-1]]
            assert history[-1].path_id == t.live_path_id
    system.engine.dispose()
