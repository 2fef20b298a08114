"""NMS family: nms, batched_nms, box_iou on every backend, against torchvision and the reference."""

import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import visionops
from visionops import reference
from helpers import DEVICES, FLOAT_DTYPES, backends_for, clustered_boxes, random_boxes, unique_scores

THRESHOLDS = [0.0, 0.3, 0.5, 0.7, 1.0]


def _cases(device):
    return [(d, b) for d in [device] for b in backends_for(device)]


def _sizes(backend):
    return [0, 1, 7, 150] if backend != "cpp" else [0, 1, 7, 150, 1500]


def _inputs(kind, n, g, dtype=torch.float32):
    if kind == "random":
        boxes = random_boxes(n, scale=200.0, generator=g)
    elif kind == "clustered":
        boxes = clustered_boxes(n, generator=g)
    else:  # degenerate: zero-area, identical, inverted, huge
        boxes = random_boxes(n, scale=50.0, max_size=20.0, generator=g)
        if n >= 4:
            boxes[::4, 2] = boxes[::4, 0]  # zero width
            boxes[1::4] = boxes[0]  # identical copies
            boxes[2::7, 2:] = boxes[2::7, :2] - 3  # inverted
    return boxes.to(dtype), unique_scores(n, generator=g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["random", "clustered", "degenerate"])
def test_nms_matches_torchvision(device, kind):
    g = torch.Generator().manual_seed(0)
    for _, backend in _cases(device):
        for n in _sizes(backend):
            boxes, scores = _inputs(kind, n, g)
            for thr in THRESHOLDS:
                expected = torchvision.ops.nms(boxes, scores, thr)
                got = visionops.nms(boxes.to(device), scores.to(device), thr, backend=backend)
                assert got.dtype == torch.int64 and got.device.type == device
                torch.testing.assert_close(got.cpu(), expected, msg=f"{backend} n={n} thr={thr}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_nms_dtypes(device, dtype):
    """Half inputs are decided in float32: identical to torchvision on the upcast input."""
    g = torch.Generator().manual_seed(1)
    boxes, scores = _inputs("clustered", 120, g, dtype=dtype)
    scores = scores.to(dtype) if dtype == torch.float64 else scores
    up = boxes.double() if dtype == torch.float64 else boxes.float()
    expected = torchvision.ops.nms(up, scores.to(up.dtype), 0.5)
    for backend in backends_for(device):
        got = visionops.nms(boxes.to(device), scores.to(device), 0.5, backend=backend)
        torch.testing.assert_close(got.cpu(), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_nms_non_contiguous(device):
    g = torch.Generator().manual_seed(2)
    boxes, scores = _inputs("clustered", 200, g)
    wide = torch.zeros(200, 8, device=device)
    wide[:, ::2] = boxes.to(device)
    nc_boxes = wide[:, ::2]
    nc_scores = torch.stack([scores, scores], 1).to(device)[:, 1]
    assert not nc_boxes.is_contiguous() and not nc_scores.is_contiguous()
    expected = torchvision.ops.nms(boxes, scores, 0.5)
    for backend in backends_for(device):
        torch.testing.assert_close(visionops.nms(nc_boxes, nc_scores, 0.5, backend=backend).cpu(), expected)


def test_nms_large_cpu_grid_path():
    """The CPU kernel's spatial grid must give exactly the quadratic loop's answer, outliers included."""
    g = torch.Generator().manual_seed(3)
    boxes = torch.cat(
        [
            random_boxes(3000, generator=g),
            clustered_boxes(2000, generator=g),
            torch.tensor(
                [
                    [0.0, 0.0, 5000.0, 5000.0],
                    [-1e6, -1e6, -1e6 + 10, -1e6 + 10],
                    [float("nan"), 0, 10, 10],
                    [0, 0, float("inf"), 10],
                ]
            ),
        ]
    )
    scores = unique_scores(len(boxes), generator=g)
    for thr in [0.0, 0.1, 0.5, 0.9]:
        torch.testing.assert_close(visionops.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))


def test_nms_extreme_coordinate_ranges_cpu():
    """Grid sizing must survive any finite spread: huge ranges, one flat axis, float64 near its limits."""
    g = torch.Generator().manual_seed(14)
    base = clustered_boxes(300, generator=g).double()
    cases = [
        base * 1e290,
        base + torch.tensor([1e300, 0, 1e300, 0], dtype=torch.float64),
        torch.cat([base, base[:5] * torch.tensor([1e305, 1e-300, 1e305, 1e-300], dtype=torch.float64)]),
    ]
    for boxes in cases:
        scores = unique_scores(len(boxes), generator=g, dtype=torch.float64)
        torch.testing.assert_close(visionops.nms(boxes, scores, 0.5), torchvision.ops.nms(boxes, scores, 0.5))


def test_nms_negative_and_nan_threshold():
    g = torch.Generator().manual_seed(4)
    boxes, scores = _inputs("random", 300, g)
    for thr in [-0.5, float("nan")]:
        torch.testing.assert_close(visionops.nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_matches_per_class_loop(device):
    g = torch.Generator().manual_seed(5)
    for backend in backends_for(device):
        for n in [0, 1, 50, 300]:
            boxes, scores = _inputs("clustered", n, g)
            idxs = torch.randint(0, 4, (n,), generator=g)
            expected = torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
            got = visionops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5, backend=backend)
            torch.testing.assert_close(got.cpu(), expected)
            torch.testing.assert_close(got.cpu(), reference.batched_nms(boxes, scores, idxs, 0.5))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_nms_exact_for_huge_coordinates_and_ids(device):
    """The coordinate-offset trick loses precision here; per-class NMS must not."""
    g = torch.Generator().manual_seed(6)
    boxes = (clustered_boxes(200, generator=g).double() + 1e7).float()
    scores = unique_scores(200, generator=g)
    idxs = torch.randint(0, 3, (200,), generator=g) * (2**40) - 2**41
    expected = reference.batched_nms(boxes, scores, idxs, 0.5)
    for backend in backends_for(device):
        got = visionops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5, backend=backend)
        torch.testing.assert_close(got.cpu(), expected)


