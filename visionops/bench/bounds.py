"""Lower bounds on a GPU case's time, from the work the op cannot avoid.

For each case, ``Work`` counts what any kernel for that op must do:

* ``hbm_bytes``: compulsory DRAM traffic: each input element the op depends on read once, each output written once
  (a RoI op reads the union of its RoIs' footprints, not the whole feature map);
* ``l2_bytes``: traffic that must pass through L2 even when the input is L2-resident (the 7 MB feature map of the
  RoI cases is, on an H100/H200): each RoI reads its own footprint once, so overlapping RoIs count once each;
* ``flops``: arithmetic of the algorithm's core (IoU pairs, multiply-adds);
* ``launches``: kernel launches the op needs at the least (a sync-free op: one; one that returns a data-dependent
  size: one launch and one device-to-host copy).

The machine side (``Machine``) is measured in the same run: HBM bandwidth from a copy larger than L2, L2 bandwidth
from a copy that fits in it, FLOP/s from large GEMMs (float32 with TF32 off; bfloat16 for half-precision work),
and the latency of one launch plus a synchronisation.
``bound = max(hbm / HBM, l2 / L2, flops / FLOP/s, launches x latency)``; the runner prints ``bound / measured``
(1.0 = at the bound).

``python -m visionops.bench.bounds`` prints the work of every case that declares it (no GPU needed).
"""

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch

F32 = 4


@dataclass(frozen=True)
class Work:
    hbm_bytes: float
    l2_bytes: float = 0.0
    flops: float = 0.0
    launches: int = 1
    tensor_cores: bool = False  # half-precision multiply-adds that tensor cores can run

    def __add__(self, other: "Work") -> "Work":
        return Work(
            self.hbm_bytes + other.hbm_bytes,
            self.l2_bytes + other.l2_bytes,
            self.flops + other.flops,
            self.launches + other.launches,
            self.tensor_cores and other.tensor_cores,
        )


@dataclass(frozen=True)
class Machine:
    hbm_bytes_per_s: float
    l2_bytes_per_s: float
    flops_per_s: float
    tensor_flops_per_s: float
    launch_s: float  # one small kernel launch followed by a synchronisation

    def describe(self) -> str:
        return (
            f"HBM copy {self.hbm_bytes_per_s / 1e12:.2f} TB/s, L2 copy {self.l2_bytes_per_s / 1e12:.2f} TB/s, "
            f"fp32 GEMM {self.flops_per_s / 1e12:.1f} TFLOP/s, bf16 GEMM {self.tensor_flops_per_s / 1e12:.0f} TFLOP/s, "
            f"launch+sync {self.launch_s * 1e6:.1f} us"
        )


def bound_seconds(work: Work, machine: Machine) -> float:
    return max(
        work.hbm_bytes / machine.hbm_bytes_per_s,
        work.l2_bytes / machine.l2_bytes_per_s,
        work.flops / (machine.tensor_flops_per_s if work.tensor_cores else machine.flops_per_s),
        work.launches * machine.launch_s,
    )


