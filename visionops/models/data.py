"""Generated data sets for the reference models: every sample is drawn from a ``torch.Generator``, so tests and
examples need no download and repeat exactly.

Conventions: visionops/models/README.md.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor


def random_boxes(
    n: int, image_size: Tuple[int, int], *, min_size: float = 8.0, generator: Optional[torch.Generator] = None
) -> Tensor:
    """Tensor[n, 4] of (x1, y1, x2, y2) boxes inside an image of size (H, W), each side at least ``min_size``."""
    h, w = image_size
    if min_size <= 0 or min_size > min(h, w):
        raise ValueError(f"min_size must be in (0, min(H, W)] = (0, {min(h, w)}], got {min_size}")
    wh = min_size + torch.rand(n, 2, generator=generator) * (torch.tensor([w, h]) - min_size)
    xy = torch.rand(n, 2, generator=generator) * (torch.tensor([w, h]) - wh)
    return torch.cat([xy, xy + wh], 1)


def shapes_detection(
    num_images: int,
    image_size: Tuple[int, int] = (128, 128),
    *,
    max_objects: int = 4,
    num_classes: int = 3,
    generator: Optional[torch.Generator] = None,
) -> Tuple[Tensor, List[dict]]:
    """A toy detection set: images [N, 3, H, W] with filled rectangles on noise, and torchvision-style targets
    (``{"boxes": Tensor[K, 4], "labels": Tensor[K] in 1..num_classes}`` per image; class c paints channel c % 3)."""
    if num_images < 0 or max_objects < 1 or num_classes < 1:
        raise ValueError("num_images must be >= 0, max_objects and num_classes >= 1")
    h, w = image_size
    images = torch.rand(num_images, 3, h, w, generator=generator) * 0.1
    targets = []
    for i in range(num_images):
        k = int(torch.randint(1, max_objects + 1, (1,), generator=generator))
        boxes = random_boxes(k, image_size, min_size=max(4.0, min(h, w) / 8), generator=generator)
        labels = torch.randint(1, num_classes + 1, (k,), generator=generator)
        for (x1, y1, x2, y2), c in zip(boxes.round().long().tolist(), labels.tolist()):
            images[i, c % 3, y1:y2, x1:x2] = 1.0
        targets.append({"boxes": boxes, "labels": labels})
    return images, targets
