"""Property-based checks (hypothesis, derandomised: the same examples on every run) of every CPU backend
(reference, cpp, blocked, and triton under its interpreter) against the float64 reference (issue 11, numerical
robustness).

Each example draws a batch: shape (B 1..9, M 2..6, so often not a power of two, D 1..40 and often D <= M;
test_many_modalities takes M up to 16), a dtype the backend takes (float32, float64, bfloat16, float16),
normalize, scales (without normalisation one per instance, 10^k for k in -30..30; with normalisation any finite
scale per row, down to subnormal and zero rows), tiny instances (a zero row beside rows subnormal in the dtype,
TINY_LOG_SCALE), a pattern per instance (random, rows sharing a direction, a zero row, a duplicated row, rank 1),
the temperatures as numbers or as 0-d float32, bfloat16 or float16 tensors (the oracle takes the value they hold)
and a layout (a [B, M, D] tensor, a list of M tensors, transposed [D, M, B] storage, a strided slice of a bigger
tensor, an expanded stride-0 view). The oracle is the reference backend in float64 on the same numbers (16-bit
inputs after their rounding, so the tolerances stay those of float32 computation), with torch.linalg.svdvals of
the stacked float64 matrix as a second oracle for S_1.

Tolerances are relative to each quantity's natural scale; float32 computation below, float64 input 1e-7 of it:
- S: what computing from the Gram matrix gives, |S_k^2 - S_k,ref^2| <= 1e-5 S_1^2 (large singular values to
  ~5e-6 S_1, values near 0 only to ~3e-3 S_1: sqrt turns the eigenvalues' rounding into sqrt(eps) S_1).
- U: orthogonal, and U diag(S^2) U^T = G, to 1e-5 lambda_1 (defined at ties too).
- lead: 2e-6 / gap, gap = (lambda_1 - lambda_2) / lambda_1 of the reference, compared where gap >= 1e-3. Below,
  lead is ill-conditioned (rounding G moves it by ~eps / gap; an exact tie leaves it undefined) and is not
  compared; it is still a unit vector (or 0 for an all-zero instance).
- align: within exactly the interval the S tolerance allows (align is monotone in each S_k), plus rounding.
- reg: the leads' tolerance carried through the logits lead_i . lead_j / tau_reg, where every lead of the batch
  is compared (the softmax spans the batch).
- dL/dz (float32 and float64 input), per row against its natural scale: 2 (1 - p_1) / tau from the alignment
  term plus reg_weight sum|w| / (tau_reg S_1) times lead's conditioning min(1 / gap, 1 / GAP_EPS) from the
  contrastive term, divided by max(||z_m||, NORM_EPS) with normalisation. Always against the float64 reference
  backward fed the backend's own S, U and lead (the backward alone, defined everywhere); end to end against the
  float64 reference where that is well conditioned (see well_conditioned).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pmrl_kernels import backends, gram_svd, pmrl_loss, reference, terms
from pmrl_kernels.constants import GAP_EPS, NORM_EPS
from pmrl_kernels.inputs import compute_dtype

# ----------------------------------------------------------------------------------------------- backends

# every backend pmrl_loss takes on the CPU (blocked too, whose gram_eig is the compiled one's)
CPU_BACKENDS = backends.available_backends("cpu")

# Triton's interpreter runs the kernels in NumPy, which warns where they form a Gram matrix that over- or
# underflows before rescaling the rows (by design: the rescaled pass is taken only when the raw one failed).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:underflow encountered:RuntimeWarning")]


def interpreted(name):
    """Whether backend `name` runs Triton kernels, which on CPU means Triton's interpreter: ~1 s an example at
    M <= 6 and ~10 s a forward at M = 16, so it gets fewer examples and no shrinking (hypothesis would spend
    up to 5 minutes shrinking a failure)."""
    modules = [importlib.import_module(module) for module in backends.REGISTRY[name].ops.values()]
    return any(getattr(module, "triton", None) is not None for module in modules)


COMPILED = [n for n in CPU_BACKENDS if not interpreted(n)]
INTERPRETED = [n for n in CPU_BACKENDS if interpreted(n)]

ALL_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accepted_dtypes(name):
    """The dtypes every op of backend `name` takes (Triton refuses float64: backends.unsupported_reason says so);
    the ops it lacks resolve as under "auto", which takes every dtype."""

    def takes(dtype):
        lead = torch.zeros(1, 1, dtype=compute_dtype(dtype))
        inputs = {"gram_eig": ([torch.zeros(1, 1, dtype=dtype)] * 2,), "contrastive": (lead, lead)}
        return all(backends.unsupported_reason(op, name, inputs[op]) is None for op in backends.REGISTRY[name].ops)

    return tuple(d for d in ALL_DTYPES if takes(d))


# ----------------------------------------------------------------------------------------------- examples

PATTERNS = ("random", "shared", "zero_row", "duplicate", "rank1")
LAYOUTS = ("tensor", "list", "transposed", "strided", "expanded")

# log10 of the scales. Without normalisation one per instance, 10^k with k an integer; with normalisation one
# per row, any value: entries (|randn| <~ 5, up to ~16 with a shared direction, times a rank-1 coefficient)
# stay finite, and the smallest give subnormal or zero rows (rows shorter than NORM_EPS are divided by
# NORM_EPS, as F.normalize does).
INSTANCE_LOG_SCALE = {torch.float32: (-30, 30), torch.bfloat16: (-30, 30), torch.float64: (-30, 30),
                      torch.float16: (-2, 3)}
ROW_LOG_SCALE = {torch.float32: (-46.0, 36.0), torch.bfloat16: (-42.0, 36.0), torch.float64: (-325.0, 306.0),
                 torch.float16: (-8.0, 3.0)}
# A tiny instance: a zero row beside rows whose entries are subnormal in the dtype (with normalisation every
# nonzero row is below NORM_EPS, so the instance scale is far above 1 and meets the zero row's 1 / NORM_EPS, or
# Triton's padding rows' when M is not a power of two). Without normalisation the range stays where S (a float32
# or float64 output, subnormal there too) keeps the bits the tolerances ask for.
TINY_LOG_SCALE = {  # dtype: (with normalisation, without)
    torch.float32: ((-44.5, -38.5), (-39.5, -38.5)), torch.bfloat16: ((-40.5, -38.5), (-39.5, -38.5)),
    torch.float64: ((-322.0, -308.5), (-309.0, -308.5)), torch.float16: ((-7.5, -4.5), (-7.0, -4.5)),
}
# Temperatures as numbers or as 0-d tensors of these dtypes; a tensor is cast to the compute dtype, so the oracle
# takes the value it holds.
TEMPERATURE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Case:
    b: int
    m: int
    d: int
    dtype: torch.dtype
    normalize: bool
    patterns: tuple
    log_scales: tuple  # per row (normalize) or per instance
    tiny: tuple  # per instance: a tiny instance (TINY_LOG_SCALE), whose row zero_rows[i] is zero
    zero_rows: tuple
    layout: str
    expand_dim: int  # the dimension the expanded layout repeats
    seed: int
    tau: float  # the value the temperature holds
    tau_reg: float
    temperature_dtype: object  # None: the temperatures are numbers; else 0-d tensors of this dtype
    reg_weight: float


@st.composite
def cases(draw, dtypes, m_range=(2, 6), d_range=None):
    dtype = draw(st.sampled_from(dtypes))
    normalize = draw(st.booleans())
    b = draw(st.integers(1, 9))
    m = draw(st.integers(*m_range))
    # D < M often: S past D must be exactly 0
    d = draw(st.integers(*d_range) if d_range else st.one_of(st.integers(1, 40), st.integers(1, m + 1)))
    patterns = tuple(draw(st.lists(st.sampled_from(PATTERNS), min_size=b, max_size=b)))
    if normalize:
        scale, n = st.floats(*ROW_LOG_SCALE[dtype]), b * m
    else:
        scale, n = st.integers(*INSTANCE_LOG_SCALE[dtype]).map(float), b
    log_scales = list(draw(st.lists(scale, min_size=n, max_size=n)))
    tiny = tuple(draw(st.lists(st.sampled_from((False, False, False, True)), min_size=b, max_size=b)))
    tiny_scale = st.floats(*TINY_LOG_SCALE[dtype][0 if normalize else 1])
    for i in (i for i in range(b) if tiny[i]):
        for k in range(i * m, (i + 1) * m) if normalize else (i,):
            log_scales[k] = draw(tiny_scale)
    temperature_dtype = draw(st.sampled_from(TEMPERATURE_DTYPES))

    def held(value):
        return value if temperature_dtype is None else torch.tensor(value, dtype=temperature_dtype).item()

    return Case(b, m, d, dtype, normalize, patterns, tuple(log_scales), tiny,
                zero_rows=tuple(draw(st.lists(st.integers(0, m - 1), min_size=b, max_size=b))),
                layout=draw(st.sampled_from(LAYOUTS)), expand_dim=draw(st.integers(0, 2)),
                seed=draw(st.integers(0, 2**31 - 1)), tau=held(draw(st.sampled_from((0.05, 0.2, 1.0)))),
                tau_reg=held(draw(st.sampled_from((0.1, 0.5)))), temperature_dtype=temperature_dtype,
                reg_weight=draw(st.sampled_from((1.0, 0.0))))


def values(case: Case) -> torch.Tensor:
    """The embeddings [B, M, D] of a case, rounded to its dtype (contiguous)."""
    g = torch.Generator().manual_seed(case.seed)
    b, m, d = case.b, case.m, case.d
    z = torch.randn(b, m, d, generator=g, dtype=torch.float64)
    for i, pattern in enumerate(case.patterns):
        j, k = torch.randint(m, (2,), generator=g).tolist()
        if pattern == "shared":  # the rows share a direction, as in training
            z[i] += 3 * torch.randn(d, generator=g, dtype=torch.float64)
        elif pattern == "zero_row":
            z[i, j] = 0
        elif pattern == "duplicate":
            z[i, k] = z[i, j]
        elif pattern == "rank1":
            z[i] = z[i, j] * torch.randn(m, 1, generator=g, dtype=torch.float64)
        if case.tiny[i]:
            z[i, case.zero_rows[i]] = 0
    s = 10.0 ** torch.tensor(case.log_scales, dtype=torch.float64)
    z = (z * (s.view(b, m, 1) if case.normalize else s.view(b, 1, 1))).to(case.dtype)
    if case.layout == "expanded":  # one slice repeated along expand_dim
        z = z.narrow(case.expand_dim, 0, 1).expand(b, m, d).contiguous()
    assert torch.isfinite(z).all(), "the example generator must give finite inputs"
    return z


def api_input(case: Case, z: torch.Tensor, requires_grad: bool):
    """(the embeddings in the case's layout holding the numbers of z, a function giving after backward the
    gradient of the leaf: [B, M, D], or summed over expand_dim for the expanded layout)."""
    b, m, d = z.shape
    if case.layout == "tensor":
        leaf = z.clone().requires_grad_(requires_grad)
        return leaf, lambda: leaf.grad
    if case.layout == "list":
        leaves = [z[:, k].clone().requires_grad_(requires_grad) for k in range(m)]
        return leaves, lambda: torch.stack([t.grad for t in leaves], 1)
    if case.layout == "transposed":  # [D, M, B] storage seen as [B, M, D]
        leaf = z.permute(2, 1, 0).contiguous().requires_grad_(requires_grad)
        return leaf.permute(2, 1, 0), lambda: leaf.grad.permute(2, 1, 0)
    if case.layout == "strided":  # every other instance and feature of a bigger tensor, NaN in between

        def grad():
            outside = big.grad.clone()
            outside[::2, :, ::2] = 0
            assert (outside == 0).all(), "gradient outside the strided view"
            return big.grad[::2, :, ::2]

        big = torch.full((2 * b, m, 2 * d), float("nan"), dtype=z.dtype)
        big[::2, :, ::2] = z
        big.requires_grad_(requires_grad)
        return big[::2, :, ::2], grad
    assert case.layout == "expanded"
    leaf = z.narrow(case.expand_dim, 0, 1).clone().requires_grad_(requires_grad)
    return leaf.expand(b, m, d), lambda: leaf.grad


def fold(t: torch.Tensor, case: Case) -> torch.Tensor:
    """A [B, M, D] gradient as the layout's leaf receives it."""
    return t.sum(case.expand_dim, keepdim=True) if case.layout == "expanded" else t


