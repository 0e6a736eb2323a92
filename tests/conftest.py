"""Test set-up and the helpers every test file shares.

Without a GPU, Triton kernels run under its interpreter: TRITON_INTERPRET must be set before triton is first
imported, so it is set here, before any test module imports the package.

Accuracy rule (FlashAttention's), the one every kernel test uses (`assert_fa_close`): a kernel may be off the
float64 reference by at most twice what PyTorch (the reference backend) is off when it computes in the kernel's
dtype, plus a small floor: max |kernel - ref64| <= 2 max |ref_same_dtype - ref64| + atol * max(1, max |ref64|),
with NaN/Inf at exactly the places where the float64 reference has them.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="pmrl_triton_cache_"))

import pytest  # noqa: E402

from pmrl_kernels import terms  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str = "") -> None:
    """allclose that names NaN/Inf and the worst mismatch instead of a bare False."""
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad_a = ~torch.isfinite(actual)
    bad_e = ~torch.isfinite(expected)
    assert torch.equal(bad_a, bad_e), (
        f"{what}: non-finite values differ: actual has {int(bad_a.sum())} at {bad_a.nonzero()[:5].tolist()}, "
        f"expected {int(bad_e.sum())}"
    )
    a, e = actual[~bad_a], expected[~bad_e]
    err = (a - e).abs() - (atol + rtol * e.abs())
    if err.numel() and err.max() > 0:
        i = int(err.argmax())
        idx = (~bad_a).nonzero()[i].tolist()
        raise AssertionError(
            f"{what}: {int((err > 0).sum())}/{err.numel()} elements differ beyond atol={atol}, rtol={rtol}; "
            f"worst at {idx}: {a[i].item():.6g} vs {e[i].item():.6g}"
        )


# ----------------------------------------------------------------------------------------------- accuracy rule


def f64(t):
    """t as a float64 CPU tensor without gradient (None stays None)."""
    return None if t is None else t.detach().to("cpu", torch.float64)


def fa_atol(dtype: torch.dtype) -> float:
    """The floor of the accuracy rule for a kernel fed `dtype`: float64 is computed in float64, the rest in
    float32."""
    return 1e-10 if dtype == torch.float64 else 1e-5


def assert_fa_close(actual, exact, baseline, what: str, atol: float) -> None:
    """FlashAttention's rule: max |actual - exact| <= 2 max |baseline - exact| + atol * max(1, max |exact|).

    exact: the float64 reference; baseline: PyTorch (the reference backend) run in the dtype the kernel computes
    in, on the same input. NaN/Inf must sit where they sit in exact.
    """
    actual, exact, baseline = f64(actual), f64(exact), f64(baseline)
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    assert baseline.shape == exact.shape, f"{what}: baseline shape {tuple(baseline.shape)} != {tuple(exact.shape)}"
    bad = ~torch.isfinite(exact)
    assert torch.equal(~torch.isfinite(actual), bad), (
        f"{what}: non-finite values at other places than in the float64 reference "
        f"({int((~torch.isfinite(actual)).sum())} vs {int(bad.sum())})"
    )
    if bad.all():
        return
    scale = max(exact[~bad].abs().max().item(), 1.0)
    diff = (actual - exact)[~bad].abs()
    err = diff.max().item()
    base = (baseline - exact)[~bad].nan_to_num(float("inf")).abs().max().item()
    allowed = 2 * base + atol * scale
    if err > allowed:
        worst = (~bad).nonzero()[int(diff.argmax())].tolist()
        raise AssertionError(
            f"{what}: max error {err:.3g} at {worst} > 2 x {base:.3g} (reference in the same dtype) + {atol:g} x "
            f"{scale:.3g}"
        )


# ----------------------------------------------------------------------------------------------- inputs


def random_embeddings(b, m, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


def correlated(b, m, d, seed=0, dtype=torch.float32, device="cpu"):
    """Random embeddings sharing a direction per instance, as in training: lead's sign is well defined."""
    z = random_embeddings(b, m, d, seed=seed) + 2 * random_embeddings(b, 1, d, seed=seed + 1)
    return z.to(device=device, dtype=dtype)


