"""The public API behaves as documented: input forms, reductions, dtypes, backends and every error."""
import dataclasses
import math

import pytest
import torch
import torch.distributed as dist

import pmrl_kernels
from conftest import assert_close, random_embeddings
from pmrl_kernels import PMRLLoss, backends, gram_svd, pmrl_loss, reference
from pmrl_kernels.config import DEFAULTS, PMRLConfig
from test_conformance import every_backend, skip_if_the_loss_is_refused


def test_public_names():
    assert set(pmrl_kernels.__all__) >= {"pmrl_loss", "PMRLLoss", "gram_svd", "GramSVD", "available_backends"}
    assert "reference" in pmrl_kernels.available_backends()


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_list_input_equals_tensor_input(backend):
    z = random_embeddings(9, 3, 11)
    zt = z.clone().requires_grad_()
    zl = [t.clone().requires_grad_() for t in z.unbind(1)]
    lt = pmrl_loss(zt, backend=backend)
    ll = pmrl_loss(zl, backend=backend)
    assert_close(lt, ll, 0, 0, "loss")
    (2.0 * lt).backward()
    (2.0 * ll).backward()
    for m in range(3):
        assert_close(zt.grad[:, m], zl[m].grad, 0, 0, f"grad of modality {m}")
    a, b = gram_svd(z, backend=backend), gram_svd(list(z.unbind(1)), backend=backend)
    for x, y, name in zip(a, b, a._fields):
        assert_close(x, y, 0, 0, name)


@every_backend
def test_positional_modalities(name, device):
    """pmrl_loss(text, video, audio), PMRLLoss()(text, video, audio) and gram_svd(text, video, audio) equal the
    [B, M, D] and list forms, gradients included, with every option by keyword."""
    z = random_embeddings(7, 3, 12, dtype=torch.float32, device=device)
    skip_if_the_loss_is_refused(name, z)
    options = dict(tau=0.1, reduction="sum", backend=name)
    results = []
    for form in ("tensor", "list", "positional"):
        x = z.clone().requires_grad_()
        views = list(x.unbind(1))
        args = {"tensor": (x,), "list": (views,), "positional": tuple(views)}[form]
        loss = pmrl_loss(*args, **options)
        module = PMRLLoss(tau=0.1, reduction="sum", backend=name)(*args, output_dict=True)
        (dz,) = torch.autograd.grad(loss + module["loss"], x)
        results.append((loss, module["loss"], dz, *gram_svd(*args, backend=name)))
    for other in results[1:]:
        for a, b, what in zip(results[0], other, ("loss", "module", "dz", "S", "U", "lead")):
            assert torch.equal(a, b), what


WRONG_CALLS = [
    (lambda: pmrl_loss(), TypeError, r"pmrl_loss needs the embeddings: one tensor \[B, M, D\], one sequence"),
    (lambda: PMRLLoss()(GOOD, True), TypeError,
     r"PMRLLoss takes the embeddings as one tensor .*positional argument 1 is a bool: pass options by keyword"),
    (lambda: pmrl_loss(GOOD[:, 0], GOOD[:, 1], 0.1), TypeError, "positional argument 2 is a float"),
    (lambda: gram_svd(GOOD[:, 0], GOOD[:, 1], True), TypeError, "gram_svd takes the embeddings as"),
    (lambda: pmrl_loss(GOOD, GOOD), ValueError,
     r"embeddings\[0\] must be a 2-D tensor \[B, D\], got shape \(4, 3, 5\); the embeddings are one tensor"),
    (lambda: pmrl_loss([GOOD[:, 0]], GOOD[:, 1]), TypeError, "positional argument 0 is a list"),
]


