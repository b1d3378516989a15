"""The muNet search rules as pure functions (MUNET.md §3-5)."""
import random

import pytest

from munet.evolver import search
from munet.evolver.config import VALUES, cpu_preset, munet_preset

LITE0 = {"family": "efficientnet", "depth": 16, "removable": [2, 4, 6, 7, 9, 10, 12, 13, 14], "image_size": 224}


def test_step_moves_one_index_and_clamps_at_the_ends():
    rng = random.Random(0)
    for _ in range(50):
        assert search.step(VALUES["lr"], 0.01, rng) in (5e-3, 0.02)
        assert search.step(VALUES["lr"], 1e-4, rng) in (1e-4, 2e-4)
        assert search.step(VALUES["nesterov"], False, rng) in (True, False)


def test_config_defaults_follow_munet_md_and_cpu_preset_follows_design():
    m = munet_preset()
    assert (m.generations, m.candidates, m.mu, m.intervals, m.batches_per_interval, m.batch_size) == (8, 8, 0.1, 30, 200, 256)
    assert m.defaults["lr"] == 0.01 and m.defaults["momentum"] == 0.9 and m.defaults["schedule"] == "cosine"
    c = cpu_preset()
    assert (c.generations, c.candidates, c.max_epochs, c.min_improvement) == (4, 4, 1.0, 0.002)
    assert c.image_sizes == [32, 48, 64, 80, 96] and c.defaults["image_size"] == 64
    hp = search.initial_hparams(c, LITE0, 10)
    assert not search.augments(hp), "random augmentation is off by default on CPU so the prefix cache applies"


def test_bottom_blocks_start_with_lower_clone_and_adapter_probabilities():
    hp = search.initial_hparams(cpu_preset(), LITE0, 10)
    for action in ("clone", "adapter"):
        ramp = hp["mu"][action]
        assert len(ramp) == 16 and ramp[0] < ramp[-1] and ramp == sorted(ramp)


def test_clone_and_adapter_odds_ramp_to_mu_top_while_other_actions_use_mu():
    cfg = cpu_preset().replace(mu=0.2, mu_top=0.3, mu_bottom=0.05)
    mu = search.initial_hparams(cfg, LITE0, 10)["mu"]
    assert mu["clone"][0] == 0.05 and mu["clone"][-1] == 0.3 and mu["adapter"] == mu["clone"]
    assert all(mu[a] == 0.2 for a in ("hparam", "remove", "readd", "input"))
    assert mu["augment"] == 0.05, "augmentation switches the prefix cache off: its own, lower odds"
    assert search.initial_mu(cfg.replace(mu_top=None), 16)["clone"][-1] == 0.2, "no mu_top: the ramp ends at mu"
    lo, hi = cpu_preset().mu_range
    assert all(lo <= v <= hi for v in search.initial_hparams(cpu_preset(), LITE0, 10)["mu"]["clone"])


def test_mutations_are_logged_and_meta_mutated_mu_stays_in_range():
    cfg = cpu_preset().replace(mu=0.3)
    rng = random.Random(1)
    hp = search.initial_hparams(cfg, LITE0, 10)
    for _ in range(200):
        hp, log, clones = search.mutate(hp, cfg, LITE0, rng)
        assert "mu" in log
        for v in hp["mu"].values():
            floor = min(cfg.mu_range[0], cfg.mu_bottom) if isinstance(v, list) else cfg.mu_range[0]
            for p in (v if isinstance(v, list) else [v]):
                assert floor <= p <= cfg.mu_range[1]
        assert set(clones) <= set(hp["arch"]["blocks"])
        # Only residual blocks may be missing from a CNN path.
        assert set(range(16)) - set(hp["arch"]["blocks"]) <= set(LITE0["removable"])
        assert all(int(i) in hp["arch"]["blocks"] for i in hp["arch"]["adapters"])


