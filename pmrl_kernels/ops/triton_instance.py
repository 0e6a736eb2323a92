"""The per-instance maths of the Triton gram_eig kernels (pmrl_kernels/ops/triton_gram.py), the counterpart of
csrc/include/pmrl/*.h: masked selections and reductions over [BLOCK_B, MP] and [BLOCK_B, MP, MP] blocks (Triton
cannot index registers), what a pass takes from a [BLOCK_B, MP, BLOCK_D] tile of rows, the Jacobi rotation and its
stopping test, the canonical sign, the scale helpers and the backward's coefficients, with the constants of
pmrl_kernels.constants (docs/maths.md, "Singular cases" and "Scale")."""
import torch
import triton
import triton.language as tl

from .. import constants

SIGMA_EPS = tl.constexpr(constants.SIGMA_EPS)
GAP_EPS = tl.constexpr(constants.GAP_EPS)
SIGN_TOL = tl.constexpr(constants.SIGN_TOL)
NORM_EPS = tl.constexpr(constants.NORM_EPS)
TINY = tl.constexpr(torch.finfo(torch.float32).tiny)
FLT_MAX = tl.constexpr(torch.finfo(torch.float32).max)
INF = tl.constexpr(float("inf"))
SQRT_TINY = tl.constexpr(torch.finfo(torch.float32).tiny ** 0.5)
# the relative rotation test of the C++ solver (csrc/include/pmrl/eigen.h), in fp32
JACOBI_TOL = tl.constexpr(constants.JACOBI_REL_TOL * torch.finfo(torch.float32).eps)


@triton.jit
def scale_for(x):
    """The power of two r with r x in [0.5, 1), clamped to [2^-126, 2^126]; 1 for 0, NaN and Inf (the C++
    scale_for, from the exponent bits: Triton has no frexp)."""
    biased = (x.to(tl.int32, bitcast=True) >> 23) & 0xFF
    field = tl.minimum(tl.maximum(253 - biased, 1), 253)
    r = (field << 23).to(tl.float32, bitcast=True)
    return tl.where((x > 0.0) & (x <= FLT_MAX), r, 1.0)


@triton.jit
def row_scales(amax, NORMALIZE: tl.constexpr):
    """[BLOCK_B, MP] row scales from the rows' largest magnitudes amax (pmrl/instance.h, row_scales): each row its
    own with normalisation, the instance's largest for all rows without; 1 when an input is not finite."""
    top = tl.max(amax, 1)
    r = scale_for(amax) if NORMALIZE else scale_for(top)[:, None] + tl.zeros_like(amax)
    return tl.where((top <= FLT_MAX)[:, None], r, 1.0)


@triton.jit
def gram_needs_rescale(graw, NORMALIZE: tl.constexpr, M: tl.constexpr, MP: tl.constexpr):
    """[BLOCK_B] pmrl/instance.h's gram_needs_rescale: a diagonal entry not finite, or below sqrt(tiny) (with
    normalisation any row, without the largest), where the products lost precision."""
    diag = diagonal(graw, MP)
    finite = tl.min((diag <= FLT_MAX).to(tl.int32), 1) > 0
    if NORMALIZE:
        i = tl.arange(0, MP)[None, :]
        return ~finite | (tl.max(((diag < SQRT_TINY) & (i < M)).to(tl.int32), 1) > 0)
    return ~finite | (tl.max(diag, 1) < SQRT_TINY)


@triton.jit
def entry(v, k, MP: tl.constexpr):
    """[BLOCK_B] entry k of v [BLOCK_B, MP]."""
    return tl.sum(tl.where(tl.arange(0, MP)[None, :] == k, v, 0.0), 1)


@triton.jit
def diagonal(a, MP: tl.constexpr):
    """[BLOCK_B, MP] diagonal of a [BLOCK_B, MP, MP]."""
    i = tl.arange(0, MP)
    return tl.sum(tl.where(i[None, :, None] == i[None, None, :], a, 0.0), 2)


@triton.jit
def column(a, k, MP: tl.constexpr):
    """[BLOCK_B, MP] column k of a [BLOCK_B, MP, MP] (k may be a runtime value)."""
    j = tl.arange(0, MP)
    return tl.sum(tl.where(j[None, None, :] == k, a, 0.0), 2)


