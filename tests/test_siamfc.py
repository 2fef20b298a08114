"""visionops.models.siamfc: SiamFC's shapes, the two backends agreeing in training (float64), and the tracker
following a generated clip with fixed random weights."""

import pytest
import torch
import torch.nn.functional as F

from visionops.models import data
from visionops.models.siamfc import SiamFC, SiamFCTracker, balanced_bce_loss, crop_and_resize, logistic_labels

BACKENDS = ("visionops", "pytorch")


def _model(backend: str, seed: int = 0) -> SiamFC:
    return SiamFC(backend, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def clip():
    return data.tracking_clip(60, 360, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes(backend):
    model = _model(backend).eval()
    g = torch.Generator().manual_seed(1)
    z, x = torch.rand(1, 3, 127, 127, generator=g) * 255, torch.rand(3, 3, 255, 255, generator=g) * 255
    with torch.no_grad():
        assert model.features(z).shape == (1, 256, 6, 6)
        assert model.features(x).shape == (3, 256, 22, 22)
        assert model(z, x).shape == (3, 1, 17, 17)  # one exemplar against every search region (the scale pyramid)
        assert model(z.expand(3, -1, -1, -1), x).shape == (3, 1, 17, 17)  # one exemplar per search region


def test_state_dict_moves_between_backends():
    a, b = _model("visionops", seed=0), _model("pytorch", seed=1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert "head.bias" in a.state_dict() and "backbone.conv1.0.weight" in a.state_dict()  # siamfc-pytorch's names
    b.load_state_dict(a.state_dict(), strict=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    a.load_state_dict(_model("pytorch", seed=2).state_dict(), strict=True)


def test_the_generator_decides_the_weights():
    a, b, c = _model("visionops", 0), _model("pytorch", 0), _model("visionops", 1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.backbone.conv1[0].weight, c.backbone.conv1[0].weight)


def test_labels_and_balanced_loss():
    labels = logistic_labels((17, 17))
    assert labels.shape == (17, 17) and labels[8, 8] == 1 and labels[8, 10] == 1 and labels[7, 9] == 1
    assert labels[8, 11] == 0 and labels[6, 10] == 0 and int(labels.sum()) == 13  # |dy| + |dx| <= 16 / 8
    logits = torch.randn(2, 1, 17, 17, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    lab = labels.double().expand_as(logits)
    bce = F.binary_cross_entropy_with_logits(logits, lab, reduction="none")
    expected = 0.5 * bce[lab == 1].mean() + 0.5 * bce[lab == 0].mean()  # positives and negatives half each
    torch.testing.assert_close(balanced_bce_loss(logits, lab), expected)


def _pairs(clip, n: int = 2, gap: int = 5):
    """Training pairs as siamfc-pytorch builds them: exemplar and search crops centred on the target."""
    z, x = [], []
    for t in range(n):
        img = clip.frames[t * gap].double()
        (x1, y1, x2, y2), search = clip.boxes[t * gap].tolist(), clip.frames[t * gap + gap].double()
        w, h = x2 - x1, y2 - y1
        z_sz = ((w + (w + h) / 2) * (h + (w + h) / 2)) ** 0.5
        fill = img.mean((1, 2))
        z.append(crop_and_resize(img, ((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5), z_sz, 127, fill))
        x1, y1, x2, y2 = clip.boxes[t * gap + gap].tolist()
        x.append(crop_and_resize(search, ((y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5), z_sz * 255 / 127, 255, fill))
    return torch.stack(z), torch.stack(x)


def test_backends_agree_in_training_float64(clip):
    z, x = _pairs(clip)
    models = {b: _model(b).double().train() for b in BACKENDS}
    opts = {b: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4) for b, m in models.items()}
    losses = {b: [] for b in BACKENDS}
    for _ in range(2):  # two SGD steps, the backends compared after each
        responses = {}
        for b, m in models.items():
            opts[b].zero_grad()
            responses[b] = m(z, x)
            loss = m.loss(responses[b])
            loss.backward()
            losses[b].append(loss.item())
        torch.testing.assert_close(responses["visionops"], responses["pytorch"], rtol=1e-9, atol=1e-12)
        for (name, p), q in zip(models["visionops"].named_parameters(), models["pytorch"].parameters()):
            assert p.grad is not None and q.grad is not None, name  # conv biases before BatchNorm: zero up to rounding
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        for b in BACKENDS:
            opts[b].step()
    for k, v in models["visionops"].state_dict().items():  # weights and BatchNorm running statistics
        torch.testing.assert_close(v, models["pytorch"].state_dict()[k], rtol=1e-9, atol=1e-12, msg=k)
    assert losses["visionops"][-1] < losses["visionops"][0], losses
    torch.testing.assert_close(torch.tensor(losses["visionops"]), torch.tensor(losses["pytorch"]), rtol=1e-9, atol=0)


def test_crop_and_resize_centres_and_pads():
    img = torch.zeros(3, 20, 30)
    img[:, 4, 7] = 100.0
    fill = torch.tensor([1.0, 2.0, 3.0])
    patch = crop_and_resize(img, (4, 7), 9, 9, fill)  # inside the image: rows 0..8, columns 3..11
    assert patch.shape == (3, 9, 9) and patch[0, 4, 4] == 100 and patch.sum() == 300
    patch = crop_and_resize(img, (1, 7), 9, 9, fill)  # rows -3..5: three rows of the mean colour on top
    torch.testing.assert_close(patch[:, :3], fill[:, None, None].expand(3, 3, 9))
    assert patch[0, 7, 4] == 100 and patch[:, 3:].sum() == 300
    patch = crop_and_resize(img, (100, 100), 9, 5, fill)  # entirely outside
    torch.testing.assert_close(patch, fill[:, None, None].expand(3, 5, 5))
    assert crop_and_resize(img, (10, 15), 20, 40, fill).shape == (3, 40, 40)


def test_tracking_clip_repeats_and_moves_as_documented(clip):
    again = data.tracking_clip(60, 360, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clip.frames, again.frames) and torch.equal(clip.boxes, again.boxes)
    assert clip.frames.shape == (60, 3, 360, 360) and clip.frames.dtype == torch.uint8
    assert clip.boxes.shape == (60, 4) and clip.centers.shape == (60, 2) and clip.distractor_boxes.shape == (60, 4)
    torch.testing.assert_close((clip.boxes[:, :2] + clip.boxes[:, 2:]) / 2, clip.centers)
    torch.testing.assert_close(clip.boxes[:, 2:] - clip.boxes[:, :2], torch.full((60, 2), 48.0, dtype=torch.float64))
    assert (clip.boxes >= 0).all() and (clip.boxes <= 360).all()
    assert (clip.centers.diff(dim=0).norm(dim=1) <= 5).all()
    gap = (clip.distractor_boxes[:, :2] + 24 - clip.centers).norm(dim=1)
    assert 20 <= gap.min() <= 40


def _center_errors(boxes, clip):
    return ((boxes[:, :2] + boxes[:, 2:]) / 2 - clip.centers).norm(dim=1)


def test_staying_put_loses_the_target(clip):
    static = clip.boxes[:1].expand(60, 4)
    assert _center_errors(static, clip).mean() > 40


# the backends' responses agree to float64 rounding (above), so the default run tracks with visionops only
@pytest.mark.parametrize("backend", ["visionops", pytest.param("pytorch", marks=pytest.mark.slow)])
def test_tracker_follows_the_clip_with_fixed_random_weights(clip, backend):
    """Untrained weights (the siamfc-pytorch initialisation drawn with seed 0, BatchNorm in eval mode with its
    default statistics) keep enough spatial detail to follow a textured object."""
    tracker = SiamFCTracker(_model(backend))
    boxes = tracker.track(clip.frames, clip.boxes[0])
    assert boxes.shape == (60, 4) and not tracker.model.training
    err = _center_errors(boxes, clip)
    assert err.mean() <= 5 and err.max() <= 15, err
