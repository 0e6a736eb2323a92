"""Temperatures as tensors (issue 14): tau and tau_reg may be 0-d tensors, e.g. an nn.Parameter, with their
gradients computed in every backend; PMRLLoss(learn_tau_reg=True) learns tau_reg as open_clip learns its
logit_scale. Gradients are checked against float64 autograd of the reference backend by the accuracy rule of
conftest.assert_fa_close (the Triton kernels run in its interpreter without a GPU).
"""
import math

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import assert_close, assert_fa_close, correlated, fa_atol, random_embeddings
from test_conformance import skip_if_the_loss_is_refused
from pmrl_kernels import PMRLLoss, backends, pmrl_loss, terms
from pmrl_kernels.constants import MIN_TEMPERATURE

CPU_BACKENDS = backends.available_backends("cpu")
# the published temperatures, and small ones: the authors' pretraining tau and open_clip's bound on tau_reg,
# where the contrastive softmax saturates
TEMPERATURES = {"published": (0.05, 0.1), "small": (0.01, 0.01)}


def _temps(tau, tau_reg, dtype):
    return [torch.tensor(t, dtype=dtype, requires_grad=True) for t in (tau, tau_reg)]


def loss_and_grads(z, backend, tau, tau_reg, dtype, weights):
    """(loss [B], d z, d tau, d tau_reg) of the per-instance loss reduced by fixed weights, so that every
    instance's upstream gradient differs."""
    zz = z.to(dtype).requires_grad_()
    temps = _temps(tau, tau_reg, dtype)
    loss = pmrl_loss(zz, tau=temps[0], tau_reg=temps[1], reduction="none", backend=backend)
    return (loss, *torch.autograd.grad((loss * weights.to(dtype)).sum(), [zz, *temps]))


