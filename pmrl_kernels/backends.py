"""The backend registry and per-op dispatch: one entry per backend, nothing else to edit when a backend is added.

The loss needs two ops (OPS). A backend implements some of them, each in a module that follows that op's
Protocol below (one module may serve several ops):

    gram_eig(embeddings, normalize) -> (S, U, lead)        # a [B, M, D] tensor or M tensors [B, D];
                                                            # differentiable through S and lead
    contrastive(rows, cols, tau_reg, offset,               # per-row InfoNCE over the leads; tau_reg a float
                *, row_labels, col_labels, col_valid)       # or a 0-d tensor, which gets its gradient; the
        -> [B]                                              # optional masks remove columns from a row's
                                                            # softmax (pmrl_kernels.terms.contrastive)

Every op module also says whether it can run on a device type (`is_available`) and which inputs it refuses
(`<op>_unsupported(...)`, None when it takes them; gram_eig's gets the M row views). Wrapping a backward with
pmrl_kernels.autograd.gram_eig_autograd gives the gram_eig op both input forms. `resolve(op, backend, inputs)`
picks the implementation:

- backend="auto": the first backend in auto_order(op, device type, inputs) (AUTO_ORDER, or for many modalities
  AUTO_ORDER_MANY_MODALITIES, or for a large contrastive term on the CPU AUTO_ORDER_LARGE_BATCH) that is available
  and takes the inputs
  (the reference backend takes everything);
- a named backend that implements the op: that one, or a ValueError saying why it cannot run here;
- a named backend that does not implement the op (the compiled backends have no contrastive kernel): the op
  resolves as under "auto".

Adding a backend: a module per op it implements, one BackendSpec below, its name in AUTO_ORDER where it should
be tried (docs/extending.md). The conformance suite (tests/test_conformance.py) then tests it with no edits.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Mapping, Optional, Protocol, Sequence, Union, runtime_checkable

import torch

from .ops import triton_common

OPS = ("gram_eig", "contrastive")


@runtime_checkable
class GramEigModule(Protocol):
    """A module implementing the gram_eig op."""

    def is_available(self, device_type: str) -> bool: ...

    def gram_eig_unsupported(self, zs: Sequence[torch.Tensor]) -> Optional[str]: ...

    def gram_eig(
        self, embeddings: Union[torch.Tensor, list[torch.Tensor]], normalize: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


@runtime_checkable
class ContrastiveModule(Protocol):
    """A module implementing the contrastive op."""

    def is_available(self, device_type: str) -> bool: ...

    def contrastive_unsupported(self, rows: torch.Tensor, cols: torch.Tensor) -> Optional[str]: ...

    def contrastive(
        self, rows: torch.Tensor, cols: torch.Tensor, tau_reg: Union[float, torch.Tensor], offset: int, *,
        row_labels: Optional[torch.Tensor] = None, col_labels: Optional[torch.Tensor] = None,
        col_valid: Optional[torch.Tensor] = None,
    ) -> torch.Tensor: ...


OP_PROTOCOLS = {"gram_eig": GramEigModule, "contrastive": ContrastiveModule}


@dataclass(frozen=True)
class BackendSpec:
    name: str
    ops: Mapping[str, str]  # op -> module implementing it
    device_types: tuple[str, ...]  # empty: every device type; each module's is_available has the last word


REGISTRY = {
    spec.name: spec
    for spec in (
        BackendSpec("reference", {"gram_eig": "pmrl_kernels.reference", "contrastive": "pmrl_kernels.reference"}, ()),
        BackendSpec("cpp", {"gram_eig": "pmrl_kernels.ops.extension"}, ("cpu",)),
        BackendSpec("cuda", {"gram_eig": "pmrl_kernels.ops.extension"}, ("cuda",)),
        BackendSpec("blocked", {"contrastive": "pmrl_kernels.ops.blocked_contrastive"}, ()),
        BackendSpec(
            "triton",
            {"gram_eig": "pmrl_kernels.ops.triton_gram", "contrastive": "pmrl_kernels.ops.triton_contrastive"},
            triton_common.device_types(),
        ),
    )
}

# "auto" tries these in order, per op and device type; the first that takes the input wins.
AUTO_ORDER = {
    "gram_eig": {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpp", "reference")},
    "contrastive": {"cuda": ("blocked", "triton", "reference"), "cpu": ("reference",)},
}
# Past CUDA_REGISTER_MAX_M modalities "auto" tries Triton's gram_eig first on CUDA: it was measured faster there
# than the CUDA kernels of whole M x M matrices a lane. The CUDA kernels that replaced them above M = 8 (a warp an
# instance, rows a lane) have not run on a GPU yet (docs/results.md, "Gram eigen-solve on CUDA"). On CUDA the contrastive term takes the blocked backend
# (torch.mm on row blocks) first at every matmul precision, for one logits block of extra peak memory
# (docs/results.md, "Contrastive term on CUDA").
CUDA_REGISTER_MAX_M = 8
AUTO_ORDER_MANY_MODALITIES = {"gram_eig": {"cuda": ("triton", "cuda", "reference")}}
# On the CPU the blocked contrastive term overtakes torch's whole-matrix composition from about this many logits
# on, and holds less memory (docs/results.md, "Contrastive term on the CPU").
CPU_BLOCKED_MIN_LOGITS = 2048 * 2048
AUTO_ORDER_LARGE_BATCH = {"contrastive": {"cpu": ("blocked", "reference")}}


def auto_order(op: str, device_type: str, inputs: tuple) -> tuple[str, ...]:
    """The backends "auto" tries for `op` on these inputs, in order."""
    if op == "gram_eig":
        zs = inputs[0]
        modalities = len(zs) if isinstance(zs, (list, tuple)) else zs.shape[1]
        if modalities > CUDA_REGISTER_MAX_M and device_type in AUTO_ORDER_MANY_MODALITIES[op]:
            return AUTO_ORDER_MANY_MODALITIES[op][device_type]
    if op == "contrastive" and device_type in AUTO_ORDER_LARGE_BATCH[op]:
        rows, cols = inputs
        if rows.shape[0] * cols.shape[0] >= CPU_BLOCKED_MIN_LOGITS:
            return AUTO_ORDER_LARGE_BATCH[op][device_type]
    return AUTO_ORDER[op].get(device_type, ("reference",))

_IMPORT_FAILED: set[str] = set()


def _load(module_name: str) -> Optional[ModuleType]:
    module = sys.modules.get(module_name)
    if module is not None or module_name in _IMPORT_FAILED:
        return module
    try:
        return importlib.import_module(module_name)
    except ImportError:
        _IMPORT_FAILED.add(module_name)
        return None


def _op_module(name: str, op: str, device_type: str) -> Optional[ModuleType]:
    """The module of backend `name` for `op`, when the backend implements it and can run on this device type."""
    spec = REGISTRY[name]
    if op not in spec.ops or (spec.device_types and device_type not in spec.device_types):
        return None
    module = _load(spec.ops[op])
    if module is None or not module.is_available(device_type):
        return None
    return module


def _device_types() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def implementations(op: str, device_type: str) -> dict[str, Callable]:
    """Backend name -> the callable of `op` for every backend that implements it on this device type, in
    registry order."""
    _check_op(op)
    found = {name: _op_module(name, op, device_type) for name in REGISTRY}
    return {name: getattr(module, op) for name, module in found.items() if module is not None}


def available_backends(device_type: Optional[str] = None) -> list[str]:
    """Names of the backends usable on this machine (implementing at least one op): on tensors of
    `device_type` ("cpu", "cuda"), or on at least one of the machine's device types when it is None."""
    usable = set()
    for d in [device_type] if device_type else _device_types():
        for op in OPS:
            usable.update(implementations(op, d))
    return [name for name in REGISTRY if name in usable]


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op must be one of {list(OPS)}, got {op!r}")


