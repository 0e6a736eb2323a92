"""The compiled backends "cpp" (CPU) and "cuda" (CUDA) against the oracle, pmrl_kernels.reference.

Tolerance rule (FlashAttention's): a kernel that computes in float32 may be off the float64 reference by at
most twice what the reference itself is off when it runs in the same dtype, plus a small floor. float16/bfloat16
inputs are compared on the same rounded input. Where a quantity is not defined (the sign of a column that sums
to ~0, eigenvectors of a tied eigenvalue, lead at a tie of the top eigenvalue), the tests compare what is
defined instead: U diag(S^2) U^T against G, and lead against Zn^T u_1 / sigma_1 with the kernel's own u_1.

Tests that need the built extension skip when pmrl_kernels._C cannot be imported, unless
PMRL_REQUIRE_EXTENSION=1 (CI), where they fail.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import degenerate_cases, random_embeddings, requires_cuda
from pmrl_kernels import backends, gram_svd, pmrl_loss, reference
from pmrl_kernels.inputs import compute_dtype
from pmrl_kernels.ops import extension

ROOT = Path(__file__).resolve().parents[1]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
BACKEND = {"cpu": "cpp", "cuda": "cuda"}
SHAPES = [(1, 2, 1), (3, 2, 5), (7, 3, 33), (5, 4, 256), (4, 5, 3), (3, 7, 100), (2, 8, 257), (3, 11, 17),
          (17, 4, 64), (2, 13, 1000), (2, 16, 4096)]
ops = torch.ops.pmrl_kernels

every_device = pytest.mark.parametrize("device", DEVICES)
every_dtype = pytest.mark.parametrize("dtype", DTYPES)
every_shape = pytest.mark.parametrize("b,m,d", SHAPES)
every_degenerate_case = pytest.mark.parametrize("name", list(degenerate_cases()))


@pytest.fixture
def built():
    """The compiled kernels: skip without them, or fail where CI requires them (PMRL_REQUIRE_EXTENSION=1)."""
    if extension._C is None:
        message = f"pmrl_kernels._C is not built: {extension.IMPORT_ERROR}"
        if os.environ.get("PMRL_REQUIRE_EXTENSION") == "1":
            pytest.fail(message)
        pytest.skip(message)


needs_kernels = pytest.mark.usefixtures("built")


def f64(t):
    return None if t is None else t.detach().to("cpu", torch.float64)


def assert_within(actual, exact, baseline, what, floor):
    """max |actual - exact| <= 2 max |baseline - exact| + floor * max |exact|, NaN/Inf where exact has them."""
    actual, exact, baseline = f64(actual), f64(exact), f64(baseline)
    assert actual.shape == exact.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(exact.shape)}"
    bad = ~torch.isfinite(exact)
    assert torch.equal(~torch.isfinite(actual), bad), f"{what}: non-finite values at other places than expected"
    if bad.all():
        return
    scale = max(exact[~bad].abs().max().item(), 1.0)
    err = (actual - exact)[~bad].abs().max().item()
    base = (baseline - exact)[~bad].abs().max().item()
    assert err <= 2 * base + floor * scale, (
        f"{what}: max error {err:.3g} > 2 x {base:.3g} (reference in the same dtype) + {floor:g} x {scale:.3g}"
    )


def floor_for(dtype):
    return 1e-10 if dtype == torch.float64 else 1e-5


def inputs(z, device):
    return [t.to(device) for t in z.unbind(1)]


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


def check_forward(zs, normalize, s, u, lead):
    """S, U and lead of the kernel against the reference on the same (rounded) input."""
    dtype = zs[0].dtype
    exact = reference.gram_eig_forward([f64(z) for z in zs], normalize)
    base = reference.gram_eig_forward([z.cpu() for z in zs], normalize)  # same dtype as the kernel
    floor = floor_for(dtype)
    assert s.dtype == u.dtype == lead.dtype == compute_dtype(dtype)
    s64, u64, lead64 = exact
    # S^2 = eigenvalues of G is what is accurate; sqrt turns their rounding noise near 0 into sqrt(eps).
    assert_within(f64(s) ** 2, s64**2, f64(base[0]) ** 2, "S^2", floor)
    big = s64 > 1e-2 * s64[:, :1]
    assert_within(f64(s)[big], s64[big], f64(base[0])[big], "S (above the noise)", floor)

    # U where defined; U diag(S^2) U^T = G everywhere (ties included)
    cols = separated_columns(s64, u64)
    assert_within(f64(u).transpose(1, 2)[cols], u64.transpose(1, 2)[cols], f64(base[1]).transpose(1, 2)[cols],
                  "U (separated columns)", 1e3 * floor)

    def rebuilt(s_, u_):
        return f64(u_) @ torch.diag_embed(f64(s_) ** 2) @ f64(u_).transpose(1, 2)

    assert_within(rebuilt(s, u), rebuilt(s64, u64), rebuilt(*base[:2]), "U diag(S^2) U^T", floor)

    # lead where defined; everywhere, lead = Zn^T u_1 / sigma_1 with the kernel's own u_1 and sigma_1
    rows = top_separated(s64, u64)
    assert_within(f64(lead)[rows], lead64[rows], f64(base[2])[rows], "lead", 1e3 * floor)
    zn, _ = reference.stack_rows([f64(z) for z in zs], normalize)
    s1 = f64(s)[:, :1]
    own = (f64(u)[:, :, :1].transpose(1, 2) @ zn).squeeze(1) * reference.safe_inverse(s1, torch.finfo(s.dtype).tiny)
    assert_within(lead, own, own, "lead = Zn^T u_1 / sigma_1", 10 * floor)


def check_backward(zs, normalize, with_grad_s, with_grad_lead, seed=0):
    """dL/dz of the kernel, from its own S, U, lead, against the reference backward on the same values."""
    s, u, lead = ops.gram_eig(zs, normalize)
    g = torch.Generator().manual_seed(seed)
    grad_s = torch.randn(s.shape, generator=g, dtype=s.dtype).to(s.device) if with_grad_s else None
    grad_lead = torch.randn(lead.shape, generator=g, dtype=s.dtype).to(s.device) if with_grad_lead else None
    dz = ops.gram_eig_backward(zs, s, u, lead, grad_s, grad_lead, normalize)
    assert dz.dtype == zs[0].dtype and dz.shape == (zs[0].shape[0], len(zs), zs[0].shape[1])
    exact = reference.gram_eig_backward([f64(z) for z in zs], f64(s), f64(u), f64(lead), f64(grad_s), f64(grad_lead),
                                        normalize)
    cpu = [None if t is None else t.cpu() for t in (s, u, lead, grad_s, grad_lead)]
    base = reference.gram_eig_backward([z.cpu() for z in zs], *cpu, normalize)
    assert_within(dz, exact, base, f"dz (normalize={normalize}, grad_S={with_grad_s}, grad_lead={with_grad_lead})",
                  floor_for(zs[0].dtype))


@needs_kernels
@every_device
@every_dtype
@every_shape
def test_forward_matches_reference(b, m, d, dtype, device):
    zs = inputs(random_embeddings(b, m, d, dtype, seed=b * 100 + m * 10 + d), device)
    for normalize in (True, False):
        check_forward(zs, normalize, *ops.gram_eig(zs, normalize))


@needs_kernels
@every_device
@every_dtype
@every_shape
def test_backward_matches_reference(b, m, d, dtype, device):
    zs = inputs(random_embeddings(b, m, d, dtype, seed=b + m + d), device)
    for normalize in (True, False):
        for with_grad_s, with_grad_lead in ((True, True), (True, False), (False, True)):
            check_backward(zs, normalize, with_grad_s, with_grad_lead)


@needs_kernels
@every_device
@every_dtype
@every_degenerate_case
def test_degenerate_inputs(name, dtype, device):
    """S, U, lead and the backward everywhere; pmrl_loss values everywhere, and its gradients where they are
    defined (the top eigenvalue of every instance separated: at a tie the gradient of sigma_1 depends on which
    eigenvector the solver calls first)."""
    z = degenerate_cases(dtype)[name].to(device)
    zs = list(z.unbind(1))
    for normalize in (True, False):
        check_forward(zs, normalize, *ops.gram_eig(zs, normalize))
        check_backward(zs, normalize, True, True)
    defined = top_separated(*reference.gram_eig_forward([f64(t) for t in zs], True)[:2]).all()
    check_loss(z, BACKEND[device], gradients=bool(defined))


def check_loss(z, backend, gradients=True, **kwargs):
    results = {}
    for key, x, be in (("kernel", z, backend), ("exact", f64(z), "reference"), ("base", z.cpu(), "reference")):
        x = x.detach().clone().requires_grad_()
        parts = pmrl_loss(x, backend=be, output_dict=True, **kwargs)
        (parts["loss"] * 3.0).backward()  # grad_output != 1
        results[key] = parts, x.grad
    floor = floor_for(z.dtype)
    for part in ("loss", "align", "reg"):
        assert_within(*(results[k][0][part] for k in ("kernel", "exact", "base")), part, floor)
    if gradients:
        assert_within(*(results[k][1] for k in ("kernel", "exact", "base")), "dL/dz", floor)


@needs_kernels
@every_device
@every_dtype
@pytest.mark.parametrize("b,m,d", [(9, 2, 7), (16, 4, 256), (5, 6, 31), (3, 16, 129)])
@pytest.mark.parametrize("kwargs", [{}, {"reg_weight": 0.0, "tau": 0.01}, {"normalize": False, "reduction": "sum"}])
def test_loss_matches_reference(b, m, d, dtype, device, kwargs):
    # Rows around a common direction per instance, as in training: lead's sign is then defined everywhere (with
    # independent rows, M = 2 and z_1 . z_2 < 0 give u_1 = (1, -1) / sqrt(2), whose sum is 0 up to rounding).
    z = random_embeddings(b, m + 1, d, seed=b * m * d)
    check_loss((3 * z[:, :1] + z[:, 1:]).to(dtype).to(device), BACKEND[device], **kwargs)


@needs_kernels
@every_device
def test_list_and_tensor_input_agree(device):
    z = random_embeddings(6, 3, 40, torch.float32, device=device)
    x_tensor = z.clone().requires_grad_()
    x_list = [t.clone().requires_grad_() for t in z.unbind(1)]
    out_tensor = gram_svd(x_tensor, backend=BACKEND[device])
    out_list = gram_svd(x_list, backend=BACKEND[device])
    for a, b in zip(out_tensor, out_list):
        assert torch.equal(a, b)
    (out_tensor.S.sum() + out_tensor.lead.square().sum() * 0 + out_tensor.lead[:, 0].sum()).backward()
    (out_list.S.sum() + out_list.lead.square().sum() * 0 + out_list.lead[:, 0].sum()).backward()
    assert torch.equal(x_tensor.grad, torch.stack([x.grad for x in x_list], 1))


@needs_kernels
@every_device
def test_list_input_gradients_are_views_not_copies(device):
    # the backward writes dL/dz modality-major, so each modality's gradient is a contiguous view autograd keeps
    b, m, d = 8, 3, 32
    xs = [t.contiguous().requires_grad_() for t in random_embeddings(b, m, d, torch.float32, device=device).unbind(1)]
    pmrl_loss(xs, backend=BACKEND[device]).backward()
    offsets = [x.grad.data_ptr() - xs[0].grad.data_ptr() for x in xs]
    assert offsets == [k * b * d * 4 for k in range(m)]
    assert all(x.grad.is_contiguous() for x in xs)


@needs_kernels
def test_auto_picks_the_extension_on_cpu():
    assert backends.resolve("auto", list(torch.randn(2, 3, 4).unbind(1))) is extension


def layouts(z):
    """The same [B, M, D] values as M tensors of different strides."""
    b, m, d = z.shape
    padded = torch.zeros(b, m, d + 3, dtype=z.dtype, device=z.device)
    padded[:, :, 1:d + 1] = z
    spread = torch.zeros(b, m, 2 * d, dtype=z.dtype, device=z.device)
    spread[:, :, ::2] = z
    return {
        "separate tensors": [t.contiguous() for t in z.unbind(1)],
        "views of [B, M, D]": list(z.unbind(1)),
        "views of [M, B, D]": list(z.transpose(0, 1).contiguous().unbind(0)),
        "row padding, odd offset": list(padded[:, :, 1:d + 1].unbind(1)),
        "feature stride 2": list(spread[:, :, ::2].unbind(1)),
        "broadcast rows": [t[:1].expand(b, d) for t in z.unbind(1)],
    }


@needs_kernels
@every_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs_read_in_place(dtype, device):
    z = random_embeddings(5, 3, 24, dtype, device=device)
    for name, zs in layouts(z).items():
        dense = [t.contiguous() for t in zs]
        s, u, lead = ops.gram_eig(zs, True)
        expected = ops.gram_eig(dense, True)
        for got, want in zip((s, u, lead), expected):
            assert torch.equal(got, want), name
        grad_s, grad_lead = torch.ones_like(s), torch.ones_like(lead)
        assert torch.equal(ops.gram_eig_backward(zs, s, u, lead, grad_s, grad_lead, True),
                           ops.gram_eig_backward(dense, s, u, lead, grad_s, grad_lead, True)), name


@needs_kernels
@every_device
@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_input_stays_in_its_instance(bad_value, device):
    z = random_embeddings(6, 4, 16, torch.float32, device=device)
    z[3, 1, 5] = bad_value
    zs = list(z.unbind(1))
    s, u, lead = ops.gram_eig(zs, True)
    dz = ops.gram_eig_backward(zs, s, u, lead, torch.ones_like(s), torch.ones_like(lead), True)
    for t in (s, u, lead, dz):
        assert t[3].isnan().all()
        assert torch.isfinite(torch.cat([t[:3], t[4:]])).all()


@needs_kernels
@requires_cuda
def test_cuda_uses_the_current_stream_and_never_syncs():
    z = random_embeddings(64, 4, 96, torch.float32, device="cuda")
    xs = [t.contiguous().requires_grad_() for t in z.unbind(1)]
    expected = pmrl_loss(xs, backend="cuda")
    (grad_expected,) = torch.autograd.grad(expected, xs[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    torch.cuda.set_sync_debug_mode("error")  # any device-to-host synchronisation raises
    try:
        with torch.cuda.stream(stream):
            parts = pmrl_loss(xs, backend="cuda", output_dict=True)
            loss = parts["align"] + parts["reg"]
            (grad,) = torch.autograd.grad(loss, xs[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, grad_expected)


def sample_inputs(device):
    """(args, kwargs) for torch.library.opcheck of both ops."""
    samples = []
    for (b, m, d), dtype, normalize in [((3, 2, 5), torch.float32, True), ((4, 5, 16), torch.float64, False),
                                        ((2, 3, 8), torch.bfloat16, True), ((5, 16, 3), torch.float16, True)]:
        zs = list(random_embeddings(b, m, d, dtype, device=device).unbind(1))
        samples.append(("gram_eig", (zs, normalize)))
        s, u, lead = ops.gram_eig(zs, normalize)
        for grad_s, grad_lead in ((torch.randn_like(s), torch.randn_like(lead)), (None, torch.randn_like(lead)),
                                  (torch.randn_like(s), None)):
            samples.append(("gram_eig_backward", (zs, s, u, lead, grad_s, grad_lead, normalize)))
    return samples


@needs_kernels
@every_device
def test_opcheck(device):
    for name, args in sample_inputs(device):
        torch.library.opcheck(getattr(ops, name).default, args)


@needs_kernels
@every_device
@pytest.mark.parametrize("reg_weight", [1.0, 0.0])
def test_compile_fullgraph_matches_eager(device, reg_weight):
    z = random_embeddings(32, 4, 64, torch.float32, device=device)
    zs = list(z.unbind(1))
    # backends.resolve imports modules, which dynamo does not trace: pick the backend outside the graph.
    impl = backends.resolve(BACKEND[device], zs)

    def loss(x):
        s, _, lead = impl.gram_eig(list(x.unbind(1)), True)
        out = reference.alignment(s, 0.05)
        if reg_weight:
            out = out + reg_weight * reference.contrastive(lead, lead, 0.1)
        return out.mean()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        x = z.clone().requires_grad_()
        value = fn(x)
        value.backward()
        results.append((value.detach(), x.grad))
    (v_eager, g_eager), (v_compiled, g_compiled) = results
    torch.testing.assert_close(v_compiled, v_eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_unsupported_inputs():
    z = torch.randn(3, 17, 8)
    assert "17" in extension.unsupported_reason(list(z.unbind(1)))
    with pytest.raises(ValueError, match="cannot take this input"):
        pmrl_loss(z, backend="cpp")
    auto = pmrl_loss(z, backend="auto")  # falls back to the reference
    assert torch.equal(auto, pmrl_loss(z, backend="reference"))
    assert "meta" in extension.unsupported_reason(list(torch.randn(3, 2, 8, device="meta").unbind(1)))
    assert not extension.is_available("meta")
    with pytest.raises(TypeError):
        pmrl_loss(torch.ones(3, 2, 8, dtype=torch.int32), backend="cpp")


@needs_kernels
def test_ops_check_their_arguments():
    zs = list(torch.randn(3, 4, 8).unbind(1))
    s, u, lead = ops.gram_eig(zs, True)
    for bad in ([zs[0]], zs * 5, zs[:3] + [torch.randn(3, 9)], zs[:3] + [zs[3].double()],
                [torch.randn(3, 2, 4)] * 2, zs[:3] + [zs[3].to(torch.int32)]):
        with pytest.raises(RuntimeError, match="pmrl_kernels"):
            ops.gram_eig(bad, True)
    with pytest.raises(RuntimeError, match="S must have shape"):
        ops.gram_eig_backward(zs, s[:, :3], u, lead, None, None, True)
    with pytest.raises(RuntimeError, match="grad_lead must have shape"):
        ops.gram_eig_backward(zs, s, u, lead, None, lead[:, :4], True)


def test_header_maths_ctest(tmp_path):
    """Build the C++ self-checks of the header maths with CMake (no torch needed) and run them through ctest."""
    cmake, ctest = shutil.which("cmake"), shutil.which("ctest")
    if cmake is None or ctest is None or not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("cmake, ctest or a C++ compiler is missing")
    build = tmp_path / "build"
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DPMRL_BUILD_EXTENSION=OFF"], check=True,
                   capture_output=True)
    subprocess.run([cmake, "--build", str(build), "--target", "test_header_maths"], check=True, capture_output=True)
    result = subprocess.run([ctest, "--test-dir", str(build), "--output-on-failure"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cuda_sources_compile(tmp_path):
    """Each .cu file compiles with a bare nvcc (no torch headers), as CI does; the files build in parallel."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    sources = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    assert sources
    jobs = [
        (src, subprocess.Popen([nvcc, "-c", "-std=c++17", "-arch=sm_90", f"-I{ROOT / 'csrc' / 'include'}", str(src),
                                "-o", str(tmp_path / f"{src.stem}.o")], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True))
        for src in sources
    ]
    for src, job in jobs:
        output, _ = job.communicate()
        assert job.returncode == 0, f"{src.name}:\n{output}"