@triton.jit
def tile_row(x, j, MP: tl.constexpr):
    """[BLOCK_B, BLOCK_D] row j of the tile x [BLOCK_B, MP, BLOCK_D], exactly (the other rows add zeros)."""
    return tl.sum(tl.where(tl.arange(0, MP)[None, :, None] == j, x, 0.0), 1)


@triton.jit
def tile_gram(x, M: tl.constexpr, MP: tl.constexpr):
    """x x^T [BLOCK_B, MP, MP] over the features of the tile x, one column per modality (3-D temporaries only:
    the [BLOCK_B, MP, MP, BLOCK_D] product would not fit in registers)."""
    col = tl.arange(0, MP)[None, None, :]
    g = tl.zeros((x.shape[0], MP, MP), tl.float32)
    for j in tl.static_range(M):
        g += tl.where(col == j, tl.sum(x * tile_row(x, j, MP)[:, None, :], 2)[:, :, None], 0.0)
    return g


@triton.jit
def tile_product(k, x, M: tl.constexpr, MP: tl.constexpr):
    """k x [BLOCK_B, MP, BLOCK_D] for k [BLOCK_B, MP, MP] and the tile x, summed over j in order."""
    y = tl.zeros(x.shape, tl.float32)
    for j in tl.static_range(M):
        y += column(k, j, MP)[:, :, None] * tile_row(x, j, MP)[:, None, :]
    return y


@triton.jit
def tile_magnitudes(x):
    """[BLOCK_B, MP] largest |x| of each row over the tile, NaN counted as Inf."""
    a = tl.abs(x)
    return tl.max(tl.where(a <= FLT_MAX, a, INF), 2)


@triton.jit
def inverse_norms(graw, r, NORMALIZE: tl.constexpr, MP: tl.constexpr):
    """1 / max(||zhat_m||, r_m NORM_EPS) per row (zhat = r z; as F.normalize divides z by max(||z||, NORM_EPS))
    and ||zhat_m||, from the Gram diagonal of the scaled rows; 1 and ||zhat_m|| without normalisation."""
    norm = tl.sqrt_rn(diagonal(graw, MP))
    if NORMALIZE:
        return tl.math.div_rn(tl.full(norm.shape, 1.0, tl.float32), tl.maximum(norm, r * NORM_EPS)), norm
    return tl.full(norm.shape, 1.0, tl.float32), norm


@triton.jit
def row_weights(inv_n, c):
    """[BLOCK_B, MP] wv with zn_cm = wv_m zhat_m: inv_n c, capped at the largest finite value (pmrl/common.h's
    cap_finite). Only a zero or padding row reaches the cap, where c / NORM_EPS overflows; its products with wv
    are then exactly 0 instead of 0 * inf = NaN."""
    wv = inv_n * c[:, None]
    return tl.where(wv > FLT_MAX, FLT_MAX, wv)


@triton.jit
def rotation(app, aqq, apq):
    """(rotate, t, c, s) of the Jacobi rotation zeroing a_pq (Numerical Recipes' formulas), elementwise.

    The solver's rotation test and angle, as csrc/include/pmrl/eigen.h: rotate only while
    a_pq^2 > tol^2 |a_pp a_qq| (relative, so small eigenvalues keep their accuracy); theta^2 cannot overflow.
    Not rotated: t = s = 0, c = 1."""
    rotate = tl.abs(apq) * tl.abs(apq) > (JACOBI_TOL * tl.abs(app)) * (JACOBI_TOL * tl.abs(aqq))
    theta = (aqq - app) / tl.where(rotate, 2.0 * apq, 1.0)
    at = tl.abs(theta)
    # at sqrt(1 + 1/at^2) above 1, sqrt(1 + at^2) below: one square root for both (the same values)
    big = tl.maximum(at, 1.0)
    q = tl.where(at > 1.0, 1.0 / big, at)
    root = big * tl.sqrt_rn(1.0 + q * q)
    t = tl.where(theta >= 0.0, 1.0, -1.0) / (at + root)
    t = tl.where(rotate, t, 0.0)
    c = 1.0 / tl.sqrt_rn(t * t + 1.0)
    return rotate, t, c, t * c


