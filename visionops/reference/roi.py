"""Reference RoIAlign / RoIPool (pure PyTorch, differentiable in ``input``). Kernels cite these formulas.

RoIs are rows (batch index, x1, y1, x2, y2) in image coordinates; the batch index is truncated towards zero like
torchvision's ``int`` cast. Everything is evaluated in float32 for half inputs (float64 stays float64).

RoIAlign (``aligned`` shifts the RoI by half a cell, ``offset = 0.5``)::

    start = x1 * scale - offset,  size = (x2 - x1) * scale  (at least 1 when not aligned)
    bin = size / pooled,  grid = sampling_ratio if > 0 else ceil(size / pooled)  (0 if <= 0 or not finite,
        at most 2^16)
    sample i of bin p: start + p * bin + (i + 0.5) * bin / grid
    a sample outside [-1, H] x [-1, W] (or NaN) contributes 0; otherwise it is clamped to >= 0, lo = floor,
    hi = lo + 1 (both H - 1, and the sample moved onto H - 1, past the last row) and interpolated bilinearly;
    out = sum of samples / max(grid_h * grid_w, 1)

RoIPool::

    start = round(x1 * scale), size = max(round(x2 * scale) - start + 1, 1), bin = size / pooled
    bin p covers cells [floor(p * bin), ceil((p + 1) * bin)) + start, clipped to the map
    out = 0 for an empty bin (or a RoI with a NaN coordinate), else max(-FLT_MAX, values), NaN values ignored;
    the gradient goes to the first cell (row-major) holding a strictly larger value than all before it.
"""

import math
from typing import Callable, List

import torch
from torch import Tensor

from visionops import _registry as registry

_FLT_MAX = 3.4028234663852886e38
_MAX_GRID = registry.limit("roi_align_max_grid")  # adaptive grid cap per axis (csrc/ops/common/roi_align.h)


