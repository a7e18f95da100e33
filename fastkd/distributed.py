"""Several processes, on PyTorch's own stack: torchrun, torch.distributed, FSDP2, DDP and DCP.

`fastkd distill` under `torchrun` (WORLD_SIZE > 1) initialises the process group (NCCL on CUDA,
gloo on CPU) and runs the same loop on every rank:

- the student is sharded with FSDP2 `fully_shard` (each decoder layer, then the root) or, with
  parallel="ddp", replicated with DistributedDataParallel; the teacher is sharded the same way,
  forward-only (no gradients, no optimizer state, resharded after each forward), or replicated;
- every rank draws the same global batch and keeps its own rows (`local_rows`), so the ranks read
  disjoint shards of each batch in the order one process would;
- checkpoints are `torch.distributed.checkpoint` (DCP) directories: each rank writes its own shards,
  nothing is gathered during training; the finished student is gathered once, to rank 0 and CPU,
  and exported as a Hugging Face safetensors model (`full_state_dict`).

One process (no torchrun, or WORLD_SIZE=1) touches none of this: every helper below is then a
no-op or the identity, so the trainer reads the same either way. The modules DDP and FSDP wrap
are fastkd.batch_loss's `StudentLoss` and `TeacherForward`: their forward is where FSDP gathers
the parameters, so the fused loss, which needs the LM head's whole weight, runs inside it.
"""

from __future__ import annotations

import contextlib
import logging
import os
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("fastkd")
_MESH = None  # the 1-D device mesh FSDP shards over, set by init()
_OWNED = False  # whether init() created the process group (then teardown() destroys it)


# ----------------------------------------------------------------------------------------------
# The process group: who am I, how many are we.


def launched_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: the process group's, else torchrun's RANK (also after teardown)."""
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def init(device: str | None, timeout_s: float) -> torch.device | None:
    """Under torchrun with WORLD_SIZE > 1: join the process group and return this rank's device.

    Returns None without torchrun (one process). device: None (CUDA if available, else CPU),
    "cuda" or "cpu"; each rank takes cuda:LOCAL_RANK. A process group the caller already
    initialised is used as it is. Collectives that wait longer than timeout_s raise, so a rank
    that dies or hangs ends the others instead of leaving them waiting.
    """
    global _MESH, _OWNED
    if launched_world_size() <= 1:
        return None
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if device and torch.device(device).index is not None:
        raise ValueError(f"device={device!r}: under torchrun each rank uses cuda:LOCAL_RANK; pass "
                         "--device cuda (or cpu), without an index")
    if kind not in ("cuda", "cpu"):
        raise ValueError(f"device={device!r}: several processes run on cuda (NCCL) or cpu (gloo)")
    local = torch.device(kind, int(os.environ.get("LOCAL_RANK", "0"))) if kind == "cuda" else (
        torch.device("cpu"))
    if not dist.is_initialized():
        if kind == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if kind == "cuda" else "gloo",
                                timeout=timedelta(seconds=timeout_s),
                                device_id=local if kind == "cuda" else None)
        _OWNED = True
    from torch.distributed.device_mesh import init_device_mesh

    _MESH = init_device_mesh(kind, (dist.get_world_size(),))
    if not is_main():
        log.setLevel(logging.WARNING)  # the report and the logs are rank 0's
    log.info("distributed: %d processes (%s), this is rank %d", dist.get_world_size(),
             dist.get_backend(), dist.get_rank())
    return local


def teardown(clean: bool) -> None:
    """End the process group: a barrier first when every rank got here (clean), then destroy it
    if init() created it.

    Destroying it before the interpreter exits is what lets the backend's threads stop: a process
    that exits with a live group can die in std::terminate ("terminate called ...", SIGABRT).
    After an error the barrier is skipped: the other ranks may be gone.
    """
    global _MESH, _OWNED
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean:
        dist.barrier()
    if _OWNED:
        dist.destroy_process_group()
    _MESH, _OWNED = None, False


def resolve_device(device: str | None) -> torch.device:
    """One process's device: `device`, else CUDA if available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def session(device: str | None, timeout_s: float):
    """This process's part of a command: under torchrun it joins the process group (`init`) and
    leaves it at the end of the block (`teardown`: a barrier first when the block ended normally,
    none after an error, when the other ranks may be gone); yields this process's device (this
    rank's under torchrun, else `resolve_device(device)`)."""
    local = init(device, timeout_s)
    try:
        yield resolve_device(device) if local is None else local
    except BaseException:
        teardown(clean=False)
        raise
    teardown(clean=True)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (in place); the tensor itself with one process."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether any rank's flag is set: every rank gets the same answer (a tiny all-reduce)."""
    if not is_distributed():
        return flag
    votes = torch.tensor([float(flag)], device=device)
    return bool(all_reduce_sum(votes).item())  # host sync


