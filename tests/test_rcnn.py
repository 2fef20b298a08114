"""visionops.models.detection: Fast, Faster and Mask R-CNN with both backends (same detections, losses and gradients
on the same weights), torchvision's losses, training on generated data (an image without objects included), the
eval output format, list vs batched input, bad input, and the generated detection set."""

import pytest
import torch
import torchvision
from torchvision.models.detection.roi_heads import fastrcnn_loss, maskrcnn_loss

from visionops.models import data
from visionops.models.detection import FastRCNN, FasterRCNN, MaskRCNN, jittered_proposals

BACKENDS = ("visionops", "pytorch")
MODELS = (FastRCNN, FasterRCNN, MaskRCNN)
NUM_CLASSES = 4  # background + shapes_detection's three kinds
SMALL = dict(width=32, representation_size=64, mask_width=16, box_batch_size_per_image=64)


def _model(cls, backend: str, seed: int = 0, **options):
    small = {k: v for k, v in SMALL.items() if k in cls.option_names()}
    return cls(NUM_CLASSES, backend=backend, generator=torch.Generator().manual_seed(seed), **small, **options)


def _lively(model, seed: int = 3):
    """Spread-out scores, as a trained model's (untrained, every class scores about 1 / num_classes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.roi_heads.cls_score.weight.normal_(0.0, 0.3, generator=g)
        model.roi_heads.bbox_pred.weight.normal_(0.0, 0.01, generator=g)
        if hasattr(model, "rpn"):
            model.rpn.cls_logits.weight.normal_(0.0, 0.3, generator=g)
    return model


@pytest.fixture(scope="module")
def shapes():
    images, targets = data.shapes_detection(3, (64, 64), generator=torch.Generator().manual_seed(0))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    empty["masks"] = torch.zeros(0, 64, 64, dtype=torch.uint8)
    return images, targets[:2] + [empty]  # the third image trains as background only


def _run(model, images, targets, proposals=None):
    if isinstance(model, FastRCNN):
        return model(images, targets, proposals=proposals)
    return model(images, targets)


def _proposals(targets, size, dtype=torch.float32):
    return [
        p.to(dtype)
        for p in jittered_proposals(targets, [size] * len(targets), generator=torch.Generator().manual_seed(5))
    ]


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_state_dict_moves_between_backends(cls):
    a, b = _model(cls, "visionops", seed=0), _model(cls, "pytorch", seed=1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert not torch.equal(a.roi_heads.fc6.weight, b.roi_heads.fc6.weight)
    b.load_state_dict(a.state_dict(), strict=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    a.load_state_dict(_model(cls, "pytorch", seed=2).state_dict(), strict=True)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_backends_agree_in_training_float64(cls, shapes):
    images, targets = shapes
    images = images.double()
    targets = [dict(t, boxes=t["boxes"].double()) for t in targets]
    proposals = _proposals(targets, (64, 64), torch.float64)
    models = {b: _lively(_model(cls, b)).double().train() for b in BACKENDS}
    opts = {b: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for b, m in models.items()}
    for _ in range(2):
        losses = {}
        for b, m in models.items():
            opts[b].zero_grad()
            losses[b] = _run(m, list(images), targets, proposals)
            sum(losses[b].values()).backward()
        assert set(losses["visionops"]) == set(losses["pytorch"])
        for k, v in losses["visionops"].items():
            assert torch.isfinite(v), k
            torch.testing.assert_close(v, losses["pytorch"][k], rtol=1e-9, atol=1e-12, msg=k)
        for (name, p), q in zip(models["visionops"].named_parameters(), models["pytorch"].parameters()):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        for b in BACKENDS:
            opts[b].step()


def test_losses_are_torchvisions(shapes):
    """The box head's and the mask head's losses equal torchvision's fastrcnn_loss and maskrcnn_loss."""
    images, targets = shapes
    model = _lively(_model(MaskRCNN, "visionops")).double().train()
    targets = [dict(t, boxes=t["boxes"].double()) for t in targets]
    x, sizes = model._prepare(images.double(), targets, masks=True)
    feats = model.fpn(model.backbone(x))
    fmaps = {str(i): f for i, f in enumerate(feats[:3])}
    padded = [tuple(x.shape[-2:])] * len(sizes)
    proposals, _ = model.rpn(feats, padded[0], sizes, None, model.generator)
    props, matched, labels, reg = model.roi_heads.select_training_samples(proposals, targets, model.generator)
    logits, deltas = model.roi_heads(model.box_roi_pool(fmaps, props, padded))
    ours = model.roi_heads.loss(logits, deltas, labels, reg)
    expected = fastrcnn_loss(logits, deltas, [labels], [reg])
    torch.testing.assert_close(ours["loss_classifier"], expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours["loss_box_reg"], expected[1], rtol=1e-12, atol=1e-12)
    mask = model._extra_losses(fmaps, padded, props, matched, labels, targets)["loss_mask"]
    per_image = labels.split([len(p) for p in props])
    pos = [(lab > 0).nonzero().squeeze(1) for lab in per_image]
    mask_logits = model._masks(fmaps, padded, [p[i] for p, i in zip(props, pos)])
    expected = maskrcnn_loss(
        mask_logits,
        [p[i] for p, i in zip(props, pos)],
        [t["masks"] for t in targets],
        [lab[i] for lab, i in zip(per_image, pos)],
        [m[i] for m, i in zip(matched, pos)],
    )
    torch.testing.assert_close(mask, expected, rtol=1e-12, atol=1e-12)