def _opmath(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _div(a: Tensor, b) -> Tensor:
    """a / b rounded once on every device. (On CUDA, ``tensor / python_number`` is computed as ``a * (1 / b)``,
    an ulp off: enough to move a RoIPool bin edge across a cell, e.g. 5 * (3 * 0.2) = 3.0000000000000004.)"""
    return a / torch.tensor(b, dtype=a.dtype, device=a.device)


def _batch_index(v: float, batch: int, k: int) -> int:
    b = int(v) if math.isfinite(v) else -1
    if not 0 <= b < batch:
        raise IndexError(f"rois[{k}, 0] (batch index) must be in [0, {batch}), got {b}")
    return b


def _grid(sampling_ratio: int, size: Tensor, pooled: int) -> int:
    if sampling_ratio > 0:
        return sampling_ratio
    q = float(_div(size, pooled))
    if not math.isfinite(q):  # NaN or infinite RoI: no samples
        return 0
    return min(max(math.ceil(q), 0), _MAX_GRID)


def _axis_taps(v: Tensor, size: int):
    """Bilinear taps along one axis: (lo, hi, w_lo, w_hi, valid) for sample coordinates v."""
    valid = (v >= -1) & (v <= size)  # NaN compares false: invalid
    v = torch.where(valid, v.clamp(min=0), torch.zeros_like(v))
    lo = v.floor().long()  # v >= 0 here, so floor == the int cast
    last = lo >= size - 1
    lo = torch.where(last, torch.full_like(lo, size - 1), lo)
    hi = torch.where(last, lo, lo + 1)
    v = torch.where(last, lo.to(v.dtype), v)
    w_hi = v - lo.to(v.dtype)
    return lo, hi, 1 - w_hi, w_hi, valid


def roi_align(
    input: Tensor,
    rois: Tensor,
    spatial_scale: float,
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """Tensor[N, C, H, W], Tensor[K, 5] -> Tensor[K, C, pooled_height, pooled_width] (input's dtype)."""
    x = _opmath(input)
    r = rois.detach().to(x.dtype)
    B, C, H, W = x.shape
    scale = torch.tensor(spatial_scale, dtype=x.dtype, device=x.device)
    offset = 0.5 if aligned else 0.0
    outs = []
    for k in range(r.shape[0]):
        b = _batch_index(float(r[k, 0]), B, k)
        sw, sh, ew, eh = (r[k, i] * scale - offset for i in (1, 2, 3, 4))
        rw, rh = ew - sw, eh - sh
        if not aligned:
            rw, rh = torch.where(rw < 1, torch.ones_like(rw), rw), torch.where(rh < 1, torch.ones_like(rh), rh)
        bh, bw = _div(rh, pooled_height), _div(rw, pooled_width)
        gh, gw = _grid(sampling_ratio, rh, pooled_height), _grid(sampling_ratio, rw, pooled_width)
        count = max(gh * gw, 1)
        if gh == 0 or gw == 0:
            outs.append(x.new_zeros(C, pooled_height, pooled_width) + 0 * x[b].sum())
            continue
        ph = torch.arange(pooled_height, dtype=x.dtype, device=x.device)[:, None]
        iy = torch.arange(gh, dtype=x.dtype, device=x.device)[None, :]
        ys = (sh + ph * bh + _div((iy + 0.5) * bh, gh)).flatten()  # [PH * gh]
        pw = torch.arange(pooled_width, dtype=x.dtype, device=x.device)[:, None]
        ix = torch.arange(gw, dtype=x.dtype, device=x.device)[None, :]
        xs = (sw + pw * bw + _div((ix + 0.5) * bw, gw)).flatten()  # [PW * gw]
        ylo, yhi, hy, ly, vy = _axis_taps(ys, H)
        xlo, xhi, hx, lx, vx = _axis_taps(xs, W)
        f = x[b]
        valid = (vy[:, None] & vx[None, :]).to(x.dtype)

        def tap(yi, xi, wy, wx):
            return f[:, yi[:, None], xi[None, :]] * (wy[:, None] * wx[None, :] * valid)

        v = tap(ylo, xlo, hy, hx) + tap(ylo, xhi, hy, lx) + tap(yhi, xlo, ly, hx) + tap(yhi, xhi, ly, lx)
        v = v.reshape(C, pooled_height, gh, pooled_width, gw).sum((2, 4))
        v = _div(v, count)
        outs.append(v)
    if not outs:  # still part of the graph, so an empty result can be backpropagated
        return (x.new_zeros(0, C, pooled_height, pooled_width) + 0 * x.sum()).to(input.dtype)
    return torch.stack(outs).to(input.dtype)


def multi_scale_roi_align(
    features: List[Tensor],
    rois: Tensor,
    levels: Tensor,
    scales: List[float],
    pooled_height: int,
    pooled_width: int,
    sampling_ratio: int,
    aligned: bool,
    *,
    per_level: Callable = roi_align,
) -> Tensor:
    """RoI k pooled from ``features[levels[k]]`` at ``scales[levels[k]]``: torchvision's loop over the levels, each
    level's RoIs through ``per_level`` (a roi_align with the schema's signature)."""
    result = features[0].new_zeros((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))
    for level, (feature, scale) in enumerate(zip(features, scales)):
        idx = torch.where(levels == level)[0]
        result[idx] = per_level(feature, rois[idx], scale, pooled_height, pooled_width, sampling_ratio, aligned)
    return result


def roi_pool(input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int) -> Tensor:
    """Tensor[N, C, H, W], Tensor[K, 5] -> Tensor[K, C, pooled_height, pooled_width] (input's dtype)."""
    x = _opmath(input)
    r = rois.detach().to(x.dtype)
    B, C, H, W = x.shape
    scale = torch.tensor(spatial_scale, dtype=x.dtype, device=x.device)
    outs = []
    for k in range(r.shape[0]):
        b = _batch_index(float(r[k, 0]), B, k)
        c = [r[k, i] * scale for i in (1, 2, 3, 4)]
        if any(math.isnan(float(v)) for v in c):
            outs.append(x.new_zeros(C, pooled_height, pooled_width) + 0 * x[b].sum())
            continue
        lim = float(1 << 40)

        # C's round(): halves away from zero (torch.round rounds them to even)
        def cround(v):
            a = abs(float(v))
            return int(math.copysign(min(math.floor(a + 0.5), lim) if a < lim else lim, float(v)))

        x1, y1, x2, y2 = (cround(v) for v in c)
        bh = _div(torch.tensor(max(y2 - y1 + 1, 1), dtype=x.dtype, device=x.device), pooled_height)
        bw = _div(torch.tensor(max(x2 - x1 + 1, 1), dtype=x.dtype, device=x.device), pooled_width)

        def bounds(start, bin_, pooled, size):
            p = torch.arange(pooled, dtype=x.dtype, device=x.device)
            lo = (torch.floor(p * bin_).long() + start).clamp(0, size)
            hi = (torch.ceil((p + 1) * bin_).long() + start).clamp(0, size)
            return lo, hi

        hlo, hhi = bounds(y1, bh, pooled_height, H)
        wlo, whi = bounds(x1, bw, pooled_width, W)
        hh, ww = torch.arange(H, device=x.device), torch.arange(W, device=x.device)
        in_h = (hh[None, :] >= hlo[:, None]) & (hh[None, :] < hhi[:, None])  # [PH, H]
        in_w = (ww[None, :] >= wlo[:, None]) & (ww[None, :] < whi[:, None])  # [PW, W]
        mask = (in_h[:, None, :, None] & in_w[None, :, None, :]).reshape(pooled_height, pooled_width, H * W)
        f = x[b].reshape(C, 1, 1, H * W)
        cand = torch.where(mask & ~torch.isnan(f), f, torch.full_like(f, -math.inf))
        best, idx = cand.max(dim=-1)  # first maximum: the first strictly larger value
        val = torch.gather(f.expand(C, pooled_height, pooled_width, H * W), 3, idx[..., None])[..., 0]
        floor = torch.full_like(val, -_FLT_MAX)
        val = torch.where(best > -_FLT_MAX, val, floor)
        empty = ~mask.any(-1)
        outs.append(torch.where(empty, torch.zeros_like(val), val))
    if not outs:  # still part of the graph, so an empty result can be backpropagated
        return (x.new_zeros(0, C, pooled_height, pooled_width) + 0 * x.sum()).to(input.dtype)
    return torch.stack(outs).to(input.dtype)