@pytest.mark.parametrize("case", TEMPERATURES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_gradients_match_float64_autograd(backend, case):
    """float32 input in every CPU backend (the cpp backend's contrastive term is the reference one) against the
    reference backend in float64, with the reference in float32 as the rule's baseline."""
    z = correlated(24, 3, 32, seed=3, dtype=torch.float64)
    weights = torch.rand(24, generator=torch.Generator().manual_seed(4), dtype=torch.float64) + 0.5
    tau, tau_reg = TEMPERATURES[case]
    exact = loss_and_grads(z, "reference", tau, tau_reg, torch.float64, weights)
    baseline = loss_and_grads(z, "reference", tau, tau_reg, torch.float32, weights)
    actual = loss_and_grads(z, backend, tau, tau_reg, torch.float32, weights)
    for name, a, b, e in zip(("loss", "d z", "d tau", "d tau_reg"), actual, baseline, exact):
        assert a.dtype == torch.float32, name
        assert_fa_close(a, e, b, name, fa_atol(torch.float32))


def _contrastive_grads(fn, rows, cols, tau_reg, offset, dtype, weights):
    r = rows.to(dtype).requires_grad_()
    c = r if cols is None else cols.to(dtype).requires_grad_()
    t = torch.tensor(tau_reg, dtype=dtype, requires_grad=True)
    loss = fn(r, c, t, offset)
    inputs = [r, t] if cols is None else [r, c, t]
    return (loss, *torch.autograd.grad((loss * weights.to(dtype)).sum(), inputs))


@pytest.mark.parametrize("same", [True, False], ids=["rows are columns", "gathered columns"])
@pytest.mark.parametrize("tau_reg", [0.1, 0.01])
@pytest.mark.parametrize("name", list(backends.implementations("contrastive", "cpu")))
def test_contrastive_op_gradient_in_tau_reg(name, tau_reg, same):
    """Every contrastive op, on one tensor (Triton's symmetric launch) and on gathered columns with an offset
    (its two-launch backward): d tau_reg with d rows and d cols against float64 autograd."""
    g = torch.Generator().manual_seed(5)
    rows = F.normalize(torch.randn(20, 24, generator=g, dtype=torch.float64), dim=-1)
    cols = None if same else F.normalize(torch.randn(45, 24, generator=g, dtype=torch.float64), dim=-1)
    offset = 0 if same else 17
    weights = torch.rand(20, generator=g, dtype=torch.float64) + 0.5
    fn = backends.implementations("contrastive", "cpu")[name]
    exact = _contrastive_grads(terms.contrastive, rows, cols, tau_reg, offset, torch.float64, weights)
    baseline = _contrastive_grads(terms.contrastive, rows, cols, tau_reg, offset, torch.float32, weights)
    actual = _contrastive_grads(fn, rows, cols, tau_reg, offset, torch.float32, weights)
    names = ("loss", "d rows", "d tau_reg") if same else ("loss", "d rows", "d cols", "d tau_reg")
    for what, a, b, e in zip(names, actual, baseline, exact):
        assert_fa_close(a, e, b, what, fa_atol(torch.float32))


def test_gradcheck_reference_in_the_temperatures():
    z = correlated(10, 3, 12, seed=8, dtype=torch.float64)
    temps = _temps(0.05, 0.1, torch.float64)
    assert torch.autograd.gradcheck(
        lambda tau, tau_reg: pmrl_loss(z, tau=tau, tau_reg=tau_reg, reduction="none", backend="reference"), temps
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_tensor_gives_the_loss_of_its_number(backend):
    """Same loss as the float temperature (to rounding), in the embeddings' dtype whatever the tensor's."""
    z = correlated(16, 3, 20, seed=9)
    expected = pmrl_loss(z, tau=0.05, tau_reg=0.1, output_dict=True, backend=backend)
    for dtype in (torch.float32, torch.float64):
        got = pmrl_loss(z, tau=torch.tensor(0.05, dtype=dtype), tau_reg=torch.tensor(0.1, dtype=dtype),
                        output_dict=True, backend=backend)
        for key in expected:
            assert got[key].dtype == torch.float32
            assert_close(got[key], expected[key], 1e-6, 1e-6, key)


# ----------------------------------------------------------------------------------------------- the formulas


def test_alignment_gradient_in_tau():
    """docs/maths.md, "Temperature gradients": d align / d tau = -(1/tau) sum_k sigma_k d align / d sigma_k
    = (1/tau^2) sum_{k>=2} p_k (sigma_1 - sigma_k) >= 0: lowering tau always lowers the alignment term."""
    g = torch.Generator().manual_seed(10)
    s = torch.rand(50, 4, generator=g, dtype=torch.float64).sort(dim=-1, descending=True).values.requires_grad_()
    for tau_value in (0.01, 0.05, 1.0):
        tau = torch.tensor(tau_value, dtype=torch.float64, requires_grad=True)
        align = terms.alignment(s, tau)
        per_instance = [torch.autograd.grad(align[i], [s, tau], retain_graph=True) for i in range(len(align))]
        d_s = torch.stack([d[0][i] for i, d in enumerate(per_instance)])
        d_tau = torch.stack([d[1] for d in per_instance])
        assert_close(d_tau, -(s * d_s).sum(-1) / tau, 1e-13, 1e-12, "sigma . grad form")
        p = torch.softmax(s / tau, dim=-1).detach()
        assert_close(d_tau, (p[:, 1:] * (s[:, :1] - s[:, 1:])).sum(-1) / tau**2, 1e-13, 1e-12, "p form")
        assert (d_tau >= 0).all()


def test_contrastive_gradient_in_tau_reg():
    """docs/maths.md: dL/dtau_reg = -(1/tau_reg) sum_i g_i (sum_j P_ij s_ij - s_i,t(i))
    = -(1/tau_reg) sum_i rows_i . dL/drows_i, with columns apart from rows (gathered, offset 5)."""
    g = torch.Generator().manual_seed(11)
    rows = torch.randn(7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    cols = torch.randn(15, 6, generator=g, dtype=torch.float64)
    weights = torch.rand(7, generator=g, dtype=torch.float64)
    tau_reg = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    d_rows, d_tau = torch.autograd.grad((terms.contrastive(rows, cols, tau_reg, 5) * weights).sum(), [rows, tau_reg])
    logits = (rows @ cols.T / tau_reg).detach()
    p = torch.softmax(logits, dim=-1)
    target = logits[torch.arange(7), torch.arange(5, 12)]
    assert_close(d_tau, -(weights * ((p * logits).sum(-1) - target)).sum() / tau_reg, 1e-13, 1e-12, "P s form")
    assert_close(d_tau, -(rows * d_rows).sum() / tau_reg, 1e-13, 1e-12, "rows . d rows form")


# ----------------------------------------------------------------------------------------------- checks


Z = random_embeddings(6, 3, 8, dtype=torch.float32)

BAD_TENSORS = [
    (torch.tensor([0.1]), ValueError, "must be a number or a 0-d tensor, got a tensor of shape \\(1,\\)"),
    (torch.full((2, 2), 0.1), ValueError, "must be a number or a 0-d tensor"),
    (torch.tensor(1), TypeError, "must be a floating tensor"),
    (torch.tensor(True), TypeError, "must be a floating tensor"),
    (torch.tensor(0.1 + 0j), TypeError, "must be a floating tensor"),
    (torch.tensor(-0.1), ValueError, "must be finite and > 0"),
    (torch.tensor(math.nan), ValueError, "must be finite and > 0"),
    (torch.tensor(math.inf), ValueError, "must be finite and > 0"),
    (torch.tensor(MIN_TEMPERATURE / 2), ValueError, f"must be >= {MIN_TEMPERATURE}"),
    (torch.tensor(0.1, device="meta"), ValueError, "must be on the embeddings' device cpu"),
]


@pytest.mark.parametrize("name", ["tau", "tau_reg"])
@pytest.mark.parametrize("bad,error,message", BAD_TENSORS)
def test_bad_tensor_temperatures(name, bad, error, message):
    with pytest.raises(error, match=f"{name} {message}"):
        pmrl_loss(Z, **{name: bad})
    with pytest.raises(error, match=f"{name} {message}"):  # its form at construction, device and value per call
        PMRLLoss(**{name: bad})(Z)


def test_a_tensor_computed_from_a_parameter():
    """pmrl_loss takes it (computed per call, it gets its gradient); PMRLLoss, which keeps it across calls,
    refuses it and takes the parameter itself, reading its value at every call."""
    logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
    pmrl_loss(Z, tau_reg=1 / logit_scale.exp()).backward()
    assert logit_scale.grad is not None and logit_scale.grad != 0
    with pytest.raises(ValueError, match="tau_reg must be a number or a leaf tensor"):
        PMRLLoss(tau_reg=1 / logit_scale.exp())
    tau = nn.Parameter(torch.tensor(0.05))
    loss_fn = PMRLLoss(tau=tau)
    assert list(loss_fn.parameters()) == []  # kept by reference: its owner trains it
    loss_fn(Z).backward()
    assert tau.grad is not None and tau.grad != 0
    with torch.no_grad():
        tau.fill_(-1.0)
    with pytest.raises(ValueError, match="tau must be finite and > 0, got -1.0"):
        loss_fn(Z)


def test_torch_compile_fullgraph_with_tensor_temperatures():
    """Traced without a graph break, with the eager gradients; the value is not read there, so not checked."""
    z = random_embeddings(16, 3, 24, dtype=torch.float32)
    compiled = torch.compile(lambda z, tau, tau_reg: pmrl_loss(z, tau=tau, tau_reg=tau_reg), fullgraph=True,
                             backend="aot_eager")
    temps_c, temps_e = _temps(0.05, 0.1, torch.float32), _temps(0.05, 0.1, torch.float32)
    lc, le = compiled(z, *temps_c), pmrl_loss(z, tau=temps_e[0], tau_reg=temps_e[1])
    assert_close(lc, le, 1e-6, 1e-6, "loss")
    for c, e in zip(torch.autograd.grad(lc, temps_c), torch.autograd.grad(le, temps_e)):
        assert_close(c, e, 1e-6, 1e-5, "d temperature")
    compiled(z, torch.tensor(0.05), torch.tensor(-0.1))  # no check under torch.compile


# ----------------------------------------------------------------------------------------------- learned tau_reg


def test_learned_tau_reg_is_off_by_default():
    loss_fn = PMRLLoss()
    assert loss_fn.logit_scale is None and loss_fn.learned_tau_reg() is None
    assert list(loss_fn.parameters()) == [] and not loss_fn.state_dict()


def test_learned_tau_reg_is_open_clips_logit_scale():
    """logit_scale = log(1 / tau_reg) at construction; tau_reg = exp(-logit_scale), so
    d logit_scale = -tau_reg d tau_reg; the module's loss is that of the same tau_reg given as a tensor."""
    loss_fn = PMRLLoss(learn_tau_reg=True).double()
    assert [name for name, _ in loss_fn.named_parameters()] == ["logit_scale"]
    assert "logit_scale" in loss_fn.state_dict() and "learn_tau_reg=True" in repr(loss_fn)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(10.0))
    assert loss_fn.learned_tau_reg().item() == pytest.approx(0.1)
    z = correlated(12, 3, 16, seed=12, dtype=torch.float64)
    loss = loss_fn(z)
    loss.backward()
    tau_reg = loss_fn.learned_tau_reg().detach().requires_grad_()
    expected = pmrl_loss(z, tau_reg=tau_reg)
    (d_tau_reg,) = torch.autograd.grad(expected, tau_reg)
    assert_close(loss, expected, 0, 0, "loss")
    assert_close(loss_fn.logit_scale.grad, -tau_reg * d_tau_reg, 1e-14, 1e-12, "d logit_scale")


def test_learned_tau_reg_is_clamped_at_a_scale_of_100():
    loss_fn = PMRLLoss(learn_tau_reg=True).double()
    with torch.no_grad():
        loss_fn.logit_scale.fill_(math.log(1000.0))
    assert loss_fn.learned_tau_reg().item() == pytest.approx(0.01)
    z = correlated(12, 3, 16, seed=13, dtype=torch.float64)
    loss = loss_fn(z)
    loss.backward()
    assert_close(loss, pmrl_loss(z, tau_reg=0.01), 1e-12, 1e-12, "loss at the bound")
    assert loss_fn.logit_scale.grad == 0  # above the bound, as with any clamp


def test_learned_tau_reg_under_torch_compile():
    z = random_embeddings(16, 3, 24, dtype=torch.float32)
    eager, compiled = PMRLLoss(learn_tau_reg=True), PMRLLoss(learn_tau_reg=True)
    le, lc = eager(z), torch.compile(compiled, fullgraph=True, backend="aot_eager")(z)
    le.backward()
    lc.backward()
    assert_close(lc, le, 1e-6, 1e-6, "loss")
    assert_close(compiled.logit_scale.grad, eager.logit_scale.grad, 1e-6, 1e-5, "d logit_scale")


def test_learned_tau_reg_follows_the_module_device():
    loss_fn = PMRLLoss(learn_tau_reg=True).to("meta")
    with pytest.raises(ValueError, match="tau_reg must be on the embeddings' device cpu, got a tensor on meta"):
        loss_fn(Z)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"tau_reg": torch.tensor(0.1)}, TypeError, "tau_reg is the initial value: a number"),
    ({"tau_reg": 0.005}, ValueError, "tau_reg \\(the initial value\\) must be >= 0.01"),
    ({"learn_tau_reg": 1}, TypeError, "learn_tau_reg must be a bool"),
    ({"reg_weight": 0.0}, ValueError, "learn_tau_reg=True needs reg_weight > 0"),
])
def test_bad_learned_tau_reg(kwargs, error, message):
    with pytest.raises(error, match=message):
        PMRLLoss(**{"learn_tau_reg": True, **kwargs})


