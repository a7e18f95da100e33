"""One process of the 2-process CPU test (torchrun, gloo): `worker.py STUDENT TEACHER OUT`.

1. FusedKDTrainer, DDP, 2 sequences per process, one SGD step: rank 0 saves the parameters
   (the test compares them with one process stepping on all 4).
2. fused_lm_loss with the student sharded by FSDP2 (`fully_shard`: decoder layers and root, the
   LM head a shard outside the forward): loss and full gradients against the full-logit reference
   on an unsharded copy; rank 0 writes the errors.
3. An FSDP2 head read outside its forward (`head_weight_and_bias` on a unit of its own, as TRL's
   trainers read the student's head when it is one), a different batch on each rank: its
   gradient is the mean of the ranks' (a plain `full_tensor()` kept each rank's own).
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from _hf_fixtures import LENGTHS, OPTIONS, collate, load, reference_loss, sequences
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import TrainingArguments

from fastkd.integrations.transformers import (
    FusedKDTrainer,
    fused_lm_loss,
    model_inputs,
    shifted_labels,
)
from fastkd.models import head_weight_and_bias


def ddp_step(student: Path, teacher: Path, out: Path) -> None:
    args = TrainingArguments(output_dir=str(out / "run"), per_device_train_batch_size=2,
                             max_steps=1, optim="sgd", learning_rate=0.5, max_grad_norm=0.0,
                             lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             use_cpu=True, seed=0, disable_tqdm=True, ddp_backend="gloo")
    trainer = FusedKDTrainer(model=load(student), teacher_model=load(teacher), args=args,
                             train_dataset=sequences(LENGTHS), data_collator=collate,
                             distill_options=OPTIONS)
    assert isinstance(trainer.accelerator.num_processes, int)
    trainer.train()
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    if dist.get_rank() == 0:
        torch.save({n: p.detach() for n, p in trainer.model.named_parameters()},
                   out / "params.pt")


def fsdp_loss(student: Path, teacher: Path, out: Path) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model, plain, frozen = load(student), load(student), load(teacher).eval()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    sharded_head = isinstance(model.lm_head.weight, DTensor)
    batch = collate(sequences(LENGTHS))
    labels = shifted_labels(batch, OPTIONS.ignore_index)
    opts = dataclasses.replace(OPTIONS, reduction="sum")
    loss, _ = fused_lm_loss(model, frozen, model_inputs(batch), labels, opts)
    loss = loss / (labels != opts.ignore_index).sum()
    loss.backward()  # each rank the same batch: FSDP's averaged gradient is this batch's
    expected = reference_loss(plain, frozen, batch, opts)
    expected.backward()
    grads = dict(plain.named_parameters())
    err = max((p.grad.full_tensor() - grads[n].grad).abs().max().item() /
              grads[n].grad.abs().max().item() for n, p in model.named_parameters())
    if dist.get_rank() == 0:
        (out / "fsdp.json").write_text(json.dumps({
            "loss_rel_err": abs(loss.item() / expected.item() - 1), "grad_max_err": err,
            "sharded_head": sharded_head}))


def head_outside_forward(out: Path) -> None:
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 12)
    plain = torch.nn.Linear(8, 12)
    plain.load_state_dict(head.state_dict())
    fully_shard(head, mesh=mesh)
    xs = [torch.randn(5, 8, generator=torch.Generator().manual_seed(r))
          for r in range(dist.get_world_size())]
    was_dtensor = isinstance(head.weight, DTensor)
    weight, bias = head_weight_and_bias(head)
    (xs[dist.get_rank()] @ weight.T + bias).square().mean().backward()
    (sum((x @ plain.weight.T + plain.bias).square().mean() for x in xs) / len(xs)).backward()
    err = max((getattr(head, n).grad.full_tensor() - getattr(plain, n).grad).abs().max().item()
              for n in ("weight", "bias"))
    if dist.get_rank() == 0:
        (out / "head.json").write_text(json.dumps({"grad_max_err": err,
                                                   "dtensor": was_dtensor}))


def main() -> None:
    student, teacher, out = map(Path, sys.argv[1:4])
    out.mkdir(parents=True, exist_ok=True)
    ddp_step(student, teacher, out)  # initialises the gloo group (accelerate)
    fsdp_loss(student, teacher, out)
    head_outside_forward(out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
