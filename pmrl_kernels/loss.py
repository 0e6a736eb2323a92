"""Public API: the PMRL loss (functional and nn.Module) and the batched Gram/eigen decomposition."""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from . import backends, distributed, reference
from .inputs import (
    Embeddings, flag, modality_list, non_negative_finite, positive_finite, reduce, reduction_name,
)


class GramSVD(NamedTuple):
    """S [B, M]: singular values of each instance's normalised M x D matrix Zn, descending, 0-padded when D < M.
    U [B, M, M]: columns the matching eigenvectors of G = Zn Zn^T, each column's sign fixed so it sums to >= 0.
    lead [B, D]: the unit leading direction Zn^T U[:, :, 0] / S[:, 0], with lead . sum_m zn_m >= 0.
    All three are float32 (float64 for float64 input). S and lead carry gradients; U does not."""

    S: torch.Tensor
    U: torch.Tensor
    lead: torch.Tensor


def gram_svd(embeddings: Embeddings, *, normalize: bool = True, backend: str = "auto") -> GramSVD:
    """Singular values, Gram eigenvectors and canonical leading direction of every instance.

    Same S and lead as torch.linalg.svd of the stacked [B, D, M] matrix, without ever forming its [B, D, D] U.

    Shape: embeddings [B, M, D] or M tensors [B, D] -> S [B, M], U [B, M, M], lead [B, D].

    >>> out = gram_svd(torch.randn(8, 3, 64))
    >>> out.S.shape, out.lead.shape
    (torch.Size([8, 3]), torch.Size([8, 64]))
    """
    zs = modality_list(embeddings)
    normalize = flag(normalize, "normalize")
    impl = backends.resolve(backend, zs)
    return GramSVD(*impl.gram_eig(zs, normalize))


# (rows) -> (all columns, offset of these rows among them); see pmrl_kernels.distributed
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


def _pmrl(embeddings, tau, tau_reg, reg_weight, normalize, reduction, backend, output_dict, gather: Optional[Gather]):
    zs = modality_list(embeddings)
    tau = positive_finite(tau, "tau")
    tau_reg = positive_finite(tau_reg, "tau_reg")
    reg_weight = non_negative_finite(reg_weight, "reg_weight")
    normalize = flag(normalize, "normalize")
    reduction = reduction_name(reduction)
    output_dict = flag(output_dict, "output_dict")
    impl = backends.resolve(backend, zs)

    s, _, lead = impl.gram_eig(zs, normalize)
    align = reference.alignment(s, tau)
    if reg_weight == 0:
        reg = torch.zeros_like(align)  # skipped: no B x B work, no gradient through lead
    else:
        cols, offset = (lead, 0) if gather is None else gather(lead)
        reg = getattr(impl, "contrastive", reference.contrastive)(lead, cols, tau_reg, offset)
    parts = {"loss": align + reg_weight * reg, "align": align, "reg": reg}
    parts = {k: reduce(v, reduction) for k, v in parts.items()}
    return parts if output_dict else parts["loss"]


def pmrl_loss(
    embeddings: Embeddings,
    *,
    tau: float = 0.05,
    tau_reg: float = 0.1,
    reg_weight: float = 1.0,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
    output_dict: bool = False,
):
    """PMRL loss (arXiv 2507.17343): align + reg_weight * reg.

    align_i = logsumexp_k(sigma_ik / tau) - sigma_i1 / tau, sigma_i the singular values of instance i's
    normalised M x D matrix; reg_i = CE over j of lead_i . lead_j / tau_reg with target i, lead_i the canonical
    leading direction. Defaults are the published ones (tau1 = 0.05, tau2 = 0.1, weight 1).

    Shape: embeddings [B, M, D] or a sequence of M tensors [B, D] (read in place). Returns a scalar
    (reduction "mean"/"sum") or [B] ("none"), float32 (float64 for float64 input); output_dict=True returns
    {"loss", "align", "reg"} reduced alike ("reg" is 0 when reg_weight = 0, which skips the B x B work).

    >>> z = torch.randn(32, 3, 128, requires_grad=True)
    >>> pmrl_loss(z).backward()
    """
    return _pmrl(embeddings, tau, tau_reg, reg_weight, normalize, reduction, backend, output_dict, gather=None)


class PMRLLoss(nn.Module):
    """nn.Module form of `pmrl_loss`; the arguments are the same, checked at construction.

    gather_with_grad=True is for data-parallel training (DDP): the contrastive term of this rank's rows runs
    against the leads of every rank of the default torch.distributed process group, gathered with gradient
    (target = this rank's offset + i); the alignment term stays per rank. Per-rank batch sizes may differ.
    With N rows over W ranks, each rank returns W / N * (sum of its rows' losses) for reduction="mean" and
    W * (sum of its rows' losses) for "sum", so the mean over ranks equals the single-process loss on the
    concatenated batch, and the gradient each rank gets on its embeddings is W times the single-process one
    (DDP's averaging divides it back). "none" returns this rank's rows of the single-process output, unscaled.
    output_dict parts are scaled alike. The forward raises RuntimeError when no process group is initialised
    (construction does not, so the module can be built before init_process_group). See
    pmrl_kernels.distributed.

    >>> loss_fn = PMRLLoss(tau=0.05)
    >>> loss = loss_fn([text_emb, video_emb, audio_emb])
    """

    def __init__(
        self,
        tau: float = 0.05,
        tau_reg: float = 0.1,
        reg_weight: float = 1.0,
        normalize: bool = True,
        reduction: str = "mean",
        backend: str = "auto",
        gather_with_grad: bool = False,
    ):
        super().__init__()
        self.tau = positive_finite(tau, "tau")
        self.tau_reg = positive_finite(tau_reg, "tau_reg")
        self.reg_weight = non_negative_finite(reg_weight, "reg_weight")
        self.normalize = flag(normalize, "normalize")
        self.reduction = reduction_name(reduction)
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str, got {type(backend).__name__}")
        self.backend = backend
        self.gather_with_grad = flag(gather_with_grad, "gather_with_grad")

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, tau_reg={self.tau_reg}, reg_weight={self.reg_weight}, normalize={self.normalize}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}, gather_with_grad={self.gather_with_grad}"
        )

    def forward(self, embeddings: Embeddings, output_dict: bool = False):
        if not self.gather_with_grad:
            return _pmrl(
                embeddings, self.tau, self.tau_reg, self.reg_weight, self.normalize, self.reduction, self.backend,
                output_dict, gather=None,
            )
        zs = modality_list(embeddings)
        output_dict = flag(output_dict, "output_dict")
        gather = distributed.RowGather(zs[0].shape[0], zs[0].device)
        # per-row values, so the reduction can be scaled by the global batch size
        parts = _pmrl(
            zs, self.tau, self.tau_reg, self.reg_weight, self.normalize, "none", self.backend, True, gather=gather
        )
        parts = {k: gather.reduce(v, self.reduction) for k, v in parts.items()}
        return parts if output_dict else parts["loss"]
