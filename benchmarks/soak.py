"""Soak (issue 6, a benchmark, not a CI test): N minutes of mixed-task load against the real
server while an evolver worker keeps committing and a private Redis is restarted
periodically. Reports requests served, errors, swaps seen, and the server's resident
memory over time (target: flat, no growth beyond 10% after warm-up).

    python benchmarks/soak.py                 # 30 minutes
    python benchmarks/soak.py --minutes 3     # a short check

Three digits tasks (scikit-learn's, no download) start without a path; the evolver makes
their first paths and improves them. Warm-up ends once every task is served and the
first Redis restart is over (at least 20% of the run): RSS growth is measured from there.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fault_support import LoadLoop, PrivateRedis  # noqa: E402
from server_support import Server, png_b64  # noqa: E402

from _common import table, write  # noqa: E402

TASKS = ["d0", "d1", "d2"]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and all its children (the server's BentoML workers)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--clients", type=int, default=2, help="client threads sending /predict")
    ap.add_argument("--redis-every", type=float, default=120.0, metavar="S", help="restart Redis every S seconds")
    ap.add_argument("--redis-down", type=float, default=10.0, metavar="S", help="seconds Redis stays down")
    ap.add_argument("--sample-every", type=float, default=5.0, metavar="S", help="RSS sampling interval")
    ap.add_argument("--home", help="installation folder (default: a fresh temporary one)")
    ap.add_argument("--db-url", help="SQLAlchemy URL (default SQLite in the home)")
    a = ap.parse_args()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import make_settings
    from evolver_support import digits_npz
    from munet.system import System

    home = Path(a.home or tempfile.mkdtemp(prefix="munet-soak-"))
    home.mkdir(parents=True, exist_ok=True)
    redis_ = PrivateRedis().start()
    system = System(make_settings(home, a.db_url, redis_.url))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    images = {}
    for i, name in enumerate(TASKS):
        npz = digits_npz(home / f"{name}.npz", n_train=200, n_test=50, offset=i)
        system.add_task(name, str(npz))
        images[name] = png_b64(np.load(npz)["x_test"][i])
    env = {"MUNET_REDIS_URL": redis_.url, "MUNET_SWAP_POLL_S": "2"}
    if a.db_url:
        env["MUNET_DB_URL"] = a.db_url
    evolver_env = {k: v for k, v in os.environ.items() if not k.startswith("MUNET_")}
    evolver_env.update({"MUNET_HOME": str(home), **env})
    evolver = subprocess.Popen([sys.executable, "-m", "munet.cli", "evolve", "--forever", "--preset", "cpu",
                                "--generations", "1", "--candidates", "2", "--max-epochs", "1", "--image-size", "32",
                                "--threads", "1", "--nice", "10", "--lease-ttl", "30"],
                               env=evolver_env, stdout=open(home / "evolver.log", "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    server = Server(home, env=env)
    samples: list[dict] = []
    restarts: list[dict] = []
    stop = threading.Event()
    try:
        server.start(timeout=600)
        print(f"server on {server.url}; evolver pid {evolver.pid}; home {home}", flush=True)
        t_start = time.time()
        end = t_start + 60 * a.minutes
        served_at = None

        def redis_chaos() -> None:
            while not stop.wait(a.redis_every):
                if time.time() + a.redis_down > end:
                    return
                t0 = time.time()
                redis_.stop()
                stop.wait(a.redis_down)
                redis_.start()
                restarts.append({"at_s": round(t0 - t_start, 1), "down_s": round(time.time() - t0, 1)})
                print(f"  redis restarted at {t0 - t_start:.0f}s", flush=True)

        chaos = threading.Thread(target=redis_chaos, daemon=True)
        with LoadLoop(server, images, threads=a.clients, timeout=60) as load:
            chaos.start()
            while time.time() < end:
                now = time.time()
                ok = [r for r in load.records if r[3] == 200]
                if served_at is None and {r[2] for r in ok} == set(TASKS):
                    served_at = now - t_start
                samples.append({"t_s": round(now - t_start, 1), "server_rss_mb": round(rss_mb(server.proc.pid), 1),
                                "evolver_rss_mb": round(rss_mb(evolver.pid), 1), "requests": len(load.records),
                                "served": len(ok)})
                if len(samples) % max(1, int(60 / a.sample_every)) == 0:
                    print(f"  {samples[-1]}", flush=True)
                time.sleep(a.sample_every)
            stop.set()
        records = list(load.records)
        status = server.get("/status")[1]
    finally:
        stop.set()
        server.stop()
        os.killpg(evolver.pid, 9)
        evolver.wait()
        redis_.close()

    warm_t = max(0.2 * 60 * a.minutes, served_at or 0.0, (restarts[0]["at_s"] + restarts[0]["down_s"]) if restarts else 0.0)
    after = [s for s in samples if s["t_s"] >= warm_t] or samples[-1:]
    warm_rss = after[0]["server_rss_mb"]
    growth = (max(s["server_rss_mb"] for s in after) - warm_rss) / warm_rss if warm_rss else float("nan")
    end_growth = (after[-1]["server_rss_mb"] - warm_rss) / warm_rss if warm_rss else float("nan")
    ok = [r for r in records if r[3] == 200]
    bad = [r for r in records if r[3] != 200]
    # Before every task has its first path, 409 no_live_path is the documented answer, not an error.
    early = lambda r: r[3] == 409 and (served_at is None or r[0] - t_start < served_at)  # noqa: E731
    startup_409 = [r for r in bad if early(r)]
    errors = [r for r in bad if not early(r)]
    paths = {t: sorted({r[4] for r in ok if r[2] == t}) for t in TASKS}
    with system.Session() as s:
        from sqlalchemy import func, select

        from munet.storage.schema import LiveHistory, Visit

        visits = s.scalar(select(func.count()).select_from(Visit).where(Visit.finished_at.is_not(None)))
        moves = s.scalar(select(func.count()).select_from(LiveHistory))
    system.engine.dispose()
    summary = {
        "minutes": a.minutes, "clients": a.clients, "requests": len(records), "served": len(ok),
        "errors": len(errors), "errors_by_code": dict(Counter(r[3] for r in errors)),
        "startup_409": len(startup_409), "first_served_all_s": served_at, "redis_restarts": len(restarts),
        "evolver_visits": visits, "live_pointer_moves": moves,
        "paths_served": {t: len(p) for t, p in paths.items()},
        "warmup_s": round(warm_t, 1), "server_rss_mb_warm": warm_rss,
        "server_rss_mb_max_after_warmup": max(s["server_rss_mb"] for s in after),
        "server_rss_mb_end": after[-1]["server_rss_mb"], "rss_growth_max": round(growth, 4),
        "rss_growth_end": round(end_growth, 4), "rss_flat": bool(growth <= 0.10),
        "redis_connected_at_end": status.get("redis", {}).get("connected") if isinstance(status, dict) else None,
    }
    print()
    print(table([summary], ["minutes", "requests", "served", "errors", "redis_restarts", "evolver_visits",
                            "live_pointer_moves", "server_rss_mb_warm", "server_rss_mb_max_after_warmup",
                            "server_rss_mb_end", "rss_growth_max", "rss_flat"]))
    print()
    per_minute = [s for i, s in enumerate(samples) if i % max(1, int(60 / a.sample_every)) == 0]
    print(table(per_minute, ["t_s", "server_rss_mb", "evolver_rss_mb", "requests", "served"]))
    if errors:
        print("\nfirst errors:", [(round(r[0] - t_start, 1), r[2], r[3], str(r[4])[:200]) for r in errors[:5]])
    path = write("soak", {"summary": summary, "samples": samples, "redis_restarts": restarts,
                          "errors": [{"t_s": round(r[0] - t_start, 1), "task": r[2], "code": r[3], "detail": str(r[4])[:300]}
                                     for r in errors[:50]]})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
