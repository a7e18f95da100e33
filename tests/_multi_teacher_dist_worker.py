"""One process of the 2-process several-teacher test (torchrun, gloo):
`worker.py STUDENT TEACHER TEACHER_B TOKENIZER OUT`.

1. FusedKDTrainer and FusedDistillationTrainer (fixed completions) under DDP, rows routed to 2
   teachers, 2 rows per process, one SGD step each: rank 0 saves the parameters (the test
   compares them with one process stepping on all 4).
2. FusedDistillationTrainer's compute_loss with the student and both teachers sharded by FSDP2
   (`fully_shard` on the decoder layers and the root, as accelerate's FSDP2 does; the teachers'
   heads as units of their own too, read as DTensors), each rank routing its rows
   differently (rank 0 none to teacher 1, which still runs there: its forward is a collective):
   each rank's loss against the unsharded one, the gradients (FSDP averages them over the ranks)
   against the mean of both ranks' unsharded gradients; rank 0 writes the worst errors.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _hf_fixtures import load
from _multi_teacher_fixtures import hf_args, kd_trainer, trained, trl_trainer
from _trl_fixtures import completion_batch, fixed_completions, relative_error
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from fastkd.integrations.trl import FusedDistillationTrainer

ROUTES = ((0, 0, 0), (1, 0, 1))  # completion_batch's rows' teachers, by rank


def ddp_steps(models: dict, out: Path) -> FusedDistillationTrainer:
    FusedDistillationTrainer._generate_single_turn = fixed_completions
    kd = kd_trainer(models, out, args=hf_args(out / "kd", per_device_train_batch_size=2,
                                               ddp_backend="gloo"))
    params = {"kd": trained(kd)}
    trl = trl_trainer(models, out / "trl", per_device_train_batch_size=2, max_steps=1,
                      ddp_backend="gloo")
    params["trl"] = trained(trl)
    for trainer in (kd, trl):
        assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    if dist.get_rank() == 0:
        for name, p in params.items():
            torch.save(p, out / f"{name}_params.pt")
    return trl


def sharded(path: Path, mesh, head_unit: bool = False):
    model = load(path)
    for layer in [*model.model.layers, *([model.lm_head] if head_unit else [])]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def loss_and_grads(trainer, student, teachers, route):
    trainer.teacher_model = teachers
    batch = {**completion_batch(), "teacher_index": torch.tensor(route)}
    loss = trainer.compute_loss(student.train(), batch)
    loss.backward()
    return loss.item(), {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
                         for n, p in student.named_parameters()}


def fsdp_loss(trainer, models: dict, out: Path) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    rank = dist.get_rank()
    names = ("teacher", "teacher_b")
    student = sharded(models["student"], mesh)
    teachers = [sharded(models[n], mesh, head_unit=True).eval() for n in names]
    loss, grads = loss_and_grads(trainer, student, teachers, ROUTES[rank])
    plain = [loss_and_grads(trainer, load(models["student"]),
                            [load(models[n]).eval() for n in names], route) for route in ROUTES]
    mean = {n: sum(g[n] for _, g in plain) / len(plain) for n in grads}
    errors = torch.tensor([abs(loss / plain[rank][0] - 1),
                           max(relative_error(grads[n], mean[n]) for n in mean)])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    if rank == 0:
        (out / "fsdp.json").write_text(json.dumps({
            "loss_rel_err": errors[0].item(), "grad_rel_err": errors[1].item(),
            "sharded": isinstance(student.lm_head.weight, DTensor)}))


def main() -> None:
    student, teacher, teacher_b, tokenizer, out = map(Path, sys.argv[1:6])
    models = {"student": student, "teacher": teacher, "teacher_b": teacher_b,
              "tokenizer": tokenizer}
    out.mkdir(parents=True, exist_ok=True)
    trainer = ddp_steps(models, out)  # initialises the gloo group (accelerate)
    fsdp_loss(trainer, models, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
