"""Checks the CUDA convolution kernels against torch on a GPU machine.

    python benchmarks/conv_cuda_check.py [--configs 50] [--seed 0]     (after building with FORCE_CUDA=1)

Compares the forward and every gradient of torch.ops.visionops.conv2d / conv3d (and their backward ops) with
F.conv2d / F.conv3d evaluated in float64 on the same (rounded) inputs, over random configurations: float64, float32,
float16 and bfloat16; strides, paddings, dilations, groups including depthwise; channels-last and strided inputs;
batches of 0 and 1; output masks; calls large enough to be split into several column chunks. Also checks the memory
format of every output, and that in deterministic mode the gradients are bit-identical across two runs. Prints one
line per failure and a summary; exits 1 if anything failed.
"""

import argparse
import os
import random
import sys
import traceback
from pathlib import Path

# cuBLAS is reproducible only with a fixed workspace; deterministic mode refuses cuBLAS calls without it.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's visionops (built in place)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import visionops  # noqa: E402, F401  (loads the extension's registrations)

# Normalised error bound per dtype: max |out - ref| / max(1, max |ref|), ref computed in float64 from the same
# inputs, so the bound covers one final rounding plus float32 accumulation.
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def expected_format(t):
    cl = torch.channels_last_3d if t.dim() == 5 else torch.channels_last
    return cl if t.is_contiguous(memory_format=cl) and not t.is_contiguous() else torch.contiguous_format


def has_format(t, fmt):
    return t.is_contiguous(memory_format=fmt)


def rel_err(out, ref):
    if ref.numel() == 0:
        return 0.0
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp(min=1.0)).item()


def random_config(rng, ndim, dtype):
    depthwise = rng.random() < 0.25
    if depthwise:
        cin = rng.randint(1, 6)
        groups, cout = cin, cin * rng.choice([1, 2])
    else:
        groups = rng.choice([1, 1, 2, 3])
        cin, cout = groups * rng.randint(1, 4), groups * rng.randint(1, 4)
    k = [rng.randint(1, 4 if ndim == 2 else 3) for _ in range(ndim)]
    stride = [rng.randint(1, 3) for _ in range(ndim)]
    dilation = [rng.randint(1, 2) for _ in range(ndim)]
    padding = [rng.randint(0, 2) for _ in range(ndim)]
    size = []
    for i in range(ndim):
        lo = max(1, dilation[i] * (k[i] - 1) + 1 - 2 * padding[i])
        size.append(rng.randint(lo, lo + (9 if ndim == 2 else 5)))
    return dict(
        ndim=ndim,
        dtype=dtype,
        batch=rng.choice([0, 1, 1, 2, 3, 4]),
        cin=cin,
        cout=cout,
        groups=groups,
        kernel=k,
        size=size,
        stride=stride,
        padding=padding,
        dilation=dilation,
        bias=rng.random() < 0.7,
        layout=rng.choice(["contiguous", "channels_last", "strided"]),
        weight_cl=rng.random() < 0.2,
        mask=[True, True, True] if rng.random() < 0.6 else [rng.random() < 0.5 for _ in range(3)],
    )


