"""Anchor generation: the grid_anchors conformance suite (every backend against the reference, exactly, and
torchvision's AnchorGenerator.grid_anchors), then AnchorGenerator, cell_anchors and DefaultBoxGenerator against
torchvision."""

import math
import random

import pytest
import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator as TVAnchorGenerator
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator as TVDefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList

import visionops
from visionops import reference
from visionops.testing import DEVICES, FLOAT_DTYPES, Bad, OpConformance, backends_for, interpreted, needs_cuda

HALF = (torch.float16, torch.bfloat16)


def _image_list(sizes, device="cpu", dtype=torch.float32):
    """Padded batch of images of different sizes, padded up to a multiple of 32 as GeneralizedRCNNTransform does."""
    h = int(math.ceil(max(s[0] for s in sizes) / 32) * 32) if sizes else 64
    w = int(math.ceil(max(s[1] for s in sizes) / 32) * 32) if sizes else 64
    return ImageList(torch.zeros(len(sizes), 3, h, w, device=device, dtype=dtype), list(sizes))


def _random_config(rng):
    levels = rng.randint(1, 4)
    sizes = tuple(
        tuple(rng.choice([8, 16, 23, 32, 50, 64, 100, 128]) for _ in range(rng.randint(1, 3))) for _ in range(levels)
    )
    ratios = tuple(
        tuple(rng.choice([0.25, 0.5, 1.0, 1.5, 2.0, 3.0]) for _ in range(rng.randint(1, 3))) for _ in range(levels)
    )
    images = [(rng.randint(40, 150), rng.randint(40, 150)) for _ in range(rng.randint(1, 3))]
    strides = [rng.choice([4, 8, 16]) * 2**l for l in range(levels)]
    return sizes, ratios, images, strides


