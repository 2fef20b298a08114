"""Build visionops._C: C++ CPU kernels always, CUDA kernels when CUDA is available or FORCE_CUDA=1.

Use `pip install --no-build-isolation [-e] .` so the extension is built against the torch already installed.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

# torch's CUDA detection prefers /usr/local, where `nvcc` may be a wrapper; use the real toolkit when unset. Set
# before importing cpp_extension, which reads (and logs) it at import.
if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for users
    sys.exit(
        "visionops needs PyTorch to build, and must be built against the torch you will run it with. Install torch "
        "first (e.g. `pip install torch`), then run `pip install --no-build-isolation .` (or `-e .`): without "
        "--no-build-isolation pip builds in an isolated environment that has no torch."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _nvidia_include_dirs():
    """CUDA library headers (cusparse.h, cublas.h, ...) shipped by the `nvidia` pip packages torch depends on."""
    try:
        import nvidia  # namespace package installed with torch's CUDA wheels
    except ImportError:
        return []
    # CUDA 13 wheels put every header under nvidia/cu13/include; CUDA 12 wheels use one folder per library.
    dirs = [d for base in nvidia.__path__ for d in sorted(glob.glob(os.path.join(base, "*", "include")))]
    return [d for d in dirs if glob.glob(os.path.join(d, "cu*.h"))]


def _with_cuda():
    if _env_flag("FORCE_CUDA"):
        return True
    return torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None


def _glob(pattern):
    """Files matching `pattern` under the setup.py folder (a checkout or an unpacked sdist), as the relative paths
    setuptools expects: pip and build run setup.py from its own folder."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(glob.escape(ROOT), pattern)))


def _sources(with_cuda):
    srcs = _glob("csrc/ops/*.cpp") + _glob("csrc/ops/cpu/*.cpp") + ["csrc/python_module.cpp"]
    if with_cuda:
        srcs += _glob("csrc/ops/cuda/*.cu")
    return srcs


def _extension():
    with_cuda = _with_cuda()
    if with_cuda and not torch.cuda.is_available() and "TORCH_CUDA_ARCH_LIST" not in os.environ:
        # No GPU to query: cover Ampere and Hopper.
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "native") if with_cuda else ""
    define_macros = [
        ("VISIONOPS_TORCH_VERSION", '"%s"' % torch.__version__),
        ("VISIONOPS_CUDA_ARCHES", '"%s"' % arch_list.replace(";", " ")),
        ("VISIONOPS_VERSION", '"%s"' % VERSION),
        ("Py_LIMITED_API", "0x030A0000"),  # the value recent torch passes too
    ]
    cxx = ["-O3", "-fdiagnostics-color=always"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is an OpenMP region compiled into *our* code (ATen/ParallelOpenMP.h): without -fopenmp it
        # runs serially. libgomp.so.1 resolves to the copy torch already loaded, so set_num_threads still applies.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _env_flag("VISIONOPS_NATIVE"):  # opt-in: tune for the build machine (not portable)
        cxx.append("-march=native")
    extra = {"cxx": cxx}
    kwargs = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        py_limited_api=True,
        extra_link_args=link,
    )
    if with_cuda:
        define_macros.append(("VISIONOPS_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kwargs["include_dirs"] += _nvidia_include_dirs()
        return cpp_extension.CUDAExtension("visionops._C", _sources(True), extra_compile_args=extra, **kwargs)
    return cpp_extension.CppExtension("visionops._C", _sources(False), extra_compile_args=extra, **kwargs)


setup(
    name="visionops",
    version=VERSION,
    packages=find_packages(include=["visionops", "visionops.*"]),
    ext_modules=[_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
