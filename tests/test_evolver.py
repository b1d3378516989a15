"""The evolver on real (small) tasks: visits, immunity, BatchNorm, leases and fencing."""
from __future__ import annotations

import copy
import datetime as dt
import math
import re

import pytest
import torch
from sqlalchemy import select, update

from munet.evolver import baselines, search
from munet.evolver.train import Candidate, PrefixCache, TaskData, logits, train_candidate
from munet.evolver.visit import Visit
from munet.evolver.worker import claim, release
from munet.storage.commit import LeaseLost, NewComponent, PathRecord, commit_path
from munet.storage.schema import Candidate as CandidateRow, Component, LiveHistory, PathComponent, PathRow, Root, Task

from evolver_support import digits_npz, tiny_config


@pytest.fixture
def two_tasks(sqlite_system, tmp_path):
    s = sqlite_system
    s.add_root("lite0", "tf_efficientnet_lite0", "packaged")
    s.add_task("a", str(digits_npz(tmp_path / "a.npz", offset=0)))
    s.add_task("b", str(digits_npz(tmp_path / "b.npz", offset=3)))
    return s


def _probe(system, task_name):
    """Task logits on fixed inputs through a path loaded fresh from the store."""
    info = system.task_json(task_name)
    path, row = system.load_path(info["live_path"]["id"], cache={})
    x = torch.arange(6 * 16 * 16, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(6, 16, 16, 1)
    return logits(path.modules, x, row.image_size, path.mean, path.std, 6, "cpu")


def _blobs(system, path_id):
    from munet.storage.lineage import path_component_ids
    from munet.storage.schema import Component

    with system.Session() as s:
        ids = path_component_ids(s, path_id)
        hashes = [s.get(Component, c).blob_hash for c in ids]
    return {h: system.store.read_bytes(h) for h in hashes}


def train_images(system, name: str) -> int:
    """Images task `name` trains on: its training set less the validation split it stores."""
    with system.Session() as s:
        task = s.scalar(select(Task).where(Task.name == name))
    return len(TaskData.from_arrays(name, system.dataset(task), task.val_fraction, task.split_seed, (0.5,), (0.5,)).y["train"])


def _root_candidate(system, cfg, plan="top:4"):
    """Task a's data and a root path trained as a baseline plan says (default: its top 4
    components), at cfg's defaults."""
    with system.Session() as s:
        task = s.scalar(select(Task).where(Task.name == "a"))
        root = s.get(Root, task.root_id)
    data = TaskData.from_arrays("a", system.dataset(task), task.val_fraction, task.split_seed, root.config["mean"],
                                root.config["std"])
    hp = search.initial_hparams(cfg, root.config, data.num_classes)
    template, _ = baselines._build(system, root, task, plan, hp)
    return data, template


def test_a_visit_gives_a_new_task_a_live_path_and_records_every_candidate(two_tasks):
    result = Visit(two_tasks, "a", tiny_config(max_epochs=3.0), progress=False).run()
    info = two_tasks.task_json("a")
    assert result["candidates"] == 2
    # 10 classes, 30 validation images: chance is 0.1, and P(>= 0.4 by chance) < 1e-4.
    assert info["status"] == "ready" and info["live_path"]["val_acc"] >= 0.4
    assert info["candidates_tried"] == 2
    hp = info["live_path"]["hparams"]
    assert set(hp) >= {"arch", "opt", "aug", "mu"} and hp["arch"]["num_classes"] == 10
    with two_tasks.Session() as s:
        rows = list(s.scalars(select(CandidateRow)))
    assert all(r.val_curve and r.examples > 0 and r.seconds > 0 for r in rows)
    assert "seed" in rows[0].mutations  # the root seed is tried unmutated first


def test_seeds_are_tried_only_on_the_visits_the_config_allows(two_tasks):
    cfg = tiny_config(candidates=3)
    Visit(two_tasks, "a", cfg, progress=False).run()
    Visit(two_tasks, "b", cfg, progress=False).run()
    with two_tasks.Session.begin() as s:
        s.execute(update(Task).where(Task.name == "a").values(visits=1))
    # Checked before a's second visit: that visit's parent selection may pick b's live path
    # as a mutated parent, after which no rule would retry it unmutated.
    every = Visit(two_tasks, "a", cfg.replace(seed_visits=None), progress=False)
    every._load()
    b_live = two_tasks.task_json("b")["live_path"]["id"]
    assert b_live in [e.path_id for e in every.pending_seeds], "MUNET.md's rule seeds every visit"

    assert cfg.seed_visits == 1
    Visit(two_tasks, "a", cfg, progress=False).run()
    with two_tasks.Session() as s:
        rows = list(s.scalars(select(CandidateRow).join(Task).where(Task.name == "a").order_by(CandidateRow.id)))
    assert not any("seed" in r.mutations for r in rows[-3:]), "a second visit skips b's untried live path"


def test_parent_selection_falls_back_to_seeds_only_on_seeding_visits(two_tasks):
    cfg = tiny_config()
    Visit(two_tasks, "a", cfg, progress=False).run()
    Visit(two_tasks, "b", cfg, progress=False).run()
    with two_tasks.Session.begin() as s:
        s.execute(update(Task).where(Task.name == "a").values(visits=1))

    def parents(visit):
        visit._load()
        visit.pending_seeds = []
        live = visit.population[0]
        visit._member(live).children = 60  # saturated: selection always takes the fallback
        return live.path_id, {visit._pick()[0].path_id for _ in range(40)}

    live, picked = parents(Visit(two_tasks, "a", cfg.replace(seed_visits=None), progress=False))
    assert picked - {live}, "MUNET.md's rule: the uniform fallback reaches the seeds"
    live, picked = parents(Visit(two_tasks, "a", cfg, progress=False))
    assert picked == {live}, "past its seeding visits a task evolves only its own paths"


def test_candidates_of_one_generation_share_input_settings_unless_drawn_per_candidate(two_tasks):
    # mu = 1: every candidate's draw moves the size off 32 px (to 48, or clamped back to 32).
    cfg = tiny_config(candidates=6, mu=1.0, evolve_mu=False, inputs_per="generation")

    def sizes(visit_cfg, task):
        Visit(two_tasks, task, visit_cfg, progress=False).run()
        with two_tasks.Session() as s:
            rows = s.scalars(select(CandidateRow).join(Task).where(Task.name == task))
            return [r.hparams["arch"]["image_size"] for r in rows if "seed" not in r.mutations]

    shared = sizes(cfg, "a")
    assert len(shared) >= 4 and len(set(shared)) == 1, "MUNET.md: one draw per generation"
    # Per candidate, each child lands on 32 or 48 px by its own coin flip (which parent it
    # gets depends on training outcomes, so the rng's order is not fixed): 10 children (12 less
    # two seeds) all on one size happen with odds 2 * 2**-10, where 4 children failed a CI run.
    drawn = sizes(cfg.replace(inputs_per="candidate", candidates=12), "b")
    assert len(drawn) >= 10 and set(drawn) == {32, 48}, "each candidate mutates its parent's size"


def test_a_seeds_children_start_from_this_tasks_optimiser_settings_when_configured(two_tasks):
    cfg = tiny_config()
    Visit(two_tasks, "a", cfg, progress=False).run()
    a_live = two_tasks.task_json("a")["live_path"]["id"]
    foreign = {"lr": 0.1, "schedule": "restarts", "warmup": 0.3, "momentum": 0.9, "nesterov": False}
    with two_tasks.Session.begin() as s:
        row = s.get(PathRow, a_live)
        row.hparams = {**row.hparams, "opt": foreign}

    def seed_opts(visit_cfg):
        visit = Visit(two_tasks, "b", visit_cfg, progress=False)
        visit._load()
        return {e.path_id: e.hparams["opt"] for e in visit.seeds}

    searched = cfg.replace(seed_opt="seed", fixed_hparams=())
    assert seed_opts(searched)[a_live] == foreign, "MUNET.md: a path's hparams travel with it"
    own = seed_opts(cfg.replace(seed_opt="own"))
    defaults = {k: cfg.defaults[k] for k in foreign}
    assert own[a_live] == defaults and all(o == defaults for o in own.values()), "a new task starts from the defaults"

    Visit(two_tasks, "b", cfg.replace(seed_opt="own"), progress=False).run()
    b_opt = two_tasks.task_json("b")["live_path"]["hparams"]["opt"]
    with two_tasks.Session.begin() as s:
        s.execute(update(Task).where(Task.name == "b").values(visits=0))  # seed again
    assert seed_opts(cfg.replace(seed_opt="own"))[a_live] == b_opt, "a task with a live path keeps its own settings"
    with pytest.raises(ValueError, match="seed_opt"):
        cfg.replace(seed_opt="other")


def test_a_path_committed_under_other_fixed_settings_trains_and_seeds_at_the_configurations_values(two_tasks):
    cfg = tiny_config()
    assert {"hflip", "lr", "bn_train"} <= set(cfg.fixed_hparams)
    Visit(two_tasks, "a", cfg, progress=False).run()
    a_live = two_tasks.task_json("a")["live_path"]["id"]
    with two_tasks.Session.begin() as s:  # as if committed before the preset fixed these
        row = s.get(PathRow, a_live)
        old = copy.deepcopy(row.hparams)
        old["aug"]["hflip"], old["opt"]["lr"], old["bn_train"], old["aug"]["brightness"] = True, 0.1, True, 0.05
        row.hparams = old

    def entries(task, visit_cfg):
        visit = Visit(two_tasks, task, visit_cfg, progress=False)
        visit._load()
        return {e.path_id: e.hparams for e in visit.seeds + ([visit.live_entry] if visit.live_entry else [])}

    for task in ("a", "b"):  # a's own next visit and the seed a gives a new task
        hp = entries(task, cfg)[a_live]
        assert (hp["aug"]["hflip"], hp["opt"]["lr"], hp["bn_train"]) == (False, cfg.defaults["lr"], False)
        assert hp["aug"]["brightness"] == 0.05, "a searched setting stays the path's own"
        assert hp["arch"] == old["arch"]
    loose = entries("b", cfg.replace(fixed_hparams=(), seed_opt="seed"))[a_live]
    assert (loose["aug"]["hflip"], loose["opt"]["lr"], loose["bn_train"]) == (True, 0.1, True), "unfixed, they travel"

    Visit(two_tasks, "b", cfg, progress=False).run()
    with two_tasks.Session() as s:
        trained = [r.hparams for r in s.scalars(select(PathRow).where(PathRow.task_id.is_not(None)))
                   if r.id != a_live]
    assert trained and all(not h["aug"]["hflip"] and h["opt"]["lr"] == cfg.defaults["lr"] for h in trained)
    with pytest.raises(ValueError, match="hfilp"):
        cfg.replace(fixed_hparams=("hfilp",))


def test_the_seeding_phase_tries_the_root_with_every_component_trained_when_configured(two_tasks, tmp_path):
    from munet.evolver.visit import TRAIN_ALL

    def records(task, visit_cfg):
        Visit(two_tasks, task, visit_cfg, progress=False).run()
        with two_tasks.Session() as s:
            return list(s.scalars(select(CandidateRow).join(Task).where(Task.name == task).order_by(CandidateRow.id)))

    cfg = tiny_config(candidates=3, max_epochs=0.3, seed_tasks=None)
    plain = records("a", cfg)
    assert not any(TRAIN_ALL in r.mutations for r in plain), "MUNET.md: the root seed is frozen"
    assert any(m.startswith("ref:blocks.") for m in plain[0].mutations)

    rows = records("b", cfg.replace(trained_root_seed=True))
    seeds = [r for r in rows if "seed" in r.mutations]
    assert len(seeds) == 3, "a's live path, the root, and the root trained whole"
    trained = next(r for r in seeds if TRAIN_ALL in r.mutations)
    assert trained.parent_path_id == seeds[1].parent_path_id != seeds[0].parent_path_id, "its parent: the root path"
    acts = [m for m in trained.mutations if ":" in m and m.split(":", 1)[0] in ("ref", "clone", "new")]
    assert acts and not any(m.startswith("ref:") for m in acts), "every component cloned and trained"
    assert {"clone:stem", "clone:blocks.0", "clone:neck"} <= set(acts)
    assert trained.hparams["arch"]["image_size"] == 32 and not any(m.startswith("image_size") for m in trained.mutations)

    two_tasks.add_task("c", str(digits_npz(tmp_path / "c.npz", offset=5)))
    sized = [r for r in records("c", cfg.replace(trained_root_seed=True, trained_root_size=48, seed_tasks=1)) if TRAIN_ALL in r.mutations]
    assert len(sized) == 1 and sized[0].hparams["arch"]["image_size"] == 48, "the trained root at its own size"
    assert "image_size:32->48" in sized[0].mutations and sized[0].examples > 0


def _seed_rows(system, task, cfg):
    """The candidate rows of one visit of `task` that were seeds, in training order."""
    Visit(system, task, cfg, progress=False).run()
    with system.Session() as s:
        rows = list(s.scalars(select(CandidateRow).join(Task).where(Task.name == task).order_by(CandidateRow.id)))
    return [r for r in rows if "seed" in r.mutations]


def test_the_seeding_phase_tries_the_frozen_root_with_an_adapter_before_every_block_when_configured(two_tasks):
    cfg = tiny_config(candidates=3, max_epochs=0.3, seed_tasks=0, adapter_root_seed=8, trained_root_size=48)
    seeds = _seed_rows(two_tasks, "a", cfg)
    assert len(seeds) == 2, "the root, then the root with adapters"
    plain, adapted = seeds
    assert adapted.parent_path_id == plain.parent_path_id, "its parent: the root path"
    depth = len(plain.hparams["arch"]["blocks"])
    assert adapted.hparams["arch"]["adapters"] == {str(i): 8 for i in range(depth)} and adapted.hparams["adapter_width"] == 8
    assert {f"new:adapter@{i}/w8" for i in range(depth)} <= set(adapted.mutations), "every adapter new and trained"
    refs = {m for m in adapted.mutations if m.startswith("ref:")}
    assert {"ref:stem", "ref:neck"} | {f"ref:blocks.{i}" for i in range(depth)} <= refs, "the backbone stays frozen"
    assert adapted.hparams["arch"]["image_size"] == 48 and adapted.examples > 0, "at the trained root's size, trained"
    assert not plain.hparams["arch"]["adapters"], "MUNET.md's root seed is unchanged"
    with pytest.raises(ValueError, match="adapter_root_seed"):
        cfg.replace(adapter_root_seed=0)


def test_the_seeding_phase_tries_the_root_trained_as_a_fixed_plan_when_configured(two_tasks):
    cfg = tiny_config(candidates=3, max_epochs=0.3, seed_tasks=0, plan_root_seed="bottom:12+adapters:8", trained_root_size=48)
    seeds = _seed_rows(two_tasks, "a", cfg)
    assert len(seeds) == 2, "the root, then the root trained as the plan"
    plain, planned = seeds
    assert planned.parent_path_id == plain.parent_path_id and "plan:bottom:12+adapters:8" in planned.mutations
    depth = len(plain.hparams["arch"]["blocks"])
    assert planned.hparams["arch"]["adapters"] == {str(i): 8 for i in range(depth)} and planned.hparams["adapter_width"] == 8
    acts = set(planned.mutations)
    assert {"clone:stem"} | {f"clone:blocks.{i}" for i in range(12)} | {f"new:adapter@{i}/w8" for i in range(depth)} <= acts
    assert {"ref:neck"} | {f"ref:blocks.{i}" for i in range(12, depth)} <= acts, "the top blocks and the neck stay shared"
    assert planned.hparams["arch"]["image_size"] == 48 and planned.examples > 0, "at the trained root's size, trained"
    assert not plain.hparams["arch"]["adapters"], "MUNET.md's root seed is unchanged"
    with pytest.raises(ValueError, match="unknown plan 'middle:3'"):
        cfg.replace(plan_root_seed="middle:3")


def test_a_path_pays_a_share_of_the_root_components_by_the_task_count_when_root_shared(two_tasks):
    Visit(two_tasks, "a", tiny_config(candidates=1, max_epochs=0.3, seed_tasks=0, root_shared=True), progress=False).run()
    live_id = two_tasks.task_json("a")["live_path"]["id"]
    with two_tasks.Session() as s:
        live = s.get(PathRow, live_id)
        parts = s.execute(select(Component.num_params, Component.task_id).join(
            PathComponent, PathComponent.component_id == Component.id).where(PathComponent.path_id == live_id)).all()
    root = sum(n for n, task in parts if task is None)
    own = sum(n for n, task in parts if task is not None)
    assert root > 0, "the live path references root components"
    # Two tasks, no other live path: DESIGN.md would charge "a" its root components whole.
    assert live.accounted_params == pytest.approx(root / 2 + own)


def test_a_visit_seeds_from_at_most_seed_tasks_other_tasks_when_configured(two_tasks, tmp_path):
    two_tasks.add_task("c", str(digits_npz(tmp_path / "c.npz", offset=5)))
    cfg = tiny_config(candidates=1, max_epochs=0.3, seed_tasks=None)
    for name in ("a", "b"):
        Visit(two_tasks, name, cfg, progress=False).run()
    lives = {n: two_tasks.task_json(n)["live_path"]["id"] for n in ("a", "b")}

    def seed_ids(visit_cfg):
        visit = Visit(two_tasks, "c", visit_cfg, progress=False)
        visit._load()
        return [e.path_id for e in visit.seeds]

    every = seed_ids(cfg)
    assert set(every[:-1]) == set(lives.values()), "MUNET.md: every other task's live path"
    capped = seed_ids(cfg.replace(seed_tasks=1))
    assert len(capped) == 2 and capped[0] in lives.values() and capped[-1] == every[-1], "one other task, then the root"
    assert seed_ids(cfg.replace(seed_tasks=1)) == capped, "the draw is reproducible per visit"
    assert seed_ids(cfg.replace(seed_tasks=0)) == every[-1:], "the root only"
    assert seed_ids(cfg.replace(seed_tasks=5)) == every
    with pytest.raises(ValueError, match="seed_tasks"):
        cfg.replace(seed_tasks=-1)


def test_the_seeding_phase_tries_the_root_at_each_extra_size_when_configured(two_tasks):
    def seed_rows(task, visit_cfg):
        Visit(two_tasks, task, visit_cfg, progress=False).run()
        with two_tasks.Session() as s:
            rows = s.scalars(select(CandidateRow).join(Task).where(Task.name == task).order_by(CandidateRow.id))
            return [r for r in rows if "seed" in r.mutations]

    cfg = tiny_config(candidates=4, max_epochs=0.3)
    assert cfg.root_seed_sizes == ()
    plain = seed_rows("a", cfg)
    assert [r.hparams["arch"]["image_size"] for r in plain] == [32], "MUNET.md: the root once, at the default size"

    # 48 is allowed; 32 is the default (already tried); 64 is not among tiny_config's sizes.
    seeds = seed_rows("b", cfg.replace(root_seed_sizes=(48, 32, 64, 48)))
    root_id = seeds[-1].parent_path_id
    assert len(seeds) == 3 and seeds[0].parent_path_id != root_id == seeds[1].parent_path_id, "a's live path, the root twice"
    assert [r.hparams["arch"]["image_size"] for r in seeds[1:]] == [32, 48]
    assert "image_size:32->48" in seeds[2].mutations and not any(m.startswith("image_size") for m in seeds[1].mutations)
    assert seeds[2].outcome in ("improved", "discarded") and seeds[2].examples > 0


def test_a_visits_later_generations_train_at_a_decayed_lr_when_configured(two_tasks):
    cfg = tiny_config(generations=4, visit_lr_floor=0.1)
    assert [round(cfg.lr_scale(g), 3) for g in range(4)] == [1.0, 0.775, 0.325, 0.1]
    assert {cfg.replace(visit_lr_floor=None).lr_scale(g) for g in range(4)} == {1.0}, "MUNET.md: the path's lr"
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="visit_lr_floor"):
            cfg.replace(visit_lr_floor=bad)

    system = two_tasks
    data, template = _root_candidate(system, cfg)

    def weights(c):
        return torch.cat([p.detach().flatten().clone() for m, t in zip(c.modules, c.trainable) if t for p in m.parameters()])

    start, moved = weights(template), []
    for scale in (1.0, 0.1):
        cand = copy.deepcopy(template)  # same ids, so the same data order
        cand.lr_scale = scale
        train_candidate(cand, data, cfg, PrefixCache(1 << 30), 1.0, float("-inf"))
        moved.append(float((weights(cand) - start).norm()))
    assert moved[1] < 0.5 * moved[0], f"a tenth of the lr moves the weights less: {moved}"

    Visit(system, "a", cfg.replace(generations=2, candidates=2), progress=False).run()
    with system.Session() as s:
        rows = list(s.scalars(select(CandidateRow).join(Task).where(Task.name == "a")))
    notes = {r.generation: {m for m in r.mutations if m.startswith("lr_scale:")} for r in rows}
    assert notes == {0: set(), 1: {"lr_scale:0.1"}}, "the record says what each generation trained at"


