"""The training loop: one phase of a run (the distillation, or the hard-label baseline).

`train_phase` reads top to bottom: find the checkpoint to resume from (fastkd.checkpoint); set the
phase up (`_setup`: the student in fp32, wrapped for DDP or FSDP, AdamW with warmup then cosine
decay, the batches); start (a step-0 evaluation) or resume; then one explicit loop of optimizer
steps (`_optimizer_step`), evaluating (`evaluate`) and checkpointing on the way; last, a final
checkpoint and the exported student. `StopSignals` is how Ctrl-C and SIGTERM ask it to stop
between two steps.

Under torchrun every rank runs this, in step: the collectives are in the wrapped student's
forward/backward, the clip norm, the per-step sums, the evaluation and the checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from fastkd import distributed, lora
from fastkd.batch_loss import StudentLoss, TeacherForward, batch_loss, count_targets
from fastkd.cache import CachedBlocks, Prefetch
from fastkd.checkpoint import export_student, load_checkpoint, resume_checkpoint, save_checkpoint
from fastkd.config import DistillConfig
from fastkd.data import Batches, Blocks, DiskRows
from fastkd.memory import PeakMemory
from fastkd.models import check_packing, check_vocab, lm_head, load_lm, with_heads

log = logging.getLogger("fastkd")


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


@dataclass
class PhaseResult:
    status: str  # "completed", "stopped" (stop_after) or "interrupted" (a signal)
    step: int
    steps_run: int
    history: list[dict]
    checkpoint: Path | None
    student_dir: Path | None
    peak_memory_bytes: int | None = None  # of this call's steps (fastkd.memory.PeakMemory)


@dataclass
class _Phase:
    """What one phase trains, built by `_setup`."""

    student: torch.nn.Module  # a StudentLoss, maybe wrapped in DDP or FSDP
    train_teacher: TeacherForward | None  # None: no teacher forward in training (hard labels)
    logs_kd: bool  # whether the steps' records carry a KD term
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches
    autocast: object  # bf16 autocast, or a null context
    prefetch: Prefetch | None  # a teacher cache: its targets decoded a step ahead


def train_phase(name: str, config: DistillConfig, phase_dir: Path,
                teacher: TeacherForward | None, tokenizer, train: DiskRows | Blocks,
                heldout: Blocks, device: torch.device, stop: StopSignals,
                max_steps: int | None) -> PhaseResult:
    """Train config.student for config.steps optimizer steps (resuming from phase_dir if it holds
    a checkpoint), evaluating and checkpointing on the way; at most max_steps steps in this call.
    """
    checkpoint = resume_checkpoint(phase_dir)
    phase = _setup(config, checkpoint, teacher, tokenizer, train, device)

    def evaluate_now() -> dict:
        return evaluate(phase.student, teacher, heldout, config, device, phase.autocast)

    def save(step: int) -> Path:
        return save_checkpoint(phase_dir, step, phase.student, tokenizer, phase.optimizer,
                               phase.scheduler, phase.batches, records.history)

    if checkpoint is not None:
        step, history = load_checkpoint(checkpoint, phase.student, phase.optimizer,
                                        phase.scheduler, phase.batches)
        log.info("resuming %s from step %d", phase_dir, step)
    else:
        from transformers import set_seed

        # Each rank its own seed: dropout on disjoint rows must not repeat one mask.
        set_seed(config.seed + distributed.rank())
        step, history = 0, [{"step": 0, **evaluate_now()}]
    saved_step = step if checkpoint is not None else None
    start_step = step
    records = _Records(name, config, phase_dir, step, history, resumed=checkpoint is not None)
    memory = PeakMemory(device).start()

    # The loop: one optimizer step a turn, then its record, an evaluation and a checkpoint when
    # due. A teacher cache's targets decode on a thread, closed on the way out.
    with records, (phase.prefetch or nullcontext()):
        while step < config.steps:
            # A signal (any rank's: all stop at the same step), or --stop-after.
            if distributed.any_rank(stop.signum is not None, device) or (
                    step - start_step == max_steps):
                break  # checkpoint below and return
            try:
                stats = _optimizer_step(phase, config, device)
            except NonFiniteLoss as err:
                kept = f"step {saved_step}" if saved_step is not None else "none yet"
                raise NonFiniteLoss(
                    f"{name}: step {step + 1} of {config.steps}: {err}. The step was not applied; "
                    f"the newest checkpoint in {phase_dir} ({kept}) is as it was: fix the cause, "
                    f"then resume from it (--resume)") from None
            step += 1
            record = {"step": step, **stats}
            if step % config.eval_every == 0 or step == config.steps:
                record.update(evaluate_now())
            records.add(record)
            if step % config.save_every == 0 or step == config.steps:
                checkpoint, saved_step = save(step), step
    peak_memory = memory.stop()

    if saved_step != step:
        checkpoint = save(step)
    if step == config.steps:
        status, student_dir = "completed", phase_dir / "student"
        export_student(checkpoint, phase.student, tokenizer, student_dir, device,
                       lora_base=config.student if config.lora_r is not None else None)
    else:
        status, student_dir = ("interrupted" if stop.signum is not None else "stopped"), None
        log.info("%s: stopped at step %d/%d; checkpoint %s", phase_dir, step, config.steps,
                 checkpoint)
    return PhaseResult(status, step, step - start_step, records.history, checkpoint, student_dir,
                       peak_memory)


class _Records:
    """Where a phase's step records go: its history (saved with each checkpoint), then, rank 0's,
    PHASE_DIR/log.jsonl (rewritten from the history when the phase starts), TensorBoard
    (`_TensorBoard`), and the progress bar or, without one, `LogLines`. A context manager: the
    log file, the bar and TensorBoard close on the way out."""

    def __init__(self, name: str, config: DistillConfig, phase_dir: Path, step: int,
                 history: list[dict], resumed: bool) -> None:
        main = distributed.is_main()
        self.history = history
        log_path = phase_dir / "log.jsonl"
        if main:
            log_path.write_text("".join(json.dumps(record) + "\n" for record in history))
        self.file = open(log_path if main else os.devnull, "a")  # closed in __exit__
        self.board = _TensorBoard(phase_dir, config, step, [] if resumed else history)
        self.bar = tqdm(total=config.steps, initial=step, desc=name, unit="step",
                        disable=not (config.progress and main), dynamic_ncols=True)
        self.lines = LogLines(name, config.steps, step) if main and not config.progress else None
        self.postfix: dict = {}

    def add(self, record: dict) -> None:
        self.postfix.update(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:,.0f}")
        if "eval_ppl" in record:
            self.postfix["eval_ppl"] = f"{record['eval_ppl']:.2f}"
        self.history.append(record)
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.board.write(record)
        self.bar.update(1)
        self.bar.set_postfix(self.postfix, refresh=False)
        if self.lines is not None:
            self.lines.record(record)

    def __enter__(self) -> _Records:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()
        self.bar.close()
        self.board.close()


LOG_EVERY_SECONDS = 30.0  # with no progress bar: a log line at least this often


class LogLines:
    """With no progress bar (--no-progress), a log line at each evaluation and at least every
    LOG_EVERY_SECONDS: the step, loss, tokens/s and the time left, so a run under nohup shows
    life between its data lines and its report."""

    def __init__(self, name: str, steps: int, step: int) -> None:
        self.name, self.steps, self.first = name, steps, step
        self.started = self.last = time.perf_counter()

    def record(self, record: dict) -> None:
        now = time.perf_counter()
        if "eval_ce" not in record and now - self.last < LOG_EVERY_SECONDS:
            return
        self.last = now
        step = record["step"]
        left = (now - self.started) / (step - self.first) * (self.steps - step)
        text = (f"{self.name}: step {step}/{self.steps}, loss {record['loss']:.4f}, "
                f"{record['tokens_per_s']:,.0f} tokens/s, ETA {_duration(left)}")
        if "eval_ppl" in record:
            text += f", held-out ppl {record['eval_ppl']:.2f}"
        log.info(text)


def _duration(seconds: float) -> str:
    """1h02m, 3m05s or 42s."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class _TensorBoard:
    """With config.report_to == "tensorboard", rank 0 writes every step record's numbers as
    scalars to PHASE_DIR/tensorboard (torch.utils.tensorboard); otherwise nothing. A resumed
    phase purges the events after its checkpoint's step (written before a crash or a stop), so
    steps that are run again are not shown twice."""

    def __init__(self, phase_dir: Path, config: DistillConfig, step: int,
                 records: list[dict]) -> None:
        self.writer = None
        if config.report_to == "tensorboard" and distributed.is_main():
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(phase_dir / "tensorboard"),
                                        purge_step=step + 1 if step > 0 else None)
        for record in records:
            self.write(record)

    def write(self, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                group = "eval" if key.startswith("eval_") else "train"
                self.writer.add_scalar(f"{group}/{key.removeprefix('eval_')}", value,
                                       record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _setup(config: DistillConfig, checkpoint: Path | None, teacher: TeacherForward | None,
           tokenizer, train: DiskRows | Blocks, device: torch.device) -> _Phase:
    """The student (from the checkpoint, else config.student), its loss, optimizer, schedule and
    batches."""
    opts = config.loss_options()
    use_bf16 = config.bf16 if config.bf16 is not None else (
        device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    # fp32 master weights; bf16 comes from autocast. One process reloads the checkpoint's HF
    # model; several load the initial student, then the checkpoint's DCP shards
    # (load_checkpoint). Under FSDP it loads on the CPU: fully_shard moves each shard to the device.
    # A LoRA student reloads its initial model, then the checkpoint's adapter (several
    # processes: the DCP shards hold the adapters alone).
    sharded = distributed.is_distributed() and config.parallel == "fsdp"
    from_checkpoint = checkpoint is not None and distributed.world_size() == 1
    full_model = from_checkpoint and config.lora_r is None
    head = load_lm(str(checkpoint / "model") if full_model else config.student,
                   "student", torch.float32, torch.device("cpu") if sharded else device)
    check_vocab(tokenizer, head, "student")
    if train.packed:  # packed examples: its attention must keep them apart
        check_packing(head.model, "student")
    if config.lora_r is not None:
        with torch.random.fork_rng(devices=[]):  # the adapters' init: seeded, the same each run
            torch.manual_seed(config.seed)
            model = lora.add_lora(head.model, config.lora_r, config.lora_alpha,
                                  config.lora_targets)
        if from_checkpoint:
            lora.load_adapter(model, checkpoint / "model")
        head = lm_head(model, "student")  # its probe checks the adapted output layer too
    if config.gradient_checkpointing:  # transformers >= 5 names it activation checkpointing
        enable = getattr(head.model, "activation_checkpointing_enable", None)
        (enable or head.model.gradient_checkpointing_enable)({"use_reentrant": False})
    # the heads' softcaps and logit scales (hard labels only: the student is its own teacher;
    # several teachers: each its own, on its TeacherHead)
    opts = with_heads(opts, head, None if config.teacher_names else
                      head if teacher is None else teacher)
    student = distributed.wrap_student(StudentLoss(head, opts, config.backend, config.cache_tail),
                                       config.parallel, use_bf16, device)
    student.train()

    params = [p for p in student.parameters() if p.requires_grad]  # tied weights: once
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95))
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    return _Phase(
        student=student,
        # Hard labels only: no teacher forward in training (evaluation still measures KD to it).
        train_teacher=teacher if opts.kd_weight > 0 else None,
        # The KD term is trained (and logged) from the teacher, or from its cache (no teacher).
        logs_kd=opts.kd_weight > 0 and (teacher is not None or config.teacher_cache is not None),
        params=params, optimizer=optimizer, scheduler=scheduler,
        batches=Batches(train, config.batch_size, config.seed), autocast=autocast,
        prefetch=Prefetch() if config.teacher_cache is not None else None)


def _optimizer_step(phase: _Phase, config: DistillConfig, device: torch.device) -> dict:
    """One optimizer step over config.grad_accum micro-batches: the step's record (loss, ce, kd
    per target, lr, grad_norm, tokens, seconds, tokens_per_s)."""
    t0 = time.perf_counter()
    # Every rank draws the whole global batch (so the global target count needs no
    # communication) and runs its own rows of it.
    micro_batches = [next(phase.batches) for _ in range(config.grad_accum)]
    if phase.prefetch is not None:  # this step's cached targets, then the next step's
        phase.prefetch.ahead(distributed.local_rows(b).targets
                             for b in (*micro_batches, *phase.batches.peek(config.grad_accum)))
    n_targets = sum(count_targets(b) for b in micro_batches)
    world = distributed.world_size()
    totals = torch.zeros(3, device=device)  # this rank's summed loss, ce, kd
    for i, batch in enumerate(micro_batches):
        with distributed.no_sync(phase.student, skip=i < len(micro_batches) - 1):
            with phase.autocast:
                loss, ce, kd = batch_loss(phase.student, phase.train_teacher,
                                          distributed.local_rows(batch), device, phase.prefetch)
            # Sum-reduced losses over the whole step's targets on all ranks: accumulation
            # == one big batch. DDP and FSDP average gradients over the ranks: times P.
            (loss / (n_targets / world)).backward()
        totals += torch.stack([loss.detach(), ce, kd])
    totals = distributed.all_reduce_sum(totals)  # every rank then sees the same numbers
    loss_v, ce_v, kd_v = (totals / n_targets).tolist()  # host sync, once per step
    grad_norm = (float(distributed.clip_grad_norm(phase.params, config.clip))
                 if config.clip is not None else None)
    # Before the update: a NaN or inf never reaches the weights, the optimizer or a checkpoint.
    if not all(math.isfinite(x) for x in (loss_v, ce_v, kd_v, grad_norm or 0.0)):
        raise NonFiniteLoss(_non_finite(loss_v, ce_v, kd_v, grad_norm, phase))
    lr = phase.scheduler.get_last_lr()[0]
    phase.optimizer.step()
    phase.scheduler.step()
    phase.optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    return {"loss": loss_v, "ce": ce_v, "kd": kd_v if phase.logs_kd else None, "lr": lr,
            "grad_norm": grad_norm, "tokens": n_targets, "seconds": seconds,
            "tokens_per_s": n_targets / seconds}


class NonFiniteLoss(FloatingPointError):
    """A training step whose loss or gradient is NaN or inf; raised before the step is applied,
    on every rank alike (the numbers are all-reduced)."""


def _non_finite(loss: float, ce: float, kd: float, grad_norm: float | None, phase: _Phase) -> str:
    """What went wrong, and on which side, as far as the step's numbers tell."""
    numbers = f"loss {loss}, ce {ce}, kd {kd}, grad norm {grad_norm}"
    if not math.isfinite(ce):
        why = ("the student's cross-entropy is not finite: its logits hold NaN or inf (a student "
               "that diverged: try a lower --lr; or fp16 overflow)")
    elif not math.isfinite(kd) and phase.train_teacher is not None:
        why = ("the KD term is not finite while the student's cross-entropy is: the teacher's "
               "outputs hold NaN or inf on this batch (or the divergence is infinite, as reverse "
               "KL is where the teacher gives an id probability 0 and the student does not)")
    elif not math.isfinite(kd):
        why = "the KD term against the teacher cache is not finite"
    else:
        why = "the loss is finite but its gradient is not (an overflow in the backward pass)"
    return f"{why} ({numbers})"


@torch.no_grad()
def evaluate(student: StudentLoss, teacher: TeacherForward | None, heldout: Blocks,
             config: DistillConfig, device: torch.device, autocast) -> dict:
    """Held-out CE (and perplexity) and KD divergence to the teacher at the run's temperature.

    Under torchrun each rank evaluates its share of the held-out blocks; the sums are all-reduced.
    """
    student.eval()
    names = config.teacher_names if teacher is not None else []
    # ce, kd, counted targets, then per teacher (several): its kd and its tokens
    sums = torch.zeros(3 + 2 * len(names), dtype=torch.float64)
    for batch, counted in distributed.eval_shards(heldout, config.batch_size):
        with autocast:
            out = batch_loss(student, teacher, batch, device)
        if counted:  # host syncs, once per eval batch
            _, ce, kd = out
            per_teacher = [] if not names else [*out.teacher_kd.tolist(),
                                                *out.teacher_tokens.tolist()]
            sums += torch.tensor([float(ce), float(kd), count_targets(batch), *per_teacher],
                                 dtype=torch.float64)
    student.train()
    ce_sum, kd_sum, count, *per_teacher = distributed.all_reduce_sum(sums.to(device)).tolist()
    ce_mean = ce_sum / count
    kd_of = {f"eval_kd_{name}": per_teacher[k] / per_teacher[len(names) + k]
             if per_teacher[len(names) + k] else None for k, name in enumerate(names)}
    return {"eval_ce": ce_mean, "eval_ppl": math.exp(min(ce_mean, 50.0)),
            "eval_kd": None if teacher is None and not isinstance(heldout, CachedBlocks)
            else kd_sum / count, **kd_of}
