"""Smoke test of an installed visionops (CPU): it is the copy installed in this interpreter's environment, it
imports, NMS gives a known answer, roi_align forward and backward match the pure-PyTorch reference, build_info()
describes this build.

    python .ci/smoke.py [--forbid DIR ...] [--no-triton] [--cpu-only]

Run it from a directory outside the checkout. --forbid fails if visionops or its _C comes from under DIR (the
checkout, or an editable install elsewhere); --no-triton also checks that triton is not installed (visionops must
import without it); --cpu-only checks that _C holds no CUDA kernels (a build without FORCE_CUDA and without a GPU).
"""

import argparse
import importlib.util
import os
import sys
import sysconfig


def _under(path, root):
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forbid", action="append", default=[], metavar="DIR")
    parser.add_argument("--no-triton", action="store_true")
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()

    if args.no_triton:
        assert importlib.util.find_spec("triton") is None, "triton is installed, but this check runs without it"

    import torch
    import visionops
    import visionops._C

    # The visionops that is imported is the one installed in this environment's site-packages: not the checkout
    # (current directory, PYTHONPATH) and not an editable install found through a system site-packages.
    site_dirs = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    for name, path in (("visionops", visionops.__file__), ("visionops._C", visionops._C.__file__)):
        assert any(_under(path, d) for d in site_dirs), f"{name} imported from {path}, not from {sorted(site_dirs)}"
        for bad in args.forbid:
            assert not _under(path, bad), f"{name} imported from {path}, under {bad}"
    print(f"visionops {visionops.__version__} from {os.path.dirname(visionops.__file__)}; torch {torch.__version__}")

    info = visionops.build_info()
    print("build_info:", info)
    assert info["version"] == visionops.__version__, info
    assert info["built_with_torch"].split("+")[0] == torch.__version__.split("+")[0], info
    assert info["running_torch"] == torch.__version__, info
    assert {"cpp", "reference"} <= set(info["backends"]), info
    assert ("triton" in info["backends"]) == (importlib.util.find_spec("triton") is not None), info
    if args.no_triton:
        assert info["triton"] is None, info
    if args.cpu_only:
        assert info["cuda_kernels"] is False and info["cuda_arches"] == [], info

    # NMS: box 1 overlaps box 0 with IoU 81/100 > 0.5; box 2 overlaps nothing. Kept indices by decreasing score.
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [21, 21, 30, 30]])
    for scores, expected in (([0.9, 0.8, 0.7, 0.6], [0, 2]), ([0.6, 0.9, 0.7, 0.8], [1, 3])):
        for backend in ("cpp", "reference", "auto"):
            keep = visionops.nms(boxes, torch.tensor(scores), 0.5, backend=backend)
            assert keep.dtype == torch.long and keep.tolist() == expected, (backend, scores, keep)
    keep = visionops.batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([0, 1, 0, 0]), 0.5)
    assert keep.tolist() == [0, 1, 2], keep

    # roi_align forward and backward (to the features) against the reference backend.
    g = torch.Generator().manual_seed(0)
    for aligned, sampling_ratio in ((True, 2), (False, -1)):
        x = torch.randn(2, 3, 12, 16, generator=g, dtype=torch.float64)
        xy = torch.rand(5, 2, generator=g, dtype=torch.float64) * torch.tensor([12.0, 8.0], dtype=torch.float64)
        wh = torch.rand(5, 2, generator=g, dtype=torch.float64) * 8 + 1
        rois = torch.cat([torch.tensor([[0.0], [1], [0], [1], [1]], dtype=torch.float64), xy, xy + wh], dim=1)
        grad = torch.randn(5, 3, 3, 4, generator=g, dtype=torch.float64)
        results = {}
        for backend in ("cpp", "reference"):
            xb = x.clone().requires_grad_()
            out = visionops.roi_align(xb, rois, (3, 4), 0.5, sampling_ratio, aligned, backend=backend)
            out.backward(grad)
            results[backend] = (out.detach(), xb.grad)
        assert results["cpp"][0].shape == (5, 3, 3, 4)
        assert results["cpp"][1].abs().sum() > 0
        torch.testing.assert_close(results["cpp"][0], results["reference"][0])
        torch.testing.assert_close(results["cpp"][1], results["reference"][1])
    print("smoke: ok")


if __name__ == "__main__":
    sys.exit(main())
