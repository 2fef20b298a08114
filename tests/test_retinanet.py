"""visionops.models.detection.RetinaNet: training on generated data with both backends (float64, the backends
compared step by step), torchvision's matcher and losses, eval and fixed-shape outputs, and the fixed-shape forward
under torch.export (dynamic batch), torch.compile(fullgraph=True) and CUDA graphs."""

import pytest
import torch
import torchvision
from torch._dynamo.testing import CompileCounterWithBackend
from torch.export import Dim
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.retinanet import RetinaNetHead

from visionops.models import data
from visionops.models.detection import RetinaNet, match_anchors

BACKENDS = ("visionops", "pytorch")
NUM_CLASSES = 4  # shapes_detection's labels are 1..3; logit 0 stays unused, as torchvision's background index


def _model(backend: str, seed: int = 0, **kwargs) -> RetinaNet:
    kwargs.setdefault("width", 32)
    return RetinaNet(NUM_CLASSES, backend, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.fixture(scope="module")
def shapes():
    return data.shapes_detection(2, (64, 64), num_classes=3, generator=torch.Generator().manual_seed(0))


def _lively(model: RetinaNet, seed: int = 3) -> RetinaNet:
    """Random head outputs spread like a trained model's (untrained, every score is near the 0.01 prior)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (model.classification_head, model.regression_head):
            head.out.weight.normal_(0.0, 1.0, generator=g)
            head.out.bias.normal_(0.0, 1.0, generator=g)
    return model


def test_state_dict_moves_between_backends():
    a, b = _model("visionops", seed=0), _model("pytorch", seed=1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert not torch.equal(a.fpn.p6.weight, b.fpn.p6.weight)
    b.load_state_dict(a.state_dict(), strict=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    a.load_state_dict(_model("pytorch", seed=2).state_dict(), strict=True)


def test_matcher_is_torchvisions():
    g = torch.Generator().manual_seed(0)
    for g_boxes, n in ((5, 200), (1, 50), (0, 30)):
        iou = (torch.rand(g_boxes, n, generator=g) * 8).floor() / 8  # coarse values: ties and exact thresholds
        for low_quality in (True, False):
            expected = tv_det_utils.Matcher(0.5, 0.4, low_quality)(iou) if g_boxes else torch.full((n,), -1)
            assert torch.equal(match_anchors(iou, 0.5, 0.4, low_quality), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_are_torchvisions(backend, shapes):
    images, targets = shapes
    targets = targets + [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    images = torch.cat([images, images[:1]])
    model = _lively(_model(backend)).double().train()
    x, _ = model._batch(images.double())
    logits, deltas, anchors = model._head_outputs(x)
    targets = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets]
    ours = model.loss(logits, deltas, anchors, targets)
    matcher = tv_det_utils.Matcher(0.5, 0.4, allow_low_quality_matches=True)
    matched = [
        matcher(torchvision.ops.box_iou(t["boxes"], anchors))
        if len(t["boxes"])
        else torch.full((len(anchors),), -1, dtype=torch.int64)
        for t in targets
    ]
    head = RetinaNetHead(8, 9, NUM_CLASSES)  # only its compute_loss runs
    expected = head.compute_loss(
        targets, {"cls_logits": logits, "bbox_regression": deltas}, [anchors] * len(targets), matched
    )
    for k in ("classification", "bbox_regression"):
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-12, atol=1e-12, msg=k)


def test_backends_agree_in_training_float64(shapes):
    images, targets = shapes
    images = images.double()
    targets = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets]
    models = {b: _model(b).double().train() for b in BACKENDS}
    opts = {b: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for b, m in models.items()}
    losses = {b: [] for b in BACKENDS}
    for _ in range(3):
        for b, m in models.items():
            opts[b].zero_grad()
            loss_dict = m(list(images), targets)
            loss = loss_dict["classification"] + loss_dict["bbox_regression"]
            loss.backward()
            losses[b].append(loss.item())
        for (name, p), q in zip(models["visionops"].named_parameters(), models["pytorch"].parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        for b in BACKENDS:
            opts[b].step()
    for k, v in models["visionops"].state_dict().items():
        torch.testing.assert_close(v, models["pytorch"].state_dict()[k], rtol=1e-9, atol=1e-12, msg=k)
    torch.testing.assert_close(torch.tensor(losses["visionops"]), torch.tensor(losses["pytorch"]), rtol=1e-9, atol=0)
    assert losses["visionops"][2] < losses["visionops"][1] < losses["visionops"][0], losses


def _eval_images(n: int = 3, seed: int = 1):
    images, _ = data.shapes_detection(n, (96, 128), generator=torch.Generator().manual_seed(seed))
    return images


def test_eval_outputs_equal_across_backends():
    images = _eval_images()
    ragged = [images[0], images[1, :, :80, :100], images[2, :, :64]]  # padded to 96x128 inside, clipped per image
    models = {b: _lively(_model(b, score_threshold=0.6, max_per_class=20, max_total=30)).eval() for b in BACKENDS}
    with torch.no_grad():
        outs = {b: m(ragged) for b, m in models.items()}
    for ours, base, img in zip(outs["visionops"], outs["pytorch"], ragged):
        assert set(ours) == {"boxes", "scores", "labels"} and ours["labels"].dtype == torch.int64
        assert 0 < len(ours["boxes"]) <= 30 and len(ours["boxes"]) == len(base["boxes"])
        assert bool((ours["scores"][:-1] >= ours["scores"][1:]).all())
        assert bool((ours["boxes"][:, 2] <= img.shape[2]).all() and (ours["boxes"][:, 3] <= img.shape[1]).all())
        assert int(torch.bincount(ours["labels"]).max()) <= 20
        torch.testing.assert_close(ours["scores"], base["scores"])
        torch.testing.assert_close(ours["boxes"], base["boxes"], rtol=1e-5, atol=1e-4)
        assert torch.equal(ours["labels"], base["labels"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_shape_equals_list_output(backend):
    images = _eval_images()
    model = _lively(_model(backend, score_threshold=0.6, max_total=40)).eval()
    with torch.no_grad():
        listed = model(list(images))
        boxes, scores, labels, num = model(images, fixed_shape=True)
    assert boxes.shape == (3, 40, 4) and scores.shape == (3, 40) and labels.shape == (3, 40) and num.shape == (3,)
    for i, det in enumerate(listed):
        n = int(num[i])
        assert n == len(det["boxes"]) > 0
        assert torch.equal(boxes[i, :n], det["boxes"]) and torch.equal(scores[i, :n], det["scores"])
        assert torch.equal(labels[i, :n], det["labels"])
        assert not boxes[i, n:].any() and not scores[i, n:].any() and bool((labels[i, n:] == -1).all())


def test_empty_and_bad_inputs():
    model = _model("visionops").eval()
    assert model([]) == []
    boxes, scores, labels, num = model(torch.rand(0, 3, 64, 64), fixed_shape=True)
    assert boxes.shape == (0, 100, 4) and num.shape == (0,)
    with pytest.raises(ValueError, match="backend"):
        RetinaNet(4, "cuda")
    with pytest.raises(ValueError, match="num_classes"):
        RetinaNet(0)
    with pytest.raises(TypeError, match="fixed_shape"):
        model([torch.rand(3, 64, 64)], fixed_shape=True)
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 1, 64, 64), fixed_shape=True)
    with pytest.raises(ValueError, match="targets"):
        model.train()([torch.rand(3, 64, 64)])


def _exportable(seed: int = 0) -> RetinaNet:
    return _lively(_model("visionops", seed=seed, score_threshold=0.6, max_total=50)).eval()


def test_export_with_dynamic_batch():
    model = _exportable()
    batch = Dim("batch", min=1, max=64)
    ep = torch.export.export(
        model, (_eval_images(2),), {"fixed_shape": True}, dynamic_shapes={"images": {0: batch}, "fixed_shape": None}
    )
    exported = ep.module()
    for n in (3, 1):
        images = _eval_images(n, seed=10 + n)
        with torch.no_grad():
            expected = model(images, fixed_shape=True)
        got = exported(images, fixed_shape=True)
        assert int(expected[3].min()) > 0
        for a, b in zip(got, expected):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b)


def test_compile_fullgraph():
    model = _exportable()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.detect, fullgraph=True, backend=counter)  # fullgraph: a graph break raises
    for n in (2, 3):
        images = _eval_images(n, seed=n)
        torch._dynamo.mark_dynamic(images, 0)  # the batch only: H and W stay static, as in export
        with torch.no_grad():
            expected = model(images, fixed_shape=True)
            got = compiled(images)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1  # one graph serves both batch sizes


@pytest.mark.slow  # inductor's compilation: about 40 s on a small CPU
def test_compile_fullgraph_inductor():
    model = _exportable()
    compiled = torch.compile(model.detect, fullgraph=True)
    for n in (2, 3):
        images = _eval_images(n, seed=n)
        torch._dynamo.mark_dynamic(images, 0)
        with torch.no_grad():
            expected = model(images, fixed_shape=True)
            got = compiled(images)
        assert torch.equal(got[3], expected[3]) and torch.equal(got[2], expected[2])
        torch.testing.assert_close(got[1], expected[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got[0], expected[0], rtol=1e-4, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_matches_eager():
    model = _exportable().cuda()
    static = _eval_images(2).cuda()
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (lazy initialisations, cuDNN autotuning)
                model(static, fixed_shape=True)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = model(static, fixed_shape=True)
        for seed in (20, 21):
            static.copy_(_eval_images(2, seed=seed).cuda())
            graph.replay()
            expected = model(static, fixed_shape=True)
            assert int(expected[3].min()) > 0
            for a, b in zip(outputs, expected):
                torch.testing.assert_close(a, b)
