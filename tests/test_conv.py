"""Convolution: the conv2d and conv3d conformance suites (every backend against the float64 reference, gradients,
registrations, bad input), then forward and every gradient against F.conv2d / F.conv3d over seeded random
configurations, the modules against torch.nn's, autocast, double backward, memory formats and output masks."""

import importlib
import importlib.util
import random

import pytest
import torch
import torch.nn.functional as F

import visionops
from visionops import reference
from visionops.testing import DEVICES, Bad, KernelDtypes, OpConformance, backends_for, interpreted, num_threads
from visionops.testing import dtype_name as _dn
from visionops.testing import _Record

FORMATS = {2: torch.channels_last, 3: torch.channels_last_3d}


def _has_backend(backend: str, device: str) -> bool:
    """Whether ``backend``'s conv kernels exist in this build: the C++ kernel registered for the device, the Triton
    module present. The suites exercise every backend that exists."""
    if backend == "cpp":
        key = "CPU" if device == "cpu" else "CUDA"
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"visionops::{op}", key) for op in ("conv2d", "conv3d")
        )
    if backend == "triton":
        return importlib.util.find_spec("visionops.triton.conv") is not None
    return True


def backends(device: str, kernels_only: bool = False):
    out = [b for b in backends_for(device, "conv2d") if _has_backend(b, device)]
    return [b for b in out if b != "reference"] if kernels_only else out


def _cases(kernels_only=False):
    return [(d, b) for d in DEVICES for b in backends(d, kernels_only)]


# (B, Cin, Cout, spatial, kernel, stride, padding, dilation, groups, bias) per size; one table per dimensionality
SHAPES2 = {
    "basic": {
        "full": (2, 4, 6, (9, 11), (3, 3), 1, 1, 1, 1, True),
        "small": (1, 2, 3, (5, 6), (3, 3), 1, 1, 1, 1, True),
    },
    "strided_dilated_grouped": {
        "full": (2, 6, 4, (10, 9), (3, 2), (2, 1), (2, 0), (1, 2), 2, True),
        "small": (1, 4, 2, (6, 5), (2, 2), (2, 1), (1, 0), (1, 2), 2, True),
    },
    "depthwise": {
        "full": (1, 8, 8, (12, 13), (3, 3), 2, 1, 1, 8, True),
        "small": (1, 3, 3, (5, 6), (3, 3), 2, 1, 1, 3, True),
    },
    "same_even_kernel": {
        "full": (2, 3, 5, (7, 8), (4, 2), 1, "same", (1, 2), 1, True),
        "small": (1, 2, 2, (4, 5), (2, 3), 1, "same", 1, 1, True),
    },
    "valid_kernel_as_large_as_input": {
        "full": (3, 2, 3, (5, 4), (5, 4), 1, "valid", 1, 1, True),
        "small": (2, 2, 2, (3, 3), (3, 3), 1, "valid", 1, 1, True),
    },
}
SHAPES3 = {
    "basic": {
        "full": (2, 3, 4, (5, 6, 7), (3, 3, 3), 1, 1, 1, 1, True),
        "small": (1, 2, 2, (3, 4, 4), (3, 3, 3), 1, 1, 1, 1, True),
    },
    "strided_dilated_grouped": {
        "full": (1, 4, 6, (6, 7, 5), (2, 3, 1), (1, 2, 2), (1, 0, 1), (2, 1, 1), 2, True),
        "small": (1, 2, 2, (4, 5, 3), (2, 2, 1), (1, 2, 1), (1, 0, 0), (2, 1, 1), 2, True),
    },
    "depthwise_same": {
        "full": (2, 4, 4, (4, 6, 5), (2, 3, 2), 1, "same", 1, 4, True),
        "small": (1, 2, 2, (3, 4, 3), (2, 2, 2), 1, "same", 1, 2, True),
    },
}
TINY2 = [
    (2, 2, 2, (4, 5), (2, 3), 1, 1, 1, 1, True),
    (1, 4, 2, (5, 4), (2, 2), 2, (0, 1), (2, 1), 2, True),
    (1, 2, 2, (3, 4), (2, 2), 1, "same", 1, 2, True),
]
TINY3 = [
    (1, 2, 2, (3, 3, 4), (2, 2, 2), 1, 1, 1, 1, True),
    (1, 2, 2, (4, 3, 3), (2, 1, 2), (2, 1, 1), (1, 0, 1), (1, 1, 2), 2, True),
    (1, 2, 2, (3, 3, 3), (2, 2, 2), 1, "same", 1, 1, True),
]


