"""Training-time convolution kernels agree with PyTorch's, forward and backward."""
import pytest
import torch
from torch import nn

from munet.evolver.fastconv import MAX_POSITIONS, small_map_convs


@pytest.mark.parametrize("channels,kernel,stride,padding,dilation,size", [
    (48, 5, 1, 2, 1, 2), (32, 3, 1, 1, 1, 4), (16, 3, 2, 1, 1, 4), (24, 3, 1, 2, 2, 3), (8, 5, 1, 2, 1, 8),
])
def test_depthwise_fast_path_matches_the_stock_layer_in_outputs_and_gradients(channels, kernel, stride, padding, dilation, size):
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, kernel, stride, padding, dilation, groups=channels, bias=False)
    x = torch.randn(6, channels, size, size, requires_grad=True)
    y = conv(x)
    g = torch.randn_like(y)
    y.backward(g)
    ref = (y.detach(), x.grad.clone(), conv.weight.grad.clone())
    x.grad, conv.weight.grad = None, None
    with small_map_convs([conv]) as patched:
        y2 = conv(x)
        y2.backward(g)
    assert patched == 1
    torch.testing.assert_close(y2.detach(), ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv.weight.grad, ref[2], atol=1e-5, rtol=1e-5)
    assert "forward" not in vars(conv), "the stock forward is back after the context"


def test_pointwise_fast_path_matches_and_large_maps_keep_the_stock_kernel():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 1, bias=True)
    for size in (2, int(MAX_POSITIONS ** 0.5) + 2):
        x = torch.randn(4, 16, size, size, requires_grad=True)
        ref = conv(x)
        with small_map_convs([conv]):
            out = conv(x)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
