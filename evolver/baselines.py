"""Fine-tuning baselines with muNet's budget accounting (MUNET.md §6), for benchmarks.

Each baseline is a fixed plan over the root path: which components are referenced
(frozen) and which are cloned (trained). It trains with the same trainer as muNet's
candidates, takes the best of R runs by validation score, and commits the winner so its
parameters are accounted like any path's.
"""
from __future__ import annotations

import copy
import time

from sqlalchemy import select
from tqdm import tqdm

from munet import models
from munet.storage import commit as commit_mod
from munet.storage import lineage
from munet.storage.schema import PathRow, Root, Task, new_id

from . import search
from .config import EvolverConfig
from .train import Candidate, PrefixCache, TaskData, accuracy, logits, prefix_activations, train_candidate
from .visit import PROBE_SIZE, count_flops


def _build(system, root: Root, task: Task, kind: str, hp: dict) -> tuple[Candidate, list]:
    train, adapters = search.plan(kind, root.config)
    hp["arch"]["adapters"] = {str(i): w for i, w in adapters.items()}
    family = models.family_for(root.config["timm"])
    base, _ = system.load_path(root.root_path_id)
    by_name = dict(zip(base.names, zip(base.ids, base.modules)))
    ids, names, mods, trainable, new = [], [], [], [], []
    for name, meta in family.layout(root.config, hp["arch"]):
        kind_, _, _ = models.parse_name(name)
        wants = "*" in train or name in train or kind_ in train
        if name in by_name and name != "head" and not wants:
            cid, module = by_name[name]
        else:
            src = by_name.get(name)
            module = copy.deepcopy(src[1]) if src and name != "head" else family.build(root.config, name, meta)
            cid = new_id()
            new.append(commit_mod.NewComponent(name=name, meta=dict(meta), tensors={}, parent_id=src[0] if src and name != "head" else None, id=cid))
        ids.append(cid)
        names.append(name)
        mods.append(module)
        trainable.append(cid in {c.id for c in new})
    return Candidate(ids, names, mods, trainable, hp), new


def run_baseline(system, task_name: str, kind: str, cfg: EvolverConfig, lrs: list[float] | None = None,
                 cache: PrefixCache | None = None, commit: bool = True, progress: bool = False) -> dict:
    """Train R = len(lrs) runs of one baseline; keep the best by validation; report budget.
    `progress`: a bar per run on stderr, one step per validation point (a 96 px fine-tuning
    run takes ~10 minutes on 2 cores)."""
    lrs = lrs or [cfg.defaults["lr"]]
    with system.Session() as s:
        task = s.scalar(select(Task).where(Task.name == task_name))
        root = s.get(Root, task.root_id)
    data = TaskData.from_arrays(task.name, system.dataset(task), task.val_fraction, task.split_seed,
                                root.config["mean"], root.config["std"])
    cache = cache or PrefixCache(cfg.prefix_cache_bytes)
    best, examples, seconds, runs = None, 0, 0.0, []
    for lr in lrs:
        hp = search.initial_hparams(cfg, root.config, data.num_classes)
        hp["opt"]["lr"] = lr
        cand, new = _build(system, root, task, kind, hp)
        with tqdm(total=cfg.intervals, desc=f"{task_name} {kind} lr {lr}", disable=not progress, leave=False,
                  dynamic_ncols=True) as bar:
            def point(p, bar=bar):
                bar.set_postfix(val=f"{p['val_acc']:.3f}")
                bar.update()

            result = train_candidate(cand, data, cfg, cache, 1.0, float("-inf"), progress=point)
        examples, seconds = examples + result.examples, seconds + result.seconds
        runs.append({"lr": lr, "val_acc": result.val_acc})
        if best is None or result.val_acc > best[2].val_acc:
            best = (cand, new, result)
    cand, new, result = best
    size = cand.hparams["arch"]["image_size"]
    k = cand.first_trainable
    test_h = prefix_activations(cache, cand.ids[:k], cand.modules[:k], data, "test", size, cfg)
    test_acc = accuracy(cand.modules[k:], test_h, data.y["test"].to(test_h.device), cfg.eval_batch_size)
    trained_params = sum(models.count_params(m) for m, t in zip(cand.modules, cand.trainable) if t)
    frozen_params = sum(models.count_params(m) for m, t in zip(cand.modules, cand.trainable) if not t)
    out = {"task": task_name, "method": kind, "val_acc": result.val_acc, "test_acc": test_acc, "examples": examples,
           "seconds": seconds, "runs": runs, "trained_params": trained_params, "frozen_params": frozen_params}
    if commit:
        out.update(_commit(system, task, root, cand, new, result, test_acc, data))
    return out


def _commit(system, task, root, cand, new, result, test_acc, data) -> dict:
    modules = dict(zip(cand.ids, cand.modules))
    for c in new:
        c.tensors = {k: v.detach().cpu() for k, v in modules[c.id].state_dict().items()}
        c.num_params = models.count_params(modules[c.id])
    with system.Session() as s:
        users = lineage.component_users(s)
    params = {cid: models.count_params(m) for cid, m in modules.items()}
    accounted = search.accounted_params(params, users, task.name)
    size = cand.hparams["arch"]["image_size"]
    probe_x = data.x["val"][:PROBE_SIZE]
    record = commit_mod.PathRecord(
        task=task.name, root_id=root.id, component_ids=cand.ids, hparams=cand.hparams, image_size=size,
        parent_id=root.root_path_id, val_acc=result.val_acc, score=result.val_acc, test_acc=test_acc,
        accounted_params=accounted, flops=count_flops(cand.modules, size, "cpu"), train_examples=result.examples,
        train_seconds=result.seconds,
        probe={"inputs": probe_x, "logits": logits(cand.modules, probe_x, size, data.mean, data.std, PROBE_SIZE, "cpu")})
    res = commit_mod.commit_path(system.Session, system.store, record, new, reason="baseline")
    return {"path_id": res.path_id, "accounted_params": accounted, "moved": res.moved}
