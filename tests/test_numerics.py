"""Deterministic numerical-robustness tests (issue 11): the issue's examples, each run on every CPU backend of the
gram_eig op (pmrl_kernels.backends.implementations("gram_eig", "cpu")) against a closed form or the float64
reference (the reference backend on float64 input), with torch.linalg.svdvals of the float64 matrix as a second
oracle for S where it is cheap.

Tolerances are those of the dtype the maths runs in (float32 for float32/16-bit input, float64 for float64),
relative to each quantity's natural scale: a few eps where the answer is a closed form, 1e-5 (float32) / 1e-12
(float64) for losses and gradients of well-conditioned random instances, 2e-5 relative for the alignment term
near its optimum (float32 resolves sigma_k - sigma_1 to ~eps sigma_1, i.e. the term to ~eps sigma_1 / tau ~ 3e-6
relative; the logsumexp form would be off by ~3e-6 absolute, 0 or 1e-3..30 relative there).

Rows at the ends of the float range (test_top_eigenvalue_above_the_float_range onwards) check the scale rules of
docs/maths.md, "Scale": huge and tiny rows, subnormal rows beside zero rows or Triton's padding rows, and the row
and instance scales that each reach the limit of the float range. Where pmrl_loss is run, every backend it takes
on the CPU is tested (blocked too), as tests/test_conformance.py enumerates them.
"""
import functools
import importlib
import math

import numpy
import pytest
import torch

from conftest import assert_close, correlated, random_embeddings
from test_conformance import backend_params, skip_if_the_loss_is_refused
from pmrl_kernels import PMRLLoss, backends, gram_svd, pmrl_loss, terms
from pmrl_kernels.constants import MIN_TEMPERATURE, NORM_EPS, SIGN_TOL
from pmrl_kernels.inputs import compute_dtype

BACKENDS = list(backends.implementations("gram_eig", "cpu"))

# Triton's interpreter runs the kernels in NumPy, which warns where they form a Gram matrix that over- or
# underflows before rescaling the rows (by design: the rescaled pass is taken only when the raw one failed).
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:underflow encountered:RuntimeWarning")]
every_backend = pytest.mark.parametrize("name", BACKENDS)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
ALL_DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (F32, F64, F16, BF16)]


def interpreted(name):
    """Whether backend `name` runs Triton kernels, which on CPU means Triton's interpreter (slow at large M)."""
    module = importlib.import_module(backends.REGISTRY[name].ops["gram_eig"])
    return getattr(module, "triton", None) is not None


def skip_if_refused(name, z):
    """Skip (naming the reason) when backend `name` does not take this input (Triton and float64)."""
    zs = list(z.unbind(1)) if isinstance(z, torch.Tensor) else z
    reason = backends.unsupported_reason("gram_eig", name, (zs,))
    if reason is not None:
        pytest.skip(f"{name} refuses this input: {reason}")


def eps(dtype):
    """The machine epsilon of the dtype the maths runs in."""
    return torch.finfo(compute_dtype(dtype)).eps


def rel_tol(dtype):
    """Losses and gradients of well-conditioned instances, relative to their natural scale."""
    return 1e-12 if compute_dtype(dtype) == F64 else 1e-5


def loss_and_grad(z, name, **kwargs):
    """(pmrl_loss parts per instance, dL/dz of their sum) of backend `name`."""
    x = z.detach().clone().requires_grad_()
    parts = pmrl_loss(x, backend=name, output_dict=True, reduction="none", **kwargs)
    parts["loss"].sum().backward()
    return {k: v.detach() for k, v in parts.items()}, x.grad


def reference64(z, **kwargs):
    """The float64 reference on the same numbers."""
    return loss_and_grad(z.double(), "reference", **kwargs)


# ----------------------------------------------------------------------------------------------- the issue's examples

# Z = [[1, 0], [0.6, 0.8]]: G = Z Z^T = [[1, .6], [.6, 1]], sigma^2 = 1.6 and 0.4; lead = (2, 1) / sqrt 5.
EXAMPLE = [[1.0, 0.0], [0.6, 0.8]]
EXAMPLE_S = [math.sqrt(1.6), math.sqrt(0.4)]
EXAMPLE_LEAD = [2 / math.sqrt(5), 1 / math.sqrt(5)]
EXAMPLE_SCALES = ([pytest.param(F32, s, id=f"float32-{s:g}") for s in (1e14, 1e-12, 1e-16, 1e30, 1e-30)]
                  + [pytest.param(F64, s, id=f"float64-{s:g}") for s in (1e150, 1e-150, 1e300, 1e-300)])


