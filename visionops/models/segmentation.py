"""Segmentation networks (DeepLab) on visionops' dilated convolution, with a ``backend="pytorch"`` twin.

Chen et al., "Rethinking Atrous Convolution for Semantic Image Segmentation" (DeepLab v3, 2017), at toy scale: a
small ResNet-style backbone (basic blocks) whose last stage trades its stride for dilation (output stride 16; at
output stride 8 the third stage is dilated as well and every rate doubles), Atrous Spatial Pyramid Pooling (a 1x1
branch, three 3x3 branches at rates 6/12/18 and image-level pooling, each with BatchNorm, concatenated and fused by a
1x1 convolution), a 1x1 classifier, and logits upsampled bilinearly to the input size.

Every convolution is a plain ``nn.Conv2d`` (its parameters, its state_dict keys) applied through the op table, so
the two backends differ only in which ``conv2d`` function runs.

Conventions: visionops/models/README.md.
"""

import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import visionops
from visionops.models import check_backend

__all__ = ["DeepLabV3", "mean_iou"]


# ---- the op table: the only lines the two backends do not share ---------------------------------------------------


class _Ops(NamedTuple):
    conv2d: Callable[..., Tensor]  # F.conv2d's signature: (input, weight, bias, stride, padding, dilation, groups)


_OPS: Dict[str, _Ops] = {
    "visionops": _Ops(conv2d=lambda *args: visionops.conv2d(*args)),
    "pytorch": _Ops(conv2d=F.conv2d),
}


def _conv(ops: _Ops, conv: nn.Conv2d, x: Tensor) -> Tensor:
    return ops.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


# ---- the network ----------------------------------------------------------------------------------------------------


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """ResNet's basic block (two 3x3 convolutions and a shortcut, a 1x1 projection when the shape changes); the
    first convolution carries the stride, or the dilation that replaces it."""

    def __init__(self, cin: int, cout: int, stride: int, dilation: int, ops: _Ops) -> None:
        super().__init__()
        self._ops = ops
        self.conv1, self.bn1 = _conv3x3(cin, cout, stride, dilation), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = _conv3x3(cout, cout, 1, dilation), nn.BatchNorm2d(cout)
        self.downsample: Optional[nn.Sequential] = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(_conv(self._ops, self.conv1, x)))
        out = self.bn2(_conv(self._ops, self.conv2, out))
        shortcut = x if self.downsample is None else self.downsample[1](_conv(self._ops, self.downsample[0], x))
        return F.relu(out + shortcut)


class ASPP(nn.Module):
    """Atrous Spatial Pyramid Pooling (DeepLab v3): a 1x1 branch, one 3x3 branch per rate, and image pooling (global
    average, 1x1 convolution, broadcast back), concatenated and projected by a 1x1 convolution."""

    def __init__(self, cin: int, cout: int, rates: Sequence[int], ops: _Ops) -> None:
        super().__init__()
        self._ops = ops
        self.rates = tuple(rates)
        self.convs = nn.ModuleList([nn.Conv2d(cin, cout, 1, bias=False)])
        self.convs.extend(nn.Conv2d(cin, cout, 3, padding=r, dilation=r, bias=False) for r in self.rates)
        self.pool_conv = nn.Conv2d(cin, cout, 1, bias=False)
        self.bns = nn.ModuleList(nn.BatchNorm2d(cout) for _ in range(len(self.rates) + 2))
        self.project = nn.Conv2d(cout * (len(self.rates) + 2), cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)

    def forward(self, x: Tensor) -> Tensor:
        branches = [F.relu(bn(_conv(self._ops, conv, x))) for conv, bn in zip(self.convs, self.bns)]
        pooled = F.relu(self.bns[-1](_conv(self._ops, self.pool_conv, x.mean((2, 3), keepdim=True))))
        branches.append(pooled.expand(-1, -1, x.shape[2], x.shape[3]))  # upsampling a 1x1 map: a broadcast
        return F.relu(self.project_bn(_conv(self._ops, self.project, torch.cat(branches, 1))))


class DeepLabV3(nn.Module):
    """DeepLab v3 on a small ResNet-style backbone.

    ``forward(images [B, 3, H, W]) -> logits [B, num_classes, H, W]``. The backbone: a stem (3x3 stride-2 and 3x3
    convolutions, 3x3 stride-2 max pooling: stride 4) and four stages of ``blocks`` basic blocks with ``width``,
    2x, 4x and 4x channels and strides 1, 2, 2, 2. ``output_stride=16`` replaces the last stage's stride by dilation
    2; ``output_stride=8`` the last two stages' by dilations 2 and 4, and doubles the ASPP rates (6/12/18 become
    12/24/36). Weights: Kaiming-normal (fan-out) convolutions, unit BatchNorm, drawn from ``generator`` when given.
    """

    def __init__(
        self,
        num_classes: int,
        backend: str = "visionops",
        *,
        width: int = 32,
        blocks: int = 1,
        output_stride: int = 16,
        atrous_rates: Sequence[int] = (6, 12, 18),
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if num_classes < 1 or width < 1 or blocks < 1:
            raise ValueError(f"num_classes, width and blocks must be >= 1, got {num_classes}, {width}, {blocks}")
        self.backend = check_backend(backend)
        self.output_stride = output_stride
        ops = self._ops = _OPS[self.backend]
        scale = 16 // output_stride
        self.stem = nn.ModuleList([_conv3x3(3, width, 2), _conv3x3(width, width)])
        self.stem_bns = nn.ModuleList([nn.BatchNorm2d(width), nn.BatchNorm2d(width)])
        chans = (width, 2 * width, 4 * width, 4 * width)
        # (stride, dilation) per stage: stages 3 and 4 keep their resolution by dilating instead of striding
        plan = [(1, 1), (2, 1), (2, 1), (1, 2)] if output_stride == 16 else [(1, 1), (2, 1), (1, 2), (1, 4)]
        stages, cin = [], width
        for cout, (stride, dilation) in zip(chans, plan):
            layers = [BasicBlock(cin, cout, stride, dilation, ops)]
            layers += [BasicBlock(cout, cout, 1, dilation, ops) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.aspp = ASPP(cin, 2 * width, [r * scale for r in atrous_rates], ops)
        self.classifier = nn.Conv2d(2 * width, num_classes, 1)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1] // m.groups
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()

    def features(self, images: Tensor) -> Tensor:
        """Backbone features [B, 4 * width, H / os, W / os] (os: the output stride, sizes rounded up)."""
        x = images
        for conv, bn in zip(self.stem, self.stem_bns):
            x = F.relu(bn(_conv(self._ops, conv, x)))
        x = F.max_pool2d(x, 3, 2, 1)
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, images: Tensor) -> Tensor:
        logits = _conv(self._ops, self.classifier, self.aspp(self.features(images)))
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Per-pixel cross-entropy of logits [B, C, H, W] against labels int64 [B, H, W]."""
        return F.cross_entropy(logits, labels)


def mean_iou(pred: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Mean intersection-over-union of predicted and true label maps (int64, any equal shapes) over the classes
    present in either (PASCAL VOC's metric, accumulated over the whole set rather than per image)."""
    idx = labels.flatten() * num_classes + pred.flatten()
    confusion = torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    inter = confusion.diagonal().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - inter
    return (inter[union > 0] / union[union > 0]).mean()
