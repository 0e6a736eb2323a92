"""The PMRL loss terms in PyTorch, and the singular-case helpers every implementation shares
(docs/maths.md, "The loss" and "Singular cases").

`alignment` is used by every backend as is (it acts on S only, [B, M] numbers); `contrastive` is the default
implementation of the contrastive op, which a backend may replace with a kernel (pmrl_kernels.backends).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .constants import SIGN_TOL
from .inputs import Temperature


def safe_inverse(x: torch.Tensor, floor_sq: torch.Tensor) -> torch.Tensor:
    """x / (x^2 + floor^2): 1/x for |x| >> floor, smoothly 0 at x = 0."""
    return x / (x * x + floor_sq)


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


def alignment(s: torch.Tensor, tau: Temperature) -> torch.Tensor:
    """Per-instance alignment loss [B]: CE of the singular values as logits (sigma / tau), target the largest.

    Written as log1p(sum_{k >= 2} exp((sigma_k - sigma_1) / tau)) (S is sorted descending): near the optimum the
    value is tiny and this form keeps its relative precision, where logsumexp - sigma_1 / tau would cancel to an
    absolute error of eps * sigma_1 / tau. Its gradient is exact too: -sum_{k >= 2} p_k on sigma_1 instead of
    p_1 - 1. A 0-d tensor tau gets its gradient from autograd (docs/maths.md, "Temperature gradients").
    """
    return torch.log1p(torch.exp((s[:, 1:] - s[:, :1]) / tau).sum(-1))


def contrastive(rows: torch.Tensor, cols: torch.Tensor, tau_reg: Temperature, offset: int = 0) -> torch.Tensor:
    """Per-row InfoNCE [B]: CE over logits rows @ cols^T / tau_reg with target column offset + i.

    cols may hold more rows than rows (the leads gathered from every rank); offset is where this rank's rows
    sit among them. A 0-d tensor tau_reg gets its gradient from autograd.
    """
    check_offset(rows, cols, offset)
    logits = rows @ cols.transpose(0, 1) / tau_reg
    target = torch.arange(offset, offset + rows.shape[0], device=rows.device)
    return F.cross_entropy(logits, target, reduction="none")


def check_offset(rows: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
    """The rows' targets offset + i must be columns."""
    if not 0 <= offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"offset must place the {rows.shape[0]} rows' targets among the {cols.shape[0]} columns "
            f"(0 <= offset <= {cols.shape[0] - rows.shape[0]}), got {offset}"
        )
