"""Evolver workers as real processes against PostgreSQL and Redis: new tasks picked up
while running. Two workers sharing tasks and workers killed mid-commit are in
tests/test_faults.py."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

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