def check_backend_name(backend) -> str:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend != "auto" and backend not in REGISTRY:
        raise ValueError(
            f"backend must be 'auto' or one of {list(REGISTRY)}, got {backend!r}; "
            f"available here: {available_backends()}"
        )
    return backend


def _device_type(inputs: tuple) -> str:
    first = inputs[0]
    return (first[0] if isinstance(first, (list, tuple)) else first).device.type


def unsupported_reason(op: str, name: str, inputs: tuple) -> Optional[str]:
    """Why backend `name` cannot run `op` on these inputs (None: it can). `inputs` are the op's tensor
    arguments: (zs,) for gram_eig, (rows, cols) for contrastive."""
    _check_op(op)
    device_type = _device_type(inputs)
    module = _op_module(name, op, device_type)
    if module is None:
        if op not in REGISTRY[name].ops:
            return f"backend {name!r} does not implement {op}"
        return f"backend {name!r} is not available for {device_type} tensors on this machine"
    return getattr(module, f"{op}_unsupported")(*inputs)


def resolve(op: str, backend: str, inputs: tuple) -> Callable:
    """The implementation of `op` for these inputs ((zs,) for gram_eig, (rows, cols) for contrastive)."""
    _check_op(op)
    backend = check_backend_name(backend)
    device_type = _device_type(inputs)
    if backend == "auto" or op not in REGISTRY[backend].ops:
        for name in auto_order(op, device_type, inputs):
            if unsupported_reason(op, name, inputs) is None:
                return getattr(_op_module(name, op, device_type), op)
        raise AssertionError("the reference backend takes every input")  # unreachable: reference accepts all
    reason = unsupported_reason(op, backend, inputs)
    if reason is not None:
        raise ValueError(
            f"backend {backend!r} cannot take this input: {reason} (backend='auto' falls back); "
            f"available here: {available_backends()}"
        )
    return getattr(_op_module(backend, op, device_type), op)


def _preload() -> None:
    """Import every op module that can run on this machine's device types now, at package import: resolve() then
    only reads sys.modules, which torch.compile(fullgraph=True) can trace (importlib it cannot)."""
    present = set(_device_types())
    for spec in REGISTRY.values():
        if not spec.device_types or present & set(spec.device_types):
            for module_name in spec.ops.values():
                _load(module_name)


_preload()