def degenerate_cases(dtype=torch.float64, d=16):
    """Named [B, M, D] inputs that training really produces and that break plain SVD autograd."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 1, d, generator=g, dtype=torch.float64)
    cases = {
        # every modality the same direction (scaled): sigma_2..M = 0
        "rank1_optimum": base.expand(6, 4, d) * torch.rand(6, 4, 1, generator=g, dtype=torch.float64).add(0.5),
        # two modalities identical, the others random
        "duplicated_modality": torch.cat([base, base, torch.randn(6, 2, d, generator=g, dtype=torch.float64)], 1),
        # one modality all zeros
        "zero_row": torch.cat([torch.zeros(6, 1, d, dtype=torch.float64),
                               torch.randn(6, 3, d, generator=g, dtype=torch.float64)], 1),
        # D < M: sigma_{D+1..M} = 0
        "d_less_than_m": torch.randn(6, 5, 3, generator=g, dtype=torch.float64),
        # orthonormal rows: G = I, every eigenvalue tied
        "orthonormal_tie": torch.eye(d, dtype=torch.float64)[:4].expand(6, 4, d).clone(),
        # near-tie at initialisation: high-D random rows give G close to I
        "near_tie_init": torch.randn(6, 4, 4096, generator=g, dtype=torch.float64),
        # rank-1 plus a tiny perturbation: sigma_2.. at the fp32 noise level
        "near_rank1": base.expand(6, 4, d) + 1e-5 * torch.randn(6, 4, d, generator=g, dtype=torch.float64),
    }
    return {k: v.to(dtype) for k, v in cases.items()}


# ----------------------------------------------------------------------------------------------- contrastive op


def check_contrastive(fn, device, b, n, d, same, tau, offset, seed=12):
    """A contrastive op `fn(rows, cols, tau_reg, offset)` on float32 input: values and gradients (w.r.t. rows and
    cols, upstream gradient random) against terms.contrastive in float64, by the accuracy rule with
    terms.contrastive in float32 as the baseline. With logits of ~100 the softmax is one-hot: computed from the
    float32 logits, P_ii - 1 is resolved only to an ulp of the logit (~1e-5)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(b, d, generator=g)
    cols = rows if same else torch.randn(n, d, generator=g)
    grad = torch.randn(b, generator=g)
    results = []
    for impl, dtype, dev in ((fn, torch.float32, device), (terms.contrastive, torch.float32, "cpu"),
                             (terms.contrastive, torch.float64, "cpu")):
        r = rows.to(device=dev, dtype=dtype).requires_grad_()
        c = r if same else cols.to(device=dev, dtype=dtype).requires_grad_()
        loss = impl(r, c, tau, offset)
        results.append((loss, *torch.autograd.grad(loss, (r,) if same else (r, c), grad.to(device=dev, dtype=dtype))))
    assert results[0][0].dtype == torch.float32 and results[0][0].shape == (b,)
    assert results[0][0].device.type == torch.device(device).type
    for name, actual, base, exact in zip(("loss", "d rows", "d cols"), *results):
        assert_fa_close(actual, exact, base, name, 1e-5)


NEAR_OPTIMUM_MARGINS = [30.0, 20.0, 3.0, 0.5, -5.0]


def check_contrastive_near_optimum(fn, device, margin, seed=8):
    """A contrastive op `fn(rows, cols, tau_reg, offset)` with each target logit `margin` above the row's largest
    other logit (the others uniform in [-10, 10]): at margins 20-30 the loss is ~1e-9-1e-13. Columns are unit
    vectors, so the float32 logits are the rows' entries exactly and any error is the softmax's: the loss to 1e-5
    relative, its gradient by the accuracy rule, against float64."""
    g = torch.Generator().manual_seed(seed)
    n, d = 40, 48
    logits = torch.rand(n, n, generator=g) * 20.0 - 10.0
    others = logits.masked_fill(torch.eye(n, dtype=torch.bool), -float("inf")).max(1).values
    logits[range(n), range(n)] = others + margin
    rows = torch.cat([logits, torch.randn(n, d - n, generator=g)], 1)
    cols = torch.eye(n, d)
    grad = torch.randn(n, generator=g)
    results = []
    for dtype, dev, impl in ((torch.float64, "cpu", terms.contrastive), (torch.float32, "cpu", terms.contrastive),
                             (torch.float32, device, fn)):
        r = rows.to(dev, dtype).requires_grad_()
        loss = impl(r, cols.to(dev, dtype), 1.0, 0)
        results.append((f64(loss), *torch.autograd.grad(loss, r, grad.to(dev, dtype))))
    (_, exact_grad), (_, base_grad), (loss, d_rows) = results
    # logsumexp - s_target cancels in float64 too (an ulp of 40 is 7e-15): the loss in its log1p form
    gaps = f64(logits) - f64(torch.diagonal(logits))[:, None]
    exact = torch.log1p(gaps.masked_fill(torch.eye(n, dtype=torch.bool), -float("inf")).exp().sum(1))
    rel = ((loss - exact).abs() / exact).max().item()
    assert rel < 1e-5, f"loss: relative error {rel:.3g} (smallest loss {exact.min().item():.3g})"
    assert_fa_close(d_rows, exact_grad, base_grad, "d rows", 1e-5)
    # with unit columns, d rows_ii = g_i (P_ii - 1): its relative precision is that of P - 1 = expm1(-loss), which
    # exp(-loss) - 1 would lose (0 at a loss of 1e-13); so does float64 autograd of cross_entropy, so the exact
    # value comes from the log1p form as well
    target, target_exact = torch.diagonal(d_rows), f64(grad) * torch.expm1(-exact)
    rel = ((target - target_exact).abs() / target_exact.abs()).max().item()
    assert rel < 1e-5, f"d rows at the targets: relative error {rel:.3g}"


