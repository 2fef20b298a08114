"""Convolution: conv2d and conv3d, exactly ``F.conv2d`` / ``F.conv3d`` (cross-correlation), one kernel family with the
number of spatial dimensions a compile-time parameter.

Kernels: csrc/ops/cpu/conv_kernel.cpp, csrc/ops/cuda/conv_kernel.cu, visionops/triton/conv.py; math:
visionops/reference/conv.py; modules: visionops/nn.py; docs/conv.md.
"""

import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from visionops import _fuzz as fz
from visionops import _registry as registry
from visionops import reference
from visionops.reference.conv import _out_format

__all__ = ["conv2d", "conv3d"]

_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
_SPATIAL = {2: "H, W", 3: "D, H, W"}
_KERNEL = {2: "kH, kW", 3: "kD, kH, kW"}
IntOrSeq = Union[int, Sequence[int]]


def _check_tensors(op: str, n: int, input, weight, bias, groups) -> None:
    """Types, ranks, dtype, device and channel counts of ``op``'s tensors (n spatial dims)."""
    for name, t in (("input", input), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{op}: {name} must be float64, float32, float16 or bfloat16, got {t.dtype}")
    if input.dim() != n + 2:
        raise ValueError(f"{op}: input must be a {n + 2}-D tensor [B, Cin, {_SPATIAL[n]}], got {list(input.shape)}")
    if weight.dim() != n + 2:
        raise ValueError(
            f"{op}: weight must be a {n + 2}-D tensor [Cout, Cin / groups, {_KERNEL[n]}], got {list(weight.shape)}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.device != input.device:
            raise ValueError(f"{op}: {name} is on {t.device} but input is on {input.device}; they must be on one")
        if t.dtype != input.dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but input has {input.dtype}; they must be the same")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"{op}: groups must be an int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"{op}: groups must be >= 1, got {groups}")
    cin, cout = input.shape[1], weight.shape[0]
    if cin % groups:
        raise ValueError(f"{op}: input channels ({cin}) must be divisible by groups ({groups})")
    if cout % groups:
        raise ValueError(f"{op}: weight's output channels ({cout}) must be divisible by groups ({groups})")
    if weight.shape[1] * groups != cin:
        raise ValueError(
            f"{op}: weight has {weight.shape[1]} input channels per group but input has {cin} channels in {groups} "
            f"group(s): weight.shape[1] must be {cin // groups}"
        )
    if bias is not None and list(bias.shape) != [cout]:
        raise ValueError(f"{op}: bias must have shape [Cout] = [{cout}], got {list(bias.shape)}")
    if any(k < 1 for k in weight.shape[2:]):
        raise ValueError(f"{op}: weight's kernel must be non-empty, got {list(weight.shape)}")


def _check_geometry(op: str, input: Tensor, weight: Tensor, stride, padding, dilation) -> None:
    """Stride, padding, dilation and the dilated kernel against the padded input (schema-level: lists of ints)."""
    for name, values, low in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if any(v < low for v in values):
            raise ValueError(f"{op}: {name} must be >= {low} in every dimension, got {list(values)}")
    for i, (size, k) in enumerate(zip(input.shape[2:], weight.shape[2:])):
        span = dilation[i] * (k - 1) + 1
        if span > size + 2 * padding[i]:
            raise ValueError(
                f"{op}: the dilated kernel ({span} in spatial dim {i}: weight size {k}, dilation {dilation[i]}) is "
                f"larger than the padded input ({size} + 2 * padding {padding[i]} = {size + 2 * padding[i]})"
            )


def _check_schema(op: str, n: int):
    """The schema-level checks of ``op`` (the Triton op runs them; the C++ ops check in C++)."""

    def check(input, weight, bias, stride, padding, dilation, groups):
        _check_tensors(op, n, input, weight, bias, groups)
        for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation)):
            if len(v) != n:
                raise ValueError(f"{op}: {name} must have {n} entries, got {list(v)}")
        _check_geometry(op, input, weight, stride, padding, dilation)

    return check


def _ints(op: str, name: str, value, n: int) -> List[int]:
    """An int or a sequence of n ints (as torch accepts) as a list of n ints."""
    values = [value] * n if isinstance(value, int) else list(value) if isinstance(value, (list, tuple)) else None
    if values is not None and len(values) == 1:
        values = values * n
    if (
        values is None
        or isinstance(value, bool)
        or len(values) != n
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    ):
        raise TypeError(f"{op}: {name} must be an int or a sequence of {n} ints, got {value!r}")
    return values


