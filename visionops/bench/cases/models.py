"""End to end: torchvision's Faster R-CNN (ResNet-50 FPN, random weights) with and without patch_torchvision(), and
a SiamFC training step (visionops.models.siamfc) on visionops' xcorr against the same net on the grouped convolution;
DeepLab v3 (visionops.models.segmentation) and C3D (visionops.models.video) on visionops' conv2d / conv3d against the
same nets on F.conv2d / F.conv3d, forward alone (eval mode) and forward + backward (training mode); RetinaNet
(visionops.models.detection) in eval mode with its fixed-shape post-processing (multiclass_nms) against the same net
on torchvision's ops and the per-image NMS loop; Fast, Faster and Mask R-CNN (visionops.models.detection) in eval
mode and for a training step (forward, losses, backward) against the same nets on torchvision's ops; SSD likewise,
its eval with the fixed-shape post-processing against the per-image NMS loop.

Most of the time is the backbone, which visionops does not touch; the ratio shows what the routed ops save end to end.
"""

import torch

import visionops
from visionops.bench.case import Case


def _fasterrcnn(batch, height=480, width=640, **sizes):
    """`sizes`: the model's min_size / max_size (torchvision's defaults, 800 / 1333, when absent), to which it resizes
    the images. box_score_thresh=0.0: with random weights every class score is near 1/91, below the default 0.05
    threshold, and no box would reach the NMS being measured."""

    def make(device):
        from torchvision.models.detection import fasterrcnn_resnet50_fpn

        torch.manual_seed(0)
        model = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, box_score_thresh=0.0, **sizes)
        model = model.eval().to(device)
        g = torch.Generator().manual_seed(1)
        images = [torch.rand(3, height, width, generator=g).to(device) for _ in range(batch)]

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


def _conv_net(build, inputs, loss_fn, train: bool, rtol: float, atol: float):
    """A model's visionops and pytorch backends with the same weights: forward (eval, no grad) or a training
    step's forward and backward returning the loss and the first layer's weight gradient."""

    def make(device):
        nets = {b: build(b).to(device).train(train) for b in ("visionops", "pytorch")}
        x = inputs().to(device)

        def step(net):
            if not train:

                @torch.no_grad()
                def forward():
                    return net(x)

                return forward

            first = next(net.parameters())

            def run():
                net.zero_grad(set_to_none=True)
                loss = loss_fn(net(x))
                loss.backward()
                return torch.cat([loss.detach().reshape(1), first.grad.flatten()])

            return run

        def check(ours, base):
            if not train:
                torch.testing.assert_close(ours, base, rtol=rtol, atol=atol)
                return
            torch.testing.assert_close(ours[0], base[0], rtol=rtol, atol=atol)  # the loss
            # the gradient as a whole: float32 rounding can flip a max-pooling argmax, moving a few elements
            err = (ours[1:] - base[1:]).norm() / base[1:].norm()
            assert err < 1e-2, f"first layer's weight gradient: relative error {err:.2e}"

        return step(nets["visionops"]), step(nets["pytorch"]), check

    return make


def _deeplab(batch, size, train):
    from visionops.models.segmentation import DeepLabV3

    def build(backend):
        return DeepLabV3(4, backend, width=32, output_stride=8, generator=torch.Generator().manual_seed(0))

    g = torch.Generator().manual_seed(1)
    labels = torch.randint(4, (batch, size, size), generator=g)
    return _conv_net(
        build,
        lambda: torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(2)),
        lambda logits: torch.nn.functional.cross_entropy(logits, labels.to(logits.device)),
        train,
        rtol=1e-3,
        atol=1e-4,
    )


def _c3d(batch, frames, size, train):
    from visionops.models.video import C3D

    def build(backend):  # dropout off: the two backends would draw different masks
        return C3D(4, backend, width=0.25, dropout=0.0, generator=torch.Generator().manual_seed(0))

    labels = torch.arange(batch) % 4
    return _conv_net(
        build,
        lambda: torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(2)),
        lambda scores: torch.nn.functional.cross_entropy(scores, labels.to(scores.device)),
        train,
        rtol=1e-3,
        atol=1e-5,
    )


def _rcnn(kind: str, batch: int, size: int, train: bool):
    """A two-stage detector's visionops and pytorch backends on the same weights (classifier weights spread so that
    scores differ as a trained model's), the same generated images (and, for Fast R-CNN, jittered proposals): eval
    detections, or a training step's forward + backward returning the loss and the first layer's weight gradient."""

    def make(device):
        from visionops.models import data, detection

        cls = {"fast": detection.FastRCNN, "faster": detection.FasterRCNN, "mask": detection.MaskRCNN}[kind]
        images, targets = data.shapes_detection(batch, (size, size), generator=torch.Generator().manual_seed(2))
        proposals = detection.jittered_proposals(targets, [(size, size)] * batch, generator=torch.Generator())
        images, proposals = images.to(device), [p.to(device) for p in proposals]
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        nets = {}
        for b in ("visionops", "pytorch"):
            net = cls(4, backend=b, generator=torch.Generator().manual_seed(0))
            with torch.no_grad():
                net.roi_heads.cls_score.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
            nets[b] = net.to(device).train(train)
        extra = {"proposals": proposals} if kind == "fast" else {}

        def step(net):
            if not train:

                @torch.no_grad()
                def forward():
                    return net(images, **extra)

                return forward

            first = next(net.parameters())

            def run():
                net.zero_grad(set_to_none=True)
                loss = sum(net(images, targets, **extra).values())
                loss.backward()
                return torch.cat([loss.detach().reshape(1), first.grad.flatten()])

            return run

        def check(ours, base):
            if train:
                # float32: the two backends' IoUs and decoded boxes may differ in the last bit, enough to swap a
                # near-tied proposal and so a sampled negative (in float64 they agree exactly: tests/test_rcnn.py)
                torch.testing.assert_close(ours[0], base[0], rtol=1e-2, atol=1e-4)
                err = (ours[1:] - base[1:]).norm() / base[1:].norm()
                assert err < 5e-2, f"first layer's weight gradient: relative error {err:.2e}"
                return
            for a, b in zip(ours, base):
                assert len(a["boxes"]) == len(b["boxes"])
                torch.testing.assert_close(a["scores"].sort().values, b["scores"].sort().values, atol=1e-4, rtol=1e-3)

        return step(nets["visionops"]), step(nets["pytorch"]), check

    return make


