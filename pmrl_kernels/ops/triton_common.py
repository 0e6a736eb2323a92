"""Where the Triton backend can run, decided in one place: CUDA tensors, and CPU tensors only under Triton's
interpreter (TRITON_INTERPRET=1 before triton is first imported; the tests' CPU path). Imports no triton, so the
registry can ask without loading it."""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def device_types() -> tuple[str, ...]:
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def is_available(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available()
    return device_type in device_types()
