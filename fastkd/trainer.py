"""The distillation trainer: a Hugging Face teacher distils into a student through the fused loss.

`run_distillation` runs a whole run: it checks the config, the run directory and every input
path (`check_inputs`, before anything loads), loads the tokenizer, the data and the teacher,
trains the distilled student, then (baseline=True) the hard-label baseline with the same budget,
and writes the report. The pieces it runs, top to bottom:

    fastkd/config.py      DistillConfig: the run's settings, defaults and validation
    fastkd/store.py       the data's token store, prepared once and memory-mapped (fastkd/data.py:
                          rows and batches; fastkd/cache.py: from a teacher cache)
    fastkd/batch_loss.py  the loss on one batch: the student's forward and the fused loss
    fastkd/loop.py        one phase: the training loop, evaluation, stop signals
    fastkd/checkpoint.py  checkpoints (atomic, fastkd/fsio.py) and RNG state: exact resume
    fastkd/report.py      the trade-off report

Under torchrun the same loop runs on every rank (fastkd/distributed.py: FSDP2 or DDP, DCP shards).

The student's loss never sees full logits: the fused loss takes the base model's last hidden states
and the LM head's weight, `(B, L-1, D) x (V, D)`, and streams over the vocabulary. Run directory:

    RUN_DIR/fastkd-run.json              the marker of a run directory (fastkd.config.RUN_MARKER)
    RUN_DIR/.fastkd.lock                 held by the process running the run (fastkd.fsio.locked)
    RUN_DIR/config.json                  the DistillConfig (what `--resume RUN_DIR` reads)
    RUN_DIR/checkpoints/step-NNNNNNNN/   the two newest: model/ (HF, safetensors; LoRA: the
                                         adapter), trainer_state.pt, meta.json with checksums
                                         (under torchrun: dcp/ shards and rng-RANK.pt, no model/)
    RUN_DIR/student/                     the distilled student, HF format (LoRA: merged)
    RUN_DIR/adapter/                     LoRA only: the adapter, PEFT format
    RUN_DIR/log.jsonl                    one record per step (loss, lr, tokens/s, evaluations)
    RUN_DIR/tensorboard/                 --report-to tensorboard: the same records as scalars
    RUN_DIR/baseline/...                 the same for the hard-label baseline (--baseline)
    RUN_DIR/int8/model.safetensors       the distilled student, int8 dynamic
    RUN_DIR/report.md, report.json, loss_curve.png
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastkd import distributed, fsio
from fastkd.batch_loss import TeacherForward
from fastkd.cache import CachedRows, TeacherCache, sparse_tail
from fastkd.checkpoint import latest_checkpoint
from fastkd.config import RUN_MARKER, DistillConfig, check_run_dir, mark_run_dir, started
from fastkd.data import Blocks, DiskRows
from fastkd.loop import PhaseResult, StopSignals, train_phase
from fastkd.models import (
    LMHead,
    check_model_source,
    check_packing,
    check_tokenizers,
    check_vocab,
    load_teacher,
    load_tokenizer,
)
from fastkd.readers import expand_data
from fastkd.run_teachers import Teachers, open_caches, teacher_rows, write_teachers_report
from fastkd.store import StoreOptions, load_blocks

log = logging.getLogger("fastkd")


def run_distillation(config: DistillConfig) -> dict:
    """Run (or resume) a distillation.

    Under torchrun (WORLD_SIZE > 1) every rank calls this: it joins the process group, trains in
    step with the others, and leaves the group (barrier, then destroy) before returning; rank 0
    then writes the report alone.

    Args:
        config: the run (`DistillConfig`; resume=True continues the run in config.out).

    Returns:
        a dict: "status" ("completed" | "stopped" | "interrupted"), "signal" (the signal number
        or None), "run_dir", "distill" / "baseline" (phase summaries: status, step, steps_run,
        train_seconds, tokens, student_dir, checkpoint, final held-out eval_ce / eval_ppl /
        eval_kd), "history" / "baseline_history" (per-step records), "report" (paths and metric
        rows, when written), "seconds" (wall time of this call).
    """
    begun = time.perf_counter()
    run_dir = check_run_dir(config)
    if config.resume and run_complete(config):
        return completed_results(config, begun)
    check_inputs(config)  # before anything loads: a bad path fails in seconds, writing nothing
    config = with_threads(config)
    with contextlib.ExitStack() as held:  # the run directory and the threads, up to the report
        with distributed.session(config.device, config.dist_timeout) as device:
            held.enter_context(claim_run_dir(config))
            held.enter_context(torch_threads(config.threads))
            inputs = _load_inputs(config, run_dir, device)
            results = _run_phases(inputs, run_dir, device)
        # the process group is gone: rank 0 writes the report alone
        if results["status"] == "completed" and config.report and distributed.is_main():
            results["report"] = _write_report(inputs, run_dir, device, results)
    results["seconds"] = time.perf_counter() - begun
    return results


def with_threads(config: DistillConfig) -> DistillConfig:
    """The config with its CPU thread count: as given, else a resumed run's recorded one, else
    torch's default now (recorded in config.json when the run starts)."""
    if config.threads is not None:
        return config
    saved = DistillConfig.load(config.out).threads if config.resume else None
    return dataclasses.replace(config, threads=saved or torch.get_num_threads())


