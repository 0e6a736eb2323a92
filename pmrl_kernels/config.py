"""The loss configuration: the published defaults, written once, checked once.

`pmrl_loss` builds a PMRLConfig per call and `PMRLLoss` once at construction; the loss itself (loss.py) then
reads checked values only. A temperature may be a 0-d tensor: its form is checked here, its value per call
(loss.py), since a tensor can change between calls.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from .backends import check_backend_name
from .inputs import Temperature, flag, non_negative_finite, reduction_name, temperature


@dataclass(frozen=True)
class PMRLConfig:
    """tau, tau_reg and reg_weight default to the published values (tau1 = 0.05, tau2 = 0.1, weight 1).
    tau and tau_reg are floats, or 0-d floating tensors kept as given."""

    tau: Temperature = 0.05
    tau_reg: Temperature = 0.1
    reg_weight: float = 1.0
    normalize: bool = True
    reduction: str = "mean"
    backend: str = "auto"

    def __post_init__(self):
        checked = {
            "tau": temperature(self.tau, "tau"),
            "tau_reg": temperature(self.tau_reg, "tau_reg"),
            "reg_weight": non_negative_finite(self.reg_weight, "reg_weight"),
            "normalize": flag(self.normalize, "normalize"),
            "reduction": reduction_name(self.reduction),
            "backend": check_backend_name(self.backend),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))


DEFAULTS = PMRLConfig()
