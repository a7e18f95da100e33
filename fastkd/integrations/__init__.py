"""fastkd inside the training loops people already use.

- `fastkd.integrations.transformers.DistillationTrainer`: a `transformers.Trainer` that distils a
  teacher into the student through the fused loss (`pip install fastkd[hf]`).
- `fastkd.integrations.trl.FusedGKDTrainer`: TRL's `GKDTrainer` (on-policy generation kept) with its
  full-logit generalized JSD replaced by the fused loss (`pip install fastkd[trl]`).

Nothing is imported here, so `import fastkd.integrations` needs neither accelerate nor TRL.
"""
