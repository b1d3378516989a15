"""Training speed: the evolver's trainer against a plain timm training loop.

Where a quality run's hours go: each arm trains N batches of the task's training images and
then scores the validation split once, at the same batch size, image size, threads and
channels-last layout. `timm loop` is what a user would write around
`timm.create_model("tf_efficientnet_lite0")` (BatchNorm statistics frozen, as the evolver
keeps them); the other arms run `train_candidate`, the function every muNet candidate and
baseline run trains with, on a plan over the packaged root: full fine-tuning, adapters of
width 32 before every block with the backbone frozen (the adapters baseline), and the same
with every component trained (the heaviest shape a muNet line grows into). `timm loop, bf16
autocast` is the same loop under `torch.autocast("cpu", torch.bfloat16)`: whether lower
precision would buy this CPU speed (it has AVX512-BF16). `vs timm` is the arm's images per
second over the timm loop's: below 1 is the trainer's own cost.

    python benchmarks/step_time.py [--task cifar] [--sizes 64 96] [--steps 30] [--arms "full fine-tuning"] [--name step_time]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, one_task, table, write  # noqa: E402

from munet.evolver import baselines, search  # noqa: E402
from munet.evolver.config import cpu_preset  # noqa: E402
from munet.evolver.train import PrefixCache, TaskData, evaluate, prefix_activations, train_candidate  # noqa: E402

# arm -> (baseline plan, train every component)
PLANS = {"full fine-tuning": ("full", False), "adapters w32, backbone frozen": ("adapters:32", False),
         "adapters w32, all trained": ("adapters:32", True)}


BF16 = "timm loop, bf16 autocast"


def timm_loop(data: TaskData, size: int, steps: int, batch: int, cfg, bf16: bool = False) -> float:
    """Seconds for `steps` batches and one validation pass of a plain timm training loop."""
    model = timm.create_model("tf_efficientnet_lite0", num_classes=data.num_classes).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    # The inputs as the evolver feeds them (resized, normalised, channels-last), prepared once.
    h_train = prefix_activations(None, [], [], data, "train", size, cfg)
    h_val = prefix_activations(None, [], [], data, "val", size, cfg)
    y = data.y["train"]

    def run(n: int) -> None:
        model.train()
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.eval()
        for i in range(n):
            idx = torch.arange(i * batch, (i + 1) * batch) % len(y)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(h_train[idx]).float(), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        model.eval()
        evaluate([model], h_val, data.y["val"], batch)

    run(3)  # warm-up: oneDNN primitives, allocator
    t0 = time.perf_counter()
    run(steps)
    return time.perf_counter() - t0


def trainer(system, root, task, data: TaskData, arm: str, size: int, steps: int, cfg) -> float:
    """Seconds for `steps` batches and one validation pass of `train_candidate`."""
    kind, all_trained = PLANS[arm]
    hp = search.initial_hparams(cfg, root.config, data.num_classes)
    hp["arch"]["image_size"] = size
    cand, _ = baselines._build(system, root, task, kind, hp)
    if all_trained:
        cand.trainable[:] = [True] * len(cand.trainable)
    cache = PrefixCache(cfg.prefix_cache_bytes)
    n = len(data.y["train"])
    warm = cfg.replace(max_epochs=3 * cfg.batch_size / n, intervals=1)
    train_candidate(cand, data, warm, cache, 1.0, float("-inf"))  # warm-up; fills the prefix cache
    result = train_candidate(cand, data, cfg.replace(max_epochs=steps * cfg.batch_size / n, intervals=1), cache,
                             1.0, float("-inf"))
    return result.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="cifar")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--arms", nargs="+", default=["timm loop", *PLANS], choices=["timm loop", BF16, *PLANS],
                    help="the timm loop always runs: every arm is compared with it")
    ap.add_argument("--name", default="step_time", help="results/<name>.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data_file = SHARED_DATA / f"{args.task}.npz"
    if not data_file.exists():
        sys.exit(f"step_time: {data_file} is absent")
    cfg = cpu_preset()
    rows = []
    with tempfile.TemporaryDirectory() as home:
        system, root, task, data = one_task(home, args.task)
        images = args.steps * cfg.batch_size
        arms = [(size, arm) for size in args.sizes for arm in dict.fromkeys(["timm loop", *args.arms])]
        for size, arm in tqdm(arms, desc="arms"):
            secs = (timm_loop(data, size, args.steps, cfg.batch_size, cfg, bf16=arm == BF16) if arm in ("timm loop", BF16)
                    else trainer(system, root, task, data, arm, size, args.steps, cfg))
            rows.append({"image_size": size, "arm": arm, "steps": args.steps, "seconds": secs,
                         "train_images_per_s": images / secs, "s_per_step": secs / args.steps})
    for r in rows:
        plain = next(p for p in rows if p["image_size"] == r["image_size"] and p["arm"] == "timm loop")
        r["vs_timm"] = r["train_images_per_s"] / plain["train_images_per_s"]
    print(f"\nTraining speed, {args.task}, batch {cfg.batch_size}, {args.steps} steps and one validation pass "
          f"({len(data.y['val'])} images) per arm, {torch.get_num_threads()} threads\n")
    print(table(rows, ["image_size", "arm", "seconds", "s_per_step", "train_images_per_s", "vs_timm"]))
    print(f"\nwrote {write(args.name, {'args': vars(args), 'rows': rows})}")


if __name__ == "__main__":
    main()
