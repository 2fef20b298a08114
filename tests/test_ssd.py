"""visionops.models.detection.SSD: torchvision's SSDMatcher, hard-negative mining and losses, the two backends
compared (detections in float32; losses, gradients and a few optimiser steps in float64), training on generated data
with both backends, eval and fixed-shape outputs (the latter under torch.compile(fullgraph=True)), list and batched
inputs, empty targets and bad inputs."""

import types

import pytest
import torch
import torchvision
from torch._dynamo.testing import CompileCounterWithBackend
from torchvision.models.detection import _utils as tv_det_utils
from torchvision.models.detection.ssd import SSD as TVSSD

from visionops.models import data
from visionops.models.detection import SSD
from visionops.models.detection.ssd import hard_negative_mask, ssd_match

BACKENDS = ("visionops", "pytorch")
NUM_CLASSES = 4  # shapes_detection's labels are 1..3, 0 is the background
SMALL = {"widths": (8, 16, 32, 32, 48)}


def _model(backend: str, seed: int = 0, **kwargs) -> SSD:
    for k, v in SMALL.items():
        kwargs.setdefault(k, v)
    return SSD(NUM_CLASSES, backend=backend, generator=torch.Generator().manual_seed(seed), **kwargs)


def _shapes(n: int, size=(64, 64), seed: int = 0):
    images, targets = data.shapes_detection(n, size, num_classes=3, generator=torch.Generator().manual_seed(seed))
    return images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]


