"""Triton backend against the float64 reference: gram_eig forward/backward, the tiled contrastive term, the
backend interface, sm_90 compilation of every kernel, and (on a GPU only) full size and torch.compile.

Without a GPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1), which costs per
operation: sizes are small and each launch holds many instances per program.

Accuracy rule (FlashAttention's): |triton - fp64 reference| <= 2 |reference in the input's dtype - fp64
reference| + atol, per tensor in the max norm, with the same NaN pattern (the reference computes fp32 and
half-precision input in fp32, as the kernels do).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import assert_close, degenerate_cases, random_embeddings, requires_cuda
from pmrl_kernels import pmrl_loss, reference

triton_gram = pytest.importorskip("pmrl_kernels.ops.triton_gram")
from pmrl_kernels.ops import triton_contrastive  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------- helpers


def assert_fp32_accurate(actual, ref32, ref64, atol, what):
    actual, ref32, ref64 = (t.detach().to(torch.float64).cpu() for t in (actual, ref32, ref64))
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert torch.equal(actual.isnan(), ref64.isnan()), f"{what}: NaN pattern differs from the reference"
    err = (actual - ref64).nan_to_num(0).abs().max().item()
    allowed = 2 * (ref32 - ref64).nan_to_num(0).abs().max().item() + atol
    assert err <= allowed, f"{what}: max error {err:.3g} vs fp64 exceeds 2 x fp32 reference's + atol = {allowed:.3g}"


def modalities(z, as_list):
    """The M inputs [B, D]: views of z [B, M, D] (tensor input) or separate contiguous tensors (list input)."""
    return [t.contiguous() for t in z.unbind(1)] if as_list else list(z.unbind(1))


def correlated(b, m, d, seed=0, dtype=torch.float32):
    """Random embeddings sharing a direction per instance, as in training: lead's sign is well defined."""
    z = random_embeddings(b, m, d, seed=seed) + 2 * random_embeddings(b, 1, d, seed=seed + 1)
    return z.to(dtype)


def references(z, normalize):
    """reference.gram_eig on z in its own dtype (computed in fp32, half-precision dZ for half input) and in
    float64, each on inputs that require grad."""
    out = []
    for dtype in (z.dtype, torch.float64):
        zs = [t.detach().to(dtype).requires_grad_() for t in z.unbind(1)]
        out.append((zs, reference.gram_eig(zs, normalize)))
    return out


def backward_pair(outputs, zs, grad_s, grad_lead):
    s, _, lead = outputs
    pairs = [(t, g.to(device=t.device, dtype=t.dtype)) for t, g in ((s, grad_s), (lead, grad_lead)) if g is not None]
    return torch.autograd.grad([p[0] for p in pairs], zs, [p[1] for p in pairs])


def check_gram_eig(z, normalize, grads=("s", "lead"), as_list=False, s_atol=1e-5, atol=1e-5, unique_u=True,
                   unique_lead=True):
    """gram_eig forward (and backward for the gradients named in grads) against the references, by the fp32 rule.

    z: [B, M, D]. unique_u=False: a repeated eigenvalue, U's columns there are any basis of its eigenspace, so U
    is not compared; unique_lead=False: the top one is repeated, so neither are lead and dZ (only finiteness).
    """
    b, m, d = z.shape
    zs = [t.requires_grad_() for t in modalities(z.to(DEVICE), as_list)]
    out = triton_gram.gram_eig(zs, normalize)
    assert all(t.dtype == torch.float32 for t in out)
    g = torch.Generator().manual_seed(3)
    grad_s = torch.randn(b, m, generator=g) if "s" in grads else None
    grad_lead = torch.randn(b, d, generator=g) if "lead" in grads else None
    dz = torch.stack(backward_pair(out, zs, grad_s, grad_lead), 1) if grads else None
    (zs32, out32), (zs64, out64) = references(z.cpu(), normalize)
    assert_fp32_accurate(out[0], out32[0], out64[0], s_atol, "S")
    if not unique_lead:
        assert all(torch.isfinite(t).all() for t in (*out, dz) if t is not None), "non-finite output"
        return
    u, lead, u32, lead32 = out[1], out[2], out32[1], out32[2]
    if unique_u:
        assert_fp32_accurate(u, u32, out64[1], atol, "U")
    assert_fp32_accurate(lead, lead32, out64[2], atol, "lead")
    if grads:
        ref32, ref64 = (torch.stack(backward_pair(o, zs_ref, grad_s, grad_lead), 1)
                        for zs_ref, o in ((zs32, out32), (zs64, out64)))
        assert dz.dtype == z.dtype
        assert_fp32_accurate(dz, ref32, ref64, atol, "dZ")


