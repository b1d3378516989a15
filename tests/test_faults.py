"""Faults: nothing lost, nothing half-done (issue 6).

An evolver killed with SIGKILL at the commit's fault points and at random moments, a disk
that fills up mid-commit, Redis and PostgreSQL going away under a running server, a server
worker process killed under load, and two evolvers with two servers on one PostgreSQL.
Real PostgreSQL, a private Redis, real server processes; the faults themselves come from
`fault_support`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import errno
import os
import random
import time

import pytest
import torch
from sqlalchemy import select, update

from munet.storage.schema import LiveHistory, PathRow, Task, utcnow
from munet.system import System

from conftest import make_settings
from evolver_support import digits_npz
from fault_support import (EvolverZygote, FullDiskFileSystem, LoadLoop, PrivateRedis, TcpProxy, fsck_ok,
                           gc_removes_only_unreferenced, live_paths_answer, register_full_disk, server_workers,
                           temp_files, wait_until)
from server_support import (Server, commit_variant, make_installation, multipart, npz_bytes, png_b64, squares,
                            task_images)


def _worker_env(system: System) -> dict:
    st = system.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUNET_")}
    env.update({"MUNET_HOME": st.home, "MUNET_DB_URL": st.db_url, "MUNET_STORE_URL": st.store_url,
                "MUNET_DATA_URL": st.data_url})
    if st.redis_url:
        env["MUNET_REDIS_URL"] = st.redis_url
    return env


def _weaken_live(system: System, task: str, free_lease: bool = True) -> str:
    """Arrange that the next visit surely commits (a weak live score) and, unless told
    otherwise, that the task is free at once (as if the killed worker's lease ran out)."""
    with system.Session.begin() as s:
        t = s.scalar(select(Task).where(Task.name == task))
        # A visit rescores its live path from its validation accuracy, so both are weakened.
        s.execute(update(PathRow).where(PathRow.id == t.live_path_id).values(score=0.001, val_acc=0.001))
        if free_lease:
            t.lease_until = utcnow() - dt.timedelta(seconds=1)
        return t.live_path_id


TTL = 3.0  # the killed workers' lease
FAULTS = ["after_blobs", "in_transaction", "after_commit", None]  # None: SIGKILL at a random moment


def test_an_evolver_killed_twenty_times_at_fault_points_and_random_moments_loses_nothing(pg_url, tmp_path):
    system = System(make_settings(tmp_path, pg_url))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    for i, name in enumerate(["k", "j"]):
        system.add_task(name, str(digits_npz(tmp_path / f"{name}.npz", n_train=120, n_test=40, offset=i)))
    probes = {n: task_images(system, n, n=8) for n in ("k", "j")}
    zygote = EvolverZygote(_worker_env(system), tmp_path / "evolver.log")
    try:
        first = zygote.round(names=["k", "j"], config={"candidates": 1})
        visit_s = first["seconds"] / 2
        assert first["code"] == 0, (tmp_path / "evolver.log").read_text()[-3000:]
        j_logits = live_paths_answer(system, probes)["j"]
        rng = random.Random(6)
        outcomes = []
        for i in range(20):
            fault = FAULTS[i % len(FAULTS)]
            before = _weaken_live(system, "k")
            if fault:
                out = zygote.round(fault=fault, names=["k"], config={"candidates": 1}, ttl=TTL)
                assert out["signal"] == 9, f"round {i}: the worker never reached {fault}: {out}"
            else:
                out = zygote.round(names=["k"], config={"candidates": 1}, ttl=TTL, kill_after=rng.uniform(0.1, 1.2 * visit_s))
            outcomes.append((fault, out["signal"]))
            live = system.task_json("k")["live_path"]["id"]
            if fault in ("after_blobs", "in_transaction"):
                assert live == before, f"round {i}: a commit killed at {fault} moved the live pointer"
            path, _ = system.load_path(live, cache={})  # whatever is live loads from the store
            assert path.modules
        assert sum(1 for _, sig in outcomes if sig == 9) >= 16, outcomes
        fsck_ok(system)  # no row references a missing blob, no blob is half-written
        gc_removes_only_unreferenced(system)
        answers = live_paths_answer(system, probes)  # every live path loads from the store and answers
        assert torch.equal(answers["j"], j_logits), "the faults in task k's commits changed task j"

        before = _weaken_live(system, "k", free_lease=False)
        visits = system.task_json("k")["visits"]
        time.sleep(TTL + 0.5)  # the last killed worker's lease runs out by itself
        resumed = zygote.round(names=["k"], config={"candidates": 1})
        assert resumed["signal"] is None and resumed["code"] == 0, (tmp_path / "evolver.log").read_text()[-3000:]
        after = system.task_json("k")
        assert after["visits"] == visits + 1 and after["status"] == "ready"
        assert after["live_path"]["id"] != before, "the resumed worker did not commit"
        fsck_ok(system)
        live_paths_answer(system, probes)
    finally:
        zygote.close()
        system.engine.dispose()


def test_a_full_disk_fails_the_commit_cleanly_and_the_live_path_stays(pg_url, tmp_path):
    register_full_disk()
    settings = dataclasses.replace(make_settings(tmp_path, pg_url), store_url=f"fulldisk://{tmp_path}/layers")
    FullDiskFileSystem.budget = None
    system = System(settings)
    assert type(system.store.fs) is FullDiskFileSystem
    first = make_installation(system, {"alpha": 3})["alpha"]
    probes = {"alpha": task_images(system, "alpha", n=8)}
    expected = live_paths_answer(system, probes)["alpha"]
    rows_before = _count(system, PathRow)
    try:
        for budget in (0, 5_000, 40_000, 400_000):  # fails on the first blob, inside one, on a later one
            FullDiskFileSystem.budget = budget
            with pytest.raises(OSError) as err:
                commit_variant(system, "alpha", seed=7, score=0.9, clone_blocks=(15,))
            assert err.value.errno == errno.ENOSPC
            assert system.task_json("alpha")["live_path"]["id"] == first
            assert torch.equal(live_paths_answer(system, probes)["alpha"], expected)
            assert not temp_files(f"{tmp_path}/layers"), "a failed write left a partial file"
            assert _count(system, PathRow) == rows_before
            fsck_ok(system)
        FullDiskFileSystem.budget = None
        res = commit_variant(system, "alpha", seed=7, score=0.9, clone_blocks=(15,))
        assert res.moved and system.task_json("alpha")["live_path"]["id"] == res.path_id
        live_paths_answer(system, probes)
        gc_removes_only_unreferenced(system)  # blobs of the failed commits that did get written go
    finally:
        FullDiskFileSystem.budget = None
        system.engine.dispose()


def _count(system: System, table) -> int:
    from sqlalchemy import func

    with system.Session() as s:
        return s.scalar(select(func.count()).select_from(table))


# -- a running server: Redis, PostgreSQL and its own worker processes go away ----------------------

POLL_S = 8.0  # the server's SQL poll: slow, so a swap faster than it came through Redis
DEADLINE_S = 60.0  # MUNET_REQUEST_TIMEOUT_S: requests ride out an executor restart (~10 s here) until then


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One server on PostgreSQL through a TCP proxy that can be cut, with a private Redis
    that can be stopped; tasks alpha and beta serve paths committed by the test."""
    from sqlalchemy.engine import make_url

    from conftest import _unavailable, fresh_pg_database

    if not PrivateRedis.available():
        _unavailable("redis-server (for a private Redis)", FileNotFoundError("redis-server"))
    with fresh_pg_database() as url:
        yield from _served(make_url(url), tmp_path_factory.mktemp("faults_served"))


def _served(direct, home):
    redis_ = PrivateRedis().start()
    proxy = TcpProxy(direct.host or "127.0.0.1", direct.port or 5432).start()
    system = System(make_settings(home, direct.render_as_string(hide_password=False), redis_.url))
    paths = make_installation(system, {"alpha": 3, "beta": 4})
    through_proxy = direct.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    server = Server(home, env={"MUNET_DB_URL": through_proxy, "MUNET_REDIS_URL": redis_.url,
                               "MUNET_SWAP_POLL_S": str(POLL_S), "MUNET_REQUEST_TIMEOUT_S": str(DEADLINE_S)})
    try:
        server.start(timeout=300)
        yield {"server": server, "system": system, "redis": redis_, "proxy": proxy, "paths": paths}
    finally:
        server.stop()
        system.engine.dispose()
        proxy.close()
        redis_.close()


def _images() -> dict[str, str]:
    return {"alpha": png_b64(squares(1, 3, seed=3)[0][0]), "beta": png_b64(squares(1, 4, seed=4)[0][0])}


def _status(server) -> dict:
    code, body = server.get("/status", timeout=60)
    assert code == 200, body
    return body


def _ready(server) -> bool:
    try:
        return server.get("/readyz", timeout=30)[0] == 200
    except OSError:  # the probe itself may time out while the executor restarts
        return False


def test_redis_outage_swaps_arrive_by_sql_polling_and_pubsub_resumes_without_a_restart(served):
    server, system, redis_ = served["server"], served["system"], served["redis"]
    assert wait_until(lambda: _status(server)["redis"]["connected"], 60)
    with LoadLoop(server, _images()) as load:
        messages = _status(server)["redis"]["messages"]
        res = commit_variant(system, "alpha", seed=61, score=0.6, publish=True)
        took = load.wait_for("alpha", res.path_id, 60)
        assert took is not None and _status(server)["redis"]["messages"] > messages, server.log()

        redis_.stop()
        assert wait_until(lambda: not _status(server)["redis"]["connected"], 60)
        st = _status(server)
        assert st["degraded"] is True and st["database"]["up"] is True
        res = commit_variant(system, "beta", seed=62, score=0.6, clone_blocks=(15,), publish=True)  # publish fails
        assert load.wait_for("beta", res.path_id, 3 * POLL_S + 60) is not None, "no swap by SQL polling"

        redis_.start()
        assert wait_until(lambda: _status(server)["redis"]["connected"], 60), "pub/sub did not reconnect"
        messages = _status(server)["redis"]["messages"]
        res = commit_variant(system, "alpha", seed=63, score=0.7, publish=True)
        took = load.wait_for("alpha", res.path_id, 60)
        assert took is not None and _status(server)["redis"]["messages"] > messages, "no Redis message after the outage"
        assert took < POLL_S, f"the swap took {took:.1f}s: it waited for the SQL poll"
        assert _status(server)["degraded"] is False
    assert load.ok() and not load.failures(), load.failures()[:3]


def test_postgres_unreachable_serving_continues_submission_503_and_nothing_is_lost(served):
    server, system, proxy = served["server"], served["system"], served["proxy"]
    data, ctype = multipart({"name": "delta"}, [("file", "delta.npz", npz_bytes(2, seed=5))])
    before = {t: system.task_json(t)["live_path"]["id"] for t in ("alpha", "beta")}
    with LoadLoop(server, _images()) as load:
        proxy.cut()
        try:
            assert wait_until(lambda: _status(server)["database"]["up"] is False, 2 * POLL_S + 60)
            st = _status(server)
            assert st["degraded"] is True and "database" in st and st["database"]["error"]
            code, ready = server.get("/readyz")
            assert code == 200, "a database outage must not take the server out of rotation"
            assert ready["status"] == "degraded" and ready["degraded"] == ["database"] and ready["detail"], ready
            # The evolver keeps committing to PostgreSQL (its own link is fine).
            during = commit_variant(system, "beta", seed=71, score=0.7, clone_blocks=(15,))
            code, body, headers = server.request("POST", "/tasks", data, {"Content-Type": ctype}, timeout=60)
            assert code == 503 and body["error"] == "database_unavailable" and body["detail"], body
            assert int(headers["retry-after"]) >= 1
            code, body, _ = server.request("GET", "/tasks", timeout=60)
            assert code == 503 and body["error"] == "database_unavailable"
            cut_seen = time.time()
            time.sleep(POLL_S)
            assert load.serving("beta", cut_seen) == {before["beta"]}, "serving stopped or moved during the outage"
        finally:
            proxy.restore()
        assert wait_until(lambda: _status(server)["database"]["up"] is True, 2 * POLL_S + 60)
        assert server.get("/readyz") == (200, {"status": "ready"})
        assert load.wait_for("beta", during.path_id, 2 * POLL_S + 60) is not None, "the commit made during the outage never arrived"
        code, body, _ = server.request("POST", "/tasks", data, {"Content-Type": ctype}, timeout=120)
        assert code == 201 and body["name"] == "delta", body
    assert load.ok() and not load.failures(), load.failures()[:3]
    code, tasks = server.get("/tasks")
    assert code == 200 and {t["name"] for t in tasks} == {"alpha", "beta", "delta"}
    assert {t["name"]: t["live_path"]["id"] for t in tasks if t["live_path"]} == {"alpha": before["alpha"],
                                                                                  "beta": during.path_id}
    assert _status(server)["degraded"] is False


def test_a_killed_server_worker_is_restarted_and_reloads_every_live_path_from_sql(served):
    """BentoML 1.4 runs each service's workers under a circus arbiter that respawns a dead
    process (`respawn=True` unless BENTOML_CONTAINERIZED is set) and holds the listening
    sockets. Killing the entry worker: only the requests it was serving fail; later ones
    wait in the socket's backlog for its successor. Killing the executor worker: the
    gateway rides out the restart (`Gateway.ride_out`): a call that fails at the connection
    level, waits in the executor socket's backlog, or finds the successor still loading the
    live paths is sent again with backoff until the request's deadline
    (MUNET_REQUEST_TIMEOUT_S), so requests arriving during the restart wait and succeed.
    Requests in flight on it are sent again too (inference is idempotent); at most those
    fail (one per client thread, when the restart outlasts their deadline), and only with
    503 and Retry-After. Once it has reloaded every live path from SQL, the live paths
    serve as before. No request gets another answer (no 404/409/500)."""
    import signal

    server, system = served["server"], served["system"]
    live = {t: system.task_json(t)["live_path"]["id"] for t in ("alpha", "beta")}
    workers = server_workers(server)
    assert set(workers) == {"Munet", "MunetExecutor"}, workers

    with LoadLoop(server, _images(), threads=3) as load:
        assert wait_until(lambda: len(load.ok()) > 5, 60)
        killed_at = time.time()
        os.kill(workers["Munet"], signal.SIGKILL)
        assert wait_until(lambda: server_workers(server).get("Munet") not in (None, workers["Munet"]), 120)
        assert wait_until(lambda: len([r for r in load.ok() if r[0] > killed_at + 1]) > 5, 300), load.failures()[-3:]
    fails = load.failures()
    assert all(r[0] < killed_at < r[1] for r in fails), [r for r in fails if not r[0] < killed_at < r[1]][:3]
    assert len(fails) <= 3, fails  # at most one per client thread

    workers = server_workers(server)
    with LoadLoop(server, _images(), threads=2) as load:
        assert wait_until(lambda: len(load.ok()) > 5, 60)
        killed_at = time.time()
        os.kill(workers["MunetExecutor"], signal.SIGKILL)
        with LoadLoop(server, _images(), threads=2) as arrivals:  # requests arriving while the successor starts
            assert wait_until(lambda: server_workers(server).get("MunetExecutor") not in (None, workers["MunetExecutor"]), 120)
            assert wait_until(lambda: _ready(server), 300)
            recovered = time.time()
        assert wait_until(lambda: {r[2] for r in load.ok() if r[0] > recovered} == {"alpha", "beta"}, 120)
    st = _status(server)
    assert {t: v["serving_path_id"] for t, v in st["tasks"].items() if v["serving_path_id"]} == live
    during = [r for r in load.records + arrivals.records if killed_at < r[0] < recovered]
    print(f"executor restart: ready again after {recovered - killed_at:.1f}s (deadline {DEADLINE_S:g}s); "
          f"{len(during)} requests arrived during it, {len([r for r in during if r[3] == 200])} answered 200")
    assert during and not arrivals.failures(), arrivals.failures()[:3]  # arriving requests wait and succeed
    fails = load.failures()
    assert len(fails) <= 2, fails  # at most one per client thread: those in flight when it died
    for started, finished, task, code, out in fails:
        assert code == 503 and out[0]["error"] in ("executor_unavailable", "deadline_exceeded", "not_ready"), (code, out)
        assert int(out[1]) >= 1, "a 503 without Retry-After"
        assert started < killed_at < finished, (started, killed_at, finished)
    assert [r for r in load.ok() if r[0] > recovered], "nothing served after the restart"


class _RestartingExecutor:
    """A gateway backend whose executor is down for the first `down` calls (`error`: how it
    says so) and its route table for the first `routes_down`, then answers `answer` (a
    per-item error code, "overloaded", "outage", or None: success)."""

    def __init__(self, down: int = 0, error: str = "executor_unavailable", answer: str | None = None,
                 routes_down: int = 0, lost: int = 0):
        self.down, self.error, self.answer, self.routes_down, self.lost = down, error, answer, routes_down, lost
        self.calls = self.route_calls = 0

    async def routes(self, since):
        from munet.server import api

        self.route_calls += 1
        if self.route_calls <= self.routes_down:
            raise api.ExecutorDown("the executor is not reachable (ConnectError)")
        return {"version": 1, "ready": True, "health": None,
                "tasks": {"alpha": {"path_id": "p1", "channels": 3, "classes": ["a", "b"]}}}

    async def infer(self, items):
        from munet.server import api
        from munet.server.executor import Result

        self.calls += 1
        if self.calls <= self.down:
            raise api.ExecutorDown("restarting", error=self.error)
        if self.calls <= self.down + self.lost:  # answered, but the answer never arrives
            await asyncio.sleep(3600)
        if self.answer == "overloaded":
            raise api.Overloaded("queue full")
        if self.answer == "outage":  # the executor failed (not a restart): an outage at once
            raise api.Outage("the executor failed (500)")
        if self.answer:
            return [Result(error=self.answer, detail=self.answer) for _ in items]
        return [Result(path_id="p1", top=[(1, 0.9), (0, 0.1)]) for _ in items]


def test_the_gateway_rides_out_an_executor_restart_but_never_retries_overload_or_item_errors():
    import asyncio

    from munet.server import api

    image = png_b64(squares(1, 2, seed=1)[0][0])

    def predict(backend, deadline_s=10.0):
        gw = api.Gateway(backend, None, api.Limits(deadline_s=deadline_s))
        t0 = time.monotonic()
        try:
            return asyncio.run(gw.predict("alpha", [image], 2, base64=True)), time.monotonic() - t0
        except api.ApiError as e:
            return e, time.monotonic() - t0

    for error in ("executor_unavailable", "not_ready"):  # killed (connection errors), then loading
        backend = _RestartingExecutor(down=3, error=error, routes_down=2)
        out, took = predict(backend)
        assert out["path_id"] == "p1" and backend.calls == 4 and backend.route_calls == 3, out
        assert 0.5 < took < 3, took  # backoff 0.1 + 0.2 (routes), then 0.1 + 0.2 + 0.4
        backend = _RestartingExecutor(down=10**6, error=error)
        out, took = predict(backend, deadline_s=1.5)
        assert isinstance(out, api.ApiError) and out.status_code == 503 and out.error == error, out
        assert int(out.headers["Retry-After"]) >= 1 and took < 1.6 and backend.calls >= 3, (took, backend.calls)
    for answer, status, error in (("overloaded", 503, "overloaded"), ("unknown_task", 404, "unknown_task"),
                                  ("invalid_image", 400, "invalid_image"), ("outage", 503, "executor_unavailable")):
        backend = _RestartingExecutor(answer=answer)
        out, took = predict(backend)
        assert isinstance(out, api.ApiError) and (out.status_code, out.error) == (status, error), (answer, out)
        assert backend.calls == 1 and took < 1, (answer, backend.calls, took)  # answered at once, not retried


def test_an_executor_answer_lost_on_the_way_is_asked_for_again_within_the_deadline():
    import asyncio

    from munet.server import api

    image = png_b64(squares(1, 2, seed=1)[0][0])
    backend = _RestartingExecutor(lost=2)
    gw = api.Gateway(backend, None, api.Limits(deadline_s=5.0, executor_try_s=0.5))
    t0 = time.monotonic()
    out = asyncio.run(gw.predict("alpha", [image], 2, base64=True))
    assert out["path_id"] == "p1" and backend.calls == 3 and 1.0 <= time.monotonic() - t0 < 3, out
    backend = _RestartingExecutor(lost=10**6)  # never answers: 503 at the deadline, not later
    gw = api.Gateway(backend, None, api.Limits(deadline_s=1.2, executor_try_s=0.5))
    t0 = time.monotonic()
    try:
        asyncio.run(gw.predict("alpha", [image], 2, base64=True))
        raise AssertionError("no 503")
    except api.ApiError as e:
        assert (e.status_code, e.error) == (503, "deadline_exceeded") and time.monotonic() - t0 < 2
    assert backend.calls == 3


def test_readyz_body_says_ready_or_degraded_and_503_is_json():
    import asyncio
    import json

    from munet.server import api

    def readyz(status: int, health: dict | None) -> tuple[int, dict, dict]:
        async def bentoml_readyz(scope, receive, send):
            await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"\n" if status == 200 else b"not ready"})

        gw = api.Gateway(_RestartingExecutor(), None, api.Limits())
        gw.health = health or {}
        sent = []

        async def send(message):
            sent.append(message)

        asyncio.run(api.Readiness(bentoml_readyz, lambda: gw)({"type": "http", "path": "/readyz", "method": "GET"},
                                                             None, send))
        headers = {k.decode(): v.decode() for k, v in sent[0]["headers"]}
        return sent[0]["status"], json.loads(sent[1]["body"]), headers

    assert readyz(200, None)[:2] == (200, {"status": "ready"})
    code, body, _ = readyz(200, {"degraded": ["database"], "detail": "the database is not reachable"})
    assert code == 200 and body == {"status": "degraded", "degraded": ["database"],
                                    "detail": "the database is not reachable"}
    code, body, headers = readyz(503, None)
    assert code == 503 and body["error"] == "not_ready" and body["detail"] and headers["retry-after"] == "2"


TINY = ["--preset", "cpu", "--generations", "1", "--candidates", "1", "--max-epochs", "1", "--threads", "1", "--nice", "0",
        "--image-size", "32"]


def test_two_evolvers_and_two_servers_on_postgres_lose_no_live_pointer_update(served, tmp_path):
    """Two `munet evolve` worker processes share three new tasks while two servers (one
    through the proxy, one direct) serve: no task is visited by two workers at once, each
    task's live-pointer history is one unbroken chain rising in score, and both servers
    end up serving every task's final live path."""
    import subprocess
    import sys

    from munet.storage.schema import Visit as VisitRow
    server_a, system = served["server"], served["system"]
    st = system.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUNET_")}
    env.update({"MUNET_HOME": st.home, "MUNET_DB_URL": st.db_url, "MUNET_REDIS_URL": st.redis_url,
                "MUNET_STORE_URL": st.store_url, "MUNET_DATA_URL": st.data_url})
    names = ["e1", "e2", "e3"]
    for i, name in enumerate(names):
        system.add_task(name, str(digits_npz(tmp_path / f"{name}.npz", n_train=100, n_test=40, offset=i)))
    server_b = Server(tmp_path, env={k: env[k] for k in env if k.startswith("MUNET_") and k != "MUNET_HOME"}
                      | {"MUNET_SWAP_POLL_S": "2"})
    evolve = subprocess.Popen([sys.executable, "-m", "munet.cli", "evolve", "--iterations", "2", "--workers", "2",
                               *[a for n in names for a in ("--task", n)], *TINY],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        server_b.start(timeout=300)
        _, err = evolve.communicate(timeout=900)
        assert evolve.returncode == 0, err.decode()[-3000:]
        with system.Session() as s:
            visits = list(s.scalars(select(VisitRow).join(Task, Task.id == VisitRow.task_id)
                                    .where(Task.name.in_(names)).order_by(VisitRow.started_at)))
            tasks = {t.id: t for t in s.scalars(select(Task))}
            history = {t.name: list(s.scalars(select(LiveHistory).where(LiveHistory.task_id == t.id)
                                              .order_by(LiveHistory.id))) for t in tasks.values()}
        assert all(v.finished_at and v.outcome == "done" for v in visits)
        assert sorted(t.visits for t in tasks.values() if t.name in names) == [2, 2, 2]
        overlaps = [(a, b) for i, a in enumerate(visits) for b in visits[i + 1:]
                    if a.started_at < b.finished_at and b.started_at < a.finished_at]
        assert overlaps, "two workers should run visits at the same time"
        assert all(a.task_id != b.task_id for a, b in overlaps), "a task was visited by two workers at once"
        assert len({v.worker for v in visits}) == 2
        live = {t.name: t.live_path_id for t in tasks.values() if t.live_path_id}
        for name, rows in history.items():
            if name not in live:
                continue
            scores = [r.score for r in rows]
            assert [r.previous_path_id for r in rows] == [None] + [r.path_id for r in rows[:-1]], f"{name}: a lost update"
            assert rows[-1].path_id == live[name]
            assert all(b > a for a, b in zip(scores, scores[1:])), f"{name}: history not rising {scores}"

        def serving(server) -> dict:
            return {t: v["serving_path_id"] for t, v in _status(server)["tasks"].items() if v["serving_path_id"]}

        for server in (server_a, server_b):
            assert wait_until(lambda: serving(server) == live, 120), (serving(server), live)
    finally:
        if evolve.poll() is None:
            evolve.kill()
            evolve.wait()
        server_b.stop()