@contextlib.contextmanager
def torch_threads(threads: int):
    """torch runs on `threads` CPU threads inside the block, then as it was (run_distillation
    may be called in-process: tests, notebooks, the demo)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def claim_run_dir(config: DistillConfig):
    """Rank 0 holds the run directory's lock for the block (a second copy of the command is
    refused, naming this one's pid) and, under it, checks the directory again (another process
    may have started a run there since `check_run_dir`) and marks it (`mark_run_dir`). A run
    that fails before its first step takes back what this wrote: a new directory, or the marker
    it put into an empty one. Every rank raises rank 0's refusal."""
    run_dir = Path(config.out)
    with contextlib.ExitStack() as lock:
        failure, created, marked = None, False, False
        if distributed.is_main():
            try:
                created, marked = _claim(config, lock)
            except (ValueError, OSError) as err:
                failure = err
        distributed.raise_main_refusal(failure)
        try:
            yield
        except BaseException:
            if distributed.is_main() and not started(run_dir):
                _unclaim(run_dir, created, marked)
            raise


def _claim(config: DistillConfig, lock: contextlib.ExitStack) -> tuple[bool, bool]:
    """Rank 0's part of claim_run_dir: (whether it created the directory, marked it)."""
    run_dir = Path(config.out)
    try:
        run_dir.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    lock.enter_context(fsio.locked(run_dir / fsio.LOCK, f"run directory {run_dir}"))
    try:
        check_run_dir(config)
        return created, mark_run_dir(run_dir)
    except BaseException:
        if created:
            _unclaim(run_dir, created, False)
        raise


def _unclaim(run_dir: Path, created: bool, marked: bool) -> None:
    """Take back what a start that failed before its first step wrote (claim_run_dir)."""
    if marked or created:
        for name in (RUN_MARKER, "config.json"):
            (run_dir / name).unlink(missing_ok=True)
    if created:
        (run_dir / fsio.LOCK).unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: something else is there now
            run_dir.rmdir()


def run_complete(config: DistillConfig) -> bool:
    """Whether the run in config.out has finished: its students exported and (config.report)
    its report written. A resume then changes nothing (`completed_results`)."""
    run_dir = Path(config.out)
    phases = [run_dir] + ([run_dir / "baseline"] if config.baseline else [])
    return all((phase / "student").is_dir() for phase in phases) and (
        not config.report or (run_dir / "report.json").is_file())


