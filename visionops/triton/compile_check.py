"""Compile every Triton kernel of visionops for a GPU target without a GPU: `python -m visionops.triton.compile_check`.

The interpreter (TRITON_INTERPRET=1) accepts kernels that real compilation rejects, so CI runs this too. Each module
in visionops/triton/ lists its kernels in `compile_specs()`. Must run with TRITON_INTERPRET unset. Kernels whose grid
runs over flat indices that can pass 2^31 are also checked to widen their program id to int64 (WIDE_PROGRAM_ID).
"""

import argparse
import importlib
import os
import pkgutil
import re
import sys

# Kernels whose first grid axis runs over flat indices that can pass 2^31 (elements, boxes, or batch x positions):
# the program id must be widened to int64 before any arithmetic (pid.to(tl.int64) * BLOCK); a 32-bit product would
# wrap around. (RoI kernels index RoI bins, checked below 2^31 by their launchers; xcorr tiles of one plane likewise.)
WIDE_PROGRAM_ID = (
    "anchors.",
    "box_coder.",
    "conv._conv_fwd_kernel",
    "conv._conv_dgrad_kernel",
    "conv._conv_depthwise_kernel",
    "conv._sum_splits_kernel",
    "nms.box_iou_kernel",
    "nms.box_iou_backward_kernel",
    "matrix_nms.",
)


def narrow_program_id_uses(ttir: str, axis: str = "x"):
    """Lines of a kernel's Triton IR that use the program id of `axis` other than to sign-extend it to i64: empty when
    every use widens it first."""
    found = re.search(rf"(%[\w.]+) = tt\.get_program_id {axis} : i32", ttir)
    if found is None:
        return []
    name = re.escape(found.group(1))
    uses = [line.strip() for line in ttir.splitlines() if re.search(name + r"(?![\w.])", line)]
    return [
        line
        for line in uses
        if not re.match(rf"%[\w.]+ = (tt\.get_program_id {axis}|arith\.extsi {name} : i32 to i64)\b", line)
    ]


def specs():
    import visionops.triton

    for info in pkgutil.iter_modules(visionops.triton.__path__):
        if info.name == "compile_check":
            continue
        module = importlib.import_module(f"visionops.triton.{info.name}")
        for fn, signature, constexprs in getattr(module, "compile_specs", lambda: [])():
            yield f"{info.name}.{fn.__name__}", fn, signature, constexprs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (interpreted kernels cannot be compiled)", file=sys.stderr)
        return 2
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = count = 0
    for name, fn, signature, constexprs in specs():
        count += 1
        try:
            kernel = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=GPUTarget("cuda", args.arch, 32)
            )
            ok = len(kernel.asm["cubin"]) > 0 and f".target sm_{args.arch}" in kernel.asm["ptx"]
            print(f"{'ok  ' if ok else 'FAIL'} {name} {signature if not ok else ''}")
            narrow = narrow_program_id_uses(kernel.asm["ttir"]) if name.startswith(WIDE_PROGRAM_ID) else []
            if narrow:
                print(f"FAIL {name}: program_id(0) used in 32-bit arithmetic: {narrow[0]}")
            failures += (not ok) or bool(narrow)
        except Exception as e:  # report every kernel, then fail
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            failures += 1
    print(f"compiled {count - failures}/{count} Triton kernels for sm_{args.arch}")
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
