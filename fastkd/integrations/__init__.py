"""fastkd inside the training loops people already use (docs/integrations.md).

- `fastkd.integrations.transformers.FusedKDTrainer`: a `transformers.Trainer` that distils a
  teacher into the student through the fused loss (`pip install fastkd[hf]`).
- `fastkd.integrations.trl` (`pip install fastkd[trl]`), TRL 1.16's trainers with their loss
  replaced by the fused one, TRL's objective kept exactly: `FusedDistillationTrainer`
  (`trl.DistillationTrainer`, on-policy), `FusedServerDistillationTrainer` (its served-teacher
  variant, on the teacher's top-k log-probabilities) and `FusedGKDTrainer` (GKD).
- `FusedKDTrainer` and `FusedDistillationTrainer` take several teachers, each row routed to one
  by its `teacher_id` column or every token mixed (`fastkd.integrations.multi_teacher`,
  `fastkd.integrations.trl_teachers`).

Nothing is imported here, so `import fastkd.integrations` needs neither accelerate nor TRL.
"""
