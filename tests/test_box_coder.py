"""Box coding: the decode_boxes, encode_boxes and filter_boxes conformance suites (every backend against the
float64 reference and torchvision's BoxCoder / RPN filter, gradients, registrations, bad input), then BoxCoder's
list API, half precision against torchvision, special values and CUDA."""

import math

import pytest
import torch
import torchvision
from torchvision.models.detection._utils import BoxCoder as TVBoxCoder

import visionops
from visionops import reference
from visionops.testing import DEVICES, Bad, OpConformance, backends_for, needs_cuda, random_boxes

HALF = (torch.float16, torch.bfloat16)
WEIGHTS = [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2.0, 3.0, 0.5, 7.0)]
CLIP = math.log(1000.0 / 16)
SIZES = {"full": 300, "small": 40, "tiny": 5}


def _inputs(n, k=1, *, seed=0, dtype=torch.float32, device="cpu", scale=1.0, generator=None):
    g = torch.Generator().manual_seed(seed) if generator is None else generator
    anchors = random_boxes(n, scale=300, max_size=80, generator=g, dtype=torch.float64)
    deltas = torch.randn(n, 4 * k, generator=g, dtype=torch.float64) * scale
    return deltas.to(dtype=dtype, device=device), anchors.to(dtype=dtype, device=device)


def _tol(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-10)
    if dtype == torch.float32:  # torch's vectorised exp/log differ from libm's by an ulp
        return dict(rtol=2e-6, atol=2e-4)
    return dict(rtol=2 * torch.finfo(dtype).eps, atol=0.5)


TOLERANCES = {dtype: _tol(dtype) for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}


class TestDecodeBoxes(OpConformance):
    op = "decode_boxes"
    covers = ("BoxCoder",)
    # (weights, classes per box, image size to clip to, delta scale)
    configs = {
        "w1_k1": (WEIGHTS[0], 1, None, 2.0),
        "w2_k3_clip": (WEIGHTS[1], 3, (200, 260), 1.0),
        "w3_k2": (WEIGHTS[2], 2, None, 1.5),
    }
    check_config = "w2_k3_clip"
    interpreted_cheap = True
    has_grad = True
    grad_inputs = (0, 1)
    tolerances = TOLERANCES
    torchvision_dtypes = (torch.float64, torch.float32)

    def fn(self, deltas, anchors, weights, clip, image_size, *, backend):
        return visionops.decode_boxes(deltas, anchors, weights, clip, image_size, backend=backend)

    def reference(self, deltas, anchors, weights, clip, image_size):
        return reference.decode_boxes(deltas, anchors, weights, clip, image_size)

    def torchvision_fn(self, deltas, anchors, weights, clip, image_size):
        out = TVBoxCoder(weights, clip).decode_single(deltas, anchors)
        if image_size is not None:
            out = torchvision.ops.clip_boxes_to_image(out.reshape(-1, 4), image_size).reshape(out.shape)
        return out

    def make_inputs(self, device, dtype, generator, size, config):
        weights, k, image_size, scale = config
        deltas, anchors = _inputs(SIZES[size], k, dtype=torch.float64, scale=scale, generator=generator)
        deltas[0, 2] = 50.0  # clamped by bbox_xform_clip: no gradient there, as torch.clamp
        return deltas.to(device, dtype), anchors.to(device, dtype), weights, CLIP, image_size

    def empty_inputs(self, device, dtype):
        e4, e8 = torch.zeros(0, 4, device=device, dtype=dtype), torch.zeros(0, 8, device=device, dtype=dtype)
        return {"k2": (e8, e4, WEIGHTS[0], CLIP, None), "clip": (e4, e4, WEIGHTS[1], CLIP, (5, 5))}

    def bad_inputs(self):
        d, a = _inputs(4, 1)
        db = visionops.decode_boxes
        return [
            Bad("deltas_6_columns", lambda b: db(torch.zeros(4, 6), a, backend=b), ValueError, "deltas"),
            Bad("deltas_1d", lambda b: db(torch.zeros(4), a, backend=b), ValueError, "deltas"),
            Bad(
                "deltas_integer", lambda b: db(torch.zeros(4, 4, dtype=torch.int64), a, backend=b), TypeError, "deltas"
            ),
            Bad("anchors_3_rows", lambda b: db(d, a[:3], backend=b), ValueError, "anchors"),
            Bad("anchors_5_columns", lambda b: db(d, torch.zeros(4, 5), backend=b), ValueError, "anchors"),
            Bad("anchors_other_device", lambda b: db(d, a.to("meta"), backend=b), ValueError, "anchors.*device"),
            Bad("weights_3", lambda b: db(d, a, (1.0, 1.0, 1.0), backend=b), ValueError, "weights"),
            Bad("weights_zero", lambda b: db(d, a, (1.0, 0.0, 1.0, 1.0), backend=b), ValueError, "weights"),
            Bad("image_size_1", lambda b: db(d, a, image_size=(5,), backend=b), ValueError, "image_size"),
            Bad("image_size_negative", lambda b: db(d, a, image_size=(5, -1), backend=b), ValueError, "image_size"),
            Bad(
                "bbox_xform_clip_string",
                lambda b: db(d, a, bbox_xform_clip="big", backend=b),
                TypeError,
                "bbox_xform_clip",
            ),
            Bad(
                "op_deltas_6_columns",
                lambda b: torch.ops.visionops.decode_boxes(torch.zeros(4, 6), a, [1.0] * 4, CLIP, []),
                RuntimeError,
                "decode_boxes.*deltas",
                ("cpp",),
            ),
        ]


