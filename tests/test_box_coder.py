"""Box coding: BoxCoder / decode_boxes / encode_boxes / filter_boxes vs torchvision's BoxCoder and the reference."""

import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

import visionops
from visionops import reference
from helpers import DEVICES, FLOAT_DTYPES, backends_for, needs_cuda, random_boxes

HALF = (torch.float16, torch.bfloat16)
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2.0, 3.0, 0.5, 7.0)]
CLIP = math.log(1000.0 / 16)


def _inputs(n, k=1, *, seed=0, dtype=torch.float32, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    anchors = random_boxes(n, scale=300, max_size=80, generator=g, dtype=torch.float64)
    deltas = torch.randn(n, 4 * k, generator=g, dtype=torch.float64) * scale
    return deltas.to(dtype=dtype, device=device), anchors.to(dtype=dtype, device=device)


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-10)
    if dtype == torch.float32:  # torch's vectorised exp/log differ from libm's by an ulp
        return dict(rtol=2e-6, atol=2e-4)
    return dict(rtol=2 * torch.finfo(dtype).eps, atol=0.5)


@pytest.mark.parametrize("weights", WEIGHTS)
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_single_matches_torchvision(weights, k, dtype):
    deltas, anchors = _inputs(500, k, seed=k, dtype=dtype, scale=2.0)
    deltas[0, 2] = 50.0  # exercises the bbox_xform_clip clamp
    theirs = TVBoxCoder(weights).decode_single(deltas, anchors)
    for backend in backends_for("cpu"):
        ours = visionops.BoxCoder(weights, backend=backend).decode_single(deltas, anchors)
        assert ours.shape == theirs.shape == (500, 4 * k) and ours.dtype == dtype
        torch.testing.assert_close(ours, theirs, **_tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("clip_to", [None, (200, 260)])
def test_decode_boxes_matches_reference(device, dtype, contiguous, clip_to):
    deltas, anchors = _inputs(300, 2, seed=3, dtype=dtype, device=device)
    if not contiguous:
        deltas = torch.cat([deltas, deltas], 1)[:, ::2]
        anchors = anchors.t().contiguous().t()
        assert not deltas.is_contiguous() and not anchors.is_contiguous()
    ref = reference.decode_boxes(deltas, anchors, WEIGHTS[1], CLIP, clip_to)
    for backend in backends_for(device):
        out = visionops.decode_boxes(deltas, anchors, WEIGHTS[1], image_size=clip_to, backend=backend)
        assert out.dtype == dtype and out.shape == deltas.shape
        torch.testing.assert_close(out, ref, **_tol(dtype))
    if clip_to is not None:
        tv = torchvision.ops.clip_boxes_to_image(
            TVBoxCoder(WEIGHTS[1]).decode_single(deltas.double(), anchors.double()).reshape(-1, 4), clip_to
        )
        torch.testing.assert_close(out.double(), tv.reshape(out.shape), **_tol(dtype))


@pytest.mark.parametrize("dtype", HALF)
def test_decode_half_close_to_torchvision(dtype):
    # torchvision computes in the half dtype, we in float32: both are within a few ulps of the float64 result
    deltas, anchors = _inputs(400, 1, seed=4, dtype=dtype)
    exact = TVBoxCoder(WEIGHTS[1]).decode_single(deltas.double(), anchors.double())
    ours = visionops.decode_boxes(deltas, anchors, WEIGHTS[1]).double()
    theirs = TVBoxCoder(WEIGHTS[1]).decode_single(deltas, anchors).double()
    eps = torch.finfo(dtype).eps
    err_ours = ((ours - exact).abs() / exact.abs().clamp(min=1)).max().item()
    err_theirs = ((theirs - exact).abs() / exact.abs().clamp(min=1)).max().item()
    assert err_ours <= eps and err_ours <= err_theirs + 1e-12


def test_decode_and_encode_list_api_match_torchvision():
    weights = WEIGHTS[1]
    props = [random_boxes(n, scale=300, generator=torch.Generator().manual_seed(n)) for n in (7, 0, 12)]
    codes = torch.randn(19, 3 * 4, generator=torch.Generator().manual_seed(5))
    ours, theirs = visionops.BoxCoder(weights), TVBoxCoder(weights)
    a, b = ours.decode(codes, props), theirs.decode(codes, props)
    assert a.shape == b.shape == (19, 3, 4)
    torch.testing.assert_close(a, b, **_tol(torch.float32))
    gts = [p + torch.rand(p.shape, generator=torch.Generator().manual_seed(9)) * 3 for p in props]
    ea, eb = ours.encode(gts, props), theirs.encode(gts, props)
    assert [t.shape for t in ea] == [t.shape for t in eb]
    for x, y in zip(ea, eb):
        torch.testing.assert_close(x, y, **_tol(torch.float32))
    # no boxes at all: torchvision returns decode_single's [0, 4K] output without reshaping
    empty = torch.zeros(0, 4)
    assert ours.decode(torch.zeros(0, 8), [empty]).shape == theirs.decode(torch.zeros(0, 8), [empty]).shape


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights", WEIGHTS[:2])
def test_encode_matches_torchvision_and_reference(device, dtype, weights):
    g = torch.Generator().manual_seed(6)
    props = random_boxes(256, scale=300, generator=g, dtype=torch.float64)
    gts = props + torch.randn(256, 4, generator=g, dtype=torch.float64) * 3
    gts[:, 2:] = torch.maximum(gts[:, 2:], gts[:, :2] + 1)
    props, gts = props.to(dtype=dtype, device=device), gts.to(dtype=dtype, device=device)
    ref = reference.encode_boxes(gts, props, weights)
    for backend in backends_for(device):
        out = visionops.encode_boxes(gts, props, weights, backend=backend)
        torch.testing.assert_close(out, ref, **_tol(dtype))
    if dtype in (torch.float32, torch.float64):
        tv = TVBoxCoder(weights).encode_single(gts, props)
        torch.testing.assert_close(out, tv, **_tol(dtype))
    # decode(encode(g)) == g
    back = visionops.decode_boxes(ref.double(), props.double(), weights)
    if dtype in (torch.float32, torch.float64):
        torch.testing.assert_close(back, gts.double(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("clip_to", [None, (150, 180)])
def test_decode_gradcheck(seed, clip_to):
    deltas, anchors = _inputs(5, 2, seed=seed, dtype=torch.float64, scale=1.5)
    deltas[0, 3] = 50.0  # clamped by bbox_xform_clip: no gradient there, as torch.clamp
    for backend in backends_for("cpu"):
        d, a = deltas.clone().requires_grad_(), anchors.clone().requires_grad_()
        fn = lambda x, y: visionops.decode_boxes(x, y, WEIGHTS[2], image_size=clip_to, backend=backend)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (d, a))
        out = fn(d, a)
        gd, ga = torch.autograd.grad(out, (d, a), torch.ones_like(out))
        assert gd[0, 3] == 0
        # same gradients as autograd through torchvision's decode (+ clip)
        d2, a2 = deltas.clone().requires_grad_(), anchors.clone().requires_grad_()
        tv = TVBoxCoder(WEIGHTS[2]).decode_single(d2, a2)
        if clip_to is not None:
            tv = torchvision.ops.clip_boxes_to_image(tv.reshape(-1, 4), clip_to).reshape(tv.shape)
        td, ta = torch.autograd.grad(tv, (d2, a2), torch.ones_like(tv))
        torch.testing.assert_close(gd, td)
        torch.testing.assert_close(ga, ta)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decode_backward_dtypes(dtype):
    deltas, anchors = _inputs(64, 2, seed=7, dtype=dtype)
    # Half inputs: no image clip, since an edge on the border in one precision and not the other flips the mask.
    size = None if dtype in HALF else (200, 250)
    ref_d, ref_a = deltas.double().requires_grad_(), anchors.double().requires_grad_()
    ref = reference.decode_boxes(ref_d, ref_a, WEIGHTS[1], CLIP, size)
    g = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    rd, ra = torch.autograd.grad(ref, (ref_d, ref_a), g.to(dtype).double())
    for backend in backends_for("cpu"):
        d, a = deltas.clone().requires_grad_(), anchors.clone().requires_grad_()
        out = visionops.decode_boxes(d, a, WEIGHTS[1], image_size=size, backend=backend)
        gd, ga = torch.autograd.grad(out, (d, a), g.to(dtype))
        assert gd.dtype == dtype and ga.dtype == dtype
        for ours, theirs in ((gd, rd), (ga, ra)):
            scale = theirs.abs().max().item()
            rtol = 4 * torch.finfo(dtype).eps if dtype in HALF else 1e-5
            torch.testing.assert_close(ours.double(), theirs, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_filter_boxes_matches_torchvision_rpn(device, dtype):
    g = torch.Generator().manual_seed(8)
    boxes = random_boxes(500, max_size=12, generator=g).to(dtype=dtype, device=device)
    scores = torch.rand(500, generator=g).to(dtype=dtype, device=device)
    for thr, min_size in ((0.0, 1e-3), (0.3, 5.0), (0.9, 11.0)):
        # torchvision's RPN: remove_small_boxes, then keep scores >= score_thresh
        keep = torchvision.ops.remove_small_boxes(boxes, min_size)
        keep = keep[torch.where(scores[keep] >= thr)[0]]
        for backend in backends_for(device):
            out = visionops.filter_boxes(boxes, scores, thr, min_size, backend=backend)
            assert out.dtype == torch.int64
            assert torch.equal(out, keep), backend


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, from the Triton interpreter
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values_match_torchvision(device, dtype):
    # The CPU kernels use their own vectorised exp/log: check they treat inf, nan, huge and tiny values as torch.
    vals = [float("nan"), float("inf"), -float("inf"), -200.0, -90.0, 0.0, 80.0, 1000.0]
    deltas = torch.tensor([[0.0, 0.0, v, v] for v in vals], dtype=dtype, device=device)
    anchors = torch.tensor([[-1.0, -1.0, 1.0, 1.0]] * len(vals), dtype=dtype, device=device)
    for backend in backends_for(device):
        ours = visionops.decode_boxes(deltas, anchors, bbox_xform_clip=1e4, backend=backend)
        theirs = TVBoxCoder((1.0, 1.0, 1.0, 1.0), bbox_xform_clip=1e4).decode_single(deltas, anchors)
        # atol: GPUs may flush float32 subnormals (e.g. 0.5 * exp(-90)) to zero
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=torch.finfo(dtype).tiny, equal_nan=True)
    sides = [0.0, -0.0, -2.0, float("inf"), float("nan"), 1e-40, 3.0]
    gts = torch.tensor([[0.0, 0.0, w, w] for w in sides], dtype=dtype, device=device)
    props = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(sides), dtype=dtype, device=device)
    for backend in backends_for(device):
        ours = visionops.encode_boxes(gts, props, backend=backend)
        theirs = TVBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gts, props)
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    for backend in backends_for(device):
        e4, e8 = torch.zeros(0, 4, device=device), torch.zeros(0, 8, device=device)
        assert visionops.decode_boxes(e8, e4, backend=backend).shape == (0, 8)
        assert visionops.decode_boxes(e4, e4, image_size=(5, 5), backend=backend).shape == (0, 4)
        assert visionops.encode_boxes(e4, e4, backend=backend).shape == (0, 4)
        assert visionops.filter_boxes(e4, torch.zeros(0, device=device), 0.1, 1.0, backend=backend).shape == (0,)
        d = e8.clone().requires_grad_()
        visionops.decode_boxes(d, e4, backend=backend).sum().backward()
        assert d.grad.shape == (0, 8)