@pytest.mark.parametrize("dtype, scale", EXAMPLE_SCALES)
@every_backend
def test_issue_example_at_any_scale(name, dtype, scale):
    """gram_svd(Z * scale, normalize=False): S / scale and lead are those of Z, to the dtype's precision."""
    z = (torch.tensor([EXAMPLE], dtype=F64) * scale).to(dtype)
    skip_if_refused(name, z)
    s, u, lead = gram_svd(z, normalize=False, backend=name)
    tol = 4 * eps(dtype)
    assert_close(s.double() / scale, torch.tensor([EXAMPLE_S], dtype=F64), 0, tol, "S / scale")
    assert_close(s.double() / scale, torch.linalg.svdvals(z.double() / scale), 0, tol, "S / scale vs svdvals")
    assert_close(lead, torch.tensor([EXAMPLE_LEAD], dtype=F64), tol, 0, "lead")


ROW_SCALES = [pytest.param(F32, s, id=f"float32-{s:g}") for s in (1e19, 1e30, 3e37)] + [
    pytest.param(F64, 1e300, id="float64-1e+300")]


@pytest.mark.parametrize("dtype, scale", ROW_SCALES)
@every_backend
def test_one_row_scaled_up(name, dtype, scale):
    """normalize=True makes the loss invariant to each row's scale: with row (1, 2) times `scale`, loss, S and
    lead are those of the unscaled input, and that row's gradient is the unscaled one divided by `scale`."""
    base = correlated(4, 3, 16, seed=3, dtype=dtype)
    z = base.clone()
    z[1, 2] *= scale
    assert torch.isfinite(z).all()
    skip_if_refused(name, z)
    parts, grad = loss_and_grad(z, name)
    exact_parts, exact_grad = reference64(base)
    tol = rel_tol(dtype)
    for part in ("loss", "align", "reg"):
        assert_close(parts[part], exact_parts[part], tol, tol, part)
    s, _, lead = gram_svd(z, backend=name)
    s64, _, lead64 = gram_svd(base.double(), backend="reference")
    assert_close(s, s64, tol, tol, "S")
    assert_close(lead, lead64, tol, 0, "lead")
    grad = grad.double()
    grad[1, 2] *= scale
    # that row's gradient (~1e-3 / scale) may be subnormal: its resolution, the smallest subnormal, times scale
    resolution = torch.finfo(dtype).tiny * torch.finfo(dtype).eps * scale
    assert_close(grad, exact_grad, tol * exact_grad.abs().max().item() + 4 * resolution, 0,
                 "dL/dz (row (1, 2) times scale)")


@pytest.mark.parametrize("k", [-30, -20, -10, 10, 20, 30])
@every_backend
def test_whole_instance_scaled(name, k):
    """normalize=False, float32 input times 10^k: S / 10^k, lead, every loss part and dL/dz against the float64
    reference on the same numbers (and S against svdvals)."""
    scale = 10.0**k
    z = (correlated(3, 3, 8, seed=5, dtype=F64) * scale).float()
    skip_if_refused(name, z)
    tol = rel_tol(F32)
    s, _, lead = gram_svd(z, normalize=False, backend=name)
    s64, _, lead64 = gram_svd(z.double(), normalize=False, backend="reference")
    assert_close(s.double() / scale, s64 / scale, tol, tol, "S / scale")
    assert_close(s.double() / scale, torch.linalg.svdvals(z.double() / scale), tol, tol, "S / scale vs svdvals")
    assert_close(lead, lead64, tol, 0, "lead")
    parts, grad = loss_and_grad(z, name, normalize=False)
    exact_parts, exact_grad = reference64(z, normalize=False)
    for part in ("loss", "align", "reg"):
        assert_close(parts[part], exact_parts[part], tol, tol, part)
    assert_close(grad, exact_grad, tol * exact_grad.abs().max().item(), 0, "dL/dz")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@every_backend
def test_zero_row_gets_zero_gradient(name, dtype, normalize):
    """An all-zero row gets an exactly zero gradient; everything stays finite."""
    z = torch.randn(4, 4, 8, generator=torch.Generator().manual_seed(17))
    z[1, 1] = 0
    z = z.to(dtype)
    skip_if_refused(name, z)
    parts, grad = loss_and_grad(z, name, normalize=normalize)
    assert all(torch.isfinite(v).all() for v in parts.values())
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    assert (grad[1, 1] == 0).all(), grad[1, 1]
    assert (grad.flatten(2).abs().sum(-1) > 0).sum() == 15, "every other row gets a gradient"


