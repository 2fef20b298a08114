"""Test helpers shared by the op tests (as ``torch_scatter.testing``): devices, dtypes, input makers, and the
conformance base class every op family's tests derive from. Not imported by ``import visionops`` (it needs pytest).

:class:`OpConformance` is torchvision's ``RoIOpTester(ABC)`` generalised: a subclass names its op (the registry
name) and gives data (the public call, the float64 oracle, input makers, tolerances, a bad-input table); the base
parametrises every check over backend x device x dtype x layout x config, each combination its own test id:

=========================  ======================================================================================
test                       what it checks
=========================  ======================================================================================
test_matches_reference     output (and input gradients, if ``has_grad``) against ``reference`` on float64 copies
test_matches_torchvision   output (and gradients, if torchvision's are defined) against ``torchvision_fn``
test_gradcheck             ``torch.autograd.gradcheck`` in float64 on tiny inputs, a few seeds
test_empty                 empty inputs give an empty output of the reference's shape (and zero gradients)
test_bad_input             each row of ``bad_inputs()`` raises the named exception naming the argument
test_opcheck               ``torch.library.opcheck`` on every visionops op the call (forward and backward) runs
test_compile               ``torch.compile(fullgraph=True)`` of the public call (and its backward) equals eager
test_export                ``torch.export.export`` of a module calling it: the op in the graph, same result
=========================  ======================================================================================

opcheck, compile and export are slow on CPUs, so they run once per kernel backend ("cpp", "triton") and device, on
float32 contiguous inputs. Triton runs on CPU tensors only under ``TRITON_INTERPRET=1`` (tests/conftest.py sets it),
where every program runs in Python: makers get ``size="small"`` for it.
"""

import contextlib
import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import pytest
import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from visionops import _registry as registry

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
HALF_DTYPES = (torch.float16, torch.bfloat16)
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = registry.triton_available()

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def triton_devices() -> List[str]:
    """Devices the Triton backend can run on here: CUDA, or the CPU under the interpreter."""
    if not HAS_TRITON:
        return []
    if TRITON_INTERPRET:
        return ["cpu"]
    return ["cuda"] if torch.cuda.is_available() else []


def backends_for(device: str, op: Optional[str] = None) -> List[str]:
    """Backends to test on ``device``: C++ and reference everywhere, Triton where it runs (and ``op`` has one)."""
    out = ["cpp", "reference"]
    if device in triton_devices() and (op is None or registry.OPS[op].triton is not None):
        out.append("triton")
    return out


def interpreted(backend: str, device: str) -> bool:
    """True where a backend runs each program in Python: keep its inputs small."""
    return backend == "triton" and device == "cpu"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@contextlib.contextmanager
def num_threads(n: Optional[int]):
    """torch.set_num_threads(n) inside the block (None: leave it), restored afterwards."""
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@contextlib.contextmanager
def deterministic(on: bool = True):
    """torch.use_deterministic_algorithms(on) inside the block."""
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old)


# ---- input makers ------------------------------------------------------------------------------------------------


