"""Server library tests, in process: cross-task batching, the swap listener, image decoding,
and the REST API (FastAPI TestClient with the executor in process). The real server
process is tested in test_server_http.py."""
from __future__ import annotations

import base64
import io
import json
import pickle
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client import REGISTRY

from munet.evolver.train import logits as evaluator_logits
from munet.server import api, images
from munet.server.executor import Executor, Item, run_shared
from munet.server.swap import LocalBackend, SwapListener
from munet.system import System

from conftest import make_settings
from server_support import commit_variant, make_installation, multipart, npz_bytes, png_b64, squares, task_images


@pytest.fixture(scope="module")
def install(tmp_path_factory):
    home = tmp_path_factory.mktemp("srv")
    system = System(make_settings(home))
    paths = make_installation(system)
    yield system, paths
    system.engine.dispose()


@pytest.fixture(scope="module")
def served(install):
    system, paths = install
    executor = Executor(grace=0.0)
    listener = SwapListener(system, executor, poll_interval=3600)
    listener.sync()
    assert set(executor.table.current) == set(paths)
    return system, executor, listener


def sample(name: str, value: str, labels: dict | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


# -- cross-task batching -----------------------------------------------------------------------------

def test_mixed_batch_matches_single_requests_and_runs_shared_stages_once(served):
    system, executor, _ = served
    table = executor.table
    tasks = ["alpha", "beta", "gamma", "alpha"]
    xs = [squares(3 + i, 3, seed=10 + i)[0] for i in range(len(tasks))]
    requests = [(table.current[t], torch.from_numpy(x)) for t, x in zip(tasks, xs)]

    alone = [executor.run_paths([r])[0] for r in requests]
    calls: dict[str, int] = {}
    hooks = []
    for cid, module in executor.cache.items():
        hooks.append(module.register_forward_hook(lambda m, i, o, cid=cid: calls.__setitem__(cid, calls.get(cid, 0) + 1)))
    try:
        mixed = executor.run_paths(requests)
    finally:
        for h in hooks:
            h.remove()
    for a, b in zip(alone, mixed):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-4, rtol=0)
        assert torch.equal(a.argmax(1), b.argmax(1))
    # Every component ran exactly once in the mixed batch, even those all three paths share.
    assert calls and all(n == 1 for n in calls.values()), calls
    ids = {t: table.current[t].ids for t in ("alpha", "beta", "gamma")}
    everyone = set(ids["alpha"]) & set(ids["beta"]) & set(ids["gamma"])
    assert len(everyone) >= 3 and all(calls[c] == 1 for c in everyone)
    # The stem and the first blocks are shared by all three: one run instead of three (plus the
    # repeated alpha request), so the saved count is positive.
    executor.infer([Item(t, x[0]) for t, x in zip(tasks, xs)])
    assert executor.last_stats.saved > 0


def test_run_shared_with_different_image_sizes_keeps_groups_apart(served):
    _, executor, _ = served
    s = executor.table.current["alpha"]
    x32 = torch.randn(2, 3, 32, 32)
    x48 = torch.randn(3, 3, 48, 48)
    out = run_shared([(s.ids, s.path.modules, x32), (s.ids, s.path.modules, x48)])
    assert out[0].shape == (2, 3) and out[1].shape == (3, 3)
    torch.testing.assert_close(out[1], run_shared([(s.ids, s.path.modules, x48)])[0], atol=1e-4, rtol=0)


def test_executor_results_equal_the_evaluators_logits_with_folded_channels_last_weights(served):
    system, executor, _ = served
    x = task_images(system, "beta", n=6)
    srv = executor.table.current["beta"]
    path, _ = system.load_path(srv.path_id)  # as the evolver has it: BatchNorms not folded
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in path.modules[1].modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in srv.path.modules[1].modules())  # served: folded
    convs = [m for mod in srv.path.modules for m in mod.modules() if isinstance(m, torch.nn.Conv2d)
             and m.in_channels // m.groups > 1 and m.kernel_size != (1, 1)]  # else both layouts coincide
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) and not c.weight.is_contiguous()
                         for c in convs)
    ref = torch.softmax(evaluator_logits(path.modules, x, srv.image_size, path.mean, path.std, 6, "cpu"), 1)
    results = executor.infer([Item("beta", x[i].numpy(), top=4) for i in range(6)])
    for i, r in enumerate(results):
        assert r.error is None and r.path_id == srv.path_id
        probs = dict(r.top)
        assert r.top[0][0] == int(ref[i].argmax())
        for label in range(4):
            assert abs(probs[label] - float(ref[i, label])) < 1e-4