@triton.jit
def jacobi_rotate(g, v, p, q, MP: tl.constexpr):
    """One Jacobi rotation zeroing G_pq of every instance, applied to G and V (the cyclic ordering's step)."""
    i = tl.arange(0, MP)
    row = i[None, :, None]
    col = i[None, None, :]
    jv = i[None, :]
    gp = tl.sum(tl.where(row == p, g, 0.0), 1)  # row p of G, indexed by column
    gq = tl.sum(tl.where(row == q, g, 0.0), 1)
    app = tl.sum(tl.where(jv == p, gp, 0.0), 1)
    apq = tl.sum(tl.where(jv == q, gp, 0.0), 1)
    aqq = tl.sum(tl.where(jv == q, gq, 0.0), 1)
    rotate, t, c, s = rotation(app, aqq, apq)
    new_p = c[:, None] * gp - s[:, None] * gq
    new_q = s[:, None] * gp + c[:, None] * gq
    # the 2 x 2 block exactly: rotated diagonal, G_pq = 0 (not its rounding residue); kept when not rotated
    a_pq = tl.where(rotate, 0.0, apq)[:, None]
    new_p = tl.where(jv == p, (app - t * apq)[:, None], tl.where(jv == q, a_pq, new_p))
    new_q = tl.where(jv == q, (aqq + t * apq)[:, None], tl.where(jv == p, a_pq, new_q))
    g = tl.where(row == p, new_p[:, None, :], tl.where(row == q, new_q[:, None, :], g))
    g = tl.where(col == p, new_p[:, :, None], tl.where(col == q, new_q[:, :, None], g))
    vp = column(v, p, MP)
    vq = column(v, q, MP)
    v = tl.where(col == p, (c[:, None] * vp - s[:, None] * vq)[:, :, None], v)
    v = tl.where(col == q, (s[:, None] * vp + c[:, None] * vq)[:, :, None], v)
    return g, v


@triton.jit
def partners(rnd, MP: tl.constexpr):
    """[MP] the partner of each index in round rnd of the round-robin (circle) ordering: index MP - 1 meets rnd,
    the others i meet (2 rnd - i) mod (MP - 1), except rnd itself, which that would pair with itself. Its MP - 1
    rounds of MP / 2 disjoint pairs meet every pair once."""
    i = tl.arange(0, MP)
    n = MP - 1
    other = (2 * rnd - i + 2 * n) % n  # kept >= 0: % rounds differently in the interpreter and compiled
    return tl.where(i == n, rnd, tl.where(other == i, n, other))


@triton.jit
def jacobi_round(g, v, rnd, MP: tl.constexpr):
    """Round rnd of the parallel ordering: the MP / 2 disjoint rotations of partners(rnd) at once, applied to G and
    V as J^T G J and V J; each pair's rotation as jacobi_rotate's. Row and column i meet their partner's through
    a gather, where jacobi_rotate needs masked reductions over the whole block for each rotation, so a sweep takes
    MP - 1 of these instead of M (M - 1) / 2 rotations. Pairs with a padding index have a_pq = 0 and are not
    rotated."""
    i = tl.arange(0, MP)
    pi = partners(rnd, MP)
    row = i[None, :, None]
    col = i[None, None, :]
    at_partner = col == pi[None, :, None]  # entry (i, pi(i))
    is_p = (i < pi)[None, :]  # row i plays p of its pair, its partner q
    d = diagonal(g, MP)
    d_pi = tl.sum(tl.where(at_partner, d[:, None, :], 0.0), 2)  # d[pi(i)]
    apq = tl.sum(tl.where(at_partner, g, 0.0), 2)  # G[i, pi(i)]
    app = tl.where(is_p, d, d_pi)
    aqq = tl.where(is_p, d_pi, d)
    rotate, t, c, s = rotation(app, aqq, apq)
    sigma = tl.where(is_p, -s, s)  # row p: c g_p - s g_q; row q: c g_q + s g_p
    rows = tl.broadcast_to(pi[None, :, None], g.shape)
    cols = tl.broadcast_to(pi[None, None, :], g.shape)
    g = c[:, :, None] * g + sigma[:, :, None] * tl.gather(g, rows, 1)
    g = c[:, None, :] * g + sigma[:, None, :] * tl.gather(g, cols, 2)
    # G_ij and G_ji of different pairs were rounded in another order: the upper triangle, mirrored, keeps G
    # exactly symmetric (as the cyclic ordering does), so both rows of a pair compute the same rotation
    g = tl.where(row > col, tl.permute(g, (0, 2, 1)), g)
    # each 2 x 2 block exactly: rotated diagonal, G_pq = 0 (not its rounding residue); kept when not rotated
    g = tl.where(row == col, tl.where(is_p, app - t * apq, aqq + t * apq)[:, :, None],
                 tl.where(at_partner, tl.where(rotate, 0.0, apq)[:, :, None], g))
    v = c[:, None, :] * v + sigma[:, None, :] * tl.gather(v, cols, 2)
    return g, v


