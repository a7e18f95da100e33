"""The distillation trainer: a Hugging Face teacher distils into a student through the fused loss.

Reads top to bottom: the config; loading the models and checking their heads; the loss on one
batch; evaluation; checkpoints (atomic) and RNG state; the one training loop; `run_distillation`,
which runs the distillation, the hard-label baseline with the same budget, and the report.

Under torchrun the same loop runs on every rank (fastkd.distributed: FSDP2 or DDP, DCP shards).

The student's loss never sees full logits: the fused loss takes the base model's last hidden states
and the LM head's weight, `(B, L-1, D) x (V, D)`, and streams over the vocabulary. Run directory:

    RUN_DIR/config.json                  the DistillConfig (what `--resume RUN_DIR` reads)
    RUN_DIR/checkpoints/step-NNNNNNNN/   model/ (HF, safetensors), trainer_state.pt, meta.json
                                         (under torchrun: dcp/ shards and rng-RANK.pt, no model/)
    RUN_DIR/student/                     the distilled student, HF format
    RUN_DIR/log.jsonl                    one record per step (loss, lr, tokens/s, evaluations)
    RUN_DIR/baseline/...                 the same for the hard-label baseline
    RUN_DIR/int8/model.safetensors       the distilled student, int8 dynamic
    RUN_DIR/report.md, report.json, loss_curve.png
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fastkd import distributed, fsio
from fastkd.batch_loss import (  # noqa: F401  (re-exported: the trainer's public names)
    StudentLoss,
    TeacherForward,
    batch_loss,
    count_targets,
)
from fastkd.cache import CachedBlocks, open_for_run
from fastkd.config import (  # noqa: F401  (re-exported: the trainer's public names)
    RUNTIME_FIELDS,
    TEACHER_DTYPES,
    DistillConfig,
    check_run_dir,
)
from fastkd.data import Batches, Blocks, load_blocks
from fastkd.memory import PeakMemory
from fastkd.models import (  # noqa: F401  (re-exported: the trainer's public names)
    LMHead,
    check_tokenizers,
    check_vocab,
    from_pretrained,
    lm_head,
    load_lm,
    load_tokenizer,
)

log = logging.getLogger("fastkd")


# ----------------------------------------------------------------------------------------------
# Models: the teacher is frozen; fastkd.models splits each model into base and head.


def load_teacher(config: DistillConfig, device: torch.device) -> LMHead:
    """The teacher: frozen, eval mode, no gradients (so no optimizer state), optionally bf16."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        config.teacher_dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    teacher = load_lm(config.teacher, "teacher", dtype, device)
    teacher.model.eval().requires_grad_(False)
    return teacher


# ----------------------------------------------------------------------------------------------
# The loss on one batch, and held-out evaluation.


@torch.no_grad()
def evaluate(student: StudentLoss, teacher: TeacherForward | None, heldout: Blocks,
             config: DistillConfig, device: torch.device, autocast) -> dict:
    """Held-out CE (and perplexity) and KD divergence to the teacher at the run's temperature.

    Under torchrun each rank evaluates its share of the held-out blocks; the sums are all-reduced.
    """
    student.eval()
    sums = torch.zeros(3, dtype=torch.float64)  # ce, kd, counted targets
    for batch, counted in distributed.eval_shards(heldout, config.batch_size):
        with autocast:
            _, ce, kd = batch_loss(student, teacher, batch, device)
        if counted:  # host syncs, once per eval batch
            sums += torch.tensor([float(ce), float(kd), count_targets(batch)], dtype=torch.float64)
    student.train()
    ce_sum, kd_sum, count = distributed.all_reduce_sum(sums.to(device)).tolist()
    ce_mean = ce_sum / count
    return {"eval_ce": ce_mean, "eval_ppl": math.exp(min(ce_mean, 50.0)),
            "eval_kd": None if teacher is None and not isinstance(heldout, CachedBlocks)
            else kd_sum / count}


# ----------------------------------------------------------------------------------------------
# Checkpoints: written to a temp dir, fsynced, renamed into place; only then is the previous one
# deleted, so a crash at any moment leaves a complete checkpoint. RNG states make resume exact.


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


