"""The backend registry: one entry per backend, nothing else to edit when a backend is added.

A backend is a module exposing
    is_available(device_type: str) -> bool       # built/importable and usable on that device type
    unsupported_reason(zs) -> str | None          # shapes/dtypes it cannot take (None: it can)
    gram_eig(zs, normalize) -> (S, U, lead)       # differentiable through S and lead
and optionally
    contrastive(rows, cols, tau_reg, offset) -> [B]   # per-row InfoNCE over lead (default: reference.contrastive)
"""
from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch


@dataclass(frozen=True)
class BackendSpec:
    name: str
    module: str
    device_types: tuple[str, ...]  # empty: every device type


REGISTRY = {
    spec.name: spec
    for spec in (
        BackendSpec("reference", "pmrl_kernels.reference", ()),
        BackendSpec("cpp", "pmrl_kernels.ops.extension", ("cpu",)),
        BackendSpec("cuda", "pmrl_kernels.ops.extension", ("cuda",)),
        # CPU tensors only in Triton's interpreter (the tests' CPU path)
        BackendSpec(
            "triton", "pmrl_kernels.ops.triton_gram",
            ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
        ),
    )
}

# "auto" tries these in order for the input's device type; the first that takes the input wins.
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpp", "reference")}


_IMPORT_FAILED: set[str] = set()


def _load(spec: BackendSpec) -> Optional[ModuleType]:
    module = sys.modules.get(spec.module)
    if module is not None or spec.module in _IMPORT_FAILED:
        return module
    try:
        return importlib.import_module(spec.module)
    except ImportError:
        _IMPORT_FAILED.add(spec.module)
        return None


def _usable(spec: BackendSpec, device_type: str) -> Optional[ModuleType]:
    if spec.device_types and device_type not in spec.device_types:
        return None
    module = _load(spec)
    if module is None or not module.is_available(device_type):
        return None
    return module


def _device_types() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backend_modules(device_type: str) -> dict[str, ModuleType]:
    """Name -> module of the backends usable on tensors of this device type, in registry order."""
    found = {name: _usable(spec, device_type) for name, spec in REGISTRY.items()}
    return {name: module for name, module in found.items() if module is not None}


def available_backends(device_type: Optional[str] = None) -> list[str]:
    """Names of the backends usable on this machine: on tensors of `device_type` ("cpu", "cuda"), or on at least
    one of the machine's device types when it is None."""
    usable = set()
    for d in [device_type] if device_type else _device_types():
        usable.update(backend_modules(d))
    return [name for name in REGISTRY if name in usable]


def resolve(backend, zs: list[torch.Tensor]) -> ModuleType:
    """The backend module for these inputs; "auto" picks the first of AUTO_ORDER that takes them."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    device_type = zs[0].device.type
    if backend == "auto":
        for name in AUTO_ORDER.get(device_type, ("reference",)):
            module = _usable(REGISTRY[name], device_type)
            if module is not None and module.unsupported_reason(zs) is None:
                return module
        raise AssertionError("the reference backend takes every input")  # unreachable: reference accepts all
    if backend not in REGISTRY:
        raise ValueError(
            f"backend must be 'auto' or one of {list(REGISTRY)}, got {backend!r}; "
            f"available here: {available_backends()}"
        )
    module = _usable(REGISTRY[backend], device_type)
    if module is None:
        raise ValueError(
            f"backend {backend!r} is not available for {device_type} tensors on this machine; "
            f"available here: {available_backends()}"
        )
    reason = module.unsupported_reason(zs)
    if reason is not None:
        raise ValueError(f"backend {backend!r} cannot take this input: {reason} (backend='auto' falls back)")
    return module


def _preload() -> None:
    """Import every backend that can run on this machine's device types now, at package import: resolve() then
    only reads sys.modules, which torch.compile(fullgraph=True) can trace (importlib it cannot)."""
    present = set(_device_types())
    for spec in REGISTRY.values():
        if not spec.device_types or present & set(spec.device_types):
            _load(spec)


_preload()
