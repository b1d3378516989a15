"""Issue 5 part 3: hot swap under load.

    python benchmarks/hotswap.py [--commits 50] [--clients 4] [--db pg|sqlite]

The real server (`munet serve`) serves one task, on PostgreSQL (when reachable) and a
private `redis-server`, while closed-loop clients send requests to that task without pause.
A separate committer process, at the priority of an evolver worker (nice 10), commits
`--commits` successive better paths for the task through the real commit function
(`storage.commit.commit_path`, via the server tests' `commit_variant`: 1-3 cloned top blocks,
a cloned final norm, a new head, the probe batch) and publishes each on Redis, as a worker
does. Then Redis is stopped and the same is repeated: the server falls back to SQL polling
(every 2 s, the default). Phases:

1. no swaps (baseline latency), 2. swaps with Redis, 3. swaps with Redis down.

Reported: failed requests (any answer but 200, any transport error), commit-to-serving
latency per path as clients see it (first answer carrying the new path id minus the end
of the commit transaction) and as the server measures it (`munet_swap_latency_seconds`,
and its load-and-check time from the log), and request latency p50/p99 per phase.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import SHARED_DATA, table, write  # noqa: E402
from serving import (IMAGE_SIZE, TOP_BLOCKS, Load, add_task, all_served, munet_body, munet_server,  # noqa: E402
                     new_installation, percentile, request_images, scrape, summarise, wait_until)

from munet.settings import Settings  # noqa: E402

PG_ADMIN_URL = os.environ.get("MUNET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def fresh_pg() -> tuple[str, object] | None:
    """A new, empty PostgreSQL database (URL, drop function), or None when unreachable."""
    from sqlalchemy import create_engine, text

    name = f"munet_bench_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as e:  # noqa: BLE001
        print(f"[hotswap] PostgreSQL unreachable ({e}); using SQLite", file=sys.stderr)
        return None

    def drop():
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", drop


def start_redis(port: int, folder: Path) -> subprocess.Popen:
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(folder)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def up():
        import redis

        try:
            return redis.Redis(port=port, socket_connect_timeout=1).ping()
        except redis.RedisError:
            return False
    wait_until(up, 30, "redis-server", 0.2)
    return proc


def committer(settings: dict, task: str, count: int, spacing: tuple[float, float], first_score: float,
              step: float, parent: str, seed: int, out) -> None:
    """Commit `count` better paths one after another (a worker's commits, at its priority)."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    import torch

    from server_support import commit_variant

    from munet.storage import signals
    from munet.system import System

    os.nice(10)
    torch.set_num_threads(1)
    system = System(Settings(**settings))
    rng = random.Random(seed)
    done = []
    try:
        for j in range(count):
            time.sleep(rng.uniform(*spacing))
            score = first_score + step * j
            res = commit_variant(system, task, seed=seed * 1000 + j, score=score,
                                 clone_blocks=TOP_BLOCKS[:1 + j % 3], image_size=IMAGE_SIZE, parent_id=parent)
            committed = time.time()  # the commit transaction has ended
            message = dict(signals.swap_message(task, res.path_id, score), committed_at=committed)
            published = signals.publish(settings["redis_url"], signals.SWAPS, message)
            done.append({"path_id": res.path_id, "committed_at": committed, "moved": res.moved,
                         "published": published})
            parent = res.path_id
    finally:
        system.engine.dispose()
        out.put(done)


def run_commits(settings: Settings, task: str, count: int, spacing, first_score: float, step: float, parent: str,
                seed: int) -> list[dict]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=committer, args=(asdict(settings), task, count, spacing, first_score, step, parent, seed, q))
    p.start()
    done = q.get(timeout=count * 60 + 120)
    p.join(30)
    return done


def histogram_delta(before: dict, after: dict, name: str) -> dict:
    """Bucket counts of a Prometheus histogram between two scrapes: {le: count}."""
    out = {}
    for key, v in after.items():
        m = re.fullmatch(rf"{name}_bucket\{{le=([^,}}]+)\}}", key)
        if m:
            out[m.group(1)] = v - before.get(key, 0.0)
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def bucket_quantile(buckets: dict, q: float) -> str | None:
    """The upper bound of the bucket holding quantile q (histograms only bound it)."""
    total = buckets.get("+Inf", 0)
    if not total:
        return None
    for le, count in buckets.items():
        if count >= q * total:
            return f"<= {le} s"
    return None


