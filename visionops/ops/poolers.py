"""MultiScaleRoIAlign (FPN RoI pooling), as ``torchvision.ops.MultiScaleRoIAlign``.

Each box is assigned a pyramid level with torchvision's LevelMapper (FPN paper eq. 1, canonical size 224 at
level 4), then every box is pooled from its level by one kernel launch over all levels
(``visionops::multi_scale_roi_align``, or ``visionops::triton_multi_scale_roi_align`` with ``backend="triton"``;
backward likewise one launch), instead of torchvision's Python loop of a where/index/roi_align/index_put per level.
Gradients flow to the features only. ``backend="reference"``, and more than 8 levels, keep torchvision's loop.
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from visionops import _fuzz as fz
from visionops import _registry as registry
from visionops import reference
from visionops.ops._checks import ArgumentTypeError, ArgumentValueError, check_int, check_pair
from visionops.ops.roi import check_rois, roi_align

_MAX_LEVELS = registry.limit("roi_align_max_levels")  # levels one kernel launch takes (csrc/ops/common/roi_align.h)

__all__ = ["MultiScaleRoIAlign"]


def _infer_scale(feature: Tensor, original_size: Tuple[int, int]) -> float:
    """Power of two closest to feature size / image size (torchvision's rule, from the height)."""
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2 ** float(torch.tensor(approx).log2().round())


class LevelMapper:
    """Level of each box: floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps), clamped to
    [k_min, k_max], minus k_min."""

    def __init__(self, k_min: int, k_max: int, canonical_scale: int = 224, canonical_level: int = 4, eps: float = 1e-6):
        self.k_min, self.k_max = k_min, k_max
        self.s0, self.lvl0, self.eps = canonical_scale, canonical_level, eps

    def __call__(self, boxlists: List[Tensor]) -> Tensor:
        b = torch.cat(boxlists)
        if b.dtype in (torch.float16, torch.bfloat16):  # as torchvision's box_area: a float16 area overflows past 65504
            b = b.float()
        s = torch.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
        lvl = torch.floor(self.lvl0 + torch.log2(s / self.s0) + torch.tensor(self.eps, dtype=s.dtype))
        lvl = torch.clamp(lvl, min=self.k_min, max=self.k_max)
        # A box of NaN or negative area (inverted) has no level, as in torchvision (whose loop over levels then
        # leaves its output zero): -1 here, pooled as zeros by multi_scale_roi_align.
        lvl = torch.nan_to_num(lvl, nan=self.k_min - 1)
        return lvl.to(torch.int64) - self.k_min


def setup_scales(
    features: List[Tensor], image_shapes: List[Tuple[int, int]], canonical_scale: int = 224, canonical_level: int = 4
) -> Tuple[List[float], LevelMapper]:
    if not image_shapes:
        raise ArgumentValueError("image_shapes must contain at least one (height, width)")
    original = (max(s[0] for s in image_shapes), max(s[1] for s in image_shapes))
    scales = [_infer_scale(f, original) for f in features]
    lvl_min = -torch.log2(torch.tensor(scales[0], dtype=torch.float32)).item()
    lvl_max = -torch.log2(torch.tensor(scales[-1], dtype=torch.float32)).item()
    return scales, LevelMapper(int(lvl_min), int(lvl_max), canonical_scale, canonical_level)


def multi_scale_roi_align(
    features: List[Tensor],
    boxes: List[Tensor],
    output_size,
    sampling_ratio: int,
    scales: List[float],
    mapper: LevelMapper,
    *,
    backend: str = "auto",
) -> Tensor:
    """Pool each box of ``boxes`` (list of Tensor[L_i, 4], one per image) from its FPN level of ``features``
    (list of Tensor[N, C, H_l, W_l]). Returns Tensor[sum L_i, C, h, w] (aligned=False, as torchvision)."""
    if not features:
        raise ArgumentValueError("features must contain at least one feature map")
    if not isinstance(boxes, (list, tuple)):
        raise ArgumentTypeError(f"boxes must be a list of Tensor[L, 4] (one per image), got {type(boxes).__name__}")
    ph, pw = check_pair("output_size", output_size)
    sr = check_int("sampling_ratio", sampling_ratio)
    rois = check_rois(features[0], boxes, "multi_scale_roi_align")
    for i, f in enumerate(features[1:], 1):
        check_rois(f, rois, "multi_scale_roi_align")
        if f.shape[1] != features[0].shape[1] or f.dtype != features[0].dtype:
            raise ArgumentValueError(f"features[{i}] must have the channels and dtype of features[0]")
    if len(features) == 1:
        return roi_align(features[0], rois, (ph, pw), scales[0], sr, backend=backend)
    levels = mapper(list(boxes))
    # RoIs without a level (see LevelMapper) are pooled at level 0 from NaN coordinates: zeros on every backend,
    # without a device sync
    outside = (levels < 0) | (levels >= len(features))
    levels = torch.where(outside, 0, levels)
    rois = torch.cat([rois[:, :1], rois[:, 1:].masked_fill(outside[:, None], float("nan"))], 1)
    args = (list(features), rois, levels, [float(s) for s in scales], ph, pw, sr, False)
    if len(features) <= _MAX_LEVELS:
        return registry.dispatch("multi_scale_roi_align", backend, features[0].device)(*args)
    # more levels than one launch takes: torchvision's loop over levels, each through roi_align
    return reference.multi_scale_roi_align(*args, per_level=registry.dispatch("roi_align", backend, rois.device))


class MultiScaleRoIAlign(nn.Module):
    """torchvision.ops.MultiScaleRoIAlign: same constructor and ``forward(x, boxes, image_shapes)``.

    Args:
        featmap_names: keys of the feature maps of ``x`` to pool from (finest first).
        output_size: int or (h, w); sampling_ratio: as in :func:`visionops.roi_align`.
        canonical_scale, canonical_level: LevelMapper parameters (224, 4).
    """

    __annotations__ = {"scales": Optional[List[float]], "map_levels": Optional[LevelMapper]}

    def __init__(
        self,
        featmap_names: List[str],
        output_size,
        sampling_ratio: int,
        *,
        canonical_scale: int = 224,
        canonical_level: int = 4,
        backend: str = "auto",
    ):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales: Optional[List[float]] = None
        self.map_levels: Optional[LevelMapper] = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.backend = backend

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = [v for k, v in x.items() if k in self.featmap_names]
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        return multi_scale_roi_align(
            features, boxes, self.output_size, self.sampling_ratio, self.scales, self.map_levels, backend=self.backend
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
            f"sampling_ratio={self.sampling_ratio})"
        )


# ---- declaration: fake kernels, autograd to every level's features, Triton op checks -----------------------------


def _fake(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], pooled_height, pooled_width))