def _time_cuda(fn: Callable[[], None], reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def _copy_bandwidth(nbytes: int, device: torch.device, reps: int) -> float:
    src = torch.empty(nbytes // F32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / _time_cuda(lambda: dst.copy_(src), reps)


def measure(device: torch.device) -> Machine:
    """The card's bandwidths, FLOP/s and launch latency, measured now (about a second)."""
    with torch.cuda.device(device):
        l2 = torch.cuda.get_device_properties(device).L2_cache_size or 50 * 2**20
        hbm = _copy_bandwidth(max(2**30, 8 * l2), device, 20)  # 8x L2: streams from HBM
        l2_bw = _copy_bandwidth(l2 // 8, device, 500)  # source and destination fit in L2 together
        n = 8192
        a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            flops = 2 * n**3 / _time_cuda(lambda: torch.mm(a, b), 5)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        a, b = a.bfloat16(), b.bfloat16()
        tensor_flops = 2 * n**3 / _time_cuda(lambda: torch.mm(a, b), 20)
        one = torch.zeros(1, device=device)

        def launch_and_sync():
            one.add_(1)
            torch.cuda.current_stream(device).synchronize()

        launch = _time_cuda(launch_and_sync, 200)
    return Machine(hbm, l2_bw, flops, tensor_flops, launch)


# ---- work of the cases ----------------------------------------------------------------------------------------------


def _sample_span(lo: torch.Tensor, hi: torch.Tensor, bins: int, sr: int, size: int):
    """First and last feature row (or column) that bilinear samples of [lo, hi] in ``bins`` x ``sr`` steps touch."""
    step = (hi - lo) / (bins * sr)
    first, last = lo + step / 2, hi - step / 2
    a = first.clamp(min=0).floor().clamp(max=size - 1)
    b = (last.floor() + 1).clamp(min=0, max=size - 1)
    return a.long(), b.long()


def roi_footprints(rois: torch.Tensor, height: int, width: int, pooled: int, scale: float, sr: int, aligned: bool):
    """Per RoI its touched rectangle of the feature map (y0, y1, x0, x1 inclusive) for RoIAlign's bilinear samples."""
    rois = rois.double().cpu()
    off = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * scale - off for i in range(1, 5))
    if not aligned:  # torchvision forces a size of at least 1 when not aligned
        x2, y2 = torch.maximum(x2, x1 + 1), torch.maximum(y2, y1 + 1)
    y0, y1b = _sample_span(y1, y2, pooled, sr, height)
    x0, x1b = _sample_span(x1, x2, pooled, sr, width)
    return y0, y1b, x0, x1b


def _union_and_sum(rois, n, height, width, footprint):
    y0, y1, x0, x1 = footprint
    areas = ((y1 - y0 + 1).clamp(min=0) * (x1 - x0 + 1).clamp(min=0)).sum().item()
    covered = torch.zeros(n, height, width, dtype=torch.bool)
    for b, a, c, d, e in zip(rois[:, 0].long().tolist(), y0.tolist(), y1.tolist(), x0.tolist(), x1.tolist()):
        covered[b, a : c + 1, d : e + 1] = True
    return covered.sum().item(), areas


def roi_work(rois, n, c, h, w, pooled=7, scale=1 / 16, sr=2, aligned=True, backward=False, pool=False) -> Work:
    """RoIAlign (or RoIPool with ``pool``) forward, or its input gradient with ``backward``, float32."""
    if pool:  # RoIPool's bins cover the rounded RoI
        r = rois.double().cpu()
        xs, ys = (r[:, 1] * scale).round(), (r[:, 2] * scale).round()
        xe, ye = (r[:, 3] * scale).round(), (r[:, 4] * scale).round()
        footprint = (
            ys.clamp(0, h - 1).long(),
            ye.clamp(0, h - 1).long(),
            xs.clamp(0, w - 1).long(),
            xe.clamp(0, w - 1).long(),
        )
    else:
        footprint = roi_footprints(rois, h, w, pooled, scale, sr, aligned)
    union, total = _union_and_sum(rois, n, h, w, footprint)
    k = rois.shape[0]
    out = k * c * pooled * pooled
    samples = out * (sr * sr if not pool else 1)
    if backward:  # read grad_output, write grad_input (zero-filled once, then accumulated per footprint)
        return Work(
            hbm_bytes=(out + n * c * h * w) * F32 + rois.numel() * F32, l2_bytes=2 * total * c * F32, flops=12 * samples
        )
    return Work(hbm_bytes=(union * c + out) * F32 + rois.numel() * F32, l2_bytes=total * c * F32, flops=12 * samples)


def nms_work(n: int, pairs: Optional[float] = None) -> Work:
    """Bitmask NMS: boxes, scores and the sorted order in, kept indices out (at most n); the IoU of every pair a box
    may suppress (``pairs``, default n(n-1)/2 — per class for batched_nms) at ~15 FLOPs each; one launch and the
    copy of the kept count to the host."""
    pairs = n * (n - 1) / 2 if pairs is None else pairs
    return Work(hbm_bytes=n * (16 + 4 + 8), flops=15 * pairs, launches=2)


def box_iou_work(n: int, m: int) -> Work:
    return Work(hbm_bytes=(n + m) * 16 + n * m * F32, flops=12 * n * m)


def elementwise_work(in_bytes: float, out_bytes: float, flops: float = 0.0) -> Work:
    return Work(hbm_bytes=in_bytes + out_bytes, flops=flops)


def xcorr_work(b, c, hz, hx, bz=None, depthwise=False, backward=False) -> Work:
    ho = hx - hz + 1
    out = b * (c if depthwise else 1) * ho * ho
    macs = b * c * hz * hz * ho * ho
    tensors = ((bz or b) * c * hz * hz + b * c * hx * hx + out) * F32
    if backward:  # forward, then both gradients (each as large as its input), three passes of the MACs
        return Work(hbm_bytes=2 * tensors + ((bz or b) * c * hz * hz + b * c * hx * hx) * F32, flops=6 * macs)
    return Work(hbm_bytes=tensors, flops=2 * macs)


def conv_work(input_shape, cout, kernel, out_spatial, groups=1, itemsize=F32, backward=False) -> Work:
    """Forward: input, weight and output once each, 2 FLOPs per multiply-add. With ``backward`` (forward + input and
    weight gradients): each gradient reads the output gradient and one operand and writes a tensor of the other's
    size, with the same multiply-adds."""
    n, cin = input_shape[:2]
    macs = n * cout * math.prod(out_spatial) * (cin // groups) * math.prod(kernel)
    x, w, y = math.prod(input_shape), cout * (cin // groups) * math.prod(kernel), n * cout * math.prod(out_spatial)
    if backward:
        return Work((x + w + y + (y + w + x) + (y + x + w)) * itemsize, 0.0, 6 * macs, 3, itemsize == 2)
    return Work((x + w + y) * itemsize, 0.0, 2 * macs, 1, itemsize == 2)


def describe(work: Work) -> str:
    return (
        f"HBM {work.hbm_bytes / 1e6:9.2f} MB  L2 {work.l2_bytes / 1e6:9.2f} MB  "
        f"{work.flops / 1e9:9.3f} GFLOP  {work.launches} launch(es)"
    )


def case_works() -> Dict[str, Work]:
    from visionops.bench.cases import all_cases

    out = {}
    for case in all_cases():
        fn = case.tags.get("work") if case.tags else None
        if fn is not None and "cuda" in case.devices:
            out[f"{case.op} {case.name}"] = fn()
    return out


if __name__ == "__main__":
    for name, work in case_works().items():
        print(f"{name:<60} {describe(work)}")
