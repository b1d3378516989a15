"""Prometheus metrics of the server (Prometheus conventions: base units, `_total` counters).

Under `bentoml serve` every worker process (the HTTP gateway and the executor) writes to
the multiprocess directory BentoML sets in PROMETHEUS_MULTIPROC_DIR, and BentoML's own
`/metrics` aggregates them; the gauges therefore carry an explicit multiprocess mode.
Gauges of the live paths are written by the executor process only ("mostrecent").

No metric has a path or component id label (unbounded cardinality); `task` labels only
ever hold names of tasks that exist (unknown names are counted as `_unknown`, which no task
name can be because names start with a letter or digit).
"""
from __future__ import annotations

import math

from prometheus_client import Counter, Gauge, Histogram

UNKNOWN_TASK = "_unknown"

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SWAP_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0)

# -- gateway (HTTP) process ------------------------------------------------------------------
REQUESTS = Counter("munet_requests", "Prediction requests answered, by task and HTTP status code", ["task", "code"])
REQUEST_ERRORS = Counter("munet_request_errors", "Prediction requests answered with an error, by task and error code",
                         ["task", "error"])
REQUEST_LATENCY = Histogram("munet_request_duration_seconds", "Prediction request latency (decode, queue, execute)",
                            ["task"], buckets=LATENCY_BUCKETS)
IMAGES = Counter("munet_images", "Images classified, by task", ["task"])
INFLIGHT = Gauge("munet_inflight_requests", "Prediction requests being answered now", multiprocess_mode="livesum")
EXECUTOR_RETRIES = Counter("munet_executor_retries", "Executor calls the gateway sent again: the executor was down or "
                           "restarting, or an answer was lost", ["reason"])
OVERLOAD = Counter("munet_overload_rejections", "Requests refused with 503 because the queue was full or the deadline passed",
                   ["reason"])

# -- executor process --------------------------------------------------------------------------
BATCH_SIZE = Histogram("munet_batch_size", "Images per executed batch (all tasks together)", buckets=BATCH_BUCKETS)
BATCH_TASKS = Histogram("munet_batch_tasks", "Distinct tasks per executed batch", buckets=BATCH_BUCKETS)
BATCH_LATENCY = Histogram("munet_batch_duration_seconds", "Execution time of one batch (preprocess, stages, softmax)",
                          buckets=LATENCY_BUCKETS)
STAGE_RUNS = Counter("munet_stage_runs", "Component (stage) executions")
STAGE_RUNS_SAVED = Counter("munet_stage_runs_saved",
                           "Stage executions saved by running a shared stage once on the union batch")

LIVE_SCORE = Gauge("munet_live_path_score", "Validation score of the path serving a task", ["task"],
                   multiprocess_mode="mostrecent")
LIVE_VAL_ACC = Gauge("munet_live_path_val_accuracy_ratio", "Validation accuracy of the path serving a task", ["task"],
                     multiprocess_mode="mostrecent")
LIVE_TEST_ACC = Gauge("munet_live_path_test_accuracy_ratio", "Test accuracy of the path serving a task", ["task"],
                      multiprocess_mode="mostrecent")
LIVE_PARAMS = Gauge("munet_live_path_accounted_params", "Accounted parameters of the path serving a task", ["task"],
                    multiprocess_mode="mostrecent")
LIVE_SINCE = Gauge("munet_live_path_serving_since_timestamp_seconds", "When the serving path of a task went live here",
                   ["task"], multiprocess_mode="mostrecent")

SWAPS = Counter("munet_swaps", "Paths swapped in (including the first load), by task", ["task"])
SWAP_FAILURES = Counter("munet_swap_failures", "Refused or failed path loads, by task and reason (the old path keeps serving)",
                        ["task", "reason"])
SWAP_LATENCY = Histogram("munet_swap_latency_seconds", "From the commit of a live path to serving it", buckets=SWAP_BUCKETS)

SERVED_TASKS = Gauge("munet_served_tasks", "Tasks with a path in service", multiprocess_mode="mostrecent")
CACHE_COMPONENTS = Gauge("munet_cache_components", "Components held in the module cache", multiprocess_mode="mostrecent")
CACHE_BYTES = Gauge("munet_cache_bytes", "Bytes of parameters and buffers held in the module cache",
                    multiprocess_mode="mostrecent")
DB_UP = Gauge("munet_db_up", "1 when the last SQL poll of the executor succeeded, else 0", multiprocess_mode="mostrecent")
REDIS_UP = Gauge("munet_redis_up", "1 while the swap subscription to Redis is connected (0 when unset or down)",
                 multiprocess_mode="mostrecent")
LAST_POLL = Gauge("munet_last_sql_poll_timestamp_seconds", "When the executor last read the live paths from SQL",
                  multiprocess_mode="mostrecent")


def task_label(name: str | None, known: bool) -> str:
    return name if (known and name) else UNKNOWN_TASK


def set_live(task: str, score, val_acc, test_acc, params, since: float) -> None:
    for gauge, value in ((LIVE_SCORE, score), (LIVE_VAL_ACC, val_acc), (LIVE_TEST_ACC, test_acc), (LIVE_PARAMS, params)):
        gauge.labels(task=task).set(math.nan if value is None else float(value))
    LIVE_SINCE.labels(task=task).set(since)


def clear_live(task: str) -> None:
    """A task stopped being served. Multiprocess files cannot forget a series, so it is set
    to NaN (Prometheus treats NaN samples as 'no value')."""
    for gauge in (LIVE_SCORE, LIVE_VAL_ACC, LIVE_TEST_ACC, LIVE_PARAMS, LIVE_SINCE):
        gauge.labels(task=task).set(math.nan)
