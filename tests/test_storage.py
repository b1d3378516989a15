"""The layer store and the metadata: atomic, verified blobs; the commit protocol (live
pointer only moves up, every move recorded, fencing); pins; lineage queries; the system
summary; garbage collection; and the same results on SQLite and PostgreSQL.

Tests taking the `system` fixture run twice, on SQLite and on a fresh PostgreSQL database.
Paths are made by hand on a tiny random ViT root so that every test stays quick.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, select, update

from conftest import make_settings
from munet.evolver.train import split_indices
from munet.storage import commit, gc, lineage
from munet.storage.blobs import BlobError, LayerStore
from munet.storage.commit import CommitError, LeaseLost, NewComponent, PathRecord
from munet.storage.schema import (ROOT_LOCK, Base, Candidate, Component, LiveHistory, PathComponent, PathRow,
                                  Root, Task)
from munet.system import System

VIT = "vit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2, "num_classes": 10}
DIM = TINY["embed_dim"]


# -- helpers ------------------------------------------------------------------------------

def tiny_root(system: System, name: str = "tiny") -> Root:
    torch.manual_seed(0)
    return system.add_root(name, VIT, "random", TINY)


def root_ids(system: System, root: Root) -> dict[str, str]:
    """{component name: id} of a root path."""
    with system.Session() as s:
        ids = lineage.path_component_ids(s, root.root_path_id)
        names = dict(s.execute(select(Component.id, Component.name).where(Component.id.in_(ids))).all())
    return {names[i]: i for i in ids}


def add_task(system: System, name: str, root: str = "tiny", classes: int = 3, n_train: int = 30, **kw) -> Task:
    dataset = {"digest": hashlib.sha256(name.encode()).hexdigest(), "classes": [f"c{i}" for i in range(classes)],
               "n_train": n_train, "n_test": 9, "image_shape": [8, 8, 1]}
    return commit.add_task(system.Session, name, root, dataset, **kw)


def new_head(classes: int, seed: int) -> NewComponent:
    g = torch.Generator().manual_seed(seed)
    return NewComponent(name="head", meta={"num_classes": classes}, num_params=classes * (DIM + 1),
                        tensors={"fc.weight": torch.randn(classes, DIM, generator=g), "fc.bias": torch.randn(classes, generator=g)})


def clone_of(system: System, component_id: str, seed: int) -> NewComponent:
    """A trained-looking clone of a stored component (same shapes, other values)."""
    with system.Session() as s:
        row = s.get(Component, component_id)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in system.store.get(row.blob_hash).items()}
    return NewComponent(name=row.name, meta=row.meta, tensors=tensors, parent_id=row.id, num_params=row.num_params)


def make_path(system: System, root: Root, task: str, score: float | None, *, seed: int = 0, classes: int = 3,
              parent_id: str | None = None, use: dict[str, str] | None = None, clone: tuple[str, ...] = (),
              probe: bool = False) -> tuple[PathRecord, list[NewComponent]]:
    """A path of `task`: the root's components with a new head, `use` overriding some by id,
    and fresh clones of the root's components named in `clone`."""
    ids = root_ids(system, root)
    head = new_head(classes, seed)
    new = [head]
    ids["head"] = head.id
    for name in clone:
        c = clone_of(system, ids[name], seed)
        new.append(c)
        ids[name] = c.id
    ids.update(use or {})
    record = PathRecord(task=task, root_id=root.id, component_ids=list(ids.values()), hparams={"seed": seed},
                        image_size=32, parent_id=parent_id if parent_id is not None else root.root_path_id,
                        val_acc=score, score=score, accounted_params=1.0,
                        probe={"inputs": torch.full((1, 3, 32, 32), float(seed)), "logits": torch.zeros(1, classes)}
                        if probe else None)
    return record, new


def commit_path(system: System, root: Root, task: str, score: float | None, **kw) -> commit.CommitResult:
    record, new = make_path(system, root, task, score, **kw)
    return commit.commit_path(system.Session, system.store, record, new)


def count(system: System, model) -> int:
    with system.Session() as s:
        return int(s.scalar(select(func.count()).select_from(model)))


