"""One conformance suite for every backend: each test runs once per backend of pmrl_kernels.backends.REGISTRY that
implements the op on a device type of this machine (the params are read from the registry at collection time, so
a new backend is tested with no edit here), against the float64 reference (pmrl_kernels.reference). Test ids
start with "<backend>-<device>".

Accuracy: FlashAttention's rule (conftest.assert_fa_close). float16/bfloat16 inputs are compared on the same
rounded input. Where a quantity is not defined (the sign of a column that sums to ~0, eigenvectors of a tied
eigenvalue, lead at a tie of the top eigenvalue), the tests compare what is defined instead: U diag(S^2) U^T
against G, and lead against Zn^T u_1 / sigma_1 with the backend's own u_1. Gradients are checked against the
float64 reference backward fed the backend's own S, U and lead, so a forward rounding difference at a
near-tie does not show up as a backward error.

A backend that refuses an input (its `<op>_unsupported` gives a reason: Triton and float64, the compiled kernels
and M > 16) is checked to refuse it with that reason while backend="auto" falls back (test_dtype_support,
test_too_many_modalities); the accuracy tests skip those combinations, naming the reason.

A backend that runs in Triton's CPU interpreter (the Triton backend without a GPU) gets a subset of the three
large matrices (shapes x dtypes: see `cases`); every other test runs for it in full.

Backend-specific tests stay in test_extension.py (ctest, nvcc, op registration and opcheck, CUDA streams,
gradient layout) and test_triton.py (sm_90 compilation, block configurations, the interpreter, the contrastive
kernel's tiling and operand precision).
"""
import importlib
import inspect
import itertools
import math
import re
import sys

import pytest
import torch

from conftest import (
    assert_fa_close, check_contrastive, correlated, degenerate_cases, f64, fa_atol, random_embeddings,
)
from pmrl_kernels import backends, gram_svd, pmrl_loss, reference, terms
from pmrl_kernels.constants import MAX_MODALITIES, NORM_EPS, SIGN_TOL
from pmrl_kernels.inputs import compute_dtype
from pmrl_kernels.ops import contrastive_common, triton_common

DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def backend_params(op=None):
    """pytest params (name, device), id "name-device": every backend implementing `op` (any op when None) on
    every device type of this machine."""
    params = []
    for device in DEVICES:
        names = list(backends.implementations(op, device)) if op else backends.available_backends(device)
        params += [pytest.param(name, device, id=f"{name}-{device}") for name in names]
    return params


def op_module(name, op):
    """The module of backend `name` implementing `op` (imported at package import, pmrl_kernels.backends)."""
    return importlib.import_module(backends.REGISTRY[name].ops[op])


def interpreted(name, device):
    """Whether backend `name` runs Triton kernels in Triton's CPU interpreter here."""
    triton = sys.modules.get("triton")
    return (device == "cpu" and triton_common.interpreting() and triton is not None
            and any(getattr(op_module(name, op), "triton", None) is triton for op in backends.REGISTRY[name].ops))


GRAM_EIG = backend_params("gram_eig")
CONTRASTIVE = backend_params("contrastive")
ANY_OP = backend_params()  # what pmrl_loss(backend=name) can run: the ops a backend lacks resolve as under "auto"

every_gram_eig_backend = pytest.mark.parametrize("name, device", GRAM_EIG)
every_contrastive_backend = pytest.mark.parametrize("name, device", CONTRASTIVE)
every_backend = pytest.mark.parametrize("name, device", ANY_OP)


def dtype_params(*dtypes):
    return [pytest.param(dtype, id=str(dtype).removeprefix("torch.")) for dtype in dtypes]


def shape_params(shapes):
    return [pytest.param(*shape, id="x".join(map(str, shape))) for shape in shapes]


ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
every_dtype = pytest.mark.parametrize("dtype", dtype_params(*ALL_DTYPES))

# Every M from 2 to 16 in some shape; B = 70 (> 64) and D = 257, 1000, 4096 cross the block sizes of the tiled
# kernels (instances per program, features per chunk); D = 1 and D < M are the edge cases.
SHAPES = [(1, 2, 1), (3, 2, 5), (7, 3, 33), (5, 4, 256), (4, 5, 3), (17, 4, 64), (70, 5, 80), (3, 7, 100),
          (2, 8, 257), (3, 11, 17), (2, 13, 1000), (2, 16, 4096)]
GRADS = ((True, True), (True, False), (False, True))  # (dL/dS given, dL/dlead given)


def cases(params, *axes, interpreter_subset):
    """The product of backend params (name, device) with the axes (lists of pytest params), id
    "name-device-<axis ids>". A backend running in Triton's CPU interpreter gets only the combinations for which
    interpreter_subset(*axis values) is true: the interpreter costs ~10 ms per operation of a program (a Jacobi
    sweep at M = 16 is ~1 s), so it runs the cheap shapes in float32 and fewer in float16, and no bfloat16 where
    gradients are compared: it rounds float32 -> bfloat16 stores toward zero (on a GPU Triton rounds to nearest);
    test_triton.py checks the interpreter's bfloat16 results bit for bit against its float32 ones instead. On a
    GPU, Triton runs every combination."""
    out = []
    for backend in params:
        for combo in itertools.product(*axes):
            values = tuple(v for p in combo for v in p.values)
            if interpreted(*backend.values) and not interpreter_subset(*values):
                continue
            out.append(pytest.param(*backend.values, *values, id="-".join([backend.id, *(p.id for p in combo)])))
    return out


# ----------------------------------------------------------------------------------------------- helpers


def gram_eig_impl(name, zs):
    """Backend `name`'s gram_eig for these inputs; skips (naming the reason) when it refuses them:
    test_dtype_support and test_too_many_modalities check the refusals."""
    reason = backends.unsupported_reason("gram_eig", name, (zs,))
    if reason is not None:
        pytest.skip(f"{name} refuses this input: {reason}")
    return backends.implementations("gram_eig", zs[0].device.type)[name]


def skip_if_the_loss_is_refused(name, z):
    """Skip (naming the reason) when pmrl_loss(z, backend=name) would raise because the backend refuses the
    input of one of its ops: the embeddings for gram_eig, the leads (compute dtype) for contrastive."""
    zs = list(z.unbind(1))
    lead = torch.empty(z.shape[0], z.shape[2], dtype=compute_dtype(z.dtype), device=z.device)
    inputs = {"gram_eig": (zs,), "contrastive": (lead, lead)}
    for op in backends.REGISTRY[name].ops:
        reason = backends.unsupported_reason(op, name, inputs[op])
        if reason is not None:
            pytest.skip(f"{name} refuses the input of {op}: {reason}")


def modalities(z, device, requires_grad=True):
    """The M inputs [B, D] on `device`: views of z [B, M, D] (no copy on z's own device)."""
    zs = list(z.to(device).unbind(1))
    return [t.requires_grad_() for t in zs] if requires_grad else zs


def top_separated(s, u, rel=1e-3, sum_tol=1e-2):
    """[B] mask: lead is well defined (the top eigenvalue is separated and u_1's sign is not near a switch)."""
    lam = s * s
    gap = lam[:, 0] - (lam[:, 1] if lam.shape[1] > 1 else 0)
    return (gap > rel * lam[:, 0]) & (u[:, :, 0].sum(-1).abs() > sum_tol)


