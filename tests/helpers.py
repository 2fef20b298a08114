"""Devices, dtypes and sample inputs shared by the op tests."""

import os

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def triton_devices():
    """Devices the Triton backend can run on here: CUDA, or the CPU under the interpreter."""
    if not HAS_TRITON:
        return []
    return (["cpu"] if TRITON_INTERPRET else []) + (
        ["cuda"] if torch.cuda.is_available() and not TRITON_INTERPRET else []
    )


def backends_for(device):
    """(backend, device) pairs to test: C++ and reference everywhere, Triton where it runs."""
    out = ["cpp", "reference"]
    if device in triton_devices():
        out.append("triton")
    return out


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_boxes(n, *, scale=800.0, max_size=100.0, dtype=torch.float32, device="cpu", generator=None):
    """Boxes with xy ~ U(0, scale), wh ~ U(1, 1 + max_size), as (x1, y1, x2, y2)."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_size + 1
    return torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)


def clustered_boxes(n, *, objects=5, jitter=8.0, dtype=torch.float32, device="cpu", generator=None):
    """Many jittered boxes around a few objects, as a detector outputs before NMS."""
    centers = random_boxes(objects, generator=generator, dtype=torch.float64)
    which = torch.randint(0, objects, (n,), generator=generator)
    noise = (torch.rand(n, 4, generator=generator, dtype=torch.float64) - 0.5) * 2 * jitter
    b = centers[which] + noise
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 0.5)
    return b.to(dtype=dtype, device=device)


def unique_scores(n, *, dtype=torch.float32, device="cpu", generator=None):
    """Scores without ties (torch.rand has ties at 20k values)."""
    return (torch.randperm(n, generator=generator).to(torch.float64) / max(n, 1)).to(dtype=dtype, device=device)
