"""Blocked backend: the contrastive (regulariser) term of PMRL on torch's own matmul, one block of rows at a time
(docs/maths.md, "The contrastive term, blocked").

loss_i = logsumexp_j(s_ij) - s_i,offset+i with s_ij = rows_i . cols_j / tau_reg (pmrl_kernels.terms.contrastive).
The logits are formed for `block_rows` rows at a time against every column (BLOCK_ELEMENTS logits a block), so
memory stays O(BLOCK_ELEMENTS + (B + N) D) where terms.contrastive holds the B x N logits and their gradient.
The products are torch.mm's (cuBLAS on CUDA), as torch's own matmul and its autograd would run them: IEEE fp32 or
TF32 as torch's float32 matmul setting is when each product runs (never changed here), 16-bit operands and results
when the loss was computed under torch.autocast with that dtype (contrastive_common.operand_precision), autocast
itself off inside. On the H200 it ran 2.8 to 4.4x faster than Triton's tiled kernel in every precision
(backends.AUTO_ORDER).

Forward, per block: with the target's logit s_it set aside (t = offset + i), x_i = logsumexp_{j != t} s_ij - s_it
and loss_i = softplus(x_i) = log(1 + exp(x_i)), which keeps the loss's relative precision near the optimum (x very
negative; logsumexp - s_it over all columns would cancel there). Backward, per block, the logits recomputed: with
Q the softmax over the other columns, P_ij = Q_ij sigmoid(x_i) off the target and P_it - 1 = -sigmoid(x_i) (no
cancellation), so dS = diag(g sigmoid(x) / tau_reg) (Q - onehot_t); d rows = dS cols and d cols += dS^T rows, the
row scale applied to the [b, D] operands, not the block. When rows are the columns both go into one buffer. Each
block is formed, scaled, then read by one fused reduction (forward: logsumexp) or one softmax and the two products
(backward): 1 GEMM-equivalent forward, 3 backward.

Op module of the contrastive op (pmrl_kernels.backends.ContrastiveModule): is_available, contrastive_unsupported,
contrastive. Computes in float32, or float64 for float64 input.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..inputs import Temperature
from .contrastive_common import check_precision, differentiable

__all__ = ["contrastive", "contrastive_unsupported", "is_available"]

# Logits a block holds (256 MiB in float32): blocks of tens to thousands of rows at the batch sizes this is for,
# large enough for torch.mm to run near its peak, small beside the B x N of the unblocked composition.
BLOCK_ELEMENTS = 1 << 26
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


def is_available(device_type: str) -> bool:
    return True


def contrastive_unsupported(rows: torch.Tensor, cols: torch.Tensor) -> Optional[str]:
    return None


def block_rows(n_rows: int, n_cols: int) -> int:
    """Rows a block: BLOCK_ELEMENTS logits against n_cols columns, at least 1."""
    return max(1, min(n_rows, BLOCK_ELEMENTS // max(n_cols, 1)))


def _autocast_off(device_type: str):
    """No autocast around the products: the 16-bit casts are _product's, from the forward's precision, so a
    backward run inside an autocast region computes as the forward did."""
    return torch.autocast(device_type, enabled=False)


def _product(a: torch.Tensor, b: torch.Tensor, precision: str) -> torch.Tensor:
    """a @ b in a's dtype: with 16-bit operands (and result, as torch.autocast's matmul gives) under bf16/fp16,
    except for float64, which autocast leaves alone."""
    half = None if a.dtype == torch.float64 else _HALF.get(precision)
    return a @ b if half is None else (a.to(half) @ b.to(half)).to(a.dtype)


def _add_product(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, precision: str) -> None:
    """out += a @ b (in place, no temporary outside 16-bit precision)."""
    if precision in _HALF and a.dtype != torch.float64:
        out += _product(a, b, precision)
    else:
        out.addmm_(a, b)


def _others(rows: torch.Tensor, cols: torch.Tensor, first: int, offset: int, tau_reg: float, precision: str):
    """(s [b, N], s_t [b], t [b, 1]) for the block rows (rows first.. of the batch): the logits with -inf at each
    row's target column t, and the target logits."""
    s = _product(rows, cols.T, precision).div_(tau_reg)
    t = torch.arange(offset + first, offset + first + rows.shape[0], device=s.device)[:, None]
    s_t = s.gather(1, t)[:, 0]
    return s.scatter_(1, t, -float("inf")), s_t, t


