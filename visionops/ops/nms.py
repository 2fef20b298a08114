"""NMS family: nms, batched_nms, box_iou (torchvision.ops semantics).

Kernels: csrc/ops/{cpu,cuda}/nms_kernel.*, visionops/triton/nms.py; math: visionops/reference/nms.py.
"""
import torch
from torch import Tensor

from visionops import reference
from visionops._backend import resolve
from visionops.ops._checks import check_boxes, check_number, check_same_device, check_same_length, check_tensor
from visionops.ops._autograd import refuse_double_backward

_ops = torch.ops.visionops


def _triton():
    import visionops.triton.nms as triton_nms  # imported on first use: needs the triton package

    return triton_nms


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, *, backend: str = "auto") -> Tensor:
    """Greedy non-maximum suppression, as ``torchvision.ops.nms``.

    Args:
        boxes: Tensor[N, 4] of (x1, y1, x2, y2), floating point (float16/bfloat16 are compared in float32).
        scores: Tensor[N] of scores.
        iou_threshold: a box is dropped when its IoU with a higher-scored kept box is > iou_threshold.
        backend: "auto", "cpp", "triton" or "reference" (see ``visionops._backend``).

    Returns:
        Tensor[K] int64: indices of the kept boxes, by decreasing score (ties keep their input order).
    """
    check_boxes("boxes", boxes)
    check_tensor("scores", scores, floating=True, dim=1)
    check_same_length(("boxes", "scores"), (boxes, scores))
    check_same_device(("boxes", "scores"), (boxes, scores))
    thr = check_number("iou_threshold", iou_threshold)
    b = resolve("nms", backend, boxes.device)
    if b == "cpp":
        return _ops.nms(boxes, scores, thr)
    if b == "triton":
        return _triton().triton_nms(boxes, scores, thr)
    return reference.nms(boxes, scores, thr)


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, *, backend: str = "auto") -> Tensor:
    """NMS independently per category, as ``torchvision.ops.batched_nms``.

    Boxes of different ``idxs`` never suppress each other. Unlike torchvision's coordinate-offset trick this is exact
    for any coordinates and class ids, and uses no N x N memory across classes.

    Args:
        boxes: Tensor[N, 4]; scores: Tensor[N]; idxs: Tensor[N] integer category of each box.
    Returns:
        Tensor[K] int64 indices of kept boxes, by decreasing score.
    """
    check_boxes("boxes", boxes)
    check_tensor("scores", scores, floating=True, dim=1)
    check_tensor("idxs", idxs, integer=True, dim=1)
    check_same_length(("boxes", "scores", "idxs"), (boxes, scores, idxs))
    check_same_device(("boxes", "scores", "idxs"), (boxes, scores, idxs))
    thr = check_number("iou_threshold", iou_threshold)
    b = resolve("batched_nms", backend, boxes.device)
    if b == "cpp":
        return _ops.batched_nms(boxes, scores, idxs, thr)
    if b == "triton":
        return _triton().triton_batched_nms(boxes, scores, idxs, thr)
    return reference.batched_nms(boxes, scores, idxs, thr)


def box_iou(boxes1: Tensor, boxes2: Tensor, *, backend: str = "auto") -> Tensor:
    """Pairwise IoU, as ``torchvision.ops.box_iou``: Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M].

    Differentiable with respect to both inputs. Half inputs are computed in float32 and returned in their dtype.
    """
    check_boxes("boxes1", boxes1)
    check_boxes("boxes2", boxes2)
    check_same_device(("boxes1", "boxes2"), (boxes1, boxes2))
    if boxes1.dtype != boxes2.dtype:
        raise TypeError(f"boxes1 and boxes2 must have the same dtype, got {boxes1.dtype} and {boxes2.dtype}")
    b = resolve("box_iou", backend, boxes1.device)
    if b == "cpp":
        return _ops.box_iou(boxes1, boxes2)
    if b == "triton":
        return _triton().triton_box_iou(boxes1, boxes2)
    return reference.box_iou(boxes1, boxes2)


# ---- registrations: fake kernels, autograd, autocast ----------------------------------------------------------


def _nms_fake(boxes, scores, iou_threshold):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


torch.library.register_fake("visionops::nms", _nms_fake)


@torch.library.register_fake("visionops::batched_nms")
def _(boxes, scores, idxs, iou_threshold):
    return _nms_fake(boxes, scores, iou_threshold)


@torch.library.register_fake("visionops::box_iou")
def _(boxes1, boxes2):
    return boxes1.new_empty((boxes1.shape[0], boxes2.shape[0]))


@torch.library.register_fake("visionops::_box_iou_backward")
def _(grad, boxes1, boxes2):
    return torch.empty_like(boxes1), torch.empty_like(boxes2)


def box_iou_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _box_iou_backward(ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    return _ops._box_iou_backward(grad.contiguous(), boxes1, boxes2)


torch.library.register_autograd("visionops::box_iou", _box_iou_backward, setup_context=box_iou_setup_context)
refuse_double_backward("visionops::_box_iou_backward", "box_iou")

# As torchvision: under autocast, NMS runs in float32 (its inputs are upcast, never downcast).
for _name in ("visionops::nms", "visionops::batched_nms"):
    for _device in ("cpu", "cuda"):
        torch.library.register_autocast(_name, _device, torch.float32)
