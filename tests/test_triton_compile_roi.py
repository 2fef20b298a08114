"""The RoI Triton kernels compile for sm_90 (the interpreter accepts kernels that real compilation rejects).

Compiles in a subprocess: the test process itself runs Triton interpreted (TRITON_INTERPRET=1)."""
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from visionops.triton.roi import compile_specs
    specs = compile_specs()
    for fn, signature, constexprs in specs:
        k = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        assert ".target sm_90" in k.asm["ptx"] and len(k.asm["cubin"]) > 0, fn.__name__
        print("ok", fn.__name__)
    print("compiled", len(specs))
""")


def test_roi_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                         env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compiled 4" in proc.stdout
