"""Triton backend of the contrastive op: a fused GEMM + online-softmax forward and a FlashAttention-2-shaped
backward that never form the B x N logits, so memory stays O((B + N) D).

The forward writes per row the loss (a log1p form: relative precision near the optimum), the row statistics
(max in log2 units, 1 / total) and the target's P - 1; the backward recomputes logits tile by tile, normalises P by
the saved total (a saved logsumexp would put its rounding into every P), needs no atomics and, when rows are the
columns, takes one exp2 per logit for both directions where a tile pair's row maxima are close
(SHARED_SHIFT_SPAN). Products run at the precision torch would use
(contrastive_common.operand_precision); block sizes come from fwd_config / bwd_config (tensor-core tiles when
compiled). The maths: docs/maths.md, "The contrastive term, tiled"; float64 input is refused.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..inputs import Temperature
from .contrastive_common import HALF_DTYPES, check_precision, differentiable, product_operand
from .triton_common import interpreting, is_available

__all__ = ["contrastive", "contrastive_unsupported", "is_available"]

# tl.dot needs every dimension >= 16 when compiled (Triton 3.6): small sizes are padded (masked) up to 16.
# 8 warps keep the tiles below in registers on sm_90 (benchmarks/static_check.py reports registers and spills per
# configuration; docs/results.md, "Static sm_90 checks").
NUM_WARPS = 8
# Shared-memory stages of the compiled logits K-loop (Triton's software pipelining of the operand loads).
NUM_STAGES = 3
# D chunk of the logits' reduction (the GEMM main loop's K step), the same forward and backward. The backward's
# logits are still the forward's only up to rounding (compiled for sm_90, ptxas fuses the backward's s * scale - m
# into one FMA; the resident backward reduces all of D in one product): hence the target's P - 1 saved by the
# forward.
LOGITS_BLOCK_K = 64
# Compiled tiles: the forward's BLOCK_R x BLOCK_C logits tile, and the backward's BLOCK_X x BLOCK_Y, at least the
# 64 rows of a wgmma. Under the interpreter, which costs per program, not per element, both are 64.
FWD_TILE = 128
BWD_TILE = 64
INTERPRETER_TILE = 64
# Output features a backward program owns: each program computes the logits of its tiles once, so above this
# the logits are recomputed once per block of features; [64, 512] fp32 accumulators fit in 8 warps' registers
MAX_BLOCK_DO = 512
# Below this magnitude _expm1 and _log1p sum their series (truncation under 1e-9 relative: float32 rounding
# dominates); above it they take exp(x) - 1 and log(1 + x), whose rounding is a few ulp of 1, under 3e-6 of the
# result (tests/test_triton.py checks both sides of the cut-over).
SERIES_BELOW = tl.constexpr(0.1)
# The symmetric backward shares one exp2(s - hi) between P_ij and P_ji when its tile pair's row maxima (log2 units)
# lie within this span of their largest, hi: a term it flushes to 0 is below 2^(SHARED_SHIFT_SPAN - 126) of its
# row's largest P, far under float32's rounding of the sum; a wider span takes one exp2 per direction.
SHARED_SHIFT_SPAN = tl.constexpr(64.0)
LN2 = tl.constexpr(math.log(2.0))
_INTERPRETING = tl.constexpr(interpreting())
@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b at the precision torch would use for the same matmul (contrastive_common.operand_precision):
    bf16/fp16 operands (fp32 accumulation) under autocast, else fp32 operands as TF32 or IEEE. Triton's interpreter
    mis-reads 16-bit dots, so there the operands are rounded to 16 bits and multiplied in IEEE fp32: the same
    products (exact in fp32) and fp32 sums. Operands already in 16 bits (loaded as such) convert at no cost."""
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
def _logits(X, Y, xi, yj, n_x, n_y, D, stride_x, stride_y, scale, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """[len(xi), len(yj)] tile of X[xi] . Y[yj] * scale: a GEMM main loop over D in steps of BLOCK_K, operands
    loaded in their stored dtype (16 bits under autocast)."""
    acc = tl.zeros((xi.shape[0], yj.shape[0]), tl.float32)
    for k0 in range(0, D, BLOCK_K):
        d = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + xi[:, None] * stride_x + d[None, :], mask=(xi[:, None] < n_x) & (d[None, :] < D), other=0.0)
        y = tl.load(Y + yj[:, None] * stride_y + d[None, :], mask=(yj[:, None] < n_y) & (d[None, :] < D), other=0.0)
        acc = _dot(x, tl.trans(y), acc, PRECISION)
    return acc * scale


