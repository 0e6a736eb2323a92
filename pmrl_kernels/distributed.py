"""Data-parallel PMRL: gather every rank's leading directions with gradient.

`PMRLLoss(gather_with_grad=True)` uses this module. Each rank computes the alignment term on its own rows and
the contrastive term of its rows against the leads of all ranks of its process group (PMRLLoss's process_group,
by default the default group; in group rank order), target = offset of this rank + i. Per-rank batch sizes
may differ: the sizes are gathered first, each rank pads its leads to the largest size, gathers, and drops the
padding.

Scaling, chosen so that DDP's gradient averaging reproduces single-process training on the concatenated batch
(N rows over the W ranks of the group, loss_i the per-row loss of the single-process computation):

- reduction "mean": each rank returns W / N * sum of its loss_i. The mean over ranks is the single-process mean.
- reduction "sum":  each rank returns W * sum of its loss_i. The mean over ranks is the single-process sum.
- reduction "none": each rank returns its own loss_i [B_r], unscaled; concatenated in rank order they are the
  single-process output.

The gather's backward sums every rank's gradient into the rows it came from (a reduce-scatter), so the gradient
a rank receives on its embeddings is that of the sum of all ranks' losses: W times the single-process gradient
for "mean" and "sum". DDP divides by W again when it averages parameter gradients.

With a modality mask (`present`), N counts the instances with a present modality only, and the gathered
flags of those instances leave the others out of every rank's negatives; with `labels`, the gathered labels
remove every rank's same-label columns. Every rank passes present (labels) or none does.

Only lead [B, D] crosses ranks with gradient, so this works with every backend. Each step costs one all_gather
of the batch sizes (an int64 per rank, read on the host: a device sync on CUDA), one all_gather of the padded
leads, and one of the labels and one of the present flags when they are given.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

try:  # functional collectives: traceable by torch.compile; the name changed across torch releases
    from torch.distributed import _functional_collectives as _fc

    _functional_all_gather = getattr(_fc, "all_gather_single_autograd", None) or getattr(
        _fc, "all_gather_tensor_autograd", None
    )
except ImportError:
    _functional_all_gather = None


def _nn_all_gather(x: torch.Tensor, group) -> torch.Tensor:
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x, group=group), dim=0)


def all_gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate x [b, ...] of every rank along dim 0 (equal b on all ranks); the backward sums the gradients
    of all ranks into each rank's x. Functional collectives when torch has them, else torch.distributed.nn."""
    if _functional_all_gather is not None:
        return _functional_all_gather(x, 0, group if group is not None else dist.group.WORLD)
    return _nn_all_gather(x, group)


def check_group(group) -> None:
    """TypeError unless group is None (the default group) or a torch.distributed ProcessGroup."""
    if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
        raise TypeError(
            f"process_group must be None (the default group) or a torch.distributed.ProcessGroup such as "
            f"dist.new_group(...) returns, got {type(group).__name__}"
        )


def require_process_group() -> None:
    """RuntimeError unless torch.distributed is available and its default process group is initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "PMRLLoss(gather_with_grad=True) needs an initialised torch.distributed process group: call "
            "torch.distributed.init_process_group(...) before the forward pass, or use gather_with_grad=False "
            "for single-process training"
        )


class RowGather:
    """The `gather` hook of the loss for one forward pass: rows -> (rows of every rank of `group`, offset of ours).

    Construction gathers the per-rank batch sizes (a collective: every rank of the group must construct one per
    step). group None is the default group; every collective, size and rank is taken in `group`.
    """

    def __init__(self, batch: int, device: torch.device, group=None):
        require_process_group()
        self.group = group
        self.world_size = dist.get_world_size(group)
        size = torch.tensor([batch], dtype=torch.int64, device=device)
        sizes = [torch.empty_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=group)
        self.sizes = [int(s) for s in sizes]
        self.offset = sum(self.sizes[: dist.get_rank(group)])

    @property
    def total(self) -> int:
        return sum(self.sizes)

    def __call__(self, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
        most = max(self.sizes)
        # all_gather needs one shape on every rank: pad with zero rows, gather, then drop them
        padded = F.pad(rows, (0, 0, 0, most - rows.shape[0]))
        gathered = all_gather_with_grad(padded.contiguous(), self.group)
        cols = torch.cat([gathered[r * most: r * most + n] for r, n in enumerate(self.sizes)], dim=0)
        return cols, self.offset

    def values(self, flags: torch.Tensor) -> torch.Tensor:
        """flags [b] (labels, masks: no gradient) of every rank, concatenated in rank order. Sent as int64, which
        every process-group backend reduces and gathers."""
        most = max(self.sizes)
        padded = F.pad(flags.to(torch.int64), (0, most - flags.shape[0]))
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, self.sizes)]).to(flags.dtype)

    def reduce(self, per_row: torch.Tensor, reduction: str, valid=None) -> torch.Tensor:
        """This rank's share of the loss under the scaling in the module docstring. valid [N] bool (every rank's
        instances with a present modality, or None for all): "mean" is over those."""
        if reduction == "none":
            return per_row
        if reduction == "sum":
            return per_row.sum() * self.world_size
        if valid is None:
            return per_row.sum() * (self.world_size / self.total)
        return per_row.sum() * self.world_size / valid.sum().clamp_min(1)

