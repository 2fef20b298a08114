"""pytest-benchmark suite for the NMS family (same cases as `python -m visionops.bench`).

    python -m pytest benchmarks/test_bench_nms.py --benchmark-enable [--benchmark-compare]
Each case is benchmarked twice, `visionops` and `baseline`; compare them in the table pytest-benchmark prints.
"""

import pytest
import torch

from visionops.bench.cases.nms import CASES

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PARAMS = [pytest.param(c, d, id=f"{c.op}-{c.name}-{d}") for c in CASES for d in DEVICES if d in c.devices]


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("side", ["visionops", "baseline"])
@pytest.mark.parametrize("case,device", PARAMS)
def test_bench(benchmark, case, device, side):
    ours, base, check = case.make(torch.device(device))
    check(ours(), base())  # visionops and the baseline agree (a benchmark of a wrong answer measures nothing)
    fn = ours if side == "visionops" else base
    benchmark.group = f"{case.op} {case.name} {device}"
    if device == "cuda":
        benchmark(lambda: (fn(), torch.cuda.synchronize()))
    else:
        benchmark(fn)