def separated_columns(s, u, rel=1e-3, sum_tol=1e-2):
    """[B, M] mask of eigenvector columns that are defined: eigenvalue apart from the others, sign unambiguous."""
    lam = s * s
    diff = (lam[:, :, None] - lam[:, None, :]).abs() + torch.eye(lam.shape[1], dtype=lam.dtype) * lam.max()
    return (diff.min(-1).values > rel * lam[:, :1]) & (u.sum(-2).abs() > sum_tol)


def rows64(zs, normalize):
    """Zn [B, M, D] in float64: the rows divided by max(||z_m||, NORM_EPS) (as F.normalize), or as they are."""
    z = torch.stack([f64(t) for t in zs], 1)
    return torch.nn.functional.normalize(z, dim=-1, eps=NORM_EPS) if normalize else z


def check_forward(zs, normalize, out):
    """S, U and lead of a backend against the reference on the same (rounded) input."""
    s, u, lead = out
    dtype = zs[0].dtype
    (b, d), m = zs[0].shape, len(zs)
    assert s.dtype == u.dtype == lead.dtype == compute_dtype(dtype)
    assert (s.shape, u.shape, lead.shape) == ((b, m), (b, m, m), (b, d))
    assert s.device == u.device == lead.device == zs[0].device
    assert not u.requires_grad, "U carries no gradient"
    exact = reference.gram_eig_forward([f64(z) for z in zs], normalize)
    base = reference.gram_eig_forward([z.detach().cpu() for z in zs], normalize)  # same dtype as the backend
    atol = fa_atol(dtype)
    s64, u64, lead64 = exact
    # S^2 = eigenvalues of G is what is accurate; sqrt turns their rounding noise near 0 into sqrt(eps).
    assert_fa_close(f64(s) ** 2, s64**2, f64(base[0]) ** 2, "S^2", atol)
    big = s64 > 1e-2 * s64[:, :1]
    assert_fa_close(f64(s)[big], s64[big], f64(base[0])[big], "S (above the noise)", atol)

    # U where defined; U diag(S^2) U^T = G everywhere (ties included)
    cols = separated_columns(s64, u64)
    assert_fa_close(f64(u).transpose(1, 2)[cols], u64.transpose(1, 2)[cols], f64(base[1]).transpose(1, 2)[cols],
                    "U (separated columns)", 1e3 * atol)

    def rebuilt(s_, u_):
        return f64(u_) @ torch.diag_embed(f64(s_) ** 2) @ f64(u_).transpose(1, 2)

    assert_fa_close(rebuilt(s, u), rebuilt(s64, u64), rebuilt(*base[:2]), "U diag(S^2) U^T", atol)

    # lead where defined; everywhere, lead = Zn^T u_1 / sigma_1 with the backend's own u_1 and sigma_1
    rows = top_separated(s64, u64)
    assert_fa_close(f64(lead)[rows], lead64[rows], f64(base[2])[rows], "lead", 1e3 * atol)
    zn = rows64(zs, normalize)
    s1 = f64(s)[:, :1]
    own = (f64(u)[:, :, :1].transpose(1, 2) @ zn).squeeze(1) * terms.safe_inverse(s1, torch.finfo(s.dtype).tiny)
    assert_fa_close(lead, own, own, "lead = Zn^T u_1 / sigma_1", 10 * atol)


def gradients(out, zs, grad_s, grad_lead):
    """dL/dz [B, M, D] through the autograd of gram_eig for L = grad_s . S + grad_lead . lead (None: not used)."""
    s, _, lead = out
    pairs = [(t, g) for t, g in ((s, grad_s), (lead, grad_lead)) if g is not None]
    dz = torch.autograd.grad([p[0] for p in pairs], zs, [p[1] for p in pairs], retain_graph=True)
    return torch.stack(dz, 1)


def check_backward(zs, normalize, out, with_grad_s, with_grad_lead, seed=0):
    """dL/dz of a backend against the reference backward fed the backend's own S and U."""
    s, u, lead = out
    g = torch.Generator().manual_seed(seed)
    grad_s = torch.randn(s.shape, generator=g, dtype=s.dtype).to(s.device) if with_grad_s else None
    grad_lead = torch.randn(lead.shape, generator=g, dtype=s.dtype).to(s.device) if with_grad_lead else None
    dz = gradients(out, zs, grad_s, grad_lead)
    assert dz.dtype == zs[0].dtype and dz.shape == (zs[0].shape[0], len(zs), zs[0].shape[1])
    exact = reference.gram_eig_backward([f64(z) for z in zs], f64(s), f64(u), f64(grad_s), f64(grad_lead), normalize)
    cpu = [None if t is None else t.detach().cpu() for t in (s, u, grad_s, grad_lead)]
    base = reference.gram_eig_backward([z.detach().cpu() for z in zs], *cpu, normalize)
    assert_fa_close(dz, exact, base, f"dz (normalize={normalize}, grad_S={with_grad_s}, grad_lead={with_grad_lead})",
                    fa_atol(zs[0].dtype))


def check_gram_eig(name, zs, normalize, grads=GRADS):
    """Forward, then the backward for each combination of upstream gradients, of backend `name`."""
    out = gram_eig_impl(name, zs)(zs, normalize)
    check_forward(zs, normalize, out)
    for with_grad_s, with_grad_lead in grads:
        check_backward(zs, normalize, out, with_grad_s, with_grad_lead)
    return out


def check_loss(z, name, gradients=True, **kwargs):
    """pmrl_loss(backend=name): every part and dL/dz (grad_output 3) against the float64 reference."""
    results = {}
    for key, x, backend in (("backend", z, name), ("exact", f64(z), "reference"), ("base", z.cpu(), "reference")):
        x = x.detach().clone().requires_grad_()
        parts = pmrl_loss(x, backend=backend, output_dict=True, **kwargs)
        (parts["loss"] * 3.0).sum().backward()
        results[key] = parts, x.grad
    assert results["backend"][1].dtype == z.dtype and results["backend"][1].device == z.device
    atol = fa_atol(z.dtype)
    for part in ("loss", "align", "reg"):
        assert results["backend"][0][part].dtype == compute_dtype(z.dtype)
        assert_fa_close(*(results[k][0][part] for k in ("backend", "exact", "base")), part, atol)
    if gradients:
        assert_fa_close(*(results[k][1] for k in ("backend", "exact", "base")), "dL/dz", atol)


# ----------------------------------------------------------------------------------------------- the interface


def protocol_methods(protocol):
    return {name: value for name, value in vars(protocol).items()
            if inspect.isfunction(value) and not name.startswith("_")}


