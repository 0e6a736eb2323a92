"""The losses PMRL is compared against, with the input forms and checks of `pmrl_loss`.

- `official_recipe_loss`: the published PMRL recipe, transcribed (full SVD per instance, autograd through it):
  the benchmark baseline and an independent check of the reference backend.
- `pairwise_infonce_loss`: CLIP/ImageBind style. One modality is the anchor; for every other modality m a
  symmetric InfoNCE on the B x B logits zn_anchor zn_m^T / tau, summed over m.
- `gram_volume_loss`: GRAM (Cicchetti et al., ICLR 2025). The volume of the parallelotope spanned by
  (anchor of instance i, the other modalities of instance j) is sqrt(det G_ij), G_ij their M x M Gram matrix;
  -volume / tau are the logits of a symmetric InfoNCE over the batch. As in the published code the volume is
  sqrt(|det G|) with the determinant in float32 (float64 for float64 input). Its gradient grows without bound
  as a positive pair approaches rank deficiency (volume 0 at perfect alignment): the instability PMRL avoids.

Both return per-instance values for reduction="none": instance i's share is half its row CE (i as the anchor
query) plus half its column CE (i as the target of the other direction), summed over the modality terms, so
reduction="sum" is the sum and "mean" the mean of that vector.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import DEFAULTS
from .inputs import (
    Embeddings, compute_dtype, flag, modality_list, non_negative_finite, positive_finite, reduce, reduction_name,
)
from .terms import canonical_sign


def _anchor_index(anchor, modalities: int) -> int:
    if isinstance(anchor, bool) or not isinstance(anchor, int):
        raise TypeError(f"anchor must be an int, got {type(anchor).__name__}")
    if not -modalities <= anchor < modalities:
        raise ValueError(f"anchor must index one of the M = {modalities} modalities, got {anchor}")
    return anchor % modalities


def _prepare(embeddings: Embeddings, anchor, tau, normalize, reduction):
    """Checked arguments; rows in the compute dtype, normalised when asked, anchor first."""
    zs = modality_list(embeddings)
    anchor = _anchor_index(anchor, len(zs))
    tau = positive_finite(tau, "tau")
    normalize = flag(normalize, "normalize")
    reduction = reduction_name(reduction)
    zs = [z.to(compute_dtype(z.dtype)) for z in zs]
    if normalize:
        zs = [F.normalize(z, dim=-1) for z in zs]
    return zs[anchor], zs[:anchor] + zs[anchor + 1:], tau, reduction


def _symmetric_ce(logits: torch.Tensor) -> torch.Tensor:
    """[B]: half the CE of row i plus half the CE of column i, target the diagonal."""
    target = torch.arange(logits.shape[0], device=logits.device)
    rows = F.cross_entropy(logits, target, reduction="none")
    cols = F.cross_entropy(logits.transpose(0, 1), target, reduction="none")
    return 0.5 * (rows + cols)


def pairwise_infonce_loss(
    embeddings: Embeddings,
    *,
    anchor: int = 0,
    tau: float = 0.07,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Anchored pairwise InfoNCE: sum over m != anchor of the symmetric CE on zn_anchor zn_m^T / tau.

    Shape: embeddings [B, M, D] or a sequence of M tensors [B, D]. Returns a scalar, or [B] for
    reduction="none", in float32 (float64 for float64 input).

    >>> pairwise_infonce_loss(torch.randn(16, 3, 32), anchor=0, tau=0.07)
    """
    a, others, tau, reduction = _prepare(embeddings, anchor, tau, normalize, reduction)
    per_instance = sum(_symmetric_ce(a @ z.transpose(0, 1) / tau) for z in others)
    return reduce(per_instance, reduction)


def gram_volume(anchor: torch.Tensor, others: list[torch.Tensor]) -> torch.Tensor:
    """[B, B]: entry (i, j) is sqrt(|det G|) of the rows (anchor[i], others[0][j], others[1][j], ...).

    anchor [B, D], others M - 1 tensors [B, D]; the determinant runs in float32 (float64 for float64 input).
    """
    o = torch.stack(others, dim=1)  # [B, M-1, D]
    b, k = o.shape[:2]
    aa = (anchor * anchor).sum(-1)[:, None, None, None].expand(b, b, 1, 1)
    ao = torch.einsum("id,jkd->ijk", anchor, o)  # [B, B, M-1]
    oo = (o @ o.transpose(1, 2))[None].expand(b, b, k, k)
    gram = torch.cat([torch.cat([aa, ao[..., None, :]], -1), torch.cat([ao[..., :, None], oo], -1)], -2)
    return torch.linalg.det(gram.to(compute_dtype(gram.dtype))).abs().sqrt()


def gram_volume_loss(
    embeddings: Embeddings,
    *,
    anchor: int = 0,
    tau: float = 0.07,
    normalize: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """GRAM's volume contrastive loss: symmetric CE on -gram_volume(anchor, others) / tau over the batch.

    Shape: embeddings [B, M, D] or a sequence of M tensors [B, D]. Returns a scalar, or [B] for
    reduction="none", in float32 (float64 for float64 input). Cost: B^2 determinants of M x M matrices.

    >>> gram_volume_loss(torch.randn(16, 3, 32), anchor=0, tau=0.07)
    """
    a, others, tau, reduction = _prepare(embeddings, anchor, tau, normalize, reduction)
    return reduce(_symmetric_ce(-gram_volume(a, others) / tau), reduction)


def official_recipe_loss(
    embeddings: Embeddings,
    tau: float = DEFAULTS.tau,
    tau_reg: float = DEFAULTS.tau_reg,
    reg_weight: float = DEFAULTS.reg_weight,
    canonical: bool = False,
) -> torch.Tensor:
    """The published recipe, transcribed: normalise, stack to [B, D, M], full SVD, CE on S / tau and on the
    B x B products of the leading left singular vectors / tau_reg (mean over the batch). Its lead sign is whatever
    LAPACK returns; canonical=True flips it to this package's rule (lead . sum_m zn_m >= 0) so the two can be
    compared. It computes in the input dtype, as published.

    Shape: embeddings [B, M, D] or a sequence of M tensors [B, D]; returns a scalar.

    >>> official_recipe_loss(torch.randn(16, 3, 32))
    """
    zs = modality_list(embeddings)
    tau = positive_finite(tau, "tau")
    tau_reg = positive_finite(tau_reg, "tau_reg")
    reg_weight = non_negative_finite(reg_weight, "reg_weight")
    canonical = flag(canonical, "canonical")
    stacked = torch.stack([F.normalize(z, dim=-1) for z in zs], dim=-1)  # [B, D, M]
    u_full, s, _ = torch.linalg.svd(stacked, full_matrices=True)
    target = torch.zeros(s.shape[0], dtype=torch.long, device=s.device)
    align = F.cross_entropy(s / tau, target)
    lead = u_full[:, :, 0]
    if canonical:
        u1 = (stacked.transpose(-1, -2) @ lead[:, :, None]) / s[:, None, :1]  # lead's coordinates over the rows
        lead = lead * canonical_sign(u1)[:, 0]
    logits = lead @ lead.T / tau_reg
    reg = F.cross_entropy(logits, torch.arange(s.shape[0], device=s.device))
    return align + reg_weight * reg
