"""MultiScaleRoIAlign (the multi_scale_roi_align op): the conformance suite against a float64 oracle built from
torchvision's own level assignment, then level mapping on the boundaries, feature-map subsets, more levels than one
launch takes, Triton's deterministic backward and bad levels."""

from collections import OrderedDict

import pytest
import torch
import torchvision
from torchvision.ops import poolers as tv_poolers

import visionops
from visionops import reference
from visionops.ops._checks import check_pair
from visionops.ops.poolers import LevelMapper, multi_scale_roi_align, setup_scales
from visionops.ops.roi import convert_boxes_to_roi_format
from visionops.testing import Bad, OpConformance, backends_for, deterministic, triton_devices

NAMES = ["p0", "p1", "p2", "p3"]
STRIDES = (4, 8, 16, 32)


def make_fpn(
    generator, *, image=(128, 96), c=4, boxes_per_image=(7, 5), max_side=120.0, dtype=torch.float32, device="cpu"
):
    """Four levels (strides 4 to 32) of two images, and boxes of every size up to ``max_side`` pixels."""
    feats = [
        torch.randn(2, c, -(-image[0] // s), -(-image[1] // s), generator=generator, dtype=torch.float64)
        for s in STRIDES
    ]
    boxes = []
    for n in boxes_per_image:
        xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * torch.tensor([image[1], image[0]]) * 0.8
        wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) ** 2 * max_side + 1
        boxes.append(torch.cat([xy, xy + wh], 1))
    return [f.to(device, dtype) for f in feats], [b.to(device, dtype) for b in boxes]


class TestMultiScaleRoIAlign(OpConformance):
    op = "multi_scale_roi_align"
    covers = ("MultiScaleRoIAlign",)
    # (output_size, sampling_ratio, canonical_scale): 224 is torchvision's default (levels 2 and 3 of this image);
    # 56 spreads the boxes over all four levels
    configs = {
        "5_sr2_canonical224": (5, 2, 224),
        "3x2_sr-1_canonical56": ((3, 2), -1, 56),
        "2_sr0_canonical56": (2, 0, 56),
    }
    configs_interpreted = ("3x2_sr-1_canonical56",)
    has_grad = True
    grad_inputs = (0, 1, 2, 3)
    triton_float32 = True
    torchvision_dtypes = (torch.float64, torch.float32)
    slow = (("test_gradcheck", "triton"),)
    tolerances = {
        torch.float64: dict(rtol=1e-9, atol=1e-9),
        torch.float32: dict(rtol=1e-5, atol=1e-5),
        torch.float16: dict(rtol=1e-2, atol=1e-2),
        torch.bfloat16: dict(rtol=3e-2, atol=3e-2),
    }

    def fn(self, f0, f1, f2, f3, b0, b1, output_size, sampling_ratio, image_shapes, canonical, *, backend):
        x = OrderedDict(zip(NAMES, (f0, f1, f2, f3)))
        x["pool"] = f0[:, :, :1, :1]  # not in featmap_names: ignored
        m = visionops.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio, canonical_scale=canonical, backend=backend)
        return m(x, [b0, b1], image_shapes)

    def reference(self, f0, f1, f2, f3, b0, b1, output_size, sampling_ratio, image_shapes, canonical):
        """torchvision's scales and LevelMapper, each level through the float64 reference RoIAlign."""
        features = [f0, f1, f2, f3]
        scales, mapper = tv_poolers._setup_scales(features, image_shapes, canonical, 4)
        levels = mapper([b0, b1])
        rois = convert_boxes_to_roi_format([b0, b1])
        return reference.multi_scale_roi_align(
            features, rois, levels, scales, *check_pair("output_size", output_size), sampling_ratio, False
        )

    def torchvision_fn(self, f0, f1, f2, f3, b0, b1, output_size, sampling_ratio, image_shapes, canonical):
        m = torchvision.ops.MultiScaleRoIAlign(NAMES, output_size, sampling_ratio, canonical_scale=canonical)
        return m(OrderedDict(zip(NAMES, (f0, f1, f2, f3))), [b0, b1], image_shapes)

    def make_inputs(self, device, dtype, generator, size, config):
        output_size, sr, canonical = config
        if size == "full":
            image, kw = (128, 96), {}
        elif size == "small":  # interpreted Triton: a Python program per (RoI, bin)
            image, kw, output_size = (64, 48), dict(c=2, boxes_per_image=(2, 2), max_side=60.0), (2, 2)
            canonical = 28
        else:  # tiny (gradcheck): few feature cells, boxes still on every level
            image, kw, canonical = (32, 24), dict(c=1, boxes_per_image=(3, 2), max_side=24.0), 8
        feats, boxes = make_fpn(generator, image=image, dtype=dtype, device=device, **kw)
        shapes = [image, (image[0] - 10, image[1] - 6)]
        return (*feats, *boxes, output_size, sr, shapes, canonical)

    def empty_inputs(self, device, dtype):
        feats, boxes = make_fpn(torch.Generator().manual_seed(0), dtype=dtype, device=device)
        shapes = [(128, 96), (100, 90)]
        return {
            "no_boxes": (*feats, boxes[0][:0], boxes[1][:0], 2, 2, shapes, 224),
            "no_channels": (*[f[:, :0] for f in feats], *boxes, 2, 2, shapes, 224),
        }

    def bad_inputs(self):
        feats, boxes = make_fpn(torch.Generator().manual_seed(4))
        x = OrderedDict(zip(NAMES, feats))
        shapes = [(128, 96), (118, 90)]
        scales, mapper = setup_scales(feats[:2], shapes)
        rois = convert_boxes_to_roi_format(boxes)

        def pooler(output_size=2, names=("p0", "p1")):
            return lambda b: visionops.MultiScaleRoIAlign(list(names), output_size, 2, backend=b)

        return [
            Bad(
                "boxes0_3_columns",
                lambda b: pooler()(b)(x, [boxes[0][:, :3], boxes[1]], shapes),
                ValueError,
                r"boxes\[0\]",
            ),
            Bad(
                "boxes_not_a_list",
                lambda b: multi_scale_roi_align(feats[:1], boxes[0], 2, 2, [0.25], mapper, backend=b),
                TypeError,
                "boxes",
            ),
            Bad("output_size_zero", lambda b: pooler(0)(b)(x, boxes, shapes), ValueError, "output_size"),
            Bad(
                "features1_other_channels",
                lambda b: multi_scale_roi_align([feats[0], feats[1][:, :2]], boxes, 2, 2, scales, mapper, backend=b),
                ValueError,
                r"features\[1\]",
            ),
            Bad(
                "no_features",
                lambda b: multi_scale_roi_align([], boxes, 2, 2, [], mapper, backend=b),
                ValueError,
                "features",
            ),
            Bad("no_image_shapes", lambda b: pooler()(b)(x, boxes, []), ValueError, "image_shapes"),
            Bad(
                "levels_out_of_range",
                lambda b: torch.ops.visionops.multi_scale_roi_align(
                    feats[:2], rois[:1], torch.tensor([2]), scales, 2, 2, 2, False
                ),
                IndexError,
                "levels",
                ("cpp",),
            ),
            Bad(
                "levels_int32",
                lambda b: torch.ops.visionops.triton_multi_scale_roi_align(
                    feats[:2], rois, mapper(boxes).int(), scales, 2, 2, 2, False
                ),
                ValueError,
                "levels",
                ("triton",),
            ),
            Bad(
                "scales_one_short",
                lambda b: torch.ops.visionops.triton_multi_scale_roi_align(
                    feats[:2], rois, mapper(boxes), scales[:1], 2, 2, 2, False
                ),
                ValueError,
                "scale",
                ("triton",),
            ),
        ]


