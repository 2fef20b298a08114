"""roi_align: the conformance suite (every backend against the float64 reference and torchvision, gradients,
registrations, bad input), then the cases it does not cover: modules, 1x1 maps, NaN boxes, thread counts, autocast,
Triton's deterministic backward, CUDA-only behaviour."""

import pytest
import torch
import torchvision

import visionops
from visionops import reference
from visionops.ops._checks import check_pair
from visionops.testing import (
    Bad,
    OpConformance,
    backends_for,
    deterministic,
    make_large_rois,
    make_rois,
    needs_cuda,
    num_threads,
    triton_devices,
)


def _seed(g):
    return int(torch.randint(0, 2**31 - 1, (1,), generator=g))


class TestRoIAlign(OpConformance):
    op = "roi_align"
    covers = ("RoIAlign",)
    layouts = ("contiguous", "channels_last", "non_contiguous")
    # (sampling_ratio, aligned, output_size, large). "large": RoIs much larger than output_size x 4 cells, so bins
    # span 4+ cells per axis (the kernels' per-sample path) and the CPU backward has work on every thread.
    configs = {
        "sr-1": (-1, False, (3, 4), False),
        "sr0_aligned": (0, True, (3, 4), False),
        "sr1": (1, False, 2, False),
        "sr2_aligned": (2, True, 3, False),
        "large_sr0": (0, False, 2, True),
        "large_sr2_aligned": (2, True, (2, 3), True),
    }
    configs_interpreted = ("sr-1", "sr2_aligned", "large_sr2_aligned")
    threads = (1, 2)  # the C++ forward and backward at one and two threads (each must match the reference)
    has_grad = True
    grad_inputs = (0,)
    triton_float32 = True
    torchvision_dtypes = (torch.float64, torch.float32, torch.float16)
    torchvision_configs = ("sr-1", "sr2_aligned", "large_sr2_aligned")
    slow = (("test_gradcheck", "triton"),)  # interpreted Triton: ~1 s per forward
    tolerances = {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    }

    def fn(self, x, rois, output_size, scale, sampling_ratio, aligned, *, backend):
        return visionops.roi_align(x, rois, output_size, scale, sampling_ratio, aligned, backend=backend)

    def reference(self, x, rois, output_size, scale, sampling_ratio, aligned):
        return reference.roi_align(x, rois, scale, *check_pair("output_size", output_size), sampling_ratio, aligned)

    def torchvision_fn(self, x, rois, output_size, scale, sampling_ratio, aligned):
        up = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        out = torchvision.ops.roi_align(up, rois.to(up.dtype), output_size, scale, sampling_ratio, aligned)
        return out.to(x.dtype)

    def make_inputs(self, device, dtype, generator, size, config):
        sr, aligned, output_size, large = config
        seed = _seed(generator)
        if large and size == "full":
            x, rois = make_large_rois(seed, dtype=dtype, device=device)
        elif large:  # bins still span several cells
            x, rois = make_large_rois(seed, c=2, h=16, w=16, k=2, dtype=dtype, device=device)
        else:
            shape = {"full": {}, "small": dict(k=3, h=6, w=7), "tiny": dict(c=2, h=5, w=6, k=5)}[size]
            x, rois = make_rois(seed, dtype=dtype, device=device, **shape)
        if size == "small":  # interpreted Triton runs a Python program per (RoI, bin): few of each
            output_size = (2, 3)
        return x, rois, output_size, 0.5, sr, aligned

    def empty_inputs(self, device, dtype):
        x, rois = make_rois(0, dtype=dtype, device=device)
        return {"no_rois": (x, rois[:0], 2, 0.5, -1, False), "no_channels": (x[:, :0], rois, (2, 3), 0.5, 2, True)}

    def bad_inputs(self):
        x, rois = make_rois(0)
        ra = visionops.roi_align
        native = ("cpp", "reference")  # batch indices are range-checked on the CPU (Triton: zeros, as on CUDA)
        return [
            Bad(
                "batch_index_too_large",
                lambda b: ra(x, torch.tensor([[2.0, 0, 0, 4, 4]]), 2, backend=b),
                IndexError,
                "batch index",
                native,
            ),
            Bad(
                "batch_index_negative",
                lambda b: ra(x, torch.tensor([[-1.0, 0, 0, 4, 4]]), 2, backend=b),
                IndexError,
                "batch index",
                native,
            ),
            Bad("boxes_4_columns", lambda b: ra(x, rois[:, :4], 2, backend=b), ValueError, "boxes"),
            Bad("boxes_list_3_columns", lambda b: ra(x, [rois[:, :3]], 2, backend=b), ValueError, r"boxes\[0\]"),
            Bad("boxes_integer", lambda b: ra(x, rois.long(), 2, backend=b), TypeError, "boxes"),
            Bad("output_size_zero", lambda b: ra(x, rois, 0, backend=b), ValueError, "output_size"),
            Bad("output_size_negative", lambda b: ra(x, rois, (3, -1), backend=b), ValueError, "output_size"),
            Bad("output_size_float", lambda b: ra(x, rois, 2.5, backend=b), TypeError, "output_size"),
            Bad(
                "input_empty_map",
                lambda b: ra(x[:, :, :0], rois, 2, backend=b),
                ValueError,
                "input.*non-empty feature map",
            ),
            Bad("input_3d", lambda b: ra(x[0], rois, 2, backend=b), ValueError, "input"),
            Bad("input_integer", lambda b: ra(x.long(), rois, 2, backend=b), TypeError, "input"),
            Bad("sampling_ratio_float", lambda b: ra(x, rois, 2, 1.0, 1.5, backend=b), TypeError, "sampling_ratio"),
            Bad("spatial_scale_string", lambda b: ra(x, rois, 2, "1", backend=b), TypeError, "spatial_scale"),
            Bad("backend_unknown", lambda b: ra(x, rois, 2, backend="nope"), ValueError, "backend"),
            Bad("boxes_other_device", lambda b: ra(x, rois.to("meta"), 2, backend=b), ValueError, "boxes.*device"),
        ]


