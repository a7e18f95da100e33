"""The command line's parsers: `build_parser` (the five subcommands and their options) and `parse`
(an unknown option answered with a "did you mean"). fastkd.cli runs the commands.

Nothing here imports torch: `--help` and argument errors answer at once. Every option's default
comes from the dataclass field it sets (DistillConfig for distill and prepare-data,
fastkd.plans.CachePlan for cache-teacher, fastkd.plans.ImportPlan for cache-import), and --help
prints it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

from fastkd.config import (
    PARALLEL,
    REPORT_TO,
    TEACHER_PLACEMENTS,
    DistillConfig,
)
from fastkd.options import BACKENDS, CHOICES, TRAINER_OPTIONS, DistillOptions
from fastkd.plans import DTYPE_NAMES, LAYOUTS, MODES, TEACHER_DTYPES, CachePlan, ImportPlan
from fastkd.readers import UTF8_ERRORS

# cache-teacher options whose defaults are the trainer's: a cache is made for `fastkd distill
# --teacher-cache`, which needs the cache's temperature, sequences and split to be its own.
SHARED_WITH_TRAINER = ("temperature", "seq_len", "eval_fraction", "packing", "utf8_errors")
DATA_HELP = ('.txt, .jsonl or .json ("text"; "messages" or ShareGPT "conversations": chat, '
             'only the assistant turns trained on; "prompt"/"completion": only the completion; '
             '"input_ids": pre-tokenized, with an optional target mask), .parquet or `datasets` '
             "save_to_disk directories with those columns, directories of such files, glob "
             "patterns (quoted)")
DATA_CACHE_HELP = ("where the data's token store (tokenized once, memory-mapped) lives; a "
                   "directory a team can share (default: $FASTKD_CACHE/data, else "
                   "~/.cache/fastkd/data)")
NUM_PROC_HELP = ("processes that tokenize when the token store is prepared, where the tokenizer "
                 "does not parallelise itself (chat templates, slow tokenizers) (default: every "
                 "core for 64 MiB of data or more, else 1)")
NO_PACKING_HELP = ("give each chat / prompt-completion example its own padded sequence (default: "
                   "several a sequence, kept apart by position_ids; needs sdpa, eager or flex "
                   "attention)")
UTF8_HELP = ("strict: refuse a data file that is not UTF-8 (naming the byte); replace: train on "
             "it with U+FFFD for undecodable bytes")


def field_defaults(cls) -> dict:
    """{field name: default} of a dataclass (fields without one left out)."""
    defaults = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return defaults


def cache_defaults() -> dict:
    """cache-teacher's defaults: CachePlan's, the ones it shares with the trainer from
    DistillConfig."""
    trainer = field_defaults(DistillConfig)
    return {**field_defaults(CachePlan), **{k: trainer[k] for k in SHARED_WITH_TRAINER}}


def import_defaults() -> dict:
    """cache-import's defaults, ImportPlan's."""
    return field_defaults(ImportPlan)


class _Help(argparse.HelpFormatter):
    """Appends "(default: X)" to each option's help, X read from its `defaults` (a dict, or a
    function returning one, called only when help is printed)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        source = getattr(action, "defaults", None)
        if source is None or "default:" in text:
            return text
        defaults = source() if callable(source) else source
        value = defaults.get(action.dest)
        if value is None or isinstance(value, bool):
            return text
        shown = " ".join(value) if isinstance(value, (list, tuple)) else value
        return f"{text} (default: {shown})"


def _option(group, flag: str, help: str, defaults=None, **kwargs) -> argparse.Action:
    """An option whose value, when given, becomes the dataclass field of the same name.

    Unset options stay out of the namespace (argparse.SUPPRESS), so a run gets the dataclass's
    defaults and `--resume` can tell which options were given; `defaults` (DistillConfig's when
    None) is where --help reads the default it prints.
    """
    dest = kwargs.pop("dest", flag.removeprefix("--").replace("-", "_"))
    action = group.add_argument(flag, dest=dest, help=help, default=argparse.SUPPRESS, **kwargs)
    action.defaults = field_defaults(DistillConfig) if defaults is None else defaults
    return action


