"""roi_pool: every backend against the float64 reference and torchvision, gradients, registrations, bad input."""

import pytest
import torch
import torchvision
from helpers import DEVICES, FLOAT_DTYPES, backends_for, needs_cuda
from test_roi_align import layout, make_case, small, tol

import visionops
from visionops import reference


def ref(x, rois, *args):
    return reference.roi_pool(x.double().cpu(), rois.double().cpu(), *args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("how", ["contiguous", "channels_last", "strided"])
def test_forward_matches_reference(device, dtype, how):
    for backend in backends_for(device):
        for seed, (size, scale) in enumerate([((3, 4), 0.5), (2, 1.0), (5, 0.25)][: 1 if backend == "triton" else 3]):
            x, rois = make_case(seed, dtype=dtype, device=device, scale=scale, **small(backend))
            out = visionops.roi_pool(layout(x, how), rois, size, scale, backend=backend)
            expect = ref(x, rois, scale, *((size, size) if isinstance(size, int) else size))
            assert out.dtype == dtype
            t = tol(dtype, backend)
            torch.testing.assert_close(out.double().cpu(), expect, atol=t, rtol=t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_forward_and_gradient_match_torchvision(device, dtype):
    for backend in backends_for(device):
        x, rois = make_case(3, dtype=dtype, device=device, **(small(backend) or dict(k=40)))
        x.requires_grad_(True)
        size = (2, 3) if backend == "triton" else 7
        ours = visionops.roi_pool(x, rois, size, 0.5, backend=backend)
        tv = torchvision.ops.roi_pool(x, rois, size, 0.5)
        torch.testing.assert_close(ours, tv)
        go = torch.randn(ours.shape, dtype=dtype, device=device)
        (g_ours,) = torch.autograd.grad(ours, x, go)
        (g_tv,) = torch.autograd.grad(tv, x, go)
        t = tol(dtype, backend)
        torch.testing.assert_close(g_ours, g_tv, atol=t, rtol=t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_input_gradient(device, dtype):
    for backend in backends_for(device):
        x, rois = make_case(11, dtype=dtype, device=device, **small(backend))
        x.requires_grad_(True)
        out = visionops.roi_pool(layout(x, "channels_last"), rois, 3, 0.5, backend=backend)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
        (gx,) = torch.autograd.grad(out, x, go)
        xr = x.detach().double().cpu().requires_grad_(True)
        reference.roi_pool(xr, rois.double().cpu(), 0.5, 3, 3).backward(go.double().cpu())
        t = tol(dtype, backend) * 4
        torch.testing.assert_close(gx.double().cpu(), xr.grad, atol=t, rtol=t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, seed):
    # Distinct values a few eps apart would let the finite difference flip the argmax: use a well-separated input.
    x, rois = make_case(seed, c=2, h=5, w=6, k=5, dtype=torch.float64, device=device)
    x = (torch.randperm(x.numel(), generator=torch.Generator().manual_seed(seed)).reshape(x.shape) * 0.1).to(x)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: visionops.roi_pool(t, rois, 2, 0.5), x)


def test_opcheck():
    x, rois = make_case(0)
    torch.library.opcheck(torch.ops.visionops.roi_pool.default, (x.requires_grad_(True), rois, 0.5, 3, 3))
    go = torch.randn(12, 3, 3, 3)
    torch.library.opcheck(torch.ops.visionops._roi_pool_backward.default, (go, x.detach(), rois, 0.5, 3, 3))


def test_ties_nan_and_all_negative_bins():
    x = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    x[0, 1] = -1e39  # below -FLT_MAX (representable in float64 only)
    x[0, 0, 1, 1] = float("nan")
    rois = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]], dtype=torch.float64)
    x.requires_grad_(True)
    out = visionops.roi_pool(x, rois, 2)
    tv = torchvision.ops.roi_pool(x, rois, 2)
    torch.testing.assert_close(out, tv, equal_nan=True)
    (g,) = torch.autograd.grad(out.sum(), x)
    (gt,) = torch.autograd.grad(tv.sum(), x)
    torch.testing.assert_close(g, gt)  # ties: the first maximum; NaN never wins; nothing above -FLT_MAX: no grad


@pytest.mark.parametrize("device", DEVICES)
def test_bin_edge_is_divided_not_multiplied_by_reciprocal(device):
    # A RoI 3 cells wide pooled to 5: bin = 3 / 5 and bin 4 ends at ceil(5 * 0.6) = 3. CUDA's tensor / number
    # computes 3 * (1 / 5) = 0.6000000000000001 instead, which ends the bin at cell 4 (the reference backend did).
    x = torch.arange(8, dtype=torch.float64, device=device).reshape(1, 1, 1, 8)
    rois = torch.tensor([[0, 0.0, 0.0, 2.0, 0.0]], dtype=torch.float64, device=device)
    expect = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    for backend in backends_for(device):
        out = visionops.roi_pool(x, rois, (1, 5), backend=backend)
        torch.testing.assert_close(out.flatten().cpu(), expect, atol=0, rtol=0)
        torch.testing.assert_close(out, torchvision.ops.roi_pool(x, rois, (1, 5)))


