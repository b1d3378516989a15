"""deploy/: the Grafana dashboard, the Prometheus scrape configuration and the compose
example are well formed, and a scaled-out munet works: two evolver workers and two
servers, separate processes sharing only PostgreSQL, Redis and one layer store folder.
Every swap a worker commits reaches both servers, and every metric the dashboard queries
is exposed by a real server's /metrics or a real worker's metrics endpoint."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from conftest import _unavailable, fresh_pg_database, make_settings
from munet.storage.schema import Task, Visit
from munet.system import System
from server_support import Server, commit_variant, free_port, png_b64, squares, squares_npz

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "munet.json"

# -- PromQL metric names ------------------------------------------------------------------------

PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                   "unless", "atan2", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers left after removing strings, label
    matchers, ranges, grouping clauses and function names (followed by '('). Grafana's
    `label_values(metric, label)` counts its first argument only."""
    expr = re.sub(r"label_values\(\s*([a-zA-Z_:][\w:]*)\s*,[^)]*\)", r"\1", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)  # Grafana variables ($topk, ${datasource})
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if m.group(2) is None and m.group(1).lower() not in PROMQL_KEYWORDS:
            names.add(m.group(1))
    return names


def test_promql_metric_names_skip_functions_labels_ranges_and_grouping():
    expr = ('topk($topk, histogram_quantile(0.99, sum by (task, le) (rate(munet_request_duration_seconds_bucket'
            '{instance=~"$instance", task=~"a|b"}[$__rate_interval])))) / on (task) group_left '
            'clamp_min(munet_x_total offset 5m, 1e-9) > bool 0 and time() - up')
    assert promql_metric_names(expr) == {"munet_request_duration_seconds_bucket", "munet_x_total", "up"}
    assert promql_metric_names("label_values(munet_served_tasks, instance)") == {"munet_served_tasks"}


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, annotation and query variable."""
    out = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} target {target.get('refId')}", target.get("expr", "")))
    for ann in dashboard["annotations"]["list"]:
        if "expr" in ann:
            out.append((f"annotation {ann['name']!r}", ann["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            out.append((f"variable {var['name']!r}", query))
    return out


def all_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
    return panels


# -- static files -----------------------------------------------------------------------------

def test_dashboard_is_a_valid_grafana_dashboard_with_the_issue_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard["schemaVersion"], int) and 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], f"panel {p['title']!r} has no target"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"panel {p['title']!r} target {t['refId']} has no expr"
            assert t["datasource"]["uid"] == "${datasource}"
    for where, expr in dashboard_queries(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), where
        assert promql_metric_names(expr), f"{where} queries no metric: {expr}"
    # The issue's list, by the metric each one needs.
    queried = {n for _, expr in dashboard_queries(dashboard) for n in promql_metric_names(expr)}
    for needed in ("munet_requests_total", "munet_request_errors_total", "munet_request_duration_seconds_bucket",
                   "munet_batch_size_bucket", "munet_swaps_total", "munet_swap_latency_seconds_bucket",
                   "munet_live_path_score", "munet_live_path_accounted_params", "munet_evolver_candidates_total",
                   "munet_cache_bytes"):
        assert needed in queried, f"the dashboard shows nothing of {needed}"
    text_of = json.dumps(dashboard)
    assert "histogram_quantile(0.5," in text_of and "histogram_quantile(0.99," in text_of and "topk(" in text_of
    swaps = [a for a in dashboard["annotations"]["list"] if "munet_swaps_total" in a.get("expr", "")]
    assert swaps and swaps[0]["enable"] and swaps[0]["datasource"]["uid"] == "${datasource}"
    per_worker = [p for p in panels if "munet_evolver_candidates_total" in json.dumps(p.get("targets"))
                  and "by (worker)" in json.dumps(p.get("targets"))]
    assert per_worker, "no panel shows candidates per worker"


def test_prometheus_scrapes_the_servers_and_the_evolver_workers_on_the_compose_ports():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    ports = {}
    for job in jobs.values():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for sd in job["dns_sd_configs"]:
            for name in sd["names"]:
                assert name in compose["services"], f"{job['job_name']} scrapes {name}, which compose lacks"
                ports[name] = sd["port"]
    assert set(ports) == {"server", "evolver"}
    assert str(ports["server"]) in compose["services"]["server"]["command"]
    evolve = compose["services"]["evolver"]["command"]
    assert evolve[evolve.index("--metrics-port") + 1] == str(ports["evolver"])


def test_compose_example_has_every_service_and_shares_one_configuration():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "minio", "setup", "server", "evolver", "prometheus", "grafana"} <= set(services)
    assert services["server"]["deploy"]["replicas"] >= 2 and services["evolver"]["deploy"]["replicas"] >= 2
    gpu = services["evolver"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert "gpu" in gpu["capabilities"]
    munet_env = {}
    for role in ("setup", "server", "evolver"):
        env = services[role]["environment"]
        for key in ("MUNET_DB_URL", "MUNET_REDIS_URL", "MUNET_STORE_URL", "MUNET_DATA_URL"):
            munet_env.setdefault(key, env[key])
            assert env[key] == munet_env[key], f"{role} has another {key}"
    assert munet_env["MUNET_STORE_URL"].startswith("s3://") and munet_env["MUNET_DB_URL"].startswith("postgresql")
    mounts = " ".join(services["grafana"]["volumes"])
    assert "./grafana/munet.json" in mounts and "./grafana/provisioning" in mounts
    for path in ("grafana/provisioning/datasources/prometheus.yml", "grafana/provisioning/dashboards/munet.yml"):
        assert yaml.safe_load((DEPLOY / path).read_text())["apiVersion"] == 1
    dockerfile = services["server"]["build"]["dockerfile"]
    assert (DEPLOY.parent / dockerfile).is_file()


def test_compose_file_passes_docker_compose_config():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"docker has no compose plugin: {probe.stderr.strip()[:200]}")
    proc = subprocess.run([docker, "compose", "-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, MUNET_API_TOKEN="x"))
    assert proc.returncode == 0, proc.stderr


# -- a scaled-out munet on this machine ----------------------------------------------------------

TASKS = {"alpha": 3, "beta": 4}  # each evolved by its own worker
UNTOUCHED = "gamma"  # no worker evolves it; gets a refused swap


class Cluster:
    def __init__(self, system, servers, workers, metrics_ports, first_paths, image):
        self.system, self.servers, self.workers = system, servers, workers
        self.metrics_ports, self.first_paths, self.image = metrics_ports, first_paths, image

    def path_on(self, server: Server, task: str) -> str | None:
        code, body, _ = server.post_json("/predict", {"task": task, "image": self.image[task]}, timeout=60)
        assert code == 200, (code, body)
        return body["path_id"]

    def live(self, task: str) -> str:
        return self.system.task_json(task)["live_path"]["id"]


def _start_worker(home: Path, env: dict, task: str, port: int) -> subprocess.Popen:
    home.mkdir()
    log = open(home / "evolve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "munet.cli", "evolve", "--forever", "--task", task, "--preset", "cpu",
         "--generations", "1", "--candidates", "2", "--max-epochs", "1", "--image-size", "32", "--threads", "1",
         "--nice", "5", "--lease-ttl", "60", "--metrics-port", str(port)],
        env=dict(os.environ, MUNET_HOME=str(home), **env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    return proc


def _kill(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 9)  # nothing of a worker's state matters after the test
    proc.wait(30)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    """Tasks with a first (weak) live path, two servers up, then two workers, each with its
    own MUNET_HOME: they share PostgreSQL, Redis and the layer and data-set folders only."""
    import redis

    redis_url = os.environ.get("MUNET_TEST_REDIS", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=2).ping()
    except Exception as e:  # noqa: BLE001
        _unavailable("Redis", e)
    tmp = tmp_path_factory.mktemp("cluster")
    with fresh_pg_database() as db_url:
        shared = tmp / "shared"
        system = System(make_settings(shared, db_url, redis_url))
        system.init()
        system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
        first, image = {}, {}
        for i, (name, k) in enumerate({**TASKS, UNTOUCHED: 2}.items()):
            system.add_task(name, str(squares_npz(shared / f"{name}.npz", k, n_train=160, n_test=40, seed=i)))
            # A deliberately weak first path, so the workers' first visit beats it.
            first[name] = commit_variant(system, name, seed=10 + i, score=0.02).path_id
            image[name] = png_b64(squares(1, k, seed=99)[0][0])
        env = {"MUNET_DB_URL": db_url, "MUNET_REDIS_URL": redis_url, "MUNET_STORE_URL": system.settings.store_url,
               "MUNET_DATA_URL": system.settings.data_url,
               # Long SQL polls: within the test's waits, swaps arrive by Redis.
               "MUNET_SWAP_POLL_S": "30"}
        servers = []
        for i in range(2):
            (tmp / f"server{i}").mkdir()
            servers.append(Server(tmp / f"server{i}", env=env))
        workers, ports = [], []
        try:
            errors = []

            def start(server):
                try:
                    server.start(timeout=240)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=start, args=(s,)) for s in servers]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors[0]
            for i, task in enumerate(TASKS):
                ports.append(free_port())
                workers.append(_start_worker(tmp / f"worker{i}", env, task, ports[-1]))
            yield Cluster(system, servers, workers, ports, first, image)
        finally:
            for proc in workers:
                _kill(proc)
            stops = [threading.Thread(target=server.stop) for server in servers]
            for t in stops:
                t.start()
            for t in stops:
                t.join()
            system.engine.dispose()


def _worker_log(cluster: Cluster) -> str:
    logs = []
    for i, proc in enumerate(cluster.workers):
        path = Path(cluster.servers[0].home).parent / f"worker{i}" / "evolve.log"
        logs.append(f"--- worker {i} (exit {proc.poll()}):\n" + (path.read_text(errors="replace")[-3000:] if path.exists() else ""))
    return "\n".join(logs)


@pytest.mark.slow
def test_a_swap_committed_by_either_worker_reaches_both_servers(cluster):
    for server in cluster.servers:
        for task, first in cluster.first_paths.items():
            assert cluster.path_on(server, task) == first
    deadline = time.time() + 420
    pending = {(task, i) for task in TASKS for i in range(len(cluster.servers))}
    while pending and time.time() < deadline:
        for proc in cluster.workers:
            assert proc.poll() is None, f"a worker exited\n{_worker_log(cluster)}"
        for task, i in sorted(pending):
            live = cluster.live(task)
            if live != cluster.first_paths[task] and cluster.path_on(cluster.servers[i], task) == live:
                pending.discard((task, i))
        time.sleep(1)
    assert not pending, f"no new path of {sorted(pending)} reached the server(s)\n{_worker_log(cluster)}"
    # Each task's new path was committed by its own worker (a separate process).
    with cluster.system.Session() as s:
        for task, proc in zip(TASKS, cluster.workers):
            task_id = s.scalar(select(Task.id).where(Task.name == task))
            owners = set(s.scalars(select(Visit.worker).where(Visit.task_id == task_id)))
            assert owners and all(o.endswith(f":{proc.pid}") for o in owners), (task, owners, proc.pid)
    for server in cluster.servers:
        assert cluster.path_on(server, UNTOUCHED) == cluster.first_paths[UNTOUCHED]


def exposed_samples(url: str) -> set[str]:
    with urllib.request.urlopen(url, timeout=30) as resp:
        body = resp.read().decode()
    return {s.name for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.mark.slow
def test_every_metric_the_dashboard_queries_is_exposed_by_a_server_or_a_worker(cluster):
    server = cluster.servers[0]
    # Events behind the labelled series: an error, and a swap the server refuses (probe mismatch).
    code, _, _ = server.post_json("/predict", {"task": "no-such-task", "image": cluster.image[UNTOUCHED]})
    assert code == 404
    cluster.path_on(server, UNTOUCHED)
    commit_variant(cluster.system, UNTOUCHED, seed=77, score=0.9, tamper_probe=True, publish=True)
    deadline = time.time() + 120
    samples = set()
    while time.time() < deadline:
        samples = exposed_samples(server.url + "/metrics")
        if "munet_swap_failures_total" in samples and "munet_swap_latency_seconds_bucket" in samples:
            break
        time.sleep(1)
    # A worker exposes its counters once it has trained a candidate.
    deadline = time.time() + 300
    worker_samples = set()
    while time.time() < deadline and "munet_evolver_visits_total" not in worker_samples:
        worker_samples = set().union(*(exposed_samples(f"http://127.0.0.1:{port}/metrics")
                                       for port in cluster.metrics_ports))
        time.sleep(2)
    dashboard = json.loads(DASHBOARD.read_text())
    missing = {}
    for where, expr in dashboard_queries(dashboard):
        for name in promql_metric_names(expr) - samples - worker_samples:
            missing.setdefault(name, where)
    assert not missing, f"queried but exposed nowhere: {missing}"
    assert "munet_evolver_candidates_total" in worker_samples


def test_metrics_of_spawned_workers_reach_the_parent_endpoint_per_worker(tmp_path):
    """`munet evolve --workers N --metrics-port P`: the workers are spawned processes, so
    their counters must come through the parent's endpoint, one series per worker."""
    port = free_port()
    script = f"""
import subprocess, sys, urllib.request
from munet.evolver.metrics import start_metrics, stop_metrics
folder = start_metrics({port}, spawned_workers=True)
child = "from munet.evolver.metrics import CANDIDATES as C; C.labels(task='t', outcome='improved', worker=sys.argv[1]).inc(3)"
for name in ("w0", "w1"):
    subprocess.run([sys.executable, "-c", "import sys; " + child, name], check=True)
print(urllib.request.urlopen("http://127.0.0.1:{port}/metrics", timeout=30).read().decode())
stop_metrics(folder)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    values = {s.labels["worker"]: s.value for f in text_string_to_metric_families(proc.stdout) for s in f.samples
              if s.name == "munet_evolver_candidates_total"}
    assert values == {"w0": 3.0, "w1": 3.0}
