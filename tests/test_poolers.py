"""MultiScaleRoIAlign: level mapping and pooling against torchvision, gradients, one-kernel op registrations."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from helpers import DEVICES

import visionops


def make_fpn(seed, device="cpu", dtype=torch.float32, c=4, image=(128, 96), levels=(4, 8, 16, 32)):
    g = torch.Generator().manual_seed(seed)
    x = OrderedDict()
    for i, stride in enumerate(levels):
        x[f"p{i}"] = torch.randn(2, c, image[0] // stride, image[1] // stride, generator=g).to(device, dtype)
    x["pool"] = torch.randn(2, c, 1, 1, generator=g).to(device, dtype)  # not in featmap_names: ignored
    boxes = []
    for n in (7, 5):
        xy = torch.rand(n, 2, generator=g) * torch.tensor([image[1], image[0]]) * 0.8
        wh = torch.rand(n, 2, generator=g) ** 2 * 120 + 1  # sizes spread over all levels
        boxes.append(torch.cat([xy, xy + wh], 1).to(device, dtype))
    return x, boxes, [image, (image[0] - 10, image[1] - 6)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("names", [["p0", "p1", "p2", "p3"], ["p1"], ["p0", "p2"]])
def test_matches_torchvision(device, names):
    x, boxes, shapes = make_fpn(0, device)
    ours = visionops.MultiScaleRoIAlign(names, 5, 2)
    tv = torchvision.ops.MultiScaleRoIAlign(names, 5, 2)
    out = ours(x, boxes, shapes)
    torch.testing.assert_close(out, tv(x, boxes, shapes), atol=1e-5, rtol=1e-5)
    assert ours.scales == tv.scales
    assert torch.equal(ours.map_levels(boxes), tv.map_levels(boxes))
    assert "featmap_names" in repr(ours)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_matches_torchvision(device):
    x, boxes, shapes = make_fpn(1, device, dtype=torch.float64)
    names = ["p0", "p1", "p2", "p3"]
    for v in x.values():
        v.requires_grad_(True)
    feats = [x[n] for n in names]
    go = torch.randn(12, 4, 3, 3, dtype=torch.float64, device=device)
    ours = torch.autograd.grad(visionops.MultiScaleRoIAlign(names, 3, -1)(x, boxes, shapes), feats, go)
    tv = torch.autograd.grad(torchvision.ops.MultiScaleRoIAlign(names, 3, -1)(x, boxes, shapes), feats, go)
    for a, b in zip(ours, tv):
        torch.testing.assert_close(a, b)


def test_reference_backend_and_gradcheck():
    x, boxes, shapes = make_fpn(2, dtype=torch.float64, c=2)
    names = ["p1", "p2", "p3"]
    expect = visionops.MultiScaleRoIAlign(names, 2, 2)(x, boxes, shapes)
    torch.testing.assert_close(visionops.MultiScaleRoIAlign(names, 2, 2, backend="reference")(x, boxes, shapes), expect)
    feats = [x[n].requires_grad_(True) for n in names]
    m = visionops.MultiScaleRoIAlign(names, 2, 2)
    m(x, boxes, shapes)

    def fn(*fs):
        return m(OrderedDict(zip(names, fs)), boxes, shapes)

    assert torch.autograd.gradcheck(fn, tuple(feats))


def test_opcheck_and_compile():
    x, boxes, shapes = make_fpn(3)
    names = ["p0", "p1", "p2", "p3"]
    m = visionops.MultiScaleRoIAlign(names, 4, 2)
    expect = m(x, boxes, shapes)
    feats = [x[n] for n in names]
    rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
    levels = m.map_levels(boxes)
    args = (feats, rois, levels, m.scales, 4, 4, 2, False)
    torch.testing.assert_close(torch.ops.visionops.multi_scale_roi_align(*args), expect)
    torch.library.opcheck(
        torch.ops.visionops.multi_scale_roi_align.default, ([f.clone().requires_grad_(True) for f in feats],) + args[1:]
    )
    fn = torch.compile(
        lambda f, r, l: torch.ops.visionops.multi_scale_roi_align(f, r, l, m.scales, 4, 4, 2, False), fullgraph=True
    )
    torch.testing.assert_close(fn(feats, rois, levels), expect)


def test_bad_inputs_and_empty():
    x, boxes, shapes = make_fpn(4)
    m = visionops.MultiScaleRoIAlign(["p0", "p1"], 2, 2)
    assert m(x, [b[:0] for b in boxes], shapes).shape == (0, 4, 2, 2)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        m(x, [boxes[0][:, :3], boxes[1]], shapes)
    with pytest.raises(TypeError, match="boxes"):
        visionops.ops.poolers.multi_scale_roi_align([x["p0"]], boxes[0], 2, 2, [0.25], None)
    with pytest.raises(ValueError, match="output_size"):
        visionops.MultiScaleRoIAlign(["p0"], 0, 2)(x, boxes, shapes)
    with pytest.raises(IndexError, match="levels"):
        feats = [x["p0"], x["p1"]]
        rois = torch.tensor([[0, 1.0, 1, 5, 5]])
        torch.ops.visionops.multi_scale_roi_align(feats, rois, torch.tensor([2]), [0.25, 0.125], 2, 2, 2, False)