# ------------------------------------------------------------------------------------------ alignment near its optimum

TAU = 0.05
ALIGN_TARGETS = (1e-7, 1e-6, 1e-5, 1e-4)
ALIGN_TOL = 2e-5


def rows_at(m, d, t, seed):
    """M rows around a common direction, spread by t (the alignment term grows with t), rows of norm 1..2."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1, d, generator=g, dtype=F64)
    spread = torch.randn(m, d, generator=g, dtype=F64)
    return (base + t * spread) * torch.linspace(1.0, 2.0, m, dtype=F64)[:, None]


@functools.lru_cache(maxsize=None)
def near_optimum(m, dtype=F32):
    """[4, m, 16] instances whose alignment term (tau = 0.05, float64) is ~1e-7, 1e-6, 1e-5, 1e-4, rounded to
    dtype: t found by bisection on the float64 reference."""

    def align(t, seed):
        return pmrl_loss(rows_at(m, 16, t, seed)[None], tau=TAU, reg_weight=0.0, reduction="none",
                         backend="reference").item()

    instances = []
    for i, target in enumerate(ALIGN_TARGETS):
        lo, hi = 1e-6, 10.0
        for _ in range(80):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if align(mid, seed=10 * m + i) < target else (lo, mid)
        instances.append(rows_at(m, 16, math.sqrt(lo * hi), seed=10 * m + i))
    return torch.stack(instances).to(dtype)


@pytest.mark.parametrize("m", [2, 3, 4])
@every_backend
def test_alignment_keeps_relative_precision_near_the_optimum(name, m):
    """align ~1e-7..1e-4 in float32: relative error < 2e-5 against float64, for the value, for dalign/dsigma_1
    (gram_svd + terms.alignment) and for dL/dz (reg_weight = 0; relative to each instance's largest entry)."""
    z = near_optimum(m)
    skip_if_refused(name, z)
    exact_parts, exact_grad = reference64(z, tau=TAU, reg_weight=0.0)
    exact = exact_parts["align"]
    assert ((exact > 0.5 * torch.tensor(ALIGN_TARGETS, dtype=F64))
            & (exact < 2 * torch.tensor(ALIGN_TARGETS, dtype=F64))).all(), exact
    parts, grad = loss_and_grad(z, name, tau=TAU, reg_weight=0.0)
    assert_close(parts["align"], exact, 0, ALIGN_TOL, "align")

    s = gram_svd(z, backend=name).S.detach().requires_grad_()
    terms.alignment(s, TAU).sum().backward()
    s64 = gram_svd(z.double(), backend="reference").S.detach().requires_grad_()
    terms.alignment(s64, TAU).sum().backward()
    assert_close(s.grad[:, 0], s64.grad[:, 0], 0, ALIGN_TOL, "dalign/dsigma_1")

    scale = exact_grad.abs().amax(dim=(1, 2), keepdim=True)
    assert_close(grad / scale, exact_grad / scale, ALIGN_TOL, 0, "dL/dz / its largest entry per instance")


# ----------------------------------------------------------------------------------------------- temperatures


@pytest.mark.parametrize("arg", ["tau", "tau_reg"])
def test_temperature_below_the_minimum_is_refused(arg):
    """A ValueError naming the argument, at the call and at PMRLLoss construction; the bound is a float32
    comparison, so the float32 just below MIN_TEMPERATURE is the largest value refused among these."""
    z = torch.randn(3, 2, 4)
    below = float(numpy.nextafter(numpy.float32(MIN_TEMPERATURE), numpy.float32(0)))
    for value in (1e-300, below, 0.0, -1.0):
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            pmrl_loss(z, **{arg: value})
        with pytest.raises(ValueError, match=rf"\b{arg}\b"):
            PMRLLoss(**{arg: value})


def at_minimum_temperature():
    """Three instances of rows sharing a direction (their leads within ~1e-5 of each other: reg ~ log 3 at
    tau_reg = 1e-4) and three of nearly orthonormal rows (sigma_k within ~1e-5 of each other: align ~ 1 at
    tau = 1e-4)."""
    g = torch.Generator().manual_seed(5)
    q = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=F64))[0][:3]
    shared = 3 * q[:1] + q + 3e-5 * torch.randn(3, 3, 8, generator=g, dtype=F64)
    tied = q + 1e-5 * torch.randn(3, 3, 8, generator=g, dtype=F64)
    return torch.cat([shared, tied])


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")])
@every_backend
def test_minimum_temperature_is_finite(name, dtype):
    """tau = tau_reg = MIN_TEMPERATURE: finite loss and gradients, both terms far from 0, and the loss close to
    float64 (logits of ~1/MIN_TEMPERATURE = 1e4 carry ~1e4 eps of rounding)."""
    z = at_minimum_temperature().to(dtype)
    skip_if_refused(name, z)
    kwargs = dict(tau=MIN_TEMPERATURE, tau_reg=MIN_TEMPERATURE)
    parts, grad = loss_and_grad(z, name, **kwargs)
    assert all(torch.isfinite(v).all() for v in parts.values()) and torch.isfinite(grad).all()
    assert (parts["reg"][:3] > 0.5).all() and (parts["align"][3:] > 0.5).all(), parts
    exact_parts, _ = reference64(z, **kwargs)
    assert_close(parts["loss"], exact_parts["loss"], 8 * eps(dtype) / MIN_TEMPERATURE, 0, "loss")


