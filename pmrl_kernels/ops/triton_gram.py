"""Triton backend: fused per-instance Gram eigen-decomposition (forward and backward) of PMRL.

Per instance i the M modality rows z_im [D] are read straight from the caller's tensors (M separate [B, D]
tensors or strided views of one [B, M, D] tensor; never stacked). Forward: normalise, the M x M Gram matrix in
fp32 over D, Jacobi eigen-solve in registers, then lead from the rows again. Backward: the reductions the
gradient needs (Gram matrix, Zn gbar), then dZ = K Z + w gbar^T with a small M x M matrix K, written once. The
maths and every singular-case rule are those of pmrl_kernels.reference (gram_eig_forward / gram_eig_backward),
with the same constants.

Two paths, one code (launch_config picks, RESIDENT): when an instance's rows fit in registers the kernel loads
them once and every pass works on that tile, so the forward reads Z once and the backward reads Z and dL/dlead
once and writes dZ once (dram_bytes: the byte model); larger instances take the passes over D in chunks, loading
Z again on each (see RESIDENT_ELEMENTS for why the fp32 forward does not take them where it fits).

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
    FLT_MAX, TINY, backward_coefficients, canonical_sign, diagonal, entry, gram_needs_rescale, inverse_norms,
    jacobi_rotate, jacobi_round, non_finite, row_scales, row_weights, scale_for, tile_gram, tile_magnitudes,
    tile_product, unconverged,
)

__all__ = ["gram_eig", "gram_eig_unsupported", "is_available"]

MAX_M = MAX_MODALITIES  # the kernels take one pointer argument per modality
# fp32 elements of the resident tile [BLOCK_B, MP, D_pad] (4 warps: 16 a thread): an instance with MP * D_pad up to
# this is loaded once and every pass works on registers, so the forward reads Z once and the backward reads Z and
# dL/dlead once. 2048 keeps M <= 8 free of spills (benchmarks/static_check.py); twice that needs up to 255
# registers. Both directions take the one pass wherever an instance fits, although one instance a program
# replicates its Jacobi solve over the program's threads: the chunked fp32 forward is faster but gives wrong U
# columns for some strided M = 3 inputs when compiled (see docs/results.md, "Triton gram_eig paths").
RESIDENT_ELEMENTS = 2048
# Warps per program of both kernels (Triton's default; the static check's no-spill report is for 4). A program
# holds one instance at M = 16 and in the one-pass path at M = 4, D = 512, where every masked reduction of the
# Jacobi solve crosses warps.
NUM_WARPS = 4
# The forward's Jacobi sweeps: up to this M the cyclic ordering (M (M - 1) / 2 rotations one after the other, each
# a handful of masked reductions over the MP x MP block), above it the parallel one (MP - 1 rounds of MP / 2
# disjoint rotations, each round a few gathers), about a tenth of the instructions a sweep at M = 16 (see
# docs/results.md, "Static sm_90 checks"). Up to 8 the cyclic ordering stays: it keeps the static check's sample
# free of spills, where the parallel one does not.
CYCLIC_JACOBI_MAX_M = 8
# fp32 elements of a chunk [BLOCK_B, MP, BLOCK_D] of the chunked passes, which load Z again on each pass (4 warps:
# 8 a thread): at most 128 registers for M <= 8; 2048 needs up to 162 (the backward at M = 8), otherwise untuned.
REGISTER_BUDGET = 1024


# ----------------------------------------------------------------------------------------------- kernels
#
# Every pass over D goes through _rows: with RESIDENT (the whole instance fits in registers, BLOCK_D >= D) the
# tile the kernel loaded once, so Z is read from memory once; otherwise the chunk of BLOCK_D features, loaded
# again on each pass.


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
def _load_lead_grad(GLEAD, b, d, stride_gl_b, stride_gl_d, B, D):
    """fp32 tile [BLOCK_B, BLOCK_D] of dL/dlead; 0 outside the matrix."""
    mask = (b[:, None] < B) & (d[None, :] < D)
    return tl.load(GLEAD + b[:, None] * stride_gl_b + d[None, :] * stride_gl_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _features(D, RESIDENT: tl.constexpr, BLOCK_D: tl.constexpr):
    """The end of a pass's loop over D: resident, BLOCK_D >= D, so the loop is one chunk known at compile time (no
    loop guard lives across the solve, where ptxas would spill it around sqrt_rn's and div_rn's slow paths)."""
    if RESIDENT:
        stop = BLOCK_D
    else:
        stop = D
    return stop


@triton.jit
def _rows(x, base, b, d, stride_b, stride_d, B, D, RESIDENT: tl.constexpr, M: tl.constexpr, MP: tl.constexpr):
    """The rows' tile of features d: the resident x, or loaded now."""
    if RESIDENT:
        t = x
    else:
        t = _load_rows(base, b, d, stride_b, stride_d, B, D, M, MP)
    return t


