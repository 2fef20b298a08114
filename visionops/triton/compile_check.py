"""Compile every Triton kernel of visionops for a GPU target without a GPU: `python -m visionops.triton.compile_check`.

The interpreter (TRITON_INTERPRET=1) accepts kernels that real compilation rejects, so CI runs this too. Each module
in visionops/triton/ lists its kernels in `compile_specs()`. Must run with TRITON_INTERPRET unset.
"""

import argparse
import importlib
import os
import pkgutil
import sys


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
            failures += not ok
        except Exception as e:  # report every kernel, then fail
            print(f"FAIL {name}: {type(e).__name__}: {e}")
            failures += 1
    print(f"compiled {count - failures}/{count} Triton kernels for sm_{args.arch}")
    return 1 if failures or count == 0 else 0


if __name__ == "__main__":
    sys.exit(main())
