"""The muNet search, as pure functions over plain data: initial hyperparameters,
mutations (MUNET.md §3), µ2Net+ meta-mutation, parent selection (§5.3) and scoring (§4).

Nothing here touches torch or SQL, so every rule is testable in isolation.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field

from .config import ACTIONS, AUG_KEYS, OPT_KEYS, VALUES, EvolverConfig


def initial_hparams(cfg: EvolverConfig, root_config: dict, num_classes: int) -> dict:
    d = cfg.defaults
    size = d["image_size"]
    if root_config["family"] == "vit":  # a ViT's sizes must be multiples of its patch
        size = max(root_config["patch_size"], size - size % root_config["patch_size"])
    return {
        "arch": {"blocks": list(range(root_config["depth"])), "adapters": {}, "image_size": size, "num_classes": num_classes},
        "opt": {k: d[k] for k in OPT_KEYS},
        "aug": {k: d[k] for k in AUG_KEYS},
        "bn_train": d["bn_train"],
        "adapter_width": d["adapter_width"],
        "mu": initial_mu(cfg, root_config["depth"]),
    }


def plan(kind: str, root_config: dict) -> tuple[set[str], dict[int, int]]:
    """A fixed plan over the root, for the baselines and the seed cfg.plan_root_seed:
    (names to train, adapters) for 'full', 'head', 'freeze:X' (blocks X.. and the neck),
    'top:X' (the top X blocks, neck frozen), 'bottom:X' (the stem and blocks below X, the rest
    frozen), 'adapters:W', or several joined by '+' (e.g. 'bottom:12+adapters:32')."""
    if "+" in kind:
        parts = [plan(k, root_config) for k in kind.split("+")]
        return set().union(*(t for t, _ in parts)), {i: w for _, a in parts for i, w in a.items()}
    depth = root_config["depth"]
    top = {"final_norm", "head"}
    name, _, arg = kind.partition(":")
    x = int(arg) if arg.isdigit() else None  # a malformed X falls through to the error below
    if kind == "full":
        return {"*"}, {}
    if kind == "head":
        return top, {}
    if name == "freeze" and x is not None:
        return top | {f"blocks.{i}" for i in range(x, depth)} | ({"neck"} if x < depth else set()), {}
    if name == "adapters" and x is not None:
        return top | {"adapter"}, {i: x for i in range(depth)}
    if name == "top" and x is not None:  # the top X blocks and the head; the neck stays frozen
        return top | {f"blocks.{i}" for i in range(depth - x, depth)}, {}
    if name == "bottom" and x is not None:  # where a CNN keeps few weights (EfficientNet-Lite0: 27% below block 12)
        return top | {"stem"} | {f"blocks.{i}" for i in range(x)}, {}
    raise ValueError(f"unknown plan {kind!r}: use full, head, freeze:X, top:X, bottom:X, adapters:W or several joined by +")


def fix_settings(hp: dict, cfg: EvolverConfig) -> dict:
    """hp with each fixed training setting at the configuration's value, in place.

    Fixed means the configuration decides, not the path: a path committed under other settings
    (say, before the cpu preset fixed flips off) would otherwise train its children, and any
    new task it seeds, with the old value for good, since the search never moves a fixed key.
    A fixed image size stays the path's own: its accuracy and its serving were measured there.
    """
    for key in cfg.fixed_hparams:
        if key in OPT_KEYS:
            hp["opt"][key] = cfg.defaults[key]
        elif key in AUG_KEYS:
            hp["aug"][key] = cfg.defaults[key]
        elif key != "image_size":
            hp[key] = cfg.defaults[key]
    return hp


def initial_mu(cfg: EvolverConfig, depth: int) -> dict:
    # Bottom blocks are general features: cloning them or adapting them rarely pays and makes
    # the whole network above trainable, so their probabilities start low and evolve.
    mu = {a: start_mu(cfg, a) for a in ACTIONS if a not in ("clone", "adapter")}
    # Quadratic ramp: on a 16-block CNN the bottom half together gets ~1/6 of the top's odds.
    top = cfg.mu if cfg.mu_top is None else cfg.mu_top
    ramp = [round(cfg.mu_bottom + (top - cfg.mu_bottom) * (i / max(1, depth - 1)) ** 2, 4) for i in range(depth)]
    mu["clone"], mu["adapter"] = ramp, list(ramp)
    return mu


def start_mu(cfg: EvolverConfig, action: str) -> float:
    return cfg.mu_augment if action == "augment" and cfg.mu_augment is not None else cfg.mu


def step(values: list, current, rng: random.Random):
    """Move to a neighbouring value (±1 index, clamped) of an ordered list."""
    i = min(range(len(values)), key=lambda j: _distance(values[j], current))
    j = min(max(i + rng.choice((-1, 1)), 0), len(values) - 1)
    return values[j]


def _distance(a, b) -> float:
    if isinstance(a, (bool, str)) or isinstance(b, (bool, str)):
        return 0.0 if a == b else 1.0
    return abs(math.log(a + 1e-6) - math.log(b + 1e-6)) if a > 0 and b > 0 else abs(a - b)


def prob(hp: dict, action: str, cfg: EvolverConfig, index: int | None = None) -> float:
    mu = hp.get("mu") or {}
    value = mu.get(action, start_mu(cfg, action))  # paths from before an action existed
    if isinstance(value, list):
        return value[index] if index is not None and index < len(value) else cfg.mu
    return value


def mutate_mu(hp: dict, cfg: EvolverConfig, rng: random.Random, log: list[str]) -> None:
    """µ2Net+: each action's probability is itself inherited and meta-mutated."""
    if not cfg.evolve_mu:
        return
    lo, hi = cfg.mu_range
    mu = hp["mu"]
    for action, value in mu.items():
        if isinstance(value, list):  # per-block ramps may sit below the range's floor
            mu[action] = [_meta(v, min(lo, cfg.mu_bottom), hi, rng) for v in value]
        else:
            mu[action] = _meta(value, lo, hi, rng)
    log.append("mu")


