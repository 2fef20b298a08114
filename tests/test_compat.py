"""patch_torchvision: torchvision models run visionops kernels, give the same detections, and are restored."""

import pytest
import torch
import torchvision
from torchvision.models.detection import fasterrcnn_resnet50_fpn

import visionops
from visionops import _dropin

ROUTED = ["nms", "batched_nms", "box_iou", "roi_align", "roi_pool"]


def _originals():
    import torchvision.models.detection._utils as det_utils
    import torchvision.models.detection.anchor_utils as anchor_utils

    return [getattr(torchvision.ops, n) for n in ROUTED] + [
        torchvision.ops.boxes.batched_nms,
        torchvision.ops.MultiScaleRoIAlign.forward,
        anchor_utils.AnchorGenerator.forward,
        det_utils.BoxCoder.decode_single,
        det_utils.BoxCoder.encode_single,
    ]


def test_patch_and_restore_functions():
    before = _originals()
    with visionops.patch_torchvision() as p:
        assert p.active
        assert torchvision.ops.nms is _dropin.nms and torchvision.ops.boxes.nms is _dropin.nms
        assert torchvision.ops.roi_align is _dropin.roi_align
    assert _originals() == before and not p.active
    p = visionops.patch_torchvision()
    assert torchvision.ops.batched_nms is _dropin.batched_nms
    visionops.unpatch()
    assert _originals() == before
    visionops.unpatch()  # nothing active: no-op
    outer = visionops.patch_torchvision()
    visionops.patch_torchvision()
    outer.stop()  # unwinds the inner patch too
    assert _originals() == before


@pytest.fixture(scope="module")
def model_and_images():
    torch.manual_seed(0)
    model = fasterrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, min_size=256, max_size=320, box_score_thresh=0.0
    ).eval()
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 240, 300, generator=g), torch.rand(3, 200, 320, generator=g)]
    return model, images


def test_fasterrcnn_same_detections_with_visionops_kernels(model_and_images):
    model, images = model_and_images
    torch.set_num_threads(2)
    with torch.no_grad():
        expected = model(images)
        with visionops.patch_torchvision():
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                got = model(images)
        restored = model(images)
    names = {e.name for e in prof.events()}
    for op in [
        "visionops::batched_nms",
        "visionops::multi_scale_roi_align",
        "visionops::grid_anchors",
        "visionops::decode_boxes",
    ]:
        assert op in names, f"{op} did not run under the patch"
    assert not [n for n in names if n.startswith("torchvision::")], "torchvision kernels ran under the patch"
    for e, g_, r in zip(expected, got, restored):
        assert len(e["boxes"]) > 0 and len(g_["boxes"]) == len(e["boxes"])
        # Same detections: float noise (~1e-6 in scores) may swap two near-tied ones, so match them one to one.
        dist = torch.cdist(e["boxes"].double(), g_["boxes"].double(), p=float("inf"))
        dist[e["labels"][:, None] != g_["labels"][None, :]] = float("inf")
        match = dist.argmin(1)
        assert len(set(match.tolist())) == len(match), "detections do not match one to one"
        assert dist.gather(1, match[:, None]).max() < 1e-3
        torch.testing.assert_close(g_["scores"][match], e["scores"], atol=1e-5, rtol=1e-4)
        for k in e:  # leaving the context restores torchvision exactly
            assert torch.equal(e[k], r[k])
