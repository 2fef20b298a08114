"""The Triton convolution kernels called directly (``torch.ops.visionops.triton_conv2d`` / ``triton_conv3d`` and
their backwards), interpreted on CPU tensors, against F.conv2d / F.conv3d and autograd through them in float64.

Each case is a few hundred output elements at most: the interpreter runs a kernel's programs one by one in numpy.
The family's conformance tests (tests/test_conv.py) run the same ops through the public API.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import visionops.triton.conv as tconv  # noqa: E402

TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 8e-2}

# (dims, batch, in channels, out channels, input size, kernel size, stride, padding, dilation, groups)
CASES = [
    (2, 2, 4, 6, (7, 6), (3, 3), 1, 1, 1, 1),
    (2, 1, 4, 4, (7, 5), (3, 2), 2, 2, 2, 2),  # stride, dilation, padding past the kernel's reach, groups
    (2, 2, 6, 6, (5, 6), (3, 3), 2, 1, 1, 6),  # depthwise (the per-channel kernel), strided
    (2, 1, 33, 33, (3, 4), (3, 3), 2, 1, 1, 33),  # depthwise, 32-channel blocks and a partial one
    (2, 1, 3, 6, (6, 5), (2, 2), (2, 1), (0, 1), (1, 2), 3),  # depthwise with a channel multiplier, mixed geometry
    (2, 1, 20, 18, (4, 3), (3, 3), 1, 1, 1, 1),  # enough channels for the tap-by-tap K order
    (2, 1, 34, 20, (3, 3), (1, 3), 1, (0, 1), 1, 2),  # tap-by-tap with a partial channel block per group
    (3, 1, 4, 4, (4, 5, 3), (2, 3, 2), 2, 1, 1, 2),
    (3, 2, 3, 3, (3, 4, 4), (3, 1, 2), 1, (1, 0, 1), (1, 1, 2), 3),  # depthwise 3D
    (3, 1, 2, 4, (3, 3, 4), (2, 2, 1), (1, 2, 1), 1, (2, 1, 1), 1),
]


def _pair(v, n):
    return [v] * n if isinstance(v, int) else list(v)


def _run(case, dtype, channels_last, bias=True, output_mask=(True, True, True), seed=0):
    nd, b, cin, cout, size, k, s, p, d, g = case
    s, p, d = _pair(s, nd), _pair(p, nd), _pair(d, nd)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, cin, *size, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(cout, cin // g, *k, generator=gen, dtype=torch.float64).to(dtype)
    bb = torch.randn(cout, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    if channels_last:
        fmt = torch.channels_last if nd == 2 else torch.channels_last_3d
        x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    ops = torch.ops.visionops
    fwd, bwd = (
        (ops.triton_conv2d, ops.triton_conv2d_backward) if nd == 2 else (ops.triton_conv3d, ops.triton_conv3d_backward)
    )
    conv = F.conv2d if nd == 2 else F.conv3d

    out = fwd(x, w, bb, s, p, d, g)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = bb.double().requires_grad_() if bias else None
    ref = conv(x64, w64, b64, s, p, d, g)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to(dtype)
    ref.backward(grad.double())
    grads = bwd(grad, x, w, s, p, d, g, list(output_mask))
    return (x, w, bb, out, grads), (ref, x64.grad, w64.grad, b64.grad if bias else None)


def _close(got, want, dtype):
    tol = TOL[dtype] * max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want.detach(), rtol=0, atol=tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[4])) + f"-k{c[5]}-g{c[9]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_forward_and_gradients(case, dtype):
    channels_last = dtype == torch.float32 or case[0] == 3  # both layouts over the cases, cheaply
    (x, w, _, out, (gx, gw, gb)), (ref, rx, rw, rb) = _run(case, dtype, channels_last)
    for got, want in ((out, ref), (gx, rx), (gw, rw), (gb, rb)):
        assert got.dtype == dtype
        _close(got, want, dtype)
    fmt = tconv._format(x)
    assert out.is_contiguous(memory_format=fmt) and gx.is_contiguous(memory_format=fmt)
    assert gw.is_contiguous(memory_format=tconv._format(w)) and gb.is_contiguous()


def test_float16():
    (_, _, _, out, (gx, gw, gb)), (ref, rx, rw, rb) = _run(CASES[1], torch.float16, False)
    for got, want in ((out, ref), (gx, rx), (gw, rw), (gb, rb)):
        _close(got, want, torch.float16)


def test_output_mask_and_no_bias():
    case = CASES[0]
    (x, _, _, out, (gx, gw, gb)), (ref, rx, rw, _) = _run(
        case, torch.float32, False, bias=False, output_mask=(False, True, False)
    )
    _close(out, ref, torch.float32)
    _close(gw, rw, torch.float32)
    for t in (gx, gb):
        assert t.shape == (0,) and t.dtype == x.dtype
    (_, _, _, _, (gx, gw, gb)), (_, rx, _, rb) = _run(case, torch.float32, False, output_mask=(True, False, True))
    _close(gx, rx, torch.float32)
    _close(gb, rb, torch.float32)
    assert gw.shape == (0,)


@pytest.mark.parametrize("mask", [(False, True, True), (False, False, True)])
def test_split_k(monkeypatch, mask):
    """wgrad split into partial sums (forced here by a small K per split): the same gradients."""
    monkeypatch.setattr(tconv, "_MIN_K_PER_SPLIT", 16)
    case = (2, 2, 2, 4, (9, 8), (3, 3), 1, 1, 1, 2)
    gw_parts = []
    real = tconv._conv_wgrad_kernel

    class Spy:
        def __getitem__(self, grid):
            gw_parts.append(grid[2])
            return real[grid]

    monkeypatch.setattr(tconv, "_conv_wgrad_kernel", Spy())
    for dtype in (torch.float64, torch.bfloat16):
        (_, _, _, _, (_, gw, gb)), (_, _, rw, rb) = _run(case, dtype, True, output_mask=mask)
        if mask[1]:
            _close(gw, rw, dtype)
        _close(gb, rb, dtype)
    assert all(n > 2 for n in gw_parts)  # groups x splits: more than one split ran


def test_strided_views():
    """Inputs neither contiguous nor channels-last (a slice of a wider tensor) are read in place."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(2, 8, 7, 9, generator=gen, dtype=torch.float64)
    x = base[:, 1:7:2, :, 1:8]
    w = torch.randn(4, 3, 3, 5, generator=gen, dtype=torch.float64)[:, :, :, ::2]
    b = torch.randn(8, generator=gen, dtype=torch.float64)[::2]
    out = torch.ops.visionops.triton_conv2d(x, w, b, [1, 2], [1, 0], [1, 1], 1)
    torch.testing.assert_close(out, F.conv2d(x, w, b, [1, 2], [1, 0]))
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).transpose(2, 3).contiguous().transpose(2, 3)
    gx, gw, _ = torch.ops.visionops.triton_conv2d_backward(g, x, w, [1, 2], [1, 0], [1, 1], 1, [True, True, False])
    rx, rw = torch.autograd.grad(F.conv2d(x.requires_grad_(), w.requires_grad_(), None, [1, 2], [1, 0]), (x, w), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_empty():
    ops = torch.ops.visionops
    x, w, b = torch.randn(0, 4, 5, 5), torch.randn(6, 2, 3, 3), torch.randn(6)
    out = ops.triton_conv2d(x, w, b, [1, 1], [0, 0], [1, 1], 2)
    assert out.shape == (0, 6, 3, 3)
    gx, gw, gb = ops.triton_conv2d_backward(out, x, w, [1, 1], [0, 0], [1, 1], 2, [True, True, True])
    assert gx.shape == x.shape and gw.shape == w.shape and gb.shape == (6,)
    assert not gw.any() and not gb.any()
    x3, w3 = torch.randn(1, 2, 3, 3, 3), torch.randn(0, 2, 1, 1, 1)
    assert ops.triton_conv3d(x3, w3, None, [1] * 3, [0] * 3, [1] * 3, 1).shape == (1, 0, 3, 3, 3)


def test_no_input_channels():
    """Cin = 0 (and groups 1): the output is the bias, grad_bias the summed grad, the other gradients empty."""
    x, w, b = torch.randn(2, 0, 4, 4, dtype=torch.float64), torch.randn(3, 0, 2, 2, dtype=torch.float64), torch.randn(3)
    b = b.double()
    out = torch.ops.visionops.triton_conv2d(x, w, b, [1, 1], [0, 0], [1, 1], 1)
    torch.testing.assert_close(out, b[:, None, None].expand(2, 3, 3, 3))
    g = torch.randn(out.shape, dtype=torch.float64)
    gx, gw, gb = torch.ops.visionops.triton_conv2d_backward(g, x, w, [1, 1], [0, 0], [1, 1], 1, [True, True, True])
    assert gx.shape == x.shape and gw.shape == w.shape
    torch.testing.assert_close(gb, g.sum((0, 2, 3)))
