"""Helpers shared by the reliability tests (threads, determinism, leaks) and benchmarks/cuda_reliability.py: every
registered op, through its conformance class, as one call that returns its outputs and input gradients.

Ops are enumerated from the conformance classes (tests/test_registry.py), so a new op is covered as soon as it has
one, and :func:`cases` fails if a registry op has none."""

import os
import warnings
from typing import Iterator, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from visionops import _registry as registry
from visionops.testing import OpConformance, deterministic, num_threads, to_layout


def conformance(op: str) -> type:
    """The conformance class of registry op ``op``; AssertionError if it has none."""
    from test_registry import conformance_classes  # tests/ is on sys.path under pytest (and in the scripts)

    found = [c for c in conformance_classes() if c.op == op]
    assert found, f"registry op {op!r} has no conformance class (tests/test_*.py)"
    return found[0]


def op_classes() -> List[type]:
    """The conformance class of every registry op, in registry order; AssertionError naming any op without one."""
    return [conformance(op) for op in registry.OPS]


class OpCase(NamedTuple):
    """One op on one set of inputs: ``run(backend)`` calls it (and its backward, when it has a gradient)."""

    op: str
    conf: OpConformance
    config: str
    inputs: tuple  # on the target device; floating grad inputs are leaves without requires_grad

    @property
    def id(self) -> str:
        return f"{self.op}-{self.config}"

    def run(self, backend: str, grad: bool = True) -> List[Tensor]:
        """The op's outputs followed by the gradients of its differentiable inputs for a fixed upstream gradient
        (its outputs only where it has none, or ``grad`` is False)."""
        conf = self.conf
        grad = grad and conf.has_grad
        inputs = tuple(
            v.detach().requires_grad_() if grad and i in conf.grad_inputs else v for i, v in enumerate(self.inputs)
        )
        out = conf.fn(*inputs, backend=backend)
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if not grad:
            return [o.detach() for o in outs]
        go = upstream(out)
        grads = conf._grads(out, inputs, go)
        return [o.detach() for o in outs] + [g.detach() for g in grads]


def upstream(out: Tensor) -> Tensor:
    """A fixed upstream gradient: a function of the position only, so every run sees the same one."""
    # made on the output's device (no host copy: it runs inside CUDA graph capture too)
    n = out.numel()
    return torch.linspace(-1.0, 1.0, n, dtype=torch.float64, device=out.device).reshape(out.shape).to(out.dtype)


def cases(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: str = "small",
    per_op: Optional[int] = 1,
    seed: int = 0,
    ops: Optional[Sequence[str]] = None,
    layout: str = "contiguous",
) -> Iterator[OpCase]:
    """For every registry op (or those in ``ops``), ``per_op`` input sets (None: one per config), cycling through
    its configs, each from its own seed, in ``layout`` (see visionops.testing.to_layout)."""
    for op in registry.OPS if ops is None else ops:
        cls = conformance(op)
        conf = cls()
        names = list(cls.configs)
        for k in range(len(names) if per_op is None else per_op):
            name = names[k % len(names)]
            g = torch.Generator().manual_seed(seed + 1000 * k)
            inputs = tuple(conf.make_inputs(device, dtype, g, size, cls.configs[name]))
            inputs = tuple(to_layout(v, layout) for v in inputs)
            yield OpCase(cls.op, conf, name, inputs)


def identical(a: Sequence[Tensor], b: Sequence[Tensor]) -> Optional[str]:
    """None if the two result lists are bit-identical (NaN where NaN), else what differs first."""
    if len(a) != len(b):
        return f"{len(a)} results != {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"result {i}: {tuple(x.shape)} {x.dtype} != {tuple(y.shape)} {y.dtype}"
        if x.is_floating_point():
            xb, yb = x.detach().cpu(), y.detach().cpu()
            same = (xb == yb) | (xb.isnan() & yb.isnan())
            # -0.0 == 0.0 compares equal: bits must match too
            same &= torch.signbit(xb) == torch.signbit(yb)
        else:
            same = x.cpu() == y.cpu()
        if not bool(same.all()):
            bad = (~same).nonzero()[0].tolist()
            return f"result {i} differs at {bad}: {x.cpu()[tuple(bad)].item()} != {y.cpu()[tuple(bad)].item()}"
    return None


def close(a: Sequence[Tensor], b: Sequence[Tensor], tol: dict) -> Optional[str]:
    """None if the two result lists agree (integer results exactly, floating ones within ``tol``, a dict of rtol and
    atol), else what differs."""
    if len(a) != len(b):
        return f"{len(a)} results != {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"result {i}: {tuple(x.shape)} {x.dtype} != {tuple(y.shape)} {y.dtype}"
        if not x.is_floating_point():
            if not torch.equal(x.cpu(), y.cpu()):
                return f"result {i}: integer results differ"
            continue
        try:
            torch.testing.assert_close(x.cpu().double(), y.cpu().double(), equal_nan=True, **tol)
        except AssertionError as e:
            return f"result {i}: {str(e).splitlines()[0]}"
    return None


def moved(case: OpCase, device, copy: bool = False) -> OpCase:
    """``case`` with its tensor inputs (also inside lists and tuples) on ``device`` (``copy``: always copied)."""

    def move(v):
        if isinstance(v, Tensor):
            return v.to(device, copy=copy)
        if isinstance(v, (list, tuple)):
            return type(v)(move(x) for x in v)
        return v

    return case._replace(inputs=move(case.inputs))


def rss_bytes() -> int:
    """Resident set size of this process (/proc/self/statm, second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


_PAGE = os.sysconf("SC_PAGE_SIZE")


NONDETERMINISTIC = "does not have a deterministic implementation"  # PyTorch's error (and warning) under the flag


def check_deterministic(
    case: OpCase, backend: str, threads: Sequence[Optional[int]] = (1, 2), repeats: int = 2
) -> Optional[str]:
    """Under ``torch.use_deterministic_algorithms(True)``: None if ``case`` gives bit-identical outputs and gradients
    on ``repeats`` runs at each of ``threads`` and across them, or raises as PyTorch's own non-deterministic ops do (and
    then only warns with ``warn_only=True``); else what went wrong."""
    results = []
    try:
        with deterministic():
            for n in threads:
                with num_threads(n):
                    results += [(n, case.run(backend)) for _ in range(repeats)]
    except RuntimeError as e:
        if NONDETERMINISTIC not in str(e):
            raise
        old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                case.run(backend)
        finally:
            torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        if not any(NONDETERMINISTIC in str(w.message) for w in caught):
            return f"raises under deterministic algorithms but does not warn with warn_only=True: {e}"
        return None
    first_n, first = results[0]
    for n, r in results[1:]:
        diff = identical(first, r)
        if diff:
            return f"{first_n} thread(s) vs {n} thread(s): {diff}"
    return None