def completed_results(config: DistillConfig, begun: float) -> dict:
    """run_distillation's results for a finished run, read from its files (nothing is run,
    measured or written), saying so and how to train further from its student."""
    run_dir = Path(config.out)
    log.info("%s: the run is complete (%d steps%s%s): nothing to resume, nothing changed. To "
             "train its student further, start a new run from it: fastkd distill --student %s "
             "--out NEW_RUN_DIR ...", run_dir, config.steps,
             ", the baseline" if config.baseline else "",
             ", the report" if config.report else "", run_dir / "student")
    phases = {"distill": run_dir, "baseline": run_dir / "baseline" if config.baseline else None}
    results = {"status": "completed", "signal": None, "run_dir": str(run_dir), "report": None,
               "complete_before": True}
    for name, phase_dir in phases.items():
        history = None if phase_dir is None else [
            json.loads(line) for line in (phase_dir / "log.jsonl").read_text().splitlines()]
        results[name] = None if phase_dir is None else _phase_summary(PhaseResult(
            "completed", config.steps, 0, history, latest_checkpoint(phase_dir),
            phase_dir / "student"))
        results["history" if name == "distill" else "baseline_history"] = history
    if config.report:
        rows = json.loads((run_dir / "report.json").read_text())["rows"]
        results["report"] = {"md": str(run_dir / "report.md"),
                             "json": str(run_dir / "report.json"),
                             "png": str(run_dir / "loss_curve.png"), "rows": rows}
    results["seconds"] = time.perf_counter() - begun
    return results


def check_inputs(config: DistillConfig) -> None:
    """Every path the run reads or writes, and the optional packages it needs, checked without
    loading anything: the output can be written, the models and tokenizer exist (local
    directories with their files, or hub ids the Hub or the offline cache has), the data files
    and the teacher cache exist (data: every file, directory and glob pattern names some)."""
    fsio.check_writable(config.out, "out")
    if config.teacher is not None and config.teacher_cache is None:
        check_model_source(config.teacher, "teacher")
    for name, source in _online(config).items():
        check_model_source(source, f"teacher {name!r}")
    check_model_source(config.student, "student")
    tokenizer = tokenizer_source(config)
    if Path(tokenizer).is_dir() or tokenizer not in (config.teacher, config.student):
        check_model_source(tokenizer, "tokenizer", files="tokenizer")
    expand_data(config.data)
    caches = {"teacher_cache": config.teacher_cache} if config.teacher_cache else {
        f"teacher cache {name!r}": d for name, d in (config.teacher_caches or {}).items()}
    for what, directory in caches.items():
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"{what}: no such directory: {directory}")
    if config.report_to == "tensorboard":
        require("tensorboard", "--report-to tensorboard", "tensorboard")
    if config.lora_r is not None:
        require("peft", "LoRA (--lora-r)", "lora")


def tokenizer_source(config: DistillConfig) -> str:
    """The run's tokenizer: --tokenizer, else the (first) teacher model's, else the student's."""
    return config.tokenizer or config.teacher or next(iter(_online(config).values()),
                                                      config.student)


def _online(config: DistillConfig) -> dict[str, str]:
    """Several teachers: {name: model} of the resident ones (a name with a cache is cached)."""
    return {name: source for name, source in (config.teachers or {}).items()
            if name not in (config.teacher_caches or {})}


