"""roi_pool: the conformance suite (every backend against the float64 reference and torchvision, gradients,
registrations, bad input), then ties and NaNs, bin edges, modules, thread counts, autocast, Triton's deterministic
backward and CUDA-only behaviour."""

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


class TestRoIPool(OpConformance):
    op = "roi_pool"
    covers = ("RoIPool",)
    layouts = ("contiguous", "channels_last", "non_contiguous")
    # (output_size, spatial_scale, large): "large" bins span many cells (RoIs of most of a bigger map)
    configs = {
        "3x4_scale0.5": ((3, 4), 0.5, False),
        "2_scale1": (2, 1.0, False),
        "5_scale0.25": (5, 0.25, False),
        "large": ((2, 3), 0.5, True),
    }
    configs_interpreted = ("3x4_scale0.5", "large")
    threads = (1, 2)
    has_grad = True
    grad_inputs = (0,)
    triton_float32 = True
    torchvision_dtypes = (torch.float64, torch.float32)
    slow = (("test_gradcheck", "triton"),)
    tolerances = {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    }

    def fn(self, x, rois, output_size, scale, *, backend):
        return visionops.roi_pool(x, rois, output_size, scale, backend=backend)

    def reference(self, x, rois, output_size, scale):
        return reference.roi_pool(x, rois, scale, *check_pair("output_size", output_size))

    def torchvision_fn(self, x, rois, output_size, scale):
        return torchvision.ops.roi_pool(x, rois, output_size, scale)

    def make_inputs(self, device, dtype, generator, size, config):
        output_size, scale, large = config
        seed = _seed(generator)
        if large:
            shape = dict(c=2, h=12, w=14, k=2) if size != "full" else {}
            x, rois = make_large_rois(seed, scale=scale, dtype=dtype, device=device, **shape)
        else:
            shape = {"full": {}, "small": dict(k=3, h=6, w=7), "tiny": dict(c=2, h=5, w=6, k=5)}[size]
            x, rois = make_rois(seed, scale=scale, dtype=dtype, device=device, **shape)
        if size == "tiny":  # distinct values far apart: a finite difference must not move the maximum
            x = (torch.randperm(x.numel(), generator=generator).reshape(x.shape) * 0.1).to(x)
        if size == "small":  # interpreted Triton runs a Python program per (RoI, bin): few of each
            output_size = (2, 3)
        return x, rois, output_size, scale

    def empty_inputs(self, device, dtype):
        x, rois = make_rois(0, dtype=dtype, device=device)
        return {"no_rois": (x, rois[:0], 2, 0.5), "no_channels": (x[:, :0], rois, (2, 3), 0.5)}

    def bad_inputs(self):
        x, rois = make_rois(0)
        rp = visionops.roi_pool
        native = ("cpp", "reference")  # batch indices are range-checked on the CPU (Triton: zeros, as on CUDA)
        return [
            Bad(
                "batch_index_too_large",
                lambda b: rp(x, torch.tensor([[2.0, 0, 0, 4, 4]]), 2, backend=b),
                IndexError,
                "batch index",
                native,
            ),
            Bad(
                "batch_index_negative",
                lambda b: rp(x, torch.tensor([[-1.0, 0, 0, 4, 4]]), 2, backend=b),
                IndexError,
                "batch index",
                native,
            ),
            Bad("boxes_4_columns", lambda b: rp(x, rois[:, 1:], 2, backend=b), ValueError, "boxes"),
            Bad("boxes_integer", lambda b: rp(x, rois.long(), 2, backend=b), TypeError, "boxes"),
            Bad("output_size_zero", lambda b: rp(x, rois, (0, 2), backend=b), ValueError, "output_size"),
            Bad(
                "input_empty_map",
                lambda b: rp(x[..., :0], rois, 2, backend=b),
                ValueError,
                "input.*non-empty feature map",
            ),
            Bad("input_integer", lambda b: rp(x.long(), rois, 2, backend=b), TypeError, "input"),
            Bad("spatial_scale_string", lambda b: rp(x, rois, 2, "1", backend=b), TypeError, "spatial_scale"),
            Bad(
                "boxes_list_other_device",
                lambda b: rp(x, [rois[:, 1:].to("meta")], 2, backend=b),
                ValueError,
                r"boxes\[0\].*device",
            ),
            Bad("backend_unknown", lambda b: rp(x, rois, 2, backend="fast"), ValueError, "backend"),
        ]


# ---- beyond the conformance suite --------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # -1e39 in the interpreter
@pytest.mark.parametrize("backend", backends_for("cpu", "roi_pool"))
def test_ties_nan_and_all_negative_bins(backend):
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    x[0, 1] = -1e39  # below -FLT_MAX (representable in float64 only)
    x[0, 0, 1, 1] = float("nan")
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    x.requires_grad_(True)
    out = visionops.roi_pool(x, rois, 2, backend=backend)
    tv = torchvision.ops.roi_pool(x, rois, 2)
    torch.testing.assert_close(out, tv, equal_nan=True)
    (g,) = torch.autograd.grad(out.sum(), x)
    (gt,) = torch.autograd.grad(tv.sum(), x)
    torch.testing.assert_close(g, gt)  # ties: the first maximum; NaN never wins; nothing above -FLT_MAX: no grad


