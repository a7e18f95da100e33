"""Several teachers under torchrun: 2 CPU processes (gloo) against 1, one resident teacher (a)
and one cached (b), routed by `--data FILE:NAME` and by a record's "teacher" field, under FSDP2
(the resident teacher sharded) and DDP, and a mixture of two resident teachers; a rank killed
mid-run, then resumed. Launches, tolerances and comparisons: tests/_torchrun.py and the
docstring of tests/test_distributed.py.

The data is chosen so that the ranks' rows route differently: in some micro-batches one rank
holds no token of teacher a while the other does (that rank still runs a's forward, on one row,
so FSDP's all-gathers line up), and the test checks it does, from the run's own batch order.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _torchrun import (
    LOGGED,
    OPTIONS,
    assert_clean,
    assert_same_training,
    log_records,
    torchrun,
    untimed,
    weights,
)
from _trainer_fixtures import build_tokenizer, corpus_texts, save_llama

from fastkd.checkpoint import latest_checkpoint
from fastkd.cli import main
from fastkd.config import DistillConfig
from fastkd.data import Batches
from fastkd.models import load_tokenizer
from fastkd.store import load_blocks
from fastkd.trainer import run_distillation

PER_TEACHER = (*LOGGED, "eval_kd_a", "eval_kd_b")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Teacher a: one short file routed to it (FILE:a) and a few records naming it; teacher b:
    the rest of the records, and its cache (made on the plain data, as `cache-teacher` does)."""
    root = tmp_path_factory.mktemp("dist_teachers")
    tokenizer = build_tokenizer(root / "tokenizer", vocab_size=200)
    texts = [t[:1200] for t in corpus_texts()]
    code = root / "code.jsonl"
    code.write_text(json.dumps({"text": texts[0][:300]}) + "\n")
    mixed = root / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"text": t, "teacher": "a" if i == 2 else "b"}) + "\n"
                             for i, t in enumerate(texts[1:])))
    assets = SimpleNamespace(
        root=root, data=[str(code), str(mixed)], cache=root / "cache_b",
        a=save_llama(root / "a", tokenizer, hidden=32, layers=2, seed=1),
        b=save_llama(root / "b", tokenizer, hidden=48, layers=2, seed=2),
        student=save_llama(root / "student", tokenizer, hidden=24, layers=2, seed=3))
    assert main(["cache-teacher", "--teacher", str(assets.b), "--data", *assets.data, "--out",
                 str(assets.cache), "--seq-len", str(OPTIONS["seq_len"]), "--k", "8",
                 "--no-progress"]) == 0
    return assets


def config(assets, out: Path, **overrides) -> DistillConfig:
    teachers = {"teachers": {"a": str(assets.a)}, "teacher_caches": {"b": str(assets.cache)},
                "data": [assets.data[0] + ":a", assets.data[1]]}
    return DistillConfig(teacher=None, student=str(assets.student), out=str(out),
                         **{**OPTIONS, **teachers, **overrides})


def cli_args(cfg: DistillConfig) -> list[str]:
    """The `fastkd distill` options of a config with named teachers (a route per data file)."""
    args = [arg for name, path in (cfg.teachers or {}).items()
            for arg in ("--teacher", f"{name}={path}")]
    args += [arg for name, path in (cfg.teacher_caches or {}).items()
             for arg in ("--teacher-cache", f"{name}={path}")]
    if cfg.teacher_weights is not None:
        args += ["--teacher-weights", ",".join(f"{n}={w}" for n, w in cfg.teacher_weights.items())]
    routes = cfg.data_teachers or [None] * len(cfg.data)
    args += ["--student", cfg.student, "--data",
             *[path if route is None else f"{path}:{route}" for path, route in zip(
                 cfg.data, routes, strict=True)],
             "--out", cfg.out, "--parallel", cfg.parallel, "--teacher-placement",
             cfg.teacher_placement, "--no-progress", "--no-baseline", "--no-report"]
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup", "clip",
                 "eval_every", "save_every", "eval_sequences", "seed", "device", "dist_timeout"):
        args += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    return args


