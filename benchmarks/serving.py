"""Issue 5 part 2: serving N tasks whose paths share most components, against one BentoML
service holding N separate models (`separate_models.py`), with the same load and metrics.

    python benchmarks/serving.py [--tasks 1 10 20 50] [--seconds 20] [--clients 16]

Tasks cycle over small subsets of the six shared data sets. Each gets one committed path
(the real commit function, with the probe batch the server checks): the root's frozen
components plus 1-3 task-private cloned top blocks, a cloned final norm and a new head
(no training: serving cost does not depend on the weights). For every N (and N = 0) the
real server (`munet serve`, its own processes) is started on the same installation, and
measured after every live path is loaded and warmed up:

- added memory: RSS(N) - RSS(0), summed over the server's process tree (PSS beside it),
  after the load runs, and its peak sampled every 0.5 s during the mixed-task load; the unique bytes of the component cache (`munet_cache_bytes`);
- a closed-loop load on loopback (`--clients` concurrent clients, `--seconds` each run):
  uniform random task per request ("mixed"), then every request to one task ("single");
  requests/s and p50/p99 latency;
- in-process forward time of the same path (batch 1 and 16; 16 tasks x 1 image mixed),
  to show what HTTP, decoding and batching add.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the server tests' installation helpers
from _common import SHARED_DATA, table, write  # noqa: E402
from server_support import Server, commit_variant  # noqa: E402

from munet import models  # noqa: E402
from munet.server.executor import run_shared  # noqa: E402
from munet.settings import Settings  # noqa: E402
from munet.system import System  # noqa: E402

DATASETS = ["cifar", "gtsrb", "natural_images", "mnist", "notmnist", "elpv"]
IMAGE_SIZE = 64  # the cpu preset's default
TOP_BLOCKS = (15, 14, 13)


# -- the installation -----------------------------------------------------------------------------

def task_name(i: int) -> str:
    return f"t{i:02d}_{DATASETS[i % len(DATASETS)]}"


def subset(name: str, folder: Path, train_per_class: int = 4, test_per_class: int = 2) -> Path:
    """A small stratified copy of a shared data set (adding a task validates every image)."""
    out = folder / f"{name}-small.npz"
    if not out.exists():
        d = np.load(SHARED_DATA / f"{name}.npz")

        def pick(y: np.ndarray, n: int) -> np.ndarray:
            return np.concatenate([np.flatnonzero(y == c)[:n] for c in np.unique(y)])
        tr, te = pick(d["y_train"], train_per_class), pick(d["y_test"], test_per_class)
        np.savez(out, x_train=d["x_train"][tr], y_train=d["y_train"][tr], x_test=d["x_test"][te],
                 y_test=d["y_test"][te], classes=d["classes"])
    return out


def new_installation(home: str, settings: Settings | None = None) -> System:
    system = System(settings or Settings.from_env(home))
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    return system


def add_task(system: System, i: int, private_blocks: int | None = None, image_size: int = IMAGE_SIZE) -> str:
    """Task i on a data set subset, with one live path: `private_blocks` (1-3, by default
    cycling) cloned top blocks, a cloned final norm and a new head; the rest is the root's."""
    name = task_name(i)
    system.add_task(name, str(subset(DATASETS[i % len(DATASETS)], Path(system.settings.home))))
    k = private_blocks or 1 + i % 3
    commit_variant(system, name, seed=1000 + i, score=0.5, clone_blocks=TOP_BLOCKS[:k], image_size=image_size)
    return name


def task_classes(system: System, names: list[str]) -> dict[str, int]:
    from sqlalchemy import select

    from munet.storage.schema import Task

    with system.Session() as s:
        return {t.name: len(t.classes) for t in s.scalars(select(Task).where(Task.name.in_(names)))}


def request_images(system: System, names: list[str], per_task: int = 8) -> dict[str, list[str]]:
    """Base64 PNGs of each task's test images (what clients send)."""
    from PIL import Image

    from server_support import task_images

    out = {}
    for name in names:
        blobs = []
        for x in task_images(system, name, "x_test", per_task).numpy():
            buf = io.BytesIO()
            Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x).save(buf, "PNG")
            blobs.append(base64.b64encode(buf.getvalue()).decode())
        out[name] = blobs
    return out


