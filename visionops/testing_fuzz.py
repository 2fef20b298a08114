"""The fuzz harness: draws cases from every op's :class:`~visionops._fuzz.FuzzSpec` and runs each in a long-lived
worker subprocess, so that a crash (segfault, abort) or a hang fails that case instead of the test process.

A case is (op, backend, call, raw): the public wrapper is called with ``backend=`` ("cpp", "triton" under the
interpreter, "reference"); an invalid call must raise one of its expected exception classes naming the offending
argument; a valid call must match the op's reference within the spec's tolerance. With ``raw`` set (cpp only), the
schema arguments the wrapper would pass are broken once and ``torch.ops.visionops.<op>`` is called directly: it
must raise or return, never crash.

Long campaign: prints per op the cases run, valid and invalid calls that behaved, and the failures: crashes
(worker died or hung), mismatches (valid call vs reference) and errors (invalid call not refused as expected);
exit status 1 on any failure::

    OMP_NUM_THREADS=1 python -m visionops.testing_fuzz --cases 10000 --seed 1
"""

import argparse
import collections
import math
import os
import pickle
import random
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Optional

BACKENDS = ("cpp", "cpp", "cpp", "reference", "triton")  # drawn uniformly: cpp is what users run
# long campaigns: the Triton interpreter takes ~2 s a case (the C++ kernels ~20 ms), so fewer Triton cases
CAMPAIGN_BACKENDS = ("cpp",) * 12 + ("reference",) * 4 + ("triton",)
RAW = ("empty", "unsqueeze", "int", "half", "neg", "zero", "huge", "nan", "drop", "extend")
TIMEOUT_S = 120.0  # per case (the Triton interpreter takes seconds on the tiny shapes it gets)


@dataclass
class Case:
    op: str
    backend: str
    call: Any  # visionops._fuzz.Call
    raw: Optional[tuple] = None  # (kind, position) of the schema argument to break

    def __str__(self):
        c = self.call
        head = f"{self.op} backend={self.backend}" + (f" raw={self.raw}" if self.raw else "")
        if not hasattr(c, "args"):
            return f"{head}: {c!r}"
        want = f"must raise {[e.__name__ for e in c.exc]} naming {c.bad!r}" if c.bad else "valid"
        return f"{head} ({want})\n  args={_show(c.args)}\n  kwargs={_show(c.kwargs)}"


def _show(v) -> str:
    import torch

    if isinstance(v, torch.Tensor):
        body = v.tolist() if v.numel() <= 24 else "..."
        return f"tensor({body}, shape={list(v.shape)}, stride={v.stride()}, dtype={v.dtype})"
    if isinstance(v, (list, tuple)):
        inner = ", ".join(_show(x) for x in v)
        return f"[{inner}]" if isinstance(v, list) else f"({inner})"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_show(x)}" for k, x in v.items()) + "}"
    return repr(v)


def draw_case(d, op: str, backends=BACKENDS) -> Case:
    """One case of ``op`` drawn through ``d`` (a visionops._fuzz.Draw), its backend drawn from ``backends``."""
    from visionops._registry import OPS

    backend = d.choice(backends)
    d.small = backend == "triton"
    call = OPS[op].fuzz.draw(d)
    raw = None
    if backend == "cpp" and call.bad is None and d.bool(0.25):
        raw = (d.choice(RAW), d.ints(0, 15))
    return Case(op, backend, call, raw)


# ---- the worker (child process) -------------------------------------------------------------------------------


def _send(f, obj) -> None:
    data = pickle.dumps(obj)
    f.write(struct.pack("<Q", len(data)) + data)
    f.flush()


def _recv(f):
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    (n,) = struct.unpack("<Q", head)
    return pickle.loads(f.read(n))


def _float64(v):
    import torch

    if isinstance(v, torch.Tensor):
        return v.double() if v.is_floating_point() else v
    if isinstance(v, (list, tuple)):
        return type(v)(_float64(x) for x in v)
    if isinstance(v, dict):
        return {k: _float64(x) for k, x in v.items()}
    return v


