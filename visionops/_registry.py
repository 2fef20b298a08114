"""The op registry: every op declared once, one dispatch, one set of registrations per schema for every backend.

Each op family declares its ops with :func:`declare` (in ``visionops/ops/<family>.py``): the op's name, its
pure-PyTorch reference, its fake kernel, its autograd (:class:`Backward`), its autocast policy and the module that
holds its Triton kernel. Names follow one convention, so nothing else is listed:

=========  ==========================  ======================================  =================================
backend    forward                     backward                                defined by
=========  ==========================  ======================================  =================================
cpp        ``visionops::<name>``       ``visionops::_<name>_backward``         csrc/ops/<op>.cpp (schema), _C
triton     ``visionops::triton_<name>`` ``visionops::triton_<name>_backward`` :func:`triton_op` in visionops/triton
reference  ``OpDef.reference``         (autograd through PyTorch)              visionops/reference/<family>.py
=========  ==========================  ======================================  =================================

The fake kernel, autograd formula (double backward refused) and autocast cast are applied to the C++ op and to the
Triton op alike, by one function (:func:`_register`), whichever of declaration and kernel comes first.
:func:`dispatch` picks the callable for a backend and device; the public wrappers call nothing else.

This module is the bottom of the package: it imports nothing of visionops, so kernel modules (visionops/triton)
import it and never the public layer. ``import visionops`` works without triton; ``backend="triton"`` then raises.
"""

import functools
import importlib
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")
AUTOCAST_DTYPE = "autocast_dtype"  # OpDef.autocast: run in the dtype of the enclosing torch.autocast region

# (op, device type) -> backend for backend="auto", from the committed numbers in benchmarks/results/; pairs not
# listed use the C++ kernel. NVIDIA-H200-20261127-bench-cuda.json: the CUDA C++ kernels beat the Triton ones for the
# NMS family (nms 20k: 4.59 vs 4.63 ms, 100k: 41.5 vs 57.8 ms; batched_nms 20k/80: 3.9 vs 5.4 ms; box_iou 1k x 1k:
# 0.032 vs 0.091 ms). On the CPU Triton only runs interpreted (for tests), so the C++ kernels are the real choice.
AUTO: Dict[Tuple[str, str], str] = {
    ("nms", "cuda"): "cpp",
    ("batched_nms", "cuda"): "cpp",
    ("box_iou", "cuda"): "cpp",
}


@dataclass(frozen=True)
class Backward:
    """Autograd of an op through its private backward op (one per backend, same schema).

    ``formula(backward_op, ctx, *grads)`` returns the gradients of the forward's inputs, calling ``backward_op``
    (the backend's backward op); ``fake`` is the backward op's fake kernel.
    """

    setup_context: Callable
    formula: Callable
    fake: Callable


@dataclass(frozen=True)
class OpDef:
    """One op: everything the registry needs to dispatch it and register it on every backend."""

    name: str
    reference: Callable  # pure-PyTorch implementation with the schema's signature: the oracle and a backend
    fake: Callable  # shapes only (torch.compile, torch.export, opcheck)
    triton: Optional[str] = None  # module defining visionops::triton_<name> (imported on first use)
    backward: Optional[Backward] = None  # None: no gradient (integer outputs, labels)
    # under torch.autocast the op's floating inputs (float64 excepted) are cast to this dtype (cpu and cuda), or, for
    # AUTOCAST_DTYPE, to the autocast region's own dtype (what torch does for convolutions)
    autocast: Union[torch.dtype, str, None] = None
    check: Optional[Callable] = None  # schema-level argument checks for the Triton op (the C++ ops check in C++)
    fuzz: Optional[Any] = None  # visionops._fuzz.FuzzSpec: how the fuzz tests draw and check calls of the op

    @property
    def backward_name(self) -> str:
        return f"_{self.name}_backward"


OPS: Dict[str, OpDef] = {}  # name -> declaration, in declaration order
_TRITON: Dict[str, Dict[str, Callable]] = {}  # name -> {"forward": op, "backward": op} defined by triton_op
_DONE = set()  # (name, backend) whose registrations are applied
_CALLABLES: Dict[Tuple[str, str], Callable] = {}


def qualname(name: str, backend: str, backward: bool = False) -> str:
    """The dispatcher name of an op's forward or backward on the "cpp" or "triton" backend."""
    if backend == "cpp":
        return f"visionops::_{name}_backward" if backward else f"visionops::{name}"
    return f"visionops::triton_{name}_backward" if backward else f"visionops::triton_{name}"


def declare(op: OpDef) -> OpDef:
    """Declare an op (once) and register its fake kernel, autograd and autocast for the C++ op and, when defined,
    the Triton op."""
    if op.name in OPS:
        raise RuntimeError(f"visionops: op {op.name!r} is declared twice")
    OPS[op.name] = op
    _register(op, "cpp")
    if _triton_complete(op):
        _register(op, "triton")
    return op