def _data_options(option, note: str = "") -> None:
    """How the data become rows (distill, cache-teacher and prepare-data): option(flag, help,
    **kwargs) adds one."""
    option("--seq-len", "tokens per packed sequence" + note, type=int)
    option("--no-packing", NO_PACKING_HELP, dest="packing", action="store_false")
    option("--utf8-errors", UTF8_HELP, choices=UTF8_ERRORS)
    option("--data-cache", DATA_CACHE_HELP, metavar="DIR")
    option("--num-proc", NUM_PROC_HELP, type=int, metavar="N")


def _models_and_data(g) -> None:
    """distill's models, teachers (one or several) and data options."""
    _option(g, "--teacher", "teacher: HF model directory or hub id; several: NAME=DIR_OR_ID, "
            "repeated (docs/trainer.md, \"Several teachers\")", metavar="[NAME=]DIR_OR_ID",
            action="append")
    _option(g, "--student", "initial student: HF model directory or hub id", metavar="DIR_OR_ID")
    _option(g, "--data", DATA_HELP + "; FILE:NAME routes FILE's examples to teacher NAME (a "
            'record\'s "teacher" field routes that record)', nargs="+", metavar="FILE")
    _option(g, "--out", "run directory", metavar="RUN_DIR")
    _option(g, "--resume", "continue the run in RUN_DIR with its saved config", metavar="RUN_DIR")
    _option(g, "--tokenizer", "tokenizer (default: the teacher's)", metavar="DIR_OR_ID")
    _option(g, "--teacher-cache", "train from a `fastkd cache-teacher` directory: no teacher "
            "loaded, the sparse loss; the report measures KL on the cached held-out rows; "
            "several: NAME=CACHE_DIR, repeated", metavar="[NAME=]CACHE_DIR", action="append")
    _option(g, "--teacher-weights", "mix the named teachers on every token instead of routing "
            "examples: sum_k w_k D(p_k || q), weights summing to 1 (resident teachers, at most "
            "4)", metavar="NAME=W,NAME=W")
    # the sparse loss's tails (fastkd.reference.SPARSE_TAILS, named here: reference loads torch)
    _option(g, "--cache-tail", "the sparse loss's tail for --teacher-cache (default: ignore for "
            "sampled caches, bucket for top-k)", choices=("bucket", "renormalize", "ignore"))
    _data_options(functools.partial(_option, g))
    _option(g, "--eval-fraction", "fraction of the sequences held out", type=float)
    _option(g, "--eval-sequences", "held-out sequences used for evaluation and the report",
            type=int)