def test_fixed_hyperparameters_are_never_mutated_and_the_cpu_preset_fixes_bn_train_and_flips():
    assert {"bn_train", "hflip"} <= set(cpu_preset().fixed_hparams)
    preset = cpu_preset().replace(mu=1.0, mu_augment=1.0, evolve_mu=False)
    hp, rng = search.initial_hparams(preset, LITE0, 10), random.Random(1)
    for _ in range(50):  # every input draw at odds 1: a flip could only come from the preset
        hp = search.apply_inputs(hp, search.mutate_inputs(hp, preset, LITE0, rng)[0])
        assert hp["aug"]["hflip"] is False
    cfg = cpu_preset().replace(mu=1.0, evolve_mu=False, fixed_hparams=("bn_train", "lr", "image_size", "hflip"))
    hp = search.initial_hparams(cfg, LITE0, 10)
    hp["mu"].update(hparam=1.0, input=1.0, augment=1.0)
    rng, logs = random.Random(0), []
    for _ in range(50):
        hp, log, _ = search.mutate(hp, cfg, LITE0, rng)
        inputs, input_log = search.mutate_inputs(hp, cfg, LITE0, rng)
        hp = search.apply_inputs(hp, inputs)
        logs += log + input_log
    keys = {entry.split(":")[0] for entry in logs}
    assert not keys & {"bn_train", "lr", "image_size", "hflip"}
    assert {"momentum", "adapter_width", "brightness"} <= keys, "the others still move"
    assert hp["bn_train"] is False and hp["opt"]["lr"] == 0.02 and hp["arch"]["image_size"] == 64


def test_vit_layer_removal_drops_top_blocks():
    vit = {"family": "vit", "depth": 4, "removable": [0, 1, 2, 3], "image_size": 32, "patch_size": 8}
    cfg = cpu_preset().replace(mu=1.0, evolve_mu=False)
    hp = search.initial_hparams(cfg, vit, 3)
    hp["mu"]["remove"] = 1.0
    hp, log, _ = search.mutate(hp, cfg, vit, random.Random(0))
    assert hp["arch"]["blocks"] == [0, 1, 2] and "remove:3" in log


def test_input_settings_mutate_within_allowed_sizes():
    cfg = cpu_preset().replace(mu=1.0, evolve_mu=False)
    hp = search.initial_hparams(cfg, LITE0, 10)
    hp["mu"]["input"] = 1.0
    rng = random.Random(0)
    sizes = set()
    for _ in range(30):
        inputs, _ = search.mutate_inputs(hp, cfg, LITE0, rng)
        sizes.add(inputs["image_size"])
        hp = search.apply_inputs(hp, inputs)
    assert sizes <= set(cfg.image_sizes) and len(sizes) > 1


def test_augmentation_and_image_size_mutate_with_their_own_odds():
    cfg = cpu_preset().replace(evolve_mu=False)
    hp = search.initial_hparams(cfg, LITE0, 10)
    hp["mu"]["input"], hp["mu"]["augment"] = 1.0, 0.0
    sizes_only = [search.mutate_inputs(hp, cfg, LITE0, random.Random(s))[1] for s in range(20)]
    assert all(log and all(e.startswith("image_size:") for e in log) for log in sizes_only)
    hp["mu"]["input"], hp["mu"]["augment"] = 0.0, 1.0
    aug_only = [search.mutate_inputs(hp, cfg, LITE0, random.Random(s))[1] for s in range(20)]
    assert all(log and not any(e.startswith("image_size:") for e in log) for log in aug_only)
    old = {k: v for k, v in hp["mu"].items() if k != "augment"}  # a path stored before the split
    assert search.prob({**hp, "mu": old}, "augment", cfg) == cfg.mu_augment


def test_greyscale_tasks_never_mutate_colour_jitter_that_would_be_a_no_op():
    cfg = cpu_preset().replace(evolve_mu=False)
    hp = search.initial_hparams(cfg, LITE0, 10)
    hp["mu"]["input"] = hp["mu"]["augment"] = 1.0
    grey, colour = set(), set()
    for seed in range(20):
        _, log = search.mutate_inputs(hp, cfg, LITE0, random.Random(seed), colour=False)
        grey.update(entry.split(":")[0] for entry in log)
        _, log = search.mutate_inputs(hp, cfg, LITE0, random.Random(seed), colour=True)
        colour.update(entry.split(":")[0] for entry in log)
    assert not grey & {"saturation", "hue"} and {"brightness", "contrast"} <= grey
    assert {"saturation", "hue"} <= colour


