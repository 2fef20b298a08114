"""Determinism: under ``torch.use_deterministic_algorithms(True)`` every registry op on the CPU gives bit-identical
outputs and input gradients on repeated runs, at 1 and at 2 torch threads and across the two (or raises, and warns
with ``warn_only=True``, as PyTorch's own non-deterministic ops do).

By default the C++ backend runs every config of the op's conformance class in float32 and float64 on contiguous
inputs (--runslow: every dtype and layout of the class), and interpreted Triton one tiny case per op (those whose
interpreted runs take seconds, as their Triton gradcheck, only with --runslow)."""

import pytest
import torch
from _reliability import cases, check_deterministic, conformance

from visionops import _registry as registry
from visionops.testing import triton_devices

OPS = list(registry.OPS)  # the registry, not the test classes: an op without a conformance class fails below


def _cpp_params():
    out = [pytest.param(op, (torch.float32, torch.float64), ("contiguous",), id=op) for op in OPS]
    out += [pytest.param(op, None, None, id=f"{op}-every_dtype_layout", marks=pytest.mark.slow) for op in OPS]
    return out


@pytest.mark.parametrize("op,dtypes,layouts", _cpp_params())
def test_cpp_deterministic(op, dtypes, layouts):
    cls = conformance(op)
    checked = 0
    for dtype in dtypes or cls.dtypes:
        for layout in layouts or cls.layouts:
            for case in cases("cpu", dtype, "full", per_op=None, ops=[op], layout=layout):
                problem = check_deterministic(case, "cpp")
                assert problem is None, f"{case.id} {dtype} {layout}: {problem}"
                checked += 1
    assert checked >= len(cls.configs)


def _triton_params():
    out = []
    for op in OPS:
        if registry.OPS[op].triton is None or "cpu" not in triton_devices():
            continue
        slow = ("test_gradcheck", "triton") in conformance(op).slow  # tiny inputs, still seconds per run
        out.append(pytest.param(op, marks=[pytest.mark.slow] if slow else []))
    return out


@pytest.mark.parametrize("op", _triton_params())
def test_triton_interpreted_deterministic(op):
    (case,) = cases("cpu", torch.float32, "tiny", per_op=1, ops=[op])
    # the interpreter runs programs in Python, one at a time: one run per thread count checks run to run too
    problem = check_deterministic(case, "triton", repeats=1)
    assert problem is None, f"{case.id}: {problem}"


class _Fake:
    """Stands in for an OpCase: ``run`` does what a real op might."""

    def __init__(self, run):
        self.run = run


def test_the_check_accepts_refusal_and_catches_drift():
    """check_deterministic passes an op that refuses as PyTorch's non-deterministic ops do (error under the flag,
    warning with warn_only=True), and fails one whose results change from run to run or one that refuses silently."""
    from torch._prims_common import alert_not_deterministic

    def refuses(backend):
        alert_not_deterministic("a_fake_op")  # PyTorch's own refusal: raises, or warns under warn_only=True
        return [torch.zeros(3)]

    def drifts(backend):
        return [torch.rand(3)]

    def raises_but_never_warns(backend):
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError("a_fake_op does not have a deterministic implementation")
        return [torch.zeros(3)]

    assert check_deterministic(_Fake(refuses), "cpp") is None
    assert "differs" in check_deterministic(_Fake(drifts), "cpp")
    assert "does not warn" in check_deterministic(_Fake(raises_but_never_warns), "cpp")
    assert not torch.are_deterministic_algorithms_enabled()  # the flag is restored
