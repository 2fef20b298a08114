"""Every Triton kernel compiles for sm_90 (the interpreter accepts kernels real compilation rejects).

Runs visionops.triton.compile_check in a subprocess: the test process itself runs Triton interpreted.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_all_triton_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "visionops.triton.compile_check", "--arch", "90"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "FAIL" not in proc.stdout
    assert "compiled" in proc.stdout and " 0/" not in proc.stdout
