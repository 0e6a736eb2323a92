"""Public API: the PMRL loss (functional and nn.Module) and the batched Gram/eigen decomposition."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Union

import torch
from torch import nn

from . import backends, distributed, terms
from .config import DEFAULTS, PMRLConfig
from .inputs import (
    Embeddings, Temperature, flag, instance_labels, modality_list, modality_mask, positional_embeddings, reduce,
    temperature_device, temperature_value,
)

# open_clip's bound on its learned logit scale exp(logit_scale): the learned tau_reg never goes below 1 / 100
MAX_LOGIT_SCALE = 100.0


class GramSVD(NamedTuple):
    """S [B, M]: singular values of each instance's normalised M x D matrix Zn, descending, 0-padded when D < M.
    U [B, M, M]: columns the matching eigenvectors of G = Zn Zn^T, each column's sign fixed so it sums to >= 0.
    lead [B, D]: the unit leading direction Zn^T U[:, :, 0] / S[:, 0], with lead . sum_m zn_m >= 0.
    All three are float32 (float64 for float64 input). S and lead carry gradients; U does not.

    Under a modality mask the absent rows are zero rows: S holds the singular values of the present rows first,
    then zeros; the columns of U for nonzero singular values are 0 at the absent rows; lead is the present rows'
    leading direction. An instance with no present row has S = 0 and lead = 0."""

    S: torch.Tensor
    U: torch.Tensor
    lead: torch.Tensor


class Modalities(NamedTuple):
    """Checked embeddings. views: M tensors [B, D], for the checks and the backend choice. batch: what gram_eig
    gets, a [B, M, D] tensor as it is (its gradient then comes back whole, with no unbind copy) or the views."""

    views: list[torch.Tensor]
    batch: Union[torch.Tensor, list[torch.Tensor]]


def _modalities(args: tuple, caller: str, present) -> tuple[Modalities, Optional[torch.Tensor]]:
    """The checked embeddings of a call, absent rows zeroed, and the checked mask (None: all present)."""
    embeddings = positional_embeddings(args, caller)
    views = modality_list(embeddings)
    present = modality_mask(present, views)
    if present is None:
        return Modalities(views, embeddings if isinstance(embeddings, torch.Tensor) else views), None
    # a select, not a product: NaN or Inf in an absent row cannot leak, and the row's gradient is exactly 0
    if isinstance(embeddings, torch.Tensor):
        batch = torch.where(present[:, :, None], embeddings, 0)
        return Modalities(list(batch.unbind(1)), batch), present
    views = [torch.where(present[:, m, None], z, 0) for m, z in enumerate(views)]
    return Modalities(views, views), present


def _gram_eig(modalities: Modalities, normalize: bool, backend: str) -> GramSVD:
    return GramSVD(*backends.resolve("gram_eig", backend, (modalities.views,))(modalities.batch, normalize))


def gram_svd(*embeddings: Embeddings, present: Optional[torch.Tensor] = None, normalize: bool = True,
             backend: str = "auto") -> GramSVD:
    """Singular values, Gram eigenvectors and canonical leading direction of every instance.

    Same S and lead as torch.linalg.svd of the stacked [B, D, M] matrix, without ever forming its [B, D, D] U.
    present [B, M] bool marks the modalities each instance has (GramSVD says what absent rows give).

    Shape: embeddings [B, M, D], a sequence of M tensors [B, D] or M positional tensors [B, D] -> S [B, M],
    U [B, M, M], lead [B, D].

    >>> out = gram_svd(torch.randn(8, 3, 64))
    >>> out.S.shape, out.lead.shape
    (torch.Size([8, 3]), torch.Size([8, 64]))
    """
    modalities, _ = _modalities(embeddings, "gram_svd", present)
    return _gram_eig(modalities, flag(normalize, "normalize"), backend)


# the gathered batch of one forward pass: leads -> (every rank's leads, offset of ours); see pmrl_kernels.distributed
Gather = distributed.RowGather


class Batch(NamedTuple):
    """What the loss terms read about this rank's instances. count [B]: present modalities per instance (None:
    all M). labels [B] int64 or None. col_labels [N], col_valid [N] bool: the labels of the contrastive columns
    and whether each has a present modality (this rank's, or every rank's under the gather; None when unused)."""

    svd: GramSVD
    count: Optional[torch.Tensor]
    labels: Optional[torch.Tensor]
    col_labels: Optional[torch.Tensor]
    col_valid: Optional[torch.Tensor]


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


def _align(batch: Batch, temps: Temperatures, config: PMRLConfig, gather: Optional[Gather]) -> torch.Tensor:
    return terms.alignment(batch.svd.S, temps.tau, batch.count)


def _reg(batch: Batch, temps: Temperatures, config: PMRLConfig, gather: Optional[Gather]) -> torch.Tensor:
    lead = batch.svd.lead
    cols, offset = (lead, 0) if gather is None else gather(lead)
    masks = {"row_labels": batch.labels, "col_labels": batch.col_labels, "col_valid": batch.col_valid}
    contrastive = backends.resolve("contrastive", config.backend, (lead, cols))
    # options left out when unused, so an unmasked call is the op's plain call
    return contrastive(lead, cols, temps.tau_reg, offset, **{k: v for k, v in masks.items() if v is not None})


@dataclass(frozen=True)
class Term:
    """One named part of the loss: loss = sum over TERMS of weight(config) * value. A term of weight 0 is not
    computed (its part reads 0 and it gets no gradient): reg_weight = 0 skips the B x B contrastive work."""

    name: str
    weight: Callable[[PMRLConfig], float]
    value: Callable[[Batch, Temperatures, PMRLConfig, Optional[Gather]], torch.Tensor]  # per instance [B]


TERMS = (
    Term("align", lambda config: 1.0, _align),
    Term("reg", lambda config: config.reg_weight, _reg),
)


def _batch(modalities: Modalities, present, labels, config: PMRLConfig, gather: Optional[Gather]) -> Batch:
    """gram_eig of the checked rows, with the instances' masks (and the columns' masks, gathered under a gather)."""
    labels = instance_labels(labels, modalities.views)  # checked before the eigen-solve's work
    svd = _gram_eig(modalities, config.normalize, config.backend)
    count = None if present is None else present.sum(dim=1)
    valid = None if count is None else count > 0
    share = (lambda t: t) if gather is None else gather.values
    return Batch(svd, count, labels, None if labels is None else share(labels), None if valid is None else share(valid))


def _per_instance(batch: Batch, config: PMRLConfig, temps: Temperatures, gather: Optional[Gather] = None
                  ) -> dict[str, torch.Tensor]:
    """Per-instance {"loss", *term names} [B]; 0 for an instance with no present modality."""
    s = batch.svd.S
    parts = {}
    loss = None
    for term in TERMS:
        weight = term.weight(config)
        value = term.value(batch, temps, config, gather) if weight != 0 else s.new_zeros(s.shape[0])
        if batch.count is not None:
            value = torch.where(batch.count > 0, value, torch.zeros_like(value))
        parts[term.name] = value
        loss = weight * value if loss is None else loss + weight * value
    return {"loss": loss, **parts}


def _reduced(parts: dict[str, torch.Tensor], batch: Batch, reduction: str) -> dict[str, torch.Tensor]:
    """Reduced parts: "mean" is over the instances with a present modality."""
    if reduction == "mean" and batch.count is not None:
        instances = (batch.count > 0).sum().clamp_min(1)
        return {k: v.sum() / instances for k, v in parts.items()}
    return {k: reduce(v, reduction) for k, v in parts.items()}


def _diagnostics(svd: GramSVD, present: Optional[torch.Tensor], reduction: str) -> dict[str, torch.Tensor]:
    """Detached figures of each instance's present views, from S and U alone (no second pass over the
    embeddings): G = U diag(S^2) U^T is the Gram matrix, so zn_m . zn_n = G_mn and zn_m . lead = sigma_1 U[m, 0].
    Per instance [B] for reduction "none" (0 where undefined: no present view, or fewer than two for
    pairwise_cos), else their mean over the instances where they are defined."""
    with torch.no_grad():
        s, u = svd.S, svd.U
        modalities = s.shape[1]
        on = torch.ones_like(s, dtype=torch.bool) if present is None else present
        # S / sigma_1: cosines do not depend on the scale, and squares of S could overflow without normalize
        top = s[:, :1]
        t = s / torch.where(top > 0, top, torch.ones_like(top))
        g = (u * (t * t)[:, None, :]) @ u.transpose(-1, -2)
        norm = g.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
        # a row this far below sigma_1 is a zero row up to the eigensolver's rounding: its cosines count as 0
        live = norm > torch.finfo(s.dtype).eps ** 0.5
        inv = torch.where(live, 1 / norm.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(norm))
        to_lead = t[:, :1] * u[:, :, 0] * inv
        cos = g * inv[:, :, None] * inv[:, None, :]
        above = torch.ones(modalities, modalities, dtype=torch.bool, device=s.device).triu(1)
        pairs = on[:, :, None] & on[:, None, :] & above
        views, n_pairs = on.sum(dim=1), pairs.sum(dim=(1, 2))
        figures = {
            "sigma1": (s[:, 0], views > 0),
            "against_lead": (((to_lead < 0) & on).sum(dim=1).to(s.dtype) / views.clamp_min(1), views > 0),
            "pairwise_cos": ((cos * pairs).sum(dim=(1, 2)) / n_pairs.clamp_min(1), n_pairs > 0),
        }
        if reduction == "none":
            return {k: torch.where(defined, value, torch.zeros_like(value)) for k, (value, defined) in figures.items()}
        return {k: torch.where(defined, value, torch.zeros_like(value)).sum() / defined.sum().clamp_min(1)
                for k, (value, defined) in figures.items()}


def pmrl_loss(
    *embeddings: Embeddings,
    present: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
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

    Shape: embeddings [B, M, D], a sequence of M tensors [B, D], or M tensors [B, D] as positional arguments
    (pmrl_loss(text, video, audio)), read in place; every option is keyword-only. Returns a scalar (reduction
    "mean"/"sum") or [B] ("none"), float32 (float64 for float64 input).

    present [B, M] bool: the modalities each instance has. An absent row takes no part (its gradient is 0, even
    where it holds NaN); an instance with one present modality has align 0; one with none is 0 in "none", left
    out of "mean" (the mean over the others) and is no negative of the contrastive term.
    labels [B] integer: instances of one label are not each other's negatives (a clip seen twice).

    output_dict=True returns {"loss", "align", "reg"} reduced alike ("reg" is 0 when reg_weight = 0, which skips
    the B x B work) and three detached figures of each instance's present views, per instance for "none" and
    else their mean over the instances: "sigma1" sigma_1 (at most sqrt(M) with normalize, reached when all views
    align), "against_lead" the share of views whose cosine with the lead is negative, "pairwise_cos" the mean
    cosine between two views (over the instances with two).

    tau and tau_reg are numbers, or 0-d floating tensors (a learnable nn.Parameter, or a tensor computed from
    one such as 1 / logit_scale.exp()) on the embeddings' device, which then get their gradient with every
    backend. Every temperature must be finite and, rounded to float32, at least float32(1e-4) (both 1e-4
    and torch.tensor(1e-4) are accepted); a tensor's value is checked on every eager call (a
    host read: a device sync on a GPU) and not under torch.compile, which traces it without a graph break.

    >>> z = torch.randn(32, 3, 128, requires_grad=True)
    >>> pmrl_loss(z).backward()
    """
    config = PMRLConfig(tau, tau_reg, reg_weight, normalize, reduction, backend)
    output_dict = flag(output_dict, "output_dict")
    modalities, present = _modalities(embeddings, "pmrl_loss", present)
    temps = _temperatures(config, modalities.views[0].device)
    batch = _batch(modalities, present, labels, config, None)
    parts = _reduced(_per_instance(batch, config, temps), batch, config.reduction)
    return {**parts, **_diagnostics(batch.svd, present, config.reduction)} if output_dict else parts["loss"]