# ----------------------------------------------------------------------------------------------- D < M and exact ties


@pytest.mark.parametrize("shape", [(3, 5, 3), (2, 4, 1), (2, 16, 5)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@every_backend
def test_singular_values_past_d_are_exact_zeros(name, dtype, normalize, shape):
    """D < M: S[:, D:] is exactly 0 and the first D match svdvals; at D = 1, the loss and its gradient are
    finite."""
    b, m, d = shape
    if m > 8 and interpreted(name):
        pytest.skip("Triton's interpreter takes ~20 s for M = 16 (test_properties runs one such case)")
    z = random_embeddings(b, m, d, dtype, seed=23)
    skip_if_refused(name, z)
    s = gram_svd(z, normalize=normalize, backend=name).S
    assert (s[:, d:] == 0).all(), s
    zn = torch.nn.functional.normalize(z.double(), dim=-1, eps=NORM_EPS) if normalize else z.double()
    svd = torch.linalg.svdvals(zn)
    tol = 1e-10 if dtype == F64 else 1e-5
    assert_close(s[:, :d], svd, tol * svd[:, :1].max().item(), 0, "S[:, :D] vs svdvals")
    if d == 1:
        parts, grad = loss_and_grad(z, name, normalize=normalize)
        assert all(torch.isfinite(v).all() for v in parts.values()) and torch.isfinite(grad).all()


TIE_SCALES = {F32: (1.0, 2.5, 1e-10, 1e25), BF16: (1.0, 2.5, 1e-10, 1e25), F64: (1.0, 2.5, 1e-100, 1e160),
              F16: (1.0, 2.5, 1e-2, 2e2)}


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@every_backend
def test_exact_tie(name, dtype, normalize):
    """G = I up to a scale c (instances c eye(3, 4), c from 1e-10 to 1e25 in float32): S is exact (c, or with
    normalisation c / max(c, NORM_EPS)) in every backend; lead is not unique there, but must be a unit vector of
    the tied top eigenspace, the span of the rows (its 4th component exactly 0), with the canonical sign
    (lead . sum_m zn_m >= -SIGN_TOL, the tie-break band of terms.canonical_sign). The loss and its gradient
    stay finite."""
    scales = torch.tensor(TIE_SCALES[dtype], dtype=F64).to(dtype).double()  # c as rounded to dtype
    z = (scales[:, None, None] * torch.eye(3, 4, dtype=F64)).to(dtype)
    skip_if_refused(name, z)
    s, _, lead = gram_svd(z, normalize=normalize, backend=name)
    expected = (scales / scales.clamp_min(NORM_EPS) if normalize else scales)[:, None].expand(-1, 3)
    assert_close(s, expected, 0, 4 * eps(dtype), "S")
    lead = lead.double()
    assert (lead[:, 3] == 0).all(), f"lead leaves the span of the rows: {lead}"
    assert_close(lead.norm(dim=-1), torch.ones(len(scales), dtype=F64), 4 * eps(dtype), 0, "||lead||")
    assert (lead[:, :3].sum(-1) >= -SIGN_TOL).all(), f"canonical sign: {lead}"
    parts, grad = loss_and_grad(z, name, normalize=normalize)
    assert all(torch.isfinite(v).all() for v in parts.values()) and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")])
@every_backend
def test_rotated_tie(name, dtype):
    """Orthonormal rows in a random orientation (G = I up to the rounding of the rows): lead is a unit vector
    in the span of the rows, up to rounding."""
    q = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(2), dtype=F64))[0]
    z = torch.stack([q[:3], q[3:6]]).to(dtype)
    skip_if_refused(name, z)
    s, _, lead = gram_svd(z, backend=name)
    tol = 16 * eps(dtype)
    assert_close(s, torch.ones(2, 3, dtype=F64), tol, 0, "S")
    rows = z.double()
    coefficients = torch.linalg.solve(rows @ rows.transpose(1, 2), rows @ lead.double()[:, :, None])
    inside = (rows.transpose(1, 2) @ coefficients)[:, :, 0]  # the projection of lead on the span of the rows
    assert_close(lead, inside, tol, 0, "lead vs its projection on the span of the rows")
    assert_close(lead.double().norm(dim=-1), torch.ones(2, dtype=F64), tol, 0, "||lead||")


