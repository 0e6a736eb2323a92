"""The targets, in one table: what the bench measures. Adding a target is adding one record to TARGETS; the
sweep, the providers, the byte models, the report and the command line read everything from it.

A target takes one of the inputs of cells.make_inputs ("z": the M modality tensors [B, D]; "lead": one unit
[B, D] tensor in the compute dtype), and says how its cost grows with B, how many bytes a call must move and
needs, how the torch composition and each other baseline compute it, and how a backend of the registry does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from .. import terms
from ..config import DEFAULTS
from ..loss import gram_svd, pmrl_loss
from .baseline_code import (
    Forward, compiled, recipe_loss, recipe_spectrum, spectral, svd_spectrum, svdvals_spectrum, torch_spectrum,
)
from .cells import DTYPES, Case, compute_size


@dataclass(frozen=True)
class Target:
    name: str
    takes: str  # the make_inputs entry it runs on: "z" or "lead"
    batch_power: int  # a call's time grows as B ** batch_power (2: B x B logits); predicts timeouts at larger B
    ops: tuple[str, ...]  # the registry ops its backend forward runs; a backend implementing one provides it
    io_bytes: Callable[[Case], tuple[int, int]]  # bytes one forward must read, and write: the bandwidth floor
    working_bytes: Callable[[Case, bool], int]  # lower bound of a call's memory, given whether B x B logits form
    torch: Forward  # the torch composition (every target has one: the speedup_vs_torch baseline)
    backend: Callable[[str, Mapping[str, Callable]], Forward]  # (backend, its op implementations) -> forward
    baselines: Mapping[str, Forward] = field(default_factory=dict)  # the other baseline providers computing it
    torch_runs: tuple[Callable, ...] = ()  # registry op implementations the torch composition calls as they are
    measured_as: Mapping[str, str] = field(default_factory=dict)  # baseline -> the provider whose row stands for it
    matmul: bool = False  # its cost is a B x B matmul: swept over the float32 matmul precisions


def _align(s: torch.Tensor) -> torch.Tensor:
    return terms.alignment(s, DEFAULTS.tau).mean()


def _reg(lead: torch.Tensor) -> torch.Tensor:
    return terms.contrastive(lead, lead, DEFAULTS.tau_reg).mean()


def _loss_head(s, lead):
    return (_align(s) + DEFAULTS.reg_weight * _reg(lead),)


def _align_head(s, lead):
    return (_align(s),)


def _gram_svd_head(s, lead):
    return s, lead


def _z_io(case: Case) -> tuple[int, int]:
    return case.B * case.M * case.D * DTYPES[case.dtype].itemsize, 0


def _spectrum_io(case: Case) -> tuple[int, int]:
    return _z_io(case)[0], case.B * (case.M + case.D) * compute_size(case)


def _operands(case: Case, logits: bool = False) -> int:
    """Inputs, their normalised copy, gradients; per-instance work forms no B x B logits whatever the provider."""
    return 4 * case.B * case.M * case.D * compute_size(case)


def _with_logits(case: Case, logits: bool) -> int:
    # B x B logits, their softmax and gradient, unless a kernel tiles them
    return _operands(case) + (3 * case.B * case.B * compute_size(case) if logits else 0)


def mixed_mask(batch: int, modalities: int, device) -> torch.Tensor:
    """The modality mask of the masked-loss target [B, M]: every second instance lacks its last modality, every
    fourth its first (so every instance keeps at least one)."""
    present = torch.ones(batch, modalities, dtype=torch.bool, device=device)
    present[1::2, -1] = False
    present[2::4, 0] = False
    return present


def _masked(forward: Callable) -> Forward:
    """forward(zs, present) on this cell's mixed mask, built once per input (outside the timed calls)."""
    masks = {}

    def run(zs):
        key = (zs[0].shape[0], len(zs), zs[0].device)
        if key not in masks:
            masks[key] = mixed_mask(*key)
        return forward(zs, masks[key])

    return run


