"""Training and evaluating one candidate path (MUNET.md §3-5; DESIGN.md cpu preset).

SGD with momentum, clipping at global norm 1.0, cross-entropy, three LR schedules,
validation after each interval with best-snapshot keeping. Frozen components run in eval
mode and never receive gradients; the frozen prefix's activations are computed once and
reused across epochs and candidates (a bounded cache) when inputs are not random.
"""
from __future__ import annotations

import contextlib
import copy
import math
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2 as T
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from munet.models import preprocess

from .config import EvolverConfig
from .search import augments


# -- data -------------------------------------------------------------------------------

def split_indices(y: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded train/validation split: the same task always gets the same split."""
    rng = np.random.RandomState(seed)
    train, val = [], []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


@dataclass
class TaskData:
    name: str
    classes: list[str]
    x: dict[str, torch.Tensor]  # split -> uint8 [N, H, W, C]
    y: dict[str, torch.Tensor]  # split -> int64 [N]
    mean: tuple
    std: tuple

    @classmethod
    def from_arrays(cls, name: str, arrays: dict, val_fraction: float, seed: int, mean, std,
                    holdout: float = 0.0) -> "TaskData":
        """Train/val/test splits; `holdout` > 0 moves that share of val, stratified, to a
        `holdout` split (EvolverConfig.final_holdout)."""
        y_train = np.asarray(arrays["y_train"]).astype(np.int64)
        tr, va = split_indices(y_train, val_fraction, seed)
        x_train = _nhwc(arrays["x_train"])
        x = {"train": x_train[tr], "val": x_train[va], "test": _nhwc(arrays["x_test"])}
        y = {"train": y_train[tr], "val": y_train[va], "test": np.asarray(arrays["y_test"]).astype(np.int64)}
        if holdout > 0:
            kept, held = split_indices(y["val"], holdout, seed)
            x["val"], x["holdout"] = x["val"][kept], x["val"][held]
            y["val"], y["holdout"] = y["val"][kept], y["val"][held]
        return cls(name, [str(c) for c in arrays["classes"]], {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in x.items()},
                   {k: torch.from_numpy(v) for k, v in y.items()}, tuple(mean), tuple(std))

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _nhwc(x: np.ndarray) -> np.ndarray:
    return x[..., None] if x.ndim == 3 else x


# -- prefix cache -----------------------------------------------------------------------

class PrefixCache:
    """LRU of frozen-prefix activations keyed by (prefix component ids, image size, split)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple) -> torch.Tensor | None:
        value = self.entries.get(key)
        if value is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes and self.entries:
            _, old = self.entries.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        self.entries[key] = value
        self.bytes += size


def memory_format_of(cfg: EvolverConfig) -> torch.memory_format:
    return torch.channels_last if cfg.channels_last else torch.contiguous_format


@contextlib.contextmanager
def in_memory_format(modules: list[nn.Module], fmt: torch.memory_format):
    """Run a candidate's modules in `fmt`, back to contiguous on exit (safetensors stores only
    contiguous tensors; the server lays out what it loads itself). Channels-last convolutions train
    ~1.8-2x faster on CPU: EfficientNet-Lite0 fine-tuning at 96 px, batch 64, 2 threads,
    0.57 -> 0.32 s per step, the frozen forward 0.22 -> 0.11 s (2026-11-29); 1.05 -> 0.54 s per
    step on 2026-12-06, when the whole machine ran ~1.7x slower."""
    if fmt == torch.contiguous_format:
        yield
        return
    for m in modules:
        m.to(memory_format=fmt)
    try:
        yield
    finally:
        for m in modules:
            m.to(memory_format=torch.contiguous_format)


