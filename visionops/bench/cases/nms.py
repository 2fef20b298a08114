"""NMS family cases: nms, batched_nms and box_iou against torchvision on boxes with xy ~ U(0, 800), wh ~ U(1, 101),
iou 0.5, scores from randperm (no ties); soft_nms (gaussian, sigma 0.5, score_threshold 0.001, on clustered boxes: a
detector's output before NMS) against the loop a PyTorch user writes today; matrix_nms against the N x N PyTorch
formulation; multiclass_nms against the per-image torchvision loop."""

import torch

import visionops
from visionops.bench.case import Case


def _boxes(n, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 800
    wh = torch.rand(n, 2, generator=g) * 100 + 1
    scores = torch.randperm(n, generator=g).float() / n
    return torch.cat([xy, xy + wh], 1).to(device), scores.to(device)


def _same(a, b):
    assert torch.equal(a.cpu(), b.cpu()), "visionops and baseline disagree"


def _close(a, b):
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _batched_work(n, classes):
    def fn():
        from visionops.bench import bounds

        per_class = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1)).bincount().double()
        return bounds.nms_work(n, pairs=float((per_class * (per_class - 1) / 2).sum()))

    return fn


def _work(name, *args):
    def fn():
        from visionops.bench import bounds

        return getattr(bounds, name)(*args)

    return fn


def nms_case(n, backend="auto"):
    def make(device):
        import torchvision

        boxes, scores = _boxes(n, device)
        return (
            lambda: visionops.nms(boxes, scores, 0.5, backend=backend),
            lambda: torchvision.ops.nms(boxes, scores, 0.5),
            _same,
        )

    return make


def batched_case(n, classes, backend="auto"):
    def make(device):
        import torchvision

        boxes, scores = _boxes(n, device)
        idxs = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(1)).to(device)
        return (
            lambda: visionops.batched_nms(boxes, scores, idxs, 0.5, backend=backend),
            lambda: torchvision.ops.batched_nms(boxes, scores, idxs, 0.5),
            _same,
        )

    return make


def soft_nms_baseline(boxes, scores, sigma=0.5, score_threshold=0.001):
    """Gaussian soft-NMS as a PyTorch user writes it today (one argmax, box_iou and decay per selection)."""
    import torchvision

    scores = scores.clone()
    alive = scores >= score_threshold
    keep, kept = [], []
    while alive.any():
        i = torch.argmax(scores * alive)
        keep.append(i)
        kept.append(scores[i])
        iou = torchvision.ops.box_iou(boxes[i : i + 1], boxes)[0]
        scores = torch.where(alive, scores * torch.exp(-(iou**2) / sigma), scores)
        alive &= scores >= score_threshold
        alive[i] = False
    return torch.stack(keep), torch.stack(kept)


def _same_soft(ours, base):
    """Same kept set (in order) and scores within float32 tolerance (the baseline decays in float32)."""
    assert torch.equal(ours[0].cpu(), base[0].cpu()), "visionops and baseline keep different boxes"
    torch.testing.assert_close(ours[1].cpu(), base[1].cpu(), rtol=1e-4, atol=1e-6)


def soft_nms_case(n, backend="auto"):
    def make(device):
        from visionops.testing import clustered_boxes, unique_scores

        g = torch.Generator().manual_seed(0)
        boxes, scores = clustered_boxes(n, generator=g).to(device), unique_scores(n, generator=g).to(device)
        return (
            lambda: visionops.soft_nms(boxes, scores, sigma=0.5, method="gaussian", backend=backend),
            lambda: soft_nms_baseline(boxes, scores),
            _same_soft,
        )

    return make


def box_iou_case(n, m, backward=False, backend="auto"):
    def make(device):
        import torchvision

        a, _ = _boxes(n, device, seed=2)
        b, _ = _boxes(m, device, seed=3)
        if not backward:
            return (lambda: visionops.box_iou(a, b, backend=backend), lambda: torchvision.ops.box_iou(a, b), _close)
        a.requires_grad_(), b.requires_grad_()
        grad = torch.rand(n, m, device=device)

        def run(fn):
            return lambda: torch.autograd.grad(fn(a, b), (a, b), grad)

        return (
            run(lambda x, y: visionops.box_iou(x, y, backend=backend)),
            run(torchvision.ops.box_iou),
            lambda x, y: [_close(p, q) for p, q in zip(x, y)],
        )

    return make