def _blocks(n_rows: int, n_cols: int):
    step = block_rows(n_rows, n_cols)
    return (slice(first, first + step) for first in range(0, n_rows, step))


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_fwd", mutates_args=())
def contrastive_fwd(
    rows: torch.Tensor, cols: torch.Tensor, tau_reg: float, offset: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], x [B] for the backward) in the inputs' dtype; rows [B, D], cols [N, D]. x_i is the other
    columns' logsumexp less the target's logit, and loss_i = softplus(x_i)."""
    check_precision(precision)
    x = rows.new_empty(rows.shape[0])
    with _autocast_off(rows.device.type):
        for blk in _blocks(rows.shape[0], cols.shape[0]):
            s, s_t, _ = _others(rows[blk], cols, blk.start, offset, tau_reg, precision)
            x[blk] = torch.logsumexp(s, 1) - s_t  # -inf with one column: the loss is 0
    # softplus(x) = max(x, 0) + log1p(exp(-|x|)): exp(x) to its relative precision where x is very negative
    return x.clamp_min(0.0) + torch.log1p(torch.exp(-x.abs())), x


@contrastive_fwd.register_fake
def _(rows, cols, tau_reg, offset, precision):
    return rows.new_empty(rows.shape[0]), rows.new_empty(rows.shape[0])


def _accumulate_grads(rows, cols, x, grad_loss, tau_reg, offset, precision, d_rows, d_cols) -> None:
    """d_rows += dS cols and d_cols += dS^T rows, block by block (d_rows may be d_cols), with
    dS = diag(w) (Q - onehot_t), Q the softmax over the other columns and w = g sigmoid(x) / tau_reg."""
    check_precision(precision)
    with _autocast_off(rows.device.type):
        for blk in _blocks(rows.shape[0], cols.shape[0]):
            s, _, t = _others(rows[blk], cols, blk.start, offset, tau_reg, precision)
            q = torch.softmax(s, 1) if cols.shape[0] > 1 else torch.zeros_like(s)  # no other column: Q = 0
            del s
            q.scatter_(1, t, -1.0)
            w = (grad_loss[blk].to(q.dtype) / tau_reg * torch.sigmoid(x[blk]))[:, None]
            d_rows[blk] += w * _product(q, cols, precision)
            _add_product(d_cols, q.T, w * rows[blk], precision)


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_bwd", mutates_args=())
def contrastive_bwd(
    rows: torch.Tensor, cols: torch.Tensor, x: torch.Tensor, grad_loss: torch.Tensor, tau_reg: float,
    offset: int, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows [B, D], d cols [N, D]) given the forward's x and dL/dloss [B]."""
    d_rows, d_cols = torch.zeros_like(rows), torch.zeros_like(cols)
    _accumulate_grads(rows, cols, x, grad_loss, tau_reg, offset, precision, d_rows, d_cols)
    return d_rows, d_cols


@contrastive_bwd.register_fake
def _(rows, cols, x, grad_loss, tau_reg, offset, precision):
    return torch.empty_like(rows), torch.empty_like(cols)


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_sym_bwd", mutates_args=())
def contrastive_sym_bwd(
    lead: torch.Tensor, x: torch.Tensor, grad_loss: torch.Tensor, tau_reg: float, precision: str
) -> torch.Tensor:
    """d lead [B, D] when rows and columns are the same tensor (offset 0): d rows + d cols in one buffer."""
    d_lead = torch.zeros_like(lead)
    _accumulate_grads(lead, lead, x, grad_loss, tau_reg, 0, precision, d_lead, d_lead)
    return d_lead


@contrastive_sym_bwd.register_fake
def _(lead, x, grad_loss, tau_reg, precision):
    return torch.empty_like(lead)


_contrastive = differentiable(contrastive_fwd, contrastive_bwd, contrastive_sym_bwd, float32_only=False)


def contrastive(rows: torch.Tensor, cols: torch.Tensor, tau_reg: Temperature, offset: int = 0) -> torch.Tensor:
    """Per-row InfoNCE [B] as terms.contrastive (float32, or float64 for float64 input), its logits formed
    block_rows rows at a time through torch.mm as torch's matmul would run rows @ cols^T (module docstring). When
    rows and cols are the same tensor, one buffer takes d rows + d cols. A 0-d tensor tau_reg gets its gradient
    (contrastive_common.differentiable)."""
    return _contrastive(rows, cols, tau_reg, offset)
