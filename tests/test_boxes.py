"""Box utilities (pure PyTorch): box_area, clip_boxes_to_image, box_convert, remove_small_boxes vs torchvision."""

import pytest
import torch
import torchvision

import visionops
from visionops.testing import DEVICES, FLOAT_DTYPES, random_boxes

FORMATS = ["xyxy", "xywh", "cxcywh"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.int64, torch.int16])
def test_box_area(device, dtype):
    g = torch.Generator().manual_seed(0)
    b = random_boxes(50, generator=g, device=device).to(dtype)
    for fmt in FORMATS:
        ours, theirs = visionops.box_area(b, fmt), torchvision.ops.box_area(b, fmt)
        assert ours.dtype == theirs.dtype
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert visionops.box_area(b.reshape(5, 10, 4)).shape == (5, 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("contiguous", [True, False])
def test_clip_boxes_to_image(device, dtype, contiguous):
    g = torch.Generator().manual_seed(1)
    b = (random_boxes(40, scale=300, max_size=200, generator=g, device=device) - 50).to(dtype)
    b[0, 0] = float("nan")
    if not contiguous:
        b = torch.cat([b, b], 1)[:, ::2]
        assert not b.is_contiguous()
    ours = visionops.clip_boxes_to_image(b, (120, 200))
    theirs = torchvision.ops.clip_boxes_to_image(b, (120, 200))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0, equal_nan=True)
    assert ours[:, 0::2].nan_to_num(0).max() <= 200 and ours[:, 1::2].min() >= 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_box_convert(dtype):
    g = torch.Generator().manual_seed(2)
    b = random_boxes(30, generator=g).to(dtype).reshape(3, 10, 4)
    for i in FORMATS:
        for o in FORMATS:
            ours, theirs = visionops.box_convert(b, i, o), torchvision.ops.box_convert(b, i, o)
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
            if i == o:
                assert ours.data_ptr() != b.data_ptr()
    back = visionops.box_convert(visionops.box_convert(b.double(), "xyxy", "cxcywh"), "cxcywh", "xyxy")
    torch.testing.assert_close(back, b.double())


def test_remove_small_boxes():
    g = torch.Generator().manual_seed(3)
    b = random_boxes(200, max_size=10, generator=g)
    for m in (0.0, 3.0, 7.5, 100.0):
        assert torch.equal(visionops.remove_small_boxes(b, m), torchvision.ops.remove_small_boxes(b, m))
    assert visionops.remove_small_boxes(torch.zeros(0, 4), 1.0).shape == (0,)


def test_empty():
    e = torch.zeros(0, 4)
    assert visionops.box_area(e).shape == (0,)
    assert visionops.clip_boxes_to_image(e, (5, 5)).shape == (0, 4)
    assert visionops.box_convert(e, "xyxy", "cxcywh").shape == (0, 4)


def test_bad_inputs():
    with pytest.raises(ValueError, match="fmt"):
        visionops.box_area(torch.zeros(2, 4), "xyxyxyxy")
    with pytest.raises(ValueError, match="boxes"):
        visionops.box_area(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="boxes"):
        visionops.clip_boxes_to_image([[0, 0, 1, 1]], (5, 5))
    with pytest.raises(ValueError, match="size"):
        visionops.clip_boxes_to_image(torch.zeros(2, 4), (5,))
    with pytest.raises(ValueError, match="out_fmt"):
        visionops.box_convert(torch.zeros(2, 4), "xyxy", "xywhr")
    with pytest.raises(TypeError, match="min_size"):
        visionops.remove_small_boxes(torch.zeros(2, 4), "1")
