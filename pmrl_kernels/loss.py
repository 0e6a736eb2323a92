"""Public API: the PMRL loss (functional and nn.Module) and the batched Gram/eigen decomposition."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from . import backends, distributed, terms
from .config import DEFAULTS, PMRLConfig
from .inputs import Embeddings, Temperature, flag, modality_list, reduce, temperature_device, temperature_value

# open_clip's bound on its learned logit scale exp(logit_scale): the learned tau_reg never goes below 1 / 100
MAX_LOGIT_SCALE = 100.0


class GramSVD(NamedTuple):
    """S [B, M]: singular values of each instance's normalised M x D matrix Zn, descending, 0-padded when D < M.
    U [B, M, M]: columns the matching eigenvectors of G = Zn Zn^T, each column's sign fixed so it sums to >= 0.
    lead [B, D]: the unit leading direction Zn^T U[:, :, 0] / S[:, 0], with lead . sum_m zn_m >= 0.
    All three are float32 (float64 for float64 input). S and lead carry gradients; U does not."""

    S: torch.Tensor
    U: torch.Tensor
    lead: torch.Tensor


def gram_svd(embeddings: Embeddings, *, normalize: bool = True, backend: str = "auto") -> GramSVD:
    """Singular values, Gram eigenvectors and canonical leading direction of every instance.

    Same S and lead as torch.linalg.svd of the stacked [B, D, M] matrix, without ever forming its [B, D, D] U.

    Shape: embeddings [B, M, D] or M tensors [B, D] -> S [B, M], U [B, M, M], lead [B, D].

    >>> out = gram_svd(torch.randn(8, 3, 64))
    >>> out.S.shape, out.lead.shape
    (torch.Size([8, 3]), torch.Size([8, 64]))
    """
    zs, arg = _rows(embeddings)
    normalize = flag(normalize, "normalize")
    return GramSVD(*backends.resolve("gram_eig", backend, (zs,))(arg, normalize))


def _rows(embeddings: Embeddings) -> tuple[list[torch.Tensor], Union[torch.Tensor, list[torch.Tensor]]]:
    """The checked modality rows (M views [B, D]) and what the kernels get: a [B, M, D] tensor as it is (its
    gradient then comes back whole, with no unbind copy), a list as the list."""
    zs = modality_list(embeddings)
    return zs, (embeddings if isinstance(embeddings, torch.Tensor) else zs)


# (rows) -> (all columns, offset of these rows among them); see pmrl_kernels.distributed
Gather = Callable[[torch.Tensor], tuple[torch.Tensor, int]]


class Spectrum(NamedTuple):
    """What the loss terms read: the gram_eig outputs of this rank's instances."""

    S: torch.Tensor
    lead: torch.Tensor


class Temperatures(NamedTuple):
    """The temperatures of one call: the config's (checked by _temperatures), or PMRLLoss's learned tau_reg."""

    tau: Temperature
    tau_reg: Temperature


def _temperatures(config: PMRLConfig, device: torch.device, learned_tau_reg: Optional[torch.Tensor] = None):
    """This call's temperatures. A tensor must be on the embeddings' device, and its value is read and checked in
    eager mode (one host read each: a device sync on a GPU), not under torch.compile, where a read would break
    the graph. learned_tau_reg, bounded by its construction, replaces config.tau_reg and is never read."""
    temps = Temperatures(config.tau, config.tau_reg if learned_tau_reg is None else learned_tau_reg)
    for name, value in zip(Temperatures._fields, temps):
        temperature_device(value, device, name)
        if isinstance(value, torch.Tensor) and value is not learned_tau_reg and not torch.compiler.is_compiling():
            temperature_value(value, name)
    return temps


def _align(spec: Spectrum, temps: Temperatures, config: PMRLConfig, gather: Optional[Gather]) -> torch.Tensor:
    return terms.alignment(spec.S, temps.tau)


def _reg(spec: Spectrum, temps: Temperatures, config: PMRLConfig, gather: Optional[Gather]) -> torch.Tensor:
    cols, offset = (spec.lead, 0) if gather is None else gather(spec.lead)
    contrastive = backends.resolve("contrastive", config.backend, (spec.lead, cols))
    return contrastive(spec.lead, cols, temps.tau_reg, offset)


@dataclass(frozen=True)
class Term:
    """One named part of the loss: loss = sum over TERMS of weight(config) * value. A term of weight 0 is not
    computed (its part reads 0 and it gets no gradient): reg_weight = 0 skips the B x B contrastive work."""

    name: str
    weight: Callable[[PMRLConfig], float]
    value: Callable[[Spectrum, Temperatures, PMRLConfig, Optional[Gather]], torch.Tensor]  # per instance [B]


