"""End to end: torchvision's Faster R-CNN (ResNet-50 FPN, random weights) with and without patch_torchvision(), and
a SiamFC training step (visionops.models.siamfc) on visionops' xcorr against the same net on the grouped convolution.

Most of the time is the backbone, which visionops does not touch; the ratio shows what the routed ops save end to end.
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


def _siamfc_step(batch):
    def make(device):
        from visionops.models.siamfc import SiamFC

        g = torch.Generator().manual_seed(0)
        nets = {b: SiamFC(b, generator=torch.Generator().manual_seed(0)).to(device) for b in ("visionops", "pytorch")}
        z = (torch.rand(batch, 3, 127, 127, generator=g) * 255).to(device)
        x = (torch.rand(batch, 3, 255, 255, generator=g) * 255).to(device)

        def step(net):  # forward, loss and backward of a training step (both branches learn)
            def run():
                net.zero_grad(set_to_none=True)
                loss = net.loss(net(z, x))
                loss.backward()
                return loss.detach()

            return run

        def check(ours, base):
            torch.testing.assert_close(ours, base, rtol=1e-4, atol=1e-5)

        return step(nets["visionops"]), step(nets["pytorch"]), check

    return make


def _retinanet_eval(batch, size):
    def make(device):
        from visionops.models.detection import RetinaNet

        nets = {}
        for b in ("visionops", "pytorch"):
            net = RetinaNet(91, b, score_threshold=0.05, generator=torch.Generator().manual_seed(0))
            # Untrained, every score sits at the 0.01 prior and nothing reaches NMS; these classifier weights put
            # about 2000 (anchor, class) pairs per image above the threshold, as a trained detector's.
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for conv in net.classification_head.modules():
                    if isinstance(conv, torch.nn.Conv2d):
                        conv.weight.normal_(0.0, 0.75 * (2.0 / (conv.in_channels * 9)) ** 0.5, generator=g)
            nets[b] = net.eval().to(device)
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)

        def forward(net):
            @torch.no_grad()
            def run():
                return net(images, fixed_shape=True)

            return run

        def check(ours, base):
            assert torch.equal(ours[3], base[3])
            torch.testing.assert_close(ours[1], base[1], atol=1e-4, rtol=1e-3)

        return forward(nets["visionops"]), forward(nets["pytorch"]), check

    return make


CASES = [
    Case("fasterrcnn_e2e", "resnet50_fpn eval, 2 images 480x640", _fasterrcnn(480, 2), baseline="torchvision"),
    Case("siamfc_train_step", "B8 127/255 crops, fwd+bwd", _siamfc_step(8), baseline="PyTorch grouped conv"),
    Case(
        "retinanet_eval",
        "B4 320x320, 91 classes, fwd + multiclass NMS",
        _retinanet_eval(4, 320),
        baseline="torchvision ops, per-image NMS loop",
    ),
]