def check_contrastive_at_large_logits(fn, device, seed=1):
    """A contrastive op at losses of ~1e5: rows of norm ~85 at tau_reg 0.05, each row's nearest column (a near-copy
    of another row) not its target; values and gradients by the accuracy rule (torch's float32 softmax is off by
    4e-4 in d rows here)."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(20, 8, generator=g) * 30
    cols = rows[torch.randperm(20, generator=g)].repeat(3, 1) + 1e-3 * torch.randn(60, 8, generator=g)
    grad = torch.randn(20, generator=g)
    results = []
    for impl, dtype, dev in ((fn, torch.float32, device), (terms.contrastive, torch.float32, "cpu"),
                             (terms.contrastive, torch.float64, "cpu")):
        r, c = rows.to(dev, dtype).requires_grad_(), cols.to(dev, dtype).requires_grad_()
        loss = impl(r, c, 0.05, 17)
        results.append((loss, *torch.autograd.grad(loss, (r, c), grad.to(dev, dtype))))
    assert f64(results[2][0]).max() > 1e4
    for what, got, base, exact in zip(("loss", "d rows", "d cols"), *results):
        assert_fa_close(got, exact, base, what, fa_atol(torch.float32))


def check_contrastive_under_autocast(fn, device, dtype, seed=5):
    """A contrastive op under torch.autocast with 16-bit `dtype`: by the accuracy rule, with terms.contrastive
    under torch.autocast (CPU) as the baseline in the same precision; the loss comes back in float32."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(40, 32, generator=g)
    cols = torch.randn(50, 32, generator=g)
    grad = torch.randn(40, generator=g)
    results = []
    for kind in ("kernel", "base", "exact"):
        dev = device if kind == "kernel" else "cpu"
        work = torch.float64 if kind == "exact" else torch.float32
        r = rows.to(dev, work).requires_grad_()
        c = cols.to(dev, work).requires_grad_()
        impl = fn if kind == "kernel" else terms.contrastive
        with torch.autocast(dev, dtype=dtype, enabled=kind != "exact"):
            loss = impl(r, c, 0.5, 10)
        results.append((loss, *torch.autograd.grad(loss, (r, c), grad.to(dev, loss.dtype))))
    assert results[0][0].dtype == torch.float32
    for name, actual, base, exact in zip(("loss", "d rows", "d cols"), *results):
        assert_fa_close(actual, exact, base, name, 1e-5)


@pytest.fixture(scope="session")
def static_report(tmp_path_factory):
    """benchmarks/static_check.py's report (every CUDA and Triton kernel compiled for sm_90, or read from its cache
    when the sources are unchanged), shared by the `sm90` tests of tests/test_static_gpu.py. Its path is
    report["path"]."""
    root = Path(__file__).resolve().parents[1]
    path = tmp_path_factory.mktemp("static") / "static_report.json"
    # the Triton compiler, not the interpreter; its own cache, so that the compiles are real
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(path.parent / "triton_cache")
    result = subprocess.run([sys.executable, str(root / "benchmarks" / "static_check.py"), "--json", str(path)],
                            cwd=root, env=env, capture_output=True, text=True)
    assert path.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(path.read_text())
    report["path"] = str(path)
    return report


@pytest.fixture
def compiled_extension():
    """pmrl_kernels._C: skip without it, or fail where CI requires it (PMRL_REQUIRE_EXTENSION=1)."""
    from pmrl_kernels.ops import extension

    module = extension.load()
    if module is None:
        message = f"the C++ extension is unavailable: {extension.load_error()}"
        if os.environ.get("PMRL_REQUIRE_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return module