# ---- beyond the conformance suite --------------------------------------------------------------------------------


def test_boxes_list_form_and_modules():
    x, rois = make_rois(4, k=10)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
    expect = visionops.roi_align(x, rois[order], 3, 0.5, 2)
    torch.testing.assert_close(visionops.roi_align(x, per_image, 3, 0.5, 2), expect)
    torch.testing.assert_close(visionops.RoIAlign(3, 0.5, 2)(x, per_image), expect)
    tv = torchvision.ops.RoIAlign(3, 0.5, 2, aligned=True)(x, per_image)
    torch.testing.assert_close(visionops.RoIAlign(3, 0.5, 2, aligned=True)(x, per_image), tv, atol=1e-5, rtol=1e-5)
    assert "sampling_ratio=2" in repr(visionops.RoIAlign(3, 0.5, 2))


@pytest.mark.parametrize("backend", backends_for("cpu", "roi_align"))
def test_one_by_one_map(backend):
    x = torch.randn(2, 4, 1, 1, generator=torch.Generator().manual_seed(0))
    rois = torch.tensor([[1, -2.0, -2.0, 3.0, 3.0], [0, 0.0, 0.0, 0.4, 0.4]])
    expect = reference.roi_align(x.double(), rois.double(), 1.0, 2, 2, -1, True)
    torch.testing.assert_close(
        visionops.roi_align(x, rois, 2, 1.0, -1, True, backend=backend), expect.float(), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_gradient_to_boxes_and_no_double_backward(backend):
    if backend not in backends_for("cpu", "roi_align"):
        pytest.skip("needs triton")
    x, rois = make_rois(5, dtype=torch.float64, k=4, h=5, w=6)
    x.requires_grad_(True)
    rois.requires_grad_(True)
    out = visionops.roi_align(x, rois, 2, 0.5, 2, backend=backend)
    gx, gb = torch.autograd.grad(out.sum(), (x, rois), create_graph=True, allow_unused=True)
    assert gb is None
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_cpu_backward_bit_identical_across_thread_counts():
    x, rois = make_rois(6, c=40, h=20, w=24, k=300)
    go = torch.randn(300, 40, 5, 5, generator=torch.Generator().manual_seed(0))
    grads = []
    for threads in (1, 2, 3, 1):
        with num_threads(threads):
            grads.append(torch.ops.visionops._roi_align_backward(go, rois, 0.5, 5, 5, 2, 40, 20, 24, -1, True))
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_autocast_half_features_float_boxes(device):
    x, rois = make_rois(8, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dtype):
        out = visionops.roi_align(x.to(dtype), rois, 3, 0.5, 2, True)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.float(), visionops.roi_align(x.to(dtype).float(), rois, 3, 0.5, 2, True), atol=1e-2, rtol=1e-2
    )


