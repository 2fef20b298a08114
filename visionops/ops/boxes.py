"""Box utilities with torchvision semantics: box_area, clip_boxes_to_image, box_convert, remove_small_boxes.

These are pure PyTorch (one or two elementwise ops each; a kernel would not beat them): they exist so that
visionops covers the detection front end without importing torchvision.
"""

from typing import Tuple

import torch
from torch import Tensor

from visionops.ops._checks import ArgumentValueError, check_number, check_tensor

__all__ = ["box_area", "box_convert", "clip_boxes_to_image", "remove_small_boxes"]

_FORMATS = ("xyxy", "xywh", "cxcywh")


def _check_boxes_nd(name: str, boxes) -> None:
    check_tensor(name, boxes)
    if boxes.dim() == 0 or boxes.shape[-1] != 4:
        raise ArgumentValueError(f"{name} must have shape [..., 4], got {list(boxes.shape)}")


def _upcast(t: Tensor) -> Tensor:
    # Products of int16 / float16 coordinates overflow; torchvision widens them the same way.
    if t.is_floating_point():
        return t if t.dtype in (torch.float32, torch.float64) else t.float()
    return t if t.dtype in (torch.int32, torch.int64) else t.int()


def box_area(boxes: Tensor, fmt: str = "xyxy") -> Tensor:
    """Areas of boxes: Tensor[..., 4] -> Tensor[...] (pure PyTorch), as ``torchvision.ops.box_area``.

    ``fmt`` is "xyxy", "xywh" or "cxcywh". float16/bfloat16 and small integer types are widened first.
    """
    _check_boxes_nd("boxes", boxes)
    if fmt not in _FORMATS:
        raise ArgumentValueError(f"fmt must be one of {_FORMATS}, got {fmt!r}")
    b = _upcast(boxes)
    if fmt == "xyxy":
        return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return b[..., 2] * b[..., 3]


def clip_boxes_to_image(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    """Clamp x to [0, W] and y to [0, H] (pure PyTorch), as ``torchvision.ops.clip_boxes_to_image``.

    Args:
        boxes: Tensor[..., 4] of (x1, y1, x2, y2); size: (H, W). Returns a new tensor of the same shape.
    """
    _check_boxes_nd("boxes", boxes)
    if not isinstance(size, (list, tuple, torch.Size)) or len(size) != 2:
        raise ArgumentValueError(f"size must be (height, width), got {size!r}")
    height, width = (check_number("size", v) for v in size)
    x = boxes[..., 0::2].clamp(min=0, max=width)
    y = boxes[..., 1::2].clamp(min=0, max=height)
    return torch.stack((x, y), dim=boxes.dim()).reshape(boxes.shape)


def box_convert(boxes: Tensor, in_fmt: str, out_fmt: str) -> Tensor:
    """Convert boxes between "xyxy", "xywh" and "cxcywh" (pure PyTorch), as ``torchvision.ops.box_convert``.

    Tensor[..., 4] -> Tensor[..., 4]; the same format returns a copy. (Rotated formats are not supported here.)
    """
    _check_boxes_nd("boxes", boxes)
    for name, f in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
        if f not in _FORMATS:
            raise ArgumentValueError(f"{name} must be one of {_FORMATS}, got {f!r}")
    if in_fmt == out_fmt:
        return boxes.clone()
    a, b, c, d = boxes.unbind(-1)
    if in_fmt == "xywh":  # to xyxy first
        a, b, c, d = a, b, a + c, b + d
    elif in_fmt == "cxcywh":
        a, b, c, d = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
    if out_fmt == "xywh":
        a, b, c, d = a, b, c - a, d - b
    elif out_fmt == "cxcywh":
        a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
    return torch.stack((a, b, c, d), dim=-1)


def remove_small_boxes(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of the boxes whose sides are both >= min_size (pure PyTorch), as
    ``torchvision.ops.remove_small_boxes``: Tensor[..., 4] -> Tensor[K] int64."""
    _check_boxes_nd("boxes", boxes)
    min_size = check_number("min_size", min_size)
    ws, hs = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    return torch.where((ws >= min_size) & (hs >= min_size))[0]