def _match(ours, base):
    """Detections matched one to one by label and box IoU >= 0.99, scores equal within float tolerance."""
    assert len(ours["boxes"]) == len(base["boxes"])
    iou = torchvision.ops.box_iou(ours["boxes"], base["boxes"])
    iou[ours["labels"][:, None] != base["labels"][None, :]] = 0
    best, idx = iou.max(1)
    assert bool((best >= 0.99).all()) and len(set(idx.tolist())) == len(idx)
    torch.testing.assert_close(ours["scores"], base["scores"][idx], rtol=1e-4, atol=1e-5)
    if "masks" in ours:
        torch.testing.assert_close(ours["masks"], base["masks"][idx], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_eval_outputs_agree_and_have_torchvisions_format(cls):
    images, targets = data.shapes_detection(3, (96, 128), generator=torch.Generator().manual_seed(1))
    ragged = [images[0], images[1, :, :80, :100], images[2, :, :64]]  # padded inside, clipped per image
    sizes = [tuple(i.shape[1:]) for i in ragged]
    proposals = jittered_proposals(targets, sizes, generator=torch.Generator().manual_seed(2))
    models = {b: _lively(_model(cls, b, box_score_thresh=0.3, box_detections_per_img=30)).eval() for b in BACKENDS}
    with torch.no_grad():
        outs = {b: m(ragged, proposals=proposals) if cls is FastRCNN else m(ragged) for b, m in models.items()}
    keys = {"boxes", "labels", "scores"} | ({"masks"} if cls is MaskRCNN else set())
    for ours, base, (h, w) in zip(outs["visionops"], outs["pytorch"], sizes):
        assert set(ours) == keys and ours["labels"].dtype == torch.int64
        assert 0 < len(ours["boxes"]) <= 30
        assert bool((ours["scores"][:-1] >= ours["scores"][1:]).all()) and bool((ours["scores"] >= 0.3).all())
        assert bool(((ours["labels"] >= 1) & (ours["labels"] < NUM_CLASSES)).all())
        assert bool((ours["boxes"][:, 2:] <= torch.tensor([w, h])).all() and (ours["boxes"] >= 0).all())
        if cls is MaskRCNN:
            masks = ours["masks"]
            assert masks.shape == (len(ours["boxes"]), 1, h, w) and masks.dtype == torch.float32
            assert float(masks.min()) >= 0 and float(masks.max()) <= 1
        _match(ours, base)


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_list_and_batched_input_agree(cls):
    images, targets = data.shapes_detection(2, (64, 96), generator=torch.Generator().manual_seed(4))
    model = _lively(_model(cls, "visionops", box_score_thresh=0.3)).eval()
    kwargs = {"proposals": _proposals(targets, (64, 96))} if cls is FastRCNN else {}
    with torch.no_grad():
        batched, listed = model(images, **kwargs), model(list(images), **kwargs)
    for a, b in zip(batched, listed):
        assert a.keys() == b.keys() and len(a["boxes"]) > 0
        for k in a:
            torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_training_loss_falls(cls, backend):
    images, targets = data.shapes_detection(4, (64, 64), generator=torch.Generator().manual_seed(6))
    targets[3] = {k: v[:0] for k, v in targets[3].items()}  # an image without objects
    proposals = _proposals(targets, (64, 64))
    model = _model(cls, backend).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    history = []
    for _ in range(30):
        loss = sum(_run(model, images, targets, proposals).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    first, last = sum(history[:5]) / 5, sum(history[-5:]) / 5
    assert last < 0.7 * first, history


@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_no_detections_and_empty_proposals(cls):
    model = _model(cls, "visionops", box_score_thresh=1.0).eval()  # no score reaches 1
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        out = model([image], proposals=[torch.zeros(0, 4)]) if cls is FastRCNN else model([image])
    assert out[0]["boxes"].shape == (0, 4) and out[0]["scores"].shape == (0,) and out[0]["labels"].shape == (0,)
    if cls is MaskRCNN:
        assert out[0]["masks"].shape == (0, 1, 64, 64)
    kwargs = {"proposals": []} if cls is FastRCNN else {}
    assert model([], **kwargs) == [] and model(torch.rand(0, 3, 64, 64), **kwargs) == []


def test_pytorch_backend_runs_nothing_of_visionops(shapes):
    images, targets = shapes
    model = _lively(_model(MaskRCNN, "pytorch"))
    with torch.profiler.profile() as prof:
        sum(model.train()(images, targets).values()).backward()
        with torch.no_grad():
            model.eval()(images)
    names = {e.name for e in prof.events()}
    assert "torchvision::roi_align" in names and "torchvision::nms" in names
    assert not [n for n in names if "visionops" in n]


def test_bad_inputs():
    with pytest.raises(ValueError, match="backend"):
        FasterRCNN(4, backend="cuda")
    with pytest.raises(ValueError, match="num_classes"):
        MaskRCNN(1)
    with pytest.raises(TypeError, match="unknown options"):
        FasterRCNN(4, widht=32)
    with pytest.raises(TypeError, match="unknown options"):
        FasterRCNN(4, mask_width=32)  # Mask R-CNN's
    with pytest.raises(TypeError, match="unknown options"):
        FastRCNN(4, rpn_nms_thresh=0.5)  # no RPN
    model = _model(FasterRCNN, "visionops")
    with pytest.raises(ValueError, match="images"):
        model.eval()(torch.rand(2, 1, 64, 64))
    with pytest.raises(TypeError, match="images"):
        model([torch.rand(64, 64)])
    with pytest.raises(TypeError, match="floating"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    model.train()
    with pytest.raises(ValueError, match="targets"):
        model([torch.rand(3, 64, 64)])
    with pytest.raises(ValueError, match="targets"):
        model([torch.rand(3, 64, 64)], [{"boxes": torch.zeros(2, 5), "labels": torch.zeros(2, dtype=torch.int64)}])
    with pytest.raises(ValueError, match="targets"):
        _model(MaskRCNN, "visionops").train()(
            [torch.rand(3, 64, 64)], [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
        )
    fast = _model(FastRCNN, "visionops").eval()
    with pytest.raises(ValueError, match="proposals"):
        fast([torch.rand(3, 64, 64)])
    with pytest.raises(ValueError, match="proposals"):
        fast([torch.rand(3, 64, 64)], proposals=[torch.zeros(3, 5)])


def test_jittered_proposals_repeat_and_stay_inside():
    _, targets = data.shapes_detection(2, (64, 80), generator=torch.Generator().manual_seed(0))
    a = jittered_proposals(targets, [(64, 80)] * 2, generator=torch.Generator().manual_seed(1))
    b = jittered_proposals(targets, [(64, 80)] * 2, generator=torch.Generator().manual_seed(1))
    for pa, pb, t in zip(a, b, targets):
        assert torch.equal(pa, pb) and pa.shape[1] == 4
        assert len(pa) > 32  # jittered copies and random boxes
        assert bool((pa[:, 2:] - pa[:, :2] >= 1).all() and (pa >= 0).all() and (pa[:, 2] <= 80).all())
        assert bool((torchvision.ops.box_iou(t["boxes"], pa).max(1).values > 0.5).all())  # copies near every box


def test_generated_detection_set_is_consistent():
    images, targets = data.shapes_detection(12, generator=torch.Generator().manual_seed(3))
    assert images.shape == (12, 3, 128, 128) and 0 <= float(images.min()) and float(images.max()) <= 1
    counts = []
    for t in targets:
        masks, boxes = t["masks"], t["boxes"]
        assert masks.dtype == torch.uint8 and masks.shape == (len(boxes), 128, 128)
        assert bool(((t["labels"] >= 1) & (t["labels"] <= 3)).all())
        assert int(masks.sum(0).max()) <= 1  # visible parts only: no pixel belongs to two objects
        torch.testing.assert_close(torchvision.ops.masks_to_boxes(masks) + torch.tensor([0, 0, 1, 1]), boxes)
        counts.append(len(boxes))
    assert max(counts) > 1 and set(torch.cat([t["labels"] for t in targets]).tolist()) == {1, 2, 3}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", MODELS, ids=lambda c: c.__name__)
def test_cuda_matches_cpu(cls):
    """The same weights on the GPU: the same detections as on the CPU, and a training step's losses close."""
    images, targets = data.shapes_detection(2, (96, 128), generator=torch.Generator().manual_seed(6))
    proposals = _proposals(targets, (96, 128))
    cpu = _lively(_model(cls, "visionops", box_score_thresh=0.3)).eval()
    gpu = _lively(_model(cls, "visionops", box_score_thresh=0.3)).eval().cuda()
    extra = {"proposals": proposals} if cls is FastRCNN else {}
    extra_cuda = {"proposals": [p.cuda() for p in proposals]} if cls is FastRCNN else {}
    with torch.no_grad():
        outs = cpu(images, **extra), gpu(images.cuda(), **extra_cuda)
    for ours, base in zip(outs[1], outs[0]):
        _match({k: v.cpu() for k, v in ours.items()}, base)
    cpu.train(), gpu.train()
    tgts_cuda = [{k: v.cuda() for k, v in t.items()} for t in targets]
    # sampling draws from each model's generator on the CPU: both sample the same anchors and proposals
    a = cpu(images, targets, **extra)
    b = gpu(images.cuda(), tgts_cuda, **extra_cuda)
    for k in a:
        torch.testing.assert_close(b[k].cpu(), a[k], rtol=1e-3, atol=1e-4)