def _make(spec, device, dtype, generator):
    """(input, weight, bias, stride, padding, dilation, groups) for one shape spec, values ~ N(0, 1)."""
    b, cin, cout, size, kernel, stride, padding, dilation, groups, bias = spec
    x = torch.randn(b, cin, *size, generator=generator, dtype=torch.float64)
    w = torch.randn(cout, cin // groups, *kernel, generator=generator, dtype=torch.float64)
    bb = torch.randn(cout, generator=generator, dtype=torch.float64).to(device, dtype) if bias else None
    return x.to(device, dtype), w.to(device, dtype), bb, stride, padding, dilation, groups


def _tolerances(terms):
    # sums of ``terms`` products of N(0, 1) values: float32 accumulation error ~1e-6 relative; half outputs are
    # rounded once (the kernels accumulate in float32), so their error is the output's rounding, ~sqrt(terms) ulps
    s = terms**0.5
    return {
        torch.float64: dict(rtol=1e-10, atol=1e-10),
        torch.float32: dict(rtol=1e-5, atol=2e-5 * s),
        torch.float16: dict(rtol=2e-3, atol=2e-3 * s),
        torch.bfloat16: dict(rtol=1e-2, atol=1.6e-2 * s),
    }


class _ConvBase(OpConformance):
    n = 2
    shapes = SHAPES2
    tiny = TINY2
    has_grad = True
    grad_inputs = (0, 1, 2)
    grad_factor = 6.0  # the weight gradient sums over batch and output positions: more terms than the output
    check_config = "strided_dilated_grouped"
    # interpreted Triton: ~0.2 s a call, a gradcheck makes hundreds (its gradients are checked in every other test)
    slow = (("test_gradcheck", "triton"),)

    def _backends(self, device):
        return backends(device)

    def fn(self, *inputs, backend):
        return getattr(visionops, self.op)(*inputs, backend=backend)

    def reference(self, *inputs):
        # the wrapper turns "same"/"valid" and ints into the schema's lists, then the pure-PyTorch reference runs
        return getattr(visionops, self.op)(*inputs, backend="reference")

    def make_inputs(self, device, dtype, generator, size, config):
        spec = self.tiny[generator.initial_seed() % len(self.tiny)] if size == "tiny" else self.shapes[config][size]
        return _make(spec, device, dtype, generator)

    def empty_inputs(self, device, dtype):
        n = self.n

        def t(*shape):
            return torch.zeros(*shape, device=device, dtype=dtype)

        return {
            "batch0": (t(0, 4, *[5] * n), t(6, 2, *[3] * n), t(6), 1, 1, 1, 2),
            "no_output_channels": (t(2, 3, *[4] * n), t(0, 3, *[2] * n), t(0), 1, 0, 1, 1),
        }

    def bad_inputs(self):
        n, op = self.n, self.op
        fn = getattr(visionops, op)
        x, w, b, *_ = _make(self.shapes["basic"]["small"], "cpu", torch.float32, torch.Generator().manual_seed(0))
        x4, w4 = torch.zeros(1, 4, *[5] * n), torch.zeros(6, 2, *[3] * n)
        rows = [
            Bad("input_rank", lambda be: fn(x[0], w, b, backend=be), ValueError, f"input must be a {n + 2}-D"),
            Bad("weight_rank", lambda be: fn(x, w[0], b, backend=be), ValueError, f"weight must be a {n + 2}-D"),
            Bad("cin_not_divisible", lambda be: fn(x4, w4, groups=3, backend=be), ValueError, r"input channels \(4\)"),
            Bad("cout_not_divisible", lambda be: fn(x4, w4[:5], groups=2, backend=be), ValueError, "output channels"),
            Bad("weight_channels", lambda be: fn(x4, w4, backend=be), ValueError, r"weight.shape\[1\] must be 4"),
            Bad("kernel_too_large", lambda be: fn(x, torch.zeros(3, 2, *[9] * n), backend=be), ValueError, "kernel"),
            Bad(
                "dilated_kernel_too_large",
                lambda be: fn(x, w, padding=0, dilation=3, backend=be),
                ValueError,
                "dilated kernel",
            ),
            Bad("stride_0", lambda be: fn(x, w, stride=0, backend=be), ValueError, "stride must be >= 1"),
            Bad("dilation_0", lambda be: fn(x, w, dilation=0, backend=be), ValueError, "dilation must be >= 1"),
            Bad("padding_negative", lambda be: fn(x, w, padding=-1, backend=be), ValueError, "padding must be >= 0"),
            Bad("padding_word", lambda be: fn(x, w, padding="full", backend=be), ValueError, "padding must be"),
            Bad("same_strided", lambda be: fn(x, w, stride=2, padding="same", backend=be), ValueError, "same"),
            Bad("stride_length", lambda be: fn(x, w, stride=[1] * (n + 1), backend=be), TypeError, "stride"),
            Bad("groups_0", lambda be: fn(x, w, groups=0, backend=be), ValueError, "groups must be >= 1"),
            Bad("groups_float", lambda be: fn(x, w, groups=1.0, backend=be), TypeError, "groups must be an int"),
            Bad("weight_dtype", lambda be: fn(x, w.double(), b, backend=be), TypeError, "weight has dtype"),
            Bad("bias_dtype", lambda be: fn(x, w, b.double(), backend=be), TypeError, "bias has dtype"),
            Bad("bias_shape", lambda be: fn(x, w, b[:-1], backend=be), ValueError, r"bias must have shape \[Cout\]"),
            Bad("weight_device", lambda be: fn(x, w.to("meta"), b, backend=be), ValueError, "weight is on meta"),
            Bad("input_integer", lambda be: fn(x.long(), w, b, backend=be), TypeError, "input must be float64"),
            Bad("input_not_tensor", lambda be: fn(x.tolist(), w, b, backend=be), TypeError, "input must be a torch"),
        ]
        lists = ([1] * n, [1] * n, [1] * n)
        direct = {"cpp": getattr(torch.ops.visionops, op), "triton": None}
        if _has_backend("triton", "cpu"):
            importlib.import_module("visionops.triton.conv")  # defines the Triton ops
            direct["triton"] = getattr(torch.ops.visionops, f"triton_{op}")
        for be, call in direct.items():  # the ops check for themselves (C++ callers, torch.ops users)
            rows += [
                Bad(
                    f"op_{be}_groups", lambda _, c=call: c(x4, w4, None, *lists, 3), ValueError, f"{op}.*groups", (be,)
                ),
                Bad(
                    f"op_{be}_channels",
                    lambda _, c=call: c(x4, w4, None, *lists, 1),
                    ValueError,
                    f"{op}.*weight",
                    (be,),
                ),
                Bad(
                    f"op_{be}_stride",
                    lambda _, c=call: c(x, w, None, [0] * n, *lists[1:], 1),
                    ValueError,
                    f"{op}.*stride",
                    (be,),
                ),
                Bad(
                    f"op_{be}_kernel",
                    lambda _, c=call: c(x, torch.zeros(3, 2, *[9] * n), None, *lists, 1),
                    ValueError,
                    f"{op}.*kernel",
                    (be,),
                ),
                Bad(f"op_{be}_dtype", lambda _, c=call: c(x, w.double(), None, *lists, 1), TypeError, op, (be,)),
            ]
        return rows


class TestConv2d(_ConvBase):
    op = "conv2d"
    configs = {name: name for name in SHAPES2}
    layouts = ("contiguous", "non_contiguous", "channels_last")
    tolerances = _tolerances(36)


class TestConv3d(_ConvBase):
    op = "conv3d"
    configs = {name: name for name in SHAPES3}
    n = 3
    shapes = SHAPES3
    tiny = TINY3
    layouts = ("contiguous", "non_contiguous")  # channels_last_3d: test_memory_format_follows_input
    tolerances = _tolerances(54)


# ---- beyond the conformance base -----------------------------------------------------------------------------------

TORCH = {2: F.conv2d, 3: F.conv3d}
OURS = {2: visionops.conv2d, 3: visionops.conv3d}


def _random_config(seed: int):
    """A random valid convolution: 2-D or 3-D, strides, paddings (ints, "same" with odd and even kernels, "valid"),
    dilations, groups (depthwise among them), odd sizes, batch 1, with and without bias."""
    r = random.Random(seed)
    n = 2 if seed % 3 else 3
    groups = r.choice([1, 1, 2, 3, "depthwise"])
    per = r.randint(1, 3)
    cin = per * (r.randint(1, 3) if groups == "depthwise" else groups)
    groups = cin if groups == "depthwise" else groups
    cout = groups * r.randint(1, 3)
    kernel = [r.randint(1, 4 if n == 2 else 3) for _ in range(n)]
    dilation = [r.choice([1, 1, 2, 3]) for _ in range(n)]
    padding_kind = r.choice(["ints", "ints", "same", "valid"])
    stride = [1] * n if padding_kind == "same" else [r.choice([1, 1, 2, 3]) for _ in range(n)]
    padding = [r.randint(0, 2) for _ in range(n)] if padding_kind == "ints" else padding_kind
    pad = padding if padding_kind == "ints" else [0] * n
    # large enough for the dilated kernel, odd sizes included
    size = [
        max(d * (k - 1) + 1 - 2 * p, 1) + r.randint(0, 6 if n == 2 else 3) for k, d, p in zip(kernel, dilation, pad)
    ]
    batch = r.choice([1, 1, 2, 3])
    return n, (batch, cin, cout, tuple(size), tuple(kernel), stride, padding, dilation, groups, r.random() < 0.7)


SEEDS = list(range(30))


def _random_cases():
    # interpreted Triton runs every program in Python: the first six configurations by default, the rest slow
    return [
        pytest.param(d, b, seed, marks=[pytest.mark.slow] if interpreted(b, d) and seed >= 6 else [])
        for d, b in _cases()
        for seed in SEEDS
    ]


@pytest.mark.parametrize("device,backend,seed", _random_cases())
def test_matches_torch_random_configs(device, backend, seed):
    """Forward and the gradients of input, weight and bias equal F.conv2d / F.conv3d's in float64."""
    n, spec = _random_config(seed)
    args = _make(spec, device, torch.float64, torch.Generator().manual_seed(seed))
    tensors = [t for t in args[:3] if t is not None]
    ours = [t.clone().requires_grad_() for t in tensors]
    theirs = [t.clone().requires_grad_() for t in tensors]
    rest = args[3:]
    bias = (lambda ts: ts[2]) if args[2] is not None else (lambda ts: None)
    out = OURS[n](ours[0], ours[1], bias(ours), *rest, backend=backend)
    expected = TORCH[n](theirs[0], theirs[1], bias(theirs), *rest)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64).to(device)
    for name, got, exp in zip(
        ("input", "weight", "bias"), torch.autograd.grad(out, ours, go), torch.autograd.grad(expected, theirs, go)
    ):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10, msg=lambda m, k=name: f"grad {k}: {m}")