CASES = [
    Case("nms", "1k boxes", nms_case(1_000), quick=True, target=3.0, tags={"work": _work("nms_work", 1_000)}),
    Case("nms", "20k boxes", nms_case(20_000), target=20.0, gpu_target=2.0, tags={"work": _work("nms_work", 20_000)}),
    Case("nms", "100k boxes", nms_case(100_000), devices=("cuda",), tags={"work": _work("nms_work", 100_000)}),
    Case(
        "batched_nms",
        "20k boxes / 80 classes",
        batched_case(20_000, 80),
        quick=True,
        target=3.0,
        tags={"work": _batched_work(20_000, 80)},
    ),
    Case(
        "batched_nms",
        "100k boxes / 80 classes",
        batched_case(100_000, 80),
        devices=("cuda",),
        tags={"work": _batched_work(100_000, 80)},
    ),
    Case(
        "box_iou", "1k x 1k", box_iou_case(1_000, 1_000), quick=True, tags={"work": _work("box_iou_work", 1_000, 1_000)}
    ),
    Case("box_iou", "fwd+bwd 500 x 500", box_iou_case(500, 500, backward=True)),
    Case(
        "soft_nms",
        "gaussian 5k clustered boxes",
        soft_nms_case(5_000),
        baseline="PyTorch loop",
        quick=True,
        target=10.0,
        gpu_target=20.0,
    ),
    Case(
        "soft_nms",
        "gaussian 20k clustered boxes",
        soft_nms_case(20_000),
        baseline="PyTorch loop",
        target=10.0,
        gpu_target=20.0,
    ),
    # Triton backend on the GPU (on the CPU it only runs interpreted, which is for testing, not timing).
    Case(
        "nms",
        "20k boxes [triton]",
        nms_case(20_000, "triton"),
        devices=("cuda",),
        tags={"work": _work("nms_work", 20_000)},
    ),
    Case(
        "nms",
        "100k boxes [triton]",
        nms_case(100_000, "triton"),
        devices=("cuda",),
        tags={"work": _work("nms_work", 100_000)},
    ),
    Case(
        "batched_nms",
        "20k / 80 classes [triton]",
        batched_case(20_000, 80, "triton"),
        devices=("cuda",),
        tags={"work": _batched_work(20_000, 80)},
    ),
    Case(
        "soft_nms",
        "gaussian 20k clustered [triton]",
        soft_nms_case(20_000, "triton"),
        baseline="PyTorch loop",
        devices=("cuda",),
    ),
    Case(
        "box_iou",
        "1k x 1k [triton]",
        box_iou_case(1_000, 1_000, backend="triton"),
        devices=("cuda",),
        tags={"work": _work("box_iou_work", 1_000, 1_000)},
    ),
]


# ---- Matrix NMS: against the N x N formulation of mmdetection's mask_matrix_nms ----------------------------------


def matrix_nms_baseline(boxes_or_masks, scores, labels, kernel="gaussian", sigma=2.0):
    """mmdetection's ``mask_matrix_nms`` (filter_thr -1, nms_pre -1, max_num -1) as plain PyTorch, for boxes too:
    the N x N IoU, label and decay matrices. Returns (keep, new_scores) by decreasing new score."""
    import torchvision

    scores, order = torch.sort(scores, descending=True, stable=True)
    labels = labels[order]
    n = len(labels)
    if boxes_or_masks.dim() == 3:
        flat = boxes_or_masks[order].reshape(n, -1).float()
        inter = torch.mm(flat, flat.T)
        area = flat.sum(1).expand(n, n)
        iou = (inter / (area + area.T - inter)).triu(diagonal=1)
    else:
        iou = torchvision.ops.box_iou(boxes_or_masks[order], boxes_or_masks[order]).triu(diagonal=1)
    expanded = labels.expand(n, n)
    label_matrix = (expanded == expanded.T).triu(diagonal=1)
    compensate = (iou * label_matrix).max(0)[0].expand(n, n).T
    decay_iou = iou * label_matrix
    if kernel == "gaussian":
        decay = (torch.exp(-sigma * decay_iou**2) / torch.exp(-sigma * compensate**2)).min(0)[0]
    else:
        decay = ((1 - decay_iou) / (1 - compensate)).min(0)[0]
    new = scores * decay
    new, best = torch.sort(new, descending=True)
    return order[best], new


