"""SiamFC cross-correlation: the xcorr and depthwise_xcorr conformance suites (every backend against the float64
reference, gradients, registrations, bad input), then the grouped convolution everyone runs today (forward and both
gradients), thread counts, autocast, upstream gradients of any stride, and the XCorr module."""

import pytest
import torch
import torch.nn.functional as F

import visionops
from visionops import reference
from visionops.testing import DEVICES, Bad, KernelDtypes, OpConformance, backends_for, num_threads
from visionops.testing import dtype_name as _dn

# name -> (Bz or None for Bz == B, B, C, (Hz, Wz), (Hx, Wx)) per size
SHAPES = {
    "siamfc": {"full": (None, 3, 16, (6, 6), (22, 22)), "small": (None, 2, 4, (3, 3), (7, 7))},
    "one_exemplar": {"full": (1, 3, 16, (6, 6), (22, 22)), "small": (1, 3, 4, (3, 3), (7, 7))},
    "odd": {"full": (None, 2, 5, (3, 5), (8, 11)), "small": (None, 2, 3, (2, 3), (5, 6))},
    "z_as_large_as_x": {"full": (None, 2, 7, (9, 8), (9, 8)), "small": (1, 2, 3, (4, 5), (4, 5))},
    "one_channel": {"full": (None, 4, 1, (5, 5), (17, 17)), "small": (None, 2, 1, (2, 2), (6, 5))},
}
TINY = [(None, 2, 2, (2, 3), (4, 5)), (1, 3, 2, (2, 2), (4, 4)), (None, 1, 1, (3, 3), (3, 3))]


def _make(shape, device, dtype, generator):
    bz, b, c, (hz, wz), (hx, wx) = shape
    z = torch.randn(b if bz is None else bz, c, hz, wz, generator=generator, dtype=torch.float64)
    x = torch.randn(b, c, hx, wx, generator=generator, dtype=torch.float64)
    return z.to(device, dtype), x.to(device, dtype)


def _tolerances(terms_scale):
    # sums of up to a few hundred products of N(0, 1) values (magnitude ~20): float32 accumulation error is ~1e-5
    # relative, half outputs are rounded once (the kernels accumulate in float32)
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=1e-4 * terms_scale),
        torch.float16: dict(rtol=2e-3, atol=2e-2 * terms_scale),
        torch.bfloat16: dict(rtol=1e-2, atol=1e-1 * terms_scale),
    }


def _conv_xcorr(z, x, out_scale):
    """What pysot / siamfc-pytorch run: the batch folded into channels, one grouped convolution."""
    b, c, hx, wx = x.shape
    z = z.expand(b, *z.shape[1:])
    return F.conv2d(x.reshape(1, b * c, hx, wx), z, groups=b).transpose(0, 1) * out_scale


def _conv_depthwise(z, x):
    b, c, hx, wx = x.shape
    hz, wz = z.shape[2:]
    z = z.expand(b, *z.shape[1:])
    out = F.conv2d(x.reshape(1, b * c, hx, wx), z.reshape(b * c, 1, hz, wz), groups=b * c)
    return out.reshape(b, c, hx - hz + 1, wx - wz + 1)