def _tensors(v) -> list:
    import torch

    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for x in v for t in _tensors(x)]
    return []


def _close(got, exp, spec, backend: str = "cpp") -> Optional[str]:
    """None when ``got`` matches ``exp``, else what differs."""
    import torch

    g_all, e_all = _tensors(got), _tensors(exp)
    if len(g_all) != len(e_all):
        return f"{len(g_all)} outputs, the reference gives {len(e_all)}"
    for i, (g, e) in enumerate(zip(g_all, e_all)):
        if g.shape != e.shape:
            return f"output {i}: shape {list(g.shape)}, the reference gives {list(e.shape)}"
        if spec.exact and g.dtype != e.dtype:
            return f"output {i}: dtype {g.dtype}, the reference gives {e.dtype}"
        if not g.is_floating_point():
            if not torch.equal(g, e.to(g.dtype)):
                return f"output {i}: {g.tolist()} != reference {e.tolist()}"
            continue
        dtype = g.dtype
        rtol, atol = spec.tol[dtype]
        if backend == "triton":  # some Triton kernels evaluate float64 in float32 (e.g. RoIAlign)
            rtol, atol = max(rtol, spec.tol[torch.float32][0]), max(atol, spec.tol[torch.float32][1])
        e = e.double()
        g = g.double()
        finite = e[e.isfinite()]
        # atol scales with the typical magnitude (a few huge entries must not make every comparison vacuous)
        scale = max(1.0, float(finite.abs().quantile(0.9))) if finite.numel() else 1.0
        ok = torch.isclose(g, e, rtol=rtol, atol=atol * scale, equal_nan=True)
        # near the dtype's largest value (intermediates are larger) the compute dtype may overflow, float64 not
        ok |= (e.abs() > torch.finfo(dtype).max / 1e4) & (g.isinf() | ok) & (g.sign() == e.sign())
        if not bool(ok.all()):
            bad = (~ok).nonzero()[0].tolist()
            return (
                f"output {i}: {int((~ok).sum())} of {g.numel()} elements differ, first at {bad}: "
                f"{float(g[tuple(bad)])} vs reference {float(e[tuple(bad)])} (rtol {rtol}, atol {atol * scale:g})"
            )
    return None


def _capture_schema_args(spec, call):
    """(op name, schema arguments) the public wrapper passes to the kernel, captured at the registry's dispatch."""
    from visionops import _registry as registry

    seen = []

    class _Stop(Exception):
        pass

    real = registry.dispatch

    def capture(name, backend, device):
        def record(*args):
            seen.append((name, args))
            raise _Stop

        return record

    registry.dispatch = capture
    try:
        spec.public(*call.args, backend="cpp", **call.kwargs)
    except _Stop:
        pass
    finally:
        registry.dispatch = real
    return seen[0] if seen else (None, None)


def _break(v, kind: str):
    """Schema argument ``v`` broken by ``kind``, or None when ``kind`` does not apply to it."""
    import torch

    if isinstance(v, torch.Tensor):
        return {
            "empty": lambda: v[:0] if v.dim() else None,
            "unsqueeze": lambda: v.unsqueeze(0),
            "int": lambda: v.int(),
            "half": lambda: v.half(),
            "nan": lambda: v.double().fill_(math.nan).to(v.dtype) if v.is_floating_point() else None,
        }.get(kind, lambda: None)()
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return {"neg": -1, "zero": 0, "huge": 2**40}.get(kind)
    if isinstance(v, float):
        return {"neg": -1.0, "zero": 0.0, "huge": 1e300, "nan": math.nan}.get(kind)
    if isinstance(v, (list, tuple)) and v:
        if kind == "drop":
            return type(v)(v[:-1])
        if kind == "extend":
            return type(v)(list(v) + [v[-1]])
        if kind in ("neg", "zero", "huge", "nan"):
            out = list(v)
            first = _break(out[0], kind)
            if first is None:
                return None
            out[0] = first
            return type(v)(out)
    return None


