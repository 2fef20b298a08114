"""Matrix NMS (part of the NMS family): the conformance suite (every backend against the reference, on boxes and on
masks, both kernels, tied scores, one label or many), then values worked by hand, mmdetection's N x N formulation,
the selection arguments, the checks of the kernels' own ops, and autocast."""

import math

import pytest
import torch

import visionops
from visionops.bench.cases.nms import matrix_nms_baseline
from visionops.reference.nms import matrix_nms as reference_matrix_nms
from visionops.testing import (
    DEVICES,
    Bad,
    KernelDtypes,
    OpConformance,
    backends_for,
    clustered_boxes,
    degenerate_boxes,
    random_boxes,
    tied_scores,
    unique_scores,
)

# name -> (input kind, scores, kernel, sigma, score_threshold, max_num, labels)
CONFIGS = {
    "boxes_gaussian": ("clustered", "unique", "gaussian", 2.0, 0.0, -1, 4),
    "boxes_linear_top": ("clustered", "unique", "linear", 2.0, 0.05, 30, 3),
    "boxes_ties_one_label": ("clustered", "ties", "gaussian", 0.5, 0.0, -1, 1),
    "boxes_degenerate": ("degenerate", "unique", "linear", 2.0, 0.0, -1, 2),
    "masks_gaussian": ("masks", "unique", "gaussian", 2.0, 0.1, -1, 3),
    "masks_linear_float": ("float_masks", "ties", "linear", 2.0, 0.0, 20, 2),
}
SIZES = {"full": 300, "small": 40, "tiny": 8}
MASK_SIZES = {"full": 120, "small": 24, "tiny": 8}


def rasterise(boxes, size=24):
    """Bool masks [N, size, size] of boxes scaled onto the grid (empty ones where a box misses every pixel)."""
    grid = torch.arange(size, dtype=torch.float64) + 0.5
    b = boxes.double()
    b = (b - b.min()) / (b.max() - b.min()) * size
    inside_x = (grid[None, :] >= b[:, 0:1]) & (grid[None, :] < b[:, 2:3])
    inside_y = (grid[None, :] >= b[:, 1:2]) & (grid[None, :] < b[:, 3:4])
    return inside_y[:, :, None] & inside_x[:, None, :]