# ----------------------------------------------------------------------------------------------- gram_eig


@pytest.mark.parametrize("m, as_list, normalize", [(2, False, True), (2, True, False), (3, True, True),
                                                    (5, False, True), (5, True, False)])
def test_forward_matches_reference(m, as_list, normalize):
    """Uncorrelated rows (for M = 2 half of them are sign ties, resolved by reference.canonical_sign). 2 programs (64 instances each); the D loop
    runs 2 chunks when compiled, 1 in the interpreter (its multi-chunk case is near_tie_init, D = 4096)."""
    z = random_embeddings(70, m, 80, seed=m, dtype=torch.float32)
    check_gram_eig(z, normalize, grads=(), as_list=as_list, s_atol=1e-6 if normalize else 1e-5)


@pytest.mark.parametrize("m, normalize, grads", [
    (2, True, ("s", "lead")), (2, False, ("lead",)), (3, True, ("s", "lead")),
    (4, True, ("s",)), (4, True, ("lead",)), (4, False, ("s", "lead")),
])
def test_backward_matches_reference(m, normalize, grads):
    check_gram_eig(correlated(70, m, 80, seed=10 + m), normalize, grads, as_list=True)


def test_backward_with_broadcast_gradient():
    """lead.sum() sends a stride-0 (expanded) gradient; S unused gives no gradient for it at all."""
    z = correlated(40, 3, 24, seed=4).to(DEVICE)
    zs = [t.requires_grad_() for t in modalities(z, as_list=False)]
    _, _, lead = triton_gram.gram_eig(zs, True)
    dz = torch.autograd.grad(lead.sum(), zs)
    zs64 = [t.detach().double().cpu().requires_grad_() for t in zs]
    dz64 = torch.autograd.grad(reference.gram_eig(zs64, True)[2].sum(), zs64)
    for k in range(3):
        assert_close(dz[k], dz64[k], atol=1e-4, rtol=1e-4, what=f"dz[{k}]")


# Repeated eigenvalues: G = I (any orthonormal basis is an eigenbasis, lead too is any unit vector of the span),
# and a repeated 0 (lead and its gradient are unique; the gradient through S is not: it weights each basis
# vector of the zero eigenspace by its own dL/dsigma_k, and the sigma_k there are fp32 noise).
DEGENERATE = {
    "orthonormal_tie": dict(unique_lead=False),
    "rank1_optimum": dict(unique_u=False, grads=("lead",)),
    "d_less_than_m": dict(unique_u=False, grads=("lead",)),
    # sigma_2..M (~4e-5) are below the resolution of an fp32 Gram matrix (~3e-4 sigma_1): the gradient's part
    # through them is rounding noise in any fp32 implementation (the fp32 reference's included)
    "near_rank1": dict(atol=1e-3),
}


@pytest.mark.parametrize("name", list(degenerate_cases()))
def test_degenerate_cases(name):
    check_gram_eig(degenerate_cases(torch.float32)[name], True, **dict(dict(atol=1e-4), **DEGENERATE.get(name, {})))


def test_many_modalities():
    """M = 16, the most the kernels take (no padding). Unnormalised near-orthogonal rows of norms 1..16: well
    separated eigenvalues, so Jacobi converges in two sweeps (each costs ~1 s in the interpreter at M = 16)."""
    g = torch.Generator().manual_seed(6)
    q = torch.linalg.qr(torch.randn(32, 16, generator=g, dtype=torch.float64))[0].T  # 16 orthonormal rows
    z = torch.arange(1.0, 17.0, dtype=torch.float64)[:, None] * q + 0.01 * torch.randn(8, 16, 32, generator=g)
    check_gram_eig(z.float(), False, as_list=True)


def test_rows_shorter_than_norm_eps():
    """0 < ||z_m|| < NORM_EPS: normalised by NORM_EPS (so zn_m is not a unit vector) and the projection of the
    normalisation backward skipped for that row, as in the reference; an all-zero row has no radial part to skip."""
    z = correlated(70, 3, 24, seed=19, dtype=torch.float64)
    z[:, 1] *= 0.3 * reference.NORM_EPS / z[:, 1].norm(dim=-1, keepdim=True)
    check_gram_eig(z.float(), True, as_list=True)


