"""models: timm networks as components and back.

Owns the family adapters (ViT/DeiT, EfficientNet/MobileNet CNNs), residual adapters,
heads, image-size changes, assembling a path into a runnable module, and loading roots
(packaged offline weights, timm hub, local files). Knows nothing of SQL or storage.
"""
from . import efficientnet, vit  # noqa: F401  (register the families)
from .efficientnet import fold_batchnorm
from .family import adapter_name, adapters_of, default_arch, parse_name, skeleton
from .layers import ConvAdapter, TokenAdapter, zero_head
from .paths import Path, PathModel, assemble, count_params, preprocess, stages
from .registry import family_for
from .roots import decompose, load_root_model, map_lite0_keys

__all__ = [
    "Path", "PathModel", "assemble", "stages", "preprocess", "count_params", "family_for",
    "decompose", "load_root_model", "map_lite0_keys", "default_arch", "adapters_of",
    "adapter_name", "parse_name", "skeleton", "fold_batchnorm", "ConvAdapter", "TokenAdapter", "zero_head",
]
