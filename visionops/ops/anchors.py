"""Anchor generation: cell_anchors, grid_anchors, AnchorGenerator, DefaultBoxGenerator (torchvision semantics).

Kernels: csrc/ops/{cpu,cuda}/anchors_kernel.*, visionops/triton/anchors.py; math: visionops/reference/anchors.py.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn, Tensor

from visionops import _fuzz as fz
from visionops import _registry as registry
from visionops import reference

__all__ = ["AnchorGenerator", "DefaultBoxGenerator", "cell_anchors", "grid_anchors"]


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_positive_list(name: str, values) -> List[float]:
    if isinstance(values, Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive numbers, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must contain positive finite numbers, got {v!r}")
        out.append(float(v))
    return out


def _as_pair(name: str, value) -> Tuple[float, float]:
    if isinstance(value, Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = (value, value)
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (h, w), got {value!r}")
    out = []
    for v in value:
        if isinstance(v, Tensor):
            v = v.item()
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{name} must hold non-negative finite numbers, got {value!r}")
        out.append(v)
    return out[0], out[1]


def cell_anchors(
    sizes: Sequence[float],
    aspect_ratios: Sequence[float],
    rounded: bool = True,
    *,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """Zero-centred anchors of one level: Tensor[len(aspect_ratios) * len(sizes), 4] as (x1, y1, x2, y2).

    Ratio-major, then size, as torchvision; aspect ratio = height / width. ``rounded=True`` rounds the corners to
    integers as torchvision does; ``rounded=False`` keeps them exact (detectron2's convention, same order as here).
    Computed in float32 (as torchvision) and cast to ``dtype``. Pure PyTorch: a few dozen numbers.
    """
    sizes = _check_positive_list("sizes", sizes)
    aspect_ratios = _check_positive_list("aspect_ratios", aspect_ratios)
    return reference.cell_anchors(sizes, aspect_ratios, rounded=bool(rounded), dtype=dtype, device=device)


def _grid_anchors_op(
    cells: Tensor,
    num_cells: List[int],
    grid: List[int],
    strides: List[float],
    offset: float,
    num_images: int,
    dtype: torch.dtype,
    backend: str,
) -> Tensor:
    return registry.dispatch("grid_anchors", backend, cells.device)(
        cells, num_cells, grid, strides, offset, num_images, dtype
    )


def grid_anchors(
    feature_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[Tuple[float, float]],
    cell_anchors: Sequence[Tensor],
    offset: float = 0.0,
    *,
    backend: str = "auto",
) -> Tensor:
    """Anchors of every level, in one kernel launch: Tensor[sum_l H_l * W_l * A_l, 4].

    Args:
        feature_sizes: per level (H, W) of the feature map.
        strides: per level (stride_h, stride_w) in pixels (numbers or 0-d tensors; one number means both).
        cell_anchors: per level Tensor[A_l, 4] of zero-centred anchors (see :func:`cell_anchors`), one dtype/device.
        offset: shifts the grid by offset * stride (detectron2 uses 0.0 or 0.5; torchvision 0.0).

    Returns:
        Tensor of the cells' dtype and device, in torchvision's order: level, row-major location, cell anchor.
        float16/bfloat16 anchors are computed in float32 and rounded once at the end.
    """
    if not isinstance(cell_anchors, (list, tuple)) or not all(isinstance(c, Tensor) for c in cell_anchors):
        raise TypeError("cell_anchors must be a list of tensors")
    if not (len(feature_sizes) == len(strides) == len(cell_anchors)):
        raise ValueError(
            f"feature_sizes, strides and cell_anchors must have one entry per level, got "
            f"{len(feature_sizes)}, {len(strides)} and {len(cell_anchors)}"
        )
    if len(cell_anchors) == 0:
        raise ValueError("cell_anchors must have at least one level")
    dtype, device = cell_anchors[0].dtype, cell_anchors[0].device
    for c in cell_anchors:
        if not c.is_floating_point() or c.dim() != 2 or c.shape[1] != 4:
            raise ValueError(f"cell_anchors must be floating tensors of shape [A, 4], got {c.dtype} {list(c.shape)}")
        if c.dtype != dtype or c.device != device:
            raise ValueError("cell_anchors must all have the same dtype and device")
    grid, flat_strides = [], []
    for l, (size, stride) in enumerate(zip(feature_sizes, strides)):
        grid += [int(v) for v in _as_pair(f"feature_sizes[{l}]", size)]
        flat_strides += [float(v) for v in _as_pair(f"strides[{l}]", stride)]
    offset = float(offset)
    cells = torch.cat([c.to(_opmath(dtype)) for c in cell_anchors])
    num_cells = [int(c.shape[0]) for c in cell_anchors]
    return _grid_anchors_op(cells, num_cells, grid, flat_strides, offset, 1, dtype, backend)[0]


class AnchorGenerator(nn.Module):
    """Drop-in for ``torchvision.models.detection.anchor_utils.AnchorGenerator``: same constructor, same anchors.

    ``forward(image_list, feature_maps)`` returns one Tensor[sum_l H_l*W_l*A_l, 4] per image. All levels and all
    images are written by one kernel launch: torchvision's strides come from the padded batch size, so every image
    has the same anchors, which are computed once and stored to each image's own (non-aliased) memory.

    The anchors are not cached across calls: the kernel is bound by writing its output, so a cache would save no more
    than the copy it would need to give each image its own tensor (only the small cell templates are kept on the
    device).
    """

    def __init__(self, sizes=((128, 256, 512),), aspect_ratios=((0.5, 1.0, 2.0),), *, backend: str = "auto"):
        super().__init__()
        if not isinstance(sizes, (list, tuple)) or len(sizes) == 0:
            raise ValueError(f"sizes must be a non-empty tuple (of tuples) of sizes, got {sizes!r}")
        if not isinstance(sizes[0], (list, tuple)):
            sizes = tuple((s,) for s in sizes)
        if not isinstance(aspect_ratios, (list, tuple)) or len(aspect_ratios) == 0:
            raise ValueError(f"aspect_ratios must be a non-empty tuple (of tuples), got {aspect_ratios!r}")
        if not isinstance(aspect_ratios[0], (list, tuple)):
            aspect_ratios = (aspect_ratios,) * len(sizes)
        if len(sizes) != len(aspect_ratios):
            raise ValueError(
                f"sizes and aspect_ratios must have one entry per feature map, got {len(sizes)} and "
                f"{len(aspect_ratios)}"
            )
        self.sizes = sizes
        self.aspect_ratios = aspect_ratios
        self.backend = backend
        self.cell_anchors = [cell_anchors(s, a) for s, a in zip(sizes, aspect_ratios)]
        self._cells_cache = {}  # (dtype, device) -> concatenated cells: saves a host-to-device copy per call

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:
        return cell_anchors(scales, aspect_ratios, dtype=dtype, device=device)

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device) -> None:
        self.cell_anchors = [c.to(dtype=dtype, device=device) for c in self.cell_anchors]

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def _cells(self, dtype: torch.dtype, device: torch.device) -> Tensor:
        # self.cell_anchors stays the source of truth, as in torchvision (users may assign their own); the
        # concatenated copy on the feature maps' device is rebuilt only when those tensors change.
        key = (_opmath(dtype), device)
        if torch.compiler.is_compiling():  # a traced graph captures the copy once; the stamp would be data-dependent
            return torch.cat([c.to(dtype=key[0]) for c in self.cell_anchors]).to(device)
        stamp = tuple((id(c), c._version, c.dtype, c.device) for c in self.cell_anchors)
        hit = self._cells_cache.get(key)
        if hit is None or hit[0] != stamp:
            base = torch.cat([c.to(dtype=key[0]) for c in self.cell_anchors]).to(device)
            hit = self._cells_cache[key] = (stamp, base)
        return hit[1]

    def grid_anchors(self, grid_sizes, strides) -> List[Tensor]:
        """Per level anchors, as torchvision's method (one launch; the levels are views of one tensor)."""
        dtype, device = self.cell_anchors[0].dtype, self.cell_anchors[0].device
        out = grid_anchors(grid_sizes, strides, [c.to(dtype) for c in self.cell_anchors], backend=self.backend)
        counts = [int(h) * int(w) * a for (h, w), a in zip(grid_sizes, self.num_anchors_per_location())]
        return list(out.to(device).split(counts))

    def forward(self, image_list, feature_maps: List[Tensor]) -> List[Tensor]:
        cells = self._cells(feature_maps[0].dtype, feature_maps[0].device) if feature_maps else None
        return anchors_for_images(self.cell_anchors, image_list, feature_maps, backend=self.backend, cells=cells)


def anchors_for_images(
    cell_anchors_per_level: List[Tensor],
    image_list,
    feature_maps: List[Tensor],
    *,
    backend: str = "auto",
    cells: Optional[Tensor] = None,
) -> List[Tensor]:
    """AnchorGenerator.forward as a function of the per-level cell anchors (also used to route torchvision's
    AnchorGenerator through visionops, see visionops.patch_torchvision). ``cells``: the concatenated cell anchors
    already in the feature maps' dtype/device, if the caller caches them."""
    if len(feature_maps) != len(cell_anchors_per_level):
        raise ValueError(
            f"got {len(feature_maps)} feature maps but the generator has {len(cell_anchors_per_level)} "
            f"levels (sizes / aspect_ratios need one entry per feature map)"
        )
    image_h, image_w = (int(v) for v in image_list.tensors.shape[-2:])
    dtype, device = feature_maps[0].dtype, feature_maps[0].device
    grid, strides = [], []
    for f in feature_maps:
        gh, gw = int(f.shape[-2]), int(f.shape[-1])
        grid += [gh, gw]
        # torchvision's integer stride; an empty level has no anchors, whatever its stride.
        strides += [float(image_h // gh) if gh else 0.0, float(image_w // gw) if gw else 0.0]
    num_cells = [int(c.shape[0]) for c in cell_anchors_per_level]
    if cells is None:
        cells = torch.cat([c.to(dtype=_opmath(dtype)) for c in cell_anchors_per_level]).to(device)
    num_images = len(image_list.image_sizes)
    out = _grid_anchors_op(cells, num_cells, grid, strides, 0.0, num_images, dtype, backend)
    return list(out.unbind(0))


class DefaultBoxGenerator(nn.Module):
    """Drop-in for torchvision's SSD ``DefaultBoxGenerator``: same arguments, same boxes (x1, y1, x2, y2) in pixels.

    Pure PyTorch (a handful of small tensor ops): the boxes are built once per call by broadcasting instead of
    torchvision's per-image repeat/concatenate, then each further image gets its own copy.
    """

    def __init__(
        self,
        aspect_ratios: List[List[float]],
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        scales: Optional[List[float]] = None,
        steps: Optional[List[int]] = None,
        clip: bool = True,
    ):
        super().__init__()
        if not isinstance(aspect_ratios, (list, tuple)) or len(aspect_ratios) == 0:
            raise ValueError(f"aspect_ratios must be a non-empty list of lists, got {aspect_ratios!r}")
        for r in aspect_ratios:
            if len(r):
                _check_positive_list("aspect_ratios", r)
        if steps is not None and len(aspect_ratios) != len(steps):
            raise ValueError("aspect_ratios and steps should have the same length")
        n = len(aspect_ratios)
        if scales is None:
            if n > 1:
                self.scales = [min_ratio + (max_ratio - min_ratio) * k / (n - 1.0) for k in range(n)] + [1.0]
            else:
                self.scales = [min_ratio, max_ratio]
        else:
            if len(scales) < n + 1:
                raise ValueError(f"scales must have len(aspect_ratios) + 1 = {n + 1} entries, got {len(scales)}")
            self.scales = scales
        self.aspect_ratios = aspect_ratios
        self.steps = steps
        self.clip = clip
        self._wh_pairs = self._generate_wh_pairs(n)

    def _generate_wh_pairs(self, num_outputs: int, dtype=torch.float32, device=torch.device("cpu")) -> List[Tensor]:
        pairs = []
        for k in range(num_outputs):
            s_k = self.scales[k]
            s_prime = math.sqrt(self.scales[k] * self.scales[k + 1])
            wh = [[s_k, s_k], [s_prime, s_prime]]
            for ar in self.aspect_ratios[k]:
                q = math.sqrt(ar)
                wh += [[s_k * q, s_k / q], [s_k / q, s_k * q]]
            pairs.append(torch.as_tensor(wh, dtype=dtype, device=device))
        return pairs

    def num_anchors_per_location(self) -> List[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(aspect_ratios={self.aspect_ratios}, clip={self.clip}, "
            f"scales={self.scales}, steps={self.steps})"
        )

    def _boxes(self, grid_sizes, image_size, dtype) -> Tensor:
        # Same float32 operations as torchvision (centres (i + 0.5) / f, then (c -/+ wh / 2) * image size).
        size = torch.tensor([image_size[1], image_size[0]])
        out = []
        for k, (fh, fw) in enumerate(grid_sizes):
            if self.steps is not None:
                xf, yf = image_size[1] / self.steps[k], image_size[0] / self.steps[k]
            else:
                yf, xf = fh, fw
            sx = ((torch.arange(0, fw) + 0.5) / xf).to(dtype)
            sy = ((torch.arange(0, fh) + 0.5) / yf).to(dtype)
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            # torchvision concatenates dtype centres with float32 sizes: the boxes come out in the promoted dtype.
            rt = torch.promote_types(dtype, torch.float32)
            centres = torch.stack((xx, yy), -1).reshape(-1, 1, 2).to(rt)
            wh = (self._wh_pairs[k].clamp(min=0, max=1) if self.clip else self._wh_pairs[k]).to(rt).unsqueeze(0)
            lo = ((centres - 0.5 * wh) * size).reshape(-1, 2)
            hi = ((centres + 0.5 * wh) * size).reshape(-1, 2)
            out.append(torch.cat((lo, hi), -1))
        return torch.cat(out)

    def forward(self, image_list, feature_maps: List[Tensor]) -> List[Tensor]:
        if len(feature_maps) != len(self.aspect_ratios):
            raise ValueError(
                f"got {len(feature_maps)} feature maps but aspect_ratios has {len(self.aspect_ratios)} levels"
            )
        grid_sizes = [tuple(int(v) for v in f.shape[-2:]) for f in feature_maps]
        image_size = [int(v) for v in image_list.tensors.shape[-2:]]
        dtype, device = feature_maps[0].dtype, feature_maps[0].device
        boxes = self._boxes(grid_sizes, image_size, dtype).to(device)
        n = len(image_list.image_sizes)
        if n <= 1:
            return [boxes] * n
        # One concatenation rather than n clones: each image gets a disjoint slice of one buffer, and a single
        # (serial) cat avoids n thread-pool hand-offs, which cost more than the copies themselves.
        return list(torch.cat([boxes] * n).split(boxes.shape[0]))


# ---- declaration: fake kernel (every backend) ----------------------------------------------------------------


def _grid_anchors_fake(cell_anchors, num_cell_anchors, grid_sizes, strides, offset, num_images, dtype):
    total = sum(grid_sizes[2 * l] * grid_sizes[2 * l + 1] * a for l, a in enumerate(num_cell_anchors))
    return cell_anchors.new_empty((num_images, total, 4), dtype=dtype)


def _grid_anchors_draw(d: fz.Draw) -> fz.Call:
    levels, dt = d.ints(1, 3), fz.dtype(d)
    sizes, strides, cells = [], [], []
    for _ in range(levels):
        h, w = d.ints(0, 3 if d.small else 9), d.ints(0, 3 if d.small else 9)
        if d.bool(0.1):  # a very large side with no anchors at all
            h, w = (0, 2**40) if d.bool() else (2**31, 0)
        sizes.append(d.choice(((h, w), [h, w], torch.tensor([h, w]))))
        strides.append(d.choice(((4.0, 8.0), 16, 0.0, (2.5, torch.tensor(3.0)))))
        cells.append(fz.layout(d, fz.boxes(d, d.ints(0, 4), dt, scale=64.0, weird=False) - 32))
    args = (sizes, strides, cells, d.choice((0.0, 0.5, -1.0)))
    mutations = [
        ("cell_anchors", fz.TYPE, fz.arg(2, lambda d, c: d.choice((c[0], [c[0].tolist()])))),
        ("cell_anchors", fz.VALUE, fz.arg(2, lambda d, c: [t.int() if i == 0 else t for i, t in enumerate(c)])),
        ("cell_anchors", fz.VALUE, fz.arg(2, lambda d, c: [t[:, :3] for t in c])),
        ("cell_anchors", fz.VALUE, fz.arg(2, lambda d, c: [c[0].double(), c[0].float()])),
        ("feature_sizes", fz.VALUE, fz.arg(0, lambda d, v: v + [(1, 1)])),
        ("feature_sizes", fz.VALUE, fz.arg(0, lambda d, v: [(-1, 2)] + v[1:])),
        ("feature_sizes", fz.VALUE, fz.arg(0, lambda d, v: [(1, 2, 3)] + v[1:])),
        ("strides", fz.VALUE, fz.arg(1, lambda d, v: [(d.choice((-4.0, math.nan, math.inf)), 4.0)] + v[1:])),
        ("strides", fz.VALUE, fz.arg(1, lambda d, v: [("4", 4)] + v[1:])),
    ]
    return fz.mutate(d, fz.Call(args), mutations)


registry.declare(
    registry.OpDef(
        "grid_anchors",
        reference.grid_anchors_op,
        _grid_anchors_fake,
        triton="visionops.triton.anchors",
        fuzz=fz.FuzzSpec(_grid_anchors_draw, grid_anchors),
    )
)
