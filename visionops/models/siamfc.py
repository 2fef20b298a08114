"""SiamFC tracking on visionops' cross-correlation, with a ``backend="pytorch"`` twin.

Bertinetto et al., "Fully-Convolutional Siamese Networks for Object Tracking" (ECCVW 2016), as siamfc-pytorch
(github.com/huanglianghua/siamfc-pytorch) builds and runs it: the AlexNet-style backbone ``AlexNetV1``, the xcorr head
with ``out_scale`` 0.001 (plus the paper's learnable scalar bias), the balanced logistic loss, and ``TrackerSiamFC``'s
tracking loop with its default hyper-parameters. cv2 is replaced by ``F.interpolate`` (bilinear crops, bicubic response
upsampling: the same kernels, half-pixel centres).

Images are float or uint8 tensors [3, H, W], RGB with values in 0..255 (what siamfc-pytorch feeds its network).
Boxes are (x1, y1, x2, y2) in continuous pixel coordinates, as torchvision's (pixel i covers [i, i + 1)).

Conventions: visionops/models/README.md.
"""

import math
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import visionops
from visionops.models import check_backend

__all__ = ["SiamFC", "SiamFCTracker", "logistic_labels", "balanced_bce_loss", "crop_and_resize"]


# ---- the op table: the only lines the two backends do not share ---------------------------------------------------


class _Ops(NamedTuple):
    xcorr: Callable[[Tensor, Tensor, float], Tensor]  # (z [Bz, C, h, w], x [B, C, H, W], scale) -> [B, 1, H', W']


def _xcorr_pytorch(z: Tensor, x: Tensor, out_scale: float) -> Tensor:
    """siamfc-pytorch's ``_fast_xcorr``: the batch folded into the channels, one grouped convolution."""
    nz = z.shape[0]
    nx, c, h, w = x.shape
    out = F.conv2d(x.reshape(-1, nz * c, h, w), z, groups=nz)
    return out.reshape(nx, -1, out.shape[-2], out.shape[-1]) * out_scale


_OPS: Dict[str, _Ops] = {
    "visionops": _Ops(xcorr=lambda z, x, s: visionops.xcorr(z, x, s)),
    "pytorch": _Ops(xcorr=_xcorr_pytorch),
}


# ---- the network ----------------------------------------------------------------------------------------------------


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-6, momentum=0.05)


class AlexNetV1(nn.Module):
    """siamfc-pytorch's AlexNetV1 (same module names, so its checkpoints' backbone weights load): total stride 8;
    127x127 -> 6x6x256, 255x255 -> 22x22x256 (no padding)."""

    total_stride = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(3, 96, 11, 2), _bn(96), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2))
        self.conv2 = nn.Sequential(
            nn.Conv2d(96, 256, 5, 1, groups=2), _bn(256), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2)
        )
        self.conv3 = nn.Sequential(nn.Conv2d(256, 384, 3, 1), _bn(384), nn.ReLU(inplace=True))
        self.conv4 = nn.Sequential(nn.Conv2d(384, 384, 3, 1, groups=2), _bn(384), nn.ReLU(inplace=True))
        self.conv5 = nn.Sequential(nn.Conv2d(384, 256, 3, 1, groups=2))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv5(self.conv4(self.conv3(self.conv2(self.conv1(x)))))


class XCorrHead(nn.Module):
    """``out_scale * xcorr(z, x) + bias``: the SiamFC head (the bias is the paper's learnable adjust layer)."""

    def __init__(self, out_scale: float = 0.001, *, backend: str = "visionops") -> None:
        super().__init__()
        self.out_scale = float(out_scale)
        self.bias = nn.Parameter(torch.zeros(1))
        self._ops = _OPS[check_backend(backend)]

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self._ops.xcorr(z, x, self.out_scale) + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"out_scale={self.out_scale}"