def _inputs(config, size, g, dtype, device):
    kind, scores_kind, kernel, sigma, thr, max_num, labels = config
    n = (MASK_SIZES if "masks" in kind else SIZES)[size]
    if kind == "degenerate":
        data = degenerate_boxes(n, generator=g).to(dtype)
    else:
        data = clustered_boxes(n, objects=max(2, n // 30), generator=g)
        if kind == "masks":
            data = rasterise(data)
        elif kind == "float_masks":
            data = rasterise(data).to(dtype)
        else:
            data = data.to(dtype)
    scores = (tied_scores if scores_kind == "ties" else unique_scores)(n, generator=g).to(dtype)
    lab = torch.randint(0, labels, (n,), generator=g)
    return data.to(device), scores.to(device), lab.to(device), kernel, sigma, thr, max_num


class TestMatrixNms(OpConformance):
    op = "matrix_nms"
    configs = CONFIGS
    interpreted_cheap = True
    # the oracle sees the inputs' own dtype and decides in the kernels' precision (IoU in the boxes' opmath type,
    # the rest in float64): a float64 oracle would reorder decayed scores within a float32 ulp of each other
    reference_dtype = None

    def fn(self, data, scores, labels, kernel, sigma, thr, max_num, *, backend):
        return visionops.matrix_nms(
            data, scores, labels, kernel=kernel, sigma=sigma, score_threshold=thr, max_num=max_num, backend=backend
        )

    def reference(self, data, scores, labels, kernel, sigma, thr, max_num):
        return reference_matrix_nms(data, scores, labels, kernel, sigma, thr, max_num)

    def make_inputs(self, device, dtype, generator, size, config):
        return _inputs(config, size, generator, dtype, device)

    def empty_inputs(self, device, dtype):
        rest = (torch.zeros(0, dtype=torch.long, device=device), "gaussian", 2.0, 0.0, -1)
        scores = torch.zeros(0, device=device, dtype=dtype)
        return {
            "boxes": (torch.zeros(0, 4, device=device, dtype=dtype), scores) + rest,
            "masks": (torch.zeros(0, 5, 6, device=device, dtype=torch.bool), scores) + rest,
        }

    def bad_inputs(self):
        g = torch.Generator().manual_seed(0)
        b, s = random_boxes(10, generator=g), unique_scores(10, generator=g)
        lab = torch.zeros(10, dtype=torch.long)
        m = rasterise(b, 8)
        mn = visionops.matrix_nms
        return [
            Bad("boxes_3_columns", lambda be: mn(b[:, :3], s, lab, backend=be), ValueError, "boxes_or_masks"),
            Bad("boxes_integer", lambda be: mn(b.long(), s, lab, backend=be), TypeError, "boxes_or_masks"),
            Bad("masks_integer", lambda be: mn(m.long(), s, lab, backend=be), TypeError, "boxes_or_masks"),
            Bad("masks_4d", lambda be: mn(m[:, None], s, lab, backend=be), ValueError, "boxes_or_masks"),
            Bad("boxes_1d", lambda be: mn(s, s, lab, backend=be), ValueError, "boxes_or_masks"),
            Bad("scores_short", lambda be: mn(b, s[:-1], lab, backend=be), ValueError, "scores"),
            Bad("scores_integer", lambda be: mn(b, s.long(), lab, backend=be), TypeError, "scores"),
            Bad("labels_float", lambda be: mn(b, s, lab.float(), backend=be), TypeError, "labels"),
            Bad("labels_bool", lambda be: mn(b, s, lab.bool(), backend=be), TypeError, "labels"),
            Bad("labels_short", lambda be: mn(m, s, lab[:-1], backend=be), ValueError, "labels"),
            Bad("labels_2d", lambda be: mn(b, s, lab[:, None], backend=be), ValueError, "labels"),
            Bad("labels_other_device", lambda be: mn(b, s, lab.to("meta"), backend=be), ValueError, "labels.*device"),
            Bad("kernel_unknown", lambda be: mn(b, s, lab, kernel="gauss", backend=be), ValueError, "kernel"),
            Bad("kernel_int", lambda be: mn(b, s, lab, kernel=1, backend=be), TypeError, "kernel"),
            Bad("sigma_0", lambda be: mn(b, s, lab, sigma=0.0, backend=be), ValueError, "sigma"),
            Bad("sigma_negative", lambda be: mn(m, s, lab, sigma=-2.0, backend=be), ValueError, "sigma"),
            Bad("sigma_string", lambda be: mn(b, s, lab, sigma="2", backend=be), TypeError, "sigma"),
            Bad("score_threshold_none", lambda be: mn(b, s, lab, score_threshold=None, backend=be), TypeError, "score"),
            Bad("max_num_float", lambda be: mn(b, s, lab, max_num=3.0, backend=be), TypeError, "max_num"),
            Bad("max_num_negative", lambda be: mn(b, s, lab, max_num=-2, backend=be), ValueError, "max_num"),
        ]


# ---- beyond the conformance suite ----------------------------------------------------------------------------------

ALL = [(b, d) for d in DEVICES for b in backends_for(d)]


def _hand_inputs(device):
    """Label 0: A, then B and C each half of A (IoU 0.5 with A, touching each other: IoU 0). Label 1: D, a copy of A.
    Label 2: P, then Q (IoU 90 / 110 with P), then R, which misses P and meets Q in 5 of 195."""
    boxes = torch.tensor(
        [
            [0.0, 0, 10, 10],  # A 0.9
            [0, 0, 10, 5],  # B 0.8
            [0, 5, 10, 10],  # C 0.7
            [0, 0, 10, 10],  # D 0.6
            [20, 0, 30, 10],  # P 0.95
            [20, 1, 30, 11],  # Q 0.5
            [20, 10.5, 30, 20.5],  # R 0.45
        ],
        device=device,
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.95, 0.5, 0.45], device=device)
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 2], device=device)
    return boxes, scores, labels