def _remove_partial_checkpoints(phase_dir: Path) -> None:
    root = phase_dir / "checkpoints"
    if root.is_dir():
        for partial in root.glob(".tmp-step-*"):
            shutil.rmtree(partial)


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


class StopSignals:
    """Ctrl-C / SIGTERM set a flag; the loop checks it between steps, saves and returns.

    A second signal raises KeyboardInterrupt at once (checkpoint writes are atomic, so the previous
    checkpoint stays loadable). Handlers are installed only from the main thread.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("%s received: finishing this step, saving a checkpoint, then stopping "
                    "(signal again to abort without saving)", signal.Signals(signum).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------------------
# The training loop: one phase (the distillation, or the hard-label baseline) of a run.


@dataclass
class PhaseResult:
    status: str  # "completed", "stopped" (stop_after) or "interrupted" (a signal)
    step: int
    steps_run: int
    history: list[dict]
    checkpoint: Path | None
    student_dir: Path | None
    peak_memory_bytes: int | None = None  # of this call's steps (fastkd.memory.PeakMemory)


def train_phase(name: str, config: DistillConfig, phase_dir: Path,
                teacher: TeacherForward | None, tokenizer, train: Blocks, heldout: Blocks,
                device: torch.device, stop: StopSignals, max_steps: int | None) -> PhaseResult:
    """Train config.student for config.steps optimizer steps (resuming from phase_dir if it holds
    a checkpoint), evaluating and checkpointing on the way; at most max_steps steps in this call.

    Under torchrun every rank runs this, in step: the collectives are in the wrapped student's
    forward/backward, the clip norm, the per-step sums, the evaluation and the checkpoints.
    """
    main, world = distributed.is_main(), distributed.world_size()
    if main:
        phase_dir.mkdir(parents=True, exist_ok=True)
        _remove_partial_checkpoints(phase_dir)
    distributed.barrier()
    checkpoint = latest_checkpoint(phase_dir)
    if checkpoint is not None:
        _check_world_size(checkpoint)
    opts = config.loss_options()
    use_bf16 = config.bf16 if config.bf16 is not None else (
        device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # fp32 master weights; bf16 comes from autocast. One process reloads the checkpoint's HF
    # model; several load the initial student, then the checkpoint's DCP shards
    # (load_checkpoint). Under FSDP it loads on the CPU: fully_shard moves each shard to the device.
    sharded = distributed.is_distributed() and config.parallel == "fsdp"
    head = load_lm(str(checkpoint / "model") if checkpoint and world == 1 else config.student,
                   "student", torch.float32, torch.device("cpu") if sharded else device)
    check_vocab(tokenizer, head, "student")
    opts = dataclasses.replace(opts, student_softcap=head.softcap,
                               teacher_softcap=(head if teacher is None else teacher).softcap)
    # Hard labels only: no teacher forward in training (evaluation still measures KD to it).
    train_teacher = teacher if opts.kd_weight > 0 else None
    # The KD term is trained (and logged) from the teacher, or from its cache (no teacher then).
    logs_kd = opts.kd_weight > 0 and (teacher is not None or config.teacher_cache is not None)
    student = distributed.wrap_student(StudentLoss(head, opts, config.backend), config.parallel,
                                       use_bf16, device)
    student.train()

    params = [p for p in student.parameters() if p.requires_grad]  # tied weights: once
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95))
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup, config.steps)
    batches = Batches(train, config.batch_size, config.seed)
    log_path = phase_dir / "log.jsonl"
    if checkpoint is not None:
        step, history = load_checkpoint(checkpoint, student, optimizer, scheduler, batches)
        log.info("resuming %s from step %d", phase_dir, step)
    else:
        from transformers import set_seed

        # Each rank its own seed: dropout on disjoint rows must not repeat one mask.
        set_seed(config.seed + distributed.rank())
        step, history = 0, [{"step": 0, **evaluate(student, teacher, heldout, config, device,
                                                      autocast)}]
    if main:
        log_path.write_text("".join(json.dumps(record) + "\n" for record in history))
    saved_step = step if checkpoint is not None else None
    start_step = step

    memory = PeakMemory(device).start()
    bar = tqdm(total=config.steps, initial=step, desc=name, unit="step",
               disable=not (config.progress and main), dynamic_ncols=True)
    postfix = {}
    with open(log_path if main else os.devnull, "a") as log_file:  # the log is rank 0's
        while step < config.steps:
            # A signal (any rank's: all stop at the same step), or --stop-after.
            if distributed.any_rank(stop.signum is not None, device) or (
                    step - start_step == max_steps):
                break  # checkpoint below and return
            t0 = time.perf_counter()
            # Every rank draws the whole global batch (so the global target count needs no
            # communication) and runs its own rows of it.
            micro_batches = [next(batches) for _ in range(config.grad_accum)]
            n_targets = sum(count_targets(b) for b in micro_batches)
            totals = torch.zeros(3, device=device)  # this rank's summed loss, ce, kd
            for i, batch in enumerate(micro_batches):
                with distributed.no_sync(student, skip=i < len(micro_batches) - 1):
                    with autocast:
                        loss, ce, kd = batch_loss(student, train_teacher,
                                                  distributed.local_rows(batch), device)
                    # Sum-reduced losses over the whole step's targets on all ranks: accumulation
                    # == one big batch. DDP and FSDP average gradients over the ranks: times P.
                    (loss / (n_targets / world)).backward()
                totals += torch.stack([loss.detach(), ce, kd])
            grad_norm = (distributed.clip_grad_norm(params, config.clip)
                         if config.clip is not None else None)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            totals = distributed.all_reduce_sum(totals)
            loss_v, ce_v, kd_v = (totals / n_targets).tolist()  # host sync, once per step
            seconds = time.perf_counter() - t0
            record = {"step": step, "loss": loss_v, "ce": ce_v,
                      "kd": kd_v if logs_kd else None, "lr": lr,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "tokens": n_targets, "seconds": seconds, "tokens_per_s": n_targets / seconds}
            postfix.update(loss=f"{loss_v:.3f}", tok_s=f"{n_targets / seconds:,.0f}")
            if step % config.eval_every == 0 or step == config.steps:
                record.update(evaluate(student, teacher, heldout, config, device, autocast))
                postfix["eval_ppl"] = f"{record['eval_ppl']:.2f}"
            history.append(record)
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
            bar.update(1)
            bar.set_postfix(postfix, refresh=False)
            if step % config.save_every == 0 or step == config.steps:
                checkpoint = save_checkpoint(phase_dir, step, student, tokenizer, optimizer,
                                             scheduler, batches, history)
                saved_step = step
    bar.close()
    peak_memory = memory.stop()
    if saved_step != step:
        checkpoint = save_checkpoint(phase_dir, step, student, tokenizer, optimizer, scheduler,
                                     batches, history)
    if step == config.steps:
        status, student_dir = "completed", phase_dir / "student"
        if distributed.is_distributed():
            _export_sharded_model(student, tokenizer, student_dir, device)
        else:
            _export_model(checkpoint, student_dir)
    else:
        status, student_dir = ("interrupted" if stop.signum is not None else "stopped"), None
        log.info("%s: stopped at step %d/%d; checkpoint %s", phase_dir, step, config.steps,
                 checkpoint)
    return PhaseResult(status, step, step - start_step, history, checkpoint, student_dir,
                       peak_memory)


# ----------------------------------------------------------------------------------------------
# A run: distillation, then the hard-label baseline with the same budget, then the report.


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _phase_summary(result: PhaseResult | None) -> dict | None:
    if result is None:
        return None
    final = next((r for r in reversed(result.history) if "eval_ce" in r), {})
    return {"status": result.status, "step": result.step, "steps_run": result.steps_run,
            "train_seconds": sum(r.get("seconds", 0.0) for r in result.history),
            "student_dir": None if result.student_dir is None else str(result.student_dir),
            "checkpoint": None if result.checkpoint is None else str(result.checkpoint),
            "tokens": sum(r.get("tokens", 0) for r in result.history),
            "eval_ce": final.get("eval_ce"), "eval_ppl": final.get("eval_ppl"),
            "eval_kd": final.get("eval_kd"), "peak_memory_bytes": result.peak_memory_bytes}


def run_distillation(config: DistillConfig) -> dict:
    """Run (or resume) a distillation: returns the status, paths, per-phase summaries and metrics.

    Keys: "status" ("completed" | "stopped" | "interrupted"), "signal" (the signal number or None),
    "run_dir", "distill" / "baseline" (phase summaries: status, step, steps_run, train_seconds,
    tokens, student_dir, checkpoint, final held-out eval_ce / eval_ppl / eval_kd), "history" /
    "baseline_history" (per-step records), "report" (paths and metric rows, when written),
    "seconds" (wall time of this call).

    Under torchrun (WORLD_SIZE > 1) every rank calls this: it joins the process group, trains in
    step with the others, and leaves the group (barrier, then destroy) before returning; rank 0
    then writes the report alone.
    """
    started = time.perf_counter()
    run_dir = check_run_dir(config)
    device = distributed.init(config.device, config.dist_timeout)  # None: one process
    if device is None:
        device = resolve_device(config.device)
    try:
        results, teacher, heldout = _run_phases(config, run_dir, device)
    except BaseException:
        distributed.teardown(clean=False)
        raise
    distributed.teardown(clean=True)
    if results["status"] == "completed" and config.report and distributed.is_main():
        from fastkd.report import write_report

        if teacher is None and config.teacher_cache is None:  # it was sharded: rank 0 loads
            teacher = load_teacher(config, device)  # it whole, alone
        results["report"] = write_report(config, run_dir, teacher, heldout, device, results)
    results["seconds"] = time.perf_counter() - started
    return results


def _run_phases(config: DistillConfig, run_dir: Path,
                device: torch.device) -> tuple[dict, LMHead | None, Blocks]:
    """The distillation, then the baseline: (results, the teacher if the report can use it, the
    held-out blocks)."""
    world = distributed.world_size()
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} is the global number of sequences per "
                         f"micro-batch: it must split evenly across the {world} processes")
    tokenizer_source = config.tokenizer or config.teacher or config.student
    tokenizer = load_tokenizer(tokenizer_source)
    check_tokenizers(tokenizer_source, tokenizer, config.student)
    if config.teacher_cache is not None:  # offline: no teacher, the cache's sequences
        train, heldout, _ = open_for_run(config, tokenizer)
    else:
        train, heldout = load_blocks(config.data, tokenizer, config.seq_len,
                                     config.eval_fraction)
    heldout = heldout.select(torch.arange(min(len(heldout), config.eval_sequences)))
    teacher = teacher_module = None
    if config.teacher is not None and config.teacher_cache is None:
        # A sharded teacher is loaded on the CPU: FSDP moves each rank's shards to the device.
        shard_teacher = distributed.is_distributed() and config.teacher_placement == "shard"
        teacher = load_teacher(config, torch.device("cpu") if shard_teacher else device)
        check_vocab(tokenizer, teacher, "teacher")
        teacher_module = distributed.wrap_teacher(TeacherForward(teacher),
                                                  config.teacher_placement, device)
        if shard_teacher:
            teacher = None  # its LMHead now holds shards
    log.info("data: %d training and %d held-out sequences of %d tokens", len(train), len(heldout),
             config.seq_len)
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes to it
    if not config.resume and distributed.is_main():
        # Only now: a start that fails on its inputs leaves no run behind.
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir)

    baseline = None
    budget = config.stop_after
    with StopSignals() as stop:
        distilled = train_phase("distill" if teacher_module is not None or config.teacher_cache
                                else "hard-label", config, run_dir, teacher_module, tokenizer,
                                train, heldout, device, stop, budget)
        if config.baseline and distilled.status == "completed":
            if budget is not None:
                budget -= distilled.steps_run
            hard = dataclasses.replace(config, ce_weight=1.0, kd_weight=0.0)
            if budget is None or budget > 0:
                baseline = train_phase("baseline", hard, run_dir / "baseline", teacher_module,
                                       tokenizer, train, heldout, device, stop, budget)
    phases = [distilled] + ([baseline] if config.baseline else [])
    if all(p is not None and p.status == "completed" for p in phases):
        status = "completed"
    else:
        status = "interrupted" if stop.signum is not None else "stopped"
    results = {"status": status, "signal": stop.signum, "run_dir": str(run_dir),
               "distill": _phase_summary(distilled), "baseline": _phase_summary(baseline),
               "history": distilled.history,
               "baseline_history": baseline.history if baseline is not None else None,
               "report": None}
    return results, teacher, heldout