def live_path_id(system: System, task: str) -> str | None:
    with system.Session() as s:
        return s.scalar(select(Task.live_path_id).where(Task.name == task))


def history(system: System, task: str) -> list[LiveHistory]:
    with system.Session() as s:
        task_id = s.scalar(select(Task.id).where(Task.name == task))
        return lineage.live_history(s, task_id)


# -- schema -------------------------------------------------------------------------------

def test_migration_creates_exactly_the_models_schema(system):
    with system.engine.connect() as conn:
        diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diffs == []


def test_init_twice_is_harmless(system):
    root = tiny_root(system)
    system.init()
    assert count(system, Root) == 1 and system.root(root.id).name == "tiny"


# -- the layer store ------------------------------------------------------------------------

def test_blob_put_is_content_addressed_and_idempotent(tmp_path):
    store = LayerStore(str(tmp_path / "layers"))
    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}
    digest = store.put(tensors)
    assert store.put(dict(reversed(tensors.items()))) == digest
    assert list(store.digests()) == [digest]
    assert hashlib.sha256(store.read_bytes(digest)).hexdigest() == digest
    back = store.get(digest)
    assert set(back) == {"a", "b"} and all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_store_get_verifies_the_hash(tmp_path):
    store = LayerStore(str(tmp_path / "layers"))
    digest = store.put({"w": torch.randn(64, 64)})
    file = Path(store.path(digest))
    data = bytearray(file.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit pattern in the tensor data: still parses, wrong hash
    file.write_bytes(bytes(data))
    with pytest.raises(BlobError, match="does not match its hash"):
        store.get(digest)
    file.unlink()
    with pytest.raises(BlobError, match="missing"):
        store.get(digest)


def test_store_never_unpickles_a_blob(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(str(marker)))
    store = LayerStore(str(tmp_path / "layers"))
    digest = hashlib.sha256(payload).hexdigest()
    Path(store.path(digest)).parent.mkdir(parents=True)
    Path(store.path(digest)).write_bytes(payload)  # the right name for its bytes: the hash check passes
    with pytest.raises(Exception):
        store.get(digest)
    assert not marker.exists()


class _Evil:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_corrupt_blob_fails_loading_a_path(system):
    root = tiny_root(system)
    with system.Session() as s:
        digest = s.scalar(select(Component.blob_hash).where(Component.root_id == root.id, Component.name == "blocks.0"))
    file = Path(system.store.path(digest))
    file.write_bytes(file.read_bytes()[:-1] + b"\x00")
    with pytest.raises(BlobError):
        system.load_path(root.root_path_id, cache={})


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import torch
    from munet.storage.blobs import LayerStore

    store, point = LayerStore(sys.argv[1]), sys.argv[2]
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def write(fd, data):
        if point == "write":
            real_write(fd, bytes(memoryview(data)[: len(data) // 2]))
            die()
        return real_write(fd, data)

    def fsync(fd):
        if point == "fsync":
            die()
        return real_fsync(fd)

    def replace(src, dst):
        if point == "rename":
            die()
        return real_replace(src, dst)

    os.write, os.fsync, os.replace = write, fsync, replace
    store.put({"w": torch.arange(1 << 20, dtype=torch.float32)})
    print("not killed")
""")


@pytest.mark.parametrize("point", ["write", "fsync", "rename"])
def test_writer_killed_mid_write_leaves_no_visible_partial_blob(tmp_path, point):
    url = str(tmp_path / "layers")
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, url, point], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    leftovers = [p for p in (tmp_path / "layers").rglob("*") if p.is_file()]
    assert leftovers and all(p.name.startswith(".tmp-") for p in leftovers)  # it died holding a temp file
    if point == "write":
        assert leftovers[0].stat().st_size < 4 << 20  # and only part of the data was written
    tensors = {"w": torch.arange(1 << 20, dtype=torch.float32)}
    digest = LayerStore(str(tmp_path / "reference")).put(tensors)
    store = LayerStore(url)
    assert store.digests() == {}
    assert not store.exists(digest)
    with pytest.raises(BlobError):
        store.get(digest)
    # The next writer is not confused by the leftover.
    assert store.put(tensors) == digest
    assert torch.equal(store.get(digest)["w"], tensors["w"])


# -- roots ----------------------------------------------------------------------------------

def test_add_root_records_locked_components_and_a_root_path(system):
    root = tiny_root(system)
    ids = root_ids(system, root)
    assert list(ids) == ["stem", "cls_token", "pos_embed@32", "blocks.0", "blocks.1", "final_norm", "head"]
    with system.Session() as s:
        locks = lineage.locks(s, list(ids.values()))
        params = dict(s.execute(select(Component.name, Component.num_params).where(Component.root_id == root.id)).all())
    assert all(locks[i] == {ROOT_LOCK} for i in ids.values())
    assert root.total_params == sum(params.values())
    assert root.root_params == root.total_params - params["head"] == root.total_params - 10 * (DIM + 1)
    with pytest.raises(CommitError, match="exists already"):
        tiny_root(system)


def test_a_small_task_validates_on_500_images_up_to_a_quarter_of_its_training_set(system):
    tiny_root(system)
    cases = {"big": (5000, 0.1), "elpv_sized": (1970, 0.25), "middle": (2500, 0.2), "tiny": (30, 0.25)}
    for name, (n_train, _) in cases.items():
        add_task(system, name, n_train=n_train)
    add_task(system, "chosen", n_train=1970, val_fraction=0.1)
    with system.Session() as s:
        fractions = dict(s.execute(select(Task.name, Task.val_fraction)).all())
    assert fractions == {**{name: f for name, (_, f) in cases.items()}, "chosen": 0.1}
    # The stratified split the evolver carves holds that many images.
    y = np.arange(2500) % 5
    assert len(split_indices(y, fractions["middle"], seed=0)[1]) == 500


# -- the commit protocol ---------------------------------------------------------------------

def test_first_path_of_a_task_goes_live_whatever_its_score(system):
    root = tiny_root(system)
    add_task(system, "a")
    result = commit_path(system, root, "a", 0.0)
    assert result.moved and result.previous_path_id is None
    assert live_path_id(system, "a") == result.path_id
    with system.Session() as s:
        assert s.scalar(select(Task.status).where(Task.name == "a")) == "ready"


def test_live_pointer_moves_only_to_a_higher_score_and_records_every_move(system):
    root = tiny_root(system)
    add_task(system, "a")
    outcomes = []
    for seed, score in enumerate([0.50, 0.40, 0.50, 0.70, 0.69, 0.70, 0.71]):
        r = commit_path(system, root, "a", score, seed=seed)
        outcomes.append((score, r.moved, r.path_id))
    assert [moved for _, moved, _ in outcomes] == [True, False, False, True, False, False, True]
    moves = [(score, pid) for score, moved, pid in outcomes if moved]
    hist = history(system, "a")
    assert [(h.score, h.path_id) for h in hist] == moves
    assert [h.previous_path_id for h in hist] == [None, moves[0][1], moves[1][1]]
    assert all(b.score > a.score for a, b in zip(hist, hist[1:]))
    assert live_path_id(system, "a") == moves[-1][1]
    # Paths that lost are still recorded (lineage), just not live.
    assert count(system, PathRow) == 1 + len(outcomes)


def test_losing_path_is_never_locked_and_winner_is(system):
    root = tiny_root(system)
    add_task(system, "a")
    win = commit_path(system, root, "a", 0.6, seed=1, clone=("blocks.1",))
    lose = commit_path(system, root, "a", 0.5, seed=2, clone=("blocks.0",))
    with system.Session() as s:
        win_ids = lineage.path_component_ids(s, win.path_id)
        lose_ids = set(lineage.path_component_ids(s, lose.path_id)) - set(win_ids)
        locks = lineage.locks(s, win_ids + list(lose_ids))
    assert all("a" in locks[c] for c in win_ids)
    assert all("a" not in locks.get(c, set()) for c in lose_ids)


def test_a_rescored_live_score_replaces_the_stored_one_only_while_that_path_is_live(system):
    root = tiny_root(system)
    add_task(system, "a")
    first = commit_path(system, root, "a", 0.8, seed=1)
    record, new = make_path(system, root, "a", 0.7, seed=2)
    assert not commit.commit_path(system.Session, system.store, record, new).moved  # 0.7 < stored 0.8
    record, new = make_path(system, root, "a", 0.7, seed=3)  # the caller rescored the live path at 0.6
    second = commit.commit_path(system.Session, system.store, record, new, live_score=(first.path_id, 0.6))
    assert second.moved
    # A rescore of a path that is no longer live changes nothing: the new live's stored 0.7 holds.
    record, new = make_path(system, root, "a", 0.65, seed=4)
    assert not commit.commit_path(system.Session, system.store, record, new, live_score=(first.path_id, 0.1)).moved
    assert live_path_id(system, "a") == second.path_id


def test_stale_lease_token_raises_lease_lost_and_writes_nothing(system):
    root = tiny_root(system)
    add_task(system, "a")
    first = commit_path(system, root, "a", 0.5, seed=1)
    with system.Session.begin() as s:
        s.execute(update(Task).where(Task.name == "a").values(lease_token=7, lease_owner="worker-2"))
    before = (count(system, PathRow), count(system, Component), count(system, PathComponent), count(system, LiveHistory))
    record, new = make_path(system, root, "a", 0.9, seed=2)
    with pytest.raises(LeaseLost):
        commit.commit_path(system.Session, system.store, record, new, lease_token=6)
    after = (count(system, PathRow), count(system, Component), count(system, PathComponent), count(system, LiveHistory))
    assert after == before
    assert live_path_id(system, "a") == first.path_id
    # The holder of the current token commits.
    record, new = make_path(system, root, "a", 0.9, seed=3)
    assert commit.commit_path(system.Session, system.store, record, new, lease_token=7).moved


def test_commit_rejects_unknown_components_and_unknown_tasks(system):
    root = tiny_root(system)
    add_task(system, "a")
    record, new = make_path(system, root, "a", 0.5, use={"blocks.0": "f" * 32})
    with pytest.raises(CommitError, match="unknown components"):
        commit.commit_path(system.Session, system.store, record, new)
    record, new = make_path(system, root, "nosuch", 0.5)
    with pytest.raises(CommitError, match="does not exist"):
        commit.commit_path(system.Session, system.store, record, new)
    assert count(system, PathRow) == 1 and live_path_id(system, "a") is None


def test_concurrent_commits_leave_the_best_path_live(system):
    root = tiny_root(system)
    add_task(system, "a")
    scores = [0.31, 0.77, 0.52, 0.64, 0.45, 0.71, 0.58, 0.69]
    prepared = [make_path(system, root, "a", sc, seed=i) for i, sc in enumerate(scores)]
    errors = []

    def work(record, new):
        try:
            commit.commit_path(system.Session, system.store, record, new)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=p) for p in prepared]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    with system.Session() as s:
        live = s.get(PathRow, live_path_id(system, "a"))
    assert live.score == max(scores)
    hist = history(system, "a")
    assert all(b.score > a.score for a, b in zip(hist, hist[1:]))
    assert hist[-1].path_id == live.id


# -- pins ---------------------------------------------------------------------------------------

def test_pin_rolls_back_and_holds_until_unpinned(system):
    root = tiny_root(system)
    add_task(system, "a")
    add_task(system, "b")
    old = commit_path(system, root, "a", 0.5, seed=1)
    new = commit_path(system, root, "a", 0.6, seed=2)
    other = commit_path(system, root, "b", 0.9, seed=3)
    commit.set_pin(system.Session, "a", old.path_id)
    assert live_path_id(system, "a") == old.path_id
    assert history(system, "a")[-1].reason == "pinned"
    assert not commit_path(system, root, "a", 0.99, seed=4).moved
    assert live_path_id(system, "a") == old.path_id
    with pytest.raises(CommitError, match="not a path of task"):
        commit.set_pin(system.Session, "a", other.path_id)
    with pytest.raises(CommitError, match="no task"):
        commit.set_pin(system.Session, "zz", old.path_id)
    commit.set_pin(system.Session, "a", None)
    assert live_path_id(system, "a") == old.path_id
    # After unpinning, a path must beat the live (rolled-back) score to move.
    assert commit_path(system, root, "a", 0.55, seed=5).moved
    assert new.path_id != live_path_id(system, "a")


# -- lineage and the summary -------------------------------------------------------------------

def two_tasks(system: System):
    """a: root + its head + a clone of blocks.1; b: child of a's path, shares a's clone."""
    root = tiny_root(system)
    add_task(system, "a")
    add_task(system, "b", classes=4)
    ra = commit_path(system, root, "a", 0.8, seed=1, clone=("blocks.1",), probe=True)
    ids_a = dict(zip(["stem", "cls_token", "pos_embed@32", "blocks.0", "blocks.1", "final_norm", "head"],
                     path_ids(system, ra.path_id)))
    rb = commit_path(system, root, "b", 0.7, seed=2, classes=4, parent_id=ra.path_id, use={"blocks.1": ids_a["blocks.1"]})
    return root, ra, rb, ids_a


def path_ids(system: System, path_id: str) -> list[str]:
    with system.Session() as s:
        return lineage.path_component_ids(s, path_id)


def test_lineage_ancestry_origin_and_shared_components(system):
    root, ra, rb, ids_a = two_tasks(system)
    rids = root_ids(system, root)
    with system.Session() as s:
        assert [p.id for p in lineage.ancestry(s, rb.path_id)] == [rb.path_id, ra.path_id, root.root_path_id]
        origin = lineage.component_origin(s, ids_a["blocks.1"])
        assert origin["created_by"] == "a" and origin["created_in_path"] == ra.path_id
        assert origin["cloned_from"] == [rids["blocks.1"]]
        assert origin["used_by"] == ["a", "b"]
        root_origin = lineage.component_origin(s, rids["stem"])
        assert root_origin["created_by"] is None and root_origin["cloned_from"] == [] and root_origin["used_by"] == ["a", "b"]
        assert lineage.component_origin(s, ids_a["head"])["used_by"] == ["a"]
        shared = lineage.shared_components(s)
        with pytest.raises(KeyError):
            lineage.component_origin(s, "0" * 32)
    expected = {rids[n] for n in ("stem", "cls_token", "pos_embed@32", "blocks.0", "final_norm")} | {ids_a["blocks.1"]}
    assert set(shared) == expected
    assert all(names == ["a", "b"] for names in shared.values())


def test_training_line_follows_uncommitted_in_visit_parents_by_their_notes(system):
    # Written by hand so the line surely holds uncommitted steps (a real visit's search
    # decides by float scores whether it builds on an in-visit parent).
    root, ra, rb, _ = two_tasks(system)
    rb2 = commit_path(system, root, "b", 0.9, seed=3, classes=4, parent_id=rb.path_id)
    with system.Session.begin() as s:
        a, b = (s.scalar(select(Task.id).where(Task.name == n)) for n in ("a", "b"))

        def row(task, notes, parent, path=None, outcome="improved", examples=100):
            r = Candidate(task_id=task, parent_path_id=parent, path_id=path, mutations=notes, hparams={},
                          val_curve=[], examples=examples, seconds=1.0, outcome=outcome)
            s.add(r)
            s.flush()
            return r.id

        a_line = [row(a, ["clone:blocks.1", f"path:{ra.path_id}"], root.root_path_id, ra.path_id)]
        b_line = [row(b, ["seed", "path:x1"], ra.path_id),
                  row(b, ["clone:blocks.0", "path:x2", "parent:x1"], ra.path_id),
                  row(b, ["lr:0.01", f"path:{rb.path_id}", "parent:x2"], ra.path_id, rb.path_id),
                  row(b, ["aug", f"path:{rb2.path_id}"], rb.path_id, rb2.path_id, examples=50)]
        row(b, ["clone:head", "path:y", "parent:x1"], ra.path_id, outcome="discarded")
    with system.Session() as s:
        line = lineage.training_line(s, rb2.path_id)
        assert [r.id for r in line["candidates"]] == b_line
        assert (line["steps"], line["examples"], line["complete"], line["starts_from"]) == (4, 350, True, "seed")
        assert [r.id for r in lineage.training_line(s, rb.path_id)["candidates"]] == b_line[:3]
        first = lineage.training_line(s, ra.path_id)
        assert [r.id for r in first["candidates"]] == a_line and first["starts_from"] == "mutated parent"
        with pytest.raises(KeyError):
            lineage.training_line(s, "0" * 32)
    # Records from before the "path:" note: the committed steps are found, the line stops
    # at the first in-visit parent and says it is incomplete.
    with system.Session.begin() as s:
        for r in s.scalars(select(Candidate)):
            r.mutations = [n for n in r.mutations if not n.startswith("path:")]
    with system.Session() as s:
        old = lineage.training_line(s, rb2.path_id)
    assert [r.id for r in old["candidates"]] == b_line[2:] and not old["complete"]


def test_system_summary_counts_unique_live_parameters(system):
    root, ra, rb, ids_a = two_tasks(system)
    with system.Session() as s:
        summary = lineage.system_summary(s)
        params = dict(s.execute(select(Component.id, Component.num_params)).all())
    live = set(path_ids(system, ra.path_id)) | set(path_ids(system, rb.path_id))
    unique = sum(params[c] for c in live)
    assert summary["roots"] == [{"name": "tiny", "timm": VIT, "params": root.total_params, "root_params": root.root_params}]
    assert summary["tasks"] == 2 and summary["tasks_with_live_path"] == 2
    assert summary["components"] == 7 + 2 + 1  # root, a's head and clone, b's head
    assert summary["live_components"] == len(live) == 8
    assert summary["shared_components"] == 6
    assert summary["unique_params"] == unique
    # The root's own head is used by nobody, so it is not counted; a's clone of blocks.1
    # replaces the root's (same size) and the two new heads have 3 and 4 classes.
    assert unique == root.root_params + (3 + 4) * (DIM + 1)
    assert summary["params_per_task"] == pytest.approx(unique / 2)
    assert system.system_json() == summary


def test_loaded_paths_share_modules_through_the_cache(system):
    root, ra, rb, ids_a = two_tasks(system)
    cache: dict = {}
    pa, _ = system.load_path(ra.path_id, cache)
    pb, _ = system.load_path(rb.path_id, cache)
    shared = set(pa.ids) & set(pb.ids)
    assert len(shared) == 6
    assert all(pa.modules[pa.ids.index(c)] is pb.modules[pb.ids.index(c)] for c in shared)
    out = models_run(pb, torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4) and pb.classes == ["c0", "c1", "c2", "c3"]


def models_run(path, x):
    from munet import models

    with torch.no_grad():
        return models.assemble(path)(x)


# -- garbage collection ----------------------------------------------------------------------------

def _backdate(store: LayerStore, seconds: float) -> None:
    old = time.time() - seconds
    for digest in store.digests():
        os.utime(store.path(digest), (old, old))


def _blob(system: System, component_id: str) -> str:
    with system.Session() as s:
        return s.get(Component, component_id).blob_hash


def test_gc_removes_only_unreferenced_blobs_older_than_the_grace_period(system):
    root = tiny_root(system)
    add_task(system, "a")
    first = commit_path(system, root, "a", 0.5, seed=1, probe=True)       # live once: kept for rollback
    best = commit_path(system, root, "a", 0.8, seed=2, clone=("blocks.0",), probe=True)  # live now
    loser = commit_path(system, root, "a", 0.6, seed=3, clone=("blocks.1",), probe=True)  # never live
    orphan = system.store.put({"x": torch.randn(5)})                      # a crashed commit's blob
    loser_only = set(path_ids(system, loser.path_id)) - set(path_ids(system, best.path_id)) - set(path_ids(system, first.path_id))
    doomed = {_blob(system, c) for c in loser_only} | {orphan}
    with system.Session() as s:
        doomed.add(s.get(PathRow, loser.path_id).probe_hash)
    on_disk = set(system.store.digests())
    assert doomed < on_disk

    # Everything is young: nothing goes, whatever is referenced.
    assert gc.collect(system.Session, system.store, grace_seconds=3600)["deleted"] == 0
    assert set(system.store.digests()) == on_disk

    _backdate(system.store, 7200)
    dry = gc.collect(system.Session, system.store, grace_seconds=0, dry_run=True)
    assert dry["deleted"] == len(doomed) and set(system.store.digests()) == on_disk

    result = gc.collect(system.Session, system.store, grace_seconds=0)
    assert result["deleted"] == len(doomed) and result["bytes_freed"] > 0
    assert set(system.store.digests()) == on_disk - doomed
    # Root, the live path and the formerly live path still load from verified blobs.
    for path_id in (root.root_path_id, best.path_id, first.path_id):
        system.load_path(path_id, cache={})
    with system.Session() as s:
        kept_probes = {s.get(PathRow, p).probe_hash for p in (first.path_id, best.path_id)}
    assert kept_probes <= set(system.store.digests())
    # Rows stay for lineage.
    assert count(system, PathRow) == 4
    assert gc.collect(system.Session, system.store, grace_seconds=0)["deleted"] == 0


def test_gc_keeps_blobs_of_components_committed_within_the_grace_period(system):
    root = tiny_root(system)
    add_task(system, "a")
    commit_path(system, root, "a", 0.8, seed=1)
    loser = commit_path(system, root, "a", 0.2, seed=2)
    head = _blob(system, path_ids(system, loser.path_id)[-1])
    _backdate(system.store, 7200)  # old files, but their rows were written just now
    gc.collect(system.Session, system.store, grace_seconds=600)
    assert system.store.exists(head)
    with system.Session.begin() as s:
        s.execute(update(Component).values(created_at=dt.datetime(2000, 1, 1)))
        s.execute(update(PathRow).values(created_at=dt.datetime(2000, 1, 1)))
    gc.collect(system.Session, system.store, grace_seconds=600)
    assert not system.store.exists(head)


# -- SQLite and PostgreSQL agree -----------------------------------------------------------------

def scenario(system: System) -> dict:
    """One fixed sequence of operations, described without random ids."""
    root, ra, rb, ids_a = two_tasks(system)
    names = {ra.path_id: "a1", rb.path_id: "b1", root.root_path_id: "root"}
    moves = []
    for i, score in enumerate([0.7, 0.9, 0.85]):
        r = commit_path(system, root, "a", score, seed=10 + i)
        names[r.path_id] = f"a{i + 2}"
        moves.append(r.moved)
    commit.set_pin(system.Session, "b", rb.path_id)
    lost = None
    try:
        record, new = make_path(system, root, "a", 1.0, seed=99)
        commit.commit_path(system.Session, system.store, record, new, lease_token=12345)
    except LeaseLost:
        lost = "lease lost"
    with system.Session() as s:
        summary = lineage.system_summary(s)
        shared = sorted(tuple(v) for v in lineage.shared_components(s).values())
        hist = {t: [(names[h.path_id], h.score, h.reason) for h in lineage.live_history(s, s.scalar(select(Task.id).where(Task.name == t)))]
                for t in ("a", "b")}
        ancestry = [names[p.id] for p in lineage.ancestry(s, rb.path_id)]
    tasks = system.tasks_json()  # its own session: SQLite sessions must not nest (BEGIN IMMEDIATE)
    for t in tasks:
        t["live_path"]["id"] = names[t["live_path"]["id"]]
        for key in ("created_at", "last_improvement", "dataset"):
            t.pop(key)
    return {"moves": moves, "lost": lost, "summary": summary, "shared": shared, "history": hist,
            "ancestry": ancestry, "tasks": tasks, "gc": gc.collect(system.Session, system.store, 0, dry_run=True)["deleted"]}


def test_scenario_gives_the_expected_results(system):
    result = scenario(system)
    assert result["moves"] == [False, True, False]
    assert result["lost"] == "lease lost"
    assert result["history"]["a"] == [("a1", 0.8, "evolved"), ("a3", 0.9, "evolved")]
    assert result["ancestry"] == ["b1", "a1", "root"]
    assert [t["live_path"]["id"] for t in result["tasks"]] == ["a3", "b1"]
    assert result["tasks"][1]["pinned"] is True


def test_sqlite_and_postgresql_give_the_same_results(tmp_path, pg_url):
    results = []
    for name, url in (("sqlite", None), ("pg", pg_url)):
        system = System(make_settings(tmp_path / name, url))
        system.init()
        try:
            results.append(scenario(system))
        finally:
            system.engine.dispose()
    assert results[0] == results[1]
