"""Build: the C++ extension `pmrl_kernels._C` from csrc/ (CPU wherever a C++ compiler exists; CUDA kernels too
where torch has CUDA and nvcc is found). Install with `pip install -e . --no-build-isolation` so the extension is
compiled against the torch already installed (an isolated build would download another torch).

Environment: PMRL_SKIP_EXTENSION=1 installs the pure-Python package only; PMRL_SKIP_CUDA=1 builds the CPU
extension only; TORCH_CUDA_ARCH_LIST (default "9.0") picks the CUDA architectures; MAX_JOBS the parallel
compile jobs (default: from the free memory, 2 GB a job).
"""
import glob
import os
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _default_jobs() -> str:
    try:
        with open("/proc/meminfo") as f:
            free_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return str(max(1, min(os.cpu_count() or 1, free_kb // (2 * 1024 * 1024))))
    except (OSError, StopIteration, ValueError):
        return "1"


def _extensions():
    if os.environ.get("PMRL_SKIP_EXTENSION") == "1":
        return [], {}
    cpp_sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    if not cpp_sources:
        return [], {}
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", _default_jobs())
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    # No -std flag: torch's cpp_extension passes the standard its headers need (C++20 from torch 2.13 on); the
    # sources here are C++17 so that CI can also compile the CUDA files with a bare `nvcc -std=c++17`.
    cxx_flags = ["-O3"]
    import torch

    if torch.backends.openmp.is_available() and os.name == "posix":
        # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs on one thread. Nothing
        # is linked for it: the OpenMP runtime is the one libtorch_cpu already loads.
        cxx_flags.append("-fopenmp")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    want_cuda = os.environ.get("PMRL_SKIP_CUDA") != "1" and bool(cuda_sources)

    has_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if want_cuda and not has_cuda:
        warnings.warn(
            "pmrl_kernels: building the CPU extension only (torch has no CUDA or nvcc was not found); "
            "the 'cuda' backend will be unavailable"
        )
    if want_cuda and has_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = cpp_extension.CUDAExtension(
            "pmrl_kernels._C",
            cpp_sources + cuda_sources,
            include_dirs=include_dirs,
            define_macros=[("PMRL_WITH_CUDA", "1")],
            # no --use_fast_math: the kernels are memory-bound, and they keep the CPU path's IEEE semantics
            # (denormals, exact sqrt and division), so both backends agree with the reference alike
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        )
    else:
        ext = cpp_extension.CppExtension(
            "pmrl_kernels._C", cpp_sources, include_dirs=include_dirs, extra_compile_args=cxx_flags
        )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
