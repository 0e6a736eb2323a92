"""What one benchmark cell is: a Case (target, provider, mode, size, matmul precision), the inputs every provider
of a size shares, the call each mode times, and Skip, how a cell that cannot run says so."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..inputs import compute_dtype

MODES = ("forward", "backward", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
# how float32 matmuls run: IEEE ("highest"), TF32 ("high"), or bfloat16 operands under autocast
PRECISIONS = ("highest", "tf32", "bf16")

# inputs -> tuple of differentiable outputs; the inputs are the make_inputs entry the target takes
Forward = Callable[[list[torch.Tensor]], tuple]


@dataclass(frozen=True)
class Case:
    target: str
    provider: str
    mode: str
    dtype: str
    B: int
    M: int
    D: int
    precision: str = "highest"


def compute_size(case: Case) -> int:
    """Bytes of one element in the dtype the maths runs in (float32 for 16-bit inputs)."""
    return compute_dtype(DTYPES[case.dtype]).itemsize


class Skip(Exception):
    """The cell cannot run; args[0] is its state, args[1] the reason."""


def make_inputs(dtype: str, b: int, m: int, d: int, device: torch.device, seed: int = 0) -> dict:
    """{"z": M tensors [B, D], "lead": [unit rows [B, D] in the compute dtype]}, all requiring grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[dtype]
    zs = [torch.randn(b, d, generator=gen, device=device, dtype=dt).requires_grad_() for _ in range(m)]
    lead = F.normalize(torch.randn(b, d, generator=gen, device=device, dtype=compute_dtype(dt)), dim=-1)
    return {"z": zs, "lead": [lead.requires_grad_()]}


@contextlib.contextmanager
def matmul_precision(precision: str, device_type: str):
    """float32 matmuls in `precision` (PRECISIONS) inside the block, torch's setting restored after it."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            yield
    finally:
        torch.set_float32_matmul_precision(saved)


def callables(forward: Forward, inputs: list[torch.Tensor], mode: str):
    """(setup, fn): setup runs untimed before each call and returns fn's argument."""
    def fresh():
        for x in inputs:
            x.grad = None

    def backward(outs):
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])

    if mode == "forward":
        return fresh, lambda _: forward(inputs)
    if mode == "backward":
        def setup():
            fresh()
            outs = forward(inputs)
            return outs, [torch.ones_like(o) for o in outs]
        return setup, lambda og: torch.autograd.backward(*og)
    return fresh, lambda _: backward(forward(inputs))
