"""Reliability checks of every registry op on CUDA, with the C++ and the Triton backend; prints a table and exits
non-zero if a check fails.

    python benchmarks/cuda_reliability.py                 # on a CUDA machine
    python benchmarks/cuda_reliability.py --dry-run       # the same logic on CPU tensors (stream and graph calls
                                                          # do nothing there: it checks the script, not a GPU)

Each op runs on the inputs of its conformance class (tests/test_*.py), forward and, where it has a gradient,
backward (outputs and input gradients compared):

stream   on a side stream whose inputs arrive late (the stream sleeps before copying them in), the results equal
         the default stream's: a kernel launched on another stream than the current one reads the inputs too early
leak     ``torch.cuda.memory_allocated()`` is back to its start value after ``--calls`` calls (RSS within a few MB in
         the dry run)
determ   under ``torch.use_deterministic_algorithms(True)`` two runs are bit-identical, or the op refuses (raises,
         and warns with ``warn_only=True``) as PyTorch's non-deterministic ops do
graph    an op that does not synchronise (``torch.cuda.set_sync_debug_mode("error")`` stays silent) is captured in a
         CUDA graph whose replay gives the eager results; an op that synchronises (data-dependent output sizes)
         is expected to refuse capture, and is listed as such
device1  with a second GPU, inputs on cuda:1 while cuda:0 is current give cuda:0's results, on cuda:1
"""

import argparse
import contextlib
import gc
import os
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)
if not torch.cuda.is_available():  # the dry run's Triton kernels run interpreted; set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")
# cuBLAS (the conv kernels' GEMMs) is deterministic under torch.use_deterministic_algorithms(True) only with a fixed
# workspace; PyTorch raises without it. Set before the first cuBLAS call.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import _reliability as rel  # noqa: E402

from visionops import _registry as registry  # noqa: E402

CHECKS = ("stream", "leak", "determ", "graph", "device1")
SLEEP_CYCLES = 20_000_000  # ~10 ms of GPU time on the side stream before its inputs are written
RSS_BOUND = 4 * 2**20  # dry run: bytes of RSS growth allowed over the calls


def plan(backends, ops=None) -> List[tuple]:
    """(op, backend) pairs to check: every registry op (or ``ops``) on each of ``backends`` it has."""
    out = []
    for op in ops or registry.OPS:
        for backend in backends:
            if backend == "triton" and (registry.OPS[op].triton is None or not registry.triton_available()):
                continue
            out.append((op, backend))
    return out


def _tolerance(case, backend) -> dict:
    return case.conf.tolerance(torch.float32, backend, grad=True)


class CpuStandIn:
    """The torch.cuda calls of the stream and graph checks as no-ops, so that the dry run walks through the checks'
    logic on CPU tensors (they then show what the logic found, not what a GPU does)."""

    class Stream:
        def wait_stream(self, other) -> None:
            pass

    class CUDAGraph:
        def replay(self) -> None:
            pass

    current_stream = Stream

    @staticmethod
    def stream(_):
        return contextlib.nullcontext()

    graph = stream

    @staticmethod
    def _sleep(_) -> None:
        pass

    @staticmethod
    def synchronize(*_) -> None:
        pass

    @staticmethod
    def set_sync_debug_mode(_) -> None:
        pass


def check_stream(case, backend, expected, cu=torch.cuda) -> str:
    """Results on a side stream whose inputs are written late equal the default stream's."""
    side = cu.Stream()
    side.wait_stream(cu.current_stream())
    with cu.stream(side):
        late = rel.moved(case, case_device(case), copy=True)  # the inputs' own buffers, allocated on the side stream
        tensors = [v for v in _flat(late.inputs) if isinstance(v, torch.Tensor)]
        originals = [v for v in _flat(case.inputs) if isinstance(v, torch.Tensor)]
        for t in tensors:
            t.zero_()
        cu._sleep(SLEEP_CYCLES)
        for t, o in zip(tensors, originals):
            t.copy_(o)
        got = late.run(backend)
    cu.current_stream().wait_stream(side)
    cu.synchronize()
    diff = rel.close(got, expected, _tolerance(case, backend))
    return "ok" if diff is None else f"FAIL: {diff}"


def case_device(case) -> torch.device:
    return next(v for v in _flat(case.inputs) if isinstance(v, torch.Tensor)).device