@triton.jit
def _lead_grad(gl, GLEAD, b, d, stride_gl_b, stride_gl_d, B, D, RESIDENT: tl.constexpr):
    """dL/dlead's tile of features d: the resident gl, or loaded now."""
    if RESIDENT:
        t = gl
    else:
        t = _load_lead_grad(GLEAD, b, d, stride_gl_b, stride_gl_d, B, D)
    return t


@triton.jit
def _rescaled(needs, x, base, b, stride_b, stride_d, B, D, NORMALIZE: tl.constexpr, RESIDENT: tl.constexpr,
              M: tl.constexpr, MP: tl.constexpr, BLOCK_D: tl.constexpr):
    """[BLOCK_B, MP] row scales of the instances that need them (docs/maths.md, "Scale"), 1 for the others, from
    a pass for the rows' largest magnitudes."""
    amax = tl.zeros((b.shape[0], MP), tl.float32)
    for d0 in range(0, _features(D, RESIDENT, BLOCK_D), BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        amax = tl.maximum(amax, tile_magnitudes(_rows(x, base, b, d, stride_b, stride_d, B, D, RESIDENT, M, MP)))
    return tl.where(needs[:, None], row_scales(amax, NORMALIZE), 1.0)


@triton.jit
def _reductions(x, gl, base, b, r, GLEAD, stride_b, stride_d, stride_gl_b, stride_gl_d, B, D,
                GRAM: tl.constexpr, HAS_GLEAD: tl.constexpr, RESIDENT: tl.constexpr, M: tl.constexpr,
                MP: tl.constexpr, BLOCK_D: tl.constexpr):
    """(Gram matrix [BLOCK_B, MP, MP] when GRAM, Z gbar [BLOCK_B, MP] with a lead gradient) of the rows scaled by r,
    in one pass over D."""
    graw = tl.zeros((b.shape[0], MP, MP), tl.float32)
    zg = tl.zeros((b.shape[0], MP), tl.float32)
    for d0 in range(0, _features(D, RESIDENT, BLOCK_D), BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        xs = _rows(x, base, b, d, stride_b, stride_d, B, D, RESIDENT, M, MP) * r[:, :, None]
        if GRAM:
            graw += tile_gram(xs, M, MP)
        if HAS_GLEAD:
            gbar = _lead_grad(gl, GLEAD, b, d, stride_gl_b, stride_gl_d, B, D, RESIDENT)
            zg += tl.sum(xs * gbar[:, None, :], 2)
    return graw, zg


@triton.jit
def _gram_eig_fwd_kernel(
    Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15,
    S, U, LEAD,
    B, D, stride_b, stride_d,
    M: tl.constexpr, MP: tl.constexpr, NORMALIZE: tl.constexpr, RESIDENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, MAX_SWEEPS: tl.constexpr, PARALLEL_JACOBI: tl.constexpr,
):
    """S [B, M], U [B, M, M], lead [B, D] (fp32, contiguous) of BLOCK_B instances per program."""
    zs = (Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15)
    base = _modality_bases(zs, M, MP)
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < B
    i = tl.arange(0, MP)
    row = i[None, :, None]
    col = i[None, None, :]
    x = 0.0  # each pass loads its chunks, unless the whole instance is resident
    if RESIDENT:
        x = _load_rows(base, b, tl.arange(0, BLOCK_D), stride_b, stride_d, B, D, M, MP)

    r = tl.full((BLOCK_B, MP), 1.0, tl.float32)
    graw, _ = _reductions(x, 0.0, base, b, r, LEAD, stride_b, stride_d, 0, 0, B, D, True, False, RESIDENT, M, MP,
                          BLOCK_D)
    # rows whose products over- or underflowed: their magnitudes, then the Gram matrix of the scaled rows
    # (docs/maths.md, "Scale"); the program's other instances keep r = 1 and get the same sums again
    needs = gram_needs_rescale(graw, NORMALIZE, M, MP) & b_ok
    if tl.max(needs.to(tl.int32), 0) > 0:
        r = _rescaled(needs, x, base, b, stride_b, stride_d, B, D, NORMALIZE, RESIDENT, M, MP, BLOCK_D)
        graw, _ = _reductions(x, 0.0, base, b, r, LEAD, stride_b, stride_d, 0, 0, B, D, True, False, RESIDENT, M,
                              MP, BLOCK_D)
    inv_n, norm = inverse_norms(graw, r, NORMALIZE, MP)
    # the maths works on Zn_c = c Zn, c the power of two that brings the largest row norm near 1 (pmrl/instance.h):
    # the solver's rotation test can neither overflow nor underflow, and every coefficient is of order 1
    c = scale_for(tl.max(norm * inv_n, 1))
    wv = row_weights(inv_n, c)  # zn_cm = wv_m zhat_m
    g = graw * wv[:, :, None] * wv[:, None, :]
    # a non-finite instance is solved as a zero matrix with NaN eigenvectors, which no rotation touches: it cannot
    # touch the others, and the test after the solve reports it (a flag kept across the solve would be spilled
    # around the calls of sqrt_rn's slow path)
    bad = non_finite(g)[:, None, None]
    g = tl.where(bad, 0.0, g)
    # NaN is written in place, not as a global: Triton re-checks every global a kernel reads with == at each
    # launch on a GPU, and a NaN global never equals itself
    v = tl.where(bad, float("nan"), tl.where(row == col, 1.0, 0.0))
    sweep = 0
    while (sweep < MAX_SWEEPS) & unconverged(g, MP):
        if PARALLEL_JACOBI:
            for rnd in range(MP - 1):
                g, v = jacobi_round(g, v, rnd, MP)
        else:
            for p in range(M - 1):
                for q in range(p + 1, M):
                    g, v = jacobi_rotate(g, v, p, q, MP)
        sweep += 1
    bad = non_finite(g) | non_finite(v)

    # descending order by rank (ties by index; padding last); eigenvector columns get the canonical sign
    lam = diagonal(g, MP)
    key = tl.where(i[None, :] < M, lam, -FLT_MAX)
    before = (key[:, :, None] > key[:, None, :]) | ((key[:, :, None] == key[:, None, :]) & (row < col))
    rank = tl.sum(before.to(tl.int32), 1)
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
        s_k = tl.where(bad, float("nan"), tl.where(k < D, s_k, 0.0))
        u_k = tl.where(bad[:, None], float("nan"), u_k)
        tl.store(S + b * M + k, s_k, mask=b_ok)
        tl.store(U + b[:, None] * (M * M) + i[None, :] * M + k, u_k, mask=b_ok[:, None] & (i[None, :] < M))
        if k == 0:
            s1 = tl.where(bad, float("nan"), s_kc)
            u1 = u_k

    # lead = Zn_c^T u_1 * safe_inverse(s_1c, tiny), on the scaled rows r z
    w = u1 * tl.math.div_rn(s1, s1 * s1 + TINY)[:, None] * wv
    for d0 in range(0, _features(D, RESIDENT, BLOCK_D), BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        xs = _rows(x, base, b, d, stride_b, stride_d, B, D, RESIDENT, M, MP) * r[:, :, None]
        lead = tl.sum(xs * w[:, :, None], 1)
        tl.store(LEAD + b[:, None] * D + d[None, :], lead, mask=b_ok[:, None] & (d[None, :] < D))


@triton.jit
def _gram_eig_bwd_kernel(
    Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15,
    S, U, GS, GLEAD, DZ,
    B, D, stride_b, stride_d, stride_gs_b, stride_gs_m, stride_gl_b, stride_gl_d,
    M: tl.constexpr, MP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_GS: tl.constexpr, HAS_GLEAD: tl.constexpr,
    RESIDENT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dZ [B, M, D] (contiguous, the input dtype) from dL/dS and dL/dlead; reference.gram_eig_backward's maths:
    the reductions over D, the M x M coefficients (triton_instance.backward_coefficients), then dZ written once."""
    zs = (Z0, Z1, Z2, Z3, Z4, Z5, Z6, Z7, Z8, Z9, Z10, Z11, Z12, Z13, Z14, Z15)
    base = _modality_bases(zs, M, MP)
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_ok = b < B
    i = tl.arange(0, MP)
    m_ok = b_ok[:, None] & (i[None, :] < M)
    s = tl.load(S + b[:, None] * M + i[None, :], mask=m_ok, other=0.0)
    u = tl.load(U + b[:, None, None] * (M * M) + i[None, :, None] * M + i[None, None, :],
                mask=m_ok[:, :, None] & (i[None, None, :] < M), other=0.0)
    gs = 0.0
    if HAS_GS:
        gs = tl.load(GS + b[:, None] * stride_gs_b + i[None, :] * stride_gs_m, mask=m_ok, other=0.0).to(tl.float32)
    x = 0.0  # each pass loads its chunks, unless the whole instance is resident
    gl = 0.0
    if RESIDENT:
        x = _load_rows(base, b, tl.arange(0, BLOCK_D), stride_b, stride_d, B, D, M, MP)
        if HAS_GLEAD:
            gl = _load_lead_grad(GLEAD, b, tl.arange(0, BLOCK_D), stride_gl_b, stride_gl_d, B, D)

    # the Gram matrix (for the norms and the radial part of the normalisation) and Z gbar, of the rows scaled by
    # r (docs/maths.md, "Scale"): r = 1 unless a row's squared norm over- or underflowed
    r = tl.full((BLOCK_B, MP), 1.0, tl.float32)
    graw, zg = _reductions(x, gl, base, b, r, GLEAD, stride_b, stride_d, stride_gl_b, stride_gl_d, B, D,
                           NORMALIZE, HAS_GLEAD, RESIDENT, M, MP, BLOCK_D)
    if NORMALIZE:
        needs = gram_needs_rescale(graw, NORMALIZE, M, MP) & b_ok
        if tl.max(needs.to(tl.int32), 0) > 0:
            r = _rescaled(needs, x, base, b, stride_b, stride_d, B, D, NORMALIZE, RESIDENT, M, MP, BLOCK_D)
            graw, zg = _reductions(x, gl, base, b, r, GLEAD, stride_b, stride_d, stride_gl_b, stride_gl_d, B, D,
                                   NORMALIZE, HAS_GLEAD, RESIDENT, M, MP, BLOCK_D)
    coef, w, wv, r = backward_coefficients(graw, zg, s, u, gs, r, NORMALIZE, HAS_GS, HAS_GLEAD, M, MP)

    # dL/dz_m = r_m (wv_m (sum_n K_mn (r_n z_n) + w_m gbar)) (pmrl/instance.h's backward_coefficients), in that
    # order: r_m wv_m alone can overflow where dL/dz does not
    for d0 in range(0, _features(D, RESIDENT, BLOCK_D), BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        xs = _rows(x, base, b, d, stride_b, stride_d, B, D, RESIDENT, M, MP) * r[:, :, None]
        dz = tile_product(coef, xs, M, MP)
        if HAS_GLEAD:
            dz += w[:, :, None] * _lead_grad(gl, GLEAD, b, d, stride_gl_b, stride_gl_d, B, D, RESIDENT)[:, None, :]
        dz = (dz * wv[:, :, None]) * r[:, :, None]
        ptr = DZ + b[:, None, None] * (M * D) + i[None, :, None] * D + d[None, None, :]
        tl.store(ptr, dz, mask=m_ok[:, :, None] & (d[None, None, :] < D))


# ----------------------------------------------------------------------------------------------- launchers


def _common_strides(zs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The kernels take one (row, feature) stride pair for all modalities; copy only when they differ."""
    if all(z.stride() == zs[0].stride() for z in zs):
        return zs
    return [z.contiguous() for z in zs]


def launch_config(m_pad: int, d: int) -> dict:
    """BLOCK_B, BLOCK_D and RESIDENT (the passes work on a tile loaded once) of the forward and backward kernels for
    M padded to m_pad and D = d, any dtype. Resident when an instance's padded tile fits RESIDENT_ELEMENTS, in the
    interpreter too, so that both paths run there. Compiled: at most 256 entries of G (and of V) per program for
    the Jacobi solve; resident, as many instances as fill RESIDENT_ELEMENTS; chunked, chunks of REGISTER_BUDGET
    elements (no register spills for sm_90: benchmarks/static_check.py in CI), otherwise untuned. Interpreted: the
    cost is per operation, not per element, so 64 instances and, chunked, up to 512 features at a time."""
    d_pad = triton.next_power_of_2(d)
    resident = m_pad * d_pad <= RESIDENT_ELEMENTS
    if interpreting():
        return dict(BLOCK_B=64, BLOCK_D=d_pad if resident else min(d_pad, 512), RESIDENT=resident)
    block_b = min(64, 256 // (m_pad * m_pad))
    if resident:
        return dict(BLOCK_B=min(block_b, RESIDENT_ELEMENTS // (m_pad * d_pad)), BLOCK_D=d_pad, RESIDENT=True)
    return dict(BLOCK_B=block_b, BLOCK_D=min(d_pad, 64, REGISTER_BUDGET // (block_b * m_pad)), RESIDENT=False)


def dram_bytes(direction: str, batch: int, modalities: int, features: int, itemsize: int, normalize: bool = True,
               grad_s: bool = True, grad_lead: bool = True, resident: Optional[bool] = None) -> tuple[int, int]:
    """The byte model of one launch of the forward or backward kernel: (bytes read, bytes written) in DRAM, every
    access coalesced and nothing kept in L2 from one pass to the next. Z has `itemsize` bytes an element; S, U, lead
    and their gradients are fp32. Resident (launch_config's choice when None), every input is read once and every
    output written once: the floor. Chunked, Z is read again on each pass: forward, the Gram pass and the lead pass;
    backward, the reductions (when there are any: normalisation or a lead gradient) and the dZ pass, dL/dlead with
    both. Not counted: the instances whose squared norms over- or underflow, which take two more passes on the
    chunked path (none resident)."""
    if resident is None:
        resident = launch_config(triton.next_power_of_2(modalities), features)["RESIDENT"]
    z = batch * modalities * features * itemsize
    lead = batch * features * 4
    spectrum = batch * (modalities + modalities * modalities) * 4  # S and U
    if direction == "forward":
        return z * (1 if resident else 2), spectrum + lead
    assert direction == "backward", direction
    z_reads = 1 if resident or not (normalize or grad_lead) else 2
    lead_grad_reads = (1 if resident else 2) if grad_lead else 0
    read = z * z_reads + lead * lead_grad_reads + spectrum + (batch * modalities * 4 if grad_s else 0)
    return read, z


def _pointer_args(zs: list[torch.Tensor]) -> list[torch.Tensor]:
    return zs + [zs[0]] * (MAX_M - len(zs))  # unused pointer slots repeat modality 0 and are never read


@triton_op("pmrl_kernels::triton_gram_eig_fwd", mutates_args=())
def gram_eig_fwd(zs: list[torch.Tensor], normalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S [B, M], U [B, M, M], lead [B, D] in float32 (the autograd-free forward)."""
    zs = _common_strides(list(zs))
    (batch, features), modalities = zs[0].shape, len(zs)
    config = launch_config(triton.next_power_of_2(modalities), features)
    device = zs[0].device
    s = torch.empty(batch, modalities, device=device, dtype=torch.float32)
    u = torch.empty(batch, modalities, modalities, device=device, dtype=torch.float32)
    lead = torch.empty(batch, features, device=device, dtype=torch.float32)
    wrap_triton(_gram_eig_fwd_kernel)[(triton.cdiv(batch, config["BLOCK_B"]),)](
        *_pointer_args(zs), s, u, lead, batch, features, zs[0].stride(0), zs[0].stride(1),
        M=modalities, MP=triton.next_power_of_2(modalities), NORMALIZE=normalize, MAX_SWEEPS=JACOBI_MAX_SWEEPS,
        PARALLEL_JACOBI=modalities > CYCLIC_JACOBI_MAX_M, num_warps=NUM_WARPS, **config,
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
    config = launch_config(triton.next_power_of_2(modalities), features)
    dz = torch.empty(batch, modalities, features, device=zs[0].device, dtype=zs[0].dtype)
    gs = s if grad_s is None else grad_s  # a placeholder pointer when absent: HAS_GS=False never reads it
    gl = s if grad_lead is None else grad_lead
    wrap_triton(_gram_eig_bwd_kernel)[(triton.cdiv(batch, config["BLOCK_B"]),)](
        *_pointer_args(zs), s, u, gs, gl, dz,
        batch, features, zs[0].stride(0), zs[0].stride(1), gs.stride(0), gs.stride(1), gl.stride(0), gl.stride(1),
        M=modalities, MP=triton.next_power_of_2(modalities), NORMALIZE=normalize, HAS_GS=grad_s is not None,
        HAS_GLEAD=grad_lead is not None, num_warps=NUM_WARPS, **config,
    )
    return dz


# ----------------------------------------------------------------------------------------------- autograd


# (S, U, lead) as reference.gram_eig, float32; gradients to zs through S and lead, none through U.
gram_eig = gram_eig_autograd(
    lambda zs, normalize: torch.ops.pmrl_kernels.triton_gram_eig_fwd(zs, normalize),
    lambda *args: torch.ops.pmrl_kernels.triton_gram_eig_bwd(*args),
)


# ----------------------------------------------------------------------------------------------- interface


def gram_eig_unsupported(zs: Sequence[torch.Tensor]) -> Optional[str]:
    if not MIN_MODALITIES <= len(zs) <= MAX_M:
        return f"the Triton kernels take {MIN_MODALITIES} to {MAX_M} modalities, got M = {len(zs)}"
    if zs[0].dtype == torch.float64:
        return "the Triton kernels compute in float32; float64 input needs the reference or C++ backend"
    return None
