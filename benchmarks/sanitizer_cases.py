"""Small CUDA calls of every op family, for `compute-sanitizer` (memcheck/racecheck) in gpu_check.sh."""

import torch

import visionops


def boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], 1).cuda()


def nms_family():
    b, s = boxes(300, 0), torch.randperm(300).float().cuda()
    idxs = torch.randint(0, 5, (300,)).cuda()
    for backend in ("cpp", "triton"):
        visionops.nms(b, s, 0.5, backend=backend)
        visionops.nms(b[:1], s[:1], 0.5, backend=backend)
        visionops.batched_nms(b, s, idxs, 0.5, backend=backend)
        a = b[:17].clone().requires_grad_()
        visionops.box_iou(a, b[:23], backend=backend).sum().backward()


def roi_family():
    x = torch.randn(2, 8, 12, 15, device="cuda", requires_grad=True)
    rois = torch.cat([torch.randint(0, 2, (40, 1)).float().cuda(), boxes(40, 1) / 8], 1)
    rois[0, 1:] = torch.tensor([-5.0, -5.0, 40.0, 40.0])  # partly outside the map
    for backend in ("cpp", "triton"):
        visionops.roi_align(x, rois, (3, 3), 0.5, 2, aligned=True, backend=backend).sum().backward()
        visionops.roi_pool(x, rois, 3, 0.5, backend=backend).sum().backward()
        visionops.roi_align(x.contiguous(memory_format=torch.channels_last), rois, 2, 1.0, -1, backend=backend)
    torch.use_deterministic_algorithms(True)
    try:
        visionops.roi_align(x, rois, 3, 0.5, 2).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    pooler = visionops.MultiScaleRoIAlign(["0", "1"], 3, 2)
    feats = {
        "0": torch.randn(2, 4, 32, 32, device="cuda", requires_grad=True),
        "1": torch.randn(2, 4, 16, 16, device="cuda", requires_grad=True),
    }
    pooler(feats, [boxes(10, 2), boxes(7, 3)], [(128, 128), (120, 128)]).sum().backward()


def anchor_family():
    from torchvision.models.detection.image_list import ImageList

    gen = visionops.AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    il = ImageList(torch.zeros(2, 3, 64, 96, device="cuda"), [(64, 96), (60, 90)])
    gen(il, [torch.zeros(2, 1, 16, 24, device="cuda"), torch.zeros(2, 1, 8, 12, device="cuda")])
    anchors = boxes(100, 4)
    deltas = torch.randn(100, 8, device="cuda", requires_grad=True)
    for backend in ("cpp", "triton"):
        visionops.decode_boxes(deltas, anchors, image_size=(90, 120), backend=backend).sum().backward()
        visionops.encode_boxes(boxes(100, 5), anchors, backend=backend)
        visionops.filter_boxes(anchors, torch.rand(100, device="cuda"), 0.3, 2.0, backend=backend)
        visionops.grid_anchors(
            [(5, 7), (3, 4)], [(8, 8), (16, 16)], [visionops.cell_anchors((32,), (1.0,)).cuda()] * 2, backend=backend
        )


def xcorr_family():
    for backend in ("cpp", "triton"):
        for bz, b, c, hz, hx in ((None, 3, 5, (3, 4), (9, 8)), (1, 4, 3, (5, 5), (5, 7)), (None, 2, 1, (1, 1), (3, 3))):
            z = torch.randn(bz or b, c, *hz, device="cuda", requires_grad=True)
            x = torch.randn(b, c, *hx, device="cuda", requires_grad=True)
            visionops.xcorr(z, x, 0.1, backend=backend).sum().backward()
            visionops.depthwise_xcorr(z, x, backend=backend).sum().backward()
            zc, xc = (t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (z, x))
            visionops.depthwise_xcorr(zc, xc, backend=backend).sum().backward()


def soft_nms_family():
    b, s = boxes(300, 6), torch.rand(300).cuda()
    idxs = torch.randint(0, 5, (300,)).cuda()
    for backend in ("cpp", "triton"):
        for method in ("gaussian", "linear", "hard"):
            visionops.soft_nms(b, s, 0.3, 0.5, 0.001, method, backend=backend)
            visionops.batched_soft_nms(b, s, idxs, 0.3, 0.5, 0.001, method, backend=backend)
        visionops.soft_nms(b[:1], s[:1], backend=backend)
        visionops.soft_nms(b[:0], s[:0], backend=backend)


CALLS = [nms_family, roi_family, anchor_family, xcorr_family, soft_nms_family]

if __name__ == "__main__":
    for call in CALLS:
        call()
        torch.cuda.synchronize()
        print("ok", call.__name__)
