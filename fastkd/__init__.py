"""fastkd: fused knowledge-distillation losses over large vocabularies, without the N x V logits.

The public names load on first use (PEP 562): `import fastkd` imports neither torch nor
transformers, so `fastkd --help` and argument errors answer at once.
"""

import importlib

# Public name -> (the module that defines it, its name there).
_EXPORTS = {
    "DistillOptions": ("fastkd.options", "DistillOptions"),
    "Components": ("fastkd.reference", "Components"),
    "FusedDistillLoss": ("fastkd.loss", "FusedDistillLoss"),
    "distill": ("fastkd.loss", "dense_loss"),  # the dense loss with one DistillOptions
    "fused_distill_loss": ("fastkd.loss", "fused_distill_loss"),
    "FusedSparseDistillLoss": ("fastkd.loss", "FusedSparseDistillLoss"),
    "fused_sparse_distill_loss": ("fastkd.loss", "fused_sparse_distill_loss"),
    "sparse_distill": ("fastkd.loss", "sparse_loss"),  # the sparse loss with one DistillOptions
    "TeacherHead": ("fastkd.teachers", "TeacherHead"),
    "TeacherLogprobs": ("fastkd.teachers", "TeacherLogprobs"),
    "TeacherComponents": ("fastkd.reference_multi", "TeacherComponents"),
    "FusedMultiTeacherLoss": ("fastkd.loss", "FusedMultiTeacherLoss"),
    "fused_multi_teacher_loss": ("fastkd.loss", "fused_multi_teacher_loss"),
    # the multi-teacher loss with one DistillOptions
    "multi_teacher_distill": ("fastkd.multi_teacher", "multi_teacher_loss"),
    "DistillConfig": ("fastkd.config", "DistillConfig"),
    "run_distillation": ("fastkd.trainer", "run_distillation"),
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        module, attribute = _EXPORTS[name]
        value = getattr(importlib.import_module(module), attribute)
        globals()[name] = value  # once: later lookups do not come back here
        return value
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