def _same_padding(op: str, weight: Tensor, stride, dilation) -> Tuple[List[int], List[int]]:
    """padding="same": the symmetric padding and the extra right-side padding (for an even total) that F.conv2d uses."""
    if any(s != 1 for s in stride):
        raise ValueError(f"{op}: padding='same' needs stride 1 (as torch), got stride {stride}")
    total = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:])]
    return [t // 2 for t in total], [t % 2 for t in total]


def _schema_args(op: str, n: int, input, weight, bias, stride, padding, dilation, groups) -> tuple:
    """The public call's arguments checked and turned into the schema's (an even "same" padding applied to input)."""
    _check_tensors(op, n, input, weight, bias, groups)
    stride = _ints(op, "stride", stride, n)
    dilation = _ints(op, "dilation", dilation, n)
    if isinstance(padding, str):
        if padding == "valid":
            padding = [0] * n
        elif padding == "same":
            padding, extra = _same_padding(op, weight, stride, dilation)
            if any(extra):
                # an odd total padding cannot be symmetric: the extra zero goes on the right (bottom, back), as torch
                input = F.pad(input, [p for e in reversed(extra) for p in (0, e)])
        else:
            raise ValueError(f"{op}: padding must be an int, {n} ints, 'same' or 'valid', got {padding!r}")
    else:
        padding = _ints(op, "padding", padding, n)
    _check_geometry(op, input, weight, stride, padding, dilation)
    return input, weight, bias, stride, padding, dilation, groups


def conv2d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrSeq = 1,
    padding: Union[IntOrSeq, str] = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
) -> Tensor:
    """2-D convolution (cross-correlation), the same as :func:`torch.nn.functional.conv2d`.

    ``out[b, o, y, x] = bias[o] + sum_{c, i, j} weight[o, c, i, j] * input_pad[b, g * Cin/groups + c, y * sH + i * dH,
    x * sW + j * dW]`` with g the group of output channel o and input_pad zero-padded by ``padding`` on both sides.

    Args:
        input: Tensor[B, Cin, H, W], float64, float32, float16 or bfloat16.
        weight: Tensor[Cout, Cin / groups, kH, kW], same dtype and device as input.
        bias: Tensor[Cout] or None.
        stride: int or (sH, sW), each >= 1.
        padding: int or (pH, pW), each >= 0 (zeros on both sides), or "valid" (0) or "same" (output size = input
            size; stride must be 1; when the total padding d * (k - 1) is odd the extra zero goes on the right and
            bottom, as torch does).
        dilation: int or (dH, dW), each >= 1.
        groups: >= 1, dividing Cin and Cout.
        backend: "auto", "cpp", "triton" or "reference".

    Returns:
        Tensor[B, Cout, Ho, Wo], ``Ho = (H + 2 pH - dH (kH - 1) - 1) // sH + 1`` (Wo likewise), in input's dtype (half
        types accumulate in float32 and round once); channels_last when input is channels_last (and not also plainly
        contiguous). Differentiable w.r.t. input, weight and bias (not twice). Under ``torch.autocast`` it runs in
        the autocast dtype, as torch's convolutions do.
    """
    args = _schema_args("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)
    return registry.dispatch("conv2d", backend, input.device)(*args)


def conv3d(
    input: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    stride: IntOrSeq = 1,
    padding: Union[IntOrSeq, str] = 0,
    dilation: IntOrSeq = 1,
    groups: int = 1,
    *,
    backend: str = "auto",
) -> Tensor:
    """3-D convolution (cross-correlation), the same as :func:`torch.nn.functional.conv3d`.

    Args:
        input: Tensor[B, Cin, D, H, W], float64, float32, float16 or bfloat16.
        weight: Tensor[Cout, Cin / groups, kD, kH, kW], same dtype and device as input.
        bias: Tensor[Cout] or None.
        stride, padding, dilation: an int or three, as in :func:`conv2d` (padding also "same" or "valid").
        groups: >= 1, dividing Cin and Cout.
        backend: "auto", "cpp", "triton" or "reference".

    Returns:
        Tensor[B, Cout, Do, Ho, Wo] (sizes as in :func:`conv2d`, per dimension) in input's dtype;
        channels_last_3d when input is. Differentiable w.r.t. input, weight and bias; autocast as :func:`conv2d`.
    """
    args = _schema_args("conv3d", 3, input, weight, bias, stride, padding, dilation, groups)
    return registry.dispatch("conv3d", backend, input.device)(*args)


# ---- declarations: fake kernels, autograd, autocast (every backend) -----------------------------------------------


def _fake(input, weight, bias, stride, padding, dilation, groups):
    out = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(input.shape[2:], weight.shape[2:], stride, padding, dilation)
    ]
    return input.new_empty((input.shape[0], weight.shape[0], *out)).contiguous(memory_format=_out_format(input))


