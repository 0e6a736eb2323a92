"""Argument checking shared by every public entry point.

Each check raises ValueError/TypeError naming the argument and the expected form, so a bad call fails
before any kernel sees it.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

import numpy
import torch

from .constants import MIN_TEMPERATURE

Embeddings = Union[torch.Tensor, Sequence[torch.Tensor]]
Temperature = Union[float, torch.Tensor]  # a number, or a 0-d floating tensor (e.g. a learnable nn.Parameter)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the maths runs in: float64 stays float64, everything else is done in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_dtype(t: torch.Tensor, what: str) -> None:
    if t.layout != torch.strided:
        raise TypeError(f"{what} must be a dense (strided) tensor, got layout {t.layout}; call .to_dense() first")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{what} must be a floating tensor (float16, bfloat16, float32 or float64), got dtype {t.dtype}"
        )


def modality_list(embeddings: Embeddings, name: str = "embeddings") -> list[torch.Tensor]:
    """Validate `embeddings` and return it as a list of M tensors [B, D] (views, never copies).

    Accepts a tensor [B, M, D] or a sequence of M tensors [B, D] with equal shape, device and dtype.
    """
    if isinstance(embeddings, torch.Tensor):
        _check_dtype(embeddings, name)
        if embeddings.dim() != 3:
            raise ValueError(
                f"{name} must be a 3-D tensor [B, M, D] (instance, modality, feature), a sequence of M tensors "
                f"[B, D] or M >= 2 positional tensors [B, D]; got a {embeddings.dim()}-D tensor of shape "
                f"{tuple(embeddings.shape)}"
            )
        zs = list(embeddings.unbind(1))
        batch, modalities, features = embeddings.shape
    elif isinstance(embeddings, (list, tuple)):
        zs = list(embeddings)
        for m, z in enumerate(zs):
            if not isinstance(z, torch.Tensor):
                raise TypeError(f"{name}[{m}] must be a torch.Tensor [B, D], got {type(z).__name__}")
            _check_dtype(z, f"{name}[{m}]")
            if z.dim() != 2:
                raise ValueError(
                    f"{name}[{m}] must be a 2-D tensor [B, D], got shape {tuple(z.shape)}; the embeddings are "
                    f"{EMBEDDING_FORMS}"
                )
        if zs:
            first = zs[0]
            for m, z in enumerate(zs[1:], start=1):
                if z.shape != first.shape:
                    raise ValueError(
                        f"every tensor in {name} must have the same shape [B, D]: {name}[0] is "
                        f"{tuple(first.shape)}, {name}[{m}] is {tuple(z.shape)}"
                    )
                if z.device != first.device:
                    raise ValueError(
                        f"every tensor in {name} must be on one device: {name}[0] is on {first.device}, "
                        f"{name}[{m}] on {z.device}"
                    )
                if z.dtype != first.dtype:
                    raise TypeError(
                        f"every tensor in {name} must have one dtype: {name}[0] is {first.dtype}, "
                        f"{name}[{m}] is {z.dtype}"
                    )
        modalities = len(zs)
        batch, features = (zs[0].shape if zs else (0, 0))
    else:
        raise TypeError(
            f"{name} must be a tensor [B, M, D], a sequence of M tensors [B, D] or M >= 2 positional tensors "
            f"[B, D], got {type(embeddings).__name__}"
        )
    if modalities < 2:
        raise ValueError(f"{name} needs M >= 2 modalities per instance, got M = {modalities}")
    if batch == 0:
        raise ValueError(f"{name} needs at least one instance, got B = 0")
    if features == 0:
        raise ValueError(f"{name} needs a feature dimension D >= 1, got D = 0")
    return zs


EMBEDDING_FORMS = (
    "one tensor [B, M, D], one sequence of M tensors [B, D], or M >= 2 tensors [B, D] as positional arguments "
    "(every option is keyword-only)"
)


def positional_embeddings(args: tuple, caller: str) -> Embeddings:
    """The embeddings of a call that takes them positionally: the one argument as it is, or M tensors [B, D] as a
    list; TypeError naming the accepted forms otherwise."""
    if len(args) == 1:
        return args[0]
    if not args:
        raise TypeError(f"{caller} needs the embeddings: {EMBEDDING_FORMS}")
    for i, arg in enumerate(args):
        if not isinstance(arg, torch.Tensor):
            raise TypeError(
                f"{caller} takes the embeddings as {EMBEDDING_FORMS}; positional argument {i} is a "
                f"{type(arg).__name__}: pass options by keyword (e.g. output_dict=True)"
            )
    return list(args)


def modality_mask(present, zs: list[torch.Tensor]):
    """present: None (every modality present) or a bool tensor [B, M] on the embeddings' device, as it is."""
    if present is None:
        return None
    shape = (zs[0].shape[0], len(zs))
    if not isinstance(present, torch.Tensor) or present.dtype != torch.bool:
        what = f"dtype {present.dtype}" if isinstance(present, torch.Tensor) else type(present).__name__
        raise TypeError(f"present must be None or a bool tensor [B, M] = {list(shape)}, got {what}")
    if present.shape != shape:
        raise ValueError(f"present must have shape [B, M] = {list(shape)}, got {list(present.shape)}")
    if present.device != zs[0].device:
        raise ValueError(f"present must be on the embeddings' device {zs[0].device}, got {present.device}")
    return present


