"""The code a user writes instead of this package, as the baseline providers run it: each a spectrum (S [B, M] and
lead [B, D] of the inputs) that a target's record turns into its outputs, or the recipe's whole loss.

Every baseline gets the M separate [B, D] tensors (what M encoders produce), so the stacking the SVD/Gram
compositions need is part of their cost; their linear algebra runs in float32 for 16-bit inputs, as autocast
would. The batched solvers run on at most CHUNK instances a call: cuSOLVER's batched eigen-solver fails with
CUSOLVER_STATUS_INTERNAL_ERROR at B = 65536. Leads take this package's sign (terms.canonical_sign), so every
baseline computes the package's loss, not one with LAPACK's arbitrary signs.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .. import reference, terms
from ..baselines import official_recipe_loss
from ..config import DEFAULTS
from ..inputs import compute_dtype
from .cells import Forward

CHUNK = 16384  # instances per batched eigh/svd call


def _recipe_stack(zs: list[torch.Tensor]) -> torch.Tensor:
    """[B, D, M] of the normalised rows, as the published code stacks them."""
    cd = compute_dtype(zs[0].dtype)
    return torch.stack([F.normalize(z.to(cd), dim=-1) for z in zs], dim=-1)


def _chunked(solve: Callable, x: torch.Tensor) -> tuple:
    """solve(x) on CHUNK instances at a time, its outputs concatenated."""
    parts = [solve(chunk) for chunk in x.split(CHUNK)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _signed(stacked: torch.Tensor, lead: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """lead with the package's sign: the one that makes its coordinates over the M rows sum to >= 0."""
    coords = (stacked.transpose(-1, -2) @ lead[:, :, None]) / s[:, None, :1]  # [B, M, 1]
    return lead * terms.canonical_sign(coords)[:, 0]


def recipe_spectrum(zs):
    """The published recipe's spectrum: the full SVD, U [B, D, D] (one call: the recipe does not chunk)."""
    stacked = _recipe_stack(zs)
    u, s, _ = torch.linalg.svd(stacked, full_matrices=True)
    return s, _signed(stacked, u[..., 0], s)


def svd_spectrum(zs):
    stacked = _recipe_stack(zs)
    u, s = _chunked(lambda x: torch.linalg.svd(x, full_matrices=False)[:2], stacked)
    return s, _signed(stacked, u[..., 0], s)


def svdvals_spectrum(zs):
    return _chunked(lambda x: (torch.linalg.svdvals(x),), _recipe_stack(zs))[0], None


def torch_spectrum(zs, eig_floor: float = 0.0):
    """The Gram matrix by bmm and torch.linalg.eigh (descending, the package's sign), with autograd. eig_floor
    clamps the eigenvalues before the square root, which a batch with zero rows needs: sqrt's gradient at 0 is
    infinite, and times a zero upstream gradient NaN."""
    zn = F.normalize(torch.stack(zs, dim=1).to(compute_dtype(zs[0].dtype)), dim=-1)  # [B, M, D]
    lam, u = _chunked(reference.eigh_descending, torch.bmm(zn, zn.transpose(1, 2)))
    s = lam.clamp_min(eig_floor).sqrt() if eig_floor else lam.sqrt()
    return s, torch.bmm(u[:, :, :1].transpose(1, 2), zn).squeeze(1) / s[:, :1]


def recipe_loss(zs):
    """The recipe's whole loss with the package's sign of lead; the inputs cast to the compute dtype first (it
    computes in its input dtype)."""
    zs = [z.to(compute_dtype(zs[0].dtype)) for z in zs]
    return (official_recipe_loss(zs, tau=DEFAULTS.tau, tau_reg=DEFAULTS.tau_reg, reg_weight=DEFAULTS.reg_weight,
                                 canonical=True),)


def spectral(spectrum: Callable, head: Callable) -> Forward:
    """The forward that computes a target's outputs (head) from a baseline's spectrum."""
    return lambda zs: head(*spectrum(zs))


def compiled(forward: Forward) -> Forward:
    """forward under torch.compile, compiled on its first call (a cell's untimed warm-up). Each size, mode and
    precision is a recompile: past the limit a cell fails (an error row) instead of running eagerly unnoticed."""
    state = {}

    def run(inputs):
        if "fn" not in state:  # dynamo's settings change when the bench compiles, not when it is imported
            import torch._dynamo.config as dynamo

            dynamo.recompile_limit = max(dynamo.recompile_limit, 64)
            dynamo.fail_on_recompile_limit_hit = True
            state["fn"] = torch.compile(forward, dynamic=False)
        return state["fn"](inputs)

    return run
