"""Package-level behaviour: build info, backend selection, a clear error when _C is missing."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import visionops


def test_build_info():
    info = visionops.build_info()
    assert info["version"] == visionops.__version__
    assert info["built_with_torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert {"cpp", "reference"} <= set(info["backends"])
    assert isinstance(info["cuda_kernels"], bool)
    if info["cuda_kernels"]:
        assert info["cuda_arches"], "a CUDA build records its arches"


def test_ops_are_in_the_dispatcher():
    for name in ["nms", "batched_nms", "box_iou", "_box_iou_backward"]:
        op = getattr(torch.ops.visionops, name)
        assert op.default._schema.name == f"visionops::{name}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key("visionops::nms", "CPU")


def test_unknown_backend_names_the_argument():
    b = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="backend"):
        visionops.nms(b, torch.zeros(1), 0.5, backend="fast")


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        visionops.nms(torch.zeros(1, 4), torch.zeros(1), 0.5, backend="triton")


def test_missing_extension_says_what_to_do(tmp_path):
    """A source tree without the compiled _C: the import error explains how to build it."""
    pkg = os.path.dirname(visionops.__file__)
    shutil.copytree(pkg, tmp_path / "visionops", ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    # An editable install's import hook would find the real _C: drop it, so only the copied tree is importable.
    code = "import sys; sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f)]; import visionops"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode != 0
    assert "could not load its compiled extension" in proc.stderr
    assert "--no-build-isolation" in proc.stderr
