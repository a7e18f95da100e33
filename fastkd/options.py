"""The loss options, as one small frozen dataclass that travels through every layer.

The field list below is the only place the options are typed and described: the public functions'
and modules' keyword arguments and the option list of their docstrings (`option_signature`), the
custom op's schema and its arguments (`op_schema`, `op_args`, `from_op_args`) and the
vocab-parallel ranks' agreement (`encode`) are all derived from `dataclasses.fields(
DistillOptions)`. A new option is one field here (with its description, and its check in
`__post_init__`) plus its use in the spec and the row ops.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import MISSING, dataclass, field, fields

from fastkd.checks import choice, positive, real

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd")
# the loss's backends (fastkd.backends), named here (no torch import) for the config and the CLI
BACKENDS = ("auto", "triton", "torch", "reference")
REDUCTIONS = ("mean", "sum", "none")
CHOICES = {"divergence": DIVERGENCES, "reduction": REDUCTIONS}  # every str field's values


def _option(default, doc: str):
    """A field of DistillOptions with its one-line description (the API docstrings' option list,
    `options_doc`)."""
    return field(default=default, metadata={"doc": doc})


@dataclass(frozen=True)
class DistillOptions:
    """Everything that defines the loss except the tensors.

    loss_i = ce_weight * CE_i + kd_weight * temperature**2 * D_i, reduced over counted tokens.
    The logits each model's head gives, z = h W^T + b, enter as softcap(logit_scale * z)
    (`fastkd.reference.head_logits`): the scale is the head's own (Cohere's logit_scale, 1 /
    Granite's logits_scaling, Falcon-H1's lm_head_multiplier), set from the model's config by
    `fastkd.models`, not chosen.
    """

    temperature: float = _option(1.0, "T > 0: D compares softmax(t / T) with softmax(s / T)")
    ce_weight: float = _option(0.5, "weight of the cross-entropy to the labels, >= 0")
    kd_weight: float = _option(0.5, "weight of T**2 times the divergence D, >= 0")
    divergence: str = _option("forward_kl", "D: " + ", ".join(map(repr, DIVERGENCES)))
    beta: float = _option(0.5, "jsd's mixture weight, strictly inside (0, 1)")
    skew: float = _option(0.1, "the skew KLs' mixture weight alpha, in [0, 1) (0: the plain KL)")
    ignore_index: int = _option(-100, "tokens with this label count for nothing")
    reduction: str = _option("mean", '"mean" over the counted tokens, "sum", or "none" (per '
                             "token, the leading shape)")
    student_softcap: float | None = _option(None, "c > 0: the student's logits become "
                                            "c tanh(s / c) (None: no cap)")
    teacher_softcap: float | None = _option(None, "the same for the teacher's logits")
    student_logit_scale: float = _option(1.0, "> 0: the student's logits are scale (h W^T + b), "
                                         "before the softcap")
    teacher_logit_scale: float = _option(1.0, "the same for the teacher's logits")

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise through the back door once, here
        set_(self, "temperature", positive("temperature", self.temperature))
        for name in ("ce_weight", "kd_weight"):
            set_(self, name, positive(name, getattr(self, name), or_zero=True))
        choice("divergence", self.divergence, DIVERGENCES)
        set_(self, "beta", real("beta", self.beta))
        if self.divergence == "jsd" and not 0.0 < self.beta < 1.0:
            raise ValueError(f"beta must lie strictly inside (0, 1) for jsd, got {self.beta}")
        set_(self, "skew", real("skew", self.skew))
        if self.divergence.startswith("skew_") and not 0.0 <= self.skew < 1.0:
            raise ValueError(f"skew must lie in [0, 1) for {self.divergence}, got {self.skew}")
        choice("reduction", self.reduction, REDUCTIONS)
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        for name in ("student_softcap", "teacher_softcap"):
            set_(self, name, positive(name, getattr(self, name), optional=True))
        for name in ("student_logit_scale", "teacher_logit_scale"):
            set_(self, name, positive(name, getattr(self, name)))

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


def options_doc(unused: tuple[str, ...] = ()) -> str:
    """The options' lines of an API docstring, from the fields of DistillOptions: one per option
    (but `unused`), "name (type, default value): description"."""
    return "\n".join(f"{f.name} ({f.type}, default {f.default!r}): {f.metadata['doc']}"
                     for f in FIELDS if f.name not in unused)


def option_signature(unused: tuple[str, ...] = ()):
    """Decorator: replace the function's **options by one keyword-only parameter per option (with
    its default and type) in its signature, so help() and inspect show every option; and write
    the options' lines (`options_doc`) into its docstring, under the line that names
    `**options`, indented one level deeper."""

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
        first_kw = next((i for i, p in enumerate(params) if p.kind is p.KEYWORD_ONLY),
                        len(params))
        opts = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                  default=f.default)
                for f in FIELDS if f.name not in unused and f.default is not MISSING]
        fn.__signature__ = sig.replace(parameters=params[:first_kw] + opts + params[first_kw:])
        fn.__doc__ = _with_options_doc(fn.__doc__, unused)
        return fn

    return decorate


def _with_options_doc(doc: str | None, unused: tuple[str, ...]) -> str | None:
    if doc is None:  # python -OO strips docstrings
        return None
    lines = doc.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("**options"))
    indent = " " * (len(lines[at]) - len(lines[at].lstrip()) + 4)
    listed = [textwrap.fill(line, 100, initial_indent=indent, subsequent_indent=indent + "    ",
                            break_on_hyphens=False, break_long_words=False)
              for line in options_doc(unused).splitlines()]
    return "\n".join(lines[: at + 1] + listed + lines[at + 1:])