def test_batched_nms_many_classes_cpu():
    g = torch.Generator().manual_seed(7)
    boxes, scores = _inputs("random", 4000, g)
    idxs = torch.randint(0, 80, (4000,), generator=g)
    torch.testing.assert_close(
        visionops.batched_nms(boxes, scores, idxs, 0.5), torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_box_iou(device, dtype):
    g = torch.Generator().manual_seed(8)
    a, b = random_boxes(13, scale=50, generator=g), random_boxes(17, scale=50, generator=g)
    a[0] = b[0]  # identical pair
    expected = torchvision.ops.box_iou(a.double(), b.double())
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(dtype, 1e-6)
    for backend in backends_for(device):
        got = visionops.box_iou(a.to(device, dtype), b.to(device, dtype), backend=backend)
        assert got.dtype == dtype and got.shape == (13, 17)
        torch.testing.assert_close(got.double().cpu(), expected, atol=tol, rtol=tol)
    assert visionops.box_iou(a[:0], b).shape == (0, 17)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_iou_gradcheck(device, seed):
    g = torch.Generator().manual_seed(seed)
    a = random_boxes(5, scale=20, max_size=15, dtype=torch.float64, generator=g).to(device).requires_grad_()
    b = random_boxes(6, scale=20, max_size=15, dtype=torch.float64, generator=g).to(device).requires_grad_()
    for backend in backends_for(device):
        assert torch.autograd.gradcheck(lambda x, y: visionops.box_iou(x, y, backend=backend), (a, b))


def test_box_iou_grad_matches_torchvision():
    g = torch.Generator().manual_seed(9)
    a = random_boxes(20, scale=60, generator=g).requires_grad_()
    b = random_boxes(30, scale=60, generator=g).requires_grad_()
    grad = torch.randn(20, 30, generator=g)
    expected = torch.autograd.grad(torchvision.ops.box_iou(a, b), (a, b), grad)
    for backend in backends_for("cpu"):
        got = torch.autograd.grad(visionops.box_iou(a, b, backend=backend), (a, b), grad)
        for x, y in zip(got, expected):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_box_iou_double_backward_raises():
    for backend in ["cpp", "triton"] if "triton" in backends_for("cpu") else ["cpp"]:
        a = random_boxes(3, dtype=torch.float64).requires_grad_()
        (ga,) = torch.autograd.grad(visionops.box_iou(a, a, backend=backend).sum(), a, create_graph=True)
        with pytest.raises(RuntimeError, match="double backward"):
            ga.sum().backward()


# ---- dispatcher integration: opcheck, compile, export ---------------------------------------------------------


def _op_samples(device="cpu"):
    g = torch.Generator().manual_seed(10)
    boxes, scores = _inputs("clustered", 80, g)
    idxs = torch.randint(0, 3, (80,), generator=g)
    a = random_boxes(6, dtype=torch.float64, generator=g).requires_grad_()
    b = random_boxes(5, dtype=torch.float64, generator=g).requires_grad_()
    ops = torch.ops.visionops
    samples = [
        (ops.nms.default, (boxes, scores, 0.5)),
        (ops.batched_nms.default, (boxes, scores, idxs, 0.5)),
        (ops.box_iou.default, (a, b)),
    ]
    if "triton" in backends_for(device):
        samples += [
            (ops.triton_nms.default, (boxes, scores, 0.5)),
            (ops.triton_batched_nms.default, (boxes, scores, idxs, 0.5)),
            (ops.triton_box_iou.default, (a, b)),
        ]
    return samples


@pytest.mark.parametrize("op,args", _op_samples(), ids=lambda x: getattr(x, "__name__", ""))
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    g = torch.Generator().manual_seed(11)
    boxes, scores = _inputs("clustered", 100, g)
    idxs = torch.randint(0, 3, (100,), generator=g)

    @torch.compile(fullgraph=True, backend="inductor")
    def postprocess(boxes, scores, idxs):
        keep = visionops.batched_nms(boxes, scores, idxs, 0.5)
        keep2 = visionops.nms(boxes, scores, 0.5)
        return boxes[keep] * 2, keep2, visionops.box_iou(boxes[:10], boxes[:20])

    out, keep2, iou = postprocess(boxes, scores, idxs)
    torch.testing.assert_close(out, boxes[torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)] * 2)
    torch.testing.assert_close(keep2, torchvision.ops.nms(boxes, scores, 0.5))
    torch.testing.assert_close(iou, torchvision.ops.box_iou(boxes[:10], boxes[:20]))


