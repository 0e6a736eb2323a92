"""Pure-PyTorch PMRL: the correctness oracle for every kernel backend, and the fallback.

The per-instance primitive is `gram_eig`: from the M embeddings of each instance it returns the singular values
S [B, M] of the (normalised) M x D matrix Zn, the eigenvectors U [B, M, M] of its Gram matrix G = Zn Zn^T and the
canonical leading direction lead [B, D]. It never forms an SVD of the D x M matrix: G's eigendecomposition gives
the same S and lead. Its backward is written by hand (PMRL.md, "The whole backward in matrix form") because
autograd through torch.linalg.svd/eigh returns NaN at the inputs training produces. The singular cases are kept
finite by one rule, x -> x / (x^2 + floor^2) in place of 1/x:

- 1 / sigma_k (alignment term): floor = SIGMA_EPS * sigma_1. Below it sigma_k is fp32 noise (forming G squares
  the condition number); the exact term g_k u_k v_k^T has norm |g_k| and an undefined direction as sigma_k -> 0,
  the regularised one fades to 0 there instead.
- 1 / (lambda_1 - lambda_k) (derivative of lead): floor = GAP_EPS * lambda_1. At an exact tie lead is not
  defined; near one the gradient is capped at 1 / (2 * GAP_EPS * lambda_1) instead of growing without bound.
- 1 / sigma_1: floor^2 = the dtype's smallest normal number, so an instance whose rows are all zero gets
  lead = 0 and a zero gradient.

Both floors are relative, so the rule does not depend on the scale of the rows when normalize=False. The kernels
apply the same rule with the same constants, so they agree with this oracle everywhere, not only away from the
singular points.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .autograd import gram_eig_autograd
from .inputs import compute_dtype

SIGMA_EPS = 1e-3
GAP_EPS = 1e-4
NORM_EPS = 1e-12  # as torch.nn.functional.normalize
SIGN_TOL = 1e-4


def safe_inverse(x: torch.Tensor, floor_sq: torch.Tensor) -> torch.Tensor:
    """x / (x^2 + floor^2): 1/x for |x| >> floor, smoothly 0 at x = 0."""
    return x / (x * x + floor_sq)


def stack_rows(zs: list[torch.Tensor], normalize: bool):
    """Zn [B, M, D] in the compute dtype, and the row norms [B, M, 1] (None when normalize is False)."""
    z = torch.stack(zs, dim=1).to(compute_dtype(zs[0].dtype))
    if not normalize:
        return z, None
    norms = z.norm(dim=-1, keepdim=True)
    return z / norms.clamp_min(NORM_EPS), norms


def canonical_sign(u: torch.Tensor) -> torch.Tensor:
    """+1 or -1 per column of unit vectors u [..., M, K]: the sign that makes the column sum >= 0.

    A sum within SIGN_TOL of 0 is a tie (exactly 0 for M = 2 with rows pointing apart, where u_1 = (1, -1)/sqrt 2),
    which rounding would break at random: there the first entry with |u_m| > SIGN_TOL decides, and a column with
    none counts as +.
    """
    total = u.sum(dim=-2, keepdim=True)
    big = u.abs() > SIGN_TOL
    first = torch.gather(u, -2, big.to(torch.uint8).argmax(dim=-2, keepdim=True))  # first index where big
    key = torch.where(total.abs() > SIGN_TOL, total, torch.where(big.any(dim=-2, keepdim=True), first, 1.0))
    return torch.where(key >= 0, 1.0, -1.0).to(u.dtype)


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


def gram_eig_forward(zs: list[torch.Tensor], normalize: bool):
    """S [B, M], U [B, M, M], lead [B, D], all in the compute dtype."""
    zn, _ = stack_rows(zs, normalize)
    lam, u = eigh_descending(zn @ zn.transpose(-1, -2))
    s = lam.sqrt()
    s1 = s[:, :1]
    inv_s1 = safe_inverse(s1, torch.finfo(s.dtype).tiny)
    lead = (u[:, :, :1].transpose(-1, -2) @ zn).squeeze(1) * inv_s1
    return s, u, lead


def gram_eig_backward(
    zs: list[torch.Tensor],
    s: torch.Tensor,
    u: torch.Tensor,
    lead: torch.Tensor,
    grad_s: Optional[torch.Tensor],
    grad_lead: Optional[torch.Tensor],
    normalize: bool,
) -> torch.Tensor:
    """dL/dz [B, M, D] in the input dtype, given dL/dS and dL/dlead (either may be None for zero)."""
    zn, norms = stack_rows(zs, normalize)
    cd = zn.dtype
    tiny = torch.finfo(cd).tiny
    lam = s * s
    s1, lam1 = s[:, :1], lam[:, :1]
    inv_s1 = safe_inverse(s1, tiny)  # [B, 1]
    coef = torch.zeros_like(u)  # C [B, M, M]
    dzn = torch.zeros_like(zn)
    if grad_s is not None:
        w = grad_s.to(cd) * safe_inverse(s, (SIGMA_EPS * s1) ** 2 + tiny)
        coef = coef + (u * w[:, None, :]) @ u.transpose(-1, -2)
    if grad_lead is not None:
        gbar = grad_lead.to(cd)
        a = (zn @ gbar[:, :, None]).squeeze(-1)  # [B, M]
        b = (u.transpose(-1, -2) @ a[:, :, None]).squeeze(-1)  # b_k = u_k . a
        c = (lead * gbar).sum(-1, keepdim=True)  # [B, 1]
        gap = lam1 - lam
        h = b * safe_inverse(gap, (GAP_EPS * lam1) ** 2 + tiny) * inv_s1
        h[:, 0] = 0
        u1 = u[:, :, :1]
        cross = (u @ h[:, :, None]) @ u1.transpose(-1, -2)  # sum_k h_k u_k u_1^T
        coef = coef + cross + cross.transpose(-1, -2) - (c * inv_s1 * inv_s1)[:, :, None] * (u1 @ u1.transpose(-1, -2))
        dzn = dzn + u1 * (inv_s1[:, :, None] * gbar[:, None, :])
    dzn = dzn + coef @ zn
    if normalize:
        radial = (dzn * zn).sum(-1, keepdim=True) * zn
        dzn = (dzn - torch.where(norms > NORM_EPS, radial, torch.zeros_like(radial))) / norms.clamp_min(NORM_EPS)
    return dzn.to(zs[0].dtype)


gram_eig = gram_eig_autograd(gram_eig_forward, gram_eig_backward)
gram_eig.__doc__ = "(S, U, lead) with gradients to zs through S and lead; U is returned without gradient."


def contrastive(rows: torch.Tensor, cols: torch.Tensor, tau_reg: float, offset: int = 0) -> torch.Tensor:
    """Per-row InfoNCE [B]: CE over logits rows @ cols^T / tau_reg with target column offset + i.

    cols may hold more rows than rows (the leads gathered from every rank); offset is where this rank's rows
    sit among them.
    """
    logits = rows @ cols.transpose(0, 1) / tau_reg
    target = torch.arange(offset, offset + rows.shape[0], device=rows.device)
    return F.cross_entropy(logits, target, reduction="none")


def alignment(s: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-instance alignment loss [B]: CE of the singular values as logits (sigma / tau), target the largest."""
    logits = s / tau
    return torch.logsumexp(logits, dim=-1) - logits[:, 0]


def is_available(device_type: str) -> bool:
    return True


def unsupported_reason(zs: list[torch.Tensor]) -> Optional[str]:
    return None


def official_recipe_loss(
    embeddings,
    tau: float = 0.05,
    tau_reg: float = 0.1,
    reg_weight: float = 1.0,
    canonical: bool = False,
) -> torch.Tensor:
    """The published recipe, transcribed: normalise, stack to [B, D, M], full SVD, CE on S / tau and on the
    B x B products of the leading left singular vectors / tau_reg. Its lead sign is whatever LAPACK returns;
    canonical=True flips it to this package's rule (lead . sum_m zn_m >= 0) so the two can be compared.

    embeddings: [B, M, D] or a sequence of M tensors [B, D]. Used as the benchmark baseline and as an
    independent check of the reference (autograd through torch.linalg.svd, no custom backward).
    """
    zs = list(embeddings.unbind(1)) if isinstance(embeddings, torch.Tensor) else list(embeddings)
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