def make_inputs(cfg, gen):
    dtype, ndim = cfg["dtype"], cfg["ndim"]
    cl = torch.channels_last if ndim == 2 else torch.channels_last_3d

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to("cuda", dtype)

    shape = [cfg["batch"], cfg["cin"], *cfg["size"]]
    if cfg["layout"] == "strided":  # every other element of the last axis: no plain layout
        x = rand(*shape[:-1], 2 * shape[-1])[..., ::2]
    else:
        x = rand(*shape)
        if cfg["layout"] == "channels_last":
            x = x.contiguous(memory_format=cl)
    w = rand(cfg["cout"], cfg["cin"] // cfg["groups"], *cfg["kernel"])
    if cfg["weight_cl"]:
        w = w.contiguous(memory_format=cl)
    b = rand(cfg["cout"]) if cfg["bias"] else None
    return x, w, b


def ops(ndim):
    if ndim == 2:
        return torch.ops.visionops.conv2d, torch.ops.visionops._conv2d_backward, F.conv2d
    return torch.ops.visionops.conv3d, torch.ops.visionops._conv3d_backward, F.conv3d


def check(cfg, gen):
    """The failures of one configuration, as strings."""
    fwd, bwd, ref_fn = ops(cfg["ndim"])
    x, w, b = make_inputs(cfg, gen)
    args = (cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
    tol = TOL[cfg["dtype"]]
    failures = []

    out = fwd(x, w, b, *args)
    xr, wr = x.double().requires_grad_(), w.double().requires_grad_()
    br = b.double().requires_grad_() if b is not None else None
    ref = ref_fn(xr, wr, br, *args)
    if out.shape != ref.shape or out.dtype != x.dtype:
        return [f"forward: shape/dtype {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {x.dtype}"]
    if (e := rel_err(out, ref.detach())) > tol:
        failures.append(f"forward: error {e:.2e} > {tol:.0e}")
    if not has_format(out, expected_format(x)):
        failures.append(f"forward: output strides {out.stride()} not in {expected_format(x)}")

    g = torch.randn(ref.shape, generator=gen, dtype=torch.float64).to("cuda", cfg["dtype"])
    mask = cfg["mask"]
    gi, gw, gb = bwd(g, x, w, *args, mask)
    wanted = [xr, wr] + ([br] if br is not None else [])
    refs = torch.autograd.grad(ref, wanted, g.double(), allow_unused=True) if ref.numel() else [None] * 3
    ref_gi, ref_gw = refs[0], refs[1]
    ref_gb = g.double().sum([0, *range(2, g.dim())])
    results = (("grad_input", gi, ref_gi, x), ("grad_weight", gw, ref_gw, w), ("grad_bias", gb, ref_gb, None))
    for wanted_i, (name, got, exp, like) in zip(mask, results):
        if not wanted_i:
            if got.shape != (0,):
                failures.append(f"{name}: not requested but has shape {tuple(got.shape)}, expected (0,)")
            continue
        exp = torch.zeros_like(like if like is not None else ref_gb, dtype=torch.float64) if exp is None else exp
        if got.shape != exp.shape or got.dtype != x.dtype:
            failures.append(f"{name}: shape/dtype {tuple(got.shape)} {got.dtype}, expected {tuple(exp.shape)}")
            continue
        if (e := rel_err(got, exp)) > tol:
            failures.append(f"{name}: error {e:.2e} > {tol:.0e}")
        if like is not None and not has_format(got, expected_format(like)):
            failures.append(f"{name}: strides {got.stride()} not in {expected_format(like)}")
    return failures


def fixed_configs():
    """Calls whose column buffers span several chunks (the batch split; single images too large for one buffer,
    split into runs of output positions or of channels), and depthwise/1x1 extremes."""
    base = dict(groups=1, bias=True, layout="contiguous", weight_cl=False, mask=[True, True, True])
    return [
        dict(
            base,
            ndim=3,
            dtype=torch.float32,
            batch=2,
            cin=32,
            cout=8,
            kernel=[3, 3, 3],
            size=[64, 64, 64],
            stride=[1, 1, 1],
            padding=[1, 1, 1],
            dilation=[1, 1, 1],
            layout="channels_last",
        ),
        dict(
            base,
            ndim=2,
            dtype=torch.bfloat16,
            batch=1,
            cin=64,
            cout=16,
            groups=2,
            kernel=[3, 3],
            size=[512, 512],
            stride=[1, 1],
            padding=[1, 1],
            dilation=[1, 1],
        ),
        dict(
            base,
            ndim=2,
            dtype=torch.float32,
            batch=8,
            cin=64,
            cout=32,
            kernel=[3, 3],
            size=[128, 128],
            stride=[1, 1],
            padding=[1, 1],
            dilation=[1, 1],
        ),
        dict(
            base,
            ndim=2,
            dtype=torch.bfloat16,
            batch=6,
            cin=96,
            cout=16,
            kernel=[3, 3],
            size=[256, 240],
            stride=[1, 2],
            padding=[1, 0],
            dilation=[2, 1],
            layout="channels_last",
        ),
        dict(
            base,
            ndim=3,
            dtype=torch.float32,
            batch=4,
            cin=16,
            cout=8,
            kernel=[3, 3, 3],
            size=[24, 40, 40],
            stride=[1, 1, 1],
            padding=[1, 1, 1],
            dilation=[1, 1, 1],
            layout="channels_last",
        ),
        dict(
            base,
            ndim=2,
            dtype=torch.float32,
            batch=2,
            cin=32,
            cout=32,
            groups=32,
            kernel=[5, 5],
            size=[33, 31],
            stride=[2, 2],
            padding=[2, 2],
            dilation=[1, 1],
        ),
        dict(
            base,
            ndim=2,
            dtype=torch.float16,
            batch=3,
            cin=16,
            cout=24,
            kernel=[1, 1],
            size=[20, 20],
            stride=[1, 1],
            padding=[0, 0],
            dilation=[1, 1],
            layout="strided",
        ),
        dict(
            base,
            ndim=3,
            dtype=torch.float64,
            batch=1,
            cin=4,
            cout=6,
            groups=2,
            kernel=[2, 3, 1],
            size=[5, 7, 6],
            stride=[2, 1, 3],
            padding=[0, 2, 1],
            dilation=[2, 1, 1],
            bias=False,
        ),
    ]


def determinism(gen):
    """The backward twice in deterministic mode, on calls split into several chunks (whole images; runs of one
    image's positions and channels): the gradients must match bit for bit."""
    failures = []
    for i in (2, 0):
        cfg = fixed_configs()[i]
        fwd, bwd, _ = ops(cfg["ndim"])
        x, w, b = make_inputs(cfg, gen)
        args = (cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"])
        g = torch.randn(fwd(x, w, b, *args).shape, generator=gen).to("cuda", x.dtype)
        torch.use_deterministic_algorithms(True)
        try:
            runs = [bwd(g, x, w, *args, [True, True, True]) for _ in range(2)]
            torch.cuda.synchronize()
        finally:
            torch.use_deterministic_algorithms(False)
        names = ("grad_input", "grad_weight", "grad_bias")
        failures += [
            f"deterministic (fixed config {i}): {n} differs between two runs"
            for n, r1, r2 in zip(names, *runs)
            if not torch.equal(r1, r2)
        ]
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", type=int, default=50, help="random configurations (default 50)")
    parser.add_argument("--seed", type=int, default=0)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        print("conv_cuda_check: no CUDA device")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rng = random.Random(opts.seed)
    gen = torch.Generator().manual_seed(opts.seed)
    configs = fixed_configs() + [
        random_config(rng, 2 if i % 3 else 3, DTYPES[i % len(DTYPES)]) for i in range(opts.configs)
    ]
    failed = 0
    for i, cfg in enumerate(configs):
        try:
            failures = check(cfg, gen)
        except Exception as exc:  # a crash is a failure of that configuration; carry on with the others
            failures = [f"raised {type(exc).__name__}: {exc}".splitlines()[0]]
            traceback.print_exc(limit=2)
        failed += bool(failures)
        brief = {k: (str(v).replace("torch.", "") if k == "dtype" else v) for k, v in cfg.items()}
        for f in failures:
            print(f"FAIL config {i} {brief}: {f}")
    try:
        det = determinism(gen)
    except Exception as exc:
        det = [f"deterministic: raised {type(exc).__name__}: {exc}".splitlines()[0]]
    for f in det:
        print(f"FAIL {f}")
    print(
        f"conv_cuda_check on {torch.cuda.get_device_name()}: {len(configs) - failed}/{len(configs)} configurations "
        f"passed; deterministic backward {'ok' if not det else 'FAILED'}"
    )
    return 1 if failed or det else 0


if __name__ == "__main__":
    sys.exit(main())