def _lively(model: SSD, seed: int = 3) -> SSD:
    """Head outputs spread like a trained model's: a few confident classes per location, boxes moved about."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for conv in model.head.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.normal_(0.0, 0.02, generator=g)
                conv.bias.normal_(0.0, 1.0, generator=g)
    return model


def _empty_target():
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}


def test_state_dict_moves_between_backends():
    a, b = _model("visionops", seed=0), _model("pytorch", seed=1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert not torch.equal(a.head.regression_head.module_list[0].weight, b.head.regression_head.module_list[0].weight)
    b.load_state_dict(a.state_dict(), strict=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    a.load_state_dict(_model("pytorch", seed=2).state_dict(), strict=True)


def test_matcher_is_torchvisions():
    g = torch.Generator().manual_seed(0)
    for num_gt, n in ((6, 300), (1, 40), (3, 5)):
        iou = (torch.rand(num_gt, n, generator=g) * 8).floor() / 8  # coarse values: ties and exact thresholds
        for threshold in (0.5, 0.25):
            expected = tv_det_utils.SSDMatcher(threshold)(iou)
            assert torch.equal(ssd_match(iou, threshold), expected)
    # two ground-truth boxes whose best default box is the same one: the later wins, as in torchvision
    iou = torch.tensor([[0.3, 0.1, 0.0], [0.2, 0.1, 0.0]])
    assert ssd_match(iou).tolist() == [1, -1, -1] == tv_det_utils.SSDMatcher(0.5)(iou).tolist()
    assert ssd_match(torch.zeros(0, 4)).tolist() == [-1] * 4


def test_hard_negative_mining_ratio():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(4, 50, generator=g)
    loss[2, 10:30] = 0.5  # ties, broken by index
    foreground = torch.zeros(4, 50, dtype=torch.bool)
    foreground[0, [3, 7]] = True  # 2 positives: 6 negatives
    foreground[1, :20] = True  # 20 positives: 60 wanted, only 30 negatives, all of them taken
    foreground[2, 40:45] = True  # 5 positives: 15 negatives, among the ties
    # image 3 has no positives: no negatives (torchvision's ratio, which gives empty images no loss)
    mask = hard_negative_mask(loss, foreground, 3.0)
    assert mask.sum(1).tolist() == [6, 30, 15, 0]
    assert not (mask & foreground).any()
    for i in range(4):
        neg = ~foreground[i]
        chosen, rest = loss[i][mask[i]], loss[i][neg & ~mask[i]]
        if len(chosen) and len(rest):
            assert chosen.min() >= rest.max()
    ranked = loss[2].masked_fill(foreground[2], -1).argsort(descending=True, stable=True)[:15]
    assert torch.equal(mask[2].nonzero().squeeze(1), ranked.sort().values)
    assert hard_negative_mask(loss, foreground, 1.0).sum(1).tolist() == [2, 20, 5, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_losses_are_torchvisions(backend):
    images, targets = _shapes(3)
    images = torch.cat([images, images[:1]])
    targets = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets + [_empty_target()]]
    model = _lively(_model(backend)).double().train()
    x, _ = model._batch(images.double())
    logits, deltas, boxes = model._head_outputs(x)
    ours = model.loss(logits, deltas, boxes, targets)
    matcher = tv_det_utils.SSDMatcher(0.5)
    matched = [
        matcher(torchvision.ops.box_iou(t["boxes"], boxes))
        if len(t["boxes"])
        else torch.full((len(boxes),), -1, dtype=torch.int64)
        for t in targets
    ]
    tv_self = types.SimpleNamespace(box_coder=tv_det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0)), neg_to_pos_ratio=3.0)
    head_outputs = {"bbox_regression": deltas, "cls_logits": logits}
    expected = TVSSD.compute_loss(tv_self, targets, head_outputs, [boxes] * len(targets), matched)
    assert expected["classification"] > 0 and expected["bbox_regression"] > 0
    for k in ("classification", "bbox_regression"):
        torch.testing.assert_close(ours[k], expected[k], rtol=1e-12, atol=1e-12, msg=k)


def test_backends_agree_in_training_float64():
    images, targets = _shapes(3, seed=1)
    images = images.double()
    targets = [{"boxes": t["boxes"].double(), "labels": t["labels"]} for t in targets[:2]] + [_empty_target()]
    models = {b: _model(b).double().train() for b in BACKENDS}
    opts = {b: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for b, m in models.items()}
    losses = {b: [] for b in BACKENDS}
    for _ in range(3):
        for b, m in models.items():
            opts[b].zero_grad()
            loss_dict = m(list(images), targets)
            losses[b].append([loss_dict["classification"].item(), loss_dict["bbox_regression"].item()])
            sum(loss_dict.values()).backward()
        for (name, p), q in zip(models["visionops"].named_parameters(), models["pytorch"].parameters()):
            assert p.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        for b in BACKENDS:
            opts[b].step()
    for k, v in models["visionops"].state_dict().items():
        torch.testing.assert_close(v, models["pytorch"].state_dict()[k], rtol=1e-9, atol=1e-12, msg=k)
    torch.testing.assert_close(torch.tensor(losses["visionops"]), torch.tensor(losses["pytorch"]), rtol=1e-9, atol=0)


def _matched_one_to_one(ours, base):
    """Each detection of ``ours`` paired with a distinct one of ``base``: same label, IoU >= 0.99 (or the same
    corners, for boxes clipped flat at the image border), close score."""
    assert len(ours["boxes"]) == len(base["boxes"])
    iou = torchvision.ops.box_iou(ours["boxes"], base["boxes"])
    corners = (ours["boxes"][:, None] - base["boxes"][None]).abs().amax(-1) <= 1e-4
    same = (ours["labels"][:, None] == base["labels"][None]) & ((iou >= 0.99) | corners)
    same &= (ours["scores"][:, None] - base["scores"][None]).abs() <= 1e-5
    taken = torch.zeros(len(base["boxes"]), dtype=torch.bool)
    for i in range(len(ours["boxes"])):
        free = (same[i] & ~taken).nonzero()
        assert len(free), f"detection {i} ({ours['labels'][i]}, {ours['scores'][i]:.4f}) has no counterpart"
        taken[free[0, 0]] = True


def test_eval_detections_agree_across_backends():
    images, _ = _shapes(3, size=(96, 128), seed=1)
    ragged = [images[0], images[1, :, :80, :100], images[2, :, :64]]  # padded to 96x128 inside, clipped per image
    models = {b: _lively(_model(b, score_threshold=0.3, max_per_class=30, max_total=50)).eval() for b in BACKENDS}
    models["pytorch"].load_state_dict(models["visionops"].state_dict())
    with torch.no_grad():
        outs = {b: m(ragged) for b, m in models.items()}
    for ours, base, img in zip(outs["visionops"], outs["pytorch"], ragged):
        assert set(ours) == {"boxes", "scores", "labels"} and ours["labels"].dtype == torch.int64
        assert ours["boxes"].shape[1:] == (4,) and ours["boxes"].dtype == torch.float32
        assert 0 < len(ours["boxes"]) <= 50 and int(torch.bincount(ours["labels"]).max()) <= 30
        assert bool((ours["labels"] >= 1).all() and (ours["labels"] < NUM_CLASSES).all())
        assert bool((ours["scores"] > 0.3).all() and (ours["scores"][:-1] >= ours["scores"][1:]).all())
        assert bool((ours["boxes"][:, :2] >= 0).all() and (ours["boxes"][:, 2] <= img.shape[2]).all())
        assert bool((ours["boxes"][:, 3] <= img.shape[1]).all())
        _matched_one_to_one(ours, base)


@pytest.mark.parametrize("backend", BACKENDS)
def test_list_batched_and_fixed_shape_inputs_agree(backend):
    images, _ = _shapes(3, seed=2)
    model = _lively(_model(backend, score_threshold=0.3, max_total=40)).eval()
    with torch.no_grad():
        listed = model(list(images))
        batched = model(images)
        boxes, scores, labels, num = model(images, fixed_shape=True)
    assert boxes.shape == (3, 40, 4) and scores.shape == (3, 40) and labels.shape == (3, 40) and num.shape == (3,)
    for i, (a, b) in enumerate(zip(listed, batched)):
        n = int(num[i])
        assert n == len(a["boxes"]) == len(b["boxes"]) > 0
        for k in ("boxes", "scores", "labels"):
            assert torch.equal(a[k], b[k]), k
        assert torch.equal(boxes[i, :n], a["boxes"]) and torch.equal(scores[i, :n], a["scores"])
        assert torch.equal(labels[i, :n], a["labels"])
        assert not boxes[i, n:].any() and not scores[i, n:].any() and bool((labels[i, n:] == -1).all())
    model.train()
    _, targets = _shapes(3, seed=2)
    a, b = model(list(images), targets), model(images, targets)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_fixed_shape_compiles_fullgraph():
    model = _lively(_model("visionops", score_threshold=0.3, max_total=40)).eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.detect, fullgraph=True, backend=counter)  # a graph break (a host sync) raises
    for n in (2, 3):
        images, _ = _shapes(n, seed=n)
        torch._dynamo.mark_dynamic(images, 0)
        with torch.no_grad():
            expected = model(images, fixed_shape=True)
            got = compiled(images)
        assert int(expected[3].min()) > 0
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
    assert counter.frame_count == 1  # one graph serves both batch sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_loss_falls(backend):
    images, targets = _shapes(8, seed=3)
    model = _model(backend).train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_targets_train(backend):
    images, targets = _shapes(2, seed=4)
    model = _model(backend).train()
    x, _ = model._batch(images)
    logits, deltas, boxes = model._head_outputs(x)
    mixed = model.loss(logits, deltas, boxes, [targets[0], _empty_target()])
    alone = model.loss(logits[:1], deltas[:1], boxes, targets[:1])
    for k in mixed:  # an image without objects adds no matched box and no negative (torchvision's ratio)
        torch.testing.assert_close(mixed[k], alone[k], rtol=1e-6, atol=1e-7)
        assert mixed[k] > 0
    empty = model(images, [_empty_target(), _empty_target()])
    assert empty["classification"].item() == 0 and empty["bbox_regression"].item() == 0
    sum(empty.values()).backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_empty_and_bad_inputs():
    model = _model("visionops").eval()
    assert model([]) == []
    assert model(torch.rand(0, 3, 64, 64)) == []
    boxes, scores, labels, num = model(torch.rand(0, 3, 64, 64), fixed_shape=True)
    assert boxes.shape == (0, 200, 4) and num.shape == (0,)
    with pytest.raises(ValueError, match="backend"):
        SSD(4, backend="cuda")
    with pytest.raises(ValueError, match="num_classes"):
        SSD(1)
    with pytest.raises(ValueError, match="aspect_ratios"):
        SSD(4, aspect_ratios=[[2.0]] * 3)
    with pytest.raises(ValueError, match="scales"):
        SSD(4, backend="pytorch", scales=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="images"):
        model(torch.rand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="images"):
        model([torch.rand(64, 64)])
    with pytest.raises(TypeError, match="fixed_shape"):
        model([torch.rand(3, 64, 64)], fixed_shape=True)
    model.train()
    image = [torch.rand(3, 64, 64)]
    with pytest.raises(ValueError, match="targets"):
        model(image)
    with pytest.raises(ValueError, match="targets"):
        model(image + image, [_empty_target()])
    with pytest.raises(ValueError, match="images"):
        model([], [])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        model(image, [{"boxes": torch.zeros(2, 5), "labels": torch.ones(2, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]"):
        model(image, [{"boxes": torch.tensor([[10.0, 10.0, 5.0, 20.0]]), "labels": torch.ones(1, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        model(image, [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.zeros(1, dtype=torch.int64)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]"):
        model(image, [{"boxes": torch.tensor([[1.0, 1.0, 5.0, 5.0]]), "labels": torch.ones(1)}])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    """The same weights on the GPU: the same detections as on the CPU, and the same training losses."""
    images, targets = _shapes(2, size=(96, 128), seed=6)
    cpu = _lively(_model("visionops", score_threshold=0.3)).eval()
    gpu = _lively(_model("visionops", score_threshold=0.3)).eval().cuda()
    with torch.no_grad():
        for ours, base in zip(gpu(images.cuda()), cpu(images)):
            _matched_one_to_one({k: v.cpu() for k, v in ours.items()}, base)
    cpu.train(), gpu.train()
    a = cpu(images, targets)
    b = gpu(images.cuda(), [{k: v.cuda() for k, v in t.items()} for t in targets])
    for k in a:
        torch.testing.assert_close(b[k].cpu(), a[k], rtol=1e-3, atol=1e-4)
