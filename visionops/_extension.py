"""Loads visionops._C (whose import registers the C++/CUDA kernels in the dispatcher) and reports how it was built."""

import warnings

import torch

_REBUILD = (
    "Rebuild it against the torch you are running (torch {torch}): "
    "`pip install --no-build-isolation --force-reinstall --no-deps .` (or `pip install --no-build-isolation -e .` "
    "in a source checkout)."
)

try:
    from visionops import _C  # noqa: F401  (import for its op registrations)
except ImportError as e:  # missing, or built against another torch (undefined symbols)
    raise ImportError(
        f"visionops could not load its compiled extension visionops._C: {e}. "
        + _REBUILD.format(torch=torch.__version__)
    ) from e


def build_info() -> dict:
    """How _C was built: visionops version, the torch it was compiled against, CUDA and its arches, backends, and
    the CPU convolution kernels this machine runs (``cpu_conv``: ``"direct"``, the AVX2 kernels, or ``"blas"``;
    ``cpu_conv_winograd``: whether eligible 3x3 and 3x3x3 convolutions take the Winograd forward). The
    ``VISIONOPS_CONV_CPU`` environment variable chooses: ``direct`` or ``blas`` alone, or unset for the default."""
    raw = dict(kv.split("=", 1) for kv in torch.ops.visionops._build_info().split(";"))
    try:
        import triton  # noqa: F401

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "version": raw["version"],
        "built_with_torch": raw["torch"],
        "running_torch": torch.__version__,
        "cuda_kernels": raw["cuda"] == "1",
        "cuda_arches": [a for a in raw["cuda_arches"].split() if a],
        "triton": triton_version,
        "backends": ["cpp", "reference"] + (["triton"] if triton_version else []),
        "cpu_conv_direct": raw["cpu_conv_direct"] == "1",
        "cpu_conv": raw["cpu_conv"],
        "cpu_conv_winograd": raw["cpu_conv_winograd"] == "1",
    }


def _check_torch_version() -> None:
    built = build_info()["built_with_torch"].split("+")[0].split(".")[:2]
    running = torch.__version__.split("+")[0].split(".")[:2]
    if built != running:
        warnings.warn(
            f"visionops._C was built against torch {'.'.join(built)} but torch {'.'.join(running)} is running. "
            + _REBUILD.format(torch=torch.__version__),
            RuntimeWarning,
            stacklevel=3,
        )


_check_torch_version()