# ----------------------------------------------------------------------------------------------- input gaps


@every_backend
def test_numpy_scalars_are_accepted(name):
    """NumPy floats and ints for the numbers, numpy.bool_ for the flags: the same results as Python's."""
    z = correlated(5, 3, 8, seed=4)
    tau, tau_reg = numpy.float32(0.05), numpy.float64(0.2)
    expected = pmrl_loss(z, tau=float(tau), tau_reg=0.2, reg_weight=2.0, normalize=False, backend=name)
    got = pmrl_loss(z, tau=tau, tau_reg=tau_reg, reg_weight=numpy.int64(2), normalize=numpy.bool_(False),
                    backend=name, output_dict=numpy.bool_(False))
    assert torch.equal(got, expected)
    module = PMRLLoss(tau=tau, tau_reg=tau_reg, reg_weight=numpy.float32(2.0), normalize=numpy.bool_(False),
                      backend=name)
    assert torch.equal(module(z), expected)
    for a, b in zip(gram_svd(z, normalize=numpy.bool_(False), backend=name), gram_svd(z, normalize=False,
                                                                                       backend=name)):
        assert torch.equal(a, b)


def test_unknown_backend_fails_at_construction():
    with pytest.raises(ValueError, match="backend"):
        PMRLLoss(backend="nope")


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state:UserWarning")
def test_sparse_input_is_refused():
    """A TypeError that names the layout, for a sparse [B, M, D] tensor and for a list of sparse [B, D]."""
    z = torch.randn(3, 2, 4)
    for embeddings in (z.to_sparse(), [t.to_sparse_csr() for t in z.unbind(1)], [t.to_sparse() for t in
                                                                                 z.unbind(1)]):
        for call in (lambda e: pmrl_loss(e), lambda e: gram_svd(e), lambda e: PMRLLoss()(e)):
            with pytest.raises(TypeError, match="layout"):
                call(embeddings)


# ----------------------------------------------------------------------------------------------- NaN


def poisoned(dtype):
    z = correlated(6, 3, 8, seed=3, dtype=dtype)
    bad = z.clone()
    bad[2, 1, 3] = float("nan")
    return z, bad


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")])
@every_backend
def test_nan_stays_in_its_instance_without_reg(name, dtype):
    """reg_weight = 0, reduction="none": a NaN makes its own instance's loss and gradient NaN and leaves the
    others bit for bit as in a run without that instance."""
    z, bad = poisoned(dtype)
    skip_if_refused(name, z)
    parts, grad = loss_and_grad(bad, name, reg_weight=0.0)
    others = [0, 1, 3, 4, 5]
    clean_parts, clean_grad = loss_and_grad(z[others], name, reg_weight=0.0)
    assert parts["loss"][2].isnan() and grad[2].isnan().all()
    assert torch.equal(parts["loss"][others], clean_parts["loss"])
    assert torch.equal(grad[others], clean_grad)


