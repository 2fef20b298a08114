"""Memory leaks on the CPU: the process's resident set stays flat (within a few MB) over many calls of every registry
op, forward and backward (C++ backend, small inputs, after a warm-up that fills the allocator's caches). The default
set makes 1000 calls per op; the 10k-call version runs with --runslow."""

import gc

import pytest
import torch
from _reliability import cases, rss_bytes

from visionops import _registry as registry
from visionops.testing import num_threads

WARMUP = 200
BOUND = 3 * 2**20  # bytes: malloc's arenas and caches move by a few hundred KB at most (measured)


def growth(call, n: int) -> int:
    """RSS after ``n`` calls minus RSS after the warm-up (bytes)."""
    for _ in range(WARMUP):
        call()
    gc.collect()
    before = rss_bytes()
    for _ in range(n):
        call()
    gc.collect()
    return rss_bytes() - before


def _params():
    ops = list(registry.OPS)
    return [pytest.param(op, 1000, id=f"{op}-1k") for op in ops] + [
        pytest.param(op, 10_000, id=f"{op}-10k", marks=pytest.mark.slow) for op in ops
    ]


@pytest.mark.parametrize("op,calls", _params())
def test_rss_flat(op, calls):
    (case,) = cases("cpu", torch.float32, "small", per_op=1, ops=[op])
    with num_threads(1):  # leaks do not depend on the split, and 1 thread keeps the loop fast on a busy machine
        grew = growth(lambda: case.run("cpp"), calls)
    assert grew <= BOUND, f"{case.id}: RSS grew {grew / 2**20:.1f} MB over {calls} calls (forward and backward)"


def test_a_leak_is_seen():
    """The measurement catches a leak of 4 KB per call (4 MB over 1000 calls)."""
    kept = []
    grew = growth(lambda: kept.append(torch.ones(1024)), 1000)
    assert grew > BOUND, f"RSS grew only {grew / 2**20:.1f} MB while 4 MB were kept"
