"""Reference anchor generation (pure PyTorch). Kernels cite these formulas.

Cell anchors (torchvision's ``AnchorGenerator.generate_anchors``), for aspect ratio r = height / width and size s,
ratio-major then size, computed in float32::

    h_r = sqrt(r),  w_r = 1 / h_r,  ws = w_r * s,  hs = h_r * s
    cell = (-ws, -hs, ws, hs) / 2            rounded to integers in torchvision's convention

Grid anchors of level l with grid (H, W), stride (sh, sw) and offset o, in the order (level, y, x, cell)::

    anchor[y, x, a] = (sx + cell[a, 0], sy + cell[a, 1], sx + cell[a, 2], sy + cell[a, 3])
    sx = (x + o) * sw,  sy = (y + o) * sh    (formed in float64, rounded once to the compute dtype)

The compute dtype is float32 for float16/bfloat16/float32 cells and float64 for float64; the result is cast to the
cells' dtype.
"""

from typing import List, Sequence, Tuple

import torch
from torch import Tensor


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cell_anchors(
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    rounded: bool = True,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    scales = torch.as_tensor(sizes, dtype=torch.float32, device=device)
    ratios = torch.as_tensor(aspect_ratios, dtype=torch.float32, device=device)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
    base = torch.stack([-ws, -hs, ws, hs], dim=1) / 2
    return (base.round() if rounded else base).to(dtype)


def grid_anchors(
    feature_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[Tuple[float, float]],
    cell_anchors: Sequence[Tensor],
    offset: float = 0.0,
) -> Tensor:
    out: List[Tensor] = []
    dtype = cell_anchors[0].dtype if len(cell_anchors) else torch.float32
    device = cell_anchors[0].device if len(cell_anchors) else None
    op = _opmath(dtype)
    for (h, w), (sh, sw), cells in zip(feature_sizes, strides, cell_anchors):
        if h * w * cells.shape[0] == 0:  # no anchors: and no grid (one side may be huge with the other 0)
            continue
        sx = ((torch.arange(w, dtype=torch.float64, device=device) + offset) * sw).to(op)
        sy = ((torch.arange(h, dtype=torch.float64, device=device) + offset) * sh).to(op)
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        out.append((shifts + cells.to(op).reshape(1, -1, 4)).reshape(-1, 4))
    if not out:
        return torch.empty(0, 4, dtype=dtype, device=device)
    return torch.cat(out).to(dtype)


def grid_anchors_op(
    cell_anchors: Tensor,
    num_cell_anchors: List[int],
    grid_sizes: List[int],
    strides: List[float],
    offset: float,
    num_images: int,
    dtype: torch.dtype,
) -> Tensor:
    """``visionops::grid_anchors``'s schema: the levels' cells concatenated, (H, W) and (sh, sw) flattened per level,
    the same anchors for each of ``num_images`` images: Tensor[num_images, total, 4] of ``dtype``."""
    levels, start = [], 0
    for a in num_cell_anchors:
        levels.append(cell_anchors[start : start + a])
        start += a
    one = grid_anchors(
        list(zip(grid_sizes[0::2], grid_sizes[1::2])), list(zip(strides[0::2], strides[1::2])), levels, offset
    ).to(dtype)
    return one.unsqueeze(0).repeat(num_images, 1, 1)
