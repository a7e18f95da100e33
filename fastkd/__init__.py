"""fastkd: fused knowledge-distillation losses over large vocabularies, without the N x V logits."""

from fastkd.loss import FusedDistillLoss, distill, fused_distill_loss
from fastkd.options import DistillOptions
from fastkd.sparse import FusedSparseDistillLoss, fused_sparse_distill_loss, sparse_distill

__all__ = [
    "DistillConfig",
    "DistillOptions",
    "FusedDistillLoss",
    "FusedSparseDistillLoss",
    "distill",
    "fused_distill_loss",
    "fused_sparse_distill_loss",
    "run_distillation",
    "sparse_distill",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The trainer imports transformers; load it only when asked for.
    if name in ("DistillConfig", "run_distillation"):
        from fastkd import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'fastkd' has no attribute {name!r}")
