"""Video networks (C3D, two-stream) on visionops' 3D convolution, with a ``backend="pytorch"`` twin.

* :class:`C3D`: Tran et al., "Learning Spatiotemporal Features with 3D Convolutional Networks" (ICCV 2015): eight
  3x3x3 convolutions (64, 128, 256, 256, 512, 512, 512, 512 channels, times ``width``), five max poolings (the first
  1x2x2, keeping early temporal detail, the others 2x2x2), two 4096-wide fully connected layers and the classifier,
  for clips [B, 3, 16, 112, 112]. Pooling adapts to smaller clips, so a narrow C3D runs on toy data.
* :class:`TwoStream`: Simonyan & Zisserman, "Two-Stream Convolutional Networks for Action Recognition in Videos"
  (NIPS 2014): a spatial stream on one RGB frame and a temporal stream on ``L`` stacked optical-flow fields
  (2L channels: u, v of each), each a CNN-M-style 2D network; late fusion averages the two streams' class scores.
* :class:`FrameAveraging`: the single-frame baseline: one 2D network applied to every frame, class scores averaged
  over the frames (it sees appearance but not the order of frames, hence not motion).

Every convolution is a plain ``nn.Conv2d`` / ``nn.Conv3d`` (its parameters, its state_dict keys) applied through the
op table, so the two backends differ only in which ``conv2d`` / ``conv3d`` function runs.

Conventions: visionops/models/README.md.
"""

import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import visionops
from visionops.models import check_backend

__all__ = ["C3D", "CNNM", "TwoStream", "FrameAveraging", "stack_flow"]


# ---- the op table: the only lines the two backends do not share ---------------------------------------------------


class _Ops(NamedTuple):
    conv2d: Callable[..., Tensor]  # F.conv2d's signature: (input, weight, bias, stride, padding, dilation, groups)
    conv3d: Callable[..., Tensor]  # F.conv3d's


_OPS: Dict[str, _Ops] = {
    "visionops": _Ops(conv2d=lambda *args: visionops.conv2d(*args), conv3d=lambda *args: visionops.conv3d(*args)),
    "pytorch": _Ops(conv2d=F.conv2d, conv3d=F.conv3d),
}