def _distill_parser(sub) -> None:
    p = sub.add_parser(
        "distill", help="distil a Hugging Face teacher into a student", formatter_class=_Help,
        description="Distil --teacher into --student on --data; writes checkpoints, the student "
                    "and a report under --out. `--resume RUN_DIR` continues a run exactly. "
                    "--baseline also trains the same student on hard labels with the same "
                    "budget, for the report's comparison (it doubles the training time).")
    _models_and_data(p.add_argument_group("models and data"))
    g = p.add_argument_group("loss")
    for name, text in TRAINER_OPTIONS.items():  # the DistillOptions fields a trainer's user sets
        kind = ({"choices": CHOICES[name]} if name in CHOICES
                else {"type": type(getattr(DistillOptions, name))})  # its default's type
        _option(g, "--" + name.replace("_", "-"), text, **kind)
    g = p.add_argument_group("optimisation")
    _option(g, "--steps", "optimizer steps", type=int)
    _option(g, "--batch-size", "sequences per micro-batch", type=int)
    _option(g, "--grad-accum", "micro-batches per optimizer step", type=int)
    _option(g, "--lr", "peak AdamW learning rate", type=float)
    _option(g, "--weight-decay", "AdamW weight decay (matrices only)", type=float)
    _option(g, "--warmup", "linear warmup steps before the cosine decay (default: 10%% of "
            "--steps)", type=int)
    _option(g, "--clip", "gradient-norm clipping threshold, 0 for none", type=float)
    _option(g, "--seed", "random seed", type=int)
    g = p.add_argument_group("precision and device")
    _option(g, "--device", "torch device (default: cuda if available, else cpu)")
    _option(g, "--threads", "CPU threads for torch (default: torch's, one a core or "
            "OMP_NUM_THREADS); recorded, and a resume uses it (CPU results depend on it); "
            "1 where other jobs share the cores", type=int, metavar="N")
    _option(g, "--bf16", "bf16 autocast (default: on CUDA only)",
            action=argparse.BooleanOptionalAction)
    _option(g, "--teacher-dtype", "teacher weights; auto = bf16 on CUDA, fp32 on CPU",
            choices=TEACHER_DTYPES)
    _option(g, "--backend", "fused-loss backend; reference = the plain-torch spec",
            choices=BACKENDS)
    g = p.add_argument_group("memory and adapters")
    _option(g, "--gradient-checkpointing", "recompute each decoder layer's activations in "
            "backward (less activation memory, one more forward of each layer)",
            action="store_true")
    _option(g, "--lora-r", "train rank-R LoRA adapters (PEFT) instead of every weight; the fused "
            "loss trains the output layer's adapter too", type=int, metavar="R")
    _option(g, "--lora-alpha", "LoRA scaling numerator: adapters scaled by alpha / r (default: "
            "2r)", type=float)
    _option(g, "--lora-targets", "module names that get adapters (default: every linear layer, "
            "the output layer included)", nargs="+", metavar="NAME")
    g = p.add_argument_group("several processes (under torchrun)")
    _option(g, "--parallel", "the student: FSDP2 fully_shard per decoder layer and root, or DDP",
            choices=PARALLEL)
    _option(g, "--teacher-placement", "the teacher: sharded forward-only (FSDP2), or replicated",
            choices=TEACHER_PLACEMENTS)
    _option(g, "--dist-timeout", "seconds a collective waits for the other ranks", type=float)
    g = p.add_argument_group("bookkeeping")
    _option(g, "--eval-every", "held-out evaluation every N steps", type=int)
    _option(g, "--save-every", "checkpoint every N steps", type=int)
    _option(g, "--stop-after", "stop, with a checkpoint, after N steps in this call", type=int)
    _option(g, "--baseline", "also train the student on hard labels alone with the same budget "
            "and compare the two in the report (doubles the training time; off by default)",
            action=argparse.BooleanOptionalAction)
    _option(g, "--no-report", "skip the report", dest="report", action="store_false")
    _option(g, "--report-to", "also log the step records to TensorBoard (RUN_DIR/tensorboard; "
            "needs the tensorboard package)", choices=REPORT_TO)
    _option(g, "--no-progress", "no progress bar", dest="progress", action="store_false")


