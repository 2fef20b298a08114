"""NMS family: nms, batched_nms, box_iou (torchvision.ops semantics).

Kernels: csrc/ops/{cpu,cuda}/nms_kernel.*, visionops/triton/nms.py; math: visionops/reference/nms.py.
"""

import torch
from torch import Tensor

from visionops import _registry as registry
from visionops import reference
from visionops.ops._checks import check_boxes, check_number, check_same_device, check_same_length, check_tensor

__all__ = ["nms", "batched_nms", "box_iou"]


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
        Tensor[K] int64 indices of kept boxes, by decreasing score.
    """
    check_boxes("boxes", boxes)
    check_tensor("scores", scores, floating=True, dim=1)
    check_tensor("idxs", idxs, integer=True, dim=1)
    check_same_length(("boxes", "scores", "idxs"), (boxes, scores, idxs))
    check_same_device(("boxes", "scores", "idxs"), (boxes, scores, idxs))
    thr = check_number("iou_threshold", iou_threshold)
    return registry.dispatch("batched_nms", backend, boxes.device)(boxes, scores, idxs, thr)


def box_iou(boxes1: Tensor, boxes2: Tensor, *, backend: str = "auto") -> Tensor:
    """Pairwise IoU, as ``torchvision.ops.box_iou``: Tensor[N, 4], Tensor[M, 4] -> Tensor[N, M].

    Differentiable with respect to both inputs. Half inputs are computed in float32 and returned in their dtype.
    """
    check_boxes("boxes1", boxes1)
    check_boxes("boxes2", boxes2)
    check_same_device(("boxes1", "boxes2"), (boxes1, boxes2))
    if boxes1.dtype != boxes2.dtype:
        raise TypeError(f"boxes1 and boxes2 must have the same dtype, got {boxes1.dtype} and {boxes2.dtype}")
    return registry.dispatch("box_iou", backend, boxes1.device)(boxes1, boxes2)


# ---- declarations: fake kernels, autograd, autocast (every backend) -------------------------------------------


def _keep_fake(boxes, scores, *args):
    return boxes.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.long)


def _box_iou_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _box_iou_backward(backward_op, ctx, grad):
    boxes1, boxes2 = ctx.saved_tensors
    return backward_op(grad.contiguous(), boxes1, boxes2)


# As torchvision: under autocast, NMS runs in float32 (its inputs are upcast, never downcast).
registry.declare(
    registry.OpDef("nms", reference.nms, _keep_fake, triton="visionops.triton.nms", autocast=torch.float32)
)
registry.declare(
    registry.OpDef(
        "batched_nms", reference.batched_nms, _keep_fake, triton="visionops.triton.nms", autocast=torch.float32
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
    )
)
