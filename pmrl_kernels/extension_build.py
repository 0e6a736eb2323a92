"""How the C++ extension is built, written once for both ways it gets built.

- At install time, by setup.py, when torch is importable in the build environment (`pip install
  --no-build-isolation`): it becomes `pmrl_kernels._C`.
- On first use, by pmrl_kernels.ops.extension, when it was not (pip's default isolated build has no torch, and
  this package never asks pip for one): compiled with ninja through `torch.utils.cpp_extension.load`, once, into
  torch's extension cache, where later processes find it.

This file imports nothing of pmrl_kernels and torch only inside functions: setup.py loads it by path before it
knows whether torch is there.

Environment: PMRL_SKIP_EXTENSION=1 builds nothing (install) and compiles nothing (first use); PMRL_SKIP_CUDA=1
builds the CPU kernels only; TORCH_CUDA_ARCH_LIST (default "9.0") the CUDA architectures; MAX_JOBS the parallel
compile jobs (default: the CPUs, at most one per 2 GB of free memory); TORCH_EXTENSIONS_DIR the first-use cache.
"""
from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from typing import Optional

SKIP_ENV = "PMRL_SKIP_EXTENSION"
MODULE = "pmrl_kernels._C"  # the name of the extension built at install
HOW_TO_BUILD = (
    "To get the 'cpp' backend (and 'cuda'), install a C++ compiler (and nvcc), then run again: it compiles on first "
    "use; or reinstall with `pip install --no-build-isolation .`, which compiles it at install. "
    f"{SKIP_ENV}=1 turns the extension off and this message with it."
)


def skipped() -> bool:
    return os.environ.get(SKIP_ENV) == "1"


def source_root() -> Optional[Path]:
    """The C++ sources: the copy installed inside the package (a regular install), or the checkout's csrc/ (an
    editable install, or setup.py itself)."""
    package = Path(__file__).resolve().parent
    for root in (package / "csrc", package.parent / "csrc"):
        if (root / "bindings.cpp").is_file():
            return root
    return None


def sources(root: Path, with_cuda: bool) -> list[str]:
    cpp = sorted(glob.glob(str(root / "*.cpp")) + glob.glob(str(root / "cpu" / "*.cpp")))
    return cpp + (sorted(glob.glob(str(root / "cuda" / "*.cu"))) if with_cuda else [])


def cxx_flags() -> list[str]:
    # No -std flag: torch passes the standard its headers need (C++20 from torch 2.13 on); the sources are C++17 so
    # that the static check can also compile the CUDA files with a bare `nvcc -std=c++17`.
    import torch

    flags = ["-O3"]
    if torch.backends.openmp.is_available() and os.name == "posix":
        # at::parallel_for is inlined from ATen's OpenMP header: without -fopenmp it runs on one thread. Nothing
        # is linked for it: the OpenMP runtime is the one libtorch_cpu already loads.
        flags.append("-fopenmp")
    return flags


# no --use_fast_math: the kernels are memory-bound, and they keep the CPU path's IEEE semantics (denormals, exact
# sqrt and division), so both backends agree with the reference alike
NVCC_FLAGS = ["-O3", "-lineinfo"]
CUDA_MACRO = "PMRL_WITH_CUDA"


def cuda_plan() -> tuple[bool, Optional[str]]:
    """(build the CUDA kernels?, why not when there are CUDA sources but no CUDA build)."""
    import torch
    from torch.utils import cpp_extension

    if os.environ.get("PMRL_SKIP_CUDA") == "1":
        return False, None
    if torch.version.cuda is None or cpp_extension.CUDA_HOME is None:
        return False, "torch has no CUDA or nvcc was not found: the 'cuda' backend will be unavailable"
    return True, None


def set_build_defaults(with_cuda: bool) -> None:
    os.environ.setdefault("MAX_JOBS", default_jobs())
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")


def default_jobs() -> str:
    try:
        with open("/proc/meminfo") as f:
            free_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return str(max(1, min(os.cpu_count() or 1, free_kb // (2 * 1024 * 1024))))
    except (OSError, StopIteration, ValueError):
        return "1"


def first_use_name() -> str:
    """The cached module's name: one per package, Python and torch version, so an upgrade compiles afresh rather
    than loading a library built for another."""
    import sys

    import torch

    from_init = re.search(r'__version__ = "([^"]+)"', (Path(__file__).parent / "__init__.py").read_text())
    version = from_init.group(1) if from_init else "0"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    return re.sub(r"\W", "_", f"pmrl_kernels_C_{version}_{python}_torch{torch.__version__}")


def first_use_directory() -> Path:
    """Where the first-use build compiles and caches the module (under TORCH_EXTENSIONS_DIR when set)."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    return Path(root) / first_use_name()


def compiled_before() -> bool:
    """Whether a first-use build left a module in the cache (torch still recompiles it if the sources changed)."""
    return any(first_use_directory().glob(f"{first_use_name()}*.so"))


def compile_on_first_use():
    """Compile the extension now, or load it from torch's cache, and return the module. Raises on failure."""
    from torch.utils import cpp_extension

    root = source_root()
    if root is None:
        raise FileNotFoundError("the C++ sources are not installed with the package (no csrc/ folder)")
    with_cuda, _ = cuda_plan()
    set_build_defaults(with_cuda)
    directory = first_use_directory()
    directory.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=first_use_name(),
        sources=sources(root, with_cuda),
        extra_include_paths=[str(root / "include")],
        extra_cflags=cxx_flags() + ([f"-D{CUDA_MACRO}=1"] if with_cuda else []),
        extra_cuda_cflags=NVCC_FLAGS + [f"-D{CUDA_MACRO}=1"],
        build_directory=str(directory),
        with_cuda=with_cuda,
        verbose=False,
    )
