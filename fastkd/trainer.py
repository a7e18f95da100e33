"""The distillation trainer: a Hugging Face teacher distils into a student through the fused loss.

Reads top to bottom: the config; loading the models and checking their heads; the loss on one
batch; evaluation; checkpoints (atomic) and RNG state; the one training loop; `run_distillation`,
which runs the distillation, the hard-label baseline with the same budget, and the report.

The student's loss never sees full logits: the fused loss takes the base model's last hidden states
and the LM head's weight, `(B, L-1, D) x (V, D)`, and streams over the vocabulary. Run directory:

    RUN_DIR/config.json                  the DistillConfig (what `--resume RUN_DIR` reads)
    RUN_DIR/checkpoints/step-NNNNNNNN/   model/ (HF, safetensors), trainer_state.pt, meta.json
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

from fastkd.cache import CachedBlocks, cached_batch_loss, open_for_run
from fastkd.data import Batches, Blocks, eval_batches, load_blocks
from fastkd.loss import BACKENDS, distill
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
from fastkd.options import DistillOptions

log = logging.getLogger("fastkd")

TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")
# Fields that say where and how this invocation runs, not what the run is: resume may change them.
RUNTIME_FIELDS = ("out", "resume", "stop_after", "progress", "device")


@dataclass
class DistillConfig:
    """One run. `teacher=None` trains the student on hard labels only (needs kd_weight=0).

    Paths are strings so the config round-trips through RUN_DIR/config.json.
    """

    teacher: str | None  # HF model dir or hub id (None with teacher_cache: no teacher loaded)
    student: str  # HF model dir or hub id: the initial student
    data: list[str]  # .txt / .jsonl ("text" field) files
    out: str  # the run directory
    tokenizer: str | None = None  # default: the teacher's (else the student's)
    # The loss (fastkd.DistillOptions).
    temperature: float = 2.0
    ce_weight: float = 0.5
    kd_weight: float = 0.5
    divergence: str = "forward_kl"
    beta: float = 0.5  # jsd's mixture weight
    skew: float = 0.1  # skew_forward_kl / skew_reverse_kl's mixture weight alpha
    # Optimisation: AdamW, linear warmup then cosine decay, over `steps` optimizer steps.
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: int = 20
    clip: float | None = 1.0
    seed: int = 0
    # Data: the held-out split, and how much of it evaluation and the report use.
    eval_fraction: float = 0.05
    eval_sequences: int = 64
    # Precision: bf16=None autocasts to bf16 on CUDA only; teacher_dtype "auto" is bf16 on CUDA.
    device: str | None = None
    bf16: bool | None = None
    teacher_dtype: str = "auto"
    backend: str = "auto"
    # Bookkeeping.
    eval_every: int = 50
    save_every: int = 100
    baseline: bool = True  # also train a hard-label-only student with the same budget
    report: bool = True
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this call
    progress: bool = True
    # Offline distillation (fastkd.cache): train from a `fastkd cache-teacher` directory through
    # the sparse loss; cache_tail None picks "ignore" for sampled caches, "bucket" for top-k.
    teacher_cache: str | None = None
    cache_tail: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.data, (str, os.PathLike)):
            self.data = [self.data]
        self.data = [str(path) for path in self.data]
        if not self.data:
            raise ValueError("data: pass at least one text or jsonl file")
        self.loss_options()  # validates temperature, weights, divergence, beta, skew
        positive = ("steps", "batch_size", "grad_accum", "eval_every", "save_every",
                    "eval_sequences")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {self.seq_len}")
        if not 0 <= self.warmup <= self.steps:
            raise ValueError(f"warmup must lie in [0, steps={self.steps}], got {self.warmup}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f"clip must be > 0 or None, got {self.clip}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 or None, got {self.stop_after}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(f"teacher_dtype must be one of {TEACHER_DTYPES}, got "
                             f"{self.teacher_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.teacher is None and self.teacher_cache is None and (
                self.kd_weight > 0 or self.baseline or self.report):
            raise ValueError("teacher=None trains on hard labels only: it needs kd_weight=0, "
                             "baseline=False and report=False")

    def loss_options(self) -> DistillOptions:
        # Summed over tokens: the loop divides by the token count of the whole accumulated step.
        return DistillOptions(temperature=self.temperature, ce_weight=self.ce_weight,
                              kd_weight=self.kd_weight, divergence=self.divergence,
                              beta=self.beta, skew=self.skew, reduction="sum")

    def save(self, run_dir: Path) -> None:
        _atomic_write_text(run_dir / "config.json", json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> DistillConfig:
        """The config of the run in run_dir (its config.json)."""
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no run to resume: {path} not found")
        return cls(**json.loads(path.read_text()))


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


def batch_loss(student: LMHead, teacher: LMHead | None, batch: Blocks, opts: DistillOptions,
               backend: str, device: torch.device):
    """Summed (loss, ce, kd) over the batch's next-token predictions, through the fused loss.

    teacher=None (hard labels only, kd_weight=0): the student stands in as its own detached
    teacher, so no teacher forward runs and the KD term, weighted 0, adds nothing.
    """
    if isinstance(batch, CachedBlocks):  # offline: the cached teacher targets, the sparse loss
        return cached_batch_loss(student, batch, opts, backend, device)
    input_ids = batch.input_ids.to(device, non_blocking=True)
    mask = batch.attention_mask.to(device, non_blocking=True)
    # Next-token shift: position i predicts token i + 1; padding is labelled ignore_index.
    labels = batch.labels(opts.ignore_index).to(device, non_blocking=True)[:, 1:]
    h_s = student.hidden(input_ids, mask)[:, :-1]
    if teacher is None:
        h_t, w_t, b_t = h_s.detach(), student.weight.detach(), student.bias
    else:
        with torch.no_grad():
            h_t = teacher.hidden(input_ids, mask)[:, :-1]
        w_t, b_t = teacher.weight, teacher.bias
    return distill(h_s, student.weight, h_t, w_t, labels, opts, student_bias=student.bias,
                   teacher_bias=None if b_t is None else b_t.detach(), return_components=True,
                   backend=backend)


def count_targets(batch: Blocks) -> int:
    """Next-token targets in a batch (non-padding labels after the shift); CPU tensors, no sync."""
    return int(batch.attention_mask[:, 1:].sum())


@torch.no_grad()
def evaluate(student: LMHead, teacher: LMHead | None, heldout: Blocks, opts: DistillOptions,
             config: DistillConfig, device: torch.device, autocast) -> dict:
    """Held-out CE (and perplexity) and KD divergence to the teacher at the run's temperature."""
    student.model.eval()
    ce_sum = kd_sum = 0.0
    count = 0
    for batch in eval_batches(heldout, config.batch_size):
        with autocast:
            _, ce, kd = batch_loss(student, teacher, batch, opts, config.backend, device)
        ce_sum, kd_sum = ce_sum + float(ce), kd_sum + float(kd)  # host syncs, once per eval batch
        count += count_targets(batch)
    student.model.train()
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for filename in filenames:
            fd = os.open(os.path.join(dirpath, filename), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def save_checkpoint(phase_dir: Path, step: int, student: LMHead, tokenizer, optimizer, scheduler,
                    batches: Batches, history: list[dict]) -> Path:
    """Write checkpoints/step-{step}: HF model + tokenizer, trainer state, step/data/history."""
    root = phase_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-step-", dir=root))
    student.model.save_pretrained(tmp / "model")  # safetensors
    tokenizer.save_pretrained(tmp / "model")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_state()}, tmp / "trainer_state.pt")
    meta = {"step": step, "data": batches.state_dict(), "history": history}
    (tmp / "meta.json").write_text(json.dumps(meta))
    _fsync_tree(tmp)
    final = root / f"step-{step:08d}"
    os.rename(tmp, final)
    _fsync_dir(root)
    for _, old in _checkpoints(phase_dir)[:-1]:
        shutil.rmtree(old)
    return final


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
    _fsync_tree(tmp)
    os.rename(tmp, target)


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


