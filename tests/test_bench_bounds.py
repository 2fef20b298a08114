"""visionops.bench.bounds: the work each GPU case declares, checked by hand on small inputs."""

import pytest
import torch

from visionops.bench import bounds
from visionops.bench.cases import all_cases


def test_bound_is_the_largest_term():
    machine = bounds.Machine(1e12, 4e12, 1e13, 1e15, 1e-5)
    assert bounds.bound_seconds(bounds.Work(2e6), machine) == pytest.approx(1e-5)  # launch: 2 us < 10 us
    assert bounds.bound_seconds(bounds.Work(1e9), machine) == pytest.approx(1e-3)  # HBM
    assert bounds.bound_seconds(bounds.Work(0, 8e9), machine) == pytest.approx(2e-3)  # L2
    assert bounds.bound_seconds(bounds.Work(0, 0, 1e11), machine) == pytest.approx(1e-2)  # float32 FLOPs
    assert bounds.bound_seconds(bounds.Work(0, 0, 1e11, tensor_cores=True), machine) == pytest.approx(1e-4)


def test_roi_footprint_of_an_aligned_roi():
    # feature 10x10, scale 1, aligned: the RoI (2, 2)-(6, 6) becomes (1.5, 1.5)-(5.5, 5.5); 2 bins x 2 samples:
    # samples at 2.5, 3.5, 4.5, 5.5... first 1.5 + 0.5 = 2.0, last 5.5 - 0.5 = 5.0 -> rows 2..6
    rois = torch.tensor([[0.0, 2, 2, 6, 6]])
    y0, y1, x0, x1 = bounds.roi_footprints(rois, 10, 10, pooled=2, scale=1.0, sr=2, aligned=True)
    assert (y0.item(), y1.item(), x0.item(), x1.item()) == (2, 6, 2, 6)
    work = bounds.roi_work(rois, 1, 3, 10, 10, pooled=2, scale=1.0, sr=2)
    assert work.l2_bytes == 25 * 3 * 4  # the 5x5 footprint of 3 channels
    assert work.hbm_bytes == (25 * 3 + 1 * 3 * 4) * 4 + 5 * 4  # footprint in, 1x3x2x2 out, the RoI


def test_roi_footprint_is_clipped_and_overlaps_count_once_in_hbm():
    rois = torch.tensor([[0.0, -50, -50, 4, 4], [0.0, -50, -50, 4, 4]])
    work = bounds.roi_work(rois, 1, 1, 8, 8, pooled=2, scale=1.0, sr=2)
    union = (work.hbm_bytes - 2 * 4 * 4 - 10 * 4) / 4
    assert union * 2 * 4 == work.l2_bytes  # two identical RoIs: the union once in HBM, twice through L2


def test_nms_and_box_iou_work():
    assert bounds.nms_work(4).flops == 15 * 6
    assert bounds.nms_work(4, pairs=1).flops == 15
    assert bounds.box_iou_work(2, 3).hbm_bytes == 5 * 16 + 6 * 4


def test_conv_work_counts_multiply_adds():
    work = bounds.conv_work((1, 4, 5, 5), 8, (3, 3), (3, 3), itemsize=2)
    assert work.flops == 2 * 8 * 9 * 4 * 9
    assert work.tensor_cores
    assert bounds.conv_work((1, 4, 5, 5), 8, (3, 3), (3, 3), backward=True).flops == 3 * work.flops


def test_every_gpu_roi_and_nms_case_declares_its_work():
    gpu = [c for c in all_cases() if "cuda" in c.devices and c.op in ("roi_align", "roi_pool", "nms", "batched_nms")]
    assert gpu and all("work" in c.tags for c in gpu)
    work = next(c for c in gpu if c.name.startswith("fwd 2x256")).tags["work"]()
    footprint = work.hbm_bytes - 1024 * 256 * 49 * 4 - 1024 * 20  # the touched part of the 2x256x50x68 map
    assert 0.5 * 2 * 256 * 50 * 68 * 4 < footprint <= 2 * 256 * 50 * 68 * 4


def test_runner_reports_the_bound_beside_the_time():
    from visionops.bench import runner
    from visionops.bench.case import Case

    machine = bounds.Machine(4e12, 1e13, 5e13, 8e14, 8e-6)
    noop = lambda device: ((lambda: 1), (lambda: 1), (lambda a, b: None))  # noqa: E731
    cases = [
        Case("box_iou", "declares work", noop, tags={"work": lambda: bounds.box_iou_work(1000, 1000)}),
        Case("box_iou", "does not", noop),
    ]
    rows = runner.combine([runner.run(cases, "cpu", 1, 0.01, machine=machine)] * 2)
    assert rows[0]["bound_ms"] == pytest.approx(bounds.bound_seconds(bounds.box_iou_work(1000, 1000), machine) * 1e3)
    assert rows[0]["of_bound"] == pytest.approx(rows[0]["bound_ms"] / rows[0]["visionops_ms"])
    assert "bound_ms" not in rows[1]
    table = runner.format_table(rows)
    assert "bound/time" in table.splitlines()[0]
    assert "bound_ms" not in runner.run(cases[:1], "cpu", 1, 0.01)[0]  # no machine rates (the CPU): no bound
