"""Prometheus metrics of evolver workers (served on their own port, `munet evolve --metrics-port`).

`worker` is the worker's name (host:pid[:index]), so a dashboard can show candidates per
hour per worker even when one `munet evolve --workers N` process exposes N workers. Those N
workers are spawned processes: they write to a multiprocess folder that the parent's
endpoint aggregates (labels kept, so each worker stays its own series).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector

CANDIDATES = Counter("munet_evolver_candidates", "Candidates trained, by task, outcome and worker",
                     ["task", "outcome", "worker"])
VISITS = Counter("munet_evolver_visits", "Task visits finished, by task, outcome and worker", ["task", "outcome", "worker"])


def start_metrics(port: int, spawned_workers: bool = False) -> str | None:
    """Serve this process's metrics on `port`. With `spawned_workers`, serve instead what
    worker processes started after this call write; returns their folder (remove it with
    `stop_metrics`). The environment variable must be set before the workers import
    prometheus_client, which spawned processes do afresh."""
    if not spawned_workers:
        start_http_server(port)
        return None
    folder = tempfile.mkdtemp(prefix="munet-evolver-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=folder)
    start_http_server(port, registry=registry)
    return folder


def stop_metrics(folder: str | None) -> None:
    if folder:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)
