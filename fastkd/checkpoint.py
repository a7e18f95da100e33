"""Checkpoints: what makes a run resumable, exactly, after a crash or a signal.

    PHASE_DIR/checkpoints/step-NNNNNNNN/   model/ (HF, safetensors, with the tokenizer),
                                          trainer_state.pt (optimizer, scheduler, RNG states),
                                          meta.json (step, data cursor, history, world size)
                                          (under torchrun: dcp/ shards of the model and the
                                          optimizer, and rng-RANK.pt, no model/)
    PHASE_DIR/student/                     the finished student, HF format (`export_student`)

PHASE_DIR is the run directory (the distillation) or RUN_DIR/baseline. A checkpoint is written to
a temp dir (.tmp-step-N), fsynced and renamed into place (fastkd.fsio); only then is the previous
one deleted, so a crash at any moment leaves a complete checkpoint, and temp dirs of interrupted
writes are removed when the phase starts again (`resume_checkpoint`). The RNG states (Python,
NumPy, torch, CUDA), the data cursor and the world size make the resume exact.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from fastkd import distributed, fsio
from fastkd.batch_loss import StudentLoss
from fastkd.data import Batches

# ----------------------------------------------------------------------------------------------
# RNG state: every generator a step may draw from.


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].copy()), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy(), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Finding the checkpoint to resume from.


def _checkpoints(phase_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (temp dirs of interrupted writes never match), oldest first."""
    root = phase_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir()
             if (m := re.fullmatch(r"step-(\d+)", path.name))]
    return sorted(found)


def latest_checkpoint(phase_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (or baseline) directory, or None."""
    found = _checkpoints(Path(phase_dir))
    return found[-1][1] if found else None


def _remove_partial_checkpoints(phase_dir: Path) -> None:
    root = phase_dir / "checkpoints"
    if root.is_dir():
        for partial in root.glob(".tmp-step-*"):
            shutil.rmtree(partial)


def _check_world_size(checkpoint: Path) -> None:
    """An exact resume needs the world size the checkpoint was written with."""
    saved = json.loads((checkpoint / "meta.json").read_text()).get("world_size", 1)
    if saved != distributed.world_size():
        how = ("without torchrun (or with --nproc-per-node 1)" if saved == 1 else
               f"under torchrun with {saved} processes in all (--nnodes x --nproc-per-node)")
        raise ValueError(
            f"resume: checkpoint {checkpoint} was written by {saved} process(es), this run has "
            f"{distributed.world_size()}; resume it {how}: a different world size would change "
            "the per-rank data shards and RNG streams, so fastkd refuses it")


def resume_checkpoint(phase_dir: Path) -> Path | None:
    """The checkpoint to resume a phase from, or None (a fresh start): the phase directory is
    made and the temp dirs of interrupted writes are removed (rank 0), and the checkpoint's world
    size is checked (every rank)."""
    if distributed.is_main():
        phase_dir.mkdir(parents=True, exist_ok=True)
        _remove_partial_checkpoints(phase_dir)
    distributed.barrier()
    checkpoint = latest_checkpoint(phase_dir)
    if checkpoint is not None:
        _check_world_size(checkpoint)
    return checkpoint


# ----------------------------------------------------------------------------------------------
# Writing and reading one checkpoint.


def save_checkpoint(phase_dir: Path, step: int, student: StudentLoss, tokenizer, optimizer,
                    scheduler, batches: Batches, history: list[dict]) -> Path:
    """Write checkpoints/step-{step}: HF model + tokenizer, trainer state, step/data/history.

    Under torchrun (a collective): DCP shards of the model and optimizer, written by every rank,
    and each rank's RNG state, instead of the HF model; rank 0 writes the rest and renames.
    """
    root = phase_dir / "checkpoints"
    tmp = root / f".tmp-step-{step:08d}"
    if distributed.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    state = {"scheduler": scheduler.state_dict()}
    if distributed.is_distributed():
        distributed.barrier()  # the temp dir exists
        distributed.save_shards(tmp / "dcp", student, optimizer)
        fsio.durable_write(tmp / f"rng-{distributed.rank()}.pt",
                           lambda path: torch.save(rng_state(), path))
        distributed.barrier()  # every rank's part is written and fsynced
    else:
        student.model.save_pretrained(tmp / "model")  # safetensors
        tokenizer.save_pretrained(tmp / "model")
        state.update(optimizer=optimizer.state_dict(), rng=rng_state())
    final = root / f"step-{step:08d}"
    if distributed.is_main():
        torch.save(state, tmp / "trainer_state.pt")
        meta = {"step": step, "data": batches.state_dict(), "history": history,
                "world_size": distributed.world_size()}
        (tmp / "meta.json").write_text(json.dumps(meta))
        fsio.publish_dir(tmp, final)
        for _, old in _checkpoints(phase_dir)[:-1]:
            shutil.rmtree(old)
    distributed.barrier()  # the checkpoint is in place for every rank
    return final


def load_checkpoint(checkpoint: Path, student: StudentLoss, optimizer, scheduler,
                    batches: Batches) -> tuple[int, list[dict]]:
    """Restore what save_checkpoint wrote (the HF model itself was loaded from model/ by one
    process; under torchrun the DCP shards are loaded here); returns (step, history)."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
    meta = json.loads((checkpoint / "meta.json").read_text())
    if distributed.is_distributed():
        distributed.load_shards(checkpoint / "dcp", student, optimizer)
        rng = torch.load(checkpoint / f"rng-{distributed.rank()}.pt", weights_only=True)
    else:
        optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(meta["data"])
    set_rng_state(rng)  # last: everything above may draw random numbers
    return meta["step"], meta["history"]


# ----------------------------------------------------------------------------------------------
# The finished student, exported once.


def export_student(checkpoint: Path, student: StudentLoss, tokenizer, target: Path,
                   device: torch.device) -> None:
    """The finished student as an HF model dir at target, atomically: copied from the final
    checkpoint, or under torchrun gathered from the shards (a collective)."""
    if distributed.is_distributed():
        _export_sharded_model(student, tokenizer, target, device)
    else:
        _export_model(checkpoint, target)


def _export_model(checkpoint: Path, target: Path) -> None:
    """Copy a checkpoint's HF model dir to target, atomically (copy to a temp dir, then rename)."""
    if target.exists():
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    shutil.copytree(checkpoint / "model", tmp, dirs_exist_ok=True)
    fsio.publish_dir(tmp, target)


def _export_sharded_model(student: StudentLoss, tokenizer, target: Path,
                          device: torch.device) -> None:
    """Under torchrun: gather the whole student to rank 0 (on CPU, once), which saves it as an HF
    safetensors model, atomically (a collective)."""
    if distributed.any_rank(target.exists(), device):
        return
    model = distributed.unwrap(student).model
    state = distributed.full_state_dict(model)  # empty except on rank 0
    if distributed.is_main():
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
        model.save_pretrained(tmp, state_dict=state)
        tokenizer.save_pretrained(tmp)
        fsio.publish_dir(tmp, target)
    distributed.barrier()