@triton.jit
def unconverged(g, MP: tl.constexpr):
    """True while some instance has a pair the rotation test of jacobi_rotate would rotate (NaN compares
    False): the C++ solver's "a sweep with no rotation" stop, checked before the sweep."""
    i = tl.arange(0, MP)
    off_diag = i[None, :, None] != i[None, None, :]
    d = tl.abs(diagonal(g, MP))
    big = tl.abs(g) * tl.abs(g) > (JACOBI_TOL * d[:, :, None]) * (JACOBI_TOL * d[:, None, :])
    return tl.max(tl.max(tl.max((off_diag & big).to(tl.int32), 2), 1), 0) > 0


@triton.jit
def non_finite(a):
    """[BLOCK_B] True where an instance's [BLOCK_B, MP, MP] block holds NaN or Inf."""
    return tl.max(tl.max((~(tl.abs(a) <= FLT_MAX)).to(tl.int32), 2), 1) > 0


@triton.jit
def canonical_sign(u, i, MP: tl.constexpr):
    """terms.canonical_sign for columns u [BLOCK_B, MP] (padding entries are 0): the sign of the column sum,
    or, when that is within SIGN_TOL of 0, of the first entry with |u_m| > SIGN_TOL (+ if none)."""
    total = tl.sum(u, 1)
    first_idx = tl.min(tl.where(tl.abs(u) > SIGN_TOL, i[None, :], MP), 1)
    first = tl.sum(tl.where(i[None, :] == first_idx[:, None], u, 0.0), 1)
    key = tl.where(tl.abs(total) > SIGN_TOL, total, tl.where(first_idx < MP, first, 1.0))
    return tl.where(key >= 0.0, 1.0, -1.0)


@triton.jit
def backward_coefficients(graw, zg, s, u, gs, r, NORMALIZE: tl.constexpr, HAS_GS: tl.constexpr,
                          HAS_GLEAD: tl.constexpr, M: tl.constexpr, MP: tl.constexpr):
    """(K [BLOCK_B, MP, MP], w [BLOCK_B, MP], wv [BLOCK_B, MP], r [BLOCK_B, MP]) with dL/dz_m = r_m (wv_m (sum_n
    K_mn (r_n z_n) + w_m gbar)), from the reductions of the rows scaled by r (Gram matrix graw, Z gbar zg), S, U and
    dL/dS gs (pmrl/instance.h's backward_coefficients; reference.gram_eig_backward's maths). Without normalisation
    r comes in as 1 and goes out as the instance scale c, with wv = 1: the pass over D scales the rows before K
    meets them (c K alone can overflow where dL/dz does not).

    dL/dZn = C Zn + u_1 gbar^T / sigma_1 (docs/maths.md, "The backward in matrix form") and, through the
    normalisation with N = diag(max(||z_m||, NORM_EPS)), dL/dZ = K Z + w gbar^T, K = N^-1 C N^-1 - diag(radial) N^-2.
    """
    i = tl.arange(0, MP)
    inv_n, norm = inverse_norms(graw, r, NORMALIZE, MP)
    # the maths works on Zn_c = c Zn, c the power of two of sigma_1
    c = scale_for(entry(s, 0, MP))
    s = s * c[:, None]
    if NORMALIZE:
        wv = row_weights(inv_n, c)  # zn_cm = wv_m zhat_m
        a = zg * wv  # Zn_c gbar
    else:
        r = c[:, None] + tl.zeros_like(s)
        wv = tl.full(s.shape, 1.0, tl.float32)
        a = zg * r

    s1 = entry(s, 0, MP)
    lam = s * s
    lam1 = s1 * s1
    inv_s1 = tl.math.div_rn(s1, lam1 + TINY)
    u1 = column(u, 0, MP)
    coef = tl.zeros(u.shape, tl.float32)  # C
    w = tl.zeros(s.shape, tl.float32)  # dL/dZn_c's rank-1 term u_1 gbar^T / sigma_1c, per row
    if HAS_GS:
        floor_sq = (SIGMA_EPS * s1) * (SIGMA_EPS * s1) + TINY
        # dL/dsigma_kc = dL/dsigma_k / c
        ws = tl.math.div_rn(gs, c[:, None]) * tl.math.div_rn(s, lam + floor_sq[:, None])
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
    return coef, w, wv, r