@pytest.mark.parametrize("backend,device", ALL)
def test_hand_computed(backend, device):
    """B and C decay by f(0.5) / f(0); C's ratio through B is f(0) / f(comp_B = 0.5) > 1, so A's decides. Q decays
    by f(90/110). R's only ratio, f(5/195) / f(comp_Q = 90/110), is > 1: R keeps its score (the cap at 1)."""
    boxes, scores, labels = _hand_inputs(device)
    for kernel, f in (("gaussian", lambda x: math.exp(-2.0 * x * x)), ("linear", lambda x: 1 - x)):
        keep, new = visionops.matrix_nms(boxes, scores, labels, kernel=kernel, backend=backend)
        expect = {0: 0.9, 3: 0.6, 4: 0.95, 6: 0.45, 1: 0.8 * f(0.5), 2: 0.7 * f(0.5), 5: 0.5 * f(90 / 110)}
        order = sorted(expect, key=lambda i: -expect[i])
        assert keep.tolist() == order, kernel
        torch.testing.assert_close(new.cpu(), torch.tensor([expect[i] for i in order]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernel", ["gaussian", "linear"])
@pytest.mark.parametrize("masks", [False, True])
@pytest.mark.parametrize("backend,device", ALL)
def test_matches_mmdetection_formulation(backend, device, masks, kernel):
    """The decayed scores of mmdetection's mask_matrix_nms, written as its N x N matrices (the benchmark baseline)."""
    g = torch.Generator().manual_seed(7)
    n = 40 if backend == "triton" and device == "cpu" else 200
    boxes = clustered_boxes(n, objects=6, generator=g)
    data = rasterise(boxes, 32) if masks else boxes
    scores, labels = unique_scores(n, generator=g) + 0.01, torch.randint(0, 3, (n,), generator=g)
    if masks:  # mmdetection's 0 / 0 (two empty masks; linear: a copy of a copy) spreads NaN: leave those out
        _, inverse = torch.unique(data.flatten(1), dim=0, return_inverse=True)
        first = torch.full((n,), n).scatter_reduce(0, inverse, torch.arange(n), "amin")[inverse] == torch.arange(n)
        keep_in = first & data.flatten(1).any(1)
        data, scores, labels = data[keep_in], scores[keep_in], labels[keep_in]
    args = (data.to(device), scores.to(device), labels.to(device))
    keep, new = visionops.matrix_nms(*args, kernel=kernel, sigma=1.5, backend=backend)
    base_keep, base_new = matrix_nms_baseline(*args, kernel=kernel, sigma=1.5)
    torch.testing.assert_close(new, base_new, rtol=1e-5, atol=1e-6)
    close = (base_new[1:] - base_new[:-1]).abs() < 1e-5  # float32 decays may swap near-equal neighbours
    near = torch.zeros(len(base_new), dtype=torch.bool, device=close.device)
    near[:-1] |= close
    near[1:] |= close
    assert torch.equal(keep[~near], base_keep[~near])


@pytest.mark.parametrize("backend,device", ALL)
def test_selection_arguments(backend, device):
    """score_threshold keeps decayed scores >= it (equal kept); max_num keeps the best; 0 keeps none."""
    boxes, scores, labels = _hand_inputs(device)
    full_keep, full_new = visionops.matrix_nms(boxes, scores, labels, backend=backend)
    thr = float(full_new[2])  # D's score, undecayed: exactly the float32 value
    assert full_keep[2] == 3
    keep, new = visionops.matrix_nms(boxes, scores, labels, score_threshold=thr, backend=backend)
    assert torch.equal(keep, full_keep[:3]) and torch.equal(new, full_new[:3])
    keep, new = visionops.matrix_nms(boxes, scores, labels, max_num=2, backend=backend)
    assert torch.equal(keep, full_keep[:2]) and torch.equal(new, full_new[:2])
    keep, new = visionops.matrix_nms(boxes, scores, labels, max_num=0, backend=backend)
    assert keep.numel() == 0 and new.numel() == 0


@pytest.mark.parametrize("backend,device", ALL)
def test_linear_ignores_sigma_and_labels_separate(backend, device):
    """The linear kernel takes any sigma; relabelling every box apart leaves every score undecayed."""
    boxes, scores, labels = _hand_inputs(device)
    a = visionops.matrix_nms(boxes, scores, labels, kernel="linear", sigma=0.0, backend=backend)
    b = visionops.matrix_nms(boxes, scores, labels, kernel="linear", sigma=5.0, backend=backend)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    keep, new = visionops.matrix_nms(boxes, scores, torch.arange(7, device=device) * 3 - 4, backend=backend)
    assert torch.equal(new, scores[keep]) and torch.equal(keep.cpu(), torch.sort(scores.cpu(), descending=True)[1])


@pytest.mark.parametrize("backend,device", ALL)
def test_empty_masks_count_as_disjoint(backend, device):
    """Two empty masks have IoU 0 / 0: counted as 0, so neither decays the other; identical masks decay fully
    under "linear" (a duplicate of the top mask gets 0), and the third copy's 0 / 0 ratio is ignored."""
    masks = torch.zeros(5, 4, 4, dtype=torch.bool, device=device)
    masks[2:, :2, :2] = True
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5], device=device)
    labels = torch.zeros(5, dtype=torch.long, device=device)
    keep, new = visionops.matrix_nms(masks, scores, labels, kernel="linear", backend=backend)
    assert keep.tolist() == [0, 1, 2, 3, 4]
    assert new.tolist() == pytest.approx([0.9, 0.8, 0.7, 0.0, 0.0])


