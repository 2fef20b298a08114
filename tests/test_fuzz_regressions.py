"""Inputs the fuzz suite (tests/test_fuzz.py) found mishandled, as plain deterministic tests."""

import math

import pytest
import torch

import visionops
from visionops.ops._checks import ArgumentValueError
from visionops.ops.poolers import MultiScaleRoIAlign


def test_box_iou_unbroadcastable_batches_name_the_boxes():
    # torch.broadcast_shapes' RuntimeError named neither argument
    with pytest.raises(ArgumentValueError, match="boxes1 and boxes2 must have broadcastable batch dimensions"):
        visionops.box_iou(torch.zeros(2, 3, 4), torch.zeros(3, 5, 4))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_grid_anchors_huge_side_with_no_anchors(backend):
    # a level with one side 0 has no anchors: the reference used to build the other (huge) side's grid first
    cells = [torch.tensor([[-8.0, -8.0, 8.0, 8.0]]), torch.tensor([[-4.0, -2.0, 4.0, 2.0]])]
    out = visionops.grid_anchors([(2**40, 0), (2, 1)], [(4.0, 4.0), (8.0, 8.0)], cells, backend=backend)
    expected = torch.tensor([[-4.0, -2.0, 4.0, 2.0], [-4.0, 6.0, 4.0, 10.0]])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("bad_box", [[10.0, 10.0, 2.0, 30.0], [math.nan, 0.0, 5.0, 5.0]])
def test_multi_scale_roi_align_box_without_a_level_pools_zeros(backend, bad_box):
    # an inverted or NaN box has no FPN level (sqrt of a negative/NaN area): its level became garbage (int64 cast of
    # NaN) and the C++ kernel refused the valid call with an IndexError; torchvision leaves such a box's output zero
    g = torch.Generator().manual_seed(0)
    x = {"0": torch.rand(1, 2, 16, 16, generator=g), "1": torch.rand(1, 2, 8, 8, generator=g)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], bad_box, [0.0, 0.0, 64.0, 64.0]])]
    pool = MultiScaleRoIAlign(["0", "1"], 2, 2, backend=backend)
    out = pool(x, boxes, [(64, 64)])
    assert out.shape == (3, 2, 2, 2)
    assert torch.equal(out[1], torch.zeros(2, 2, 2))
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0
    expected = MultiScaleRoIAlign(["0", "1"], 2, 2, backend="reference")(x, boxes, [(64, 64)])
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
def test_box_iou_half_formats_convert_in_float32(backend):
    # cxcywh -> xyxy was done in bfloat16: y = 9984 -+ 47 / 2 both rounded to 9984, a box of height 0 (IoU NaN)
    boxes = torch.tensor([[0.0, 9984.0, 4.0, 47.0], [1.0, 1.0, 2.0, 2.0]], dtype=torch.bfloat16)
    out = visionops.box_iou(boxes, boxes, fmt="cxcywh", backend=backend)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, torch.eye(2, dtype=torch.bfloat16))
