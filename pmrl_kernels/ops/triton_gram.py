"""Triton backend: fused per-instance Gram eigen-decomposition (forward and backward) of PMRL.

Per instance i the M modality rows z_im [D] are read straight from the caller's tensors (M separate [B, D]
tensors or strided views of one [B, M, D] tensor; never stacked). Forward: normalise, accumulate the M x M Gram
matrix in fp32 over D in chunks, Jacobi eigen-solve in registers, then one more pass over D for lead. Backward:
one pass over D for the reductions the gradient needs (Gram matrix, Zn gbar), then dZ = K Z + w gbar^T with a
small M x M matrix K, written once. The maths and every singular-case rule are those of
pmrl_kernels.reference (gram_eig_forward / gram_eig_backward), with the same constants.

Layout inside a program: BLOCK_B instances x MP (M padded to a power of two) modalities x BLOCK_D features.
Triton cannot index registers, so every per-entry access of the M x M matrices is a masked select/reduction.

Op module of the gram_eig op (pmrl_kernels.backends.GramEigModule): is_available, gram_eig_unsupported, gram_eig.
float64 input is refused (the kernels compute in fp32; backend="auto" falls back to a float64 backend).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..autograd import gram_eig_autograd
from ..constants import JACOBI_MAX_SWEEPS, MAX_MODALITIES, MIN_MODALITIES
from .triton_common import interpreting, is_available
from .triton_instance import (
    FLT_MAX, GAP_EPS, INF, NAN, NORM_EPS, SIGMA_EPS, TINY, canonical_sign, column, diagonal, entry,
    gram_needs_rescale, inverse_norms, jacobi_rotate, non_finite, scale_for, unconverged,
)

__all__ = ["gram_eig", "gram_eig_unsupported", "is_available"]

MAX_M = MAX_MODALITIES  # the kernels take one pointer argument per modality
# fp32 elements of a [BLOCK_B, MP, BLOCK_D] tile (4 warps: 8 a thread). At 2048, ptxas spilled in the forward at
# M = 3 and in the backward at M = 7 (benchmarks/static_check.py, with the specialisation of a real launch).
REGISTER_BUDGET = 1024


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _modality_bases(zs, M: tl.constexpr, MP: tl.constexpr):
    """[MP] pointers: the base of modality m's tensor (padding rows point at modality 0 and are masked)."""
    m = tl.arange(0, MP)
    base = tl.where(m == 0, zs[0], zs[0])
    for k in tl.static_range(1, M):
        base = tl.where(m == k, zs[k], base)
    return base


