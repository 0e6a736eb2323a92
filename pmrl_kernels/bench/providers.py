"""The providers: who computes a target, and with what.

Baselines (baseline_code.py): the published recipe (full SVD), torch.linalg.svd reduced, torch.linalg.svdvals,
the torch composition (Gram by bmm + torch.linalg.eigh, autograd) and the same under torch.compile. Backends:
every backend of the registry (pmrl_kernels.backends) on the device, and VARIANTS (a backend with a knob set),
asked per op: a backend provides a target when it implements one of the target's ops with code of its own, and a
cell is skipped when an op it names refuses the cell's inputs.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Optional

from .. import backends, terms
from .cells import Case, Forward, compute_size
from .targets import Target

BASE_PROVIDERS = ("recipe", "svd", "svdvals", "torch", "compiled")
BASELINES = ("recipe", "svd", "torch")  # speedup columns
COMPILING = ("compiled",)  # compile on their first call: every device gives them an untimed cold call


@dataclass(frozen=True)
class Variant:
    """A registry backend with a knob set: the environment around each of its cells (read at each launch)."""

    backend: str
    env: Mapping[str, str]
    legend: str


VARIANTS = {
    "cuda-8-lanes": Variant("cuda", {"PMRL_CUDA_MAX_LANES": "8"},
                            "the cuda backend at 8 lanes an instance (PMRL_CUDA_MAX_LANES=8), 4 instances a warp"),
}


def backend_of(provider: str) -> str:
    """The registry backend a backend provider runs (a variant's, or its own name)."""
    return VARIANTS[provider].backend if provider in VARIANTS else provider


def available_variants(device_type: str) -> list[str]:
    here = backends.available_backends(device_type)
    return [name for name, variant in VARIANTS.items() if variant.backend in here]


@contextlib.contextmanager
def knobs(provider: str):
    """The variant's environment inside the block (nothing for other providers), the previous one restored."""
    env = VARIANTS[provider].env if provider in VARIANTS else {}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


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
    own = [backends.implementations(op, device_type).get(backend_of(provider)) for op in target.ops]
    return any(f is not None and f not in target.torch_runs for f in own)


def providers_for(target: Target, names: list[str], device_type: str) -> list[str]:
    """The providers among `names` that compute `target`."""
    return [n for n in names if provides(target, n, device_type)]


def auto_choice(target: Target, provider: str, inputs: dict) -> bool:
    """Whether backend="auto" runs `provider`'s code for every op of `target` on these inputs: the provider a user
    gets without naming one."""
    if provider in BASE_PROVIDERS or provider in VARIANTS:
        return False
    for op in target.ops:
        args = OP_INPUTS[op](inputs)
        try:
            if backends.resolve(op, provider, args) is not backends.resolve(op, "auto", args):
                return False
        except ValueError:  # the provider refuses these inputs
            return False
    return True


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
    name, device_type = backend_of(case.provider), inputs["z"][0].device.type
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