# -- measurements ---------------------------------------------------------------------------------

def tree_memory(pid: int) -> dict:
    """RSS and PSS summed over a process and all its descendants (bytes); RSS split into
    anonymous (heap, tensors: the memory a task costs) and file-backed pages (library code
    paged in by the first requests, shared with every process mapping it), and per process."""
    root = psutil.Process(pid)
    out = {"rss": 0, "pss": 0, "anon": 0, "file": 0, "by_process": {}}
    procs = [root] + root.children(recursive=True)
    for p in procs:
        with contextlib.suppress(psutil.Error, OSError):
            info = p.memory_full_info()
            status = _proc_status(p.pid)
            out["rss"] += info.rss
            out["pss"] += getattr(info, "pss", info.rss)
            out["anon"] += status.get("RssAnon", 0)
            out["file"] += status.get("RssFile", 0) + status.get("RssShmem", 0)
            out["by_process"][f"{p.pid}:{' '.join(p.cmdline()[1:4])[-60:]}"] = {
                "rss_mb": info.rss / 2**20, "anon_mb": status.get("RssAnon", 0) / 2**20}
    out["processes"] = len(procs)
    return out


def _proc_status(pid: int) -> dict[str, int]:
    """/proc/PID/status memory lines in bytes (Linux; empty elsewhere)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}


class PeakMemory:
    """The largest tree RSS sampled every `every` s while the block runs (memory under load,
    beside the RSS after it, which may have shrunk back)."""

    def __init__(self, pid: int, every: float = 0.5):
        self.pid, self.every, self.rss = pid, every, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self.rss = max(self.rss, tree_memory(self.pid)["rss"])

    def __enter__(self) -> "PeakMemory":
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def scrape(url: str) -> dict[str, float]:
    """Prometheus samples of `url`/metrics as {name{labels}: value}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarise(latencies: list[float], seconds: float, errors: list) -> dict:
    return {"requests": len(latencies), "rps": len(latencies) / seconds if seconds else None,
            "p50_ms": percentile([x * 1000 for x in latencies], 50),
            "p99_ms": percentile([x * 1000 for x in latencies], 99),
            "errors": len(errors), "error_samples": [str(e)[:300] for e in errors[:5]]}


class Load:
    """A closed-loop load: `clients` concurrent clients on keep-alive connections, each
    sending its next request as soon as the previous one is answered, until `seconds`
    pass or `stop()`. `make_body(rng)` returns (task, JSON bytes); `on_answer(task, status,
    body, t_end, latency)` sees every answer. Runs in its own thread and event loop."""

    def __init__(self, url: str, make_body, clients: int, seconds: float | None = None, on_answer=None, seed: int = 0):
        self.url, self.make_body, self.clients, self.seconds = url, make_body, clients, seconds
        self.on_answer, self.seed = on_answer, seed
        self.latencies: list[float] = []
        self.errors: list = []
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def _run(self) -> None:
        import aiohttp

        t_start = time.perf_counter()
        end = t_start + self.seconds if self.seconds else float("inf")
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.clients), timeout=timeout) as s:
            async def client(k: int) -> None:
                rng = random.Random(self.seed * 1000 + k)
                while time.perf_counter() < end and not self._stop.is_set():
                    task, body = self.make_body(rng)
                    t0 = time.perf_counter()
                    try:
                        async with s.post(self.url, data=body, headers={"Content-Type": "application/json"}) as r:
                            raw, status = await r.read(), r.status
                    except Exception as e:  # noqa: BLE001 - every transport error is a failed request
                        self.errors.append(f"{type(e).__name__}: {e}")
                        continue
                    t1 = time.perf_counter()
                    if status == 200:
                        self.latencies.append(t1 - t0)
                    else:
                        self.errors.append(f"{status}: {raw[:200]!r}")
                    if self.on_answer:
                        self.on_answer(task, status, raw, time.time(), t1 - t0)

            await asyncio.gather(*(client(k) for k in range(self.clients)))
        self.elapsed = time.perf_counter() - t_start

    def run(self) -> dict:
        asyncio.run(self._run())
        return summarise(self.latencies, self.elapsed, self.errors)

    def start(self) -> "Load":
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread:
            self._thread.join(180)
        return summarise(self.latencies, self.elapsed, self.errors)


