"""Backends "cpp" (CPU tensors) and "cuda" (CUDA tensors): the compiled kernels of pmrl_kernels._C.

The extension registers two torch ops (csrc/bindings.cpp):

    pmrl_kernels::cxx_gram_eig_fwd(Tensor[] zs, bool normalize) -> (Tensor S, Tensor U, Tensor lead)
    pmrl_kernels::cxx_gram_eig_bwd(Tensor[] zs, Tensor S, Tensor U, Tensor? grad_S, Tensor? grad_lead,
                                   bool normalize) -> Tensor   # dL/dz [B, M, D]

dL/dz is laid out modality-major (dz[:, m] contiguous), so the gradient of each input tensor is a view that
autograd keeps without a copy.

Both read the M modality tensors in place (no stack) and follow pmrl_kernels.reference exactly, singular cases
included. This module adds their fake (meta) implementations and the shared autograd.Function over them, so the
backend composes with torch.compile(fullgraph=True).

The extension is built at install when torch was importable there, and otherwise compiled on first use into a cache
keyed by what decides the binary (load(); pmrl_kernels.extension_build holds the recipe of both).

Op module of the gram_eig op (pmrl_kernels.backends.GramEigModule): is_available, gram_eig_unsupported, gram_eig.
"""
from __future__ import annotations

import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from .. import extension_build
from ..autograd import gram_eig_autograd
from ..constants import MAX_MODALITIES, MIN_MODALITIES
from ..inputs import SUPPORTED_DTYPES, compute_dtype

__all__ = ["gram_eig", "gram_eig_unsupported", "is_available", "load", "load_error", "origin"]

# the extension module once looked for: None until then; (module or None, why not, where from) after
_loaded: Optional[tuple] = None


def load():
    """The extension module, or None. The first call takes the build setup.py installed when its build key is that
    of the package's sources (or when it has no build record), else the first-use build of that key from the cache,
    and compiles one otherwise. Whatever is not the installed build inside this package says so on stderr: one line
    naming the module it loads, or, before any compile, one line naming the cache folder it compiles into, then its
    progress (files done of total); a module from the cache and a compile also say which installed builds were
    passed over and why. Never at `import pmrl_kernels`: the first call comes from the first loss, gram_svd or
    available_backends() that asks for the backend. A failed build warns once per process and leaves the other
    backends working."""
    global _loaded
    if _loaded is None:
        _loaded = _import_or_build()
        if _loaded[0] is not None:
            _register_fakes()
    return _loaded[0]


def load_error() -> Optional[str]:
    """Why load() returned None (None when it did not, or was not called)."""
    return None if _loaded is None else _loaded[1]


def origin() -> Optional[str]:
    """Where the loaded extension comes from: "installed build PATH", "first-use cache PATH" or "compiled into PATH"
    (None when load() was not called or returned None)."""
    return None if _loaded is None else _loaded[2]


def _say(message: str) -> None:
    print(f"pmrl_kernels: {message}", file=sys.stderr, flush=True)


