"""Ahead-of-time compile of the anchors / box-coder Triton kernels for sm_90 (no GPU needed): catches kernels that
only work in the interpreter. Runs in a subprocess because the test session sets TRITON_INTERPRET=1, under which
@triton.jit returns interpreter objects that cannot be compiled."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_SCRIPT = """
import importlib, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
specs = importlib.import_module(sys.argv[1]).compile_specs()
assert specs
for fn, signature, constexprs in specs:
    kernel = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", 90, 32))
    assert ".target sm_90" in kernel.asm["ptx"], fn
    assert len(kernel.asm["cubin"]) > 0, fn
print("compiled", len(specs))
"""


@pytest.mark.parametrize("module", ["visionops.triton.anchors", "visionops.triton.box_coder"])
def test_compile_specs_sm90(module):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _SCRIPT, module], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.startswith("compiled")