def test_bad_inputs():
    d, a = _inputs(4, 1)
    with pytest.raises(ValueError, match="deltas"):
        visionops.decode_boxes(torch.zeros(4, 6), a)
    with pytest.raises(ValueError, match="deltas"):
        visionops.decode_boxes(torch.zeros(4), a)
    with pytest.raises(TypeError, match="deltas"):
        visionops.decode_boxes(torch.zeros(4, 4, dtype=torch.int64), a)
    with pytest.raises(ValueError, match="anchors"):
        visionops.decode_boxes(d, a[:3])
    with pytest.raises(ValueError, match="anchors"):
        visionops.decode_boxes(d, torch.zeros(4, 5))
    with pytest.raises(ValueError, match="weights"):
        visionops.decode_boxes(d, a, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="weights"):
        visionops.BoxCoder((1.0, 0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="image_size"):
        visionops.decode_boxes(d, a, image_size=(5,))
    with pytest.raises(TypeError, match="bbox_xform_clip"):
        visionops.decode_boxes(d, a, bbox_xform_clip="big")
    with pytest.raises(ValueError, match="proposals"):
        visionops.encode_boxes(a, a[:2])
    with pytest.raises(ValueError, match="scores"):
        visionops.filter_boxes(a, torch.zeros(3), 0.1, 1.0)
    with pytest.raises(TypeError, match="min_size"):
        visionops.filter_boxes(a, torch.zeros(4), 0.1, None)
    with pytest.raises(TypeError, match="boxes"):
        visionops.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(d, a)
    with pytest.raises(RuntimeError, match="decode_boxes"):  # the C++ entry checks too
        torch.ops.visionops.decode_boxes(torch.zeros(4, 6), a, [1.0] * 4, CLIP, [])


def _opcheck_cases():
    d, a = _inputs(10, 2, seed=11)
    g = torch.randn(10, 8, generator=torch.Generator().manual_seed(2))
    w = [10.0, 10.0, 5.0, 5.0]
    return d, a, g, w


def test_opcheck_cpp_ops():
    d, a, g, w = _opcheck_cases()
    ops = torch.ops.visionops
    for size in ([], [200.0, 240.0]):
        torch.library.opcheck(ops.decode_boxes.default, (d, a, w, CLIP, size))
        torch.library.opcheck(ops.decode_boxes.default, (d.double().requires_grad_(), a.double(), w, CLIP, size))
        torch.library.opcheck(ops._decode_boxes_backward.default, (g, d, a, w, CLIP, size))
    torch.library.opcheck(ops.encode_boxes.default, (a + 1, a, w))
    torch.library.opcheck(
        ops.filter_boxes.default,
        (a, torch.rand(10), 0.2, 3.0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


@pytest.mark.skipif("triton" not in backends_for("cpu") and not torch.cuda.is_available(), reason="needs triton")
def test_opcheck_triton_ops():
    import visionops.triton.box_coder as tb

    dev = "cpu" if "triton" in backends_for("cpu") else "cuda"
    d, a, g, w = (t.to(dev) if isinstance(t, torch.Tensor) else t for t in _opcheck_cases())
    for size in ([], [200.0, 240.0]):
        torch.library.opcheck(tb.triton_decode_boxes, (d, a, w, CLIP, size))
        torch.library.opcheck(tb.triton_decode_boxes, (d.double().requires_grad_(), a.double(), w, CLIP, size))
        torch.library.opcheck(tb.triton_decode_boxes_backward, (g, d, a, w, CLIP, size))
    torch.library.opcheck(tb.triton_encode_boxes, (a + 1, a, w))
    torch.library.opcheck(
        tb.triton_filter_boxes,
        (a, torch.rand(10, device=dev), 0.2, 3.0),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )


def test_torch_compile_decode():
    d, a = _inputs(64, 2, seed=12)

    def fn(d, a):
        return visionops.decode_boxes(d, a, (10.0, 10.0, 5.0, 5.0), image_size=(300, 400)).relu()

    compiled = torch.compile(fn, fullgraph=True)  # inductor: the one cold compile of this file
    torch.testing.assert_close(compiled(d, a), fn(d, a), rtol=0, atol=0)
    d.requires_grad_()
    compiled(d, a).sum().backward()
    grad = d.grad.clone()
    d.grad = None
    fn(d, a).sum().backward()
    torch.testing.assert_close(grad, d.grad, rtol=0, atol=0)


def test_torch_compile_encode_and_filter():
    d, a = _inputs(64, 1, seed=15)
    scores = torch.rand(64, generator=torch.Generator().manual_seed(3))

    def enc(g, p):
        return visionops.encode_boxes(g, p, (10.0, 10.0, 5.0, 5.0)) * 2

    g = a + 1
    torch.testing.assert_close(torch.compile(enc, fullgraph=True, backend="aot_eager")(g, a), enc(g, a), rtol=0, atol=0)

    def flt(b, s):
        return visionops.filter_boxes(b, s, 0.3, 20.0) + 1

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        out = torch.compile(flt, fullgraph=True, backend="aot_eager")(a, scores)
    assert torch.equal(out, flt(a, scores))


def test_torch_export_decode_and_encode():
    class M(torch.nn.Module):
        def forward(self, d, a):
            boxes = torch.ops.visionops.decode_boxes(d, a, [1.0, 1.0, 1.0, 1.0], CLIP, [300.0, 400.0])
            return torch.ops.visionops.encode_boxes(boxes[:, :4], a, [1.0, 1.0, 1.0, 1.0])

    d, a = _inputs(32, 2, seed=13)
    ep = torch.export.export(M(), (d, a))
    assert "visionops.decode_boxes" in str(ep.graph) and "visionops.encode_boxes" in str(ep.graph)
    torch.testing.assert_close(ep.module()(d, a), M()(d, a), rtol=0, atol=0)


def test_torch_export_filter_boxes():
    class M(torch.nn.Module):
        def forward(self, b, s):
            return torch.ops.visionops.filter_boxes(b, s, 0.3, 20.0)

    _, a = _inputs(64, 1, seed=16)
    s = torch.rand(64, generator=torch.Generator().manual_seed(4))
    ep = torch.export.export(M(), (a, s))
    assert "visionops.filter_boxes" in str(ep.graph)
    assert torch.equal(ep.module()(a, s), M()(a, s))


@needs_cuda
def test_cuda_matches_cpu():
    d, a = _inputs(10000, 3, seed=14, scale=2.0)
    cpu = visionops.decode_boxes(d, a, WEIGHTS[1], image_size=(300, 350))
    gpu = visionops.decode_boxes(d.cuda(), a.cuda(), WEIGHTS[1], image_size=(300, 350))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-6, atol=2e-4)