def test_unnormalised_small_rows():
    """normalize=False with rows of norm ~2e-2: the floors of 1/sigma_k and 1/(lambda_1 - lambda_k) are relative
    (SIGMA_EPS sigma_1, GAP_EPS lambda_1), so they stay negligible for these well separated singular values
    (sigma_k >= 6e-3, lambda_1 - lambda_2 >= 6e-4), where absolute floors (1e-3 and 1e-4) would not be."""
    z = 2e-3 * correlated(70, 3, 24, seed=19, dtype=torch.float64)
    check_gram_eig(z.float(), False, as_list=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input(dtype):
    """Computed in fp32 from the half values: S/U/lead fp32, dZ in the input dtype, as the reference."""
    check_gram_eig(correlated(40, 3, 48, seed=7, dtype=dtype), True)


def test_strided_inputs():
    """Views with a feature stride, and modalities with different strides, give the contiguous result."""
    z = correlated(40, 3, 64, seed=9).to(DEVICE)
    expected = triton_gram.gram_eig(modalities(z, as_list=True), True)
    wide = torch.zeros(40, 3, 128, device=DEVICE)
    wide[:, :, ::2] = z
    mixed = [wide[:, 0, ::2], z[:, 1].contiguous(), wide[:, 2, ::2]]
    for zs in (list(wide[:, :, ::2].unbind(1)), mixed):
        for a, e in zip(triton_gram.gram_eig(zs, True), expected):
            assert torch.equal(a, e)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NumPy, in the interpreter
def test_nan_stays_in_its_instance():
    def outputs_and_grad(z):
        zs = [t.requires_grad_() for t in modalities(z, as_list=False)]
        out = triton_gram.gram_eig(zs, True)
        return (*out, torch.stack(backward_pair(out, zs, torch.ones(40, 3), torch.ones(40, 24)), 1))

    z = correlated(40, 3, 24, seed=11).to(DEVICE)
    poisoned = z.clone()
    poisoned[3, 1, 5] = float("nan")
    poisoned[17, 0, 2] = float("inf")
    bad = torch.zeros(40, dtype=torch.bool)
    bad[[3, 17]] = True
    for name, a, e in zip(("S", "U", "lead", "dZ"), outputs_and_grad(poisoned), outputs_and_grad(z)):
        assert a[bad].isnan().all(), f"{name}: the poisoned instances must be NaN"
        assert torch.equal(a[~bad], e[~bad]), f"{name}: the other instances must not change"


# ----------------------------------------------------------------------------------------------- contrastive


def _contrastive_case(b, n, d, same, seed=12):
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(b, d, generator=g, dtype=torch.float64)
    cols = rows if same else torch.randn(n, d, generator=g, dtype=torch.float64)
    return rows, cols


def _check_contrastive(b, n, d, same, tau, offset):
    """Values and gradients (w.r.t. rows and cols) against reference.contrastive's autograd, by the fp32 rule:
    with logits of ~100 the softmax is one-hot and fp32 resolves P_ii only to ~1e-5, in any implementation."""
    g = torch.Generator().manual_seed(12)
    rows = torch.randn(b, d, generator=g).to(DEVICE)
    cols = rows if same else torch.randn(n, d, generator=g).to(DEVICE)
    grad = torch.randn(b, generator=g)
    results = []
    implementations = ((triton_contrastive.contrastive, torch.float32, DEVICE),
                       (reference.contrastive, torch.float32, "cpu"), (reference.contrastive, torch.float64, "cpu"))
    for fn, dtype, device in implementations:
        r = rows.to(device=device, dtype=dtype).requires_grad_()
        c = r if same else cols.to(device=device, dtype=dtype).requires_grad_()
        loss = fn(r, c, tau, offset)
        inputs = (r,) if same else (r, c)
        results.append((loss, *torch.autograd.grad(loss, inputs, grad.to(device=device, dtype=dtype))))
    assert results[0][0].dtype == torch.float32 and results[0][0].shape == (b,)
    for name, a, e32, e64 in zip(("loss", "d rows", "d cols"), *results):
        assert_fp32_accurate(a, e32, e64, 1e-5, name)


@pytest.mark.parametrize("same, n, offset", [(True, 40, 0), (False, 70, 0), (False, 70, 23)])
def test_contrastive_matches_reference(same, n, offset):
    """2 column tiles of 64 and 5 feature chunks of 16; logits up to ~110 (the online max matters)."""
    _check_contrastive(40, n, 80, same, 0.7, offset)


def test_contrastive_tiny_sizes():
    """Every size below the 16 that tl.dot needs: rows, columns and features all masked."""
    _check_contrastive(3, 5, 4, False, 0.1, 2)


def test_contrastive_many_features():
    """D > MAX_BLOCK_DO: the backward splits the features over two programs, each recomputing the logits."""
    _check_contrastive(20, 30, triton_contrastive.MAX_BLOCK_DO + 88, False, 5.0, 7)


def test_contrastive_rejects_bad_offset():
    rows = torch.randn(4, 16, device=DEVICE)
    with pytest.raises(ValueError, match="offset"):
        triton_contrastive.contrastive(rows, torch.randn(6, 16, device=DEVICE), 0.1, 3)


# ----------------------------------------------------------------------------------------------- interface


def test_backend_interface():
    assert triton_gram.is_available(DEVICE)
    assert triton_gram.contrastive is triton_contrastive.contrastive
    z = torch.randn(4, 3, 8)
    assert triton_gram.unsupported_reason(list(z.unbind(1))) is None
    assert triton_gram.unsupported_reason(list(z.to(torch.bfloat16).unbind(1))) is None
    assert "float64" in triton_gram.unsupported_reason(list(z.double().unbind(1)))
    assert "M = 17" in triton_gram.unsupported_reason(list(torch.randn(4, 17, 8).unbind(1)))


def test_public_loss_matches_reference_backend():
    z = correlated(40, 3, 32, seed=14).to(DEVICE).requires_grad_()
    loss = pmrl_loss(z, backend="triton")
    (dz,) = torch.autograd.grad(loss, z)
    z_ref = z.detach().cpu().requires_grad_()
    loss_ref = pmrl_loss(z_ref, backend="reference")
    (dz_ref,) = torch.autograd.grad(loss_ref, z_ref)
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-5, what="loss")
    assert_close(dz, dz_ref, atol=1e-5, rtol=1e-4, what="dz")