@pytest.mark.parametrize("call,error,message", WRONG_CALLS)
def test_wrong_calls_name_the_accepted_forms(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_reductions_and_output_dict():
    z = random_embeddings(7, 4, 9)
    none = pmrl_loss(z, reduction="none", output_dict=True)
    assert none["loss"].shape == (7,)
    assert_close(none["loss"], none["align"] + none["reg"], 1e-12, 0, "loss = align + w reg")
    mean = pmrl_loss(z, output_dict=True)
    total = pmrl_loss(z, reduction="sum", output_dict=True)
    for key in ("loss", "align", "reg"):
        assert mean[key].dim() == 0
        assert_close(mean[key], none[key].mean(), 1e-12, 1e-12, key)
        assert_close(total[key], none[key].sum(), 1e-12, 1e-12, key)
    assert_close(pmrl_loss(z), mean["loss"], 0, 0, "plain call returns the loss")
    weighted = pmrl_loss(z, reg_weight=0.25, reduction="none", output_dict=True)
    assert_close(weighted["loss"], weighted["align"] + 0.25 * weighted["reg"], 1e-12, 0, "reg_weight")


def test_reg_weight_zero_skips_the_contrastive_term(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the B x B term ran although reg_weight = 0")

    monkeypatch.setattr(reference, "contrastive", fail)
    z = random_embeddings(5, 3, 4).requires_grad_()
    out = pmrl_loss(z, reg_weight=0.0, output_dict=True, backend="reference")
    assert out["reg"].item() == 0
    out["loss"].backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize(
    "dtype,expected_dtype,atol",
    [(torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-5),
     (torch.float16, torch.float32, 1e-5), (torch.bfloat16, torch.float32, 1e-5)],
)
def test_dtypes(dtype, expected_dtype, atol):
    z = random_embeddings(6, 3, 10).to(dtype)
    zg = z.clone().requires_grad_()
    loss = pmrl_loss(zg)
    assert loss.dtype == expected_dtype
    loss.backward()
    assert zg.grad.dtype == dtype and torch.isfinite(zg.grad).all()
    # computed in fp32 (fp64) on the rounded input, not in the input's precision
    assert_close(loss, pmrl_loss(z.to(torch.float64)), atol, atol, "loss vs float64 on the same input")
    out = gram_svd(z)
    assert out.S.dtype == out.U.dtype == out.lead.dtype == expected_dtype


def test_module_equals_functional():
    z = random_embeddings(8, 3, 6)
    module = PMRLLoss(tau=0.1, tau_reg=0.2, reg_weight=0.5, reduction="sum")
    assert "tau=0.1" in repr(module)
    assert module.config == PMRLConfig(tau=0.1, tau_reg=0.2, reg_weight=0.5, reduction="sum")
    with pytest.raises(dataclasses.FrozenInstanceError):
        module.config.tau = 1.0  # checked once, at construction: not changeable behind the checks
    assert_close(module(z), pmrl_loss(z, tau=0.1, tau_reg=0.2, reg_weight=0.5, reduction="sum"), 0, 0, "module")
    d = module(z, output_dict=True)
    assert set(d) == {"loss", "align", "reg", "sigma1", "against_lead", "pairwise_cos"}


def test_non_contiguous_inputs():
    base = random_embeddings(8, 6, 20)
    z = base[::2, ::2, ::3]  # strided in every dimension
    assert not z.is_contiguous()
    assert_close(pmrl_loss(z), pmrl_loss(z.contiguous()), 1e-14, 1e-14, "loss")


GOOD = random_embeddings(4, 3, 5)

BAD_EMBEDDINGS = [
    (torch.ones(4, 3, 5, dtype=torch.int64), TypeError, "embeddings must be a floating tensor"),
    (torch.ones(4, 3, 5, dtype=torch.complex64), TypeError, "embeddings must be a floating tensor"),
    (torch.ones(4, 5), ValueError, "3-D tensor"),
    (torch.ones(2, 4, 3, 5), ValueError, "3-D tensor"),
    ([torch.ones(4, 5), torch.ones(4, 6)], ValueError, "same shape"),
    ([torch.ones(4, 5), torch.ones(4, 5, dtype=torch.float64)], TypeError, "one dtype"),
    ([torch.ones(4, 5), torch.ones(4, 5, device="meta")], ValueError, "one device"),
    ([torch.ones(4, 5), "text"], TypeError, r"embeddings\[1\] must be a torch.Tensor"),
    ([torch.ones(4, 5), torch.ones(4, 5, 1)], ValueError, r"embeddings\[1\] must be a 2-D tensor"),
    (torch.ones(4, 1, 5), ValueError, "M >= 2"),
    ([torch.ones(4, 5)], ValueError, "M >= 2"),
    ([], ValueError, "M >= 2"),
    (torch.ones(0, 3, 5), ValueError, "B = 0"),
    (torch.ones(4, 3, 0), ValueError, "D = 0"),
    ("not a tensor", TypeError, "embeddings must be a tensor"),
]


@pytest.mark.parametrize("bad,error,message", BAD_EMBEDDINGS)
def test_bad_embeddings(bad, error, message):
    with pytest.raises(error, match=message):
        pmrl_loss(bad)
    with pytest.raises(error, match=message):
        gram_svd(bad)


BAD_ARGUMENTS = [
    ({"tau": 0.0}, ValueError, "tau must be finite and > 0"),
    ({"tau": -1.0}, ValueError, "tau must be finite and > 0"),
    ({"tau": math.inf}, ValueError, "tau must be finite and > 0"),
    ({"tau": math.nan}, ValueError, "tau must be finite and > 0"),
    ({"tau": "0.1"}, TypeError, "tau must be a real number"),
    ({"tau_reg": 0}, ValueError, "tau_reg must be finite and > 0"),
    ({"tau_reg": math.nan}, ValueError, "tau_reg must be finite and > 0"),
    ({"reg_weight": -0.1}, ValueError, "reg_weight must be finite and >= 0"),
    ({"reg_weight": math.inf}, ValueError, "reg_weight must be finite and >= 0"),
    ({"reduction": "avg"}, ValueError, "reduction must be one of"),
    ({"normalize": 1}, TypeError, "normalize must be a bool"),
    ({"backend": "fortran"}, ValueError, r"backend must be 'auto' or one of .*available here: \[.*'reference'"),
    ({"backend": 3}, TypeError, "backend must be a str"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        pmrl_loss(GOOD, **kwargs)
    with pytest.raises(error, match=message):  # the module checks every argument at construction, backend too
        PMRLLoss(**kwargs)


def test_process_group_is_checked_and_needs_the_gather():
    with pytest.raises(TypeError, match="process_group must be None .* got str"):
        PMRLLoss(gather_with_grad=True, process_group="world")
    group = dist.ProcessGroup(dist.HashStore(), 0, 1)  # a group object; no collective runs here
    with pytest.raises(ValueError, match="process_group is the group of the gather"):
        PMRLLoss(process_group=group)
    assert PMRLLoss(gather_with_grad=True, process_group=group).process_group is group


def test_output_dict_must_be_bool():
    with pytest.raises(TypeError, match="output_dict must be a bool"):
        pmrl_loss(GOOD, output_dict="yes")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error for a backend this machine lacks")
def test_unavailable_backend_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available for cpu tensors.*available here"):
        pmrl_loss(GOOD, backend="cuda")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_torch_compile_fullgraph_equals_eager(backend):
    # the whole public call (checks, backend choice, both terms) traces without a graph break
    z = random_embeddings(16, 3, 24, dtype=torch.float32)
    compiled = torch.compile(lambda z: pmrl_loss(list(z.unbind(1)), backend=backend), fullgraph=True,
                             backend="aot_eager")
    zc, ze = z.clone().requires_grad_(), z.clone().requires_grad_()
    lc, le = compiled(zc), pmrl_loss(list(ze.unbind(1)), backend=backend)
    (2.0 * lc).backward()
    (2.0 * le).backward()
    assert_close(lc, le, 1e-6, 1e-6, "loss")
    assert_close(zc.grad, ze.grad, 1e-6, 1e-5, "grad")


def test_defaults_are_the_published_values_and_are_checked():
    assert (DEFAULTS.tau, DEFAULTS.tau_reg, DEFAULTS.reg_weight) == (0.05, 0.1, 1.0)
    assert (DEFAULTS.normalize, DEFAULTS.reduction, DEFAULTS.backend) == (True, "mean", "auto")
    assert PMRLLoss().config == DEFAULTS
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        PMRLConfig(tau=0.0)
    assert PMRLConfig(tau=1).tau == 1.0 and isinstance(PMRLConfig(tau=1).tau, float)


@pytest.mark.parametrize("name", backends.available_backends("cpu"))
def test_tensor_input_gets_its_gradient_without_an_unbind_copy(name):
    """A [B, M, D] tensor reaches the kernels as it is: no UnbindBackward node (whose backward stacks a copy of
    dZ) in the graph, and the same gradient as the list of its rows."""
    z = torch.randn(8, 3, 16, requires_grad=True)
    loss = pmrl_loss(z, backend=name)
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    assert not [type(n).__name__ for n in seen if "Unbind" in type(n).__name__]
    (dz,) = torch.autograd.grad(loss, z)
    rows = [t.detach().clone().requires_grad_() for t in z.unbind(1)]
    grads = torch.autograd.grad(pmrl_loss(rows, backend=name), rows)
    assert torch.equal(dz, torch.stack(grads, 1))
