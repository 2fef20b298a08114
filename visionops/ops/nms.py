"""NMS family: nms, batched_nms, box_iou (torchvision.ops semantics); soft_nms, batched_soft_nms (mmcv's soft_nms).

Kernels: csrc/ops/{cpu,cuda}/nms_kernel.*, csrc/ops/{cpu,cuda}/soft_nms_kernel.*, visionops/triton/nms.py,
visionops/triton/soft_nms.py; math: visionops/reference/nms.py.
"""

import functools
import math
from typing import Tuple

import torch
from torch import Tensor

from visionops import _fuzz as fz
from visionops import _registry as registry
from visionops import reference
from visionops.reference.nms import SOFT_NMS_METHODS
from visionops.reference.nms import multiclass_nms as multiclass_nms_reference
from visionops.ops._checks import (
    ArgumentTypeError,
    ArgumentValueError,
    check_boxes,
    check_number,
    check_same_device,
    check_same_length,
    check_tensor,
)
from visionops.ops.boxes import _FORMATS, box_convert

__all__ = ["nms", "batched_nms", "box_iou", "soft_nms", "batched_soft_nms"]


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, backend: str = "auto") -> Tensor:
    """Greedy non-maximum suppression, as ``torchvision.ops.nms``.

    Args:
        boxes: Tensor[N, 4] of (x1, y1, x2, y2), floating point (float16/bfloat16 are compared in float32).
        scores: Tensor[N] of scores.
        iou_threshold: a box is dropped when its IoU with a higher-scored kept box is > iou_threshold.
        backend: "auto", "cpp", "triton" or "reference" (see ``visionops._registry``).

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score (ties keep their input order).
    """
    check_boxes("boxes", boxes)
    check_tensor("scores", scores, floating=True, dim=1)
    check_same_length(("boxes", "scores"), (boxes, scores))
    check_same_device(("boxes", "scores"), (boxes, scores))
    thr = check_number("iou_threshold", iou_threshold)
    return registry.dispatch("nms", backend, boxes.device)(boxes, scores, thr)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *, backend: str = "auto") -> Tensor:
    """NMS independently per category, as ``torchvision.ops.batched_nms``.

    Boxes of different ``idxs`` never suppress each other. Unlike torchvision's coordinate-offset trick this is exact
    for any coordinates and class ids, and uses no N x N memory across classes.

    Args:
        boxes: Tensor[N, 4]; scores: Tensor[N]; idxs: Tensor[N] integer category of each box.
    Returns:
        Tensor[K] int64 indices of kept boxes, by decreasing score. Empty ``boxes`` return an empty result at once,
        whatever the other arguments are (``None`` included), as torchvision.
    """
    # (not while compiling: the number of boxes is often data dependent there, and the kernels handle none)
    if isinstance(boxes, Tensor) and not torch.compiler.is_compiling() and boxes.numel() == 0:
        return torch.empty((0,), dtype=torch.int64, device=boxes.device)
    check_boxes("boxes", boxes)
    check_tensor("scores", scores, floating=True, dim=1)
    check_tensor("idxs", idxs, integer=True, dim=1)
    check_same_length(("boxes", "scores", "idxs"), (boxes, scores, idxs))
    check_same_device(("boxes", "scores", "idxs"), (boxes, scores, idxs))
    thr = check_number("iou_threshold", iou_threshold)
    return registry.dispatch("batched_nms", backend, boxes.device)(boxes, scores, idxs, thr)


