"""The loss options, as one small frozen dataclass that travels through every layer.

The field list below is the only place the options are typed: the public functions' and modules'
keyword arguments (`option_signature`), the custom op's schema and its arguments
(`op_schema`, `op_args`, `from_op_args`) and the vocab-parallel ranks' agreement (`encode`) are
all derived from `dataclasses.fields(DistillOptions)`. A new option is one field here (with its
check in `__post_init__`) plus its use in the spec and the row ops.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import MISSING, dataclass, fields
from numbers import Real

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# fastkd.loss's backends, named here (no torch import) for the config and the command line.
BACKENDS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("mean", "sum", "none")
CHOICES = {"divergence": DIVERGENCES, "reduction": REDUCTIONS}  # every str field's values


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
    The logits each model's head gives, z = h W^T + b, enter as softcap(logit_scale * z)
    (`fastkd.reference.head_logits`): the scale is the head's own (Cohere's logit_scale, 1 /
    Granite's logits_scaling, Falcon-H1's lm_head_multiplier), set from the model's config by
    `fastkd.models`, not chosen.
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
    student_logit_scale: float = 1.0  # > 0: the student head's logits are scale * (h W^T + b)
    teacher_logit_scale: float = 1.0

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
        for name in ("student_logit_scale", "teacher_logit_scale"):
            value = _real(name, getattr(self, name))
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
            set_(self, name, value)

    @property
    def mix(self) -> float:
        """The divergence's mixture weight: beta for jsd, alpha (skew) for the skew KLs."""
        return self.skew if self.divergence.startswith("skew_") else self.beta


FIELDS = fields(DistillOptions)
NAMES = tuple(f.name for f in FIELDS)

# The options a trainer's user sets: DistillConfig's loss fields and `fastkd distill`'s "loss"
# flags (with this help). The trainers set the others themselves: reduction and ignore_index
# (they sum over the counted tokens), the softcaps and logit scales (from the models' configs,
# `fastkd.models.with_heads`). tests/test_cli.py holds DistillConfig and the flags to this list.
TRAINER_OPTIONS = {
    "temperature": "distillation temperature T",
    "ce_weight": "weight of the hard-label cross-entropy",
    "kd_weight": "weight of the T^2-scaled divergence to the teacher",
    "divergence": "divergence to the teacher",
    "beta": "JSD mixing weight",
    "skew": "skew KL mixing weight alpha, in [0, 1)",
}

# ---- the options as the custom op's arguments ---------------------------------------------------
# Annotation (a string: `from __future__ import annotations`) -> torch.library schema type.
_SCHEMA_TYPES = {"float": "float", "int": "int", "str": "str", "bool": "bool",
                 "float | None": "float?"}
for _f in FIELDS:  # a field of a new type needs its schema type (and its encoding) here
    if _f.type not in _SCHEMA_TYPES or (_f.type == "str" and _f.name not in CHOICES):
        raise TypeError(f"DistillOptions.{_f.name}: no op schema type for {_f.type!r}")


def op_schema() -> str:
    """The options' part of a torch.library schema: "float temperature, ..., float? ..."."""
    return ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in FIELDS)


def op_args(opts: DistillOptions) -> tuple:
    """The options as the op's trailing arguments, in field order."""
    return tuple(getattr(opts, name) for name in NAMES)


def from_op_args(values) -> DistillOptions:
    return DistillOptions(**dict(zip(NAMES, values, strict=True)))


# ---- the options as numbers, for ranks that must agree on them ---------------------------------

def encode(opts: DistillOptions) -> list[float]:
    """One float64-exact number per field (a str: its index in CHOICES; None: -inf, which no
    checked field can hold), so ranks can all-gather and compare their options field by field."""
    out = []
    for f in FIELDS:
        value = getattr(opts, f.name)
        if f.name in CHOICES:
            value = CHOICES[f.name].index(value)
        out.append(float("-inf") if value is None else float(value))
    return out


def decode(name: str, number: float):
    """A field's value from `encode`'s number (for messages)."""
    if number == float("-inf"):
        return None
    if name in CHOICES:
        return CHOICES[name][int(number)]
    kind = next(f.type for f in FIELDS if f.name == name)
    return int(number) if kind == "int" else number


# ---- the options as keyword arguments of the public functions and modules ---------------------

def from_kwargs(where: str, options: dict, unused: tuple[str, ...] = ()) -> DistillOptions:
    """DistillOptions from a public function's or module's **options (a TypeError for a name that
    is not an option of `where`, as for any unexpected keyword argument)."""
    for name in options:
        if name not in NAMES or name in unused:
            raise TypeError(f"{where}() got an unexpected keyword argument {name!r}")
    return DistillOptions(**options)


def option_signature(unused: tuple[str, ...] = (), positional: tuple[str, ...] = ()):
    """Decorator: replace the function's **options by one keyword-only parameter per option (with
    its default and type) in its signature, so help() and inspect show every option.

    positional: names (options, and the function's own keyword-only parameters) that may also
    come positionally, in this order, after its positional parameters: the modules' constructors
    keep the order they had before the options became one dataclass. The function then receives
    every argument by name, bound to that signature (too many, or one given twice: Python's
    TypeError)."""

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        first_kw = next((i for i, p in enumerate(params) if p.kind is p.KEYWORD_ONLY),
                        len(params))
        opts = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                  default=f.default)
                for f in FIELDS if f.name not in unused and f.default is not MISSING]
        keyword = {p.name: p for p in opts + params[first_kw:]}
        ordered = [keyword.pop(name).replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD)
                   for name in positional]
        signature = sig.replace(parameters=params[:first_kw] + ordered + list(keyword.values()))
        if not positional:
            fn.__signature__ = signature
            return fn

        @functools.wraps(fn)
        def by_name(*args, **kwargs):
            return fn(**signature.bind(*args, **kwargs).arguments)

        by_name.__signature__ = signature
        return by_name

    return decorate
