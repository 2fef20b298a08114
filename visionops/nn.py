"""Modules: ``visionops.nn.Conv2d`` and ``Conv3d``, drop-in subclasses of torch.nn's that run visionops' kernels.

They keep torch.nn's parameters, buffers, state_dict keys and arguments (a torch.nn state_dict loads unchanged, and
``isinstance(m, torch.nn.Conv2d)`` holds), adding only the keyword ``backend`` ("auto", "cpp", "triton",
"reference").
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from visionops.ops.conv import conv2d, conv3d

__all__ = ["Conv2d", "Conv3d"]


class _ConvMixin:
    _fn = None

    def _set_backend(self, backend: str) -> None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.backend = backend

    def _conv_forward(self, input: Tensor, weight: Tensor, bias) -> Tensor:
        fn = type(self)._fn
        if self.padding_mode != "zeros":
            # as torch: the non-zero padding first (reflect, replicate, circular), then a convolution without padding
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return fn(input, weight, bias, self.stride, 0, self.dilation, self.groups, backend=self.backend)
        return fn(input, weight, bias, self.stride, self.padding, self.dilation, self.groups, backend=self.backend)

    def extra_repr(self) -> str:
        s = super().extra_repr()
        return s if self.backend == "auto" else f"{s}, backend={self.backend!r}"


class Conv2d(_ConvMixin, torch.nn.Conv2d):
    """:class:`torch.nn.Conv2d` computed by :func:`visionops.conv2d`; same arguments plus the keyword ``backend``.

    Input Tensor[B, Cin, H, W] (or [Cin, H, W], as torch), output Tensor[B, Cout, Ho, Wo]; see
    :func:`visionops.conv2d` for the sizes, dtypes and memory formats.
    """

    _fn = staticmethod(conv2d)

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._set_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 3:  # unbatched, as torch.nn.Conv2d accepts
            return self._conv_forward(input.unsqueeze(0), self.weight, self.bias).squeeze(0)
        return self._conv_forward(input, self.weight, self.bias)


class Conv3d(_ConvMixin, torch.nn.Conv3d):
    """:class:`torch.nn.Conv3d` computed by :func:`visionops.conv3d`; same arguments plus the keyword ``backend``.

    Input Tensor[B, Cin, D, H, W] (or [Cin, D, H, W]), output Tensor[B, Cout, Do, Ho, Wo].
    """

    _fn = staticmethod(conv3d)

    def __init__(self, *args, backend: str = "auto", **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._set_backend(backend)

    def forward(self, input: Tensor) -> Tensor:
        if input.dim() == 4:
            return self._conv_forward(input.unsqueeze(0), self.weight, self.bias).squeeze(0)
        return self._conv_forward(input, self.weight, self.bias)
