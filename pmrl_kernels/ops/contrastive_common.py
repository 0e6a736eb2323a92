"""What the contrastive op's backends share (pmrl_kernels/ops/triton_contrastive.py, blocked_contrastive.py): the
precision torch would use for the logits matmul, and the autograd layer over a backend's three registered ops.

Each backend registers a forward op (rows, cols, tau_reg, offset, precision, *masks) -> (loss, *saved), where saved
are private tensors its backward needs (never the returned loss itself, so that editing the loss in place stays
allowed), a backward op (rows, cols, *saved, grad_loss, tau_reg, offset, precision, *masks) -> (d rows, d cols),
and a symmetric backward op (lead, *saved, grad_loss, tau_reg, precision, *masks) -> d lead for rows that are the
columns (offset 0): d rows + d cols in one buffer, no separate add. masks are row_labels, col_labels, col_valid
(pmrl_kernels.terms.contrastive; each None or a tensor, never read on the host). `differentiable` turns the three
into the op's `contrastive(rows, cols, tau_reg, offset, *, row_labels, col_labels, col_valid)`. Imports no triton.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..inputs import Temperature, compute_dtype
from ..terms import check_contrastive_masks, check_offset

PRECISIONS = ("ieee", "tf32", "bf16", "fp16")
HALF_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def product_operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """t as a logits-product operand, cast once: 16-bit under bf16/fp16 (as torch.autocast's matmul takes it, and
    half the bytes of every tile load), except float64, which autocast leaves alone."""
    half = None if t.dtype == torch.float64 else HALF_DTYPES.get(precision)
    return t if half is None else t.to(half)
N_MASKS = 3  # row_labels, col_labels, col_valid: the ops' last arguments, forward and backward


@torch.compiler.assume_constant_result
def _tf32_matmul(device_type: str) -> bool:
    """Whether torch's float32 matmul on this device type may use TF32, read when a graph is traced (torch.compile
    cannot trace the str-valued settings; a change of them retraces). From the per-backend setting
    (torch.backends.cuda.matmul.fp32_precision, or mkldnn's off CUDA; "none" defers to torch.backends.fp32_precision),
    which torch.set_float32_matmul_precision also sets and which, unlike torch.get_float32_matmul_precision, stays
    readable when a program has used both of torch's APIs."""
    backend = torch.backends.cuda.matmul if device_type == "cuda" else torch.backends.mkldnn.matmul
    setting = getattr(backend, "fp32_precision", None)
    if setting is None:  # a torch without the per-backend API
        return torch.get_float32_matmul_precision() != "highest"
    if setting == "none":
        setting = torch.backends.fp32_precision
    return setting == "tf32"


def operand_precision(device_type: str) -> str:
    """The precision torch would use for the logits matmul here: "bf16"/"fp16" operands under torch.autocast
    with that dtype, "tf32" where torch's float32 matmul may use TF32 (torch.set_float32_matmul_precision "high"
    or "medium", or fp32_precision "tf32"), "ieee" (plain fp32) otherwise, as under torch's default "highest"."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if dtype in (torch.bfloat16, torch.float16):
            return "bf16" if dtype == torch.bfloat16 else "fp16"
    return "tf32" if _tf32_matmul(device_type) else "ieee"


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")


def differentiable(fwd: Callable, bwd: Callable, sym_bwd: Callable, float32_only: bool) -> Callable:
    """The contrastive op (backends.ContrastiveModule.contrastive) over a backend's registered ops (module
    docstring). Inputs go to the ops in their compute dtype (float32, or float64 unless float32_only).

    A 0-d tensor tau_reg never reaches the ops as a number (reading it would sync the device and break
    torch.compile): they run at temperature 1 on operands scaled by it, lead / sqrt(tau_reg) on both sides when
    rows are columns (the symmetric backward stays), rows / tau_reg otherwise. Autograd of that O((B + N) D)
    scaling gives d tau_reg = -(1 / tau_reg) sum_i rows_i . d rows_i (docs/maths.md, "Temperature gradients")."""

    class Contrastive(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rows, cols, tau_reg: float, offset: int, precision: str, *masks):
            loss, *saved = fwd(rows, cols, tau_reg, offset, precision, *masks)
            ctx.save_for_backward(*masks, rows, cols, *saved)
            ctx.args = tau_reg, offset, precision
            return loss

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss):
            masks, saved = ctx.saved_tensors[:N_MASKS], ctx.saved_tensors[N_MASKS:]
            d_rows, d_cols = bwd(*saved, grad_loss, *ctx.args, *masks)
            return d_rows, d_cols, None, None, None, *(None,) * N_MASKS

    class SymmetricContrastive(torch.autograd.Function):
        @staticmethod
        def forward(ctx, lead, tau_reg: float, precision: str, *masks):
            loss, *saved = fwd(lead, lead, tau_reg, 0, precision, *masks)
            ctx.save_for_backward(*masks, lead, *saved)
            ctx.args = tau_reg, precision
            return loss

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_loss):
            masks, saved = ctx.saved_tensors[:N_MASKS], ctx.saved_tensors[N_MASKS:]
            return sym_bwd(*saved, grad_loss, *ctx.args, *masks), None, None, *(None,) * N_MASKS

    def contrastive(
        rows: torch.Tensor, cols: torch.Tensor, tau_reg: Temperature, offset: int = 0, *,
        row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
        col_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        check_offset(rows, cols, offset)
        check_contrastive_masks(rows, cols, row_labels, col_labels, col_valid)
        if col_labels is row_labels and row_labels is not None:
            col_labels = row_labels.view_as(row_labels)  # an alias: autograd.Function.apply traces no input twice
        masks = row_labels, col_labels, col_valid
        precision = operand_precision(rows.device.type)
        same = rows is cols
        dtype = torch.float32 if float32_only else compute_dtype(torch.promote_types(rows.dtype, cols.dtype))

        def op_input(t: torch.Tensor) -> torch.Tensor:
            """dtype, unit feature stride (differentiable; a no-op for the leads gram_eig returns)."""
            return t.to(dtype).contiguous()

        if isinstance(tau_reg, torch.Tensor):
            # in the compute dtype before any arithmetic: rsqrt in bfloat16 would change the temperature itself
            temperature = tau_reg.to(dtype)
            rows = rows * temperature.rsqrt() if same else rows / temperature
            cols = rows if same else cols
            tau_reg = 1.0
        if same:
            return SymmetricContrastive.apply(op_input(rows), float(tau_reg), precision, *masks)
        return Contrastive.apply(op_input(rows), op_input(cols), float(tau_reg), int(offset), precision, *masks)

    return contrastive
