"""Argument checks shared by the op wrappers: user mistakes become ValueError/TypeError naming the argument.

The errors raised are subclasses that are also ``RuntimeError`` (what torchvision's kernels raise for the same
mistakes), so code written against torchvision (``except RuntimeError``) keeps catching them; a malformed RoI boxes
argument is also an ``AssertionError``, as torchvision's ``check_roi_boxes_shape`` raises.
"""

from typing import Optional, Sequence

import torch
from torch import Tensor


class ArgumentValueError(ValueError, RuntimeError):
    """A bad shape or value: a ValueError, and a RuntimeError as torchvision's kernel checks raise."""


class ArgumentTypeError(TypeError, RuntimeError):
    """A bad type or dtype: a TypeError, and a RuntimeError as torchvision's kernel checks raise."""


class BoxesShapeError(ArgumentValueError, AssertionError):
    """RoI boxes of the wrong shape: also an AssertionError, as torchvision asserts it."""


class BoxesTypeError(ArgumentTypeError, AssertionError):
    """RoI boxes that are neither a tensor nor a list of tensors: also an AssertionError, as torchvision asserts it."""


def check_tensor(
    name: str,
    t,
    *,
    floating: bool = False,
    integer: bool = False,
    dim: Optional[int] = None,
    last: Optional[int] = None,
) -> None:
    if not isinstance(t, Tensor):
        raise ArgumentTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ArgumentTypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        shape = "[N, %d]" % last if (dim == 2 and last) else ("[N]" if dim == 1 else f"{dim}-D")
        raise ArgumentValueError(f"{name} must have shape {shape}, got {list(t.shape)}")
    if last is not None and t.shape[-1] != last:
        raise ArgumentValueError(f"{name} must have shape [N, {last}], got {list(t.shape)}")


def check_boxes(name: str, boxes) -> None:
    check_tensor(name, boxes, floating=True, dim=2, last=4)


def check_same_length(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    n = tensors[0].shape[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.shape[0] != n:
            raise ArgumentValueError(f"{name} must have {n} entries (one per row of {names[0]}), got {t.shape[0]}")


def check_same_device(names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    dev = tensors[0].device
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != dev:
            raise ArgumentValueError(
                f"{name} is on {t.device} but {names[0]} is on {dev}; they must be on the same device"
            )


def check_number(name: str, value) -> float:
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def check_pair(name: str, value) -> tuple:
    """An int or a pair of ints, each > 0 (torchvision's output_size), as (h, w)."""
    if isinstance(value, Tensor) or isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}")
    pair = (value, value) if isinstance(value, int) else tuple(value) if isinstance(value, (list, tuple)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise ArgumentTypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ArgumentValueError(f"{name} must be positive, got {value!r}")
    return pair


def check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    return value
