"""The providers: who computes a target, and with what.

Baselines: the published recipe (full SVD), torch.linalg.svd reduced, torch.linalg.svdvals and the best torch
composition (Gram by bmm + torch.linalg.eigh, autograd). Each is a spectrum (S and lead of the inputs) that a
target's record turns into its outputs; the recipe also has its own whole loss. Every baseline gets the M separate
[B, D] tensors (what M encoders produce), so the stacking the SVD/Gram compositions need is part of their cost;
their linear algebra runs in float32 for 16-bit inputs, as autocast would.

Backends: every backend of the registry (pmrl_kernels.backends) on the device, asked per op: a backend provides a
target when it implements one of the target's ops with code of its own, and a cell is skipped when an op it names
refuses the cell's inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn.functional as F

from .. import backends, reference, terms
from ..baselines import official_recipe_loss
from ..config import DEFAULTS
from ..inputs import compute_dtype
from .cells import Case, Forward, compute_size

if TYPE_CHECKING:
    from .targets import Target

BASE_PROVIDERS = ("recipe", "svd", "svdvals", "torch")
BASELINES = ("recipe", "svd", "torch")  # speedup columns


# --- the baselines' spectra: (S [B, M], lead [B, D] or None) ------------------------------------------------------

def _recipe_stack(zs: list[torch.Tensor]) -> torch.Tensor:
    """[B, D, M] of the normalised rows, as the published code stacks them."""
    cd = compute_dtype(zs[0].dtype)
    return torch.stack([F.normalize(z.to(cd), dim=-1) for z in zs], dim=-1)


def _svd_spectrum(zs, full_matrices: bool):
    u, s, _ = torch.linalg.svd(_recipe_stack(zs), full_matrices=full_matrices)
    return s, u[..., 0]


def recipe_spectrum(zs):
    return _svd_spectrum(zs, full_matrices=True)


def svd_spectrum(zs):
    return _svd_spectrum(zs, full_matrices=False)


def svdvals_spectrum(zs):
    return torch.linalg.svdvals(_recipe_stack(zs)), None


def torch_spectrum(zs):
    zn = F.normalize(torch.stack(zs, dim=1).to(compute_dtype(zs[0].dtype)), dim=-1)  # [B, M, D]
    lam, u = reference.eigh_descending(torch.bmm(zn, zn.transpose(1, 2)))
    s = lam.sqrt()
    return s, torch.bmm(u[:, :, :1].transpose(1, 2), zn).squeeze(1) / s[:, :1]


def recipe_loss(zs):
    """The recipe's whole loss; the inputs cast to the compute dtype first (it computes in its input dtype)."""
    zs = [z.to(compute_dtype(zs[0].dtype)) for z in zs]
    return (official_recipe_loss(zs, tau=DEFAULTS.tau, tau_reg=DEFAULTS.tau_reg, reg_weight=DEFAULTS.reg_weight),)


def spectral(spectrum: Callable, head: Callable) -> Forward:
    """The forward that computes a target's outputs (head) from a baseline's spectrum."""
    return lambda zs: head(*spectrum(zs))


# working memory a baseline needs beyond the target's own byte model
EXTRA_BYTES: dict[str, Callable[[Case], int]] = {
    "recipe": lambda case: 2 * case.B * case.D * case.D * compute_size(case),  # full U [B, D, D], its gradient
}


# --- who computes what ----------------------------------------------------------------------------------------------

# The tensors each op sees in a cell: gram_eig the modality tensors; contrastive (rows, cols) the leads, which the
# "lead" input stands for: the shape, dtype and device gram_eig gives them (cols = rows in one process)
OP_INPUTS = {"gram_eig": lambda inputs: (inputs["z"],), "contrastive": lambda inputs: (inputs["lead"][0],) * 2}


def _base_forward(target: Target, provider: str) -> Optional[Forward]:
    return target.torch if provider == "torch" else target.baselines.get(provider)


def provides(target: Target, provider: str, device_type: str) -> bool:
    """Whether `provider` computes `target` on this device type. A backend whose implementations of the target's
    ops are all code the torch composition already runs (the reference's contrastive op) would measure that
    composition again: it is left out, and the torch row stands for it."""
    if provider in BASE_PROVIDERS:
        return _base_forward(target, provider) is not None
    own = [backends.implementations(op, device_type).get(provider) for op in target.ops]
    return any(f is not None and f not in target.torch_runs for f in own)


def providers_for(target: Target, names: list[str], device_type: str) -> list[str]:
    """The providers among `names` that compute `target`."""
    return [n for n in names if provides(target, n, device_type)]


@dataclass(frozen=True)
class Plan:
    """How a provider runs one cell: its forward, a lower bound of its working memory, and why it refuses the
    inputs (None: it takes them)."""

    forward: Optional[Forward]
    need_bytes: int
    refusal: Optional[str] = None


def plan(target: Target, case: Case, inputs: dict) -> Plan:
    forward = _base_forward(target, case.provider)
    if forward is not None:  # the baselines form the B x B logits of the contrastive term when they compute it
        return Plan(forward, target.working_bytes(case, True) + EXTRA_BYTES.get(case.provider, lambda c: 0)(case))
    name, device_type = case.provider, inputs["z"][0].device.type
    ops, refusal = {}, None
    for op in target.ops:
        try:  # named backend: its op or a ValueError; an op it does not implement resolves as under "auto"
            ops[op] = backends.resolve(op, name, OP_INPUTS[op](inputs))
        except ValueError as err:
            refusal = refusal or str(err)  # the first op that refuses is the one a call would fail on
            ops[op] = backends.implementations(op, device_type).get(name)  # what it would run, for the byte model
    # the PyTorch contrastive op forms the B x B logits; the kernels tile them
    need = target.working_bytes(case, ops.get("contrastive") is terms.contrastive)
    return Plan(None if refusal else target.backend(name, ops), need, refusal)
