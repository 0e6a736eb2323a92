"""The reference backend: pure PyTorch, float64-capable; the correctness oracle for every kernel and the fallback
for inputs no kernel takes.

Its gram_eig op returns, from the M embeddings of each instance, the singular values S [B, M] of the (normalised)
M x D matrix Zn, the eigenvectors U [B, M, M] of its Gram matrix G = Zn Zn^T and the canonical leading direction
lead [B, D]. It never forms an SVD of the D x M matrix: G's eigendecomposition gives the same S and lead
(docs/maths.md, "Singular values from the Gram matrix"). Its backward is written by hand (docs/maths.md, "The
backward in matrix form") because autograd through torch.linalg.svd/eigh returns NaN at the inputs training
produces. The singular cases are kept finite by one rule, x -> x / (x^2 + floor^2) in place of 1/x, with the floors
of pmrl_kernels.constants (docs/maths.md, "Singular cases"), which the kernels share.

Its contrastive op is the PyTorch composition of pmrl_kernels.terms.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .autograd import gram_eig_autograd
from .constants import GAP_EPS, NORM_EPS, SIGMA_EPS
from .inputs import compute_dtype
from .terms import canonical_sign, contrastive, safe_inverse

__all__ = ["contrastive", "contrastive_unsupported", "gram_eig", "gram_eig_unsupported", "is_available"]


def scale_for(amax: torch.Tensor) -> torch.Tensor:
    """The power of two r with r * amax in [0.5, 1) (within the normal range); 1 where amax is 0 or not finite.
    Rows scaled by it before they are squared neither overflow nor underflow (docs/maths.md, "Scale")."""
    info = torch.finfo(amax.dtype)
    _, exponent = torch.frexp(amax)
    limit = 1 - math.frexp(info.tiny)[1]  # 126 or 1022: the largest power of two whose inverse is normal
    r = torch.ldexp(torch.ones_like(amax), (-exponent).clamp(-limit, limit))
    return torch.where((amax > 0) & (amax <= info.max), r, torch.ones_like(amax))


def scaled_rows(zs: list[torch.Tensor], normalize: bool):
    """(Zn [B, M, D], norms [B, M, 1], r [B, M, 1]) in the compute dtype: the rows are scaled by powers of two r
    first (each row its own with normalize, the instance's largest entry for all rows without), so that nothing
    overflows or underflows when they are squared. Zn is the normalised rows, or r Z without normalisation; norms
    are ||r z_m|| (None without normalisation)."""
    z = torch.stack(zs, dim=1).to(compute_dtype(zs[0].dtype))
    amax = z.abs().amax(dim=-1, keepdim=True)
    r = scale_for(amax if normalize else amax.amax(dim=1, keepdim=True).expand_as(amax))
    zhat = z * r
    if not normalize:
        return zhat, None, r
    norms = zhat.norm(dim=-1, keepdim=True)
    return zhat / torch.maximum(norms, r * NORM_EPS), norms, r


def eigh_descending(g: torch.Tensor):
    """Eigenvalues (descending, clamped at 0) and eigenvectors of symmetric g [B, M, M].

    Instances with a non-finite entry are solved on a zero matrix and then set to NaN, so NaN stays in its own
    instance instead of making LAPACK fail for the whole batch.
    """
    bad = ~torch.isfinite(g).all(dim=(-2, -1))
    lam, u = torch.linalg.eigh(torch.where(bad[:, None, None], torch.zeros_like(g), g))
    lam = lam.flip(-1).clamp_min(0)
    u = u.flip(-1)
    u = u * canonical_sign(u)
    nan = torch.tensor(float("nan"), dtype=g.dtype, device=g.device)
    return torch.where(bad[:, None], nan, lam), torch.where(bad[:, None, None], nan, u)


def instance_scale(zn: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1]: the power of two c that brings the largest entry of Zn near 1. The maths works on c Zn, where
    S_c = c S, the gaps and every coefficient are of order 1 whatever the rows' scale (docs/maths.md, "Scale")."""
    return scale_for(zn.abs().amax(dim=(1, 2), keepdim=True))


def gram_eig_forward(zs: list[torch.Tensor], normalize: bool):
    """S [B, M], U [B, M, M], lead [B, D], all in the compute dtype."""
    zn, _, r = scaled_rows(zs, normalize)
    c = instance_scale(zn)
    zn = zn * c
    lam, u = eigh_descending(zn @ zn.transpose(-1, -2))
    s = lam.sqrt()
    s[:, zn.shape[-1]:] *= 0  # D < M: exact zeros past the rank (NaN stays NaN)
    inv_s1 = safe_inverse(s[:, :1], torch.finfo(s.dtype).tiny)
    lead = (u[:, :, :1].transpose(-1, -2) @ zn).squeeze(1) * inv_s1
    # S = S_c / c, and without normalisation Zn = r Z
    s = s / c[:, 0]
    return (s if normalize else s / r[:, 0]), u, lead


def gram_eig_backward(
    zs: list[torch.Tensor],
    s: torch.Tensor,
    u: torch.Tensor,
    grad_s: Optional[torch.Tensor],
    grad_lead: Optional[torch.Tensor],
    normalize: bool,
) -> torch.Tensor:
    """dL/dz [B, M, D] in the input dtype, given dL/dS and dL/dlead (either may be None for zero). lead is not an
    input: lead . dL/dlead is b_1 / sigma_1 (below), which every backend takes instead of reading lead again.

    Computed on Zn_c = c Zn of the scaled rows zhat = r z (scaled_rows, instance_scale), where S_c = c S (c r S
    without normalisation), then mapped back: dL/dZn = c dL/dZn_c, dL/dz = r dL/dzhat. A row whose entries are all
    zero gets an exactly zero gradient.
    """
    zn, norms, r = scaled_rows(zs, normalize)
    cd = zn.dtype
    tiny = torch.finfo(cd).tiny
    c = instance_scale(zn)  # [B, 1, 1]
    zn = zn * c
    # S_c = c S, or c r S without normalisation; c and r are each at most 2^126 in float32, so their product is
    # never formed (it overflows): each multiplies or divides in turn
    undo = torch.ones_like(r[:, 0]) if normalize else r[:, 0]  # [B, 1]
    s = s.to(cd) * undo * c[:, 0]
    lam = s * s
    s1, lam1 = s[:, :1], lam[:, :1]
    inv_s1 = safe_inverse(s1, tiny)  # [B, 1]
    coef = torch.zeros_like(u)  # C [B, M, M]
    dzn = torch.zeros_like(zn)
    if grad_s is not None:
        w = grad_s.to(cd) * safe_inverse(s, (SIGMA_EPS * s1) ** 2 + tiny) / c[:, 0] / undo
        coef = coef + (u * w[:, None, :]) @ u.transpose(-1, -2)
    if grad_lead is not None:
        gbar = grad_lead.to(cd)
        a = (zn @ gbar[:, :, None]).squeeze(-1)  # [B, M]
        b = (u.transpose(-1, -2) @ a[:, :, None]).squeeze(-1)  # b_k = u_k . a
        lg = b[:, :1] * inv_s1  # lead . gbar = u_1 . (Zn_c gbar) / sigma_1c  [B, 1]
        gap = lam1 - lam
        h = b * safe_inverse(gap, (GAP_EPS * lam1) ** 2 + tiny) * inv_s1
        h[:, 0] = 0
        u1 = u[:, :, :1]
        cross = (u @ h[:, :, None]) @ u1.transpose(-1, -2)  # sum_k h_k u_k u_1^T
        coef = coef + cross + cross.transpose(-1, -2) - (lg * inv_s1 * inv_s1)[:, :, None] * (u1 @ u1.transpose(-1, -2))
        dzn = dzn + u1 * (inv_s1[:, :, None] * gbar[:, None, :])
    dzn = dzn + coef @ zn  # dL/dZn_c
    if normalize:
        # dL/dzhat = c (dzn_c - (dzn_c . zn_c) zn_c / c^2) / max(||zhat||, r NORM_EPS), projection above the floor
        floor = r * NORM_EPS
        radial = (dzn * zn).sum(-1, keepdim=True) * zn / (c * c)
        dzn = (dzn - torch.where(norms > floor, radial, torch.zeros_like(radial))) * (c / torch.maximum(norms, floor))
    else:
        dzn = dzn * c
    dz = dzn * r
    zero_row = (zn == 0).all(dim=-1, keepdim=True)
    return torch.where(zero_row, torch.zeros_like(dz), dz).to(zs[0].dtype)


gram_eig = gram_eig_autograd(gram_eig_forward, gram_eig_backward)
gram_eig.__doc__ = "(S, U, lead) with gradients to zs through S and lead; U is returned without gradient."


def is_available(device_type: str) -> bool:
    return True


def gram_eig_unsupported(zs: Sequence[torch.Tensor]) -> Optional[str]:
    return None


def contrastive_unsupported(rows: torch.Tensor, cols: torch.Tensor) -> Optional[str]:
    return None