@pytest.mark.parametrize("backend", backends_for("cpu", "roi_pool"))
def test_bin_edge_is_divided_not_multiplied_by_reciprocal(backend):
    # A RoI 3 cells wide pooled to 5: bin = 3 / 5 and bin 4 ends at ceil(5 * 0.6) = 3. CUDA's tensor / number
    # computes 3 * (1 / 5) = 0.6000000000000001 instead, which ends the bin at cell 4 (the reference backend did).
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() and backend != "triton" else []):
        x = torch.arange(8, dtype=torch.float64, device=device).reshape(1, 1, 1, 8)
        rois = torch.tensor([[0, 0.0, 0.0, 2.0, 0.0]], dtype=torch.float64, device=device)
        expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0], dtype=torch.float64)
        out = visionops.roi_pool(x, rois, (1, 5), backend=backend)
        torch.testing.assert_close(out.flatten().cpu(), expect, atol=0, rtol=0)
        torch.testing.assert_close(out, torchvision.ops.roi_pool(x, rois, (1, 5)))


def test_boxes_list_form_modules_one_cell_map():
    x, rois = make_rois(4, k=10)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
    expect = visionops.roi_pool(x, rois[order], 3, 0.5)
    torch.testing.assert_close(visionops.RoIPool(3, 0.5)(x, per_image), expect)
    torch.testing.assert_close(torchvision.ops.RoIPool(3, 0.5)(x, per_image), expect)
    assert "output_size=3" in repr(visionops.RoIPool(3, 0.5))
    one = torch.randn(1, 2, 1, 1)
    torch.testing.assert_close(
        visionops.roi_pool(one, torch.tensor([[0, 0.0, 0, 5, 5]]), 2),
        torchvision.ops.roi_pool(one, torch.tensor([[0, 0.0, 0, 5, 5]]), 2),
    )


def test_cpu_backward_bit_identical_across_thread_counts():
    x, rois = make_rois(6, c=40, h=20, w=24, k=300)
    go = torch.randn(300, 40, 4, 4, generator=torch.Generator().manual_seed(0))
    grads = []
    for threads in (1, 2, 3):
        with num_threads(threads):
            grads.append(torch.ops.visionops._roi_pool_backward(go, x, rois, 0.5, 4, 4))
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_gradient_to_boxes_and_no_double_backward(backend):
    if backend not in backends_for("cpu", "roi_pool"):
        pytest.skip("needs triton")
    x, rois = make_rois(5, dtype=torch.float64, k=4, h=5, w=6)
    x.requires_grad_(True)
    rois.requires_grad_(True)
    out = visionops.roi_pool(x, rois, 2, 0.5, backend=backend)
    gx, gb = torch.autograd.grad(out.sum(), (x, rois), create_graph=True, allow_unused=True)
    assert gb is None
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_autocast_half_features_float_boxes(device):
    x, rois = make_rois(8, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dtype):
        out = visionops.roi_pool(x.to(dtype), rois, 3, 0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, visionops.roi_pool(x.to(dtype), rois.to(dtype), 3, 0.5), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("backend", backends_for("cpu", "roi_pool"))
def test_nan_inf_inverted_boxes_are_defined(backend):
    """A RoI with a NaN corner pools 0 and sends no gradient; infinite and inverted RoIs as the reference."""
    x, rois = make_rois(9, k=5, h=6, w=7, dtype=torch.float64)
    rois[0, 1] = float("nan")
    rois[1, 3] = float("inf")
    rois[2, 2] = -float("inf")
    go = torch.randn(5, 3, 2, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    out = visionops.roi_pool(xg, rois, (2, 3), 0.5, backend=backend)
    (g,) = torch.autograd.grad(out, xg, go)
    xr = x.clone().requires_grad_(True)
    expect = reference.roi_pool(xr, rois, 0.5, 2, 3)
    (ge,) = torch.autograd.grad(expect, xr, go)
    torch.testing.assert_close(out, expect)
    torch.testing.assert_close(g, ge)
    assert not out[0].any()


# ---- Triton: the deterministic (fixed-point) backward --------------------------------------------------------------

needs_triton = pytest.mark.skipif(not triton_devices(), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
TRITON_DEVICE = (triton_devices() or ["cpu"])[0]


def _triton_backward(go, x, rois, det):
    with deterministic(det):
        return torch.ops.visionops.triton_roi_pool_backward(go, x, rois, 0.5, 2, 3)


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
    (expect,) = torch.autograd.grad(reference.roi_pool(xr, rois.double().cpu(), 0.5, 2, 3), xr, go.double().cpu())
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
        out = visionops.roi_pool(xg, rois, (2, 3), 0.5, backend="triton")
        out.sum().backward()
    assert out.shape == (0, 3, 2, 3) and not xg.grad.any()


# ---- CUDA ------------------------------------------------------------------------------------------------------------


@needs_cuda
def test_cuda_deterministic_backward_bit_identical():
    x, rois = make_rois(3, c=16, h=30, w=40, k=500, device="cuda")
    go = torch.randn(500, 16, 7, 7, device="cuda")
    with deterministic():
        a = torch.ops.visionops._roi_pool_backward(go, x, rois, 0.5, 7, 7)
        b = torch.ops.visionops._roi_pool_backward(go, x, rois, 0.5, 7, 7)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.ops.visionops._roi_pool_backward(go, x, rois, 0.5, 7, 7))
