"""Soft-NMS (part of the NMS family): the soft_nms and batched_soft_nms conformance suites (every backend against
the reference on clustered, random, tied-score and exactly-at-threshold inputs, each decay method a config), then
mmcv's published values, "hard" against visionops.nms, batched against per-class soft_nms, and autocast."""

import pytest
import torch

import visionops
from visionops import reference
from visionops.testing import (
    KernelDtypes,
    DEVICES,
    Bad,
    OpConformance,
    backends_for,
    clustered_boxes,
    random_boxes,
    threshold_boxes,
    tied_scores,
    unique_scores,
)

# name -> (boxes, scores, method, iou_threshold, sigma, score_threshold)
CONFIGS = {
    "gaussian_clustered": ("clustered", "unique", "gaussian", 0.3, 0.5, 0.001),
    "linear_clustered": ("clustered", "unique", "linear", 0.3, 0.5, 0.001),
    "hard_clustered": ("clustered", "unique", "hard", 0.5, 0.5, 0.001),
    "gaussian_ties": ("clustered", "ties", "gaussian", 0.3, 0.5, 0.001),
    "linear_ties": ("random", "ties", "linear", 0.1, 0.5, 0.01),
    "gaussian_random_sigma0.1": ("random", "unique", "gaussian", 0.3, 0.1, 0.05),
    "hard_exact0.5": ("exact0.5", "unique", "hard", 0.5, 0.5, 0.001),  # IoU exactly 0.5: kept (> decays)
}
SIZES = {"full": 240, "small": 48, "tiny": 8}


