"""Backend selection. Every public op takes `backend=`:

* ``"cpp"``       the C++ kernel of the input's device (CPU, or CUDA when built with CUDA);
* ``"triton"``    the Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``);
* ``"reference"`` the pure-PyTorch implementation in ``visionops.reference``;
* ``"auto"``      the fastest measured backend for the device, from ``AUTO`` below.

``AUTO`` is set from committed benchmark numbers (``benchmarks/results/``); an op/device pair not listed uses the
C++ kernel.
"""
import os

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")

# (op, device type) -> backend, from benchmarks/results/; pairs not listed use "cpp".
# NVIDIA-H200-20261127-bench-cuda.json: the CUDA C++ kernels beat the Triton ones for the NMS family (nms 20k:
# 4.59 vs 4.63 ms, 100k: 41.5 vs 57.8 ms; batched_nms 20k/80: 3.9 vs 5.4 ms; box_iou 1k x 1k: 0.032 vs 0.091 ms).
# On the CPU Triton only runs interpreted (for tests), so the C++ kernels are the only real choice there.
AUTO: dict = {
    ("nms", "cuda"): "cpp",
    ("batched_nms", "cuda"): "cpp",
    ("box_iou", "cuda"): "cpp",
}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend for `op` on `device`; raises ValueError for an unknown or unusable backend."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return AUTO.get((op, device.type), "cpp")
    if backend == "triton":
        if not triton_available():
            raise ValueError(f"{op}: backend='triton' needs the `triton` package")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{op}: backend='triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set before "
                f"importing visionops); got a {device.type} tensor"
            )
    return backend
