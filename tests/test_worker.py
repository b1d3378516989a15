"""Evolver workers as real processes against PostgreSQL and Redis: leases, overlap,
and new tasks picked up while running."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from sqlalchemy import select, update

from munet.storage.schema import PathRow, Task, Visit as VisitRow

from conftest import make_settings
from evolver_support import digits_npz
from munet.system import System

TINY = ["--preset", "cpu", "--generations", "1", "--candidates", "1", "--max-epochs", "1", "--threads", "1", "--nice", "0",
        "--image-size", "32"]


def _env(system: System) -> dict:
    env = dict(os.environ)
    st = system.settings
    env.update({"MUNET_HOME": st.home, "MUNET_DB_URL": st.db_url, "MUNET_STORE_URL": st.store_url,
                "MUNET_DATA_URL": st.data_url})
    if st.redis_url:
        env["MUNET_REDIS_URL"] = st.redis_url
    return env


@pytest.fixture
def pg_system(pg_url, redis_url, tmp_path):
    system = System(make_settings(tmp_path, pg_url, redis_url))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    yield system
    system.engine.dispose()


def test_two_workers_overlap_in_time_but_never_visit_the_same_task_at_once(pg_system, tmp_path):
    for i, name in enumerate(["t1", "t2", "t3"]):
        pg_system.add_task(name, str(digits_npz(tmp_path / f"{name}.npz", offset=i)))
    subprocess.run([sys.executable, "-m", "munet.cli", "evolve", "--iterations", "2", "--workers", "2", *TINY],
                   env=_env(pg_system), check=True, timeout=600, capture_output=True)
    with pg_system.Session() as s:
        visits = list(s.scalars(select(VisitRow).order_by(VisitRow.started_at)))
        tasks = {t.id: t for t in s.scalars(select(Task))}
    assert all(v.finished_at and v.outcome == "done" for v in visits)
    assert sorted(t.visits for t in tasks.values()) == [2, 2, 2]
    overlaps = [(a, b) for i, a in enumerate(visits) for b in visits[i + 1:]
                if a.started_at < b.finished_at and b.started_at < a.finished_at]
    assert overlaps, "two workers should run visits at the same time"
    assert all(a.task_id != b.task_id for a, b in overlaps), "a task was visited by two workers at once"
    assert len({v.worker for v in visits}) == 2
    tokens = [v.lease_token for v in visits if v.task_id == visits[0].task_id]
    assert tokens == sorted(set(tokens)), "each claim of a task bumps its fencing token"


def test_a_new_task_gets_a_servable_path_within_minutes_while_a_worker_runs(pg_system, tmp_path):
    worker = subprocess.Popen([sys.executable, "-m", "munet.cli", "evolve", "--forever", *TINY],
                              env=_env(pg_system), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(3)
        start = time.monotonic()
        pg_system.add_task("late", str(digits_npz(tmp_path / "late.npz", offset=5)))  # publishes on munet:tasks
        while time.monotonic() - start < 300:
            info = pg_system.task_json("late")
            if info["live_path"]:
                break
            assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
            time.sleep(1)
        elapsed = time.monotonic() - start
        assert info["live_path"] and info["status"] in ("ready", "evolving"), f"no live path after {elapsed:.0f}s"
        assert elapsed < 300
    finally:
        worker.kill()
        worker.wait()


@pytest.mark.parametrize("fault", ["after_blobs", "in_transaction", "after_commit"])
def test_a_worker_killed_mid_commit_leaves_the_live_path_and_the_next_worker_resumes(pg_system, tmp_path, fault):
    pg_system.add_task("k", str(digits_npz(tmp_path / "k.npz")))
    env = _env(pg_system)
    subprocess.run([sys.executable, "-m", "munet.cli", "evolve", *TINY], env=env, check=True, timeout=300, capture_output=True)
    before = pg_system.task_json("k")
    with pg_system.Session.begin() as s:  # arrange a weak live path so the next visit surely commits
        s.execute(update(PathRow).where(PathRow.id == before["live_path"]["id"]).values(score=0.01))
    killed = subprocess.run([sys.executable, "-m", "munet.cli", "evolve", "--lease-ttl", "3", *TINY, "--candidates", "2"],
                            env=dict(env, MUNET_FAULT=fault), timeout=300, capture_output=True)
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    after = pg_system.task_json("k")
    if fault != "after_commit":
        assert after["live_path"]["id"] == before["live_path"]["id"]
    path, _ = pg_system.load_path(after["live_path"]["id"], cache={})  # whatever is live loads from the store
    assert path.modules
    time.sleep(3.5)  # the dead worker's lease runs out
    subprocess.run([sys.executable, "-m", "munet.cli", "evolve", *TINY], env=env, check=True, timeout=300, capture_output=True)
    final = pg_system.task_json("k")
    assert final["visits"] == before["visits"] + 1 and final["status"] == "ready"
    assert final["live_path"]["score"] >= after["live_path"]["score"]