# ----------------------------------------------------------------------------------------------- the oracle


@dataclass
class Reference:
    s: torch.Tensor  # [B, M] the reference's S
    u: torch.Tensor
    lead: torch.Tensor
    parts: dict  # pmrl_loss(output_dict=True, reduction="none")
    grad: torch.Tensor  # dL/dz for upstream w
    svd: torch.Tensor  # [B, M] torch.linalg.svdvals
    gap: torch.Tensor  # [B] (lambda_1 - lambda_2) / lambda_1 (1 where lambda_1 = 0)
    p: torch.Tensor  # [B, M] softmax(S / tau)

    @property
    def zero(self):
        """[B] all-zero instances (S = 0, lead = 0)."""
        return self.svd[:, 0] == 0


def loss_kwargs(case: Case, as_drawn: bool = False) -> dict:
    """pmrl_loss's arguments: the temperatures as numbers (the oracle's), or as_drawn (tensors of the case's
    temperature dtype)."""
    tau, tau_reg = case.tau, case.tau_reg
    if as_drawn and case.temperature_dtype is not None:
        tau, tau_reg = (torch.tensor(t, dtype=case.temperature_dtype) for t in (tau, tau_reg))
    return dict(tau=tau, tau_reg=tau_reg, reg_weight=case.reg_weight, normalize=case.normalize,
                reduction="none", output_dict=True)