def instance_labels(labels, zs: list[torch.Tensor]):
    """labels: None or an integer tensor [B] on the embeddings' device, returned as int64."""
    if labels is None:
        return None
    batch = zs[0].shape[0]
    if (not isinstance(labels, torch.Tensor) or labels.dtype == torch.bool or labels.is_floating_point()
            or labels.is_complex()):
        what = f"dtype {labels.dtype}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"labels must be None or an integer tensor [B] = [{batch}], got {what}")
    if labels.shape != (batch,):
        raise ValueError(f"labels must have shape [B] = [{batch}], got {list(labels.shape)}")
    if labels.device != zs[0].device:
        raise ValueError(f"labels must be on the embeddings' device {zs[0].device}, got {labels.device}")
    return labels.to(torch.int64)


def _real(value, name: str) -> float:
    """A Python or NumPy real number (not a bool) as a float."""
    if isinstance(value, (bool, numpy.bool_)) or not isinstance(value, (numbers.Real, numpy.floating, numpy.integer)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def _finite(value) -> bool:
    # comparisons rather than math.isfinite: under torch.compile a float argument can become symbolic
    return value == value and -math.inf < value < math.inf


def positive_finite(value, name: str) -> float:
    value = _real(value, name)
    if not _finite(value) or value <= 0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def temperature(value, name: str) -> Temperature:
    """A number as a checked float; a tensor as it is, once it is a 0-d floating tensor (its value is read by
    temperature_value, per call, because a tensor can change between calls)."""
    if not isinstance(value, torch.Tensor):
        return temperature_value(value, name)
    _check_dtype(value, name)
    if value.dim() != 0:
        raise ValueError(
            f"{name} must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)} "
            f"(a 1-element tensor t: pass t.reshape(()))"
        )
    return value


def _float32_bound(bound: float) -> float:
    """The smallest float64 that rounds to float32(bound) or above (round to nearest, ties to even): x >= it
    exactly when float32(x) >= float32(bound), a float32 comparison made of float64 ones (a symbolic float under
    torch.compile compares, but does not convert to numpy)."""
    target = numpy.float32(bound)
    below = numpy.nextafter(target, numpy.float32(0))
    midpoint = (float(target) + float(below)) / 2  # exact in float64
    return midpoint if numpy.float32(midpoint) == target else math.nextafter(midpoint, math.inf)


_MIN_TEMPERATURE_FLOAT64 = _float32_bound(MIN_TEMPERATURE)


def temperature_value(value, name: str) -> float:
    """The value of a temperature (a number or a checked 0-d tensor, whose value this reads), checked: finite and
    >= MIN_TEMPERATURE compared in float32, so that a value which rounds to float32(1e-4) or above is accepted
    (torch.tensor(1e-4) as well as the number 1e-4)."""
    value = positive_finite(float(value.detach()) if isinstance(value, torch.Tensor) else value, name)
    if value < _MIN_TEMPERATURE_FLOAT64:
        raise ValueError(
            f"{name} must be >= {MIN_TEMPERATURE} when rounded to float32 (logits / {name} would leave the float32 "
            f"range), got {value}"
        )
    return value


def temperature_device(value: Temperature, device: torch.device, name: str) -> None:
    """A tensor temperature must be on the embeddings' device (a CPU scalar would be copied on every use)."""
    if isinstance(value, torch.Tensor) and value.device != device:
        raise ValueError(
            f"{name} must be on the embeddings' device {device}, got a tensor on {value.device}; "
            f"move it with .to({str(device)!r})"
        )


def non_negative_finite(value, name: str) -> float:
    value = _real(value, name)
    if not _finite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def reduction_name(value) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {list(REDUCTIONS)}, got {value!r}")
    return value


def reduce(per_instance: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a checked reduction ("mean", "sum" or "none") to per-instance values [B]."""
    if reduction == "none":
        return per_instance
    return per_instance.mean() if reduction == "mean" else per_instance.sum()


def flag(value, name: str) -> bool:
    if not isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{name} must be a bool (True or False), got {type(value).__name__}")
    return bool(value)