MODULES = [
    (2, dict(in_channels=4, out_channels=6, kernel_size=3, padding=1)),
    (2, dict(in_channels=4, out_channels=4, kernel_size=(3, 2), stride=2, dilation=(1, 2), groups=4, bias=False)),
    (2, dict(in_channels=3, out_channels=5, kernel_size=4, padding="same")),
    (2, dict(in_channels=4, out_channels=2, kernel_size=3, padding=2, padding_mode="reflect", groups=2)),
    (2, dict(in_channels=3, out_channels=3, kernel_size=2, padding="same", padding_mode="circular")),
    (3, dict(in_channels=2, out_channels=4, kernel_size=3, padding=1)),
    (3, dict(in_channels=4, out_channels=4, kernel_size=(1, 3, 3), stride=(1, 2, 2), groups=2, padding="valid")),
    (3, dict(in_channels=2, out_channels=3, kernel_size=2, padding=1, padding_mode="replicate", bias=False)),
]


@pytest.mark.parametrize("index", range(len(MODULES)))
@pytest.mark.parametrize("device,backend", _cases())
def test_modules_load_torch_state_dicts(device, backend, index):
    """visionops.nn.Conv2d/Conv3d load torch.nn's state_dicts (strict), are torch.nn modules, and give torch.nn's
    outputs and parameter gradients, batched and unbatched."""
    n, kwargs = MODULES[index]
    torch.manual_seed(index)
    theirs = getattr(torch.nn, f"Conv{n}d")(**kwargs).double().to(device)
    ours = getattr(visionops.nn, f"Conv{n}d")(**kwargs, backend=backend).double().to(device)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert isinstance(ours, getattr(torch.nn, f"Conv{n}d"))
    assert f"backend={backend!r}" in repr(ours)
    x = torch.randn(2, kwargs["in_channels"], *[7] * n, dtype=torch.float64, device=device)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours(x[0]), theirs(x[0]), rtol=1e-10, atol=1e-10)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-10, msg=lambda m, k=name: f"{k}: {m}")


