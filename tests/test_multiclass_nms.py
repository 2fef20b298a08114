"""Fixed-shape multiclass NMS (part of the NMS family): the conformance suite (every backend against the reference,
per-class and class-agnostic, shared and per-class boxes, tight and loose caps), then the per-image torchvision
baseline, hand-worked caps, padding, autocast, torch.export with a dynamic batch, torch.compile and CUDA graphs."""

import pytest
import torch

import visionops
from visionops import _registry as registry
from visionops.bench.cases.nms import multiclass_nms_baseline
from visionops.reference.nms import multiclass_nms as reference_multiclass_nms
from visionops.testing import DEVICES, Bad, KernelDtypes, OpConformance, backends_for, clustered_boxes, needs_cuda

# name -> (per-class boxes, class_agnostic, iou_threshold, score_threshold, max_per_class, max_total)
CONFIGS = {
    "shared": (False, False, 0.5, 0.3, 4, 10),
    "per_class_boxes": (True, False, 0.5, 0.3, 4, 10),
    "agnostic": (False, True, 0.5, 0.3, 3, 10),
    "agnostic_per_class_boxes": (True, True, 0.4, 0.2, 2, 7),
    "loose_caps": (False, False, 0.6, 0.5, 50, 200),  # fewer detections than max_total: padding rows
    "agnostic_loose": (False, True, 0.6, 0.5, 50, 200),
}
SIZES = {"full": (3, 64, 5), "small": (2, 20, 3), "tiny": (1, 6, 2)}  # (B, N, C)


def make_batch(batch, n, classes, per_class_boxes, generator, dtype=torch.float32, device="cpu"):
    """Clustered boxes (NMS has work to do) and scores without ties across the whole batch."""
    shape = (batch, n, classes, 4) if per_class_boxes else (batch, n, 4)
    count = batch * n * (classes if per_class_boxes else 1)
    boxes = clustered_boxes(count, objects=4, generator=generator).reshape(shape)
    scores = torch.randperm(batch * n * classes, generator=generator).double() / (batch * n * classes)
    return boxes.to(device, dtype), scores.reshape(batch, n, classes).to(device, dtype)


def _inputs(config, size, g, dtype, device):
    per_class_boxes, agnostic, thr, score_thr, mpc, mt = config
    boxes, scores = make_batch(*SIZES[size], per_class_boxes, g, dtype, device)
    return boxes, scores, thr, score_thr, mpc, mt, agnostic


class TestMulticlassNms(OpConformance):
    op = "multiclass_nms"
    configs = CONFIGS
    configs_interpreted = ("shared", "agnostic_per_class_boxes", "loose_caps")
    # Selections: the oracle decides in the op's own precision (IoU in float32 for float32/half boxes, as the
    # kernels), and orders equal scores (bfloat16 rounds some together) as the kernels do.
    reference_dtype = None
    torchvision_dtypes = (torch.float32,)

    def fn(self, boxes, scores, thr, score_thr, mpc, mt, agnostic, *, backend):
        return visionops.multiclass_nms(boxes, scores, thr, score_thr, mpc, mt, agnostic, backend=backend)

    def reference(self, *inputs):
        return reference_multiclass_nms(*inputs)

    def torchvision_fn(self, *inputs):
        return multiclass_nms_baseline(*inputs)

    def make_inputs(self, device, dtype, generator, size, config):
        return _inputs(config, size, generator, dtype, device)

    def empty_inputs(self, device, dtype):
        def call(b, n, c, per_class_boxes=False, agnostic=False):
            boxes = torch.zeros((b, n, c, 4) if per_class_boxes else (b, n, 4), device=device, dtype=dtype)
            return boxes, torch.zeros(b, n, c, device=device, dtype=dtype), 0.5, 0.1, 3, 5, agnostic

        return {
            "batch0": call(0, 7, 3),
            "boxes0": call(2, 0, 3, agnostic=True),
            "classes0": call(2, 7, 0, per_class_boxes=True),
        }

    def test_empty(self, case):
        """Empty inputs give outputs of the fixed shapes: no detections (zeros, classes -1), not empty tensors."""
        inputs = self.empty_inputs(case.device, case.dtype)[case.config]
        out = self.fn(*inputs, backend=case.backend)
        batch, mt = inputs[1].shape[0], inputs[5]
        assert [tuple(o.shape) for o in out] == [(batch, mt, 4), (batch, mt), (batch, mt), (batch,)]
        assert not out[0].any() and not out[1].any() and not out[3].any() and bool((out[2] == -1).all())
        self.assert_same(out, self.reference(*inputs), case.dtype, case.backend, "empty output")

    def bad_inputs(self):
        g = torch.Generator().manual_seed(0)
        b, s = make_batch(2, 10, 3, False, g)
        pb, _ = make_batch(2, 10, 3, True, g)
        mn = visionops.multiclass_nms

        def bad(desc, exc, match, *args, **kwargs):
            full = dict(
                zip(
                    ("boxes", "scores", "iou_threshold", "score_threshold", "max_per_class", "max_total"),
                    (b, s, 0.5, 0.1, 5, 20),
                )
            )
            full.update(kwargs)
            return Bad(desc, lambda be: mn(**full, backend=be), exc, match)

        return [
            bad("max_total_0", ValueError, "max_total", max_total=0),
            bad("max_per_class_0", ValueError, "max_per_class", max_per_class=0),
            bad("max_total_float", TypeError, "max_total", max_total=2.0),
            bad("max_per_class_bool", TypeError, "max_per_class", max_per_class=True),
            bad("boxes_2d", ValueError, "boxes", boxes=b[0]),
            bad("boxes_5_columns", ValueError, "boxes", boxes=torch.cat([b, b[..., :1]], -1)),
            bad("boxes_other_n", ValueError, "boxes", boxes=b[:, :-1]),
            bad("boxes_other_batch", ValueError, "boxes", boxes=b[:1]),
            bad("per_class_boxes_other_c", ValueError, "boxes", boxes=pb[:, :, :2]),
            bad("scores_2d", ValueError, "scores", scores=s[0]),
            bad("scores_integer", TypeError, "scores", scores=s.long()),
            bad("boxes_integer", TypeError, "boxes", boxes=b.long()),
            bad("scores_other_dtype", TypeError, "scores", scores=s.double()),
            bad("scores_other_device", ValueError, "scores.*device", scores=s.to("meta")),
            bad("iou_threshold_string", TypeError, "iou_threshold", iou_threshold="0.5"),
            bad("score_threshold_none", TypeError, "score_threshold", score_threshold=None),
            Bad("class_agnostic_int", lambda be: mn(b, s, 0.5, 0.1, 5, 20, 1, backend=be), TypeError, "class_agnostic"),
            Bad("backend_unknown", lambda be: mn(b, s, 0.5, 0.1, 5, 20, backend="cuda"), ValueError, "backend"),
        ]


