"""NMS family: the nms, batched_nms and box_iou conformance suites (every backend against the reference and
torchvision, on random, clustered, degenerate, tied-score and exactly-at-threshold inputs), then the CPU grid path at
scale, extreme coordinates, autocast, properties (hypothesis) and thresholds."""

import math

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import visionops
from visionops import reference
from visionops.testing import (
    KernelDtypes,
    DEVICES,
    FLOAT_DTYPES,
    HALF_DTYPES,
    Bad,
    OpConformance,
    backends_for,
    clustered_boxes,
    degenerate_boxes,
    random_boxes,
    threshold_boxes,
    tied_scores,
    unique_scores,
)


def _up(t):
    """torchvision's CPU kernels take float32/float64: half inputs are compared in float32, as ours are."""
    return t.float() if t.dtype in HALF_DTYPES else t


def _boxes_and_scores(kind, scores_kind, n, g, dtype, device):
    if kind == "exact0.5":  # pairs with IoU exactly 1/2: kept at iou_threshold 0.5 (strictly greater suppresses)
        boxes = threshold_boxes(n // 2, iou=0.5, generator=g)
    elif kind == "exact0.25":
        boxes = threshold_boxes(n // 2, iou=0.25, generator=g)
    else:
        make = {
            "random": lambda: random_boxes(n, scale=200.0, generator=g),
            "clustered": lambda: clustered_boxes(n, generator=g),
            "degenerate": lambda: degenerate_boxes(n, generator=g),
        }[kind]
        boxes = make()
    scores = (tied_scores if scores_kind == "ties" else unique_scores)(len(boxes), generator=g)
    return boxes.to(device, dtype), scores.to(device, dtype)


# (boxes, scores, iou_threshold). Every config has 64+ boxes in full size (the CPU kernel's grid path); "ties": a
# few score values shared by many boxes, decided by input order (torchvision's stable sort)
NMS_CONFIGS = {
    "random_thr0": ("random", "unique", 0.0),
    "random_thr0.5": ("random", "unique", 0.5),
    "clustered_thr0.3": ("clustered", "unique", 0.3),
    "clustered_thr0.7": ("clustered", "unique", 0.7),
    "clustered_thr1": ("clustered", "unique", 1.0),
    "degenerate_thr0.5": ("degenerate", "unique", 0.5),
    "ties_thr0.5": ("clustered", "ties", 0.5),
    "ties_thr0.2": ("random", "ties", 0.2),
    "exact_thr0.5": ("exact0.5", "unique", 0.5),
    "exact_thr0.25": ("exact0.25", "unique", 0.25),
    "exact_ties_thr0.5": ("exact0.5", "ties", 0.5),
}
SIZES = {"full": 300, "small": 80, "tiny": 8}


class TestNms(OpConformance):
    op = "nms"
    configs = NMS_CONFIGS
    configs_interpreted = ("clustered_thr0.3", "degenerate_thr0.5", "ties_thr0.5", "exact_thr0.5")
    # An index result: the oracle decides in the op's own precision (float32 for half inputs, as the kernels and
    # torchvision): a float64 oracle would flip IoUs within a float32 ulp of the threshold.
    reference_dtype = None
    torchvision_dtypes = tuple(FLOAT_DTYPES)
    interpreted_cheap = True

    def fn(self, boxes, scores, iou_threshold, *, backend):
        return visionops.nms(boxes, scores, iou_threshold, backend=backend)

    def reference(self, boxes, scores, iou_threshold):
        return reference.nms(boxes, scores, iou_threshold)

    def torchvision_fn(self, boxes, scores, iou_threshold):
        return torchvision.ops.nms(_up(boxes), _up(scores), iou_threshold)

    def make_inputs(self, device, dtype, generator, size, config):
        kind, scores_kind, thr = config
        boxes, scores = _boxes_and_scores(kind, scores_kind, SIZES[size], generator, dtype, device)
        return boxes, scores, thr

    def empty_inputs(self, device, dtype):
        return {
            "empty": (torch.zeros(0, 4, device=device, dtype=dtype), torch.zeros(0, device=device, dtype=dtype), 0.5)
        }

    def bad_inputs(self):
        g = torch.Generator().manual_seed(0)
        b, s = random_boxes(10, generator=g), unique_scores(10, generator=g)
        nms = visionops.nms
        return [
            Bad("boxes_3_columns", lambda be: nms(b[:, :3], s, 0.5, backend=be), ValueError, "boxes"),
            Bad("boxes_integer", lambda be: nms(b.long(), s, 0.5, backend=be), TypeError, "boxes"),
            Bad("boxes_list", lambda be: nms(b.tolist(), s, 0.5, backend=be), TypeError, "boxes"),
            Bad("scores_short", lambda be: nms(b, s[:-1], 0.5, backend=be), ValueError, "scores"),
            Bad("scores_2d", lambda be: nms(b, s[:, None], 0.5, backend=be), ValueError, "scores"),
            Bad("scores_integer", lambda be: nms(b, s.long(), 0.5, backend=be), TypeError, "scores"),
            Bad("scores_other_device", lambda be: nms(b, s.to("meta"), 0.5, backend=be), ValueError, "scores.*device"),
            Bad("iou_threshold_string", lambda be: nms(b, s, "0.5", backend=be), TypeError, "iou_threshold"),
            Bad("backend_cuda", lambda be: nms(b, s, 0.5, backend="cuda"), ValueError, "backend"),
        ]


class TestBatchedNms(OpConformance):
    op = "batched_nms"
    configs = {
        k: NMS_CONFIGS[k]
        for k in (
            "random_thr0.5",
            "clustered_thr0.3",
            "clustered_thr0.7",
            "degenerate_thr0.5",
            "ties_thr0.5",
            "exact_thr0.5",
            "exact_ties_thr0.5",
        )
    }
    configs_interpreted = ("clustered_thr0.3", "ties_thr0.5", "exact_thr0.5")
    reference_dtype = None  # an index result (see TestNms)
    torchvision_dtypes = tuple(FLOAT_DTYPES)
    interpreted_cheap = True

    def fn(self, boxes, scores, idxs, iou_threshold, *, backend):
        return visionops.batched_nms(boxes, scores, idxs, iou_threshold, backend=backend)

    def reference(self, boxes, scores, idxs, iou_threshold):
        return reference.batched_nms(boxes, scores, idxs, iou_threshold)

    def torchvision_fn(self, boxes, scores, idxs, iou_threshold):
        # (under 1000 boxes torchvision offsets the classes apart and runs one stable nms)
        return torchvision.ops.batched_nms(_up(boxes), _up(scores), idxs, iou_threshold)

    def make_inputs(self, device, dtype, generator, size, config):
        kind, scores_kind, thr = config
        boxes, scores = _boxes_and_scores(kind, scores_kind, SIZES[size], generator, dtype, device)
        idxs = torch.randint(0, 4, (len(boxes),), generator=generator).to(device)
        return boxes, scores, idxs, thr

    def empty_inputs(self, device, dtype):
        return {
            "empty": (
                torch.zeros(0, 4, device=device, dtype=dtype),
                torch.zeros(0, device=device, dtype=dtype),
                torch.zeros(0, device=device, dtype=torch.int64),
                0.5,
            )
        }

    def bad_inputs(self):
        g = torch.Generator().manual_seed(0)
        b, s = random_boxes(10, generator=g), unique_scores(10, generator=g)
        i = torch.zeros(10, dtype=torch.long)
        bn = visionops.batched_nms
        return [
            Bad("idxs_float", lambda be: bn(b, s, i.float(), 0.5, backend=be), TypeError, "idxs"),
            Bad("idxs_bool", lambda be: bn(b, s, i.bool(), 0.5, backend=be), TypeError, "idxs"),
            Bad("idxs_short", lambda be: bn(b, s, i[:-1], 0.5, backend=be), ValueError, "idxs"),
            Bad("idxs_other_device", lambda be: bn(b, s, i.to("meta"), 0.5, backend=be), ValueError, "idxs.*device"),
            Bad("boxes_3_columns", lambda be: bn(b[:, :3], s, i, 0.5, backend=be), ValueError, "boxes"),
            Bad("scores_short", lambda be: bn(b, s[:-1], i, 0.5, backend=be), ValueError, "scores"),
            Bad("iou_threshold_none", lambda be: bn(b, s, i, None, backend=be), TypeError, "iou_threshold"),
        ]


class TestBoxIou(OpConformance):
    op = "box_iou"
    # "touching": integer corners, so coordinates tie in the max/min (the gradient splits as torch's does)
    configs = {"random": "random", "touching": "touching"}
    gradcheck_configs = ("random",)  # touching boxes sit on the kinks of max/min/clamp: no finite difference there
    interpreted_cheap = True
    has_grad = True
    grad_inputs = (0, 1)
    torchvision_dtypes = (torch.float64, torch.float32)
    tolerances = {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-6, atol=1e-6),
        torch.float16: dict(rtol=2e-3, atol=2e-3),
        torch.bfloat16: dict(rtol=1e-2, atol=1e-2),
    }

    def fn(self, boxes1, boxes2, *, backend):
        return visionops.box_iou(boxes1, boxes2, backend=backend)

    def reference(self, boxes1, boxes2):
        return reference.box_iou(boxes1, boxes2)

    def torchvision_fn(self, boxes1, boxes2):
        return torchvision.ops.box_iou(boxes1, boxes2)

    def make_inputs(self, device, dtype, generator, size, config):
        n, m = {"full": (13, 17), "small": (13, 17), "tiny": (5, 6)}[size]
        if config == "touching":
            a = torch.randint(0, 6, (n, 2), generator=generator).double()
            b = torch.randint(0, 6, (m, 2), generator=generator).double()
            a = torch.cat([a, a + torch.randint(1, 5, (n, 2), generator=generator)], 1)
            b = torch.cat([b, b + torch.randint(1, 5, (m, 2), generator=generator)], 1)
        else:
            scale, side = (50, 100) if size != "tiny" else (20, 15)
            a = random_boxes(n, scale=scale, max_size=side, generator=generator, dtype=torch.float64)
            b = random_boxes(m, scale=scale, max_size=side, generator=generator, dtype=torch.float64)
        a[0] = b[0]  # an identical pair
        return a.to(device, dtype), b.to(device, dtype)

    def empty_inputs(self, device, dtype):
        a = random_boxes(3, dtype=dtype, device=device)
        return {"no_boxes1": (a[:0], a), "no_boxes2": (a, a[:0]), "none": (a[:0], a[:0])}

    def bad_inputs(self):
        b = random_boxes(10)
        bi = visionops.box_iou
        return [
            Bad("boxes2_2_columns", lambda be: bi(b, b[:, :2], backend=be), ValueError, "boxes2"),
            Bad("boxes1_1d", lambda be: bi(b[0], b, backend=be), ValueError, "boxes1"),
            Bad("dtypes_differ", lambda be: bi(b, b.double(), backend=be), TypeError, "boxes1 and boxes2.*dtype"),
            Bad("boxes2_integer", lambda be: bi(b, b.long(), backend=be), TypeError, "boxes2"),
            Bad("boxes2_other_device", lambda be: bi(b, b.to("meta"), backend=be), ValueError, "boxes2.*device"),
        ]


# ---- beyond the conformance suites ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_box_iou_touching_boxes(backend, dtype):
    """Boxes sharing an edge or a corner (intersection side exactly 0) and nested ones: the forward values."""
    g = torch.Generator().manual_seed(2)
    a, b = TestBoxIou().make_inputs("cpu", torch.float64, g, "full", "touching")
    expect = torchvision.ops.box_iou(a, b)
    got = visionops.box_iou(a.to(dtype), b.to(dtype), backend=backend)
    tol = TestBoxIou.tolerances[dtype]
    torch.testing.assert_close(got.double(), expect, **tol)
    assert (expect == 0).any() and (expect == 1).any()


@pytest.mark.parametrize("iou", [0.5, 0.25])
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_iou_exactly_at_threshold_is_kept(backend, iou):
    """70 isolated pairs of boxes whose IoU is exactly the threshold (64+ boxes: the CPU kernel's grid path): a box
    is dropped only when its IoU is strictly greater, so all are kept; a hair below the threshold, one per pair."""
    g = torch.Generator().manual_seed(0)
    boxes = threshold_boxes(70, iou=iou, generator=g)
    scores = unique_scores(140, generator=g)
    for thr, kept in ((iou, 140), (math.nextafter(iou, 0), 70)):
        keep = visionops.nms(boxes, scores, thr, backend=backend)
        assert torch.equal(keep, torchvision.ops.nms(boxes, scores, thr)) and len(keep) == kept
        idxs = torch.arange(140) % 3
        keep = visionops.batched_nms(boxes, scores, idxs, thr, backend=backend)
        assert torch.equal(keep, torchvision.ops.batched_nms(boxes, scores, idxs, thr))


@pytest.mark.parametrize("kind,thr", [("clustered", 0.5), ("random", 0.2), ("exact0.5", 0.3)])
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_batched_nms_ties_keep_torchvision_boxes(backend, kind, thr):
    """Tied scores: which boxes survive depends on the order ties are visited in (input order, torchvision's stable
    sort). The kept set, and its scores in order, against torchvision."""
    g = torch.Generator().manual_seed(8)
    boxes, scores = _boxes_and_scores(kind, "ties", 300, g, torch.float32, "cpu")
    idxs = torch.randint(0, 4, (len(boxes),), generator=g)
    got = visionops.batched_nms(boxes, scores, idxs, thr, backend=backend)
    expect = torchvision.ops.batched_nms(boxes, scores, idxs, thr)
    assert torch.equal(got, expect)


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
    for scores in (unique_scores(len(boxes), generator=g), tied_scores(len(boxes), generator=g)):
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


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_nms_negative_and_nan_threshold(backend):
    g = torch.Generator().manual_seed(4)
    boxes, scores = random_boxes(300, scale=200.0, generator=g), unique_scores(300, generator=g)
    for thr in [-0.5, float("nan")]:
        torch.testing.assert_close(
            visionops.nms(boxes, scores, thr, backend=backend), torchvision.ops.nms(boxes, scores, thr)
        )


@pytest.mark.parametrize("backend,device", [(b, d) for d in DEVICES for b in backends_for(d)])
def test_batched_nms_exact_for_huge_coordinates_and_ids(backend, device):
    """The coordinate-offset trick loses precision here; per-class NMS must not."""
    g = torch.Generator().manual_seed(6)
    boxes = (clustered_boxes(200, generator=g).double() + 1e7).float()
    scores = unique_scores(200, generator=g)
    idxs = torch.randint(0, 3, (200,), generator=g) * (2**40) - 2**41
    expected = reference.batched_nms(boxes, scores, idxs, 0.5)
    got = visionops.batched_nms(boxes.to(device), scores.to(device), idxs.to(device), 0.5, backend=backend)
    torch.testing.assert_close(got.cpu(), expected)


def test_batched_nms_many_classes_cpu():
    g = torch.Generator().manual_seed(7)
    boxes, scores = random_boxes(4000, scale=200.0, generator=g), unique_scores(4000, generator=g)
    idxs = torch.randint(0, 80, (4000,), generator=g)
    torch.testing.assert_close(
        visionops.batched_nms(boxes, scores, idxs, 0.5), torchvision.ops.batched_nms(boxes, scores, idxs, 0.5)
    )


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_box_iou_double_backward_raises(backend):
    if backend not in backends_for("cpu"):
        pytest.skip("needs triton")
    a = random_boxes(3, dtype=torch.float64).requires_grad_()
    (ga,) = torch.autograd.grad(visionops.box_iou(a, a, backend=backend).sum(), a, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        ga.sum().backward()


# ---- autocast --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", ["nms", "batched_nms"])
@pytest.mark.parametrize("backend,device", [(b, d) for d in DEVICES for b in backends_for(d) if b != "reference"])
def test_autocast_runs_in_float32(op, backend, device):
    """As torchvision, the NMS ops are registered to run in float32 under autocast: half boxes and scores reach the
    kernel as float32 (autocast never downcasts float32 or float64). Without the registration the kernel would see
    them in the autocast dtype."""
    g = torch.Generator().manual_seed(13)
    half = torch.bfloat16 if device == "cpu" else torch.float16
    boxes, scores = clustered_boxes(100, generator=g), unique_scores(100, generator=g)
    idxs = torch.randint(0, 3, (100,), generator=g)
    args = (boxes.to(device, half), scores.to(device, half)) + ((idxs.to(device),) if op == "batched_nms" else ())
    with KernelDtypes() as mode, torch.autocast(device, dtype=half):
        got = getattr(visionops, op)(*args, 0.5, backend=backend)
    assert mode.seen[f"visionops::{'triton_' if backend == 'triton' else ''}{op}"] == [torch.float32] * 2
    tv = getattr(torchvision.ops, op)(*(a.float() if a.is_floating_point() else a for a in args), 0.5)
    torch.testing.assert_close(got.cpu(), tv.cpu())
    with KernelDtypes() as mode, torch.autocast(device, dtype=half):  # float32 and float64 stay as they are
        getattr(visionops, op)(*(a.double() if a.is_floating_point() else a for a in args), 0.5, backend=backend)
    assert list(mode.seen.values()) == [[torch.float64] * 2]


# ---- properties ------------------------------------------------------------------------------------------------------

box_lists = st.lists(
    st.tuples(st.floats(0, 50), st.floats(0, 50), st.floats(0.5, 30), st.floats(0.5, 30)), min_size=0, max_size=60
)


@settings(max_examples=60, deadline=None)
@given(box_lists, st.floats(0.0, 1.0), st.randoms(use_true_random=False), st.booleans())
def test_nms_properties(raw, thr, rnd, ties):
    boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in raw], dtype=torch.float64).reshape(-1, 4)
    perm = list(range(len(raw)))
    rnd.shuffle(perm)
    scores = torch.tensor(perm, dtype=torch.float64)
    if ties:
        scores = (scores / 4).floor()
    keep = visionops.nms(boxes, scores, thr)
    iou = reference.box_iou(boxes, boxes)
    kept = set(keep.tolist())
    # no two kept boxes overlap above the threshold
    for i in kept:
        for j in kept:
            assert i == j or not iou[i, j] > thr
    # every dropped box overlaps a kept box of higher score (or an equal score earlier in the input) above it
    for j in set(range(len(raw))) - kept:
        assert any(iou[i, j] > thr and (scores[i] > scores[j] or (scores[i] == scores[j] and i < j)) for i in kept)
    assert torch.equal(keep, torchvision.ops.nms(boxes, scores, thr))
    assert torch.equal(keep, reference.nms(boxes, scores, thr))


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_threshold_bounds_math(backend):
    """IoU exactly at the threshold is kept (strictly greater suppresses), as torchvision (the quadratic path)."""
    boxes = torch.tensor([[0.0, 0.0, 2.0, 1.0], [1.0, 0.0, 3.0, 1.0], [0.0, 0.0, 4.0, 1.0]])
    scores = torch.tensor([3.0, 2.0, 1.0])
    iou = reference.box_iou(boxes, boxes)
    assert math.isclose(iou[0, 1].item(), 1 / 3, rel_tol=1e-6) and iou[0, 2].item() == 0.5
    assert visionops.nms(boxes, scores, 0.5, backend=backend).tolist() == [0, 1, 2]
    assert visionops.nms(boxes, scores, 0.49, backend=backend).tolist() == [0, 1]
