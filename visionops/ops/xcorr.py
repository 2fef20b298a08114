"""SiamFC cross-correlation: xcorr (the SiamFC head, summed over channels) and depthwise_xcorr (SiamRPN++).

One fused kernel per backend computes both, the channel reduction a compile-time parameter:
csrc/ops/cpu/xcorr_kernel.cpp, csrc/ops/cuda/xcorr_kernel.cu, visionops/triton/xcorr.py; math:
visionops/reference/xcorr.py; docs/xcorr.md.
"""

import functools

import torch
from torch import Tensor

from visionops import _fuzz as fz
from visionops import _registry as registry
from visionops import reference
from visionops.ops._checks import check_number, check_tensor

__all__ = ["xcorr", "depthwise_xcorr", "XCorr"]


def _check(op: str, z, x) -> None:
    """The arguments of ``op(z, x)``: 4-D floating tensors of one dtype and device, same channels, z no larger than
    x, z's batch 1 or x's."""
    for name, t in (("z", z), ("x", x)):
        check_tensor(name, t, floating=True)
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be a 4-D tensor [B, C, H, W], got shape {list(t.shape)}")
    if x.device != z.device:
        raise ValueError(f"{op}: x is on {x.device} but z is on {z.device}; they must be on the same device")
    if x.dtype != z.dtype:
        raise TypeError(f"{op}: x has dtype {x.dtype} but z has {z.dtype}; they must have the same dtype")
    if z.shape[1] != x.shape[1]:
        raise ValueError(f"{op}: z has {z.shape[1]} channels but x has {x.shape[1]}; they must be equal")
    if z.shape[2] < 1 or z.shape[3] < 1:
        raise ValueError(f"{op}: z must have a non-empty spatial size, got {list(z.shape)}")
    if z.shape[2] > x.shape[2] or z.shape[3] > x.shape[3]:
        raise ValueError(
            f"{op}: z ({z.shape[2]}x{z.shape[3]}) must not be larger than x ({x.shape[2]}x{x.shape[3]}) "
            "in either spatial dimension"
        )
    if z.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"{op}: z must have batch size 1 or x's ({x.shape[0]}), got {z.shape[0]}")


def xcorr(z: Tensor, x: Tensor, out_scale: float = 1.0, *, backend: str = "auto") -> Tensor:
    """SiamFC cross-correlation: the exemplar's features slid over the search region's, summed over channels.

    ``out[b, 0, u, v] = out_scale * sum_{c, i, j} z[b', c, i, j] * x[b, c, u + i, v + j]`` with b' = b, or 0 when
    z has batch size 1 (one exemplar against every search image, as in multi-scale tracking). Equal to
    ``F.conv2d(x.reshape(1, B * C, Hx, Wx), z, groups=B).transpose(0, 1) * out_scale`` for Bz == B, in one kernel.

    Args:
        z: exemplar features, Tensor[Bz, C, Hz, Wz], Bz == B or 1.
        x: search features, Tensor[B, C, Hx, Wx], Hx >= Hz and Wx >= Wz; same dtype and device as z.
        out_scale: multiplies the response (SiamFC uses 0.001).

    Returns:
        Tensor[B, 1, Hx - Hz + 1, Wx - Wz + 1] in the inputs' dtype (half inputs accumulate in float32).
        Differentiable w.r.t. z and x. channels_last inputs are read in place. Under ``torch.autocast`` it runs in
        the autocast dtype, as convolutions do.
    """
    _check("xcorr", z, x)
    scale = check_number("out_scale", out_scale)
    return registry.dispatch("xcorr", backend, x.device)(z, x, scale)


def depthwise_xcorr(z: Tensor, x: Tensor, *, backend: str = "auto") -> Tensor:
    """Depthwise cross-correlation (SiamRPN++): each channel of z slid over the same channel of x.

    ``out[b, c, u, v] = sum_{i, j} z[b', c, i, j] * x[b, c, u + i, v + j]`` (b' as in :func:`xcorr`): the grouped
    convolution with groups = B * C, in one kernel. Note the argument order: exemplar first, as in :func:`xcorr`;
    pysot's ``xcorr_depthwise(x, kernel)`` takes the search features first.

    Args:
        z: exemplar (kernel) features, Tensor[Bz, C, Hz, Wz], Bz == B or 1.
        x: search features, Tensor[B, C, Hx, Wx], Hx >= Hz and Wx >= Wz; same dtype and device as z.

    Returns:
        Tensor[B, C, Hx - Hz + 1, Wx - Wz + 1] in the inputs' dtype, channels_last when x is. Differentiable w.r.t.
        z and x; autocast as :func:`xcorr`.
    """
    _check("depthwise_xcorr", z, x)
    return registry.dispatch("depthwise_xcorr", backend, x.device)(z, x)