@triton.jit
def _load_rows(base, b, d, stride_b, stride_d, B, D, M: tl.constexpr, MP: tl.constexpr):
    """fp32 tile [BLOCK_B, MP, BLOCK_D] of instances b, features d; 0 outside the matrix and in padding rows."""
    m = tl.arange(0, MP)
    ptr = base[None, :, None] + b[:, None, None] * stride_b + d[None, None, :] * stride_d
    mask = (b[:, None, None] < B) & (m[None, :, None] < M) & (d[None, None, :] < D)
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _load_modality(z, b, d, stride_b, stride_d, B, D):
    """fp32 tile [BLOCK_B, BLOCK_D] of one modality: rows b, features d; 0 outside the matrix."""
    mask = (b[:, None] < B) & (d[None, :] < D)
    return tl.load(z + b[:, None] * stride_b + d[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _gram_chunk(x, r, zs, b, d, stride_b, stride_d, B, D, M: tl.constexpr, MP: tl.constexpr):
    """(r X)(r X)^T [BLOCK_B, MP, MP] over the features of tile x, rows scaled by r [BLOCK_B, MP], one column
    per modality (3-D temporaries only: the [BLOCK_B, MP, MP, BLOCK_D] product would not fit in registers). x_j
    is re-read from L1, not extracted from x, which would cost a cross-thread reduction."""
    col = tl.arange(0, MP)[None, None, :]
    xs = x * r[:, :, None]
    g = tl.zeros((x.shape[0], MP, MP), tl.float32)
    for j in tl.static_range(M):
        xj = _load_modality(zs[j], b, d, stride_b, stride_d, B, D) * entry(r, j, MP)[:, None]
        g += tl.where(col == j, tl.sum(xs * xj[:, None, :], 2)[:, :, None], 0.0)
    return g



@triton.jit
def _row_scales(base, b, stride_b, stride_d, B, D, NORMALIZE: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                BLOCK_D: tl.constexpr):
    """[BLOCK_B, MP] row scales from the rows' largest magnitudes (pmrl/instance.h, row_scales): each row its own
    with normalisation, the instance's largest for all rows without; 1 when an input is not finite."""
    amax = tl.zeros((b.shape[0], MP), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        a = tl.abs(_load_rows(base, b, d, stride_b, stride_d, B, D, M, MP))
        amax = tl.maximum(amax, tl.max(tl.where(a <= FLT_MAX, a, INF), 2))  # NaN counts as Inf
    finite = tl.max(amax, 1) <= FLT_MAX
    top = tl.max(amax, 1)
    r = scale_for(amax) if NORMALIZE else scale_for(top)[:, None] + tl.zeros_like(amax)
    return tl.where(finite[:, None], r, 1.0)



@triton.jit
def _gram_pass(base, zs, b, r, stride_b, stride_d, B, D, M: tl.constexpr, MP: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """The Gram matrix [BLOCK_B, MP, MP] of the rows scaled by r."""
    g = tl.zeros((b.shape[0], MP, MP), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = _load_rows(base, b, d, stride_b, stride_d, B, D, M, MP)
        g += _gram_chunk(x, r, zs, b, d, stride_b, stride_d, B, D, M, MP)
    return g



@triton.jit
def _gram_eig_fwd_kernel(
    Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15,
    S, U, LEAD,
    B, D, stride_b, stride_d,
    M: tl.constexpr, MP: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, MAX_SWEEPS: tl.constexpr,
):
    """S [B, M], U [B, M, M], lead [B, D] (fp32, contiguous) of BLOCK_B instances per program."""
    zs = (Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15)
    base = _modality_bases(zs, M, MP)
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    i = tl.arange(0, MP)
    row = i[None, :, None]
    col = i[None, None, :]

    r = tl.full((BLOCK_B, MP), 1.0, tl.float32)
    graw = _gram_pass(base, zs, b, r, stride_b, stride_d, B, D, M, MP, BLOCK_D)
    # rows whose products over- or underflowed: their magnitudes, then the Gram matrix of the scaled rows
    # (docs/maths.md, "Scale"); the program's other instances keep r = 1 and get the same sums again
    needs = gram_needs_rescale(graw, NORMALIZE, M, MP) & (b < B)
    if tl.max(needs.to(tl.int32), 0) > 0:
        scaled = _row_scales(base, b, stride_b, stride_d, B, D, NORMALIZE, M, MP, BLOCK_D)
        r = tl.where(needs[:, None], scaled, 1.0)
        graw = _gram_pass(base, zs, b, r, stride_b, stride_d, B, D, M, MP, BLOCK_D)
    inv_n, norm = inverse_norms(graw, r, NORMALIZE, MP)
    # the maths works on Zn_c = c Zn, c the power of two that brings the largest row norm near 1 (pmrl/instance.h):
    # the solver's rotation test can neither overflow nor underflow, and every coefficient is of order 1
    c = scale_for(tl.max(norm * inv_n, 1))
    wv = inv_n * c[:, None]  # zn_cm = wv_m zhat_m
    g = graw * wv[:, :, None] * wv[:, None, :]
    # a non-finite instance is solved as a zero matrix and reported as NaN, so it cannot touch the others
    bad = non_finite(g)
    g = tl.where(bad[:, None, None], 0.0, g)

    v = tl.where(row == col, 1.0, 0.0) + tl.zeros((BLOCK_B, MP, MP), tl.float32)
    sweep = 0
    while (sweep < MAX_SWEEPS) & unconverged(g, MP):
        for p in range(M - 1):
            for q in range(p + 1, M):
                g, v = jacobi_rotate(g, v, p, q, MP)
        sweep += 1
    bad = bad | non_finite(g) | non_finite(v)

    # descending order by rank (ties by index; padding last); eigenvector columns get the canonical sign
    lam = diagonal(g, MP)
    key = tl.where(i[None, :] < M, lam, -FLT_MAX)
    before = (key[:, :, None] > key[:, None, :]) | ((key[:, :, None] == key[:, None, :]) & (row < col))
    rank = tl.sum(before.to(tl.int32), 1)
    b_ok = b < B
    s1 = tl.zeros((BLOCK_B,), tl.float32)
    u1 = tl.zeros((BLOCK_B, MP), tl.float32)
    for k in tl.static_range(M):
        chosen = rank == k
        lam_k = tl.sum(tl.where(chosen, lam, 0.0), 1)
        u_k = tl.sum(tl.where(chosen[:, None, :], v, 0.0), 2)
        u_k = u_k * canonical_sign(u_k, i, MP)[:, None]
        # without normalisation the rows were scaled by the common r: S = sqrt(lam) / r; past D, exact zeros
        s_kc = tl.sqrt_rn(tl.maximum(lam_k, 0.0))
        s_k = tl.math.div_rn(s_kc, c)  # S = S_c / c, and without normalisation the rows were r Z
        if not NORMALIZE:
            s_k = tl.math.div_rn(s_k, entry(r, 0, MP))
        s_k = tl.where(bad, NAN, tl.where(k < D, s_k, 0.0))
        u_k = tl.where(bad[:, None], NAN, u_k)
        tl.store(S + b * M + k, s_k, mask=b_ok)
        tl.store(U + b[:, None] * (M * M) + i[None, :] * M + k, u_k, mask=b_ok[:, None] & (i[None, :] < M))
        if k == 0:
            s1 = tl.where(bad, NAN, s_kc)
            u1 = u_k

    # lead = Zn_c^T u_1 * safe_inverse(s_1c, tiny): a second pass over D
    w = u1 * tl.math.div_rn(s1, s1 * s1 + TINY)[:, None] * wv  # on the scaled rows r z
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        lead = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        for j in tl.static_range(M):
            zj = _load_modality(zs[j], b, d, stride_b, stride_d, B, D) * entry(r, j, MP)[:, None]
            lead += entry(w, j, MP)[:, None] * zj
        tl.store(LEAD + b[:, None] * D + d[None, :], lead, mask=b_ok[:, None] & (d[None, :] < D))


@triton.jit
def _backward_reductions(base, zs, b, r, GLEAD, stride_b, stride_d, stride_gl_b, stride_gl_d, B, D,
                         NORMALIZE: tl.constexpr, HAS_GLEAD: tl.constexpr, M: tl.constexpr, MP: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """(Gram matrix [BLOCK_B, MP, MP] with normalisation, Z gbar [BLOCK_B, MP] with a lead gradient) of the rows
    scaled by r, in one pass over D."""
    graw = tl.zeros((b.shape[0], MP, MP), tl.float32)
    zg = tl.zeros((b.shape[0], MP), tl.float32)
    if NORMALIZE or HAS_GLEAD:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = _load_rows(base, b, d, stride_b, stride_d, B, D, M, MP)
            if NORMALIZE:
                graw += _gram_chunk(x, r, zs, b, d, stride_b, stride_d, B, D, M, MP)
            if HAS_GLEAD:
                gbar = tl.load(GLEAD + b[:, None] * stride_gl_b + d[None, :] * stride_gl_d,
                               mask=(b[:, None] < B) & (d[None, :] < D), other=0.0).to(tl.float32)
                zg += tl.sum(x * r[:, :, None] * gbar[:, None, :], 2)
    return graw, zg


@triton.jit
def _gram_eig_bwd_kernel(
    Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15,
    S, U, GS, GLEAD, DZ,
    B, D, stride_b, stride_d, stride_gs_b, stride_gs_m, stride_gl_b, stride_gl_d,
    M: tl.constexpr, MP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GS: tl.constexpr, HAS_GLEAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dZ [B, M, D] (contiguous, the input dtype) from dL/dS and dL/dlead; reference.gram_eig_backward's maths.

    dL/dZn = C Zn + u_1 gbar^T / sigma_1 (docs/maths.md, "The backward in matrix form") and, through the normalisation with
    N = diag(max(||z_m||, NORM_EPS)), dL/dZ = K Z + w gbar^T, K = N^-1 C N^-1 - diag(radial) N^-2: the M x M
    matrix K and the M-vector w are built once per instance, between the two passes over D.
    """
    zs = (Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15)
    base = _modality_bases(zs, M, MP)
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < B
    i = tl.arange(0, MP)
    m_ok = b_ok[:, None] & (i[None, :] < M)
    s = tl.load(S + b[:, None] * M + i[None, :], mask=m_ok, other=0.0)
    u = tl.load(U + b[:, None, None] * (M * M) + i[None, :, None] * M + i[None, None, :],
                mask=m_ok[:, :, None] & (i[None, None, :] < M), other=0.0)

    # pass 1: the Gram matrix (for the norms and the radial part of the normalisation) and Z gbar, of the rows
    # scaled by r (docs/maths.md, "Scale"): r = 1 unless a row's squared norm over- or underflowed
    r = tl.full((BLOCK_B, MP), 1.0, tl.float32)
    graw, zg = _backward_reductions(base, zs, b, r, GLEAD, stride_b, stride_d, stride_gl_b, stride_gl_d, B, D,
                                    NORMALIZE, HAS_GLEAD, M, MP, BLOCK_D)
    if NORMALIZE:
        needs = gram_needs_rescale(graw, NORMALIZE, M, MP) & b_ok
        if tl.max(needs.to(tl.int32), 0) > 0:
            scaled = _row_scales(base, b, stride_b, stride_d, B, D, NORMALIZE, M, MP, BLOCK_D)
            r = tl.where(needs[:, None], scaled, 1.0)
            graw, zg = _backward_reductions(base, zs, b, r, GLEAD, stride_b, stride_d, stride_gl_b, stride_gl_d, B,
                                            D, NORMALIZE, HAS_GLEAD, M, MP, BLOCK_D)
    inv_n, norm = inverse_norms(graw, r, NORMALIZE, MP)
    # the maths works on Zn_c = c Zn, c the power of two of sigma_1 (pmrl/instance.h's backward_coefficients)
    c = scale_for(entry(s, 0, MP))
    s = s * c[:, None]
    wv = inv_n * c[:, None]  # zn_cm = wv_m zhat_m

    s1 = entry(s, 0, MP)
    lam = s * s
    lam1 = s1 * s1
    inv_s1 = tl.math.div_rn(s1, lam1 + TINY)
    u1 = column(u, 0, MP)
    coef = tl.zeros((BLOCK_B, MP, MP), tl.float32)  # C
    w = tl.zeros((BLOCK_B, MP), tl.float32)  # dL/dZn_c's rank-1 term u_1 gbar^T / sigma_1c, per row
    a = zg * wv  # Zn_c gbar
    if HAS_GS:
        gs = tl.load(GS + b[:, None] * stride_gs_b + i[None, :] * stride_gs_m, mask=m_ok, other=0.0)
        floor_sq = (SIGMA_EPS * s1) * (SIGMA_EPS * s1) + TINY
        # dL/dsigma_kc = dL/dsigma_k / c
        ws = tl.math.div_rn(gs.to(tl.float32), c[:, None]) * tl.math.div_rn(s, lam + floor_sq[:, None])
        for k in tl.static_range(M):  # U diag(ws) U^T
            uk = column(u, k, MP)
            coef += entry(ws, k, MP)[:, None, None] * (uk[:, :, None] * uk[:, None, :])
    if HAS_GLEAD:
        bk = tl.sum(u * a[:, :, None], 1)  # b_k = u_k . a
        lg = entry(bk, 0, MP) * inv_s1  # lead . gbar
        gap = lam1[:, None] - lam
        gap_floor_sq = (GAP_EPS * lam1) * (GAP_EPS * lam1) + TINY
        h = bk * tl.math.div_rn(gap, gap * gap + gap_floor_sq[:, None]) * inv_s1[:, None]
        h = tl.where(i[None, :] == 0, 0.0, h)
        uh = tl.sum(u * h[:, None, :], 2)  # sum_k h_k u_k
        coef += uh[:, :, None] * u1[:, None, :] + u1[:, :, None] * uh[:, None, :]
        coef -= (lg * inv_s1 * inv_s1)[:, None, None] * (u1[:, :, None] * u1[:, None, :])
        w = u1 * inv_s1[:, None]
    if NORMALIZE:
        # dL/dzn_m - (dL/dzn_m . zn_m) zn_m, with dL/dzn_m . zn_m = (C G_c)_mm + w_m a_m, on Zn_c: radial / c^2
        g = graw * wv[:, :, None] * wv[:, None, :]
        radial = tl.sum(coef * g, 2) + w * a
        radial = tl.where(norm > r * NORM_EPS, radial, 0.0)
        coef = coef * wv[:, None, :]
        coef -= tl.where(i[None, :, None] == i[None, None, :],
                         tl.math.div_rn(radial * wv, (c * c)[:, None])[:, :, None], 0.0)
    else:
        coef = coef * wv[:, None, :]

    # pass 2: dL/dz_m = r_m (wv_m (sum_n K_mn (r_n z_n) + w_m gbar)) (pmrl/instance.h's backward_coefficients), in
    # that order: r_m wv_m alone can overflow where dL/dz does not
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dz = tl.zeros((BLOCK_B, MP, BLOCK_D), tl.float32)
        for j in tl.static_range(M):
            zj = _load_modality(zs[j], b, d, stride_b, stride_d, B, D) * entry(r, j, MP)[:, None]
            dz += column(coef, j, MP)[:, :, None] * zj[:, None, :]
        if HAS_GLEAD:
            gbar = tl.load(GLEAD + b[:, None] * stride_gl_b + d[None, :] * stride_gl_d,
                           mask=b_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
            dz += w[:, :, None] * gbar[:, None, :]
        dz = (dz * wv[:, :, None]) * r[:, :, None]
        ptr = DZ + b[:, None, None] * (M * D) + i[None, :, None] * D + d[None, None, :]
        tl.store(ptr, dz, mask=m_ok[:, :, None] & (d[None, None, :] < D))


# ----------------------------------------------------------------------------------------------- launchers


def _common_strides(zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kernels take one (row, feature) stride pair for all modalities; copy only when they differ."""
    if all(z.stride() == zs[0].stride() for z in zs):
        return zs
    return [z.contiguous() for z in zs]


def block_sizes(m_pad: int, d: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D). Compiled: 256 entries of G (and of V) per program for the Jacobi solve and
    [BLOCK_B, MP, BLOCK_D] tiles of REGISTER_BUDGET elements: no register spills for sm_90 (checked by
    benchmarks/static_check.py in CI), otherwise untuned. Interpreted: the cost is per operation, not per element, so 64
    instances and up to 512 features at a time."""
    d_pad = triton.next_power_of_2(d)
    if interpreting():
        return 64, min(d_pad, 512)
    block_b = min(64, 256 // (m_pad * m_pad))
    return block_b, min(d_pad, 64, REGISTER_BUDGET // (block_b * m_pad))


def _pointer_args(zs: list[torch.Tensor]) -> list[torch.Tensor]:
    return zs + [zs[0]] * (MAX_M - len(zs))  # unused pointer slots repeat modality 0 and are never read


@triton_op("pmrl_kernels::triton_gram_eig_fwd", mutates_args=())
def gram_eig_fwd(zs: list[torch.Tensor], normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S [B, M], U [B, M, M], lead [B, D] in float32 (the autograd-free forward)."""
    zs = _common_strides(list(zs))
    (batch, features), modalities = zs[0].shape, len(zs)
    m_pad = triton.next_power_of_2(modalities)
    block_b, block_d = block_sizes(m_pad, features)
    device = zs[0].device
    s = torch.empty(batch, modalities, device=device, dtype=torch.float32)
    u = torch.empty(batch, modalities, modalities, device=device, dtype=torch.float32)
    lead = torch.empty(batch, features, device=device, dtype=torch.float32)
    wrap_triton(_gram_eig_fwd_kernel)[(triton.cdiv(batch, block_b),)](
        *_pointer_args(zs), s, u, lead, batch, features, zs[0].stride(0), zs[0].stride(1),
        M=modalities, MP=m_pad, NORMALIZE=normalize, BLOCK_B=block_b, BLOCK_D=block_d,
        MAX_SWEEPS=JACOBI_MAX_SWEEPS,
    )
    return s, u, lead


@triton_op("pmrl_kernels::triton_gram_eig_bwd", mutates_args=())
def gram_eig_bwd(
    zs: list[torch.Tensor],
    s: torch.Tensor,
    u: torch.Tensor,
    grad_s: Optional[torch.Tensor],
    grad_lead: Optional[torch.Tensor],
    normalize: bool,
) -> torch.Tensor:
    """dL/dz [B, M, D] in the input dtype, given dL/dS and dL/dlead (None for zero)."""
    zs = _common_strides(list(zs))
    (batch, features), modalities = zs[0].shape, len(zs)
    m_pad = triton.next_power_of_2(modalities)
    block_b, block_d = block_sizes(m_pad, features)
    dz = torch.empty(batch, modalities, features, device=zs[0].device, dtype=zs[0].dtype)
    gs = s if grad_s is None else grad_s  # a placeholder pointer when absent: HAS_GS=False never reads it
    gl = s if grad_lead is None else grad_lead
    wrap_triton(_gram_eig_bwd_kernel)[(triton.cdiv(batch, block_b),)](
        *_pointer_args(zs), s, u, gs, gl, dz,
        batch, features, zs[0].stride(0), zs[0].stride(1), gs.stride(0), gs.stride(1), gl.stride(0), gl.stride(1),
        M=modalities, MP=m_pad, NORMALIZE=normalize, HAS_GS=grad_s is not None, HAS_GLEAD=grad_lead is not None,
        BLOCK_B=block_b, BLOCK_D=block_d,
    )
    return dz


# ----------------------------------------------------------------------------------------------- autograd


# (S, U, lead) as reference.gram_eig, float32; gradients to zs through S and lead, none through U. The backward
# kernel needs no lead (lead . gbar is b_1 / sigma_1).
gram_eig = gram_eig_autograd(
    lambda zs, normalize: torch.ops.pmrl_kernels.triton_gram_eig_fwd(zs, normalize),
    lambda zs, s, u, lead, grad_s, grad_lead, normalize: torch.ops.pmrl_kernels.triton_gram_eig_bwd(
        zs, s, u, grad_s, grad_lead, normalize
    ),
)


# ----------------------------------------------------------------------------------------------- interface


def gram_eig_unsupported(zs: Sequence[torch.Tensor]) -> Optional[str]:
    if not MIN_MODALITIES <= len(zs) <= MAX_M:
        return f"the Triton kernels take {MIN_MODALITIES} to {MAX_M} modalities, got M = {len(zs)}"
    if zs[0].dtype == torch.float64:
        return "the Triton kernels compute in float32; float64 input needs the reference or C++ backend"
    return None
