"""patch_torchvision as a drop-in: every call form torchvision accepts keeps working under the patch.

Signatures, TorchScript (ops, and a scripted detector saved and loaded in a fresh process), ONNX (run with
onnxruntime), quantized and integer inputs, empty inputs, ``fmt=``, batched and mixed-dtype box_iou, exception types.
"""

import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torchvision import ops

import visionops
from visionops import _dropin
from visionops.compat import _targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _boxes(n, seed=0, dtype=torch.float32, scale=50.0):
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(n, 4, generator=g, dtype=torch.float64) * scale
    b[:, 2:] += b[:, :2] + 1
    return b.to(dtype)


def _scores(n, seed=1):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed))


def _profiled_ops(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.name for e in prof.events()}


# ---- signatures ---------------------------------------------------------------------------------------------------


def test_every_replacement_has_torchvisions_signature():
    targets = _targets()
    assert len(targets) == 16  # nms, batched_nms, box_iou x 2 modules, roi_align x 4, roi_pool x 2, 4 methods
    for owner, name, replacement in targets:
        original = getattr(owner, name)
        assert original is not replacement
        where = f"{getattr(owner, '__name__', owner)}.{name}"
        assert inspect.signature(replacement) == inspect.signature(original), where
    with visionops.patch_torchvision():
        for owner, name, replacement in targets:
            assert getattr(owner, name) is replacement


# ---- TorchScript ----------------------------------------------------------------------------------------------------


def test_scripted_ops_run_visionops_and_match_eager():
    boxes, scores = _boxes(60), _scores(60)
    idxs = torch.randint(0, 3, (60,), generator=torch.Generator().manual_seed(2))
    x = torch.rand(2, 3, 12, 12, dtype=torch.float64, requires_grad=True)
    rois = torch.cat([torch.tensor([[0.0], [1.0], [1.0]]), _boxes(3, seed=3, scale=8.0)], 1).double()
    with visionops.patch_torchvision():
        calls = {
            "nms": (ops.nms, (boxes, scores, 0.5)),
            "batched_nms": (ops.batched_nms, (boxes, scores, idxs, 0.5)),
            "box_iou": (ops.box_iou, (boxes, boxes[:7])),
            "roi_align": (ops.roi_align, (x, rois, 3, 0.5, 2, True)),
            "roi_pool": (ops.roi_pool, (x, [rois[:1, 1:], rois[1:, 1:]], [2, 3], 0.5)),
        }
        for name, (fn, args) in calls.items():
            scripted = torch.jit.script(fn)
            assert f"visionops::{name}" in str(scripted.graph), name
            got, seen = _profiled_ops(lambda: scripted(*args))
            assert f"visionops::{name}" in seen and not [n for n in seen if n.startswith("torchvision::")], name
            torch.testing.assert_close(got, fn(*args), rtol=0, atol=0)
        # gradients flow through the scripted op as through the eager one
        scripted = torch.jit.script(ops.roi_align)
        (g_script,) = torch.autograd.grad(scripted(x, rois, 3, 0.5, 2, True).sum(), x)
        (g_eager,) = torch.autograd.grad(ops.roi_align(x, rois, 3, 0.5, 2, True).sum(), x)
        torch.testing.assert_close(g_script, g_eager)
        # torchvision's modules and the IoU variants built on box_iou script too
        module = torch.jit.script(ops.RoIAlign((3, 3), 0.5, 2))
        torch.testing.assert_close(module(x, rois), ops.roi_align(x, rois, 3, 0.5, 2))
        ints = boxes.round().to(torch.int32)
        torch.testing.assert_close(torch.jit.script(ops.distance_box_iou)(ints, ints), ops.distance_box_iou(ints, ints))


SCRIPTED_DETECTOR_CHILD = """
import sys
import torch
import visionops  # registers the visionops ops the saved model calls: before torch.jit.load
model = torch.jit.load(sys.argv[1])
assert "torchvision" not in sys.modules  # the scripted model needs visionops only
images = torch.load(sys.argv[2])
with torch.no_grad():
    _, detections = model(images)
torch.save(detections, sys.argv[3])
"""