class XCorr(torch.nn.Module):
    """The SiamFC head: ``xcorr(z, x, out_scale)`` plus a learnable scalar bias (as siamfc-pytorch's head)."""

    def __init__(self, out_scale: float = 0.001, bias: bool = True, *, backend: str = "auto") -> None:
        super().__init__()
        self.out_scale = check_number("out_scale", out_scale)
        self.bias = torch.nn.Parameter(torch.zeros(1)) if bias else None
        self.backend = backend

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        out = xcorr(z, x, self.out_scale, backend=self.backend)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def extra_repr(self) -> str:
        return f"out_scale={self.out_scale}, bias={self.bias is not None}"


# ---- declarations: fake kernels, autograd, autocast (every backend) -----------------------------------------------


def _out_format(t: Tensor) -> torch.memory_format:
    """The memory format every backend gives an output following ``t``: channels_last when t is channels_last and not
    also plainly contiguous (the same rule in C++: is_contiguous(ChannelsLast) && !is_contiguous())."""
    cl = t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _out_shape(z: Tensor, x: Tensor, channels: int):
    return (x.shape[0], channels, x.shape[2] - z.shape[2] + 1, x.shape[3] - z.shape[3] + 1)


def _xcorr_fake(z, x, out_scale=1.0):
    return x.new_empty(_out_shape(z, x, 1))


def _depthwise_fake(z, x):
    return x.new_empty(_out_shape(z, x, x.shape[1])).contiguous(memory_format=_out_format(x))


def _grads_fake(grad, z, x, *args):
    return (
        torch.empty_like(z, memory_format=_out_format(z)),
        torch.empty_like(x, memory_format=_out_format(x)),
    )


def _setup(ctx, inputs, output):
    z, x = inputs[:2]
    ctx.save_for_backward(z, x)
    ctx.args = tuple(inputs[2:])


def _xcorr_backward(backward_op, ctx, grad):
    z, x = ctx.saved_tensors
    gz, gx = backward_op(grad, z, x, *ctx.args)
    return (gz, gx, *(None for _ in ctx.args))


def _xcorr_draw(d: fz.Draw, depthwise: bool) -> fz.Call:
    b, c, dt = d.ints(0 if d.bool(0.1) else 1, 2), d.ints(1, 2 if d.small else 4), fz.dtype(d)
    hz, wz = d.ints(1, 3), d.ints(1, 3)
    hx, wx = hz + d.ints(0, 2 if d.small else 6), wz + d.ints(0, 2 if d.small else 6)
    z = fz.layout(d, fz.specials(d, fz.uniform(d, (d.choice((1, b)), c, hz, wz), dt), p=0.05))
    x = fz.overlapping(d, fz.layout(d, fz.uniform(d, (b, c, hx, wx), dt)))
    args = (z, x) if depthwise else (z, x, d.choice((1.0, 0.001, -2.0)))
    other = {torch.float32: torch.float64}
    mutations = fz.tensor_mutations("z", 0) + fz.tensor_mutations("x", 1)
    mutations += [
        ("x", fz.TYPE, fz.arg(1, lambda d, t: t.to(other.get(t.dtype, torch.float32)))),
        ("z", fz.VALUE, fz.arg(0, lambda d, t: torch.cat([t, t], 1))),
        ("z", fz.VALUE, fz.arg(0, lambda d, t: t.new_zeros((t.shape[0], t.shape[1], 99, 1)))),
        ("z", fz.VALUE, fz.arg(0, lambda d, t: t.new_zeros((t.shape[0], t.shape[1], 0, 2)))),
        ("z", fz.VALUE, fz.arg(0, lambda d, t: t.new_zeros((3, *t.shape[1:])))),
    ]
    if not depthwise:
        mutations.append(("out_scale", fz.TYPE, fz.arg(2, lambda d, v: "1")))
    call = fz.mutate(d, fz.Call(args), mutations)
    if call.bad == "z" and isinstance(call.args[1], Tensor) and call.args[1].shape[0] == 3:  # batch 3 is x's
        call.bad, call.exc = None, ()
    return call


_BACKWARD = registry.Backward(_setup, _xcorr_backward, _grads_fake)
for _name, _ref, _fake, _public in (
    ("xcorr", reference.xcorr, _xcorr_fake, xcorr),
    ("depthwise_xcorr", reference.depthwise_xcorr, _depthwise_fake, depthwise_xcorr),
):
    registry.declare(
        registry.OpDef(
            _name,
            _ref,
            _fake,
            triton="visionops.triton.xcorr",
            backward=_BACKWARD,
            autocast=registry.AUTOCAST_DTYPE,
            check=lambda z, x, *args, _op=_name: _check(_op, z, x),
            fuzz=fz.FuzzSpec(functools.partial(_xcorr_draw, depthwise=_name == "depthwise_xcorr"), _public),
        )
    )