def _matrix_nms_inputs(n, labels, device, masks=None):
    from visionops.testing import clustered_boxes, unique_scores

    g = torch.Generator().manual_seed(0)
    boxes = clustered_boxes(n, objects=max(5, n // 100), generator=g)
    scores = unique_scores(n, generator=g)
    lab = torch.randint(0, labels, (n,), generator=g)
    if masks is not None:  # boxes rasterised on a masks x masks grid (box coordinates scaled to it)
        grid = torch.arange(masks, dtype=torch.float32) + 0.5
        b = (boxes - boxes.min()) / (boxes.max() - boxes.min()) * masks
        inside_x = (grid[None, :] >= b[:, 0:1]) & (grid[None, :] < b[:, 2:3])
        inside_y = (grid[None, :] >= b[:, 1:2]) & (grid[None, :] < b[:, 3:4])
        boxes = inside_y[:, :, None] & inside_x[:, None, :]
    return boxes.to(device), scores.to(device), lab.to(device)


def _same_matrix(ours, base):
    """Same scores (float32 tolerance: the baseline decays in float32) and the same order where they differ."""
    torch.testing.assert_close(ours[1].cpu(), base[1].cpu(), rtol=1e-4, atol=1e-6)
    assert torch.equal(ours[1].cpu().sort(descending=True).values, ours[1].cpu()), "visionops: not sorted"


def matrix_nms_case(n, labels, masks=None, backend="auto"):
    def make(device):
        data = _matrix_nms_inputs(n, labels, device, masks)
        return (
            lambda: visionops.matrix_nms(*data, backend=backend),
            lambda: matrix_nms_baseline(*data),
            _same_matrix,
        )

    return make


# ---- multiclass_nms: a detector head's post-processing (YOLO-style 8400 boxes x 80 classes) --------------------


def multiclass_nms_baseline(boxes, scores, iou_threshold, score_threshold, max_per_class, max_total, agnostic=False):
    """What a PyTorch user writes today, one image at a time: threshold, gather the (box, score, class) candidates,
    torchvision's batched_nms (nms when class-agnostic), cap each class, keep the best max_total, pad."""
    import torchvision

    batch, n, c = scores.shape
    out_boxes = boxes.new_zeros((batch, max_total, 4))
    out_scores = scores.new_zeros((batch, max_total))
    out_classes = torch.full((batch, max_total), -1, dtype=torch.long, device=scores.device)
    num = torch.zeros(batch, dtype=torch.long, device=scores.device)
    for b in range(batch):
        idx, cls = torch.nonzero(scores[b] > score_threshold, as_tuple=True)
        bx = boxes[b, idx] if boxes.dim() == 3 else boxes[b, idx, cls]
        sc = scores[b, idx, cls]
        if agnostic:
            keep = torchvision.ops.nms(bx, sc, iou_threshold)
        else:
            keep = torchvision.ops.batched_nms(bx, sc, cls, iou_threshold)
        kc = cls[keep]
        # rank of each kept box within its class (keep is by decreasing score)
        rank = (torch.nn.functional.one_hot(kc, c).cumsum(0) * torch.nn.functional.one_hot(kc, c)).sum(1) - 1
        keep = keep[rank < max_per_class][:max_total]
        k = len(keep)
        out_boxes[b, :k], out_scores[b, :k], out_classes[b, :k], num[b] = bx[keep], sc[keep], cls[keep], k
    return out_boxes, out_scores, out_classes, num


def _detector_head(device, batch=8, n=8400, classes=80, seed=0):
    """Shared boxes (x1, y1 ~ U(0, 600), w, h ~ U(8, 200)) and scores sigmoid(1.5 N(0, 1) - 6) (~2% pass 0.05)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, n, 2, generator=g) * 600
    wh = torch.rand(batch, n, 2, generator=g) * 192 + 8
    scores = torch.sigmoid(1.5 * torch.randn(batch, n, classes, generator=g) - 6)
    return torch.cat([xy, xy + wh], 2).to(device), scores.to(device)


def _same_detections(ours, base):
    for a, b in zip(ours, base):
        assert torch.equal(a.cpu(), b.cpu()), "visionops and baseline disagree"


MCNMS_ARGS = (0.5, 0.05, 100, 300)  # iou_threshold, score_threshold, max_per_class, max_total


def multiclass_nms_case(backend="auto", cuda_graph=False, agnostic=False):
    def make(device):
        boxes, scores = _detector_head(device)

        def ours():
            return visionops.multiclass_nms(boxes, scores, *MCNMS_ARGS, agnostic, backend=backend)

        run = ours
        if cuda_graph:  # capture once (after a warm-up on a side stream), time the replays
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                ours()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static = ours()

            def run():
                graph.replay()
                return static

        return run, lambda: multiclass_nms_baseline(boxes, scores, *MCNMS_ARGS, agnostic), _same_detections

    return make


CASES += [
    Case(
        "matrix_nms", "2k clustered boxes / 80 labels", matrix_nms_case(2_000, 80), baseline="N x N PyTorch", quick=True
    ),
    Case("matrix_nms", "10k clustered boxes / 80 labels", matrix_nms_case(10_000, 80), baseline="N x N PyTorch"),
    Case("matrix_nms", "500 masks 64x64 / 80 labels", matrix_nms_case(500, 80, masks=64), baseline="N x N PyTorch"),
    Case(
        "matrix_nms",
        "10k clustered boxes / 80 labels [triton]",
        matrix_nms_case(10_000, 80, backend="triton"),
        baseline="N x N PyTorch",
        devices=("cuda",),
    ),
    Case(
        "multiclass_nms",
        "8 x 8400 boxes x 80 classes",
        multiclass_nms_case(),
        baseline="per-image torchvision loop",
        quick=True,
        target=2.0,
    ),
    Case(
        "multiclass_nms",
        "8 x 8400 x 80, class-agnostic",
        multiclass_nms_case(agnostic=True),
        baseline="per-image torchvision loop",
    ),
    Case(
        "multiclass_nms",
        "8 x 8400 x 80 [CUDA graph]",
        multiclass_nms_case(cuda_graph=True),
        baseline="per-image torchvision loop",
        devices=("cuda",),
    ),
    Case(
        "multiclass_nms",
        "8 x 8400 x 80 [triton]",
        multiclass_nms_case("triton"),
        baseline="per-image torchvision loop",
        devices=("cuda",),
    ),
]
