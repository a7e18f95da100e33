"""The run's config: `DistillConfig`, its defaults and its validation, in one place.

A run is one DistillConfig: the models, the data, the loss (`loss_options()`, a
`fastkd.DistillOptions`), the optimisation, precision and parallelism, the bookkeeping. It is
checked when built (`__post_init__`, with fastkd.checks: a bad value raises a ValueError naming
the field, a value of the wrong type a TypeError) and saved as RUN_DIR/config.json when a run
starts; `--resume RUN_DIR` reads it back (`DistillConfig.load`), and `check_run_dir` refuses a new
run in a used directory or a resume under another config. A run directory carries RUN_MARKER, a
file only fastkd writes (`mark_run_dir`): a new run goes only into a new or empty directory, or
one of fastkd's own that no run has started in, so that a model directory (`--out` = `--student`)
is never written over.

The house, top to bottom: config (here) -> data (fastkd.data, fastkd.cache) -> the loss on one
batch (fastkd.batch_loss) -> the loop (fastkd.loop) -> checkpoints (fastkd.checkpoint) -> the
report (fastkd.report); fastkd.trainer runs them (`run_distillation`).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

from fastkd import fsio, teacher_set
from fastkd.checks import check_num_proc, check_seq_len, choice, path_list, positive, positive_int
from fastkd.options import BACKENDS, TRAINER_OPTIONS, DistillOptions
from fastkd.plans import TEACHER_DTYPES
from fastkd.readers import UTF8_ERRORS

# This module imports no torch: `fastkd --help` and argument errors need only the config.
PARALLEL = ("fsdp", "ddp")  # the student under torchrun (fastkd.distributed)
TEACHER_PLACEMENTS = ("shard", "replicate")  # the teacher under torchrun
REPORT_TO = ("none", "tensorboard")
# Fields that say where and how this invocation runs, not what the run is: resume may change them.
RUNTIME_FIELDS = ("out", "resume", "stop_after", "progress", "device", "teacher_placement",
                  "dist_timeout", "report_to", "data_cache", "num_proc")
# Fields that name local files or directories: stored absolute (a run resumes from any cwd).
PATH_FIELDS = ("teacher", "student", "tokenizer", "data", "out", "teacher_cache", "data_cache",
               "teachers", "teacher_caches")
RUN_MARKER = "fastkd-run.json"  # in every run directory; only fastkd writes it (mark_run_dir)
RUN_FORMAT = "fastkd-run/1"


@dataclass
class DistillConfig:
    """One run. `teacher=None` trains the student on hard labels only (needs kd_weight=0).

    Paths are strings so the config round-trips through RUN_DIR/config.json. A model or data path
    that exists is made absolute when the config is built (a hub id, which names no local path,
    stays as it is), so `--resume RUN_DIR` works from any directory.
    """

    teacher: str | None  # HF model dir or hub id (None with teacher_cache: no teacher loaded)
    student: str  # HF model dir or hub id: the initial student
    data: list[str]  # data files, directories, glob patterns (fastkd.readers)
    out: str  # the run directory
    tokenizer: str | None = None  # default: the teacher's (else the student's)
    # The loss: fastkd.DistillOptions' fields a trainer's user sets (options.TRAINER_OPTIONS; the
    # trainer sets the rest), with the trainer's defaults.
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
    warmup: int | None = None  # None: 10% of steps
    clip: float | None = 1.0
    seed: int = 0
    # Data: the held-out split, and how much of it evaluation and the report use.
    eval_fraction: float = 0.05
    eval_sequences: int = 64
    # Chat and prompt-completion examples: several a sequence, kept apart by position_ids, or
    # (packing=False) one a padded sequence. utf8_errors="replace": U+FFFD for undecodable bytes.
    packing: bool = True
    utf8_errors: str = "strict"
    # The token store (fastkd.store): where it lives (None: $FASTKD_CACHE/data, else
    # ~/.cache/fastkd/data), and the processes that prepare it (None: fastkd.prepare's choice).
    data_cache: str | None = None
    num_proc: int | None = None
    # Precision: bf16=None autocasts to bf16 on CUDA only; teacher_dtype "auto" is bf16 on CUDA.
    device: str | None = None
    # CPU threads (torch.set_num_threads): None takes torch's default at the start (one a core, or
    # OMP_NUM_THREADS) and records it; a resume runs with the recorded count, since CPU GEMMs
    # round differently under another one.
    threads: int | None = None
    bf16: bool | None = None
    teacher_dtype: str = "auto"
    backend: str = "auto"
    # Several processes (torchrun, WORLD_SIZE > 1): batch_size is then the global number of
    # sequences per micro-batch, split evenly across the ranks.
    parallel: str = "fsdp"  # the student: "fsdp" (FSDP2 fully_shard) or "ddp"
    teacher_placement: str = "shard"  # the teacher: "shard" (FSDP2, forward-only) or "replicate"
    dist_timeout: float = 600.0  # seconds a collective waits for the other ranks before failing
    # Memory: recompute each decoder layer's activations in backward (HF gradient checkpointing).
    gradient_checkpointing: bool = False
    # LoRA (PEFT): lora_r None trains every weight; else rank-r adapters on lora_targets (module
    # names; None: every linear layer, the output layer included) scaled by lora_alpha / r
    # (lora_alpha None: 2r), the base weights frozen.
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    # Bookkeeping.
    eval_every: int = 50
    save_every: int = 100
    baseline: bool = False  # also train a hard-label-only student with the same budget
    report: bool = True
    report_to: str = "none"  # "tensorboard": the step records as TensorBoard scalars too
    resume: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in this call
    progress: bool = True
    # Offline distillation (fastkd.cache): train from a `fastkd cache-teacher` directory through
    # the sparse loss; cache_tail None: the cache's own (fastkd.cache.sparse_tail resolves it when
    # the run starts; config.json keeps None).
    teacher_cache: str | None = None
    cache_tail: str | None = None
    # Several teachers (fastkd.teacher_set): {name: model} and {name: cache dir} (a name in both:
    # that teacher's cache), and either each data path's teacher (None: its records name theirs)
    # or a mixture's weights {name: w}. One teacher, named or not, is `teacher` / `teacher_cache`.
    teachers: dict[str, str] | None = None
    teacher_caches: dict[str, str] | None = None
    data_teachers: list[str | None] | None = None
    teacher_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        self.data = path_list("data", self.data, "data file")
        self._resolve_teachers()
        self.data = [_absolute_data(path) for path in self.data]
        choice("utf8_errors", self.utf8_errors, UTF8_ERRORS)
        for name in ("teacher", "student", "tokenizer", "teacher_cache"):
            if getattr(self, name) is not None:
                setattr(self, name, _absolute(getattr(self, name)))
        for name in ("teachers", "teacher_caches"):
            if getattr(self, name) is not None:
                setattr(self, name, {k: _absolute(v) for k, v in getattr(self, name).items()})
        self.out = os.path.abspath(os.path.expanduser(self.out))
        if self.data_cache is not None:
            self.data_cache = os.path.abspath(os.path.expanduser(self.data_cache))
        self.loss_options()  # validates temperature, weights, divergence, beta, skew
        counts = ("steps", "batch_size", "grad_accum", "eval_every", "save_every", "eval_sequences")
        for name in counts + (("threads",) if self.threads is not None else ()):
            positive_int(name, getattr(self, name))
        check_seq_len(self.seq_len)
        check_num_proc(self.num_proc)
        if self.warmup is not None and not (isinstance(self.warmup, int)
                                            and 0 <= self.warmup <= self.steps):
            raise ValueError(f"warmup (--warmup) must be an int in [0, steps={self.steps}], got "
                             f"{self.warmup!r}; leave it out for 10% of the steps")
        positive("lr", self.lr)
        positive("clip", self.clip, optional=True)
        positive_int("stop_after", self.stop_after, optional=True)
        choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        choice("parallel", self.parallel, PARALLEL)
        choice("teacher_placement", self.teacher_placement, TEACHER_PLACEMENTS)
        positive("dist_timeout", self.dist_timeout)
        choice("backend", self.backend, BACKENDS)
        choice("report_to", self.report_to, REPORT_TO)
        positive_int("lora_r", self.lora_r, optional=True)
        if self.lora_r is None and (self.lora_alpha is not None or self.lora_targets is not None):
            raise ValueError("lora_alpha and lora_targets need lora_r (the adapters' rank)")
        positive("lora_alpha", self.lora_alpha, optional=True)
        if self.lora_targets is not None:
            if isinstance(self.lora_targets, str):
                self.lora_targets = [self.lora_targets]
            self.lora_targets = [str(name) for name in self.lora_targets]
            if not self.lora_targets:
                raise ValueError("lora_targets: name at least one module (or None for all "
                                 "linear layers)")
        if self.teacher is None and self.teacher_cache is None and not self.teacher_names and (
                self.kd_weight > 0 or self.baseline or self.report):
            raise ValueError("teacher=None trains on hard labels only: it needs kd_weight=0, "
                             "baseline=False and report=False")

    def _resolve_teachers(self) -> None:
        """The teachers by name (fastkd.teacher_set's rules): the data's routes split off, the
        mixture's weights checked; one teacher becomes `teacher` / `teacher_cache`."""
        online, cached = dict(self.teachers or {}), dict(self.teacher_caches or {})
        names = list(dict.fromkeys([*online, *cached]))
        if not names:
            if self.teacher_weights is not None or self.data_teachers is not None:
                raise ValueError("teacher_weights and data routes (--data FILE:NAME) need named "
                                 "teachers (--teacher NAME=PATH)")
            return
        if self.teacher is not None or self.teacher_cache is not None:
            raise ValueError("with named teachers, name each one (--teacher NAME=PATH, "
                             "--teacher-cache NAME=DIR)")
        routes = self.data_teachers
        if routes is None:
            self.data, routes = teacher_set.split_data(self.data, names)
        if len(names) == 1:  # one teacher: the single-teacher run, whatever its name
            if self.teacher_weights not in (None, {names[0]: 1.0}):
                raise ValueError(f"teacher_weights {self.teacher_weights}: one teacher "
                                 f"({names[0]!r}) takes weight 1")
            self.teacher, self.teacher_cache = online.get(names[0]), cached.get(names[0])
            self.teachers = self.teacher_caches = self.data_teachers = None
            self.teacher_weights = None
            return
        if self.teacher_weights is not None:
            if any(r is not None for r in routes):
                raise ValueError("--teacher-weights mixes the teachers on every token: drop the "
                                 "data routes (FILE:NAME)")
            self.teacher_weights = teacher_set.check_weights(
                dict(self.teacher_weights), [n for n in names if n not in cached], list(cached))
            self.data_teachers = None
        else:
            teacher_set.check_routable(self.data, routes)
            self.data_teachers = list(routes)

    @property
    def teacher_names(self) -> list[str]:
        """The teachers' names when there are several (in order: models, then caches)."""
        return list(dict.fromkeys([*(self.teachers or {}), *(self.teacher_caches or {})]))

    @property
    def warmup_steps(self) -> int:
        """Linear warmup steps: `warmup`, or 10% of the steps when it is None."""
        return self.steps // 10 if self.warmup is None else self.warmup

    def loss_options(self) -> DistillOptions:
        """The loss's options (the heads' softcaps and logit scales come later, from the models:
        `fastkd.models.with_heads`). Summed over tokens: the loop divides by the token count of
        the whole accumulated step."""
        return DistillOptions(**{name: getattr(self, name) for name in TRAINER_OPTIONS},
                              reduction="sum")

    def save(self, run_dir: Path) -> None:
        fsio.atomic_write_text(run_dir / "config.json",
                               json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: str | Path) -> DistillConfig:
        """The config of the run in run_dir (its config.json), less the call that wrote it:
        stop_after and resume are per call (a run stopped with --stop-after 2 and resumed does
        not stop again after 2 steps unless told to)."""
        path = Path(run_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no run to resume: {path} not found")
        try:
            saved = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is damaged (not valid JSON: {err}); the run's settings "
                             "cannot be read back") from err
        if not is_run_dir(Path(run_dir)):
            raise ValueError(f"{run_dir} is not a fastkd run directory (no {RUN_MARKER}); its "
                             "config.json is not a run's settings (a model's?)")
        return cls(**{**saved, "stop_after": None, "resume": False})


def _absolute(path: str | os.PathLike) -> str:
    """A path that exists, absolute; anything else (a hub id, a missing file) as typed."""
    path = str(path)
    local = os.path.expanduser(path)
    return os.path.abspath(local) if os.path.exists(local) else path


def _absolute_data(path: str | os.PathLike) -> str:
    """A data path as `_absolute` makes it, a glob pattern absolute too."""
    path = str(path)
    return os.path.abspath(os.path.expanduser(path)) if glob.has_magic(path) else _absolute(path)


def check_run_dir(config: DistillConfig) -> Path:
    """A new run needs a directory without a run; a resumed one, the run's own config."""
    run_dir = Path(config.out)
    if config.resume:
        saved = DistillConfig.load(run_dir)
        differing = [f.name for f in dataclasses.fields(DistillConfig)
                     if f.name not in RUNTIME_FIELDS
                     and not (f.name == "threads" and config.threads is None)  # the run's own
                     and getattr(saved, f.name) != getattr(config, f.name)]
        if differing:
            raise ValueError(f"resume: the config differs from {run_dir / 'config.json'} in "
                             f"{differing}; an exact resume needs the run's own config "
                             "(DistillConfig.load(run_dir))")
    elif (run_dir / "config.json").exists() and started(run_dir):
        raise ValueError(f"out: {run_dir} already holds a run (config.json); resume it "
                         f"(--resume {run_dir}) or choose another output directory")
    else:
        check_new_run_dir(run_dir)
    return run_dir


def check_new_run_dir(run_dir: Path) -> None:
    """A new run's directory: absent, empty (but for a lock file), or a fastkd run directory whose
    run never started (a start that failed before its first step). Anything else is refused,
    naming what it holds: nothing a user put there is overwritten."""
    if not run_dir.is_dir() or (run_dir / RUN_MARKER).is_file():
        return  # absent (or a file in the way: fsio.check_writable names it)
    held = sorted(set(os.listdir(run_dir)) - {fsio.LOCK})
    if held:
        shown = ", ".join(held[:6]) + (", ..." if len(held) > 6 else "")
        model = (" (its config.json is a model's, not a run's: --out must not be a model "
                 "directory such as --student)" if "config.json" in held else "")
        raise ValueError(f"out: {run_dir} is not empty and is not a fastkd run directory (no "
                         f"{RUN_MARKER}): it holds {shown}{model}; a new run goes into a new "
                         "or empty directory, so that nothing in it is overwritten: choose "
                         "another --out")


def is_run_dir(run_dir: Path) -> bool:
    """Whether run_dir is a fastkd run directory: its RUN_MARKER, or, for a run directory
    without one, a config.json with a log or a checkpoint."""
    return (run_dir / RUN_MARKER).is_file() or (
        (run_dir / "config.json").is_file() and started(run_dir))


def mark_run_dir(run_dir: Path) -> bool:
    """Make run_dir a run directory (created if missing): write RUN_MARKER unless it is there;
    returns whether it was written. Check it first (`check_run_dir`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if (run_dir / RUN_MARKER).is_file():
        return False
    fsio.atomic_write_text(run_dir / RUN_MARKER, json.dumps({"format": RUN_FORMAT}))
    return True


def started(run_dir: Path) -> bool:
    """Whether a run in run_dir reached its first step (its log or a checkpoint exists): a config
    left by a start that failed before it does not hold the directory."""
    return (run_dir / "log.jsonl").exists() or (run_dir / "checkpoints").exists()