def box_iou(boxes1: Tensor, boxes2: Tensor, fmt: str = "xyxy", *, backend: str = "auto") -> Tensor:
    """Pairwise IoU, as ``torchvision.ops.box_iou``: Tensor[..., N, 4], Tensor[..., M, 4] -> Tensor[..., N, M].

    ``fmt`` is "xyxy", "xywh" or "cxcywh" (other formats are converted to xyxy first, so results may differ from
    torchvision's in the last bits). Leading batch dimensions broadcast. Both inputs must have the same floating
    dtype (``patch_torchvision()``'s ``box_iou`` also takes integer and mixed dtypes, as torchvision). Half inputs
    are computed in float32 and returned in their dtype. Differentiable with respect to both inputs.
    """
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        check_tensor(name, b, floating=True)
        if b.dim() < 2 or b.shape[-1] != 4:
            raise ArgumentValueError(f"{name} must have shape [..., N, 4], got {list(b.shape)}")
    check_same_device(("boxes1", "boxes2"), (boxes1, boxes2))
    if boxes1.dtype != boxes2.dtype:
        raise ArgumentTypeError(f"boxes1 and boxes2 must have the same dtype, got {boxes1.dtype} and {boxes2.dtype}")
    if fmt not in _FORMATS:
        raise ArgumentValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
    if fmt != "xyxy":
        half = boxes1.dtype in (torch.float16, torch.bfloat16)
        if half:  # convert where the IoU is computed (float32): cx + w / 2 can overflow the half dtype
            return box_iou(boxes1.float(), boxes2.float(), fmt, backend=backend).to(boxes1.dtype)
        boxes1, boxes2 = box_convert(boxes1, fmt, "xyxy"), box_convert(boxes2, fmt, "xyxy")
    op = registry.dispatch("box_iou", backend, boxes1.device)
    if boxes1.dim() == 2 and boxes2.dim() == 2:
        return op(boxes1, boxes2)
    try:
        batch = torch.broadcast_shapes(boxes1.shape[:-2], boxes2.shape[:-2])
    except RuntimeError:
        raise ArgumentValueError(
            f"boxes1 and boxes2 must have broadcastable batch dimensions, got {list(boxes1.shape)} and "
            f"{list(boxes2.shape)}"
        ) from None
    n, m, size = boxes1.shape[-2], boxes2.shape[-2], batch.numel()
    if size == 0:
        return boxes1.new_empty((*batch, n, m))
    flat1 = boxes1.expand(*batch, n, 4).reshape(size, n, 4)
    flat2 = boxes2.expand(*batch, m, 4).reshape(size, m, 4)
    return torch.stack([op(a, b) for a, b in zip(flat1.unbind(0), flat2.unbind(0))]).reshape(*batch, n, m)


def _soft_nms_args(op, boxes, scores, idxs, iou_threshold, sigma, score_threshold, method):
    """The checked schema arguments after boxes, scores (and idxs): (iou_threshold, sigma, score_threshold, method)."""
    check_boxes("boxes", boxes)
    check_tensor("scores", scores, floating=True, dim=1)
    names, tensors = ("boxes", "scores"), (boxes, scores)
    if idxs is not None:
        check_tensor("idxs", idxs, integer=True, dim=1)
        names, tensors = names + ("idxs",), tensors + (idxs,)
    check_same_length(names, tensors)
    check_same_device(names, tensors)
    thr = check_number("iou_threshold", iou_threshold)
    sig = check_number("sigma", sigma)
    if not sig > 0:
        raise ArgumentValueError(f"{op}: sigma must be > 0, got {sigma}")
    score_thr = check_number("score_threshold", score_threshold)
    if not isinstance(method, str):
        raise ArgumentTypeError(f"{op}: method must be a string, one of {sorted(SOFT_NMS_METHODS)}, got {method!r}")
    if method not in SOFT_NMS_METHODS:
        raise ArgumentValueError(f"{op}: method must be one of {sorted(SOFT_NMS_METHODS)}, got {method!r}")
    return thr, sig, score_thr, SOFT_NMS_METHODS[method]