class TestEncodeBoxes(OpConformance):
    op = "encode_boxes"
    covers = ("BoxCoder",)
    configs = {"w1": WEIGHTS[0], "w2": WEIGHTS[1], "w3": WEIGHTS[2]}
    interpreted_cheap = True
    tolerances = TOLERANCES
    torchvision_dtypes = (torch.float64, torch.float32)

    def fn(self, reference_boxes, proposals, weights, *, backend):
        return visionops.encode_boxes(reference_boxes, proposals, weights, backend=backend)

    def reference(self, reference_boxes, proposals, weights):
        return reference.encode_boxes(reference_boxes, proposals, weights)

    def torchvision_fn(self, reference_boxes, proposals, weights):
        return TVBoxCoder(weights).encode_single(reference_boxes, proposals)

    def make_inputs(self, device, dtype, generator, size, config):
        props = random_boxes(SIZES[size] * 2, scale=300, generator=generator, dtype=torch.float64)
        gts = props + torch.randn(props.shape, generator=generator, dtype=torch.float64) * 3
        gts[:, 2:] = torch.maximum(gts[:, 2:], gts[:, :2] + 1)
        return gts.to(device, dtype), props.to(device, dtype), config

    def empty_inputs(self, device, dtype):
        e4 = torch.zeros(0, 4, device=device, dtype=dtype)
        return {"empty": (e4, e4, WEIGHTS[1])}

    def bad_inputs(self):
        _, a = _inputs(4, 1)
        eb = visionops.encode_boxes
        return [
            Bad("proposals_2_rows", lambda b: eb(a, a[:2], backend=b), ValueError, "proposals"),
            Bad("reference_boxes_3_columns", lambda b: eb(a[:, :3], a, backend=b), ValueError, "reference_boxes"),
            Bad("proposals_integer", lambda b: eb(a, a.long(), backend=b), TypeError, "proposals"),
            Bad("weights_5", lambda b: eb(a, a, (1.0,) * 5, backend=b), ValueError, "weights"),
        ]


class TestFilterBoxes(OpConformance):
    op = "filter_boxes"
    # (score_threshold, min_size)
    configs = {"thr0_min0.001": (0.0, 1e-3), "thr0.3_min5": (0.3, 5.0), "thr0.9_min11": (0.9, 11.0)}
    interpreted_cheap = True
    reference_dtype = None  # thresholds are compared in the boxes' dtype: an index result, no tolerance
    torchvision_dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
    opcheck_utils = ("test_schema", "test_autograd_registration", "test_faketensor")  # data-dependent output size

    def fn(self, boxes, scores, score_threshold, min_size, *, backend):
        return visionops.filter_boxes(boxes, scores, score_threshold, min_size, backend=backend)

    def reference(self, boxes, scores, score_threshold, min_size):
        return reference.filter_boxes(boxes, scores, score_threshold, min_size)

    def torchvision_fn(self, boxes, scores, score_threshold, min_size):
        # torchvision's RPN: remove_small_boxes, then keep scores >= score_thresh
        keep = torchvision.ops.remove_small_boxes(boxes, min_size)
        return keep[torch.where(scores[keep] >= score_threshold)[0]]

    def make_inputs(self, device, dtype, generator, size, config):
        n = {"full": 500, "small": 64, "tiny": 8}[size]
        boxes = random_boxes(n, max_size=12, generator=generator)
        scores = torch.rand(n, generator=generator)
        return boxes.to(device, dtype), scores.to(device, dtype), *config

    def empty_inputs(self, device, dtype):
        return {
            "empty": (
                torch.zeros(0, 4, device=device, dtype=dtype),
                torch.zeros(0, device=device, dtype=dtype),
                0.1,
                1.0,
            )
        }

    def bad_inputs(self):
        _, a = _inputs(4, 1)
        fb = visionops.filter_boxes
        return [
            Bad("scores_3", lambda b: fb(a, torch.zeros(3), 0.1, 1.0, backend=b), ValueError, "scores"),
            Bad("scores_2d", lambda b: fb(a, torch.zeros(4, 1), 0.1, 1.0, backend=b), ValueError, "scores"),
            Bad("min_size_none", lambda b: fb(a, torch.zeros(4), 0.1, None, backend=b), TypeError, "min_size"),
            Bad(
                "score_threshold_string",
                lambda b: fb(a, torch.zeros(4), "0.1", 1.0, backend=b),
                TypeError,
                "score_threshold",
            ),
            Bad(
                "boxes_5_columns",
                lambda b: fb(torch.zeros(4, 5), torch.zeros(4), 0.1, 1.0, backend=b),
                ValueError,
                "boxes",
            ),
        ]