# ----------------------------------------------------------------------------------------------- temperature dtypes

HALF_TEMPERATURES = [pytest.param(torch.bfloat16, id="bfloat16"), pytest.param(torch.float16, id="float16")]


@pytest.mark.parametrize("which", ["tau", "tau_reg"])
@pytest.mark.parametrize("tdtype", HALF_TEMPERATURES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_half_precision_temperature_is_its_value(backend, tdtype, which):
    """A bfloat16/float16 temperature tensor is cast to the compute dtype before any arithmetic: the loss, dL/dz
    and the temperature's gradient are those of the float64 reference at the value the tensor holds (at
    tau_reg = bfloat16(0.13) here, rsqrt in bfloat16 would move the loss by 0.5% and d tau_reg by up to 4%), with
    the float32 reference at that value as the accuracy rule's baseline; the gradient comes back in the tensor's
    own dtype."""
    z = torch.randn(64, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.rand(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5
    held = torch.tensor(0.13, dtype=tdtype)

    def run(backend, dtype, t_dtype):
        zz = z.to(dtype).requires_grad_()
        t = held.to(t_dtype).requires_grad_()
        loss = pmrl_loss(zz, reduction="none", backend=backend, **{which: t})
        return (loss, *torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), [zz, t]))

    exact = run("reference", torch.float64, torch.float64)
    baseline = run("reference", torch.float32, torch.float32)
    actual = run(backend, torch.float32, tdtype)
    assert actual[2].dtype == tdtype
    for name, a, b, e in zip(("loss", "d z", f"d {which}"), actual, baseline, exact):
        # the temperature's gradient is rounded to its 16-bit dtype on the way back
        atol = fa_atol(torch.float32) + (abs(e.item()) * torch.finfo(tdtype).eps if a.dim() == 0 else 0.0)
        assert_fa_close(a.double(), e, b.double(), name, atol)


@pytest.mark.parametrize("which", ["tau", "tau_reg"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_float32_temperature_with_float64_input_is_its_value(backend, which):
    """float64 input with a float32 temperature tensor: the maths runs in float64 at the float32 value exactly
    (a float32 rsqrt would move the loss by ~7e-8)."""
    z = correlated(16, 3, 20, seed=9, dtype=torch.float64)
    t32 = torch.tensor(0.13, dtype=torch.float32)
    skip_if_the_loss_is_refused(backend, z)
    got = pmrl_loss(z, reduction="none", backend=backend, **{which: t32})
    expected = pmrl_loss(z, reduction="none", backend="reference", **{which: t32.double()})
    assert got.dtype == torch.float64
    assert_close(got, expected, 1e-13, 1e-13, "loss")


def test_the_minimum_temperature_is_a_float32_comparison():
    """A value that rounds to float32(MIN_TEMPERATURE) or above is accepted, a number or a tensor of any dtype
    (torch.tensor(1e-4) holds 9.99999975e-05); the float32 below it, and the float64s that round below it, are
    refused with a message saying so. The boundary is found from numpy's float32 rounding."""
    f32 = numpy.float32(MIN_TEMPERATURE)
    below = numpy.nextafter(f32, numpy.float32(0))
    midpoint = (float(f32) + float(below)) / 2
    accepted = [MIN_TEMPERATURE, float(f32), torch.tensor(MIN_TEMPERATURE), math.nextafter(midpoint, 1.0),
                torch.tensor(float(f32), dtype=torch.float64), torch.tensor(MIN_TEMPERATURE, dtype=torch.float16),
                torch.tensor(MIN_TEMPERATURE, dtype=torch.bfloat16)]
    refused = [float(below), torch.tensor(float(below)), math.nextafter(midpoint, 0.0)]
    (accepted if numpy.float32(midpoint) == f32 else refused).append(midpoint)
    for name in ("tau", "tau_reg"):
        for value in accepted:
            assert torch.isfinite(pmrl_loss(Z, **{name: value})), (name, value)
        for value in refused:
            with pytest.raises(ValueError, match=f"{name} must be >= {MIN_TEMPERATURE} when rounded to float32"):
                pmrl_loss(Z, **{name: value})
