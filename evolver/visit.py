"""One task iteration of muNet (MUNET.md §5): seeding, parent selection, mutation, child
construction (§2), training, survival, and the commit of the visit's best path."""
from __future__ import annotations

import copy
import logging
import math
import random
import statistics
import time
import zlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from sqlalchemy import func, select, update
from torch import nn
from tqdm import tqdm

from munet import models
from munet.storage import commit as commit_mod
from munet.storage import lineage, signals
from munet.storage.schema import ROOT_LOCK, Candidate as CandidateRow, Component, PathComponent, PathRow, Root, Task, new_id

from . import search
from .config import EvolverConfig
from .train import (Candidate, PrefixCache, TaskData, TrainResult, accuracy, logits, prefix_activations, survives,
                    train_candidate, validate)

log = logging.getLogger("munet.evolver")
PROBE_SIZE = 8
TRAIN_ALL = "train:all"  # a seed candidate that clones and trains every component (cfg.trained_root_seed)
PLAN = "plan:"  # a seed candidate trained as a fixed plan over the root (cfg.plan_root_seed), e.g. plan:bottom:12
CONTINUE = "continue"  # a child that trains its parent further, unmutated (cfg.continue_best)
SOUP = "soup"  # a path's weights averaged with its line's or its neighbours'; its note is "soup:<models averaged>"


@dataclass
class Slot:
    """One component of a path under construction or in the population."""

    id: str
    name: str
    meta: dict
    module: nn.Module
    committed: bool
    locked: bool
    origin: str | None  # nearest committed ancestor component (lineage parent)
    same_task: bool = True
    own: bool = False  # committed component this visit's task created (cfg.train_own)


@dataclass
class Entry:
    """A path known to the visit: committed (seed, live path) or trained in this visit."""

    path_id: str
    hparams: dict
    slots: dict[str, Slot]
    committed: bool
    same_task: bool
    parent: "Entry | None" = None
    committed_path: str | None = None  # nearest committed path (itself when committed)
    candidate: Candidate | None = None
    val_acc: float = 0.0
    score: float = float("-inf")
    train_examples: int = 0
    train_seconds: float = 0.0
    momentum: dict = field(default_factory=dict)
    candidate_row: int | None = None
    line_epochs: float = 0.0  # epochs this task's training line holds in these weights (cfg.line_anneal_epochs)
    val_loss: float = math.inf  # validation cross-entropy (cfg.val_loss_ties; committed paths: measured at load)


@dataclass
class Soup:
    """Averaged weights of a path and some of its neighbours, scored on validation (cfg.line_soup, cfg.greedy_soup)."""

    cand: Candidate
    slots: dict[str, Slot]
    averaged: list[str]  # "avg:<component>/<models>" for each component whose weights were averaged
    models: int
    val_acc: float
    score: float
    val_loss: float
    accounted: float