def _feature_maps(image_list, strides, dtype=torch.float32):
    h, w = image_list.tensors.shape[-2:]
    b = image_list.tensors.shape[0]
    dev = image_list.tensors.device
    # ceil division: image sizes that are not multiples of the stride, as a conv backbone produces
    return [torch.zeros(b, 2, -(-h // s), -(-w // s), dtype=dtype, device=dev) for s in strides]


def _tol(dtype):
    # fp16/bf16: torchvision adds in the half dtype after rounding the shift; we round once from float32.
    return dict(rtol=2 * torch.finfo(dtype).eps, atol=1.0) if dtype in HALF else dict(rtol=0, atol=0)


class TestGridAnchors(OpConformance):
    op = "grid_anchors"
    covers = ("AnchorGenerator",)
    # (feature sizes, strides, offset) of two levels; cells: one unrounded level (detectron2), one rounded
    configs = {
        "offset0": ([(7, 5), (3, 4)], [(8, 6), (16.5, 16)], 0.0),
        "offset0.5": ([(7, 5), (3, 4)], [(8, 6), (16.5, 16)], 0.5),
        "integer_strides": ([(10, 7), (5, 4)], [(8, 9), (16, 18)], 0.0),
    }
    reference_dtype = None  # exact: the reference documents the compute dtype (float32, float64 for float64)
    torchvision_dtypes = (torch.float64, torch.float32)
    torchvision_configs = ("integer_strides",)
    interpreted_cheap = True

    def tolerance(self, dtype, backend, grad=False):
        # The Triton interpreter's float32 -> bfloat16 cast breaks exact ties differently from round-half-even.
        if backend == "triton" and interpreted(backend, "cpu") and dtype == torch.bfloat16:
            return _tol(dtype)
        return dict(rtol=0, atol=0)

    def fn(self, feature_sizes, strides, c0, c1, offset, *, backend):
        return visionops.grid_anchors(feature_sizes, strides, [c0, c1], offset, backend=backend)

    def reference(self, feature_sizes, strides, c0, c1, offset):
        return reference.grid_anchors(feature_sizes, strides, [c0, c1], offset)

    def torchvision_fn(self, feature_sizes, strides, c0, c1, offset):
        gen = TVAnchorGenerator(((1,), (1,)), ((1.0,), (1.0,)))
        gen.cell_anchors = [c0, c1]
        strides = [[torch.tensor(int(sh)), torch.tensor(int(sw))] for sh, sw in strides]
        return torch.cat(gen.grid_anchors([list(f) for f in feature_sizes], strides))

    def make_inputs(self, device, dtype, generator, size, config):
        feature_sizes, strides, offset = config
        if size != "full":
            feature_sizes = [(2, 3), (1, 2)]
        cells = [
            visionops.cell_anchors((16, 40), (0.5, 1.0), rounded=False, dtype=dtype, device=device),
            visionops.cell_anchors((100,), (1.0, 3.0), dtype=dtype, device=device),
        ]
        return (feature_sizes, strides, *cells, offset)

    def empty_inputs(self, device, dtype):
        cells = [
            visionops.cell_anchors((32,), (1.0,), dtype=dtype, device=device),
            visionops.cell_anchors((64,), (0.5, 2.0), dtype=dtype, device=device),
        ]
        return {
            "empty_levels": ([(0, 5), (3, 0)], [(8, 8), (16, 16)], *cells, 0.0),
            "no_cell_anchors": ([(4, 5), (3, 2)], [(8, 8), (16, 16)], cells[0][:0], cells[1][:0], 0.5),
        }

    def bad_inputs(self):
        cells = [visionops.cell_anchors((32,), (1.0,))]
        ga = visionops.grid_anchors
        return [
            Bad(
                "levels_mismatch",
                lambda b: ga([(4, 4), (2, 2)], [(8, 8)], cells, backend=b),
                ValueError,
                "feature_sizes, strides and cell_anchors",
            ),
            Bad("no_levels", lambda b: ga([], [], [], backend=b), ValueError, "cell_anchors"),
            Bad("strides0_negative", lambda b: ga([(4, 4)], [(-8, 8)], cells, backend=b), ValueError, r"strides\[0\]"),
            Bad(
                "feature_sizes0_three",
                lambda b: ga([(4, 4, 1)], [(8, 8)], cells, backend=b),
                ValueError,
                r"feature_sizes\[0\]",
            ),
            Bad(
                "cell_anchors_not_tensors",
                lambda b: ga([(4, 4)], [(8, 8)], [[[0, 0, 1, 1]]], backend=b),
                TypeError,
                "cell_anchors",
            ),
            Bad(
                "cell_anchors_5_columns",
                lambda b: ga([(4, 4)], [(8, 8)], [torch.zeros(3, 5)], backend=b),
                ValueError,
                "cell_anchors",
            ),
            Bad(
                "cell_anchors_mixed_dtypes",
                lambda b: ga([(4, 4)] * 2, [(8, 8)] * 2, [cells[0], cells[0].double()], backend=b),
                ValueError,
                "cell_anchors",
            ),
            Bad("backend_cuda", lambda b: ga([(4, 4)], [(8, 8)], cells, backend="cuda"), ValueError, "backend"),
        ]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_anchor_generator_matches_torchvision_random(seed, backend):
    rng = random.Random(seed)
    sizes, ratios, images, strides = _random_config(rng)
    il = _image_list(images)
    fms = _feature_maps(il, strides)
    ours = visionops.AnchorGenerator(sizes, ratios, backend=backend)
    theirs = TVAnchorGenerator(sizes, ratios)
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location()
    a, b = ours(il, fms), theirs(il, fms)
    assert len(a) == len(b) == len(images)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("backend,device", [(b, d) for d in DEVICES for b in backends_for(d)])
def test_anchor_generator_dtypes(backend, device, dtype):
    sizes, ratios = ((32, 64), (128,)), ((0.5, 1.0, 2.0), (1.0, 2.0))
    il = _image_list([(200, 190), (170, 210)], device=device)
    fms = _feature_maps(il, [8, 32], dtype=dtype)
    a = visionops.AnchorGenerator(sizes, ratios, backend=backend)(il, fms)
    b = TVAnchorGenerator(sizes, ratios)(il, fms)
    for x, y in zip(a, b):
        assert x.dtype == dtype and x.device == y.device
        torch.testing.assert_close(x, y, **_tol(dtype))


def test_default_torchvision_fpn_config_and_own_tensors():
    sizes = tuple((s,) for s in (32, 64, 128, 256, 512))
    ratios = ((0.5, 1.0, 2.0),) * 5
    il = _image_list([(800, 1216), (781, 1100)])
    fms = _feature_maps(il, [4, 8, 16, 32, 64])
    a = visionops.AnchorGenerator(sizes, ratios)(il, fms)
    b = TVAnchorGenerator(sizes, ratios)(il, fms)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert a[0].data_ptr() != a[1].data_ptr()
    a[0].add_(1)  # each image owns its memory: writing one leaves the other intact
    assert torch.equal(a[1], b[1])


def test_anchor_generator_custom_cell_anchors():
    # torchvision reads the cell_anchors attribute in forward: users may assign their own
    il = _image_list([(64, 96), (50, 90)])
    fms = _feature_maps(il, [8, 16])
    ours = visionops.AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,)))
    theirs = TVAnchorGenerator(((32,), (64,)), ((1.0,), (1.0,)))
    ours(il, fms)  # populate the per-device copy, which must then notice the change
    custom = [torch.tensor([[-3.0, -5.0, 3.0, 5.0], [-1.5, -1.0, 1.5, 1.0]]), torch.tensor([[-7.0, -2.0, 7.0, 2.0]])]
    ours.cell_anchors = [c.clone() for c in custom]
    theirs.cell_anchors = [c.clone() for c in custom]
    for x, y in zip(ours(il, fms), theirs(il, fms)):
        assert torch.equal(x, y)
    ours.cell_anchors[1].mul_(2)  # in place, too
    theirs.cell_anchors[1].mul_(2)
    for x, y in zip(ours(il, fms), theirs(il, fms)):
        assert torch.equal(x, y)


