"""`FusedGKDTrainer`: TRL's `GKDTrainer` with its full-logit loss replaced by fastkd's fused loss.

    from fastkd.integrations.trl import FusedGKDTrainer   # same arguments as trl's GKDTrainer
    trainer = FusedGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...),
                              train_dataset=ds, processing_class=tokenizer)
    trainer.train()

Tested with TRL 1.16 (`trl.experimental.gkd.GKDTrainer`; `pip install fastkd[trl]`). Everything
but `compute_loss` is TRL's: the on-policy generation (`lmbda`, `seq_kd`, `max_new_tokens`), the
collator, the teacher's preparation by accelerate. Only the loss changes, and it is exactly TRL's
`GKDTrainer.generalized_jsd_loss`, read from TRL 1.16's source (`gkd_options` gives the mapping):

- beta = 0: forward KL(teacher || student) (`F.kl_div(student_log_probs, teacher_log_probs)`),
  fastkd's "forward_kl"; beta = 1: reverse KL(student || teacher), fastkd's "reverse_kl".
- 0 < beta < 1: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q (p teacher,
  q student), which is fastkd's "jsd" with the same beta. (TRL's beta = 0 and 1 are special cases,
  not the limits of this mixture, which go to 0.)
- temperature: `generalized_jsd_loss` divides both logits by it and does not multiply by T**2, so
  fastkd's kd_weight is 1 / T**2 (fastkd scales KD by T**2). `GKDTrainer.compute_loss` does not
  pass its `temperature` to the loss at all: in TRL 1.16 `args.temperature` is the sampling
  temperature of the on-policy generation only, and the loss runs at T = 1. FusedGKDTrainer does
  the same.
- No cross-entropy term (ce_weight = 0); labels only mask (-100: prompt and padding).
- Reduction: the per-token divergences summed over the unmasked tokens, divided by
  `num_items_in_batch` when transformers passes it (the count of `labels[:, 1:] != -100` in the
  collated micro-batches of the optimizer step, before on-policy generation replaces the labels:
  TRL's choice, kept), else by the batch's own unmasked count ("batchmean" over tokens).

One deliberate difference: with several processes and `average_tokens_across_devices` (that count
is then summed over processes), the loss is multiplied by the number of processes, as
`transformers.Trainer` and TRL's `SFTTrainer` do, so the DDP-averaged gradient is one big batch's;
`GKDTrainer.compute_loss` omits that factor.
"""

from __future__ import annotations

import dataclasses

import torch

from fastkd.models import lm_head
from fastkd.options import DistillOptions

try:
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from fastkd.integrations.transformers import _inner_model, fused_lm_loss
except ImportError as err:
    raise ImportError(
        f"fastkd.integrations.trl needs TRL 1.16 (trl.experimental.gkd.GKDTrainer) and accelerate "
        f"({err}): pip install fastkd[trl]"
    ) from err

__all__ = ["FusedGKDTrainer", "GKDConfig", "gkd_options"]

IGNORE_INDEX = -100  # TRL's label mask


def gkd_options(beta: float, temperature: float = 1.0) -> DistillOptions:
    """fastkd options whose summed loss equals the sum of TRL's `generalized_jsd_loss(beta=beta,
    temperature=temperature)` terms over the unmasked tokens (see the module docstring)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (TRL's convention), got {beta}")
    divergence = "forward_kl" if beta == 0 else "reverse_kl" if beta == 1 else "jsd"
    return DistillOptions(
        temperature=temperature, ce_weight=0.0, kd_weight=1.0 / temperature**2,
        divergence=divergence, beta=beta if divergence == "jsd" else 0.5,
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


class FusedGKDTrainer(GKDTrainer):
    """`trl.experimental.gkd.GKDTrainer` whose `compute_loss` runs the fused loss on the student's
    and teacher's last hidden states (no (N, V) logits), equal to TRL's own loss (module
    docstring). Same arguments as GKDTrainer, plus backend and chunk_size (as in
    `fastkd.fused_distill_loss`). The student's outputs returned with the loss have empty logits
    (B, L, 0): metrics that need logits get none.
    """

    def __init__(self, model=None, teacher_model=None, *args, backend: str = "auto",
                 chunk_size: int | None = None, **kwargs):
        # The teacher's 8-token probe runs before accelerate prepares it (after that its forward
        # may autocast, or hold shards); a teacher given by name gets the config checks only.
        teacher = (lm_head(teacher_model, "teacher")
                   if isinstance(teacher_model, torch.nn.Module) else None)
        super().__init__(model, teacher_model, *args, **kwargs)
        if teacher is None:
            teacher = lm_head(_inner_model(self.teacher_model), "teacher", probe=False)
        student = lm_head(_inner_model(self.model), "student")
        self.fused_options = dataclasses.replace(
            gkd_options(self.beta), student_softcap=student.softcap,
            teacher_softcap=teacher.softcap)
        self.backend, self.chunk_size = backend, chunk_size
        # a sharded teacher's gathered head weight is freed after its forward: copy it out
        self._copy_teacher_head = self.is_fsdp_enabled or self.is_deepspeed_enabled

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"][:, 1:]
        self.teacher_model.eval()
        loss, outputs = fused_lm_loss(
            model, self.teacher_model, inputs["input_ids"], inputs["attention_mask"], labels,
            self.fused_options, backend=self.backend, chunk_size=self.chunk_size,
            copy_teacher_head=self._copy_teacher_head)
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes
        else:
            loss = loss / (labels != IGNORE_INDEX).sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss
