"""Triton RoI backends: the deterministic (fixed-point) backward of roi_align / roi_pool, and MultiScaleRoIAlign in
one launch over all levels. Shapes are tiny: under TRITON_INTERPRET=1 every program runs in Python."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from helpers import triton_devices
from test_roi_align import make_case

import visionops
from visionops import reference

pytestmark = pytest.mark.skipif(not triton_devices(), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
DEVICE = (triton_devices() or ["cpu"])[0]
ops = torch.ops.visionops


class deterministic:
    """torch.use_deterministic_algorithms(on) inside a with block."""

    def __init__(self, on=True):
        self.on = on

    def __enter__(self):
        self.old = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(self.on)

    def __exit__(self, *exc):
        torch.use_deterministic_algorithms(self.old)


def backward(op, go, x, rois, det):
    """Input gradient of the Triton op `op` ("roi_align" or "roi_pool") for output gradient go."""
    with deterministic(det):
        if op == "roi_align":
            return ops.triton_roi_align_backward(go, rois, 0.5, 2, 3, *x.shape, 2, True)
        return ops.triton_roi_pool_backward(go, x, rois, 0.5, 2, 3)


def reference_grad(op, go, x, rois):
    xr = x.detach().double().cpu().requires_grad_(True)
    if op == "roi_align":
        out = reference.roi_align(xr, rois.double().cpu(), 0.5, 2, 3, 2, True)
    else:
        out = reference.roi_pool(xr, rois.double().cpu(), 0.5, 2, 3)
    (g,) = torch.autograd.grad(out, xr, go.double().cpu())
    return g


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_deterministic_backward(op):
    x, rois = make_case(0, k=6, h=6, w=7, device=DEVICE)
    go = torch.randn(6, 3, 2, 3, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    det = backward(op, go, x, rois, True)
    assert det.dtype == torch.float32 and det.shape == x.shape
    assert torch.equal(det, backward(op, go, x, rois, True))  # run to run
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    assert torch.equal(det, backward(op, go[perm], x, rois[perm], True))  # whatever order the RoIs come in
    scale = go.abs().max().item()
    torch.testing.assert_close(det, backward(op, go, x, rois, False), rtol=1e-6, atol=1e-6 * scale)
    torch.testing.assert_close(det.double().cpu(), reference_grad(op, go, x, rois), rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_deterministic_backward_keeps_grad_dtype(op, dtype):
    x, rois = make_case(1, k=4, h=5, w=6, dtype=dtype, device=DEVICE)
    go = torch.randn(4, 3, 2, 3, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    det = backward(op, go, x, rois, True)
    assert det.dtype == dtype
    t = 1e-6 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(det, backward(op, go, x, rois, False), rtol=t, atol=t)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
def test_deterministic_backward_non_finite_like_float_sum(op):
    x, rois = make_case(2, k=4, h=5, w=6, device=DEVICE)
    rois[:, 1:] = torch.tensor([1.0, 1.0, 9.0, 7.0])  # all RoIs on the same cells, so specials meet
    go = torch.randn(4, 3, 2, 3, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    go[0, 0, 0, 0] = float("nan")
    go[1, 1, 0, 1] = float("inf")
    go[2, 1, 1, 2] = float("inf")
    go[3, 2, 1, 1] = -float("inf")
    go[2, 2, 1, 1] = float("inf")  # meets the -inf: NaN
    det = backward(op, go, x, rois, True)
    fl = backward(op, go, x, rois, False)
    assert det.isnan().any() and det.isinf().any()
    assert torch.equal(det.isnan(), fl.isnan()) and torch.equal(det.isinf(), fl.isinf())
    torch.testing.assert_close(det, fl, rtol=1e-6, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("op", ["roi_align", "roi_pool"])
@pytest.mark.parametrize("det", [False, True])
def test_backward_no_rois(op, det):
    x, rois = make_case(0, k=0, device=DEVICE)
    go = torch.zeros(0, 3, 2, 3, device=DEVICE)
    g = backward(op, go, x, rois, det)
    assert g.shape == x.shape and not g.any()
    with deterministic(det):
        xg = x.clone().requires_grad_(True)
        out = visionops.roi_align(xg, rois, (2, 3), 0.5, backend="triton")
        out.sum().backward()
    assert out.shape == (0, 3, 2, 3) and not xg.grad.any()


# ---- MultiScaleRoIAlign ----------------------------------------------------------------------------------------

NAMES = ["p0", "p1", "p2"]
CANONICAL = 56  # LevelMapper's canonical box size: 224 would need boxes far larger than the tiny maps


def make_fpn(seed, dtype=torch.float32, c=2):
    """Three levels (strides 4, 8, 16 of a 64 x 48 image), two images, and boxes sized for each level."""
    g = torch.Generator().manual_seed(seed)
    x = OrderedDict(
        (n, torch.randn(2, c, 64 // s, 48 // s, generator=g, dtype=dtype).to(DEVICE)) for n, s in zip(NAMES, (4, 8, 16))
    )
    sizes = torch.tensor([[16.0, 12.0], [40.0, 36.0], [80.0, 70.0], [30.0, 50.0]])
    boxes = []
    for n in (4, 3):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([48.0, 64.0]) - 8
        boxes.append(torch.cat([xy, xy + sizes[:n]], 1).to(DEVICE, dtype))
    return x, boxes, [(64, 48), (60, 40)]


def pooler(output_size, sampling_ratio, backend):
    if backend == "torchvision":
        return torchvision.ops.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio, canonical_scale=CANONICAL)
    return visionops.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio, canonical_scale=CANONICAL, backend=backend)


def pool_and_grad(module, x, boxes, shapes, go):
    feats = [x[n].detach().clone().requires_grad_(True) for n in NAMES]
    out = module(OrderedDict(zip(NAMES, feats)), boxes, shapes)
    return out, torch.autograd.grad(out, feats, go)


def test_multi_scale_matches_torchvision_and_cpp():
    x, boxes, shapes = make_fpn(0)
    m = pooler(2, 2, "triton")
    m.scales, m.map_levels = visionops.ops.poolers.setup_scales([x[n] for n in NAMES], shapes, CANONICAL)
    assert set(m.map_levels(boxes).tolist()) == {0, 1, 2}
    go = torch.randn(7, 2, 2, 2, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    out, grads = pool_and_grad(m, x, boxes, shapes, go)
    for other in ("torchvision", "cpp"):
        expect, expect_grads = pool_and_grad(pooler(2, 2, other), x, boxes, shapes, go)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
        for g, e in zip(grads, expect_grads):
            torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_multi_scale_float64_matches_reference():
    x, boxes, shapes = make_fpn(1, dtype=torch.float64)
    go = torch.randn(7, 2, 3, 2, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(DEVICE)
    out, grads = pool_and_grad(pooler((3, 2), -1, "triton"), x, boxes, shapes, go)
    expect, expect_grads = pool_and_grad(pooler((3, 2), -1, "reference"), x, boxes, shapes, go)
    assert out.dtype == torch.float64 and all(g.dtype == torch.float64 for g in grads)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)  # Triton computes in float32
    for g, e in zip(grads, expect_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def op_args(seed=2, levels=None, boxes_per_image=(4, 3)):
    """Features, boxes, RoIs, levels, scales and LevelMapper of `make_fpn`, as the one-launch ops take them."""
    x, boxes, shapes = make_fpn(seed)
    boxes = [b[:n] for b, n in zip(boxes, boxes_per_image)]
    feats = [x[n] for n in NAMES]
    scales, mapper = visionops.ops.poolers.setup_scales(feats, shapes, CANONICAL)
    rois = visionops.ops.roi.convert_boxes_to_roi_format(boxes)
    levels = mapper(boxes) if levels is None else torch.tensor(levels, device=DEVICE)
    return feats, boxes, rois, levels, scales, mapper


def test_multi_scale_deterministic_backward_and_bad_levels():
    feats, _, rois, levels, scales, _ = op_args(levels=[0, 1, 2, -1, 3, 1, 0])  # -1 and 3: no level, zeros
    shapes = [s for f in feats for s in f.shape]
    out = ops.triton_multi_scale_roi_align(feats, rois, levels, scales, 2, 2, 2, False)
    assert not out[3].any() and not out[4].any() and out[:3].any()
    go = torch.randn(7, 2, 2, 2, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    go[3:5] = float("nan")  # must go nowhere
    with deterministic():
        det = ops.triton_multi_scale_roi_align_backward(go, rois, levels, scales, 2, 2, shapes, 2, False)
        again = ops.triton_multi_scale_roi_align_backward(
            go.flip(0), rois.flip(0), levels.flip(0), scales, 2, 2, shapes, 2, False
        )
    fl = ops.triton_multi_scale_roi_align_backward(go, rois, levels, scales, 2, 2, shapes, 2, False)
    ok = torch.tensor([0, 1, 2, 5, 6])
    for level, (d, a, f) in enumerate(zip(det, again, fl)):
        assert d.shape == feats[level].shape and torch.equal(d, a) and d.isfinite().all()
        torch.testing.assert_close(d, f, rtol=1e-6, atol=1e-6)
        (e,) = torch.autograd.grad(
            visionops.roi_align(feats[level].requires_grad_(True), rois[ok][levels[ok] == level], 2, scales[level], 2),
            feats[level],
            go[ok][levels[ok] == level],
        )
        torch.testing.assert_close(d, e, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="levels"):
        ops.triton_multi_scale_roi_align(feats, rois, levels.int(), scales, 2, 2, 2, False)
    with pytest.raises(ValueError, match="scale"):
        ops.triton_multi_scale_roi_align(feats, rois, levels, scales[:2], 2, 2, 2, False)


def test_multi_scale_no_rois():
    feats, _, rois, levels, scales, _ = op_args()
    fs = [f.clone().requires_grad_(True) for f in feats]
    out = ops.triton_multi_scale_roi_align(fs, rois[:0], levels[:0], scales, 2, 2, 2, False)
    assert out.shape == (0, 2, 2, 2)
    grads = torch.autograd.grad(out.sum(), fs)
    assert all(g.shape == f.shape and not g.any() for g, f in zip(grads, feats))


def test_multi_scale_opcheck_compile_and_no_double_backward():
    feats, boxes, rois, levels, scales, mapper = op_args(3, boxes_per_image=(3, 0))
    args = (rois, levels, scales, 2, 2, 2, False)
    torch.library.opcheck(
        ops.triton_multi_scale_roi_align.default, ([f.clone().requires_grad_(True) for f in feats],) + args
    )
    go = torch.randn(3, 2, 2, 2, device=DEVICE)
    torch.library.opcheck(
        ops.triton_multi_scale_roi_align_backward.default,
        (go, rois, levels, scales, 2, 2, [s for f in feats for s in f.shape], 2, False),
    )

    def wrapper(fs, bs):
        return visionops.ops.poolers.multi_scale_roi_align(fs, bs, 2, 2, scales, mapper, backend="triton")

    expect = ops.triton_multi_scale_roi_align(feats, *args)
    torch.testing.assert_close(wrapper(feats, boxes), expect)
    torch.testing.assert_close(torch.compile(wrapper, fullgraph=True)(feats, boxes), expect)
    fs = [f.clone().requires_grad_(True) for f in feats]
    go.requires_grad_(True)
    grads = torch.autograd.grad(ops.triton_multi_scale_roi_align(fs, *args), fs, go, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grads[0].sum(), go)
