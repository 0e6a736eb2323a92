"""Blocked backend of the contrastive op: torch's own matmul (cuBLAS on CUDA) on blocks of rows, so extra memory
stays one block of BLOCK_ELEMENTS logits instead of the B x N logits and their gradient.

The products run as torch's matmul and its autograd would run them (IEEE or TF32 as torch's setting is, 16-bit
operands under autocast), so this is the exact-precision choice where no fused kernel applies: the CPU, float64.
The loss is a softplus of the other columns' logsumexp, to keep its precision near the optimum; the maths, the
masks and the GEMM count are in docs/maths.md, "The contrastive term, blocked".
"""
from __future__ import annotations

from typing import Optional

import torch

from ..inputs import Temperature
from ..terms import removed_columns
from .contrastive_common import check_precision, differentiable, product_operand

__all__ = ["contrastive", "contrastive_unsupported", "is_available"]

# Logits a block holds (256 MiB in float32): blocks of tens to thousands of rows at the batch sizes this is for,
# large enough for torch.mm to run near its peak, small beside the B x N of the unblocked composition.
BLOCK_ELEMENTS = 1 << 26
def is_available(device_type: str) -> bool:
    return True


def contrastive_unsupported(rows: torch.Tensor, cols: torch.Tensor) -> Optional[str]:
    return None


