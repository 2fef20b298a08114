"""visionops.models.segmentation: DeepLab v3's shapes and dilations, the two backends agreeing in training (float64),
the shapes-segmentation generator and the mIoU metric."""

import pytest
import torch

from visionops.models import data
from visionops.models.segmentation import DeepLabV3, mean_iou

BACKENDS = ("visionops", "pytorch")


def _model(backend: str, seed: int = 0, **kwargs) -> DeepLabV3:
    kwargs.setdefault("width", 8)
    return DeepLabV3(4, backend, generator=torch.Generator().manual_seed(seed), **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("output_stride", [16, 8])
def test_shapes_and_output_stride(backend, output_stride):
    model = _model(backend, output_stride=output_stride).eval()
    images = torch.rand(2, 3, 64, 48, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert model.features(images).shape == (2, 32, 64 // output_stride, 48 // output_stride)
        assert model(images).shape == (2, 4, 64, 48)  # logits upsampled to the input size


def test_dilations_and_rates_follow_the_output_stride():
    os16, os8 = _model("pytorch"), _model("pytorch", output_stride=8)
    assert os16.aspp.rates == (6, 12, 18) and os8.aspp.rates == (12, 24, 36)
    assert [c.dilation[0] for c in os16.aspp.convs[1:]] == [6, 12, 18]
    assert os16.layer3[0].conv1.stride == (2, 2) and os16.layer4[0].conv1.dilation == (2, 2)
    assert os8.layer3[0].conv1.stride == (1, 1) and os8.layer3[0].conv1.dilation == (2, 2)
    assert os8.layer4[0].conv2.dilation == (4, 4) and os8.layer4[0].conv2.padding == (4, 4)
    with pytest.raises(ValueError, match="output_stride"):
        DeepLabV3(4, output_stride=32)
    with pytest.raises(ValueError, match="backend"):
        DeepLabV3(4, "torch")


def test_state_dict_moves_between_backends():
    a, b = _model("visionops", seed=0), _model("pytorch", seed=1)
    assert list(a.state_dict()) == list(b.state_dict())
    assert "aspp.convs.1.weight" in a.state_dict() and "layer4.0.conv1.weight" in a.state_dict()
    b.load_state_dict(a.state_dict(), strict=True)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    # the parameters are plain torch.nn modules': a torch.nn.Conv2d takes one of them as is
    conv = torch.nn.Conv2d(16, 16, 3, padding=12, dilation=12, bias=False)
    conv.load_state_dict({"weight": a.state_dict()["aspp.convs.2.weight"][:, :16]}, strict=True)


def test_backends_agree_in_training_float64():
    images, labels = data.shapes_segmentation(2, 32, generator=torch.Generator().manual_seed(0))
    images = images.double()
    models = {b: _model(b, output_stride=8).double().train() for b in BACKENDS}
    opts = {b: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for b, m in models.items()}
    losses = {b: [] for b in BACKENDS}
    for _ in range(3):  # three SGD steps, the backends compared after each
        logits = {}
        for b, m in models.items():
            opts[b].zero_grad()
            logits[b] = m(images)
            loss = m.loss(logits[b], labels)
            loss.backward()
            losses[b].append(loss.item())
        torch.testing.assert_close(logits["visionops"], logits["pytorch"], rtol=1e-9, atol=1e-10)
        for (name, p), q in zip(models["visionops"].named_parameters(), models["pytorch"].parameters()):
            assert p.grad is not None and q.grad is not None, name
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-7, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")
        for b in BACKENDS:
            opts[b].step()
    for k, v in models["visionops"].state_dict().items():  # weights and BatchNorm running statistics
        torch.testing.assert_close(v, models["pytorch"].state_dict()[k], rtol=1e-9, atol=1e-12, msg=k)
    assert losses["visionops"][-1] < losses["visionops"][0], losses
    torch.testing.assert_close(torch.tensor(losses["visionops"]), torch.tensor(losses["pytorch"]), rtol=1e-9, atol=0)


def test_the_generator_decides_the_weights():
    a, b, c = _model("visionops", 0), _model("pytorch", 0), _model("visionops", 1)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k
    assert not torch.equal(a.stem[0].weight, c.stem[0].weight)


def test_shapes_segmentation_repeats_and_labels_what_it_draws():
    images, labels = data.shapes_segmentation(12, 48, generator=torch.Generator().manual_seed(3))
    again, labels_again = data.shapes_segmentation(12, 48, generator=torch.Generator().manual_seed(3))
    assert torch.equal(images, again) and torch.equal(labels, labels_again)
    assert images.shape == (12, 3, 48, 48) and images.dtype == torch.float32
    assert labels.shape == (12, 48, 48) and labels.dtype == torch.int64
    assert 0 <= images.min() and images.max() <= 1
    assert set(labels.unique().tolist()) == {0, 1, 2, 3} and data.SHAPE_CLASSES[0] == "background"
    # shapes are dark or bright in some channel, the background mid-grey (0.35..0.65 before noise)
    fg, bg = labels > 0, labels == 0
    extreme = ((images - 0.5).abs().amax(1) > 0.25).float()
    assert extreme[fg].mean() > 0.9 and extreme[bg].mean() < 0.05
    for img in labels:  # 1 to 3 shapes of radius 10-20 % of the side: some foreground in every image, never most
        assert 0.01 < (img > 0).float().mean() < 0.5
    with pytest.raises(ValueError, match="max_objects"):
        data.shapes_segmentation(1, 48, max_objects=0)


def test_shape_masks_have_the_shapes_areas():
    r = 20.0
    disc, square, triangle = (data._shape_mask(k, 50.0, 50.0, r, 0.3, 100).sum().item() for k in (1, 2, 3))
    assert disc == pytest.approx(3.14159 * r * r, rel=0.02)
    assert square == pytest.approx(2 * r * r, rel=0.03)  # inscribed square: side r * sqrt(2)
    assert triangle == pytest.approx(3 * 3**0.5 / 4 * r * r, rel=0.04)  # inscribed equilateral triangle


def test_mean_iou():
    labels = torch.tensor([[0, 0, 1, 1], [0, 0, 2, 2]])
    assert mean_iou(labels, labels, 4).item() == 1.0  # class 3 absent from both: not counted
    pred = torch.tensor([[0, 0, 1, 2], [0, 0, 2, 2]])
    # class 0: 4/4, class 1: 1/2, class 2: 2/3
    assert mean_iou(pred, labels, 4).item() == pytest.approx((1 + 1 / 2 + 2 / 3) / 3)
