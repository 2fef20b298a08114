"""SiamFC cross-correlation cases (baseline: the grouped convolution pysot and siamfc-pytorch run, in the same run).
Shapes: SiamFC training (xcorr, B 8) and tracking (one exemplar over a 3-scale pyramid), SiamRPN++ heads
(depthwise, B 28)."""

import torch
import torch.nn.functional as F

import visionops
from visionops.bench.case import Case


def _conv_xcorr(z, x):
    """siamfc-pytorch's _fast_xcorr: one exemplar per search image as a grouped conv; one exemplar for all (the scale
    pyramid of tracking) as a plain conv with one output channel."""
    b, c, hx, wx = x.shape
    if z.shape[0] == 1:
        return F.conv2d(x, z) * 0.001
    return F.conv2d(x.reshape(1, b * c, hx, wx), z, groups=b).transpose(0, 1) * 0.001


def _conv_depthwise(z, x):
    b, c, hx, wx = x.shape
    hz, wz = z.shape[2:]
    out = F.conv2d(x.reshape(1, b * c, hx, wx), z.expand(b, *z.shape[1:]).reshape(b * c, 1, hz, wz), groups=b * c)
    return out.reshape(b, c, hx - hz + 1, wx - wz + 1)


def _close(a, b):
    if isinstance(a, (tuple, list)):
        for p, q in zip(a, b):
            _close(p, q)
        return
    scale = max(b.abs().max().item(), 1.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * scale)


def _case(depthwise, b, c, hz, hx, bz=None, backward=False, backend="auto"):
    def make(device):
        g = torch.Generator().manual_seed(0)
        z = torch.randn(bz or b, c, hz, hz, generator=g).to(device)
        x = torch.randn(b, c, hx, hx, generator=g).to(device)
        if depthwise:
            ours = lambda z, x: visionops.depthwise_xcorr(z, x, backend=backend)  # noqa: E731
            base = _conv_depthwise
        else:
            ours = lambda z, x: visionops.xcorr(z, x, 0.001, backend=backend)  # noqa: E731
            base = _conv_xcorr
        if not backward:
            return (lambda: ours(z, x)), (lambda: base(z, x)), _close
        zg, xg = z.clone().requires_grad_(), x.clone().requires_grad_()
        go = torch.randn(b, c if depthwise else 1, hx - hz + 1, hx - hz + 1, generator=g).to(device)

        def step(fn):  # forward and backward w.r.t. both inputs, as in training where both branches learn
            return lambda: torch.autograd.grad(fn(zg, xg), (zg, xg), go)

        return step(ours), step(base), _close

    return make


def _work(depthwise, b, c, hz, hx, bz=None, backward=False):
    def fn():
        from visionops.bench import bounds

        return bounds.xcorr_work(b, c, hz, hx, bz=bz, depthwise=depthwise, backward=backward)

    return fn


_BASE = "PyTorch grouped conv"


def _row(op, name, args, kwargs=None, **case_kwargs):
    kwargs = kwargs or {}
    work = _work(*args, **kwargs)
    return Case(op, name, _case(*args, **kwargs), _BASE, tags={"work": work}, **case_kwargs)


CASES = [
    _row("xcorr", "fwd B8 256x6x6 over 256x22x22", (False, 8, 256, 6, 22), quick=True, target=3.0),
    _row(
        "xcorr",
        "fwd+bwd B8 256x6x6 over 256x22x22",
        (False, 8, 256, 6, 22),
        {"backward": True},
        target=3.0,
        gpu_target=2.0,
    ),
    _row("xcorr", "fwd+bwd B64 256x6x6 over 256x22x22", (False, 64, 256, 6, 22), {"backward": True}),
    _row("xcorr", "fwd 1 exemplar x 3 scales, 256x22x22", (False, 3, 256, 6, 22), {"bz": 1}),
    _row("depthwise_xcorr", "fwd B28 256x5x5 over 256x29x29", (True, 28, 256, 5, 29), quick=True),
    _row(
        "depthwise_xcorr",
        "fwd+bwd B28 256x5x5 over 256x29x29",
        (True, 28, 256, 5, 29),
        {"backward": True},
        target=2.0,
        gpu_target=3.0,
    ),
    _row("depthwise_xcorr", "fwd+bwd B32 256x7x7 over 256x31x31", (True, 32, 256, 7, 31), {"backward": True}),
]
