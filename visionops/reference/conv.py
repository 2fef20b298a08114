"""Convolution (cross-correlation, as ``F.conv2d`` / ``F.conv3d``) in plain PyTorch: the math the kernels implement,
written as an explicit gather of sliding windows (im2col / vol2col) and one matrix product per group.

For input x [B, Cin, *S] (N spatial dims), weight w [Cout, Cin / G, *K], bias b [Cout] or None, stride s, symmetric
zero padding p and dilation d, with output size ``O_i = (S_i + 2 p_i - d_i (K_i - 1) - 1) // s_i + 1``::

    out[n, g * Cout/G + o, *u] = b[g * Cout/G + o]
        + sum_{c < Cin/G, *k < K} w[g * Cout/G + o, c, *k] * xpad[n, g * Cin/G + c, *(u * s + k * d)]

where xpad is x padded with p_i zeros on both sides of each spatial dim. Half inputs are accumulated in float32 and
rounded once; float64 stays float64 (the test oracle).
"""

import math
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["conv2d", "conv3d"]


def _out_format(t: Tensor) -> torch.memory_format:
    """channels_last(_3d) when ``t`` is channels-last and not also plainly contiguous, else contiguous: the rule every
    backend's output follows."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    if fmt is not None and t.is_contiguous(memory_format=fmt) and not t.is_contiguous():
        return fmt
    return torch.contiguous_format


def _windows(x: Tensor, kernel, stride, padding, dilation) -> Tensor:
    """x [B, C, *S] -> [B, C, *O, *K]: the input cell each kernel tap of each output position reads (im2col)."""
    n = len(kernel)
    pads = [p for p in reversed(padding) for _ in range(2)]  # F.pad wants the last dim first
    x = F.pad(x, pads)
    for i in range(n):
        span = dilation[i] * (kernel[i] - 1) + 1
        # a window of the dilated span moved by the stride, then every d-th cell of it: the kernel's taps
        x = x.unfold(2 + i, span, stride[i])[..., :: dilation[i]]
    return x


def _conv(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    n = input.dim() - 2
    acc = torch.promote_types(input.dtype, torch.float32)
    batch, cin = input.shape[:2]
    cout, kernel = weight.shape[0], list(weight.shape[2:])
    cols = _windows(input.to(acc), kernel, stride, padding, dilation)  # [B, Cin, *O, *K]
    out_size = list(cols.shape[2 : 2 + n])
    taps = math.prod(kernel)
    # [B, G, Cin/G, *O, *K] -> [B, G, *O, Cin/G * prod(K)]: one row of the im2col matrix per output position
    cols = cols.reshape(batch, groups, cin // groups, *out_size, taps)
    cols = cols.movedim(2, -2).reshape(batch, groups, math.prod(out_size), (cin // groups) * taps)
    w = weight.to(acc).reshape(groups, cout // groups, (cin // groups) * taps)
    out = torch.matmul(cols, w.transpose(1, 2).unsqueeze(0))  # [B, G, prod(O), Cout/G]
    out = out.transpose(2, 3).reshape(batch, cout, *out_size)
    if bias is not None:
        out = out + bias.to(acc).reshape(cout, *([1] * n))
    return out.to(input.dtype).contiguous(memory_format=_out_format(input))


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    """2-D convolution, the schema's signature: input [B, Cin, H, W], weight [Cout, Cin / groups, kH, kW]."""
    return _conv(input, weight, bias, stride, padding, dilation, groups)


def conv3d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
) -> Tensor:
    """3-D convolution, the schema's signature: input [B, Cin, D, H, W], weight [Cout, Cin / groups, kD, kH, kW]."""
    return _conv(input, weight, bias, stride, padding, dilation, groups)
