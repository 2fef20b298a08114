"""Benchmark cases of the anchors / box-coding family (baseline: torchvision in the same run)."""

import torch

from visionops.bench.case import Case

_FPN_STRIDES = (4, 8, 16, 32, 64)


def _image_list(batch, h, w, device):
    from torchvision.models.detection.image_list import ImageList

    return ImageList(torch.zeros(batch, 3, h, w, device=device), [(h, w)] * batch)


def _fpn(batch, h, w, device):
    # 3 sizes x 3 ratios per level (RetinaNet's octave scales), feature maps as a stride-s backbone gives them
    sizes = tuple((s, s * 2 ** (1 / 3), s * 2 ** (2 / 3)) for s in (32, 64, 128, 256, 512))
    ratios = ((0.5, 1.0, 2.0),) * 5
    il = _image_list(batch, h, w, device)
    fms = [torch.zeros(batch, 1, -(-h // s), -(-w // s), device=device) for s in _FPN_STRIDES]
    return sizes, ratios, il, fms


def _check_lists_equal(ours, base):
    assert len(ours) == len(base)
    for a, b in zip(ours, base):
        assert torch.equal(a, b), "anchors differ"


def _anchor_maker(batch, h, w):
    def make(device):
        import visionops
        from torchvision.models.detection.anchor_utils import AnchorGenerator

        sizes, ratios, il, fms = _fpn(batch, h, w, device)
        ours, theirs = visionops.AnchorGenerator(sizes, ratios), AnchorGenerator(sizes, ratios)
        return (lambda: ours(il, fms)), (lambda: theirs(il, fms)), _check_lists_equal

    return make


def _boxes(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 1000
    wh = torch.rand(n, 2, generator=g) * 200 + 1
    return torch.cat([xy, xy + wh], 1).to(device)


def _close(ours, base):
    torch.testing.assert_close(ours, base, rtol=2e-6, atol=2e-4, equal_nan=True)


def _decode_maker(n, k=1, clip=False):
    def make(device):
        import torchvision
        from torchvision.models.detection._utils import BoxCoder

        import visionops

        anchors = _boxes(n, device)
        deltas = torch.randn(n, 4 * k, generator=torch.Generator().manual_seed(1)).to(device)
        w = (10.0, 10.0, 5.0, 5.0) if k > 1 else (1.0, 1.0, 1.0, 1.0)
        if not clip:
            ours, theirs = visionops.BoxCoder(w), BoxCoder(w)
            return (
                (lambda: ours.decode_single(deltas, anchors)),
                (lambda: theirs.decode_single(deltas, anchors)),
                _close,
            )
        size = (800, 1216)

        def base():  # RoIHeads.postprocess_detections: decode, then clip
            boxes = BoxCoder(w).decode_single(deltas, anchors).reshape(n, k, 4)
            return torchvision.ops.clip_boxes_to_image(boxes, size).reshape(n, 4 * k)

        return (lambda: visionops.decode_boxes(deltas, anchors, w, image_size=size)), base, _close

    return make


def _encode_maker(n):
    def make(device):
        from torchvision.models.detection._utils import BoxCoder

        import visionops

        props = _boxes(n, device)
        gts = props + torch.rand(n, 4, generator=torch.Generator().manual_seed(2)).to(device) * 5
        gts[:, 2:] = torch.maximum(gts[:, 2:], gts[:, :2] + 1)
        w = (1.0, 1.0, 1.0, 1.0)
        ours, theirs = visionops.BoxCoder(w), BoxCoder(w)
        return (lambda: ours.encode_single(gts, props)), (lambda: theirs.encode_single(gts, props)), _close

    return make


def _filter_maker(n):
    def make(device):
        import torchvision

        import visionops

        boxes = _boxes(n, device)
        scores = torch.rand(n, generator=torch.Generator().manual_seed(3)).to(device)

        def base():  # torchvision's RPN filter_proposals: remove_small_boxes, then the score threshold
            keep = torchvision.ops.remove_small_boxes(boxes, 50.0)
            return keep[torch.where(scores[keep] >= 0.05)[0]]

        def check(a, b):
            assert torch.equal(a, b)

        return (lambda: visionops.filter_boxes(boxes, scores, 0.05, 50.0)), base, check

    return make


def _ssd_maker(batch):
    def make(device):
        from torchvision.models.detection.anchor_utils import DefaultBoxGenerator

        import visionops

        ratios = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
        steps = [8, 16, 32, 64, 100, 300]
        il = _image_list(batch, 300, 300, device)
        fms = [torch.zeros(batch, 1, s, s, device=device) for s in (38, 19, 10, 5, 3, 1)]
        ours = visionops.DefaultBoxGenerator(ratios, min_ratio=0.2, max_ratio=0.95, steps=steps)
        theirs = DefaultBoxGenerator(ratios, min_ratio=0.2, max_ratio=0.95, steps=steps)
        return (lambda: ours(il, fms)), (lambda: theirs(il, fms)), _check_lists_equal

    return make


CASES = [
    Case("anchor_generator", "FPN 5 levels, 2x 800x1216, 3x3 anchors", _anchor_maker(2, 800, 1216), target=5.0),
    Case("anchor_generator", "FPN 5 levels, 1x 320x320, 3x3 anchors", _anchor_maker(1, 320, 320), quick=True),
    Case("decode_boxes", "decode_single 200k deltas", _decode_maker(200_000), target=2.0),
    Case("decode_boxes", "decode_single 10k deltas", _decode_maker(10_000), quick=True),
    Case("decode_boxes", "1000 RoIs x 91 classes + clip", _decode_maker(1000, k=91, clip=True)),
    Case("encode_boxes", "encode_single 200k boxes", _encode_maker(200_000)),
    Case("encode_boxes", "encode_single 10k boxes", _encode_maker(10_000), quick=True),
    Case("filter_boxes", "200k proposals", _filter_maker(200_000)),
    Case("filter_boxes", "10k proposals", _filter_maker(10_000), quick=True),
    Case("default_box_generator", "SSD300, batch 8", _ssd_maker(8), quick=True),
]
