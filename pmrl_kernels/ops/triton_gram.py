"""Triton backend: fused per-instance Gram eigen-decomposition (forward and backward) of PMRL.

Per instance i the M modality rows z_im [D] are read straight from the caller's tensors (M separate [B, D]
tensors or strided views of one [B, M, D] tensor; never stacked). Forward: normalise, accumulate the M x M Gram
matrix in fp32 over D in chunks, Jacobi eigen-solve in registers, then one more pass over D for lead. Backward:
one pass over D for the reductions the gradient needs (Gram matrix, Zn gbar), then dZ = K Z + w gbar^T with a
small M x M matrix K, written once. The maths and every singular-case rule are those of
pmrl_kernels.reference (gram_eig_forward / gram_eig_backward), with the same constants.

Layout inside a program: BLOCK_B instances x MP (M padded to a power of two) modalities x BLOCK_D features.
Triton cannot index registers, so every per-entry access of the M x M matrices is a masked select/reduction.

Backend interface (see pmrl_kernels.backends): is_available, unsupported_reason, gram_eig, contrastive.
float64 input is refused (the kernels compute in fp32; backend="auto" falls back to a float64 backend).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ..autograd import gram_eig_autograd
from ..reference import GAP_EPS, NORM_EPS, SIGMA_EPS, SIGN_TOL
from .triton_contrastive import contrastive

__all__ = ["contrastive", "gram_eig", "is_available", "unsupported_reason"]

MAX_M = 16  # modalities per instance: the kernels take one pointer argument per modality
JACOBI_MAX_SWEEPS = 12  # fp32 cyclic Jacobi needs <= 7 sweeps up to M = 16; the cap only bounds odd inputs
JACOBI_TOL = 1e-7  # converged when every |G_ij|, i != j, is <= JACOBI_TOL * trace(G) (fp32 rounding level)
REGISTER_BUDGET = 2048  # fp32 elements of a [BLOCK_B, MP, BLOCK_D] tile (4 warps: 16 a thread)

_SIGMA_EPS = tl.constexpr(SIGMA_EPS)
_GAP_EPS = tl.constexpr(GAP_EPS)
_SIGN_TOL = tl.constexpr(SIGN_TOL)
_NORM_EPS = tl.constexpr(NORM_EPS)
_TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
_FLT_MAX = tl.constexpr(torch.finfo(torch.float32).max)
_NAN = tl.constexpr(float("nan"))
_JACOBI_TOL = tl.constexpr(JACOBI_TOL)


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
def _gram_chunk(x, zs, b, d, stride_b, stride_d, B, D, M: tl.constexpr, MP: tl.constexpr):
    """X X^T [BLOCK_B, MP, MP] over the features of tile x, one column per modality (3-D temporaries only:
    the [BLOCK_B, MP, MP, BLOCK_D] product would not fit in registers). x_j is re-read from L1, not extracted
    from x, which would cost a cross-thread reduction."""
    col = tl.arange(0, MP)[None, None, :]
    g = tl.zeros((x.shape[0], MP, MP), tl.float32)
    for j in tl.static_range(M):
        xj = _load_modality(zs[j], b, d, stride_b, stride_d, B, D)
        g += tl.where(col == j, tl.sum(x * xj[:, None, :], 2)[:, :, None], 0.0)
    return g


@triton.jit
def _entry(v, k, MP: tl.constexpr):
    """[BLOCK_B] entry k of v [BLOCK_B, MP]."""
    return tl.sum(tl.where(tl.arange(0, MP)[None, :] == k, v, 0.0), 1)


@triton.jit
def _diagonal(a, MP: tl.constexpr):
    """[BLOCK_B, MP] diagonal of a [BLOCK_B, MP, MP]."""
    i = tl.arange(0, MP)
    return tl.sum(tl.where(i[None, :, None] == i[None, None, :], a, 0.0), 2)


@triton.jit
def _column(a, k, MP: tl.constexpr):
    """[BLOCK_B, MP] column k of a [BLOCK_B, MP, MP] (k may be a runtime value)."""
    j = tl.arange(0, MP)
    return tl.sum(tl.where(j[None, None, :] == k, a, 0.0), 2)


@triton.jit
def _inverse_norms(graw, NORMALIZE: tl.constexpr, MP: tl.constexpr):
    """1 / max(||z_m||, NORM_EPS) per row (as F.normalize) and ||z_m||, from the raw Gram diagonal; 1 and
    ||z_m|| without normalisation."""
    norm = tl.sqrt_rn(_diagonal(graw, MP))
    if NORMALIZE:
        return 1.0 / tl.maximum(norm, _NORM_EPS), norm
    return tl.full(norm.shape, 1.0, tl.float32), norm


@triton.jit
def _jacobi_rotate(g, v, p, q, MP: tl.constexpr):
    """One Jacobi rotation zeroing G_pq of every instance (Numerical Recipes' formulas), applied to G and V."""
    i = tl.arange(0, MP)
    row = i[None, :, None]
    col = i[None, None, :]
    jv = i[None, :]
    gp = tl.sum(tl.where(row == p, g, 0.0), 1)  # row p of G, indexed by column
    gq = tl.sum(tl.where(row == q, g, 0.0), 1)
    app = tl.sum(tl.where(jv == p, gp, 0.0), 1)
    apq = tl.sum(tl.where(jv == q, gp, 0.0), 1)
    aqq = tl.sum(tl.where(jv == q, gq, 0.0), 1)
    # G_pq negligible against the diagonal gap (or 0): no rotation, G_pq is just dropped; this also bounds
    # |theta| by 5e17, so theta^2 cannot overflow
    done = tl.abs(apq) <= 1e-18 * tl.abs(aqq - app)
    theta = (aqq - app) / tl.where(done, 1.0, 2.0 * apq)
    t = tl.where(theta >= 0.0, 1.0, -1.0) / (tl.abs(theta) + tl.sqrt_rn(theta * theta + 1.0))
    t = tl.where(done, 0.0, t)
    c = 1.0 / tl.sqrt_rn(t * t + 1.0)
    s = t * c
    new_p = c[:, None] * gp - s[:, None] * gq
    new_q = s[:, None] * gp + c[:, None] * gq
    # the 2 x 2 block exactly: rotated diagonal, G_pq = 0 (not its rounding residue)
    new_p = tl.where(jv == p, (app - t * apq)[:, None], tl.where(jv == q, 0.0, new_p))
    new_q = tl.where(jv == q, (aqq + t * apq)[:, None], tl.where(jv == p, 0.0, new_q))
    g = tl.where(row == p, new_p[:, None, :], tl.where(row == q, new_q[:, None, :], g))
    g = tl.where(col == p, new_p[:, :, None], tl.where(col == q, new_q[:, :, None], g))
    vp = _column(v, p, MP)
    vq = _column(v, q, MP)
    v = tl.where(col == p, (c[:, None] * vp - s[:, None] * vq)[:, :, None], v)
    v = tl.where(col == q, (s[:, None] * vp + c[:, None] * vq)[:, :, None], v)
    return g, v


@triton.jit
def _unconverged(g, MP: tl.constexpr):
    """True while some instance has an off-diagonal entry above JACOBI_TOL * trace (NaN compares False)."""
    i = tl.arange(0, MP)
    off_diag = i[None, :, None] != i[None, None, :]
    off = tl.max(tl.max(tl.where(off_diag, tl.abs(g), 0.0), 2), 1)
    trace = tl.sum(_diagonal(g, MP), 1)
    return tl.max((off > _JACOBI_TOL * trace).to(tl.int32), 0) > 0


@triton.jit
def _non_finite(a):
    """[BLOCK_B] True where an instance's [BLOCK_B, MP, MP] block holds NaN or Inf."""
    return tl.max(tl.max((~(tl.abs(a) <= _FLT_MAX)).to(tl.int32), 2), 1) > 0


@triton.jit
def _canonical_sign(u, i, MP: tl.constexpr):
    """reference.canonical_sign for columns u [BLOCK_B, MP] (padding entries are 0): the sign of the column sum,
    or, when that is within SIGN_TOL of 0, of the first entry with |u_m| > SIGN_TOL (+ if none)."""
    total = tl.sum(u, 1)
    first_idx = tl.min(tl.where(tl.abs(u) > _SIGN_TOL, i[None, :], MP), 1)
    first = tl.sum(tl.where(i[None, :] == first_idx[:, None], u, 0.0), 1)
    key = tl.where(tl.abs(total) > _SIGN_TOL, total, tl.where(first_idx < MP, first, 1.0))
    return tl.where(key >= 0.0, 1.0, -1.0)


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

    graw = tl.zeros((BLOCK_B, MP, MP), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        x = _load_rows(base, b, d, stride_b, stride_d, B, D, M, MP)
        graw += _gram_chunk(x, zs, b, d, stride_b, stride_d, B, D, M, MP)
    inv_n, _ = _inverse_norms(graw, NORMALIZE, MP)
    g = graw * inv_n[:, :, None] * inv_n[:, None, :]
    # a non-finite instance is solved as a zero matrix and reported as NaN, so it cannot touch the others
    bad = _non_finite(g)
    g = tl.where(bad[:, None, None], 0.0, g)

    v = tl.where(row == col, 1.0, 0.0) + tl.zeros((BLOCK_B, MP, MP), tl.float32)
    sweep = 0
    while (sweep < MAX_SWEEPS) & _unconverged(g, MP):
        for p in range(M - 1):
            for q in range(p + 1, M):
                g, v = _jacobi_rotate(g, v, p, q, MP)
        sweep += 1
    bad = bad | _non_finite(g) | _non_finite(v)

    # descending order by rank (ties by index; padding last); eigenvector columns get the canonical sign
    lam = _diagonal(g, MP)
    key = tl.where(i[None, :] < M, lam, -_FLT_MAX)
    before = (key[:, :, None] > key[:, None, :]) | ((key[:, :, None] == key[:, None, :]) & (row < col))
    rank = tl.sum(before.to(tl.int32), 1)
    b_ok = b < B
    s1 = tl.zeros((BLOCK_B,), tl.float32)
    u1 = tl.zeros((BLOCK_B, MP), tl.float32)
    for k in tl.static_range(M):
        chosen = rank == k
        lam_k = tl.sum(tl.where(chosen, lam, 0.0), 1)
        u_k = tl.sum(tl.where(chosen[:, None, :], v, 0.0), 2)
        u_k = u_k * _canonical_sign(u_k, i, MP)[:, None]
        s_k = tl.where(bad, _NAN, tl.sqrt_rn(tl.maximum(lam_k, 0.0)))
        u_k = tl.where(bad[:, None], _NAN, u_k)
        tl.store(S + b * M + k, s_k, mask=b_ok)
        tl.store(U + b[:, None] * (M * M) + i[None, :] * M + k, u_k, mask=b_ok[:, None] & (i[None, :] < M))
        if k == 0:
            s1 = s_k
            u1 = u_k

    # lead = Zn^T u_1 * safe_inverse(s_1, tiny): a second pass over D
    w = u1 * (s1 / (s1 * s1 + _TINY))[:, None] * inv_n
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        lead = tl.zeros((BLOCK_B, BLOCK_D), tl.float32)
        for j in tl.static_range(M):
            lead += _entry(w, j, MP)[:, None] * _load_modality(zs[j], b, d, stride_b, stride_d, B, D)
        tl.store(LEAD + b[:, None] * D + d[None, :], lead, mask=b_ok[:, None] & (d[None, :] < D))


@triton.jit
def _gram_eig_bwd_kernel(
    Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15,
    S, U, GS, GLEAD, DZ,
    B, D, stride_b, stride_d, stride_gs_b, stride_gs_m, stride_gl_b, stride_gl_d,
    M: tl.constexpr, MP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GS: tl.constexpr, HAS_GLEAD: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dZ [B, M, D] (contiguous, the input dtype) from dL/dS and dL/dlead; reference.gram_eig_backward's maths.

    dL/dZn = C Zn + u_1 gbar^T / sigma_1 (PMRL.md, matrix form) and, through the normalisation with
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

    # pass 1: the raw Gram matrix (for the norms and the radial part of the normalisation) and Z gbar
    graw = tl.zeros((BLOCK_B, MP, MP), tl.float32)
    zg = tl.zeros((BLOCK_B, MP), tl.float32)
    if NORMALIZE or HAS_GLEAD:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            x = _load_rows(base, b, d, stride_b, stride_d, B, D, M, MP)
            if NORMALIZE:
                graw += _gram_chunk(x, zs, b, d, stride_b, stride_d, B, D, M, MP)
            if HAS_GLEAD:
                gbar = tl.load(GLEAD + b[:, None] * stride_gl_b + d[None, :] * stride_gl_d,
                               mask=b_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
                zg += tl.sum(x * gbar[:, None, :], 2)
    inv_n, norm = _inverse_norms(graw, NORMALIZE, MP)

    s1 = _entry(s, 0, MP)
    lam = s * s
    lam1 = s1 * s1
    inv_s1 = s1 / (lam1 + _TINY)
    u1 = _column(u, 0, MP)
    coef = tl.zeros((BLOCK_B, MP, MP), tl.float32)  # C
    w = tl.zeros((BLOCK_B, MP), tl.float32)  # dL/dZn's rank-1 term u_1 gbar^T / sigma_1, per row
    a = zg * inv_n  # Zn gbar
    if HAS_GS:
        gs = tl.load(GS + b[:, None] * stride_gs_b + i[None, :] * stride_gs_m, mask=m_ok, other=0.0)
        floor_sq = (_SIGMA_EPS * s1) * (_SIGMA_EPS * s1) + _TINY
        ws = gs.to(tl.float32) * (s / (lam + floor_sq[:, None]))
        for k in tl.static_range(M):  # U diag(ws) U^T
            uk = _column(u, k, MP)
            coef += _entry(ws, k, MP)[:, None, None] * (uk[:, :, None] * uk[:, None, :])
    if HAS_GLEAD:
        bk = tl.sum(u * a[:, :, None], 1)  # b_k = u_k . a
        c = _entry(bk, 0, MP) * inv_s1  # lead . gbar
        gap = lam1[:, None] - lam
        gap_floor_sq = (_GAP_EPS * lam1) * (_GAP_EPS * lam1) + _TINY
        h = bk * (gap / (gap * gap + gap_floor_sq[:, None])) * inv_s1[:, None]
        h = tl.where(i[None, :] == 0, 0.0, h)
        uh = tl.sum(u * h[:, None, :], 2)  # sum_k h_k u_k
        coef += uh[:, :, None] * u1[:, None, :] + u1[:, :, None] * uh[:, None, :]
        coef -= (c * inv_s1 * inv_s1)[:, None, None] * (u1[:, :, None] * u1[:, None, :])
        w = u1 * inv_s1[:, None]
    if NORMALIZE:
        # dL/dz_m = (dL/dzn_m - (dL/dzn_m . zn_m) zn_m) / ||z_m||, with dL/dzn_m . zn_m = (C G)_mm + w_m a_m
        g = graw * inv_n[:, :, None] * inv_n[:, None, :]
        radial = tl.sum(coef * g, 2) + w * a
        radial = tl.where(norm > _NORM_EPS, radial, 0.0)
        coef = coef * inv_n[:, :, None] * inv_n[:, None, :]
        coef -= tl.where(i[None, :, None] == i[None, None, :], (radial * inv_n * inv_n)[:, :, None], 0.0)
        w = w * inv_n

    # pass 2: dZ = K Z + w gbar^T
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dz = tl.zeros((BLOCK_B, MP, BLOCK_D), tl.float32)
        for j in tl.static_range(M):
            dz += _column(coef, j, MP)[:, :, None] * _load_modality(zs[j], b, d, stride_b, stride_d, B, D)[:, None, :]
        if HAS_GLEAD:
            gbar = tl.load(GLEAD + b[:, None] * stride_gl_b + d[None, :] * stride_gl_d,
                           mask=b_ok[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
            dz += w[:, :, None] * gbar[:, None, :]
        ptr = DZ + b[:, None, None] * (M * D) + i[None, :, None] * D + d[None, None, :]
        tl.store(ptr, dz, mask=m_ok[:, :, None] & (d[None, None, :] < D))


# ----------------------------------------------------------------------------------------------- launchers


def _interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (decided by TRITON_INTERPRET when triton is imported)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _common_strides(zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kernels take one (row, feature) stride pair for all modalities; copy only when they differ."""
    if all(z.stride() == zs[0].stride() for z in zs):
        return zs
    return [z.contiguous() for z in zs]


def block_sizes(m_pad: int, d: int) -> tuple[int, int]:
    """(BLOCK_B, BLOCK_D). Compiled: 256 entries of G (and of V) per program for the Jacobi solve and
    [BLOCK_B, MP, BLOCK_D] tiles of REGISTER_BUDGET elements: no register spills for sm_90 at any M (checked
    with cuobjdump), otherwise untuned. Interpreted: the cost is per operation, not per element, so 64
    instances and up to 512 features at a time."""
    d_pad = triton.next_power_of_2(d)
    if _interpreting():
        return 64, min(d_pad, 512)
    block_b = min(64, 256 // (m_pad * m_pad))
    return block_b, min(d_pad, 64, REGISTER_BUDGET // (block_b * m_pad))


def _pointer_args(zs: list[torch.Tensor]) -> list[torch.Tensor]:
    return zs + [zs[0]] * (MAX_M - len(zs))  # unused pointer slots repeat modality 0 and are never read


@triton_op("pmrl_triton::gram_eig_fwd", mutates_args=())
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


@triton_op("pmrl_triton::gram_eig_bwd", mutates_args=())
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
    lambda zs, normalize: torch.ops.pmrl_triton.gram_eig_fwd(zs, normalize),
    lambda zs, s, u, lead, grad_s, grad_lead, normalize: torch.ops.pmrl_triton.gram_eig_bwd(
        zs, s, u, grad_s, grad_lead, normalize
    ),
)


# ----------------------------------------------------------------------------------------------- interface


def is_available(device_type: str) -> bool:
    """CUDA devices, and the CPU only under the Triton interpreter (TRITON_INTERPRET=1 before import)."""
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type == "cpu" and _interpreting()


def unsupported_reason(zs: list[torch.Tensor]) -> Optional[str]:
    if not 2 <= len(zs) <= MAX_M:
        return f"the Triton kernels take 2 to {MAX_M} modalities, got M = {len(zs)}"
    if zs[0].dtype == torch.float64:
        return "the Triton kernels compute in float32; float64 input needs the reference or C++ backend"
    return None