def _run_raw(spec, case) -> dict:
    import torch

    name, args = _capture_schema_args(spec, case.call)
    if name is None:  # the wrapper returned before any kernel (e.g. empty input)
        return {"status": "valid"}
    kind, pos = case.raw
    options = [(i, b) for i, a in enumerate(args) if (b := _break(a, kind)) is not None]
    if not options:
        return {"status": "valid"}
    i, broken = options[pos % len(options)]
    args = list(args)
    args[i] = broken
    try:
        getattr(torch.ops.visionops, name).default(*args)
    except Exception as e:  # raw ops may refuse with any exception: only a crash or a hang fails
        return {"status": "invalid", "detail": f"{type(e).__name__}: {str(e)[:200]}"}
    return {"status": "valid"}


def run_case(case: Case) -> dict:
    """Run one case in this process; returns {"status": "valid" | "invalid" | "fail", "detail": ...}."""
    from visionops._registry import OPS

    spec = OPS[case.op].fuzz
    if case.raw is not None:
        return _run_raw(spec, case)
    call = case.call
    try:
        got = spec.public(*call.args, backend=case.backend, **call.kwargs)
    except Exception as e:
        if call.bad is None:
            return {"status": "fail", "detail": f"a valid call raised {type(e).__name__}: {e}"}
        if not isinstance(e, call.exc):
            return {"status": "fail", "detail": f"raised {type(e).__name__} (expected {call.exc}): {e}"}
        if call.bad not in str(e):
            return {"status": "fail", "detail": f"the message does not name {call.bad!r}: {type(e).__name__}: {e}"}
        return {"status": "invalid"}
    if call.bad is not None:
        return {"status": "fail", "detail": f"an invalid call ({call.bad!r}) returned instead of raising"}
    ref_args = call.args if spec.exact else _float64(call.args)
    ref_kwargs = call.kwargs if spec.exact else _float64(call.kwargs)
    try:
        exp = spec.public(*ref_args, backend="reference", **ref_kwargs)
    except Exception as e:
        return {"status": "fail", "detail": f"the reference raised on a valid call: {type(e).__name__}: {e}"}
    diff = _close(got, exp, spec, case.backend)
    if diff is not None and not (spec.same is not None and spec.same(got, exp, call)):
        return {"status": "fail", "detail": f"mismatch: {diff}"}
    return {"status": "valid"}


def _worker_main() -> None:
    inp, out = sys.stdin.buffer, os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not corrupt the pipe
    import torch

    torch.set_num_threads(1)
    import visionops  # noqa: F401  (declares the ops and their specs)
    import visionops.triton  # noqa: F401

    _send(out, "ready")
    while True:
        try:
            case = _recv(inp)
        except EOFError:
            return
        try:
            result = run_case(case)
        except Exception:
            result = {"status": "fail", "detail": "harness error:\n" + traceback.format_exc()}
        _send(out, result)


# ---- the parent -------------------------------------------------------------------------------------------------


class Worker:
    """A worker subprocess, restarted after a crash or a hang."""

    def __init__(self, timeout_s: float = TIMEOUT_S):
        self.timeout_s, self.proc, self.log = timeout_s, None, None

    def _start(self) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        self.log = tempfile.TemporaryFile()
        cmd = [sys.executable, "-c", "from visionops.testing_fuzz import _worker_main; _worker_main()"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, env=env)
        if self._wait(180.0) != "ready":
            raise RuntimeError("fuzz worker failed to start:\n" + self._stderr_tail())

    def _wait(self, timeout: float):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        try:
            return _recv(self.proc.stdout)
        except (EOFError, pickle.UnpicklingError):
            return None

    def _stderr_tail(self, n: int = 2000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-n:]

    def run(self, case: Case) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.log.seek(0)
        self.log.truncate()
        _send(self.proc.stdin, case)
        result = self._wait(self.timeout_s)
        if result is None:
            try:  # a worker that closed its pipe is exiting: let it finish to read its status
                code, hung = self.proc.wait(5), False
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code, hung = self.proc.wait(), True
            why = f"timed out after {self.timeout_s:.0f} s" if hung else f"worker died ({_signal_name(code)})"
            result = {"status": "crash", "detail": f"{why}; worker stderr:\n{self._stderr_tail()}"}
            self.proc = None
        return result

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def _signal_name(code: int) -> str:
    import signal

    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def check(worker: Worker, case: Case) -> dict:
    """Run ``case`` in ``worker``; raise AssertionError with the case on a crash, a hang or a wrong outcome."""
    result = worker.run(case)
    if result["status"] in ("fail", "crash"):
        raise AssertionError(f"{result['status']}: {case}\n{result['detail']}")
    return result