def require(module: str, feature: str, extra: str) -> None:
    """An optional dependency must be installed (found, not imported): else say which extra
    installs it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(f"{feature} needs the {module} package, which is not installed: "
                         f"pip install 'fastkd[{extra}]' (or pip install {module})")


@dataclass
class _Inputs:
    """What a run loads once, before its phases."""

    config: DistillConfig  # its settings resolved: a teacher cache's tail (`sparse_tail`)
    tokenizer: object
    train: DiskRows  # the training rows, on disk: a token store's, or a teacher cache's
    heldout: Blocks  # the held-out rows evaluation and the report use, in memory
    teacher: LMHead | None  # the teacher, whole; None when it is sharded or absent
    # its forward in the loop, wrapped (FSDP) or replicated; several teachers: all of them
    teacher_module: TeacherForward | Teachers | None


def _load_inputs(config: DistillConfig, run_dir: Path, device: torch.device) -> _Inputs:
    """The tokenizer, the data and the teacher, checked; then (a new run) config.json written."""
    world = distributed.world_size()
    if config.batch_size % world:
        raise ValueError(f"batch_size={config.batch_size} is the global number of sequences per "
                         f"micro-batch: it must split evenly across the {world} processes")
    source = tokenizer_source(config)
    tokenizer = load_tokenizer(source)
    check_tokenizers(source, tokenizer, config.student)
    train, heldout, tail = _load_data(config, tokenizer)
    caches = {}
    if config.teacher_names:  # several: each token's teacher, the caches' targets beside
        caches = open_caches(config, tokenizer, train, heldout)
        train, heldout = teacher_rows(config, train, heldout, caches)
    heldout = heldout.take(torch.arange(min(len(heldout), config.eval_sequences)))
    if config.teacher_names:
        teacher, teacher_module = None, _load_teachers(config, tokenizer, device, train.packed,
                                                       caches)
    else:
        teacher, teacher_module = _load_teacher_module(config, tokenizer, device,
                                                       packed=train.packed)
    log.info("data: %d training and %d held-out sequences of %d tokens", len(train), len(heldout),
             config.seq_len)
    _warn_small_heldout(heldout)
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes to it
    if not config.resume and distributed.is_main():
        # Only now: a start that fails on its inputs leaves no run behind (claim_run_dir).
        config.save(run_dir)
    # config.json keeps the settings as given (a resume resolves them again); the run uses them
    # resolved, and the report records them so
    resolved = config if tail is None else dataclasses.replace(config, cache_tail=tail)
    return _Inputs(resolved, tokenizer, train, heldout, teacher, teacher_module)


def _load_data(config: DistillConfig, tokenizer) -> tuple[DiskRows, DiskRows, str | None]:
    """(train, held-out, the sparse loss's tail) of the run, on disk: the data's token store
    (fastkd.store: found or prepared, by rank 0 under torchrun, the others waiting), mapped and
    split, and no tail; or a teacher cache's sequences and the tail it trains with."""
    if config.teacher_cache is not None:  # offline: no teacher, the cache's sequences
        return _open_cache(config, tokenizer)
    main = distributed.is_main()
    train, heldout = load_blocks(config.data, tokenizer, config.seq_len, config.eval_fraction,
                                 packing=config.packing, utf8_errors=config.utf8_errors,
                                 options=StoreOptions(config.data_cache, config.num_proc,
                                                      config.progress and main, prepare=main),
                                 routes=config.data_teachers)
    return train, heldout, None


def _open_cache(config: DistillConfig, tokenizer) -> tuple[CachedRows, CachedRows, str]:
    """(train, held-out, tail) of config.teacher_cache: the cache checked against the run's
    tokenizer, seq_len, temperature, held-out fraction, data, packing, utf8_errors, student (the
    cache's largest id) and teacher (if named: the cache's own); the tail config.cache_tail, else
    the cache's own (`fastkd.cache.sparse_tail`)."""
    cache = TeacherCache(config.teacher_cache)
    cache.check_run(tokenizer, config.seq_len, config.temperature, config.eval_fraction,
                    config.data)
    cache.check_options(packing=config.packing, utf8_errors=config.utf8_errors)
    cache.check_student(config.student)
    if config.teacher is not None:
        cache.check_teacher(config.teacher)
    tail = sparse_tail(config.cache_tail, cache.mode, config.divergence)
    return cache.rows("train"), cache.rows("heldout"), tail


def _warn_small_heldout(heldout: Blocks) -> None:
    from fastkd.report import small_heldout

    warning = small_heldout(heldout)
    if warning and distributed.is_main():
        log.warning(warning)


def _load_teacher_module(config: DistillConfig, tokenizer, device: torch.device, packed: bool
                         ) -> tuple[LMHead | None, TeacherForward | None]:
    """(the teacher, whole, or None when it is sharded or absent; its forward for the loop,
    wrapped for FSDP or replicated). No teacher is loaded for hard labels or from a cache.
    packed: the data packs examples, which the teacher's attention must keep apart."""
    if config.teacher is None or config.teacher_cache is not None:
        return None, None
    # A sharded teacher is loaded on the CPU: FSDP moves each rank's shards to the device.
    shard_teacher = distributed.is_distributed() and config.teacher_placement == "shard"
    teacher = load_teacher(config.teacher, config.teacher_dtype,
                           torch.device("cpu") if shard_teacher else device)
    check_vocab(tokenizer, teacher, "teacher")
    if packed:
        check_packing(teacher.model, "teacher")
    teacher_module = distributed.wrap_teacher(TeacherForward(teacher), config.teacher_placement,
                                              device)
    return (None if shard_teacher else teacher), teacher_module  # sharded: its LMHead holds shards


def _load_teachers(config: DistillConfig, tokenizer, device: torch.device, packed: bool,
                   caches: dict) -> Teachers:
    """Several teachers: the resident ones loaded, checked and wrapped as the one teacher is
    (`_load_teacher_module`), the cached ones' tails."""
    modules = {}
    for k, name in enumerate(config.teacher_names):
        if k in caches:
            continue
        one = dataclasses.replace(config, teachers=None, teacher_caches=None,
                                  data_teachers=None, teacher_weights=None,
                                  teacher=config.teachers[name])
        modules[k] = _load_teacher_module(one, tokenizer, device, packed)[1]
    weights = config.teacher_weights
    return Teachers(modules, {k: tail for k, (_, tail) in caches.items()}, config.teacher_names,
                    None if weights is None else tuple(weights[n] for n in config.teacher_names))


def _run_phases(inputs: _Inputs, run_dir: Path, device: torch.device) -> dict:
    """The distillation, then the baseline: the results (run_distillation's, without the report
    and the time)."""
    config, teacher = inputs.config, inputs.teacher_module
    phase_inputs = (inputs.tokenizer, inputs.train, inputs.heldout, device)
    baseline = None
    budget = config.stop_after
    with StopSignals() as stop:
        distilled = train_phase("distill" if teacher is not None or config.teacher_cache
                                else "hard-label", config, run_dir, teacher, *phase_inputs, stop,
                                budget)
        if config.baseline and distilled.status == "completed":
            if budget is not None:
                budget -= distilled.steps_run
            hard = dataclasses.replace(config, ce_weight=1.0, kd_weight=0.0)
            if budget is None or budget > 0:
                baseline = train_phase("baseline", hard, run_dir / "baseline", teacher,
                                       *phase_inputs, stop, budget)
    phases = [distilled] + ([baseline] if config.baseline else [])
    if all(p is not None and p.status == "completed" for p in phases):
        status = "completed"
    else:
        status = "interrupted" if stop.signum is not None else "stopped"
    return {"status": status, "signal": stop.signum, "run_dir": str(run_dir),
            "distill": _phase_summary(distilled), "baseline": _phase_summary(baseline),
            "history": distilled.history,
            "baseline_history": baseline.history if baseline is not None else None,
            "report": None}


def _write_report(inputs: _Inputs, run_dir: Path, device: torch.device, results: dict) -> dict:
    """The report, on rank 0 alone (fastkd.report)."""
    from fastkd.report import write_report

    config, teacher = inputs.config, inputs.teacher
    if config.teacher_names:
        return write_teachers_report(config, run_dir, results)
    if teacher is None and config.teacher_cache is None:  # it was sharded: rank 0 loads it
        teacher = load_teacher(config.teacher, config.teacher_dtype, device)  # whole, alone
    return write_report(config, run_dir, teacher, inputs.heldout, device, results)


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