def _meta(v: float, lo: float, hi: float, rng: random.Random) -> float:
    # Multiplicative step so small probabilities can still grow; clamped to MUNET.md's range.
    return round(min(hi, max(lo, v * rng.choice((0.8, 1.25)))), 4)


def mutate(parent_hp: dict, cfg: EvolverConfig, root_config: dict, rng: random.Random) -> tuple[dict, list[str], set[int]]:
    """A mutated copy of `parent_hp`, the names of the mutations applied, and the block
    positions the child must clone (layer-cloning mutation)."""
    hp = copy.deepcopy(parent_hp)
    log: list[str] = []
    mutate_mu(hp, cfg, rng, log)
    for key in OPT_KEYS:
        if key not in cfg.fixed_hparams and rng.random() < prob(hp, "hparam", cfg):
            old = hp["opt"][key]
            hp["opt"][key] = step(VALUES[key], old, rng)
            if hp["opt"][key] != old:
                log.append(f"{key}:{old}->{hp['opt'][key]}")
    for key in ("adapter_width", "bn_train"):
        if key not in cfg.fixed_hparams and rng.random() < prob(hp, "hparam", cfg):
            old = hp[key]
            hp[key] = step(VALUES[key], old, rng)
            if hp[key] != old:
                log.append(f"{key}:{old}->{hp[key]}")
    _mutate_depth(hp, root_config, cfg, rng, log)
    _mutate_adapters(hp, cfg, rng, log)
    clones = {i for i in hp["arch"]["blocks"] if rng.random() < prob(hp, "clone", cfg, i)}
    log += [f"clone:{i}" for i in sorted(clones)]
    return hp, log, clones


def _mutate_depth(hp: dict, root_config: dict, cfg: EvolverConfig, rng: random.Random, log: list[str]) -> None:
    blocks = hp["arch"]["blocks"]
    depth = root_config["depth"]
    if root_config["family"] == "vit":
        # ViT: the number of blocks used, dropping or re-adding at the top.
        if rng.random() < prob(hp, "remove", cfg) and len(blocks) > 1:
            log.append(f"remove:{blocks.pop()}")
        elif rng.random() < prob(hp, "readd", cfg) and len(blocks) < depth:
            blocks.append(len(blocks))
            log.append(f"readd:{blocks[-1]}")
        return
    # CNN: only residual (shape-preserving) blocks can go (DESIGN.md Decisions).
    present = [i for i in root_config["removable"] if i in blocks]
    absent = [i for i in root_config["removable"] if i not in blocks]
    if present and rng.random() < prob(hp, "remove", cfg):
        i = rng.choice(present)
        blocks.remove(i)
        log.append(f"remove:{i}")
    elif absent and rng.random() < prob(hp, "readd", cfg):
        i = rng.choice(absent)
        blocks.append(i)
        blocks.sort()
        log.append(f"readd:{i}")
    for i in list(hp["arch"]["adapters"]):
        if int(i) not in blocks:
            del hp["arch"]["adapters"][i]


