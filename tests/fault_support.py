"""Fault injection for the fault tests and the soak benchmark: a private Redis, a TCP proxy
that can cut a connection to PostgreSQL, a disk that fills up, an evolver that can be
killed fast, and the checks that must hold after any fault (fsck, gc, every live path
loads and answers)."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

TESTS = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- a private Redis (never the machine's shared one) ---------------------------------------------

class PrivateRedis:
    """`redis-server` on a free port, no persistence; stop() and start() again on the same port."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.dir = tempfile.mkdtemp(prefix="munet-redis-")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    def start(self, timeout: float = 20.0) -> "PrivateRedis":
        import redis

        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", self.dir],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + timeout
        while time.time() < deadline:
            with contextlib.suppress(redis.RedisError):
                if redis.Redis(port=self.port, socket_connect_timeout=1).ping():
                    return self
            time.sleep(0.1)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# -- a TCP proxy that can cut the network ---------------------------------------------------------

class TcpProxy:
    """An asyncio TCP proxy in a thread: 127.0.0.1:port -> target. `cut()` closes every
    open connection and stops listening (clients see their database vanish: connection
    refused), `restore()` listens again on the same port."""

    def __init__(self, target_host: str, target_port: int, port: int | None = None):
        self.target = (target_host, target_port)
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self.server: asyncio.base_events.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="tcp-proxy")
        self.thread.start()

    def _call(self, coro, timeout: float = 10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self.writers |= {client_w, server_w}
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        self.writers -= {client_w, server_w}

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self.writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self.writers.clear()

    def start(self) -> "TcpProxy":
        self._call(self._start())
        return self

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._start())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# -- a disk that fills up --------------------------------------------------------------------------

class FullDiskFileSystem(LocalFileSystem):
    """A local folder whose writes fail with ENOSPC once `budget` bytes were written
    (None: unlimited). Registered as `fulldisk://` so it can be a MUNET_STORE_URL."""

    protocol = "fulldisk"
    budget: int | None = None

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("fulldisk://"):
            path = path[len("fulldisk://"):]
        return super()._strip_protocol(path)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        f = super()._open(path, mode, block_size, **kwargs)
        return _Limited(f, type(self)) if ("w" in mode or "a" in mode) else f


class _Limited:
    def __init__(self, f, owner: type[FullDiskFileSystem]):
        self._f, self._owner = f, owner

    def write(self, data) -> int:
        budget = self._owner.budget
        if budget is not None and len(data) > budget:
            self._f.write(bytes(memoryview(data)[:budget]))  # a real full disk writes what fits
            self._owner.budget = 0
            raise OSError(errno.ENOSPC, "No space left on device (injected)")
        if budget is not None:
            self._owner.budget = budget - len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def register_full_disk() -> None:
    import fsspec

    fsspec.register_implementation("fulldisk", FullDiskFileSystem, clobber=True)


# -- checks that hold after any fault --------------------------------------------------------------

def temp_files(store_root: str) -> list[str]:
    return [str(p) for p in Path(store_root).rglob(".tmp-*")]


def live_paths_answer(system, images) -> dict[str, object]:
    """Every task's live path, built from the store (no cache), answers: {task: logits}."""
    from sqlalchemy import select

    from munet.evolver.train import logits
    from munet.storage.schema import Task

    out = {}
    with system.Session() as s:
        live = list(s.execute(select(Task.name, Task.live_path_id).where(Task.status != "deleted")))
    for name, path_id in live:
        assert path_id, f"task {name} has no live path"
        path, _ = system.load_path(path_id, cache={})
        x = images[name] if isinstance(images, dict) else images
        out[name] = logits(path.modules, x, path.image_size, path.mean, path.std, 64, "cpu")
        assert out[name].shape == (len(x), len(path.classes)) and out[name].isfinite().all()
    return out


def fsck_ok(system) -> dict:
    from munet.cli import fsck

    report = fsck(system)
    assert report["ok"], report["problems"][:5]
    return report


def gc_removes_only_unreferenced(system) -> dict:
    """gc with no grace period: afterwards exactly the referenced blobs remain (those on
    disk before), no temp file remains, and fsck still passes."""
    from munet.storage import gc

    before = set(system.store.digests())
    with system.Session() as s:
        referenced = gc.referenced_blobs(s, grace_seconds=0)
    result = gc.collect(system.Session, system.store, grace_seconds=0)
    after = set(system.store.digests())
    assert after == before & referenced, (sorted(before & referenced - after)[:3], sorted(after - referenced)[:3])
    assert result["deleted"] == len(before - referenced)
    assert not [p for p in temp_files(system.store.root)], "gc left a temp file"
    fsck_ok(system)
    return result