def train_phase(name: str, config: DistillConfig, phase_dir: Path, teacher: LMHead | None,
                tokenizer, train: Blocks, heldout: Blocks, device: torch.device,
                stop: StopSignals, max_steps: int | None) -> PhaseResult:
    """Train config.student for config.steps optimizer steps (resuming from phase_dir if it holds
    a checkpoint), evaluating and checkpointing on the way; at most max_steps steps in this call."""
    phase_dir.mkdir(parents=True, exist_ok=True)
    _remove_partial_checkpoints(phase_dir)
    checkpoint = latest_checkpoint(phase_dir)
    opts = config.loss_options()
    use_bf16 = config.bf16 if config.bf16 is not None else (
        device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    student = load_lm(str(checkpoint / "model") if checkpoint else config.student, "student",
                      torch.float32, device)  # fp32 master weights; bf16 comes from autocast
    check_vocab(tokenizer, student, "student")
    opts = dataclasses.replace(opts, student_softcap=student.softcap,
                               teacher_softcap=(teacher or student).softcap)
    # Hard labels only: no teacher forward in training (evaluation still measures KD to it).
    train_teacher = teacher if opts.kd_weight > 0 else None
    student.model.train()

    params = [p for p in student.model.parameters() if p.requires_grad]  # tied weights: once
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=config.lr, betas=(0.9, 0.95))
    from transformers import get_cosine_schedule_with_warmup

    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup, config.steps)
    batches = Batches(train, config.batch_size, config.seed)
    log_path = phase_dir / "log.jsonl"
    if checkpoint is not None:
        state = torch.load(checkpoint / "trainer_state.pt", weights_only=True, map_location="cpu")
        meta = json.loads((checkpoint / "meta.json").read_text())
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        batches.load_state_dict(meta["data"])
        step, history = meta["step"], meta["history"]
        set_rng_state(state["rng"])  # last: everything above may draw random numbers
        log.info("resuming %s from step %d", phase_dir, step)
    else:
        from transformers import set_seed

        set_seed(config.seed)
        step, history = 0, [{"step": 0, **evaluate(student, teacher, heldout, opts, config,
                                                      device, autocast)}]
    log_path.write_text("".join(json.dumps(record) + "\n" for record in history))
    saved_step = step if checkpoint is not None else None
    start_step = step

    memory = PeakMemory(device).start()
    bar = tqdm(total=config.steps, initial=step, desc=name, unit="step",
               disable=not config.progress, dynamic_ncols=True)
    postfix = {}
    with open(log_path, "a") as log_file:
        while step < config.steps:
            if stop.signum is not None or step - start_step == max_steps:
                break  # a signal, or --stop-after: checkpoint below and return
            t0 = time.perf_counter()
            micro_batches = [next(batches) for _ in range(config.grad_accum)]
            n_targets = sum(count_targets(b) for b in micro_batches)
            totals = torch.zeros(3, device=device)  # summed loss, ce, kd of this step
            for batch in micro_batches:
                with autocast:
                    loss, ce, kd = batch_loss(student, train_teacher, batch, opts, config.backend,
                                              device)
                # Sum-reduced losses over the whole step's targets: accumulation == one big batch.
                (loss / n_targets).backward()
                totals += torch.stack([loss.detach(), ce, kd])
            grad_norm = (torch.nn.utils.clip_grad_norm_(params, config.clip)
                         if config.clip is not None else None)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

            loss_v, ce_v, kd_v = (totals / n_targets).tolist()  # host sync, once per step
            seconds = time.perf_counter() - t0
            record = {"step": step, "loss": loss_v, "ce": ce_v,
                      "kd": kd_v if train_teacher is not None else None, "lr": lr,
                      "grad_norm": None if grad_norm is None else float(grad_norm),
                      "tokens": n_targets, "seconds": seconds, "tokens_per_s": n_targets / seconds}
            postfix.update(loss=f"{loss_v:.3f}", tok_s=f"{n_targets / seconds:,.0f}")
            if step % config.eval_every == 0 or step == config.steps:
                record.update(evaluate(student, teacher, heldout, opts, config, device, autocast))
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
        _export_model(checkpoint, student_dir)
    else:
        status, student_dir = ("interrupted" if stop.signum is not None else "stopped"), None
        log.info("%s: stopped at step %d/%d; checkpoint %s", phase_dir, step, config.steps,
                 checkpoint)
    return PhaseResult(status, step, step - start_step, history, checkpoint, student_dir,
                       peak_memory)