def assert_follows(module, protocol):
    """isinstance (every member present) and every member callable with the protocol's positional arguments and
    its keyword-only ones by name."""
    assert isinstance(module, protocol), f"{module.__name__} lacks a member of {protocol.__name__}"
    for method, declared in protocol_methods(protocol).items():
        wanted = list(inspect.signature(declared).parameters.values())[1:]  # without self
        params = list(inspect.signature(getattr(module, method)).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        required = [p for p in positional if p.default is p.empty]
        keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        wanted_keywords = {p.name for p in wanted if p.kind == p.KEYWORD_ONLY}
        assert wanted_keywords <= keywords, (
            f"{module.__name__}.{method} lacks the protocol's keyword arguments {sorted(wanted_keywords - keywords)}"
        )
        wanted = [p for p in wanted if p.kind != p.KEYWORD_ONLY]
        assert len(required) <= len(wanted) <= len(positional), (
            f"{module.__name__}.{method}{tuple(p.name for p in params)} cannot be called as the protocol's "
            f"{method}{tuple(p.name for p in wanted)}"
        )


@pytest.mark.parametrize("op, name, device", [
    pytest.param(op, *p.values, id=f"{op}-{p.id}") for op in backends.OPS for p in backend_params(op)])
def test_op_module_follows_its_protocol(op, name, device):
    module = op_module(name, op)
    assert_follows(module, backends.OP_PROTOCOLS[op])
    assert module.is_available(device)
    assert backends.implementations(op, device)[name] is vars(module)[op]


def test_every_registered_module_follows_its_protocol():
    """Backends not available here too, where their module imports (the registry is checked on every machine)."""
    for spec in backends.REGISTRY.values():
        assert spec.ops and set(spec.ops) <= set(backends.OPS), spec
        for op, module_name in spec.ops.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue  # e.g. triton not installed: the registry then never offers it
            assert_follows(module, backends.OP_PROTOCOLS[op])
    for op, order in [*backends.AUTO_ORDER.items(), *backends.AUTO_ORDER_MANY_MODALITIES.items(),
                      *backends.AUTO_ORDER_LARGE_BATCH.items()]:
        for device_type, names in order.items():
            assert names[-1] == "reference", f"auto must end at the reference for {op} on {device_type}"
            assert all(op in backends.REGISTRY[n].ops for n in names), (op, device_type, names)


def test_auto_order_of_the_contrastive_term_on_the_cpu():
    """The CPU takes the blocked contrastive term from CPU_BLOCKED_MIN_LOGITS logits on (rows x columns, the
    gathered columns included), the whole-matrix reference below (docs/results.md, "Contrastive term on the CPU");
    the loss resolves to it."""
    limit = backends.CPU_BLOCKED_MIN_LOGITS
    small, large = torch.zeros(2047, 3), torch.zeros(2048, 3)
    assert limit == 2048 * 2048
    assert backends.auto_order("contrastive", "cpu", (small, small)) == ("reference",)
    assert backends.auto_order("contrastive", "cpu", (large, large)) == ("blocked", "reference")
    assert backends.auto_order("contrastive", "cpu", (torch.zeros(1024, 3), torch.zeros(4096, 3))) == (
        "blocked", "reference")
    assert backends.resolve("contrastive", "auto", (large, large)) is backends.implementations(
        "contrastive", "cpu")["blocked"]
    assert backends.auto_order("contrastive", "cuda", (small, small)) == ("blocked", "triton", "reference")


def test_auto_order_on_cuda(monkeypatch):
    """On CUDA the compiled gram_eig leads up to CUDA_REGISTER_MAX_M modalities, Triton above (list and [B, M, D]
    input alike); the contrastive term takes the blocked backend (torch.mm) first at every matmul precision
    (docs/results.md, "Contrastive term on CUDA"); the CPU keeps one order."""
    limit = backends.CUDA_REGISTER_MAX_M
    for m, first in ((2, "cuda"), (limit, "cuda"), (limit + 1, "triton"), (16, "triton")):
        z = torch.zeros(2, m, 3)
        for zs in (z, list(z.unbind(1))):
            assert backends.auto_order("gram_eig", "cuda", (zs,))[0] == first, m
            assert backends.auto_order("gram_eig", "cpu", (zs,)) == ("cpp", "reference")
    rows = torch.zeros(2, 3)
    for precision in ("highest", "high"):
        try:
            torch.set_float32_matmul_precision(precision)
            assert backends.auto_order("contrastive", "cuda", (rows, rows)) == ("blocked", "triton", "reference")
            assert backends.auto_order("contrastive", "cpu", (rows, rows)) == ("reference",)
        finally:
            torch.set_float32_matmul_precision("highest")
    monkeypatch.setattr(contrastive_common, "operand_precision", lambda device_type: "bf16")  # under autocast
    assert backends.auto_order("contrastive", "cuda", (rows, rows)) == ("blocked", "triton", "reference")


@pytest.mark.parametrize("device", DEVICES)
def test_operand_precision_follows_torch(device):
    """The contrastive term's precision (contrastive_common.operand_precision): IEEE by default, TF32 under
    torch.set_float32_matmul_precision("high") and under torch's newer per-backend setting, which leaves
    torch.get_float32_matmul_precision raising (a program that mixed both APIs); 16-bit under autocast. The
    contrastive ops refuse a precision they do not know."""
    operand_precision = contrastive_common.operand_precision
    assert operand_precision(device) == "ieee"
    backend = torch.backends.cuda.matmul if device == "cuda" else torch.backends.mkldnn.matmul
    try:
        torch.set_float32_matmul_precision("high")
        assert operand_precision(device) == "tf32"
        torch.set_float32_matmul_precision("highest")
        backend.fp32_precision = "tf32"
        with pytest.raises(RuntimeError):
            torch.get_float32_matmul_precision()
        assert operand_precision(device) == "tf32"
        rows = torch.randn(4, 8, device=device)
        assert backends.resolve("contrastive", "auto", (rows, rows))(rows, rows, 0.5, 0).shape == (4,)
    finally:
        torch.set_float32_matmul_precision("highest")  # both APIs back to the default, the legacy one readable
    assert torch.get_float32_matmul_precision() == "highest" and operand_precision(device) == "ieee"
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        with torch.autocast(device, dtype=dtype):
            assert operand_precision(device) == name
    with pytest.raises(ValueError, match="precision"):
        torch.ops.pmrl_kernels.blocked_contrastive_fwd(torch.ones(2, 4), torch.ones(2, 4), 0.1, 0, "fp8")


def test_compiled_code_follows_the_matmul_precision():
    """torch.compile reads the contrastive term's precision (contrastive_common.operand_precision) when it traces,
    and a change of torch's float32 matmul precision retraces: the kernels' precision follows the setting in
    compiled code as in eager."""
    def precision_index(rows):
        return rows + contrastive_common.PRECISIONS.index(contrastive_common.operand_precision("cuda"))

    compiled = torch.compile(precision_index, fullgraph=True, backend="aot_eager")
    rows = torch.zeros(2)
    try:
        for setting, name in (("highest", "ieee"), ("high", "tf32"), ("highest", "ieee")):
            torch.set_float32_matmul_precision(setting)
            assert compiled(rows).tolist() == [contrastive_common.PRECISIONS.index(name)] * 2, setting
    finally:
        torch.set_float32_matmul_precision("highest")


def test_the_suite_covers_the_registry():
    """The params come from the registry: every backend runnable here is tested, on every device type."""
    for device in DEVICES:
        assert "reference" in backends.implementations("gram_eig", device)
        assert "reference" in backends.implementations("contrastive", device)
    covered = {p.values for p in GRAM_EIG + CONTRASTIVE}
    for name in backends.available_backends():
        assert any(n == name for n, _ in covered), name


@every_dtype
@every_gram_eig_backend
def test_dtype_support(name, device, dtype):
    """An accepted dtype gives S/U/lead in its compute dtype and dL/dz in its own; a refused one raises with the
    backend's reason when named, and backend="auto" falls back to another backend that is accurate."""
    z = correlated(8, 3, 16, seed=2, dtype=dtype, device=device)
    zs = list(z.unbind(1))
    reason = backends.unsupported_reason("gram_eig", name, (zs,))
    if reason is None:
        out = gram_svd(z, backend=name)
        assert out.S.dtype == out.U.dtype == out.lead.dtype == compute_dtype(dtype)
        x = z.clone().requires_grad_()
        loss = pmrl_loss(x, backend=name)
        assert loss.dtype == compute_dtype(dtype)
        loss.backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
        return
    assert isinstance(reason, str) and reason.strip()
    with pytest.raises(ValueError, match=re.escape(reason)):
        gram_svd(z, backend=name)
    with pytest.raises(ValueError, match=f"backend '{name}' cannot take this input"):
        pmrl_loss(z, backend=name)
    with pytest.raises(ValueError, match=f"backend '{name}' cannot take this input"):
        backends.resolve("gram_eig", name, (zs,))
    fallback = backends.resolve("gram_eig", "auto", (zs,))
    assert fallback is not backends.implementations("gram_eig", device)[name]
    out = gram_svd(z, backend="auto")
    assert out.S.dtype == compute_dtype(dtype)
    check_forward(zs, True, out)


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64))
@every_contrastive_backend
def test_contrastive_dtype_support(name, device, dtype):
    """The contrastive op sees the leads, float32 or float64: accepted (result in that precision at least) or
    refused with a reason, "auto" then falling back."""
    rows = correlated(6, 1, 8, seed=3, dtype=dtype, device=device)[:, 0]
    reason = backends.unsupported_reason("contrastive", name, (rows, rows))
    if reason is None:
        out = backends.resolve("contrastive", name, (rows, rows))(rows, rows, 0.1, 0)
        assert out.shape == (6,) and out.dtype in (torch.float32, dtype) and torch.isfinite(out).all()
        exact = terms.contrastive(f64(rows), f64(rows), 0.1)
        assert_fa_close(out, exact, terms.contrastive(rows.cpu(), rows.cpu(), 0.1), "loss", fa_atol(out.dtype))
        return
    assert isinstance(reason, str) and reason.strip()
    with pytest.raises(ValueError, match=re.escape(reason)):
        backends.resolve("contrastive", name, (rows, rows))
    fallback = backends.resolve("contrastive", "auto", (rows, rows))
    assert fallback is not backends.implementations("contrastive", device)[name]
    out = fallback(rows, rows, 0.1, 0)
    assert_fa_close(out, terms.contrastive(f64(rows), f64(rows), 0.1), out, "loss via auto", fa_atol(dtype))


