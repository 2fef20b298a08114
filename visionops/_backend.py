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

# (op, device type) -> backend, from benchmarks/results/. Empty entries fall back to "cpp".
AUTO: dict = {}


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
