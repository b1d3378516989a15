"""The real server process (`munet serve`, BentoML with its executor service) over HTTP:
predictions equal the evaluator's, cross-task batching, hot swap under load (SQL poll, and
Redis on PostgreSQL), failed swaps, task submission with a token, pickle refusal, overload,
readiness through a database outage, metrics and the OpenAPI document."""
from __future__ import annotations

import base64
import pickle
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from sqlalchemy import create_engine, text

from munet.evolver.train import logits as evaluator_logits
from munet.system import System

from conftest import PG_ADMIN_URL, make_settings
from server_support import (Server, commit_variant, make_installation, multipart, npz_bytes, png_b64, squares,
                            task_images)

TOKEN = "test-token-123"


@pytest.fixture(scope="module")
def server_a(tmp_path_factory):
    """SQLite, no Redis (SQL polling only), an API token, a small queue bound."""
    home = tmp_path_factory.mktemp("http_a")
    system = System(make_settings(home))
    paths = make_installation(system)
    server = Server(home, env={"MUNET_API_TOKEN": TOKEN, "MUNET_MAX_INFLIGHT": "6"})
    try:
        server.start()
        yield server, system, paths
    finally:
        server.stop()
        system.engine.dispose()


def predict(server: Server, task: str, images_b64: list[str], top: int = 5):
    code, body, headers = server.post_json("/predict", {"task": task, "images": images_b64, "top": top})
    return code, body, headers


def metric(server: Server, name: str, labels: dict | None = None) -> float:
    _, body = server.get("/metrics")
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if labels and not all(f'{k}="{v}"' in line for k, v in labels.items()):
            continue
        total += float(line.rsplit(" ", 1)[1])
    return total


class ClientLoop:
    """Threads sending /predict for a task continuously; records path ids and failures."""

    def __init__(self, server: Server, task: str, classes: int, threads: int = 2):
        self.server, self.task = server, task
        self.image = png_b64(squares(1, classes, seed=3)[0][0])
        self.stop = threading.Event()
        self.seen: list[tuple[float, str]] = []
        self.failures: list[tuple[int, object]] = []
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        while not self.stop.is_set():
            try:
                code, body, _ = self.server.post_json("/predict", {"task": self.task, "image": self.image}, timeout=30)
            except Exception as e:  # noqa: BLE001
                self.failures.append((-1, repr(e)))
                continue
            if code == 200:
                self.seen.append((time.time(), body["path_id"]))
            else:
                self.failures.append((code, body))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(30)

    def wait_for(self, path_id: str, timeout: float) -> float | None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            if any(p == path_id for at, p in self.seen if at >= t0 - 0.01):
                return time.time() - t0
            time.sleep(0.05)
        return None


# -- server A: SQLite, SQL polling --------------------------------------------------------------------

def test_predictions_equal_the_evaluators(server_a):
    server, system, paths = server_a
    for task, k in (("alpha", 3), ("beta", 4), ("gamma", 2)):
        x = task_images(system, task, n=5)
        path, row = system.load_path(paths[task])
        ref = torch.softmax(evaluator_logits(path.modules, x, row.image_size, path.mean, path.std, 5, "cpu"), 1)
        code, body, _ = predict(server, task, [png_b64(x[i].numpy()) for i in range(5)], top=k)
        assert code == 200, body
        assert body["task"] == task and body["path_id"] == paths[task]
        for i, p in enumerate(body["predictions"]):
            assert p["label"] == int(ref[i].argmax()) and p["class"] == f"class_{p['label']}"
            assert abs(p["score"] - float(ref[i].max())) < 1e-4
            for t in p["top"]:
                assert abs(t["score"] - float(ref[i, t["label"]])) < 1e-4
        # The multipart variant answers the same.
        files = [("files", f"{i}.png", base64.b64decode(png_b64(x[i].numpy()))) for i in range(2)]
        data, ctype = multipart({"task": task, "top": str(k)}, files)
        code, up, _ = server.request("POST", "/predict/upload", data, {"Content-Type": ctype})
        assert code == 200, up
        for a, b in zip(up["predictions"], body["predictions"][:2]):
            assert a["label"] == b["label"] and abs(a["score"] - b["score"]) < 1e-6