@every_gram_eig_backend
def test_too_many_modalities(name, device):
    """M = MAX_MODALITIES is taken by every backend; M = MAX_MODALITIES + 1 by those without the limit, and
    backend="auto" gives the same result as the backend it resolves to."""
    z = random_embeddings(3, MAX_MODALITIES + 1, 8, torch.float32, device=device)
    zs = list(z.unbind(1))
    assert backends.unsupported_reason("gram_eig", name, (zs[:MAX_MODALITIES],)) is None
    reason = backends.unsupported_reason("gram_eig", name, (zs,))
    if reason is None:
        check_forward(zs, True, gram_svd(z, backend=name))
        return
    assert str(MAX_MODALITIES + 1) in reason, reason
    with pytest.raises(ValueError, match="cannot take this input"):
        pmrl_loss(z, backend=name)
    auto = backends.resolve("gram_eig", "auto", (zs,))
    assert auto is not backends.implementations("gram_eig", device)[name]
    for a, b in zip(gram_svd(z, backend="auto"), auto(zs, True)):
        assert torch.equal(a, b)


BAD_INPUTS = [  # the public checks run before any backend sees the input, so every backend reports the same
    (lambda dev: torch.ones(4, 3, 5, dtype=torch.int32, device=dev), TypeError, "must be a floating tensor"),
    (lambda dev: torch.ones(4, 5, device=dev), ValueError, "3-D tensor"),
    (lambda dev: torch.ones(4, 1, 5, device=dev), ValueError, "M >= 2"),
    (lambda dev: torch.ones(0, 3, 5, device=dev), ValueError, "B = 0"),
    (lambda dev: torch.ones(4, 3, 0, device=dev), ValueError, "D = 0"),
    (lambda dev: [torch.ones(4, 5, device=dev), torch.ones(4, 6, device=dev)], ValueError, "same shape"),
    (lambda dev: [torch.ones(4, 5, device=dev), torch.ones(4, 5, device=dev, dtype=torch.float64)], TypeError,
     "one dtype"),
    (lambda dev: [torch.ones(4, 5, device=dev), torch.ones(4, 5, device="meta")], ValueError, "one device"),
]


@every_backend
def test_bad_input_errors(name, device):
    for make, error, message in BAD_INPUTS:
        with pytest.raises(error, match=message):
            pmrl_loss(make(device), backend=name)
        with pytest.raises(error, match=message):
            gram_svd(make(device), backend=name)
    with pytest.raises(ValueError, match="tau must be finite and > 0"):
        pmrl_loss(torch.ones(4, 3, 5, device=device), backend=name, tau=0.0)


# ----------------------------------------------------------------------------------------------- gram_eig values


@pytest.mark.parametrize("name, device, dtype, b, m, d", cases(
    GRAM_EIG, dtype_params(*ALL_DTYPES), shape_params(SHAPES),
    interpreter_subset=lambda dtype, b, m, d: m <= 8 and (dtype == torch.float32 or dtype != torch.bfloat16 and m <= 5),
))
def test_gram_eig_matches_reference(name, device, dtype, b, m, d):
    """S, U, lead and dL/dz (through S and lead, S only, lead only), normalised and not."""
    zs = modalities(random_embeddings(b, m, d, dtype, seed=b * 100 + m * 10 + d), device)
    for normalize in (True, False):
        check_gram_eig(name, zs, normalize)


@pytest.mark.parametrize("name, device, dtype, case", cases(
    GRAM_EIG, dtype_params(*ALL_DTYPES), [pytest.param(case, id=case) for case in degenerate_cases()],
    interpreter_subset=lambda dtype, case: dtype == torch.float32 or dtype == torch.float16 and case != "near_tie_init",
))
def test_degenerate_inputs(name, device, dtype, case):
    """S, U, lead and the backward everywhere; pmrl_loss values everywhere, and its gradients where they are
    defined (the top eigenvalue of every instance separated: at a tie the gradient of sigma_1 depends on which
    eigenvector the solver calls first)."""
    z = degenerate_cases(dtype)[case].to(device)
    zs = modalities(z, device)
    for normalize in (True, False):
        check_gram_eig(name, zs, normalize, grads=((True, True),))
    defined = top_separated(*reference.gram_eig_forward([f64(t) for t in zs], True)[:2]).all()
    check_loss(z, name, gradients=bool(defined))


