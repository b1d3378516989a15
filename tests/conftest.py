"""Shared fixtures: a fresh munet installation on SQLite or on a fresh PostgreSQL database.

With CI=true a missing PostgreSQL or Redis fails the run instead of skipping (DESIGN.md).
"""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from munet.settings import Settings
from munet.system import System

PG_ADMIN_URL = os.environ.get("MUNET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MUNET_TEST_REDIS", "redis://127.0.0.1:6379/0")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
IN_CI = os.environ.get("CI") == "true"


def _unavailable(what: str, err: Exception):
    if IN_CI:
        pytest.fail(f"{what} is required in CI but unreachable: {err}")
    pytest.skip(f"{what} unreachable: {err}")


@contextlib.contextmanager
def fresh_pg_database():
    """URL of a fresh, empty PostgreSQL database, dropped afterwards (also for wider scopes)."""
    name = f"munet_t_{uuid.uuid4().hex[:12]}"
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001 - any connection failure means "no PostgreSQL"
        _unavailable("PostgreSQL", e)
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def pg_url():
    with fresh_pg_database() as url:
        yield url


@pytest.fixture
def redis_url():
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2).ping()
    except Exception as e:  # noqa: BLE001
        _unavailable("Redis", e)
    return REDIS_URL


def make_settings(home: Path, db_url: str | None = None, redis_url: str | None = None) -> Settings:
    return Settings(home=str(home), db_url=db_url or f"sqlite:///{home}/munet.db", store_url=str(home / "layers"),
                    data_url=str(home / "datasets"), redis_url=redis_url, api_token=None)


@pytest.fixture(params=["sqlite", "postgresql"])
def system(request, tmp_path) -> System:
    """An initialised, empty installation; every test using it runs on both databases."""
    db_url = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    sys_ = System(make_settings(tmp_path, db_url))
    sys_.init()
    yield sys_
    sys_.engine.dispose()


@pytest.fixture
def sqlite_system(tmp_path) -> System:
    sys_ = System(make_settings(tmp_path))
    sys_.init()
    yield sys_
    sys_.engine.dispose()


def shared_data(name: str) -> Path:
    path = SHARED_DATA / f"{name}.npz"
    if not path.exists():
        pytest.skip(f"{path} is absent")
    return path
