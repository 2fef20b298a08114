"""Convolution cases (baseline: F.conv2d / F.conv3d in the same run, whichever backend PyTorch picks for the shape).

Shapes: DeepLab's ASPP branches (3x3 at dilation 6, 12, 18 on a 256-channel 64x64 map), C3D's conv3a and conv4a
(3x3x3, padding 1), and float64 cases where PyTorch has no MKL-DNN/cuDNN path. Each case's name records the backend
PyTorch chose (``torch._C._select_conv_backend``) and the case's GFLOP (forward: 2 * B * Cout * prod(out) * Cin / groups
* prod(kernel); forward+backward three times that); ``tags`` carry both, so GFLOP/s = gflop / (ms / 1000) / 1000.
"""

import math

import torch
import torch.nn.functional as F

import visionops
from visionops.bench import bounds
from visionops.bench.case import Case

_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def _out_size(size, kernel, padding, dilation):
    return [s + 2 * p - d * (k - 1) for s, k, p, d in zip(size, kernel, padding, dilation)]


def _gflop(shape, cout, kernel, padding, dilation, backward):
    fwd = (
        2 * shape[0] * cout * shape[1] * math.prod(kernel) * math.prod(_out_size(shape[2:], kernel, padding, dilation))
    )
    return fwd * (3 if backward else 1) / 1e9


def _pytorch_backend(shape, cout, kernel, padding, dilation, dtype, device, channels_last):
    """The convolution backend PyTorch picks for these arguments on ``device`` (needs real tensors: meta tensors give
    "Overrideable"), or "?" where the device is absent."""
    if device == "cuda" and not torch.cuda.is_available():
        return "?"
    x = torch.empty(shape, dtype=dtype, device=device)
    w = torch.empty(cout, shape[1], *kernel, dtype=dtype, device=device)
    if channels_last:
        x, w = x.contiguous(memory_format=_FORMATS[x.dim()]), w.contiguous(memory_format=_FORMATS[x.dim()])
    n = len(kernel)
    chosen = torch._C._select_conv_backend(x, w, None, [1] * n, padding, dilation, False, [0] * n, 1)
    return str(chosen).split(".")[-1]


def _close(tol):
    def check(a, b):
        if isinstance(a, (tuple, list)):
            for p, q in zip(a, b):
                check(p, q)
            return
        scale = max(b.abs().max().item(), 1.0)
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale)

    return check


def _case(
    label,
    shape,
    cout,
    kernel,
    padding,
    dilation,
    *,
    dtype,
    device,
    backward,
    backend="auto",
    bias=False,
    channels_last=False,
    quick=False,
):
    n = len(kernel)
    chosen = _pytorch_backend(shape, cout, kernel, padding, dilation, dtype, device, channels_last)
    gflop = _gflop(shape, cout, kernel, padding, dilation, backward)
    layout = " channels_last" if channels_last else ""
    what = "fwd+bwd" if backward else "fwd"
    where = f" {backend}" if device == "cuda" else ""
    name = (
        f"{label} {what}{where} {str(dtype).replace('torch.', '')}{layout} {'x'.join(map(str, shape))}->{cout} "
        f"[PyTorch: {chosen}, {gflop:.2f} GFLOP]"
    )
    ours_fn = visionops.conv2d if n == 2 else visionops.conv3d
    base_fn = F.conv2d if n == 2 else F.conv3d
    tol = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4

    def make(dev):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g).to(dev, dtype)
        w = (torch.randn(cout, shape[1], *kernel, generator=g) / math.sqrt(shape[1] * math.prod(kernel))).to(dev, dtype)
        b = torch.randn(cout, generator=g).to(dev, dtype) if bias else None
        if channels_last:
            x, w = x.contiguous(memory_format=_FORMATS[x.dim()]), w.contiguous(memory_format=_FORMATS[x.dim()])

        def ours(x, w, b):
            return ours_fn(x, w, b, 1, padding, dilation, backend=backend)

        def base(x, w, b):
            return base_fn(x, w, b, 1, padding, dilation)

        if not backward:
            return (lambda: ours(x, w, b)), (lambda: base(x, w, b)), _close(tol)
        leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
        args = leaves if bias else [*leaves, None]
        out_shape = (shape[0], cout, *_out_size(shape[2:], kernel, padding, dilation))
        go = torch.randn(out_shape, generator=g).to(dev, dtype)
        if channels_last:
            go = go.contiguous(memory_format=_FORMATS[go.dim()])

        def step(fn):  # training: the gradients of the input, the weight (and the bias)
            return lambda: torch.autograd.grad(fn(*args), leaves, go)

        return step(ours), step(base), _close(tol)

    op_name = "conv2d" if n == 2 else "conv3d"
    out_spatial = _out_size(shape[2:], kernel, padding, dilation)
    work = bounds.conv_work(shape, cout, kernel, out_spatial, itemsize=dtype.itemsize, backward=backward)
    tags = {"gflop": gflop, "pytorch_backend": chosen, "work": lambda: work}
    return Case(op_name, name, make, f"F.{op_name}", quick=quick, devices=(device,), tags=tags)


# (label, shape, Cout, kernel, padding, dilation, bias)
ASPP = [(f"ASPP d{d}", (1, 256, 64, 64), 256, (3, 3), (d, d), (d, d), False) for d in (6, 12, 18)]
C3D = [
    ("C3D conv3a", (1, 128, 8, 28, 28), 256, (3, 3, 3), (1, 1, 1), (1, 1, 1), True),
    ("C3D conv4a", (1, 256, 4, 14, 14), 512, (3, 3, 3), (1, 1, 1), (1, 1, 1), True),
]
FLOAT64 = [
    ("float64 dilated", (1, 64, 64, 64), 64, (3, 3), (2, 2), (2, 2), False),
    ("float64 3-D", (1, 64, 8, 28, 28), 64, (3, 3, 3), (1, 1, 1), (1, 1, 1), True),
]


def _cpu_cases():
    out = []
    for shapes, dtype, quick in ((ASPP + C3D, torch.float32, False), (FLOAT64, torch.float64, True)):
        for label, shape, cout, k, p, d, bias in shapes:
            for backward in (False, True):
                out.append(
                    _case(
                        label,
                        shape,
                        cout,
                        k,
                        p,
                        d,
                        dtype=dtype,
                        device="cpu",
                        backward=backward,
                        bias=bias,
                        quick=quick and not backward and len(k) == 2,
                    )
                )
    return out


def _gpu_cases():
    out = []
    for label, shape, cout, k, p, d, bias in ASPP + C3D:
        for channels_last in (True, False):
            for backend in ("triton", "cpp"):
                for backward in (False, True):
                    out.append(
                        _case(
                            label,
                            shape,
                            cout,
                            k,
                            p,
                            d,
                            dtype=torch.bfloat16,
                            device="cuda",
                            backward=backward,
                            backend=backend,
                            bias=bias,
                            channels_last=channels_last,
                            quick=label in ("ASPP d6", "C3D conv3a") and channels_last,
                        )
                    )
    return out


CASES = _cpu_cases() + _gpu_cases()