@every_gram_eig_backend
def test_many_modalities(name, device):
    """M = 16, the most the kernels take. Unnormalised near-orthogonal rows of norms 1..16: well separated
    eigenvalues (the random M = 16 shape of test_gram_eig_matches_reference has them close)."""
    g = torch.Generator().manual_seed(6)
    q = torch.linalg.qr(torch.randn(32, 16, generator=g, dtype=torch.float64))[0].T  # 16 orthonormal rows
    z = torch.arange(1.0, 17.0, dtype=torch.float64)[:, None] * q + 0.01 * torch.randn(8, 16, 32, generator=g)
    check_gram_eig(name, modalities(z.float(), device), False)


@pytest.mark.parametrize("dtype", dtype_params(torch.float64, torch.float32))
@every_gram_eig_backend
def test_rows_shorter_than_norm_eps(name, device, dtype):
    """0 < ||z_m|| < NORM_EPS: F.normalize divides by NORM_EPS, so zn_m is not a unit vector, and the projection
    of the normalisation backward is skipped for that row (reference.gram_eig_backward). An all-zero row cannot
    tell whether a backend skips it too: its radial part is 0 either way."""
    z = random_embeddings(70, 4, 16, seed=31)
    z = 3 * z[:, :1] + z  # correlated rows: lead and its sign are defined
    z[:, 1] *= 0.3 * NORM_EPS / z[:, 1].norm(dim=-1, keepdim=True)
    check_gram_eig(name, modalities(z.to(dtype), device), True)


@every_gram_eig_backend
def test_unnormalised_small_rows(name, device):
    """normalize=False with rows of norm ~2e-2: the floors of 1/sigma_k and 1/(lambda_1 - lambda_k) are relative
    (SIGMA_EPS sigma_1, GAP_EPS lambda_1), so they stay negligible for these well separated singular values
    (sigma_k >= 6e-3, lambda_1 - lambda_2 >= 6e-4), where absolute floors (1e-3 and 1e-4) would not be."""
    z = 2e-3 * correlated(70, 3, 24, seed=19, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        zs = modalities(z.to(dtype), device)
        if backends.unsupported_reason("gram_eig", name, (zs,)) is None:
            check_gram_eig(name, zs, False)


@every_gram_eig_backend
def test_sign_ties_are_broken_like_the_reference(name, device):
    """M = 2 with the rows pointing apart: u_1 = (1, -1)/sqrt 2 sums to exactly 0, so only the tie-break rule
    (terms.canonical_sign) fixes the sign of lead and U; every backend must follow it, not rounding."""
    z = random_embeddings(64, 2, 9, seed=21)
    z[:, 1] = -z[:, 0] + 0.3 * z[:, 1]
    for dtype in (torch.float64, torch.float32):
        x = z.to(dtype)
        zs = modalities(x, device, requires_grad=False)
        if backends.unsupported_reason("gram_eig", name, (zs,)) is not None:
            continue
        s, u, lead = gram_svd(zs, backend=name)
        ref = reference.gram_eig_forward(list(x.unbind(1)), True)
        assert (ref[1][:, :, 0].sum(-1).abs() < SIGN_TOL).all(), "the test needs sign ties"
        assert torch.equal(torch.sign(u.cpu()), torch.sign(ref[1])), dtype
        assert torch.equal(torch.sign(lead.cpu()), torch.sign(ref[2])), dtype


@every_gram_eig_backend
def test_backward_with_broadcast_gradient(name, device):
    """lead.sum() sends a stride-0 (expanded) gradient; S unused gives no gradient for it at all."""
    zs = modalities(correlated(40, 3, 24, seed=4), device)
    out = gram_eig_impl(name, zs)(zs, True)
    dz = torch.stack(torch.autograd.grad(out[2].sum(), zs), 1)
    exact = reference.gram_eig_backward([f64(z) for z in zs], *map(f64, out[:2]), None, torch.ones(40, 24).double(),
                                        True)
    base = reference.gram_eig_backward([z.detach().cpu() for z in zs], *(t.detach().cpu() for t in out[:2]), None,
                                       torch.ones(40, 24), True)
    assert_fa_close(dz, exact, base, "dz", fa_atol(torch.float32))


@every_gram_eig_backend
def test_backward_gives_no_gradient_through_unused_outputs(name, device):
    """A loss of U alone (no gradient through U) or of nothing: the backward is not run and gives zero/None."""
    zs = modalities(correlated(6, 3, 8, seed=5), device)
    s, u, lead = gram_eig_impl(name, zs)(zs, True)
    assert s.requires_grad and lead.requires_grad and not u.requires_grad
    dz = torch.autograd.grad(s.sum() * 0 + lead.sum() * 0, zs)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in dz)


# ----------------------------------------------------------------------------------------------- the loss


LOSS_SHAPES = [(9, 2, 7), (16, 4, 256), (5, 6, 31), (3, 16, 129)]
LOSS_KWARGS = {
    "defaults": {},
    "no_reg": {"reg_weight": 0.0, "tau": 0.01},
    "unnormalised_sum": {"normalize": False, "reduction": "sum"},
    "none": {"tau": 0.2, "tau_reg": 0.05, "reg_weight": 0.5, "reduction": "none"},
}


@pytest.mark.parametrize("name, device, dtype, b, m, d, kwargs", cases(
    ANY_OP, dtype_params(*ALL_DTYPES), shape_params(LOSS_SHAPES),
    [pytest.param(kwargs, id=key) for key, kwargs in LOSS_KWARGS.items()],
    interpreter_subset=lambda dtype, b, m, d, kwargs: m <= 8 and (
        dtype == torch.float32 or dtype == torch.float16 and not kwargs),
))
def test_loss_matches_reference(name, device, dtype, b, m, d, kwargs):
    """Rows around a common direction per instance, as in training: lead's sign is then defined everywhere (with
    independent rows, M = 2 and z_1 . z_2 < 0 give u_1 = (1, -1) / sqrt(2), whose sum is 0 up to rounding)."""
    z = random_embeddings(b, m + 1, d, seed=b * m * d)
    z = (3 * z[:, :1] + z[:, 1:]).to(dtype).to(device)
    skip_if_the_loss_is_refused(name, z)
    check_loss(z, name, **kwargs)


@pytest.mark.parametrize("dtype, tau", [pytest.param(torch.float32, 0.05, id="float32-tau0.05"),
                                        pytest.param(torch.float64, 0.05, id="float64-tau0.05"),
                                        pytest.param(torch.float64, 0.01, id="float64-tau0.01")])
@every_backend
def test_alignment_keeps_its_relative_precision_at_the_optimum(name, device, dtype, tau):
    """Every modality along one direction: align = log1p((M - 1) exp(-sqrt(M) / tau)) (5e-13 for M = 2 at
    tau = 0.05, 4e-62 at 0.01). The loss is computed as log1p(sum_k exp((sigma_k - sigma_1) / tau)), so its
    relative error is that of the sigma_k = 0, which the eigen-solve gives to ~sqrt(eps) sigma_1: a relative error
    ~sqrt(eps) sqrt(M) / tau, where logsumexp(S / tau) - sigma_1 / tau would lose it all (absolute error
    eps sqrt(M) / tau, 1e7 times the float32 value)."""
    g = torch.Generator().manual_seed(4)
    for m in (2, 3, 5):
        direction = torch.randn(6, 1, 24, generator=g, dtype=torch.float64)
        z = (direction * torch.rand(6, m, 1, generator=g, dtype=torch.float64).add(0.5)).to(dtype).to(device)
        skip_if_the_loss_is_refused(name, z)
        align = pmrl_loss(z, tau=tau, reg_weight=0.0, reduction="none", backend=name)
        exact = math.log1p((m - 1) * math.exp(-math.sqrt(m) / tau))
        rtol = 4 * torch.finfo(dtype).eps ** 0.5 * math.sqrt(m) / tau
        error = ((f64(align) - exact).abs() / exact).max().item()
        assert error <= rtol, f"M = {m}: relative error {error:.3g} > {rtol:.3g} (value {exact:.3g})"