TERMS = (
    Term("align", lambda config: 1.0, _align),
    Term("reg", lambda config: config.reg_weight, _reg),
)


def _pmrl(
    zs: list[torch.Tensor], arg, config: PMRLConfig, temps: Temperatures, gather: Optional[Gather] = None
) -> dict[str, torch.Tensor]:
    """Per-instance {"loss", *term names} [B] of checked rows (zs, arg: see _rows) under a checked config and
    checked temperatures."""
    s, _, lead = backends.resolve("gram_eig", config.backend, (zs,))(arg, config.normalize)
    spec = Spectrum(s, lead)
    parts = {}
    loss = None
    for term in TERMS:
        weight = term.weight(config)
        value = term.value(spec, temps, config, gather) if weight != 0 else s.new_zeros(s.shape[0])
        parts[term.name] = value
        loss = weight * value if loss is None else loss + weight * value
    return {"loss": loss, **parts}


def _reduced(parts: dict[str, torch.Tensor], reduction: str, output_dict: bool):
    parts = {k: reduce(v, reduction) for k, v in parts.items()}
    return parts if output_dict else parts["loss"]


def pmrl_loss(
    embeddings: Embeddings,
    *,
    tau: Temperature = DEFAULTS.tau,
    tau_reg: Temperature = DEFAULTS.tau_reg,
    reg_weight: float = DEFAULTS.reg_weight,
    normalize: bool = DEFAULTS.normalize,
    reduction: str = DEFAULTS.reduction,
    backend: str = DEFAULTS.backend,
    output_dict: bool = False,
):
    """PMRL loss (arXiv 2507.17343): align + reg_weight * reg (docs/maths.md, "The loss").

    align_i = logsumexp_k(sigma_ik / tau) - sigma_i1 / tau, sigma_i the singular values of instance i's
    normalised M x D matrix; reg_i = CE over j of lead_i . lead_j / tau_reg with target i, lead_i the canonical
    leading direction. Defaults are the published ones (tau1 = 0.05, tau2 = 0.1, weight 1).

    Shape: embeddings [B, M, D] or a sequence of M tensors [B, D] (read in place). Returns a scalar
    (reduction "mean"/"sum") or [B] ("none"), float32 (float64 for float64 input); output_dict=True returns
    {"loss", "align", "reg"} reduced alike ("reg" is 0 when reg_weight = 0, which skips the B x B work).

    tau and tau_reg are numbers, or 0-d floating tensors (a learnable nn.Parameter, or a tensor computed from
    one such as 1 / logit_scale.exp()) on the embeddings' device, which then get their gradient with every
    backend. Every temperature must be finite and >= 1e-4; a tensor's value is checked on every eager call (a
    host read: a device sync on a GPU) and not under torch.compile, which traces it without a graph break.

    >>> z = torch.randn(32, 3, 128, requires_grad=True)
    >>> pmrl_loss(z).backward()
    """
    config = PMRLConfig(tau, tau_reg, reg_weight, normalize, reduction, backend)
    zs, arg = _rows(embeddings)
    parts = _pmrl(zs, arg, config, _temperatures(config, zs[0].device))
    return _reduced(parts, config.reduction, flag(output_dict, "output_dict"))


