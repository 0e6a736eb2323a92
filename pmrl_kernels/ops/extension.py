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

Op module of the gram_eig op (pmrl_kernels.backends.GramEigModule): is_available, gram_eig_unsupported, gram_eig.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..autograd import gram_eig_autograd
from ..constants import MAX_MODALITIES, MIN_MODALITIES
from ..inputs import SUPPORTED_DTYPES, compute_dtype

try:
    from .. import _C
except ImportError as exc:  # not built (PMRL_SKIP_EXTENSION=1, no compiler, or a torch it was not built for)
    _C = None
    IMPORT_ERROR: Optional[ImportError] = exc
else:
    IMPORT_ERROR = None

__all__ = ["IMPORT_ERROR", "gram_eig", "gram_eig_unsupported", "is_available"]


def is_available(device_type: str) -> bool:
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    return device_type == "cuda" and _C.with_cuda and torch.cuda.is_available()


def gram_eig_unsupported(zs: Sequence[torch.Tensor]) -> Optional[str]:
    if _C is None:
        return f"the extension pmrl_kernels._C is not built ({IMPORT_ERROR})"
    m = len(zs)
    if not MIN_MODALITIES <= m <= MAX_MODALITIES:
        return f"the kernels take {MIN_MODALITIES} to {MAX_MODALITIES} modalities, got M = {m}"
    z = zs[0]
    if z.dtype not in SUPPORTED_DTYPES:
        return f"dtype {z.dtype} is not one of {list(SUPPORTED_DTYPES)}"
    if not is_available(z.device.type):
        return f"no kernel for {z.device.type} tensors in this build (cpu always; cuda when built with nvcc)"
    return None


if _C is not None:

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
