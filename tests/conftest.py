"""Test set-up. Without a GPU, Triton kernels run under its interpreter: TRITON_INTERPRET must be set before
triton is first imported, so it is set here, before any test module imports the package."""
import os
import tempfile

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="pmrl_triton_cache_"))

import pytest  # noqa: E402

from pmrl_kernels.inputs import compute_dtype  # noqa: E402

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


def random_embeddings(b, m, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, m, d, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)


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