# ---- beyond the conformance suite ----------------------------------------------------------------------------------

ALL = [(b, d) for d in DEVICES for b in backends_for(d)]
KERNELS = [(b, d) for b, d in ALL if b != "reference"]


def _size(backend, device):
    return (2, 16, 3) if backend == "triton" and device == "cpu" else (4, 200, 6)


@pytest.mark.parametrize("agnostic", [False, True], ids=["per_class", "agnostic"])
@pytest.mark.parametrize("per_class_boxes", [False, True], ids=["shared_boxes", "per_class_boxes"])
@pytest.mark.parametrize("backend,device", ALL)
def test_random_batches_match_torchvision_loop(backend, device, per_class_boxes, agnostic):
    """Random batches against the per-image torchvision baseline (unique scores), tight and loose caps."""
    g = torch.Generator().manual_seed(7)
    boxes, scores = make_batch(*_size(backend, device), per_class_boxes, g, device=device)
    for thr, score_thr, mpc, mt in ((0.5, 0.2, 3, 8), (0.3, 0.6, 100, 400), (0.7, 0.0, 1, 1000)):
        got = visionops.multiclass_nms(boxes, scores, thr, score_thr, mpc, mt, agnostic, backend=backend)
        expect = multiclass_nms_baseline(boxes.cpu(), scores.cpu(), thr, score_thr, mpc, mt, agnostic)
        for a, e, name in zip(got, expect, ("boxes", "scores", "classes", "num_detections")):
            assert torch.equal(a.cpu(), e), f"{name} differ (iou {thr}, score {score_thr}, caps {mpc}/{mt})"


def _hand_case(device):
    # class 0: A, and B overlapping nothing of class 0; class 1: C overlapping B (IoU 0.6), D far away
    boxes = torch.tensor([[0.0, 0, 10, 10], [20, 0, 30, 10], [22, 0, 32, 10], [50, 50, 60, 60]], device=device)
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.0, 0.6]], device=device)
    return boxes[None], scores[None]


