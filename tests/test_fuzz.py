"""Fuzzing every registered op: hypothesis draws calls from each op's FuzzSpec (``OpDef.fuzz``, declared beside the
op in visionops/ops/*.py) and the harness (visionops/testing_fuzz.py) runs each case in a worker subprocess, so a
crash or a hang fails the case (with the worker's stderr) instead of killing pytest; hypothesis then shrinks it.

Every invalid call must raise the expected exception naming the argument; every valid call must match the op's
reference. The default run is sized for CI (profiles "ci-<backend>", derandomized); for a longer run scale the
examples with VISIONOPS_FUZZ_SCALE, or run the campaign: ``python -m visionops.testing_fuzz --cases N --seed S``.
"""

import os
import random
import time

import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from visionops._fuzz import Draw, FuzzSpec, RandomDraw  # noqa: E402
from visionops._registry import OPS  # noqa: E402
from visionops.testing_fuzz import Case, Worker, check, draw_case  # noqa: E402

# Examples per op and backend: the Triton interpreter takes seconds a case, the C++ kernels milliseconds.
EXAMPLES = {"cpp": 100, "reference": 25, "triton": 10}
SCALE = float(os.environ.get("VISIONOPS_FUZZ_SCALE", "1"))  # e.g. 25 for a longer run

for _backend, _n in EXAMPLES.items():
    settings.register_profile(
        f"ci-{_backend}",
        max_examples=max(1, round(_n * SCALE)),
        deadline=None,
        derandomize=True,  # reproducible in CI: the same cases every run
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


class HypothesisDraw(Draw):
    """The specs' drawing interface over ``st.data()``: every choice shrinks toward the first option / lowest value."""

    def __init__(self, data):
        self.data = data

    def ints(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def floats(self, lo, hi):
        return self.data.draw(st.floats(lo, hi, allow_nan=False))

    def choice(self, seq):
        return self.data.draw(st.sampled_from(list(seq)))

    def bool(self, p=0.5):
        return self.data.draw(st.integers(0, 999)) >= 1000 - round(1000 * p)


@pytest.fixture(scope="module")
def worker():
    w = Worker()
    yield w
    w.close()


def _fuzz_test(backend: str):
    @pytest.mark.parametrize("op", list(OPS))
    @settings(settings.get_profile(f"ci-{backend}"))
    @given(data=st.data())
    def test(op, data, worker):
        check(worker, draw_case(HypothesisDraw(data), op, backends=(backend,)))

    return test


test_fuzz_cpp = _fuzz_test("cpp")
test_fuzz_reference = _fuzz_test("reference")
test_fuzz_triton = _fuzz_test("triton")


def test_every_op_has_a_fuzz_spec():
    missing = [name for name, op in OPS.items() if not isinstance(op.fuzz, FuzzSpec)]
    assert not missing, f"ops without a fuzz spec (OpDef.fuzz): {missing}"


@pytest.mark.parametrize("op", list(OPS))
def test_spec_draws_valid_and_invalid_calls(op):
    calls = [OPS[op].fuzz.draw(RandomDraw(random.Random(seed))) for seed in range(60)]
    assert any(c.bad is None for c in calls), "the spec never draws a valid call"
    bad = [c for c in calls if c.bad is not None]
    assert bad, "the spec never draws an invalid call"
    assert all(c.exc and all(issubclass(e, Exception) for e in c.exc) for c in bad)


class _AbortOnLoad:
    """Unpickled in the worker as a call of os.abort: a worker that dies mid-case."""

    def __reduce__(self):
        return (os.abort, ())


class _SleepOnLoad:
    def __reduce__(self):
        return (time.sleep, (60,))


def test_harness_reports_a_dead_or_hung_worker_and_restarts():
    w = Worker(timeout_s=3)
    try:
        for payload, why in ((_AbortOnLoad(), "worker died \\(signal SIGABRT\\)"), (_SleepOnLoad(), "timed out")):
            with pytest.raises(AssertionError, match=why):
                check(w, Case("nms", "cpp", payload))
        # the next case gets a fresh worker
        call = OPS["nms"].fuzz.draw(RandomDraw(random.Random(0)))
        assert check(w, Case("nms", "cpp", call))["status"] in ("valid", "invalid")
    finally:
        w.close()