class Visit:
    def __init__(self, system, task_name: str, cfg: EvolverConfig, *, cache: PrefixCache | None = None,
                 modules: dict[str, nn.Module] | None = None, lease_token: int | None = None,
                 visit_id: int | None = None, worker: str = "local", progress: bool = True,
                 should_stop=lambda: False, on_candidate=None):
        self.system, self.task_name, self.cfg = system, task_name, cfg
        self.cache = cache if cache is not None else PrefixCache(cfg.prefix_cache_bytes)
        self.modules = modules if modules is not None else {}
        self.lease_token, self.visit_id, self.worker = lease_token, visit_id, worker
        self.progress, self.should_stop, self.on_candidate = progress, should_stop, on_candidate
        self.entries: dict[str, Entry] = {}
        self.committed_live = False
        self._root_flops: float | None = None
        self._chains: dict[str, list[str]] = {}  # committed path -> its ancestry (immutable)
        self.examples = 0
        self.point_scores: dict[int, list[float]] = {}  # validation point -> this visit's candidates' scores there

    # -- loading ------------------------------------------------------------------------
    def _load(self) -> None:
        sys_ = self.system
        commit_mod.release_locks(sys_.Session, self.task_name)  # MUNET.md §5.1
        with sys_.Session() as s:
            task = s.scalar(select(Task).where(Task.name == self.task_name))
            if task is None or task.status == "deleted":
                raise KeyError(f"no task named {self.task_name!r}")
            self.task_id, self.num_classes = task.id, len(task.classes)
            # Reproducible per (seed, task, visit number), yet different on every visit.
            self.seed_text = f"{self.cfg.seed}:{self.task_name}:{task.visits}:{task.candidates_tried}"
            self.rng = random.Random(self.seed_text)
            root = s.get(Root, task.root_id)
            self.root_id, self.root_config, self.root_params = root.id, root.config, root.root_params
            self.root_path_id = root.root_path_id
            self.live_id = task.live_path_id
            self.users = lineage.component_users(s)
            self.root_ids: frozenset[str] = frozenset()
            self.tasks = 1
            if self.cfg.root_shared:
                self.root_ids = frozenset(s.scalars(select(Component.id).where(
                    Component.root_id == root.id, Component.task_id.is_(None))))
                self.tasks = s.scalar(select(func.count()).select_from(Task).where(
                    Task.root_id == root.id, Task.status != "deleted"))
            others = {n: p for n, p in lineage.live_paths(s).items() if n != self.task_name}
            tried = set(s.scalars(select(CandidateRow.parent_path_id).where(
                CandidateRow.task_id == task.id, CandidateRow.outcome != "error")))
            split = (task.val_fraction, task.split_seed)
            visits = task.visits
            live = s.get(PathRow, task.live_path_id) if task.live_path_id else None
            stored_score = live.score if live else None
            live_opt = copy.deepcopy(live.hparams.get("opt")) if live else None
        self.cfg = self.cfg.for_visit(visits)
        arrays = sys_.dataset(task)
        self.data = TaskData.from_arrays(self.task_name, arrays, split[0], split[1], self.root_config["mean"], self.root_config["std"],
                                         holdout=self.cfg.final_holdout)
        self.family = models.family_for(self.root_config["timm"])
        self.own_opt = live_opt or search.initial_hparams(self.cfg, self.root_config, self.num_classes)["opt"]
        # Seeds: every other task's live path (or cfg.seed_tasks of them) and the root,
        # unmutated (§5.2); a seed this task already tried unmutated in an earlier visit is
        # not retried.
        picked = list(others)
        if self.cfg.seed_tasks is not None and len(picked) > self.cfg.seed_tasks:
            drawn = set(self.rng.sample(sorted(picked), self.cfg.seed_tasks))
            picked = [n for n in picked if n in drawn]
        self.seeds = [self._committed_entry(others[n]) for n in picked] + [self._committed_entry(self.root_path_id)]
        self.seeding = self.cfg.seed_visits is None or visits < self.cfg.seed_visits
        self.pending_seeds = [e for e in self.seeds if e.path_id not in tried] if self.seeding and self.cfg.seed_phase else []
        root_pending = any(e.path_id == self.root_path_id for e in self.pending_seeds)
        self.pending_trained_root = self.cfg.trained_root_seed and root_pending
        self.pending_adapter_root = self.cfg.adapter_root_seed is not None and root_pending
        self.pending_plan_root = self.cfg.plan_root_seed is not None and root_pending
        self.pending_root_sizes = self._root_sizes(self.cfg.root_seed_sizes) if root_pending and self.cfg.root_seed_sizes else []
        self.population: list[Entry] = []
        self.live_score: tuple[str, float] | None = None
        self.live_entry: Entry | None = None  # the path commit_path compares a new one with
        if self.live_id:
            live = self._committed_entry(self.live_id)
            # Its stored score counted its layers' sharers at its commit; other tasks' paths
            # have moved since, so it is scored as its children are, with today's sharers
            # (base < 1; at base 1.0 the two agree). A stale score locks a shared path in.
            if stored_score is not None:
                live.score = live.val_acc * self.score_factor(live.slots, live.hparams["arch"]["image_size"])[0]
                self.live_score = (live.path_id, live.score)
            else:
                live.score = float("-inf")
            if self.cfg.val_loss_ties:
                live.val_loss = self._val_loss(live)
            self.population.append(live)
            self.live_entry = live
        self.members: dict[str, search.Member] = {}
        # parent path -> (val acc, path id, candidate) of each child trained from it (cfg.greedy_soup):
        # every candidate of the visit stays in memory, 16 of at most 14 MB each in the cpu preset
        self.trained: dict[str, list[tuple[float, str, Candidate]]] = {}
        self.souped: set[tuple[str, int]] = set()
        self.trained_count = 0  # candidates this visit has built, for their seeds

    def _logits(self, entry: Entry, split: str) -> torch.Tensor:
        """A path's logits on one split of this task's data, run whole (no prefix cache)."""
        modules = [entry.slots[name].module for name, _ in self.family.layout(self.root_config, entry.hparams["arch"])]
        for m in modules:
            m.to(self.cfg.device)
        return logits(modules, self.data.x[split], entry.hparams["arch"]["image_size"], self.data.mean, self.data.std,
                      self.cfg.eval_batch_size, self.cfg.device)

    def _val_loss(self, entry: Entry) -> float:
        """Validation cross-entropy of a committed path, as its children's snapshots measure theirs."""
        out = self._logits(entry, "val")
        return float(F.cross_entropy(out, self.data.y["val"])) if len(out) else math.inf

    def _rank(self, entry: Entry) -> tuple[float, float]:
        """Order of paths for the visit's best: score, then (cfg.val_loss_ties) lower validation loss."""
        return entry.score, (-entry.val_loss if self.cfg.val_loss_ties else 0.0)

    def _root_sizes(self, wanted) -> list[int]:
        """The sizes of `wanted` the root family takes, other than the root's own size."""
        default_size = self._committed_entry(self.root_path_id).hparams["arch"]["image_size"]
        sizes = search.allowed_sizes(self.cfg, self.root_config)
        return [z for z in dict.fromkeys(wanted) if z in sizes and z != default_size]

    def _root_seed(self, size: int | None, *notes: str) -> tuple[Entry, dict, list[str]]:
        """The root as a seed candidate, at `size` (None: its own) with that change in its log."""
        root = self._committed_entry(self.root_path_id)
        hp, log = copy.deepcopy(root.hparams), ["seed", *notes]
        if size is not None:
            log.append(f"image_size:{hp['arch']['image_size']}->{size}")
            hp["arch"]["image_size"] = size
        return root, hp, log

    def _trained_root_size(self) -> int | None:
        """cfg.trained_root_size where the root family takes it, else None (the root's own)."""
        wanted = self.cfg.trained_root_size
        return next(iter(self._root_sizes([wanted])), None) if wanted is not None else None

    def _adapter_root_seed(self, width: int) -> tuple[Entry, dict, list[str]]:
        """The root seed at the trained root's size with an adapter of `width` before every block."""
        root, hp, log = self._root_seed(self._trained_root_size())
        blocks = hp["arch"]["blocks"]
        hp["arch"]["adapters"] = {str(i): width for i in blocks}
        hp["adapter_width"] = width
        return root, hp, log + [f"adapter:{i}/w{width}" for i in blocks]

    def _plan_root_seed(self, kind: str) -> tuple[Entry, dict, list[str]]:
        """The root seed at the trained root's size with the plan's adapters; _train_one clones
        the components the plan trains."""
        root, hp, log = self._root_seed(self._trained_root_size(), PLAN + kind)
        _, adapters = search.plan(kind, self.root_config)
        hp["arch"]["adapters"] = {str(i): w for i, w in adapters.items() if i in hp["arch"]["blocks"]}
        hp["adapter_width"] = max(adapters.values(), default=hp["adapter_width"])  # adapters its children add
        return root, hp, log + [f"adapter:{i}/w{w}" for i, w in hp["arch"]["adapters"].items()]

    def _committed_entry(self, path_id: str) -> Entry:
        if path_id in self.entries:
            return self.entries[path_id]
        with self.system.Session() as s:
            path = s.get(PathRow, path_id)
            rows = s.execute(select(PathComponent.position, Component).join(Component, Component.id == PathComponent.component_id)
                             .where(PathComponent.path_id == path_id).order_by(PathComponent.position)).all()
            locks = lineage.locks(s, [c.id for _, c in rows])
        same = path.task_id == self.task_id
        slots = {}
        for _, row in rows:
            slots[row.name] = Slot(row.id, row.name, row.meta, self._module(row), True, bool(locks.get(row.id)), row.id, same,
                                   own=row.task_id == self.task_id)
        hp = copy.deepcopy(path.hparams) if path.task_id else search.initial_hparams(self.cfg, self.root_config, self.num_classes)
        hp.setdefault("mu", search.initial_mu(self.cfg, self.root_config["depth"]))
        for key, default in (("opt", None), ("aug", None)):
            hp.setdefault(key, search.initial_hparams(self.cfg, self.root_config, self.num_classes)[key])
        hp.setdefault("bn_train", False)
        hp.setdefault("adapter_width", self.cfg.defaults["adapter_width"])
        hp["arch"]["num_classes"] = self.num_classes
        if path.task_id is None:  # the root seed keeps the root's blocks but this visit's default image size
            hp["arch"]["image_size"] = search.initial_hparams(self.cfg, self.root_config, self.num_classes)["arch"]["image_size"]
        if not same and self.cfg.seed_opt == "own":
            hp["opt"] = copy.deepcopy(self.own_opt)
        search.fix_settings(hp, self.cfg)
        entry = Entry(path_id, hp, slots, True, same, committed_path=path_id, val_acc=path.val_acc or 0.0,
                      score=path.score if (same and path.score is not None) else float("-inf"),
                      line_epochs=self._line_epochs(path_id) if same else 0.0)
        self.entries[path_id] = entry
        return entry

    def _line_epochs(self, path_id: str) -> float:
        if self.cfg.line_anneal_epochs is None:
            return 0.0
        with self.system.Session() as s:
            examples = lineage.training_line(s, path_id)["examples"]
        return examples / max(1, len(self.data.y["train"]))

    def _module(self, row: Component) -> nn.Module:
        module = self.modules.get(row.id)
        if module is None:
            module = self.system.build_component(row, self.root_config).to(self.cfg.device)
            self.modules[row.id] = module
        return module

    # -- child construction (MUNET.md §2) -------------------------------------------------
    def _ancestors(self, entry: Entry):
        """The entry, its in-visit parents, then the committed ancestry, then the root path."""
        while entry is not None and not entry.committed:
            yield entry
            entry = entry.parent
        if entry is not None:
            chain = self._chains.get(entry.path_id)
            if chain is None:
                with self.system.ReadSession() as s:
                    chain = self._chains[entry.path_id] = [p.id for p in lineage.ancestry(s, entry.path_id)]
            for pid in chain:
                yield self._committed_entry(pid)
        yield self._committed_entry(self.root_path_id)

    def _find(self, parent: Entry, name: str, meta: dict, same_task_only: bool = False) -> Slot | None:
        for entry in self._ancestors(parent):
            slot = entry.slots.get(name)
            if slot is None or (same_task_only and not entry.same_task):
                continue
            if name == "head" and slot.meta.get("num_classes") != meta.get("num_classes"):
                continue
            return slot
        return None

    def build(self, parent: Entry, hp: dict, clones: set[int], path_id: str,
              train: frozenset[str] = frozenset()) -> tuple[Candidate, dict[str, Slot], list[str]]:
        """`train`: names or kinds of components cloned whatever their lock ('*': every one)."""
        ids, names, mods, trainable, slots, actions = [], [], [], [], {}, []
        momentum = {}
        # Under size pressure a clone of a layer other tasks share pays its whole size, while
        # the live path it would replace pays a share, so its children must beat that path by
        # the size gap too (at base 0.7 none of cifar's 16 did): the task's own shared layers
        # stay frozen (MUNET.md) unless a clone mutation picks them.
        own_trainable = self.cfg.train_own and self.cfg.base == 1.0
        for name, meta in self.family.layout(self.root_config, hp["arch"]):
            kind, index, _ = models.parse_name(name)
            source = self._find(parent, name, meta, same_task_only=(kind == "head"))
            if source is None:
                slot, action = self._new_slot(parent, name, meta, hp), "new"
            else:
                clone = ("*" in train or name in train or kind in train or not source.locked or kind in ("final_norm", "head")
                         or (own_trainable and source.own)
                         or (kind == "blocks" and index in clones)
                         or (kind in ("stem", "neck", "cls_token") and self.rng.random() < search.prob(hp, "clone", self.cfg, 0)))
                if clone:
                    module = copy.deepcopy(source.module)
                    slot = Slot(new_id(), name, dict(meta or source.meta), module, False, False, source.origin)
                    action = "clone"
                    if source.id in parent.momentum:
                        momentum[slot.id] = parent.momentum[source.id]
                else:
                    slot, action = source, "ref"
            ids.append(slot.id)
            names.append(name)
            mods.append(slot.module)
            trainable.append(action != "ref")
            slots[name] = slot
            actions.append(f"{action}:{name}")
        return Candidate(ids, names, mods, trainable, hp, momentum), slots, actions

    def _new_slot(self, parent: Entry, name: str, meta: dict, hp: dict) -> Slot:
        kind, index, _ = models.parse_name(name)
        if kind == "pos_embed":
            src = next(s for e in self._ancestors(parent) for n, s in e.slots.items() if n.startswith("pos_embed@"))
            module = self.family.resample_pos_embed(self.root_config, src.module, models.parse_name(src.name)[1], index)
            return Slot(new_id(), name, {}, module.to(self.cfg.device), False, False, src.origin)
        module = self.family.build(self.root_config, name, meta).to(self.cfg.device)
        return Slot(new_id(), name, dict(meta), module, False, False, None)

    # -- scoring ------------------------------------------------------------------------
    def score_factor(self, slots: dict[str, Slot], image_size: int) -> tuple[float, float]:
        """The score per unit of validation accuracy, and the accounted parameters."""
        params = {s.id: models.count_params(s.module) for s in slots.values()}
        accounted = search.accounted_params(params, self.users, self.task_name, self.root_ids, self.tasks)
        flops = root_flops = None
        if self.cfg.flops_base != 1.0:  # µ2Net+ compute factor, against the root at the default size
            flops = count_flops([s.module for s in slots.values()], image_size, self.cfg.device)
            if self._root_flops is None:
                root = self._committed_entry(self.root_path_id)
                self._root_flops = count_flops([s.module for s in root.slots.values()],
                                               self.cfg.defaults["image_size"], self.cfg.device)
            root_flops = self._root_flops
        return search.score(1.0, accounted, self.root_params, self.cfg, flops, root_flops), accounted

    # -- the loop -----------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter()
        self._load()
        tried = improved = 0
        for gen in range(self.cfg.generations):
            if self.should_stop():
                break
            best = max(self.population, key=self._rank, default=None)
            inputs, input_log = None, []
            if self.cfg.inputs_per == "generation":
                inputs, input_log = search.mutate_inputs(best.hparams if best else self.seeds[-1].hparams,
                                                         self.cfg, self.root_config, self.rng,
                                                         colour=self.colour)
            bar = tqdm(total=self.cfg.candidates, desc=f"{self.task_name} gen {gen + 1}/{self.cfg.generations}",
                       disable=not self.progress, leave=False, dynamic_ncols=True)
            for k in range(self.cfg.candidates):
                if self.should_stop():
                    break
                ok = self._one_candidate(gen, inputs, input_log, first=k == 0)
                tried += 1
                improved += int(ok)
                best = max(self.population, key=self._rank, default=None)
                bar.set_postfix(best=f"{best.score:.4f}" if best else "-")
                bar.update()
            bar.close()
            if self.cfg.greedy_soup:
                self._try_greedy_soup(gen)
        result = self._finish()
        result.update({"task": self.task_name, "candidates": tried, "improved": improved,
                       "seconds": time.perf_counter() - t0, "examples": self.examples, "cache_hits": self.cache.hits, "cache_misses": self.cache.misses})
        return result

    def _pick(self, first: bool = False) -> tuple[Entry, dict, list[str], set[int], bool]:
        if self.pending_seeds:
            seed = self.pending_seeds.pop(0)
            return seed, copy.deepcopy(seed.hparams), ["seed"], set(), True
        if self.pending_trained_root:  # cfg.trained_root_seed: the root once more, every component trained
            self.pending_trained_root = False
            return *self._root_seed(self._trained_root_size(), TRAIN_ALL), set(), True
        if self.pending_adapter_root:  # cfg.adapter_root_seed: the root, frozen, with an adapter before every block
            self.pending_adapter_root = False
            return *self._adapter_root_seed(self.cfg.adapter_root_seed), set(), True
        if self.pending_plan_root:  # cfg.plan_root_seed: the root trained as a fixed plan
            self.pending_plan_root = False
            return *self._plan_root_seed(self.cfg.plan_root_seed), set(), True
        if self.pending_root_sizes:  # cfg.root_seed_sizes: the root's plain seed at another size
            return *self._root_seed(self.pending_root_sizes.pop(0)), set(), True
        if self.cfg.continue_best and first and self.population:
            best = max(self.population, key=self._rank)
            return best, copy.deepcopy(best.hparams), [CONTINUE], set(), False
        members = [self._member(e) for e in self.population]
        # A visit past the seeding ones falls back to this task's own paths only: a mutated
        # seed starts a side lineage one epoch from a head probe, which the live lineage's
        # whole visits of training keep out of reach (MUNET.md's rule when seed_visits is None).
        fallback = self.seeds if self.seeding or not members else []
        seeds = [self._member(e) for e in fallback]
        parent = self.entries[search.select_parent(members, seeds, self.rng).key]
        hp, mutations, clones = search.mutate(parent.hparams, self.cfg, self.root_config, self.rng)
        return parent, hp, mutations, clones, False

    def _member(self, entry: Entry) -> search.Member:
        member = self.members.get(entry.path_id)
        if member is None:
            member = self.members[entry.path_id] = search.Member(entry.path_id, entry.hparams, entry.score, entry.val_acc)
        member.score = entry.score
        return member

    @property
    def colour(self) -> bool:
        return self.data.x["train"].shape[-1] != 1

    def _one_candidate(self, gen: int, inputs: dict | None, input_log: list[str], first: bool = False) -> bool:
        parent, hp, mutations, clones, is_seed = self._pick(first)
        if CONTINUE in mutations:  # cfg.continue_best: the parent's own inputs, unmutated
            inputs, input_log = {"image_size": hp["arch"]["image_size"], "aug": hp["aug"]}, []
        if not is_seed and inputs is None:  # cfg.inputs_per == "candidate": from the parent's own
            inputs, input_log = search.mutate_inputs(hp, self.cfg, self.root_config, self.rng, colour=self.colour)
        if not is_seed:
            hp = search.apply_inputs(hp, inputs)
            mutations = mutations + input_log
        elif not self.colour:
            hp = {**hp, "aug": search.drop_colour_jitter(hp["aug"])}
        self._member(parent).children += 1
        path_id = new_id()
        # New layers' initial weights, random augmentation and the data order draw from a seed
        # of the visit's and the candidate's number, not from component ids (fresh uuids), so a
        # run with the same seed, data and settings trains the same candidates again.
        seed = zlib.crc32(f"{self.seed_text}:{self.trained_count}".encode())
        self.trained_count += 1
        with torch.random.fork_rng(devices=[torch.device(self.cfg.device).index or 0] if self.cfg.device.startswith("cuda") else []):
            torch.manual_seed(seed)
            return self._train_one(gen, parent, hp, mutations, clones, path_id, seed)

    def _train_one(self, gen, parent, hp, mutations, clones, path_id, seed) -> bool:
        """Build, train and record one candidate (under its own torch seed, _one_candidate)."""
        plan = next((m[len(PLAN):] for m in mutations if m.startswith(PLAN)), None)
        train = {"*"} if TRAIN_ALL in mutations else search.plan(plan, self.root_config)[0] if plan else set()
        cand, slots, actions = self.build(parent, hp, clones, path_id, train=frozenset(train))
        cand.seed = seed
        line_epochs = parent.line_epochs if parent.same_task else 0.0  # a seed starts a new line
        cand.lr_scale = self.cfg.lr_scale(gen) * self.cfg.line_scale(line_epochs)
        if cand.lr_scale != 1.0:  # the record's hparams keep the path's lr; this says what trained
            actions = actions + [f"lr_scale:{cand.lr_scale:.3g}"]
        factor, accounted = self.score_factor(slots, hp["arch"]["image_size"])
        start = parent.score + self.cfg.min_improvement if parent.same_task else float("-inf")
        tie = (parent.score, parent.val_loss) if parent.same_task else (float("-inf"), math.inf)
        status, result = "error", None
        try:
            result = train_candidate(cand, self.data, self.cfg, self.cache, factor, start, tie=tie,
                                     stop=self._below_median if self.cfg.median_stop else None)
            self.examples += result.examples
            status = "improved" if result.improved else "discarded"
            for point in result.curve if self.cfg.median_stop else ():
                self.point_scores.setdefault(point["interval"], []).append(point["score"])
            if result.stopped:
                mutations = mutations + [f"stopped:{result.stopped}"]
        except (RuntimeError, ValueError) as e:  # a broken candidate must not end the visit
            log.warning("candidate of %s failed: %s", self.task_name, e)
            mutations = mutations + [f"error:{str(e)[:200]}"]
        entry = None
        if status == "improved":
            entry = Entry(path_id, hp, slots, False, True, parent=parent, committed_path=parent.committed_path,
                          candidate=cand, val_acc=result.val_acc, score=result.score, val_loss=result.val_loss,
                          train_examples=result.examples, train_seconds=result.seconds, momentum=result.momentum,
                          line_epochs=line_epochs + result.examples / max(1, len(self.data.y["train"])))
            self.entries[path_id] = entry
            self.population.append(entry)
        row_id = self._record(gen, parent, path_id, hp, mutations + actions, result, accounted, status)
        if entry is not None:
            entry.candidate_row = row_id
        if entry is not None and not self.live_id and not self.committed_live:
            # A new task becomes servable with its first good candidate (DESIGN.md).
            self._commit(entry, reason="first", lock=False)
            self.committed_live, self.live_entry = True, entry
        if self.cfg.greedy_soup and result is not None:  # kept or discarded, an ingredient of soups near its parent
            self.trained.setdefault(parent.path_id, []).append((result.val_acc, path_id, cand))
        if entry is not None and self.cfg.line_soup and parent.same_task:
            self._try_line_soup(gen, entry)
        if self.on_candidate:
            self.on_candidate(self.task_name, status)
        return status == "improved"

    def _below_median(self, point: int, score: float) -> bool:
        """cfg.median_stop: below the median of the visit's last median_stop candidates at this point."""
        peers = self.point_scores.get(point, [])[-self.cfg.median_stop:]
        return len(peers) == self.cfg.median_stop and score < statistics.median(peers)

    # -- weight soups (cfg.line_soup, cfg.greedy_soup) ------------------------------------
    def _line(self, entry: Entry) -> list[Entry]:
        """The entry and its nearest ancestors on its task's training line, cfg.line_soup at most."""
        line = []
        for e in self._ancestors(entry):
            if not e.same_task or len(line) == self.cfg.line_soup:
                break
            line.append(e)
        return line

    def _soup(self, base: Entry, sources: list[dict[str, nn.Module]]) -> tuple[Candidate, dict[str, Slot], list[str]]:
        """`base` with each trained component's weights averaged with the `sources` (name ->
        module) that hold it in the same shapes; frozen (referenced) components stay shared."""
        cand = base.candidate
        ids, mods, slots, momentum, averaged = [], [], {}, {}, []
        for name, module, trainable in zip(cand.names, cand.modules, cand.trainable):
            slot = base.slots[name]
            if trainable:
                states = [module.state_dict()]
                for source in sources:
                    state = source[name].state_dict() if name in source else {}
                    if state.keys() == states[0].keys() and all(v.shape == states[0][k].shape for k, v in state.items()):
                        states.append(state)
                module = copy.deepcopy(module)
                if len(states) > 1:
                    module.load_state_dict({k: torch.stack([st[k].float() for st in states]).mean(0).to(v.dtype)
                                            if v.is_floating_point() else v for k, v in states[0].items()})
                    averaged.append(f"avg:{name}/{len(states)}")
                new = Slot(new_id(), name, dict(slot.meta), module, False, False, slot.origin)
                if slot.id in base.momentum:
                    momentum[new.id] = base.momentum[slot.id]
                slot = new
            ids.append(slot.id)
            mods.append(slot.module)
            slots[name] = slot
        return Candidate(ids, list(cand.names), mods, list(cand.trainable), base.hparams, momentum), slots, averaged

    def _taste(self, base: Entry, sources: list[dict[str, nn.Module]]) -> Soup:
        cand, slots, averaged = self._soup(base, sources)
        factor, accounted = self.score_factor(slots, base.hparams["arch"]["image_size"])
        acc, val_loss = validate(cand, self.data, self.cfg, self.cache)
        return Soup(cand, slots, averaged, len(sources) + 1, acc, acc * factor, val_loss, accounted)

    def _try_soup(self, gen: int, base: Entry, soup: Soup, notes: list[str], t0: float) -> Entry | None:
        """Record a soup of `base` as its child: it joins the population if it beats `base` as a
        trained child must beat its parent."""
        if not soup.averaged:
            return None
        tie = (base.score, base.val_loss) if self.cfg.val_loss_ties else None
        better = survives(soup.score, soup.val_loss, base.score + self.cfg.min_improvement, tie, self.cfg)
        result = TrainResult(soup.val_acc, soup.score, better, [{"interval": 0, "val_acc": soup.val_acc, "score": soup.score,
                                                                 "val_loss": soup.val_loss}],
                             0, time.perf_counter() - t0, {}, soup.val_loss)
        path_id = new_id()
        row_id = self._record(gen, base, path_id, base.hparams, [f"{SOUP}:{soup.models}"] + notes + soup.averaged,
                              result, soup.accounted, "improved" if better else "discarded")
        if not better:
            return None
        entry = Entry(path_id, copy.deepcopy(base.hparams), soup.slots, False, True, parent=base,
                      committed_path=base.committed_path, candidate=soup.cand, val_acc=soup.val_acc, score=soup.score,
                      val_loss=soup.val_loss, momentum=soup.cand.momentum, line_epochs=base.line_epochs, candidate_row=row_id)
        self.entries[path_id] = entry
        self.population.append(entry)
        return entry

    def _try_line_soup(self, gen: int, child: Entry) -> Entry | None:
        t0, line = time.perf_counter(), self._line(child)
        if len(line) < 2:
            return None
        return self._try_soup(gen, child, self._taste(child, [{n: s.module for n, s in e.slots.items()} for e in line[1:]]),
                              ["line"], t0)

    def _try_greedy_soup(self, gen: int) -> Entry | None:
        """Greedy soup (Wortsman et al. 2022) of the visit's best path with the candidates trained
        from its parent (its siblings) and from itself (its children), kept or discarded:
        added best-first while the soup's validation accuracy does not fall; only components
        an ingredient trained are averaged."""
        best = max(self.population, key=self._rank, default=None)
        if best is None or best.committed or best.parent is None or best.candidate is None:
            return None
        pool = self.trained.get(best.parent.path_id, []) + self.trained.get(best.path_id, [])
        pool = [p for p in pool if p[2] is not best.candidate]
        key = (best.path_id, len(pool))
        if not pool or key in self.souped:
            return None
        self.souped.add(key)
        t0 = time.perf_counter()
        picked, names, soup = [], [], None
        for _, path_id, cand in sorted(pool, key=lambda p: -p[0]):
            source = {n: m for n, m, t in zip(cand.names, cand.modules, cand.trainable) if t}
            trial = self._taste(best, picked + [source])
            if trial.val_acc >= (soup.val_acc if soup else best.val_acc):
                picked, names, soup = picked + [source], names + [f"with:{path_id}"], trial
        if soup is None:
            return None
        return self._try_soup(gen, best, soup, ["greedy", f"tried:{len(pool)}", *names], t0)

    def _record(self, gen, parent, path_id, hp, mutations, result, accounted, status) -> int:
        # An in-visit parent is never committed, so its id lives only in these notes: the
        # child names it ("parent:"), and the row that trained it names itself ("path:"), so
        # a lineage is rebuilt from the records alone, uncommitted steps included.
        lineage_note = [f"path:{path_id}"] + ([] if parent.committed else [f"parent:{parent.path_id}"])
        with self.system.Session.begin() as s:
            row = CandidateRow(task_id=self.task_id, visit_id=self.visit_id, parent_path_id=parent.committed_path,
                               generation=gen, mutations=mutations + lineage_note, hparams=hp,
                               val_curve=result.curve if result else [], val_acc=result.val_acc if result else None,
                               score=result.score if result else None, accounted_params=accounted,
                               examples=result.examples if result else 0, seconds=result.seconds if result else 0.0,
                               outcome=status)
            s.add(row)
            s.execute(update(Task).where(Task.id == self.task_id).values(candidates_tried=Task.candidates_tried + 1))
            s.flush()
            return row.id

    # -- end of visit ---------------------------------------------------------------------
    def _finish(self) -> dict:
        best, finalists = self._final_choice()
        outcome = {"moved": False, "path_id": self.live_id, "score": None, "val_acc": None, "test_acc": None,
                   "finalists": finalists}
        if best is not None and not best.committed:
            res = self._commit(best, reason="evolved", lock=True)
            outcome.update({"moved": res.moved, "path_id": res.path_id if res.moved else self.live_id})
        elif best is not None:
            outcome["path_id"] = best.path_id
        commit_mod.lock_live(self.system.Session, self.task_name)  # MUNET.md §5.5
        with self.system.Session() as s:
            live = s.get(PathRow, s.scalar(select(Task.live_path_id).where(Task.name == self.task_name)))
        if live is not None:
            outcome.update({"path_id": live.id, "score": live.score, "val_acc": live.val_acc, "test_acc": live.test_acc,
                            "accounted_params": live.accounted_params, "image_size": live.image_size})
        return outcome

    def _final_choice(self) -> tuple[Entry | None, list[dict]]:
        """The path the visit ends with, and (cfg.final_holdout) how its finalists scored.

        Without held-back images: the best by rank. With them: the best `final_top` paths that
        would displace the live path, and the live path, each scored on the whole validation
        split (its scored share's accuracy and the held-back share's), best of those first."""
        ranked = sorted(self.population, key=self._rank, reverse=True)
        n_held, n_val = len(self.data.y.get("holdout", ())), len(self.data.y["val"])
        if not ranked or not n_held:
            return (ranked[0] if ranked else None), []
        live = self.live_entry
        finalists = [e for e in ranked if live is None or e.score > live.score][:self.cfg.final_top]
        finalists += [live] if live is not None else []
        rows = []
        for entry in finalists:
            held_acc = float((self._logits(entry, "holdout").argmax(1) == self.data.y["holdout"]).float().mean())
            whole = (entry.val_acc * n_val + held_acc * n_held) / (n_val + n_held)
            factor, _ = self.score_factor(entry.slots, entry.hparams["arch"]["image_size"])
            rows.append({"path_id": entry.path_id, "val_acc": entry.val_acc, "holdout_acc": held_acc,
                         "final_score": whole * factor, "search_score": entry.score, "live": entry is live})
        # Ties keep the search's order (finalists are in rank order, the live path last).
        pick = max(range(len(rows)), key=lambda i: (rows[i]["final_score"], -i))
        rows[pick]["chosen"] = True
        log.info("%s finalists (val, held-back, final score): %s", self.task_name,
                 ", ".join(f"{r['val_acc']:.3f}/{r['holdout_acc']:.3f}/{r['final_score']:.3f}{' live' if r['live'] else ''}"
                           f"{' *' if r.get('chosen') else ''}" for r in rows))
        return finalists[pick], rows

    def _commit(self, entry: Entry, reason: str, lock: bool):
        cand = entry.candidate
        size = entry.hparams["arch"]["image_size"]
        test_h = prefix_activations(self.cache, cand.ids[:cand.first_trainable], cand.modules[:cand.first_trainable],
                                    self.data, "test", size, self.cfg)
        test_acc = accuracy(cand.modules[cand.first_trainable:], test_h, self.data.y["test"].to(test_h.device), self.cfg.eval_batch_size)
        probe_x = self.data.x["val"][:PROBE_SIZE]
        probe = {"inputs": probe_x, "logits": logits(cand.modules, probe_x, size, self.data.mean, self.data.std, PROBE_SIZE, self.cfg.device)}
        _, accounted = self.score_factor(entry.slots, size)
        new = [commit_mod.NewComponent(name=s.name, tensors={k: v.detach().cpu() for k, v in s.module.state_dict().items()},
                                       meta=s.meta, parent_id=s.origin, num_params=models.count_params(s.module), id=s.id)
               for s in entry.slots.values() if not s.committed]
        record = commit_mod.PathRecord(
            task=self.task_name, root_id=self.root_id, component_ids=cand.ids, hparams=entry.hparams, image_size=size,
            parent_id=entry.committed_path, val_acc=entry.val_acc, score=entry.score, test_acc=test_acc,
            accounted_params=accounted, flops=count_flops(cand.modules, size, self.cfg.device),
            train_examples=entry.train_examples, train_seconds=entry.train_seconds, probe=probe, id=entry.path_id)
        res = commit_mod.commit_path(self.system.Session, self.system.store, record, new,
                                     lease_token=self.lease_token, reason=reason, lock=lock,
                                     candidate_id=entry.candidate_row, live_score=self.live_score)
        for s in entry.slots.values():  # now committed: later children clone or reference them by id
            s.committed, s.origin = True, s.id
            self.modules[s.id] = s.module
        entry.committed, entry.committed_path = True, entry.path_id
        if res.moved:
            signals.publish(self.system.settings.redis_url, signals.SWAPS,
                            signals.swap_message(self.task_name, res.path_id, res.score))
        return res


@torch.no_grad()
def count_flops(modules: list[nn.Module], image_size: int, device: str) -> float:
    """Forward FLOPs of one image (for the record and µ2Net+'s optional compute factor)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        for m in modules:
            x = m(x)
    return float(counter.get_total_flops())
