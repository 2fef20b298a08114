"""Memory leaks on the CPU: the process's resident set stays flat (within a few MB) over many calls of every registry
op, forward and backward (C++ backend, small inputs, after a warm-up that fills the allocator's caches). The default
set makes 500 calls per op; the 10k-call version runs with --runslow."""

import ctypes
import ctypes.util
import gc

import pytest
import torch
from _reliability import cases, rss_bytes

from visionops import _registry as registry
from visionops.testing import num_threads

WARMUP = 100
BOUND = 2 * 2**20  # bytes; measured growth: at most 0.2 MB over 10k calls of any op


def _settled_rss() -> int:
    """RSS once Python's garbage is collected and malloc has returned its free memory to the system, so that
    memory freed by earlier tests neither hides a leak (reused) nor counts as one."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
    return rss_bytes()


def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim  # glibc only
    except (OSError, AttributeError, TypeError):
        return None


_MALLOC_TRIM = _malloc_trim()


def growth(call, n: int) -> int:
    """RSS after ``n`` calls minus RSS after the warm-up (bytes)."""
    for _ in range(WARMUP):
        call()
    gc.collect()
    gc.freeze()  # the collections below then scan only what the calls made (a full one takes 0.2 s here)
    try:
        before = _settled_rss()
        for _ in range(n):
            call()
        return _settled_rss() - before
    finally:
        gc.unfreeze()


def _params():
    ops = list(registry.OPS)
    return [pytest.param(op, 500, id=f"{op}-500") for op in ops] + [
        pytest.param(op, 10_000, id=f"{op}-10k", marks=pytest.mark.slow) for op in ops
    ]


@pytest.mark.parametrize("op,calls", _params())
def test_rss_flat(op, calls):
    (case,) = cases("cpu", torch.float32, "small", per_op=1, ops=[op])
    with num_threads(1):  # leaks do not depend on the split, and 1 thread keeps the loop fast on a busy machine
        grew = growth(lambda: case.run("cpp"), calls)
    assert grew <= BOUND, f"{case.id}: RSS grew {grew / 2**20:.1f} MB over {calls} calls (forward and backward)"


def test_a_leak_is_seen():
    """The measurement catches a leak of 8 KB per call (4 MB over 500 calls)."""
    kept = []
    grew = growth(lambda: kept.append(torch.ones(2048)), 500)
    assert grew > BOUND, f"RSS grew only {grew / 2**20:.1f} MB while 4 MB were kept"