def _demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="the embedded default: a complete distillation, nothing downloaded",
        description="Trains a BPE tokenizer and a Llama teacher on the Python standard library's "
                    "sources (the teacher is cached), distils a smaller student, trains a "
                    "hard-label baseline with the same budget, and writes the report.")
    p.add_argument("--out", default="fastkd-demo", help="run directory (default: fastkd-demo)")
    p.add_argument("--fast", action="store_true",
                   help="a smoke run on smaller models: measured 25 s from an empty cache, 20 s "
                        "with the teacher cached, on 2 CPU cores shared with other jobs (load "
                        "8-10)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1, or OMP_NUM_THREADS when it is set): "
                        "one thread gives the same numbers on every machine and does not stall "
                        "when other jobs share the cores (measured 3x faster a step on 2 shared "
                        "cores); recorded in each run, and a resume uses it")
    p.add_argument("--cache-dir", default=None,
                   help="teacher cache (default: $FASTKD_CACHE or ~/.cache/fastkd)")
    p.add_argument("--offline", action="store_true",
                   help="also cache the teacher (top-k and sampled), distil from each cache and "
                        "compare online, offline and hard-label students in the report")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _cache_parser(sub) -> None:
    p = sub.add_parser(
        "cache-teacher", help="run a teacher once over the data and cache its top-k or sampled "
                              "targets (for `fastkd distill --teacher-cache`)",
        formatter_class=_Help,
        description="Tokenizes and packs --data as `fastkd distill` does, runs --teacher over it "
                    "and writes, per counted position, its top-k ids with their log-probabilities "
                    "at temperature T (or the ids drawn from it, with their counts) as safetensors "
                    "shards plus manifest.json (docs/offline.md). Rerunning resumes an "
                    "interrupted cache and rechecks a finished one. Under `torchrun "
                    "--nproc-per-node N -m fastkd cache-teacher` the ranks split the shards.")
    option = functools.partial(_option, p, defaults=cache_defaults)

    option("--teacher", "teacher: HF model directory or hub id", metavar="DIR_OR_ID",
           required=True)
    option("--data", DATA_HELP + ", tokenized as `fastkd distill` does", nargs="+",
           metavar="FILE", required=True)
    option("--out", "cache directory (rerun with the same --out to resume)", metavar="CACHE_DIR",
           required=True)
    option("--mode", "top-k ids, or ids sampled from the teacher (unbiased)",
           choices=MODES)
    option("--k", "slots per position", type=int)
    option("--samples", "sample mode: draws per position, <= k (default: k)", type=int)
    option("--temperature", "the distillation temperature T (as fastkd distill's)", type=float)
    _data_options(option, " (as fastkd distill's)")
    option("--eval-fraction", "fraction of the sequences held out (as fastkd distill's)",
           type=float)
    option("--tokenizer", "tokenizer (default: the teacher's)", metavar="DIR_OR_ID")
    option("--batch-size", "sequences per teacher forward", type=int)
    option("--device", "torch device (default: cuda if available, else cpu; under torchrun: "
           "cuda or cpu, no index)")
    option("--teacher-dtype", "teacher weights; auto = bf16 on CUDA, fp32 on CPU",
           choices=TEACHER_DTYPES)
    _store_options(option)
    option("--seed", "sampling seed", type=int)
    option("--dist-timeout", "under torchrun: seconds a collective waits for the other ranks",
           type=float)
    option("--no-progress", "no progress bar", dest="progress", action="store_false")


def _store_options(option) -> None:
    """How a cache stores its targets (cache-teacher and cache-import)."""
    option("--layout", "compact: a few bits an id and a log-probability, nothing stored for "
           "positions that do not count; fixed: k int32 ids and k float16 values a position "
           "(format /1's layout, ~6 bytes an id)", choices=LAYOUTS)
    option("--logprob-step", "compact top-k: the log-probability grid, nats (each value within "
           "about one step, KL to the exact top-k ~5e-4 nats at 1/8)", type=float)
    option("--dtype", "fixed layout: the stored log-probabilities", choices=DTYPE_NAMES)
    option("--shard-sequences", "sequences per shard", type=int)


def _prepare_parser(sub) -> None:
    p = sub.add_parser(
        "prepare-data", help="tokenize and pack the data once into its token store (what "
                             "`fastkd distill` and `cache-teacher` then map)",
        formatter_class=_Help,
        description="Reads, tokenizes and packs --data as `fastkd distill` does (the same "
                    "options, the same defaults) into the token store the runs on that data "
                    "map, without training: a data job run ahead. Rerunning checks a prepared "
                    "store (every chunk's sha256) and prepares it again if a data file changed.")
    _option(p, "--data", DATA_HELP, nargs="+", metavar="FILE", required=True)
    _option(p, "--tokenizer", "tokenizer: the one the runs use (by default `fastkd distill`'s "
            "is the teacher's)", metavar="DIR_OR_ID", required=True)
    _data_options(functools.partial(_option, p))
    _option(p, "--no-progress", "no progress bar", dest="progress", action="store_false")


