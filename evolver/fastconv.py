"""Convolutions on tiny maps, as small matrix products, for training on CPU.

PyTorch's CPU backward of a depthwise convolution is slow on the small maps that cloned
top blocks see (2x2 at 64 px): ~24 ms per batch of 64 for a 5x5, 1152-channel layer,
most of a block's backward pass. On an HxW map each channel's convolution is a
(HW x HW) matrix built from its kernel taps; gathering those matrices and multiplying
takes a few milliseconds forward and backward; 1x1 convolutions run as one matrix
product over all pixels (the top-two-blocks training step: 220 -> ~110 ms per batch of 64
on one thread, both changes together). `small_map_convs(modules)` routes plain depthwise
and 1x1 `nn.Conv2d`s of the modules through these while a candidate trains, for inputs of
at most `MAX_POSITIONS` pixels; evaluation and serving use the stock layers. Outputs
agree with the stock layers within float rounding (tests/test_fastconv.py).
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import nn

MAX_POSITIONS = 16


@functools.lru_cache(maxsize=64)
def _tap_index(h: int, w: int, kh: int, kw: int, stride: tuple, padding: tuple, dilation: tuple):
    """For each (output position, input position): the kernel tap joining them, or -1."""
    ho = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    index = torch.full((ho * wo, h * w), -1, dtype=torch.long)
    for oy in range(ho):
        for ox in range(wo):
            for i in range(kh):
                for j in range(kw):
                    y, x = oy * stride[0] - padding[0] + i * dilation[0], ox * stride[1] - padding[1] + j * dilation[1]
                    if 0 <= y < h and 0 <= x < w:
                        index[oy * wo + ox, y * w + x] = i * kw + j
    # One-hot [taps, positions x positions]: building the matrices is a matmul, whose
    # backward is fast, rather than a gather, whose backward (a scatter-add) is not.
    onehot = F.one_hot(index.flatten() + 1, kh * kw + 1).T[1:].float()
    return onehot, ho, wo


def depthwise_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    kh, kw = conv.kernel_size
    onehot, ho, wo = _tap_index(h, w, kh, kw, tuple(conv.stride), tuple(conv.padding), tuple(conv.dilation))
    onehot = onehot.to(device=x.device, dtype=x.dtype)
    matrices = (conv.weight.reshape(c, kh * kw) @ onehot).reshape(c, ho * wo, h * w)
    # One multiply-add per input position over [b, c, out positions]: ~1.5x faster forward
    # and backward than broadcasting to [b, c, out, in] and summing.
    xs = x.reshape(b, c, h * w)
    out = xs[:, :, :1] * matrices[:, :, 0]
    for i in range(1, h * w):
        out = torch.addcmul(out, xs[:, :, i:i + 1], matrices[:, :, i])
    return out.reshape(b, c, ho, wo)


def pointwise_as_matmul(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    # Pixels as rows of one [b*h*w, c] matrix: forward and both gradients are single matrix
    # products, where a weight broadcast over the batch (matmul of [o, c] with [b, c, hw])
    # makes the weight gradient a batched product and a reduction (2x slower per step).
    b, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(b * h * w, c)
    out = F.linear(rows, conv.weight.reshape(conv.out_channels, c), conv.bias)
    return out.reshape(b, h, w, conv.out_channels).permute(0, 3, 1, 2)


def _is_plain_pointwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1
            and m.padding in ((0, 0), 0) and m.dilation == (1, 1))


def _is_plain_depthwise(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.groups == m.in_channels == m.out_channels and m.bias is None
            and m.padding_mode == "zeros" and isinstance(m.padding, tuple))


def _forward(small, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if x.shape[2] * x.shape[3] <= MAX_POSITIONS:
        return small(conv, x)
    return nn.Conv2d.forward(conv, x)


@contextlib.contextmanager
def small_map_convs(modules: list[nn.Module]):
    patched = []
    for module in modules:
        for conv in module.modules():
            small = (depthwise_as_matmul if _is_plain_depthwise(conv)
                     else pointwise_as_matmul if _is_plain_pointwise(conv) else None)
            if small is not None:
                conv.forward = functools.partial(_forward, small, conv)
                patched.append(conv)
    try:
        yield len(patched)
    finally:
        for conv in patched:
            del conv.forward  # back to the class's forward
