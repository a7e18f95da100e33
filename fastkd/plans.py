"""The runs of `fastkd cache-teacher` (`CachePlan`) and `fastkd cache-import` (`ImportPlan`): what
each is told, checked when it is made. Free of torch, as fastkd.config is for `fastkd distill`, so
that the commands' help (which prints these defaults) and argument errors answer at once."""

from __future__ import annotations

from dataclasses import dataclass

from fastkd.checks import check_num_proc, check_seq_len, choice, path_list, positive, positive_int
from fastkd.readers import UTF8_ERRORS

MODES = ("topk", "sample")  # cache-teacher: the teacher's top-k ids, or ids drawn from it
LAYOUTS = ("compact", "fixed")  # fastkd.cache_format: format /2's coded rows, or /1's k slots
DTYPE_NAMES = ("float16", "bfloat16")  # the fixed layout's stored log-probabilities
# A teacher's weights (distill and cache-teacher; fastkd.models.load_teacher): auto is bf16 on CUDA
TEACHER_DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_storage(layout: str, dtype: str, logprob_step: float) -> float:
    """How a cache stores its targets (both plans): the layout, the fixed layout's dtype, and the
    compact layout's log-probability grid, returned as a float (its range: fastkd.codec)."""
    choice("layout", layout, LAYOUTS)
    choice("dtype", dtype, DTYPE_NAMES)
    if isinstance(logprob_step, bool) or not (isinstance(logprob_step, (int, float))
                                              and 2.0 ** -12 <= logprob_step <= 1.0):
        raise ValueError(f"logprob_step must lie in [2^-12, 1] nats, got {logprob_step!r}")
    return float(logprob_step)


@dataclass
class CachePlan:
    """One `fastkd cache-teacher` run."""

    teacher: str
    data: list[str]
    out: str
    mode: str = "topk"
    k: int = 64
    samples: int | None = None  # sample mode: draws per position (default k)
    temperature: float = 1.0
    seq_len: int = 256
    batch_size: int = 8
    tokenizer: str | None = None  # default: the teacher's
    eval_fraction: float = 0.05
    layout: str = "compact"  # or "fixed": k int32 ids + k float16/bfloat16 a position (format /1)
    logprob_step: float = 0.125  # compact top-k: the log-probability grid, nats
    dtype: str = "float16"  # fixed layout: the stored log-probabilities
    seed: int = 0
    shard_sequences: int = 1024
    device: str | None = None
    teacher_dtype: str = "auto"
    dist_timeout: float = 600.0  # under torchrun: seconds a collective waits for the others
    progress: bool = True
    packing: bool = True  # as DistillConfig's (fastkd.store.load_blocks)
    utf8_errors: str = "strict"
    data_cache: str | None = None  # where the data's token store lives (fastkd.store)
    num_proc: int | None = None  # processes that prepare it (fastkd.prepare)

    def __post_init__(self) -> None:
        self.data = path_list("data", self.data, "data file")
        choice("mode", self.mode, MODES)
        for name in ("k", "batch_size", "shard_sequences"):
            positive_int(name, getattr(self, name))
        if self.mode == "sample":
            self.samples = self.k if self.samples is None else self.samples
            if isinstance(self.samples, bool) or not isinstance(self.samples, int) or \
                    not 1 <= self.samples <= self.k:
                raise ValueError(f"samples must be an int in [1, k={self.k}] (each distinct id "
                                 f"drawn needs a slot), got {self.samples!r}")
        elif self.samples is not None:
            raise ValueError("samples applies to mode='sample' only")
        self.temperature = positive("temperature", self.temperature)
        check_seq_len(self.seq_len)
        self.logprob_step = check_storage(self.layout, self.dtype, self.logprob_step)
        choice("teacher_dtype", self.teacher_dtype, TEACHER_DTYPES)
        positive("dist_timeout", self.dist_timeout)
        choice("utf8_errors", self.utf8_errors, UTF8_ERRORS)
        check_num_proc(self.num_proc)


@dataclass
class ImportPlan:
    """One `fastkd cache-import` run."""

    logprobs: list[str]  # .jsonl files (the schema above)
    tokenizer: str  # the student's tokenizer: ids must lie in [0, len(tokenizer))
    out: str
    teacher: str = "imported"  # what produced the log-probabilities (recorded)
    temperature: float = 1.0  # the temperature the log-probabilities are at
    seq_len: int | None = None  # default: the longest sequence
    eval_fraction: float = 0.05
    layout: str = "compact"
    logprob_step: float = 0.125
    dtype: str = "float16"
    shard_sequences: int = 1024
    progress: bool = True

    def __post_init__(self) -> None:
        self.logprobs = path_list("logprobs", self.logprobs, ".jsonl file")
        self.temperature = positive("temperature", self.temperature)
        if self.seq_len is not None:
            check_seq_len(self.seq_len)
        self.logprob_step = check_storage(self.layout, self.dtype, self.logprob_step)
        positive_int("shard_sequences", self.shard_sequences)