def _backward_fake(grad, rois, levels, scales, pooled_height, pooled_width, feature_shapes, sampling_ratio, aligned):
    return [grad.new_empty(feature_shapes[i : i + 4]) for i in range(0, len(feature_shapes), 4)]


def _setup(ctx, inputs, output):
    features, rois, levels, scales, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois, levels)
    ctx.args = (scales, ph, pw, [s for f in features for s in f.shape], sampling_ratio, aligned)


def _backward(backward_op, ctx, grad):
    rois, levels = ctx.saved_tensors
    grads = backward_op(grad, rois, levels, *ctx.args)
    return list(grads), None, None, None, None, None, None, None


def _check(features, rois, levels, scales, pooled_height, pooled_width, sampling_ratio, aligned) -> None:
    """Arguments of the Triton op, checked as the C++ kernels check theirs (ValueError naming the argument)."""
    op = "multi_scale_roi_align"
    if not 1 <= len(features) <= _MAX_LEVELS or len(scales) != len(features):
        raise ArgumentValueError(
            f"{op}: need 1 to {_MAX_LEVELS} feature levels and one spatial scale per level, got "
            f"{len(features)} levels and {len(scales)} scales"
        )
    for f in features:
        check_rois(f, rois, op)
        if f.shape[1] != features[0].shape[1] or f.dtype != features[0].dtype:
            raise ArgumentValueError(f"{op}: every feature level must have the channels and dtype of features[0]")
    if (
        levels.dim() != 1
        or levels.shape[0] != rois.shape[0]
        or levels.dtype != torch.int64
        or levels.device != rois.device
    ):
        raise ArgumentValueError(
            f"{op}: levels must be an int64 tensor of shape [K] on the rois' device, got "
            f"{levels.dtype} {list(levels.shape)} on {levels.device}"
        )


# ---- fuzz spec (tests/test_fuzz.py): the public form is the module -------------------------------------------------


def _pool_levels(x, boxes, image_shapes, output_size, sampling_ratio, *, backend="auto"):
    names = [k for k in x if k != "skip"] if isinstance(x, dict) else ["0"]
    return MultiScaleRoIAlign(names, output_size, sampling_ratio, backend=backend)(x, boxes, image_shapes)


def _multi_scale_draw(d: fz.Draw) -> fz.Call:
    n, c, dt, levels = d.ints(1, 2), d.ints(1, 2), fz.dtype(d), d.ints(1, 3 if d.small else 5)
    size = d.choice((16, 32) if d.small else (32, 64, 128))
    x = {
        str(l): fz.layout(d, fz.uniform(d, (n, c, max(1, size >> (l + 2)), max(1, size >> (l + 2))), dt))
        for l in range(levels)
    }
    x["skip"] = torch.zeros(1)  # a feature map not in featmap_names
    boxes = [fz.boxes(d, d.ints(0, 3 if d.small else 8), dt, scale=size) for _ in range(n)]
    # no finite huge boxes: the reference RoIAlign materialises every sample (up to 65536^2 per bin), and on Triton
    # see visionops/ops/roi.py
    boxes = [fz.specials(d, b, p=0.1, huge=False) for b in boxes]
    args = (x, boxes, [(size, size)] * n, d.choice((1, 2, (2, 3))), d.choice((-1, 0, 2)))
    mutations = [
        ("boxes", fz.TYPE, fz.arg(1, lambda d, b: d.choice((b[0], None)))),
        ("boxes[0]", fz.TYPE, fz.arg(1, lambda d, b: [b[0].int()] + b[1:])),
        ("boxes[0]", fz.VALUE, fz.arg(1, lambda d, b: [b[0][:, :3]] + b[1:])),
        ("image_shapes", fz.VALUE, fz.arg(2, lambda d, v: [])),
        ("output_size", fz.VALUE, fz.arg(3, lambda d, v: 0)),
        ("sampling_ratio", fz.TYPE, fz.arg(4, lambda d, v: 2.5)),
        ("features[1]", fz.VALUE, fz.arg(0, lambda d, x: {**x, "1": x["0"][:, :0].float()})),
    ]
    call = fz.mutate(d, fz.Call(args), mutations)
    if call.bad == "features[1]" and levels == 1:
        call.args = (dict(x, **{"1": x["0"][:, :0].float()}),) + args[1:]
    return call


registry.declare(
    registry.OpDef(
        "multi_scale_roi_align",
        reference.multi_scale_roi_align,
        _fake,
        triton="visionops.triton.roi",
        check=_check,
        backward=registry.Backward(_setup, _backward, _backward_fake),
        fuzz=fz.FuzzSpec(_multi_scale_draw, _pool_levels),
    )
)