def test_infer_reports_unknown_tasks_and_bad_pixels_per_item(served):
    _, executor, _ = served
    good = squares(1, 3)[0][0]
    out = executor.infer([Item("nope", good), Item("alpha", np.zeros((2, 2), np.uint8)), Item("alpha", good)])
    assert out[0].error == "unknown_task" and out[1].error == "invalid_image" and out[2].error is None


# -- swap listener ------------------------------------------------------------------------------------

def test_swap_loads_only_missing_components_and_releases_unused_ones(served):
    system, executor, listener = served
    before = executor.table.current["gamma"]
    cached = set(executor.cache)
    res = commit_variant(system, "gamma", seed=7, score=0.9, drop_blocks=(2,))
    assert res.moved
    swaps = sample("munet_swaps_total", "", {"task": "gamma"})
    listener.sync()
    after = executor.table.current["gamma"]
    assert after.path_id == res.path_id != before.path_id
    assert sample("munet_swaps_total", "", {"task": "gamma"}) == swaps + 1
    # Only the new clones were built; the shared root components are the same module objects.
    new = [c for c in after.ids if c not in cached]
    assert len(new) == 2  # final_norm and head
    for cid in set(after.ids) & set(before.ids):
        assert executor.cache[cid] is before.path.modules[before.ids.index(cid)]
    # The old path retires (grace 0 here) and its private components are released.
    listener.sync()
    private_old = set(before.ids) - set(after.ids)
    assert before.path_id not in executor.table.held
    assert not private_old & set(executor.cache)


def test_probe_check_tolerates_rounding_relative_to_the_largest_logit_and_refuses_more(client, served):
    system, executor, listener = served
    system.add_task("zeta", npz_bytes(2, seed=5), filename="z.npz")  # its own task: others' live paths stay
    commit_variant(system, "zeta", seed=30, score=0.5)
    # Differences of 5e-5 x max |logit| (above 1e-4 for the small logits of a large-logit
    # path) are float32 rounding, not a wrong weight: served.
    near = commit_variant(system, "zeta", seed=31, score=0.6, probe_shift=5e-5)
    listener.sync()
    assert executor.table.current["zeta"].path_id == near.path_id
    commit_variant(system, "zeta", seed=32, score=0.7, probe_shift=2e-3)
    listener.sync()
    assert executor.table.current["zeta"].path_id == near.path_id
    assert "probe_mismatch" in (executor.table.tasks["zeta"].error or "")
    assert client.delete("/tasks/zeta", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    listener.sync()


def test_failed_swap_keeps_the_old_path_and_counts_an_error(served):
    system, executor, listener = served
    old = executor.table.current["alpha"].path_id
    failures = sample("munet_swap_failures_total", "", {"task": "alpha", "reason": "probe_mismatch"})
    res = commit_variant(system, "alpha", seed=8, score=0.95, tamper_probe=True)
    assert res.moved
    listener.sync()
    assert executor.table.current["alpha"].path_id == old
    assert sample("munet_swap_failures_total", "", {"task": "alpha", "reason": "probe_mismatch"}) == failures + 1
    assert "probe_mismatch" in (executor.table.tasks["alpha"].error or "")
    listener.sync()  # a refused path is not retried
    assert sample("munet_swap_failures_total", "", {"task": "alpha", "reason": "probe_mismatch"}) == failures + 1
    status = listener.status()
    assert status["tasks"]["alpha"]["serving_path_id"] == old
    assert status["failures"][0]["reason"] == "probe_mismatch"
    # A better, honest path replaces it.
    good = commit_variant(system, "alpha", seed=9, score=0.97)
    listener.sync()
    assert executor.table.current["alpha"].path_id == good.path_id


def test_listener_keeps_serving_when_the_database_is_unreachable(served, tmp_path):
    system, executor, _ = served
    broken = System(make_settings(tmp_path, db_url=f"sqlite:///{tmp_path}/missing/dir/db.sqlite"))
    listener = SwapListener(broken, executor, poll_interval=3600)
    table = executor.table
    out = listener.sync()
    assert out == {"db_up": False} and executor.table is table
    assert sample("munet_db_up", "") == 0.0
    assert listener.status()["degraded"] is True


# -- images ---------------------------------------------------------------------------------------

def _encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "LA", "P", "1", "I;16", "I", "F", "CMYK"])
def test_decode_any_mode(mode):
    fmt = {"CMYK": "JPEG", "F": "TIFF", "I": "TIFF"}.get(mode, "PNG")
    im = Image.new(mode, (7, 5))
    data = _encode(im, fmt)
    for channels in (1, 3):
        x = images.decode(data, channels)
        assert x.dtype == np.uint8 and x.shape == (5, 7, channels)


