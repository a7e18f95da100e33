"""The loss options, as one small frozen dataclass that travels through every layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# fastkd.loss's backends, named here (no torch import) for the config and the command line.
BACKENDS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("mean", "sum", "none")


def _real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


@dataclass(frozen=True)
class DistillOptions:
    """Everything that defines the loss except the tensors.

    loss_i = ce_weight * CE_i + kd_weight * temperature**2 * D_i, reduced over counted tokens.
    """

    temperature: float = 1.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    divergence: str = "forward_kl"
    beta: float = 0.5  # jsd's mixture weight, strictly inside (0, 1)
    skew: float = 0.1  # skew_*_kl's mixture weight alpha, in [0, 1) (0 gives the plain KL)
    ignore_index: int = -100
    reduction: str = "mean"
    student_softcap: float | None = None
    teacher_softcap: float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through the back door once, here
        set_(self, "temperature", _real("temperature", self.temperature))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name in ("ce_weight", "kd_weight"):
            value = _real(name, getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            set_(self, name, value)
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {DIVERGENCES}, got {self.divergence!r}")
        set_(self, "beta", _real("beta", self.beta))
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must lie strictly inside (0, 1) for jsd, got {self.beta}")
        set_(self, "skew", _real("skew", self.skew))
        if self.divergence.startswith("skew_") and not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must lie in [0, 1) for {self.divergence}, got {self.skew}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        for name in ("student_softcap", "teacher_softcap"):
            cap = getattr(self, name)
            if cap is not None:
                cap = _real(name, cap)
                if cap <= 0:
                    raise ValueError(f"{name} must be > 0 or None, got {cap}")
                set_(self, name, cap)