def _flat(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            yield from _flat(v)
        else:
            yield v


def check_leak(case, backend, calls: int, cuda: bool) -> str:
    """Memory back to its start value after ``calls`` calls (forward and backward)."""
    if cuda:
        torch.cuda.synchronize()
    gc.collect()
    gc.freeze()  # the collections below then scan only what the loop made (a full one takes 0.2 s here)
    try:
        start = torch.cuda.memory_allocated() if cuda else rel.rss_bytes()
        for _ in range(calls):
            case.run(backend)
        gc.collect()
    finally:
        gc.unfreeze()
    if cuda:
        torch.cuda.synchronize()
        grew = torch.cuda.memory_allocated() - start
        return "ok" if grew == 0 else f"FAIL: {grew} bytes still allocated after {calls} calls"
    grew = rel.rss_bytes() - start
    return "ok" if grew <= RSS_BOUND else f"FAIL: RSS grew {grew / 2**20:.1f} MB over {calls} calls"


def check_determinism(case, backend) -> str:
    problem = rel.check_deterministic(case, backend, threads=(None,))
    return "ok" if problem is None else f"FAIL: {problem}"


def synchronises(case, backend, cu=torch.cuda) -> bool:
    """Whether a call synchronises the host with the GPU (PyTorch's sync debug mode raises)."""
    cu.synchronize()
    cu.set_sync_debug_mode("error")
    try:
        case.run(backend)
        return False
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        return True
    finally:
        cu.set_sync_debug_mode(0)


def check_graph(case, backend, expected, cu=torch.cuda) -> str:
    """Capture in a CUDA graph and replay (sync-free ops), or the refusal of an op that synchronises."""
    syncs = synchronises(case, backend, cu)
    side = cu.Stream()  # warm-up on a side stream, as torch.cuda.graph's documentation asks
    side.wait_stream(cu.current_stream())
    with cu.stream(side):
        for _ in range(2):
            case.run(backend)
    cu.current_stream().wait_stream(side)
    graph = cu.CUDAGraph()
    try:
        with cu.graph(graph):
            static = case.run(backend)
    except Exception as e:  # capture refused: expected where the op synchronises
        cu.synchronize()
        reason = str(e).strip().splitlines()[0][:80] if str(e).strip() else type(e).__name__
        return "refuses (syncs)" if syncs else f"FAIL: sync-free but capture failed: {reason}"
    graph.replay()
    cu.synchronize()
    diff = rel.close(static, expected, _tolerance(case, backend))
    if diff is not None:
        return f"FAIL: replay differs: {diff}"
    return "captured, replay ok" + (" (syncs outside capture)" if syncs else "")


def check_device1(case, backend, expected) -> str:
    """Inputs on cuda:1 while cuda:0 is current: same results, on cuda:1."""
    other = rel.moved(case, "cuda:1")
    with torch.cuda.device(0):
        got = other.run(backend)
    torch.cuda.synchronize(1)
    wrong = [t.device for t in got if t.device != torch.device("cuda:1")]
    if wrong:
        return f"FAIL: results on {wrong[0]}"
    diff = rel.close(got, expected, _tolerance(case, backend))
    return "ok" if diff is None else f"FAIL: {diff}"


def _guarded(fn: Callable[[], str]) -> str:
    try:
        return fn()
    except Exception as e:
        return f"FAIL: {type(e).__name__}: {str(e).strip().splitlines()[0][:100] if str(e).strip() else ''}"


def run_checks(op: str, backend: str, device: str, calls: int, size: str) -> Dict[str, str]:
    cuda = device == "cuda"
    (case,) = rel.cases(device, torch.float32, size, per_op=1, ops=[op])
    row = {}
    try:
        expected = case.run(backend)  # the default stream's results (and the warm-up)
    except Exception as e:
        return {c: f"FAIL: {type(e).__name__}: {str(e)[:100]}" for c in CHECKS}
    cu = torch.cuda if cuda else CpuStandIn
    row["stream"] = _guarded(lambda: check_stream(case, backend, expected, cu))
    row["leak"] = _guarded(lambda: check_leak(case, backend, calls, cuda))
    row["determ"] = _guarded(lambda: check_determinism(case, backend))
    row["graph"] = _guarded(lambda: check_graph(case, backend, expected, cu))
    two = cuda and torch.cuda.device_count() > 1
    row["device1"] = _guarded(lambda: check_device1(case, backend, expected)) if two else "- (one device)"
    return row


def print_table(rows: List[tuple]) -> None:
    head = ("op", "backend") + CHECKS
    cells = [head] + [(op, b) + tuple(r[c] for c in CHECKS) for op, b, r in rows]
    widths = [max(len(str(c[i])) for c in cells) for i in range(len(head))]
    for i, c in enumerate(cells):
        print("  ".join(str(x).ljust(w) for x, w in zip(c, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU tensors; stream and graph calls are no-ops")
    parser.add_argument("--calls", type=int, default=None, help="calls per op in the leak loop (100; dry run 20)")
    parser.add_argument("--backends", nargs="+", default=["cpp", "triton"], choices=["cpp", "triton"])
    parser.add_argument("--ops", nargs="+", default=None, choices=list(registry.OPS), metavar="OP")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --dry-run")
    cuda_run = not args.dry_run
    device = "cuda" if cuda_run else "cpu"
    calls = args.calls if args.calls is not None else (20 if args.dry_run else 100)
    size = "small" if args.dry_run else "full"  # small: interpreted Triton runs a Python program per block

    rows, t0 = [], time.perf_counter()
    for op, backend in plan(args.backends, args.ops):
        rows.append((op, backend, run_checks(op, backend, device, calls, size)))
        print(f"  {op} ({backend}) checked, {time.perf_counter() - t0:.1f} s", flush=True)
    print()
    print_table(rows)
    failed = [(op, b, c) for op, b, r in rows for c in CHECKS if r[c].startswith("FAIL")]
    refusing = sorted({op for op, b, r in rows if r["graph"].startswith("refuses")})
    if refusing:
        print(f"\nsynchronising ops (CUDA graph capture refused, as expected): {', '.join(refusing)}")
    if not cuda_run:
        print("\ndry run: CPU tensors; the stream and graph columns ran with no-op stand-ins for torch.cuda")
    print(f"\n{len(rows)} (op, backend) pairs on {device}, {len(failed)} failed checks")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