# ---- beyond the conformance suites ---------------------------------------------------------------------------------


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


@pytest.mark.parametrize("weights", WEIGHTS)
def test_decode_inverts_encode(weights):
    g = torch.Generator().manual_seed(6)
    props = random_boxes(256, scale=300, generator=g, dtype=torch.float64)
    gts = props + torch.randn(256, 4, generator=g, dtype=torch.float64) * 3
    gts[:, 2:] = torch.maximum(gts[:, 2:], gts[:, :2] + 1)
    for dtype in (torch.float32, torch.float64):
        codes = visionops.encode_boxes(gts.to(dtype), props.to(dtype), weights)
        back = visionops.decode_boxes(codes.double(), props, weights)
        torch.testing.assert_close(back, gts, rtol=1e-5, atol=1e-3)


def test_box_coder_bad_inputs():
    d, a = _inputs(4, 1)
    with pytest.raises(ValueError, match="weights"):
        visionops.BoxCoder((1.0, 0.0, 1.0, 1.0))
    with pytest.raises(TypeError, match="boxes"):
        visionops.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(d, a)
    with pytest.raises(TypeError, match="rel_codes"):
        visionops.BoxCoder((1.0, 1.0, 1.0, 1.0)).decode(d.tolist(), [a])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy's, from the Triton interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend,device", [(b, d) for d in DEVICES for b in backends_for(d)])
def test_special_values_match_torchvision(backend, device, dtype):
    # The CPU kernels use their own vectorised exp/log: check they treat inf, nan, huge and tiny values as torch.
    vals = [float("nan"), float("inf"), -float("inf"), -200.0, -90.0, 0.0, 80.0, 1000.0]
    deltas = torch.tensor([[0.0, 0.0, v, v] for v in vals], dtype=dtype, device=device)
    anchors = torch.tensor([[-1.0, -1.0, 1.0, 1.0]] * len(vals), dtype=dtype, device=device)
    ours = visionops.decode_boxes(deltas, anchors, bbox_xform_clip=1e4, backend=backend)
    theirs = TVBoxCoder((1.0, 1.0, 1.0, 1.0), bbox_xform_clip=1e4).decode_single(deltas, anchors)
    # atol: GPUs may flush float32 subnormals (e.g. 0.5 * exp(-90)) to zero
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=torch.finfo(dtype).tiny, equal_nan=True)
    sides = [0.0, -0.0, -2.0, float("inf"), float("nan"), 1e-40, 3.0]
    gts = torch.tensor([[0.0, 0.0, w, w] for w in sides], dtype=dtype, device=device)
    props = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * len(sides), dtype=dtype, device=device)
    ours = visionops.encode_boxes(gts, props, backend=backend)
    theirs = TVBoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gts, props)
    torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-6, equal_nan=True)


@needs_cuda
def test_cuda_matches_cpu():
    d, a = _inputs(10000, 3, seed=14, scale=2.0)
    cpu = visionops.decode_boxes(d, a, WEIGHTS[1], image_size=(300, 350))
    gpu = visionops.decode_boxes(d.cuda(), a.cuda(), WEIGHTS[1], image_size=(300, 350))
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=2e-6, atol=2e-4)
