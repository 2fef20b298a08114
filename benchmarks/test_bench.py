"""pytest-benchmark suite of every benchmark case (visionops/bench/cases/, the cases of `python -m visionops.bench`):
each case timed for visionops and for its baseline, after checking that the two agree.

    python -m pytest benchmarks --benchmark-enable [-k "roi_align or xcorr"] [--benchmark-compare]
"""

import pytest
import torch

from visionops.bench.cases import all_cases

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PARAMS = [pytest.param(c, d, id=f"{c.op}-{c.name}-{d}") for c in all_cases() for d in DEVICES if d in c.devices]


@pytest.fixture(autouse=True)
def _threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # the benchmark runner's default
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("side", ["visionops", "baseline"])
@pytest.mark.parametrize("case,device", PARAMS)
def test_bench(benchmark, case, device, side):
    ours, base, check = case.make(torch.device(device))
    check(ours(), base())  # visionops and the baseline agree (a benchmark of a wrong answer measures nothing)
    fn = ours if side == "visionops" else base
    benchmark.group = f"{case.op}: {case.name} {device}"
    if device == "cuda":
        run = fn

        def fn():
            out = run()
            torch.cuda.synchronize()
            return out

    benchmark(fn)
