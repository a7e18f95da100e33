"""`fastkd` under torchrun for the trainer's multi-process tests (tests/test_distributed*.py): 2 CPU
processes (gloo) launched as the user launches them, under a timeout (a hang fails the test), and
the comparisons of a 2-process run with the same run in 1 process (tolerances: the docstring of
tests/test_distributed.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).parent
# what each step and evaluation logs, compared between the runs
LOGGED = ("loss", "ce", "kd", "grad_norm", "eval_ce", "eval_kd", "tokens")

# 4 optimizer steps of 2 micro-batches of 4 sequences (2 per rank); clip 0.05 < every step's
# gradient norm, so clipping acts on each step; 5 held-out sequences split 3 + 2 over the ranks.
OPTIONS = {"steps": 4, "batch_size": 4, "grad_accum": 2, "seq_len": 32, "lr": 1e-2, "warmup": 1,
           "clip": 0.05, "eval_every": 2, "save_every": 2, "eval_sequences": 5, "seed": 0,
           "device": "cpu", "baseline": False, "report": False, "progress": False,
           "dist_timeout": 60.0}


def _descendants(pid: int) -> list[int]:
    """Processes under pid (torchrun starts its workers in sessions of their own)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def torchrun(args: list[str], fault: str | None = None, timeout: float = 150.0,
             command: str = "distill"):
    """2 processes; returns (returncode, stdout, stderr, seconds). A hang fails the test."""
    target = [str(TESTS / "_dist_launch.py")] if fault else ["-m", "fastkd"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *target, command, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    if fault:
        env["FASTKD_TEST_FAULT"] = fault
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in [*_descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s: {' '.join(cmd)}\n{err[-3000:]}")
    return proc.returncode, out, err, time.perf_counter() - started


def assert_clean(rc: int, err: str) -> None:
    assert rc == 0, err[-4000:]
    assert "terminate called" not in err and "SIGABRT" not in err, err[-4000:]


def assert_ended_without_abort(err: str) -> None:
    assert "terminate called" not in err and "SIGABRT" not in err, err[-4000:]


def weights(run_dir: str | Path, phase: str = "student") -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / phase / "model.safetensors"))


def log_records(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


def assert_same_training(got: dict, want: dict, history_got: list, history_want: list,
                         keys: tuple[str, ...] = LOGGED) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert [r["step"] for r in history_got] == [r["step"] for r in history_want]
    for a, b in zip(history_got, history_want, strict=True):
        for key in keys:
            if b.get(key) is None:
                assert a.get(key) is None, key
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (a["step"], key)


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in history]
