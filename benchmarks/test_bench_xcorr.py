"""pytest-benchmark suite of the SiamFC cross-correlation family (the cases of `python -m visionops.bench -f xcorr`)."""

import pytest
import torch

from visionops.bench.cases.xcorr import CASES

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PARAMS = [(c, d) for c in CASES for d in DEVICES if d in c.devices]


@pytest.mark.parametrize("case,device", PARAMS, ids=[f"{c.op}-{c.name}-{d}" for c, d in PARAMS])
@pytest.mark.parametrize("side", ["visionops", "baseline"])
def test_xcorr(benchmark, case, device, side):
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
