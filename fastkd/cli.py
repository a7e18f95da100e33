"""The command line: `fastkd distill ...` (a new run, or `--resume RUN_DIR`), `fastkd demo`, the
teacher cache's `fastkd cache-teacher` (under torchrun too) and `fastkd cache-import`, and
`fastkd prepare-data` (the data's token store, ahead of the runs that map it): `main` parses the
arguments (fastkd.cli_parser) and runs the command.

Exit status: 0 when the run completed or stopped at --stop-after (resumable); 128 + the signal
number when Ctrl-C / SIGTERM stopped it (after saving a checkpoint); 2 for bad arguments, models,
data or files.

Nothing here imports torch or transformers before the arguments are checked: `--help` and
argument errors answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

from fastkd.cli_parser import build_parser, cache_defaults, field_defaults, parse
from fastkd.config import RUNTIME_FIELDS, DistillConfig
from fastkd.teacher_set import teacher_fields


def _prepare_args(args) -> dict:
    """prepare-data's options (DistillConfig's defaults), its data spec checked: before torch
    loads, as distill's config is."""
    from fastkd.checks import check_num_proc
    from fastkd.readers import DataSpec

    given = {**field_defaults(DistillConfig),
             **{k: v for k, v in vars(args).items() if k != "command"}}
    check_num_proc(given["num_proc"])
    return {**given, "spec": DataSpec(tuple(given["data"]), given["seq_len"], given["packing"],
                                      given["utf8_errors"])}


def _run_prepare(given: dict) -> int:
    from fastkd.models import check_model_source, load_tokenizer
    from fastkd.readers import expand_data
    from fastkd.store import StoreOptions, open_store

    spec = given["spec"]
    expand_data(list(spec.paths))  # before anything loads
    check_model_source(given["tokenizer"], "tokenizer", files="tokenizer")
    store = open_store(spec, load_tokenizer(given["tokenizer"]), StoreOptions(
        given["data_cache"], given["num_proc"], given["progress"]))
    store.verify()
    size = sum(f.stat().st_size for f in store.dir.iterdir())
    print(f"token store: {store.dir}: {store.summary()}; {size / 2**20:,.1f} MiB, every chunk "
          "checked")
    return 0


def _run_cache(args) -> int:
    from fastkd import distributed, fsio
    from fastkd.cache import TeacherCache
    from fastkd.cache_format import check_out
    from fastkd.cache_import import import_logprobs
    from fastkd.cache_teacher import cache_teacher
    from fastkd.models import check_model_source
    from fastkd.plans import CachePlan, ImportPlan

    given = {k: v for k, v in vars(args).items() if k != "command"}
    fsio.check_writable(given["out"], "out")  # before anything loads
    check_out(Path(given["out"]))  # a new or empty directory, or a cache
    if args.command == "cache-import":
        manifest = import_logprobs(ImportPlan(**given))
    else:
        check_model_source(given["teacher"], "teacher")
        manifest = cache_teacher(CachePlan(**{**cache_defaults(), **given}))
    if distributed.is_main():  # under torchrun, rank 0 speaks for all
        cache = TeacherCache(args.out, verify=False)
        print(f"cache: {args.out}: {cache.bytes_per_position():,.1f} bytes a counted position "
              f"({manifest['positions']:,} positions, {cache.disk_bytes() / 2**20:,.1f} MiB in "
              f"all, {len(manifest['shards'])} shards, {manifest['layout']} layout)")
    return 0


def config_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> DistillConfig:
    """A new run's config from the given options, or the saved config for --resume."""
    given = {k: v for k, v in vars(args).items() if k != "command"}
    if given.get("clip") == 0:
        given["clip"] = None
    if "resume" in given:
        run_dir = given.pop("resume")
        fixed = sorted(set(given) - set(RUNTIME_FIELDS))
        if fixed:
            parser.error(f"--resume continues a run with its saved config; these options cannot "
                         f"change it: {', '.join('--' + f.replace('_', '-') for f in fixed)}")
        if given.setdefault("out", run_dir) != run_dir:
            parser.error("--resume RUN_DIR continues the run where it lies: drop --out")
        return dataclasses.replace(DistillConfig.load(run_dir), resume=True, **given)
    required = ("student", "data", "out") if "teacher_cache" in given else (
        "teacher", "student", "data", "out")
    missing = [f"--{f}" for f in required if f not in given]
    if missing:
        parser.error(f"a new run needs {', '.join(missing)} (or --resume RUN_DIR)")
    teachers = teacher_fields(given.pop("teacher", None), given.pop("teacher_cache", None),
                              given.pop("teacher_weights", None))
    return DistillConfig(**given, **teachers)


def _finish(results: dict, resume_hint: str) -> int:
    from fastkd import distributed

    code = 128 + results["signal"] if results["status"] == "interrupted" else 0
    if not distributed.is_main():
        return code  # under torchrun, rank 0 speaks for all
    if results.get("report"):
        print(Path(results["report"]["md"]).read_text())
        report = results["report"]
        also = [Path(report[k]).name for k in ("json", "png") if report.get(k)]
        print(f"report: {report['md']} (+ {', '.join(also)})")
    for phase in ("distill", "baseline"):
        summary = results.get(phase)
        if summary and summary["student_dir"]:
            print(f"{phase}: student saved to {summary['student_dir']}")
    if results["status"] != "completed":
        print(f"{results['status']}: to continue, {resume_hint}")
    print(f"{results['status']} in {results['seconds']:.0f} s")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    with _log_to_stderr():
        return _main(args, parser)


@contextlib.contextmanager
def _log_to_stderr():
    """fastkd's log on stderr as "fastkd: ..." for the call; the logger as it was afterwards
    (main() may be called in-process, by tests or notebooks: a handler that outlived the call
    would write to a stderr that may be gone)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("fastkd: %(message)s"))
    log = logging.getLogger("fastkd")
    level, propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # other libraries' logs keep their own format
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        log.propagate = propagate


def _main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        # The config first: a bad value is reported before torch and transformers load.
        config = config_from_args(args, parser) if args.command == "distill" else None
        prepare = _prepare_args(args) if args.command == "prepare-data" else None
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-file load/save bars would break up fastkd's bar
        if args.command in ("cache-teacher", "cache-import"):
            return _run_cache(args)
        if args.command == "prepare-data":
            return _run_prepare(prepare)
        if args.command == "demo":
            from fastkd.demo import run_demo

            # One thread unless told otherwise: the demo's numbers then do not depend on the
            # machine's core count, and torch's thread pool does not stall when other jobs share
            # the cores (bench/results/cpu/threads*.md: a step 3x faster on 2 shared cores).
            threads = args.threads or (None if "OMP_NUM_THREADS" in os.environ else 1)
            started = time.perf_counter()
            results = run_demo(args.out, fast=args.fast, cache_dir=args.cache_dir,
                               progress=args.progress, offline=args.offline, threads=threads)
            results["seconds"] = time.perf_counter() - started
            return _finish(results, "run the same `fastkd demo` command again")
        from fastkd import distributed
        from fastkd.trainer import run_distillation

        results = run_distillation(config)
        launcher = ("torchrun [the same options] -m fastkd"
                    if distributed.launched_world_size() > 1 else "fastkd")
        return _finish(results, f"run `{launcher} distill --resume {results['run_dir']}`")
    except (ValueError, OSError) as err:  # bad inputs, unloadable models, missing files
        parser.exit(2, f"fastkd {args.command}: error: {err}\n")
    except FloatingPointError as err:  # a NaN or inf loss: stopped before the step was applied
        parser.exit(1, f"fastkd {args.command}: error: {err}\n")
