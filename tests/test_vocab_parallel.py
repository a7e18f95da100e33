"""The vocab-parallel loss (heads split by vocabulary rows over ranks) on CPU with gloo: 2 and 3
ranks, uneven shards, padded vocabularies both ways (one with an empty teacher shard), every
divergence on both backends, fp32 and bf16, reductions incl. "none" with an upstream gradient.
Loss and every gradient equal the single-process fused loss and the float64 spec on every rank
(tests/_vocab_parallel_worker.py); no rank creates a tensor of the full vocabulary's width."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastkd

WORKER = Path(__file__).with_name("_vocab_parallel_worker.py")


def launch(world: int, suite: str) -> None:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(WORKER), str(world), suite], env=env,
                          capture_output=True, text=True, timeout=600)
    tail = proc.stderr[-4000:]
    assert proc.returncode == 0, tail  # a failed check on any rank fails its process
    assert "terminate called" not in proc.stderr and "SIGABRT" not in proc.stderr, tail
    assert f"ok {world} {suite}" in proc.stdout


def test_three_ranks_match_one_process_and_the_spec():
    launch(3, "matrix")


def test_two_ranks_match_one_process_and_bad_input_raises_everywhere():
    """The 2-rank matrix (every divergence on both backends), then in the same process group:
    no rank forms a tensor of the full vocabulary's width, the README's ColwiseParallel example,
    and bad input on one rank (a vocab_start of -1 or None, a bad tensor or option) or ranks that
    disagree (the counted tokens, the divergence, the temperature, a label's range) raise the same
    error on every rank within seconds (issue 20; gloo waited 30 minutes or aborted)."""
    launch(2, "matrix+probe")


def test_vocab_start_needs_a_process_group():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="vocab_start"):
        fastkd.fused_distill_loss(h, w, h, w, torch.zeros(3, dtype=torch.long), vocab_start=2)