def _import_parser(sub) -> None:
    p = sub.add_parser(
        "cache-import", help="turn an inference server's prompt log-probabilities (top-k maps "
                             "id -> log-probability, vLLM style) into a teacher cache",
        formatter_class=_Help,
        description="Reads JSON Lines of {\"input_ids\": [...], \"prompt_logprobs\": [null, "
                    "{id: logprob}, ...]} (docs/offline.md) and writes a teacher cache for "
                    "`fastkd distill --teacher-cache` (with --data the same files). Rerunning "
                    "resumes an interrupted import.")
    option = functools.partial(_option, p, defaults=import_defaults)

    option("--logprobs", "JSON Lines files of input_ids and prompt_logprobs", nargs="+",
           metavar="FILE", required=True)
    option("--tokenizer", "the student's tokenizer (every id must lie in its vocabulary)",
           metavar="DIR_OR_ID", required=True)
    option("--out", "cache directory (rerun with the same --out to resume)", metavar="CACHE_DIR",
           required=True)
    option("--teacher", "what produced the log-probabilities (recorded)")
    option("--temperature", "the temperature the log-probabilities are at (prompt_logprobs are "
           "at 1); distillation runs at it", type=float)
    option("--seq-len", "tokens per sequence (default: the longest)", type=int)
    option("--eval-fraction", "fraction of the sequences held out", type=float)
    _store_options(option)
    option("--no-progress", "no progress bar", dest="progress", action="store_false")


# Other trainers' names for fastkd's options (transformers' TrainingArguments, TRL's scripts),
# for the hint an unknown option gets; spelled with dashes (an underscore is read as one).
OTHER_NAMES = {
    "--learning-rate": "--lr", "--output-dir": "--out", "--max-steps": "--steps",
    "--per-device-train-batch-size": "--batch-size", "--train-batch-size": "--batch-size",
    "--gradient-accumulation-steps": "--grad-accum", "--warmup-steps": "--warmup",
    "--max-grad-norm": "--clip", "--model-name-or-path": "--student", "--model": "--student",
    "--teacher-model": "--teacher", "--teacher-model-name-or-path": "--teacher",
    "--dataset": "--data", "--dataset-name": "--data", "--train-file": "--data",
    "--max-seq-length": "--seq-len", "--max-length": "--seq-len", "--block-size": "--seq-len",
    "--resume-from-checkpoint": "--resume", "--save-steps": "--save-every",
    "--eval-steps": "--eval-every", "--lora-rank": "--lora-r", "--tokenizer-name": "--tokenizer",
}


def unknown_options_hint(parser: argparse.ArgumentParser, unknown: list[str]) -> str:
    """"unrecognized arguments: ..." with, per unknown option, the one it most likely means among
    parser's: another trainer's name for it (OTHER_NAMES), else the closest spelling."""
    import difflib

    known = [s for action in parser._actions for s in action.option_strings]
    hints = []
    for arg in unknown:
        if not arg.startswith("--"):
            continue
        flag = arg.split("=", 1)[0].replace("_", "-")
        guess = OTHER_NAMES.get(flag)
        if guess not in known:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.6)
            guess = close[0] if close else None
        if guess is not None and guess != arg:
            hints.append(f"{arg} -> did you mean {guess}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + (
        "\n" + "\n".join(hints) if hints else "")


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parser.parse_args, but an unknown option is reported by its subcommand's parser (its
    usage, not the top-level one's) with a "did you mean" hint (`unknown_options_hint`)."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        sub = parser._subparsers._group_actions[0].choices[args.command]
        sub.error(unknown_options_hint(sub, unknown))
    return args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastkd", description="fastkd: fused distillation.")
    sub = parser.add_subparsers(dest="command", required=True)
    _distill_parser(sub)
    _demo_parser(sub)
    _cache_parser(sub)
    _import_parser(sub)
    _prepare_parser(sub)
    return parser