class SiamFC(nn.Module):
    """The SiamFC network: a shared AlexNetV1 backbone and the xcorr head.

    ``forward(z_img, x_img)`` takes images: exemplars [Bz, 3, 127, 127] (Bz == B or 1) and search regions
    [B, 3, 255, 255] (0..255 RGB), and returns the response [B, 1, 17, 17]. The tracker embeds the exemplar once with
    :meth:`features` and calls :meth:`head` on features. Parameters are the same for both backends (a state_dict moves
    between them); weights are initialised as siamfc-pytorch does (Kaiming-normal fan-out convolutions, zero biases,
    unit BatchNorm), from ``generator`` when given.
    """

    total_stride = AlexNetV1.total_stride

    def __init__(
        self, backend: str = "visionops", *, out_scale: float = 0.001, generator: Optional[torch.Generator] = None
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self.backbone = AlexNetV1()
        self.head = XCorrHead(out_scale, backend=backend)
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                # kaiming_normal_(mode="fan_out", nonlinearity="relu") (its fan_out ignores groups), drawn from the
                # generator
                fan_out = m.out_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.normal_(0.0, math.sqrt(2.0 / fan_out), generator=generator)
                m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
                m.reset_running_stats()
        self.head.bias.zero_()

    def features(self, img: Tensor) -> Tensor:
        """Backbone features [B, 256, h, w] of images [B, 3, H, W] (stride 8, no padding): 127 -> 6, 255 -> 22."""
        return self.backbone(img)

    def forward(self, z_img: Tensor, x_img: Tensor) -> Tensor:
        return self.head(self.features(z_img), self.features(x_img))

    def loss(self, responses: Tensor) -> Tensor:
        """siamfc-pytorch's training loss on responses [B, 1, h, w] of exemplar/search pairs centred on the target."""
        labels = logistic_labels(responses.shape[-2:], self.total_stride).to(responses)
        return balanced_bce_loss(responses, labels.expand_as(responses))


def logistic_labels(size: Tuple[int, int], total_stride: int = 8, r_pos: float = 16.0, r_neg: float = 0.0) -> Tensor:
    """The label map [h, w] of a centred target (siamfc-pytorch ``_create_labels``): 1 within L1 ("block") distance
    ``r_pos / total_stride`` of the centre, 0.5 up to ``r_neg / total_stride`` (none by default), 0 beyond."""
    h, w = size
    y = torch.arange(h, dtype=torch.float64) - (h - 1) / 2
    x = torch.arange(w, dtype=torch.float64) - (w - 1) / 2
    dist = y.abs()[:, None] + x.abs()[None, :]
    labels = torch.where(dist < r_neg / total_stride, 0.5, 0.0)
    return torch.where(dist <= r_pos / total_stride, 1.0, labels).float()


def balanced_bce_loss(logits: Tensor, labels: Tensor, neg_weight: float = 1.0) -> Tensor:
    """siamfc-pytorch's ``BalancedLoss``: BCE with logits, positives and negatives each weighted to half the total."""
    pos, neg = labels == 1, labels == 0
    weight = torch.zeros_like(labels)
    weight = torch.where(pos, 1.0 / pos.sum().clamp(min=1), weight)
    weight = torch.where(neg, neg_weight / neg.sum().clamp(min=1), weight)
    weight = weight / weight.sum()
    return F.binary_cross_entropy_with_logits(logits, labels, weight, reduction="sum")


# ---- the tracker ----------------------------------------------------------------------------------------------------


def crop_and_resize(img: Tensor, center: Sequence[float], size: float, out_size: int, fill: Tensor) -> Tensor:
    """The square patch of side ``round(size)`` centred on ``center`` = (cy, cx) (pixel-index coordinates: pixel i's
    centre is i) of ``img`` [3, H, W], padded with ``fill`` [3] where it leaves the image, resized bilinearly to
    [3, out_size, out_size] (siamfc-pytorch ``ops.crop_and_resize`` with integer corners, cv2 replaced)."""
    size = round(size)
    _, h, w = img.shape
    y0, x0 = (round(c - (size - 1) / 2) for c in center)
    y1, x1 = y0 + size, x0 + size
    patch = img[:, max(y0, 0) : min(y1, h), max(x0, 0) : min(x1, w)]
    pad = (max(-x0, 0), max(x1 - w, 0), max(-y0, 0), max(y1 - h, 0))
    fill = fill.to(img.dtype)[:, None, None]
    if patch.shape[1] == 0 or patch.shape[2] == 0:  # entirely outside the image
        patch = fill.expand(3, size, size)
    elif any(pad):
        patch = F.pad(patch - fill, pad) + fill
    return F.interpolate(patch[None], size=(out_size, out_size), mode="bilinear", align_corners=False)[0]


class SiamFCTracker:
    """siamfc-pytorch's ``TrackerSiamFC`` loop around a :class:`SiamFC` (run in eval mode, without gradients).

    ``init(img, box)`` crops the exemplar (context 0.5 (w + h), side sqrt((w + c)(h + c)), mean-colour padding,
    resized to 127) and embeds it; ``update(img)`` searches a 3-scale pyramid of 255x255 regions (x_sz = z_sz * 255 /
    127, scale step 1.0375), upsamples the 17x17 responses x16 bicubically, penalises the non-centre scales (0.9745),
    mixes in a Hann window (0.176) and moves to the peak, updating the size with learning rate 0.59. Images: tensors
    [3, H, W] (uint8 or float, 0..255 RGB); boxes: (x1, y1, x2, y2).
    """

    def __init__(
        self,
        model: SiamFC,
        *,
        exemplar_sz: int = 127,
        instance_sz: int = 255,
        context: float = 0.5,
        scale_num: int = 3,
        scale_step: float = 1.0375,
        scale_lr: float = 0.59,
        scale_penalty: float = 0.9745,
        window_influence: float = 0.176,
        response_up: int = 16,
    ) -> None:
        self.model = model
        self.exemplar_sz, self.instance_sz, self.context = exemplar_sz, instance_sz, context
        self.scale_lr, self.scale_penalty, self.window_influence = scale_lr, scale_penalty, window_influence
        self.response_up, self.total_stride = response_up, model.total_stride
        self.response_sz = (instance_sz - exemplar_sz) // self.total_stride + 1  # 17
        self.upscale_sz = self.response_sz * response_up  # 272
        exponents = torch.linspace(-(scale_num // 2), scale_num // 2, scale_num).tolist()
        self.scale_factors = [scale_step**e for e in exponents]  # 1 / 1.0375, 1, 1.0375
        hann = torch.hann_window(self.upscale_sz, periodic=False, dtype=torch.float64)
        self.hann_window = (hann[:, None] * hann[None, :]) / (hann[:, None] * hann[None, :]).sum()

    def _param(self) -> Tensor:
        return next(self.model.parameters())

    def _image(self, img: Tensor) -> Tensor:
        if img.dim() != 3 or img.shape[0] != 3:
            raise ValueError(f"img must be a tensor [3, H, W], got shape {list(img.shape)}")
        p = self._param()
        return img.to(device=p.device, dtype=p.dtype)

    @torch.no_grad()
    def init(self, img: Tensor, box: Sequence[float]) -> None:
        """Start tracking the object in ``box`` = (x1, y1, x2, y2) of the first frame ``img``."""
        self.model.eval()
        img = self._image(img)
        x1, y1, x2, y2 = (float(v) for v in box)
        self.center = [(y1 + y2) / 2 - 0.5, (x1 + x2) / 2 - 0.5]  # (cy, cx), pixel-index coordinates
        self.target_sz = [y2 - y1, x2 - x1]  # (h, w)
        context = self.context * sum(self.target_sz)
        self.z_sz = math.sqrt((self.target_sz[0] + context) * (self.target_sz[1] + context))
        self.x_sz = self.z_sz * self.instance_sz / self.exemplar_sz
        self.avg_color = img.mean((1, 2))
        z = crop_and_resize(img, self.center, self.z_sz, self.exemplar_sz, self.avg_color)
        self.kernel = self.model.features(z[None].contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def update(self, img: Tensor) -> Tuple[float, float, float, float]:
        """The object's box (x1, y1, x2, y2) in the next frame ``img``."""
        self.model.eval()
        img = self._image(img)
        sizes = [self.x_sz * f for f in self.scale_factors]
        x = torch.stack([crop_and_resize(img, self.center, s, self.instance_sz, self.avg_color) for s in sizes])
        x = x.contiguous(memory_format=torch.channels_last)  # the CPU convolutions run faster channels_last
        responses = self.model.head(self.kernel, self.model.features(x))  # [S, 1, 17, 17]
        responses = F.interpolate(responses.double(), size=self.upscale_sz, mode="bicubic", align_corners=False)[:, 0]
        mid = len(self.scale_factors) // 2
        penalty = torch.full((len(self.scale_factors),), self.scale_penalty, dtype=responses.dtype)
        penalty[mid] = 1.0
        responses = responses * penalty.to(responses.device)[:, None, None]
        scale_id = int(responses.amax((1, 2)).argmax())

        response = responses[scale_id]
        response = response - response.min()
        response = response / (response.sum() + 1e-16)
        response = (1 - self.window_influence) * response + self.window_influence * self.hann_window.to(response)
        loc = divmod(int(response.argmax()), self.upscale_sz)

        # the peak's displacement: response -> instance (x stride / upsampling) -> image (x search-region scale)
        scale = self.scale_factors[scale_id]
        for i in range(2):
            disp = (loc[i] - (self.upscale_sz - 1) / 2) * self.total_stride / self.response_up
            self.center[i] += disp * self.x_sz * scale / self.instance_sz
        step = (1 - self.scale_lr) + self.scale_lr * scale
        self.target_sz = [s * step for s in self.target_sz]
        self.z_sz *= step
        self.x_sz *= step
        return self.box

    @property
    def box(self) -> Tuple[float, float, float, float]:
        (cy, cx), (h, w) = self.center, self.target_sz
        return (cx + 0.5 - w / 2, cy + 0.5 - h / 2, cx + 0.5 + w / 2, cy + 0.5 + h / 2)

    def track(self, frames: Sequence[Tensor], box: Sequence[float]) -> Tensor:
        """Boxes [T, 4] over ``frames`` (T images [3, H, W], or a tensor [T, 3, H, W]), the first one ``box``."""
        self.init(frames[0], box)
        boxes = [tuple(float(v) for v in box)] + [self.update(frames[t]) for t in range(1, len(frames))]
        return torch.tensor(boxes, dtype=torch.float64)