# ---- level mapping -------------------------------------------------------------------------------------------------


def _square_boxes(sides, dtype=torch.float32):
    sides = torch.tensor(sides, dtype=torch.float64)
    return torch.stack([torch.zeros_like(sides), torch.zeros_like(sides) + 3, sides, sides + 3], 1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k_min,k_max,canonical", [(2, 5, 224), (2, 5, 56), (3, 6, 224), (1, 4, 100)])
def test_level_mapper_on_and_between_boundaries(dtype, k_min, k_max, canonical):
    """Boxes of side canonical * 2^k sit exactly on a level boundary (log2 exact): FPN's + eps puts them on the
    upper level. Also boxes one ulp-ish either side, in between, and far outside the level range."""
    on = [canonical * 2.0**k for k in range(-4, 4)]
    near = [s * f for s in on for f in (1 - 1e-4, 1 + 1e-4)]
    between = [s * 1.5 for s in on] + [1.0, 1e4]
    boxes = _square_boxes(on + near + between, dtype)
    ours = LevelMapper(k_min, k_max, canonical)([boxes[:7], boxes[7:]])
    theirs = tv_poolers.initLevelMapper(k_min, k_max, canonical_scale=canonical)([boxes[:7], boxes[7:]])
    assert ours.dtype == theirs.dtype == torch.int64
    assert torch.equal(ours, theirs), (ours.tolist(), theirs.tolist())
    # the boundary boxes themselves: level floor(4 + k), clamped
    expect = torch.tensor([min(max(4 + k, k_min), k_max) - k_min for k in range(-4, 4)])
    assert torch.equal(ours[: len(on)], expect)


# torchvision's LevelMapper takes box_area, which upcasts float16/bfloat16 boxes to float32: a float16 area of a
# box wider than 256 px overflows.
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_level_mapper_half_boxes_match_torchvision(dtype):
    sides = torch.rand(2000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 500 + 1
    boxes = _square_boxes(sides.tolist() + [111.5, 112.0, 224.0, 300.0, 448.0], dtype)
    ours = LevelMapper(2, 5)([boxes])
    theirs = tv_poolers.initLevelMapper(2, 5)([boxes])
    assert torch.equal(ours, theirs), f"{int((ours != theirs).sum())} of {len(boxes)} boxes on another level"


def test_pooler_on_level_boundaries_matches_torchvision():
    """112, 224 and 448 pixel boxes (canonical 224) pooled from the level torchvision picks for them."""
    g = torch.Generator().manual_seed(5)
    feats = [torch.randn(1, 2, 512 // s, 512 // s, generator=g) for s in STRIDES]
    x = OrderedDict(zip(NAMES, feats))
    boxes = [_square_boxes([56.0, 112.0, 224.0, 448.0, 100.0, 300.0])]
    ours = visionops.MultiScaleRoIAlign(NAMES, 2, 2)
    theirs = torchvision.ops.MultiScaleRoIAlign(NAMES, 2, 2)
    torch.testing.assert_close(ours(x, boxes, [(512, 512)]), theirs(x, boxes, [(512, 512)]), atol=1e-5, rtol=1e-5)
    assert torch.equal(ours.map_levels(boxes), theirs.map_levels(boxes))
    assert ours.map_levels(boxes).tolist() == [0, 1, 2, 3, 0, 2]  # floor(4 + log2(side / 224)) - 2, clamped


@pytest.mark.parametrize("names", [["p1"], ["p0", "p2"], ["p0", "p1", "p2", "p3"]])
def test_featmap_subsets_scales_and_repr_match_torchvision(names):
    feats, boxes = make_fpn(torch.Generator().manual_seed(0))
    x = OrderedDict(zip(NAMES, feats))
    shapes = [(128, 96), (118, 90)]
    ours = visionops.MultiScaleRoIAlign(names, 5, 2)
    tv = torchvision.ops.MultiScaleRoIAlign(names, 5, 2)
    torch.testing.assert_close(ours(x, boxes, shapes), tv(x, boxes, shapes), atol=1e-5, rtol=1e-5)
    assert ours.scales == tv.scales
    assert torch.equal(ours.map_levels(boxes), tv.map_levels(boxes))
    assert "featmap_names" in repr(ours)


def test_more_levels_than_one_launch_takes():
    """Beyond roi_align_max_levels the pooler loops over levels (torchvision's way): same result."""
    levels = visionops._registry.limit("roi_align_max_levels") + 1
    g = torch.Generator().manual_seed(6)
    names = [f"p{i}" for i in range(levels)]
    x = OrderedDict(
        (n, torch.randn(1, 2, 2 ** (levels - i), 2 ** (levels - i), generator=g)) for i, n in enumerate(names)
    )
    image = 2 ** (levels + 1)
    boxes = [_square_boxes([2.0**k for k in range(1, levels + 1)])]
    ours = visionops.MultiScaleRoIAlign(names, 2, 2, canonical_scale=16)(x, boxes, [(image, image)])
    theirs = torchvision.ops.MultiScaleRoIAlign(names, 2, 2, canonical_scale=16)(x, boxes, [(image, image)])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_double_backward(backend):
    if backend not in backends_for("cpu", "multi_scale_roi_align"):
        pytest.skip("needs triton")
    feats, boxes = make_fpn(
        torch.Generator().manual_seed(3), image=(32, 24), c=1, boxes_per_image=(2, 1), max_side=20.0
    )
    fs = [f.requires_grad_(True) for f in feats]
    out = visionops.MultiScaleRoIAlign(NAMES, 2, 2, canonical_scale=8, backend=backend)(
        OrderedDict(zip(NAMES, fs)), boxes, [(32, 24)]
    )
    go = torch.randn(out.shape, requires_grad=True)
    grads = torch.autograd.grad(out, fs, go, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(grads[0].sum(), go)


# ---- Triton: one launch over all levels, deterministic backward ----------------------------------------------------


@pytest.mark.skipif(not triton_devices(), reason="needs triton (CUDA, or TRITON_INTERPRET=1)")
def test_triton_deterministic_backward_and_levels_outside():
    device = triton_devices()[0]
    ops = torch.ops.visionops
    feats, boxes = make_fpn(
        torch.Generator().manual_seed(2), image=(64, 48), c=2, boxes_per_image=(4, 3), max_side=60.0, device=device
    )
    feats = feats[:3]
    scales, _ = setup_scales(feats, [(64, 48)], 28)
    rois = convert_boxes_to_roi_format(boxes)
    levels = torch.tensor([0, 1, 2, -1, 3, 1, 0], device=device)  # -1 and 3: no level, zeros and no gradient
    shapes = [s for f in feats for s in f.shape]
    out = ops.triton_multi_scale_roi_align(feats, rois, levels, scales, 2, 2, 2, False)
    assert not out[3].any() and not out[4].any() and out[:3].any()
    go = torch.randn(7, 2, 2, 2, generator=torch.Generator().manual_seed(7)).to(device)
    go[3:5] = float("nan")  # must go nowhere
    with deterministic():
        det = ops.triton_multi_scale_roi_align_backward(go, rois, levels, scales, 2, 2, shapes, 2, False)
        again = ops.triton_multi_scale_roi_align_backward(
            go.flip(0), rois.flip(0), levels.flip(0), scales, 2, 2, shapes, 2, False
        )
    fl = ops.triton_multi_scale_roi_align_backward(go, rois, levels, scales, 2, 2, shapes, 2, False)
    ok = torch.tensor([0, 1, 2, 5, 6])
    for level, (d, a, f) in enumerate(zip(det, again, fl)):
        assert d.shape == feats[level].shape and torch.equal(d, a) and d.isfinite().all()
        torch.testing.assert_close(d, f, rtol=1e-6, atol=1e-6)
        mine = ok[levels[ok].cpu() == level]
        fr = feats[level].detach().double().cpu().requires_grad_(True)
        expect = reference.roi_align(fr, rois[mine].double().cpu(), scales[level], 2, 2, 2, False)
        (e,) = torch.autograd.grad(expect, fr, go[mine].double().cpu())
        torch.testing.assert_close(d.double().cpu(), e, rtol=1e-5, atol=1e-5)