@pytest.mark.parametrize(
    "backend,sr",
    [pytest.param(b, sr) for b in backends_for("cpu", "roi_align") for sr in (-1, 2)],
)
def test_nan_inf_boxes_are_defined(backend, sr):
    """A sample at a NaN coordinate, or in a RoI whose grid is not finite, contributes nothing: forward and
    gradient equal the reference's (finite; exactly zero for the NaN RoI)."""
    x, rois = make_rois(9, k=5, h=6, w=7, dtype=torch.float64)
    rois[0, 1] = float("nan")
    rois[1, 3] = float("inf")
    rois[2, 2] = -float("inf")
    go = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    out = visionops.roi_align(xg, rois, 2, 0.5, sr, True, backend=backend)
    (g,) = torch.autograd.grad(out, xg, go)
    xr = x.clone().requires_grad_(True)
    expect = reference.roi_align(xr, rois, 0.5, 2, 2, sr, True)
    (ge,) = torch.autograd.grad(expect, xr, go)
    tol = 1e-5 if backend == "triton" else 1e-9
    torch.testing.assert_close(out, expect, atol=tol, rtol=tol)
    torch.testing.assert_close(g, ge, atol=tol, rtol=tol)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert not out[0].any()
    (g0,) = torch.autograd.grad(visionops.roi_align(xg, rois[:1], 2, 0.5, sr, True, backend=backend), xg, go[:1])
    assert not g0.any(), "the NaN RoI sends no gradient"


# ---- Triton: the deterministic (fixed-point) backward --------------------------------------------------------------

