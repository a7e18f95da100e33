"""Checkpoints: what makes a run resumable, exactly, after a crash, a signal or a damaged file.

    PHASE_DIR/checkpoints/step-NNNNNNNN/   model/ (HF, safetensors, with the tokenizer; with LoRA
                                          the PEFT adapter alone, fastkd.lora),
                                          trainer_state.pt (optimizer, scheduler, RNG states),
                                          meta.json (step, data cursor, history, world size, the
                                          size and sha256 of every other file, and the sha256 of
                                          its own content: written last, atomically)
                                          (under torchrun: dcp/ shards of the trained
                                          parameters (LoRA: the adapters alone) and the
                                          optimizer, and rng-RANK.pt, no model/)
    PHASE_DIR/checkpoints/damaged-step-N/  a checkpoint found damaged on resume, set aside
    PHASE_DIR/student/                     the finished student, HF format (`export_student`)

PHASE_DIR is the run directory (the distillation) or RUN_DIR/baseline. A checkpoint is written to
a temp dir (.tmp-step-N), its files checksummed as they lie on disk into meta.json, which holds
the checksum of its own content too (so every byte of a checkpoint is covered: a flipped bit in
its step or data cursor is found like one in the weights), fsynced and renamed into place
(fastkd.fsio); a write that fails (a full disk) removes the temp dir and names the checkpoint and
the free space. Once its files are checked to be in place, the checkpoints
before the previous one are deleted: the newest two are kept, so a crash at any moment leaves a
complete checkpoint, and a checkpoint damaged later (a truncated or flipped file) leaves the one
before it. On resume (`resume_checkpoint`) the newest checkpoint is verified against its
checksums; a damaged one is named, set aside, and the previous one used, saying so (under
torchrun rank 0 verifies and decides for every rank). Temp dirs of interrupted writes are removed
when the phase starts again. The RNG states (Python, NumPy, torch, CUDA), the data cursor and the
world size make the resume exact.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from fastkd import distributed, fsio, lora
from fastkd.batch_loss import StudentLoss
from fastkd.data import Batches

log = logging.getLogger("fastkd")

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


KEEP = 2  # checkpoints kept: the newest, and the one to fall back to if it is found damaged
# meta.json "format": 1 records every other file's size and sha256; 2 adds its own checksum
# ("sha256", over the rest of its content)
CHECKSUMMED, SELF_CHECKSUMMED = 1, 2


def _checkpoints(phase_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (temp dirs of interrupted writes and damaged ones set aside never
    match), oldest first."""
    root = phase_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), path) for path in root.iterdir()
             if (m := re.fullmatch(r"step-(\d+)", path.name))]
    return sorted(found)


def latest_checkpoint(phase_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run (or baseline) directory, or None (unverified:
    `resume_checkpoint` verifies)."""
    found = _checkpoints(Path(phase_dir))
    return found[-1][1] if found else None


def _remove_partial_checkpoints(phase_dir: Path) -> None:
    root = phase_dir / "checkpoints"
    if root.is_dir():
        for partial in root.glob(".tmp-step-*"):
            shutil.rmtree(partial)


def read_meta(checkpoint: Path) -> dict:
    """A checkpoint's meta.json; a ValueError naming the file if it is missing or damaged."""
    path = checkpoint / "meta.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ValueError(f"{path} is missing") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged (not valid JSON: {err})") from err


def _file_records(directory: Path) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file under directory but meta.json."""
    records = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != "meta.json":
            records[rel] = {"bytes": path.stat().st_size, "sha256": fsio.sha256_file(path)}
    return records


def verify_checkpoint(checkpoint: Path, checksums: bool = True) -> list[str]:
    """What is wrong with a checkpoint, file by file ([] when it is sound): meta.json must parse,
    and every file it lists must be there with its recorded size and (checksums=True) sha256.
    A checkpoint written before checksums were recorded is checked for meta.json alone."""
    try:
        meta = read_meta(checkpoint)
    except ValueError as err:
        return [str(err)]
    problems = _meta_problems(checkpoint, meta)
    if problems:  # its file records cannot be trusted either
        return problems
    for rel, want in meta.get("files", {}).items():
        path = checkpoint / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(f"{path} is damaged: {path.stat().st_size} bytes, "
                            f"{want['bytes']} written (truncated or overwritten)")
        elif checksums and fsio.sha256_file(path) != want["sha256"]:
            problems.append(f"{path} is damaged: its sha256 differs from the one recorded when "
                            "it was written")
    return problems


def _meta_problems(checkpoint: Path, meta: dict) -> list[str]:
    """meta.json against its own checksum (format 2; formats 1 and before have none) and its step
    against the directory's name."""
    path = checkpoint / "meta.json"
    if "sha256" in meta:
        if fsio.json_sha256({k: v for k, v in meta.items() if k != "sha256"}) != meta["sha256"]:
            return [f"{path} is damaged: its checksum does not match its content"]
    elif meta.get("format", CHECKSUMMED) != CHECKSUMMED:  # format 2 without its checksum
        return [f"{path} is damaged: its checksum is missing"]
    step = int(checkpoint.name.removeprefix("step-")) if re.fullmatch(
        r"step-\d+", checkpoint.name) else None
    if step is not None and meta.get("step") != step:
        return [f"{path} is damaged: it says step {meta.get('step')!r}, its directory "
                f"{checkpoint.name}"]
    return []