def test_module_backend_defaults_to_auto():
    m = visionops.nn.Conv2d(2, 3, 3)
    assert m.backend == "auto" and "backend" not in repr(m)
    with pytest.raises(TypeError, match="backend"):
        visionops.nn.Conv3d(2, 3, 3, backend=None)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("device,backend", _cases())
def test_zero_input_channels_give_the_bias(device, backend, n):
    x = torch.zeros(2, 0, *[5] * n, device=device)
    w = torch.zeros(4, 0, *[3] * n, device=device)
    b = torch.arange(4.0, device=device)
    out = OURS[n](x, w, b, padding=1, backend=backend)
    assert out.shape == (2, 4, *[5] * n)
    torch.testing.assert_close(out, b.reshape(1, 4, *[1] * n).expand_as(out))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("device,backend", _cases())
def test_memory_format_follows_input(device, backend, n):
    """channels_last(_3d) input, channels_last output, as F.conv2d; the kernels also give gradients in the format of
    the tensor they belong to; the values equal those of contiguous tensors."""
    spec = (SHAPES2 if n == 2 else SHAPES3)["strided_dilated_grouped"]["small"]
    x, w, b, *rest = _make(spec, device, torch.float32, torch.Generator().manual_seed(5))
    fmt = FORMATS[n]
    xc = x.contiguous(memory_format=fmt).requires_grad_()
    wc = w.contiguous(memory_format=fmt).requires_grad_()
    out = OURS[n](xc, wc, b, *rest, backend=backend)
    assert out.is_contiguous(memory_format=fmt) and not out.is_contiguous()
    torch.testing.assert_close(out, OURS[n](x, w, b, *rest, backend=backend), rtol=1e-5, atol=1e-5)
    gx, gw = torch.autograd.grad(out, (xc, wc), torch.ones_like(out))
    if backend != "reference":  # the reference's gradients come from autograd, in whatever format it picks
        assert gx.is_contiguous(memory_format=fmt) and gw.is_contiguous(memory_format=fmt)
    out = OURS[n](x.requires_grad_(), w, b, *rest, backend=backend)
    assert out.is_contiguous()


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("device,backend", _cases(kernels_only=True))
def test_backward_computes_only_the_gradients_asked_for(device, backend, n):
    """output_mask follows requires_grad: the backward op is asked for exactly the gradients autograd needs."""
    spec = (SHAPES2 if n == 2 else SHAPES3)["basic"]["small"]
    x, w, b, *rest = _make(spec, device, torch.float64, torch.Generator().manual_seed(9))
    for need in ((True, False, False), (False, True, False), (False, False, True), (True, True, False)):
        leaves = [t.clone().requires_grad_(r) for t, r in zip((x, w, b), need)]
        with _Record() as rec:
            out = OURS[n](*leaves, *rest, backend=backend)
            grads = torch.autograd.grad(out.sum(), [t for t in leaves if t.requires_grad])
        masks = [a[-1] for f, a, _ in rec.calls if "backward" in str(f._schema.name)]
        assert masks == [list(need)]
        full = [t.detach().requires_grad_() for t in (x, w, b)]
        all_grads = torch.autograd.grad(TORCH[n](*full, *rest).sum(), full)
        expected = [g for g, r in zip(all_grads, need) if r]
        for got, exp in zip(grads, expected):
            torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16], ids=_dn)
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("device,backend", _cases(kernels_only=True))
def test_autocast_runs_in_the_autocast_dtype(device, backend, n, autocast_dtype):
    """Under torch.autocast the kernels receive the region's dtype, as torch's convolutions do, and match F.conv under
    the same autocast; float64 stays float64."""
    spec = (SHAPES2 if n == 2 else SHAPES3)["basic"]["small"]
    x, w, b, *rest = _make(spec, device, torch.float32, torch.Generator().manual_seed(6))
    with KernelDtypes() as mode, torch.autocast(device, dtype=autocast_dtype):
        out = OURS[n](x, w, b, *rest, backend=backend)
        expected = TORCH[n](x, w, b, *rest)
    assert out.dtype == expected.dtype == autocast_dtype
    name = f"visionops::{'triton_' if backend == 'triton' else ''}conv{n}d"
    assert set(mode.seen[name]) == {autocast_dtype}
    torch.testing.assert_close(out.float(), expected.float(), rtol=1e-2, atol=0.1)
    with torch.autocast(device, dtype=autocast_dtype):
        assert OURS[n](x.double(), w.double(), b.double(), *rest, backend=backend).dtype == torch.float64


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("device,backend", _cases(kernels_only=True))
def test_double_backward_is_refused(device, backend, n):
    spec = (SHAPES2 if n == 2 else SHAPES3)["basic"]["small"]
    x, w, b, *rest = _make(spec, device, torch.float64, torch.Generator().manual_seed(7))
    w.requires_grad_()
    (gw,) = torch.autograd.grad(OURS[n](x, w, b, *rest, backend=backend).square().sum(), w, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gw.sum().backward()


@pytest.mark.parametrize("n", [2, 3])
def test_reference_is_the_documented_sum(n):
    """The reference against the formula in its docstring, written as explicit loops over a tiny case (so the
    reference is not only checked against F.conv, which the kernels are benchmarked against)."""
    spec = (SHAPES2 if n == 2 else SHAPES3)["strided_dilated_grouped"]["small"]
    x, w, b, stride, padding, dilation, groups = _make(spec, "cpu", torch.float64, torch.Generator().manual_seed(8))
    stride, padding, dilation = ([v] * n if isinstance(v, int) else list(v) for v in (stride, padding, dilation))
    out = (
        reference.conv2d(x, w, b, stride, padding, dilation, groups)
        if n == 2
        else reference.conv3d(x, w, b, stride, padding, dilation, groups)
    )
    xpad = F.pad(x, [p for p in reversed(padding) for _ in range(2)])
    cin_g, cout_g = x.shape[1] // groups, w.shape[0] // groups
    expected = torch.empty_like(out)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in out.shape]).tolist():
        bi, o, *u = idx
        g = o // cout_g
        total = b[o].clone()
        for c in range(cin_g):
            for k in torch.cartesian_prod(*[torch.arange(s) for s in w.shape[2:]]).reshape(-1, n).tolist():
                pos = [ui * s + ki * d for ui, ki, s, d in zip(u, k, stride, dilation)]
                total += w[(o, c, *k)] * xpad[(bi, g * cin_g + c, *pos)]
        expected[tuple(idx)] = total
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [2, 3])
def test_fake_kernels_follow_the_contract(n):
    """The fake kernels (torch.compile, export) give F.conv's output shape, the output in the input's format
    (channels-last only when the input is channels-last and not also plainly contiguous), gradients in their tensor's
    format, and [0]-shaped placeholders for the gradients the output_mask leaves out."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    fmt = FORMATS[n]
    op = getattr(torch.ops.visionops, f"conv{n}d").default
    backward = getattr(torch.ops.visionops, f"_conv{n}d_backward").default
    for name, spec in (SHAPES2 if n == 2 else SHAPES3).items():
        x, w, b, stride, padding, dilation, groups = _make(spec["full"], "cpu", torch.float32, torch.Generator())
        if isinstance(padding, str):
            continue  # the schema has explicit paddings only
        lists = [[v] * n if isinstance(v, int) else list(v) for v in (stride, padding, dilation)]
        expected = TORCH[n](x, w, b, *lists, groups)
        one_channel = torch.zeros(2, 1, *[5] * n)  # channels-last and contiguous at once: stays contiguous
        for xx, ww, want in ((x, w, torch.contiguous_format), (x.contiguous(memory_format=fmt), w, fmt)):
            mode = FakeTensorMode()
            fx, fw, fb = (mode.from_tensor(t) for t in (xx, ww.contiguous(memory_format=fmt), b))
            with mode:
                out = op(fx, fw, fb, *lists, groups)
                gi, gw, gb = backward(out, fx, fw, *lists, groups, [True, True, True])
                masked = backward(out, fx, fw, *lists, groups, [False, True, False])
            assert out.shape == expected.shape, name
            assert out.is_contiguous(memory_format=want), name
            assert gi.shape == x.shape and gi.is_contiguous(memory_format=want), name
            assert gw.shape == w.shape and gw.stride() == fw.stride(), name  # channels-last weight, same strides
            assert gb.shape == (w.shape[0],) and gb.is_contiguous(), name
            assert [t.shape for t in masked] == [(0,), w.shape, (0,)], name
        mode = FakeTensorMode()
        with mode:
            out = op(mode.from_tensor(one_channel), mode.from_tensor(torch.zeros(3, 1, *[2] * n)), None, *lists, 1)
        assert out.is_contiguous(), name


# Inside the C++ CPU kernels the GEMM path (enough channels per group) runs at::parallel_for tasks; its results must
# not depend on reaching a worker thread (no autograd exclusion there: a bias that requires grad must not reach it).
WIDE = {
    2: (2, 32, 24, (13, 12), (3, 3), 1, 1, 1, 2, True),
    3: (1, 32, 24, (5, 8, 7), (3, 3, 3), 1, 1, 1, 2, True),
}


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=_dn)
@pytest.mark.parametrize("n", [2, 3])
def test_cpu_wide_channels_at_any_thread_count(n, dtype, threads):
    """Forward and every gradient of inputs that require grad, at 1, 2 and 3 threads, equal F.conv's."""
    x, w, b, *rest = _make(WIDE[n], "cpu", dtype, torch.Generator().manual_seed(10))
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    with num_threads(threads):
        out = OURS[n](*ours, *rest, backend="cpp")
        got = torch.autograd.grad(out, ours, torch.ones_like(out))
    expected = TORCH[n](*theirs, *rest)
    torch.testing.assert_close(out, expected, **tol)
    want = torch.autograd.grad(expected, theirs, torch.ones_like(out))
    for name, g, e in zip(("input", "weight", "bias"), got, want):
        torch.testing.assert_close(g, e, **tol, msg=lambda m, k=name: f"grad {k}: {m}")