@pytest.mark.parametrize("backend,device", ALL)
def test_agnostic_capped_boxes_still_suppress(backend, device):
    """Class-agnostic, max_per_class 1: B is kept by NMS but dropped by its class's cap, and still suppresses C."""
    boxes, scores = _hand_case(device)
    b, s, c, num = visionops.multiclass_nms(boxes, scores, 0.5, 0.1, 1, 4, True, backend=backend)
    assert num.tolist() == [2] and c.tolist() == [[0, 1, -1, -1]]
    assert s.tolist()[0] == pytest.approx([0.9, 0.6, 0.0, 0.0])
    assert b[0, 1].tolist() == [50, 50, 60, 60] and not b[0, 2:].any()
    # per class, B and C never meet: both stay
    b, s, c, num = visionops.multiclass_nms(boxes, scores, 0.5, 0.1, 1, 4, False, backend=backend)
    assert num.tolist() == [2] and c.tolist() == [[0, 1, -1, -1]] and s[0, 1].item() == pytest.approx(0.7)
    # max_total caps the sum; score_threshold is strict
    _, s, c, num = visionops.multiclass_nms(boxes, scores, 0.5, 0.7, 5, 1, False, backend=backend)
    assert num.tolist() == [1] and c.tolist() == [[0]] and s.tolist() == [[pytest.approx(0.9)]]


@pytest.mark.parametrize("backend,device", KERNELS)
def test_autocast_runs_in_float32(backend, device):
    g = torch.Generator().manual_seed(13)
    half = torch.bfloat16 if device == "cpu" else torch.float16
    boxes, scores = make_batch(2, 16, 3, False, g, dtype=half, device=device)
    with KernelDtypes() as mode, torch.autocast(device, dtype=half):
        out = visionops.multiclass_nms(boxes, scores, 0.5, 0.2, 4, 10, backend=backend)
    assert mode.seen[registry.qualname("multiclass_nms", backend)] == [torch.float32] * 2
    assert out[0].dtype == out[1].dtype == torch.float32
    expect = reference_multiclass_nms(boxes.float().cpu(), scores.float().cpu(), 0.5, 0.2, 4, 10, False)
    assert all(torch.equal(a.cpu(), e) for a, e in zip(out, expect))


class _Head(torch.nn.Module):
    def __init__(self, backend, agnostic):
        super().__init__()
        self.backend, self.agnostic = backend, agnostic

    def forward(self, boxes, scores):
        return visionops.multiclass_nms(boxes, scores, 0.5, 0.2, 4, 10, self.agnostic, backend=self.backend)


@pytest.mark.parametrize("agnostic", [False, True], ids=["per_class", "agnostic"])
@pytest.mark.parametrize("backend,device", KERNELS)
def test_export_dynamic_batch(backend, device, agnostic):
    """Exported at B = 2 with a dynamic batch dimension, run at B = 3: same as eager."""
    g = torch.Generator().manual_seed(3)
    n, c = (12, 3) if backend == "triton" else (40, 4)
    batch = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(
        _Head(backend, agnostic),
        make_batch(2, n, c, False, g, device=device),
        dynamic_shapes=({0: batch}, {0: batch}),
    )
    assert registry.qualname("multiclass_nms", backend).replace("::", ".") in str(ep.graph)
    inputs = make_batch(3, n, c, False, g, device=device)
    got, expect = ep.module()(*inputs), _Head(backend, agnostic)(*inputs)
    assert got[0].shape == (3, 10, 4) and all(torch.equal(a, e) for a, e in zip(got, expect))


@pytest.mark.parametrize("backend,device", KERNELS)
def test_compile_fullgraph_dynamic(backend, device):
    """torch.compile(fullgraph=True, dynamic=True) without data-dependent output shapes allowed: one graph."""
    g = torch.Generator().manual_seed(4)
    torch._dynamo.reset()
    head = _Head(backend, False)
    compiled = torch.compile(head, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        inputs = make_batch(batch, 12, 3, False, g, device=device)
        assert all(torch.equal(a, e) for a, e in zip(compiled(*inputs), head(*inputs)))


@needs_cuda
@pytest.mark.parametrize("agnostic", [False, True], ids=["per_class", "agnostic"])
@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_cuda_graph_capture_and_replay(backend, agnostic):
    """Captured in a CUDA graph (any host synchronisation would fail the capture), replayed on new inputs."""
    g = torch.Generator().manual_seed(5)
    boxes, scores = make_batch(4, 500, 8, False, g, device="cuda")
    static_boxes, static_scores = boxes.clone(), scores.clone()

    def run():
        return visionops.multiclass_nms(static_boxes, static_scores, 0.5, 0.1, 20, 50, agnostic, backend=backend)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up (Triton compiles, allocator pools)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = run()
    for seed in (6, 7):
        new_boxes, new_scores = make_batch(4, 500, 8, False, torch.Generator().manual_seed(seed), device="cuda")
        static_boxes.copy_(new_boxes)
        static_scores.copy_(new_scores)
        graph.replay()
        expect = visionops.multiclass_nms(new_boxes, new_scores, 0.5, 0.1, 20, 50, agnostic, backend=backend)
        assert all(torch.equal(a, e) for a, e in zip(static_out, expect))
