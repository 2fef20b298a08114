"""visionops.models: the package skeleton's shared pieces (backend keyword, generated data)."""

import pytest
import torch

from visionops import models
from visionops.models import data


def test_backend_keyword_is_checked():
    assert models.check_backend("visionops") == "visionops"
    assert models.check_backend("pytorch") == "pytorch"
    with pytest.raises(ValueError, match="backend"):
        models.check_backend("torchvision")


def test_generated_detection_data_repeats_with_the_generator():
    a = data.shapes_detection(3, (64, 80), generator=torch.Generator().manual_seed(0))
    b = data.shapes_detection(3, (64, 80), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    for ta, tb in zip(a[1], b[1]):
        torch.testing.assert_close(ta["boxes"], tb["boxes"], rtol=0, atol=0)
        assert torch.equal(ta["labels"], tb["labels"])
    images, targets = a
    assert images.shape == (3, 3, 64, 80) and len(targets) == 3
    for t in targets:
        boxes, labels = t["boxes"], t["labels"]
        assert boxes.shape[1] == 4 and len(boxes) == len(labels) >= 1
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 0::2] <= 80).all() and (boxes[:, 1::2] <= 64).all()
        assert ((labels >= 1) & (labels <= 3)).all()


def test_random_boxes_rejects_bad_min_size():
    with pytest.raises(ValueError, match="min_size"):
        data.random_boxes(2, (10, 10), min_size=20)
