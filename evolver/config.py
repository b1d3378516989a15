"""Every constant of the muNet method as one plain config object (MUNET.md defaults), and
the `cpu` preset of DESIGN.md for machines without CUDA."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Ordered value lists of the auto-tuned hyperparameters (MUNET.md §3); mutations move ±1 index.
VALUES = {
    "lr": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1],
    "schedule": ["constant", "cosine", "restarts"],
    "warmup": [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4],
    "momentum": [0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99],
    "nesterov": [True, False],
    "adapter_width": [8, 16, 32, 64, 128],
    "image_size": list(range(16, 385, 16)),
    "crop_area_min": [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
    "crop_aspect_min": [0.25, 0.5, 0.75, 1.0],
    "hflip": [True, False],
    "brightness": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "contrast": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "saturation": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "hue": [0.0, 0.01, 0.02, 0.05, 0.1, 0.2],
    "bn_train": [False, True],  # MUNET.md §7: whether cloned BatchNorms update statistics
}
OPT_KEYS = ("lr", "schedule", "warmup", "momentum", "nesterov")
AUG_KEYS = ("crop_area_min", "crop_aspect_min", "hflip", "brightness", "contrast", "saturation", "hue")
FIXABLE_KEYS = OPT_KEYS + AUG_KEYS + ("bn_train", "adapter_width", "image_size")
# Per-action mutation probabilities of µ2Net+; "clone" is per block position.
# "input" moves the image size, "augment" each augmentation setting (MUNET.md §3's input
# settings, split so random augmentation, which switches the prefix cache off, has its own odds).
ACTIONS = ("hparam", "remove", "readd", "adapter", "clone", "input", "augment")


@dataclass
class EvolverConfig:
    generations: int = 8
    candidates: int = 8
    mu: float = 0.1
    evolve_mu: bool = True  # µ2Net+: per-path, per-action µ, meta-mutated in mu_range
    mu_range: tuple[float, float] = (0.02, 0.30)
    # Clone and adapter probabilities ramp from mu_bottom at block 0 to mu_top (None: mu) at
    # the top block; DESIGN.md cpu preset.
    mu_bottom: float = 0.1
    mu_top: float | None = None
    mu_augment: float | None = None  # starting odds of each augmentation mutation (None: mu)
    # Hyperparameters the search never mutates; every path a visit trains from takes their
    # values from `defaults`, a fixed image_size excepted (evolver.search.fix_settings).
    fixed_hparams: tuple[str, ...] = ()
    intervals: int = 30
    batches_per_interval: int = 200
    batch_size: int = 256
    max_epochs: float | None = None  # cap on passes over the training split per candidate
    eval_batch_size: int = 512
    grad_clip: float = 1.0
    base: float = 1.0  # score = acc * base ** (accounted_params / root_params)
    flops_base: float = 1.0  # µ2Net+ compute factor; 1.0 switches it off
    min_improvement: float = 0.0
    seed_phase: bool = True
    # Visits of a task that start with the seeding phase and whose parent selection may fall
    # back to a seed (None: every visit, MUNET.md §5.2-3); later visits evolve the task's own paths.
    seed_visits: int | None = None
    # Where input settings (image size, augmentation) are drawn and mutated: once per
    # generation from the task's best path, shared by its candidates (MUNET.md §3), or per
    # candidate from its parent, so candidates of one generation compete across sizes.
    inputs_per: str = "generation"
    # Optimiser settings (lr, schedule, warm-up, momentum) a child of a seed starts from: the
    # seed's own, tuned on another task ("seed", as a path's hparams travel in MUNET.md), or
    # this task's ("own": its live path's, else the defaults); a seed still brings its layers.
    seed_opt: str = "seed"
    # A visit-level decay of the learning rate: generation g of G trains at the path's lr
    # times a cosine from 1 (first generation) down to this floor (last), so a visit ends
    # refining its best path instead of re-training it from a fresh peak in every child.
    # None: every candidate trains at its path's lr (MUNET.md).
    visit_lr_floor: float | None = None
    # A task's own layers stay trainable in its later visits: a child clones a component its
    # task created even when another task's live path now shares it (MUNET.md references
    # any locked component frozen, so once a later task builds on this task's path, this
    # task's own trained blocks and adapters freeze for it too). The shared original never
    # changes, so the other task's outputs cannot. Only at base 1.0: under size pressure the
    # clone pays the layer's whole size where the live path pays a share, so children seldom
    # beat the live path they continue (benchmarks/HISTORY.md, base 0.7). False: MUNET.md.
    train_own: bool = False
    # The seeding phase also tries the root with every component cloned and trained (one
    # epoch of full fine-tuning), so a lineage can start from pretrained features that all
    # train, not only from a frozen backbone that clones unfreeze a few blocks at a time.
    # False: MUNET.md's seeds (other tasks' live paths and the root, frozen).
    trained_root_seed: bool = False
    # Image size of that trained root seed (None: the root's, the default size): fine-tuning's
    # first epoch at fine-tuning's size, while new tasks' first paths and the plain root seed
    # stay at the cheap default (DESIGN.md's cpu preset: 64 px; fine-tuning's best fixed
    # size on these data sets is 96, benchmarks/HISTORY.md).
    trained_root_size: int | None = None
    # The seeding phase also tries the root with an adapter of this width before every block,
    # its backbone frozen (the quality benchmark's "adapters w32" plan), at trained_root_size:
    # on a small task frozen features generalise better than a whole network trained on them
    # (elpv: adapters 0.775 and head only 0.743 test against fine-tuning's 0.763 and muNet's
    # 0.728, benchmarks/HISTORY.md). None: MUNET.md's seeds. Tried on elpv at 32 (benchmarks/
    # HISTORY.md, "The adapters plan as a seed on elpv"): after a first visit's quarter epoch
    # it scores as the plain root seed does and no served line descended from it, so it is off.
    adapter_root_seed: int | None = None
    # The seeding phase also tries the root trained as this fixed plan (search.plan, e.g.
    # "bottom:12+adapters:32": the stem and blocks 0-11 cloned, an adapter beside every block,
    # the top blocks and neck shared), at trained_root_size. On EfficientNet-Lite0 the bottom
    # twelve blocks hold 27% of the weights, and one run of that plan per task averaged 0.899
    # test on the quality benchmark's six tasks at 43% of fine-tuning's parameters per task,
    # against fine-tuning's 0.896 and the adapters plan's 0.873 (benchmarks/HISTORY.md, "A
    # fixed plan at under half the parameters"): a small base's lineage can start there
    # instead of at a frozen or a whole trained root. None: MUNET.md's seeds.
    plan_root_seed: str | None = None
    # The root's components are charged as if every task of the system shared them (at least
    # |c| / tasks each), a public good already paid for, not to whichever live paths happen to
    # use them. DESIGN.md counts the scored candidate as live, so a root block no live path uses
    # costs its first user whole: in a round-robin the first tasks see no price for cloning the
    # root away, and every later task the whole price of joining a root nobody uses. At base
    # 0.7 with the plan seed no served path kept a single root component and four tasks built
    # on the first two tasks' clones (benchmarks/HISTORY.md, "The plan as a seed, base 0.7").
    # The system's parameters per task (unique parameters of the live paths / tasks) are
    # counted as before. False: DESIGN.md's accounting.
    root_shared: bool = False
    # At most this many other tasks' live paths seed a visit, drawn by the visit's rng: with
    # few candidates per visit and many tasks, MUNET.md's every-task seeding fills a late
    # task's first visit with seeds (six tasks, eight candidates: seven seeds) and leaves its
    # own line no room to grow. None: every other task (MUNET.md §5.2).
    seed_tasks: int | None = None
    # Image sizes at which the seeding phase also tries the root (its head trained, as the
    # plain root seed, which runs at the default size): a lineage inherits its seed's size
    # and moves it one step at a time, so a task whose best size is two steps from the
    # default rarely gets there within a visit (fine-tuning on gtsrb: test 0.837 at 64 px,
    # 0.879 at 96). Sizes the root family cannot take (a ViT's non-multiples of its patch)
    # are skipped. (): MUNET.md's seeds.
    root_seed_sizes: tuple[int, ...] = ()
    # One cosine over a training line instead of a fresh peak in every child: a candidate
    # trains at its path's lr times 0.5 * (1 + cos(pi * e / line_anneal_epochs)), floored at
    # line_anneal_floor, where e is the epochs its line (this task's chain of trained
    # parents, storage.lineage.training_line) already holds. Full fine-tuning anneals once
    # over its whole run; a lineage of one-epoch children re-trains to the same noise floor
    # in every child. Unlike visit_lr_floor this leaves young lines (a first visit's seeds and
    # their children) at full lr. None: every candidate trains at its path's lr (MUNET.md).
    line_anneal_epochs: float | None = None
    line_anneal_floor: float = 0.1
    # A candidate whose validation score ties its parent's (at least equal, short of the
    # min_improvement margin) still counts as better when its validation cross-entropy is
    # lower. Accuracy on a few hundred images saturates (mnist: 1.0 after three two-epoch
    # steps) or moves in coarse steps (elpv: 1/197), so a child that truly trained further
    # cannot show it, every later child is discarded, and the served line stops at a third
    # of fine-tuning's epochs. The loss keeps measuring after the accuracy stops. False:
    # MUNET.md (a snapshot survives only on a higher score).
    val_loss_ties: bool = False
    # How far below its parent's score a child may land and still tie (val_loss_ties): elpv's
    # accuracy moves in steps of 1/197, so a child one image behind with a clearly lower
    # cross-entropy counts as a tie rather than a loss. 0.0: a tie is at least equal.
    val_loss_tie_margin: float = 0.0
    # Epochs per candidate by the task's visit number (visit 1, 2, ...; the last entry holds
    # for every later visit), in place of max_epochs: a preset can move its budget between
    # visits and keep DESIGN.md's 4 x 4 per visit and at most 2 epochs per candidate. Measured
    # at the budget of two one-epoch visits (benchmarks/HISTORY.md, "Candidate length by
    # visit"): (1.75, 0.25) puts the work in first visits, over issue 3's 20 minutes for a
    # first visit, and later quarter-epoch children never beat their line; (0.25, 1.75) keeps
    # a first visit to minutes and gives later visits children long enough to improve on a
    # trained line (six tasks, mean of 1-3 runs per task: 0.889 against full fine-tuning's
    # 0.896, elpv 3.2 points of the gap). (): max_epochs on every visit.
    visit_epochs: tuple[float, ...] = ()
    # The first candidate of each generation (once the seeding phase is done) continues the
    # task's best path unmutated: same layers, inputs and optimiser, trained for another
    # candidate's epochs. A mutated child of a trained line must recover from its mutation
    # (a new adapter, an unfrozen block, a new image size) and still beat its parent's noisy
    # maximum; on a small task most do not, and the served line stops short (elpv: a median
    # 7,335 examples behind the served weights, a quarter of one fine-tuning run, and line
    # length tracks test accuracy, r 0.88; benchmarks/HISTORY.md, "Why elpv holds most of the
    # gap"). Tried on elpv alone with the cpu preset, two seeds (benchmarks/HISTORY.md,
    # "Continuing the best path"): test 0.699 / 0.734 against 0.751 / 0.769 without; most
    # continuations did not beat their parent either, so on elpv more training of the best
    # path is not what its validation rewards. False: MUNET.md (every child is a mutation).
    continue_best: bool = False
    # A share of the validation split that no candidate is scored on during a visit. At its
    # end the visit's best `final_top` paths that would displace the live path, and the live
    # path, are scored on the whole split, held-back images included, and the best of those
    # is what the visit commits. A visit keeps the best of 16 children scored on the same few
    # hundred images, so its winner's validation overstates its test accuracy more than
    # fine-tuning's best of two runs does (elpv: 2.4 points against 0.3; benchmarks/HISTORY.md,
    # "Half of the gap is the search's optimism"); images the search never selected on pull a
    # lucky leader back. Tried on elpv alone, five seeds a side (benchmarks/HISTORY.md,
    # "Finalists on held-back images"): within the draw, and a tenth of base 1.0's gap to
    # fine-tuning at most; on notmnist, one draw at 0.5 ("... on notmnist"), validation's
    # overstatement of test fell from 2.2 to 0.7 points and test stayed within the draw.
    # 0.0: MUNET.md (the best score on the whole split commits).
    final_holdout: float = 0.0
    final_top: int = 3
    # After a child improves on a parent of its own task, the visit also scores the uniform
    # average of the child's trained weights and its nearest `line_soup - 1` line ancestors'
    # (stochastic weight averaging, Izmailov et al. 2018): every child trains one warm-up +
    # cosine cycle from its parent's weights, so a line is a cyclical-lr trajectory and its
    # children the cycle ends SWA averages. The average competes as a child of the child (it
    # must beat it by min_improvement, or tie on a lower validation loss), costs one
    # validation pass and no training examples, and with BatchNorm statistics frozen
    # (bn_train off) plain averaging needs no statistics pass. Components an ancestor lacks or
    # holds in another shape keep the child's weights. 0: off (MUNET.md).
    line_soup: int = 0
    # At the end of each generation, a greedy soup (Wortsman et al. 2022, "Model soups") of the
    # visit's best path with the candidates trained from its parent (its siblings) and from it
    # (its children), kept or discarded: each started from the same weights or from the best's
    # own, so all lie near it, and they are added best-first while the average's validation
    # accuracy does not fall. A line's ancestors are less trained than its tip, and averaging
    # them in (line_soup) lost in all but 5 of 23 tries (benchmarks/HISTORY.md, "Weight
    # soups"). Only components an ingredient trained are averaged; the soup then competes as a
    # child of the best path. False: MUNET.md.
    greedy_soup: bool = False
    # Vizier's median stopping rule (Golovin et al. 2017) inside a visit: at each validation
    # point but the last, a candidate whose score is below the median of what the visit's last
    # `median_stop` candidates scored at the same point stops there (its best snapshot so far
    # still counts). Every candidate of a visit trains the same epochs and validation points,
    # so peers are compared at one point of one schedule; only the last few, because a visit's
    # line climbs and the median of all its earlier candidates lags behind it (against every
    # earlier candidate, 1 of notmnist's first 12 second-visit children stopped). A visit keeps
    # one line of 16 candidates; the rest of its examples go to children that lose (notmnist:
    # 71,019 of 126,256 in a second visit), and the served line sees a quarter of the budget
    # where fine-tuning's winning run sees half. Tried at 4 on notmnist and elpv with
    # fine-tuning rerun at the budgets it set (benchmarks/HISTORY.md, "Median stopping inside a
    # visit"): budgets 10% and 23% smaller, muNet's notmnist within its draws and its elpv
    # below them, fine-tuning unchanged, so the gap stays. 0: off (MUNET.md).
    median_stop: int = 0
    inherit_momentum: bool = True
    image_sizes: list[int] = field(default_factory=lambda: list(VALUES["image_size"]))
    defaults: dict = field(default_factory=lambda: {
        "lr": 0.01, "schedule": "cosine", "warmup": 0.1, "momentum": 0.9, "nesterov": False,
        "adapter_width": 32, "image_size": 224, "crop_area_min": 0.05, "crop_aspect_min": 0.75,
        "hflip": True, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0, "bn_train": False,
    })
    prefix_cache_bytes: int = 3 * 1024**3
    reuse_prefix: bool = True  # compute frozen-prefix activations once per (prefix, size, split)
    channels_last: bool = True  # candidates train and run their prefix in channels-last layout (evolver/train.py)
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.inputs_per not in ("generation", "candidate"):
            raise ValueError(f"inputs_per must be 'generation' or 'candidate', not {self.inputs_per!r}")
        if self.seed_opt not in ("seed", "own"):
            raise ValueError(f"seed_opt must be 'seed' or 'own', not {self.seed_opt!r}")
        unknown = [k for k in self.fixed_hparams if k not in FIXABLE_KEYS]
        if unknown:
            raise ValueError(f"fixed_hparams: {unknown[0]!r} is no searched setting; choose from {', '.join(FIXABLE_KEYS)}")
        if self.seed_tasks is not None and self.seed_tasks < 0:
            raise ValueError(f"seed_tasks must be >= 0 or None, not {self.seed_tasks!r}")
        if self.visit_lr_floor is not None and not 0.0 < self.visit_lr_floor <= 1.0:
            raise ValueError(f"visit_lr_floor must be in (0, 1] or None, not {self.visit_lr_floor!r}")
        if self.line_anneal_epochs is not None and not self.line_anneal_epochs > 0:
            raise ValueError(f"line_anneal_epochs must be > 0 or None, not {self.line_anneal_epochs!r}")
        if any(not e > 0 for e in self.visit_epochs):
            raise ValueError(f"visit_epochs must all be > 0, not {self.visit_epochs!r}")
        if not 0.0 <= self.final_holdout < 1.0:
            raise ValueError(f"final_holdout must be in [0, 1), not {self.final_holdout!r}")
        if self.final_top < 1:
            raise ValueError(f"final_top must be >= 1, not {self.final_top!r}")
        if self.adapter_root_seed is not None and self.adapter_root_seed < 1:
            raise ValueError(f"adapter_root_seed must be a width >= 1 or None, not {self.adapter_root_seed!r}")
        if self.plan_root_seed is not None:
            from .search import plan  # search imports this module

            plan(self.plan_root_seed, {"depth": 1})  # a clear error now, not in a visit
        if self.line_soup == 1 or self.line_soup < 0:
            raise ValueError(f"line_soup must be 0 (off) or a number of line points >= 2, not {self.line_soup!r}")
        if self.median_stop < 0:
            raise ValueError(f"median_stop must be 0 (off) or a number of recent candidates >= 1, not {self.median_stop!r}")
        if not 0.0 < self.line_anneal_floor <= 1.0:
            raise ValueError(f"line_anneal_floor must be in (0, 1], not {self.line_anneal_floor!r}")

    def lr_scale(self, generation: int) -> float:
        """The factor on a path's lr for candidates of this generation of a visit."""
        if self.visit_lr_floor is None or self.generations < 2:
            return 1.0
        cos = 0.5 * (1 + math.cos(math.pi * min(generation, self.generations - 1) / (self.generations - 1)))
        return self.visit_lr_floor + (1 - self.visit_lr_floor) * cos

    def line_scale(self, line_epochs: float) -> float:
        """The factor on a path's lr for a child whose line already trained this many epochs."""
        if self.line_anneal_epochs is None:
            return 1.0
        cos = 0.5 * (1 + math.cos(math.pi * min(line_epochs, self.line_anneal_epochs) / self.line_anneal_epochs))
        return self.line_anneal_floor + (1 - self.line_anneal_floor) * cos

    def for_visit(self, visits_done: int) -> "EvolverConfig":
        """The settings a task's next visit trains with, after `visits_done` earlier visits."""
        if not self.visit_epochs:
            return self
        return self.replace(max_epochs=self.visit_epochs[min(visits_done, len(self.visit_epochs) - 1)])

    def replace(self, **changes) -> "EvolverConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def munet_preset() -> EvolverConfig:
    """MUNET.md's defaults (the paper's GPU/TPU budget)."""
    return EvolverConfig(device="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    import torch  # here, not at import: the CLI's read-only commands start without torch (~2 s)

    return torch.cuda.is_available()


def cpu_preset() -> EvolverConfig:
    """DESIGN.md: 4 generations x 4 candidates, at most 2 epochs, 32-96 px, default 64 px,
    random crops and colour jitter off (so the prefix cache applies) but reachable by
    mutation, horizontal flips off and fixed.

    A quarter epoch per candidate in a task's first visit and 1.75 in later ones, validated
    after each half (visit_epochs): a first visit stays to minutes (issue 3: mnist + notmnist
    under 20; at two epochs per candidate it took 29 min on 2 cores) and a second visit's
    children of a trained line are long enough to improve on it. At the budget of two
    one-epoch visits, six tasks in one run (benchmarks/HISTORY.md, "Current cpu preset"): 0.886
    test against one epoch in every visit's 0.871 and full fine-tuning's 0.897 at the same
    budget."""
    # Small inference batches: on 2 CPU cores 64 images per batch run the frozen prefix
    # ~1.6x faster than 512 (measured 830 vs 520 images/s at 64 px).
    # Mutation odds near the top of MUNET.md's µ range: 32 candidates per task give a lineage
    # 8 generations, and at µ = 0.1 it barely leaves the defaults. gtsrb, one visit from the
    # root, after 9-12 of its 16 candidates: best validation 0.68 at µ = 0.1 (bottom blocks
    # 0.005), 0.82 at µ = 0.2 with clone/adapter odds 0.05 -> 0.3 (it found lr 0.05-0.1, 80 px).
    cfg = EvolverConfig(generations=4, candidates=4, intervals=2, batches_per_interval=10**9, batch_size=64, eval_batch_size=64,
                        max_epochs=1.0, min_improvement=0.002, image_sizes=[32, 48, 64, 80, 96],
                        mu=0.2, mu_top=0.3, mu_bottom=0.05, mu_augment=0.05,
                        fixed_hparams=("bn_train", "hflip", "lr", "schedule", "warmup", "momentum", "nesterov"),
                        seed_visits=1, inputs_per="candidate", seed_opt="own", train_own=True,
                        trained_root_seed=True, trained_root_size=96, seed_tasks=1, val_loss_ties=True,
                        visit_epochs=(0.25, 1.75))
    # Input settings per candidate, from its parent: with one-epoch candidates every child
    # gains from its extra epoch, so a size drawn once for a whole generation rides on that
    # gain and sticks. gtsrb (quality benchmark, gtsrb + elpv alone, same seed and budget):
    # per generation its first size draw, 64 -> 48 px, hitchhiked on its generation's
    # gains (0.678 -> 0.684) and no later draw left 48 px: test 0.704. Per candidate a 48 px
    # child lost to its 64 px siblings of the same generation (0.808 vs 0.840-0.852): test
    # 0.827, val 0.902 (was 0.800); elpv 0.732 (0.729).
    # Seeds on a task's first visit only: at 16 candidates per visit, a second visit's five
    # seeds (other tasks' live paths with a new head and norm trained one epoch on a backbone
    # frozen for other data: about a head-only probe, 0.77 average test against muNet's 0.85
    # in the quality benchmark) spend 31% of the visit to challenge a live path its lineage
    # trained for a whole visit. Measured (quality benchmark, one run each): average test
    # 0.847 with it and without; the seeds' share of the budget fell from 26% to 10%.
    # Nor does a later visit's parent selection fall back to seeds (MUNET.md picks uniformly
    # among seeds and own paths): in gtsrb's second visit of that run, half of the 16
    # candidates went to such a side lineage (validation 0.39 -> 0.73; the live path: 0.79).
    # Augmentation odds 0.05, not µ: at 0.2 per setting 30 of the 32 candidates of a first
    # visit of mnist + notmnist trained with some jitter on (mostly brightness 0.01), which
    # switches the prefix cache off (30-46 s per candidate against 8-26 s cached).
    # hflip fixed (off, as the baselines train): the input mutation turns flips on for a child
    # and its line keeps them, riding on the child's extra training like any hitchhiker. On
    # GTSRB (keep left / keep right), digits and letters a mirror image is another class or
    # none, and the frozen root's pooled features barely tell a mirror image apart (test
    # accuracy of a linear probe on mirrored images within 2.6 points of the plain ones on all
    # six tasks, benchmarks/flip_probe.py), so neither the root nor a short comparison warns.
    # Served muNet paths of the quality runs with flips on, against those without (142 parts):
    # gtsrb 0.747 / 0.842 test, mnist 0.965 / 0.980, notmnist 0.903 / 0.925, and level on the
    # three tasks where a mirror is harmless (cifar, natural images, elpv). Side by side, one
    # run of full fine-tuning on gtsrb at 96 px (benchmarks/image_size.py --hflip off on):
    # test 0.8705 without flips, 0.8436 with them (val 0.936 / 0.924); on mnist 0.985 both
    # ways (val 0.998 / 0.990).
    # bn_train fixed (off): in the quality run of 2026-11-29 (commit fcacb78) none of the
    # children that switched it on survived (0 of 12, 6% of the budget), as
    # MUNET.md §7 measured for fine-tuning: one epoch at batch 64 is too little to re-estimate
    # a pretrained network's statistics.
    # A seed's children start from the task's own optimiser settings (seed_opt "own"): with
    # the seed's, every task inherited cifar's one-epoch-greedy lr 0.1 with half-epoch
    # restarts (156 of 192 candidates of the quality run at commit 5269c7b trained at lr 0.1,
    # where fine-tuning picks 0.01-0.02 by validation), and second visits stalled. With "own"
    # (quality run at commit 5fa1564, same seed and budget), validation after the first visits
    # rose on 4 of the 5 tasks it touches (gtsrb 0.882 -> 0.886, notmnist 0.920 -> 0.938, elpv
    # 0.726 -> 0.746; natural images 0.972 -> 0.970), but cifar's first visit, which it does
    # not touch (only the root seeds it), moved 0.812 -> 0.832 too: one run each, noisy.
    # No visit-level lr decay (visit_lr_floor None): tried at 0.1 (quality run at commit
    # cce41fb, same seed and budget, stopped after 9 of 12 visits), validation after the
    # first visits fell on 5 of 6 tasks (gtsrb 0.886 -> 0.832; others -0.4 to +1.0 points) and
    # after both visits of cifar and gtsrb by 3.2 points each (test -0.8 and -2.6): these
    # lineages are still undertrained at a visit's end, and a decayed lr trains them less.
    # lr 0.02: at these budgets full fine-tuning and head-only runs both pick 0.02 over
    # MUNET.md's 0.01 by validation on 4 of the 6 benchmark tasks, and muNet's own search
    # moved 4 of 6 live paths to 0.05-0.1.
    # The search starts where full fine-tuning starts and keeps its recipe (benchmarks/HISTORY.md,
    # "Fine-tuning's start" runs): the optimiser is fixed at lr 0.02, one warm-up + cosine per
    # candidate (searched, lr drifted to cifar's one-epoch-greedy 0.1 through the seeds); the
    # seeding phase also tries the root trained whole at 96 px (fine-tuning's best fixed size)
    # while a new task's first path stays at 64; a task's own layers stay trainable in its later
    # visits (train_own); one other task seeds a first visit (seed_tasks: six tasks' seeds would
    # fill a quarter-epoch first visit); and a child that only ties its parent survives on a
    # lower validation loss (val_loss_ties: mnist's validation saturates at 1.0 in three steps).
    # With one-epoch candidates in every visit this start gained 0.4 points on six tasks; with
    # the quarter / 1.75 split 1.5 (0.871 -> 0.886). The optimiser being fixed, seed_opt no
    # longer matters here.
    cfg.defaults.update({"image_size": 64, "crop_area_min": 1.0, "hflip": False, "lr": 0.02})
    return cfg


PRESETS = {"cpu": cpu_preset, "munet": munet_preset}


def default_config() -> EvolverConfig:
    return munet_preset() if _cuda() else cpu_preset()