# The C++ CPU convolution has two sets of kernels: the direct AVX2 ones (the default on x86 CPUs with AVX2 but no
# AVX-512) and the BLAS ones (elsewhere); VISIONOPS_CONV_CPU chooses. Both run in every test below, whatever this
# machine's default.
DIRECT = pytest.mark.skipif(
    not visionops.build_info()["cpu_conv_direct"], reason="the direct CPU conv kernel needs AVX2 and FMA"
)
# "winograd": the default choice (Winograd F(2, 3) for wide 3x3x3 layers, else this CPU's kernels)
CPU_KERNELS = ["blas", pytest.param("direct", marks=DIRECT), "winograd"]


@pytest.fixture(params=CPU_KERNELS)
def cpu_kernel(request, monkeypatch):
    monkeypatch.setenv("VISIONOPS_CONV_CPU", request.param)
    info = visionops.build_info()
    assert info["cpu_conv_winograd"] == (request.param == "winograd")
    if request.param != "winograd":
        assert info["cpu_conv"] == request.param
    return request.param


# The BLAS forward runs without im2col when groups are wide (>= 32 input and output channels each): per output row
# and tap for rows of >= 32 columns, per block of rows (unit stride) otherwise. Taps reading only padding are skipped,
# and row ends clipped, as the direct kernels skip them per tile of positions (forward) and per tile of weight rows
# (grad_w); these shapes reach every such edge (a tap wholly in the padding, strides, dilations, groups, several row
# blocks, 2-D and 3-D, with and without bias).
NO_IM2COL = {
    "rows dilated, taps in padding": (1, 32, 32, (12, 36), (3, 3), 1, 18, 18, 1, True),
    "rows strided": (2, 64, 40, (9, 80), (3, 3), (1, 2), 5, (2, 5), 1, False),
    "rows grouped": (1, 128, 64, (5, 33), (3, 3), 1, 1, 1, 2, True),
    "rows 3d": (1, 32, 32, (3, 4, 34), (3, 3, 3), 1, 1, (1, 1, 2), 1, True),
    "blocks dilated, rows in padding": (1, 32, 32, (12, 20), (3, 3), 1, 9, 9, 1, False),
    "blocks several": (1, 32, 40, (40, 20), (3, 3), 1, 1, 1, 1, True),
    "blocks grouped": (2, 64, 64, (10, 12), (3, 3), 1, 3, 3, 2, True),
    "blocks 3d": (1, 32, 48, (5, 9, 11), (3, 3, 3), (2, 1, 1), (1, 2, 0), (1, 2, 1), 1, True),
    "rgb input, 20 outputs": (2, 3, 20, (11, 13), (3, 3), 1, 1, 1, 1, True),
    "padding beyond the kernel": (1, 8, 24, (6, 7), (3, 3), 1, 3, 1, 1, True),
    "taps in two passes": (1, 128, 20, (3, 4, 5), (3, 3, 3), 1, 1, 1, 1, True),
    "winograd 3d, partial tiles": (2, 128, 136, (3, 5, 6), (3, 3, 3), 1, 1, 1, 1, True),
    "winograd 3d dilated": (1, 128, 128, (4, 7, 5), (3, 3, 3), 1, (1, 2, 0), (1, 2, 1), 1, False),
}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", list(NO_IM2COL))
def test_cpu_kernels_wide_groups(name, threads, cpu_kernel):
    """Forward and every gradient of both CPU kernel sets equal F.conv's, in float64 and float32."""
    spec = NO_IM2COL[name]
    n = len(spec[4])
    x, w, b, *rest = _make(spec, "cpu", torch.float64, torch.Generator().manual_seed(3))
    ours = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    theirs = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
    bias = (lambda ts: ts[2]) if b is not None else (lambda ts: None)
    with num_threads(threads):
        out = OURS[n](ours[0], ours[1], bias(ours), *rest, backend="cpp")
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        got = torch.autograd.grad(out, ours, go)
    expected = TORCH[n](theirs[0], theirs[1], bias(theirs), *rest)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    for name_, g, e in zip(("input", "weight", "bias"), got, torch.autograd.grad(expected, theirs, go)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m, k=name_: f"grad {k}: {m}")
    # channels-last input and grad: written through the channels-last layout instead of in place channels-first
    cl = [ours[0].detach().contiguous(memory_format=FORMATS[n]).requires_grad_(), *ours[1:]]
    out_cl = OURS[n](cl[0], cl[1], bias(cl), *rest, backend="cpp")
    assert out_cl.is_contiguous(memory_format=FORMATS[n])
    torch.testing.assert_close(out_cl, expected, rtol=1e-10, atol=1e-10)
    (gx_cl,) = torch.autograd.grad(out_cl, cl[:1], go.contiguous(memory_format=FORMATS[n]))
    torch.testing.assert_close(gx_cl, got[0], rtol=1e-10, atol=1e-10)
    f32 = [t.detach().float().requires_grad_() for t in ours]
    out32 = OURS[n](f32[0], f32[1], bias(f32), *rest, backend="cpp")
    torch.testing.assert_close(out32.double(), out, rtol=1e-4, atol=1e-4)
    for g32, g in zip(torch.autograd.grad(out32, f32, go.float()), got):
        torch.testing.assert_close(g32.double(), g, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("seed", range(0, 30, 3))
def test_cpu_kernels_random_configs(seed, cpu_kernel):
    """Both CPU kernel sets on the seeded random configurations: forward and gradients equal F.conv's in float64."""
    n, spec = _random_config(seed)
    args = _make(spec, "cpu", torch.float64, torch.Generator().manual_seed(seed))
    tensors = [t.clone().requires_grad_() for t in args[:3] if t is not None]
    theirs = [t.clone().requires_grad_() for t in tensors]
    bias = (lambda ts: ts[2]) if args[2] is not None else (lambda ts: None)
    out = OURS[n](tensors[0], tensors[1], bias(tensors), *args[3:], backend="cpp")
    expected = TORCH[n](theirs[0], theirs[1], bias(theirs), *args[3:])
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100), dtype=torch.float64)
    for got, exp in zip(torch.autograd.grad(out, tensors, go), torch.autograd.grad(expected, theirs, go)):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n", [2, 3])
def test_cpu_kernels_bits_do_not_depend_on_threads(n, cpu_kernel):
    """The output and every gradient are bitwise the same at 1, 2 and 3 threads (float32, wide groups)."""
    x, w, b, *rest = _make(
        NO_IM2COL["blocks grouped" if n == 2 else "blocks 3d"], "cpu", torch.float32, torch.Generator().manual_seed(5)
    )
    results = []
    for threads in (1, 2, 3):
        ts = [t.clone().requires_grad_() for t in (x, w, b)]
        with num_threads(threads):
            out = OURS[n](*ts, *rest, backend="cpp")
            results.append([out.detach(), *torch.autograd.grad(out, ts, torch.ones_like(out))])
    for other in results[1:]:
        for a, o in zip(results[0], other):
            assert torch.equal(a, o)