def random_boxes(n, *, scale=800.0, max_size=100.0, dtype=torch.float32, device="cpu", generator=None) -> Tensor:
    """Boxes with xy ~ U(0, scale), wh ~ U(1, 1 + max_size), as (x1, y1, x2, y2)."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_size + 1
    return torch.cat([xy, xy + wh], 1).to(dtype=dtype, device=device)


def clustered_boxes(n, *, objects=5, jitter=8.0, dtype=torch.float32, device="cpu", generator=None) -> Tensor:
    """Many jittered boxes around a few objects, as a detector outputs before NMS."""
    centers = random_boxes(objects, generator=generator, dtype=torch.float64)
    which = torch.randint(0, objects, (n,), generator=generator)
    noise = (torch.rand(n, 4, generator=generator, dtype=torch.float64) - 0.5) * 2 * jitter
    b = centers[which] + noise
    b[:, 2:] = torch.maximum(b[:, 2:], b[:, :2] + 0.5)
    return b.to(dtype=dtype, device=device)


def degenerate_boxes(n, *, dtype=torch.float32, device="cpu", generator=None) -> Tensor:
    """Small crowded boxes with zero-width, identical and inverted ones among them."""
    boxes = random_boxes(n, scale=50.0, max_size=20.0, generator=generator, dtype=torch.float64)
    if n >= 4:
        boxes[::4, 2] = boxes[::4, 0]  # zero width
        boxes[1::4] = boxes[0]  # identical copies
        boxes[2::7, 2:] = boxes[2::7, :2] - 3  # inverted
    return boxes.to(dtype=dtype, device=device)


def unique_scores(n, *, dtype=torch.float32, device="cpu", generator=None) -> Tensor:
    """Scores without ties (torch.rand has ties at 20k values); float16/bfloat16 round some together."""
    return (torch.randperm(n, generator=generator).to(torch.float64) / max(n, 1)).to(dtype=dtype, device=device)


def tied_scores(n, *, levels=3, dtype=torch.float32, device="cpu", generator=None) -> Tensor:
    """Scores taking only ``levels`` values (exact in every float dtype): most boxes tie with many others, so the
    result depends on how ties are ordered (by input index, as torchvision's stable sort)."""
    return (torch.randint(0, levels, (n,), generator=generator).to(torch.float64) / 4).to(dtype=dtype, device=device)


def threshold_boxes(pairs, *, iou=0.5, dtype=torch.float32, device="cpu", generator=None) -> Tensor:
    """``2 * pairs`` boxes whose IoU within each pair is exactly ``iou`` (1/2 or 1/4) in every float dtype: same
    height, integer corners under 256 (exact even in bfloat16), overlap 2 of a union of 4 (or 8) units. Pairs sit
    on a grid 16 apart, so boxes of different pairs never meet; unit widths and heights vary per pair."""
    if iou not in (0.5, 0.25):
        raise ValueError(f"iou must be 0.5 or 0.25, got {iou}")
    spans = ((0, 3), (1, 4)) if iou == 0.5 else ((0, 5), (3, 8))  # inter 2 units, union 4 (or 8)
    per_row = 12
    if (pairs - 1) // per_row * 16 + 8 > 250:
        raise ValueError(f"at most {16 * per_row} pairs keep the corners exact, got {pairs}")
    unit = torch.randint(1, 3, (pairs,), generator=generator)  # x unit 1 or 2: a pair spans at most 16
    height = torch.randint(1, 9, (pairs,), generator=generator)
    out = []
    for p in range(pairs):
        ox, oy, u, h = 20 * (p % per_row), 16 * (p // per_row), int(unit[p]), int(height[p])
        for lo, hi in spans:
            out.append([ox + lo * u, oy, ox + hi * u, oy + h])
    return torch.tensor(out, dtype=torch.float64).to(dtype=dtype, device=device)


def make_rois(
    seed, *, n=2, c=3, h=9, w=11, k=12, scale=0.5, dtype=torch.float32, device="cpu", extent=0.7
) -> Tuple[Tensor, Tensor]:
    """Features [n, c, h, w] ~ N(0, 1) and k RoIs (batch index, x1, y1, x2, y2) in image coordinates
    (feature cell / ``scale``) covering the awkward cases: RoIs partly or wholly outside the map, zero width/height,
    negative coordinates, inverted corners. ``extent``: largest RoI side as a fraction of the map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    span_x, span_y = w / scale, h / scale
    xy = (torch.rand(k, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3) * torch.tensor([span_x, span_y])
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([span_x, span_y]) * extent
    boxes = torch.cat([xy, xy + wh], 1)
    if k >= 4:
        boxes[0, 2] = boxes[0, 0]  # zero width
        boxes[1, 3] = boxes[1, 1]  # zero height
        boxes[2] = torch.tensor([-3 * span_x, -3 * span_y, -2 * span_x, -2 * span_y])  # wholly outside
        boxes[3, :2], boxes[3, 2:] = boxes[3, 2:].clone(), boxes[3, :2].clone()  # inverted
    idx = torch.randint(0, n, (k, 1), generator=g).to(torch.float64)
    rois = torch.cat([idx, boxes], 1)
    return x.to(dtype=dtype, device=device), rois.to(dtype=dtype, device=device)


def make_large_rois(seed, *, n=2, c=40, h=24, w=28, k=24, scale=0.5, dtype=torch.float32, device="cpu"):
    """RoIs of 60-100% of a map larger than the usual cases: pooled to 2x2 (or 3x3) their bins span 4 to 14 cells
    per axis (the kernels' per-sample path, beyond the separable one), split over both images, and enough work per
    (image, channel block) for the CPU backward's tasks to overlap when it runs on several threads."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    size = torch.tensor([w / scale, h / scale], dtype=torch.float64)
    wh = (torch.rand(k, 2, generator=g, dtype=torch.float64) * 0.4 + 0.6) * size
    xy = (
        torch.rand(k, 2, generator=g, dtype=torch.float64) * (size - wh)
        - 0.1 * size * (torch.arange(k) % 3 == 0)[:, None]
    )
    idx = (torch.arange(k) % n).to(torch.float64)[:, None]
    rois = torch.cat([idx, xy, xy + wh], 1)
    return x.to(dtype=dtype, device=device), rois.to(dtype=dtype, device=device)


def strided(t: Tensor) -> Tensor:
    """The same values with every stride doubled (a non-contiguous view)."""
    return torch.stack([t, t], -1)[..., 0]


def to_layout(t, layout: str):
    """``t`` (a tensor; anything else passes through) as "contiguous", "non_contiguous" (strided) or
    "channels_last" (4-D tensors; others unchanged)."""
    if not isinstance(t, Tensor) or layout == "contiguous":
        return t
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t
    if layout == "non_contiguous":
        return strided(t) if t.numel() > 1 else t
    raise ValueError(f"unknown layout {layout!r}")


# ---- the conformance base ----------------------------------------------------------------------------------------


class Bad(NamedTuple):
    """One row of a bad-input table: ``call(backend)`` must raise ``exc`` with a message matching ``match``."""

    desc: str
    call: Callable[[str], Any]
    exc: type
    match: str
    backends: Optional[Tuple[str, ...]] = None  # None: every backend


class Case(NamedTuple):
    backend: str
    device: str
    dtype: torch.dtype = torch.float32
    layout: str = "contiguous"
    config: str = "default"
    threads: Optional[int] = None


class _Record(TorchDispatchMode):
    """Records the visionops ops that run (and their arguments), as they reach the kernels."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "visionops":
            self.calls.append((func, args, kwargs or {}))
        return func(*args, **(kwargs or {}))


class KernelDtypes(TorchDispatchMode):
    """Records the dtypes of the floating tensors each visionops op receives, below autocast in the dispatcher:
    ``seen["visionops::<op>"]`` lists those of its last call (for autocast tests)."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "visionops":
            floats = [a.dtype for a in args if isinstance(a, Tensor) and a.is_floating_point()]
            self.seen[str(func._schema.name)] = floats
        return func(*args, **(kwargs or {}))


_ORACLES: Dict[tuple, tuple] = {}  # oracle answers, see OpConformance._check_against


def _tensors(inputs) -> List[int]:
    return [i for i, v in enumerate(inputs) if isinstance(v, Tensor)]


def _detached(v, requires_grad=False):
    if isinstance(v, Tensor):
        return v.detach().clone().requires_grad_(requires_grad and v.is_floating_point())
    if isinstance(v, (list, tuple)):
        return type(v)(_detached(x, requires_grad) for x in v)
    return v


class OpConformance:
    """Base of one op's conformance tests. A subclass (named ``Test...``) sets the data below; see the module doc.

    Inputs are a tuple, the public call's positional arguments (tensors and plain values): ``fn(*inputs,
    backend=...)`` is the public call and ``reference(*inputs)`` the oracle, called on CPU copies of the inputs in
    ``reference_dtype`` (floating tensors only).
    """

    op: str = ""  # registry name (visionops._registry.OPS)
    covers: Tuple[str, ...] = ()  # other public names (visionops.__all__) whose kernels these tests exercise
    dtypes: Sequence[torch.dtype] = tuple(FLOAT_DTYPES)
    layouts: Sequence[str] = ("contiguous", "non_contiguous")
    configs: Dict[str, Any] = {"default": None}  # name -> value passed to make_inputs
    configs_interpreted: Optional[Sequence[str]] = None  # configs for interpreted Triton (None: all)
    interpreted_cheap: bool = False  # interpreted Triton is fast enough for every combination by default
    threads: Sequence[Optional[int]] = (None,)  # CPU thread counts of test_matches_reference for the C++ backend
    reference_dtype: Optional[torch.dtype] = torch.float64  # None: the oracle sees the inputs' own dtype
    torchvision_dtypes: Sequence[torch.dtype] = ()  # dtypes test_matches_torchvision runs (empty: none)
    torchvision_configs: Optional[Sequence[str]] = None  # configs torchvision has an equivalent for (None: all)
    torchvision_grad: bool = True  # compare gradients with torchvision's too (when has_grad)
    has_grad: bool = False
    grad_inputs: Tuple[int, ...] = ()  # positions of the differentiable inputs
    gradcheck_seeds: Sequence[int] = (0, 1, 2)
    gradcheck_configs: Optional[Sequence[str]] = None  # configs gradcheck cycles through (None: all)
    triton_float32: bool = False  # the Triton kernels compute in float32 even for float64 inputs
    slow: Sequence[Tuple[str, str]] = ()  # (test name, backend) pairs marked slow
    compile_backend: str = "inductor"
    check_config: Optional[str] = None  # config of test_opcheck/test_compile/test_export (None: the first)
    opcheck_utils: Optional[Tuple[str, ...]] = None  # torch.library.opcheck test_utils (None: all)
    tolerances: Dict[torch.dtype, Dict[str, float]] = {
        torch.float64: dict(rtol=1e-7, atol=1e-7),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    }
    grad_factor: float = 4.0  # gradient tolerance = grad_factor x output tolerance
    seed: int = 0

    # ---- what a family gives ----------------------------------------------------------------------------------

    def fn(self, *inputs, backend: str):
        raise NotImplementedError

    def reference(self, *inputs):
        raise NotImplementedError

    def torchvision_fn(self, *inputs):
        raise NotImplementedError

    def make_inputs(self, device: str, dtype: torch.dtype, generator: torch.Generator, size: str, config) -> tuple:
        """size: "full", "small" (interpreted Triton, opcheck/compile/export) or "tiny" (gradcheck)."""
        raise NotImplementedError

    def empty_inputs(self, device: str, dtype: torch.dtype) -> Dict[str, tuple]:
        raise NotImplementedError

    def bad_inputs(self) -> List[Bad]:
        return []

    def expected_failure(self, test: str, case: Case) -> Optional[str]:
        """The reason a generated test fails today because of a known op bug (marked xfail(strict=True), so a fix
        shows up as XPASS), or None."""
        return None

    def gradcheck_kwargs(self, backend: str) -> dict:
        if backend == "triton" and self.triton_float32:  # linear in the inputs: a wide step stays exact
            return dict(eps=1e-2, atol=1e-3, rtol=1e-3)
        return {}

    # ---- parametrisation --------------------------------------------------------------------------------------

    def _backends(self, device):
        return backends_for(device, self.op)

    def _configs(self, backend, device, names=None):
        names = list(self.configs) if names is None else list(names)
        if interpreted(backend, device) and self.configs_interpreted is not None:
            names = [c for c in names if c in self.configs_interpreted]
        return names

    def _param(self, test, case: Case, *parts):
        cid = "-".join(str(p) for p in parts if p is not None and p != "")
        slow = (test, case.backend) in self.slow or not self._core(test, case)
        marks = [pytest.mark.slow] if slow else []
        reason = self.expected_failure(test, case)
        if reason:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        return pytest.param(case, id=cid, marks=marks)

    def _core(self, test, case: Case) -> bool:
        """Whether an interpreted-Triton test runs by default (each takes seconds): comparisons one factor at a time
        around (float32, contiguous, first config), i.e. every dtype, every layout and every config once; against
        torchvision only that centre; gradcheck with the first seed. The rest is marked slow (--runslow)."""
        if not interpreted(case.backend, case.device):
            return True
        if test == "test_gradcheck":
            return case.config == self.gradcheck_seeds[0]
        if self.interpreted_cheap or test not in ("test_matches_reference", "test_matches_torchvision"):
            return True
        centre = (torch.float32, self.layouts[0], self._configs(case.backend, case.device)[0])
        differs = sum(a != b for a, b in zip((case.dtype, case.layout, case.config), centre))
        return differs == 0 if test == "test_matches_torchvision" else differs <= 1

    def _cid(self, case: Case, *, dtype=True, layout=True, config=True):
        parts = [case.backend, case.device]
        if dtype:
            parts.append(dtype_name(case.dtype))
        if layout and len(self.layouts) > 1:
            parts.append(case.layout)
        if config and len(self.configs) > 1:
            parts.append(case.config)
        if case.threads is not None:
            parts.append(f"threads{case.threads}")
        return parts

    def _cases_matches(self, test, dtypes, config_names=None):
        out = []
        for device in DEVICES:
            for backend in self._backends(device):
                threads = self.threads if (backend == "cpp" and device == "cpu") else (None,)
                for dtype in dtypes:
                    for layout in self.layouts:
                        for config in self._configs(backend, device, config_names):
                            for t in threads:
                                case = Case(backend, device, dtype, layout, config, t)
                                out.append(self._param(test, case, *self._cid(case)))
        return out

    def _params(self, test):
        if test == "test_matches_reference":
            return self._cases_matches(test, self.dtypes)
        if test == "test_matches_torchvision":
            return self._cases_matches(test, self.torchvision_dtypes, self.torchvision_configs)
        if test == "test_gradcheck":
            if not self.has_grad:
                return []
            return [
                self._param(test, Case(b, d, torch.float64, config=s), b, d, f"seed{s}")
                for d in DEVICES
                for b in self._backends(d)
                for s in self.gradcheck_seeds
            ]
        if test == "test_empty":
            return [
                self._param(test, Case(b, d, config=name), b, d, name)
                for d in DEVICES
                for b in self._backends(d)
                for name in self.empty_inputs("cpu", torch.float32)
            ]
        if test == "test_bad_input":
            return [
                self._param(test, Case(b, "cpu", config=row.desc), b, row.desc)
                for b in self._backends("cpu")
                for row in self.bad_inputs()
                if row.backends is None or b in row.backends
            ]
        if test in ("test_opcheck", "test_compile", "test_export"):
            config = self.check_config or next(iter(self.configs))
            return [
                self._param(test, Case(b, d, config=config), b, d)
                for d in DEVICES
                for b in self._backends(d)
                if b in ("cpp", "triton")
            ]
        return None

    def pytest_generate_tests(self, metafunc):
        params = self._params(metafunc.function.__name__)
        if params is None:
            return
        if not params:
            params = [pytest.param(None, id="n/a", marks=pytest.mark.skip(reason=f"{self.op}: nothing to check"))]
        metafunc.parametrize("case", params)

    # ---- helpers ----------------------------------------------------------------------------------------------

    def inputs(self, case: Case, size: Optional[str] = None, *, requires_grad: bool = False) -> tuple:
        if size is None:
            size = "small" if interpreted(case.backend, case.device) else "full"
        g = torch.Generator().manual_seed(self.seed)
        inputs = tuple(self.make_inputs(case.device, case.dtype, g, size, self.configs.get(case.config)))
        inputs = tuple(to_layout(v, case.layout) for v in inputs)
        if case.layout != "contiguous":
            t = _tensors(inputs)
            assert t and not all(inputs[i].is_contiguous() for i in t), f"{case.layout}: no input changed layout"
        if requires_grad:
            inputs = tuple(v.detach().requires_grad_() if i in self.grad_inputs else v for i, v in enumerate(inputs))
        return inputs

    def reference_inputs(self, inputs, dtype: torch.dtype) -> tuple:
        rdtype = self.reference_dtype or dtype
        out = []
        for i, v in enumerate(inputs):
            if isinstance(v, Tensor):
                v = v.detach().to("cpu", rdtype if v.is_floating_point() else v.dtype)
                if i in self.grad_inputs and self.has_grad:
                    v.requires_grad_()
            out.append(v)
        return tuple(out)

    def tolerance(self, dtype: torch.dtype, backend: str, grad: bool = False) -> dict:
        tol = dict(self.tolerances[dtype])
        if backend == "triton" and self.triton_float32 and dtype == torch.float64:
            tol = dict(self.tolerances[torch.float32])
        if grad:
            tol = {k: v * self.grad_factor for k, v in tol.items()}
        return tol

    def assert_same(self, got, expected, dtype, backend, what="output", grad=False):
        """``got`` against ``expected`` (tensors, or tuples of them: ops with several outputs): index outputs
        exactly, floating ones within the tolerance of ``dtype`` (None: each expected output's own dtype)."""
        if isinstance(expected, (tuple, list)):
            assert isinstance(got, (tuple, list)) and len(got) == len(expected), f"{what}: {len(expected)} outputs"
            for i, (g, e) in enumerate(zip(got, expected)):
                self.assert_same(g, e, dtype, backend, f"{what}[{i}]", grad)
            return
        if dtype is None:
            dtype = expected.dtype
        assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
        if not expected.is_floating_point():
            assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype} != {expected.dtype}"
            assert torch.equal(got.cpu(), expected.cpu()), f"{what}: {got.tolist()} != {expected.tolist()}"
            return
        assert got.dtype == dtype, f"{what}: dtype {got.dtype}, expected {dtype}"
        torch.testing.assert_close(
            got.detach().cpu().double(),
            expected.detach().cpu().double(),
            equal_nan=True,
            msg=lambda m: f"{what}: {m}",
            **self.tolerance(dtype, backend, grad),
        )

    def _upstream(self, shape, dtype, device) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)

    def _grads(self, out: Tensor, inputs, go: Tensor):
        leaves = [inputs[i] for i in self.grad_inputs]
        grads = torch.autograd.grad(out, leaves, go, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]

    def _check_against(self, case: Case, oracle: Callable, convert: Callable, what: str, grad: bool):
        """The op (and its input gradients) against ``oracle`` on ``convert(inputs)``. The oracle's answer is the
        same for every layout, backend and thread count of a (dtype, config): it is computed once per session."""
        grad = grad and self.has_grad
        size = "small" if interpreted(case.backend, case.device) else "full"
        inputs = self.inputs(case, size, requires_grad=grad)
        key = (type(self), what, case.dtype, case.config, size, case.device if what == "vs torchvision" else "")
        if key not in _ORACLES:
            o_inputs = convert(inputs)
            expected = oracle(*o_inputs)
            expected_grads = ()
            if grad:
                go = self._upstream(expected.shape, case.dtype, expected.device).to(expected.dtype)
                expected_grads = [g.detach() for g in self._grads(expected, o_inputs, go)]
            _ORACLES[key] = (_detached(expected), expected_grads)
        expected, expected_grads = _ORACLES[key]
        with num_threads(case.threads):
            out = self.fn(*inputs, backend=case.backend)
            grads = self._grads(out, inputs, self._upstream(out.shape, case.dtype, out.device)) if grad else ()
        assert all(o.device.type == case.device for o in (out if isinstance(out, (tuple, list)) else (out,)))
        self.assert_same(out, expected, case.dtype, case.backend, what)
        for i, got, exp in zip(self.grad_inputs, grads, expected_grads):
            self.assert_same(got, exp, case.dtype, case.backend, f"{what}: gradient of input {i}", grad=True)

    # ---- the tests --------------------------------------------------------------------------------------------

    def test_matches_reference(self, case):
        self._check_against(
            case, self.reference, lambda inputs: self.reference_inputs(inputs, case.dtype), "vs reference", grad=True
        )

    def test_matches_torchvision(self, case):
        def same_inputs(inputs):
            return tuple(_detached(v, requires_grad=i in self.grad_inputs) for i, v in enumerate(inputs))

        self._check_against(case, self.torchvision_fn, same_inputs, "vs torchvision", grad=self.torchvision_grad)

    def test_gradcheck(self, case):
        g = torch.Generator().manual_seed(case.config)  # case.config holds the seed here
        configs = list(self.gradcheck_configs or self.configs)
        config = self.configs[configs[case.config % len(configs)]]
        inputs = tuple(self.make_inputs(case.device, torch.float64, g, "tiny", config))
        leaves = [inputs[i].detach().requires_grad_() for i in self.grad_inputs]

        def call(*ts):
            full = list(inputs)
            for i, t in zip(self.grad_inputs, ts):
                full[i] = t
            return self.fn(*full, backend=case.backend)

        assert torch.autograd.gradcheck(call, tuple(leaves), **self.gradcheck_kwargs(case.backend))

    def test_empty(self, case):
        inputs = self.empty_inputs(case.device, case.dtype)[case.config]
        if self.has_grad:
            inputs = tuple(v.detach().requires_grad_() if i in self.grad_inputs else v for i, v in enumerate(inputs))
        out = self.fn(*inputs, backend=case.backend)
        expected = self.reference(*self.reference_inputs(inputs, case.dtype))
        assert all(o.numel() == 0 for o in (out if isinstance(out, (tuple, list)) else (out,)))
        self.assert_same(out, expected, case.dtype, case.backend, "empty output")
        if self.has_grad:
            grads = self._grads(out, inputs, torch.zeros_like(out))
            for i, gr in zip(self.grad_inputs, grads):
                assert gr is None or (gr.shape == inputs[i].shape and not gr.any()), f"gradient of input {i}"

    def test_bad_input(self, case):
        row = next(r for r in self.bad_inputs() if r.desc == case.config)
        with pytest.raises(row.exc, match=row.match):
            row.call(case.backend)

    def _small(self, case):
        return self.inputs(case._replace(dtype=torch.float32), "small")

    def test_opcheck(self, case):
        inputs = self._small(case)
        inputs = tuple(v.detach().requires_grad_() if i in self.grad_inputs else v for i, v in enumerate(inputs))
        with _Record() as rec:
            out = self.fn(*inputs, backend=case.backend)
            if self.has_grad:
                self._grads(out, inputs, self._upstream(out.shape, out.dtype, out.device))
        ran = {str(f._schema.name): (f, a, k) for f, a, k in rec.calls}
        expected = [registry.qualname(self.op, case.backend)]
        if self.has_grad:
            expected.append(registry.qualname(self.op, case.backend, backward=True))
        for name in expected:
            assert name in ran, f"{name} did not run (ran: {sorted(ran)})"
        for name in expected:
            f, args, kwargs = ran[name]
            grad = name == expected[0] and self.has_grad
            args = tuple(_detached(a, requires_grad=grad) for a in args)
            if self.opcheck_utils is None:
                torch.library.opcheck(f, args, kwargs)
            else:
                torch.library.opcheck(f, args, kwargs, test_utils=self.opcheck_utils)

    def test_compile(self, case):
        inputs = self._small(case)
        t = _tensors(inputs)

        def call(*ts):
            full = list(inputs)
            for i, v in zip(t, ts):
                full[i] = v
            return self.fn(*full, backend=case.backend)

        torch._dynamo.reset()
        compiled = torch.compile(call, fullgraph=True, backend=self.compile_backend)
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            leaves = [_detached(inputs[i], requires_grad=i in self.grad_inputs and self.has_grad) for i in t]
            got = compiled(*leaves)
        eager_leaves = [_detached(v, requires_grad=v.requires_grad) for v in leaves]
        expected = call(*eager_leaves)
        self.assert_same(got, expected, None, case.backend, "compiled")
        if self.has_grad:
            go = self._upstream(expected.shape, expected.dtype, expected.device)
            diff = [i for i, pos in enumerate(t) if pos in self.grad_inputs]
            got_g = torch.autograd.grad(got, [leaves[i] for i in diff], go)
            exp_g = torch.autograd.grad(expected, [eager_leaves[i] for i in diff], go)
            for a, b in zip(got_g, exp_g):
                self.assert_same(a, b, a.dtype, case.backend, "compiled gradient")

    def test_export(self, case):
        inputs = self._small(case)
        t = _tensors(inputs)
        fn = self.fn

        class Call(torch.nn.Module):
            def forward(self, *ts):
                full = list(inputs)
                for i, v in zip(t, ts):
                    full[i] = v
                return fn(*full, backend=case.backend)

        tensors = tuple(inputs[i] for i in t)
        ep = torch.export.export(Call(), tensors)
        assert registry.qualname(self.op, case.backend).replace("::", ".") in str(ep.graph)
        self.assert_same(ep.module()(*tensors), Call()(*tensors), torch.float32, case.backend, "exported")