@pytest.mark.parametrize("dtype", [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")])
@every_backend
def test_nan_reaches_every_instance_through_reg(name, dtype):
    """With the default reg_weight = 1 a NaN instance makes every instance's loss and every gradient NaN: the
    contrastive softmax of each row runs over every lead, the NaN one included. gram_svd itself still keeps the
    NaN in its instance."""
    z, bad = poisoned(dtype)
    skip_if_refused(name, z)
    parts, grad = loss_and_grad(bad, name)
    assert parts["loss"].isnan().all() and parts["reg"].isnan().all()
    assert grad.isnan().all()
    s, u, lead = gram_svd(bad, backend=name)
    others = [0, 1, 3, 4, 5]
    assert s[2].isnan().all() and lead[2].isnan().all()
    assert torch.isfinite(s[others]).all() and torch.isfinite(lead[others]).all()


# ----------------------------------------------------------------------------------------------- defects found


@pytest.mark.parametrize("dtype, big", [pytest.param(F32, 1.5e19, id="float32"),
                                        pytest.param(F64, 1.2e154, id="float64")])
@every_backend
def test_top_eigenvalue_above_the_float_range(name, dtype, big):
    """normalize=False, rows whose squared norms are finite while sigma_1^2 is not (here sigma_1 ~ 1.41 big,
    sigma_1^2 above the dtype's largest number): S, lead and the loss are still finite and right."""
    z = torch.tensor([[[big, 0.0], [big, big / 15]]], dtype=F64).to(dtype)
    limit = torch.finfo(dtype).max
    assert ((z.double() ** 2).sum(-1) < limit).all() and torch.linalg.svdvals(z.double())[0, 0] ** 2 > limit
    skip_if_refused(name, z)
    s, _, lead = gram_svd(z, normalize=False, backend=name)
    tol = 4 * eps(dtype)
    svd = torch.linalg.svdvals(z.double() / big) * big
    # S comes from the Gram matrix: its squares are good to a few eps of S_1^2 (README, Limits)
    assert_close((s.double() / big) ** 2, (svd / big) ** 2, tol * (svd[0, 0].item() / big) ** 2, 0,
                 "S^2 vs svdvals^2 (relative to S_1^2)")
    assert_close(lead, gram_svd(z.double(), normalize=False, backend="reference").lead, tol, 0, "lead")
    parts, grad = loss_and_grad(z, name, normalize=False)
    assert torch.isfinite(parts["loss"]).all() and torch.isfinite(grad).all()


TINY_SCALES = ([pytest.param(F32, s, id=f"float32-{s:g}") for s in (1e-14, 1e-20, 1e-25, 1e-30, 1e-35)]
               + [pytest.param(F64, s, id=f"float64-{s:g}") for s in (1e-100, 1e-160, 1e-200, 1e-300)])


@pytest.mark.parametrize("dtype, scale", TINY_SCALES)
@every_backend
def test_rows_shorter_than_norm_eps_at_any_scale(name, dtype, scale):
    """normalize=True divides a row shorter than NORM_EPS by NORM_EPS (as F.normalize): for the issue's example
    (unit rows) times `scale` < NORM_EPS, S = scale / NORM_EPS times the example's S, and lead is the example's
    unit lead, whatever the scale (F.normalize's definition; S stays within the dtype's normal range here)."""
    z = (torch.tensor([EXAMPLE], dtype=F64) * scale).to(dtype)
    skip_if_refused(name, z)
    s, _, lead = gram_svd(z, normalize=True, backend=name)
    tol = 4 * eps(dtype)
    assert_close(s.double() * (NORM_EPS / scale), torch.tensor([EXAMPLE_S], dtype=F64), 0, tol,
                 "S * NORM_EPS / scale")
    assert_close(lead, torch.tensor([EXAMPLE_LEAD], dtype=F64), tol, 0, "lead")


@pytest.mark.parametrize("dtype, tiny", [pytest.param(F32, 1e-20, id="float32"), pytest.param(F64, 1e-155,
                                                                                          id="float64")])
@every_backend
def test_gradient_of_an_instance_of_tiny_rows(name, dtype, tiny):
    """normalize=True, an instance whose only nonzero row is far below NORM_EPS (a missing modality next to a
    vanishing one), in a batch of ordinary instances: dL/dz is finite and matches the float64 reference
    (relative to each instance's largest entry)."""
    z = torch.tensor([[[1.0, 0.5], [0.3, -1.0]], [[0.5, 1.0], [2.0, 0.1]], [[tiny, 0.0], [0.0, 0.0]]],
                     dtype=F64).to(dtype)
    skip_if_refused(name, z)
    _, grad = loss_and_grad(z, name)
    _, exact = reference64(z)
    assert torch.isfinite(grad).all(), grad
    scale = exact.abs().amax(dim=(1, 2), keepdim=True)
    assert_close(grad / scale, exact / scale, 10 * rel_tol(dtype), 0, "dL/dz / its largest entry per instance")


# 1e18 and 1e153: the rows' squares stay finite (the kernels take them raw); 1e36 and 1e305: they overflow (the
# kernels scale the rows by powers of two first).
GRADIENT_SCALES = [pytest.param(F32, 1e18, True, id="float32-1e18"),
                   pytest.param(F32, 1e36, False, id="float32-1e36"),
                   pytest.param(F64, 1e153, True, id="float64-1e153"),
                   pytest.param(F64, 1e305, False, id="float64-1e305")]


@pytest.mark.parametrize("dtype, scale, check_scaled_row", GRADIENT_SCALES)
@every_backend
def test_gradient_scale_invariance_near_the_optimum(name, dtype, scale, check_scaled_row):
    """normalize=True, align ~1e-7..1e-4 (small upstream gradients), row 0 of every instance times `scale`: dL/dz
    is the unscaled input's gradient, row 0 divided by `scale`, to the precision of
    test_alignment_keeps_relative_precision_near_the_optimum. Row 0 itself is left out where its gradient
    (~1e-6 / scale) is below the dtype's normal range."""
    base = near_optimum(3, dtype)
    z = base.clone()
    z[:, 0] *= scale
    skip_if_refused(name, z)
    _, grad = loss_and_grad(z, name, tau=TAU, reg_weight=0.0)
    _, exact = reference64(base, tau=TAU, reg_weight=0.0)
    grad = grad.double()
    grad[:, 0] *= scale
    rows = slice(None) if check_scaled_row else slice(1, None)
    scale_i = exact.abs().amax(dim=(1, 2), keepdim=True)
    tol = ALIGN_TOL if dtype == F32 else rel_tol(F64)
    assert_close(grad[:, rows] / scale_i, exact[:, rows] / scale_i, tol, 0, "dL/dz / its largest entry")


@every_backend
def test_loss_as_accurate_as_torch_in_float32(name):
    """The issue's accuracy case (B=12, M=5, D=1000, float32): every backend's align and reg within twice the
    error of the reference computing in float32 (FlashAttention's rule) plus one logit's rounding."""
    for seed in range(3):
        z = random_embeddings(12, 5, 1000, dtype=torch.float32, seed=seed)
        skip_if_refused(name, z)
        exact = pmrl_loss(z.double(), backend="reference", output_dict=True)
        torch32 = pmrl_loss(z, backend="reference", output_dict=True)
        out = pmrl_loss(z, backend=name, output_dict=True)
        for part in ("align", "reg"):
            err = (out[part].double() - exact[part]).abs().item()
            # plus float32's rounding of one logit (|logit| <= 1 / tau_reg): the floor of any float32 CE
            allowed = 2 * (torch32[part].double() - exact[part]).abs().item() + torch.finfo(torch.float32).eps / 0.1
            assert err <= allowed, (part, seed, err, allowed)


# ------------------------------------------------------------------------------------------------- subnormal rows

# Every backend pmrl_loss takes on the CPU, blocked included (its gram_eig is the compiled one).
LOSS_BACKENDS = [p for p in backend_params() if p.values[1] == "cpu"]
every_loss_backend = pytest.mark.parametrize("name, device", LOSS_BACKENDS)


def subnormal_beside_zero(b, m, d, dtype, scale, seed):
    """[b, m, d]: instance 0 ordinary, the others of rows times `scale` (subnormal in dtype) with row 0 zero."""
    z = torch.randn(b, m, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    z[1:] *= scale
    z[1:, 0] = 0
    return z.to(dtype)


@pytest.mark.parametrize("m", [2, 3, 5])
@every_loss_backend
def test_subnormal_rows_beside_a_zero_row(name, device, m):
    """normalize=True, float32 rows of ~1e-40 beside a zero row: the instance scale that brings Zn = Z / NORM_EPS
    near 1 is >= 2^89, and times 1 / NORM_EPS it overflows for the zero row (0 * inf = NaN unless the row's scale
    is capped). The loss matches the float64 reference on the same numbers; with reg_weight = 0 (lead's gradient
    ~1 / ||z|| is beyond float32 there) so does dL/dz, and the zero rows' gradient is exactly 0."""
    z = subnormal_beside_zero(3, m, 8, F32, 1e-40, seed=m)
    skip_if_the_loss_is_refused(name, z)
    parts, _ = loss_and_grad(z, name)
    exact_parts, _ = reference64(z)
    for part in ("loss", "align", "reg"):
        assert_close(parts[part], exact_parts[part], 1e-5, 1e-5, part)
    _, grad = loss_and_grad(z, name, reg_weight=0.0)
    _, exact = reference64(z, reg_weight=0.0)
    assert torch.isfinite(grad).all(), grad
    assert (grad[1:, 0] == 0).all(), grad[1:, 0]
    scale = exact.abs().amax(dim=(1, 2), keepdim=True)
    assert_close(grad / scale, exact / scale, 1e-4, 0, "dL/dz / its largest entry per instance")


@pytest.mark.parametrize("m", [2, 3, 6])
@pytest.mark.parametrize("normalize", [True, False])
@every_backend
def test_subnormal_float64_rows_beside_a_zero_row(name, normalize, m):
    """float64 rows of ~1e-310 (subnormal) beside a zero row, the same overflow in float64. S and lead match
    torch.linalg.svdvals / the reference of the same rows scaled exactly by 2^1000 (S scales by 2^-1000, and by
    1 / NORM_EPS with normalisation, where every nonzero row is below NORM_EPS)."""
    z = torch.randn(2, m, 8, generator=torch.Generator().manual_seed(m), dtype=F64) * 1e-310
    z[:, 0] = 0
    skip_if_refused(name, z)
    s, _, lead = gram_svd(z, normalize=normalize, backend=name)
    big = torch.ldexp(z, torch.tensor(1000))
    s_big = torch.linalg.svdvals(big)
    s_big = torch.cat([s_big, torch.zeros(2, m - s_big.shape[1], dtype=F64)], 1)
    expected = torch.ldexp(s_big, torch.tensor(-1000)) / (NORM_EPS if normalize else 1.0)
    assert_close(s / expected[:, :1], expected / expected[:, :1], 1e-12, 0, "S / S_1")
    _, _, lead_big = gram_svd(big, normalize=False, backend="reference")
    assert_close(lead, lead_big, 1e-12, 0, "lead")


@pytest.mark.parametrize("m", [3, 5, 6, 7])
@every_backend
def test_all_subnormal_rows_when_m_is_not_a_power_of_two(name, m):
    """float32 instances whose every row is ~1e-42: Triton pads M to a power of two with zero rows, which meet
    the zero row's overflow. S, lead and dL/dz (reg_weight = 0) match the float64 reference."""
    z = (torch.randn(2, m, 8, generator=torch.Generator().manual_seed(m), dtype=F64) * 1e-42).to(F32)
    skip_if_refused(name, z)
    s, _, lead = gram_svd(z, backend=name)
    s64, _, lead64 = gram_svd(z.double(), backend="reference")
    assert_close(s / s64[:, :1], s64 / s64[:, :1], 1e-5, 0, "S / S_1")
    assert_close(lead, lead64, 1e-4, 0, "lead")
    _, grad = loss_and_grad(z, name, reg_weight=0.0)
    _, exact = reference64(z, reg_weight=0.0)
    scale = exact.abs().amax(dim=(1, 2), keepdim=True)
    assert torch.isfinite(grad).all(), grad
    assert_close(grad / scale, exact / scale, 1e-4, 0, "dL/dz / its largest entry per instance")


@pytest.mark.parametrize("scale", [1e-39, 1e-41])
@every_loss_backend
def test_gradient_without_normalisation_of_subnormal_rows(name, device, scale):
    """normalize=False, float32 rows of ~1e-39 and 1e-41: the common row scale r and the instance scale c are
    each up to 2^126, so their product overflows float32 (a NaN gradient where the true one is ~2) unless each
    applies in turn. Loss and dL/dz match the float64 reference on the same numbers. (S, a float32 output, is
    itself subnormal here and carries ~14 bits at 1e-41; the backward starts from it.)"""
    z = (torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(3), dtype=F64) * scale).to(F32)
    skip_if_the_loss_is_refused(name, z)
    parts, grad = loss_and_grad(z, name, normalize=False, reg_weight=0.0)
    exact_parts, exact = reference64(z, normalize=False, reg_weight=0.0)
    assert torch.isfinite(grad).all(), grad
    assert_close(parts["loss"], exact_parts["loss"], 1e-4, 1e-4, "loss")
    top = exact.abs().amax(dim=(1, 2), keepdim=True)
    assert_close(grad / top, exact / top, 1e-3, 0, "dL/dz / its largest entry per instance")