@needs_kernels
@every_device
def test_sign_ties_are_broken_like_the_reference(device):
    # M = 2 with the rows pointing apart: u_1 = (1, -1)/sqrt 2 sums to exactly 0, so only the tie-break rule
    # (reference.canonical_sign) fixes the sign of lead and U; the kernel must follow it, not rounding
    z = random_embeddings(64, 2, 9, seed=21)
    z[:, 1] = -z[:, 0] + 0.3 * z[:, 1]
    for dtype in (torch.float64, torch.float32):
        x = z.to(dtype)
        s, u, lead = torch.ops.pmrl_kernels.gram_eig(inputs(x, device), True)
        ref = reference.gram_eig_forward(list(x.unbind(1)), True)
        assert (ref[1][:, :, 0].sum(-1).abs() < reference.SIGN_TOL).all(), "the test needs sign ties"
        assert torch.equal(torch.sign(u.cpu()), torch.sign(ref[1])), dtype
        assert torch.equal(torch.sign(lead.cpu()), torch.sign(ref[2])), dtype


@needs_kernels
@every_device
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rows_shorter_than_norm_eps(dtype, device):
    # 0 < ||z_m|| < NORM_EPS: F.normalize divides by NORM_EPS, so zn_m is not a unit vector, and the projection of the
    # normalisation backward is skipped for that row (reference.gram_eig_backward). An all-zero row cannot tell
    # whether a kernel skips it too: its radial part is 0 either way.
    z = random_embeddings(6, 4, 16, seed=31)
    z = 3 * z[:, :1] + z  # correlated rows: lead and its sign are defined
    z[:, 1] *= 0.3 * reference.NORM_EPS / z[:, 1].norm(dim=-1, keepdim=True)
    zs = inputs(z.to(dtype), device)
    check_forward(zs, True, *ops.gram_eig(zs, True))
    for with_grad_s, with_grad_lead in ((True, True), (True, False), (False, True)):
        check_backward(zs, True, with_grad_s, with_grad_lead)
