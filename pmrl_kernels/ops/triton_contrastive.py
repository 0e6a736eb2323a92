"""Triton backend: the contrastive (regulariser) term of PMRL, tiled so memory stays O((B + N) * D)
(docs/maths.md, "The contrastive term, tiled").

loss_i = logsumexp_j(s_ij) - s_i,offset+i with s_ij = rows_i . cols_j / tau_reg (pmrl_kernels.terms.contrastive).
Forward: each program takes BLOCK_R rows and walks the columns in tiles of BLOCK_C with an online max/sum
(FlashAttention, Inf-CL); it writes the per-row loss, logsumexp and P_target - 1 = expm1(-loss), never the B x N
logits. The loss is log1p(sum over the other columns of exp(s_ij - s_i,target)), so it keeps its relative
precision near the optimum.
Backward: with P_ij = exp(s_ij - lse_i) and dS_ij = g_i (P_ij - [j = offset + i]) / tau_reg,
    d rows = dS cols,  d cols = dS^T rows,
computed by one kernel launched twice (own rows against column tiles, then own columns against row tiles),
each recomputing the logits from the saved logsumexp: no atomics, deterministic. The target's P - 1 is the
forward's, not taken from the recomputed logits, where it would cancel (docs/maths.md). When
rows and columns are one tensor (the loss on one device), the logits are symmetric and one launch computes
d rows + d cols = (dS + dS^T) lead from one logits tile per pair: 3 GEMM-equivalents forward and backward instead
of 5. A backward program owns
BLOCK_DO (up to MAX_BLOCK_DO) features of its output: its logits are computed once per tile up to that D, and
once per block of features above it, so the accumulator fits in registers for any D.

Products run at the precision torch would use for the same matmul (contrastive_common.operand_precision): IEEE
fp32 under torch's default float32 matmul precision "highest", TF32 tensor cores under "high"/"medium", bf16/fp16
operands with fp32 accumulation under torch.autocast. Inputs, logsumexp and outputs are float32.

Op module of the contrastive op (pmrl_kernels.backends.ContrastiveModule): is_available, contrastive_unsupported,
contrastive. float64 input is refused (backend="auto" falls back to the float64 reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..inputs import Temperature
from .contrastive_common import check_precision, differentiable
from .triton_common import interpreting, is_available

__all__ = ["contrastive", "contrastive_unsupported", "is_available"]

# tl.dot needs every dimension >= 16 when compiled (Triton 3.6): small sizes are padded (masked) up to 16.
# Registers for sm_90 with a real launch's specialisation (benchmarks/static_check.py), 8 warps, no spills: forward
# 98-128; backward 128-180 (64 x 64 tiles with 128 features, 32 x 32 tiles with 512).
NUM_WARPS = 8
# D chunk of the logits' reduction, the same forward and backward, so that the backward's logits are the forward's
# up to the last rounding. Not to the bit: compiled for sm_90, ptxas fuses the backward's s * (1 / tau_reg) - lse
# into one FMA, which the interpreter never does; hence the target's P - 1 saved by the forward.
LOGITS_BLOCK_D = 16
# Below this magnitude _expm1 and _log1p sum their series (truncation under 1e-9 relative: float32 rounding
# dominates); above it they take exp(x) - 1 and log(1 + x), whose rounding is a few ulp of 1, under 3e-6 of the
# result (tests/test_triton.py checks both sides of the cut-over).
SERIES_BELOW = tl.constexpr(0.1)
# Largest forward tile: BLOCK_R rows against BLOCK_C columns
FWD_TILE = 64
# Output features a backward program owns: each program computes the logits of its tiles once, so above this
# the logits are recomputed once per block of features
MAX_BLOCK_DO = 512
_INTERPRETING = tl.constexpr(interpreting())


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b at the precision torch would use for the same matmul (contrastive_common.operand_precision):
    bf16/fp16 operands (fp32 accumulation) under autocast, else fp32 operands as TF32 or IEEE. Triton's interpreter
    mis-reads 16-bit dots, so there the operands are rounded to 16 bits and multiplied in IEEE fp32: the same
    products (exact in fp32) and fp32 sums."""
    if PRECISION == "bf16" or PRECISION == "fp16":
        half = tl.bfloat16 if PRECISION == "bf16" else tl.float16
        if _INTERPRETING:
            return tl.dot(a.to(half).to(tl.float32), b.to(half).to(tl.float32), acc, input_precision="ieee")
        return tl.dot(a.to(half), b.to(half), acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _expm1(x):
    """exp(x) - 1 with relative precision for small |x| (Triton has no expm1)."""
    small = tl.abs(x) < SERIES_BELOW
    t = tl.where(small, x, 0.0)  # both branches are evaluated: keep each finite
    series = t * (1.0 + t / 2.0 * (1.0 + t / 3.0 * (1.0 + t / 4.0 * (1.0 + t / 5.0 * (1.0 + t / 6.0)))))
    return tl.where(small, series, tl.exp(x) - 1.0)


@triton.jit
def _log1p(x):
    """log(1 + x) with relative precision for small x >= 0 (Triton has no log1p): 2 atanh(x / (2 + x)) by its
    series there."""
    w = x / (2.0 + x)
    w2 = w * w
    series = 2.0 * w * (1.0 + w2 * (1.0 / 3.0 + w2 * (1.0 / 5.0 + w2 * (1.0 / 7.0))))
    return tl.where(x < SERIES_BELOW, series, tl.log(1.0 + x))


@triton.jit
def _logits(X, Y, xi, yj, n_x, n_y, D, stride_x, stride_y, inv_tau, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """[len(xi), len(yj)] tile of X[xi] . Y[yj] * inv_tau, reduced over D in chunks of BLOCK_D."""
    acc = tl.zeros((xi.shape[0], yj.shape[0]), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(X + xi[:, None] * stride_x + d[None, :], mask=(xi[:, None] < n_x) & (d[None, :] < D), other=0.0)
        y = tl.load(Y + yj[:, None] * stride_y + d[None, :], mask=(yj[:, None] < n_y) & (d[None, :] < D), other=0.0)
        acc = _dot(x, tl.trans(y), acc, PRECISION)
    return acc * inv_tau


@triton.jit
def _contrastive_fwd_kernel(
    R, C, LOSS, LSE, PM1, B, N, D, stride_r, stride_c, inv_tau, offset,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """loss, logsumexp and P_target - 1 [B] of BLOCK_R rows per program, online over column tiles: the running
    maximum m and the running sum of exp(s_ij - m) over the columns other than the target; then, with
    d = m - s_target >= 0, loss = d + log1p(others + expm1(-d)), which is log1p(others) when the target is the
    maximum."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    target = tl.where(i < B, offset + i, -1)  # padding rows have none (their target column could be a masked one)
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    others = tl.zeros((BLOCK_R,), tl.float32)
    target_logit = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, N, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        s = _logits(R, C, i, j, B, N, D, stride_r, stride_c, inv_tau, BLOCK_D, PRECISION)
        s = tl.where(j[None, :] < N, s, float("-inf"))
        is_target = j[None, :] == target[:, None]
        new_max = tl.maximum(run_max, tl.max(s, 1))
        p = tl.where(is_target, 0.0, tl.exp(s - new_max[:, None]))
        others = others * tl.exp(run_max - new_max) + tl.sum(p, 1)
        run_max = new_max
        target_logit += tl.sum(tl.where(is_target, s, 0.0), 1)
    gap = tl.maximum(run_max - target_logit, 0.0)  # >= 0 as long as max and target saw the same rounded s
    loss = gap + _log1p(others + _expm1(-gap))
    tl.store(LSE + i, target_logit + loss, mask=i < B)
    tl.store(LOSS + i, loss, mask=i < B)
    tl.store(PM1 + i, _expm1(-loss), mask=i < B)


@triton.jit
def _row_terms(LSE, PM1, G, i, n, stride_g):
    """Of rows i (0 past n): logsumexp, P - 1 at the target, upstream gradient."""
    ok = i < n
    return (tl.load(LSE + i, mask=ok, other=0.0), tl.load(PM1 + i, mask=ok, other=0.0),
            tl.load(G + i * stride_g, mask=ok, other=0.0))


# Backward modes: which gradient a program computes.
ROWS, COLS, SYMMETRIC = 0, 1, 2


@triton.jit
def _contrastive_bwd_kernel(
    X, Y, LSE, PM1, G, DX, n_x, n_y, D, stride_x, stride_y, stride_g, inv_tau, offset,
    MODE: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr,
):
    """DX[own, features] = sum over Y tiles of dS(own, other) Y[other, features], dS as in the module docstring.

    MODE ROWS: X are the rows (own index i, other index j), DX = d rows. COLS: X are the columns (own index j,
    other index i), DX = d cols; logsumexp and upstream gradient are indexed by the row. SYMMETRIC: rows and
    columns are one tensor (offset 0), DX = d rows + d cols = (dS + dS^T) X from one logits tile: the logits are
    symmetric, so P_ji = exp(s_ij - lse_j). The target's P - 1 is the forward's (PM1).
    """
    xo = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    do = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    lse_x, pm1_x, g_x = 0.0, 0.0, 0.0
    if MODE != 1:  # not COLS: X are rows (in COLS columns, which may outnumber the rows' lse, P - 1 and g)
        lse_x, pm1_x, g_x = _row_terms(LSE, PM1, G, xo, n_x, stride_g)
    acc = tl.zeros((BLOCK_X, BLOCK_DO), tl.float32)
    for y0 in range(0, n_y, BLOCK_Y):
        yo = y0 + tl.arange(0, BLOCK_Y).to(tl.int64)
        s = _logits(X, Y, xo, yo, n_x, n_y, D, stride_x, stride_y, inv_tau, BLOCK_D, PRECISION)
        if MODE == 0:
            hit = yo[None, :] == offset + xo[:, None]
            ds = g_x[:, None] * tl.where(hit, pm1_x[:, None], tl.exp(s - lse_x[:, None]))
        else:
            lse_y, pm1_y, g_y = _row_terms(LSE, PM1, G, yo, n_y, stride_g)
            hit = xo[:, None] == offset + yo[None, :]
            ds = g_y[None, :] * tl.where(hit, pm1_y[None, :], tl.exp(s - lse_y[None, :]))
            if MODE == 2:
                ds += g_x[:, None] * tl.where(hit, pm1_x[:, None], tl.exp(s - lse_x[:, None]))
        ds = tl.where((xo[:, None] < n_x) & (yo[None, :] < n_y), ds, 0.0)
        y = tl.load(Y + yo[:, None] * stride_y + do[None, :], mask=(yo[:, None] < n_y) & (do[None, :] < D), other=0.0)
        acc = _dot(ds, y, acc, PRECISION)
    tl.store(DX + xo[:, None] * D + do[None, :], acc * inv_tau, mask=(xo[:, None] < n_x) & (do[None, :] < D))


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def fwd_config(batch: int, n_cols: int, features: int) -> dict:
    """The forward's block sizes (constexprs) and num_warps."""
    return dict(BLOCK_R=_block(batch, FWD_TILE), BLOCK_C=_block(n_cols, FWD_TILE), BLOCK_D=LOGITS_BLOCK_D,
                num_warps=NUM_WARPS)


def bwd_config(n_x: int, n_y: int, features: int) -> dict:
    """The backward's block sizes (constexprs) and num_warps: all features up to MAX_BLOCK_DO in one program,
    with 32 x 32 tiles above 128 features so that the [BLOCK_X, BLOCK_DO] accumulator fits in registers."""
    block_do = _block(features, MAX_BLOCK_DO)
    tile = 64 if block_do <= 128 else 32
    return dict(BLOCK_X=_block(n_x, tile), BLOCK_Y=_block(n_y, tile), BLOCK_D=LOGITS_BLOCK_D, BLOCK_DO=block_do,
                num_warps=NUM_WARPS)


@triton_op("pmrl_kernels::triton_contrastive_fwd", mutates_args=())
def contrastive_fwd(
    rows: torch.Tensor, cols: torch.Tensor, tau_reg: float, offset: int, precision: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss, logsumexp and P_target - 1 ([B] each, float32; the last two for the backward); rows [B, D],
    cols [N, D] float32 with unit feature stride."""
    check_precision(precision)
    (batch, features), n_cols = rows.shape, cols.shape[0]
    loss = torch.empty(batch, device=rows.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    target_pm1 = torch.empty_like(loss)
    config = fwd_config(batch, n_cols, features)
    wrap_triton(_contrastive_fwd_kernel)[(triton.cdiv(batch, config["BLOCK_R"]),)](
        rows, cols, loss, lse, target_pm1, batch, n_cols, features, rows.stride(0), cols.stride(0), 1.0 / tau_reg,
        offset, PRECISION=precision, **config,
    )
    return loss, lse, target_pm1


def _launch_bwd(x, y, lse, target_pm1, grad_loss, dx, tau_reg, offset, mode, precision):
    n_x, n_y, features = x.shape[0], y.shape[0], x.shape[1]
    config = bwd_config(n_x, n_y, features)
    grid = (triton.cdiv(n_x, config["BLOCK_X"]), triton.cdiv(features, config["BLOCK_DO"]))
    wrap_triton(_contrastive_bwd_kernel)[grid](
        x, y, lse, target_pm1, grad_loss, dx, n_x, n_y, features, x.stride(0), y.stride(0), grad_loss.stride(0),
        1.0 / tau_reg, offset, MODE=mode, PRECISION=precision, **config,
    )


@triton_op("pmrl_kernels::triton_contrastive_bwd", mutates_args=())
def contrastive_bwd(
    rows: torch.Tensor, cols: torch.Tensor, lse: torch.Tensor, target_pm1: torch.Tensor, grad_loss: torch.Tensor,
    tau_reg: float, offset: int, precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows [B, D], d cols [N, D]) in float32, given the forward's logsumexp and P_target - 1 and dL/dloss [B]:
    two launches, each recomputing its logits (4 GEMM-equivalents), no atomics."""
    check_precision(precision)
    d_rows = torch.empty_like(rows)
    d_cols = torch.empty_like(cols)
    _launch_bwd(rows, cols, lse, target_pm1, grad_loss, d_rows, tau_reg, offset, ROWS, precision)
    _launch_bwd(cols, rows, lse, target_pm1, grad_loss, d_cols, tau_reg, offset, COLS, precision)
    return d_rows, d_cols


@triton_op("pmrl_kernels::triton_contrastive_sym_bwd", mutates_args=())
def contrastive_sym_bwd(
    lead: torch.Tensor, lse: torch.Tensor, target_pm1: torch.Tensor, grad_loss: torch.Tensor, tau_reg: float,
    precision: str,
) -> torch.Tensor:
    """d lead [B, D] in float32 when rows and columns are the same tensor (offset 0), given the forward's
    logsumexp and P_target - 1: d rows + d cols in one launch from one logits tile per pair (2 GEMM-equivalents),
    no separate add."""
    check_precision(precision)
    d_lead = torch.empty_like(lead)
    _launch_bwd(lead, lead, lse, target_pm1, grad_loss, d_lead, tau_reg, 0, SYMMETRIC, precision)
    return d_lead


_contrastive = differentiable(contrastive_fwd, contrastive_bwd, contrastive_sym_bwd, float32_only=True)


def contrastive(rows: torch.Tensor, cols: torch.Tensor, tau_reg: Temperature, offset: int = 0) -> torch.Tensor:
    """Per-row InfoNCE [B] (float32) as terms.contrastive, tiled: no B x N matrix in forward or backward. The
    products run at the precision torch would use for rows @ cols^T here (contrastive_common.operand_precision).
    When rows and cols are the same tensor (the loss without a gather), its gradient comes from one symmetric
    backward launch. A 0-d tensor tau_reg gets its gradient (contrastive_common.differentiable)."""
    return _contrastive(rows, cols, tau_reg, offset)


def contrastive_unsupported(rows: torch.Tensor, cols: torch.Tensor) -> Optional[str]:
    if rows.dtype == torch.float64 or cols.dtype == torch.float64:
        return "the Triton kernels compute in float32; float64 input needs the reference backend"
    return None