def munet_body(images: dict[str, list[str]], tasks: list[str]):
    encoded = {t: [json.dumps({"task": t, "image": b}).encode() for b in blobs] for t, blobs in images.items()}

    def make(rng: random.Random):
        t = rng.choice(tasks)
        return t, rng.choice(encoded[t])
    return make


def separate_body(images: dict[str, list[str]], tasks: list[str]):
    encoded = {t: [json.dumps({"items": [{"task": t, "image": b}]}).encode() for b in blobs] for t, blobs in images.items()}

    def make(rng: random.Random):
        t = rng.choice(tasks)
        return t, rng.choice(encoded[t])
    return make


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


# -- the two servers ------------------------------------------------------------------------------

def munet_server(home: Path, env: dict | None = None) -> Server:
    return Server(home, env={"MUNET_SERVE_THREADS": str(os.cpu_count() or 1), "MUNET_SWAP_POLL_S": "2",
                             **(env or {})})


def all_served(server: Server, names: list[str]) -> bool:
    code, status = server.get("/status", timeout=30)
    if code != 200:
        return False
    tasks = status.get("tasks", {})
    return all(tasks.get(n, {}).get("serving_path_id") and tasks[n]["serving_path_id"] == tasks[n]["live_path_id"]
               for n in names)


@dataclass
class SeparateServer(Server):
    """`bentoml serve separate_models:SeparateModels` with the given tasks, own process
    (started here; stopped, logged and addressed like the munet server)."""

    classes: dict = field(default_factory=dict)

    def start(self, timeout: float = 300) -> "SeparateServer":
        import urllib.request

        env = dict(os.environ, BENTOML_HOME=str(self.home / "bentoml-separate"), BENTOML_DO_NOT_TRACK="True",
                   SEPARATE_TASKS=",".join(f"{t}:{k}" for t, k in self.classes.items()),
                   SEPARATE_IMAGE_SIZE=str(IMAGE_SIZE), SEPARATE_THREADS=str(os.cpu_count() or 1))
        self.log_path = self.home / f"separate-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "bentoml", "serve", "separate_models:SeparateModels",
                                          "--port", str(self.port), "--host", "127.0.0.1", "--working-dir", str(HERE)],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"separate-models server exited:\n{self.log()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/readyz", timeout=2) as r:
                    return r.status == 200
            return False
        wait_until(ready, timeout, "the separate-models server")
        return self


# -- one measurement ------------------------------------------------------------------------------

def measure(system_name: str, url: str, pid: int, predict: str, body_factory, images: dict, names: list[str],
            args, metrics_url: str | None = None) -> dict:
    row: dict = {"system": system_name, "tasks": len(names)}
    if names:
        for t in names:  # warm up every task (first batches allocate)
            Load(url + predict, body_factory(images, [t]), clients=1, seconds=0.5).run()
        # BentoML's adaptive batcher trains its latency model on the first batches (they wait
        # up to seconds): run mixed load until 50 answers or a minute, for both systems.
        answered, t0 = 0, time.time()
        while answered < 50 and time.time() - t0 < 60:
            answered += Load(url + predict, body_factory(images, names), clients=args.clients, seconds=3).run()["requests"]
        before = scrape(metrics_url) if metrics_url else {}
        with PeakMemory(pid) as peak:
            mixed = Load(url + predict, body_factory(images, names), clients=args.clients, seconds=args.seconds,
                         seed=1).run()
        row["tree_rss_peak"] = peak.rss
        after = scrape(metrics_url) if metrics_url else {}
        single = Load(url + predict, body_factory(images, names[:1]), clients=args.clients, seconds=args.seconds,
                      seed=2).run()
        row.update({f"mixed_{k}": v for k, v in mixed.items()})
        row.update({f"single_{k}": v for k, v in single.items()})
        if metrics_url:
            n = after.get("munet_batch_size_count", 0) - before.get("munet_batch_size_count", 0)
            row["mixed_mean_batch"] = (after.get("munet_batch_size_sum", 0) - before.get("munet_batch_size_sum", 0)) / n if n else None
            nt = after.get("munet_batch_tasks_count", 0) - before.get("munet_batch_tasks_count", 0)
            row["mixed_mean_tasks_per_batch"] = (after.get("munet_batch_tasks_sum", 0) - before.get("munet_batch_tasks_sum", 0)) / nt if nt else None
    time.sleep(1)
    row.update({f"tree_{k}": v for k, v in tree_memory(pid).items()})
    if metrics_url:
        m = scrape(metrics_url)
        row["cache_bytes"] = m.get("munet_cache_bytes")
        row["cache_components"] = m.get("munet_cache_components")
    return row