def test_boxes_list_form_modules_empty():
    x, rois = make_case(4, k=10)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
    expect = visionops.roi_pool(x, rois[order], 3, 0.5)
    torch.testing.assert_close(visionops.RoIPool(3, 0.5)(x, per_image), expect)
    torch.testing.assert_close(torchvision.ops.RoIPool(3, 0.5)(x, per_image), expect)
    assert "output_size=3" in repr(visionops.RoIPool(3, 0.5))
    assert visionops.roi_pool(x, rois[:0], 2).shape == (0, 3, 2, 2)
    assert visionops.roi_pool(x[:, :0], rois, 2).shape == (10, 0, 2, 2)
    one = torch.randn(1, 2, 1, 1)
    torch.testing.assert_close(
        visionops.roi_pool(one, torch.tensor([[0, 0.0, 0, 5, 5]]), 2),
        torchvision.ops.roi_pool(one, torch.tensor([[0, 0.0, 0, 5, 5]]), 2),
    )


def test_cpu_backward_deterministic_across_thread_counts():
    x, rois = make_case(6, c=40, h=20, w=24, k=300)
    go = torch.randn(300, 40, 4, 4)
    old = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            grads.append(torch.ops.visionops._roi_pool_backward(go, x, rois, 0.5, 4, 4))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_no_gradient_to_boxes_and_no_double_backward():
    x, rois = make_case(5, dtype=torch.float64)
    x.requires_grad_(True)
    rois.requires_grad_(True)
    out = visionops.roi_pool(x, rois, 2, 0.5)
    gx, gb = torch.autograd.grad(out.sum(), (x, rois), create_graph=True, allow_unused=True)
    assert gb is None
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_half_features_float_boxes(device):
    x, rois = make_case(8, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dtype):
        out = visionops.roi_pool(x.to(dtype), rois, 3, 0.5)
    assert out.dtype == dtype
    torch.testing.assert_close(out, visionops.roi_pool(x.to(dtype), rois.to(dtype), 3, 0.5), atol=0.05, rtol=0.05)


def test_nan_inf_inverted_boxes_are_defined():
    x, rois = make_case(9, k=6)
    rois[0, 1] = float("nan")
    rois[1, 3] = float("inf")
    rois[2, 2] = -float("inf")
    out = visionops.roi_pool(x, rois, 3, 0.5)
    torch.testing.assert_close(out, ref(x, rois, 0.5, 3, 3).float())
    assert not out[0].any()


def test_bad_inputs():
    x, rois = make_case(0)
    with pytest.raises(IndexError, match="batch index"):
        visionops.roi_pool(x, torch.tensor([[2.0, 0, 0, 4, 4]]), 2)
    with pytest.raises(IndexError, match="batch index"):
        visionops.roi_pool(x, torch.tensor([[-1.0, 0, 0, 4, 4]]), 2)
    with pytest.raises(ValueError, match="boxes"):
        visionops.roi_pool(x, rois[:, 1:], 2)
    with pytest.raises(ValueError, match="output_size"):
        visionops.roi_pool(x, rois, (0, 2))
    with pytest.raises(ValueError, match="non-empty feature map"):
        visionops.roi_pool(x[..., :0], rois, 2)
    with pytest.raises(TypeError, match="spatial_scale"):
        visionops.roi_pool(x, rois, 2, "1")
    with pytest.raises(ValueError, match="device"):
        visionops.roi_pool(x, [rois[:, 1:].to("meta")], 2)


def test_torch_compile():
    x, rois = make_case(1)
    fn = torch.compile(lambda x, r: visionops.roi_pool(x, r, 3, 0.5), fullgraph=True)
    torch.testing.assert_close(fn(x, rois), visionops.roi_pool(x, rois, 3, 0.5))


def test_torch_export():
    x, rois = make_case(2)
    ep = torch.export.export(visionops.RoIPool(3, 0.5), (x, rois))
    torch.testing.assert_close(ep.module()(x, rois), visionops.roi_pool(x, rois, 3, 0.5))


@needs_cuda
def test_cuda_deterministic_backward_bit_identical():
    x, rois = make_case(3, c=16, h=30, w=40, k=500, device="cuda")
    go = torch.randn(500, 16, 7, 7, device="cuda")
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.ops.visionops._roi_pool_backward(go, x, rois, 0.5, 7, 7)
        b = torch.ops.visionops._roi_pool_backward(go, x, rois, 0.5, 7, 7)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.ops.visionops._roi_pool_backward(go, x, rois, 0.5, 7, 7))
