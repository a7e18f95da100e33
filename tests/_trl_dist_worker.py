"""One process of the 2-process TRL test (torchrun, gloo): `worker.py STUDENT TEACHER TOKENIZER
OUT`.

1. FusedDistillationTrainer under accelerate (DDP), 2 prompts per process with fixed completions,
   one SGD step: rank 0 saves the parameters (the test compares them with one process stepping on
   all 4).
2. compute_loss with the student and the teacher sharded by FSDP2 (`fully_shard` on the decoder
   layers and the root, as accelerate's FSDP2 does; the teacher's head as a unit of its own too,
   so the loss reads it as a DTensor shard): loss and full gradients against unsharded copies;
   rank 0 writes the errors.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _hf_fixtures import load
from _trl_fixtures import completion_batch, fixed_completions, make, relative_error
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from trl import DistillationConfig

from fastkd.integrations.trl import FusedDistillationTrainer


def ddp_step(models: dict, out: Path) -> FusedDistillationTrainer:
    FusedDistillationTrainer._generate_single_turn = fixed_completions
    trainer = make(FusedDistillationTrainer, DistillationConfig, models, out / "run",
                   per_device_train_batch_size=2, max_steps=1, ddp_backend="gloo")
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    if dist.get_rank() == 0:
        torch.save({n: p.detach() for n, p in trainer.model.named_parameters()},
                   out / "params.pt")
    return trainer


def sharded(path: Path, mesh, head_unit: bool = False):
    model = load(path)
    for layer in [*model.model.layers, *([model.lm_head] if head_unit else [])]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_loss(trainer: FusedDistillationTrainer, models: dict, out: Path) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    batch = completion_batch()  # the same on every rank: FSDP's averaged gradient is this batch's
    results = []
    for student, teacher in ((sharded(models["student"], mesh),
                              sharded(models["teacher"], mesh, head_unit=True).eval()),
                             (load(models["student"]), load(models["teacher"]).eval())):
        trainer.teacher_model = teacher
        loss = trainer.compute_loss(student.train(), batch)
        loss.backward()
        grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                 for n, p in student.named_parameters()}
        results.append((loss.item(), grads, isinstance(teacher.lm_head.weight, DTensor),
                        isinstance(student.lm_head.weight, DTensor)))
    (loss, grads, teacher_dtensor, student_dtensor), (expected, grads_ref, _, _) = results
    if dist.get_rank() == 0:
        (out / "fsdp.json").write_text(json.dumps({
            "loss_rel_err": abs(loss / expected - 1),
            "grad_rel_err": max(relative_error(grads[n], grads_ref[n]) for n in grads_ref),
            "sharded": student_dtensor, "teacher_head_was_dtensor": teacher_dtensor}))


def main() -> None:
    student, teacher, tokenizer, out = map(Path, sys.argv[1:5])
    models = {"student": student, "teacher": teacher, "tokenizer": tokenizer}
    out.mkdir(parents=True, exist_ok=True)
    trainer = ddp_step(models, out)  # initialises the gloo group (accelerate)
    fsdp_loss(trainer, models, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