def _installed_builds() -> list[Path]:
    """The modules setup.py built: the one inside this package, then those of installed distributions elsewhere (a
    checkout imported from its root shadows the installed package, whose build may still be the one it needs)."""
    package = Path(__file__).resolve().parents[1]
    names = {f"_C{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES}
    found = [package / name for name in sorted(names) if (package / name).is_file()]
    for dist in importlib.metadata.distributions(name="pmrl_kernels"):
        for file in dist.files or ():
            path = Path(dist.locate_file(file)).resolve() if file.parts == ("pmrl_kernels", file.name) else None
            if file.name in names and path is not None and path.is_file() and path not in found:
                found.append(path)
    return found


def _load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _try_installed(path: Path, root: Optional[Path]) -> tuple:
    """(module or None, why not) for the installed build at `path`."""
    record = extension_build.read_record(path.with_name(extension_build.INSTALLED_RECORD))
    checkable = record is not None and root is not None
    if checkable:
        key = extension_build.build_key(root, record["with_cuda"], extension_build.recorded_config(record))
        if key != record["key"]:
            return None, f"{path} has build key {record['key']}, the sources {root} make {key}"
    # without a record or without sources to compare it with, nothing says a build is stale: it is used as it is
    try:
        if path.parent == Path(__file__).resolve().parents[1]:
            from .. import _C

            return _C, None
        module = _load_module(extension_build.MODULE, path)
    except ImportError as exc:  # built for another torch, or hidden
        return None, f"{path} does not import ({exc})"
    checked = ("has the build key of the sources imported here" if checkable
               else "has no build record to check against the sources imported here" if record is None
               else "has no sources here to check its build record against")
    _say(f"the C++ extension is the installed build {path}, which {checked} ({root})")
    return module, None


def _import_or_build() -> tuple:
    root = extension_build.source_root()
    passed_over = []
    for path in _installed_builds():
        module, why_not = _try_installed(path, root)
        if module is not None:
            return module, None, f"installed build {path}"
        passed_over.append(why_not)
    installed = "; ".join(passed_over) or f"{extension_build.MODULE} is not installed"
    if extension_build.skipped():
        return None, f"{installed}, and {extension_build.SKIP_ENV}=1 turns off its first-use build", None
    try:
        if root is None:
            raise FileNotFoundError("the C++ sources are not installed with the package (no csrc/ folder)")
        with_cuda, _ = extension_build.cuda_plan()
        key = extension_build.build_key(root, with_cuda)
        cached = extension_build.cached_module(key)
        if cached is not None:
            module = _load_module(extension_build.first_use_name(key), cached)
            _say(f"the C++ extension is the first-use build {cached} ({installed})")
            return module, None, f"first-use cache {cached}"
        directory = extension_build.first_use_directory(key)
        files = len(extension_build.sources(root, with_cuda))
        _say(f"compiling the C++ extension ({files} files{', CUDA kernels included' if with_cuda else ''}) once for "
             f"the sources {root} (build key {key}) into {directory}, a few minutes ({installed}) ...")
        start = time.perf_counter()
        module = extension_build.compile_on_first_use(
            root, key, with_cuda, progress=lambda done, total: _say(f"compiled {done} of {total} files"))
    except Exception as exc:  # a compiler error, no compiler, no ninja, no sources: the other backends still work
        lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        reason = f"{installed}, and its first-use build failed: {lines[-1].rstrip('.')}"
        warnings.warn(f"pmrl_kernels: {reason}. {extension_build.HOW_TO_BUILD}", RuntimeWarning, stacklevel=2)
        return None, reason, None
    _say(f"the C++ extension is ready, compiled in {time.perf_counter() - start:.0f} s: {module.__file__}")
    return module, None, f"compiled into {module.__file__}"


@torch.compiler.assume_constant_result
def _built_for(device_type: str) -> bool:
    """Whether the extension, loaded now if need be, has kernels for `device_type`. A constant to torch.compile,
    which cannot trace a first-use build."""
    module = load()
    return module is not None and (device_type == "cpu" or (device_type == "cuda" and module.with_cuda))


def is_available(device_type: str) -> bool:
    return _built_for(device_type) and (device_type == "cpu" or torch.cuda.is_available())


def gram_eig_unsupported(zs: Sequence[torch.Tensor]) -> Optional[str]:
    if not _built_for("cpu"):
        return f"the C++ extension is unavailable: {load_error()}"
    m = len(zs)
    if not MIN_MODALITIES <= m <= MAX_MODALITIES:
        return f"the kernels take {MIN_MODALITIES} to {MAX_MODALITIES} modalities, got M = {m}"
    z = zs[0]
    if z.dtype not in SUPPORTED_DTYPES:
        return f"dtype {z.dtype} is not one of {list(SUPPORTED_DTYPES)}"
    if not is_available(z.device.type):
        return f"no kernel for {z.device.type} tensors in this build (cpu always; cuda when built with nvcc)"
    return None


def _register_fakes() -> None:
    @torch.library.register_fake("pmrl_kernels::cxx_gram_eig_fwd")
    def _gram_eig_fake(zs, normalize):
        (b, d), m = zs[0].shape, len(zs)
        dtype = compute_dtype(zs[0].dtype)
        z = zs[0]
        return z.new_empty(b, m, dtype=dtype), z.new_empty(b, m, m, dtype=dtype), z.new_empty(b, d, dtype=dtype)

    @torch.library.register_fake("pmrl_kernels::cxx_gram_eig_bwd")
    def _gram_eig_backward_fake(zs, s, u, grad_s, grad_lead, normalize):
        b, d = zs[0].shape
        return zs[0].new_empty(len(zs), b, d).transpose(0, 1)  # modality-major, as the kernels allocate it


# (S, U, lead) as reference.gram_eig, from the compiled kernels; differentiable through S and lead
gram_eig = gram_eig_autograd(
    lambda zs, normalize: torch.ops.pmrl_kernels.cxx_gram_eig_fwd(zs, normalize),
    lambda *args: torch.ops.pmrl_kernels.cxx_gram_eig_bwd(*args),
)