def test_anchor_generator_single_level_shorthand():
    # torchvision accepts sizes=(32, 64) meaning one size per level and ratios shared by every level
    il = _image_list([(64, 96)])
    fms = _feature_maps(il, [8, 16])
    a = visionops.AnchorGenerator((32, 64), (0.5, 1.0))(il, fms)
    b = TVAnchorGenerator((32, 64), (0.5, 1.0))(il, fms)
    assert torch.equal(a[0], b[0])


def test_empty_inputs():
    gen = visionops.AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,)))
    # no images: no anchors, as torchvision
    il0 = _image_list([])
    fms0 = [torch.zeros(0, 1, 8, 8), torch.zeros(0, 1, 4, 4)]
    assert gen(il0, fms0) == [] == TVAnchorGenerator(((32,), (64,)), ((1.0,), (1.0,)))(il0, fms0)
    # an empty level contributes no anchors (torchvision divides by zero there); the other level is unchanged
    il = _image_list([(64, 64)])
    out = gen(il, [torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 0, 4)])
    ref = TVAnchorGenerator(((32,),), ((1.0,),))(il, [torch.zeros(1, 1, 8, 8)])
    assert torch.equal(out[0], ref[0])
    assert visionops.grid_anchors([(0, 5)], [(8, 8)], [visionops.cell_anchors((32,), (1.0,))]).shape == (0, 4)


