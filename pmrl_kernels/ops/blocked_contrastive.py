"""Blocked backend: the contrastive (regulariser) term of PMRL on torch's own matmul, one block of rows at a time
(docs/maths.md, "The contrastive term, blocked").

loss_i = logsumexp_j(s_ij) - s_i,offset+i with s_ij = rows_i . cols_j / tau_reg (pmrl_kernels.terms.contrastive).
The logits are formed for `block_rows` rows at a time against every column (BLOCK_ELEMENTS logits a block), so
memory stays O(BLOCK_ELEMENTS + (B + N) D) where terms.contrastive holds the B x N logits and their gradient.
The products are torch.mm's (cuBLAS on CUDA), as torch's own matmul and its autograd would run them: IEEE fp32 or
TF32 as torch's float32 matmul setting is when each product runs (never changed here), 16-bit operands and results
when the loss was computed under torch.autocast with that dtype (contrastive_common.operand_precision), autocast
itself off inside. Under torch's default "highest" that is IEEE fp32, where cuBLAS's SGEMM runs near the fp32 peak
and Triton's FMA kernel was measured at a tenth of it (backends.auto_order).

Forward, per block: z_ij = s_ij - s_it (t = offset + i, set to -inf), gap_i = max(0, max_j z_ij) and
loss_i = gap_i + part_i, part_i = log1p(sum_j exp(z_ij - gap_i) + expm1(-gap_i)): the log1p form that keeps the
loss's relative precision near the optimum. Backward, per block, the logits and gaps recomputed:
dS_ij = g_i exp(z_ij - gap_i - part_i) / tau_reg off the target and g_i expm1(-loss_i) / tau_reg on it (P_t - 1
without cancellation), then d rows = dS cols and d cols += dS^T rows; when rows are the columns both go into one
buffer. 1 GEMM-equivalent forward, 3 backward.

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


def _gaps(rows: torch.Tensor, cols: torch.Tensor, first: int, offset: int, tau_reg: float, precision: str):
    """(z [b, N], t [b, 1]) for the block rows (rows first.. of the batch): the logits less each row's target
    logit, -inf at the target column t."""
    z = _product(rows, cols.T, precision).div_(tau_reg)
    t = torch.arange(offset + first, offset + first + rows.shape[0], device=z.device)[:, None]
    z -= z.gather(1, t)
    return z.scatter_(1, t, -float("inf")), t


def _blocks(n_rows: int, n_cols: int):
    step = block_rows(n_rows, n_cols)
    return (slice(first, first + step) for first in range(0, n_rows, step))


def _gap(z: torch.Tensor) -> torch.Tensor:
    """[b] max(0, max_j z_ij): how far the largest other logit is above the target's (0 with one column)."""
    return z.amax(1).clamp_min_(0.0)


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_fwd", mutates_args=())
def contrastive_fwd(
    rows: torch.Tensor, cols: torch.Tensor, tau_reg: float, offset: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [B], its log1p part [B] for the backward) in the inputs' dtype; rows [B, D], cols [N, D]. The
    backward takes P_ij = exp(z_ij - gap_i - log1p part_i), the gap recomputed from its own logits: rounding the
    whole loss instead, a loss of 1e5 would put an error of its ulp into every P."""
    check_precision(precision)
    loss, part = rows.new_empty(rows.shape[0]), rows.new_empty(rows.shape[0])
    with _autocast_off(rows.device.type):
        for blk in _blocks(rows.shape[0], cols.shape[0]):
            z, _ = _gaps(rows[blk], cols, blk.start, offset, tau_reg, precision)
            gap = _gap(z)
            part[blk] = torch.log1p(z.sub_(gap[:, None]).exp_().sum(1) + torch.expm1(-gap))
            loss[blk] = gap + part[blk]
    return loss, part


@contrastive_fwd.register_fake
def _(rows, cols, tau_reg, offset, precision):
    return rows.new_empty(rows.shape[0]), rows.new_empty(rows.shape[0])


def _accumulate_grads(rows, cols, part, grad_loss, tau_reg, offset, precision, d_rows, d_cols) -> None:
    """d_rows += dS cols and d_cols += dS^T rows, block by block (d_rows may be d_cols)."""
    check_precision(precision)
    with _autocast_off(rows.device.type):
        for blk in _blocks(rows.shape[0], cols.shape[0]):
            z, t = _gaps(rows[blk], cols, blk.start, offset, tau_reg, precision)
            gap = _gap(z)[:, None]
            row_part = part[blk, None]
            ds = z.sub_(gap).sub_(row_part).exp_()  # P off the target (exp(-inf) = 0 there)
            ds.scatter_(1, t, torch.expm1(-(gap + row_part)))  # P - 1 at the target, expm1(-loss)
            ds *= grad_loss[blk, None].to(ds.dtype) / tau_reg
            _add_product(d_rows[blk], ds, cols, precision)
            _add_product(d_cols, ds.T, rows[blk], precision)


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_bwd", mutates_args=())
def contrastive_bwd(
    rows: torch.Tensor, cols: torch.Tensor, part: torch.Tensor, grad_loss: torch.Tensor, tau_reg: float,
    offset: int, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows [B, D], d cols [N, D]) given the forward's log1p part and dL/dloss [B]."""
    d_rows, d_cols = torch.zeros_like(rows), torch.zeros_like(cols)
    _accumulate_grads(rows, cols, part, grad_loss, tau_reg, offset, precision, d_rows, d_cols)
    return d_rows, d_cols


@contrastive_bwd.register_fake
def _(rows, cols, part, grad_loss, tau_reg, offset, precision):
    return torch.empty_like(rows), torch.empty_like(cols)


@torch.library.custom_op("pmrl_kernels::blocked_contrastive_sym_bwd", mutates_args=())
def contrastive_sym_bwd(
    lead: torch.Tensor, part: torch.Tensor, grad_loss: torch.Tensor, tau_reg: float, precision: str
) -> torch.Tensor:
    """d lead [B, D] when rows and columns are the same tensor (offset 0): d rows + d cols in one buffer."""
    d_lead = torch.zeros_like(lead)
    _accumulate_grads(lead, lead, part, grad_loss, tau_reg, 0, precision, d_lead, d_lead)
    return d_lead


@contrastive_sym_bwd.register_fake
def _(lead, part, grad_loss, tau_reg, precision):
    return torch.empty_like(lead)


_contrastive = differentiable(contrastive_fwd, contrastive_bwd, contrastive_sym_bwd, float32_only=False)


def contrastive(rows: torch.Tensor, cols: torch.Tensor, tau_reg: Temperature, offset: int = 0) -> torch.Tensor:
    """Per-row InfoNCE [B] as terms.contrastive (float32, or float64 for float64 input), its logits formed
    block_rows rows at a time through torch.mm as torch's matmul would run rows @ cols^T (module docstring). When
    rows and cols are the same tensor, one buffer takes d rows + d cols. A 0-d tensor tau_reg gets its gradient
    (contrastive_common.differentiable)."""
    return _contrastive(rows, cols, tau_reg, offset)