def test_only_the_executor_process_loads_torch(server_a):
    """torch and timm weigh ~700 MB resident per process: BentoML's arbiter (which imports the
    service module) and the HTTP gateway must not load them, even after serving predictions,
    task status, lineage and the graph; the executor must."""
    from fault_support import server_workers

    server, system, paths = server_a
    code, body, _ = predict(server, "alpha", [png_b64(task_images(system, "alpha", n=1)[0].numpy())])
    assert code == 200, body
    for route in ("/tasks", "/tasks/alpha", "/tasks/alpha/lineage", "/system/graph", "/system/history", "/status"):
        assert server.get(route)[0] == 200, route
    workers = server_workers(server)
    loads_torch = {name: "libtorch_cpu" in open(f"/proc/{pid}/maps").read()
                   for name, pid in {"arbiter": server.proc.pid, **workers}.items()}
    assert loads_torch == {"arbiter": False, "Munet": False, "MunetExecutor": True}, loads_torch


def test_pickle_bodies_are_never_accepted(server_a, tmp_path):
    server, _, _ = server_a
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    payload = pickle.dumps([Evil()])
    for route in ("/predict", "/infer", "/routes", "/status", "/tasks"):
        code, body, _ = server.request("POST", route, payload, {"Content-Type": "application/vnd.bentoml+pickle"})
        assert 400 <= code < 500, (route, code, body)
        assert isinstance(body, dict) and set(body) == {"error", "detail"}, (route, body)
    assert not marker.exists()


def test_errors_are_json_4xx(server_a):
    server, _, _ = server_a
    cases = [
        ({"task": "alpha", "image": "!!!"}, 400, "invalid_image"),
        ({"task": "nope", "image": "AAAA"}, 404, "unknown_task"),
        ({"task": "alpha"}, 400, "invalid_request"),
        (b"garbage", 400, "invalid_request"),
        ({"task": "alpha", "images": ["AAAA"] * 65}, 413, "too_many_images"),
    ]
    for payload, status, error in cases:
        code, body, _ = server.post_json("/predict", payload)
        assert code == status and body["error"] == error, (payload if isinstance(payload, bytes) else str(payload)[:80], body)
    code, body, _ = server.request("GET", "/no/such/thing")
    assert code == 404 and set(body) == {"error", "detail"}
    # A declared body over the limit is refused before a byte of it is read.
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.putrequest("POST", "/predict")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(33 * 1024**2))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"] == "payload_too_large"
    conn.close()


def test_openapi_metrics_and_status(server_a):
    server, _, _ = server_a
    code, doc = server.get("/openapi.json")
    assert code == 200 and "/predict" in doc["paths"] and "/tasks/{name}/lineage" in doc["paths"]
    assert doc["components"]["schemas"]["PredictRequest"]["additionalProperties"] is False
    assert server.get("/readyz")[0] == 200
    code, st = server.get("/status")
    assert code == 200 and st["ready"] and st["database"]["up"] and st["served_tasks"] == 3
    _, body = server.get("/metrics")
    for name in ("munet_requests_total", "munet_request_duration_seconds_bucket", "munet_batch_size_bucket",
                 "munet_live_path_score", "munet_live_path_accounted_params", "munet_swaps_total",
                 "munet_cache_components", "munet_cache_bytes", "munet_db_up"):
        assert name in body, name
    assert metric(server, "munet_db_up") == 1.0
    assert metric(server, "munet_live_path_score", {"task": "alpha"}) == pytest.approx(0.5)
    assert not re.search(r'\{[^}]*(path_id|component)[^}]*\}', "\n".join(l for l in body.splitlines() if l.startswith("munet_")))


