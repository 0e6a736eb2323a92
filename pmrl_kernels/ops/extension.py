"""Backends "cpp" (CPU tensors) and "cuda" (CUDA tensors): the compiled kernels of pmrl_kernels._C.

The extension registers two torch ops (csrc/bindings.cpp):

    pmrl_kernels::gram_eig(Tensor[] zs, bool normalize) -> (Tensor S, Tensor U, Tensor lead)
    pmrl_kernels::gram_eig_backward(Tensor[] zs, Tensor S, Tensor U, Tensor lead, Tensor? grad_S,
                                    Tensor? grad_lead, bool normalize) -> Tensor   # dL/dz [B, M, D]

dL/dz is laid out modality-major (dz[:, m] contiguous), so the gradient of each input tensor is a view that
autograd keeps without a copy.

Both read the M modality tensors in place (no stack) and follow pmrl_kernels.reference exactly, singular cases
included. This module adds their fake (meta) implementations and the shared autograd.Function over them, so the
backend composes with torch.compile(fullgraph=True).

Backend interface (see pmrl_kernels.backends): is_available, unsupported_reason, gram_eig.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..autograd import gram_eig_autograd
from ..inputs import SUPPORTED_DTYPES, compute_dtype

try:
    from .. import _C
except ImportError as exc:  # not built (PMRL_SKIP_EXTENSION=1, no compiler, or a torch it was not built for)
    _C = None
    IMPORT_ERROR: Optional[ImportError] = exc
else:
    IMPORT_ERROR = None

__all__ = ["IMPORT_ERROR", "gram_eig", "is_available", "unsupported_reason"]


def is_available(device_type: str) -> bool:
    if _C is None:
        return False
    if device_type == "cpu":
        return True
    return device_type == "cuda" and _C.with_cuda and torch.cuda.is_available()


def unsupported_reason(zs: list[torch.Tensor]) -> Optional[str]:
    if _C is None:
        return f"the extension pmrl_kernels._C is not built ({IMPORT_ERROR})"
    m = len(zs)
    if not _C.min_modalities <= m <= _C.max_modalities:
        return f"the kernels take {_C.min_modalities} to {_C.max_modalities} modalities, got M = {m}"
    z = zs[0]
    if z.dtype not in SUPPORTED_DTYPES:
        return f"dtype {z.dtype} is not one of {list(SUPPORTED_DTYPES)}"
    if not is_available(z.device.type):
        return f"no kernel for {z.device.type} tensors in this build (cpu always; cuda when built with nvcc)"
    return None


if _C is not None:

    @torch.library.register_fake("pmrl_kernels::gram_eig")
    def _gram_eig_fake(zs, normalize):
        (b, d), m = zs[0].shape, len(zs)
        dtype = compute_dtype(zs[0].dtype)
        z = zs[0]
        return z.new_empty(b, m, dtype=dtype), z.new_empty(b, m, m, dtype=dtype), z.new_empty(b, d, dtype=dtype)

    @torch.library.register_fake("pmrl_kernels::gram_eig_backward")
    def _gram_eig_backward_fake(zs, s, u, lead, grad_s, grad_lead, normalize):
        b, d = zs[0].shape
        return zs[0].new_empty(len(zs), b, d).transpose(0, 1)  # modality-major, as the kernels allocate it


# (S, U, lead) as reference.gram_eig, from the compiled kernels; differentiable through S and lead
gram_eig = gram_eig_autograd(
    lambda zs, normalize: torch.ops.pmrl_kernels.gram_eig(zs, normalize),
    lambda *args: torch.ops.pmrl_kernels.gram_eig_backward(*args),
)
