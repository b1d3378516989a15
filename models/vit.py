"""Vision Transformers (timm `vit_*`, `deit_*`): stem (patch embedding), cls_token,
pos_embed@<image size>, blocks, final_norm, head. A new image size gets its own position
embedding, resampled from the root's with timm's `resample_abs_pos_embed`.
"""
from __future__ import annotations

from timm.layers import resample_abs_pos_embed
from torch import nn

from .family import adapters_of, copy_of, parse_name, skeleton
from .layers import ClsToken, PosEmbed, TokenAdapter, TokenHead, zero_head
from .registry import register_family


@register_family("vit_", "deit_")
class ViTFamily:
    name = "vit"

    def describe(self, model: nn.Module) -> dict:
        unsupported = (
            getattr(model, "reg_token", None) is not None
            or getattr(model, "no_embed_class", False)
            or getattr(model, "global_pool", "token") != "token"
            or model.cls_token is None
            or not isinstance(model.norm_pre, nn.Identity)
            or not isinstance(model.fc_norm, nn.Identity)
        )
        if unsupported:
            raise ValueError("only class-token ViTs with a plain position embedding are supported")
        cfg = model.pretrained_cfg
        patch = model.patch_embed.patch_size
        return {
            "family": self.name,
            "depth": len(model.blocks),
            "embed_dim": int(model.embed_dim),
            "block_channels": [int(model.embed_dim)] * len(model.blocks),
            "removable": list(range(len(model.blocks))),
            "num_features": int(model.num_features),
            "patch_size": int(patch[0]),
            "image_size": int(model.patch_embed.img_size[0]),
            "mean": list(cfg["mean"]),
            "std": list(cfg["std"]),
        }

    def decompose(self, model: nn.Module, config: dict) -> list[tuple[str, dict, nn.Module]]:
        model.patch_embed.strict_img_size = False  # pos_embed@S decides the grid, not the stem
        cls = ClsToken(config["embed_dim"])
        cls.cls_token.data.copy_(model.cls_token.data)
        pos = PosEmbed(model.pos_embed.shape[1], config["embed_dim"])
        pos.pos_embed.data.copy_(model.pos_embed.data)
        head = TokenHead(config["num_features"], model.head.out_features)
        head.fc.load_state_dict(model.head.state_dict())
        parts = [("stem", {}, model.patch_embed), ("cls_token", {}, cls), (f"pos_embed@{config['image_size']}", {}, pos)]
        parts += [(f"blocks.{i}", {}, b) for i, b in enumerate(model.blocks)]
        parts += [("final_norm", {}, model.norm), ("head", {"num_classes": int(model.head.out_features)}, head)]
        return [(n, m, copy_of(mod)) for n, m, mod in parts]

    def layout(self, config: dict, arch: dict) -> list[tuple[str, dict]]:
        size = int(arch["image_size"])
        if size % config["patch_size"]:
            raise ValueError(f"image size {size} is not a multiple of the patch size {config['patch_size']}")
        adapters = adapters_of(arch)
        names: list[tuple[str, dict]] = [("stem", {}), ("cls_token", {}), (f"pos_embed@{size}", {})]
        for i in arch["blocks"]:
            if i in adapters:
                names.append((f"adapter@{i}/w{adapters[i]}", {"channels": config["embed_dim"], "width": adapters[i]}))
            names.append((f"blocks.{i}", {}))
        names += [("final_norm", {}), ("head", {"num_classes": int(arch["num_classes"])})]
        return names

    def build(self, config: dict, name: str, meta: dict) -> nn.Module:
        kind, index, width = parse_name(name)
        model = skeleton(config)
        if kind == "stem":
            stem = copy_of(model.patch_embed)
            stem.strict_img_size = False
            return stem
        if kind == "cls_token":
            return ClsToken(config["embed_dim"])
        if kind == "pos_embed":
            grid = index // config["patch_size"]
            return PosEmbed(1 + grid * grid, config["embed_dim"])
        if kind == "blocks":
            return copy_of(model.blocks[index])
        if kind == "final_norm":
            return copy_of(model.norm)
        if kind == "head":
            return zero_head(TokenHead(config["num_features"], meta["num_classes"]))
        if kind == "adapter":
            return TokenAdapter(config["embed_dim"], width)
        raise ValueError(f"{self.name} roots have no component named {name!r}")

    def resample_pos_embed(self, config: dict, source: PosEmbed, source_size: int, image_size: int) -> PosEmbed:
        """A position embedding for `image_size`, interpolated from one for `source_size`."""
        old, new = source_size // config["patch_size"], image_size // config["patch_size"]
        pos = PosEmbed(1 + new * new, config["embed_dim"])
        pos.pos_embed.data.copy_(
            resample_abs_pos_embed(source.pos_embed.data, new_size=[new, new], old_size=[old, old], num_prefix_tokens=1)
        )
        return pos
