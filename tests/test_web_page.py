"""The web page at `/` in a real headless Chromium against the real server process: the tasks
table and the graph of the multitask system show what the JSON API says, the score charts mark
every swap, the page follows a swap live, classifies an uploaded image like POST /predict, and
submits a task with the token. A screenshot goes to $MUNET_ARTIFACTS (else tests/artifacts/).

Chromium comes from Debian (`chromium`, `chromium-driver`; `.ci/run` installs them) and is driven
by Selenium through /usr/bin/chromedriver; nothing is downloaded. Without it the browser test
skips, except in CI (CI=true), where it fails.
"""
from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from munet.server import overview
from munet.storage.schema import Candidate, Task
from munet.system import System

from conftest import IN_CI, make_settings
from server_support import Server, commit_variant, make_installation, png_b64, squares, squares_npz

TOKEN = "web-page-token"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
TASKS = {"alpha": 3, "beta": 4}
WAIT_S = 60  # generous: CI machines and this one under load render slowly


def artifacts_dir() -> Path:
    path = Path(os.environ.get("MUNET_ARTIFACTS") or Path(__file__).parent / "artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def evolve(system: System, first: dict[str, str]) -> None:
    """Two evolved tasks: a better path each (a cloned block), and scored candidates."""
    alpha = commit_variant(system, "alpha", seed=7, score=0.75, clone_blocks=(14,), parent_id=first["alpha"])
    beta = commit_variant(system, "beta", seed=8, score=0.625, clone_blocks=(13, 15), parent_id=first["beta"])
    with system.Session.begin() as s:
        for name, res, scores in (("alpha", alpha, (0.6, 0.75, 0.7)), ("beta", beta, (0.55, 0.625))):
            task = s.scalar(select(Task).where(Task.name == name))
            for i, score in enumerate(scores):
                s.add(Candidate(task_id=task.id, parent_path_id=first[name], path_id=res.path_id if i == 1 else None,
                                generation=i, mutations=[], hparams={}, val_curve=[score], val_acc=score, score=score,
                                outcome="improved" if i == 1 else "worse"))


# -- the JSON behind the page (PostgreSQL; the browser test reads it from SQLite) -------------------

@pytest.fixture
def pg_system(pg_url, tmp_path):
    system = System(make_settings(tmp_path, pg_url))
    yield system
    system.engine.dispose()


def test_system_graph_draws_each_live_component_once_with_its_creator(pg_system):
    system = pg_system
    first = make_installation(system, TASKS)
    evolve(system, first)
    g = overview.graph_json(system)
    paths = {t["name"]: t["components"] for t in g["tasks"]}
    comps = {c["id"]: c for c in g["components"]}
    assert len(comps) == len(g["components"]) == len(set(paths["alpha"]) | set(paths["beta"]))
    for name, ids in paths.items():
        lin = system.task_json(name)["live_path"]
        assert g["tasks"][list(paths).index(name)]["live_path_id"] == lin["id"]
        rows = [comps[c]["row"] for c in ids]
        assert rows == sorted(rows) and len(set(rows)) == len(rows), "a path runs bottom to top, one row per layer"
    shared = {c for c in comps if comps[c]["used_by"] == ["alpha", "beta"]}
    assert shared == set(paths["alpha"]) & set(paths["beta"]) and shared
    assert all(comps[c]["created_by"] is None and comps[c]["root"] == "lite0" for c in shared)
    # alpha cloned block 14 (and the final norm, and a head): created by alpha, used by alpha only
    clones = {comps[c]["name"] for c in paths["alpha"] if comps[c]["created_by"] == "alpha"}
    assert clones == {"blocks.14", "final_norm", "head"}
    assert {comps[c]["name"] for c in paths["beta"] if comps[c]["created_by"] == "beta"} == {
        "blocks.13", "blocks.15", "final_norm", "head"}
    # the same layer of both paths shares a row even where one task made its own copy
    row_of = {(comps[c]["name"], t): comps[c]["row"] for t, ids in paths.items() for c in ids}
    assert row_of[("blocks.14", "alpha")] == row_of[("blocks.14", "beta")]
    assert g["summary"]["shared_components"] == len(shared)

    h = overview.history_json(system)["tasks"]
    assert [s["score"] for s in h["alpha"]["swaps"]] == [0.5, 0.75]
    assert [s["path_id"] for s in h["beta"]["swaps"]][0] == first["beta"]
    assert [c["score"] for c in h["alpha"]["candidates"]] == [0.6, 0.75, 0.7]
    assert [c["outcome"] for c in h["beta"]["candidates"]] == ["worse", "improved"]


# -- the page in a browser ----------------------------------------------------------------------------

def _browser_or_skip():
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package")
    if missing:
        why = f"{', '.join(missing)} missing (apt-get install -y chromium chromium-driver; pip install selenium)"
        if IN_CI:
            pytest.fail(f"the browser test needs Chromium in CI: {why}")
        pytest.skip(why)


@pytest.fixture(scope="module")
def evolved_server(tmp_path_factory):
    _browser_or_skip()
    home = tmp_path_factory.mktemp("web")
    system = System(make_settings(home))
    first = make_installation(system, TASKS)
    evolve(system, first)
    server = Server(home, env={"MUNET_API_TOKEN": TOKEN})
    try:
        server.start(timeout=300)
        yield server, system, first
    finally:
        server.stop()
        system.engine.dispose()


@pytest.fixture(scope="module")
def browser(evolved_server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", "--force-device-scale-factor=1", "--lang=en-US"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, condition, what: str, timeout: float = WAIT_S):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d))
    except TimeoutException:
        raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None


def css(driver, selector):
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, selector)


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# What the page shows, read in one script run: the page redraws parts of itself on every change,
# so elements found one by one could go stale between two reads.
SNAPSHOT_JS = """
const q = (sel, root = document) => [...root.querySelectorAll(sel)];
const rows = {};
for (const tr of q('#tasks tbody tr')) {
  const cells = {};
  for (const td of q('td', tr)) cells[td.dataset.col] = {value: td.dataset.value ?? null, text: td.textContent.trim()};
  cells.swatch = getComputedStyle(tr.querySelector('.swatch')).backgroundColor;
  rows[tr.dataset.task] = cells;
}
const nodes = q('#graph g.node').map(g => ({
  id: g.dataset.id, name: g.dataset.name, created_by: g.dataset.createdBy, users: g.dataset.users.split(' '),
  params: Number(g.dataset.params), fill: getComputedStyle(g.querySelector('rect')).fill,
  y: g.querySelector('rect').getBoundingClientRect().y}));
const charts = {};
for (const svg of q('svg.score-chart'))
  charts[svg.dataset.task] = {swaps: q('circle.swap', svg).map(c => Number(c.dataset.score)), candidates: q('circle.cand', svg).length};
const pred = document.querySelector('#predict-result .prediction');
return {loaded: document.body.dataset.loaded === 'true', rows, nodes, charts,
  labels: q('#graph g.task-label').map(g => g.dataset.task), edges: q('#graph path.edge').map(e => e.dataset.task),
  prediction: pred ? {...pred.dataset, bars: q('.bar-row', pred).length} : null,
  task_result: document.querySelector('#task-result').textContent};
"""


def snapshot(driver) -> dict:
    return driver.execute_script(SNAPSHOT_JS)


def wait_page(driver, ok, what: str) -> dict:
    """The first snapshot for which ok(snapshot) holds."""
    return wait_for(driver, lambda d: page if ok(page := snapshot(d)) else None, what)


def test_web_page_shows_evolved_tasks_graph_and_predictions(evolved_server, browser, tmp_path):
    from selenium.webdriver.support.ui import Select

    server, system, _ = evolved_server
    driver = browser
    driver.get(server.url + "/")
    assert "munet" in driver.title
    page = wait_page(driver, lambda p: p["loaded"] and len(p["rows"]) == 2 and p["nodes"], "the tasks table and the graph")

    # The tasks table says what GET /tasks says.
    code, tasks = server.get("/tasks")
    assert code == 200 and [t["name"] for t in tasks] == ["alpha", "beta"]
    assert {t["name"]: t["live_path"]["score"] for t in tasks} == {"alpha": 0.75, "beta": 0.625}
    for t in tasks:
        cell, live = page["rows"][t["name"]], t["live_path"]
        assert cell["live_path"]["value"] == live["id"] and cell["live_path"]["text"].startswith(live["id"][:12])
        assert cell["status"]["text"] == t["status"] == "ready"
        for col in ("val_acc", "test_acc", "score", "accounted_params"):
            assert float(cell[col]["value"]) == pytest.approx(live[col]), col
        assert cell["val_acc"]["text"] == pct(live["val_acc"]) and cell["test_acc"]["text"] == pct(live["test_acc"])
        assert cell["score"]["text"] == f"{live['score']:.4f}"
        assert cell["accounted_params"]["text"] == f"{round(live['accounted_params']):,}"
        assert cell["classes"]["text"] == str(len(t["classes"])) == str(TASKS[t["name"]])
        assert cell["candidates_tried"]["text"] == str(t["candidates_tried"]) == {"alpha": "3", "beta": "2"}[t["name"]]
        assert cell["last_improvement"]["value"] == t["last_improvement"]
        assert cell["last_improvement"]["text"].endswith("ago")

    # The graph: one column per task, every live component once, edges from every task using it,
    # coloured by its creator (the root's in grey).
    lineages = {t["name"]: server.get(f"/tasks/{t['name']}/lineage")[1] for t in tasks}
    expected = {c["id"]: c for lin in lineages.values() for c in lin["components"]}
    nodes = {n["id"]: n for n in page["nodes"]}
    assert set(nodes) == set(expected) and len(page["nodes"]) == len(expected)
    for cid, c in expected.items():
        n = nodes[cid]
        assert (n["name"], n["created_by"], n["users"], n["params"]) == (c["name"], c["created_by"] or "", c["used_by"], c["params"])
    shared = [cid for cid, c in expected.items() if c["used_by"] == ["alpha", "beta"]]
    alone = {(c["name"], c["used_by"][0]) for c in expected.values() if c["created_by"] is None and len(c["used_by"]) == 1}
    assert alone == {("blocks.13", "alpha"), ("blocks.15", "alpha"), ("blocks.14", "beta")}  # the other made its own
    assert len(shared) == len(expected) - 7 - len(alone) > 10  # alpha made 3 components, beta 4
    assert page["labels"] == ["alpha", "beta"] and sorted(page["edges"]) == ["alpha", "beta"]
    swatch = {name: page["rows"][name]["swatch"] for name in ("alpha", "beta")}
    assert swatch["alpha"] != swatch["beta"]
    fills: dict = {}
    for cid, c in expected.items():
        fills.setdefault(c["created_by"], set()).add(nodes[cid]["fill"])
    assert fills[None] == {"rgb(163, 169, 179)"}, "the root's components are grey"
    for name in ("alpha", "beta"):
        assert fills[name] == {swatch[name]}, "a task's own components wear its colour"
    for name, lin in lineages.items():  # bottom to top: each next component of a path sits higher
        ys = [nodes[c["id"]]["y"] for c in lin["components"]]
        assert all(a > b for a, b in zip(ys, ys[1:])), name

    # One chart per task, a marker per swap (live-pointer move), a dot per scored candidate.
    for name, lin in lineages.items():
        assert page["charts"][name]["swaps"] == [h["score"] for h in lin["live_history"]]
        assert page["charts"][name]["candidates"] == {"alpha": 3, "beta": 2}[name]

    # Live: a swap committed now reaches the table, the chart and the graph without a reload.
    newer = commit_variant(system, "beta", seed=9, score=0.875, clone_blocks=(12,), parent_id=tasks[1]["live_path"]["id"])
    assert newer.moved
    page = wait_page(driver, lambda p: p["rows"]["beta"]["score"]["text"] == "0.8750" and len(p["charts"]["beta"]["swaps"]) == 3
                     and any(n["name"] == "blocks.12" and n["created_by"] == "beta" for n in p["nodes"]),
                     "beta's swap in the table, its chart and the graph")
    assert page["rows"]["beta"]["live_path"]["value"] == newer.path_id

    # Try an image: the page's answer is POST /predict's answer for the same image.
    x, _ = squares(1, TASKS["beta"], seed=21)
    png = tmp_path / "square.png"
    png.write_bytes(base64.b64decode(png_b64(x[0])))
    deadline = time.time() + WAIT_S  # the server swaps to the new path after its own poll, load and probe check
    while True:
        code, direct, _ = server.post_json("/predict", {"task": "beta", "image": png_b64(x[0])})
        assert code == 200, direct
        if direct["path_id"] == newer.path_id or time.time() > deadline:
            break
        time.sleep(0.5)
    Select(css(driver, "#predict-task")[0]).select_by_value("beta")
    css(driver, "#predict-file")[0].send_keys(str(png))
    css(driver, "#predict-go")[0].click()
    pred = wait_page(driver, lambda p: p["prediction"], "a prediction")["prediction"]
    assert pred["class"] == direct["predictions"][0]["class"]
    assert pred["path"] == direct["path_id"] == newer.path_id
    assert float(pred["score"]) == pytest.approx(direct["predictions"][0]["score"], abs=1e-4)
    assert pred["bars"] == TASKS["beta"]

    # Submit a task: refused without the right token, queued with it, then listed in the table.
    data = squares_npz(tmp_path / "gamma.npz", 2, seed=5)
    css(driver, "#task-name")[0].send_keys("gamma")
    css(driver, "#task-file")[0].send_keys(str(data))
    css(driver, "#task-token")[0].send_keys("wrong")
    css(driver, "#task-go")[0].click()
    wait_page(driver, lambda p: "unauthorized" in p["task_result"], "the refusal of a wrong token")
    assert "gamma" not in [t["name"] for t in server.get("/tasks")[1]]
    token = css(driver, "#task-token")[0]
    token.clear()
    token.send_keys(TOKEN)
    css(driver, "#task-go")[0].click()
    wait_page(driver, lambda p: "queued" in p["task_result"], "the submitted task")
    assert "gamma" in [t["name"] for t in server.get("/tasks")[1]]
    wait_page(driver, lambda p: "gamma" in p["rows"], "gamma in the table")

    # The whole page as a CI artefact, and a clean console.
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(height + 120, 6000))
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)
    shot = artifacts_dir() / "web_page.png"
    driver.save_screenshot(str(shot))
    assert shot.stat().st_size > 20_000
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "status of 401" not in e["message"]]
    assert not errors, errors
