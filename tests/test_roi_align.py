"""roi_align: every backend against the float64 reference and torchvision, gradients, registrations, bad input."""

import pytest
import torch
import torchvision
from helpers import DEVICES, FLOAT_DTYPES, backends_for, needs_cuda, triton_devices

import visionops
from visionops import reference

TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def tol(dtype, backend):
    """Triton computes in float32 whatever the input dtype."""
    return max(TOL[dtype], 1e-4) if backend == "triton" else TOL[dtype]


def make_case(seed, *, n=2, c=3, h=9, w=11, k=12, scale=0.5, dtype=torch.float32, device="cpu"):
    """Features and RoIs (image coordinates) covering the awkward cases: RoIs partly or wholly outside the map,
    zero width/height, negative coordinates, inverted corners."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    span_x, span_y = w / scale, h / scale
    xy = (torch.rand(k, 2, generator=g, dtype=torch.float64) * 1.6 - 0.3) * torch.tensor([span_x, span_y])
    wh = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([span_x, span_y]) * 0.7
    boxes = torch.cat([xy, xy + wh], 1)
    if k >= 4:
        boxes[0, 2] = boxes[0, 0]  # zero width
        boxes[1, 3] = boxes[1, 1]  # zero height
        boxes[2] = torch.tensor([-3 * span_x, -3 * span_y, -2 * span_x, -2 * span_y])  # wholly outside
        boxes[3, :2], boxes[3, 2:] = boxes[3, 2:].clone(), boxes[3, :2].clone()  # inverted
    idx = torch.randint(0, n, (k, 1), generator=g).to(torch.float64)
    rois = torch.cat([idx, boxes], 1)
    return x.to(dtype=dtype, device=device), rois.to(dtype=dtype, device=device)


def small(backend):
    """The Triton interpreter runs each program in Python: keep its cases tiny."""
    return dict(k=5, h=6, w=7) if backend == "triton" else {}


CONFIGS = [(-1, False), (0, True), (1, False), (2, True), (3, False)]


def configs(backend):
    return CONFIGS[::2] if backend == "triton" else CONFIGS


def layout(x, how):
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "strided":  # same values, every stride doubled
        return torch.stack([x, x], -1)[..., 0]
    return x


def ref(x, rois, *args):
    return reference.roi_align(x.double().cpu(), rois.double().cpu(), *args)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("how", ["contiguous", "channels_last", "strided"])
def test_forward_matches_reference(device, dtype, how):
    for backend in backends_for(device):
        for seed, (sr, aligned) in enumerate(configs(backend)):
            x, rois = make_case(seed, dtype=dtype, device=device, **small(backend))
            x = layout(x, how)
            out = visionops.roi_align(x, rois, (3, 4), 0.5, sr, aligned, backend=backend)
            assert out.dtype == dtype and out.shape == (rois.shape[0], 3, 3, 4)
            expect = ref(x, rois, 0.5, 3, 4, sr, aligned)
            t = tol(dtype, backend)
            torch.testing.assert_close(out.double().cpu(), expect, atol=t, rtol=t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_matches_torchvision(device, dtype):
    for backend in backends_for(device):
        x, rois = make_case(7, dtype=dtype, device=device, **(small(backend) or dict(k=30)))
        for aligned in (False, True):
            for sr in (-1, 2):
                for size in ((2, 3), 7)[: 1 if backend == "triton" else 2]:
                    ours = visionops.roi_align(x, rois, size, 0.5, sr, aligned, backend=backend)
                    tv = torchvision.ops.roi_align(x.float(), rois.float(), size, 0.5, sr, aligned).to(dtype)
                    t = max(tol(dtype, backend), 1e-5)
                    torch.testing.assert_close(ours, tv, atol=t, rtol=t)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_input_gradient(device, dtype):
    for backend in backends_for(device):
        for seed, (sr, aligned) in enumerate(configs(backend)):
            x, rois = make_case(seed + 10, dtype=dtype, device=device, **small(backend))
            x.requires_grad_(True)
            out = visionops.roi_align(x, rois, 3, 0.5, sr, aligned, backend=backend)
            go = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
            (gx,) = torch.autograd.grad(out, x, go)
            xr = x.detach().double().cpu().requires_grad_(True)
            reference.roi_align(xr, rois.double().cpu(), 0.5, 3, 3, sr, aligned).backward(go.double().cpu())
            t = tol(dtype, backend) * 4
            torch.testing.assert_close(gx.double().cpu(), xr.grad, atol=t, rtol=t)


def test_gradient_matches_torchvision():
    x, rois = make_case(3, k=40)
    x.requires_grad_(True)
    go = torch.randn(40, 3, 7, 7)
    (ours,) = torch.autograd.grad(visionops.roi_align(x, rois, 7, 0.5, 2, True), x, go)
    (tv,) = torch.autograd.grad(torchvision.ops.roi_align(x, rois, 7, 0.5, 2, True), x, go)
    torch.testing.assert_close(ours, tv, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradcheck(device, seed):
    for backend in backends_for(device):
        if backend != "cpp":  # reference: autograd itself; triton: compared with the reference's gradient above
            continue
        x, rois = make_case(seed, c=2, h=5, w=6, k=5, dtype=torch.float64, device=device)
        x.requires_grad_(True)
        sr, aligned = [(-1, False), (2, True), (1, True)][seed]
        assert torch.autograd.gradcheck(lambda t: visionops.roi_align(t, rois, 2, 0.5, sr, aligned), x)


@pytest.mark.slow
@pytest.mark.skipif("triton" not in backends_for("cpu") + backends_for(DEVICES[-1]), reason="needs triton")
def test_gradcheck_triton():
    # Triton computes in float32; roi_align is linear in input, so a wide step keeps the differences exact.
    device = DEVICES[-1]
    x, rois = make_case(0, c=1, h=4, w=5, k=3, dtype=torch.float64, device=device)
    x.requires_grad_(True)
    fn = lambda t: visionops.roi_align(t, rois, 2, 0.5, 2, True, backend="triton")  # noqa: E731
    assert torch.autograd.gradcheck(fn, x, eps=1e-2, atol=1e-3, rtol=1e-3)


def test_opcheck():
    x, rois = make_case(0)
    for aligned in (False, True):
        torch.library.opcheck(
            torch.ops.visionops.roi_align.default, (x.requires_grad_(True), rois, 0.5, 3, 3, 2, aligned)
        )
        x = x.detach()
    go = torch.randn(12, 3, 3, 3)
    torch.library.opcheck(torch.ops.visionops._roi_align_backward.default, (go, rois, 0.5, 3, 3, 2, 3, 9, 11, -1, True))


def test_boxes_list_form_and_modules():
    x, rois = make_case(4, k=10)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
    expect = visionops.roi_align(x, rois[order], 3, 0.5, 2)
    torch.testing.assert_close(visionops.roi_align(x, per_image, 3, 0.5, 2), expect)
    torch.testing.assert_close(visionops.RoIAlign(3, 0.5, 2)(x, per_image), expect)
    tv = torchvision.ops.RoIAlign(3, 0.5, 2, aligned=True)(x, per_image)
    torch.testing.assert_close(visionops.RoIAlign(3, 0.5, 2, aligned=True)(x, per_image), tv, atol=1e-5, rtol=1e-5)
    assert "sampling_ratio=2" in repr(visionops.RoIAlign(3, 0.5, 2))


@pytest.mark.parametrize("device", DEVICES)
def test_one_by_one_map_and_empty(device):
    for backend in backends_for(device):
        x = torch.randn(2, 4, 1, 1, device=device)
        rois = torch.tensor([[1, -2.0, -2.0, 3.0, 3.0], [0, 0.0, 0.0, 0.4, 0.4]], device=device)
        torch.testing.assert_close(
            visionops.roi_align(x, rois, 2, 1.0, -1, True, backend=backend).cpu(),
            ref(x, rois, 1.0, 2, 2, -1, True).float(),
            atol=1e-5,
            rtol=1e-5,
        )
        assert visionops.roi_align(x, rois[:0], 2, backend=backend).shape == (0, 4, 2, 2)
        assert visionops.roi_align(x[:, :0], rois, 2, backend=backend).shape == (2, 0, 2, 2)
        xe = x.requires_grad_(True)
        out = visionops.roi_align(xe, rois[:0], 2, backend=backend)
        out.sum().backward()
        assert xe.grad.shape == xe.shape and not xe.grad.any()


def test_no_gradient_to_boxes_and_no_double_backward():
    x, rois = make_case(5, dtype=torch.float64)
    x.requires_grad_(True)
    rois.requires_grad_(True)
    out = visionops.roi_align(x, rois, 2, 0.5, 2)
    gx, gb = torch.autograd.grad(out.sum(), (x, rois), create_graph=True, allow_unused=True)
    assert gb is None
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_cpu_backward_deterministic_across_thread_counts():
    x, rois = make_case(6, c=40, h=20, w=24, k=300)
    go = torch.randn(300, 40, 5, 5)
    old = torch.get_num_threads()
    grads = []
    try:
        for threads in (1, 2, 3, 1):
            torch.set_num_threads(threads)
            grads.append(torch.ops.visionops._roi_align_backward(go, rois, 0.5, 5, 5, 2, 40, 20, 24, -1, True))
    finally:
        torch.set_num_threads(old)
    for g in grads[1:]:
        assert torch.equal(g, grads[0])


@pytest.mark.parametrize("device", DEVICES)
def test_autocast_half_features_float_boxes(device):
    x, rois = make_case(8, device=device)
    dtype = torch.bfloat16 if device == "cpu" else torch.float16
    with torch.autocast(device, dtype=dtype):
        out = visionops.roi_align(x.to(dtype), rois, 3, 0.5, 2, True)
    assert out.dtype == dtype
    torch.testing.assert_close(
        out.float(), visionops.roi_align(x.to(dtype).float(), rois, 3, 0.5, 2, True), atol=1e-2, rtol=1e-2
    )


def test_nan_inf_boxes_are_defined():
    x, rois = make_case(9, k=6)
    rois[0, 1] = float("nan")
    rois[1, 3] = float("inf")
    rois[2, 2] = -float("inf")
    for sr in (-1, 2):
        out = visionops.roi_align(x, rois, 3, 0.5, sr, True)
        torch.testing.assert_close(out, ref(x, rois, 0.5, 3, 3, sr, True).float(), atol=1e-5, rtol=1e-5)
        assert torch.isfinite(out).all()


def test_bad_inputs():
    x, rois = make_case(0)
    with pytest.raises(IndexError, match="batch index"):
        visionops.roi_align(x, torch.tensor([[2.0, 0, 0, 4, 4]]), 2)
    with pytest.raises(IndexError, match="batch index"):
        visionops.roi_align(x, torch.tensor([[-1.0, 0, 0, 4, 4]]), 2)
    with pytest.raises(ValueError, match="boxes"):
        visionops.roi_align(x, rois[:, :4], 2)
    with pytest.raises(ValueError, match=r"boxes\[0\]"):
        visionops.roi_align(x, [rois[:, :3]], 2)
    with pytest.raises(TypeError, match="boxes"):
        visionops.roi_align(x, rois.long(), 2)
    with pytest.raises(ValueError, match="output_size"):
        visionops.roi_align(x, rois, 0)
    with pytest.raises(ValueError, match="output_size"):
        visionops.roi_align(x, rois, (3, -1))
    with pytest.raises(TypeError, match="output_size"):
        visionops.roi_align(x, rois, 2.5)
    with pytest.raises(ValueError, match="non-empty feature map"):
        visionops.roi_align(x[:, :, :0], rois, 2)
    with pytest.raises(ValueError, match="input"):
        visionops.roi_align(x[0], rois, 2)
    with pytest.raises(TypeError, match="input"):
        visionops.roi_align(x.long(), rois, 2)
    with pytest.raises(TypeError, match="sampling_ratio"):
        visionops.roi_align(x, rois, 2, 1.0, 1.5)
    with pytest.raises(ValueError, match="backend"):
        visionops.roi_align(x, rois, 2, backend="nope")
    with pytest.raises(ValueError, match="device"):
        visionops.roi_align(x, rois.to("meta"), 2)


def test_torch_compile():
    x, rois = make_case(1)
    fn = torch.compile(lambda x, r: visionops.roi_align(x, r, 3, 0.5, 2, True), fullgraph=True)
    torch.testing.assert_close(fn(x, rois), visionops.roi_align(x, rois, 3, 0.5, 2, True))


def test_torch_export():
    x, rois = make_case(2)
    ep = torch.export.export(visionops.RoIAlign(3, 0.5, -1, True), (x, rois))
    torch.testing.assert_close(ep.module()(x, rois), visionops.roi_align(x, rois, 3, 0.5, -1, True))


@needs_cuda
def test_cuda_deterministic_backward_bit_identical():
    x, rois = make_case(3, c=16, h=30, w=40, k=500, device="cuda")
    go = torch.randn(500, 16, 7, 7, device="cuda")
    args = (go, rois, 0.5, 7, 7, 2, 16, 30, 40, 2, True)
    torch.use_deterministic_algorithms(True)
    try:
        a = torch.ops.visionops._roi_align_backward(*args)
        b = torch.ops.visionops._roi_align_backward(*args)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, torch.ops.visionops._roi_align_backward(*args), atol=1e-5, rtol=1e-5)


@needs_cuda
def test_cuda_invalid_batch_index_gives_zeros():
    x, rois = make_case(3, device="cuda")
    rois[0, 0] = 5
    x.requires_grad_(True)
    out = visionops.roi_align(x, rois, 2, 0.5)
    assert not out[0].any()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.skipif(not triton_devices(), reason="needs triton")
def test_opcheck_triton_ops():
    import visionops.triton.roi  # noqa: F401  (registers the triton_* ops)

    ops = torch.ops.visionops
    device = triton_devices()[0]
    x, rois = make_case(0, c=2, h=4, w=5, k=2, device=device)
    go = torch.randn(2, 2, 2, 2, device=device)
    torch.library.opcheck(ops.triton_roi_align.default, (x.clone().requires_grad_(True), rois, 0.5, 2, 2, 2, True))
    torch.library.opcheck(ops.triton_roi_align_backward.default, (go, rois, 0.5, 2, 2, 2, 2, 4, 5, -1, False))
    torch.library.opcheck(ops.triton_roi_pool.default, (x.clone().requires_grad_(True), rois, 0.5, 2, 2))
    torch.library.opcheck(ops.triton_roi_pool_backward.default, (go, x, rois, 0.5, 2, 2))