def _check_world_size(checkpoint: Path) -> None:
    """An exact resume needs the world size the checkpoint was written with."""
    saved = read_meta(checkpoint).get("world_size", 1)
    if saved != distributed.world_size():
        how = ("without torchrun (or with --nproc-per-node 1)" if saved == 1 else
               f"under torchrun with {saved} processes in all (--nnodes x --nproc-per-node)")
        raise ValueError(
            f"resume: checkpoint {checkpoint} was written by {saved} process(es), this run has "
            f"{distributed.world_size()}; resume it {how}: a different world size would change "
            "the per-rank data shards and RNG streams, so fastkd refuses it")


def resume_checkpoint(phase_dir: Path) -> Path | None:
    """The checkpoint to resume a phase from, or None (a fresh start).

    Rank 0 makes the phase directory, removes the temp dirs of interrupted writes and picks the
    newest checkpoint that verifies (`verify_checkpoint`); damaged newer ones are named in a
    warning and set aside as damaged-step-N. Every rank gets rank 0's choice (or its error: every
    checkpoint damaged), then checks the checkpoint's world size."""
    choice: tuple[str | None, str | None] = (None, None)  # (checkpoint, error)
    if distributed.is_main():
        phase_dir.mkdir(parents=True, exist_ok=True)
        _remove_partial_checkpoints(phase_dir)
        try:
            checkpoint = _choose_checkpoint(phase_dir)
            choice = (None if checkpoint is None else str(checkpoint), None)
        except (ValueError, OSError) as err:  # every rank raises it, none waits for rank 0
            choice = (None, str(err))
    checkpoint, error = distributed.broadcast_from_main(choice)
    if error is not None:
        raise ValueError(error)
    if checkpoint is None:
        return None
    _check_world_size(Path(checkpoint))
    return Path(checkpoint)