class _XCorrBase(OpConformance):
    configs = {name: name for name in SHAPES}
    layouts = ("contiguous", "non_contiguous", "channels_last")
    has_grad = True
    grad_inputs = (0, 1)
    gradcheck_configs = None
    check_config = "siamfc"

    def _cases_matches(self, test, dtypes, config_names=None):
        # a one-channel tensor is channels_last and contiguous at once: that pair has no layout to test
        return [
            p for p in super()._cases_matches(test, dtypes, config_names) if "channels_last-one_channel" not in p.id
        ]

    def make_inputs(self, device, dtype, generator, size, config):
        shape = TINY[generator.initial_seed() % len(TINY)] if size == "tiny" else SHAPES[config][size]
        return self._extra(*_make(shape, device, dtype, generator))

    def _extra(self, z, x):
        return z, x

    def empty_inputs(self, device, dtype):
        def t(*shape):
            return torch.zeros(*shape, device=device, dtype=dtype)

        return {
            "batch0": self._extra(t(0, 3, 3, 3), t(0, 3, 7, 7)),
            "batch0_one_exemplar": self._extra(t(1, 3, 3, 3), t(0, 3, 7, 7)),
        }

    def _bad(self, call, opname):
        z, x = _make(SHAPES["siamfc"]["small"], "cpu", torch.float32, torch.Generator().manual_seed(0))
        rows = [
            Bad("z_3d", lambda b: call(z[0], x, b), ValueError, "z must be a 4-D"),
            Bad("x_5d", lambda b: call(z, x[None], b), ValueError, "x must be a 4-D"),
            Bad("channels_differ", lambda b: call(z[:, :2], x, b), ValueError, "z has 2 channels but x has 4"),
            Bad("z_taller_than_x", lambda b: call(torch.zeros(2, 4, 8, 3), x, b), ValueError, "z .* larger than x"),
            Bad("z_wider_than_x", lambda b: call(torch.zeros(2, 4, 3, 8), x, b), ValueError, "z .* larger than x"),
            Bad("z_batch_3_x_batch_2", lambda b: call(z[:1].expand(3, -1, -1, -1), x, b), ValueError, "batch size"),
            Bad("z_empty_spatial", lambda b: call(z[:, :, :0], x, b), ValueError, "z must have a non-empty"),
            Bad("z_other_device", lambda b: call(z.to("meta"), x, b), ValueError, "device"),
            Bad("x_other_dtype", lambda b: call(z, x.double(), b), TypeError, "dtype"),
            Bad("z_integer", lambda b: call(z.long(), x, b), TypeError, "z must be a floating"),
            Bad("x_not_a_tensor", lambda b: call(z, x.tolist(), b), TypeError, "x must be a torch.Tensor"),
        ]
        op = getattr(torch.ops.visionops, opname)
        args = (0.5,) if opname == "xcorr" else ()
        rows += [  # the kernels check for themselves (C++ callers, torch.ops users)
            Bad("op_z_3d", lambda b: op(z[0], x, *args), ValueError, f"{opname}.*z", ("cpp",)),
            Bad("op_channels_differ", lambda b: op(z[:, :2], x, *args), ValueError, f"{opname}.*channel", ("cpp",)),
            Bad("op_z_larger", lambda b: op(torch.zeros(2, 4, 8, 8), x, *args), ValueError, f"{opname}.*z", ("cpp",)),
            Bad("op_batch", lambda b: op(z[:1].expand(3, -1, -1, -1), x, *args), ValueError, "batch", ("cpp",)),
            Bad("op_dtype", lambda b: op(z, x.double(), *args), TypeError, f"{opname}.*dtype", ("cpp",)),
        ]
        return rows


class TestXCorr(_XCorrBase):
    op = "xcorr"
    covers = ("XCorr",)
    tolerances = _tolerances(1.0)

    def _extra(self, z, x):
        return z, x, 0.25

    def fn(self, z, x, out_scale, *, backend):
        return visionops.xcorr(z, x, out_scale, backend=backend)

    def reference(self, z, x, out_scale):
        return reference.xcorr(z, x, out_scale)

    def bad_inputs(self):
        rows = self._bad(lambda z, x, b: visionops.xcorr(z, x, 0.5, backend=b), "xcorr")
        z, x = _make(SHAPES["siamfc"]["small"], "cpu", torch.float32, torch.Generator().manual_seed(0))
        rows.append(Bad("out_scale_string", lambda b: visionops.xcorr(z, x, "big", backend=b), TypeError, "out_scale"))
        return rows


class TestDepthwiseXCorr(_XCorrBase):
    op = "depthwise_xcorr"
    tolerances = _tolerances(0.25)

    def fn(self, z, x, *, backend):
        return visionops.depthwise_xcorr(z, x, backend=backend)

    def reference(self, z, x):
        return reference.depthwise_xcorr(z, x)

    def bad_inputs(self):
        return self._bad(lambda z, x, b: visionops.depthwise_xcorr(z, x, backend=b), "depthwise_xcorr")


# ---- beyond the conformance base -----------------------------------------------------------------------------------

OPS = {
    "xcorr": (lambda z, x, backend: visionops.xcorr(z, x, 0.5, backend=backend), lambda z, x: _conv_xcorr(z, x, 0.5)),
    "depthwise_xcorr": (lambda z, x, backend: visionops.depthwise_xcorr(z, x, backend=backend), _conv_depthwise),
}


def _cases():
    return [(op, d, b) for op in OPS for d in DEVICES for b in backends_for(d, op)]


def _grads(out, z, x, seed=3):
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, (z, x), go.to(out))