def load_times(log: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r"now served by path ([0-9a-f]+) .*?; ([0-9.]+)s to load and check", log)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commits", type=int, default=50)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--baseline-seconds", type=float, default=20.0)
    ap.add_argument("--db", choices=["pg", "sqlite"], default="pg")
    ap.add_argument("--route-refresh-s", type=float, default=None,
                    help="the gateway's route-table refresh (MUNET_ROUTE_REFRESH_S; server default 0.5 s)")
    ap.add_argument("--name", default="hotswap", help="result file name")
    ap.add_argument("--keep-log", default=None, help="copy the server log here")
    args = ap.parse_args()
    if not SHARED_DATA.exists():
        sys.exit(f"benchmark data not found at {SHARED_DATA}")
    from server_support import free_port

    pg = fresh_pg() if args.db == "pg" else None
    redis_port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        settings = Settings(home=tmp, db_url=pg[0] if pg else f"sqlite:///{tmp}/munet.db", store_url=f"{tmp}/layers",
                            data_url=f"{tmp}/datasets", redis_url=redis_url, api_token=None)
        redis_proc = start_redis(redis_port, home)
        server = system = None
        try:
            system = new_installation(tmp, settings)
            task = add_task(system, 3, private_blocks=1)  # an mnist subset
            first = system.task_json(task)["live_path"]
            images = request_images(system, [task])
            env = {"MUNET_DB_URL": settings.db_url, "MUNET_REDIS_URL": redis_url}
            if args.route_refresh_s is not None:
                env["MUNET_ROUTE_REFRESH_S"] = str(args.route_refresh_s)
            server = munet_server(home, env)
            server.start(timeout=300)
            wait_until(lambda: all_served(server, [task]), 300, "the first path to be served")
            Load(server.url + "/predict", munet_body(images, [task]), clients=args.clients, seconds=3).run()

            answers: list[tuple[float, float, int]] = []  # (end time, latency, status)
            first_seen: dict[str, float] = {}

            def on_answer(_task, status, raw, t_end, latency):
                answers.append((t_end, latency, status))
                if status == 200:
                    pid = json.loads(raw)["path_id"]
                    first_seen.setdefault(pid, t_end)

            load = Load(server.url + "/predict", munet_body(images, [task]), clients=args.clients,
                        on_answer=on_answer).start()
            windows, commits, swap_hist = {}, {}, {}
            t = time.time()
            time.sleep(args.baseline_seconds)
            windows["no swaps"] = (t, time.time())
            parent, score = first["id"], first["score"]  # each commit beats the live path
            for phase, spacing in (("swaps, Redis", (1.0, 2.0)), ("swaps, Redis down (SQL polling)", (2.5, 3.5))):
                if "down" in phase:
                    redis_proc.terminate()
                    redis_proc.wait(10)
                    wait_until(lambda: not server.get("/status")[1]["redis"]["connected"], 60, "the server to notice")
                print(f"[hotswap] {phase}: {args.commits} commits", file=sys.stderr)
                before = scrape(server.url)
                t = time.time()
                done = run_commits(settings, task, args.commits, spacing, score + 0.001, 0.001, parent,
                                   seed=len(commits) + 1)
                wait_until(lambda: all_served(server, [task]), 60, "the last path to be served")
                time.sleep(2)
                windows[phase] = (t, time.time())
                swap_hist[phase] = histogram_delta(before, scrape(server.url), "munet_swap_latency_seconds")
                commits[phase] = done
                parent, score = done[-1]["path_id"], score + 0.001 * args.commits
            result = load.stop()
            log = (home / f"server-{server.port}.log").read_text(errors="replace")
            if args.keep_log:
                Path(args.keep_log).write_text(log)
        finally:
            if server is not None:
                server.stop()
            if redis_proc.poll() is None:
                redis_proc.terminate()
                redis_proc.wait(10)
            if system is not None:
                system.engine.dispose()
            if pg:
                pg[1]()
    report(args, result, answers, windows, commits, first_seen, swap_hist, load_times(log), bool(pg))


def report(args, result, answers, windows, commits, first_seen, swap_hist, loads, on_pg: bool) -> None:
    rows = []
    for phase, (a, b) in windows.items():
        lat = [lt for t, lt, st in answers if a <= t < b and st == 200]
        failed = sum(1 for t, _, st in answers if a <= t < b and st != 200)
        row = {"phase": phase, **{k: v for k, v in summarise(lat, b - a, []).items() if k in ("requests", "rps", "p50_ms", "p99_ms")},
               "failed": failed}
        done = commits.get(phase)
        if done:
            seen = [first_seen[c["path_id"]] - c["committed_at"] for c in done if c["path_id"] in first_seen]
            row.update({"commits": len(done), "served": len(seen), "swap_p50_s": percentile(seen, 50),
                        "swap_p99_s": percentile(seen, 99), "swap_max_s": max(seen) if seen else None,
                        "load_check_p50_s": percentile([loads[c["path_id"]] for c in done if c["path_id"] in loads], 50),
                        "server_metric_p99": bucket_quantile(swap_hist.get(phase, {}), 0.99)})
        rows.append(row)
    print(f"\nHot swap under load: {args.clients} closed-loop clients on one task, {args.commits} commits per phase, "
          f"{'PostgreSQL' if on_pg else 'SQLite'}\n")
    print(table(rows, ["phase", "requests", "rps", "failed", "p50_ms", "p99_ms", "commits", "served", "swap_p50_s",
                       "swap_p99_s", "swap_max_s", "load_check_p50_s", "server_metric_p99"]))
    print(f"\nAll phases: {result['requests']} answered, {result['errors']} failed {result['error_samples']}")
    slowest = sorted(answers, key=lambda a: -a[1])[:5]
    path = write(args.name, {"args": vars(args), "database": "postgresql" if on_pg else "sqlite", "rows": rows,
                             "failed_requests": result["errors"], "failure_samples": result["error_samples"],
                             "swap_latency_histograms": swap_hist, "commits": commits,
                             "first_seen": first_seen, "load_and_check_s": loads,
                             "slowest_answers": [{"at": t, "latency_s": lt, "status": st} for t, lt, st in slowest]})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