@pytest.mark.parametrize("rounded", [True, False])
def test_cell_anchors(rounded):
    sizes, ratios = (32, 45.3, 128), (0.3, 1.0, 2.5)
    c = visionops.cell_anchors(sizes, ratios, rounded=rounded)
    tv = TVAnchorGenerator((sizes,), (ratios,)).generate_anchors(sizes, ratios)
    if rounded:
        assert torch.equal(c, tv)
    else:
        torch.testing.assert_close(c.round(), tv, rtol=0, atol=0)
        # detectron2's definition: centred box of area s^2 and height/width = r
        w, h = c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]
        s = torch.tensor(sizes).repeat(3)
        r = torch.tensor(ratios).repeat_interleave(3)
        torch.testing.assert_close(w * h, s * s, rtol=1e-5, atol=0)
        torch.testing.assert_close(h / w, r, rtol=1e-5, atol=0)
    assert c.shape == (9, 4)


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_grid_anchors_order(offset):
    """Level, then row-major location, then cell anchor; shift (x + offset) * stride_w, (y + offset) * stride_h."""
    cells = [visionops.cell_anchors((16, 40), (0.5, 1.0), rounded=False), visionops.cell_anchors((100,), (1.0, 3.0))]
    out = visionops.grid_anchors([(7, 5), (3, 4)], [(8, 6), (16.5, 16)], cells, offset)
    assert out.shape == (7 * 5 * 4 + 3 * 4 * 2, 4) and out.is_contiguous()
    x, y = 3, 2
    row = (y * 5 + x) * 4 + 1
    expect = cells[0][1].to(torch.float64) + torch.tensor([(x + offset) * 6, (y + offset) * 8] * 2, dtype=torch.float64)
    torch.testing.assert_close(out[row].double(), expect, rtol=0, atol=0)
    row = 7 * 5 * 4 + (2 * 4 + 3) * 2 + 1  # level 1, y = 2, x = 3, cell 1
    expect = cells[1][1].to(torch.float64) + torch.tensor(
        [(3 + offset) * 16, (2 + offset) * 16.5] * 2, dtype=torch.float64
    )
    torch.testing.assert_close(out[row].double(), expect.float().double(), rtol=0, atol=0)


def test_grid_anchors_matches_torchvision_method():
    gen = TVAnchorGenerator(((32, 64), (128,)), ((0.5, 1.0), (2.0,)))
    grid, strides = [[10, 7], [5, 4]], [[torch.tensor(8), torch.tensor(9)], [torch.tensor(16), torch.tensor(18)]]
    theirs = torch.cat(gen.grid_anchors(grid, strides))
    ours = visionops.grid_anchors(grid, strides, gen.cell_anchors)
    assert torch.equal(ours, theirs)
    ours_method = torch.cat(
        visionops.AnchorGenerator(((32, 64), (128,)), ((0.5, 1.0), (2.0,))).grid_anchors(grid, strides)
    )
    assert torch.equal(ours_method, theirs)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_default_box_generator_matches_torchvision(seed, dtype):
    rng = random.Random(seed)
    levels = rng.randint(1, 4)
    ratios = [[rng.choice([2, 3])] * rng.randint(0, 2) for _ in range(levels)]
    kwargs = {}
    if seed % 2:
        kwargs["steps"] = [8 * 2**l for l in range(levels)]
    if seed == 2:
        kwargs["scales"] = [0.07 + 0.15 * k for k in range(levels + 1)]
    kwargs["clip"] = seed != 3
    il = _image_list([(rng.randint(100, 300), rng.randint(100, 300)), (90, 120)])
    fms = _feature_maps(il, [8 * 2**l for l in range(levels)], dtype=dtype)
    ours = visionops.DefaultBoxGenerator(ratios, **kwargs)
    theirs = TVDefaultBoxGenerator(ratios, **kwargs)
    assert ours.num_anchors_per_location() == theirs.num_anchors_per_location()
    assert repr(ours).split("(", 1)[1] == repr(theirs).split("(", 1)[1]
    a, b = ours(il, fms), theirs(il, fms)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x.dtype == y.dtype
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert a[0].data_ptr() != a[1].data_ptr()