needs_triton = pytest.mark.skipif(not triton_devices(), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
TRITON_DEVICE = (triton_devices() or ["cpu"])[0]


def _triton_backward(go, x, rois, det):
    with deterministic(det):
        return torch.ops.visionops.triton_roi_align_backward(go, rois, 0.5, 2, 3, *x.shape, 2, True)


@needs_triton
def test_triton_deterministic_backward():
    x, rois = make_rois(0, k=4, h=6, w=7, c=2, device=TRITON_DEVICE)
    go = torch.randn(4, 2, 2, 3, generator=torch.Generator().manual_seed(1)).to(TRITON_DEVICE)
    det = _triton_backward(go, x, rois, True)
    assert det.dtype == torch.float32 and det.shape == x.shape
    assert torch.equal(det, _triton_backward(go, x, rois, True))  # run to run
    perm = torch.randperm(4, generator=torch.Generator().manual_seed(2)).to(TRITON_DEVICE)
    assert torch.equal(det, _triton_backward(go[perm], x, rois[perm], True))  # whatever order the RoIs come in
    scale = go.abs().max().item()
    torch.testing.assert_close(det, _triton_backward(go, x, rois, False), rtol=1e-6, atol=1e-6 * scale)
    xr = x.detach().double().cpu().requires_grad_(True)
    (expect,) = torch.autograd.grad(
        reference.roi_align(xr, rois.double().cpu(), 0.5, 2, 3, 2, True), xr, go.double().cpu()
    )
    torch.testing.assert_close(det.double().cpu(), expect, rtol=1e-6, atol=1e-6 * scale)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_triton_deterministic_backward_keeps_grad_dtype(dtype):
    x, rois = make_rois(1, k=3, h=5, w=6, c=2, dtype=dtype, device=TRITON_DEVICE)
    go = torch.randn(3, 2, 2, 3, generator=torch.Generator().manual_seed(3)).to(TRITON_DEVICE, dtype)
    det = _triton_backward(go, x, rois, True)
    assert det.dtype == dtype
    t = 1e-6 if dtype == torch.float64 else 1e-2
    torch.testing.assert_close(det, _triton_backward(go, x, rois, False), rtol=t, atol=t)


@needs_triton
def test_triton_deterministic_backward_non_finite_like_float_sum():
    x, rois = make_rois(2, k=4, h=5, w=6, device=TRITON_DEVICE)
    rois[:, 1:] = torch.tensor([1.0, 1.0, 9.0, 7.0])  # all RoIs on the same cells, so specials meet
    go = torch.randn(4, 3, 2, 3, generator=torch.Generator().manual_seed(4)).to(TRITON_DEVICE)
    go[0, 0, 0, 0] = float("nan")
    go[1, 1, 0, 1] = float("inf")
    go[2, 1, 1, 2] = float("inf")
    go[3, 2, 1, 1] = -float("inf")
    go[2, 2, 1, 1] = float("inf")  # meets the -inf: NaN
    det = _triton_backward(go, x, rois, True)
    fl = _triton_backward(go, x, rois, False)
    assert det.isnan().any() and det.isinf().any()
    assert torch.equal(det.isnan(), fl.isnan()) and torch.equal(det.isinf(), fl.isinf())
    torch.testing.assert_close(det, fl, rtol=1e-6, atol=1e-5, equal_nan=True)


@needs_triton
@pytest.mark.parametrize("det", [False, True])
def test_triton_backward_no_rois(det):
    x, rois = make_rois(0, k=0, device=TRITON_DEVICE)
    go = torch.zeros(0, 3, 2, 3, device=TRITON_DEVICE)
    g = _triton_backward(go, x, rois, det)
    assert g.shape == x.shape and not g.any()
    with deterministic(det):
        xg = x.clone().requires_grad_(True)
        out = visionops.roi_align(xg, rois, (2, 3), 0.5, 2, True, backend="triton")
        out.sum().backward()
    assert out.shape == (0, 3, 2, 3) and not xg.grad.any()


# ---- CUDA ------------------------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_deterministic_backward_bit_identical():
    x, rois = make_rois(3, c=16, h=30, w=40, k=500, device="cuda")
    go = torch.randn(500, 16, 7, 7, device="cuda")
    args = (go, rois, 0.5, 7, 7, 2, 16, 30, 40, 2, True)
    with deterministic():
        a = torch.ops.visionops._roi_align_backward(*args)
        b = torch.ops.visionops._roi_align_backward(*args)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.ops.visionops._roi_align_backward(*args), atol=1e-5, rtol=1e-5)


@needs_cuda
def test_cuda_invalid_batch_index_gives_zeros_and_no_gradient():
    """On CUDA an out-of-range batch index is not checked (a sync): that RoI pools zeros and sends no gradient, so
    the input gradient is exactly the other RoIs' gradient."""
    x, rois = make_rois(3, device="cuda", dtype=torch.float64)
    rois[0, 0] = 5
    rois[1, 0] = -1
    go = torch.randn(rois.shape[0], 3, 2, 2, device="cuda", dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    out = visionops.roi_align(xg, rois, 2, 0.5)
    assert not out[:2].any()
    (g,) = torch.autograd.grad(out, xg, go)
    xr = x.detach().cpu().requires_grad_(True)
    expect = reference.roi_align(xr, rois[2:].cpu(), 0.5, 2, 2, -1, False)
    (ge,) = torch.autograd.grad(expect, xr, go[2:].cpu())
    torch.testing.assert_close(out[2:].cpu(), expect, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(g.cpu(), ge, atol=1e-9, rtol=1e-9)
