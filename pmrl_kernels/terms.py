"""The PMRL loss terms in PyTorch, and the singular-case helpers every implementation shares
(docs/maths.md, "The loss" and "Singular cases").

`alignment` is used by every backend as is (it acts on S only, [B, M] numbers); `contrastive` is the default
implementation of the contrastive op, which a backend may replace with a kernel (pmrl_kernels.backends).
"""
from __future__ import annotations

from typing import Optional

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


def alignment(s: torch.Tensor, tau: Temperature, count: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-instance alignment loss [B]: CE of the singular values as logits (sigma / tau), target the largest.

    Written as log1p(sum_{k >= 2} exp((sigma_k - sigma_1) / tau)) (S is sorted descending): near the optimum the
    value is tiny and this form keeps its relative precision, where logsumexp - sigma_1 / tau would cancel to an
    absolute error of eps * sigma_1 / tau. Its gradient is exact too: -sum_{k >= 2} p_k on sigma_1 instead of
    p_1 - 1. A 0-d tensor tau gets its gradient from autograd (docs/maths.md, "Temperature gradients").

    count [B] (integer, or None for all M): the softmax runs over each instance's first count_i singular values
    only, the others getting no gradient; 0 for count_i <= 1.
    """
    terms = torch.exp((s[:, 1:] - s[:, :1]) / tau)
    if count is not None:
        k = torch.arange(2, s.shape[1] + 1, device=s.device)
        terms = torch.where(k[None, :] <= count[:, None], terms, torch.zeros_like(terms))
    return torch.log1p(terms.sum(-1))


def contrastive(
    rows: torch.Tensor, cols: torch.Tensor, tau_reg: Temperature, offset: int = 0, *,
    row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
    col_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-row InfoNCE [B]: CE over logits rows @ cols^T / tau_reg with target column offset + i.

    cols may hold more rows than rows (the leads gathered from every rank); offset is where this rank's rows
    sit among them. A 0-d tensor tau_reg gets its gradient from autograd.

    row_labels int64 [B] with col_labels int64 [N] (both or neither) and col_valid bool [N] remove columns from a
    row's softmax (removed_columns): a column of the row's label other than its target (a duplicate is not a
    negative), and a column that col_valid marks False (an instance with nothing present). The target always
    stays. Removed pairs get no gradient.
    """
    check_offset(rows, cols, offset)
    check_contrastive_masks(rows, cols, row_labels, col_labels, col_valid)
    logits = rows @ cols.transpose(0, 1) / tau_reg
    target = torch.arange(offset, offset + rows.shape[0], device=rows.device)
    if row_labels is not None or col_valid is not None:
        others = torch.arange(cols.shape[0], device=rows.device)[None, :] != target[:, None]
        logits = logits.masked_fill(removed_columns(row_labels, col_labels, col_valid) & others, -float("inf"))
    return F.cross_entropy(logits, target, reduction="none")


def removed_columns(
    row_labels: Optional[torch.Tensor], col_labels: Optional[torch.Tensor], col_valid: Optional[torch.Tensor]
) -> torch.Tensor:
    """[b, N] (or [1, N] without labels) bool: True where column j leaves row i's softmax unless it is the row's
    target, i.e. col_labels[j] == row_labels[i] or not col_valid[j]. Not both None."""
    if row_labels is None:
        return ~col_valid[None, :]
    removed = row_labels[:, None] == col_labels[None, :]
    return removed if col_valid is None else removed | ~col_valid[None, :]


def check_contrastive_masks(
    rows: torch.Tensor, cols: torch.Tensor, row_labels: Optional[torch.Tensor], col_labels: Optional[torch.Tensor],
    col_valid: Optional[torch.Tensor],
) -> None:
    """row_labels int64 [B] and col_labels int64 [N], both or neither; col_valid bool [N] or None; all on the rows'
    device. Reads shapes and dtypes only (no device sync)."""
    if (row_labels is None) != (col_labels is None):
        raise ValueError("row_labels and col_labels go together: give both or neither")
    for name, t, size, dtype in (("row_labels", row_labels, rows.shape[0], torch.int64),
                                 ("col_labels", col_labels, cols.shape[0], torch.int64),
                                 ("col_valid", col_valid, cols.shape[0], torch.bool)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor or None, got {type(t).__name__}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must be a {dtype} tensor, got {t.dtype}")
        if t.shape != (size,):
            raise ValueError(f"{name} must have shape [{size}], got {list(t.shape)}")
        if t.device != rows.device:
            raise ValueError(f"{name} must be on the rows' device {rows.device}, got {t.device}")


def check_offset(rows: torch.Tensor, cols: torch.Tensor, offset: int) -> None:
    """The rows' targets offset + i must be columns."""
    if not 0 <= offset <= cols.shape[0] - rows.shape[0]:
        raise ValueError(
            f"offset must place the {rows.shape[0]} rows' targets among the {cols.shape[0]} columns "
            f"(0 <= offset <= {cols.shape[0] - rows.shape[0]}), got {offset}"
        )
