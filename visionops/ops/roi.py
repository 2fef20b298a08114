"""RoI pooling family: roi_align, roi_pool and their modules (torchvision.ops semantics).

Kernels: csrc/ops/{cpu,cuda}/roi_{align,pool}_kernel.*, visionops/triton/roi.py; math: visionops/reference/roi.py.

Differences from torchvision, all deliberate:

* gradients flow to ``input`` only, never to the boxes (as torchvision); double backward raises;
* the batch index (column 0 of the RoIs) is range-checked on the CPU (IndexError); on CUDA, where that would cost a
  device sync, an out-of-range RoI yields zeros and no gradient instead of an out-of-bounds read;
* float16/bfloat16 features are computed in float32 and the boxes may have any floating dtype, so under
  ``torch.autocast`` half features with float32 boxes just work and the output keeps the features' dtype (what
  torchvision's autocast wrapper produces by casting to float32 and back); no autocast cast is registered;
* NaN/infinite/inverted boxes are defined: a sample at a NaN coordinate, or in a RoI whose adaptive grid is not
  finite, contributes nothing (RoIAlign); a RoI with a NaN coordinate gives empty bins (RoIPool: 0).
"""

import math
from typing import List, Union

import torch
from torch import Tensor, nn

from visionops import _fuzz as fz
from visionops import _registry as registry
from visionops import reference
from visionops.ops._checks import (
    ArgumentValueError,
    BoxesShapeError,
    BoxesTypeError,
    check_int,
    check_number,
    check_pair,
    check_tensor,
)

__all__ = ["roi_align", "roi_pool", "RoIAlign", "RoIPool"]

BoxesType = Union[Tensor, List[Tensor]]


def convert_boxes_to_roi_format(boxes: List[Tensor]) -> Tensor:
    """List of Tensor[L_i, 4] (one per image) -> Tensor[sum L_i, 5] with the image index in column 0."""
    concat = torch.cat(list(boxes), dim=0)
    ids = torch.cat([torch.full_like(b[:, :1], i) for i, b in enumerate(boxes)], dim=0)
    return torch.cat([ids, concat], dim=1)


def check_rois(input: Tensor, boxes: BoxesType, op: str = "roi") -> Tensor:
    """Validate ``input`` and ``boxes`` and return the RoIs as Tensor[K, 5]; raises TypeError/ValueError (malformed
    boxes: also AssertionError, as torchvision)."""
    check_tensor("input", input, floating=True)
    if input.dim() != 4:
        raise ArgumentValueError(f"{op}: input must have shape [N, C, H, W], got {list(input.shape)}")
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ArgumentValueError(
            f"{op}: input must have a non-empty feature map (H > 0 and W > 0), got {list(input.shape)}"
        )
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            check_tensor(f"boxes[{i}]", b, floating=True)
            if b.dim() != 2 or b.shape[1] != 4:
                raise BoxesShapeError(f"{op}: boxes[{i}] must have shape [L, 4], got {list(b.shape)}")
            if b.device != input.device:
                raise ArgumentValueError(
                    f"{op}: boxes[{i}] is on {b.device} but input is on {input.device}; they must be on the same device"
                )
        if len(boxes) == 0:
            return input.new_zeros(0, 5)
        return convert_boxes_to_roi_format(boxes)
    if not isinstance(boxes, Tensor):
        raise BoxesTypeError(
            f"{op}: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes).__name__}"
        )
    check_tensor("boxes", boxes, floating=True)
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise BoxesShapeError(
            f"{op}: boxes must have shape [K, 5] (batch index, x1, y1, x2, y2), got {list(boxes.shape)}"
        )
    if boxes.device != input.device:
        raise ArgumentValueError(
            f"{op}: boxes is on {boxes.device} but input is on {input.device}; they must be on the same device"
        )
    return boxes