def test_mixed_tasks_are_batched_together(server_a):
    server, _, _ = server_a
    imgs = {k: png_b64(squares(1, k, seed=k)[0][0]) for k in (2, 3, 4)}
    jobs = [("alpha", 3), ("beta", 4), ("gamma", 2)] * 16
    saved0 = metric(server, "munet_stage_runs_saved_total")
    deadline = time.time() + 30
    while time.time() < deadline:
        with ThreadPoolExecutor(6) as pool:  # within the queue bound (MUNET_MAX_INFLIGHT=6)
            codes = list(pool.map(lambda j: predict(server, j[0], [imgs[j[1]]] * 2)[0], jobs))
        assert set(codes) == {200}
        if metric(server, "munet_stage_runs_saved_total") > saved0:
            break
    assert metric(server, "munet_stage_runs_saved_total") > saved0, "no batch ever mixed requests"
    single = metric(server, "munet_batch_tasks_bucket", {"le": "1.0"})
    assert metric(server, "munet_batch_tasks_count") > single  # some batch held several tasks


def test_hot_swap_by_sql_poll_under_load_and_a_refused_swap(server_a):
    server, system, paths = server_a
    with ClientLoop(server, "alpha", 3) as loop:
        time.sleep(1.0)
        res = commit_variant(system, "alpha", seed=21, score=0.8)
        assert res.moved
        took = loop.wait_for(res.path_id, timeout=10)
        assert took is not None, server.log()
        # A path whose probe logits do not match is refused: the old one keeps serving.
        bad = commit_variant(system, "alpha", seed=22, score=0.9, tamper_probe=True)
        assert bad.moved
        time.sleep(2.5)
        recent = {p for at, p in loop.seen if at > time.time() - 1.0}
    assert not loop.failures, loop.failures[:3]
    assert recent == {res.path_id}
    assert len(loop.seen) > 20
    code, st = server.get("/status")
    assert st["tasks"]["alpha"]["serving_path_id"] == res.path_id and st["tasks"]["alpha"]["live_path_id"] == bad.path_id
    assert "probe_mismatch" in st["tasks"]["alpha"]["error"]
    assert metric(server, "munet_swap_failures_total", {"task": "alpha", "reason": "probe_mismatch"}) == 1
    assert metric(server, "munet_swaps_total", {"task": "alpha"}) == 2
    assert metric(server, "munet_swap_latency_seconds_count") >= 1