def rank_teachers(cfg: DistillConfig) -> list[list[set[str]]]:
    """For each micro-batch of the run, each rank's teachers: the names of the teachers its
    rows' tokens are routed to (the run's own store, batch order and split across the ranks)."""
    train, _ = load_blocks(cfg.data, load_tokenizer(str(cfg.teachers["a"])), cfg.seq_len,
                           cfg.eval_fraction, routes=cfg.data_teachers)
    names = ["(padding)", *train.store.manifest["routing"]["names"]]
    batches, share = Batches(train, cfg.batch_size, cfg.seed), cfg.batch_size // 2
    found = []
    for _ in range(cfg.steps * cfg.grad_accum):
        route = next(batches).teacher[:, :-1]
        found.append([{names[c] for c in route[r * share:(r + 1) * share].unique().tolist()} - {
            "(padding)"} for r in range(2)])
    return found


@pytest.fixture(scope="module")
def one(assets, tmp_path_factory):
    """The routed run in 1 process."""
    result = run_distillation(config(assets, tmp_path_factory.mktemp("one") / "run"))
    assert result["status"] == "completed"
    return result


def test_the_ranks_rows_route_differently(assets, one):
    per_batch = rank_teachers(config(assets, Path(one["run_dir"])))
    # a rank without a token of a's while the other rank has some, and the other way round for b
    assert any("a" not in mine and "a" in other for mine, other in per_batch), per_batch
    assert any(mine == {"a", "b"} for ranks in per_batch for mine in ranks), per_batch
    assert all(mine for ranks in per_batch for mine in ranks)  # every row routed somewhere


def launch_routed(assets, out: Path, parallel: str) -> tuple[DistillConfig, str]:
    """The routed run on 2 processes (the resident teacher sharded): (its config, stdout)."""
    cfg = config(assets, out, parallel=parallel, teacher_placement="shard")
    rc, stdout, err, _ = torchrun(cli_args(cfg))
    assert_clean(rc, err)
    return cfg, stdout


@pytest.fixture(scope="module")
def fsdp_two(assets, tmp_path_factory):
    return launch_routed(assets, tmp_path_factory.mktemp("fsdp") / "two", "fsdp")


def assert_equals_one(cfg: DistillConfig, stdout: str, one: dict) -> None:
    history = log_records(cfg.out)
    assert_same_training(weights(cfg.out), weights(one["run_dir"]), history, one["history"],
                         keys=PER_TEACHER)
    assert history[-1]["eval_kd_a"] > 0 and history[-1]["eval_kd_b"] > 0
    assert all(r["grad_norm"] > OPTIONS["clip"] for r in history[1:])  # clipping acted
    assert stdout.count("completed in") == 1


def test_routed_fsdp_two_processes_equal_one(fsdp_two, one):
    assert_equals_one(*fsdp_two, one)


def test_routed_ddp_two_processes_equal_one(assets, one, tmp_path):
    assert_equals_one(*launch_routed(assets, tmp_path / "two", "ddp"), one)


def test_killed_rank_then_resume_equal_the_uninterrupted_run(fsdp_two):
    """FSDP2, rank 1 killed (SIGKILL) in step 3: the resumed run equals the uninterrupted
    2-process run bit for bit, its log too."""
    straight = fsdp_two[0]
    cfg = dataclasses.replace(straight, out=str(Path(straight.out).with_name("killed")))
    rc, _, err, seconds = torchrun(cli_args(cfg), fault="1:3:kill")
    assert rc != 0 and seconds < 120, err[-3000:]
    assert latest_checkpoint(cfg.out).name == "step-00000002"
    rc, _, err, _ = torchrun(["--resume", cfg.out, "--no-progress"])
    assert_clean(rc, err)
    want, got = weights(straight.out), weights(cfg.out)
    assert want.keys() == got.keys() and all(torch.equal(got[n], want[n]) for n in want)
    assert untimed(log_records(cfg.out)) == untimed(log_records(straight.out))


def test_mixture_two_processes_equal_one(assets, tmp_path):
    """Two resident teachers mixed on every token (0.25 a + 0.75 b), FSDP2, both sharded."""
    cfg = config(assets, tmp_path / "two", teachers={"a": str(assets.a), "b": str(assets.b)},
                 teacher_caches=None, data=list(assets.data), data_teachers=None,
                 teacher_weights={"a": 0.25, "b": 0.75}, parallel="fsdp",
                 teacher_placement="shard")
    rc, _, err, _ = torchrun(cli_args(cfg))
    assert_clean(rc, err)
    alone = run_distillation(dataclasses.replace(cfg, out=str(tmp_path / "one")))
    assert_same_training(weights(cfg.out), weights(alone["run_dir"]), log_records(cfg.out),
                         alone["history"], keys=PER_TEACHER)