def test_kernel_ops_check_their_arguments():
    """The C++ op (and the Triton op, through the registry's check) refuse what the wrapper refuses."""
    b, s, lab = _hand_inputs("cpu")
    op = torch.ops.visionops.matrix_nms
    with pytest.raises(ValueError, match="matrix_nms: kernel"):
        op(b, s, lab, "box", 2.0, 0.0, -1)
    with pytest.raises(ValueError, match="matrix_nms: sigma"):
        op(b, s, lab, "gaussian", -1.0, 0.0, -1)
    with pytest.raises(TypeError, match="matrix_nms: labels"):
        op(b, s, lab.float(), "gaussian", 2.0, 0.0, -1)
    with pytest.raises(ValueError, match="matrix_nms: boxes_or_masks"):
        op(b[:, :3], s, lab, "gaussian", 2.0, 0.0, -1)
    if "triton" in backends_for("cpu"):
        import visionops.triton.matrix_nms  # noqa: F401

        with pytest.raises(ValueError, match="matrix_nms: kernel"):
            torch.ops.visionops.triton_matrix_nms(b, s, lab, "box", 2.0, 0.0, -1)


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in ALL if b != "reference"])
def test_autocast_runs_in_float32(backend, device):
    """As nms: under autocast the kernels see float32 boxes and scores; new_scores come back in float32."""
    g = torch.Generator().manual_seed(13)
    half = torch.bfloat16 if device == "cpu" else torch.float16
    boxes, scores = clustered_boxes(40, generator=g).to(device, half), unique_scores(40, generator=g).to(device, half)
    labels = torch.randint(0, 2, (40,), generator=g).to(device)
    with KernelDtypes() as mode, torch.autocast(device, dtype=half):
        keep, new = visionops.matrix_nms(boxes, scores, labels, backend=backend)
    assert mode.seen[f"visionops::{'triton_' if backend == 'triton' else ''}matrix_nms"] == [torch.float32] * 2
    assert new.dtype == torch.float32
    expect = reference_matrix_nms(boxes.float(), scores.float(), labels, "gaussian", 2.0, 0.0, -1)
    assert torch.equal(keep.cpu(), expect[0].cpu())