def oracle(case: Case, z64: torch.Tensor, w: torch.Tensor) -> Reference:
    x = z64.clone().requires_grad_()
    s, u, lead = gram_svd(x, normalize=case.normalize, backend="reference")
    parts = pmrl_loss(x, backend="reference", **loss_kwargs(case))
    parts["loss"].backward(w)
    s = s.detach()
    lam = s**2
    gap = torch.where(lam[:, 0] > 0, (lam[:, 0] - lam[:, 1]) / lam[:, 0], torch.ones_like(lam[:, 0]))
    return Reference(s, u, lead.detach(), {k: v.detach() for k, v in parts.items()}, x.grad,
                     svdvals64(z64, case.normalize), gap, torch.softmax(s / case.tau, dim=-1))


def row_norms(z64):
    """||z_m|| [B, M, 1] without overflow or underflow."""
    e = torch.frexp(z64.abs().amax(dim=-1, keepdim=True))[1]
    return torch.ldexp(torch.ldexp(z64, -e).norm(dim=-1, keepdim=True), e)


def svdvals64(z64: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Second oracle for S: torch.linalg.svdvals of the stacked float64 matrix, zero-padded to M (rows divided
    by max(||z_m||, NORM_EPS) with normalisation, as F.normalize; powers of two taken out first so that nothing
    over- or underflows)."""
    if normalize:
        zn = torch.where(row_norms(z64) > NORM_EPS, z64 / row_norms(z64), z64 / NORM_EPS)
        e = torch.frexp(zn.abs().amax(dim=(1, 2), keepdim=True))[1]
    else:
        zn = z64
        e = torch.frexp(z64.abs().amax(dim=(1, 2), keepdim=True))[1]
    s = torch.ldexp(torch.linalg.svdvals(torch.ldexp(zn, -e)), e[:, :, 0])
    return F.pad(s, (0, z64.shape[1] - s.shape[1]))


# ----------------------------------------------------------------------------------------------- tolerances

LAMBDA_TOL = 1e-5  # |S_k^2 - S_k,ref^2| / S_1^2 (and U), float32 computation
LEAD_TOL = 2e-6  # |lead - lead_ref| * gap, float32 computation
GRAD_TOL = 1e-4  # dL/dz against its natural scale, float32 computation
FP64_FACTOR = 1e-7  # float64 computation: every tolerance times this
MIN_GAP = 1e-3  # lead is compared where the top gap is at least this
WELL_CONDITIONED_GAP = 5e-2  # dL/dz is compared end to end where every top gap is at least this
NOISE_ZONE = 3e-2  # singular values below this times S_1 carry ~sqrt(eps) S_1 of rounding noise


def scaled(tol, dtype):
    return tol * (FP64_FACTOR if compute_dtype(dtype) == torch.float64 else 1.0)


def check_within(what, case, actual, expected, allowed):
    """|actual - expected| <= allowed elementwise (float64 tensors, allowed broadcastable), actual finite."""
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}; {case}"
    diff = (actual - expected).abs()
    allowed = torch.broadcast_to(torch.as_tensor(allowed, dtype=torch.float64), diff.shape)
    if diff.numel() and (diff > allowed).any():
        i = [int(v) for v in torch.unravel_index((diff - allowed).flatten().argmax(), diff.shape)]
        raise AssertionError(f"{what}: error {diff[tuple(i)].item():.3g} > allowed {allowed[tuple(i)].item():.3g} "
                             f"at {i} (value {actual[tuple(i)].item():.9g}, expected "
                             f"{expected.expand_as(diff)[tuple(i)].item():.9g}); {case}")


def check_spectrum(case, s, ref: Reference):
    tol = scaled(LAMBDA_TOL, case.dtype)
    s = s.double()
    assert (s >= 0).all() and (s[:, :-1] >= s[:, 1:]).all(), f"S must be >= 0 and descending: {s}; {case}"
    if case.d < case.m:
        assert (s[:, case.d:] == 0).all(), f"S past D must be exactly 0: {s}; {case}"
    zero = ref.zero
    assert (s[zero] == 0).all(), f"an all-zero instance has S = 0: {s[zero]}; {case}"
    one = torch.ones((), dtype=torch.float64)
    check_within("reference S_1 vs svdvals", case, ref.s[~zero, 0] / ref.svd[~zero, 0], one, 1e-12)
    check_within("S_1 vs svdvals", case, s[~zero, 0] / ref.svd[~zero, 0], one, tol)
    s1 = ref.s[~zero, :1]
    check_within("S^2 / S_1^2", case, (s[~zero] / s1) ** 2, (ref.s[~zero] / s1) ** 2, tol)


def check_eigenvectors(case, s, u, ref: Reference):
    """U is orthogonal and U diag(S^2) U^T = G, relative to lambda_1 (defined at ties too)."""
    tol = scaled(LAMBDA_TOL, case.dtype)
    keep = ~ref.zero
    u, s = u[keep].double(), s[keep].double() / ref.s[keep, :1]
    check_within("U^T U", case, u.transpose(1, 2) @ u, torch.eye(case.m, dtype=torch.float64), tol)
    s64, u64 = ref.s[keep] / ref.s[keep, :1], ref.u[keep]
    gram = u64 @ torch.diag_embed(s64**2) @ u64.transpose(1, 2)
    check_within("U diag(S^2) U^T / lambda_1", case, u @ torch.diag_embed(s**2) @ u.transpose(1, 2), gram, tol)


def check_lead(case, lead, ref: Reference):
    """lead against the reference where its top gap >= MIN_GAP (below, lead is ill-conditioned: rounding of G
    moves it by ~eps / gap, and an exact tie leaves it undefined, so it is not compared there; it is still a
    unit vector). Returns the allowed error per instance, None when some lead was not compared."""
    lead = lead.double()
    zero = ref.zero
    assert (lead[zero] == 0).all(), f"an all-zero instance has lead = 0: {lead[zero]}; {case}"
    check_within("||lead||", case, lead[~zero].norm(dim=-1), torch.ones((), dtype=torch.float64),
                 scaled(LEAD_TOL, case.dtype))
    rows = (ref.gap >= MIN_GAP) & ~zero
    allowed = torch.zeros_like(ref.gap)
    allowed[rows] = scaled(LEAD_TOL, case.dtype) / ref.gap[rows]
    exact = ref.lead[rows]
    # The canonical sign is deterministic, but where the reference's u_1 sums to almost 0 it is decided by the
    # tie rule or by the rounding of that sum: compare up to sign there.
    ambiguous = ref.u[rows, :, 0].sum(-1).abs() < 1e-2
    flip = ambiguous & ((lead[rows] * exact).sum(-1) < 0)
    check_within("lead", case, lead[rows], torch.where(flip[:, None], -exact, exact), allowed[rows, None])
    return allowed if bool((rows | zero).all()) else None


def check_align(case, align, ref: Reference):
    """align within the interval the S tolerance allows: log1p(sum_k>=2 exp((s_k - s_1) / tau)) grows with each
    s_k, k >= 2, and falls with s_1."""
    tol = scaled(LAMBDA_TOL, case.dtype)
    lam, lam1 = ref.s**2, ref.s[:, :1] ** 2
    lo, hi = (lam - tol * lam1).clamp_min(0).sqrt(), (lam + tol * lam1).sqrt()
    low = terms.alignment(torch.cat([hi[:, :1], lo[:, 1:]], 1), case.tau)
    high = terms.alignment(torch.cat([lo[:, :1], hi[:, 1:]], 1), case.tau)
    info = torch.finfo(compute_dtype(case.dtype))
    slack = 8 * info.eps * high + info.tiny  # rounding; below the smallest normal number values may flush to 0
    align = align.double()
    bad = (align < low - slack) | (align > high + slack) | ~torch.isfinite(align)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise AssertionError(f"align[{i}] = {align[i].item():.9g} outside [{low[i].item():.9g}, "
                             f"{high[i].item():.9g}] (reference {ref.parts['align'][i].item():.9g}); {case}")


def check_reg(case, reg, lead_allowed, ref: Reference):
    """reg where every lead is compared: each logit lead_i . lead_j / tau_reg moves by at most
    (err_i + err_j) / tau_reg, and reg_i = logsumexp_j - logit_ii by at most twice the largest move."""
    reg = reg.double()
    if case.reg_weight == 0:
        assert (reg == 0).all(), f"reg is 0 when reg_weight = 0: {reg}; {case}"
        return
    if lead_allowed is None:
        return
    eps = torch.finfo(compute_dtype(case.dtype)).eps
    allowed = 2 * (lead_allowed + lead_allowed.max()) / case.tau_reg + 8 * eps * (1 + ref.parts["reg"].abs())
    check_within("reg", case, reg, ref.parts["reg"], allowed)


def natural_grad_scale(case, ref: Reference, z64, w):
    """([B, M, 1] the natural scale of dL/dz per row (see the module docstring), [B] that of the instance,
    before the division by the rows' norms)."""
    s1 = ref.s[:, 0]
    align = 2 * ref.p[:, 1:].sum(-1) / case.tau * w.abs()  # 2 (1 - p_1) / tau, without the cancellation
    cond = torch.minimum(1 / ref.gap.clamp_min(1e-300), torch.full_like(ref.gap, 1 / GAP_EPS))
    reg = case.reg_weight * w.abs().sum() / case.tau_reg * torch.where(s1 > 0, 1 / s1, torch.zeros_like(s1))
    instance = align + reg * cond
    scale = instance[:, None, None].expand(case.b, case.m, 1)
    if case.normalize:
        scale = scale / row_norms(z64).clamp_min(NORM_EPS)
    return scale, instance


def well_conditioned(case, ref: Reference, instance_scale, rtol):
    """Whether dL/dz can match the float64 reference end to end, not only through the backward at the
    backend's own forward: every top gap >= WELL_CONDITIONED_GAP (lead's derivative grows as 1/gap, so its
    error from the forward's as eps/gap^2, and the alignment gradient tells u_1 from u_2), and the singular
    values below NOISE_ZONE S_1 (whose rounding noise ~sqrt(eps) S_1 moves p_k and decides the floor
    SIGMA_EPS S_1 of 1/sigma_k) carry a negligible part of the gradient."""
    if not (ref.gap >= WELL_CONDITIONED_GAP).all():
        return False
    k = torch.arange(case.m)
    noisy = (ref.s < NOISE_ZONE * ref.s[:, :1]) & (k > 0) & (k < case.d)
    weight = 2 * (ref.p * noisy).sum(-1) / case.tau
    return bool((weight <= 1e-2 * rtol * instance_scale).all())


def own_state_gradient(case, z64, s, u, lead, w):
    """The float64 reference backward fed the backend's own S, U and lead, with the loss terms' upstream
    gradients taken in float64 at that S and lead."""
    s = s.detach().double().requires_grad_()
    lead = lead.detach().double().requires_grad_()
    loss = terms.alignment(s, case.tau)
    if case.reg_weight:
        loss = loss + case.reg_weight * terms.contrastive(lead, lead, case.tau_reg)
    grad_s, grad_lead = torch.autograd.grad(loss, [s, lead], w, allow_unused=True)
    return reference.gram_eig_backward(list(z64.unbind(1)), s.detach(), u.double(), grad_s, grad_lead,
                                       case.normalize)


def check_grad(what, case, grad, exact, scale, rtol):
    """dL/dz elementwise within rtol times its row's natural scale (summed over the expanded dimension like the
    gradient), and the smallest normal number (below it values may flush to 0)."""
    info = torch.finfo(compute_dtype(case.dtype))
    allowed = fold(rtol * scale.expand(case.b, case.m, case.d), case) + 4 * info.tiny
    grad, exact = grad.double(), fold(exact, case)
    # a true gradient beyond the compute dtype's range (rows far below NORM_EPS: dL/dz ~ 1/||z||) rounds to inf, in
    # the float64 oracle too for float64 input: there only the sign is compared
    out_of_range = (exact.abs() > info.max) & (grad == exact.sign() * float("inf"))
    check_within(what, case, torch.where(out_of_range, 0.0, grad), torch.where(out_of_range, 0.0, exact), allowed)


# ----------------------------------------------------------------------------------------------- the check


def check_case(name, case: Case, with_loss=True):
    z = values(case)
    if case.dtype == torch.bfloat16 and interpreted(name):
        # Triton's interpreter converts bfloat16 subnormals to float32 wrongly (its NumPy emulation; a GPU converts
        # them exactly): they are flushed to zero here, for the oracle too
        z = torch.where(z.abs() < torch.finfo(torch.bfloat16).tiny, torch.zeros_like(z), z)
    z64 = z.double()
    cd = compute_dtype(case.dtype)
    with_grad = with_loss and cd == case.dtype  # gradients for float32 and float64 input
    w = torch.randn(case.b, generator=torch.Generator().manual_seed(case.seed + 1), dtype=torch.float64)
    ref = oracle(case, z64, w)

    x, grad_of = api_input(case, z, with_grad)
    s, u, lead = gram_svd(x, normalize=case.normalize, backend=name)
    assert s.dtype == u.dtype == lead.dtype == cd
    assert (s.shape, u.shape, lead.shape) == ((case.b, case.m), (case.b, case.m, case.m), (case.b, case.d))
    check_spectrum(case, s.detach(), ref)
    check_eigenvectors(case, s.detach(), u, ref)
    lead_allowed = check_lead(case, lead.detach(), ref)
    if not with_loss:
        return

    parts = pmrl_loss(x, backend=name, **loss_kwargs(case, as_drawn=True))
    assert all(v.dtype == cd and v.shape == (case.b,) for v in parts.values())
    check_align(case, parts["align"].detach(), ref)
    check_reg(case, parts["reg"].detach(), lead_allowed, ref)
    eps = torch.finfo(cd).eps
    total = parts["align"].double() + case.reg_weight * parts["reg"].double()
    check_within("loss = align + reg_weight reg", case, parts["loss"].detach().double(), total,
                 4 * eps * total.abs())
    if not with_grad:
        return
    parts["loss"].backward(w.to(cd))
    grad = grad_of()
    assert grad.dtype == case.dtype
    scale, instance_scale = natural_grad_scale(case, ref, z64, w)
    rtol = scaled(GRAD_TOL, case.dtype)
    check_grad("dL/dz vs the float64 reference backward at the backend's own S, U, lead", case, grad,
               own_state_gradient(case, z64, s, u, lead, w), scale, rtol)
    if well_conditioned(case, ref, instance_scale, rtol):
        check_grad("dL/dz vs the float64 reference", case, grad, ref.grad, scale, rtol)


# ----------------------------------------------------------------------------------------------- the tests

COMMON = dict(deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NO_SHRINK = [Phase.explicit, Phase.generate]


@pytest.mark.parametrize("name", COMPILED)
@settings(max_examples=200, **COMMON)
@given(data=st.data())
def test_matches_float64_reference(name, data):
    check_case(name, data.draw(cases(accepted_dtypes(name)), label="case"))


@pytest.mark.parametrize("name", INTERPRETED)
@settings(max_examples=20, phases=NO_SHRINK, **COMMON)
@given(data=st.data())
def test_matches_float64_reference_interpreted(name, data):
    check_case(name, data.draw(cases(accepted_dtypes(name)), label="case"))


@pytest.mark.parametrize("name", COMPILED)
@settings(max_examples=40, **COMMON)
@given(data=st.data())
def test_many_modalities(name, data):
    """M from 7 to 16, the most the kernels take."""
    check_case(name, data.draw(cases(accepted_dtypes(name), m_range=(7, 16)), label="case"))


@pytest.mark.parametrize("name", INTERPRETED)
@settings(max_examples=1, phases=NO_SHRINK, **COMMON)
@given(data=st.data())
def test_many_modalities_interpreted(name, data):
    """One example at M = 16 < D, gram_svd only (the interpreter takes ~10 s for one forward at M = 16)."""
    case = data.draw(cases(accepted_dtypes(name), m_range=(16, 16), d_range=(17, 40)), label="case")
    check_case(name, case, with_loss=False)
