"""Tensors past 2^31 elements: every op family indexes them without wrapping around, or refuses them with a clear
error naming the limit.

The big tests (marked slow: each allocates 5-10 GB and runs for seconds to a minute on the CPU; run them one at a
time with ``python -m pytest tests/test_large.py --runslow -q``) put the region they check past element 2^31 of an
input or an output, and compare a few sampled outputs with the reference run on a small crop of the inputs. Inputs
are filled as row + column (+ channel) values, so an offset that wrapped around would read a different value.
Triton kernels cannot be run interpreted at this size: the tests here check their limits and index helpers, and
``python -m visionops.triton.compile_check`` (tests/test_triton_compile.py) compiles every kernel for sm_90 and checks
that the kernels whose grid runs over flat indices widen their program id to int64 first (on a GPU machine:
``VISIONOPS_LARGE_DEVICE=cuda`` runs the big tests on the C++ CUDA kernels, and with
``VISIONOPS_LARGE_BACKEND=triton VISIONOPS_TEST_CUDA=1`` on the compiled Triton kernels).
"""

import os

import pytest
import torch

import visionops
from visionops import _registry as registry
from visionops.reference import anchors as ref_anchors

TWO31 = 2**31
slow = pytest.mark.slow
# The big tests run on this device: "cpu" by default; VISIONOPS_LARGE_DEVICE=cuda runs them on a GPU (the C++ CUDA
# kernels, and the Triton ones with VISIONOPS_LARGE_BACKEND=triton).
DEVICE = os.environ.get("VISIONOPS_LARGE_DEVICE", "cpu")
BACKEND = os.environ.get("VISIONOPS_LARGE_BACKEND", "cpp")


