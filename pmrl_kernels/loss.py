"""Public API: the PMRL loss (functional and nn.Module) and the batched Gram/eigen decomposition."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from . import backends, distributed, terms
from .config import DEFAULTS, PMRLConfig
from .inputs import Embeddings, flag, modality_list, reduce


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
    zs, arg = _rows(embeddings)
    normalize = flag(normalize, "normalize")
    return GramSVD(*backends.resolve("gram_eig", backend, (zs,))(arg, normalize))


def _rows(embeddings: Embeddings) -> tuple[list[torch.Tensor], Union[torch.Tensor, list[torch.Tensor]]]:
    """The checked modality rows (M views [B, D]) and what the kernels get: a [B, M, D] tensor as it is (its
    gradient then comes back whole, with no unbind copy), a list as the list."""
    zs = modality_list(embeddings)
    return zs, (embeddings if isinstance(embeddings, torch.Tensor) else zs)


# (rows) -> (all columns, offset of these rows among them); see pmrl_kernels.distributed
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


class Spectrum(NamedTuple):
    """What the loss terms read: the gram_eig outputs of this rank's instances."""

    S: torch.Tensor
    lead: torch.Tensor


def _align(spec: Spectrum, config: PMRLConfig, gather: Optional[Gather]) -> torch.Tensor:
    return terms.alignment(spec.S, config.tau)


def _reg(spec: Spectrum, config: PMRLConfig, gather: Optional[Gather]) -> torch.Tensor:
    cols, offset = (spec.lead, 0) if gather is None else gather(spec.lead)
    contrastive = backends.resolve("contrastive", config.backend, (spec.lead, cols))
    return contrastive(spec.lead, cols, config.tau_reg, offset)


@dataclass(frozen=True)
class Term:
    """One named part of the loss: loss = sum over TERMS of weight(config) * value. A term of weight 0 is not
    computed (its part reads 0 and it gets no gradient): reg_weight = 0 skips the B x B contrastive work."""

    name: str
    weight: Callable[[PMRLConfig], float]
    value: Callable[[Spectrum, PMRLConfig, Optional[Gather]], torch.Tensor]  # per instance [B]


TERMS = (
    Term("align", lambda config: 1.0, _align),
    Term("reg", lambda config: config.reg_weight, _reg),
)


def _pmrl(zs: list[torch.Tensor], arg, config: PMRLConfig, gather: Optional[Gather] = None) -> dict[str, torch.Tensor]:
    """Per-instance {"loss", *term names} [B] of checked rows (zs, arg: see _rows) under a checked config."""
    s, _, lead = backends.resolve("gram_eig", config.backend, (zs,))(arg, config.normalize)
    spec = Spectrum(s, lead)
    parts = {}
    loss = None
    for term in TERMS:
        weight = term.weight(config)
        value = term.value(spec, config, gather) if weight != 0 else s.new_zeros(s.shape[0])
        parts[term.name] = value
        loss = weight * value if loss is None else loss + weight * value
    return {"loss": loss, **parts}


def _reduced(parts: dict[str, torch.Tensor], reduction: str, output_dict: bool):
    parts = {k: reduce(v, reduction) for k, v in parts.items()}
    return parts if output_dict else parts["loss"]


def pmrl_loss(
    embeddings: Embeddings,
    *,
    tau: float = DEFAULTS.tau,
    tau_reg: float = DEFAULTS.tau_reg,
    reg_weight: float = DEFAULTS.reg_weight,
    normalize: bool = DEFAULTS.normalize,
    reduction: str = DEFAULTS.reduction,
    backend: str = DEFAULTS.backend,
    output_dict: bool = False,
):
    """PMRL loss (arXiv 2507.17343): align + reg_weight * reg (docs/maths.md, "The loss").

    align_i = logsumexp_k(sigma_ik / tau) - sigma_i1 / tau, sigma_i the singular values of instance i's
    normalised M x D matrix; reg_i = CE over j of lead_i . lead_j / tau_reg with target i, lead_i the canonical
    leading direction. Defaults are the published ones (tau1 = 0.05, tau2 = 0.1, weight 1).

    Shape: embeddings [B, M, D] or a sequence of M tensors [B, D] (read in place). Returns a scalar
    (reduction "mean"/"sum") or [B] ("none"), float32 (float64 for float64 input); output_dict=True returns
    {"loss", "align", "reg"} reduced alike ("reg" is 0 when reg_weight = 0, which skips the B x B work).

    >>> z = torch.randn(32, 3, 128, requires_grad=True)
    >>> pmrl_loss(z).backward()
    """
    config = PMRLConfig(tau, tau_reg, reg_weight, normalize, reduction, backend)
    return _reduced(_pmrl(*_rows(embeddings), config), config.reduction, flag(output_dict, "output_dict"))


class PMRLLoss(nn.Module):
    """nn.Module form of `pmrl_loss`; the arguments are the same, checked at construction (self.config).

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
        tau: float = DEFAULTS.tau,
        tau_reg: float = DEFAULTS.tau_reg,
        reg_weight: float = DEFAULTS.reg_weight,
        normalize: bool = DEFAULTS.normalize,
        reduction: str = DEFAULTS.reduction,
        backend: str = DEFAULTS.backend,
        gather_with_grad: bool = False,
    ):
        super().__init__()
        self.config = PMRLConfig(tau, tau_reg, reg_weight, normalize, reduction, backend)
        self.gather_with_grad = flag(gather_with_grad, "gather_with_grad")

    def extra_repr(self) -> str:
        return f"{self.config.describe()}, gather_with_grad={self.gather_with_grad}"

    def forward(self, embeddings: Embeddings, output_dict: bool = False):
        output_dict = flag(output_dict, "output_dict")
        zs, arg = _rows(embeddings)
        if not self.gather_with_grad:
            return _reduced(_pmrl(zs, arg, self.config), self.config.reduction, output_dict)
        gather = distributed.RowGather(zs[0].shape[0], zs[0].device)
        # per-row values, so the reduction can be scaled by the global batch size
        parts = _pmrl(zs, arg, self.config, gather)
        parts = {k: gather.reduce(v, self.config.reduction) for k, v in parts.items()}
        return parts if output_dict else parts["loss"]
