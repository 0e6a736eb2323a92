"""The reference is the oracle: pin it to hand-derived values and to an independent float64 computation of the
published recipe (autograd through torch.linalg.svd, no custom backward)."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close, degenerate_cases, random_embeddings
from pmrl_kernels import constants, gram_svd, pmrl_loss, reference, terms
from pmrl_kernels.baselines import official_recipe_loss

F64 = torch.float64


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("theta", [0.3, 1.0, math.pi / 2, 2.5])
def test_two_modalities_singular_values(theta):
    # two unit vectors at angle theta: G = [[1, c], [c, 1]], sigma = sqrt(1 +- cos theta)
    z = torch.tensor([[[1.0, 0.0, 0.0], [math.cos(theta), math.sin(theta), 0.0]]], dtype=F64)
    out = gram_svd(z * torch.tensor([[[2.0], [0.5]]], dtype=F64), backend="reference")  # scale is normalised away
    c = math.cos(theta)
    expected = torch.tensor([[math.sqrt(1 + abs(c)), math.sqrt(1 - abs(c))]], dtype=F64)
    assert_close(out.S, expected, 1e-12, 1e-12, "S")
    if abs(c) < 1e-9:
        return  # a tie: lead is not defined
    # the leading direction bisects the two rows (or their difference when they point apart)
    bisector = unit(z[0, 0] + math.copysign(1.0, c) * z[0, 1])
    assert_close(out.lead[0].abs(), bisector.abs(), 1e-12, 1e-12, "lead")
    assert (out.lead[0] * z[0].sum(0)).sum() >= -1e-12  # exactly 0 when the rows point apart (a tie)


@pytest.mark.parametrize("m", [2, 3, 5])
def test_rank1_optimum_closed_form(m):
    direction = unit(torch.randn(4, 1, 7, dtype=F64))
    z = direction * torch.rand(4, m, 1, dtype=F64).add(0.1)  # every modality the same direction
    tau = 0.05
    out = pmrl_loss(z, tau=tau, reg_weight=0.0, reduction="none", backend="reference")
    s1 = math.sqrt(m)
    # logsumexp([sqrt(M), 0, ..., 0] / tau) - sqrt(M) / tau
    expected = math.log1p((m - 1) * math.exp(-s1 / tau))
    assert_close(out, torch.full((4,), expected, dtype=F64), 1e-12, 1e-9, "align at rank-1 optimum")
    svd = gram_svd(z, backend="reference")
    assert_close(svd.S[:, 0], torch.full((4,), s1, dtype=F64), 1e-12, 1e-12, "sigma_1")
    assert_close(svd.S[:, 1:], torch.zeros(4, m - 1, dtype=F64), 1e-7, 0, "sigma_2..M")
    assert_close(svd.lead, direction[:, 0], 1e-12, 1e-12, "lead = the common direction")


def test_orthonormal_rows():
    z = torch.eye(6, dtype=F64)[:4].expand(3, 4, 6)
    out = gram_svd(z, backend="reference")
    assert_close(out.S, torch.ones(3, 4, dtype=F64), 1e-12, 1e-12, "S")
    align = pmrl_loss(z, reg_weight=0.0, reduction="none", backend="reference")
    assert_close(align, torch.full((3,), math.log(4), dtype=F64), 1e-12, 1e-12, "align = log M")


def test_contrastive_hand_value():
    # two instances with orthogonal leads: logits diag 1/tau_reg, off-diagonal 0
    z = torch.tensor([[[1.0, 0.0], [1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]]], dtype=F64)
    tau_reg = 0.1
    out = pmrl_loss(z, tau_reg=tau_reg, output_dict=True, reduction="none", backend="reference")
    expected = math.log1p(math.exp(-1 / tau_reg))
    assert_close(out["reg"], torch.full((2,), expected, dtype=F64), 1e-12, 1e-12, "reg")


def test_d_less_than_m_zero_padded():
    z = random_embeddings(5, 6, 2)
    out = gram_svd(z, backend="reference")
    assert out.S.shape == (5, 6)
    assert_close(out.S[:, 2:], torch.zeros(5, 4, dtype=F64), 1e-7, 0, "padding")
    assert_close(out.S[:, :2], torch.linalg.svdvals(F.normalize(z, dim=-1)), 1e-12, 1e-12, "S")


@pytest.mark.parametrize("b,m,d", [(1, 2, 1), (7, 3, 13), (16, 4, 64), (5, 16, 33), (9, 5, 5)])
def test_gram_svd_matches_torch_svd(b, m, d):
    z = random_embeddings(b, m, d, seed=b * 100 + m)
    zn = F.normalize(z, dim=-1)
    out = gram_svd(z, backend="reference")
    k = min(m, d)
    assert_close(out.S[:, :k], torch.linalg.svdvals(zn), 1e-10, 1e-10, "S")
    lam, vec = torch.linalg.eigh(zn @ zn.transpose(1, 2))
    assert_close(out.U @ torch.diag_embed(out.S**2) @ out.U.transpose(1, 2), zn @ zn.transpose(1, 2), 1e-10, 0, "U S^2 U^T = G")
    assert_close(out.U.transpose(1, 2) @ out.U, torch.eye(m, dtype=F64).expand(b, m, m), 1e-10, 0, "U orthogonal")
    u_svd = torch.linalg.svd(zn.transpose(1, 2), full_matrices=False).U[:, :, 0]
    assert_close(out.lead.abs(), u_svd.abs(), 1e-9, 1e-9, "lead = top left singular vector up to sign")
    assert ((out.lead * zn.sum(1)).sum(-1) >= 0).all(), "canonical sign"
    assert (out.U.sum(1) >= 0).all(), "every U column sums to >= 0"


@pytest.mark.parametrize("b,m,d", [(6, 2, 5), (9, 3, 17), (16, 4, 64), (5, 7, 9)])
@pytest.mark.parametrize("tau,tau_reg,reg_weight", [(0.05, 0.1, 1.0), (0.01, 0.2, 0.5)])
def test_loss_matches_published_recipe(b, m, d, tau, tau_reg, reg_weight):
    z = random_embeddings(b, m, d, seed=d)
    z_ref = z.clone().requires_grad_()
    z_pub = z.clone().requires_grad_()
    ours = pmrl_loss(z_ref, tau=tau, tau_reg=tau_reg, reg_weight=reg_weight, backend="reference")
    published = official_recipe_loss(z_pub, tau, tau_reg, reg_weight, canonical=True)
    assert_close(ours, published, 1e-12, 1e-12, "loss")
    (3.0 * ours).backward()
    (3.0 * published).backward()
    # the relative floors (SIGMA_EPS, GAP_EPS) move the gradient by O(eps^2 / gap^2) at most
    assert_close(z_ref.grad, z_pub.grad, 1e-6, 1e-5, "grad")


def test_published_recipe_sign_is_arbitrary_until_made_canonical():
    # the same instance with one modality's sign flipped several times: LAPACK's lead sign is not tied to
    # the data's orientation, ours is; with canonical=True the two losses agree exactly
    z = random_embeddings(32, 3, 8, seed=3)
    ours = pmrl_loss(z, backend="reference")
    assert_close(official_recipe_loss(z, canonical=True), ours, 1e-12, 1e-12, "canonical")


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("m,d", [(2, 3), (3, 6), (4, 5)])
def test_gradcheck_gram_eig(normalize, m, d):
    zs = [t.requires_grad_() for t in random_embeddings(4, m, d, seed=m + d).unbind(1)]

    def f(*zs):
        s, _, lead = reference.gram_eig(list(zs), normalize)
        return s, lead

    assert torch.autograd.gradcheck(f, zs)


def test_gradcheck_loss():
    z = random_embeddings(5, 3, 6, seed=11).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: pmrl_loss(z, tau=0.2, tau_reg=0.3, backend="reference"), (z,))


@pytest.mark.parametrize("floors", ["exact", "default"])
def test_gradient_matches_svd_autograd_through_both_terms(floors, monkeypatch):
    # an independent derivation: autograd through torch.linalg.svd, sign fixed by the data. With the floors
    # off the hand-written backward must be exact; with them on it may move by (floor / sigma_k)^2 relative.
    if floors == "exact":
        monkeypatch.setattr(reference, "SIGMA_EPS", 0.0)
        monkeypatch.setattr(reference, "GAP_EPS", 0.0)
    z = random_embeddings(8, 4, 12, seed=5)
    zs = z.clone().requires_grad_()
    s, _, lead = reference.gram_eig(list(zs.unbind(1)), True)
    gs, gl = torch.randn_like(s), torch.randn_like(lead)
    ((s * gs).sum() + (lead * gl).sum()).backward()
    z2 = z.clone().requires_grad_()
    zn = F.normalize(z2, dim=-1)
    u, s2, _ = torch.linalg.svd(zn.transpose(1, 2), full_matrices=False)
    lead2 = u[:, :, 0] * torch.where((u[:, :, 0] * zn.sum(1)).sum(-1, keepdim=True) >= 0, 1.0, -1.0)
    ((s2 * gs).sum() + (lead2 * gl).sum()).backward()
    tol = 1e-10 if floors == "exact" else 1e-5
    assert_close(zs.grad, z2.grad, tol, tol, "grad")


@pytest.mark.parametrize("name,z", list(degenerate_cases().items()))
def test_degenerate_inputs_give_finite_values_and_gradients(name, z):
    z = z.clone().requires_grad_()
    out = pmrl_loss(z, output_dict=True, backend="reference")
    out["loss"].backward()
    assert torch.isfinite(out["loss"]), name
    assert torch.isfinite(z.grad).all(), f"{name}: non-finite gradient"
    # the gradient stays of the size of the loss's own scale (1 / tau), not blown up by 1/gap or 1/sigma
    assert z.grad.abs().max() < 1e4, f"{name}: gradient {z.grad.abs().max():.3g}"
    svd = gram_svd(z.detach(), backend="reference")
    zn = F.normalize(z.detach(), dim=-1)
    k = min(z.shape[1], z.shape[2])
    assert_close(svd.S[:, :k], torch.linalg.svdvals(zn), 1e-7, 1e-7, f"{name}: S")


@pytest.mark.parametrize("name,z", [(k, v) for k, v in degenerate_cases().items() if v.shape[2] >= v.shape[1]])
def test_degenerate_loss_values_match_published_recipe(name, z):
    assert_close(
        pmrl_loss(z, backend="reference"), official_recipe_loss(z, canonical=True), 1e-9, 1e-9, name
    )


@pytest.mark.parametrize("name", ["zero_row", "orthonormal_tie"])
def test_svd_autograd_fails_where_the_reference_does_not(name):
    # why the reference has its own backward: plain SVD autograd is NaN on these inputs
    z = degenerate_cases()[name].requires_grad_()
    official_recipe_loss(z, canonical=True).backward()
    assert not torch.isfinite(z.grad).all()


def test_zero_row_gets_zero_gradient():
    z = degenerate_cases()["zero_row"].clone().requires_grad_()
    pmrl_loss(z, backend="reference").backward()
    assert_close(z.grad[:, 0], torch.zeros_like(z.grad[:, 0]), 1e-12, 0, "grad of the zero modality")


def test_all_zero_instance_is_finite():
    z = random_embeddings(4, 3, 5)
    z[1] = 0
    z.requires_grad_()
    out = gram_svd(z, backend="reference")
    assert_close(out.lead[1], torch.zeros(5, dtype=F64), 0, 0, "lead of an all-zero instance")
    pmrl_loss(z, backend="reference").backward()
    assert torch.isfinite(z.grad).all()


def test_nan_stays_in_its_instance():
    z = random_embeddings(5, 3, 8)
    z[2, 1, 3] = float("nan")
    z.requires_grad_()
    out = gram_svd(z, backend="reference")
    assert torch.isnan(out.S[2]).all() and torch.isnan(out.lead[2]).all()
    finite = [0, 1, 3, 4]
    assert torch.isfinite(out.S[finite]).all() and torch.isfinite(out.lead[finite]).all()
    clean = gram_svd(z.detach()[finite], backend="reference")
    assert_close(out.S[finite], clean.S, 1e-12, 1e-12, "other instances unchanged")
    loss = pmrl_loss(z, reg_weight=0.0, reduction="none", backend="reference")
    assert torch.isnan(loss[2]) and torch.isfinite(loss[finite]).all()
    loss[finite].sum().backward()
    assert torch.isfinite(z.grad[finite]).all()


def test_near_tie_gradient_is_bounded():
    # G = I exactly: lead is undefined; the regularised gap keeps its gradient at most 1 / (2 GAP_EPS lambda_1)
    z = degenerate_cases()["orthonormal_tie"].clone().requires_grad_()
    s, _, lead = reference.gram_eig(list(z.unbind(1)), True)
    lead.sum().backward()
    bound = 1 / (2 * constants.GAP_EPS) * z.shape[1] * math.sqrt(z.shape[2])
    assert torch.isfinite(z.grad).all() and z.grad.abs().max() < bound


def test_canonical_sign_rule_on_hand_made_columns():
    # The rule of canonical_sign, applied by hand: the sign that makes the column sum >= 0; a sum within SIGN_TOL
    # of 0 is a tie, decided by the sign of the first entry with |u_m| > SIGN_TOL.
    tol = constants.SIGN_TOL
    a = math.sqrt(0.5)
    cases = [  # (column, expected sign)
        ([0.6, 0.8, 0.0], 1.0),
        ([0.6, -0.8, 0.0], -1.0),  # sum -0.2: no tie
        ([a, -a, 0.0], 1.0),  # exact tie: the first entry is positive
        ([-a, a, 0.0], -1.0),  # exact tie: the first entry is negative
        ([-a, a + tol / 4, 0.0], -1.0),  # sum +tol/4 is still a tie: the first entry decides, not the sum's sign
        ([a, -a - tol / 4, 0.0], 1.0),  # sum -tol/4: a tie again
        ([tol / 2, -a, a], -1.0),  # the first entry is below SIGN_TOL: the second one decides
        ([-tol / 2, a, -a], 1.0),
        ([0.0, 0.0, -a], -1.0),  # the sum is not a tie: its sign
    ]
    u = torch.tensor([c for c, _ in cases], dtype=F64).T[None]  # [1, 3, K]: one column per case
    expected = torch.tensor([[[s for _, s in cases]]], dtype=F64)
    assert torch.equal(terms.canonical_sign(u), expected)
    assert torch.equal(terms.canonical_sign(u.float()), expected.float())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sign_tie_of_rows_pointing_apart_follows_the_first_modality(dtype):
    # M = 2 with z_2 pointing away from z_1: G = [[1, c], [c, 1]] with c < 0, u_1 = +-(1, -1)/sqrt 2 sums to 0 up to
    # rounding, so the tie rule picks u_11 > 0, i.e. lead . zn_1 = sigma_1 u_11 > 0, whatever the rounding.
    z = random_embeddings(64, 2, 9, seed=21)
    z[:, 1] = -z[:, 0] + 0.3 * z[:, 1]
    out = gram_svd(z.to(dtype), backend="reference")
    assert (out.U[:, :, 0].sum(-1).abs() < constants.SIGN_TOL).all(), "the test needs sign ties"
    zn = F.normalize(z.to(dtype), dim=-1)
    assert ((out.lead * zn[:, 0]).sum(-1) > 0).all()
    assert (out.U[:, 0, 0] > 0).all()


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_singular_floors_are_relative_to_the_scale_of_the_rows(scale):
    # normalize=False: S is homogeneous of degree 1 in z and lead of degree 0, so for L = gs . S the gradient does not
    # change when z is scaled by c, and for L = gl . lead it is divided by c. The regularised 1/sigma_k and
    # 1/(lambda_1 - lambda_k) keep that only because both floors are relative (SIGMA_EPS sigma_1, GAP_EPS lambda_1).
    # The input makes both floors matter: sigma_3 = 3e-4 sigma_1 and lambda_1 - lambda_2 = 5e-5 lambda_1.
    b, m, d = 4, 3, 8
    g = torch.Generator().manual_seed(41)
    q = torch.linalg.qr(torch.randn(d, m, generator=g, dtype=F64))[0].T  # m orthonormal directions in R^d
    rot = torch.linalg.qr(torch.randn(b, m, m, generator=g, dtype=F64))[0]  # per-instance rotation of the rows
    norms = torch.tensor([1.0, math.sqrt(1 - 5e-5), 3e-4], dtype=F64)
    z = rot @ (norms[:, None] * q)  # G = rot diag(norms^2) rot^T
    grad_s = torch.randn(b, m, generator=g, dtype=F64)
    grad_lead = torch.randn(b, d, generator=g, dtype=F64)

    def grads(x):
        xs = [t.clone().requires_grad_() for t in x.unbind(1)]
        s, _, lead = reference.gram_eig(xs, False)
        via_s = torch.stack(torch.autograd.grad(s, xs, grad_s, retain_graph=True), 1)
        via_lead = torch.stack(torch.autograd.grad(lead, xs, grad_lead), 1)
        return s, via_s, via_lead

    s, via_s, via_lead = grads(z)
    lam = s * s
    assert (s[:, 2] < constants.SIGMA_EPS * s[:, 0]).all(), "the sigma floor must matter"
    assert (lam[:, 0] - lam[:, 1] < constants.GAP_EPS * lam[:, 0]).all(), "the gap floor must matter"
    assert (gram_svd(z, normalize=False, backend="reference").U[:, :, 0].sum(-1).abs() > 1e-2).all(), "sign defined"
    s_c, via_s_c, via_lead_c = grads(scale * z)
    assert_close(s_c, scale * s, 0, 1e-7, "S scales with the rows")
    assert_close(via_s_c, via_s, 1e-7 * via_s.abs().max().item(), 1e-7, "gradient through S is scale-free")
    assert_close(scale * via_lead_c, via_lead, 1e-7 * via_lead.abs().max().item(), 1e-7, "gradient through lead ~ 1/c")
