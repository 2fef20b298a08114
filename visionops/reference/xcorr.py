"""SiamFC cross-correlation in plain PyTorch: the math the kernels implement, written as a sum over sliding windows
(``unfold``), independent of the grouped-convolution formulation the kernels are benchmarked against.

For exemplar features z [Bz, C, Hz, Wz] and search features x [B, C, Hx, Wx] (Bz == B, or Bz == 1 for one exemplar
against every search image), with Ho = Hx - Hz + 1 and Wo = Wx - Wz + 1::

    depthwise_xcorr(z, x)[b, c, u, v] = sum_{i < Hz, j < Wz} z[b', c, i, j] * x[b, c, u + i, v + j]
    xcorr(z, x, s)[b, 0, u, v]        = s * sum_c depthwise_xcorr(z, x)[b, c, u, v]

where b' = b (or 0 when Bz == 1). Half inputs are accumulated in float32, float64 in float64.
"""

import torch
from torch import Tensor

__all__ = ["xcorr", "depthwise_xcorr"]


def _windows(z: Tensor, x: Tensor):
    acc = torch.promote_types(x.dtype, torch.float32)
    hz, wz = z.shape[-2:]
    win = x.to(acc).unfold(2, hz, 1).unfold(3, wz, 1)  # [B, C, Ho, Wo, Hz, Wz]
    return win, z.to(acc)


def depthwise_xcorr(z: Tensor, x: Tensor) -> Tensor:
    win, zf = _windows(z, x)
    return torch.einsum("bcuvij,bcij->bcuv", win, zf.expand(x.shape[0], *z.shape[1:])).to(x.dtype)


def xcorr(z: Tensor, x: Tensor, out_scale: float = 1.0) -> Tensor:
    win, zf = _windows(z, x)
    out = torch.einsum("bcuvij,bcij->buv", win, zf.expand(x.shape[0], *z.shape[1:]))
    return (out * out_scale).unsqueeze(1).to(x.dtype)
