"""A benchmark case: one op on one input, timed for visionops and for its baseline in the same run."""

from dataclasses import dataclass, field
from typing import Any, Callable, Tuple

import torch

# make(device) -> (visionops_fn, baseline_fn, check_fn). Each fn takes no argument; check_fn(ours, base) asserts the
# two results agree (identical keep, allclose tensors, ...) and runs once before timing.
Maker = Callable[[torch.device], Tuple[Callable[[], Any], Callable[[], Any], Callable[[Any, Any], None]]]


@dataclass
class Case:
    op: str  # e.g. "nms"
    name: str  # e.g. "20k boxes"
    make: Maker
    baseline: str = "torchvision"
    quick: bool = False  # part of `--quick`
    devices: Tuple[str, ...] = ("cpu", "cuda")
    target: float = 0.0  # the ratio this case is meant to reach on the CPU (0: none), for developers; not printed
    gpu_target: float = 0.0  # same on CUDA
    tags: dict = field(default_factory=dict)
