"""Ahead-of-time compile of the anchors / box-coder Triton kernels for sm_90 (no GPU needed): catches kernels that
only work in the interpreter."""
import importlib

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402


@pytest.mark.parametrize("module", ["visionops.triton.anchors", "visionops.triton.box_coder"])
def test_compile_specs_sm90(module):
    specs = importlib.import_module(module).compile_specs()
    assert specs
    for fn, signature, constexprs in specs:
        kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in kernel.asm["ptx"]
        assert kernel.asm["cubin"]
