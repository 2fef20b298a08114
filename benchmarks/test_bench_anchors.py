"""pytest-benchmark suite of the anchors / box-coding cases (visionops/bench/cases/anchors.py), CPU:
`pytest benchmarks/test_bench_anchors.py --benchmark-only`. Each case is timed for visionops and its baseline."""

import pytest
import torch

from visionops.bench.cases.anchors import CASES

_IDS = [f"{c.op}: {c.name}" for c in CASES]


@pytest.mark.parametrize("side", ["visionops", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_bench(benchmark, case, side):
    ours, base, check = case.make(torch.device("cpu"))
    check(ours(), base())
    benchmark.group = f"{case.op}: {case.name}"
    benchmark(ours if side == "visionops" else base)