def test_children_of_a_long_training_line_train_at_an_annealed_lr_when_configured(two_tasks):
    cfg = tiny_config(generations=2, candidates=2, line_anneal_epochs=3.0)
    assert [round(cfg.line_scale(e), 3) for e in (0, 1, 3, 7)] == [1.0, 0.775, 0.1, 0.1]
    assert {cfg.replace(line_anneal_epochs=None).line_scale(e) for e in (0, 5)} == {1.0}, "MUNET.md: the path's lr"
    for bad in ({"line_anneal_epochs": 0.0}, {"line_anneal_floor": 0.0}, {"line_anneal_floor": 2.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            cfg.replace(**bad)

    for visit in range(2):
        with two_tasks.Session.begin() as s:
            s.execute(update(Task).where(Task.name == "a").values(visits=visit))
        Visit(two_tasks, "a", cfg, progress=False).run()
    data, _ = _root_candidate(two_tasks, cfg)
    n_train = len(data.y["train"])
    with two_tasks.Session() as s:
        rows = list(s.scalars(select(CandidateRow).join(Task).where(Task.name == "a").order_by(CandidateRow.id)))
    by_path = {_own_id(r): r for r in rows} | {r.path_id: r for r in rows if r.path_id}

    def line_epochs(row):  # rebuilt from the records alone: the row's parent's line, in epochs
        if "seed" in row.mutations:
            return 0.0
        prow = by_path.get(_parent_ref(row))  # None: the root's or another task's path
        return 0.0 if prow is None else line_epochs(prow) + prow.examples / n_train

    scales = []
    for row in rows:
        want = cfg.line_scale(line_epochs(row))
        notes = [m for m in row.mutations if m.startswith("lr_scale:")]
        assert notes == ([] if want == 1.0 else [f"lr_scale:{want:.3g}"]), (row.mutations, want)
        scales.append(want)
    assert min(scales) < 0.8 and scales[0] == 1.0, "a seed starts a line at full lr, its descendants anneal"


def _own_id(row):
    return next(n[5:] for n in row.mutations if n.startswith("path:"))


def _parent_ref(row):
    return next((n[7:] for n in row.mutations if n.startswith("parent:")), row.parent_path_id)


def test_a_live_paths_training_line_is_rebuilt_from_the_candidate_records(two_tasks):
    from munet.storage.lineage import training_line

    cfg = tiny_config(generations=2, candidates=2)
    lines = []
    for visit in range(2):
        with two_tasks.Session.begin() as s:  # as the worker counts them: visit 2 seeds nothing
            s.execute(update(Task).where(Task.name == "a").values(visits=visit))
        Visit(two_tasks, "a", cfg, progress=False).run()
        live = two_tasks.task_json("a")["live_path"]["id"]
        with two_tasks.Session() as s:
            line = training_line(s, live)
            rows = line["candidates"]
            assert line["complete"] and line["steps"] == len(rows) >= 1
            assert rows[-1].path_id == live and all(r.outcome == "improved" for r in rows)
            assert all(_parent_ref(child) == _own_id(parent) for parent, child in zip(rows, rows[1:]))
            assert line["examples"] == sum(r.examples for r in rows) > 0
            assert (line["starts_from"] == "seed") == ("seed" in rows[0].mutations)
            lines.append([r.id for r in rows])
    assert lines[1][:len(lines[0])] == lines[0], "a later visit extends the line it built on"
    # Every in-visit parent a child names was trained and kept in the same visit. Whether the
    # live line holds such a step is the search's choice; test_storage builds one by hand.
    with two_tasks.Session() as s:
        every = list(s.scalars(select(CandidateRow).join(Task).where(Task.name == "a")))
    kept = {(r.visit_id, _own_id(r)) for r in every if r.outcome == "improved"}
    assert all((r.visit_id, n[7:]) in kept for r in every for n in r.mutations if n.startswith("parent:"))

    # Records without the "path:" note (written before it existed) cannot name in-visit
    # parents: the line stops at the first one and says so.
    in_visit = any(n.startswith("parent:") for r in rows for n in r.mutations)
    with two_tasks.Session.begin() as s:
        for row in s.scalars(select(CandidateRow)):
            row.mutations = [n for n in row.mutations if not n.startswith("path:")]
    with two_tasks.Session() as s:
        old = training_line(s, live)
    if in_visit:
        assert not old["complete"] and old["steps"] < len(lines[1])
    else:
        assert old["complete"] and [r.id for r in old["candidates"]] == lines[1]


def test_evolving_one_task_never_changes_another_tasks_outputs_or_blobs(two_tasks):
    Visit(two_tasks, "a", tiny_config(), progress=False).run()
    a_path = two_tasks.task_json("a")["live_path"]["id"]
    before, blobs = _probe(two_tasks, "a"), _blobs(two_tasks, a_path)
    # b's visit seeds from a's live path and clones/trains on top of shared components.
    cfg = tiny_config(generations=2, candidates=3, mu=0.3)
    Visit(two_tasks, "b", cfg, progress=False).run()
    Visit(two_tasks, "b", cfg, progress=False).run()
    assert two_tasks.task_json("a")["live_path"]["id"] == a_path
    assert torch.equal(before, _probe(two_tasks, "a")), "task a's logits must stay bit-identical"
    assert _blobs(two_tasks, a_path) == blobs, "task a's component blobs must stay byte-identical"


def test_a_tasks_own_layers_stay_trainable_after_another_task_shares_them_when_configured(two_tasks):
    from munet.storage.lineage import locks, path_component_ids
    from munet.storage.schema import Component

    cfg = tiny_config(max_epochs=0.3, train_own=False)
    a = baselines.run_baseline(two_tasks, "a", "top:2", cfg)  # a's live path: its own top two blocks
    with two_tasks.Session() as s:
        a_row = s.get(PathRow, a["path_id"])
        ids = path_component_ids(s, a_row.id)
        own = {c.name: c.id for c in s.scalars(select(Component).where(Component.id.in_(ids)))
               if c.task_id == a_row.task_id and c.name.startswith("blocks.")}
    assert len(own) == 2
    # b's live path shares all of a's components, as when b's search builds on a's path.
    record = PathRecord(task="b", root_id=a_row.root_id, component_ids=ids, hparams=a_row.hparams,
                        image_size=a_row.image_size, parent_id=a_row.id, val_acc=0.5, score=0.5)
    commit_path(two_tasks.Session, two_tasks.store, record, [])
    b_before, b_blobs = _probe(two_tasks, "b"), _blobs(two_tasks, record.id)

    def actions(visit_cfg):
        visit = Visit(two_tasks, "a", visit_cfg, progress=False)
        visit._load()  # a's second visit: its own locks released, b's remain
        live = visit.population[0]
        _, _, acts = visit.build(live, copy.deepcopy(live.hparams), set(), "probe")
        return {a.split(":", 1)[1]: a.split(":", 1)[0] for a in acts}

    with two_tasks.Session() as s:
        assert all(locks(s, list(own.values()))[cid] == {"a", "b"} for cid in own.values())
    assert {actions(cfg)[n] for n in own} == {"ref"}, "MUNET.md: a shared component is referenced frozen"
    on = cfg.replace(train_own=True)
    assert {actions(on)[n] for n in own} == {"clone"}, "a's own blocks are cloned and trained again"
    assert {actions(on)[n] for n in ("blocks.0", "neck")} == {"ref"}, "the root's stay shared"
    # Under size pressure a clone of a shared layer pays its whole size against the live path's share.
    assert {actions(on.replace(base=0.7))[n] for n in own} == {"ref"}, "size pressure: MUNET.md's frozen share"

    Visit(two_tasks, "a", on.replace(candidates=2, seed_visits=0), progress=False).run()
    assert torch.equal(b_before, _probe(two_tasks, "b")), "b's logits stay bit-identical"
    assert _blobs(two_tasks, record.id) == b_blobs


def test_the_first_candidate_of_each_generation_continues_the_best_path_unmutated_when_configured(two_tasks):
    # mu = 1: every other child is mutated (blocks cloned, adapters, a new size), so an
    # unmutated row can only be a continuation.
    cfg = tiny_config(generations=2, candidates=2, mu=1.0, mu_top=1.0, mu_bottom=1.0, evolve_mu=False)
    for task in ("a", "b"):
        Visit(two_tasks, task, cfg, progress=False).run()
    with two_tasks.Session.begin() as s:
        s.execute(update(Task).values(visits=1))  # second visits: past the seeding phase

    def second_visit(task, visit_cfg):
        live = two_tasks.task_json(task)["live_path"]["id"]
        with two_tasks.Session() as s:
            seen = {r.id for r in s.scalars(select(CandidateRow))}
            live_hp = s.get(PathRow, live).hparams
        Visit(two_tasks, task, visit_cfg, progress=False).run()
        with two_tasks.Session() as s:
            rows = [r for r in s.scalars(select(CandidateRow).order_by(CandidateRow.id)) if r.id not in seen]
        return live, live_hp, rows

    live, live_hp, rows = second_visit("a", cfg.replace(continue_best=True))
    assert ["continue" in r.mutations for r in rows] == [True, False, True, False]
    trained = {n.split(":", 1)[1]: r.hparams for r in rows for n in r.mutations if n.startswith("path:")}
    for row in (rows[0], rows[2]):
        parent_note = [n.split(":", 1)[1] for n in row.mutations if n.startswith("parent:")]
        parent_hp = trained[parent_note[0]] if parent_note else live_hp
        assert row.parent_path_id == live and row.hparams == parent_hp, "the best path's settings, unmutated"
        # Mutation logs name block positions ("clone:3", "adapter:3/w32"); build actions name components.
        drawn = [m for m in row.mutations if re.match(r"(clone|adapter|remove|readd):\d|image_size:|mu$", m)]
        assert row.examples > 0 and row.mutations[0] == "continue" and not drawn, drawn
    assert rows[0].hparams["arch"] == live_hp["arch"], "generation 1 continues the live path"
    assert rows[1].hparams["arch"] != live_hp["arch"], "its sibling is a mutation"

    _, _, rows = second_visit("b", cfg)
    assert len(rows) == 4 and not any("continue" in r.mutations for r in rows), "off: MUNET.md's children only"


def test_a_leader_that_fails_the_held_back_images_loses_the_final_choice_to_one_that_holds_up(two_tasks):
    from munet.evolver.visit import Entry, Slot
    from munet.storage.schema import new_id

    cfg = tiny_config(final_holdout=0.5)
    Visit(two_tasks, "a", cfg, progress=False).run()
    visit = Visit(two_tasks, "a", cfg, progress=False)
    visit._load()
    with two_tasks.Session() as s:
        task = s.scalar(select(Task).where(Task.name == "a"))
    whole = TaskData.from_arrays("a", two_tasks.dataset(task), task.val_fraction, task.split_seed, visit.data.mean, visit.data.std)
    images = lambda x: sorted(bytes(i.numpy()) for i in x)  # noqa: E731
    assert len(visit.data.y["holdout"]) > 0 and len(visit.data.y["val"]) > 0
    assert images(torch.cat([visit.data.x["val"], visit.data.x["holdout"]])) == images(whole.x["val"]), "val, split in two"
    assert torch.equal(visit.data.x["train"], whole.x["train"]), "training images untouched"

    live = visit.live_entry
    size = live.hparams["arch"]["image_size"]

    def challenger(val_acc: float, broken_head: bool) -> Entry:
        slots = dict(live.slots)
        if broken_head:  # all-zero logits: always class 0, whatever it scored on the searched images
            head = copy.deepcopy(live.slots["head"].module)
            for p in head.parameters():
                p.data.zero_()
            slots["head"] = Slot(new_id(), "head", dict(live.slots["head"].meta), head, False, False, live.slots["head"].id)
        entry = Entry(new_id(), live.hparams, slots, False, True, parent=live, committed_path=live.path_id, val_acc=val_acc)
        entry.score = val_acc * visit.score_factor(slots, size)[0]
        return entry

    steady, lucky = challenger(live.val_acc + 0.01, False), challenger(live.val_acc + 0.02, True)
    visit.population = [live, steady, lucky]
    assert max(visit.population, key=visit._rank) is lucky, "the search alone would commit the lucky leader"
    chosen, rows = visit._final_choice()
    held = {r["path_id"]: r["holdout_acc"] for r in rows}
    # Precondition: the live path learnt more than "always class 0" (one tiny visit: 0.28-0.6 on ~18 images).
    assert held[live.path_id] >= held[lucky.path_id] + 0.1, held
    assert chosen is steady and [r["path_id"] for r in rows] == [lucky.path_id, steady.path_id, live.path_id]
    assert [r.get("chosen", False) for r in rows] == [False, True, False]

    visit.cfg = cfg.replace(final_top=1)  # the lucky leader is the only challenger: the live path stays
    chosen, rows = visit._final_choice()
    assert chosen is live and len(rows) == 2

    visit.cfg = cfg.replace(final_holdout=0.0)
    visit.data.y.pop("holdout")
    assert visit._final_choice() == (lucky, []), "off: the best by rank, as MUNET.md"


def test_live_score_only_rises_and_every_move_is_recorded(two_tasks):
    cfg = tiny_config(generations=2, candidates=2)
    for _ in range(3):
        Visit(two_tasks, "a", cfg, progress=False).run()
    with two_tasks.Session() as s:
        task = s.scalar(select(Task).where(Task.name == "a"))
        history = list(s.scalars(select(LiveHistory).where(LiveHistory.task_id == task.id).order_by(LiveHistory.id)))
    scores = [h.score for h in history]
    assert scores == sorted(scores) and len(set(scores)) == len(scores)
    assert history[-1].path_id == task.live_path_id
    assert all(h.previous_path_id == p.path_id for h, p in zip(history[1:], history))


def test_a_visit_scores_its_live_path_with_todays_sharers_not_the_score_stored_at_its_commit(two_tasks):
    cfg = tiny_config(base=0.3)
    Visit(two_tasks, "a", cfg, progress=False).run()
    with two_tasks.Session.begin() as s:  # as if stored when other tasks shared its layers and have moved on since
        live_id = s.scalar(select(Task.live_path_id).where(Task.name == "a"))
        stored = s.get(PathRow, live_id)
        stored.score = stored.score + 0.5
    visit = Visit(two_tasks, "a", cfg, progress=False)
    visit._load()
    live = visit.population[0]
    factor, _ = visit.score_factor(live.slots, live.hparams["arch"]["image_size"])
    assert live.path_id == live_id and factor < 1.0
    assert live.score == pytest.approx(live.val_acc * factor) and visit.live_score == (live_id, live.score)
    # What the visit moves live beats the rescored score (test_storage pins the comparison itself).
    visit.run()
    with two_tasks.Session() as s:
        now = s.scalar(select(Task.live_path_id).where(Task.name == "a"))
        history = s.scalars(select(LiveHistory).where(LiveHistory.previous_path_id == live_id)).all()
    assert all(h.score > live.score for h in history) and (now == live_id) == (not history)


def test_a_child_that_only_ties_its_parent_survives_on_a_lower_validation_loss_with_val_loss_ties(two_tasks):
    data, template = _root_candidate(two_tasks, tiny_config())
    unbeatable = 2.0  # no accuracy beats its parent by the margin: only the tie rule can keep a snapshot
    kept = {}
    for ties, parent_loss in ((False, math.inf), (True, math.inf), (True, 0.0)):
        cand = copy.deepcopy(template)  # same ids, so the same data order in every arm
        result = train_candidate(cand, data, tiny_config(val_loss_ties=ties), PrefixCache(1 << 30), 1.0, unbeatable,
                                 tie=(0.0, parent_loss))
        kept[(ties, parent_loss)] = result
    assert not kept[(False, math.inf)].improved, "MUNET.md: a tie is not an improvement"
    assert not kept[(True, 0.0)].improved, "a cross-entropy is never below 0"
    tied = kept[(True, math.inf)]
    assert tied.improved
    losses = [c["val_loss"] for c in tied.curve]
    assert all(math.isfinite(v) and v > 0 for v in losses)
    # The kept snapshot is the best interval by score, then by lower loss.
    best = max(tied.curve, key=lambda c: (c["score"], -c["val_loss"]))
    assert (tied.score, tied.val_loss) == (best["score"], best["val_loss"])


def test_a_child_within_the_tie_margin_below_its_parent_survives_on_a_lower_validation_loss(two_tasks):
    data, template = _root_candidate(two_tasks, tiny_config())
    unbeatable, parent_score = 2.0, 1.5  # every snapshot scores below its parent: only a margin can tie it
    kept = {}
    for margin in (0.0, 2.0):
        cand = copy.deepcopy(template)
        cfg = tiny_config(val_loss_ties=True, val_loss_tie_margin=margin)
        kept[margin] = train_candidate(cand, data, cfg, PrefixCache(1 << 30), 1.0, unbeatable, tie=(parent_score, math.inf))
    assert not kept[0.0].improved
    assert kept[2.0].improved and kept[2.0].score < parent_score


def test_a_visit_measures_its_live_paths_validation_loss_as_its_snapshot_recorded_it(two_tasks):
    cfg = tiny_config(val_loss_ties=True)
    Visit(two_tasks, "a", cfg, progress=False).run()
    with two_tasks.Session() as s:
        live_id = s.scalar(select(Task.live_path_id).where(Task.name == "a"))
        rows = s.scalars(select(CandidateRow).where(CandidateRow.outcome == "improved")).all()
    row = next(r for r in rows if f"path:{live_id}" in r.mutations)
    recorded = max(row.val_curve, key=lambda c: (c["score"], -c["val_loss"]))["val_loss"]
    visit = Visit(two_tasks, "a", cfg, progress=False)
    visit._load()
    live = visit.population[0]
    assert live.path_id == live_id
    assert live.val_loss == pytest.approx(recorded, rel=1e-3)


def test_frozen_batchnorm_statistics_never_change_while_a_candidate_trains(two_tasks):
    cfg = tiny_config()
    data, cand = _root_candidate(two_tasks, cfg, "freeze:12")
    frozen = [m for m, t in zip(cand.modules, cand.trainable) if not t]
    trained = [m for m, t in zip(cand.modules, cand.trainable) if t]
    snap = lambda mods: [{k: v.clone() for k, v in m.state_dict().items()} for m in mods]  # noqa: E731
    frozen_before, trained_before = snap(frozen), snap(trained)
    train_candidate(cand, data, cfg, PrefixCache(1 << 30), 1.0, float("-inf"))
    for before, m in zip(frozen_before, frozen):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    # Cloned blocks learn (weights move) but keep their running statistics with bn_train off.
    moved = stats_kept = 0
    for before, m in zip(trained_before, trained):
        for k, v in m.state_dict().items():
            if k.endswith(("running_mean", "running_var")):
                stats_kept += int(torch.equal(v, before[k]))
                assert torch.equal(v, before[k])
            elif k.endswith("weight"):
                moved += int(not torch.equal(v, before[k]))
    assert moved > 0 and stats_kept > 0


def test_a_worker_whose_lease_was_taken_over_cannot_commit(two_tasks):
    Visit(two_tasks, "a", tiny_config(), progress=False).run()
    first = claim(two_tasks.Session, "w1", ttl=60, eligible={"a"})
    assert first is not None and claim(two_tasks.Session, "w2", ttl=60, eligible={"a"}) is None
    with two_tasks.Session.begin() as s:  # w1 stalls past its lease
        s.execute(update(Task).where(Task.name == "a").values(lease_until=dt.datetime(2000, 1, 1)))
    second = claim(two_tasks.Session, "w2", ttl=60, eligible={"a"})
    assert second is not None and second.token == first.token + 1
    with two_tasks.Session() as s:
        live = s.get(PathRow, s.scalar(select(Task.live_path_id).where(Task.name == "a")))
        from munet.storage.lineage import path_component_ids
        ids = path_component_ids(s, live.id)
    record = PathRecord(task="a", root_id=live.root_id, component_ids=ids, hparams=live.hparams,
                        image_size=live.image_size, score=2.0)
    with pytest.raises(LeaseLost):
        commit_path(two_tasks.Session, two_tasks.store, record, [], lease_token=first.token)
    assert two_tasks.task_json("a")["live_path"]["id"] == live.id
    release(two_tasks.Session, first, visited=True)  # the stale worker's release changes nothing
    with two_tasks.Session() as s:
        assert s.scalar(select(Task.lease_owner).where(Task.name == "a")) == "w2"


def test_baselines_train_only_their_plan_and_report_budget_with_progress(two_tasks, capsys):
    cfg = tiny_config()
    head = baselines.run_baseline(two_tasks, "a", "head", cfg, commit=False, progress=True)
    bar = capsys.readouterr().err
    assert "a head lr 0.02" in bar and f"/{cfg.intervals} " in bar and "val=0." in bar  # a step per validation point
    full = baselines.run_baseline(two_tasks, "b", "full", cfg, lrs=[0.01, 0.02], commit=True)
    assert head["trained_params"] < 20_000 < 3_000_000 < full["trained_params"]
    # One epoch per run of each task's own training split (a's and b's differ by per-class rounding).
    assert (head["examples"], full["examples"]) == (train_images(two_tasks, "a"), 2 * train_images(two_tasks, "b"))
    assert len(full["runs"]) == 2 and two_tasks.task_json("b")["live_path"]["id"] == full["path_id"]


def test_a_baseline_plan_joined_by_plus_trains_the_union_of_its_parts(two_tasks):
    def trained(kind):
        _, cand = _root_candidate(two_tasks, tiny_config(), kind)
        return {n for n, t in zip(cand.names, cand.trainable) if t}

    bottom, adapters, both = trained("bottom:12"), trained("adapters:32"), trained("bottom:12+adapters:32")
    assert bottom == {"stem", "final_norm", "head"} | {f"blocks.{i}" for i in range(12)}, "the top blocks and neck stay shared"
    assert both == bottom | adapters and len(adapters - bottom) == 16, "an adapter beside every block, the bottom cloned"
    cfg = tiny_config()
    runs = {k: baselines.run_baseline(two_tasks, "a", k, cfg, commit=False)["trained_params"]
            for k in ("head", "bottom:12", "adapters:32", "bottom:12+adapters:32")}
    assert runs["bottom:12+adapters:32"] == runs["bottom:12"] + runs["adapters:32"] - runs["head"]
    assert 900_000 < runs["bottom:12"] < 1_000_000, "stem and blocks 0-11 of the Lite0 root: 0.92 M"
    for bad in ("middle:3", "bottom:x", "adapters"):
        with pytest.raises(ValueError, match="bottom:X"):
            search.plan(bad, {"depth": 16})


def test_flops_factor_lowers_scores_below_accuracy_when_enabled(two_tasks):
    result = Visit(two_tasks, "a", tiny_config(flops_base=0.5), progress=False).run()
    live = two_tasks.task_json("a")["live_path"]
    assert live["flops"] > 0 and live["score"] < live["val_acc"] and result["score"] == live["score"]


@pytest.mark.parametrize("epochs", [1.0, 2.0])
def test_candidates_train_whole_epochs_validated_at_two_points(two_tasks, epochs):
    cfg = tiny_config(max_epochs=epochs, candidates=1, intervals=2)
    Visit(two_tasks, "a", cfg, progress=False).run()
    with two_tasks.Session() as s:
        row = s.scalars(select(CandidateRow)).first()
    n_train = train_images(two_tasks, "a")  # 300 images less a quarter for validation (500 is more than they hold)
    assert 220 <= n_train <= 230 and row.examples == epochs * n_train, "every training image seen once per epoch"
    assert len(row.val_curve) == 2, "validated after each half of the budget"


def test_candidates_train_the_epochs_their_visit_number_sets_when_configured(two_tasks):
    cfg = tiny_config(candidates=2, visit_epochs=(2.0, 0.5))
    n_train = train_images(two_tasks, "a")
    for visit, epochs in [(0, 2.0), (1, 0.5), (4, 0.5)]:  # the last length holds for every later visit
        with two_tasks.Session.begin() as s:
            s.execute(update(Task).where(Task.name == "a").values(visits=visit))
        with two_tasks.Session() as s:
            seen = {r.id for r in s.scalars(select(CandidateRow))}
        Visit(two_tasks, "a", cfg, progress=False).run()
        with two_tasks.Session() as s:
            rows = [r for r in s.scalars(select(CandidateRow)) if r.id not in seen]
        # Whole batches of 32: half an epoch of ~225 images is 4 batches, 128 images.
        assert len(rows) == 2 and all(abs(r.examples - epochs * n_train) < 32 for r in rows), (visit, [r.examples for r in rows])
    assert tiny_config(visit_epochs=()).for_visit(3).max_epochs == 1.0, "off: max_epochs on every visit"
    with pytest.raises(ValueError):
        tiny_config(visit_epochs=(1.0, 0.0))


def test_channels_last_training_matches_the_default_layout_and_leaves_weights_contiguous(two_tasks):
    system = two_tasks
    data, template = _root_candidate(system, tiny_config())
    results, weights = [], []
    for channels_last in (False, True):
        cfg = tiny_config(channels_last=channels_last)
        cand = copy.deepcopy(template)  # same ids, so the same data order
        layouts = set()
        for m in (cand.modules[0], cand.modules[cand.first_trainable - 1]):  # the stem and the top of the prefix
            m.register_forward_pre_hook(lambda m, args: layouts.add(not args[0].is_contiguous()))
        results.append(train_candidate(cand, data, cfg, PrefixCache(1 << 30), 1.0, float("-inf")))
        assert layouts == {channels_last}
        tensors = [t for m in cand.modules for t in (*m.parameters(), *m.buffers())]
        # Stored blobs are safetensors, which refuse non-contiguous tensors.
        assert all(t.is_contiguous() for t in tensors)
        assert all(b.is_contiguous() for bufs in results[-1].momentum.values() for b in bufs.values())
        weights.append(torch.cat([p.flatten() for m, t in zip(cand.modules, cand.trainable) if t
                                  for p in m.parameters()]))
    assert abs(results[0].val_acc - results[1].val_acc) <= 0.02
    assert torch.allclose(weights[0], weights[1], atol=1e-3), "same training, only the layout differs"


def test_a_line_soup_averages_a_childs_trained_weights_with_its_parents_and_trains_nothing(two_tasks):
    from munet.evolver.visit import Entry
    from munet.storage.schema import new_id

    cfg = tiny_config(line_soup=2)
    Visit(two_tasks, "a", cfg, progress=False).run()
    visit = Visit(two_tasks, "a", cfg, progress=False)
    visit._load()
    live = visit.live_entry
    hp = copy.deepcopy(live.hparams)
    cand, slots, actions = visit.build(live, hp, set(), "child")
    result = train_candidate(cand, visit.data, visit.cfg, visit.cache, 1.0, float("-inf"))
    trained = [n for n, t in zip(cand.names, cand.trainable) if t]
    assert trained and any(a.startswith("ref:") for a in actions), "a child with frozen and trained components"
    before = {n: {k: v.clone() for k, v in slots[n].module.state_dict().items()} for n in trained}

    def soup(child_score: float, child_loss: float):
        child = Entry(new_id(), hp, slots, False, True, parent=live, committed_path=live.path_id, candidate=cand,
                      val_acc=result.val_acc, score=child_score, val_loss=child_loss, momentum=result.momentum)
        visit.entries[child.path_id] = child
        return child, visit._try_line_soup(0, child)

    child, kept = soup(-1.0, math.inf)  # any average beats a child scored -1
    assert kept is not None and kept in visit.population and kept.parent is child
    for name, slot in kept.slots.items():
        if name in trained:
            assert slot.id != slots[name].id and slot.module is not slots[name].module
            for key, value in slot.module.state_dict().items():
                pair = (before[name][key], live.slots[name].module.state_dict()[key])
                want = (pair[0] + pair[1]) / 2 if value.is_floating_point() else pair[0]
                assert torch.allclose(value, want, atol=1e-6), (name, key)
        else:
            assert slot is slots[name], "frozen components stay shared"
    assert all(torch.equal(v, slots[n].module.state_dict()[k]) for n in trained for k, v in before[n].items()), \
        "the child keeps its own weights"
    with two_tasks.Session() as s:
        row = s.scalars(select(CandidateRow).order_by(CandidateRow.id.desc())).first()
    assert row.mutations[0] == "soup:2" and f"parent:{child.path_id}" in row.mutations and f"path:{kept.path_id}" in row.mutations
    assert row.examples == 0 and row.outcome == "improved" and row.val_acc == kept.val_acc

    # The average scores as the server will answer: commit it and compare fresh logits.
    live.score = float("-inf")
    visit.live_score, visit.population = (live.path_id, live.score), [live, kept]
    visit._finish()
    assert two_tasks.task_json("a")["live_path"]["id"] == kept.path_id
    path, stored = two_tasks.load_path(kept.path_id, cache={})
    x = visit.data.x["val"][:6]
    want = logits(kept.candidate.modules, x, stored.image_size, visit.data.mean, visit.data.std, 6, "cpu")
    assert torch.allclose(logits(path.modules, x, stored.image_size, path.mean, path.std, 6, "cpu"), want, atol=1e-4)

    _, lost = soup(2.0, 0.0)  # nothing beats a perfect child
    assert lost is None
    with two_tasks.Session() as s:
        row = s.scalars(select(CandidateRow).order_by(CandidateRow.id.desc())).first()
    assert row.mutations[0] == "soup:2" and row.outcome == "discarded"


def test_a_line_soup_is_tried_only_after_a_child_beats_a_parent_of_its_own_task(two_tasks):
    cfg = tiny_config(line_soup=3, generations=2, candidates=2)
    Visit(two_tasks, "a", cfg, progress=False).run()
    Visit(two_tasks, "a", cfg, progress=False).run()
    with two_tasks.Session() as s:
        rows = s.scalars(select(CandidateRow).order_by(CandidateRow.id)).all()
    trained = {n[5:]: r for r in rows for n in r.mutations if n.startswith("path:") and not r.mutations[0].startswith("soup:")}
    soups = [r for r in rows if r.mutations[0].startswith("soup:")]
    assert soups, "some child of the live path improved in four tries"
    for row in soups:
        parent = trained[next(n[7:] for n in row.mutations if n.startswith("parent:"))]
        assert parent.outcome == "improved" and "seed" not in parent.mutations and row.examples == 0
        assert 2 <= int(row.mutations[0][5:]) <= 3
    assert sum(r.examples for r in rows) == sum(r.examples for r in trained.values()), "soups train nothing"
    assert len(rows) - len(soups) == 8, "soups are tried beside the 2 x 2 x 2 trained candidates, not instead of them"


def test_a_greedy_soup_averages_the_best_path_with_what_its_siblings_and_children_trained(two_tasks):
    from munet.evolver.visit import Entry
    from munet.storage.schema import new_id

    cfg = tiny_config(greedy_soup=True)
    Visit(two_tasks, "a", cfg, progress=False).run()
    visit = Visit(two_tasks, "a", cfg, progress=False)
    visit._load()
    live = visit.live_entry
    assert visit._try_greedy_soup(0) is None, "the best is the committed live path: nothing trained near it yet"

    def child_of(parent: Entry, score: float) -> Entry:
        hp, path_id = copy.deepcopy(parent.hparams), new_id()
        cand, slots, _ = visit.build(parent, hp, set(), path_id)
        result = train_candidate(cand, visit.data, visit.cfg, visit.cache, 1.0, float("-inf"))
        visit.trained.setdefault(parent.path_id, []).append((result.val_acc, path_id, cand))
        entry = Entry(path_id, hp, slots, False, True, parent=parent, committed_path=parent.committed_path,
                      candidate=cand, val_acc=result.val_acc, score=score, train_examples=result.examples,
                      momentum=result.momentum)
        visit.entries[entry.path_id] = entry
        return entry

    best, sibling = child_of(live, -1.0), child_of(live, -1.0)
    child = child_of(best, -1.0)
    live.score, visit.population = -2.0, [live, best]  # the best: scored -1, so any soup beats it
    trained = [i for i, t in enumerate(best.candidate.trainable) if t]
    assert trained and all(e.candidate.trainable == best.candidate.trainable for e in (sibling, child))

    best.val_acc = 1.01  # no average reaches it: the greedy step adds no ingredient
    assert visit._try_greedy_soup(0) is None
    with two_tasks.Session() as s:
        assert not any(r.mutations[0].startswith("soup:") for r in s.scalars(select(CandidateRow)))
    best.val_acc = 0.0  # any average reaches it: the better-validating ingredient joins, the other if the soup holds
    visit.souped.clear()
    soup = visit._try_greedy_soup(0)
    assert soup is not None and soup.parent is best and soup in visit.population
    visit.population.remove(soup)
    assert visit._try_greedy_soup(0) is None, "the same best with the same ingredients is souped once"
    with two_tasks.Session() as s:
        row = s.scalars(select(CandidateRow).order_by(CandidateRow.id.desc())).first()
    joined = [n[5:] for n in row.mutations if n.startswith("with:")]
    first = max((sibling, child), key=lambda e: e.val_acc)
    assert row.mutations[:3] == [f"soup:{len(joined) + 1}", "greedy", "tried:2"] and joined[0] == first.path_id
    assert row.examples == 0 and row.outcome == "improved"
    for i, name in enumerate(best.candidate.names):
        if i not in trained:
            assert soup.slots[name] is best.slots[name], "frozen components stay shared"
            continue
        states = [e.candidate.modules[i].state_dict() for e in [best] + [visit.entries[j] for j in joined]]
        for key, value in soup.slots[name].module.state_dict().items():
            want = sum(st[key] for st in states) / len(states) if value.is_floating_point() else states[0][key]
            assert torch.allclose(value, want, atol=1e-5), (name, key)


def test_a_candidate_below_the_median_of_its_visits_last_candidates_stops_at_that_validation_point(two_tasks):
    import statistics

    cfg = tiny_config(median_stop=2, generations=2, candidates=3, intervals=2)
    Visit(two_tasks, "a", cfg, progress=False).run()
    Visit(two_tasks, "a", cfg, progress=False).run()
    with two_tasks.Session() as s:
        rows = s.scalars(select(CandidateRow).order_by(CandidateRow.id)).all()
    n_train = train_images(two_tasks, "a")
    seen: dict[int, list[float]] = {}  # visit -> scores at the first validation point so far
    stopped = 0
    for i, row in enumerate(rows):
        peers = seen.setdefault(i // 6, [])  # 2 x 3 candidates a visit
        first = row.val_curve[0]["score"]
        expected = len(peers) >= 2 and first < statistics.median(peers[-2:])
        assert ("stopped:1" in row.mutations) == expected, (row.id, first, peers)
        # Whole batches of 32: one validation point is half an epoch, within a batch.
        assert len(row.val_curve) == (1 if expected else 2)
        assert abs(row.examples - (0.5 if expected else 1.0) * n_train) < 32
        peers.append(first)
        stopped += expected
    assert len(rows) == 12 and 0 < stopped < 12, "some candidates stop, the rest train their whole epoch"
    assert any(r.outcome == "improved" for r in rows)


def test_the_median_stop_is_never_asked_at_a_candidates_last_validation_point(two_tasks):
    cfg = tiny_config(intervals=3)
    Visit(two_tasks, "a", cfg, progress=False).run()
    visit = Visit(two_tasks, "a", cfg, progress=False)
    visit._load()
    asked = []

    def stop(point, score):
        asked.append(point)
        return False

    cand, _, _ = visit.build(visit.live_entry, copy.deepcopy(visit.live_entry.hparams), set(), "x")
    result = train_candidate(cand, visit.data, cfg, visit.cache, 1.0, float("-inf"), stop=stop)
    assert asked == [1, 2] and len(result.curve) == 3 and result.stopped is None
    cand, _, _ = visit.build(visit.live_entry, copy.deepcopy(visit.live_entry.hparams), set(), "y")
    result = train_candidate(cand, visit.data, cfg, visit.cache, 1.0, float("-inf"), stop=lambda p, s: True)
    assert result.stopped == 1 and len(result.curve) == 1 and result.improved, "its snapshot above -inf still counts"
    with pytest.raises(ValueError):
        tiny_config(median_stop=-1)
    visit.cfg = cfg.replace(median_stop=2)
    visit.point_scores = {1: [0.9, 0.95, 0.1, 0.2]}  # the line climbed, then two children fell back
    assert not visit._below_median(1, 0.5), "peers are the last two (median 0.15), not all four (0.55)"
    assert visit._below_median(1, 0.14) and not visit._below_median(2, 0.0), "no peers at point 2 yet"


def test_two_runs_with_the_same_seed_train_the_same_candidates(tmp_path):
    from conftest import make_settings
    from munet.system import System

    def run(home):
        system = System(make_settings(home))
        system.init()
        system.add_root("lite0", "tf_efficientnet_lite0", "packaged")
        system.add_task("a", str(digits_npz(tmp_path / "a.npz", offset=0)))
        # mu = 1: adapters (randomly initialised layers) and clones in every child
        cfg = tiny_config(generations=2, candidates=2, mu=1.0, mu_top=1.0, mu_bottom=1.0, evolve_mu=False)
        for _ in range(2):
            Visit(system, "a", cfg, progress=False).run()
        with system.Session() as s:
            rows = s.scalars(select(CandidateRow).order_by(CandidateRow.id)).all()
            out = [([m for m in r.mutations if not m.startswith(("path:", "parent:"))], r.val_curve, r.examples) for r in rows]
        system.engine.dispose()
        return out

    first, second = run(tmp_path / "one"), run(tmp_path / "two")
    assert any(m.startswith("adapter:") for muts, _, _ in first for m in muts), "new layers were drawn"
    assert first == second
