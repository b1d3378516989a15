"""Issue 4 acceptance, end to end: the real server process, real PostgreSQL and Redis, and
a real `munet evolve` worker. Submit a task over HTTP, wait for its first live path, get
predictions, and watch the worker's better path replace it while clients keep sending
requests: zero failed requests across the swap."""
from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from munet.system import System

from conftest import make_settings
from evolver_support import digits_npz
from server_support import Server, multipart

TOKEN = "e2e-token"


def _png_b64(x: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(x.squeeze(-1)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_submit_serve_and_hot_swap_an_evolved_path_without_failing_a_request(pg_url, redis_url, tmp_path):
    system = System(make_settings(tmp_path, pg_url, redis_url))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    env = {"MUNET_DB_URL": pg_url, "MUNET_REDIS_URL": redis_url, "MUNET_API_TOKEN": TOKEN,
           "MUNET_STORE_URL": system.settings.store_url, "MUNET_DATA_URL": system.settings.data_url}
    data_file = digits_npz(tmp_path / "digits.npz", n_train=400, n_test=100)
    image = _png_b64(np.load(data_file)["x_test"][0])
    worker_env = dict(os.environ, MUNET_HOME=str(tmp_path), **env)
    worker = subprocess.Popen(
        [sys.executable, "-m", "munet.cli", "evolve", "--forever", "--preset", "cpu", "--generations", "2",
         "--candidates", "2", "--max-epochs", "1", "--image-size", "32", "--threads", "1", "--nice", "5"],
        env=worker_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    server = Server(tmp_path, env=env)
    try:
        server.start()
        body, ctype = multipart({"name": "digits"}, [("file", "digits.npz", data_file.read_bytes())])
        code, task, _ = server.request("POST", "/tasks", body, {"Content-Type": ctype, "Authorization": f"Bearer {TOKEN}"})
        assert code == 201, task
        # Clients run from submission on, so every swap, the first included, happens under
        # load. Before the task is servable a 409 no_live_path is the right answer; a 409 sent
        # after some client got a 200 is a failure, like any other non-200 or error.
        answers, stop = [], threading.Event()

        def client():
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    code, body, _ = server.post_json("/predict", {"task": "digits", "image": image}, timeout=30)
                except Exception as e:  # noqa: BLE001
                    code, body = None, repr(e)
                answers.append((sent, time.monotonic(), code, body))
                if code == 409:
                    time.sleep(0.2)

        def served():
            return [(s, r, b["path_id"]) for s, r, c, b in list(answers) if c == 200]

        threads = [threading.Thread(target=client, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        deadline = time.time() + 480
        while time.time() < deadline and len({p for _, _, p in served()}) < 2:
            assert worker.poll() is None, "the worker died"
            time.sleep(1)
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(30)
        ok = sorted(served(), key=lambda a: a[1])
        assert ok, "the worker never made the new task servable"
        first_ok = ok[0][1]
        failures = [(c, b) for s, _, c, b in answers
                    if c != 200 and not (c == 409 and b.get("error") == "no_live_path" and s < first_ok)]
        assert not failures, failures[:3]
        history = [p for i, (_, _, p) in enumerate(ok) if i == 0 or ok[i - 1][2] != p]
        assert len(history) >= 2, "no evolved path replaced the first one under load"

        # With the worker stopped the live path stays put, and the server must converge to it.
        os.killpg(worker.pid, 9)
        worker.wait()
        live = system.task_json("digits")["live_path"]
        assert live["score"] > 0
        deadline = time.time() + 30
        while time.time() < deadline:
            code, body, _ = server.post_json("/predict", {"task": "digits", "image": image})
            if code == 200 and body["path_id"] == live["id"]:
                break
            time.sleep(0.5)
        assert code == 200 and body["path_id"] == live["id"], (code, body, live["id"])
    finally:
        server.stop()
        if worker.poll() is None:
            os.killpg(worker.pid, 9)
            worker.wait()
        system.engine.dispose()
