"""Box coding: BoxCoder, decode_boxes (fused decode + clip, differentiable), encode_boxes, filter_boxes.

Same results as torchvision's detection ``BoxCoder``. Kernels: csrc/ops/{cpu,cuda}/box_coder_kernel.*,
visionops/triton/box_coder.py; math: visionops/reference/box_coder.py.
"""

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from visionops import _fuzz as fz
from visionops import _registry as registry
from visionops import reference
from visionops.ops._checks import check_boxes, check_number, check_same_device, check_same_length, check_tensor

__all__ = ["BoxCoder", "decode_boxes", "encode_boxes", "filter_boxes"]

DEFAULT_CLIP = math.log(1000.0 / 16)


def _check_weights(weights) -> List[float]:
    if isinstance(weights, Tensor):
        weights = weights.tolist()
    if not isinstance(weights, (list, tuple)) or len(weights) != 4:
        raise ValueError(f"weights must be 4 numbers (wx, wy, ww, wh), got {weights!r}")
    out = [check_number("weights", w) for w in weights]
    if any(w == 0 for w in out):
        raise ValueError(f"weights must be non-zero, got {weights!r}")
    return out


def _check_image_size(image_size) -> List[float]:
    if image_size is None:
        return []
    if isinstance(image_size, Tensor):
        image_size = image_size.tolist()
    if not isinstance(image_size, (list, tuple)) or len(image_size) != 2:
        raise ValueError(f"image_size must be None or (H, W), got {image_size!r}")
    hw = [check_number("image_size", v) for v in image_size]
    if any(not (v >= 0) for v in hw):
        raise ValueError(f"image_size must be non-negative, got {image_size!r}")
    return hw


