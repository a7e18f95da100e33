"""fastkd: fused knowledge-distillation losses over large vocabularies, without the N x V logits."""

from fastkd.loss import FusedDistillLoss, distill, fused_distill_loss
from fastkd.options import DistillOptions

__all__ = ["DistillOptions", "FusedDistillLoss", "distill", "fused_distill_loss"]
__version__ = "0.1.0"