def block_rows(n_rows: int, n_cols: int) -> int:
    """Rows a block: BLOCK_ELEMENTS logits against n_cols columns, at least 1."""
    return max(1, min(n_rows, BLOCK_ELEMENTS // max(n_cols, 1)))


def _one_block(n_rows: int, n_cols: int) -> bool:
    """Whether the batch is one block, whose exp(s - m) the forward then keeps for the backward."""
    return n_rows * n_cols <= BLOCK_ELEMENTS


def _autocast_off(device_type: str):
    """No autocast around the products: the 16-bit casts are product_operand's, from the forward's precision, so a
    backward run inside an autocast region computes as the forward did."""
    return torch.autocast(device_type, enabled=False)


def _product(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b (b already a product_operand) in a's dtype, with 16-bit operands and result under bf16/fp16, as
    torch.autocast's matmul gives them."""
    out = product_operand(a, precision) @ b
    return out if out.dtype == a.dtype else out.to(a.dtype)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, precision: str, first: bool) -> None:
    """out += a @ b, or out = a @ b when first (out's contents then never read: it may be uninitialised), in place,
    no temporary outside 16-bit precision."""
    if b.dtype != out.dtype:
        product = _product(a, b, precision)
        if first:
            out.copy_(product)
        else:
            out.add_(product)
    else:
        out.addmm_(a, b, beta=0.0 if first else 1.0)


def _scaled_rows(rows: torch.Tensor, tau_reg: float) -> torch.Tensor:
    return rows * (1.0 / tau_reg)


def _others(rows_s, cols_t, first, offset, precision, masks):
    """(s [b, N], s_t [b], t [b, 1]) for the block of scaled rows (rows first.. of the batch): the logits with -inf
    at each row's target column t and at its removed columns, and the target logits."""
    s = _product(rows_s, cols_t, precision)
    t = torch.arange(offset + first, offset + first + rows_s.shape[0], device=s.device)[:, None]
    s_t = s.gather(1, t)[:, 0]
    row_labels, col_labels, col_valid = masks
    if row_labels is not None or col_valid is not None:
        blk = slice(first, first + rows_s.shape[0])
        s.masked_fill_(removed_columns(None if row_labels is None else row_labels[blk], col_labels, col_valid),
                       -float("inf"))
    return s.scatter_(1, t, -float("inf")), s_t, t


def _exp_shifted_(s: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """exp(s - shift) in place; a row with no other column (shift -inf) is all 0, not NaN."""
    return s.sub_(torch.where(shift.isneginf(), 0.0, shift)[:, None]).exp_()


def _blocks(n_rows: int, n_cols: int):
    step = block_rows(n_rows, n_cols)
    return (slice(first, min(first + step, n_rows)) for first in range(0, n_rows, step))


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_fwd", mutates_args=())
def contrastive_fwd(
    rows: torch.Tensor, cols: torch.Tensor, tau_reg: float, offset: int, precision: str,
    row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
    col_valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [B], then for the backward x [B], m [B], 1 / total [B] and exp(s - m) over the other columns [B, N]
    when the batch is one block, else [0]) in the inputs' dtype; rows [B, D], cols [N, D]. loss_i = softplus(x_i)
    (module docstring)."""
    check_precision(precision)
    (batch, _), n_cols = rows.shape, cols.shape[0]
    masks = row_labels, col_labels, col_valid
    x, top, inv_total = (rows.new_empty(batch) for _ in range(3))
    one = _one_block(batch, n_cols)
    kept = rows.new_empty((0, n_cols) if one else 0)  # one block: its exp(s - m) replaces this (the fake's B = 0)
    with _autocast_off(rows.device.type):
        rows_s, cols_t = _scaled_rows(rows, tau_reg), product_operand(cols, precision).T
        for blk in _blocks(batch, n_cols):
            s, s_t, t = _others(rows_s[blk], cols_t, blk.start, offset, precision, masks)
            m = s.amax(1)
            total = _exp_shifted_(s, m).sum(1)
            x[blk] = (m - s_t) + total.log()  # -inf with no other column: the loss is 0
            top[blk], inv_total[blk] = m, torch.where(total > 0, total.reciprocal(), 0.0)
            if one:
                kept = s
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)): exp(x) to its relative precision where x is very negative
    return x.clamp_min(0.0) + torch.log1p(torch.exp(-x.abs())), x, top, inv_total, kept


@contrastive_fwd.register_fake
def _(rows, cols, tau_reg, offset, precision, row_labels=None, col_labels=None, col_valid=None):
    batch, n_cols = rows.shape[0], cols.shape[0]
    kept = rows.new_empty(batch, n_cols) if _one_block(batch, n_cols) else rows.new_empty(0)
    return (*(rows.new_empty(batch) for _ in range(4)), kept)


def _grads(rows, cols, saved, grad_loss, tau_reg, offset, precision, masks, symmetric: bool):
    """(d rows, d cols) = (dS cols, dS^T rows), block by block, with dS = diag(g sigmoid(x) / tau_reg)
    (Q - onehot_t), Q the softmax over the other columns, diag(1 / total) E with E = exp(s - m): the row scales go
    on the [b, D] operands and the target's term is a [b, D] update of its own, so a block of logits is only read
    by the products. symmetric (rows are cols, offset 0): one buffer, d rows + d cols. Each output is written
    before it is added to, so it is never zero-filled."""
    check_precision(precision)
    x, top, inv_total, kept = saved
    d_cols = torch.empty_like(cols) if rows.shape[0] else torch.zeros_like(cols)
    d_rows = d_cols if symmetric else torch.empty_like(rows)
    gs = grad_loss.to(x.dtype) * torch.sigmoid(x) / tau_reg  # dS's row scale at the target
    with _autocast_off(rows.device.type):
        cols_op = product_operand(cols, precision)
        for blk in _blocks(rows.shape[0], cols.shape[0]):
            if kept.dim() == 2:
                e = kept
            else:
                s = _others(_scaled_rows(rows[blk], tau_reg), cols_op.T, blk.start, offset, precision, masks)[0]
                e = _exp_shifted_(s, top[blk])
            target, scale = slice(offset + blk.start, offset + blk.stop), gs[blk, None]
            others_scale = scale * inv_total[blk, None]
            _add_product(d_cols, e.T, product_operand(rows[blk] * others_scale, precision), precision, blk.start == 0)
            d_cols[target].addcmul_(rows[blk], scale, value=-1.0)
            if symmetric:
                d_rows[blk].addcmul_(_product(e, cols_op, precision), others_scale)
            else:
                torch.mul(_product(e, cols_op, precision), others_scale, out=d_rows[blk])
            d_rows[blk].addcmul_(cols[target], scale, value=-1.0)
    return d_rows, d_cols


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_bwd", mutates_args=())
def contrastive_bwd(
    rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, top: torch.Tensor, inv_total: torch.Tensor,
    kept: torch.Tensor, grad_loss: torch.Tensor, tau_reg: float, offset: int, precision: str,
    row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
    col_valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows [B, D], d cols [N, D]) given the forward's saved tensors and dL/dloss [B]."""
    return _grads(rows, cols, (x, top, inv_total, kept), grad_loss, tau_reg, offset, precision,
                  (row_labels, col_labels, col_valid), symmetric=False)


@contrastive_bwd.register_fake
def _(rows, cols, x, top, inv_total, kept, grad_loss, tau_reg, offset, precision, row_labels=None, col_labels=None,
      col_valid=None):
    return torch.empty_like(rows), torch.empty_like(cols)


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_sym_bwd", mutates_args=())
def contrastive_sym_bwd(
    lead: torch.Tensor, x: torch.Tensor, top: torch.Tensor, inv_total: torch.Tensor, kept: torch.Tensor,
    grad_loss: torch.Tensor, tau_reg: float, precision: str, row_labels: Optional[torch.Tensor] = None,
    col_labels: Optional[torch.Tensor] = None, col_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d lead [B, D] when rows and columns are the same tensor (offset 0): d rows + d cols in one buffer."""
    return _grads(lead, lead, (x, top, inv_total, kept), grad_loss, tau_reg, 0, precision,
                  (row_labels, col_labels, col_valid), symmetric=True)[0]


@contrastive_sym_bwd.register_fake
def _(lead, x, top, inv_total, kept, grad_loss, tau_reg, precision, row_labels=None, col_labels=None,
      col_valid=None):
    return torch.empty_like(lead)


_contrastive = differentiable(contrastive_fwd, contrastive_bwd, contrastive_sym_bwd, float32_only=False)


def contrastive(
    rows: torch.Tensor, cols: torch.Tensor, tau_reg: Temperature, offset: int = 0, *,
    row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
    col_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-row InfoNCE [B] as terms.contrastive, masks included (float32, or float64 for float64 input), its
    logits formed block_rows rows at a time through torch.mm as torch's matmul would run rows @ cols^T (module
    docstring). When rows and cols are the same tensor, one buffer takes d rows + d cols. A 0-d tensor tau_reg
    gets its gradient (contrastive_common.differentiable)."""
    return _contrastive(rows, cols, tau_reg, offset, row_labels=row_labels, col_labels=col_labels,
                        col_valid=col_valid)