@torch.no_grad()
def run_frozen(modules: list[nn.Module], x: torch.Tensor, image_size: int, mean, std, batch: int, device: str,
               memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """uint8 images through preprocessing and frozen modules, in batches, on `device`.

    Channels-last by default, the layout the server runs (server/executor.py), so the
    evaluator's probe logits are computed the way the server will compute them."""
    outs = []
    for i in range(0, len(x), batch):
        h = preprocess(x[i:i + batch], image_size, mean, std).to(device).contiguous(memory_format=memory_format)
        for m in modules:
            h = m(h)
        outs.append(h)
    return torch.cat(outs) if outs else torch.empty(0)


def prefix_activations(cache: PrefixCache | None, ids: list[str], modules: list[nn.Module], data: TaskData,
                       split: str, image_size: int, cfg: EvolverConfig) -> torch.Tensor:
    key = (tuple(ids), image_size, data.name, split)
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit
    value = run_frozen(modules, data.x[split], image_size, data.mean, data.std, cfg.eval_batch_size, cfg.device,
                       memory_format_of(cfg))
    if cache is not None:
        cache.put(key, value)
    return value


# -- training ---------------------------------------------------------------------------

@dataclass
class Candidate:
    """A child path ready to train: one module per component, and which ones are trainable."""

    ids: list[str]
    names: list[str]
    modules: list[nn.Module]
    trainable: list[bool]
    hparams: dict
    momentum: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # component id -> param -> buffer
    lr_scale: float = 1.0  # EvolverConfig.lr_scale (visit decay) x line_scale (line anneal) on the path's lr
    seed: int | None = None  # of its data order; None: from cfg.seed and its component ids

    @property
    def first_trainable(self) -> int:
        return self.trainable.index(True)


@dataclass
class TrainResult:
    val_acc: float
    score: float
    improved: bool
    curve: list[dict]
    examples: int
    seconds: float
    momentum: dict[str, dict[str, torch.Tensor]]
    val_loss: float = math.inf  # mean validation cross-entropy of the kept snapshot (else the last interval)
    stopped: int | None = None  # the validation point after which `stop` ended it early


def lr_at(step: int, total: int, steps_per_interval: int, opt: dict) -> float:
    lr, schedule = opt["lr"], opt["schedule"]
    if schedule == "constant":
        return 0.5 * lr
    if schedule == "restarts":
        step, total = step % steps_per_interval, steps_per_interval
    warm = max(1, int(total * opt["warmup"]))
    if step < warm:
        return lr / 100 + (lr - lr / 100) * step / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, progress)))


def set_modes(cand: Candidate, training: bool) -> None:
    """Frozen components always eval; clones train, with BatchNorm statistics frozen
    unless the path's bn_train says otherwise (MUNET.md §7)."""
    for module, trainable in zip(cand.modules, cand.trainable):
        module.train(training and trainable)
        if training and trainable and not cand.hparams.get("bn_train", False):
            for sub in module.modules():
                if isinstance(sub, _BatchNorm):
                    sub.eval()


def augmenter(hp: dict, image_size: int) -> T.Compose:
    a = hp["aug"]
    steps: list = []
    if a["crop_area_min"] < 1.0:
        ratio = (a["crop_aspect_min"], 1.0 / a["crop_aspect_min"])
        steps.append(T.RandomResizedCrop(image_size, scale=(a["crop_area_min"], 1.0), ratio=ratio, antialias=True))
    if a["hflip"]:
        steps.append(T.RandomHorizontalFlip())
    if any(a[k] > 0 for k in ("brightness", "contrast", "saturation", "hue")):
        steps.append(T.ColorJitter(a["brightness"], a["contrast"], a["saturation"], min(0.5, a["hue"])))
    return T.Compose(steps)


def _augmented_batch(x: torch.Tensor, aug: T.Compose, image_size: int) -> torch.Tensor:
    """Per-image random transforms on uint8 NHWC, back to a uniform uint8 NHWC batch."""
    out = []
    for img in x.permute(0, 3, 1, 2):
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        img = aug(img)
        if img.shape[-1] != image_size or img.shape[-2] != image_size:
            img = T.functional.resize(img, [image_size, image_size], antialias=True)
        out.append(img)
    return torch.stack(out).permute(0, 2, 3, 1).contiguous()


def _forward(modules: list[nn.Module], h: torch.Tensor) -> torch.Tensor:
    for m in modules:
        h = m(h)
    return h