@triton.jit
def _removed(RL, CL, CV, r, c, n_r, n_c, HAS_LABELS: tl.constexpr, HAS_VALID: tl.constexpr):
    """Whether column c leaves row r's softmax (col_labels[c] == row_labels[r] or not col_valid[c]; the target is
    the caller's to keep), for broadcastable index tensors r and c: the labels are loaded with each tile."""
    out = (r < 0) | (c < 0)  # False, at the broadcast shape
    if HAS_LABELS:
        out = out | (tl.load(RL + r, mask=r < n_r, other=0) == tl.load(CL + c, mask=c < n_c, other=0))
    if HAS_VALID:
        out = out | (tl.load(CV + c, mask=c < n_c, other=1) == 0)
    return out


@triton.jit
def _contrastive_fwd_kernel(
    R, C, RL, CL, CV, LOSS, STATS, PM1, B, N, D, stride_r, stride_c, scale, offset,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    HAS_LABELS: tl.constexpr, HAS_VALID: tl.constexpr,
):
    """loss, row statistics [2, B] (m, 1 / total) and P_target - 1 [B] of BLOCK_R rows per program, online over
    column tiles, in log2 units (scale = log2(e) / tau_reg folds the temperature and exp2's base into the logits):
    the running maximum m and the running sum of 2^(s_ij - m) over the kept columns other than the target; then,
    with d = (m - s_target) ln 2 >= 0, loss = d + log1p(others + expm1(-d)), which is log1p(others) when the target
    is the maximum, and total = others + exp(-d). m stays -inf while a row has seen only removed columns, so exp2 is
    taken against a finite shift. The rows' program order walks the column tiles in the same order, so concurrent
    programs share the column tiles in L2."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    target = tl.where(i < B, offset + i, -1)  # padding rows have none (their target column could be a masked one)
    run_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    others = tl.zeros((BLOCK_R,), tl.float32)
    target_logit = tl.zeros((BLOCK_R,), tl.float32)
    for c0 in range(0, N, BLOCK_C):
        j = c0 + tl.arange(0, BLOCK_C).to(tl.int64)
        s = _logits(R, C, i, j, B, N, D, stride_r, stride_c, scale, BLOCK_K, PRECISION)
        s = tl.where(j[None, :] < N, s, float("-inf"))
        is_target = j[None, :] == target[:, None]
        if HAS_LABELS or HAS_VALID:
            s = tl.where(_removed(RL, CL, CV, i[:, None], j[None, :], B, N, HAS_LABELS, HAS_VALID) & ~is_target,
                         float("-inf"), s)
        new_max = tl.maximum(run_max, tl.max(s, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        p = tl.where(is_target, 0.0, tl.exp2(s - shift[:, None]))
        others = others * tl.exp2(run_max - shift) + tl.sum(p, 1)
        run_max = new_max
        target_logit += tl.sum(tl.where(is_target, s, 0.0), 1)
    gap2 = tl.maximum(run_max - target_logit, 0.0)  # >= 0 as long as max and target saw the same rounded s
    loss = gap2 * LN2 + _log1p(others + _expm1(-gap2 * LN2))
    tl.store(STATS + i, run_max, mask=i < B)
    tl.store(STATS + B + i, 1.0 / (others + tl.exp2(-gap2)), mask=i < B)  # the target's term is 2^-gap2
    tl.store(LOSS + i, loss, mask=i < B)
    tl.store(PM1 + i, _expm1(-loss), mask=i < B)


@triton.jit
def _row_terms(STATS, PM1, G, i, n, stride_g):
    """Of rows i (0 past n) of the n rows: maximum logit, 1 / total, P - 1 at the target, upstream gradient."""
    ok = i < n
    return (tl.load(STATS + i, mask=ok, other=0.0), tl.load(STATS + n + i, mask=ok, other=0.0),
            tl.load(PM1 + i, mask=ok, other=0.0),
            tl.load(G + i * stride_g, mask=ok, other=0.0))


@triton.jit
def _exp2_below_0(x):
    """2^min(x, 0), NaN kept: a removed pair's logit may lie far above the row's kept maximum, and its 2^x would
    overflow before _keep drops it; a kept pair's recomputed s - m exceeds 0 by at most an ulp."""
    return tl.exp2(tl.minimum(x, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _keep(p, RL, CL, CV, r, c, n_r, n_c, HAS_LABELS: tl.constexpr, HAS_VALID: tl.constexpr):
    """p with the removed pairs (row r, column c) set to 0."""
    if HAS_LABELS or HAS_VALID:
        p = tl.where(_removed(RL, CL, CV, r, c, n_r, n_c, HAS_LABELS, HAS_VALID), 0.0, p)
    return p


# Backward modes: which gradient a program computes.
ROWS, COLS, SYMMETRIC = 0, 1, 2


@triton.jit
def _contrastive_bwd_kernel(
    X, Y, RL, CL, CV, STATS, PM1, G, DX, n_x, n_y, D, stride_x, stride_y, stride_g, scale, inv_tau, offset,
    MODE: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DO: tl.constexpr, PRECISION: tl.constexpr, HAS_LABELS: tl.constexpr, HAS_VALID: tl.constexpr,
    RESIDENT: tl.constexpr,
):
    """DX[own, features] = sum over Y tiles of dS(own, other) Y[other, features], dS as in the module docstring,
    the logits recomputed in the forward's log2 units (scale = log2(e) / tau_reg). RESIDENT (BLOCK_DO covers D):
    the own tile is loaded once and each Y tile once per tile pair, serving the logits (one product over all D) and
    dS Y; otherwise the logits run the K-loop of _logits and Y[:, features] is loaded again for dS Y.

    MODE ROWS: X are the rows (own index i, other index j), DX = d rows. COLS: X are the columns (own index j,
    other index i), DX = d cols; row statistics and upstream gradient are indexed by the row. SYMMETRIC: rows and
    columns are one tensor (offset 0), DX = d rows + d cols = (dS + dS^T) X from one logits tile: the logits are
    symmetric, so P_ji = 2^(s_ij - m_j) / total_j, and where the tile pair's maxima lie within SHARED_SHIFT_SPAN,
    one exp2 per logit serves both directions. The target's P - 1 is the forward's (PM1); a removed pair's P is 0,
    each direction of a SYMMETRIC pair by its own row's labels.
    """
    xo = tl.program_id(0).to(tl.int64) * BLOCK_X + tl.arange(0, BLOCK_X)
    do = tl.program_id(1).to(tl.int64) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    m_x, inv_x, pm1_x, g_x = 0.0, 0.0, 0.0, 0.0
    if MODE != 1:  # not COLS: X are rows (in COLS columns, which may outnumber the rows' statistics and g)
        m_x, inv_x, pm1_x, g_x = _row_terms(STATS, PM1, G, xo, n_x, stride_g)
    acc = tl.zeros((BLOCK_X, BLOCK_DO), tl.float32)
    if RESIDENT:  # the own tile, all D features, loaded once (shared memory when compiled)
        x = tl.load(X + xo[:, None] * stride_x + do[None, :], mask=(xo[:, None] < n_x) & (do[None, :] < D), other=0.0)
    for y0 in range(0, n_y, BLOCK_Y):
        yo = y0 + tl.arange(0, BLOCK_Y).to(tl.int64)
        y_mask = (yo[:, None] < n_y) & (do[None, :] < D)
        if RESIDENT:  # the other tile loaded once for both products
            y = tl.load(Y + yo[:, None] * stride_y + do[None, :], mask=y_mask, other=0.0)
            s = _dot(x, tl.trans(y), tl.zeros((BLOCK_X, BLOCK_Y), tl.float32), PRECISION) * scale
        else:
            s = _logits(X, Y, xo, yo, n_x, n_y, D, stride_x, stride_y, scale, BLOCK_K, PRECISION)
        if MODE == 0:
            hit = yo[None, :] == offset + xo[:, None]
            p = _keep(_exp2_below_0(s - m_x[:, None]) * inv_x[:, None], RL, CL, CV, xo[:, None], yo[None, :], n_x, n_y,
                      HAS_LABELS, HAS_VALID)
            ds = g_x[:, None] * tl.where(hit, pm1_x[:, None], p)
        else:
            m_y, inv_y, pm1_y, g_y = _row_terms(STATS, PM1, G, yo, n_y, stride_g)
            hit = xo[:, None] == offset + yo[None, :]
            if MODE == 1:
                p_yx = _exp2_below_0(s - m_y[None, :]) * inv_y[None, :]
            else:
                hi = tl.maximum(tl.max(tl.where(xo < n_x, m_x, float("-inf"))),
                                tl.max(tl.where(yo < n_y, m_y, float("-inf"))))
                lo = tl.minimum(tl.min(tl.where(xo < n_x, m_x, float("inf"))),
                                tl.min(tl.where(yo < n_y, m_y, float("inf"))))
                if hi - lo <= SHARED_SHIFT_SPAN:  # False for non-finite maxima: the exact two-exp2 form
                    e = _exp2_below_0(s - hi)
                    # padding rows (m = 0, 1 / total = 0) take hi: no overflow to inf * 0
                    p_xy = e * (tl.exp2(hi - tl.where(xo < n_x, m_x, hi)) * inv_x)[:, None]
                    p_yx = e * (tl.exp2(hi - tl.where(yo < n_y, m_y, hi)) * inv_y)[None, :]
                else:
                    p_xy = _exp2_below_0(s - m_x[:, None]) * inv_x[:, None]
                    p_yx = _exp2_below_0(s - m_y[None, :]) * inv_y[None, :]
                p_xy = _keep(p_xy, RL, CL, CV, xo[:, None], yo[None, :], n_x, n_y, HAS_LABELS, HAS_VALID)
            p_yx = _keep(p_yx, RL, CL, CV, yo[None, :], xo[:, None], n_y, n_x, HAS_LABELS, HAS_VALID)
            ds = g_y[None, :] * tl.where(hit, pm1_y[None, :], p_yx)
            if MODE == 2:
                ds += g_x[:, None] * tl.where(hit, pm1_x[:, None], p_xy)
        ds = tl.where((xo[:, None] < n_x) & (yo[None, :] < n_y), ds, 0.0)
        if not RESIDENT:
            y = tl.load(Y + yo[:, None] * stride_y + do[None, :], mask=y_mask, other=0.0)
        acc = _dot(ds, y, acc, PRECISION)
    tl.store(DX + xo[:, None] * D + do[None, :], acc * inv_tau, mask=(xo[:, None] < n_x) & (do[None, :] < D))


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _logits_block_k(features: int, precision: str) -> int:
    """The logits' K step, the same forward and backward: 32 for TF32, whose fp32 operand stages take twice the
    shared memory and registers of 16-bit ones, else LOGITS_BLOCK_K."""
    return _block(features, LOGITS_BLOCK_K // 2 if precision == "tf32" else LOGITS_BLOCK_K)


def _compiled_extras(compiled: bool) -> dict:
    """num_warps, and num_stages where the compiler pipelines the K-loop (the interpreter takes none)."""
    return dict(num_warps=NUM_WARPS, **(dict(num_stages=NUM_STAGES) if compiled else {}))


def fwd_config(batch: int, n_cols: int, features: int, precision: str, compiled: bool = not interpreting()) -> dict:
    """The forward's block sizes (constexprs), num_warps and, compiled, num_stages. Compiled: FWD_TILE x FWD_TILE
    logits tiles on tensor cores; IEEE fp32 (FMA, no wgmma) takes FWD_TILE x FWD_TILE / 2, which ptxas keeps in
    registers. Under the interpreter: INTERPRETER_TILE."""
    rows, cols = (FWD_TILE, FWD_TILE // 2 if precision == "ieee" else FWD_TILE) if compiled else (
        INTERPRETER_TILE, INTERPRETER_TILE)
    return dict(BLOCK_R=_block(batch, rows), BLOCK_C=_block(n_cols, cols),
                BLOCK_K=_logits_block_k(features, precision), **_compiled_extras(compiled))


def bwd_config(n_x: int, n_y: int, features: int, precision: str, compiled: bool = not interpreting()) -> dict:
    """The backward's block sizes (constexprs), num_warps and, compiled, num_stages: all features up to
    MAX_BLOCK_DO in one program (the logits once per tile pair). Compiled on tensor cores, BWD_TILE own rows (the
    M of both products, at the wgmma minimum) against BWD_TILE others, or BWD_TILE / 2 above 256 features, where the
    [BWD_TILE, BLOCK_DO] accumulator and a square logits tile would spill; IEEE fp32 (FMA) BWD_TILE / 2 both ways.
    RESIDENT where all features fit one program and, compiled, the operands are 16-bit: the own tile and the
    pipelined other tiles then take 165 KiB of shared memory at D = 512, where fp32 would need 320 KiB.
    Under the interpreter: INTERPRETER_TILE."""
    block_do = _block(features, MAX_BLOCK_DO)
    if not compiled:
        own = other = INTERPRETER_TILE
    elif precision == "ieee":
        own = other = BWD_TILE // 2
    else:
        own, other = BWD_TILE, BWD_TILE if block_do <= 256 else BWD_TILE // 2
    resident = features <= MAX_BLOCK_DO and (precision in HALF_DTYPES or not compiled)
    return dict(BLOCK_X=_block(n_x, own), BLOCK_Y=_block(n_y, other), BLOCK_K=_logits_block_k(features, precision),
                BLOCK_DO=block_do, RESIDENT=resident, **_compiled_extras(compiled))


def _scales(tau_reg: float) -> tuple[float, float]:
    """(log2(e) / tau_reg, 1 / tau_reg), rounded once to float32 from float64."""
    return 1.0 / (tau_reg * math.log(2.0)), 1.0 / tau_reg


def _mask_args(rows: torch.Tensor, row_labels, col_labels, col_valid) -> tuple[tuple, dict]:
    """The kernels' (RL, CL, CV) pointers, rows standing in for an absent one (never read: its flag is off), and
    the HAS_LABELS / HAS_VALID flags."""
    pointers = tuple(rows if t is None else t for t in (row_labels, col_labels, col_valid))
    return pointers, dict(HAS_LABELS=row_labels is not None, HAS_VALID=col_valid is not None)


@triton_op("pmrl_kernels::triton_contrastive_fwd", mutates_args=())
def contrastive_fwd(
    rows: torch.Tensor, cols: torch.Tensor, tau_reg: float, offset: int, precision: str,
    row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
    col_valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row loss [B], row statistics [2, B] (maximum logit in log2 units, 1 / total) and P_target - 1 [B]
    (float32; the last two for the backward); rows [B, D], cols [N, D] float32 with unit feature stride; the masks
    as terms.contrastive's."""
    check_precision(precision)
    (batch, features), n_cols = rows.shape, cols.shape[0]
    loss = torch.empty(batch, device=rows.device, dtype=torch.float32)
    stats = torch.empty(2, batch, device=rows.device, dtype=torch.float32)
    target_pm1 = torch.empty_like(loss)
    config = fwd_config(batch, n_cols, features, precision)
    pointers, flags = _mask_args(rows, row_labels, col_labels, col_valid)
    r = product_operand(rows, precision)
    c = r if cols is rows else product_operand(cols, precision)
    wrap_triton(_contrastive_fwd_kernel)[(triton.cdiv(batch, config["BLOCK_R"]),)](
        r, c, *pointers, loss, stats, target_pm1, batch, n_cols, features, r.stride(0), c.stride(0),
        _scales(tau_reg)[0], offset, PRECISION=precision, **config, **flags,
    )
    return loss, stats, target_pm1


def _launch_bwd(x, y, stats, target_pm1, grad_loss, dx, tau_reg, offset, mode, precision, masks):
    n_x, n_y, features = x.shape[0], y.shape[0], x.shape[1]
    config = bwd_config(n_x, n_y, features, precision)
    grid = (triton.cdiv(n_x, config["BLOCK_X"]), triton.cdiv(features, config["BLOCK_DO"]))
    pointers, flags = _mask_args(x, *masks)
    wrap_triton(_contrastive_bwd_kernel)[grid](
        x, y, *pointers, stats, target_pm1, grad_loss, dx, n_x, n_y, features, x.stride(0), y.stride(0),
        grad_loss.stride(0), *_scales(tau_reg), offset, MODE=mode, PRECISION=precision, **config, **flags,
    )


@triton_op("pmrl_kernels::triton_contrastive_bwd", mutates_args=())
def contrastive_bwd(
    rows: torch.Tensor, cols: torch.Tensor, stats: torch.Tensor, target_pm1: torch.Tensor, grad_loss: torch.Tensor,
    tau_reg: float, offset: int, precision: str, row_labels: Optional[torch.Tensor] = None,
    col_labels: Optional[torch.Tensor] = None, col_valid: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(d rows [B, D], d cols [N, D]) in float32, given the forward's row statistics and P_target - 1 and dL/dloss [B]:
    two launches, each recomputing its logits (4 GEMM-equivalents), no atomics."""
    check_precision(precision)
    d_rows = torch.empty(rows.shape, device=rows.device, dtype=torch.float32)
    d_cols = torch.empty(cols.shape, device=cols.device, dtype=torch.float32)
    masks = row_labels, col_labels, col_valid
    r, c = product_operand(rows, precision), product_operand(cols, precision)
    _launch_bwd(r, c, stats, target_pm1, grad_loss, d_rows, tau_reg, offset, ROWS, precision, masks)
    _launch_bwd(c, r, stats, target_pm1, grad_loss, d_cols, tau_reg, offset, COLS, precision, masks)
    return d_rows, d_cols


@triton_op("pmrl_kernels::triton_contrastive_sym_bwd", mutates_args=())
def contrastive_sym_bwd(
    lead: torch.Tensor, stats: torch.Tensor, target_pm1: torch.Tensor, grad_loss: torch.Tensor, tau_reg: float,
    precision: str, row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
    col_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """d lead [B, D] in float32 when rows and columns are the same tensor (offset 0), given the forward's
    row statistics and P_target - 1: d rows + d cols in one launch from one logits tile per pair (2 GEMM-equivalents),
    no separate add."""
    check_precision(precision)
    d_lead = torch.empty(lead.shape, device=lead.device, dtype=torch.float32)
    operand = product_operand(lead, precision)
    _launch_bwd(operand, operand, stats, target_pm1, grad_loss, d_lead, tau_reg, 0, SYMMETRIC, precision,
                (row_labels, col_labels, col_valid))
    return d_lead


_contrastive = differentiable(contrastive_fwd, contrastive_bwd, contrastive_sym_bwd, float32_only=True)


def contrastive(
    rows: torch.Tensor, cols: torch.Tensor, tau_reg: Temperature, offset: int = 0, *,
    row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
    col_valid: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-row InfoNCE [B] (float32) as terms.contrastive, masks included, tiled: no B x N matrix in forward or
    backward. The products run at the precision torch would use for rows @ cols^T here
    (contrastive_common.operand_precision). When rows and cols are the same tensor (the loss without a gather),
    its gradient comes from one symmetric backward launch. A 0-d tensor tau_reg gets its gradient
    (contrastive_common.differentiable)."""
    return _contrastive(rows, cols, tau_reg, offset, row_labels=row_labels, col_labels=col_labels,
                        col_valid=col_valid)


def contrastive_unsupported(rows: torch.Tensor, cols: torch.Tensor) -> Optional[str]:
    if rows.dtype == torch.float64 or cols.dtype == torch.float64:
        return "the Triton kernels compute in float32; float64 input needs the reference backend"
    return None