def test_greyscale_tasks_drop_colour_jitter_inherited_from_a_colour_tasks_path():
    cfg = cpu_preset().replace(evolve_mu=False)
    hp = search.initial_hparams(cfg, LITE0, 10)
    hp["mu"]["input"] = hp["mu"]["augment"] = 0.0
    hp["aug"].update(saturation=0.01, hue=0.05, brightness=0.02)
    inputs, _ = search.mutate_inputs(hp, cfg, LITE0, random.Random(0), colour=False)
    assert inputs["aug"]["saturation"] == inputs["aug"]["hue"] == 0.0 and inputs["aug"]["brightness"] == 0.02
    inputs, _ = search.mutate_inputs(hp, cfg, LITE0, random.Random(0), colour=True)
    assert inputs["aug"]["saturation"] == 0.01 and inputs["aug"]["hue"] == 0.05


def test_parent_selection_prefers_the_best_path_and_decays_with_children():
    rng = random.Random(0)
    best = search.Member("best", {}, 0.9, 0.9)
    other = search.Member("other", {}, 0.5, 0.5)
    assert all(search.select_parent([best, other], [], rng).key == "best" for _ in range(100)), "0.5^0 = 1"
    best.children = 1  # accepted half the time; otherwise the next path (0 children) is
    picks = [search.select_parent([best, other], [], rng).key for _ in range(4000)]
    assert abs(picks.count("best") / 4000 - 0.5) < 0.04
    best.children, other.children = 10, 10
    seeds = [search.Member("seed", {}, float("-inf"), 0.0)]
    keys = {search.select_parent([best, other], seeds, rng).key for _ in range(300)}
    assert "seed" in keys, "with every path saturated, the uniform fallback reaches the seeds"


def test_accounted_params_divide_shared_components_among_live_users():
    users = {"a": {"t1", "t2"}, "b": {"t1"}, "c": set()}
    params = {"a": 100, "b": 40, "c": 10, "new": 7}
    # As candidate of t3: a shared by t1,t2,t3 -> 100/3; b by t1,t3 -> 20; c only t3; new only t3.
    assert search.accounted_params(params, users, "t3") == pytest.approx(100 / 3 + 20 + 10 + 7)
    # As candidate of t1 (its own live path already counts it once).
    assert search.accounted_params(params, users, "t1") == pytest.approx(50 + 40 + 10 + 7)


def test_root_components_count_as_shared_by_every_task_when_root_shared():
    users = {"root.a": {"t1"}, "root.b": set(), "own": {"t1"}}
    params = {"root.a": 60, "root.b": 30, "own": 12, "new": 5}
    root = frozenset({"root.a", "root.b"})
    # Three tasks: a root component costs at most a third, whoever uses it; others as before.
    assert search.accounted_params(params, users, "t1", root, 3) == pytest.approx(60 / 3 + 30 / 3 + 12 + 5)
    # More live users than tasks counted: the live users' share, never a larger one.
    assert search.accounted_params(params, {"root.a": {"t1", "t2", "t3", "t4"}}, "t1", root, 3) == pytest.approx(
        60 / 4 + 30 / 3 + 12 + 5)
    assert search.accounted_params(params, users, "t1") == pytest.approx(60 + 30 + 12 + 5), "off: DESIGN.md"


def test_score_penalises_size_only_when_base_below_one():
    cfg = cpu_preset()
    assert search.score(0.8, 3e6, 3e6, cfg) == pytest.approx(0.8)
    assert search.score(0.8, 3e6, 3e6, cfg.replace(base=0.3)) == pytest.approx(0.24)
    assert search.score(0.8, 1.5e6, 3e6, cfg.replace(base=0.3)) > search.score(0.8, 3e6, 3e6, cfg.replace(base=0.3))