def _choose_checkpoint(phase_dir: Path) -> Path | None:
    """The newest sound checkpoint (rank 0): damaged newer ones are reported and set aside."""
    damaged = []
    for _, checkpoint in reversed(_checkpoints(phase_dir)):
        problems = verify_checkpoint(checkpoint)
        if not problems:
            break
        damaged.append((checkpoint, problems))
    else:
        if damaged:
            listing = "; ".join(f"{c.name}: {', '.join(p)}" for c, p in damaged)
            raise ValueError(f"resume: every checkpoint of {phase_dir} is damaged ({listing}); "
                             f"move {phase_dir / 'checkpoints'} away to start this phase over")
        return None
    for bad, problems in damaged:
        aside = bad.with_name(f"damaged-{bad.name}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(bad, aside)
        log.warning("checkpoint %s is damaged (%s): set aside as %s; resuming from the previous "
                    "checkpoint, %s", bad, "; ".join(problems), aside.name, checkpoint.name)
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
    final = root / f"step-{step:08d}"
    try:
        with fsio.failed_writes_named(final):
            _write_checkpoint(tmp, final, step, student, tokenizer, optimizer, scheduler,
                              batches, history)
    except BaseException:
        if distributed.is_main():  # what the failed write left (it may fill a disk)
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if distributed.is_main():
        problems = verify_checkpoint(final, checksums=False)  # in place: every file, every byte
        if problems:
            raise OSError(f"checkpoint {final} did not land intact: {'; '.join(problems)}")
        for _, old in _checkpoints(phase_dir)[:-KEEP]:
            shutil.rmtree(old)
    distributed.barrier()  # the checkpoint is in place for every rank
    return final


def _write_checkpoint(tmp: Path, final: Path, step: int, student: StudentLoss, tokenizer,
                      optimizer, scheduler, batches: Batches, history: list[dict]) -> None:
    """Fill tmp with the checkpoint of `step` and publish it as final (save_checkpoint)."""
    if distributed.is_main():
        tmp.parent.mkdir(parents=True, exist_ok=True)
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
        if lora.has_adapters(student.model):
            lora.save_adapter(student.model, tmp / "model")  # the adapter alone
        else:
            student.model.save_pretrained(tmp / "model")  # safetensors
        tokenizer.save_pretrained(tmp / "model")
        state.update(optimizer=optimizer.state_dict(), rng=rng_state())
    if distributed.is_main():
        torch.save(state, tmp / "trainer_state.pt")
        # meta.json last: the size and sha256 of every file, read back from the disk, and the
        # checksum of its own content.
        meta = {"format": SELF_CHECKSUMMED, "step": step, "data": batches.state_dict(),
                "history": history, "world_size": distributed.world_size(),
                "files": _file_records(tmp)}
        meta["sha256"] = fsio.json_sha256(meta)
        fsio.atomic_write(tmp / "meta.json", lambda path: path.write_text(json.dumps(meta)))
        fsio.publish_dir(tmp, final)


def load_checkpoint(checkpoint: Path, student: StudentLoss, optimizer, scheduler,
                    batches: Batches) -> tuple[int, list[dict]]:
    """Restore what save_checkpoint wrote (the HF model itself was loaded from model/ by one
    process; under torchrun the DCP shards are loaded here); returns (step, history)."""
    state = _torch_load(checkpoint / "trainer_state.pt")
    meta = read_meta(checkpoint)
    if distributed.is_distributed():
        distributed.load_shards(checkpoint / "dcp", student, optimizer)
        rng = _torch_load(checkpoint / f"rng-{distributed.rank()}.pt")
    else:
        optimizer.load_state_dict(state["optimizer"])
        rng = state["rng"]
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(meta["data"])
    set_rng_state(rng)  # last: everything above may draw random numbers
    return meta["step"], meta["history"]


def _torch_load(path: Path):
    """torch.load(weights_only: nothing unpickled but tensors and plain data), naming a damaged
    file (a checkpoint written before checksums were recorded is not verified first)."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise
    except (EOFError, RuntimeError, OSError, ValueError) as err:
        raise ValueError(f"{path} is damaged ({type(err).__name__}: {err})") from err


# ----------------------------------------------------------------------------------------------
# The finished student, exported once.


def export_student(checkpoint: Path, student: StudentLoss, tokenizer, target: Path,
                   device: torch.device, lora_base: str | None = None) -> None:
    """The finished student as an HF model dir at target, atomically: copied from the final
    checkpoint, or under torchrun gathered from the shards (a collective). A LoRA student
    (lora_base: its initial model) is merged into a plain HF model, its adapter saved beside it
    as target's sibling "adapter"."""
    if distributed.is_distributed():
        _export_sharded_model(student, tokenizer, target, device, lora_base)
    elif lora_base is not None:
        lora.export_merged(lora_base, checkpoint / "model", tokenizer, target,
                           target.with_name("adapter"))
    else:
        _export_model(checkpoint, target)


def _export_model(checkpoint: Path, target: Path) -> None:
    """Copy a checkpoint's HF model dir to target, atomically (copy to a temp dir, then rename;
    a failed copy leaves nothing behind)."""
    if target.exists():
        return
    with fsio.temp_dir_beside(target) as tmp:
        shutil.copytree(checkpoint / "model", tmp, dirs_exist_ok=True)
        fsio.publish_dir(tmp, target)


def _export_sharded_model(student: StudentLoss, tokenizer, target: Path,
                          device: torch.device, lora_base: str | None) -> None:
    """Under torchrun: gather the whole student to rank 0 (on CPU, once), which saves it as an HF
    safetensors model, atomically (a collective). A LoRA student: rank 0 saves the gathered
    adapter and merges it into lora_base, as one process does (lora.export_merged)."""
    if distributed.any_rank(target.exists(), device):
        return
    model = distributed.unwrap(student).model
    state = distributed.full_state_dict(model)  # empty except on rank 0
    if distributed.is_main() and lora_base is not None:
        with fsio.temp_dir_beside(target.with_name("gathered-adapter")) as adapter:
            try:
                lora.save_adapter(model, adapter, state)
                lora.export_merged(lora_base, adapter, tokenizer, target,
                                   target.with_name("adapter"))
            finally:
                shutil.rmtree(adapter, ignore_errors=True)
    elif distributed.is_main():
        with fsio.temp_dir_beside(target) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            tokenizer.save_pretrained(tmp)
            fsio.publish_dir(tmp, target)
    distributed.barrier()