def test_task_submission_with_a_token(server_a):
    server, system, _ = server_a
    data, ctype = multipart({"name": "zeta"}, [("file", "zeta.npz", npz_bytes(3, seed=9))])
    code, body, _ = server.request("POST", "/tasks", data, {"Content-Type": ctype})
    assert code == 401 and body["error"] == "unauthorized"
    code, body, _ = server.request("POST", "/tasks", data, {"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
    assert code == 201 and body["name"] == "zeta" and body["status"] == "queued", body
    # the web page's new-task message reads the validation share from this answer
    assert body["n_train"] < 2000 and body["val_fraction"] == 0.25, body
    code, body, _ = predict(server, "zeta", [png_b64(squares(1, 3)[0][0])])
    assert code == 409 and body["error"] == "no_live_path"
    res = commit_variant(system, "zeta", seed=31, score=0.5)
    deadline = time.time() + 10
    while time.time() < deadline:
        code, body, _ = predict(server, "zeta", [png_b64(squares(1, 3)[0][0])])
        if code == 200:
            break
        time.sleep(0.2)
    assert code == 200 and body["path_id"] == res.path_id
    code, body = server.get("/tasks/zeta")
    assert body["live_path"]["id"] == res.path_id
    code, body, _ = server.request("DELETE", "/tasks/zeta", headers={"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and body["status"] == "deleted"
    code, body, _ = predict(server, "zeta", [png_b64(squares(1, 3)[0][0])])
    assert code == 404


def test_overload_answers_503_with_retry_after(server_a):
    server, _, _ = server_a
    batch = [png_b64(squares(1, 4, seed=i)[0][0]) for i in range(64)]
    barrier = threading.Barrier(24)

    def one(_):
        barrier.wait()
        code, body, headers = predict(server, "beta", batch)
        return code, body, headers

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(one, range(24)))
    codes = [c for c, _, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, codes
    for code, body, headers in results:
        if code == 503:
            assert body["error"] == "overloaded" and int(headers["retry-after"]) >= 1
    assert server.get("/readyz")[0] == 200


@pytest.mark.slow
def test_end_to_end_with_the_real_evolver(server_a):
    """Submit over HTTP, let the real evolver make the first path, predict; then a better path
    swaps in while a client sends requests."""
    from munet.evolver.config import cpu_preset
    from munet.evolver.visit import Visit

    server, system, _ = server_a
    data, ctype = multipart({"name": "omega"}, [("file", "omega.npz", npz_bytes(2, n_train=60, seed=4))])
    code, body, _ = server.request("POST", "/tasks", data, {"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
    assert code == 201, body
    cfg = cpu_preset().replace(generations=1, candidates=1, max_epochs=1.0, batch_size=32)
    cfg.defaults.update({"image_size": 32})
    Visit(system, "omega", cfg, progress=False).run()
    first = system.task_json("omega")["live_path"]["id"]
    deadline = time.time() + 15
    while time.time() < deadline and predict(server, "omega", [png_b64(squares(1, 2)[0][0])])[0] != 200:
        time.sleep(0.2)
    with ClientLoop(server, "omega", 2) as loop:
        assert loop.wait_for(first, 10) is not None
        better = commit_variant(system, "omega", seed=41, score=2.0, parent_id=first)
        assert loop.wait_for(better.path_id, 10) is not None
    assert not loop.failures, loop.failures[:3]


def test_munet_predict_and_serve_commands(server_a, tmp_path):
    import json
    import subprocess
    import sys

    server, system, paths = server_a
    x = task_images(system, "gamma", n=2)
    files = []
    for i in range(2):
        f = tmp_path / f"{i}.png"
        f.write_bytes(base64.b64decode(png_b64(x[i].numpy())))
        files.append(str(f))
    proc = subprocess.run([sys.executable, "-m", "munet.cli", "predict", "gamma", *files, "--url", server.url, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["task"] == "gamma" and len(out["predictions"]) == 2
    proc = subprocess.run([sys.executable, "-m", "munet.cli", "predict", "nosuch", files[0], "--url", server.url],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "unknown_task" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "munet.cli", "serve", "--home", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "munet init" in proc.stderr


# -- server B: PostgreSQL and Redis ----------------------------------------------------------------------

def test_redis_swap_and_database_outage(pg_url, redis_url, tmp_path):
    """Redis wakes the listener (the SQL poll is slow here); with the database gone the server
    stays ready, keeps serving, and reports the outage."""
    system = System(make_settings(tmp_path, db_url=pg_url, redis_url=redis_url))
    paths = make_installation(system, {"alpha": 3, "beta": 4})
    server = Server(tmp_path, env={"MUNET_DB_URL": pg_url, "MUNET_REDIS_URL": redis_url, "MUNET_SWAP_POLL_S": "30"})
    try:
        server.start()
        deadline = time.time() + 10
        while time.time() < deadline and not server.get("/status")[1]["redis"]["connected"]:
            time.sleep(0.1)
        with ClientLoop(server, "beta", 4) as loop:
            time.sleep(0.5)
            res = commit_variant(system, "beta", seed=51, score=0.8, clone_blocks=(15,), publish=True)
            took = loop.wait_for(res.path_id, timeout=8)
        assert took is not None, server.log()
        assert not loop.failures, loop.failures[:3]

        system.engine.dispose()
        name = pg_url.rsplit("/", 1)[1]
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
        from munet.storage import signals

        signals.publish(redis_url, signals.TASKS, {"task": "alpha"})  # wakes the poller, which finds no database
        deadline = time.time() + 10
        while time.time() < deadline and server.get("/status")[1]["database"]["up"] is not False:
            time.sleep(0.2)
        code, st = server.get("/status")
        assert st["database"]["up"] is False and st["degraded"] is True
        assert server.get("/readyz")[0] == 200
        assert metric(server, "munet_db_up") == 0.0
        code, body, _ = predict(server, "alpha", [png_b64(squares(1, 3)[0][0])])
        assert code == 200 and body["path_id"] == paths["alpha"]
        code, body, headers = server.request("GET", "/tasks")
        assert code == 503 and body["error"] == "database_unavailable" and "retry-after" in headers
    finally:
        server.stop()
        system.engine.dispose()

