"""RoI family cases: features 2x256x50x68, 1024 RoIs with x1, y1 ~ U(0, 640), w, h ~ U(4, 204), 7x7,
sampling_ratio 2, aligned, spatial_scale 1/16, against torchvision; the deterministic backward against our own
atomic backward (what determinism costs)."""

import dataclasses

import torch

import visionops
from visionops.bench.case import Case


def _inputs(device, n=2, c=256, h=50, w=68, k=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g)
    xy = torch.rand(k, 2, generator=g) * 640
    wh = torch.rand(k, 2, generator=g) * 200 + 4
    idx = torch.randint(0, n, (k, 1), generator=g).float()
    return x.to(device), torch.cat([idx, xy, xy + wh], 1).to(device)


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _close_all(a, b):
    for p, q in zip(a, b):
        _close(p, q)


def _work(backward=False, pool=False, fwd_and_bwd=False, **shape):
    """The case's compulsory work (visionops.bench.bounds), from the same RoIs."""

    def fn():
        from visionops.bench import bounds

        x, rois = _inputs("cpu", **shape)
        n, c, h, w = x.shape
        fwd = bounds.roi_work(rois, n, c, h, w, pool=pool)
        bwd = bounds.roi_work(rois, n, c, h, w, pool=pool, backward=True)
        return fwd + bwd if fwd_and_bwd else (bwd if backward else fwd)

    return fn