def soft_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "gaussian",
    *,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al. 2017): mmcv's ``soft_nms`` with ``offset=0`` (whose default method is "linear"; here
    "gaussian", the paper's recommendation).

    Repeatedly keeps the alive box with the highest current score (ties: the lowest input index) and multiplies the
    score of every other alive box by a weight of its IoU with the kept box::

        "gaussian"  exp(-iou**2 / sigma)                       (iou_threshold unused)
        "linear"    1 - iou where iou > iou_threshold, else 1
        "hard"      0 where iou > iou_threshold, else 1         (plain NMS: visionops.nms's kept set)

    A box is alive while its score is >= score_threshold: boxes scored below it from the start are never kept
    (mmcv keeps its top box even then), and a box decayed below it is dropped. IoU is computed in the boxes'
    precision (float32 for float32/float16/bfloat16), the weights, scores and comparisons in float64; a box is
    decayed where iou > iou_threshold (mmcv: >=; they differ only at exactly the threshold).

    Args:
        boxes: Tensor[N, 4] of (x1, y1, x2, y2), floating point.
        scores: Tensor[N], floating point.
        iou_threshold, sigma (> 0), score_threshold: numbers, as above.
        method: "gaussian", "linear" or "hard".
        backend: "auto", "cpp", "triton" or "reference" (see ``visionops._registry``).

    Returns:
        (keep, new_scores): Tensor[K] int64 indices of the kept boxes in selection order (so by decreasing new score),
        and Tensor[K] their scores when selected, in the scores' dtype. Not differentiable.
    """
    args = _soft_nms_args("soft_nms", boxes, scores, None, iou_threshold, sigma, score_threshold, method)
    return registry.dispatch("soft_nms", backend, boxes.device)(boxes, scores, *args)


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float = 0.3,
    sigma: float = 0.5,
    score_threshold: float = 0.001,
    method: str = "gaussian",
    *,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Soft-NMS independently per category (:func:`soft_nms` per value of ``idxs``): boxes of different ``idxs``
    never decay each other.

    Returns:
        (keep, new_scores) of all categories by decreasing new score (compared in float64); ties by the rank of the
        selection within its category, then by category (ascending ``idxs``).
    """
    args = _soft_nms_args("batched_soft_nms", boxes, scores, idxs, iou_threshold, sigma, score_threshold, method)
    return registry.dispatch("batched_soft_nms", backend, boxes.device)(boxes, scores, idxs, *args)


# ---- declarations: fake kernels, autograd, autocast (every backend) -------------------------------------------


def _keep_fake(boxes, scores, *args):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


def _box_iou_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _box_iou_backward(backward_op, ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    return backward_op(grad.contiguous(), boxes1, boxes2)


# ---- fuzz specs (tests/test_fuzz.py) -------------------------------------------------------------------------------

# outside [0, 1] (and NaN: nothing is suppressed) is allowed, as torchvision
_THRESHOLDS = (0.0, 0.3137, 0.5113, 0.7071, 0.9, 1.0, -0.25, 1.5, math.nan, math.inf)


def _selection_inputs(d: fz.Draw):
    """Boxes on an integer grid (some NaN/Inf), distinct scores: selections that the reference decides exactly."""
    n, dt = d.ints(0, 6 if d.small else 48), fz.dtype(d)
    b = fz.specials(d, fz.grid_boxes(d, n, dt), p=0.1)
    s = fz.specials(d, fz.distinct_scores(d, n, dt), p=0.1, huge=False)  # NaN ranks first, as torch.sort
    return fz.overlapping(d, fz.layout(d, b)), fz.layout(d, s), dt


def _selection_same(got, exp, call) -> bool:
    """Tie-tolerant: a differing selection is ill-posed when an IoU sits at a threshold (or two scores tie)."""
    boxes, scores = call.args[0], call.args[1]
    if boxes.dim() == 3:  # multiclass_nms: per image
        return any(
            _selection_same(None, None, fz.Call((b, s.flatten()) + call.args[2:])) for b, s in zip(boxes, scores)
        )
    iou = fz.iou64(boxes, boxes)
    thrs = [v for v in call.args[2:] if isinstance(v, float)] + [call.kwargs.get("score_threshold", 0.0)]
    return fz.near(iou, thrs) or fz.near(scores, [])


_ROWS = [("scores", fz.VALUE, fz.arg(1, lambda d, t: fz.fewer_rows(t)))]
_BOXES = fz.tensor_mutations("boxes", 0) + [("boxes", fz.VALUE, fz.arg(0, lambda d, t: fz.last_dim(d, t)))]
_THR = [("iou_threshold", fz.TYPE, fz.arg(2, lambda d, v: d.choice(("0.5", None, [0.5]))))]


def _nms_draw(d: fz.Draw) -> fz.Call:
    b, s, _ = _selection_inputs(d)
    valid = fz.Call((b, s, d.choice(_THRESHOLDS)))
    return fz.mutate(d, valid, _BOXES + fz.tensor_mutations("scores", 1) + _ROWS + _THR)


def _idxs(d: fz.Draw, n: int):
    return fz.layout(d, torch.randint(-3, 3, (n,), generator=fz.gen(d)) * d.choice((1, 2**40)))


def _batched_nms_draw(d: fz.Draw) -> fz.Call:
    b, s, _ = _selection_inputs(d)
    valid = fz.Call((b, s, _idxs(d, b.shape[0]), d.choice(_THRESHOLDS)))
    idxs = [("idxs", fz.TYPE, fz.arg(2, lambda d, t: t.float())), ("idxs", fz.VALUE, fz.arg(2, fz.rank))]
    thr = [("iou_threshold", fz.TYPE, fz.arg(3, lambda d, v: "0.5"))]
    call = fz.mutate(d, valid, _BOXES + fz.tensor_mutations("scores", 1) + _ROWS + idxs + thr)
    if isinstance(call.args[0], Tensor) and call.args[0].numel() == 0:  # empty boxes: an empty result, no checks
        call.bad, call.exc = None, ()
    return call


def _box_iou_draw(d: fz.Draw) -> fz.Call:
    dt = fz.dtype(d)
    n, m = d.ints(0, 4 if d.small else 24), d.ints(0, 4 if d.small else 24)
    batch = d.choice(((), (), (2,), (1, 3)))
    b1 = fz.specials(d, fz.boxes(d, n, dt)).reshape(*[1] * len(batch), n, 4).expand(*batch, n, 4)
    b2 = fz.boxes(d, m * max(1, math.prod(batch)), dt).reshape(*batch, m, 4)
    if dt in (torch.float16, torch.bfloat16):  # keep areas finite in the half dtype's float32 compute
        b1, b2 = b1.clamp(-1e4, 1e4), b2.clamp(-1e4, 1e4)
    valid = fz.Call((fz.layout(d, b1.contiguous()) if d.bool() else b1, fz.layout(d, b2)), {"fmt": d.choice(_FORMATS)})
    other = {torch.float32: torch.float64}
    return fz.mutate(
        d,
        valid,
        fz.tensor_mutations("boxes1", 0, dims=False)
        + fz.tensor_mutations("boxes2", 1, dims=False)
        + [
            ("boxes1", fz.VALUE, fz.arg(0, lambda d, t: fz.last_dim(d, t))),
            ("boxes2", fz.VALUE, fz.arg(1, lambda d, t: t.reshape(-1))),
            ("boxes2", fz.TYPE, fz.arg(1, lambda d, t: t.to(other.get(t.dtype, torch.float32)))),
            ("boxes2", fz.VALUE, _unbroadcastable),
            ("fmt", fz.VALUE, fz.kwarg("fmt", lambda d, v: d.choice(("xyxy ", "XYWH", None)))),
        ],
    )


def _unbroadcastable(d: fz.Draw, call: fz.Call) -> fz.Call:
    b1, b2 = call.args
    b1 = b1.reshape(-1, 4).expand(2, -1, 4)
    b2 = b2.reshape(-1, 4).expand(3, -1, 4)
    return fz.Call((b1, b2), call.kwargs)


def _soft_nms_draw(d: fz.Draw, batched: bool) -> fz.Call:
    b, s, _ = _selection_inputs(d)
    head = (b, s, _idxs(d, b.shape[0])) if batched else (b, s)
    i = len(head)
    rest = (d.choice(_THRESHOLDS), d.choice((0.5, 0.1, 2.0)), d.choice((0.0, 0.001, 0.3, -1.0)))
    valid = fz.Call(head + rest + (d.choice(tuple(SOFT_NMS_METHODS)),))
    mutations = _BOXES + fz.tensor_mutations("scores", 1) + _ROWS
    mutations += [
        ("sigma", fz.VALUE, fz.arg(i + 1, lambda d, v: d.choice((0.0, -1.0, math.nan)))),
        ("sigma", fz.TYPE, fz.arg(i + 1, lambda d, v: "0.5")),
        ("score_threshold", fz.TYPE, fz.arg(i + 2, lambda d, v: None)),
        ("iou_threshold", fz.TYPE, fz.arg(i, lambda d, v: [v])),
        ("method", fz.VALUE, fz.arg(i + 3, lambda d, v: d.choice(("Gaussian", "soft", "")))),
        ("method", fz.TYPE, fz.arg(i + 3, lambda d, v: d.choice((0, 2, None)))),
    ]
    if batched:
        mutations.append(("idxs", fz.TYPE, fz.arg(2, lambda d, t: t.double())))
    return fz.mutate(d, valid, mutations)


def _soft_same(got, exp, call) -> bool:
    """Tie-tolerant: decayed scores can tie or sit at score_threshold; then the same multiset of scores will do."""
    if _selection_same(got, exp, call):
        return True
    gs, es = got[1], exp[1]
    threshold = call.args[-2]
    ill = fz.near(es, [threshold], 1e-4) or fz.near(gs, [threshold], 1e-4)
    same = gs.shape == es.shape and torch.allclose(gs.double().sort().values, es.double().sort().values, 1e-3, 1e-5)
    return ill or same


# As torchvision: under autocast, NMS runs in float32 (its inputs are upcast, never downcast).
for _name, _reference, _draw, _public in (
    ("nms", reference.nms, _nms_draw, nms),
    ("batched_nms", reference.batched_nms, _batched_nms_draw, batched_nms),
):
    registry.declare(
        registry.OpDef(
            _name,
            _reference,
            _keep_fake,
            triton="visionops.triton.nms",
            autocast=torch.float32,
            fuzz=fz.FuzzSpec(_draw, _public, exact=True, same=_selection_same),
        )
    )
registry.declare(
    registry.OpDef(
        "box_iou",
        reference.box_iou,
        lambda boxes1, boxes2: boxes1.new_empty((boxes1.shape[0], boxes2.shape[0])),
        triton="visionops.triton.nms",
        backward=registry.Backward(
            _box_iou_setup,
            _box_iou_backward,
            fake=lambda grad, boxes1, boxes2: (torch.empty_like(boxes1), torch.empty_like(boxes2)),
        ),
        fuzz=fz.FuzzSpec(_box_iou_draw, box_iou),
    )
)


def _soft_nms_fake(boxes, scores, *args):
    k = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((k,), dtype=torch.long), scores.new_empty((k,))


def _soft_nms_check(boxes, scores, *rest):
    """Schema-level checks of the Triton ops (the C++ ops check in C++): sigma and method."""
    sigma, method = rest[-3], rest[-1]
    if not sigma > 0:
        raise ArgumentValueError(f"soft_nms: sigma must be > 0, got {sigma}")
    if method not in (0, 1, 2):
        raise ArgumentValueError(f"soft_nms: method must be 0 (hard), 1 (linear) or 2 (gaussian), got {method}")


# Outputs are selections: no gradient (as nms). Under autocast, float32 (as nms).
for _name, _ref, _public in (
    ("soft_nms", reference.soft_nms, soft_nms),
    ("batched_soft_nms", reference.batched_soft_nms, batched_soft_nms),
):
    registry.declare(
        registry.OpDef(
            _name,
            _ref,
            _soft_nms_fake,
            triton="visionops.triton.soft_nms",
            autocast=torch.float32,
            check=_soft_nms_check,
            fuzz=fz.FuzzSpec(
                functools.partial(_soft_nms_draw, batched=_name == "batched_soft_nms"),
                _public,
                exact=True,
                same=_soft_same,
            ),
        )
    )
del _name, _ref, _public


# ---- Matrix NMS --------------------------------------------------------------------------------------------------

from visionops.ops._checks import check_int  # noqa: E402
from visionops.reference.nms import MATRIX_NMS_KERNELS, matrix_nms as _reference_matrix_nms  # noqa: E402

__all__ += ["matrix_nms"]


def matrix_nms(
    boxes_or_masks: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    kernel: str = "gaussian",
    sigma: float = 2.0,
    score_threshold: float = 0.0,
    max_num: int = -1,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Matrix NMS (SOLOv2, Wang et al. 2020): every score decayed at once, without sequential selection; the
    semantics of mmdetection's ``mask_matrix_nms``, for boxes and for masks.

    With the inputs ranked by decreasing score (ties: input order), box j's score is multiplied by::

        decay_j = min(1, min over higher-ranked i of the same label of f(iou_ij) / f(comp_i))
        comp_i  = max over higher-ranked k of the same label of iou_ki          (0 when none)
        f(x)    = exp(-sigma * x**2)  ("gaussian")  or  1 - x  ("linear")

    A NaN IoU (two empty masks, zero-area boxes) counts as 0. Boxes of different labels never decay each other.

    Args:
        boxes_or_masks: boxes Tensor[N, 4] of (x1, y1, x2, y2), floating point (box IoU in float32 for
            float32/float16/bfloat16, float64 for float64); or binary masks Tensor[N, H, W], bool or floating point
            (mask IoU = inter / (area_i + area_j - inter) in float32; inter from a matmul of the flattened masks,
            exact for binary masks).
        scores: Tensor[N], floating point.
        labels: Tensor[N], integer.
        kernel: "gaussian" or "linear".
        sigma: the gaussian's factor (> 0; multiplies iou**2, unlike soft_nms's divisor); unused by "linear".
        score_threshold: boxes whose decayed score is >= score_threshold are returned.
        max_num: at most this many boxes are returned (-1: all).
        backend: "auto", "cpp", "triton" or "reference" (see ``visionops._registry``).

    Returns:
        (keep, new_scores): Tensor[K] int64 input indices by decreasing decayed score (ties by rank), and Tensor[K]
        their decayed scores (computed in float64) in the scores' dtype. Not differentiable.
    """
    b = boxes_or_masks
    if not isinstance(b, Tensor):
        raise ArgumentTypeError(f"matrix_nms: boxes_or_masks must be a torch.Tensor, got {type(b).__name__}")
    if b.dim() == 2:
        check_boxes("boxes_or_masks", b)
    elif b.dim() == 3:
        if not (b.is_floating_point() or b.dtype == torch.bool):
            raise ArgumentTypeError(f"matrix_nms: boxes_or_masks (masks) must be bool or floating point, got {b.dtype}")
    else:
        raise ArgumentValueError(
            f"matrix_nms: boxes_or_masks must be boxes [N, 4] or masks [N, H, W], got {list(b.shape)}"
        )
    check_tensor("scores", scores, floating=True, dim=1)
    check_tensor("labels", labels, integer=True, dim=1)
    names = ("boxes_or_masks", "scores", "labels")
    check_same_length(names, (b, scores, labels))
    check_same_device(names, (b, scores, labels))
    if not isinstance(kernel, str):
        raise ArgumentTypeError(f"matrix_nms: kernel must be a string, one of {MATRIX_NMS_KERNELS}, got {kernel!r}")
    if kernel not in MATRIX_NMS_KERNELS:
        raise ArgumentValueError(f"matrix_nms: kernel must be one of {MATRIX_NMS_KERNELS}, got {kernel!r}")
    sig = check_number("sigma", sigma)
    if kernel == "gaussian" and not sig > 0:
        raise ArgumentValueError(f"matrix_nms: sigma must be > 0 for the gaussian kernel, got {sigma}")
    thr = check_number("score_threshold", score_threshold)
    max_num = check_int("max_num", max_num)
    if max_num < -1:
        raise ArgumentValueError(f"matrix_nms: max_num must be >= 0, or -1 for all, got {max_num}")
    return registry.dispatch("matrix_nms", backend, b.device)(b, scores, labels, kernel, sig, thr, max_num)


def _matrix_nms_check(boxes_or_masks, scores, labels, kernel, sigma, score_threshold, max_num):
    """Schema-level checks of the Triton op (the C++ op checks in C++)."""
    if kernel not in MATRIX_NMS_KERNELS:
        raise ArgumentValueError(f"matrix_nms: kernel must be one of {MATRIX_NMS_KERNELS}, got {kernel!r}")
    if kernel == "gaussian" and not sigma > 0:
        raise ArgumentValueError(f"matrix_nms: sigma must be > 0 for the gaussian kernel, got {sigma}")


def _matrix_nms_draw(d: fz.Draw) -> fz.Call:
    b, s, dt = _selection_inputs(d)
    n = b.shape[0]
    if d.bool(0.3):  # masks
        masks = torch.rand((n, 5, 6), generator=fz.gen(d)) > 0.5
        b = masks if d.bool() else masks.to(dt)
    labels = torch.randint(0, 3, (n,), generator=fz.gen(d))
    kw = {
        "kernel": d.choice(MATRIX_NMS_KERNELS),
        "sigma": d.choice((2.0, 0.5)),
        "score_threshold": d.choice((0.0, 0.05, 0.5)),
        "max_num": d.choice((-1, 0, 1, 5)),
    }
    kw = {k: v for k, v in kw.items() if d.bool(0.8)}
    mutations = [("boxes_or_masks", fz.TYPE, fz.arg(0, fz.wrong_type))]
    mutations += [("boxes_or_masks", fz.VALUE, fz.arg(0, lambda d, t: t.reshape(-1)))]
    mutations += fz.tensor_mutations("scores", 1) + _ROWS + fz.tensor_mutations("labels", 2, float_only=False)
    mutations += [
        ("labels", fz.TYPE, fz.arg(2, lambda d, t: t.float())),
        ("kernel", fz.VALUE, fz.kwarg("kernel", lambda d, v: "Gaussian")),
        ("kernel", fz.TYPE, fz.kwarg("kernel", lambda d, v: 1)),
        ("max_num", fz.VALUE, fz.kwarg("max_num", lambda d, v: d.choice((-2, -100)))),
        ("max_num", fz.TYPE, fz.kwarg("max_num", lambda d, v: d.choice((1.0, "3", None)))),
        ("sigma", fz.TYPE, fz.kwarg("sigma", lambda d, v: "2")),
        ("score_threshold", fz.TYPE, fz.kwarg("score_threshold", lambda d, v: [0.1])),
    ]
    call = fz.mutate(d, fz.Call((b, s, labels), kw), mutations)
    if call.bad is None and kw.get("kernel", "gaussian") == "gaussian" and d.bool(0.1):
        call.kwargs["sigma"], call.bad, call.exc = d.choice((0.0, -1.0)), "sigma", fz.VALUE
    return call


def _matrix_same(got, exp, call) -> bool:
    """Tie-tolerant: decayed scores that tie or sit at score_threshold make the order (and the cut) ill-posed."""
    threshold = call.kwargs.get("score_threshold", 0.0)
    gs, es = got[1], exp[1]
    return fz.near(es, [threshold], 1e-4) or fz.near(gs, [threshold], 1e-4)


def _multiclass_draw(d: fz.Draw) -> fz.Call:
    batch, n, c, dt = d.ints(0, 2), d.ints(0, 4 if d.small else 16), d.ints(1, 3), fz.dtype(d)
    per_class = d.bool(0.3)
    b = fz.grid_boxes(d, batch * n * (c if per_class else 1), dt).reshape(batch, n, *((c,) if per_class else ()), 4)
    s = fz.specials(d, fz.distinct_scores(d, batch * n * c, dt), p=0.1, huge=False).reshape(batch, n, c)
    args = (fz.layout(d, b), fz.layout(d, s), d.choice(_THRESHOLDS), d.choice((0.0, 0.2, 0.5, -1.0)))
    args += (d.ints(1, 6), d.ints(1, 8), d.bool())
    mutations = fz.tensor_mutations("boxes", 0) + fz.tensor_mutations("scores", 1)
    mutations += [
        ("boxes", fz.VALUE, fz.arg(0, lambda d, t: fz.last_dim(d, t))),
        ("scores", fz.TYPE, fz.arg(1, lambda d, t: t.to(torch.float64 if t.dtype != torch.float64 else torch.float32))),
        ("iou_threshold", fz.TYPE, fz.arg(2, lambda d, v: "0.5")),
        ("score_threshold", fz.TYPE, fz.arg(3, lambda d, v: None)),
        ("max_per_class", fz.VALUE, fz.arg(4, lambda d, v: d.choice((0, -1)))),
        ("max_per_class", fz.TYPE, fz.arg(4, lambda d, v: 2.0)),
        ("max_total", fz.VALUE, fz.arg(5, lambda d, v: 0)),
        ("max_total", fz.TYPE, fz.arg(5, lambda d, v: True)),
        ("class_agnostic", fz.TYPE, fz.arg(6, lambda d, v: 1)),
    ]
    return fz.mutate(d, fz.Call(args), mutations)


def _multiclass_same(got, exp, call) -> bool:
    """Tie-tolerant: per image, an IoU at the threshold makes the kept set ill-posed."""
    boxes, thr = call.args[0], call.args[2]
    flat = boxes.reshape(boxes.shape[0], -1, 4)
    return any(fz.near(fz.iou64(b, b), [thr]) for b in flat)


# A selection: no gradient. Under autocast, float32 (as nms); bool masks are not cast.
registry.declare(
    registry.OpDef(
        "matrix_nms",
        _reference_matrix_nms,
        _soft_nms_fake,
        triton="visionops.triton.matrix_nms",
        autocast=torch.float32,
        check=_matrix_nms_check,
        fuzz=fz.FuzzSpec(_matrix_nms_draw, matrix_nms, exact=True, same=_matrix_same),
    )
)

# ---- multiclass NMS (fixed shape, no host synchronisation) ----------------------------------------------------

__all__ += ["multiclass_nms"]


def _check_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"multiclass_nms: {name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ArgumentValueError(f"multiclass_nms: {name} must be >= 1, got {value}")
    return value


def multiclass_nms(
    boxes: Tensor,
    scores: Tensor,
    iou_threshold: float,
    score_threshold: float,
    max_per_class: int,
    max_total: int,
    class_agnostic: bool = False,
    *,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Multiclass NMS on a batch of images with fixed-shape outputs and no host synchronisation: it runs under
    ``torch.compile(fullgraph=True)``, exports with ``torch.export`` (batch size dynamic) and can be captured in a
    CUDA graph.

    Per image, the candidates are the (box, class) pairs whose score is > ``score_threshold`` (compared in the scores'
    dtype, as ``scores > score_threshold``). Greedy NMS (as ``torchvision.ops.batched_nms``: visiting candidates by
    decreasing score, a candidate is dropped when its IoU with a kept one is > ``iou_threshold``) runs per class, or,
    with ``class_agnostic=True``, over all candidates at once (a candidate is then tested against every box NMS kept
    before it, including those the caps below drop). Of the kept candidates the best ``max_per_class`` of each class
    stay, and of those the best ``max_total``, sorted by decreasing score. Equal scores are ordered by class, then by
    box index.

    Args:
        boxes: Tensor[B, N, 4] of (x1, y1, x2, y2) shared by every class, or Tensor[B, N, C, 4] (one box per
            class), floating point (float16/bfloat16 IoUs are computed in float32).
        scores: Tensor[B, N, C], the boxes' dtype.
        iou_threshold, score_threshold: numbers, as above.
        max_per_class, max_total: ints >= 1.
        class_agnostic: one NMS over all classes instead of one per class.
        backend: "auto", "cpp", "triton" or "reference" (see ``visionops._registry``).

    Returns:
        ``(boxes, scores, classes, num_detections)``: Tensor[B, max_total, 4] in the boxes' dtype,
        Tensor[B, max_total] in the scores' dtype, Tensor[B, max_total] int64 and Tensor[B] int64. Rows past
        ``num_detections[b]`` are zero, with class -1. Under autocast, float16/bfloat16 inputs run (and return) in
        float32, as ``nms``. Not differentiable.
    """
    check_tensor("scores", scores, floating=True, dim=3)
    check_tensor("boxes", boxes, floating=True)
    if boxes.dim() not in (3, 4) or boxes.shape[-1] != 4:
        raise ArgumentValueError(f"boxes must have shape [B, N, 4] or [B, N, C, 4], got {list(boxes.shape)}")
    expect = list(scores.shape[:2]) + ([4] if boxes.dim() == 3 else [scores.shape[2], 4])
    if list(boxes.shape) != expect:
        raise ArgumentValueError(
            f"boxes must have shape {expect} to match scores of shape [B, N, C] = {list(scores.shape)}, "
            f"got {list(boxes.shape)}"
        )
    if boxes.dtype != scores.dtype:
        raise ArgumentTypeError(f"multiclass_nms: scores must have the boxes' dtype {boxes.dtype}, got {scores.dtype}")
    check_same_device(("boxes", "scores"), (boxes, scores))
    thr = check_number("iou_threshold", iou_threshold)
    score_thr = check_number("score_threshold", score_threshold)
    per_class = _check_count("max_per_class", max_per_class)
    total = _check_count("max_total", max_total)
    if not isinstance(class_agnostic, bool):
        raise ArgumentTypeError(f"multiclass_nms: class_agnostic must be a bool, got {type(class_agnostic).__name__}")
    return registry.dispatch("multiclass_nms", backend, boxes.device)(
        boxes, scores, thr, score_thr, per_class, total, class_agnostic
    )


def _multiclass_nms_fake(boxes, scores, iou_threshold, score_threshold, max_per_class, max_total, class_agnostic):
    batch = scores.shape[0]
    return (
        boxes.new_empty((batch, max_total, 4)),
        scores.new_empty((batch, max_total)),
        scores.new_empty((batch, max_total), dtype=torch.long),
        scores.new_empty((batch,), dtype=torch.long),
    )


def _multiclass_nms_check(boxes, scores, iou_threshold, score_threshold, max_per_class, max_total, class_agnostic):
    """Schema-level checks of the Triton op (the C++ op checks in C++)."""
    if max_per_class < 1:
        raise ArgumentValueError(f"multiclass_nms: max_per_class must be >= 1, got {max_per_class}")
    if max_total < 1:
        raise ArgumentValueError(f"multiclass_nms: max_total must be >= 1, got {max_total}")


# A selection: no gradient. Under autocast, float32 (as nms).
registry.declare(
    registry.OpDef(
        "multiclass_nms",
        multiclass_nms_reference,
        _multiclass_nms_fake,
        triton="visionops.triton.multiclass_nms",
        autocast=torch.float32,
        check=_multiclass_nms_check,
        fuzz=fz.FuzzSpec(_multiclass_draw, multiclass_nms, exact=True, same=_multiclass_same),
    )
)