def decode_boxes(
    deltas: Tensor,
    anchors: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    bbox_xform_clip: float = DEFAULT_CLIP,
    image_size: Optional[Tuple[int, int]] = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Decode box deltas against anchors in one pass, and clip to the image if ``image_size`` is given.

    Equal to torchvision's ``BoxCoder(weights, bbox_xform_clip).decode_single(deltas, anchors)``, followed by
    ``clip_boxes_to_image(boxes, image_size)`` when ``image_size=(H, W)``.

    Args:
        deltas: Tensor[N, 4*K] of (dx, dy, dw, dh) per class, floating point.
        anchors: Tensor[N, 4] of (x1, y1, x2, y2); cast to the dtype of ``deltas`` (as torchvision).
        weights: (wx, wy, ww, wh) dividing the deltas.
        bbox_xform_clip: dw and dh are clamped to at most this before ``exp``.
        image_size: None, or (H, W) to clamp x to [0, W] and y to [0, H].

    Returns:
        Tensor[N, 4*K] of (x1, y1, x2, y2) per class. Differentiable w.r.t. deltas and anchors; gradients pass the
        clamps as torch.clamp's do. float16/bfloat16 are computed in float32.
    """
    check_tensor("deltas", deltas, floating=True, dim=2)
    if deltas.shape[1] % 4 != 0:
        raise ValueError(f"deltas must have shape [N, 4*K], got {list(deltas.shape)}")
    check_tensor("anchors", anchors, floating=True, dim=2, last=4)
    check_same_length(("deltas", "anchors"), (deltas, anchors))
    check_same_device(("deltas", "anchors"), (deltas, anchors))
    w = _check_weights(weights)
    clip = check_number("bbox_xform_clip", bbox_xform_clip)
    size = _check_image_size(image_size)
    anchors = anchors.to(deltas.dtype)
    return registry.dispatch("decode_boxes", backend, deltas.device)(deltas, anchors, w, clip, size)


def encode_boxes(
    reference_boxes: Tensor,
    proposals: Tensor,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    *,
    backend: str = "auto",
) -> Tensor:
    """Regression targets of ``reference_boxes`` (ground truth) w.r.t. ``proposals``, as torchvision's
    ``encode_boxes``: Tensor[N, 4], Tensor[N, 4] -> Tensor[N, 4] of (dx, dy, dw, dh), in the reference boxes' dtype.

    Targets are labels: this op has no gradient (as in training, where torchvision's targets are constants).
    """
    check_boxes("reference_boxes", reference_boxes)
    check_boxes("proposals", proposals)
    check_same_length(("reference_boxes", "proposals"), (reference_boxes, proposals))
    check_same_device(("reference_boxes", "proposals"), (reference_boxes, proposals))
    w = _check_weights(weights)
    proposals = proposals.to(reference_boxes.dtype)
    return registry.dispatch("encode_boxes", backend, reference_boxes.device)(reference_boxes, proposals, w)


def filter_boxes(
    boxes: Tensor, scores: Tensor, score_threshold: float, min_size: float, *, backend: str = "auto"
) -> Tensor:
    """Indices (Tensor[K] int64, increasing) of the boxes with ``score >= score_threshold`` and both sides
    ``>= min_size``: torchvision RPN's ``remove_small_boxes`` + score filter in one pass.

    Args:
        boxes: Tensor[N, 4] of (x1, y1, x2, y2); scores: Tensor[N].
        score_threshold, min_size: rounded to the boxes' dtype and compared there (scores are cast to it), as
            torch compares a tensor with a Python number.
    """
    check_boxes("boxes", boxes)
    check_tensor("scores", scores, floating=True, dim=1)
    check_same_length(("boxes", "scores"), (boxes, scores))
    check_same_device(("boxes", "scores"), (boxes, scores))
    thr = check_number("score_threshold", score_threshold)
    min_size = check_number("min_size", min_size)
    return registry.dispatch("filter_boxes", backend, boxes.device)(boxes, scores, thr, min_size)


class BoxCoder:
    """Drop-in for ``torchvision.models.detection._utils.BoxCoder``: same methods, same results, one kernel each."""

    def __init__(
        self,
        weights: Tuple[float, float, float, float],
        bbox_xform_clip: float = DEFAULT_CLIP,
        *,
        backend: str = "auto",
    ) -> None:
        _check_weights(weights)
        check_number("bbox_xform_clip", bbox_xform_clip)
        self.weights = weights
        self.bbox_xform_clip = bbox_xform_clip
        self.backend = backend

    def encode(self, reference_boxes: List[Tensor], proposals: List[Tensor]) -> Tuple[Tensor, ...]:
        per_image = [len(b) for b in reference_boxes]
        targets = self.encode_single(torch.cat(reference_boxes, dim=0), torch.cat(proposals, dim=0))
        return targets.split(per_image, 0)

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        return encode_boxes(reference_boxes, proposals, self.weights, backend=self.backend)

    def decode(self, rel_codes: Tensor, boxes: List[Tensor]) -> Tensor:
        if not isinstance(boxes, (list, tuple)):
            raise TypeError("boxes must be a list or tuple of tensors")
        if not isinstance(rel_codes, Tensor):
            raise TypeError("rel_codes must be a torch.Tensor")
        box_sum = sum(int(b.size(0)) for b in boxes)
        if box_sum > 0:
            rel_codes = rel_codes.reshape(box_sum, -1)
        pred = self.decode_single(rel_codes, torch.cat(boxes, dim=0))
        return pred.reshape(box_sum, -1, 4) if box_sum > 0 else pred

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        return decode_boxes(rel_codes, boxes, self.weights, self.bbox_xform_clip, backend=self.backend)


# ---- declarations: fake kernels, autograd (every backend) -----------------------------------------------------


def _like_first(t, *args):
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _decode_setup(ctx, inputs, output):
    deltas, anchors, weights, clip, image_size = inputs
    ctx.save_for_backward(deltas, anchors)
    ctx.args = (weights, clip, image_size)


def _decode_backward(backward_op, ctx, grad):
    deltas, anchors = ctx.saved_tensors
    gd, ga = backward_op(grad, deltas, anchors, *ctx.args)
    return gd, ga, None, None, None


def _decode_backward_fake(grad, deltas, anchors, weights, bbox_xform_clip, image_size):
    return _like_first(deltas), _like_first(anchors)


def _filter_fake(boxes, scores, score_threshold, min_size):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


# ---- fuzz specs (tests/test_fuzz.py) -------------------------------------------------------------------------------

_WEIGHTS = ((1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (-1.0, 0.5, 2.0, 3.0))


def _decode_draw(d: fz.Draw) -> fz.Call:
    n, k, dt = d.ints(0, 4 if d.small else 32), d.ints(1, 3), fz.dtype(d)
    deltas = fz.specials(d, fz.uniform(d, (n, 4 * k), dt, -3, 3))
    half = dt in (torch.float16, torch.bfloat16)
    # anchors are cast to the deltas' dtype: mixed dtypes only where that cast is exact enough for the tolerance
    anchors = fz.boxes(d, n, dt if half else d.choice((torch.float64, torch.float32)), weird=not half)
    size = d.choice((None, (50, 70), (0, 0), [30.5, 1e9]))
    args = (fz.layout(d, deltas), fz.overlapping(d, fz.layout(d, anchors)), d.choice(_WEIGHTS))
    args += (d.choice((DEFAULT_CLIP, 0.0, 1.0, math.inf)), size)
    mutations = fz.tensor_mutations("deltas", 0) + fz.tensor_mutations("anchors", 1)
    mutations += [
        ("deltas", fz.VALUE, fz.arg(0, lambda d, t: torch.cat([t, t[:, :1]], 1))),
        ("anchors", fz.VALUE, fz.arg(1, lambda d, t: fz.fewer_rows(t))),
        ("anchors", fz.VALUE, fz.arg(1, lambda d, t: fz.last_dim(d, t))),
        ("weights", fz.VALUE, fz.arg(2, lambda d, w: d.choice(((1.0, 1.0, 0.0, 1.0), (1.0, 1.0, 1.0), "1111")))),
        ("weights", fz.TYPE, fz.arg(2, lambda d, w: (1.0, "1", 1.0, 1.0))),
        ("bbox_xform_clip", fz.TYPE, fz.arg(3, lambda d, v: "4")),
        ("image_size", fz.VALUE, fz.arg(4, lambda d, v: d.choice(((-1, 5), (5,), (math.nan, 3))))),
    ]
    return fz.mutate(d, fz.Call(args), mutations)


def _encode_draw(d: fz.Draw) -> fz.Call:
    n, dt = d.ints(0, 4 if d.small else 32), fz.dtype(d, half=False)
    # (huge only in float64: gw / pw overflows float32 for a 1e37-wide box, in torchvision's formula too)
    ref = fz.specials(d, fz.boxes(d, n, dt), huge=dt == torch.float64)
    proposals = fz.boxes(d, n, d.choice((dt, torch.float32)))
    args = (fz.layout(d, ref), fz.overlapping(d, fz.layout(d, proposals)), d.choice(_WEIGHTS))
    mutations = fz.tensor_mutations("reference_boxes", 0) + fz.tensor_mutations("proposals", 1)
    mutations += [
        ("proposals", fz.VALUE, fz.arg(1, lambda d, t: fz.fewer_rows(t))),
        ("reference_boxes", fz.VALUE, fz.arg(0, lambda d, t: fz.last_dim(d, t))),
        ("weights", fz.VALUE, fz.arg(2, lambda d, w: (0.0, 1.0, 1.0, 1.0))),
    ]
    return fz.mutate(d, fz.Call(args), mutations)


def _filter_draw(d: fz.Draw) -> fz.Call:
    n, dt = d.ints(0, 4 if d.small else 48), fz.dtype(d)
    b = fz.specials(d, fz.boxes(d, n, dt, scale=20.0))
    s = fz.specials(d, fz.uniform(d, (n,), dt, 0, 1))
    args = (fz.layout(d, b), fz.layout(d, s), d.choice((0.0, 0.5, -1.0, 0.3)), d.choice((0.0, 1.0, 5.5, -1.0)))
    mutations = fz.tensor_mutations("boxes", 0) + fz.tensor_mutations("scores", 1)
    mutations += [
        ("scores", fz.VALUE, fz.arg(1, lambda d, t: fz.fewer_rows(t))),
        ("score_threshold", fz.TYPE, fz.arg(2, lambda d, v: "0.5")),
        ("min_size", fz.TYPE, fz.arg(3, lambda d, v: None)),
    ]
    return fz.mutate(d, fz.Call(args), mutations)


_TRITON = "visionops.triton.box_coder"
registry.declare(
    registry.OpDef(
        "decode_boxes",
        reference.decode_boxes,
        _like_first,
        triton=_TRITON,
        backward=registry.Backward(_decode_setup, _decode_backward, _decode_backward_fake),
        fuzz=fz.FuzzSpec(_decode_draw, decode_boxes),
    )
)
registry.declare(
    registry.OpDef(
        "encode_boxes",
        reference.encode_boxes,
        _like_first,
        triton=_TRITON,
        fuzz=fz.FuzzSpec(_encode_draw, encode_boxes),
    )
)
registry.declare(
    registry.OpDef(
        "filter_boxes",
        reference.filter_boxes,
        _filter_fake,
        triton=_TRITON,
        fuzz=fz.FuzzSpec(_filter_draw, filter_boxes, exact=True),
    )
)