def _multiscale_work(backward=False, c=256, k=1000):
    """Per FPN level the RoIs torchvision's LevelMapper sends there (canonical 224 at level 4, levels 2-5)."""

    def fn():
        from visionops.bench import bounds

        g = torch.Generator().manual_seed(0)
        for s in (4, 8, 16, 32):  # advance the generator as the case does
            torch.randn(2, c, 800 // s, 1088 // s, generator=g)
        rois = []
        for i in range(2):
            xy = torch.rand(k // 2, 2, generator=g) * torch.tensor([1000.0, 700.0])
            wh = torch.rand(k // 2, 2, generator=g) ** 2 * 500 + 8
            rois.append(torch.cat([torch.full((k // 2, 1), float(i)), xy, xy + wh], 1))
        rois = torch.cat(rois)
        area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
        level = torch.floor(4 + torch.log2(area.sqrt() / 224) + 1e-6).clamp(2, 5) - 2
        total = bounds.Work(0.0)
        for i, s in enumerate((4, 8, 16, 32)):
            r = rois[level == i]
            if len(r):
                h, w = 800 // s, 1088 // s
                total = total + bounds.roi_work(r, 2, c, h, w, scale=1 / s)
                if backward:
                    total = total + bounds.roi_work(r, 2, c, h, w, scale=1 / s, backward=True)
        return dataclasses.replace(total, launches=2 if backward else 1)  # one launch for all levels

    return fn


def align_case(backward=False, backend="auto", deterministic=False, **shape):
    def make(device):
        import torchvision

        x, rois = _inputs(device, **shape)
        ours = lambda t: visionops.roi_align(t, rois, 7, 1 / 16, 2, True, backend=backend)  # noqa: E731
        base = lambda t: torchvision.ops.roi_align(t, rois, 7, 1 / 16, 2, True)  # noqa: E731
        if not backward:
            return (lambda: ours(x)), (lambda: base(x)), _close
        xg = x.clone().requires_grad_(True)
        out_o, out_b = ours(xg), base(xg)
        go = torch.randn_like(out_o)

        def grad(out, det=False):
            def run():
                torch.use_deterministic_algorithms(det)
                try:
                    return torch.autograd.grad(out, xg, go, retain_graph=True)
                finally:
                    torch.use_deterministic_algorithms(False)

            return run

        if deterministic:  # baseline: our own atomic backward (what determinism costs)
            return grad(out_o, det=True), grad(out_o), _close_all
        return grad(out_o), grad(out_b), _close_all

    return make


def pool_case(backward=False, backend="auto", **shape):
    def make(device):
        import torchvision

        x, rois = _inputs(device, **shape)
        ours = lambda t: visionops.roi_pool(t, rois, 7, 1 / 16, backend=backend)  # noqa: E731
        base = lambda t: torchvision.ops.roi_pool(t, rois, 7, 1 / 16)  # noqa: E731
        if not backward:
            return (lambda: ours(x)), (lambda: base(x)), _close
        xg = x.clone().requires_grad_(True)
        go = torch.randn(rois.shape[0], x.shape[1], 7, 7, device=device)
        return (
            (lambda: torch.autograd.grad(ours(xg), xg, go)),
            (lambda: torch.autograd.grad(base(xg), xg, go)),
            _close_all,
        )

    return make


def multiscale_case(backward=False, c=256, k=1000, backend="auto"):
    """FPN levels of an 800x1088 batch of 2 (strides 4-32), k boxes spread over all levels."""

    def make(device):
        from collections import OrderedDict

        import torchvision

        g = torch.Generator().manual_seed(0)
        x = OrderedDict(
            (f"p{i}", torch.randn(2, c, 800 // s, 1088 // s, generator=g).to(device))
            for i, s in enumerate((4, 8, 16, 32))
        )
        boxes = []
        for _ in range(2):
            xy = torch.rand(k // 2, 2, generator=g) * torch.tensor([1000.0, 700.0])
            wh = torch.rand(k // 2, 2, generator=g) ** 2 * 500 + 8
            boxes.append(torch.cat([xy, xy + wh], 1).to(device))
        shapes = [(800, 1088)] * 2
        names = list(x)
        ours_m = visionops.MultiScaleRoIAlign(names, 7, 2, backend=backend)
        base_m = torchvision.ops.MultiScaleRoIAlign(names, 7, 2)
        if not backward:
            return (lambda: ours_m(x, boxes, shapes)), (lambda: base_m(x, boxes, shapes)), _close
        feats = [v.requires_grad_(True) for v in x.values()]
        go = torch.randn(k, c, 7, 7, generator=g).to(device)
        return (
            (lambda: torch.autograd.grad(ours_m(x, boxes, shapes), feats, go)),
            (lambda: torch.autograd.grad(base_m(x, boxes, shapes), feats, go)),
            _close_all,
        )

    return make


_BIG = dict(n=8, h=200, w=272, k=4096)
CASES = [
    Case(
        "roi_align",
        "fwd 2x256x50x68, 1024 RoIs",
        align_case(),
        quick=True,
        target=4.0,
        gpu_target=1.5,
        tags={"work": _work()},
    ),
    Case(
        "roi_align",
        "bwd 2x256x50x68, 1024 RoIs",
        align_case(backward=True),
        target=10.0,
        gpu_target=2.0,
        tags={"work": _work(backward=True)},
    ),
    Case(
        "roi_align",
        "fwd 8x256x200x272, 4096 RoIs",
        align_case(**_BIG),
        devices=("cuda",),
        tags={"work": _work(**_BIG)},
    ),
    Case(
        "roi_align",
        "bwd 8x256x200x272, 4096 RoIs",
        align_case(True, **_BIG),
        devices=("cuda",),
        tags={"work": _work(backward=True, **_BIG)},
    ),
    Case(
        "roi_align",
        "deterministic bwd vs our atomic bwd",
        align_case(True, deterministic=True),
        devices=("cuda",),
        baseline="visionops atomic",
        gpu_target=1 / 1.5,
        tags={"work": _work(backward=True)},
    ),
    Case(
        "roi_pool",
        "fwd 2x256x50x68, 1024 RoIs",
        pool_case(),
        quick=True,
        target=4.0,
        gpu_target=1.5,
        tags={"work": _work(pool=True)},
    ),
    Case(
        "roi_pool",
        "fwd+bwd 2x256x50x68, 1024 RoIs",
        pool_case(backward=True),
        target=4.0,
        gpu_target=2.0,
        tags={"work": _work(pool=True, fwd_and_bwd=True)},
    ),
    Case(
        "multi_scale_roi_align",
        "fwd FPN 4 levels 2x256, 1000 boxes",
        multiscale_case(),
        quick=True,
        tags={"work": _multiscale_work()},
    ),
    Case(
        "multi_scale_roi_align",
        "fwd+bwd FPN 4 levels 2x256, 1000 boxes",
        multiscale_case(True),
        tags={"work": _multiscale_work(True)},
    ),
    # Triton backend on the GPU (on the CPU it only runs interpreted, which is for testing, not timing).
    Case("roi_align", "fwd [triton]", align_case(backend="triton"), devices=("cuda",), tags={"work": _work()}),
    Case(
        "roi_align",
        "bwd [triton]",
        align_case(True, backend="triton"),
        devices=("cuda",),
        tags={"work": _work(backward=True)},
    ),
    Case("roi_pool", "fwd [triton]", pool_case(backend="triton"), devices=("cuda",), tags={"work": _work(pool=True)}),
    Case(
        "roi_pool",
        "fwd+bwd [triton]",
        pool_case(True, backend="triton"),
        devices=("cuda",),
        tags={"work": _work(pool=True, fwd_and_bwd=True)},
    ),
    Case(
        "multi_scale_roi_align",
        "fwd [triton, one launch]",
        multiscale_case(backend="triton"),
        devices=("cuda",),
        tags={"work": _multiscale_work()},
    ),
    Case(
        "multi_scale_roi_align",
        "fwd+bwd [triton, one launch]",
        multiscale_case(True, backend="triton"),
        devices=("cuda",),
        tags={"work": _multiscale_work(True)},
    ),
]