@pytest.mark.parametrize("reg_weight", [1.0, 0.0])
@every_backend
def test_compile_fullgraph_matches_eager(name, device, reg_weight):
    """The whole public call (checks, backend choice, both terms, both ops' autograd) traces without a graph
    break: inductor on a GPU, aot_eager on the CPU (no C++ compiler needed)."""
    if interpreted(name, device):
        pytest.skip("Triton's interpreter cannot run on the fake tensors torch.compile traces with")
    torch._dynamo.reset()  # a fresh compilation: no float made dynamic by an earlier one (see test_api.py)
    z = correlated(32, 4, 64, seed=8, device=device)

    def loss(x):
        return pmrl_loss(list(x.unbind(1)), backend=name, reg_weight=reg_weight)

    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    results = []
    for fn in (loss, compiled):
        x = z.clone().requires_grad_()
        value = fn(x)
        (2.0 * value).backward()
        results.append((value.detach(), x.grad))
    (v_eager, g_eager), (v_compiled, g_compiled) = results
    torch.testing.assert_close(v_compiled, v_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- input forms


@every_gram_eig_backend
def test_list_and_tensor_input_agree(name, device):
    z = correlated(6, 3, 40, device=device)
    x_tensor = z.clone().requires_grad_()
    x_list = [t.clone().requires_grad_() for t in z.unbind(1)]
    out_tensor = gram_svd(x_tensor, backend=name)
    out_list = gram_svd(x_list, backend=name)
    for a, b in zip(out_tensor, out_list):
        assert torch.equal(a, b)
    (out_tensor.S.sum() + out_tensor.lead[:, 0].sum()).backward()
    (out_list.S.sum() + out_list.lead[:, 0].sum()).backward()
    assert torch.equal(x_tensor.grad, torch.stack([x.grad for x in x_list], 1))
    for x in (z, list(z.unbind(1))):
        a, b = pmrl_loss(x, backend=name, reduction="none"), pmrl_loss(z, backend=name, reduction="none")
        assert torch.equal(a, b)


def layouts(z):
    """The same [B, M, D] values in different storage, as the op gets them from the loss: M tensors [B, D] (a
    list) or one [B, M, D] tensor. Each is a view of a tensor that requires grad; gradients are taken with respect
    to the views (the list's M tensors, or the [B, M, D] tensor)."""
    b, m, d = z.shape

    def leaf(t):
        return t.detach().clone().requires_grad_()

    separate = [leaf(t.contiguous()) for t in z.unbind(1)]
    stacked = leaf(z)
    transposed = leaf(z.transpose(0, 1).contiguous())  # [M, B, D] storage, read as [B, M, D]
    padded = torch.zeros(b, m, d + 3, dtype=z.dtype, device=z.device)
    padded[:, :, 1:d + 1] = z
    padded = leaf(padded)
    spread = torch.zeros(b, m, 2 * d, dtype=z.dtype, device=z.device)
    spread[:, :, ::2] = z
    spread = leaf(spread)
    return {
        "list: separate tensors": separate,
        "list: views of [B, M, D]": list(stacked.unbind(1)),
        "list: views of [M, B, D] storage": list(transposed.unbind(0)),
        "list: row padding, odd offset": list(padded[:, :, 1:d + 1].unbind(1)),
        "list: feature stride 2": list(spread[:, :, ::2].unbind(1)),
        "list: different strides per modality": [spread[:, 0, ::2], separate[1], stacked[:, 2]],
        "tensor: contiguous [B, M, D]": stacked,
        "tensor: [M, B, D] storage": transposed.transpose(0, 1),
        "tensor: row padding, odd offset": padded[:, :, 1:d + 1],
        "tensor: feature stride 2": spread[:, :, ::2],
    }


def expanded(z):
    """Equal rows in every instance, broadcast with stride 0: as a list and as a tensor."""
    first = z[:1].detach().clone().requires_grad_()
    b, m, d = z.shape
    return {"list: expanded (stride-0) rows": [t.expand(b, d) for t in first.unbind(1)],
            "tensor: expanded (stride-0) rows": first.expand(b, m, d)}


@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.bfloat16, torch.float64))
@every_gram_eig_backend
def test_layouts_give_the_contiguous_result(name, device, dtype):
    """Every layout, as a list of M tensors or one [B, M, D] tensor (pmrl_loss and gram_svd pass a tensor to the
    op as it is), gives bit for bit the values and input gradients of contiguous tensors holding the same numbers:
    a backend reads strided input in place or copies it, never misreads it."""
    z = correlated(5, 3, 24, seed=9, dtype=dtype, device=device)
    for layout, x in {**layouts(z), **expanded(z)}.items():
        dense = ([t.detach().contiguous().requires_grad_() for t in x] if isinstance(x, list)
                 else x.detach().contiguous().requires_grad_())
        impl = gram_eig_impl(name, list(dense) if isinstance(dense, list) else list(dense.unbind(1)))
        want = impl(dense, True)
        got = impl(x, True)
        for a, e, what in zip(got, want, ("S", "U", "lead")):
            assert torch.equal(a, e), f"{layout}: {what}"
        grad_s = torch.ones_like(want[0])
        grad_lead = torch.linspace(-1, 1, want[2].numel(), device=device).view_as(want[2]).to(want[2].dtype)
        dz_dense = torch.autograd.grad([want[0], want[2]], dense, [grad_s, grad_lead])
        dz = torch.autograd.grad([got[0], got[2]], x, [grad_s, grad_lead])
        for k, (a, e) in enumerate(zip(dz, dz_dense)):
            assert a.dtype == dtype and a.shape == e.shape and torch.equal(a, e), f"{layout}: dz[{k}]"


# ----------------------------------------------------------------------------------------------- non-finite input


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, in Triton's interpreter
@every_gram_eig_backend
def test_non_finite_input_stays_in_its_instance(name, device):
    """gram_svd: NaN and Inf make their instance's S, U, lead and dL/dz NaN and leave every other instance bit for
    bit; the loss without the contrastive term (which mixes instances) likewise."""
    z = correlated(40, 3, 24, seed=11, device=device)
    poisoned = z.clone()
    poisoned[3, 1, 5] = float("nan")
    poisoned[17, 0, 2] = float("inf")
    bad = torch.zeros(40, dtype=torch.bool, device=device)
    bad[[3, 17]] = True

    def outputs_and_grad(x):
        x = x.clone().requires_grad_()
        gram_eig_impl(name, list(x.unbind(1)))
        out = gram_svd(x, backend=name)
        (dz,) = torch.autograd.grad([out.S, out.lead], x, [torch.ones_like(out.S), torch.ones_like(out.lead)])
        return (*(t.detach() for t in out), dz)

    for what, a, e in zip(("S", "U", "lead", "dz"), outputs_and_grad(poisoned), outputs_and_grad(z)):
        assert a[bad].isnan().all(), f"{what}: the poisoned instances must be NaN"
        assert torch.equal(a[~bad], e[~bad]), f"{what}: the other instances must not change"
    loss = pmrl_loss(poisoned, backend=name, reg_weight=0.0, reduction="none")
    assert loss[bad].isnan().all() and torch.isfinite(loss[~bad]).all()