def _rcnn_cases():
    cases = []
    for kind in ("fast", "faster", "mask"):
        for train in (False, True):
            for batch, size, quick in ((2, 64, True), (8, 128, False)):
                name = f"{kind}_rcnn_{'train_step' if train else 'eval'}"
                what = ("fwd+bwd" if train else "eval") + (", given proposals" if kind == "fast" else "")
                make = _rcnn(kind, batch, size, train)
                cases.append(
                    Case(name, f"{what}, B{batch} {size}x{size}", make, baseline="torchvision ops", quick=quick)
                )
    return cases


# ---- SSD ------------------------------------------------------------------------------------------------------------


def _ssd(batch, size, train):
    """SSD (visionops.models.detection) with 21 classes on generated shapes: eval with the fixed-shape
    post-processing (multiclass_nms against the per-image batched_nms loop), or a training step (matching, box
    coding, hard-negative mining, forward and backward) returning the loss and the first layer's weight gradient."""

    def make(device):
        from visionops.models import data
        from visionops.models.detection import SSD

        images, targets = data.shapes_detection(batch, (size, size), generator=torch.Generator().manual_seed(2))
        images = images.to(device)
        targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets]
        nets = {
            b: SSD(21, backend=b, generator=torch.Generator().manual_seed(0)).train(train).to(device)
            for b in ("visionops", "pytorch")
        }

        def step(net):
            if not train:

                @torch.no_grad()
                def forward():
                    return net(images, fixed_shape=True)

                return forward

            first = next(net.parameters())

            def run():
                net.zero_grad(set_to_none=True)
                loss = sum(net(images, targets).values())
                loss.backward()
                return torch.cat([loss.detach().reshape(1), first.grad.flatten()])

            return run

        def check(ours, base):
            if not train:
                assert torch.equal(ours[3], base[3])
                torch.testing.assert_close(ours[1], base[1], atol=1e-4, rtol=1e-3)
                return
            torch.testing.assert_close(ours[0], base[0], rtol=1e-4, atol=1e-5)
            err = (ours[1:] - base[1:]).norm() / base[1:].norm()
            assert err < 1e-3, f"first layer's weight gradient: relative error {err:.2e}"

        return step(nets["visionops"]), step(nets["pytorch"]), check

    return make


_SSD_BASE = "torchvision ops, per-image NMS loop"


CASES = [
    Case(
        "fasterrcnn_e2e",
        "resnet50_fpn eval, 2 images 480x640",
        _fasterrcnn(2, min_size=480, max_size=640),
        baseline="torchvision",
    ),
    Case(
        "fasterrcnn_e2e",
        "resnet50_fpn eval, 2 images 480x640, default sizes (800x1066)",
        _fasterrcnn(2),
        baseline="torchvision",
    ),
    Case("siamfc_train_step", "B8 127/255 crops, fwd+bwd", _siamfc_step(8), baseline="PyTorch grouped conv"),
    Case(
        "retinanet_eval",
        "B4 320x320, 91 classes, fwd + multiclass NMS",
        _retinanet_eval(4, 320),
        baseline="torchvision ops, per-image NMS loop",
    ),
    Case("deeplab_forward", "DeepLab v3 width 32 OS8, B4 128x128, eval", _deeplab(4, 128, False), baseline="F.conv2d"),
    Case("deeplab_train_step", "DeepLab v3 w32 OS8, B4 128x128, fwd+bwd", _deeplab(4, 128, True), baseline="F.conv2d"),
    Case("c3d_forward", "C3D width 1/4, B4 16x56x56 clips, eval", _c3d(4, 16, 56, False), baseline="F.conv3d"),
    Case("c3d_train_step", "C3D width 1/4, B4 16x56x56 clips, fwd+bwd", _c3d(4, 16, 56, True), baseline="F.conv3d"),
    Case("ssd_eval", "B8 256x256, 21 classes, fwd + multiclass NMS", _ssd(8, 256, False), baseline=_SSD_BASE),
    Case("ssd_eval", "B2 128x128, 21 classes, fwd + multiclass NMS", _ssd(2, 128, False), _SSD_BASE, quick=True),
    Case("ssd_train_step", "B8 256x256, 21 classes, fwd+bwd", _ssd(8, 256, True), baseline=_SSD_BASE),
    Case("ssd_train_step", "B2 128x128, 21 classes, fwd+bwd", _ssd(2, 128, True), baseline=_SSD_BASE, quick=True),
] + _rcnn_cases()