def _torch_masked_loss(zs, present):
    """The torch composition with the absent rows zero-filled and the alignment softmax cut to the present
    singular values (docs/maths.md, "Modality mask and labels")."""
    s, lead = torch_spectrum([torch.where(present[:, m, None], z, 0) for m, z in enumerate(zs)], eig_floor=1e-30)
    return (terms.alignment(s, DEFAULTS.tau, present.sum(dim=1)).mean() + DEFAULTS.reg_weight * _reg(lead),)


_TORCH = {
    "loss": spectral(torch_spectrum, _loss_head),
    "align": spectral(torch_spectrum, _align_head),
    "gram_svd": spectral(torch_spectrum, _gram_svd_head),
    "contrastive": lambda rows: (_reg(rows[0]),),
}

TARGETS = {t.name: t for t in (
    Target(
        "loss", takes="z", batch_power=2, ops=("gram_eig", "contrastive"), io_bytes=_z_io,
        working_bytes=_with_logits, torch=_TORCH["loss"], matmul=True,
        backend=lambda name, ops: lambda zs: (pmrl_loss(zs, backend=name),),
        baselines={"recipe": recipe_loss, "svd": spectral(svd_spectrum, _loss_head),
                   "compiled": compiled(_TORCH["loss"])},
    ),
    Target(  # the whole loss on a batch with missing modalities, beside "loss" on the full one
        "loss_masked", takes="z", batch_power=2, ops=("gram_eig", "contrastive"), io_bytes=_z_io,
        working_bytes=_with_logits, torch=_masked(_torch_masked_loss), matmul=True,
        backend=lambda name, ops: _masked(lambda zs, present: (pmrl_loss(zs, present=present, backend=name),)),
    ),
    Target(  # the alignment term alone: reg_weight=0 skips the contrastive work
        "align", takes="z", batch_power=1, ops=("gram_eig",), io_bytes=_z_io, working_bytes=_operands,
        torch=_TORCH["align"],
        backend=lambda name, ops: lambda zs: (pmrl_loss(zs, reg_weight=0.0, backend=name),),
        baselines={"recipe": spectral(recipe_spectrum, _align_head), "svd": spectral(svd_spectrum, _align_head),
                   "svdvals": spectral(svdvals_spectrum, _align_head), "compiled": compiled(_TORCH["align"])},
    ),
    Target(  # S and lead; U carries no gradient
        "gram_svd", takes="z", batch_power=1, ops=("gram_eig",), io_bytes=_spectrum_io, working_bytes=_operands,
        torch=_TORCH["gram_svd"],
        backend=lambda name, ops: lambda zs: gram_svd(zs, backend=name)[::2],
        baselines={"recipe": spectral(recipe_spectrum, _gram_svd_head),
                   "svd": spectral(svd_spectrum, _gram_svd_head), "compiled": compiled(_TORCH["gram_svd"])},
    ),
    Target(  # the recipe, the reference and the torch composition run the same code here: measured once, as torch
        "contrastive", takes="lead", batch_power=2, ops=("contrastive",),
        io_bytes=lambda case: (case.B * case.D * compute_size(case), 0), working_bytes=_with_logits,
        torch=_TORCH["contrastive"], matmul=True,
        backend=lambda name, ops: lambda rows: (ops["contrastive"](rows[0], rows[0], DEFAULTS.tau_reg, 0).mean(),),
        baselines={"compiled": compiled(_TORCH["contrastive"])},
        torch_runs=(terms.contrastive,), measured_as={"recipe": "torch"},
    ),
)}


def floor_bytes(case: Case) -> int:
    """Bytes that must move at least: inputs read (twice with a backward) and gradients written, outputs."""
    read, written = TARGETS[case.target].io_bytes(case)
    return {"forward": read + written, "backward": 2 * read + written, "full": 3 * read + 2 * written}[case.mode]