def _conv(fn: Callable[..., Tensor], conv: nn.Module, x: Tensor) -> Tensor:
    return fn(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


@torch.no_grad()
def _init(module: nn.Module, generator: Optional[torch.Generator]) -> None:
    """Kaiming-normal (fan-out) convolutions, N(0, 0.01) linear layers, zero biases, drawn from ``generator``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            fan_out = m.out_channels * math.prod(m.kernel_size) // m.groups
            m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
        elif isinstance(m, nn.Linear):
            m.weight.normal_(0.0, 0.01, generator=generator)
        else:
            continue
        if m.bias is not None:
            m.bias.zero_()


def _max_pool(x: Tensor, kernel: Sequence[int], padding: Sequence[int] = (0, 0, 0)) -> Tensor:
    """Max pooling with stride = kernel, each dim's kernel shrunk to what the (padded) input holds: the paper's
    pooling at its input size, and no error on smaller clips."""
    spatial = x.shape[2:]
    k = [min(kk, s + 2 * p) for kk, s, p in zip(kernel, spatial, padding)]
    p = [min(pp, kk // 2) for pp, kk in zip(padding, k)]
    return F.max_pool3d(x, k, k, p)


# ---- C3D -------------------------------------------------------------------------------------------------------------


class C3D(nn.Module):
    """C3D (Tran et al. 2015). ``forward(clips [B, 3, T, H, W]) -> class scores [B, num_classes]``.

    Layer names are those of the common PyTorch port (conv1 .. conv5b, fc6, fc7, fc8). Channels are the paper's
    times ``width`` (at least 1); the fully connected layers are ``4096 * width`` wide. pool5 pads H and W by 1 as
    the released model does, and an adaptive average pooling to 1x4x4 (the identity on 16x112x112 clips) feeds fc6,
    so any clip size works. Dropout 0.5 after fc6 and fc7 (``dropout``) in training mode.
    """

    def __init__(
        self,
        num_classes: int = 487,
        backend: str = "visionops",
        *,
        width: float = 1.0,
        dropout: float = 0.5,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self._ops = _OPS[self.backend]
        c = [max(1, round(n * width)) for n in (64, 128, 256, 512)]
        fc = max(1, round(4096 * width))

        def conv(cin: int, cout: int) -> nn.Conv3d:
            return nn.Conv3d(cin, cout, 3, padding=1)

        self.conv1, self.conv2 = conv(3, c[0]), conv(c[0], c[1])
        self.conv3a, self.conv3b = conv(c[1], c[2]), conv(c[2], c[2])
        self.conv4a, self.conv4b = conv(c[2], c[3]), conv(c[3], c[3])
        self.conv5a, self.conv5b = conv(c[3], c[3]), conv(c[3], c[3])
        self.fc6, self.fc7, self.fc8 = nn.Linear(c[3] * 16, fc), nn.Linear(fc, fc), nn.Linear(fc, num_classes)
        self.dropout = dropout
        _init(self, generator)

    def features(self, clips: Tensor) -> Tensor:
        """pool5's output [B, 512 * width, T / 16, H / 32, W / 32] (rounded as the pooling rounds)."""
        c3 = self._ops.conv3d
        x = _max_pool(F.relu(_conv(c3, self.conv1, clips)), (1, 2, 2))
        x = _max_pool(F.relu(_conv(c3, self.conv2, x)), (2, 2, 2))
        for a, b, pad in ((self.conv3a, self.conv3b, 0), (self.conv4a, self.conv4b, 0), (self.conv5a, self.conv5b, 1)):
            x = F.relu(_conv(c3, b, F.relu(_conv(c3, a, x))))
            x = _max_pool(x, (2, 2, 2), (0, pad, pad))
        return x

    def forward(self, clips: Tensor) -> Tensor:
        x = F.adaptive_avg_pool3d(self.features(clips), (1, 4, 4)).flatten(1)
        x = F.dropout(F.relu(self.fc6(x)), self.dropout, self.training)
        x = F.dropout(F.relu(self.fc7(x)), self.dropout, self.training)
        return self.fc8(x)


# ---- two-stream and frame averaging: CNN-M-style 2D networks ------------------------------------------------------


class CNNM(nn.Module):
    """The CNN-M-2048-style network both streams use (Simonyan & Zisserman 2014, Table 1; Chatfield et al. 2014):
    conv1 7x7/2 (96), max pool; conv2 5x5/2 (256), max pool; conv3, conv4, conv5 3x3 (512 each), max pool; fc6
    (4096), fc7 (2048), the classifier; channels times ``width``. Local response normalisation is left out (the
    paper drops it from the temporal stream) and an adaptive average pooling to ``pool`` x ``pool`` before fc6 lets
    it take any image size. ``forward(images [B, in_channels, H, W]) -> class scores [B, num_classes]``."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        ops: _Ops,
        *,
        width: float = 1.0,
        pool: int = 2,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        self._ops = ops
        c1, c2, c3 = (max(1, round(n * width)) for n in (96, 256, 512))
        self.conv1 = nn.Conv2d(in_channels, c1, 7, 2, 3)
        self.conv2 = nn.Conv2d(c1, c2, 5, 2, 2)
        self.conv3 = nn.Conv2d(c2, c3, 3, 1, 1)
        self.conv4, self.conv5 = nn.Conv2d(c3, c3, 3, 1, 1), nn.Conv2d(c3, c3, 3, 1, 1)
        self.fc6 = nn.Linear(c3 * pool * pool, max(1, round(4096 * width)))
        self.fc7 = nn.Linear(self.fc6.out_features, max(1, round(2048 * width)))
        self.fc8 = nn.Linear(self.fc7.out_features, num_classes)
        self.pool, self.dropout = pool, dropout

    def forward(self, x: Tensor) -> Tensor:
        c2 = self._ops.conv2d
        x = F.max_pool2d(F.relu(_conv(c2, self.conv1, x)), 2, 2)
        x = F.max_pool2d(F.relu(_conv(c2, self.conv2, x)), 2, 2, ceil_mode=True)
        for conv in (self.conv3, self.conv4, self.conv5):
            x = F.relu(_conv(c2, conv, x))
        x = F.adaptive_avg_pool2d(x, self.pool).flatten(1)
        x = F.dropout(F.relu(self.fc6(x)), self.dropout, self.training)
        x = F.dropout(F.relu(self.fc7(x)), self.dropout, self.training)
        return self.fc8(x)


def stack_flow(flow: Tensor, start: int, length: int) -> Tensor:
    """The temporal stream's input: ``length`` consecutive flow fields from frame ``start`` of ``flow``
    [B, T - 1, 2, H, W], stacked as channels [B, 2 * length, H, W] (u_start, v_start, u_start+1, ...)."""
    if not 0 <= start <= flow.shape[1] - length or length < 1:
        raise ValueError(
            f"need 0 <= start <= T - 1 - length and length >= 1, got {start}, {length}, T - 1 = {flow.shape[1]}"
        )
    return flow[:, start : start + length].flatten(1, 2)


class TwoStream(nn.Module):
    """The two-stream network. ``forward(frame [B, 3, H, W], flow_stack [B, 2L, H, W]) -> class scores`` (the
    averaged softmax of the two streams, late fusion by averaging); :meth:`stream_logits` gives each stream's logits
    for training them (the streams train separately in the paper; summing their losses does the same here, they
    share nothing)."""

    def __init__(
        self,
        num_classes: int,
        backend: str = "visionops",
        *,
        flow_length: int = 10,
        width: float = 1.0,
        dropout: float = 0.5,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        ops = _OPS[self.backend]
        self.flow_length = flow_length
        self.spatial = CNNM(3, num_classes, ops, width=width, dropout=dropout)
        self.temporal = CNNM(2 * flow_length, num_classes, ops, width=width, dropout=dropout)
        _init(self, generator)

    def stream_logits(self, frame: Tensor, flow_stack: Tensor) -> Tuple[Tensor, Tensor]:
        if flow_stack.shape[1] != 2 * self.flow_length:
            raise ValueError(
                f"flow_stack must have 2 * flow_length = {2 * self.flow_length} channels, got {flow_stack.shape[1]}"
            )
        return self.spatial(frame), self.temporal(flow_stack)

    def forward(self, frame: Tensor, flow_stack: Tensor) -> Tensor:
        spatial, temporal = self.stream_logits(frame, flow_stack)
        return (spatial.softmax(1) + temporal.softmax(1)) / 2

    def loss(self, frame: Tensor, flow_stack: Tensor, labels: Tensor) -> Tensor:
        spatial, temporal = self.stream_logits(frame, flow_stack)
        return F.cross_entropy(spatial, labels) + F.cross_entropy(temporal, labels)


class FrameAveraging(nn.Module):
    """A 2D network (CNN-M-style, as the spatial stream) applied to each frame of clips [B, 3, T, H, W]; ``forward``
    returns the class scores (softmax) averaged over the T frames, :meth:`frame_logits` the per-frame logits
    [B, T, num_classes] (trained with every frame labelled with its clip's class)."""

    def __init__(
        self,
        num_classes: int,
        backend: str = "visionops",
        *,
        width: float = 1.0,
        dropout: float = 0.5,
        generator: Optional[torch.Generator] = None,
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.net = CNNM(3, num_classes, _OPS[self.backend], width=width, dropout=dropout)
        _init(self, generator)

    def frame_logits(self, clips: Tensor) -> Tensor:
        b, c, t, h, w = clips.shape
        return self.net(clips.transpose(1, 2).reshape(b * t, c, h, w)).reshape(b, t, -1)

    def forward(self, clips: Tensor) -> Tensor:
        return self.frame_logits(clips).softmax(2).mean(1)

    def loss(self, clips: Tensor, labels: Tensor) -> Tensor:
        logits = self.frame_logits(clips)
        return F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(logits.shape[1]))