# ----------------------------------------------------------------------------------------------- sm_90 compilation

# Every kernel, with the constexpr combinations that select different code. The interpreter accepts code that
# the compiler rejects (e.g. tl.dot dimensions < 16), and it replaces triton.jit in this process, so the
# compilation runs in a subprocess without TRITON_INTERPRET.
_GRAM_INTS = dict(B="i32", D="i32", stride_b="i32", stride_d="i32")
_BWD_INTS = dict(_GRAM_INTS, stride_gs_b="i32", stride_gs_m="i32", stride_gl_b="i32", stride_gl_d="i32")
_CON_FWD = dict(B="i32", N="i32", D="i32", stride_r="i32", stride_c="i32", inv_tau="fp32", offset="i32")
_CON_BWD = dict(n_x="i32", n_y="i32", D="i32", stride_x="i32", stride_y="i32", stride_g="i32", inv_tau="fp32",
                offset="i32")
SM90_CASES = [  # (module, kernel, scalar types, pointer types, constexprs, sizes the launcher's config gets)
    ("triton_gram", "_gram_eig_fwd_kernel", _GRAM_INTS, {"Z": "*bf16"},
     dict(M=3, MP=4, NORMALIZE=True, MAX_SWEEPS=12), (3, 512)),
    ("triton_gram", "_gram_eig_fwd_kernel", _GRAM_INTS, {},
     dict(M=16, MP=16, NORMALIZE=False, MAX_SWEEPS=12), (16, 512)),
    ("triton_gram", "_gram_eig_bwd_kernel", _BWD_INTS, {"Z": "*bf16", "DZ": "*bf16"},
     dict(M=3, MP=4, NORMALIZE=True, HAS_GS=True, HAS_GLEAD=True), (3, 512)),
    ("triton_gram", "_gram_eig_bwd_kernel", _BWD_INTS, {},
     dict(M=16, MP=16, NORMALIZE=False, HAS_GS=True, HAS_GLEAD=False), (16, 512)),
    ("triton_contrastive", "_contrastive_fwd_kernel", _CON_FWD, {}, {}, (4096, 4096, 512)),
    ("triton_contrastive", "_contrastive_bwd_kernel", _CON_BWD, {}, dict(X_IS_ROWS=True), (4096, 4096, 128)),
    ("triton_contrastive", "_contrastive_bwd_kernel", _CON_BWD, {}, dict(X_IS_ROWS=False), (4096, 4096, 512)),
]