class PMRLLoss(nn.Module):
    """nn.Module form of `pmrl_loss`: the same loss, call forms and options, checked once at construction.

    A tensor tau or tau_reg is kept by reference: a leaf (an nn.Parameter) that its owner trains.
    learn_tau_reg=True learns tau_reg as open_clip learns its temperature: a parameter logit_scale, with
    tau_reg = 1 / min(exp(logit_scale), 100), never read on the host. gather_with_grad=True (data-parallel
    training) runs the contrastive term against the leads, labels and masks of every rank of process_group,
    scaled so that DDP's averaging gives the single-process loss on the concatenated batch; the default, as in
    the published code, computes on each rank's batch. docs/maths.md, "Temperature gradients" and "Distributed".

    >>> loss_fn = PMRLLoss(tau=0.05)
    >>> loss = loss_fn(text_emb, video_emb, audio_emb)
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

    def forward(self, *embeddings: Embeddings, present: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, output_dict: bool = False):
        """pmrl_loss's value under this config; under the gather, the diagnostics are this rank's batch's."""
        output_dict = flag(output_dict, "output_dict")
        modalities, present = _modalities(embeddings, "PMRLLoss", present)
        device = modalities.views[0].device
        temps = _temperatures(self.config, device, self.learned_tau_reg())
        gather = None
        if self.gather_with_grad:
            gather = distributed.RowGather(modalities.views[0].shape[0], device, self.process_group)
        batch = _batch(modalities, present, labels, self.config, gather)
        parts = _per_instance(batch, self.config, temps, gather)
        if gather is None:
            parts = _reduced(parts, batch, self.config.reduction)
        else:
            # per-row values, so the reduction can be scaled by the global batch size
            parts = {k: gather.reduce(v, self.config.reduction, batch.col_valid) for k, v in parts.items()}
        return {**parts, **_diagnostics(batch.svd, present, self.config.reduction)} if output_dict else parts["loss"]
