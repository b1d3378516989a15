"""A real munet installation with live paths in seconds (no evolver), and the real server
process, for the server tests.

`make_installation` adds the packaged root and small synthetic tasks (coloured squares)
and commits a path for each directly with `storage.commit.commit_path`: frozen root
components referenced by id, a few cloned components with small changes, a random new
head, and the probe batch computed with the evaluator's `evolver.train.logits`.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sqlalchemy import select

from munet import models
from munet.evolver.train import logits as evaluator_logits
from munet.storage import commit, lineage, signals
from munet.storage.schema import Component, Root, Task
from munet.system import System

PROBE = 8
COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230]], dtype=np.uint8)

# Task name -> (classes, how its path differs from the root; see `commit_variant`).
TASKS = {"alpha": 3, "beta": 4, "gamma": 2}


def squares(n: int, classes: int, size: int = 32, seed: int = 0, grey: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Coloured squares on noise; the class sets colour and corner."""
    rng = np.random.RandomState(seed)
    y = rng.randint(0, classes, size=n)
    x = rng.randint(0, 60, size=(n, size, size, 3)).astype(np.uint8)
    half = size // 2
    for i, label in enumerate(y):
        r, c = (label // 2) % 2 * half, label % 2 * half
        x[i, r:r + half, c:c + half] = COLOURS[label % len(COLOURS)]
    if grey:
        x = x.mean(axis=3, keepdims=True).astype(np.uint8)
    return x, y.astype(np.int64)


def squares_npz(path: Path, classes: int, n_train: int = 40, n_test: int = 16, size: int = 32, seed: int = 0,
                grey: bool = False) -> Path:
    x_tr, y_tr = squares(n_train, classes, size, seed, grey)
    x_te, y_te = squares(n_test, classes, size, seed + 1000, grey)
    np.savez(path, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te,
             classes=np.array([f"class_{i}" for i in range(classes)]))
    return path


def npz_bytes(classes: int, **kw) -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return squares_npz(Path(tmp) / "d.npz", classes, **kw).read_bytes()


def _root(system: System):
    with system.Session() as s:
        root = s.scalars(select(Root).order_by(Root.id)).first()
        ids = lineage.path_component_ids(s, root.root_path_id)
        rows = {c.id: c for c in s.scalars(select(Component).where(Component.id.in_(ids)))}
    return root, [rows[i] for i in ids]


def task_images(system: System, task: str, split: str = "x_test", n: int | None = None) -> torch.Tensor:
    with system.Session() as s:
        t = s.scalar(select(Task).where(Task.name == task))
    x = torch.from_numpy(np.asarray(system.dataset(t)[split]))
    return x if n is None else x[:n]


def commit_variant(system: System, task: str, *, seed: int, score: float, clone_blocks: tuple[int, ...] = (),
                   drop_blocks: tuple[int, ...] = (), image_size: int = 32, tamper_probe: bool = False,
                   probe_shift: float = 0.0,
                   parent_id: str | None = None, publish: bool = False) -> commit.CommitResult:
    """Commit a path of `task`: the root's components, except clones (small changes) of
    `clone_blocks`, the final norm and a random head; `drop_blocks` leaves blocks out."""
    root, rows = _root(system)
    config = root.config
    family = models.family_for(config["timm"])
    with system.Session() as s:
        t = s.scalar(select(Task).where(Task.name == task))
        k = len(t.classes)
    gen = torch.Generator().manual_seed(seed)
    ids, modules, new = [], [], []
    blocks = [i for i in range(config["depth"]) if i not in drop_blocks]
    cache: dict = {}
    for row in rows:
        kind, index, _ = models.parse_name(row.name)
        if kind == "blocks" and index in drop_blocks:
            continue
        if kind == "head":
            module = family.build(config, "head", {"num_classes": k})
            with torch.no_grad():
                for p in module.parameters():
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            new.append(commit.NewComponent(name="head", meta={"num_classes": k}, parent_id=None,
                                           tensors=dict(module.state_dict()), num_params=models.count_params(module)))
        elif row.name == "final_norm" or (kind == "blocks" and index in clone_blocks):
            module = system.build_component(row, config)
            with torch.no_grad():
                for p in module.parameters():
                    p.mul_(1 + 0.05 * torch.randn(p.shape, generator=gen))
            new.append(commit.NewComponent(name=row.name, meta=row.meta, parent_id=row.id,
                                           tensors=dict(module.state_dict()), num_params=models.count_params(module)))
        else:
            module = cache.get(row.id) or system.build_component(row, config)
            ids.append(row.id)
            modules.append(module)
            continue
        ids.append(new[-1].id)
        modules.append(module.eval())
    probe_x = task_images(system, task, "x_train", PROBE)
    probe_logits = evaluator_logits(modules, probe_x, image_size, config["mean"], config["std"], PROBE, "cpu")
    if tamper_probe:
        probe_logits = probe_logits * 1.5 + 0.25
    # Every probe logit moved by probe_shift x the batch's largest |logit| (rounding-sized noise).
    probe_logits = probe_logits + probe_shift * probe_logits.abs().max()
    record = commit.PathRecord(
        task=task, root_id=root.id, component_ids=ids, image_size=image_size, parent_id=parent_id,
        hparams={"arch": {"blocks": blocks, "adapters": {}, "image_size": image_size, "num_classes": k}},
        val_acc=score, score=score, test_acc=score, accounted_params=float(sum(c.num_params for c in new)),
        probe={"inputs": probe_x, "logits": probe_logits})
    result = commit.commit_path(system.Session, system.store, record, new, reason="test")
    if publish and result.moved:
        signals.publish(system.settings.redis_url, signals.SWAPS, signals.swap_message(task, result.path_id, score))
    return result


VARIANTS = {  # how each task's first path differs from the root
    "alpha": {},
    "beta": {"clone_blocks": (15,)},
    "gamma": {"drop_blocks": (2,)},
}


def make_installation(system: System, tasks: dict[str, int] | None = None) -> dict[str, str]:
    """Root + tasks + a first committed path per task; returns {task: path id}."""
    system.init()
    system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    out = {}
    for i, (name, k) in enumerate((tasks or TASKS).items()):
        path = Path(system.settings.home) / f"{name}.npz"
        squares_npz(path, k, seed=i)
        system.add_task(name, str(path))
        res = commit_variant(system, name, seed=100 + i, score=0.5, **VARIANTS.get(name, {}))
        out[name] = res.path_id
    return out


# -- the real server process -----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    home: Path
    env: dict = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    host: str = "127.0.0.1"  # where the public port binds ("0.0.0.0": every interface)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 600.0) -> "Server":
        env = dict(os.environ)
        env.update({"MUNET_HOME": str(self.home), "MUNET_SWAP_POLL_S": "0.5", "BENTOML_DO_NOT_TRACK": "True",
                    "MUNET_SERVE_THREADS": "2"})
        env.pop("MUNET_API_TOKEN", None)
        env.pop("MUNET_REDIS_URL", None)
        env.update({k: v for k, v in self.env.items() if v is not None})
        self.log_path = self.home / f"server-{self.port}.log"
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "munet.cli", "serve", "--port", str(self.port),
                                      "--host", self.host], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                code, _ = self.get("/readyz", timeout=2)
                if code == 200:
                    return self
            time.sleep(0.3)
        raise RuntimeError(f"server not ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:] if self.log_path and self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- http ------------------------------------------------------------------------------------
    def request(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30) -> tuple[int, dict | str, dict]:
        req = urllib.request.Request(self.url + path, data=body, headers=headers or {}, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw, code, hdrs = resp.read(), resp.status, {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as e:
            raw, code, hdrs = e.read(), e.code, {k.lower(): v for k, v in e.headers.items()}
        try:
            return code, json.loads(raw), hdrs
        except ValueError:
            return code, raw.decode("utf-8", "replace"), hdrs

    def get(self, path: str, timeout: float = 30):
        code, body, _ = self.request("GET", path, timeout=timeout)
        return code, body

    def post_json(self, path: str, payload, headers: dict | None = None, timeout: float = 30):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        code, body, hdrs = self.request("POST", path, data, {"Content-Type": "application/json", **(headers or {})},
                                        timeout)
        return code, body, hdrs


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body: text fields and (field, filename, bytes) files."""
    boundary = "munet-test-boundary-7d3f"
    out = []
    for name, value in fields.items():
        out.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n".encode())
    for name, filename, data in files:
        out.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                   f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    out.append(f"--{boundary}--\r\n".encode())
    return b"".join(out), f"multipart/form-data; boundary={boundary}"


def png_b64(x: np.ndarray) -> str:
    import base64
    import io

    from PIL import Image

    im = Image.fromarray(x[..., 0] if x.shape[-1] == 1 else x)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()