def roi_align(
    input: Tensor,
    boxes: BoxesType,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """RoIAlign (Mask R-CNN), as ``torchvision.ops.roi_align``.

    Args:
        input: Tensor[N, C, H, W] features (float64/32/16, bfloat16; NCHW or channels_last).
        boxes: Tensor[K, 5] of (batch index, x1, y1, x2, y2), or a list of Tensor[L_i, 4] (one per image).
        output_size: int or (h, w) of each pooled map.
        spatial_scale: feature-map cells per input pixel (e.g. 1/16).
        sampling_ratio: bilinear samples per bin along each axis; <= 0 picks ceil(roi_size / output_size).
        aligned: shift boxes by -0.5 cell (pixel-centre model), as Detectron2.
        backend: "auto", "cpp", "triton" or "reference" (see ``visionops._registry``).

    Returns:
        Tensor[K, C, h, w] in input's dtype. Differentiable in ``input`` only.
    """
    rois = check_rois(input, boxes, "roi_align")
    ph, pw = check_pair("output_size", output_size)
    scale = check_number("spatial_scale", spatial_scale)
    sr = check_int("sampling_ratio", sampling_ratio)
    aligned = bool(aligned)
    return registry.dispatch("roi_align", backend, input.device)(input, rois, scale, ph, pw, sr, aligned)


def roi_pool(
    input: Tensor, boxes: BoxesType, output_size, spatial_scale: float = 1.0, *, backend: str = "auto"
) -> Tensor:
    """RoIPool (Fast R-CNN), as ``torchvision.ops.roi_pool``.

    Args:
        input: Tensor[N, C, H, W]; boxes: Tensor[K, 5] or list of Tensor[L_i, 4]; output_size: int or (h, w);
        spatial_scale: feature-map cells per input pixel.

    Returns:
        Tensor[K, C, h, w]: the max of each bin (0 for an empty bin). The gradient goes to the first maximum.
    """
    rois = check_rois(input, boxes, "roi_pool")
    ph, pw = check_pair("output_size", output_size)
    scale = check_number("spatial_scale", spatial_scale)
    return registry.dispatch("roi_pool", backend, input.device)(input, rois, scale, ph, pw)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align`."""

    def __init__(
        self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False, *, backend: str = "auto"
    ):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.backend = backend

    def forward(self, input: Tensor, rois: BoxesType) -> Tensor:
        return roi_align(
            input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned, backend=self.backend
        )

    def __repr__(self) -> str:
        return (
            f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned})"
        )


class RoIPool(nn.Module):
    """Module form of :func:`roi_pool`."""

    def __init__(self, output_size, spatial_scale: float, *, backend: str = "auto"):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = spatial_scale
        self.backend = backend

    def forward(self, input: Tensor, rois: BoxesType) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale, backend=self.backend)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(output_size={self.output_size}, spatial_scale={self.spatial_scale})"


# ---- declarations: fake kernels, autograd to the features (every backend) ---------------------------------------


def _pooled_fake(input, rois, spatial_scale, pooled_height, pooled_width, *args):
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "rois must have shape [K, 5]")
    return input.new_empty((rois.shape[0], input.shape[1], pooled_height, pooled_width))


def _align_setup(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, *input.shape, sampling_ratio, aligned)


def _align_backward(backward_op, ctx, grad):
    (rois,) = ctx.saved_tensors
    return (backward_op(grad, rois, *ctx.args),) + (None,) * 6


def _align_backward_fake(
    grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels, height, width, sampling_ratio, aligned
):
    return grad.new_empty((batch_size, channels, height, width))


def _pool_setup(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw = inputs
    ctx.save_for_backward(input, rois)
    ctx.args = (spatial_scale, ph, pw)


def _pool_backward(backward_op, ctx, grad):
    input, rois = ctx.saved_tensors
    return (backward_op(grad, input, rois, *ctx.args),) + (None,) * 4


def _pool_backward_fake(grad, input, rois, spatial_scale, pooled_height, pooled_width):
    return grad.new_empty(input.shape)


# ---- fuzz specs (tests/test_fuzz.py) -------------------------------------------------------------------------------


def _roi_inputs(d: fz.Draw):
    """Features and RoIs (a Tensor[K, 5] or a list of Tensor[L, 4]), with inverted, huge and NaN boxes."""
    n, c, dt = d.ints(1, 2), d.ints(0 if d.bool(0.1) else 1, 2 if d.small else 3), fz.dtype(d)
    h, w = d.ints(1, 4 if d.small else 12), d.ints(1, 4 if d.small else 12)
    x = fz.overlapping(d, fz.layout(d, fz.uniform(d, (n, c, h, w), dt)))
    k = d.ints(0, 3 if d.small else 10)
    # (no huge RoI on Triton: its RoIAlign visits all of up to 65536^2 samples per bin, for hours interpreted)
    b = fz.specials(d, fz.boxes(d, k, torch.float64, scale=2 * max(h, w)), p=0.1, huge=not d.small)
    ids = torch.randint(0, n, (k, 1), generator=fz.gen(d)).double()
    rois = fz.layout(d, torch.cat([ids, b], 1).to(d.choice((dt, torch.float32))))
    if d.bool(0.3):
        rois = [rois[ids[:, 0] == i, 1:] for i in range(n)]
    return x, rois


def _roi_mutations(d: fz.Draw, i: int) -> list:
    """Mutations of the features and boxes, and of output_size (positional argument ``i``). An out-of-range batch
    index raises IndexError on the CPU kernels; the Triton kernels (``d.small``) give zeros, as on CUDA."""
    index = [] if d.small else [("batch index", (IndexError,), _batch_out_of_range)]
    return (
        index
        + fz.tensor_mutations("input", 0)
        + [
            ("input", fz.VALUE, fz.arg(0, lambda d, t: t[:, :, :0])),
            ("boxes", fz.VALUE, fz.arg(1, lambda d, r: r[:, 1:] if isinstance(r, Tensor) else [t[:, :3] for t in r])),
            ("boxes", fz.TYPE, fz.arg(1, lambda d, r: d.choice((None, 3, "boxes")))),
            ("boxes", fz.TYPE, fz.arg(1, lambda d, r: r.int() if isinstance(r, Tensor) else [t.long() for t in r])),
            ("output_size", fz.VALUE, fz.arg(i, lambda d, v: d.choice((0, (2, -1), (0, 0))))),
            ("output_size", fz.TYPE, fz.arg(i, lambda d, v: d.choice((2.0, (2, 2, 2), "2", None)))),
        ]
    )


def _batch_out_of_range(d: fz.Draw, call: fz.Call) -> fz.Call:
    x, rois = call.args[:2]
    if not isinstance(rois, Tensor):
        rois = convert_boxes_to_roi_format(rois)
    rois = torch.cat([rois, rois.new_tensor([[d.choice((-1.0, x.shape[0], 1e30, math.nan)), 0, 0, 2, 2]])])
    return fz.Call((x, rois) + call.args[2:], call.kwargs)


def _roi_align_draw(d: fz.Draw) -> fz.Call:
    x, rois = _roi_inputs(d)
    args = (x, rois, d.choice((1, 2, (2, 3), [3, 1])), d.choice((1.0, 0.5, 0.25, 2.0, 0.0, -0.5, math.nan)))
    args += (d.choice((-1, 0, 1, 2, -5)), d.bool())
    mutations = _roi_mutations(d, 2) + [
        ("sampling_ratio", fz.TYPE, fz.arg(4, lambda d, v: d.choice((2.0, "2", None)))),
        ("spatial_scale", fz.TYPE, fz.arg(3, lambda d, v: "1")),
    ]
    return fz.mutate(d, fz.Call(args), mutations)


def _roi_pool_draw(d: fz.Draw) -> fz.Call:
    x, rois = _roi_inputs(d)
    args = (x, rois, d.choice((1, 2, (2, 3))), d.choice((1.0, 0.5, 0.25, 0.0, -0.5, math.nan)))
    mutations = _roi_mutations(d, 2) + [("spatial_scale", fz.TYPE, fz.arg(3, lambda d, v: None))]
    return fz.mutate(d, fz.Call(args), mutations)


registry.declare(
    registry.OpDef(
        "roi_align",
        reference.roi_align,
        _pooled_fake,
        triton="visionops.triton.roi",
        backward=registry.Backward(_align_setup, _align_backward, _align_backward_fake),
        fuzz=fz.FuzzSpec(_roi_align_draw, roi_align),
    )
)
registry.declare(
    registry.OpDef(
        "roi_pool",
        reference.roi_pool,
        _pooled_fake,
        triton="visionops.triton.roi",
        backward=registry.Backward(_pool_setup, _pool_backward, _pool_backward_fake),
        # bin edges are rounded in the kernels' float32 (as the reference does): compare in the inputs' dtype
        fuzz=fz.FuzzSpec(_roi_pool_draw, roi_pool, exact=True),
    )
)