@torch.no_grad()
def evaluate(modules: list[nn.Module], h: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over (h, y)."""
    if len(y) == 0:
        return 0.0, math.inf
    correct, loss = 0, 0.0
    for i in range(0, len(h), batch):
        out, yb = _forward(modules, h[i:i + batch]).float(), y[i:i + batch].to(h.device)
        correct += int((out.argmax(1) == yb).sum())
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
    return correct / len(y), loss / len(y)


def accuracy(modules: list[nn.Module], h: torch.Tensor, y: torch.Tensor, batch: int) -> float:
    return evaluate(modules, h, y, batch)[0]


def survives(score: float, val_loss: float, start_score: float, tie: tuple[float, float] | None,
             cfg: EvolverConfig) -> bool:
    """A snapshot's survival rule (MUNET.md §5.4): above start_score, or with cfg.val_loss_ties
    (tie given) at least tie[0] less the tie margin and below tie[1] in validation loss."""
    return score > start_score or (tie is not None and score >= tie[0] - cfg.val_loss_tie_margin and val_loss < tie[1])


def train_candidate(cand: Candidate, data: TaskData, cfg: EvolverConfig, cache: PrefixCache | None,
                    score_factor: float, start_score: float, progress=None, *,
                    tie: tuple[float, float] | None = None,
                    stop: Callable[[int, float], bool] | None = None) -> TrainResult:
    """Train in place; on return the modules hold the best snapshot (if any beat start_score).

    After each validation point but the last, stop(point, score) may end the training there
    (cfg.median_stop); the result says after which point.

    With cfg.val_loss_ties, a snapshot also survives when its score is at least tie[0] and
    its validation loss below tie[1] (the parent's score and loss), and later snapshots of
    the same candidate compete on (score, loss) too."""
    t0 = time.perf_counter()
    for m in cand.modules:
        m.to(cfg.device)
    with in_memory_format(cand.modules, memory_format_of(cfg)):
        result = _train(cand, data, cfg, cache, score_factor, start_score, progress, tie if cfg.val_loss_ties else None,
                        stop)
    result.seconds = time.perf_counter() - t0
    return result


def _train(cand: Candidate, data: TaskData, cfg: EvolverConfig, cache: PrefixCache | None,
           score_factor: float, start_score: float, progress, tie: tuple[float, float] | None,
           stop: Callable[[int, float], bool] | None = None) -> TrainResult:
    hp, size, device = cand.hparams, cand.hparams["arch"]["image_size"], cfg.device
    k = cand.first_trainable
    prefix_ids, prefix, suffix = cand.ids[:k], cand.modules[:k], cand.modules[k:]
    set_modes(cand, training=False)
    random_inputs = augments(hp)
    # Without reuse (cfg.reuse_prefix off: the benchmark's "no cache" arm) every batch runs
    # the frozen prefix again, as a plain training loop would.
    per_batch = random_inputs or not cfg.reuse_prefix
    h_val = prefix_activations(cache if cfg.reuse_prefix else None, prefix_ids, prefix, data, "val", size, cfg)
    h_train = None if per_batch else prefix_activations(cache, prefix_ids, prefix, data, "train", size, cfg)
    aug = augmenter(hp, size) if random_inputs else None

    params = {f"{i}.{n}": p for i, (m, t) in enumerate(zip(cand.modules, cand.trainable)) if t
              for n, p in m.named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.SGD(list(params.values()), lr=hp["opt"]["lr"], momentum=hp["opt"]["momentum"],
                          nesterov=hp["opt"]["nesterov"] and hp["opt"]["momentum"] > 0)
    _inherit_momentum(cand, opt, cfg)

    n = len(data.y["train"])
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    steps_per_interval, intervals = min(cfg.batches_per_interval, steps_per_epoch), cfg.intervals
    if cfg.max_epochs is not None:
        # The epoch cap is split into at most `intervals` validation points, in whole batches,
        # so "1 epoch, 2 intervals" validates after each half and "2 epochs" sees 2n images.
        total = max(1, round(cfg.max_epochs * steps_per_epoch))
        intervals = min(intervals, total)
        steps_per_interval = math.ceil(total / intervals)
    else:
        total = steps_per_interval * intervals
    # Interval j ends after total * (j + 1) // intervals steps, so no interval runs past the cap.
    ends = [total * (j + 1) // intervals for j in range(intervals)]
    gen = torch.Generator().manual_seed(cand.seed if cand.seed is not None else zlib.crc32(f"{cfg.seed}:{cand.ids}".encode()))
    best, best_acc, best_loss, best_state, curve, examples, step = start_score, None, math.inf, None, [], 0, 0
    y_train = data.y["train"]
    order = torch.randperm(n, generator=gen)
    cursor, stopped = 0, None
    for interval, end in enumerate(ends):
        set_modes(cand, training=True)
        while step < end:
            if cursor >= n:
                order, cursor = torch.randperm(n, generator=gen), 0
            idx = order[cursor:cursor + cfg.batch_size]
            cursor += len(idx)
            if per_batch:
                xb = _augmented_batch(data.x["train"][idx], aug, size) if random_inputs else data.x["train"][idx]
                hb = run_frozen(prefix, xb, size, data.mean, data.std, len(idx), device, memory_format_of(cfg))
            else:
                hb = h_train[idx.to(h_train.device)]
            for g in opt.param_groups:
                g["lr"] = cand.lr_scale * lr_at(step, total, steps_per_interval, hp["opt"])
            loss = F.cross_entropy(_forward(suffix, hb), y_train[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.grad_clip)
            opt.step()
            step += 1
            examples += len(idx)
        set_modes(cand, training=False)
        acc, val_loss = evaluate(suffix, h_val, data.y["val"].to(h_val.device), cfg.eval_batch_size)
        sc = acc * score_factor
        curve.append({"interval": interval + 1, "val_acc": acc, "score": sc, "loss": loss.item(), "val_loss": val_loss})
        if progress is not None:
            progress(curve[-1])
        if survives(sc, val_loss, best, tie, cfg):
            best, best_acc, best_loss = sc, acc, val_loss
            if tie is not None:
                tie = (sc, val_loss)
            best_state = [copy.deepcopy(m.state_dict()) if t else None for m, t in zip(cand.modules, cand.trainable)]
        if stop is not None and interval < len(ends) - 1 and stop(interval + 1, sc):
            stopped = interval + 1
            break
    for p in params.values():
        p.requires_grad_(False)
    if best_state is not None:
        for m, state in zip(cand.modules, best_state):
            if state is not None:
                m.load_state_dict(state)
    momentum = _momentum_of(cand, opt) if cfg.inherit_momentum else {}
    improved = best_state is not None
    last = curve[-1]
    return TrainResult(best_acc if improved else last["val_acc"], best if improved else last["score"],
                       improved, curve, examples, 0.0, momentum, best_loss if improved else last["val_loss"], stopped)


def validate(cand: Candidate, data: TaskData, cfg: EvolverConfig, cache: PrefixCache | None) -> tuple[float, float]:
    """Validation accuracy and cross-entropy of a candidate as it stands, untrained (its frozen
    prefix from the cache, as train_candidate scores its snapshots)."""
    k, size = cand.first_trainable, cand.hparams["arch"]["image_size"]
    for m in cand.modules:
        m.to(cfg.device)
    with in_memory_format(cand.modules, memory_format_of(cfg)):
        set_modes(cand, training=False)
        h_val = prefix_activations(cache if cfg.reuse_prefix else None, cand.ids[:k], cand.modules[:k], data, "val", size, cfg)
        return evaluate(cand.modules[k:], h_val, data.y["val"].to(h_val.device), cfg.eval_batch_size)


def _inherit_momentum(cand: Candidate, opt: torch.optim.Optimizer, cfg: EvolverConfig) -> None:
    """µ2Net: cloned components bring their parent's momentum buffers along."""
    if not cfg.inherit_momentum or not cand.momentum:
        return
    for cid, module, trainable in zip(cand.ids, cand.modules, cand.trainable):
        buffers = cand.momentum.get(cid)
        if not trainable or not buffers:
            continue
        for name, p in module.named_parameters():
            buf = buffers.get(name)
            if buf is not None and buf.shape == p.shape:
                opt.state[p]["momentum_buffer"] = buf.clone().to(p.device)


def _momentum_of(cand: Candidate, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for cid, module, trainable in zip(cand.ids, cand.modules, cand.trainable):
        if trainable:
            out[cid] = {name: opt.state[p]["momentum_buffer"].detach().cpu().contiguous()
                        for name, p in module.named_parameters() if "momentum_buffer" in opt.state.get(p, {})}
    return out


@torch.no_grad()
def logits(modules: list[nn.Module], x: torch.Tensor, image_size: int, mean, std, batch: int, device: str) -> torch.Tensor:
    """The evaluator's logits for uint8 images (what the server's probe check compares against)."""
    for m in modules:
        m.eval()
    return run_frozen(modules, x, image_size, mean, std, batch, device).float().cpu()