def test_torch_export():
    class PostProcess(torch.nn.Module):
        def forward(self, boxes, scores, idxs):
            return (
                visionops.batched_nms(boxes, scores, idxs, 0.5),
                visionops.nms(boxes, scores, 0.6),
                visionops.box_iou(boxes, boxes[:7]),
            )

    g = torch.Generator().manual_seed(12)
    boxes, scores = _inputs("clustered", 60, g)
    idxs = torch.randint(0, 3, (60,), generator=g)
    ep = torch.export.export(PostProcess(), (boxes, scores, idxs))
    for got, expected in zip(ep.module()(boxes, scores, idxs), PostProcess()(boxes, scores, idxs)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device):
    g = torch.Generator().manual_seed(13)
    boxes, scores = _inputs("clustered", 100, g)
    with torch.autocast(device, dtype=torch.bfloat16):
        got = visionops.nms(boxes.to(device).bfloat16(), scores.to(device), 0.5)
    torch.testing.assert_close(got.cpu(), torchvision.ops.nms(boxes.bfloat16().float(), scores, 0.5))


# ---- properties -----------------------------------------------------------------------------------------------

box_lists = st.lists(
    st.tuples(st.floats(0, 50), st.floats(0, 50), st.floats(0.5, 30), st.floats(0.5, 30)), min_size=0, max_size=60
)


@settings(max_examples=60, deadline=None)
@given(box_lists, st.floats(0.0, 1.0), st.randoms(use_true_random=False))
def test_nms_properties(raw, thr, rnd):
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in raw], dtype=torch.float64).reshape(-1, 4)
    perm = list(range(len(raw)))
    rnd.shuffle(perm)
    scores = torch.tensor(perm, dtype=torch.float64)
    keep = visionops.nms(boxes, scores, thr)
    iou = reference.box_iou(boxes, boxes)
    kept = set(keep.tolist())
    # no two kept boxes overlap above the threshold
    for i in kept:
        for j in kept:
            assert i == j or not iou[i, j] > thr
    # every dropped box overlaps a kept box of higher score above it
    for j in set(range(len(raw))) - kept:
        assert any(iou[i, j] > thr and scores[i] >= scores[j] for i in kept)
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, thr))


# ---- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda b, s, i: visionops.nms(b[:, :3], s, 0.5), ValueError, "boxes"),
        (lambda b, s, i: visionops.nms(b.long(), s, 0.5), TypeError, "boxes"),
        (lambda b, s, i: visionops.nms(b, s[:-1], 0.5), ValueError, "scores"),
        (lambda b, s, i: visionops.nms(b, s[:, None], 0.5), ValueError, "scores"),
        (lambda b, s, i: visionops.nms(b, s, "0.5"), TypeError, "iou_threshold"),
        (lambda b, s, i: visionops.nms(b.tolist(), s, 0.5), TypeError, "boxes"),
        (lambda b, s, i: visionops.nms(b, s, 0.5, backend="cuda"), ValueError, "backend"),
        (lambda b, s, i: visionops.batched_nms(b, s, i.float(), 0.5), TypeError, "idxs"),
        (lambda b, s, i: visionops.batched_nms(b, s, i[:-1], 0.5), ValueError, "idxs"),
        (lambda b, s, i: visionops.box_iou(b, b[:, :2]), ValueError, "boxes2"),
        (lambda b, s, i: visionops.box_iou(b, b.double()), TypeError, "dtype"),
        (lambda b, s, i: visionops.nms(b, s.to("meta"), 0.5), ValueError, "scores"),
    ],
)
def test_bad_input(call, exc, match):
    boxes, scores = _inputs("random", 10, torch.Generator().manual_seed(0))
    idxs = torch.zeros(10, dtype=torch.long)
    with pytest.raises(exc, match=match):
        call(boxes, scores, idxs)


def test_threshold_bounds_math():
    """IoU exactly at the threshold is kept (strictly greater suppresses), as torchvision."""
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0], [0.0, 0.0, 4.0, 1.0]])
    scores = torch.tensor([3.0, 2.0, 1.0])
    iou = reference.box_iou(boxes, boxes)
    assert math.isclose(iou[0, 1].item(), 1 / 3, rel_tol=1e-6) and iou[0, 2].item() == 0.5
    for backend in backends_for("cpu"):
        assert visionops.nms(boxes, scores, 0.5, backend=backend).tolist() == [0, 1, 2]
        assert visionops.nms(boxes, scores, 0.49, backend=backend).tolist() == [0, 1]
