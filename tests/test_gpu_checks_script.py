"""benchmarks/cuda_reliability.py (the CUDA stream, leak, determinism, graph and second-device checks) covers every
registry op on both kernel backends, and its checks run through on CPU tensors in its dry mode."""

import importlib.util
from pathlib import Path

import pytest

from visionops import _registry as registry
from visionops.testing import HAS_TRITON, TRITON_INTERPRET

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_reliability.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("cuda_reliability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plan_covers_every_op_and_backend(script):
    pairs = script.plan(["cpp", "triton"])
    expected = [(op, "cpp") for op in registry.OPS]
    expected += [(op, "triton") for op, decl in registry.OPS.items() if decl.triton is not None and HAS_TRITON]
    assert sorted(pairs) == sorted(expected)


def test_dry_run_every_op(script, capsys):
    assert script.main(["--dry-run", "--calls", "3", "--backends", "cpp"]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines() if line.split()[:2][-1:] == ["cpp"]]
    assert sorted(row[0] for row in table) == sorted(registry.OPS)
    for row in table:
        assert row[2:5] == ["ok", "ok", "ok"], row  # stream, leak, determinism
        assert row[5:8] == ["captured,", "replay", "ok"], row
    assert "0 failed checks" in out


@pytest.mark.skipif(not (HAS_TRITON and TRITON_INTERPRET), reason="backend='triton' takes CPU tensors interpreted")
def test_dry_run_triton(script, capsys):
    assert script.main(["--dry-run", "--calls", "1", "--backends", "triton", "--ops", "box_iou"]) == 0
    assert "1 (op, backend) pairs on cpu, 0 failed checks" in capsys.readouterr().out


def test_a_failure_exits_non_zero(script, monkeypatch, capsys):
    """A check that finds a difference makes the script fail."""
    monkeypatch.setattr(script, "check_determinism", lambda case, backend: "FAIL: planted")
    assert script.main(["--dry-run", "--calls", "1", "--backends", "cpp", "--ops", "nms"]) == 1
    assert "FAIL: planted" in capsys.readouterr().out
