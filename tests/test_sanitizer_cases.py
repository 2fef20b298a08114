"""benchmarks/sanitizer_cases.py, which compute-sanitizer runs on CUDA in gpu_check.sh, calls the kernels of every
registry op: forward and backward, C++ and Triton. Checked on CPU tensors, recording the ops that reach the
dispatcher."""

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from visionops import _registry as registry
from visionops.testing import HAS_TRITON, TRITON_INTERPRET

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sanitizer_cases.py"


class _Names(TorchDispatchMode):
    """Records the visionops ops called. A Triton op runs its C++ twin instead (same schema, by the registry's
    naming), because interpreted Triton takes minutes over these cases: only the calls are checked here."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "visionops":
            name = str(func._schema.name)
            self.names.add(name)
            if name.startswith("visionops::triton_"):
                op = name.split("::triton_")[1]
                backward = op.endswith("_backward")
                func = getattr(torch.ops.visionops, f"_{op}" if backward else op).default
        return func(*args, **(kwargs or {}))


def expected_kernels(backends):
    out = set()
    for name, decl in registry.OPS.items():
        for backend in backends:
            if backend == "triton" and decl.triton is None:
                continue
            out.add(registry.qualname(name, backend))
            if decl.backward is not None:
                out.add(registry.qualname(name, backend, backward=True))
    return out


@pytest.mark.skipif(not (HAS_TRITON and TRITON_INTERPRET), reason="backend='triton' takes CPU tensors interpreted")
def test_every_kernel_is_called():
    spec = importlib.util.spec_from_file_location("sanitizer_cases", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.DEVICE = "cpu"
    with _Names() as rec:
        for call in module.CALLS:
            call()
    missing = sorted(expected_kernels(("cpp", "triton")) - rec.names)
    assert not missing, f"benchmarks/sanitizer_cases.py does not call: {missing}"