def test_bad_inputs_modules_and_cell_anchors():
    with pytest.raises(ValueError, match="sizes and aspect_ratios"):
        visionops.AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,), (2.0,)))
    with pytest.raises(ValueError, match="sizes"):
        visionops.AnchorGenerator(((32, -4),), ((1.0,),))
    with pytest.raises(ValueError, match="aspect_ratios"):
        visionops.AnchorGenerator(((32,),), ((0.0, 1.0),))
    with pytest.raises(ValueError, match="aspect_ratios"):
        visionops.cell_anchors((32,), (float("nan"),))
    gen = visionops.AnchorGenerator(((32,), (64,)), ((1.0,), (1.0,)))
    with pytest.raises(ValueError, match="feature maps"):
        gen(_image_list([(64, 64)]), [torch.zeros(1, 1, 8, 8)])
    with pytest.raises(ValueError, match="steps"):
        visionops.DefaultBoxGenerator([[2], [3]], steps=[8])


def _op_args(dtype=torch.float32):
    cells = torch.cat([visionops.cell_anchors((32, 64), (0.5, 1.0)), visionops.cell_anchors((128,), (1.0,))])
    cells = cells.to(torch.float64 if dtype == torch.float64 else torch.float32)
    return (cells, [4, 1], [5, 6, 2, 3], [8.0, 8.0, 16.0, 16.0], 0.5, 2, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_opcheck_grid_anchors_images_and_dtypes(dtype):
    """The op's num_images and dtype arguments (the public call passes 1 and the cells' dtype)."""
    torch.library.opcheck(torch.ops.visionops.grid_anchors.default, _op_args(dtype))


@pytest.mark.skipif("triton" not in backends_for("cpu") and not torch.cuda.is_available(), reason="needs triton")
def test_opcheck_triton_grid_anchors():
    import visionops.triton.anchors as ta

    dev = "cpu" if "triton" in backends_for("cpu") else "cuda"
    args = list(_op_args())
    args[0] = args[0].to(dev)
    torch.library.opcheck(ta.triton_grid_anchors, tuple(args))
    out = ta.triton_grid_anchors(*args)
    assert torch.equal(out.cpu(), torch.ops.visionops.grid_anchors(*_op_args()))


def test_torch_compile_anchor_generator():
    gen = visionops.AnchorGenerator(((32,), (64,)), ((0.5, 1.0),) * 2)
    il = _image_list([(64, 96), (60, 90)])
    fms = _feature_maps(il, [8, 16])
    out = torch.compile(lambda i, f: gen(i, f), fullgraph=True, backend="aot_eager")(il, fms)
    assert all(torch.equal(x, y) for x, y in zip(out, gen(il, fms)))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_after_an_eager_call_and_a_new_batch(dynamic):
    """The cell cache filled by an eager call must not break a later fullgraph trace, nor a new batch size."""
    gen = visionops.AnchorGenerator(((32,), (64,)), ((0.5, 1.0),) * 2)
    fn = torch.compile(lambda i, f: gen(i, f), fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for sizes in ([(64, 96), (60, 90)], [(64, 96), (64, 96), (50, 70)]):
        il = _image_list(sizes)
        fms = _feature_maps(il, [8, 16])
        eager = gen(il, fms)
        out = fn(il, fms)
        assert len(out) == len(sizes) and all(torch.equal(x, y) for x, y in zip(out, eager))


@needs_cuda
def test_cuda_matches_cpu_large():
    sizes = tuple((s, s * 2) for s in (32, 64, 128, 256, 512))
    ratios = ((0.5, 1.0, 2.0),) * 5
    il = _image_list([(800, 1216), (700, 1000)])
    fms = _feature_maps(il, [4, 8, 16, 32, 64])
    cpu = visionops.AnchorGenerator(sizes, ratios)(il, fms)
    il_c = ImageList(il.tensors.cuda(), il.image_sizes)
    gpu = visionops.AnchorGenerator(sizes, ratios)(il_c, [f.cuda() for f in fms])
    for x, y in zip(cpu, gpu):
        assert torch.equal(x, y.cpu())
