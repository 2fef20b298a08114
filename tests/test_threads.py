"""Thread safety of the C++ CPU kernels: every registry op (forward, and backward where it has a gradient) called
from 8 Python threads at once on different inputs gives exactly the results of serial calls. Torch runs 2 intra-op
threads, so each call's at::parallel_for splits its work while the other calls run."""

import threading

import pytest
import torch
from _reliability import cases, identical

from visionops import _registry as registry
from visionops.testing import num_threads

THREADS = 8
ROUNDS = 3  # each thread calls its case this many times, so calls overlap in different phases


def _concurrently(jobs):
    """Run each job (a callable returning a list of result lists) in its own thread, all released at once; returns
    their results, or raises the first exception a thread met."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def body(i):
        try:
            assert torch.get_num_threads() >= 2, "intra-op parallelism is off in this thread"
            barrier.wait(timeout=60)
            results[i] = jobs[i]()
        except BaseException as e:  # reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread did not finish within 300 s"
    if errors:
        raise errors[0]
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("op", list(registry.OPS))
def test_op_from_threads_matches_serial(op, dtype):
    with num_threads(2):
        work = list(cases("cpu", dtype, "full", per_op=THREADS, ops=[op]))
        serial = [case.run("cpp") for case in work]
        got = _concurrently([lambda case=case: [case.run("cpp") for _ in range(ROUNDS)] for case in work])
    for case, expected, runs in zip(work, serial, got):
        for r, result in enumerate(runs):
            diff = identical(result, expected)
            assert diff is None, f"{case.id} (thread of {case.config}), round {r}: {diff}"


def test_every_op_at_once():
    """Each thread calls every op, starting at a different one, so different kernels run side by side."""
    with num_threads(2):
        work = [list(cases("cpu", torch.float32, "full", per_op=1, seed=100 + t)) for t in range(THREADS)]
        serial = [[case.run("cpp") for case in mine] for mine in work]

        def job(t):
            order = [(i + t) % len(work[t]) for i in range(len(work[t]))]
            out = [None] * len(order)
            for i in order:
                out[i] = work[t][i].run("cpp")
            return out

        got = _concurrently([lambda t=t: job(t) for t in range(THREADS)])
    for t in range(THREADS):
        for case, expected, result in zip(work[t], serial[t], got[t]):
            diff = identical(result, expected)
            assert diff is None, f"thread {t}, {case.id}: {diff}"