def _mutate_adapters(hp: dict, cfg: EvolverConfig, rng: random.Random, log: list[str]) -> None:
    adapters = hp["arch"]["adapters"]
    for i in hp["arch"]["blocks"]:
        if str(i) not in adapters and rng.random() < prob(hp, "adapter", cfg, i):
            adapters[str(i)] = hp["adapter_width"]
            log.append(f"adapter:{i}/w{hp['adapter_width']}")


# Saturation and hue jitter leave a grey image (three equal channels) exactly as it was, so
# mutating them on a greyscale task would only switch the prefix cache off for nothing.
COLOUR_ONLY = ("saturation", "hue")


def mutate_inputs(best_hp: dict, cfg: EvolverConfig, root_config: dict, rng: random.Random,
                  colour: bool = True) -> tuple[dict, list[str]]:
    """Input settings (image size, augmentation) drawn once per generation from the task's
    current best path, mutated, and shared by all of the generation's candidates."""
    # A grey task can inherit colour jitter from a colour task's seed; drop it, it only costs the cache.
    arch, aug = best_hp["arch"], dict(best_hp["aug"]) if colour else drop_colour_jitter(best_hp["aug"])
    log: list[str] = []
    p, p_aug = prob(best_hp, "input", cfg), prob(best_hp, "augment", cfg)
    sizes = allowed_sizes(cfg, root_config)
    size = arch["image_size"]
    if "image_size" not in cfg.fixed_hparams and rng.random() < p:
        new = step(sizes, size, rng)
        if new != size:
            log.append(f"image_size:{size}->{new}")
            size = new
    for key in AUG_KEYS:
        if key not in cfg.fixed_hparams and rng.random() < p_aug and (colour or key not in COLOUR_ONLY):
            old = aug[key]
            aug[key] = step(VALUES[key], old, rng)
            if aug[key] != old:
                log.append(f"{key}:{old}->{aug[key]}")
    return {"image_size": size, "aug": aug}, log


def drop_colour_jitter(aug: dict) -> dict:
    return {**aug, **{k: 0.0 for k in COLOUR_ONLY}}


def allowed_sizes(cfg: EvolverConfig, root_config: dict) -> list[int]:
    sizes = list(cfg.image_sizes)
    if root_config["family"] == "vit":
        sizes = [s for s in sizes if s % root_config["patch_size"] == 0] or [root_config["image_size"]]
    return sizes


def apply_inputs(hp: dict, inputs: dict) -> dict:
    hp = copy.deepcopy(hp)
    hp["arch"]["image_size"] = inputs["image_size"]
    hp["aug"] = dict(inputs["aug"])
    return hp


def augments(hp: dict) -> bool:
    """Whether training inputs are random (then no activation can be cached)."""
    a = hp["aug"]
    # crop_area_min 1.0 means no random crop at all, whatever the aspect bound says.
    return a["crop_area_min"] < 1.0 or a["hflip"] or any(a[k] > 0 for k in ("brightness", "contrast", "saturation", "hue"))


# -- selection and scoring --------------------------------------------------------------

@dataclass
class Member:
    """A path of this task's population during a visit."""

    key: str
    hparams: dict
    score: float
    val_acc: float
    children: int = 0
    payload: object = field(default=None, repr=False)


def select_parent(population: list[Member], seeds: list[Member], rng: random.Random) -> Member:
    """MUNET.md §5.3: accept paths best-first with probability 0.5^children; else uniform."""
    for member in sorted(population, key=lambda m: m.score, reverse=True):
        if rng.random() < 0.5 ** member.children:
            return member
    return rng.choice(seeds + population)


def accounted_params(component_params: dict[str, int], users: dict[str, set[str]], task: str,
                     root_ids: frozenset[str] = frozenset(), tasks: int = 1) -> float:
    """Σ |c| / (tasks whose live path uses c), counting this task's candidate as live; a
    component in `root_ids` counts as shared by at least `tasks` (EvolverConfig.root_shared)."""
    total = 0.0
    for cid, n in component_params.items():
        sharers = len(set(users.get(cid, ())) | {task})
        total += n / (max(sharers, tasks) if cid in root_ids else sharers)
    return total


def score(val_acc: float, accounted: float, root_params: int, cfg: EvolverConfig,
          flops: float | None = None, root_flops: float | None = None) -> float:
    s = val_acc * cfg.base ** (accounted / root_params)
    if cfg.flops_base != 1.0 and flops and root_flops:
        s *= cfg.flops_base ** (flops / root_flops)
    return s