# -- an evolver that can be killed fast ------------------------------------------------------------

ZYGOTE = r"""
import json, os, sys, traceback
sys.path.insert(0, sys.argv[1])
import torch  # imported once here; every forked worker starts warm
from munet.system import System
from munet.evolver.worker import run_worker
from evolver_support import tiny_config

for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.environ.pop("MUNET_FAULT", None)
            if cmd.get("fault"):
                os.environ["MUNET_FAULT"] = cmd["fault"]
            torch.set_num_threads(1)
            run_worker(System(), tiny_config(**cmd.get("config", {})), names=cmd.get("names"), iterations=1,
                       ttl=cmd.get("ttl", 30.0), poll=0.5, progress=False)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"pid": pid, "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                      "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class EvolverZygote:
    """A process that imported torch and munet once and forks one real evolver worker
    (`run_worker`, one visit) per round, so killing and restarting a worker costs no
    import time. `round()` runs one worker, optionally with a MUNET_FAULT point or a
    SIGKILL after `kill_after` seconds, and returns its exit signal and code."""

    def __init__(self, env: dict, log: Path):
        self.log = open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(TESTS)], env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)

    def _read(self, timeout: float) -> dict:
        if not self.sel.select(timeout):
            raise TimeoutError(f"evolver worker did not finish within {timeout}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the zygote died ({self.proc.poll()})")
        return json.loads(line)

    def round(self, *, fault: str | None = None, kill_after: float | None = None, timeout: float = 300.0,
              **cmd) -> dict:
        self.proc.stdin.write((json.dumps({"fault": fault, **cmd}) + "\n").encode())
        self.proc.stdin.flush()
        pid = self._read(300)["pid"]  # the first round waits for the zygote's imports
        t0 = time.monotonic()
        out = None
        if kill_after is not None:
            try:
                out = self._read(kill_after)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        out = out or self._read(timeout)
        return {**out, "seconds": time.monotonic() - t0}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.log.close()


# -- clients under load ----------------------------------------------------------------------------

class LoadLoop:
    """Threads sending /predict for several tasks; every request is recorded as
    (started, finished, task, status code or -1, path id or error)."""

    def __init__(self, server, images: dict[str, str], threads: int = 2, timeout: float = 180.0):
        self.server, self.images, self.timeout = server, images, timeout
        self.stop = threading.Event()
        self.records: list[tuple[float, float, str, int, object]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i: int) -> None:
        tasks = sorted(self.images)
        n = i
        while not self.stop.is_set():
            task = tasks[n % len(tasks)]
            n += 1
            t0 = time.time()
            try:
                code, body, headers = self.server.post_json("/predict", {"task": task, "image": self.images[task]},
                                                            timeout=self.timeout)
                out = body["path_id"] if code == 200 else (body, headers.get("retry-after"))
            except Exception as e:  # noqa: BLE001 - a dropped connection is a result here
                code, out = -1, repr(e)
            self.records.append((t0, time.time(), task, code, out))

    def ok(self) -> list[tuple]:
        return [r for r in self.records if r[3] == 200]

    def failures(self) -> list[tuple]:
        return [r for r in self.records if r[3] != 200]

    def serving(self, task: str, since: float) -> set[str]:
        return {r[4] for r in self.records if r[2] == task and r[3] == 200 and r[0] >= since}

    def wait_for(self, task: str, path_id: str, timeout: float) -> float | None:
        """Seconds until a request started after now was answered by `path_id` (None: never)."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            if any(r[2] == task and r[3] == 200 and r[4] == path_id and r[0] >= t0 for r in self.records):
                return time.time() - t0
            time.sleep(0.05)
        return None

    def __enter__(self) -> "LoadLoop":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(self.timeout + 10)


def wait_until(fn, timeout: float, interval: float = 0.2):
    deadline = time.time() + timeout
    while True:
        value = fn()
        if value or time.time() > deadline:
            return value
        time.sleep(interval)


def server_workers(server) -> dict[str, int]:
    """BentoML's worker processes of a `munet serve`: {service name: pid}."""
    import psutil

    out = {}
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            argv = child.cmdline()
            if "--service-name" in argv:
                out[argv[argv.index("--service-name") + 1]] = child.pid
    return out