# ----------------------------------------------------------------------------------------------
# A run: distillation, then the hard-label baseline with the same budget, then the report.


def _check_run_dir(config: DistillConfig) -> Path:
    """A new run needs a directory without a run; a resumed one, the run's own config."""
    run_dir = Path(config.out)
    if config.resume:
        saved = DistillConfig.load(run_dir)
        differing = [f.name for f in dataclasses.fields(DistillConfig)
                     if f.name not in RUNTIME_FIELDS
                     and getattr(saved, f.name) != getattr(config, f.name)]
        if differing:
            raise ValueError(f"resume: the config differs from {run_dir / 'config.json'} in "
                             f"{differing}; an exact resume needs the run's own config "
                             "(DistillConfig.load(run_dir))")
    elif (run_dir / "config.json").exists():
        raise ValueError(f"out: {run_dir} already holds a run (config.json); resume it "
                         f"(--resume {run_dir}) or choose another output directory")
    return run_dir


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
    """
    started = time.perf_counter()
    run_dir = _check_run_dir(config)
    device = resolve_device(config.device)
    tokenizer_source = config.tokenizer or config.teacher or config.student
    tokenizer = load_tokenizer(tokenizer_source)
    check_tokenizers(tokenizer_source, tokenizer, config.student)
    if config.teacher_cache is not None:  # offline: no teacher, the cache's sequences
        train, heldout, _ = open_for_run(config, tokenizer)
    else:
        train, heldout = load_blocks(config.data, tokenizer, config.seq_len,
                                     config.eval_fraction)
    heldout = heldout.select(torch.arange(min(len(heldout), config.eval_sequences)))
    teacher = (load_teacher(config, device)
               if config.teacher is not None and config.teacher_cache is None else None)
    if teacher is not None:
        check_vocab(tokenizer, teacher, "teacher")
    log.info("data: %d training and %d held-out sequences of %d tokens", len(train), len(heldout),
             config.seq_len)
    if not config.resume:  # only now: a start that fails on its inputs leaves no run behind
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir)

    baseline = None
    budget = config.stop_after
    with StopSignals() as stop:
        distilled = train_phase("distill" if teacher is not None or config.teacher_cache
                                else "hard-label", config,
                                run_dir, teacher, tokenizer, train, heldout, device, stop, budget)
        if config.baseline and distilled.status == "completed":
            if budget is not None:
                budget -= distilled.steps_run
            hard = dataclasses.replace(config, ce_weight=1.0, kd_weight=0.0)
            if budget is None or budget > 0:
                baseline = train_phase("baseline", hard, run_dir / "baseline", teacher,
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
    if status == "completed" and config.report:
        from fastkd.report import write_report

        results["report"] = write_report(config, run_dir, teacher, heldout, device, results)
    results["seconds"] = time.perf_counter() - started
    return results