@pytest.mark.parametrize("config", ["siamfc", "one_exemplar", "odd", "z_as_large_as_x", "one_channel"])
@pytest.mark.parametrize("op,device,backend", _cases())
def test_matches_grouped_conv(op, device, backend, config):
    """Forward and both gradients equal the grouped convolution pysot and siamfc-pytorch run (float64)."""
    size = "small" if backend == "triton" and device == "cpu" else "full"
    z, x = _make(SHAPES[config][size], device, torch.float64, torch.Generator().manual_seed(1))
    fn, conv = OPS[op]
    z1, x1 = z.clone().requires_grad_(), x.clone().requires_grad_()
    z2, x2 = z.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = fn(z1, x1, backend), conv(z2, x2)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for got, exp, name in zip(_grads(out, z1, x1), _grads(expected, z2, x2), ("z", "x")):
        assert got.shape == exp.shape, name
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("config", ["siamfc", "one_exemplar"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=_dn)
@pytest.mark.parametrize("op", list(OPS))
def test_cpu_same_bits_at_any_thread_count(op, dtype, config):
    """The C++ CPU kernels split the work the same way at any thread count: forward and gradients bitwise equal
    (the Bz == 1 exemplar gradient, a reduction over the batch, included)."""
    z, x = _make((SHAPES[config]["full"][0], 9, 32, (6, 6), (22, 22)), "cpu", dtype, torch.Generator().manual_seed(2))
    fn = OPS[op][0]
    results = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            zz, xx = z.clone().requires_grad_(), x.clone().requires_grad_()
            out = fn(zz, xx, "cpp")
            results.append((out, *_grads(out, zz, xx)))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("op,device,backend", _cases())
def test_upstream_gradient_of_any_stride(op, device, backend):
    """out.sum() hands the backward an expanded (stride 0) gradient, a slice a strided one."""
    z, x = _make(SHAPES["odd"]["small"], device, torch.float64, torch.Generator().manual_seed(4))
    fn = OPS[op][0]
    for reduce in (lambda o: o.sum(), lambda o: (o[..., ::2] * 3).sum(), lambda o: o.transpose(2, 3).cumsum(2).sum()):
        z1, x1 = z.clone().requires_grad_(), x.clone().requires_grad_()
        z2, x2 = z.clone().requires_grad_(), x.clone().requires_grad_()
        g1 = torch.autograd.grad(reduce(fn(z1, x1, backend)), (z1, x1))
        g2 = torch.autograd.grad(reduce(fn(z2, x2, "reference")), (z2, x2))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("op,device,backend", [c for c in _cases() if c[2] != "reference"])
def test_memory_format_follows_inputs(op, device, backend):
    """channels_last in, channels_last out (depthwise; xcorr has one channel) and channels_last gradients, as the
    fake kernels say; the values equal those of contiguous inputs."""
    z, x = _make(SHAPES["siamfc"]["small"], device, torch.float32, torch.Generator().manual_seed(5))
    fn = OPS[op][0]
    zc = z.contiguous(memory_format=torch.channels_last).requires_grad_()
    xc = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    out = fn(zc, xc, backend)
    if op == "depthwise_xcorr":
        assert out.is_contiguous(memory_format=torch.channels_last)
    gz, gx = torch.autograd.grad(out, (zc, xc), torch.ones_like(out))
    assert gz.is_contiguous(memory_format=torch.channels_last) and gx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, fn(z, x, backend), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("op,device,backend", _cases())
def test_zero_channels_give_zeros(op, device, backend):
    z, x = torch.zeros(2, 0, 3, 3, device=device), torch.zeros(2, 0, 5, 6, device=device)
    out = OPS[op][0](z, x, backend)
    assert out.shape == (2, 1 if op == "xcorr" else 0, 3, 4) and not out.any()


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=_dn)
@pytest.mark.parametrize("op,device,backend", [c for c in _cases() if c[2] != "reference"])
def test_autocast_runs_in_the_autocast_dtype(op, device, backend, autocast_dtype):
    """Under torch.autocast the kernels receive the autocast dtype, as convolutions do (whichever dtype the region
    asks for); float64 stays float64."""
    z, x = _make(SHAPES["siamfc"]["small"], device, torch.float32, torch.Generator().manual_seed(6))
    fn, conv = OPS[op]
    with KernelDtypes() as mode, torch.autocast(device, dtype=autocast_dtype):
        out = fn(z, x, backend)
        expected = conv(z, x)
    assert out.dtype == expected.dtype == autocast_dtype
    assert set(mode.seen[f"visionops::{'triton_' if backend == 'triton' else ''}{op}"]) == {autocast_dtype}
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=0.1)
    with torch.autocast(device, dtype=autocast_dtype):
        assert fn(z.double(), x.double(), backend).dtype == torch.float64


@pytest.mark.parametrize("op,device,backend", [c for c in _cases() if c[2] != "reference"])
def test_double_backward_is_refused(op, device, backend):
    z, x = _make(SHAPES["odd"]["small"], device, torch.float64, torch.Generator().manual_seed(7))
    z.requires_grad_()
    out = OPS[op][0](z, x, backend)
    (gz,) = torch.autograd.grad(out.square().sum(), z, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gz.sum().backward()


def test_xcorr_module_is_the_siamfc_head():
    """XCorr(out_scale) = xcorr * out_scale + a learnable scalar bias; the bias gets its gradient."""
    z, x = _make(SHAPES["siamfc"]["full"], "cpu", torch.float32, torch.Generator().manual_seed(8))
    head = visionops.XCorr(out_scale=0.001)
    with torch.no_grad():
        head.bias.fill_(0.5)
    out = head(z, x)
    torch.testing.assert_close(out, _conv_xcorr(z, x, 0.001) + 0.5, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert head.bias.grad.item() == pytest.approx(out.numel())
    assert "out_scale=0.001" in repr(head)