class PMRLLoss(nn.Module):
    """nn.Module form of `pmrl_loss`; the arguments are the same, checked at construction (self.config).

    A tensor tau or tau_reg is kept by reference, not registered: its owner (the model, as open_clip's model owns
    its logit_scale) trains it, and its value is checked on every eager call. It must be a leaf (e.g. an
    nn.Parameter): a tensor computed from one would be backpropagated through once only.

    learn_tau_reg=True learns tau_reg the open_clip way: the module owns a parameter logit_scale, initialised to
    log(1 / tau_reg), and uses tau_reg = 1 / min(exp(logit_scale), 100), so tau_reg >= 0.01 and its value is
    never read on the host. (open_clip clamps the parameter itself after each optimizer step; here the bound is
    in the forward, so no training-loop hook is needed, and logit_scale gets no gradient while above ln 100.)
    tau is not learnable: the alignment target is always the largest logit, so its loss falls as tau falls (its
    gradient in tau is >= 0, docs/maths.md) and a learned tau would only run down to its bound.

    gather_with_grad=True is for data-parallel training (DDP): the contrastive term of this rank's rows runs
    against the leads of every rank of process_group (default: the default group), gathered with gradient
    (target = this rank's offset + i); the alignment term stays per rank. Per-rank batch sizes may differ.
    With N rows over W ranks, each rank returns W / N * (sum of its rows' losses) for reduction="mean" and
    W * (sum of its rows' losses) for "sum", so the mean over ranks equals the single-process loss on the
    concatenated batch, and the gradient each rank gets on its embeddings is W times the single-process one
    (DDP's averaging divides it back); a temperature tensor gets this rank's share, whose mean over ranks (DDP's
    average, when the module holding it is DDP-wrapped) is the single-process gradient. "none" returns this
    rank's rows of the single-process output, unscaled. output_dict parts are scaled alike. The forward raises
    RuntimeError when no process group is initialised (construction does not, so the module can be built before
    init_process_group). See pmrl_kernels.distributed.

    The default, gather_with_grad=False, computes both terms on each rank's local batch, as the published code
    does (its all-gather serves only its image-text matching head), so the default matches the paper.
    gather_with_grad=True is the global-batch alternative, with every rank's leads as negatives.

    >>> loss_fn = PMRLLoss(tau=0.05)
    >>> loss = loss_fn([text_emb, video_emb, audio_emb])
    """

    def __init__(
        self,
        tau: Temperature = DEFAULTS.tau,
        tau_reg: Temperature = DEFAULTS.tau_reg,
        reg_weight: float = DEFAULTS.reg_weight,
        normalize: bool = DEFAULTS.normalize,
        reduction: str = DEFAULTS.reduction,
        backend: str = DEFAULTS.backend,
        gather_with_grad: bool = False,
        process_group: Optional["torch.distributed.ProcessGroup"] = None,
        learn_tau_reg: bool = False,
    ):
        super().__init__()
        self.config = PMRLConfig(tau, tau_reg, reg_weight, normalize, reduction, backend)
        for name in Temperatures._fields:
            if getattr(getattr(self.config, name), "grad_fn", None) is not None:
                raise ValueError(
                    f"{name} must be a number or a leaf tensor (e.g. an nn.Parameter): PMRLLoss keeps it across "
                    f"calls, and a tensor computed from a parameter can be backpropagated through only once; "
                    f"compute it per call with pmrl_loss, or use learn_tau_reg=True"
                )
        self.gather_with_grad = flag(gather_with_grad, "gather_with_grad")
        distributed.check_group(process_group)
        if process_group is not None and not self.gather_with_grad:
            raise ValueError("process_group is the group of the gather: pass it with gather_with_grad=True")
        self.process_group = process_group
        self.learn_tau_reg = flag(learn_tau_reg, "learn_tau_reg")
        logit_scale = None
        if self.learn_tau_reg:
            initial = self.config.tau_reg
            if isinstance(initial, torch.Tensor):
                raise TypeError("with learn_tau_reg=True, tau_reg is the initial value: a number, got a tensor")
            if self.config.reg_weight == 0:
                raise ValueError("learn_tau_reg=True needs reg_weight > 0: only the contrastive term uses tau_reg")
            if initial < 1 / MAX_LOGIT_SCALE:
                raise ValueError(
                    f"with learn_tau_reg=True, tau_reg (the initial value) must be >= {1 / MAX_LOGIT_SCALE}, the "
                    f"bound of the learned one, got {initial}"
                )
            logit_scale = nn.Parameter(torch.tensor(math.log(1 / initial)))
        self.register_parameter("logit_scale", logit_scale)

    def extra_repr(self) -> str:
        return (f"{self.config.describe()}, gather_with_grad={self.gather_with_grad}, "
                f"learn_tau_reg={self.learn_tau_reg}")

    def learned_tau_reg(self) -> Optional[torch.Tensor]:
        """tau_reg = 1 / min(exp(logit_scale), 100), with gradient to logit_scale; None unless learn_tau_reg."""
        if self.logit_scale is None:
            return None
        return torch.exp(-self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)))

    def forward(self, embeddings: Embeddings, output_dict: bool = False):
        output_dict = flag(output_dict, "output_dict")
        zs, arg = _rows(embeddings)
        temps = _temperatures(self.config, zs[0].device, self.learned_tau_reg())
        if not self.gather_with_grad:
            return _reduced(_pmrl(zs, arg, self.config, temps), self.config.reduction, output_dict)
        gather = distributed.RowGather(zs[0].shape[0], zs[0].device, self.process_group)
        # per-row values, so the reduction can be scaled by the global batch size
        parts = _pmrl(zs, arg, self.config, temps, gather)
        parts = {k: gather.reduce(v, self.config.reduction) for k, v in parts.items()}
        return parts if output_dict else parts["loss"]
