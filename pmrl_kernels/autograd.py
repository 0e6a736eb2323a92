"""The autograd layer shared by every backend: one torch.autograd.Function shape over a backend's forward and
backward (the FlashAttention-2 pattern: the Function calls registered ops, so torch.compile traces through it)."""
from __future__ import annotations

from typing import Callable, Union

import torch

# forward(zs, normalize) -> (S, U, lead); backward(zs, S, U, grad_S, grad_lead, normalize) -> dz [B, M, D]
Forward = Callable[[list, bool], tuple]
Backward = Callable[..., torch.Tensor]


def gram_eig_autograd(forward: Forward, backward: Backward) -> Callable:
    """gram_eig(embeddings, normalize) -> (S, U, lead), differentiable through S and lead (U carries no gradient).

    embeddings is a [B, M, D] tensor or a list of M tensors [B, D]. The kernels take the M rows as views either
    way; a tensor gets its gradient as one [B, M, D] tensor (no unbind node, whose backward would stack a copy),
    a list one [B, D] view per modality.
    """

    def save(ctx, normalize, inputs, zs):
        s, u, lead = forward(zs, normalize)
        ctx.save_for_backward(*inputs, s, u)  # the backward needs no lead (reference.gram_eig_backward)
        ctx.normalize = normalize
        ctx.mark_non_differentiable(u)
        # An output the loss does not use gets None, not zeros: with reg_weight = 0 the backward never reads
        # a [B, D] gradient of lead.
        ctx.set_materialize_grads(False)
        return s, u, lead

    def gradient(ctx, grad_s, grad_lead, as_rows):
        if grad_s is None and grad_lead is None:
            return None
        *inputs, s, u = ctx.saved_tensors
        return backward(as_rows(inputs), s, u, grad_s, grad_lead, ctx.normalize)

    class GramEigRows(torch.autograd.Function):
        @staticmethod
        def forward(ctx, normalize: bool, *zs: torch.Tensor):
            return save(ctx, normalize, zs, list(zs))

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_s, grad_u, grad_lead):
            dz = gradient(ctx, grad_s, grad_lead, list)
            n = len(ctx.saved_tensors) - 2
            return (None,) * (1 + n) if dz is None else (None, *dz.unbind(1))

    class GramEigTensor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, normalize: bool, z: torch.Tensor):
            return save(ctx, normalize, (z,), list(z.unbind(1)))

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_s, grad_u, grad_lead):
            return None, gradient(ctx, grad_s, grad_lead, lambda inputs: list(inputs[0].unbind(1)))

    def gram_eig(embeddings: Union[torch.Tensor, list], normalize: bool):
        if isinstance(embeddings, torch.Tensor):
            return GramEigTensor.apply(normalize, embeddings)
        return GramEigRows.apply(normalize, *embeddings)

    return gram_eig