def in_process(system: System, names: list[str], repeats: int = 20) -> list[dict]:
    """Forward time in this process: the served path through the server's own stage runner
    (preprocessing included) against separate timm models on the same inputs. The two arms
    alternate call by call, so a busy machine slows both alike."""
    import timm

    from server_support import task_images

    torch.set_num_threads(os.cpu_count() or 1)
    cache: dict = {}
    paths = {}
    for t in names:
        paths[t], _ = system.load_path(system.task_json(t)["live_path"]["id"], cache)
    for module in cache.values():  # as the executor serves them
        models.fold_batchnorm(module)
    separate = {t: timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=len(paths[t].classes)).eval()
                for t in names[:16]}

    def job(t: str, x: torch.Tensor):
        p = paths[t]
        return (p.ids, p.modules, models.preprocess(x, p.image_size, p.mean, p.std))

    def alone(t: str, x: torch.Tensor):
        p = paths[t]
        return separate[t](models.preprocess(x, p.image_size, p.mean, p.std))

    @torch.inference_mode()
    def timed(a, b) -> tuple[float, float]:
        for _ in range(3):
            a(), b()
        ta, tb = [], []
        for _ in range(repeats):
            for fn, out in ((a, ta), (b, tb)):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
        return statistics.median(ta), statistics.median(tb)

    first = names[0]
    x16 = task_images(system, first, "x_test", 16)
    rows = []
    for b in (1, 16):
        x = x16[:b]
        sp, ss = timed(lambda: run_shared([job(first, x)]), lambda: alone(first, x))
        rows += [{"what": f"munet path, batch {b}", "ms": sp * 1000, "images_per_s": b / sp},
                 {"what": f"separate timm model, batch {b}", "ms": ss * 1000, "images_per_s": b / ss}]
    mixed = names[:16]
    xs = {t: task_images(system, t, "x_test", 1) for t in mixed}
    sp, ss = timed(lambda: run_shared([job(t, xs[t]) for t in mixed]), lambda: [alone(t, xs[t]) for t in mixed])
    rows += [{"what": f"{len(mixed)} munet paths x 1 image (shared stages run once)", "ms": sp * 1000,
              "images_per_s": len(mixed) / sp},
             {"what": f"{len(mixed)} separate models x 1 image", "ms": ss * 1000, "images_per_s": len(mixed) / ss}]
    return rows


