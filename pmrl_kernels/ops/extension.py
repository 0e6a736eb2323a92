"""Backends "cpp" (CPU tensors) and "cuda" (CUDA tensors): the compiled kernels of pmrl_kernels._C.

The extension registers two torch ops (csrc/bindings.cpp):

    pmrl_kernels::cxx_gram_eig_fwd(Tensor[] zs, bool normalize) -> (Tensor S, Tensor U, Tensor lead)
    pmrl_kernels::cxx_gram_eig_bwd(Tensor[] zs, Tensor S, Tensor U, Tensor lead, Tensor? grad_S,
                                   Tensor? grad_lead, bool normalize) -> Tensor   # dL/dz [B, M, D]

dL/dz is laid out modality-major (dz[:, m] contiguous), so the gradient of each input tensor is a view that
autograd keeps without a copy.

Both read the M modality tensors in place (no stack) and follow pmrl_kernels.reference exactly, singular cases
included. This module adds their fake (meta) implementations and the shared autograd.Function over them, so the
backend composes with torch.compile(fullgraph=True).

The extension is built at install when torch was importable there, and otherwise compiled on first use
(load(); pmrl_kernels.extension_build holds the recipe of both).

Op module of the gram_eig op (pmrl_kernels.backends.GramEigModule): is_available, gram_eig_unsupported, gram_eig.
"""
from __future__ import annotations

import sys
import time
import warnings
from typing import Optional, Sequence

import torch

from .. import extension_build
from ..autograd import gram_eig_autograd
from ..constants import MAX_MODALITIES, MIN_MODALITIES
from ..inputs import SUPPORTED_DTYPES, compute_dtype

__all__ = ["gram_eig", "gram_eig_unsupported", "is_available", "load", "load_error"]

# the extension module once looked for: None until then; (module or None, why not) after
_loaded: Optional[tuple] = None


def load():
    """The extension module, or None. The first call imports the one built at install or, failing that, compiles
    it (one line on stderr says so; torch caches the result for later processes). Never at `import pmrl_kernels`:
    the first call comes from the first loss, gram_svd or available_backends() that asks for the backend. A failed
    build warns once per process and leaves the other backends working."""
    global _loaded
    if _loaded is None:
        _loaded = _import_or_build()
        if _loaded[0] is not None:
            _register_fakes()
    return _loaded[0]


def load_error() -> Optional[str]:
    """Why load() returned None (None when it did not, or was not called)."""
    return None if _loaded is None else _loaded[1]


def _import_or_build() -> tuple:
    try:
        from .. import _C

        return _C, None
    except ImportError as exc:  # not built at install (isolated build, PMRL_SKIP_EXTENSION) or for another torch
        installed = f"{extension_build.MODULE} is not installed ({exc})"
    if extension_build.skipped():
        return None, f"{installed}, and {extension_build.SKIP_ENV}=1 turns off its first-use build"
    announce = not extension_build.compiled_before()
    if announce:
        print(f"pmrl_kernels: compiling the C++ extension once, into {extension_build.first_use_directory()} "
              "(about 1.5 minutes on 2 CPU cores, longer with CUDA kernels) ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        module = extension_build.compile_on_first_use()
    except Exception as exc:  # a compiler error, no compiler, no ninja, no sources: the other backends still work
        lines = [line for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
        reason = f"{installed}, and its first-use build failed: {lines[-1].rstrip('.')}"
        warnings.warn(f"pmrl_kernels: {reason}. {extension_build.HOW_TO_BUILD}", RuntimeWarning, stacklevel=2)
        return None, reason
    if announce:
        print(f"pmrl_kernels: the C++ extension is ready, compiled in {time.perf_counter() - start:.0f} s.",
              file=sys.stderr, flush=True)
    return module, None


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
    def _gram_eig_backward_fake(zs, s, u, lead, grad_s, grad_lead, normalize):
        b, d = zs[0].shape
        return zs[0].new_empty(len(zs), b, d).transpose(0, 1)  # modality-major, as the kernels allocate it


# (S, U, lead) as reference.gram_eig, from the compiled kernels; differentiable through S and lead
gram_eig = gram_eig_autograd(
    lambda zs, normalize: torch.ops.pmrl_kernels.cxx_gram_eig_fwd(zs, normalize),
    lambda *args: torch.ops.pmrl_kernels.cxx_gram_eig_bwd(*args),
)