@pytest.mark.slow
def test_scripted_detector_same_detections_and_reloads_in_fresh_process(tmp_path):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 120, 150, generator=g), torch.rand(3, 100, 160, generator=g)]
    with visionops.patch_torchvision():
        torch.manual_seed(0)
        model = fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=128, max_size=160, box_score_thresh=0.0
        ).eval()
        scripted = torch.jit.script(model)
        with torch.no_grad():
            eager = model(images)
            (_, got), seen = _profiled_ops(lambda: scripted(images))
    for op in ("batched_nms", "multi_scale_roi_align", "grid_anchors", "decode_boxes"):
        assert f"visionops::{op}" in seen, op
    assert not [n for n in seen if n.startswith("torchvision::")]
    for e, s in zip(eager, got):
        assert len(e["boxes"]) > 0
        for k in e:
            torch.testing.assert_close(s[k], e[k])
    path = tmp_path / "frcnn.pt"
    scripted.save(str(path))
    torch.save(images, tmp_path / "images.pt")
    child = tmp_path / "child.py"
    child.write_text(SCRIPTED_DETECTOR_CHILD)
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = [sys.executable, str(child), str(path), str(tmp_path / "images.pt"), str(tmp_path / "out.pt")]
    subprocess.run(run, check=True, env=env, timeout=600)
    reloaded = torch.load(tmp_path / "out.pt")
    for e, r in zip(eager, reloaded):
        for k in e:
            torch.testing.assert_close(r[k], e[k])


# ---- ONNX -----------------------------------------------------------------------------------------------------------


class _OnnxOps(torch.nn.Module):
    def forward(self, boxes, scores, idxs, features, rois):
        return (
            visionops.nms(boxes, scores, 0.5),
            visionops.batched_nms(boxes, scores, idxs, 0.5),
            visionops.roi_align(features, rois, (3, 3), 0.5, 2, True),
            visionops.roi_align(features, rois, 2, 0.5, 0, False),
            visionops.roi_pool(features, rois, (2, 2), 0.5),
        )


def _onnx_inputs():
    g = torch.Generator().manual_seed(0)
    boxes = _boxes(50, scale=40.0)
    idxs = torch.randint(0, 3, (50,), generator=g)
    features = torch.rand(2, 3, 16, 16, generator=g)
    rois = torch.cat([torch.randint(0, 2, (7, 1), generator=g).float(), boxes[:7]], 1)
    return boxes, _scores(50), idxs, features, rois


