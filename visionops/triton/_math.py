"""Arithmetic helpers shared by the Triton kernels."""

import triton
import triton.language as tl


@triton.jit
def div_rn(a, b):
    """a / b correctly rounded, as torch and the C++ kernels compute it. Triton lowers float32 `/` to an approximate
    division (div.full.f32, up to 2 ulp), which moves bin edges, ceil()-ed grid sizes and borderline IoUs."""
    if a.dtype == tl.float32:
        return tl.div_rn(a, tl.zeros_like(a) + b)  # b may be a Python number, an int or a broadcastable block
    else:
        return a / b
