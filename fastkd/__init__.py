"""fastkd: fused knowledge-distillation losses over large vocabularies, without the N x V logits.

The public names load on first use (PEP 562): `import fastkd` imports neither torch nor
transformers, so `fastkd --help` and argument errors answer at once.
"""

import importlib

# Public name -> the module that defines it.
_EXPORTS = {
    "DistillOptions": "fastkd.options",
    "Components": "fastkd.reference",
    "FusedDistillLoss": "fastkd.loss",
    "distill": "fastkd.loss",
    "fused_distill_loss": "fastkd.loss",
    "FusedSparseDistillLoss": "fastkd.sparse",
    "fused_sparse_distill_loss": "fastkd.sparse",
    "sparse_distill": "fastkd.sparse",
    "DistillConfig": "fastkd.config",
    "run_distillation": "fastkd.trainer",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