def forward_only(args) -> None:
    """Re-measure only the in-process forward times (16 tasks) into the existing result."""
    with tempfile.TemporaryDirectory() as tmp:
        system = new_installation(tmp)
        names = [add_task(system, i) for i in range(16)]
        forward = in_process(system, names)
        system.engine.dispose()
    from _common import RESULTS

    payload = json.loads((RESULTS / "serving.json").read_text())
    report(payload["rows"], forward, argparse.Namespace(**payload["args"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", type=int, default=[1, 10, 20, 50])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--skip-separate", action="store_true")
    ap.add_argument("--forward-only", action="store_true", help="only the in-process forward times, into the last result")
    ap.add_argument("--onednn-cache", type=int, default=128,
                    help="oneDNN primitive cache capacity of both servers (munet's executor default; the separate "
                         "models get the same, so the comparison is like for like; oneDNN's own default is 1024)")
    ap.add_argument("--name", default="serving", help="results file name (a partial run should not replace serving.json)")
    args = ap.parse_args()
    os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(args.onednn_cache)  # inherited by both servers
    if args.forward_only:
        return forward_only(args)
    if not SHARED_DATA.exists():
        sys.exit(f"benchmark data not found at {SHARED_DATA}")
    counts = [0] + sorted(set(args.tasks))
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        system = new_installation(tmp)
        names: list[str] = []
        for n in counts:
            t0 = time.time()
            while len(names) < n:
                names.append(add_task(system, len(names)))
            print(f"[serving] {n} tasks ready ({time.time() - t0:.0f}s); munet server", file=sys.stderr)
            server = munet_server(home)
            try:
                server.start(timeout=900)
                wait_until(lambda: all_served(server, names), 600, f"{n} tasks to be served")
                images = request_images(system, names)
                rows.append(measure("munet", server.url, server.proc.pid, "/predict", munet_body, images, names, args,
                                    metrics_url=server.url))
            finally:
                server.stop()
            print(f"[serving] {rows[-1]}", file=sys.stderr)
            if args.skip_separate:
                continue
            sep = SeparateServer(home, classes=task_classes(system, names) if names else {})
            try:
                sep.start()
                images = request_images(system, names)
                rows.append(measure("separate", sep.url, sep.proc.pid, "/predict", separate_body, images, names, args))
            finally:
                sep.stop()
            print(f"[serving] {rows[-1]}", file=sys.stderr)
        print("[serving] in-process forward times", file=sys.stderr)
        forward = in_process(system, names)
        system.engine.dispose()
    report(rows, forward, args)


def report(rows: list[dict], forward: list[dict], args) -> None:
    base = {r["system"]: r for r in rows if r["tasks"] == 0}
    one = {r["system"]: r for r in rows if r["tasks"] == 1}
    for r in rows:
        b = base.get(r["system"])
        if b:
            r["added_rss_mb"] = (r["tree_rss"] - b["tree_rss"]) / 2**20
            r["added_pss_mb"] = (r["tree_pss"] - b["tree_pss"]) / 2**20
            r["added_anon_mb"] = (r["tree_anon"] - b["tree_anon"]) / 2**20
            if r.get("tree_rss_peak"):
                r["added_rss_peak_mb"] = (r["tree_rss_peak"] - b["tree_rss"]) / 2**20
        o = one.get(r["system"])
        if o and r["tasks"] and o.get("added_rss_mb"):
            r["added_vs_n1"] = r["added_rss_mb"] / o["added_rss_mb"]
        if r.get("cache_bytes") is not None:
            r["cache_mb"] = r["cache_bytes"] / 2**20
        if r.get("single_rps"):
            r["mixed_vs_single"] = r["mixed_rps"] / r["single_rps"]
    cols = ["system", "tasks", "added_rss_mb", "added_rss_peak_mb", "added_pss_mb", "added_anon_mb", "added_vs_n1", "cache_mb", "mixed_rps", "mixed_p50_ms",
            "mixed_p99_ms", "single_rps", "single_p50_ms", "single_p99_ms", "mixed_vs_single", "mixed_mean_batch",
            "mixed_errors", "single_errors"]
    print(f"\nServing: {args.clients} closed-loop clients, {args.seconds:g} s per run, one 32x32 PNG per request, "
          f"paths at {IMAGE_SIZE} px\n")
    print(table(sorted(rows, key=lambda r: (r["system"], r["tasks"])), cols))
    print("\nIn-process forward time (median)\n")
    print(table(forward, ["what", "ms", "images_per_s"]))
    targets = {}
    m50, m1 = next((r for r in rows if r["system"] == "munet" and r["tasks"] == 50), None), one.get("munet")
    if m50 and m1:
        targets = {"added_memory_n50_over_n1": m50.get("added_vs_n1"), "target_added_memory": "< 3",
                   "mixed_over_single_n50": m50.get("mixed_vs_single"),
                   "mixed_n50_over_single_n1": m50["mixed_rps"] / m1["single_rps"] if m1.get("single_rps") else None,
                   "target_throughput": ">= 0.8"}
        print(f"\nTargets: {json.dumps(targets)}")
    path = write(getattr(args, "name", "serving"), {"args": vars(args), "image_size": IMAGE_SIZE, "rows": rows, "in_process": forward,
                             "targets": targets})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