def _inputs(config, size, g, dtype, device):
    kind, scores_kind, method, thr, sigma, score_thr = config
    n = SIZES[size]
    if kind == "exact0.5":
        boxes = threshold_boxes(n // 2, iou=0.5, generator=g)
    elif kind == "clustered":
        boxes = clustered_boxes(n, generator=g)
    else:
        boxes = random_boxes(n, scale=200.0, generator=g)
    scores = (tied_scores if scores_kind == "ties" else unique_scores)(len(boxes), generator=g)
    return boxes.to(device, dtype), scores.to(device, dtype), thr, sigma, score_thr, method


class _SoftNmsBase(OpConformance):
    op = ""  # the shared base of the two suites
    configs = CONFIGS
    configs_interpreted = ("gaussian_clustered", "linear_ties", "hard_exact0.5")
    # Index and score results: the oracle decides in the op's own precision (IoU in float32 for float32/half boxes,
    # as the kernels): a float64 oracle would flip IoUs within a float32 ulp of iou_threshold.
    reference_dtype = None
    interpreted_cheap = True

    def empty_inputs(self, device, dtype):
        pair = (torch.zeros(0, 4, device=device, dtype=dtype), torch.zeros(0, device=device, dtype=dtype))
        return {"empty": self.complete(pair, device)}

    def complete(self, pair, device):
        """The call's arguments after boxes and scores."""
        return pair + (0.3, 0.5, 0.001, "gaussian")


class TestSoftNms(_SoftNmsBase):
    op = "soft_nms"

    def fn(self, boxes, scores, thr, sigma, score_thr, method, *, backend):
        return visionops.soft_nms(boxes, scores, thr, sigma, score_thr, method, backend=backend)

    def reference(self, boxes, scores, thr, sigma, score_thr, method):
        return reference.soft_nms(boxes, scores, thr, sigma, score_thr, method)

    def make_inputs(self, device, dtype, generator, size, config):
        return _inputs(config, size, generator, dtype, device)

    def bad_inputs(self):
        g = torch.Generator().manual_seed(0)
        b, s = random_boxes(10, generator=g), unique_scores(10, generator=g)
        sn = visionops.soft_nms
        return [
            Bad("boxes_3_columns", lambda be: sn(b[:, :3], s, backend=be), ValueError, "boxes"),
            Bad("boxes_integer", lambda be: sn(b.long(), s, backend=be), TypeError, "boxes"),
            Bad("scores_short", lambda be: sn(b, s[:-1], backend=be), ValueError, "scores"),
            Bad("scores_2d", lambda be: sn(b, s[:, None], backend=be), ValueError, "scores"),
            Bad("scores_integer", lambda be: sn(b, s.long(), backend=be), TypeError, "scores"),
            Bad("scores_other_device", lambda be: sn(b, s.to("meta"), backend=be), ValueError, "scores.*device"),
            Bad("sigma_0", lambda be: sn(b, s, sigma=0.0, backend=be), ValueError, "sigma"),
            Bad("sigma_negative", lambda be: sn(b, s, sigma=-1.0, backend=be), ValueError, "sigma"),
            Bad("sigma_string", lambda be: sn(b, s, sigma="0.5", backend=be), TypeError, "sigma"),
            Bad("method_unknown", lambda be: sn(b, s, method="soft", backend=be), ValueError, "method"),
            Bad("method_int", lambda be: sn(b, s, method=2, backend=be), TypeError, "method"),
            Bad("iou_threshold_string", lambda be: sn(b, s, "0.5", backend=be), TypeError, "iou_threshold"),
            Bad(
                "score_threshold_none",
                lambda be: sn(b, s, score_threshold=None, backend=be),
                TypeError,
                "score_threshold",
            ),
        ]


class TestBatchedSoftNms(_SoftNmsBase):
    op = "batched_soft_nms"

    def complete(self, pair, device):
        return pair + (torch.zeros(0, dtype=torch.long, device=device), 0.3, 0.5, 0.001, "gaussian")

    def fn(self, boxes, scores, idxs, thr, sigma, score_thr, method, *, backend):
        return visionops.batched_soft_nms(boxes, scores, idxs, thr, sigma, score_thr, method, backend=backend)

    def reference(self, boxes, scores, idxs, thr, sigma, score_thr, method):
        return reference.batched_soft_nms(boxes, scores, idxs, thr, sigma, score_thr, method)

    def make_inputs(self, device, dtype, generator, size, config):
        boxes, scores, *rest = _inputs(config, size, generator, dtype, device)
        idxs = torch.randint(0, 4, (len(boxes),), generator=generator).to(device)
        return (boxes, scores, idxs, *rest)

    def bad_inputs(self):
        g = torch.Generator().manual_seed(0)
        b, s = random_boxes(10, generator=g), unique_scores(10, generator=g)
        i = torch.zeros(10, dtype=torch.long)
        bn = visionops.batched_soft_nms
        return [
            Bad("idxs_float", lambda be: bn(b, s, i.float(), backend=be), TypeError, "idxs"),
            Bad("idxs_bool", lambda be: bn(b, s, i.bool(), backend=be), TypeError, "idxs"),
            Bad("idxs_short", lambda be: bn(b, s, i[:-1], backend=be), ValueError, "idxs"),
            Bad("idxs_other_device", lambda be: bn(b, s, i.to("meta"), backend=be), ValueError, "idxs.*device"),
            Bad("boxes_3_columns", lambda be: bn(b[:, :3], s, i, backend=be), ValueError, "boxes"),
            Bad("scores_integer", lambda be: bn(b, s.long(), i, backend=be), TypeError, "scores"),
            Bad("sigma_0", lambda be: bn(b, s, i, sigma=0.0, backend=be), ValueError, "sigma"),
            Bad("method_unknown", lambda be: bn(b, s, i, method="naive", backend=be), ValueError, "method"),
        ]


# ---- beyond the conformance suites ---------------------------------------------------------------------------------

ALL = [(b, d) for d in DEVICES for b in backends_for(d)]


@pytest.mark.parametrize("method", ["linear", "gaussian", "hard"])
@pytest.mark.parametrize("backend,device", ALL)
def test_mmcv_published_values(backend, device, method):
    """mmcv's expected values: open-mmlab/mmcv tests/test_ops/test_nms.py, Testnms.test_softnms_allclose
    (iou_threshold 0.3, sigma 0.5, min_score 0.01, offset 0; mmcv's "naive" is "hard" here)."""
    boxes = torch.tensor([[6.0, 3.0, 8.0, 7.0], [3.0, 6.0, 9.0, 11.0], [3.0, 7.0, 10.0, 12.0], [1.0, 4.0, 13.0, 7.0]])
    scores = torch.tensor([0.6, 0.9, 0.7, 0.2])
    expected = {
        "linear": ([1, 0, 2, 3], [0.9, 0.6, 0.29024392, 0.2]),
        "gaussian": ([1, 0, 2, 3], [0.9, 0.59630775, 0.35275510, 0.18650459]),
        "hard": ([1, 0, 3], [0.9, 0.6, 0.2]),
    }[method]
    keep, new = visionops.soft_nms(boxes.to(device), scores.to(device), 0.3, 0.5, 0.01, method, backend=backend)
    assert keep.tolist() == expected[0]
    torch.testing.assert_close(new.cpu(), torch.tensor(expected[1]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("backend,device", ALL)
def test_hard_is_nms(backend, device, thr):
    """method="hard" keeps visionops.nms's boxes, in the same order, with their scores unchanged."""
    g = torch.Generator().manual_seed(3)
    n = 48 if backend == "triton" and device == "cpu" else 400
    boxes, scores = clustered_boxes(n, generator=g).to(device), unique_scores(n, generator=g).to(device)
    keep, new = visionops.soft_nms(boxes, scores, thr, method="hard", score_threshold=1e-9, backend=backend)
    # (score 0 is below any positive score_threshold: the lowest unique score is 0, dropped from the start)
    expect = visionops.nms(boxes[scores >= 1e-9], scores[scores >= 1e-9], thr)
    expect = torch.nonzero(scores >= 1e-9).flatten()[expect]
    assert torch.equal(keep.cpu(), expect.cpu())
    assert torch.equal(new, scores[keep])


@pytest.mark.parametrize("method", ["gaussian", "linear", "hard"])
@pytest.mark.parametrize("backend,device", ALL)
def test_batched_is_per_class_soft_nms(backend, device, method):
    """Each class of batched_soft_nms equals soft_nms of that class's boxes (same boxes, scores, order)."""
    g = torch.Generator().manual_seed(5)
    n = 40 if backend == "triton" and device == "cpu" else 300
    boxes, scores = clustered_boxes(n, objects=3, generator=g).to(device), unique_scores(n, generator=g).to(device)
    idxs = (torch.randint(0, 3, (n,), generator=g) * 7 - 5).to(device)  # negative and sparse class ids
    keep, new = visionops.batched_soft_nms(boxes, scores, idxs, method=method, backend=backend)
    assert torch.all(new[1:] <= new[:-1])
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        k, s = visionops.soft_nms(boxes[members], scores[members], method=method, backend=backend)
        mine = idxs[keep] == c
        assert torch.equal(keep[mine], members[k])
        torch.testing.assert_close(new[mine], s)


@pytest.mark.parametrize("backend,device", ALL)
def test_score_threshold(backend, device):
    """Boxes scored below score_threshold are never kept (mmcv keeps its top box even then); equal is kept."""
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], device=device)
    scores = torch.tensor([0.25, 0.5, 0.125], device=device)
    keep, new = visionops.soft_nms(boxes, scores, score_threshold=0.25, backend=backend)
    assert keep.tolist() == [1, 0] and new.tolist() == [0.5, 0.25]
    keep, new = visionops.soft_nms(boxes, scores, score_threshold=0.75, backend=backend)
    assert keep.numel() == 0 and new.numel() == 0


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in ALL if b != "reference"])
def test_autocast_runs_in_float32(backend, device):
    """As nms: under autocast the kernels see float32 boxes and scores; new_scores come back in float32."""
    g = torch.Generator().manual_seed(13)
    half = torch.bfloat16 if device == "cpu" else torch.float16
    boxes, scores = clustered_boxes(40, generator=g).to(device, half), unique_scores(40, generator=g).to(device, half)
    with KernelDtypes() as mode, torch.autocast(device, dtype=half):
        keep, new = visionops.soft_nms(boxes, scores, backend=backend)
    assert mode.seen[f"visionops::{'triton_' if backend == 'triton' else ''}soft_nms"] == [torch.float32] * 2
    assert new.dtype == torch.float32
    expect = reference.soft_nms(boxes.float(), scores.float(), 0.3, 0.5, 0.001, "gaussian")
    assert torch.equal(keep.cpu(), expect[0])


@pytest.mark.parametrize("backend,device", [(b, d) for b, d in ALL if b != "reference"])
@pytest.mark.parametrize("sigma", [1e-4, 1e-300, 40.0])
def test_gaussian_weights_at_the_edges_of_exp(backend, device, sigma):
    """A tiny sigma sends exp(-iou^2 / sigma) below the normal range (subnormal, then 0); NaN boxes give NaN IoUs:
    every weight still equals the reference's, kept boxes and their scores too."""
    g = torch.Generator().manual_seed(14)
    boxes = clustered_boxes(300, objects=2, generator=g).double()
    boxes[::37] = float("nan")
    scores = unique_scores(300, generator=g).double()
    keep, new = visionops.soft_nms(boxes.to(device), scores.to(device), 0.3, sigma, 0.0, "gaussian", backend=backend)
    expect = reference.soft_nms(boxes, scores, 0.3, sigma, 0.0, "gaussian")
    assert torch.equal(keep.cpu(), expect[0])
    torch.testing.assert_close(new.cpu(), expect[1], rtol=1e-12, atol=0)