def _run_onnxruntime(path, inputs):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, {n: t.numpy() for n, t in zip(names, inputs)})


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_onnx_export_of_ops_runs_in_onnxruntime(tmp_path, dynamo):
    pytest.importorskip("onnx")
    if dynamo:
        pytest.importorskip("onnxscript")
    inputs = _onnx_inputs()
    expected = _OnnxOps()(*inputs)
    path = tmp_path / "ops.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(_OnnxOps(), inputs, dynamo=True, opset_version=18).save(str(path))
        else:
            torch.onnx.export(_OnnxOps(), inputs, str(path), dynamo=False, opset_version=16)
    import onnx

    op_types = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"NonMaxSuppression", "RoiAlign", "MaxRoiPool"} <= op_types
    for e, o in zip(expected, _run_onnxruntime(path, inputs)):
        torch.testing.assert_close(torch.from_numpy(o), e, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_export_of_patched_detector_runs_in_onnxruntime(tmp_path):
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    torch.set_num_threads(2)
    image = torch.rand(3, 120, 150, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "frcnn.onnx"
    with visionops.patch_torchvision():
        torch.manual_seed(0)
        model = fasterrcnn_resnet50_fpn(
            weights=None, weights_backbone=None, min_size=128, max_size=160, box_score_thresh=0.0
        ).eval()
        with torch.no_grad():
            expected = model([image])[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ([image],), str(path), dynamo=False, opset_version=16)
    boxes, labels, scores = _run_onnxruntime(path, [image])
    assert len(expected["boxes"]) > 0 and boxes.shape == tuple(expected["boxes"].shape)
    torch.testing.assert_close(torch.from_numpy(boxes), expected["boxes"], rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(torch.from_numpy(scores), expected["scores"], rtol=1e-3, atol=1e-4)
    assert torch.equal(torch.from_numpy(labels), expected["labels"])


# ---- inputs visionops has no kernel for: torchvision's implementation ----------------------------------------------


def test_quantized_inputs_go_to_torchvision():
    boxes, scores = _boxes(200, scale=100.0), _scores(200) * 100
    qboxes = torch.quantize_per_tensor(boxes, scale=2, zero_point=10, dtype=torch.quint8)
    qscores = torch.quantize_per_tensor(scores, scale=2, zero_point=10, dtype=torch.quint8)
    x = torch.randint(50, 100, (1, 2, 10, 10)).float()
    rois = torch.tensor([[0, 0, 0, 4, 4], [0, 1, 2, 6, 8.0]])
    qx = torch.quantize_per_tensor(x, scale=1, zero_point=0, dtype=torch.qint8)
    qrois = torch.quantize_per_tensor(rois, scale=1, zero_point=0, dtype=torch.qint8)
    expected_keep = ops.nms(qboxes, qscores, 0.5)
    expected_pooled = ops.roi_align(qx, qrois, 5, aligned=True)
    with visionops.patch_torchvision():
        (keep, pooled), seen = _profiled_ops(
            lambda: (ops.nms(qboxes, qscores, 0.5), ops.roi_align(qx, qrois, 5, 1.0, -1, True))
        )
        with pytest.raises(RuntimeError, match="Only one image per batch"):  # torchvision's own error
            ops.roi_align(torch.cat([qx, qx]), qrois, 5)
    assert "torchvision::qnms" in seen and "torchvision::qroi_align" in seen
    assert torch.equal(keep, expected_keep)
    assert pooled.is_quantized and torch.equal(pooled.int_repr(), expected_pooled.int_repr())


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32, torch.int64])
def test_integer_boxes(dtype):
    a = torch.tensor([[0, 0, 100, 100], [0, 0, 50, 50], [200, 200, 300, 300], [0, 0, 25, 25]], dtype=dtype)
    b = a[:3]
    expected = {f: getattr(ops, f)(a, b) for f in ("box_iou", "generalized_box_iou", "distance_box_iou")}
    expected["complete_box_iou"] = ops.complete_box_iou(a, b)
    with visionops.patch_torchvision():
        got, seen = _profiled_ops(lambda: {f: getattr(ops, f)(a, b) for f in expected})
    assert "visionops::box_iou" in seen
    for f in expected:
        torch.testing.assert_close(got[f], expected[f], rtol=0, atol=1e-6)
    with pytest.raises(TypeError, match="boxes1"):  # visionops' own box_iou takes floating boxes only
        visionops.box_iou(a, b)


def test_empty_inputs():
    empty = torch.empty((0,), dtype=torch.int64)
    for batched_nms in (visionops.batched_nms, _dropin.batched_nms):
        assert torch.equal(batched_nms(empty, None, None, None), empty)
        for dtype in (torch.float16, torch.float32, torch.float64):
            out = batched_nms(torch.empty(0, 4, dtype=dtype), torch.empty(0, dtype=dtype), torch.empty(0), 0.5)
            assert out.dtype == torch.int64 and out.numel() == 0
    with visionops.patch_torchvision():
        assert ops.nms(torch.empty(0, 4), torch.empty(0), 0.5).shape == (0,)
        assert ops.box_iou(torch.empty(0, 4), _boxes(3)).shape == (0, 3)
        assert ops.box_iou(torch.empty(2, 0, 4), _boxes(3)).shape == (2, 0, 3)
        assert ops.roi_align(torch.rand(1, 2, 5, 5), torch.empty(0, 5), 2).shape == (0, 2, 2, 2)
        assert ops.roi_pool(torch.rand(1, 2, 5, 5), [torch.empty(0, 4)], 2).shape == (0, 2, 2, 2)


@pytest.mark.parametrize("fmt", ["xyxy", "xywh", "cxcywh"])
def test_box_iou_fmt_batched_and_mixed_dtypes(fmt):
    a = torch.stack([_boxes(5, seed=s, dtype=torch.float64) for s in range(3)]).reshape(3, 1, 5, 4)
    b = torch.stack([_boxes(7, seed=s + 9, dtype=torch.float64) for s in range(2)])  # [2, 7, 4]: broadcasts
    cases = [(a, b), (a[0, 0], b[0]), (a.float(), b), (a[0, 0].float(), b[0].half())]
    expected = [ops.box_iou(x, y, fmt=fmt) for x, y in cases]
    with visionops.patch_torchvision():
        got = [ops.box_iou(x, y, fmt=fmt) for x, y in cases]
        got_scripted = torch.jit.script(ops.box_iou)(a[0, 0], b[0], fmt)
    # torchvision adds float16 coordinates in float16 (x + w); the patch computes them in float32, as their areas
    for e, g_, atol in zip(expected, got, (1e-6, 1e-6, 1e-6, 2e-3)):
        assert g_.shape == e.shape and g_.dtype == e.dtype
        torch.testing.assert_close(g_, e, rtol=0, atol=atol)
    torch.testing.assert_close(got_scripted, expected[1])
    torch.testing.assert_close(visionops.box_iou(a, b, fmt), expected[0])
    assert visionops.box_iou(a.half(), b.half(), fmt).dtype == torch.float16  # visionops keeps half in half
    with pytest.raises(TypeError, match="same dtype"):  # and asks for one dtype
        visionops.box_iou(a.float(), b, fmt)


def test_rotated_box_iou_goes_to_torchvision():
    boxes = torch.tensor([[10.0, 10.0, 4.0, 2.0, 30.0], [11.0, 10.0, 4.0, 2.0, 0.0]])
    expected = ops.box_iou(boxes, boxes, fmt="cxcywhr")
    with visionops.patch_torchvision():
        torch.testing.assert_close(ops.box_iou(boxes, boxes, fmt="cxcywhr"), expected)
    with pytest.raises(ValueError, match="boxes1 must have shape"):
        visionops.box_iou(boxes, boxes, "cxcywhr")


# ---- exception types ----------------------------------------------------------------------------------------------


def test_errors_are_catchable_as_torchvisions_types():
    with visionops.patch_torchvision():
        for args, match in [
            ((torch.rand(4), torch.rand(3), 0.5), "boxes must have shape"),
            ((torch.rand(3, 5), torch.rand(3), 0.5), "boxes must have shape"),
            ((torch.rand(3, 4), torch.rand(3, 2), 0.5), "scores must have shape"),
            ((torch.rand(3, 4), torch.rand(4), 0.5), "scores must have 3 entries"),
        ]:
            with pytest.raises(RuntimeError, match=match) as info:  # torchvision raises RuntimeError here
                ops.nms(*args)
            assert isinstance(info.value, ValueError)
        a = torch.rand(1, 1, 8, 8)
        for fn in (ops.roi_align, ops.roi_pool):  # torchvision asserts the boxes' shape
            with pytest.raises(AssertionError, match=r"boxes must have shape \[K, 5\]"):
                fn(a, torch.tensor([[0, 0, 3, 3.0]]), output_size=(2, 2))
            with pytest.raises(AssertionError, match=r"boxes\[0\] must have shape \[L, 4\]"):
                fn(a, [torch.tensor([[0, 0, 3.0]])], output_size=(2, 2))
    with pytest.raises(ValueError):  # visionops' own API: ValueError / TypeError as before
        visionops.nms(torch.rand(3, 4), torch.rand(4), 0.5)
    with pytest.raises(TypeError) as info:
        visionops.nms(torch.rand(3, 4).int(), torch.rand(3), 0.5)
    assert isinstance(info.value, RuntimeError)


def test_patched_model_built_outside_the_patch_and_torchvision_restored():
    m = ops.MultiScaleRoIAlign(["0", "1"], 3, 2)
    x = {"0": torch.rand(1, 2, 16, 16), "1": torch.rand(1, 2, 8, 8)}
    boxes = [_boxes(6, scale=20.0)]
    expected = m(x, boxes, [(64, 64)])
    m.scales = m.map_levels = None
    with visionops.patch_torchvision():
        got, seen = _profiled_ops(lambda: m(x, boxes, [(64, 64)]))
        assert type(m.map_levels) is torchvision.ops.poolers.LevelMapper  # torchvision's own, as its forward
    assert "visionops::multi_scale_roi_align" in seen
    torch.testing.assert_close(got, expected)
    assert torchvision.ops.nms is _dropin._tv_nms


class _OnnxMultiScale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = visionops.MultiScaleRoIAlign(["0", "1", "2"], (3, 2), 2, canonical_scale=16)

    def forward(self, f0, f1, f2, boxes):
        return self.pool({"0": f0, "1": f1, "2": f2}, [boxes[:5], boxes[5:]], [(64, 64), (60, 64)])


def test_onnx_export_of_multi_scale_roi_align_runs_in_onnxruntime(tmp_path):
    """The default exporter only: the TorchScript one has no translation of visionops::multi_scale_roi_align."""
    pytest.importorskip("onnxscript")
    g = torch.Generator().manual_seed(4)
    features = [torch.rand(2, 3, 64 // s, 64 // s, generator=g) for s in (4, 8, 16)]
    boxes = torch.cat([_boxes(8, seed=5, scale=20.0), _boxes(4, seed=6, scale=50.0) * 1.2])  # several levels
    inputs = (*features, boxes)
    expected = _OnnxMultiScale()(*inputs)
    assert len(set(visionops.ops.poolers.setup_scales(features, [(64, 64)], 16)[1]([boxes]).tolist())) == 3
    path = tmp_path / "msroi.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_OnnxMultiScale(), inputs, dynamo=True, opset_version=18).save(str(path))
    (got,) = _run_onnxruntime(path, inputs)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=1e-5, atol=1e-5)