# ----------------------------------------------------------------------------------------------- contrastive op


CONTRASTIVE_CASES = {  # (B, N, D, cols are the rows, tau_reg, offset)
    "self": (40, 40, 80, True, 0.7, 0),  # logits up to ~110: the softmax saturates
    "more_columns": (40, 70, 80, False, 0.7, 0),
    "offset": (40, 70, 80, False, 0.7, 23),
    "tiny": (3, 5, 4, False, 0.1, 2),
    "one_row": (1, 1, 3, True, 0.5, 0),
}


@pytest.mark.parametrize("case", list(CONTRASTIVE_CASES))
@every_contrastive_backend
def test_contrastive_matches_reference(name, device, case):
    check_contrastive(backends.implementations("contrastive", device)[name], device, *CONTRASTIVE_CASES[case])


@pytest.mark.parametrize("same", [True, False], ids=["rows_are_columns", "gathered_columns"])
@every_contrastive_backend
def test_contrastive_tensor_temperature_gets_its_gradient(name, device, same):
    """A contrastive op takes tau_reg as a 0-d tensor and gives it its gradient (backends.ContrastiveModule)."""
    gen = torch.Generator().manual_seed(31)
    rows = torch.nn.functional.normalize(torch.randn(24, 40, generator=gen, dtype=torch.float64), dim=-1)
    cols = rows if same else torch.nn.functional.normalize(torch.randn(37, 40, generator=gen, dtype=torch.float64),
                                                           dim=-1)
    weights = torch.rand(24, generator=gen, dtype=torch.float64)
    offset = 0 if same else 5

    def grads(fn, dtype, where):
        r = rows.to(where, dtype, copy=True).requires_grad_()
        c = r if same else cols.to(where, dtype, copy=True).requires_grad_()
        tau = torch.tensor(0.2, dtype=dtype, device=where, requires_grad=True)
        (fn(r, c, tau, offset) * weights.to(where, dtype)).sum().backward()
        return tau.grad, r.grad

    exact = grads(terms.contrastive, torch.float64, "cpu")
    baseline = grads(terms.contrastive, torch.float32, "cpu")
    got = grads(backends.implementations("contrastive", device)[name], torch.float32, device)
    for what, a, e, b in zip(("d tau_reg", "d rows"), got, exact, baseline):
        assert_fa_close(a.cpu(), e, b, what, fa_atol(torch.float32))


def masked_infonce(rows, cols, tau_reg, offset, row_labels, col_labels, col_valid):
    """The contrastive op's contract written out (not terms.contrastive): -l_it + log sum_{j kept} exp(l_ij) with
    kept = {t} U {j : col_labels[j] != row_labels[i] and col_valid[j]}, t = offset + i."""
    logits = rows @ cols.T / tau_reg
    b, n = logits.shape
    i = torch.arange(b)
    keep = torch.ones(b, n, dtype=torch.bool)
    if row_labels is not None:
        keep &= row_labels.cpu()[:, None] != col_labels.cpu()[None, :]
    if col_valid is not None:
        keep &= col_valid.cpu()[None, :]
    keep[i, offset + i] = True
    return torch.logsumexp(logits.masked_fill(~keep, -float("inf")), 1) - logits[i, offset + i]


# name: (B, N, D, cols are the rows, offset, tau_reg, labels, col_valid). B and N of 37, 70, 83 leave partial
# Triton tiles (blocks of 16 to 64); tau_reg 1e-3 on unit rows gives logits of up to 1000.
MASK_CASES = {
    "duplicate_labels": (40, 40, 24, True, 0, 0.5, "duplicates", False),
    "duplicate_labels_gathered": (37, 83, 24, False, 29, 0.5, "duplicates", False),
    "excluded_columns": (37, 83, 24, False, 11, 0.5, None, True),
    "excluded_columns_self": (40, 40, 24, True, 0, 0.5, None, True),
    "both_gathered": (70, 83, 20, False, 13, 0.5, "duplicates", True),
    "both_self": (70, 70, 20, True, 0, 0.5, "duplicates", True),
    "all_equal_labels": (37, 83, 24, False, 29, 0.5, "equal", True),
    "large_logits": (37, 83, 16, False, 29, 1e-3, "duplicates", True),
    "large_logits_self": (40, 40, 16, True, 0, 1e-3, "duplicates", True),
}


