"""Prometheus metrics of evolver workers (served on their own port)."""
from __future__ import annotations

from prometheus_client import Counter, start_http_server

CANDIDATES = Counter("munet_evolver_candidates", "Candidates trained, by task and outcome", ["task", "outcome"])
VISITS = Counter("munet_evolver_visits", "Task visits finished, by task and outcome", ["task", "outcome"])


def start_metrics(port: int) -> None:
    start_http_server(port)
