"""EfficientNet / MobileNet-style CNNs: stem, flat blocks, neck (1x1 conv), final_norm, head.

The timm neck is split in two components so that muNet's "always clone the final norm"
rule clones only the 1280-channel BatchNorm, not the 0.4M-parameter 1x1 conv.
"""
from __future__ import annotations

import torch
from torch import nn

from .family import adapters_of, copy_of, parse_name, skeleton
from .layers import ConvAdapter, PoolHead, Stem, zero_head
from .registry import register_family


def _flat_blocks(model: nn.Module) -> list[nn.Module]:
    return [block for stage in model.blocks for block in stage]


@register_family("tf_efficientnet", "efficientnet", "mobilenetv2", "mobilenetv3", "tf_mobilenetv3", "mnasnet")
class EfficientNetFamily:
    name = "efficientnet"

    def describe(self, model: nn.Module) -> dict:
        blocks = _flat_blocks(model)
        channels, x = [], torch.zeros(1, 3, 64, 64)
        with torch.no_grad():
            x = model.bn1(model.conv_stem(x))
            for block in blocks:
                channels.append(int(x.shape[1]))
                x = block(x)
        cfg = model.pretrained_cfg
        return {
            "family": self.name,
            "depth": len(blocks),
            "block_channels": channels,
            # Only residual blocks keep shapes when dropped (DESIGN.md Decisions).
            "removable": [i for i, b in enumerate(blocks) if getattr(b, "has_skip", False)],
            "num_features": int(model.num_features),
            "image_size": int(cfg["input_size"][-1]),
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
        }

    def decompose(self, model: nn.Module, config: dict) -> list[tuple[str, dict, nn.Module]]:
        head = PoolHead(config["num_features"], model.classifier.out_features)
        head.fc.load_state_dict(model.classifier.state_dict())
        parts = [("stem", {}, _stem(model))]
        parts += [(f"blocks.{i}", {}, b) for i, b in enumerate(_flat_blocks(model))]
        parts += [("neck", {}, model.conv_head), ("final_norm", {}, model.bn2)]
        parts.append(("head", {"num_classes": int(model.classifier.out_features)}, head))
        return [(n, m, copy_of(mod)) for n, m, mod in parts]

    def layout(self, config: dict, arch: dict) -> list[tuple[str, dict]]:
        adapters = adapters_of(arch)
        names: list[tuple[str, dict]] = [("stem", {})]
        for i in arch["blocks"]:
            if i in adapters:
                names.append((f"adapter@{i}/w{adapters[i]}", {"channels": config["block_channels"][i], "width": adapters[i]}))
            names.append((f"blocks.{i}", {}))
        names += [("neck", {}), ("final_norm", {}), ("head", {"num_classes": int(arch["num_classes"])})]
        return names

    def build(self, config: dict, name: str, meta: dict) -> nn.Module:
        """A module of the right architecture; fresh modules are initialised as muNet wants."""
        kind, index, width = parse_name(name)
        model = skeleton(config)
        if kind == "stem":
            return copy_of(_stem(model))
        if kind == "blocks":
            return copy_of(_flat_blocks(model)[index])
        if kind == "neck":
            return copy_of(model.conv_head)
        if kind == "final_norm":
            return copy_of(model.bn2)
        if kind == "head":
            return zero_head(PoolHead(config["num_features"], meta["num_classes"]))
        if kind == "adapter":
            return ConvAdapter(config["block_channels"][index], width)
        raise ValueError(f"{self.name} roots have no component named {name!r}")


def _stem(model: nn.Module) -> Stem:
    stem = Stem()
    stem.add_module("conv_stem", model.conv_stem)
    stem.add_module("bn1", model.bn1)
    return stem


def _bn_pairs() -> dict[type, tuple[tuple[str, str], ...]]:
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, EdgeResidual, InvertedResidual

    s2d = ("conv_s2d", "bn_s2d")
    return {  # each convolution and the BatchNorm right after it in the block's forward
        Stem: (("conv_stem", "bn1"),),
        DepthwiseSeparableConv: (s2d, ("conv_dw", "bn1"), ("conv_pw", "bn2")),
        InvertedResidual: (s2d, ("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
        EdgeResidual: (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
    }


def fold_batchnorm(component: nn.Module) -> nn.Module:
    """Fold each frozen BatchNorm into the convolution before it (in place; for serving).

    A conv+BN pair becomes one conv with a bias and the BN's activation alone: a third fewer
    ops per block, which is what small per-task batches of mixed requests pay for. Outputs
    agree with the unfolded module to float rounding (~1e-6). Only for eval mode: BatchNorm
    statistics must be the running ones."""
    from timm.layers import BatchNormAct2d
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    pairs = _bn_pairs()
    for module in list(component.modules()):
        for conv_name, bn_name in pairs.get(type(module), ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None):
                continue
            if conv.training or bn.training:
                raise ValueError("fold_batchnorm needs a module in eval mode")
            setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
            rest = nn.Sequential(bn.drop, bn.act) if isinstance(bn, BatchNormAct2d) else nn.Identity()
            setattr(module, bn_name, rest.eval())
    return component.requires_grad_(False)
