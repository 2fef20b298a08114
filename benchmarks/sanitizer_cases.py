"""Small CUDA calls of every op's kernels (C++ and Triton, forward and backward), for `compute-sanitizer`
(memcheck and racecheck) in gpu_check.sh. tests/test_sanitizer_cases.py runs them on CPU tensors (``DEVICE``) to
check that every registry op's kernels are called."""

import torch

import visionops

DEVICE = "cuda"


def boxes(n, seed):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 100
    return torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 30 + 1], 1).to(DEVICE)


def nms_family():
    b, s = boxes(300, 0), torch.randperm(300).float().to(DEVICE)
    idxs = torch.randint(0, 5, (300,)).to(DEVICE)
    for backend in ("cpp", "triton"):
        visionops.nms(b, s, 0.5, backend=backend)
        visionops.nms(b[:1], s[:1], 0.5, backend=backend)
        visionops.batched_nms(b, s, idxs, 0.5, backend=backend)
        a = b[:17].clone().requires_grad_()
        visionops.box_iou(a, b[:23], backend=backend).sum().backward()


def roi_family():
    x = torch.randn(2, 8, 12, 15, device=DEVICE, requires_grad=True)
    rois = torch.cat([torch.randint(0, 2, (40, 1)).float().to(DEVICE), boxes(40, 1) / 8], 1)
    rois[0, 1:] = torch.tensor([-5.0, -5.0, 40.0, 40.0])  # partly outside the map
    for backend in ("cpp", "triton"):
        visionops.roi_align(x, rois, (3, 3), 0.5, 2, aligned=True, backend=backend).sum().backward()
        visionops.roi_pool(x, rois, 3, 0.5, backend=backend).sum().backward()
        visionops.roi_align(x.contiguous(memory_format=torch.channels_last), rois, 2, 1.0, -1, backend=backend)
    torch.use_deterministic_algorithms(True)  # the backward kernels' fixed-point paths
    try:
        visionops.roi_align(x, rois, 3, 0.5, 2).sum().backward()
        visionops.roi_pool(x, rois, 3, 0.5).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    feats = {
        "0": torch.randn(2, 4, 32, 32, device=DEVICE, requires_grad=True),
        "1": torch.randn(2, 4, 16, 16, device=DEVICE, requires_grad=True),
    }
    for backend in ("cpp", "triton"):
        pooler = visionops.MultiScaleRoIAlign(["0", "1"], 3, 2, backend=backend)
        pooler(feats, [boxes(10, 2), boxes(7, 3)], [(128, 128), (120, 128)]).sum().backward()


def anchor_family():
    from torchvision.models.detection.image_list import ImageList

    gen = visionops.AnchorGenerator(((32,), (64,)), ((0.5, 1.0, 2.0),) * 2)
    il = ImageList(torch.zeros(2, 3, 64, 96, device=DEVICE), [(64, 96), (60, 90)])
    gen(il, [torch.zeros(2, 1, 16, 24, device=DEVICE), torch.zeros(2, 1, 8, 12, device=DEVICE)])
    anchors = boxes(100, 4)
    deltas = torch.randn(100, 8, device=DEVICE, requires_grad=True)
    for backend in ("cpp", "triton"):
        visionops.decode_boxes(deltas, anchors, image_size=(90, 120), backend=backend).sum().backward()
        visionops.encode_boxes(boxes(100, 5), anchors, backend=backend)
        visionops.filter_boxes(anchors, torch.rand(100, device=DEVICE), 0.3, 2.0, backend=backend)
        visionops.grid_anchors(
            [(5, 7), (3, 4)],
            [(8, 8), (16, 16)],
            [visionops.cell_anchors((32,), (1.0,)).to(DEVICE)] * 2,
            backend=backend,
        )


def xcorr_family():
    for backend in ("cpp", "triton"):
        for bz, b, c, hz, hx in ((None, 3, 5, (3, 4), (9, 8)), (1, 4, 3, (5, 5), (5, 7)), (None, 2, 1, (1, 1), (3, 3))):
            z = torch.randn(bz or b, c, *hz, device=DEVICE, requires_grad=True)
            x = torch.randn(b, c, *hx, device=DEVICE, requires_grad=True)
            visionops.xcorr(z, x, 0.1, backend=backend).sum().backward()
            visionops.depthwise_xcorr(z, x, backend=backend).sum().backward()
            zc, xc = (t.detach().contiguous(memory_format=torch.channels_last).requires_grad_() for t in (z, x))
            visionops.depthwise_xcorr(zc, xc, backend=backend).sum().backward()


def soft_nms_family():
    b, s = boxes(300, 6), torch.rand(300).to(DEVICE)
    idxs = torch.randint(0, 5, (300,)).to(DEVICE)
    for backend in ("cpp", "triton"):
        for method in ("gaussian", "linear", "hard"):
            visionops.soft_nms(b, s, 0.3, 0.5, 0.001, method, backend=backend)
            visionops.batched_soft_nms(b, s, idxs, 0.3, 0.5, 0.001, method, backend=backend)
        visionops.soft_nms(b[:1], s[:1], backend=backend)
        visionops.soft_nms(b[:0], s[:0], backend=backend)


def conv_family():
    for backend in ("cpp", "triton"):
        x = torch.randn(2, 4, 9, 11, device=DEVICE, requires_grad=True)
        w = torch.randn(6, 2, 3, 2, device=DEVICE, requires_grad=True)
        b = torch.randn(6, device=DEVICE, requires_grad=True)
        visionops.conv2d(x, w, b, (2, 1), (1, 0), (1, 2), 2, backend=backend).sum().backward()
        xc = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        visionops.conv2d(xc, w[:, :1].detach().repeat(1, 4, 1, 1), None, 1, "same", backend=backend).sum().backward()
        v = torch.randn(1, 3, 5, 6, 7, device=DEVICE, requires_grad=True)
        k = torch.randn(3, 1, 2, 3, 3, device=DEVICE, requires_grad=True)
        visionops.conv3d(v, k, None, 1, "same", 1, 3, backend=backend).sum().backward()


def matrix_multiclass_family():
    b, s = boxes(120, 7), torch.rand(120).to(DEVICE)
    labels = torch.randint(0, 4, (120,)).to(DEVICE)
    masks = torch.rand(40, 16, 20, device=DEVICE) > 0.6
    det = torch.rand(2, 50, 4, device=DEVICE)
    det = torch.cat([det[..., :2] * 60, det[..., :2] * 60 + det[..., 2:] * 20 + 1], -1)
    per_class = det[:, :, None].repeat(1, 1, 3, 1)
    cls_scores = torch.rand(2, 50, 3, device=DEVICE)
    for backend in ("cpp", "triton"):
        visionops.matrix_nms(b, s, labels, kernel="gaussian", backend=backend)
        visionops.matrix_nms(b, s, labels, kernel="linear", score_threshold=0.1, max_num=30, backend=backend)
        visionops.matrix_nms(masks, s[:40], labels[:40], backend=backend)
        visionops.matrix_nms(b[:0], s[:0], labels[:0], backend=backend)
        for agnostic in (False, True):
            visionops.multiclass_nms(det, cls_scores, 0.5, 0.05, 10, 25, agnostic, backend=backend)
            visionops.multiclass_nms(per_class, cls_scores, 0.5, 0.05, 10, 25, agnostic, backend=backend)


CALLS = [
    nms_family,
    roi_family,
    anchor_family,
    xcorr_family,
    soft_nms_family,
    conv_family,
    matrix_multiclass_family,
]

if __name__ == "__main__":
    for call in CALLS:
        call()
        torch.cuda.synchronize()
        print("ok", call.__name__)