def _filled(shape, dtype, memory_format=torch.contiguous_format, seed=0):
    """A [N, C, *spatial] tensor whose element is row value + column value + channel value (one pass to fill; any
    two positions a wrapped offset could confuse hold different values)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.empty(shape, dtype=dtype, device=DEVICE, memory_format=memory_format)
    rows = (torch.rand(shape[-2], generator=g, dtype=torch.float64) * 4).to(dtype).to(DEVICE)
    cols = (torch.rand(shape[-1], generator=g, dtype=torch.float64) * 4).to(dtype).to(DEVICE)
    chans = (torch.rand(shape[1], generator=g, dtype=torch.float64) * 4).to(dtype).to(DEVICE)
    lead = [1] * (len(shape) - 2)
    rc = rows.view(*lead, -1, 1) + cols.view(*lead, 1, -1)  # [1, .., H, W]
    ch = chans.view(1, -1, *([1] * (len(shape) - 2)))
    torch.add(rc.expand(shape), ch.expand(shape), out=t)
    return t


def _past(t) -> bool:
    return t.numel() > TWO31


# ---- NMS family ------------------------------------------------------------------------------------------------


@slow
def test_box_iou_output_past_2_31():
    g = torch.Generator().manual_seed(1)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 100
        return torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g) * 30], 1).to(torch.float16).to(DEVICE)

    a, b = boxes(81920), boxes(32769)  # [81920, 32769]: 2.68e9 IoUs, 5.4 GB of float16
    out = visionops.box_iou(a, b, backend=BACKEND)
    assert _past(out)
    for r in (0, 65536, 70000, 81919):  # rows 65536+ lie past element 2^31
        rows = slice(r, r + 1)
        exp = visionops.box_iou(a[rows].cpu(), b.cpu(), backend="reference")
        torch.testing.assert_close(out[rows].cpu(), exp, atol=2e-3, rtol=2e-3)


@slow
@pytest.mark.skipif(DEVICE == "cpu", reason="the CPU NMS keeps no bitmask; run with VISIONOPS_LARGE_DEVICE=cuda")
def test_nms_bitmask_past_2_31():
    # 400k boxes of one class: the GPU kernels' [N, N / 64] bitmask has 2.5e9 words (20 GB), past 2^31
    g = torch.Generator().manual_seed(16)
    n = 400_000
    xy = torch.rand(n, 2, generator=g) * 20000
    boxes = torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 40], 1)
    scores = torch.rand(n, generator=g)
    keep = visionops.nms(boxes.to(DEVICE), scores.to(DEVICE), 0.5, backend=BACKEND)
    assert torch.equal(keep.cpu(), visionops.nms(boxes, scores, 0.5, backend="cpp"))


# ---- box coder and anchors -------------------------------------------------------------------------------------


@slow
def test_grid_anchors_output_past_2_31():
    # two images of 441e6 anchors: each image's 1.76e9 values fit in int32 offsets, the [2, N, 4] output (7 GB of
    # float16) does not, so image 1's rows 1500+ lie past element 2^31
    from visionops.ops.anchors import _grid_anchors_op

    cells = visionops.cell_anchors((32, 64, 128), (0.5, 1.0, 2.0), dtype=torch.float16).to(DEVICE)  # 9 anchors
    H = W = 7000
    out = _grid_anchors_op(cells.float(), [9], [H, W], [4.0, 4.0], 0.5, 2, torch.float16, BACKEND)
    assert out.shape == (2, H * W * 9, 4) and _past(out)
    for image, y, x in ((0, 0, 0), (1, 0, 3), (1, 3000, 123), (1, 6999, 6999), (0, 6999, 6998)):
        k = (y * W + x) * 9
        exp = ref_anchors.grid_anchors([(1, 1)], [(4, 4)], [cells.cpu()], offset=0.5).float()
        exp = (exp + torch.tensor([x, y, x, y], dtype=torch.float64).float() * 4).to(torch.float16)
        torch.testing.assert_close(out[image, k : k + 9].cpu(), exp)


@slow
def test_decode_boxes_past_2_31():
    n, k = 2**20 + 2**16, 512  # deltas [1114112, 2048]: 2.28e9 elements (4.6 GB of bfloat16), and the output
    g = torch.Generator().manual_seed(2)
    anchors = torch.rand(n, 4, generator=g) * 50
    anchors[:, 2:] += anchors[:, :2] + 1
    anchors = anchors.to(torch.bfloat16).to(DEVICE)
    # [N, 4K] as rows + columns, small values (the clip never binds)
    rows = (torch.rand(n, 1, generator=g) * 0.5).to(torch.bfloat16).to(DEVICE)
    cols = (torch.rand(1, 4 * k, generator=g) * 0.5).to(torch.bfloat16).to(DEVICE)
    deltas = torch.empty(n, 4 * k, dtype=torch.bfloat16, device=DEVICE)
    torch.add(rows.expand(n, 4 * k), cols.expand(n, 4 * k), out=deltas)
    out = visionops.decode_boxes(deltas, anchors, (10.0, 10.0, 5.0, 5.0), backend=BACKEND)
    assert _past(out)
    for r in (0, 2**20 + 5, n - 1):  # rows past 1048576 lie past element 2^31
        exp = visionops.decode_boxes(deltas[r : r + 1].cpu(), anchors[r : r + 1].cpu(), (10.0, 10.0, 5.0, 5.0),
                                     backend="reference")  # fmt: skip
        torch.testing.assert_close(out[r : r + 1].cpu(), exp)


# ---- xcorr ------------------------------------------------------------------------------------------------------


@slow
def test_xcorr_input_past_2_31():
    # x [1, 16, 11586, 11586] channels_last float32: 2.15e9 elements (8.6 GB), read in place (a float32 channels_last
    # block of whole vectors needs no gathered copy); rows 11585+ lie past element 2^31
    x = _filled((1, 16, 11586, 11586), torch.float32, torch.channels_last, seed=6)
    z = _filled((1, 16, 3, 4), torch.float32, seed=7)
    out = visionops.xcorr(z, x, 0.5, backend=BACKEND)
    assert _past(x)
    for y, xx in ((0, 0), (11583, 11582), (11583, 17), (6000, 6000)):
        crop = x[:, :, y : y + 3, xx : xx + 4].cpu()
        exp = visionops.xcorr(z.cpu(), crop, 0.5, backend="reference")
        torch.testing.assert_close(out[:, :, y : y + 1, xx : xx + 1].cpu(), exp, atol=1e-3, rtol=1e-4)


@slow
def test_depthwise_xcorr_output_past_2_31():
    # x expanded over a batch of 300 (stride 0: 16 MB of memory); the output [300, 2, 2046, 2046] is 2.5e9 elements
    base = _filled((1, 2, 2048, 2048), torch.float16, seed=7)
    x = base.expand(300, 2, 2048, 2048)
    z = _filled((300, 2, 3, 3), torch.float16, seed=8)
    out = visionops.depthwise_xcorr(z, x, backend=BACKEND)
    assert _past(out)
    for b, y, xx in ((0, 0, 0), (299, 2045, 2045), (280, 1000, 7)):  # batch 257+ lies past element 2^31
        exp = visionops.depthwise_xcorr(z[b : b + 1].cpu(), base[:, :, y : y + 3, xx : xx + 3].cpu(),
                                        backend="reference")  # fmt: skip
        torch.testing.assert_close(out[b : b + 1, :, y : y + 1, xx : xx + 1].cpu(), exp, atol=2e-2, rtol=2e-3)


# ---- conv2d / conv3d --------------------------------------------------------------------------------------------


@slow
def test_conv2d_output_past_2_31():
    # [1, 2, 11588, 11588] channels_last float32 in (1 GB), [1, 16, 11586, 11586] out: 2.15e9 elements (8.6 GB)
    x = _filled((1, 2, 11588, 11588), torch.float32, torch.channels_last, seed=9)
    w = torch.randn(16, 2, 3, 3, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    bias = torch.randn(16, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    out = visionops.conv2d(x, w, bias, backend=BACKEND)
    assert _past(out)
    for y, xx in ((0, 0), (11585, 11585), (11000, 300)):  # channels_last: rows 11585+ lie past element 2^31
        crop = x[:, :, y : y + 3, xx : xx + 3].cpu()
        exp = visionops.conv2d(crop, w.cpu(), bias.cpu(), backend="reference")
        torch.testing.assert_close(out[:, :, y : y + 1, xx : xx + 1].cpu(), exp, atol=1e-4, rtol=1e-4)


@slow
def test_conv3d_input_past_2_31():
    # [1, 2, 1040, 1040, 1000] channels_last_3d float32: 2.16e9 elements (8.7 GB) in, a strided output
    x = _filled((1, 2, 1040, 1040, 1000), torch.float32, torch.channels_last_3d, seed=12)
    w = torch.randn(8, 2, 3, 3, 3, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    out = visionops.conv3d(x, w, None, stride=4, backend=BACKEND)
    for d, y, xx in ((0, 0, 0), (259, 259, 249), (258, 100, 3)):  # depth 1033+ lies past element 2^31
        crop = x[:, :, 4 * d : 4 * d + 3, 4 * y : 4 * y + 3, 4 * xx : 4 * xx + 3].cpu()
        exp = visionops.conv3d(crop, w.cpu(), None, backend="reference")
        torch.testing.assert_close(out[:, :, d : d + 1, y : y + 1, xx : xx + 1].cpu(), exp, atol=1e-4, rtol=1e-4)


@slow
@pytest.mark.skipif(DEVICE == "cpu", reason="needs about 30 GB; run with VISIONOPS_LARGE_DEVICE=cuda")
def test_conv2d_backward_positions_past_2_31():
    # 2^31+ input and output positions: grad_input's flat index and grad_weight's sum over batch x positions pass
    # 2^31. grad is zero except at a few positions, so both gradients are known from small crops. (A 1x2 kernel:
    # the C++ CUDA grad_input's column buffer for one channel is taps x positions floats.)
    x = _filled((1, 1, 46344, 46344), torch.float16, seed=14).requires_grad_()  # 4.3 GB
    w = torch.randn(1, 1, 1, 2, generator=torch.Generator().manual_seed(15)).to(torch.float16).to(DEVICE)
    w.requires_grad_()
    out = visionops.conv2d(x, w, backend=BACKEND)  # [1, 1, 46344, 46343]: 2.15e9 positions
    assert _past(out)
    grad = torch.zeros_like(out)
    spots = [(0, 0), (46343, 46342), (46341, 5), (23170, 23171)]  # the second and third lie past position 2^31
    for y, xx in spots:
        grad[0, 0, y, xx] = 1
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    exp_gw = sum(x[0, 0, y : y + 1, xx : xx + 2].detach().float().cpu() for y, xx in spots)
    torch.testing.assert_close(gw[0, 0].float().cpu(), exp_gw, atol=2e-2, rtol=2e-3)
    for y, xx in spots:  # each spot's grad_input window is w (no two spots' windows overlap)
        torch.testing.assert_close(gx[0, 0, y : y + 1, xx : xx + 2].cpu(), w[0, 0].detach().cpu())


# ---- Triton: index helpers and limits (interpreted; no big memory) -----------------------------------------------

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _block_probe(out_ptr, pid, S1, S2, S3, BLOCK: tl.constexpr):
    from visionops.triton.conv import _block, _unpack4

    r = _block(pid, BLOCK)
    b, d, h, w = _unpack4(r, S1, S2, S3)
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, r)
    tl.store(out_ptr + BLOCK + offs, b.to(tl.int64))
    tl.store(out_ptr + 2 * BLOCK + offs, w.to(tl.int64))


@pytest.mark.parametrize("pid", [0, 2**25 - 1, 2**26 + 3, 2**31 - 1])
def test_triton_conv_block_indices_are_int64(pid):
    # the conv kernels' flat index over batch x positions: program id x BLOCK passes 2^31 from program 2^25 on
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the helper interpreted, on CPU tensors")
    block, S1, S2, S3 = 64, 7, 1000, 999
    out = torch.empty(3 * block, dtype=torch.int64)
    _block_probe[(1,)](out, pid, S1, S2, S3, BLOCK=block)
    r = pid * block + torch.arange(block, dtype=torch.int64)
    assert torch.equal(out[:block], r)
    assert torch.equal(out[block : 2 * block], r // (S1 * S2 * S3))
    assert torch.equal(out[2 * block :], r % S3)


def test_narrow_program_id_uses_finds_32_bit_arithmetic():
    from visionops.triton.compile_check import narrow_program_id_uses

    wide = "%pid = tt.get_program_id x : i32 loc(#loc1)\n%pid_1 = arith.extsi %pid : i32 to i64 loc(#loc2)\n"
    narrow = "%pid = tt.get_program_id x : i32 loc(#loc1)\n%pid_10 = arith.muli %pid, %c64_i32 : i32 loc(#loc2)\n"
    assert narrow_program_id_uses(wide) == []
    assert narrow_program_id_uses(narrow) == ["%pid_10 = arith.muli %pid, %c64_i32 : i32 loc(#loc2)"]
    assert narrow_program_id_uses("%x = arith.constant 1 : i32") == []


def test_triton_limits_are_clear_errors():
    # each refused before any large allocation: expanded (stride-0) inputs take no memory
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors through the Triton backend need the interpreter")
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    plane = torch.zeros(1, 1, 1, 1).expand(1, 1, 65536, 32768)
    with pytest.raises(ValueError, match="roi_pool: input's H \\* W must be below 2\\^31"):
        visionops.roi_pool(plane, rois, 2, backend="triton")
    with pytest.raises(ValueError, match="xcorr: x's H \\* W must be below 2\\^31"):
        visionops.xcorr(torch.zeros(1, 1, 2, 2), plane, backend="triton")
    with pytest.raises(ValueError, match="depthwise_xcorr: x's H \\* W must be below 2\\^31"):
        visionops.depthwise_xcorr(torch.zeros(1, 1, 2, 2), plane, backend="triton")
    with pytest.raises(ValueError, match="box_iou: boxes2 must have at most"):
        visionops.box_iou(torch.zeros(1, 4), torch.zeros(1, 4).expand(65535 * 32 + 1, 4), backend="triton")
    groups = 65536
    x = torch.zeros(1, 1, 1, 1).expand(1, 2 * groups, 1, 1)
    w = torch.zeros(1, 1, 1, 1).expand(groups, 2, 1, 1)
    with pytest.raises(ValueError, match="conv2d: groups must be at most 65535"):
        visionops.conv2d(x, w, groups=groups, backend="triton")


# ---- RoIAlign / RoIPool / MultiScaleRoIAlign (last: their shared input lives until the module ends) ---------

# [1, 2, 36864, 36864] float16 channels_last: 2.72e9 elements (5.4 GB), read in place by every RoI kernel. Element
# (c, y, x) is at (y * W + x) * 2 + c: rows y > 29127 lie past element 2^31.
BIG_HW = 36864


@pytest.fixture(scope="module")
def big_features():
    return _filled((1, 2, BIG_HW, BIG_HW), torch.float16, torch.channels_last)


# RoIs (batch 0, x1, y1, x2, y2) in the last rows, one reaching the far corner, one in row 0 for contrast.
FAR_ROIS = [
    (0.0, 36500.3, 36600.7, 36863.0, 36863.0),
    (0.0, 100.2, 30000.5, 180.9, 30050.1),
    (0.0, 36000.0, 35000.0, 36100.5, 35070.2),
    (0.0, 0.0, 0.0, 40.0, 20.0),
]


def _crop(features, roi, margin=3):
    """The crop of features that holds roi (and its bilinear taps) and the RoI moved into it: the reference runs on
    the crop (a view) instead of the whole map. The crop reaches the map's far edges when the RoI does, so clamping
    at the border is the same."""
    _, x1, y1, x2, y2 = roi
    H, W = features.shape[-2:]
    y0, x0 = max(int(y1) - margin, 0), max(int(x1) - margin, 0)
    ye, xe = min(int(y2) + margin + 2, H), min(int(x2) + margin + 2, W)
    crop = features[:, :, y0:ye, x0:xe].cpu()
    return crop, torch.tensor([[0.0, x1 - x0, y1 - y0, x2 - x0, y2 - y0]])


@slow
def test_roi_align_input_past_2_31(big_features):
    assert _past(big_features)
    rois = torch.tensor(FAR_ROIS).to(DEVICE)
    for aligned in (False, True):
        out = visionops.roi_align(big_features, rois, (7, 7), 1.0, 2, aligned, backend=BACKEND)
        for k, roi in enumerate(FAR_ROIS):
            crop, r = _crop(big_features, roi)
            exp = visionops.roi_align(crop, r, (7, 7), 1.0, 2, aligned, backend="reference")
            torch.testing.assert_close(out[k : k + 1].cpu(), exp, atol=4e-3, rtol=2e-3)


@slow
def test_roi_pool_input_past_2_31(big_features):
    rois = torch.tensor(FAR_ROIS).to(DEVICE)
    out = visionops.roi_pool(big_features, rois, (5, 4), 1.0, backend=BACKEND)
    for k, roi in enumerate(FAR_ROIS):
        # roi_pool rounds the RoI to whole cells: crop at whole-cell offsets so the rounding is unchanged
        _, x1, y1, x2, y2 = roi
        y0, x0 = max(round(y1) - 2, 0), max(round(x1) - 2, 0)
        crop = big_features[:, :, y0:, x0:][:, :, : round(y2) - y0 + 3, : round(x2) - x0 + 3].cpu()
        r = torch.tensor([[0.0, x1 - x0, y1 - y0, x2 - x0, y2 - y0]])
        exp = visionops.roi_pool(crop, r, (5, 4), 1.0, backend="reference")
        torch.testing.assert_close(out[k : k + 1].cpu(), exp)


@slow
def test_multi_scale_roi_align_level_past_2_31(big_features):
    small = _filled((1, 2, 64, 64), torch.float16, torch.channels_last, seed=5)
    rois = torch.tensor(FAR_ROIS + [(0.0, 8.0, 8.0, 100.0, 90.0)]).to(DEVICE)
    levels = torch.tensor([0, 0, 0, 0, 1], device=DEVICE)
    op = registry.dispatch("multi_scale_roi_align", BACKEND, big_features.device)
    out = op([big_features, small], rois, levels, [1.0, 0.5], 6, 6, 2, False)
    for k, roi in enumerate(FAR_ROIS):
        crop, r = _crop(big_features, roi)
        exp = visionops.roi_align(crop, r, (6, 6), 1.0, 2, False, backend="reference")
        torch.testing.assert_close(out[k : k + 1].cpu(), exp, atol=4e-3, rtol=2e-3)
    exp = visionops.roi_align(small.cpu(), rois[4:].cpu(), (6, 6), 0.5, 2, False, backend="reference")
    torch.testing.assert_close(out[4:].cpu(), exp, atol=4e-3, rtol=2e-3)


def test_roi_pool_plane_limit_is_a_clear_error():
    # argmaxes are int32 cell indices: one plane must stay below 2^31 cells (an expanded input: no memory)
    x = torch.zeros(1, 1, 1, 1).expand(1, 1, 65536, 32768)
    rois = torch.tensor([[0.0, 0.0, 0.0, 4.0, 4.0]])
    with pytest.raises(ValueError, match="2\\^31"):
        visionops.roi_pool(x, rois, 2, backend="cpp")
