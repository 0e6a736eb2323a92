"""The autograd layer shared by every backend: one torch.autograd.Function shape over a backend's forward and
backward (the FlashAttention-2 pattern: the Function calls registered ops, so torch.compile traces through it)."""
from __future__ import annotations

from typing import Callable

import torch

# forward(zs, normalize) -> (S, U, lead); backward(zs, S, U, lead, grad_S, grad_lead, normalize) -> dz [B, M, D]
Forward = Callable[[list, bool], tuple]
Backward = Callable[..., torch.Tensor]


def gram_eig_autograd(forward: Forward, backward: Backward) -> Callable[[list, bool], tuple]:
    """gram_eig(zs, normalize) -> (S, U, lead), differentiable through S and lead (U carries no gradient)."""

    class GramEig(torch.autograd.Function):
        @staticmethod
        def forward(ctx, normalize: bool, *zs: torch.Tensor):
            s, u, lead = forward(list(zs), normalize)
            ctx.save_for_backward(*zs, s, u, lead)
            ctx.normalize = normalize
            ctx.mark_non_differentiable(u)
            # An output the loss does not use gets None, not zeros: with reg_weight = 0 the backward never reads
            # a [B, D] gradient of lead.
            ctx.set_materialize_grads(False)
            return s, u, lead

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_s, grad_u, grad_lead):
            *zs, s, u, lead = ctx.saved_tensors
            if grad_s is None and grad_lead is None:
                return (None,) * (1 + len(zs))
            dz = backward(zs, s, u, lead, grad_s, grad_lead, ctx.normalize)
            return (None, *dz.unbind(1))

    def gram_eig(zs: list[torch.Tensor], normalize: bool):
        return GramEig.apply(normalize, *zs)

    return gram_eig