_COMPILE_SCRIPT = textwrap.dedent("""
    import importlib, json, sys
    import triton
    from triton.backends.compiler import GPUTarget

    def config(module, name, sizes):
        # the block sizes and num_warps the launcher picks for these sizes on a GPU
        if name.startswith("_gram"):
            m, d = sizes
            block_b, block_d = module.block_sizes(triton.next_power_of_2(m), d)
            return dict(BLOCK_B=block_b, BLOCK_D=block_d, num_warps=4)
        return (module.fwd_config if name == "_contrastive_fwd_kernel" else module.bwd_config)(*sizes)

    done = []
    for module, name, scalars, pointers, constexprs, sizes in json.load(sys.stdin):
        module = importlib.import_module("pmrl_kernels.ops." + module)
        kernel = getattr(module, name)
        constexprs = dict(constexprs, **config(module, name, sizes))
        num_warps = constexprs.pop("num_warps")
        signature = {}
        for arg in kernel.arg_names:
            pointer = pointers.get(arg.rstrip("0123456789"), "*fp32")  # Z0 .. Z15 share one entry
            signature[arg] = "constexpr" if arg in constexprs else scalars.get(arg, pointer)
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        done.append(name)
    print(json.dumps(done))
""")


def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], input=json.dumps(SM90_CASES), env=env,
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    compiled = set(json.loads(result.stdout.strip().splitlines()[-1]))
    kernels = {name for module in (triton_gram, triton_contrastive) for name in vars(module)
               if name.endswith("_kernel")}
    assert compiled == kernels, f"kernels without an sm_90 compile case: {kernels - compiled}"


# ----------------------------------------------------------------------------------------------- GPU only


@requires_cuda
def test_full_size_matches_reference_on_gpu():
    check_gram_eig(correlated(4096, 4, 512, seed=15), True)
    check_gram_eig(correlated(1024, 16, 512, seed=16, dtype=torch.bfloat16), True, atol=1e-4)
    _check_contrastive(4096, 8192, 512, False, 20.0, 4096)  # logits ~ 512 / 20


@requires_cuda
def test_torch_compile_fullgraph_equals_eager_on_gpu():
    def loss_fn(z):
        s, _, lead = triton_gram.gram_eig(list(z.unbind(1)), True)
        return (reference.alignment(s, 0.05) + triton_gram.contrastive(lead, lead, 0.1, 0)).mean()

    z = correlated(256, 3, 128, seed=16).cuda().requires_grad_()
    loss = loss_fn(z)
    (dz,) = torch.autograd.grad(loss, z)
    compiled = torch.compile(loss_fn, fullgraph=True)
    loss_c = compiled(z)
    (dz_c,) = torch.autograd.grad(loss_c, z)
    assert_close(loss_c, loss, atol=1e-6, rtol=1e-6, what="loss")
    assert_close(dz_c, dz, atol=1e-6, rtol=1e-5, what="dz")


@requires_cuda
def test_opcheck_on_gpu():
    z = correlated(64, 3, 32, seed=17).cuda()
    zs = list(z.unbind(1))
    s, u, lead = torch.ops.pmrl_triton.gram_eig_fwd(zs, True)
    loss, lse = torch.ops.pmrl_triton.contrastive_fwd(lead, lead, 0.1, 0)
    samples = [
        (torch.ops.pmrl_triton.gram_eig_fwd, (zs, True)),
        (torch.ops.pmrl_triton.gram_eig_bwd, (zs, s, u, torch.randn_like(s), torch.randn_like(lead), True)),
        (torch.ops.pmrl_triton.gram_eig_bwd, (zs, s, u, None, torch.randn_like(lead), False)),
        (torch.ops.pmrl_triton.contrastive_fwd, (lead, lead, 0.1, 0)),
        (torch.ops.pmrl_triton.contrastive_bwd, (lead, lead, lse, torch.randn_like(loss), 0.1, 0)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)
