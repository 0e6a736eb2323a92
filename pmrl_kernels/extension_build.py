"""How the C++ extension is built, written once for both ways it gets built.

- At install time, by setup.py, when torch is importable in the build environment (`pip install
  --no-build-isolation`): it becomes `pmrl_kernels._C`, with a record of its build key beside it
  (INSTALLED_RECORD).
- On first use, by pmrl_kernels.ops.extension, when no installed build has the key of the sources at hand: compiled
  with ninja through `torch.utils.cpp_extension.load` into one cache folder per key, where later processes load it
  without compiling.

The build key (build_key) hashes what decides the binary: the sources and headers, the flags and compilers, and the
torch and Python versions. An unchanged build is never redone, a changed one always is, wherever the sources sit.

This file imports nothing of pmrl_kernels and torch only inside functions: setup.py loads it by path before it
knows whether torch is there.

Environment: PMRL_SKIP_EXTENSION=1 builds nothing (install) and compiles nothing (first use); PMRL_SKIP_CUDA=1
builds the CPU kernels only; TORCH_CUDA_ARCH_LIST (default "9.0") the CUDA architectures; MAX_JOBS the parallel
compile jobs (default: the CPUs, at most one per 2 GB of free memory); TORCH_EXTENSIONS_DIR the first-use cache
(default: torch's, ~/.cache/torch_extensions).
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
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
DEFAULT_ARCH_LIST = "9.0"


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
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)


def default_jobs() -> str:
    try:
        with open("/proc/meminfo") as f:
            free_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        return str(max(1, min(os.cpu_count() or 1, free_kb // (2 * 1024 * 1024))))
    except (OSError, StopIteration, ValueError):
        return "1"


# A build record (JSON: key, module, build_config) sits beside a module once it is complete: its key says what the
# module is built from. BUILD_RECORD in a first-use cache folder, INSTALLED_RECORD beside the module setup.py builds.
BUILD_RECORD = "build.json"
INSTALLED_RECORD = "_C.build.json"


def build_inputs(root: Path) -> list[Path]:
    """Every file whose content can reach the binary: all of the source folder (any header a source includes) but
    the C++ self-checks in tests/, which are not part of the extension and are not installed."""
    return sorted(p for p in root.rglob("*") if p.is_file() and "tests" not in p.relative_to(root).parts)


def build_config(with_cuda: bool) -> dict:
    """Everything besides the sources that decides the binary: flags, compilers, and the torch and Python it links
    against. MAX_JOBS is not in it: it changes how long a build takes, not what it makes."""
    from torch.utils import cpp_extension

    config = {"cxx_flags": cxx_flags(), "cxx": os.environ.get("CXX", "c++"), "with_cuda": with_cuda,
              **runtime_config()}
    if with_cuda:
        config.update(nvcc_flags=NVCC_FLAGS, cuda_home=cpp_extension.CUDA_HOME, cc=os.environ.get("CC"),
                      arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST))
    return config


def runtime_config() -> dict:
    """The part of build_config that the running process decides: the torch and Python a module must link against."""
    import sys

    import torch

    return {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "python": sys.implementation.cache_tag,
            "abi": getattr(sys, "abiflags", "")}


def recorded_config(record: dict) -> dict:
    """The build_config an installed module was built with (its record), with this process's torch and Python: the
    compilers and flags of the install stay the install's, whatever this process's environment says."""
    config = {k: v for k, v in record.items() if k not in ("key", "sources", "module")}
    return {**config, **runtime_config()}


def build_key(root: Path, with_cuda: bool, config: Optional[dict] = None) -> str:
    """A hash of the build inputs (by path relative to `root` and content) and of the build config (build_config
    unless given): equal keys make the same binary, so a module built under a key is reused wherever the key is
    equal (another checkout, another install, any absolute path) and never where it is not."""
    digest = hashlib.sha256()
    for path in build_inputs(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    digest.update(json.dumps(build_config(with_cuda) if config is None else config, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def first_use_name(key: str) -> str:
    return f"pmrl_kernels_C_{key}"


def cache_root() -> Path:
    """The first-use cache: TORCH_EXTENSIONS_DIR when set, torch's extension cache otherwise."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def first_use_directory(key: str) -> Path:
    """Where the first-use build of `key` compiles and keeps its module: one folder per key."""
    return cache_root() / first_use_name(key)


def read_record(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(path: Path, record: dict) -> None:
    # written whole, then renamed: a concurrent reader sees no record or a complete one, never part of one
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(partial, path)


def cached_module(key: str) -> Optional[Path]:
    """The module a finished first-use build of `key` left in the cache, if there is one."""
    directory = first_use_directory(key)
    record = read_record(directory / BUILD_RECORD)
    if record is None or record.get("key") != key:
        return None
    module = directory / record["module"]
    return module if module.is_file() else None


def object_files(sources_: list[str]) -> list[str]:
    """The object file ninja writes for each source under torch.utils.cpp_extension.load's naming."""
    return [Path(s).stem + (".cuda.o" if s.endswith(".cu") else ".o") for s in sources_]


def compile_on_first_use(root: Path, key: str, with_cuda: bool, progress):
    """Compile the extension from the sources in `root` into the cache folder of their `key`, record it there, and
    return the module. Raises on failure. `progress(done, total)` is called from another thread as the sources'
    object files appear."""
    import threading

    from torch.utils import cpp_extension

    set_build_defaults(with_cuda)
    directory = first_use_directory(key)
    directory.mkdir(parents=True, exist_ok=True)
    files = sources(root, with_cuda)
    finished = threading.Event()
    watcher = threading.Thread(target=_watch_objects, args=(directory, object_files(files), progress, finished),
                               daemon=True)
    watcher.start()
    try:
        module = cpp_extension.load(
            name=first_use_name(key),
            sources=files,
            extra_include_paths=[str(root / "include")],
            extra_cflags=cxx_flags() + ([f"-D{CUDA_MACRO}=1"] if with_cuda else []),
            extra_cuda_cflags=NVCC_FLAGS + [f"-D{CUDA_MACRO}=1"],
            build_directory=str(directory),
            with_cuda=with_cuda,
            verbose=False,
        )
    finally:
        finished.set()
        watcher.join()
    write_record(directory / BUILD_RECORD, {"key": key, "module": Path(module.__file__).name, "sources": str(root),
                                            **build_config(with_cuda)})
    return module


def _watch_objects(directory: Path, objects: list[str], progress, finished) -> None:
    # one last look once the build is over, so that a build quicker than a poll still reports its files
    done = 0
    while True:
        over = finished.wait(0.5)
        now = sum((directory / name).is_file() for name in objects)
        if now != done:
            done = now
            progress(done, len(objects))
        if over:
            return
