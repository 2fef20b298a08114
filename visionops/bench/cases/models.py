"""End-to-end: torchvision's Faster R-CNN (ResNet-50 FPN, random weights) with and without patch_torchvision().

Most of the time is the backbone, which visionops does not touch; the ratio shows what the routed ops
(anchors, box coding, NMS, MultiScaleRoIAlign) save end to end.
"""

import torch

import visionops
from visionops.bench.case import Case


def _fasterrcnn(min_size, batch):
    def make(device):
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        torch.manual_seed(0)
        model = (
            fasterrcnn_resnet50_fpn(
                weights=None, weights_backbone=None, min_size=min_size, max_size=min_size * 4 // 3, box_score_thresh=0.0
            )
            .eval()
            .to(device)
        )
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, min_size, min_size * 4 // 3, generator=g).to(device) for _ in range(batch)]

        @torch.no_grad()
        def patched():
            with visionops.patch_torchvision():
                return model(images)

        @torch.no_grad()
        def plain():
            return model(images)

        def check(ours, base):
            for a, b in zip(ours, base):
                assert len(a["boxes"]) == len(b["boxes"])
                torch.testing.assert_close(a["scores"].sort().values, b["scores"].sort().values, atol=1e-4, rtol=1e-3)

        return patched, plain, check

    return make


CASES = [
    Case("fasterrcnn_e2e", "resnet50_fpn eval, 2 images 480x640", _fasterrcnn(480, 2), baseline="torchvision"),
]