def _backward_fake(grad, input, weight, stride, padding, dilation, groups, output_mask):
    def like(t: Tensor, wanted: bool) -> Tensor:
        return torch.empty_like(t, memory_format=_out_format(t)) if wanted else t.new_empty((0,))

    grad_bias = weight.new_empty((weight.shape[0],) if output_mask[2] else (0,))
    return like(input, output_mask[0]), like(weight, output_mask[1]), grad_bias


def _setup(ctx, inputs, output):
    input, weight, bias = inputs[:3]
    ctx.save_for_backward(input, weight)
    ctx.has_bias = bias is not None
    ctx.args = tuple(inputs[3:])


def _conv_backward(backward_op, ctx, grad):
    input, weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    mask = [bool(need[0]), bool(need[1]), bool(ctx.has_bias and need[2])]
    if not any(mask):
        return (None,) * (3 + len(ctx.args))
    grads = backward_op(grad, input, weight, *ctx.args, mask)
    return (*(g if m else None for g, m in zip(grads, mask)), *(None for _ in ctx.args))


def _kernel_too_large(d: fz.Draw, call: fz.Call) -> fz.Call:
    x, w = call.args[:2]
    w = w.new_zeros((*w.shape[:2], *[9] * (w.dim() - 2)))
    return fz.Call((x, w, call.args[2], 1, 0, 1, call.args[6]))


def _conv_draw(d: fz.Draw, n: int) -> fz.Call:
    groups, dt = d.choice((1, 1, 2)), fz.dtype(d)
    cin, cout = groups * d.ints(1, 2), groups * d.ints(1, 2 if d.small else 3)
    kernel = [d.ints(1, 3) for _ in range(n)]
    spatial = [d.ints(k, k + (1 if d.small else 4)) for k in kernel]
    x = fz.layout(d, fz.specials(d, fz.uniform(d, (d.ints(0 if d.bool(0.1) else 1, 2), cin, *spatial), dt), p=0.05))
    w = fz.layout(d, fz.uniform(d, (cout, cin // groups, *kernel), dt))
    bias = fz.uniform(d, (cout,), dt) if d.bool() else None
    stride = d.choice((1, 2, [1] * n, tuple(d.ints(1, 3) for _ in range(n))))
    padding = d.choice((0, 1, "valid", "same", [1] * n)) if stride == 1 else d.choice((0, 1, [0] * n))
    args = (x, w, bias, stride, padding, d.choice((1, 2)) if padding in ("same", 1) else 1, groups)
    bad_dtype = {torch.float32: torch.float64}
    mutations = fz.tensor_mutations("input", 0) + fz.tensor_mutations("weight", 1)
    mutations += [
        ("weight", fz.TYPE, fz.arg(1, lambda d, t: t.to(bad_dtype.get(t.dtype, torch.float32)))),
        ("weight", fz.VALUE, fz.arg(1, lambda d, t: torch.cat([t, t], 1))),
        ("weight", fz.VALUE, _kernel_too_large),
        (
            "bias",
            fz.VALUE,
            lambda d, c: fz.Call(c.args[:2] + (torch.zeros(c.args[1].shape[0] + 1, dtype=dt),) + c.args[3:]),
        ),
        ("bias", fz.TYPE, fz.arg(2, lambda d, b: [0.0])),
        ("stride", fz.VALUE, fz.arg(3, lambda d, v: d.choice((0, [-1] * n)))),
        ("stride", fz.TYPE, fz.arg(3, lambda d, v: d.choice((1.0, [1] * (n + 1), "1")))),
        ("padding", fz.VALUE, fz.arg(4, lambda d, v: d.choice((-1, "full")))),
        ("padding", fz.TYPE, fz.arg(4, lambda d, v: [0.5] * n)),
        ("dilation", fz.VALUE, fz.arg(5, lambda d, v: 0)),
        ("groups", fz.VALUE, fz.arg(6, lambda d, v: d.choice((0, -2, 7)))),
        ("groups", fz.TYPE, fz.arg(6, lambda d, v: 1.0)),
    ]
    call = fz.mutate(d, fz.Call(args), mutations)
    if call.bad is None and d.bool(0.05):  # padding="same" needs stride 1
        call.args = call.args[:3] + (2, "same") + call.args[5:]
        call.bad, call.exc = "padding", fz.VALUE
    return call


_BACKWARD = registry.Backward(_setup, _conv_backward, _backward_fake)
for _name, _n, _ref, _public in (("conv2d", 2, reference.conv2d, conv2d), ("conv3d", 3, reference.conv3d, conv3d)):
    registry.declare(
        registry.OpDef(
            _name,
            _ref,
            _fake,
            triton="visionops.triton.conv",
            backward=_BACKWARD,
            autocast=registry.AUTOCAST_DTYPE,
            check=_check_schema(_name, _n),
            fuzz=fz.FuzzSpec(functools.partial(_conv_draw, n=_n), _public),
        )
    )