def triton_op(name: str, *, backward: bool = False):
    """Decorator: define the Triton kernel of op ``name`` as ``visionops::triton_<name>`` (or its backward) with the
    decorated function's signature as schema, run the declared ``check`` first, and register it like the C++ op."""

    def wrap(fn: Callable):
        @functools.wraps(fn)
        def checked(*args):
            decl = OPS.get(name)
            if decl is not None and decl.check is not None and not backward:
                decl.check(*args)
            return fn(*args)

        custom = torch.library.custom_op(qualname(name, "triton", backward), mutates_args=())(checked)
        _TRITON.setdefault(name, {})["backward" if backward else "forward"] = custom
        decl = OPS.get(name)
        if decl is not None and _triton_complete(decl):
            _register(decl, "triton")
        return custom

    return wrap


def _triton_complete(op: OpDef) -> bool:
    have = _TRITON.get(op.name, {})
    return "forward" in have and (op.backward is None or "backward" in have)


def _op(qual: str) -> Callable:
    namespace, name = qual.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError("visionops: double backward is not supported (the backward kernels are not differentiable)")


def _no_context(ctx, inputs, output):
    pass


def _register(op: OpDef, backend: str) -> None:
    """Fake kernel, autograd (double backward refused) and autocast of ``op`` on one backend."""
    if (op.name, backend) in _DONE:
        return
    _DONE.add((op.name, backend))
    forward = qualname(op.name, backend)
    torch.library.register_fake(forward, op.fake)
    if op.backward is not None:
        backward = qualname(op.name, backend, backward=True)
        torch.library.register_fake(backward, op.backward.fake)
        formula = functools.partial(op.backward.formula, _op(backward))
        torch.library.register_autograd(forward, formula, setup_context=op.backward.setup_context)
        torch.library.register_autograd(backward, _refuse_double_backward, setup_context=_no_context)
    if op.autocast is not None:
        for device in ("cpu", "cuda"):
            if op.autocast == AUTOCAST_DTYPE:
                _register_autocast_dtype(forward, device)
            else:
                torch.library.register_autocast(forward, device, op.autocast)


_LIB = None


def _cast_floating(args, device: str, dtype: torch.dtype):
    """``args`` with every floating tensor on ``device`` except float64 ones cast to ``dtype`` (torch's rule)."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.device.type == device:
            a = a if a.dtype == torch.float64 else a.to(dtype)
        elif isinstance(a, (list, tuple)):
            a = type(a)(_cast_floating(a, device, dtype))
        out.append(a)
    return out


def _register_autocast_dtype(qual: str, device: str) -> None:
    """Autocast kernel of ``qual`` on ``device`` casting to the autocast dtype of the call (torch.get_autocast_dtype),
    as torch's own convolutions do; torch.library.register_autocast only takes a fixed dtype."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("visionops", "FRAGMENT")
    key = "Autocast" + torch._C._dispatch_key_for_device(device)
    guard_keys = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))
    op = _op(qual)

    def kernel(_keyset, *args):
        with torch._C._ExcludeDispatchKeyGuard(guard_keys):
            return op(*_cast_floating(args, device, torch.get_autocast_dtype(device)))

    _LIB.impl(qual.split("::")[1], kernel, key, with_keyset=True)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(name: str, backend: str, device: torch.device) -> str:
    """The concrete backend for op ``name`` on ``device``; raises ValueError for an unknown or unusable backend."""
    if backend not in BACKENDS:
        raise ValueError(f"{name}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return AUTO.get((name, device.type), "cpp")
    if backend == "triton":
        if OPS[name].triton is None:
            raise ValueError(f"{name}: has no Triton kernel (backend='triton')")
        if not triton_available():
            raise ValueError(f"{name}: backend='triton' needs the `triton` package (pip install triton)")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"{name}: backend='triton' runs on CUDA tensors (or on CPU tensors with TRITON_INTERPRET=1 set before "
                f"importing visionops); got a {device.type} tensor"
            )
    return backend


def dispatch(name: str, backend: str, device: torch.device) -> Callable:
    """The implementation of op ``name`` that ``backend`` ("auto", "cpp", "triton", "reference") picks on
    ``device``, called with the schema's arguments."""
    b = resolve(name, backend, device)
    fn = _CALLABLES.get((name, b))
    if fn is None:
        op = OPS[name]
        if b == "reference":
            fn = op.reference
        else:
            if b == "triton":
                importlib.import_module(op.triton)  # defines the Triton ops on first use
            fn = _op(qualname(name, b))
        _CALLABLES[(name, b)] = fn
    return fn


@functools.cache
def limit(key: str) -> int:
    """A limit compiled into the C++ kernels and shared by every backend (``roi_align_max_levels``,
    ``roi_align_max_grid``), read from ``_build_info()`` so it is defined once, in csrc/ops/common/."""
    info = dict(kv.split("=", 1) for kv in torch.ops.visionops._build_info().split(";"))
    return int(info[key])