def broadcast_from_main(obj):
    """Rank 0's obj (picklable, small) on every rank: a decision rank 0 made alone."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks(obj) -> list:
    """Every rank's obj (picklable, small), in rank order: [obj] with one process."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def raise_main_refusal(failure: Exception | None) -> None:
    """Every rank raises rank 0's refusal: rank 0 its own `failure`, the others a ValueError with
    its message; nothing when rank 0 had none (a collective: every rank calls it)."""
    refusal = broadcast_from_main(None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if refusal is not None:
        raise ValueError(refusal)


# ----------------------------------------------------------------------------------------------
# Data: each rank its rows of the global batch.


def local_rows(batch):
    """This rank's contiguous share of a global batch of Blocks (its size divides evenly)."""
    if not is_distributed():
        return batch
    share = len(batch) // world_size()
    return batch.select(torch.arange(rank() * share, (rank() + 1) * share))


def eval_shards(heldout, batch_size: int):
    """(batch, counted) over this rank's share of the held-out blocks.

    Rank r gets blocks r, r + P, r + 2P, ... in batches of batch_size / P. Every rank runs the
    same number of forwards (FSDP gathers parameters in each): a rank that runs out repeats its
    first batch, counted=False, and drops the result.
    """
    from fastkd.data import eval_batches

    if not is_distributed():
        yield from ((batch, True) for batch in eval_batches(heldout, batch_size))
        return
    p, share = world_size(), batch_size // world_size()
    mine = heldout.select(torch.arange(rank(), len(heldout), p))
    most = -(-len(heldout) // p)  # blocks of the rank with the most
    n_batches = -(-most // share)
    batches = list(eval_batches(mine, share)) if len(mine) else []
    filler = batches[0] if batches else heldout.select(torch.arange(1))
    for i in range(n_batches):
        yield (batches[i], True) if i < len(batches) else (filler, False)


# ----------------------------------------------------------------------------------------------
# Wrapping: the modules DDP and FSDP wrap are fastkd.batch_loss's StudentLoss and TeacherForward.


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks, by the HF model's own `_no_split_modules` (LlamaDecoderLayer...)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__}: no decoder layers to shard (its "
                         f"_no_split_modules is {sorted(names)}); use --parallel ddp")
    return layers


def wrap_student(module: nn.Module, parallel: str, bf16: bool, device: torch.device):
    """FSDP2 (each decoder layer, then the root) or DDP; the module itself with one process.

    FSDP on CUDA with bf16: bf16 parameters in compute, fp32 gradient reduction, fp32 shards
    (the master weights) for AdamW.
    """
    if not is_distributed():
        return module
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # Buffers (rotary tables) are equal on every rank: no broadcast before each forward.
        return DistributedDataParallel(module.to(device), forward_sync_buffers=False,
                                       device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                              reduce_dtype=torch.float32 if bf16 else None,
                              cast_forward_inputs=False)
    for layer in decoder_layers(module.model):
        fully_shard(layer, mesh=_MESH, mp_policy=mp)
    # The root holds the embeddings, the final norm and the head: gathered by its forward, kept
    # until its backward (FSDP's default for the root).
    return fully_shard(module, mesh=_MESH, mp_policy=mp)


def wrap_teacher(module: nn.Module, placement: str, device: torch.device):
    """Shard the teacher forward-only (resharded after each forward), or replicate it."""
    if not is_distributed() or placement == "replicate":
        return module.to(device)
    from torch.distributed.fsdp import fully_shard

    for layer in decoder_layers(module.model):
        fully_shard(layer, mesh=_MESH, reshard_after_forward=True)
    return fully_shard(module, mesh=_MESH, reshard_after_forward=True)


def unwrap(module: nn.Module) -> nn.Module:
    """The module DDP wraps (FSDP2 changes the module in place: itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return module.module if isinstance(module, DistributedDataParallel) else module


def no_sync(module: nn.Module, skip: bool):
    """DDP: skip the gradient all-reduce of the micro-batches before a step's last one.

    FSDP reduce-scatters every micro-batch, which keeps the gradients sharded (memory).
    """
    from torch.nn.parallel import DistributedDataParallel

    if skip and isinstance(module, DistributedDataParallel):
        return module.no_sync()
    return nullcontext()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to the global gradient norm: under FSDP each rank's gradients are DTensor shards, so
    the per-shard norms are reduced over the ranks (full_tensor) before scaling."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


# ----------------------------------------------------------------------------------------------
# Checkpoints: DCP shards of the model and optimizer; the full model once, for the export.


def save_shards(directory: Path, module: nn.Module, optimizer) -> None:
    """Each rank writes its shards of the trained parameters and the optimizer state (a
    collective). Frozen parameters (a LoRA student's base) are left out: they are the initial
    model's, which a resume loads again."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optim_state = get_state_dict(
        module, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_state, "optimizer": optim_state},
             storage_writer=dcp.FileSystemWriter(directory, sync_files=True))


def load_shards(directory: Path, module: nn.Module, optimizer) -> None:
    """Load save_shards' model and optimizer state into the wrapped module (a collective).

    dcp.load fills every trained parameter (a missing one raises); the frozen ones, absent from
    the state, keep the values the module was built with (strict=False)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_state_dict,
        set_state_dict,
    )

    model_state, optim_state = get_state_dict(
        module, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(module, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"], options=StateDictOptions(strict=False))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0, on CPU (empty elsewhere; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    # Tied weights (embeddings and head) arrive as two copies: make them one tensor again, so
    # save_pretrained writes it once, as it does for the model itself.
    names: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), []).append(name)
    for first, *tied in names.values():
        for name in tied:
            if first in state and name in state:
                state[name] = state[first]
    return state