def campaign_case(seed: int, i: int, ops=None) -> Case:
    """Case ``i`` of the campaign with ``seed`` (every case draws from its own generator, so any one replays)."""
    from visionops._fuzz import RandomDraw
    from visionops._registry import OPS

    ops = list(ops or OPS)
    return draw_case(RandomDraw(random.Random(seed * 1_000_003 + i)), ops[i % len(ops)], CAMPAIGN_BACKENDS)


def campaign(cases: int, seed: int, ops=None, out=sys.stdout) -> collections.Counter:
    """Run ``cases`` cases round-robin over ``ops`` (default: every registered op); print counts per op."""
    import visionops  # noqa: F401
    from visionops._registry import OPS

    ops = list(ops or OPS)
    worker, counts, failures = Worker(), collections.Counter(), []
    start = time.time()
    try:
        for i in range(cases):
            op = ops[i % len(ops)]
            case = campaign_case(seed, i, ops)
            result = worker.run(case)
            status = result["status"]
            if status == "fail":  # a mismatch, or a wrong outcome (no error, the wrong error, an unclear message)
                status = "mismatch" if result["detail"].startswith("mismatch") else "error"
            counts[(op, "cases")] += 1
            counts[(op, status)] += 1
            if status in ("crash", "mismatch", "error"):
                failures.append(f"case {i}: {status}: {case}\n{result['detail']}")
                print(failures[-1], file=out, flush=True)
            if (i + 1) % 500 == 0:
                print(f"[{i + 1}/{cases}] {time.time() - start:.0f} s, {len(failures)} failures", file=out, flush=True)
    except KeyboardInterrupt:
        print(f"interrupted after {sum(counts[(op, 'cases')] for op in ops)} cases", file=out)
    finally:
        worker.close()
    cols = ("cases", "valid", "invalid", "crash", "mismatch", "error")
    print(f"\n{'op':24}" + "".join(f"{c:>9}" for c in cols), file=out)
    for op in ops + ["total"]:
        row = [sum(counts[(o, c)] for o in ops) if op == "total" else counts[(op, c)] for c in cols]
        print(f"{op:24}" + "".join(f"{v:9}" for v in row), file=out)
    print(f"seed {seed}, {time.time() - start:.0f} s", file=out, flush=True)
    return counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m visionops.testing_fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=1000, help="cases in all, round-robin over the ops")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ops", nargs="*", help="only these ops (default: every registered op)")
    p.add_argument("--case", type=int, help="replay only case CASE of the campaign here, printing its arguments")
    a = p.parse_args(argv)
    if a.case is not None:  # in this process: run it under a debugger, or see the crash itself
        os.environ.setdefault("TRITON_INTERPRET", "1")
        import torch

        import visionops  # noqa: F401

        torch.set_printoptions(precision=10, threshold=10**6)
        case = campaign_case(a.seed, a.case, a.ops)
        print(case, "\n", case.call.args, case.call.kwargs, sep="")
        result = run_case(case)
        print(result)
        return 0 if result["status"] in ("valid", "invalid") else 1
    counts = campaign(a.cases, a.seed, a.ops)
    return 1 if any(counts[k] for k in counts if k[1] in ("crash", "mismatch", "error")) else 0


if __name__ == "__main__":
    # cases are pickled by reference to this module's classes: run the importable module, not __main__
    from visionops.testing_fuzz import main as _main

    sys.exit(_main())