def test_decode_sixteen_bit_scales_and_alpha_composites_on_black():
    im = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert images.decode(_encode(im), 1).max() == 255
    rgba = Image.new("RGBA", (3, 3), (255, 255, 255, 0))
    assert images.decode(_encode(rgba), 3).max() == 0


def test_decode_first_frame_of_an_animation():
    frames = [Image.new("L", (4, 4), v) for v in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert images.decode(buf.getvalue(), 1).max() < 100


def test_decode_refuses_bad_input():
    with pytest.raises(images.ImageError, match="not an image"):
        images.decode(b"hello world")
    png = _encode(Image.new("RGB", (64, 64), (1, 2, 3)))
    with pytest.raises(images.ImageError):
        images.decode(png[: len(png) // 2])
    with pytest.raises(images.ImageError, match="pixels"):
        images.decode(png, max_pixels=100)
    with pytest.raises(images.ImageError, match="empty"):
        images.decode(b"")
    # A header that claims a huge image is refused before any pixel is decoded.
    big = _encode(Image.new("1", (10_000, 5_000)))
    with pytest.raises(images.ImageError, match="more than"):
        images.open_image(big)
    with pytest.raises(images.ImageError, match="base64"):
        images.b64decode("not base64 !!")


def test_b64_accepts_data_urls_and_urlsafe():
    png = _encode(Image.new("L", (2, 2)))
    assert images.b64decode("data:image/png;base64," + base64.b64encode(png).decode()) == png
    assert images.b64decode(base64.urlsafe_b64encode(png).decode().rstrip("=")) == png


# -- REST API in process --------------------------------------------------------------------------

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def client(served):
    system, executor, listener = served
    app = api.create_app()
    limits = api.Limits(max_images=4, max_body_bytes=200_000, max_upload_bytes=2_000_000, route_refresh_s=0.05)
    app.state.gateway = api.Gateway(LocalBackend(executor, listener), system, limits, api_token=TOKEN)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def img(task_classes: int = 3, seed: int = 0) -> str:
    return png_b64(squares(1, task_classes, seed=seed)[0][0])


def assert_error(resp, status: int, error: str | None = None):
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error", "detail"} and isinstance(body["detail"], str), body
    if error:
        assert body["error"] == error, body


def test_predict_in_process(client, served):
    _, executor, _ = served
    r = client.post("/predict", json={"task": "beta", "images": [img(4), img(4, 1)], "top": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["task"] == "beta" and body["path_id"] == executor.table.current["beta"].path_id
    assert len(body["predictions"]) == 2
    p = body["predictions"][0]
    assert set(p) == {"label", "class", "score", "top"} and p["class"] == f"class_{p['label']}"
    assert len(p["top"]) == 2 and set(p["top"][0]) == {"class", "label", "score"}
    data, ctype = multipart({"task": "beta", "top": "1"}, [("files", "a.png", base64.b64decode(img(4)))])
    r = client.post("/predict/upload", content=data, headers={"Content-Type": ctype})
    assert r.status_code == 200, r.text
    assert len(r.json()["predictions"][0]["top"]) == 1


@pytest.mark.parametrize("payload,status,error", [
    ({"task": "alpha"}, 400, "invalid_request"),
    ({"image": "x"}, 400, "invalid_request"),
    ({"task": "alpha", "image": 5}, 400, "invalid_request"),
    ({"task": "alpha", "image": ["a"]}, 400, "invalid_request"),
    ({"task": "alpha", "image": "AAAA", "images": ["AAAA"]}, 400, "invalid_request"),
    ({"task": "alpha", "image": "AAAA", "extra": 1}, 400, "invalid_request"),
    ({"task": "alpha", "images": []}, 400, "invalid_request"),
    ({"task": "alpha", "image": "AAAA", "top": 0}, 400, "invalid_request"),
    ({"task": "alpha", "image": "AAAA", "top": "3"}, 400, "invalid_request"),
    ({"task": "Bad Name!", "image": "AAAA"}, 400, "invalid_request"),
    ({"task": "alpha", "image": "@@@@"}, 400, "invalid_image"),
    ({"task": "alpha", "image": base64.b64encode(b"GIF89a-not-really").decode()}, 400, "invalid_image"),
    ({"task": "nosuchtask", "image": "AAAA"}, 404, "unknown_task"),
    ({"task": "alpha", "images": ["AAAA"] * 5}, 413, "too_many_images"),
    ([1, 2, 3], 400, "invalid_request"),
    ("just a string", 400, "invalid_request"),
    (None, 400, "invalid_request"),
])
def test_predict_errors(client, payload, status, error):
    assert_error(client.post("/predict", json=payload), status, error)


def test_predict_body_errors(client):
    assert_error(client.post("/predict", content=b"{not json", headers={"Content-Type": "application/json"}), 400)
    assert_error(client.post("/predict", content=b"\xff\xfe\x00", headers={"Content-Type": "application/json"}), 400)
    # A pickled body is never unpickled: it is just bytes that are not JSON.
    evil = pickle.dumps({"task": "alpha", "image": "AAAA"})
    assert_error(client.post("/predict", content=evil, headers={"Content-Type": "application/vnd.bentoml+pickle"}), 400)
    big = json.dumps({"task": "alpha", "image": "A" * 300_000}).encode()
    assert_error(client.post("/predict", content=big, headers={"Content-Type": "application/json"}), 413,
                 "payload_too_large")

    def chunks():  # no Content-Length: the running count stops it
        for _ in range(30):
            yield b" " * 10_000

    assert_error(client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"}), 413)
    assert_error(client.get("/predict"), 405, "method_not_allowed")
    assert_error(client.get("/no/such/route"), 404, "not_found")


def test_predict_pixel_cap_is_413(client, served):
    system, executor, listener = served
    app = api.create_app()
    app.state.gateway = api.Gateway(LocalBackend(executor, listener), system,
                                    api.Limits(max_request_pixels=1000, route_refresh_s=0.05))
    with TestClient(app) as c:
        assert_error(c.post("/predict", json={"task": "alpha", "image": img()}), 413, "too_many_pixels")


def test_task_without_a_live_path_is_409(client, served):
    system, _, listener = served
    system.add_task("pending", npz_bytes(2), filename="p.npz")
    listener.sync()
    assert_error(client.post("/predict", json={"task": "pending", "image": img()}), 409, "no_live_path")
    assert "queued" in client.post("/predict", json={"task": "pending", "image": img()}).json()["detail"]


def test_task_routes_and_auth(client, served):
    system, executor, listener = served
    data, ctype = multipart({"name": "delta"}, [("file", "delta.npz", npz_bytes(3, seed=5))])
    assert_error(client.post("/tasks", content=data, headers={"Content-Type": ctype}), 401, "unauthorized")
    bad = {"Content-Type": ctype, "Authorization": "Bearer wrong"}
    assert_error(client.post("/tasks", content=data, headers=bad), 401)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/tasks", content=data, headers={"Content-Type": ctype, **auth})
    assert r.status_code == 201, r.text
    assert r.json()["name"] == "delta" and r.json()["status"] == "queued" and r.json()["live_path"] is None
    assert_error(client.post("/tasks", content=data, headers={"Content-Type": ctype, **auth}), 409, "task_exists")
    data2, ctype2 = multipart({"name": "Bad Name"}, [("file", "x.npz", npz_bytes(2))])
    assert_error(client.post("/tasks", content=data2, headers={"Content-Type": ctype2, **auth}), 400, "invalid_name")
    data3, ctype3 = multipart({"name": "junk"}, [("file", "x.zip", b"PK\x03\x04garbage")])
    assert_error(client.post("/tasks", content=data3, headers={"Content-Type": ctype3, **auth}), 400, "invalid_dataset")
    data4, ctype4 = multipart({}, [("file", "x.npz", b"12")])
    assert_error(client.post("/tasks", content=data4, headers={"Content-Type": ctype4, **auth}), 400, "invalid_request")
    big, ctype5 = multipart({"name": "huge"}, [("file", "x.npz", b"0" * 2_100_000)])
    assert_error(client.post("/tasks", content=big, headers={"Content-Type": ctype5, **auth}), 413)

    names = [t["name"] for t in client.get("/tasks").json()]
    assert {"alpha", "beta", "gamma", "delta"} <= set(names)
    view = client.get("/tasks/alpha").json()
    assert view["live_path"]["id"] == executor.table.current["alpha"].path_id
    assert {"status", "candidates_tried", "last_improvement"} <= set(view)
    assert_error(client.get("/tasks/nosuch"), 404, "unknown_task")
    assert_error(client.get("/tasks/..%2F..%2Fetc"), 404)

    lin = client.get("/tasks/beta/lineage").json()
    assert lin["live_path_id"] == executor.table.current["beta"].path_id and lin["ancestry"][0]["id"] == lin["live_path_id"]
    comps = {c["name"]: c for c in lin["components"]}
    assert comps["head"]["created_by"] == "beta" and comps["stem"]["root"] == "lite0"
    assert {"alpha", "gamma"} <= set(comps["stem"]["shared_with"])
    assert comps["blocks.15"]["created_by"] == "beta" and comps["blocks.15"]["shared_with"] == []
    assert_error(client.get("/tasks/nosuch/lineage"), 404)

    # Pin (rollback) to the first path of gamma, then unpin.
    first = client.get("/tasks/gamma/lineage").json()["live_history"][0]["path_id"]
    assert_error(client.put("/tasks/gamma/pin", json={"path_id": first}), 401)
    r = client.put("/tasks/gamma/pin", json={"path_id": first}, headers=auth)
    assert r.status_code == 200 and r.json()["pinned"] and r.json()["live_path"]["id"] == first
    assert executor.table.current["gamma"].path_id == first
    assert_error(client.put("/tasks/gamma/pin", json={"path_id": "0" * 32}, headers=auth), 400, "invalid_pin")
    assert_error(client.put("/tasks/gamma/pin", json={"path_id": "zz"}, headers=auth), 400, "invalid_request")
    assert client.delete("/tasks/gamma/pin", headers=auth).json()["pinned"] is False

    assert_error(client.delete("/tasks/delta"), 401)
    r = client.delete("/tasks/delta", headers=auth)
    assert r.status_code == 200 and r.json()["status"] == "deleted"
    assert_error(client.delete("/tasks/delta", headers=auth), 404)
    assert "delta" not in [t["name"] for t in client.get("/tasks").json()]


def test_deleted_task_stops_serving(client, served):
    system, executor, listener = served
    system.add_task("epsilon", npz_bytes(2, seed=3), filename="e.npz")
    commit_variant(system, "epsilon", seed=11, score=0.5)
    listener.sync()
    assert client.post("/predict", json={"task": "epsilon", "image": img(2)}).status_code == 200
    r = client.delete("/tasks/epsilon", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200
    assert "epsilon" not in executor.table.current
    assert_error(client.post("/predict", json={"task": "epsilon", "image": img(2)}), 404, "unknown_task")


def test_status_and_openapi(client):
    st = client.get("/status").json()
    assert st["ready"] is True and st["database"]["up"] is True and st["gateway"]["auth"] is True
    doc = client.get("/openapi.json").json()
    assert {"/predict", "/predict/upload", "/tasks", "/tasks/{name}", "/tasks/{name}/lineage", "/status"} <= set(doc["paths"])
    schema = doc["components"]["schemas"]["PredictRequest"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["images"]["anyOf"][0]["maxItems"] == 1024
    page = client.get("/ui")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "lineage" in page.text


def test_token_compare():
    assert api.check_token("Bearer abc", "abc") and api.check_token("bearer abc", "abc")
    assert not api.check_token("Bearer abd", "abc") and not api.check_token("abc", "abc")
    assert not api.check_token(None, "abc") and not api.check_token("Basic abc", "abc")
    assert not api.check_token("Bearer \udcff", "abc")


def test_bentofile_names_the_service():
    import importlib
    from pathlib import Path

    import yaml

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "bentofile.yaml").read_text())
    module, attr = spec["service"].split(":")
    svc = getattr(importlib.import_module(module), attr)
    assert svc.name == "Munet"
    assert [d.on.name for d in svc.dependencies.values()] == ["MunetExecutor"]
    # The executor's batchable API takes exactly one batch parameter.
    infer = svc.dependencies["executor"].on.apis["infer"]
    assert infer.batchable and list(infer.input_spec.model_fields) == ["items"]


def test_redis_outage_leaves_sql_polling_working(served):
    system, executor, _ = served
    listener = SwapListener(system, executor, poll_interval=3600, redis_url="redis://127.0.0.1:1/0")
    listener.start()
    try:
        deadline = time.time() + 10
        while time.time() < deadline and not listener.redis_error:
            time.sleep(0.05)
        assert listener.redis_error and not listener.redis_connected
        assert listener.ready.wait(10)  # the first SQL poll ran regardless
        st = listener.status()
        assert st["redis"]["configured"] and st["degraded"] and st["database"]["up"]
    finally:
        listener.stop()


def test_no_input_makes_a_5xx(client):
    """Random bodies, content types and paths on every route: always a JSON 4xx (or 200)."""
    import random

    rng = random.Random(0)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    routes = [("POST", "/predict"), ("POST", "/predict/upload"), ("POST", "/tasks"), ("GET", "/tasks/x"),
              ("DELETE", "/tasks/alpha%00"), ("PUT", "/tasks/beta/pin"), ("GET", "/tasks/%2e%2e/lineage")]
    ctypes = ["application/json", "multipart/form-data; boundary=xyz", "multipart/form-data", "text/plain",
              "application/vnd.bentoml+pickle", "application/x-www-form-urlencoded", ""]
    bodies = [b"", b"{}", b"[]", b"null", b'{"task": "alpha", "image": null}', b'{"task": "alpha", "images": [null]}',
              b'{"task": "alpha", "image": "' + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40) + b'"}',
              b"--xyz\r\nContent-Disposition: form-data; name=\"task\"\r\n\r\nalpha\r\n--xyz--\r\n",
              b"--xyz\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a\"\r\n\r\n\x00\x01\r\n--xyz--\r\n"]
    for _ in range(150):
        method, path = rng.choice(routes)
        body = rng.choice(bodies + [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))])
        headers = {"Content-Type": rng.choice(ctypes), **(auth if rng.random() < 0.5 else {})}
        r = client.request(method, path, content=body, headers=headers)
        assert r.status_code < 500, (method, path, body[:60], r.status_code, r.text[:200])
        if r.status_code >= 400:
            assert set(r.json()) == {"error", "detail"}, r.text


def test_the_executor_hands_freed_heap_back_to_the_os():
    """Freed activations stay in glibc's heap (resident) until malloc_trim; the executor's
    trimmer returns them, rate-limited. Run in a fresh process so its heap is known."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import time
        import psutil
        from munet.server.executor import HeapTrimmer
        rss = lambda: psutil.Process().memory_info().rss
        blocks = [bytearray(64 * 1024) for _ in range(3000)]  # ~190 MB, below the mmap threshold
        keep = bytearray(64 * 1024)  # above them: free() alone cannot shrink the heap's top
        del blocks
        before = rss()
        trim = HeapTrimmer(interval=1.0)
        first, second = trim(), trim()
        print(first, second, (before - rss()) / 2**20)
        # A burst after a trim: the call within the interval is skipped, and the heap still
        # goes back once the interval is over, with no further call.
        blocks = [bytearray(64 * 1024) for _ in range(3000)]
        keep2 = bytearray(64 * 1024)
        del blocks
        before = rss()
        skipped = trim()
        time.sleep(2.5)
        print(skipped, (before - rss()) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout.split()
    assert out[:2] == ["True", "False"], out  # the second call within the interval does nothing
    assert float(out[2]) > 100, f"only {out[2]} MB of ~190 MB freed heap went back to the OS"
    assert out[3] == "False" and float(out[4]) > 100, f"the deferred trim returned only {out[4]} MB"


def test_the_executor_bounds_onednn_primitive_memory_across_many_input_shapes():
    """Mixed batches bring a new input shape per batch size and image size, and oneDNN keeps
    a compiled primitive per layer and shape (1024 by default: ~400 MB in an executor). The
    executor's default capacity (set at import, read by oneDNN at its first primitive) keeps
    that memory a fraction of the uncapped growth; an operator's own setting wins."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import ctypes, os, sys
        if sys.argv[1] != "default":
            os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = sys.argv[1]
        import torch
        import munet.server.executor  # noqa: F401
        torch.set_num_threads(1)
        conv = torch.nn.Conv2d(8, 8, 3).eval()
        anon = lambda: next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) / 1024
        trim = ctypes.CDLL("libc.so.6").malloc_trim
        with torch.no_grad():
            conv(torch.randn(1, 8, 8, 8)); trim(0); start = anon()
            for batch in range(1, 9):
                for side in range(8, 72):  # 512 shapes
                    conv(torch.randn(batch, 8, side, side))
        trim(0)
        print(os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], anon() - start)
    """)
    run = lambda arg: subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=300,
                                     check=True).stdout.split()
    (default_cap, default_mb), (own_cap, own_mb) = run("default"), run("1024")
    assert (default_cap, own_cap) == ("128", "1024")
    assert float(default_mb) < 0.6 * float(own_mb), (default_mb, own_mb)