def mask_inputs(b, n, d, same, offset, labels, valid, seed):
    """Unit rows and columns (float64, CPU), labels from 5 values (most columns share a row's label), equal
    labels, or none, and col_valid with about a third of the columns excluded (some rows' targets among them)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.nn.functional.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1)
    cols = rows if same else torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    col_labels = {"duplicates": torch.randint(0, 5, (n,), generator=g), "equal": torch.full((n,), 3),
                  None: None}[labels]
    row_labels = None if col_labels is None else col_labels[offset:offset + b].clone()
    col_valid = torch.rand(n, generator=g) > 0.35 if valid else None
    if valid:
        assert not col_valid[offset:offset + b].all() and col_valid.any(), "the test needs excluded targets"
    if labels == "duplicates":
        shared = (row_labels[:, None] == col_labels[None, :]).sum(1)
        assert (shared > 1).float().mean() > 0.5, "the test needs duplicates"
    return rows, cols, {"row_labels": row_labels, "col_labels": col_labels, "col_valid": col_valid}


def run_masked(fn, rows, cols, same, tau_reg, offset, masks, weights, dtype, device, tensor_tau):
    """(loss, d rows, d cols or None, d tau_reg or None) of fn at `dtype` on `device`, for the loss weighted by
    `weights` (the reduction is the caller's)."""
    r = rows.to(device, dtype).requires_grad_()
    c = r if same else cols.to(device, dtype).requires_grad_()
    tau = torch.tensor(tau_reg, dtype=dtype, device=device, requires_grad=True) if tensor_tau else tau_reg
    moved = {k: None if v is None else v.to(device) for k, v in masks.items()}
    loss = fn(r, c, tau, offset, **moved)
    wrt = [r] + ([] if same else [c]) + ([tau] if tensor_tau else [])
    grads = list(torch.autograd.grad((loss * weights.to(device, dtype)).sum(), wrt))
    return loss, grads.pop(0), None if same else grads.pop(0), grads.pop(0) if tensor_tau else None


def plain_masked(rows, cols, tau_reg, offset, **masks):
    return masked_infonce(rows, cols, tau_reg, offset, masks["row_labels"], masks["col_labels"], masks["col_valid"])


def contrastive_impl(name, device, dtype):
    """Backend `name`'s contrastive op; skips (naming the reason) when it refuses `dtype`: test_contrastive_dtype_
    support checks the refusals."""
    probe = torch.empty(2, 2, dtype=dtype, device=device)
    reason = backends.unsupported_reason("contrastive", name, (probe, probe))
    if reason is not None:
        pytest.skip(f"{name} refuses this input: {reason}")
    return backends.implementations("contrastive", device)[name]


@pytest.mark.parametrize("tensor_tau", [False, True], ids=["float_tau", "tensor_tau"])
@pytest.mark.parametrize("dtype", dtype_params(torch.float32, torch.float64))
@pytest.mark.parametrize("case", list(MASK_CASES))
@every_contrastive_backend
def test_contrastive_masks_match_the_contract(name, device, case, dtype, tensor_tau):
    """row_labels / col_labels and col_valid (backends.ContrastiveModule): loss and the gradients of rows, cols
    and a tensor tau_reg against float64 autograd of the contract written out (masked_infonce), by the accuracy
    rule with masked_infonce in the backend's dtype as the baseline; upstream gradient random."""
    b, n, d, same, offset, tau_reg, labels, valid = MASK_CASES[case]
    fn = contrastive_impl(name, device, dtype)
    rows, cols, masks = mask_inputs(b, n, d, same, offset, labels, valid, seed=b * n + d)
    weights = torch.randn(b, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    args = (rows, cols, same, tau_reg, offset, masks, weights)
    got = run_masked(fn, *args, dtype, device, tensor_tau)
    exact = run_masked(plain_masked, *args, torch.float64, "cpu", tensor_tau)
    base = run_masked(plain_masked, *args, dtype, "cpu", tensor_tau)
    assert got[0].dtype == compute_dtype(dtype) or got[0].dtype == torch.float32
    for what, a, e, bl in zip(("loss", "d rows", "d cols", "d tau_reg"), got, exact, base):
        if e is not None:
            assert_fa_close(a.cpu(), e, bl, what, fa_atol(got[0].dtype))
    if labels == "equal":  # every row keeps only its target: loss and gradients exactly 0
        for what, a in zip(("loss", "d rows", "d cols", "d tau_reg"), got):
            assert a is None or not a.any(), what


@pytest.mark.parametrize("same", [True, False], ids=["rows_are_columns", "gathered_columns"])
@every_contrastive_backend
def test_contrastive_unique_labels_change_nothing(name, device, same):
    """Labels that no two columns share remove nothing: loss and gradients bit for bit those without labels (and
    with every column valid), so the masked path computes exactly what the unmasked one does."""
    b, n, offset = (37, 37, 0) if same else (37, 83, 29)
    rows, cols, _ = mask_inputs(b, n, 24, same, offset, None, False, seed=3)
    col_labels = torch.randperm(n, generator=torch.Generator().manual_seed(4)) * 7
    masks = {"row_labels": col_labels[offset:offset + b].clone(), "col_labels": col_labels,
             "col_valid": torch.ones(n, dtype=torch.bool)}
    none = dict.fromkeys(masks)
    weights = torch.randn(b, dtype=torch.float64)
    fn = contrastive_impl(name, device, torch.float32)
    for tensor_tau in (False, True):
        plain = run_masked(fn, rows, cols, same, 0.3, offset, none, weights, torch.float32, device, tensor_tau)
        for kept in ({"row_labels", "col_labels"}, {"col_valid"}, set(masks)):
            given = {k: (v if k in kept else None) for k, v in masks.items()}
            out = run_masked(fn, rows, cols, same, 0.3, offset, given, weights, torch.float32, device, tensor_tau)
            for what, a, e in zip(("loss", "d rows", "d cols", "d tau_reg"), out, plain):
                assert (a is None and e is None) or torch.equal(a, e), f"{sorted(kept)}, tau {tensor_tau}: {what}"


@every_contrastive_backend
def test_contrastive_masks_are_checked(name, device):
    """Masks of the wrong type, dtype, shape or device, or labels without their other half: a TypeError or
    ValueError naming the argument, before any kernel runs."""
    fn = backends.implementations("contrastive", device)[name]
    rows, cols = torch.randn(4, 8, device=device), torch.randn(6, 8, device=device)
    labels = torch.zeros(6, dtype=torch.int64, device=device)
    bad = [
        (ValueError, "row_labels and col_labels", {"col_labels": labels}),
        (ValueError, "row_labels and col_labels", {"row_labels": labels[:4]}),
        (TypeError, "row_labels", {"row_labels": [0, 0, 0, 0], "col_labels": labels}),
        (TypeError, "col_labels", {"row_labels": labels[:4], "col_labels": labels.int()}),
        (ValueError, "row_labels", {"row_labels": labels, "col_labels": labels}),
        (ValueError, "col_labels", {"row_labels": labels[:4], "col_labels": labels[:5]}),
        (TypeError, "col_valid", {"col_valid": labels}),
        (ValueError, "col_valid", {"col_valid": torch.ones(6, 1, dtype=torch.bool, device=device)}),
        (ValueError, "col_valid", {"col_valid": torch.ones(6, dtype=torch.bool, device="meta")}),
    ]
    for error, argument, masks in bad:
        with pytest.raises(error, match=argument):
            fn(rows, cols, 0.5, 1, **masks)


@every_contrastive_backend
def test_contrastive_masks_compile_fullgraph(name, device):
    """The masks trace with torch.compile(fullgraph=True) (never read on the host): values and gradients as
    eager, through the symmetric path (rows are the columns) and the gathered one."""
    if interpreted(name, device):
        pytest.skip("Triton's interpreter cannot run on the fake tensors torch.compile traces with")
    torch._dynamo.reset()
    fn = backends.implementations("contrastive", device)[name]
    rows, cols, masks = mask_inputs(24, 40, 16, False, 9, "duplicates", True, seed=5)
    masks = {k: v.to(device) for k, v in masks.items()}
    rows, cols = rows.float().to(device), cols.float().to(device)

    def loss(r, c, tau):
        return (fn(r, c, tau, 9, **masks).sum() + fn(r, r, tau, 0, row_labels=masks["row_labels"],
                                                      col_labels=masks["row_labels"]).sum())

    compiled = torch.compile(loss, fullgraph=True, backend="inductor" if device == "cuda" else "aot_eager")
    results = []
    for f in (loss, compiled):
        r, c = rows.clone().requires_grad_(), cols.clone().requires_grad_()
        tau = torch.tensor(0.4, device=device, requires_grad=True)
        value = f(r, c, tau)
        results.append((value.detach(), *torch.autograd.grad(value, (r, c, tau))))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- GPU sizes


@pytest.mark.parametrize("name, device", [p for p in GRAM_EIG if p.values[1] == "cuda"])
def test_full_size_on_gpu(name, device):
    zs = modalities(correlated(4096, 4, 512, seed=15), device)
    check_gram_eig(name, zs, True)
    zs = modalities(correlated(1024, 16, 512, seed=16, dtype=torch.bfloat16), device)
    check_gram_eig(name, zs, True, grads=((True, True),))


@pytest.mark.parametrize("name, device", [p for p in CONTRASTIVE if p.values[1] == "cuda"])
def test_contrastive_full_size_on_gpu(name, device):
    check_contrastive(backends.implementations("contrastive", device)[name], device, 4096, 8192, 512, False, 20.0,
                      4096)  # logits ~ 512 / 20
