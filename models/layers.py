"""Small modules that a path adds to a decomposed root: heads, residual adapters, ViT tokens."""
from __future__ import annotations

import torch
from torch import nn


class PoolHead(nn.Module):
    """CNN head: global average pool then a linear classifier (timm's classifier -> `fc`)."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


class TokenHead(nn.Module):
    """ViT head: classify from the class token."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.fc = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x[:, 0])


def zero_head(head: nn.Module) -> nn.Module:
    # MUNET.md §7: timm's default init gives huge first logits on CNN roots and clipped
    # SGD then barely moves; a zero head starts at uniform predictions.
    nn.init.zeros_(head.fc.weight)
    nn.init.zeros_(head.fc.bias)
    return head


class ConvAdapter(nn.Module):
    """Residual bottleneck adapter for NCHW maps; output projection starts at zero."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.down = nn.Conv2d(channels, width, 1)
        self.act = nn.ReLU()
        self.up = nn.Conv2d(width, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class TokenAdapter(nn.Module):
    """Residual bottleneck adapter for (B, N, D) tokens; output projection starts at zero."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.down = nn.Linear(channels, width)
        self.act = nn.GELU()
        self.up = nn.Linear(width, channels)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(self.act(self.down(x)))


class ClsToken(nn.Module):
    """Prepends the learned class token."""

    def __init__(self, dim: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)


class PosEmbed(nn.Module):
    """Adds an absolute position embedding (class token position included) for one grid."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pos_embed


class Stem(nn.Sequential):
    """A root's input layers kept under timm's own attribute names."""
