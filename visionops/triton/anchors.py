"""Triton kernel of grid_anchors (math: visionops/reference/anchors.py), wrapped as ``visionops::triton_grid_anchors``.

One launch covers every level: each program takes BLOCK anchors of the first image, finds their level in a small
level table, and stores the anchors to every image. Computed in float32 (float64 for float64 output, as the C++
kernels), rounded once to the output dtype.
"""

from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from visionops import _registry as registry


@triton.jit
def _grid_anchors_kernel(
    cells_ptr,
    meta_ptr,
    strides_ptr,
    out_ptr,
    num_levels,
    total,
    num_images,
    offset,
    F64: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # meta: per level (start, width, cell_start, num_cells) as int64; strides: per level (sh, sw) as float64.
    pid = tl.program_id(0)
    idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = idx < total
    lvl = tl.zeros([BLOCK], dtype=tl.int64)
    for l in range(1, num_levels):
        start = tl.load(meta_ptr + 4 * l)
        lvl += (idx >= start).to(tl.int64)
    start = tl.load(meta_ptr + 4 * lvl, mask=valid, other=0)
    width = tl.load(meta_ptr + 4 * lvl + 1, mask=valid, other=1)
    cell_start = tl.load(meta_ptr + 4 * lvl + 2, mask=valid, other=0)
    num_cells = tl.load(meta_ptr + 4 * lvl + 3, mask=valid, other=1)
    sh = tl.load(strides_ptr + 2 * lvl, mask=valid, other=0.0)
    sw = tl.load(strides_ptr + 2 * lvl + 1, mask=valid, other=0.0)
    r = idx - start
    loc = r // num_cells
    a = r - loc * num_cells
    y = loc // width
    x = loc - y * width
    # Shifts are formed in float64 and rounded once, so integer strides give torchvision's exact values.
    if F64:
        sx = (x.to(tl.float64) + offset) * sw
        sy = (y.to(tl.float64) + offset) * sh
    else:
        sx = ((x.to(tl.float64) + offset) * sw).to(tl.float32)
        sy = ((y.to(tl.float64) + offset) * sh).to(tl.float32)
    c = cells_ptr + 4 * (cell_start + a)
    x1 = sx + tl.load(c, mask=valid, other=0.0)
    y1 = sy + tl.load(c + 1, mask=valid, other=0.0)
    x2 = sx + tl.load(c + 2, mask=valid, other=0.0)
    y2 = sy + tl.load(c + 3, mask=valid, other=0.0)
    ty = out_ptr.dtype.element_ty
    for i in range(num_images):
        o = out_ptr + 4 * (
            tl.cast(i, tl.int64) * total + idx
        )  # int64: images x anchors can pass 2^31 with total below it
        tl.store(o, x1.to(ty), mask=valid)
        tl.store(o + 1, y1.to(ty), mask=valid)
        tl.store(o + 2, x2.to(ty), mask=valid)
        tl.store(o + 3, y2.to(ty), mask=valid)


_BLOCK = 256


@registry.triton_op("grid_anchors")
def triton_grid_anchors(
    cell_anchors: Tensor,
    num_cell_anchors: List[int],
    grid_sizes: List[int],
    strides: List[float],
    offset: float,
    num_images: int,
    dtype: torch.dtype,
) -> Tensor:
    """Same contract as ``torch.ops.visionops.grid_anchors`` (see csrc/ops/anchors.cpp)."""
    want = torch.float64 if dtype == torch.float64 else torch.float32
    torch._check(cell_anchors.dtype == want, lambda: f"cell_anchors must be {want} for dtype {dtype}")
    torch._check(
        len(grid_sizes) == 2 * len(num_cell_anchors) == len(strides),
        lambda: "grid_sizes and strides need 2 entries per level",
    )
    meta, start, cell_start = [], 0, 0
    for l, a in enumerate(num_cell_anchors):
        h, w = grid_sizes[2 * l], grid_sizes[2 * l + 1]
        meta += [start, max(w, 1), cell_start, max(a, 1)]
        start += h * w * a
        cell_start += a
    torch._check(cell_start == cell_anchors.shape[0], lambda: "num_cell_anchors must sum to cell_anchors.shape[0]")
    out = torch.empty((num_images, start, 4), dtype=dtype, device=cell_anchors.device)
    if out.numel() == 0:
        return out
    dev = cell_anchors.device
    meta_t = torch.tensor(meta, dtype=torch.int64).to(dev)
    strides_t = torch.tensor(strides, dtype=torch.float64).to(dev)
    grid = (triton.cdiv(start, _BLOCK),)
    _grid_anchors_kernel[grid](
        cell_anchors.contiguous(),
        meta_t,
        strides_t,
        out,
        len(num_cell_anchors),
        start,
        num_images,
        float(offset),
        F64=dtype == torch.float64,
        BLOCK=_BLOCK,
    )
    return out


def compile_specs():
    """(kernel, signature, constexprs) of each kernel, for an ahead-of-time compile check (sm_90)."""
    sig = {
        "cells_ptr": "*fp32",
        "meta_ptr": "*i64",
        "strides_ptr": "*fp64",
        "out_ptr": "*fp32",
        "num_levels": "i32",
        "total": "i64",
        "num_images": "i32",
        "offset": "fp32",
        "F64": "constexpr",
        "BLOCK": "constexpr",
    }
    half = dict(sig, out_ptr="*fp16")
    return [
        (_grid_anchors_kernel, sig, {"F64": False, "BLOCK": _BLOCK}),
        (_grid_anchors_kernel, half, {"F64": False, "BLOCK": _BLOCK}),
    ]
