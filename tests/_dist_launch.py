"""`python -m fastkd` for torchrun, with one fault injected (tests/test_distributed.py only).

FASTKD_TEST_FAULT="RANK:STEP:ACTION": on rank RANK, at the STEP-th training step this process
runs (counted at the gradient clipping, after the step's backward), ACTION is

    kill              SIGKILL itself: a rank dies mid-run;
    sigterm-launcher  SIGTERM to torchrun (what a scheduler's preemption or Ctrl-C does), then wait
                      3 s, so torchrun's SIGTERM reaches every rank before the next step begins;
    kill-after-shard  (`fastkd cache-teacher`) SIGKILL itself once its STEP-th shard is written;
    nan-teacher       the teacher's hidden states of this rank's first sequence are NaN in every
                      forward from the start (STEP unused): one rank's model gives NaN.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import fastkd.cache_write as cache_write
import fastkd.distributed as distributed
from fastkd.cli import main


def inject(spec: str) -> None:
    rank, at, action = spec.split(":")
    if action == "kill-after-shard":
        write, shards = cache_write.write_shard, 0

        def write_then_die(*args):
            nonlocal shards
            entry = write(*args)
            shards += 1
            if shards == int(at) and distributed.rank() == int(rank):
                os.kill(os.getpid(), signal.SIGKILL)
            return entry

        cache_write.write_shard = write_then_die
        return
    if action == "nan-teacher":
        import torch

        import fastkd.batch_loss as batch_loss

        forward = batch_loss.TeacherForward.forward

        def nan_forward(self, inputs):
            h, w, b = forward(self, inputs)
            if distributed.rank() == int(rank):
                h = h.clone().index_fill_(0, torch.tensor([0]), float("nan"))
            return h, w, b

        batch_loss.TeacherForward.forward = nan_forward
        return
    clip = distributed.clip_grad_norm
    calls = 0

    def clip_with_fault(params, max_norm):
        nonlocal calls
        calls += 1
        if calls == int(at) and distributed.rank() == int(rank):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif action == "sigterm-launcher":
                os.kill(os.getppid(), signal.SIGTERM)
                time.sleep(3)
            else:
                raise ValueError(f"FASTKD_TEST_FAULT: unknown action {action!r}")
        return clip(params, max_norm)

    distributed.clip_grad_norm = clip_with_fault


if __name__ == "__main__":
    inject(os.environ["FASTKD_TEST_FAULT"])
    sys.exit(main(sys.argv[1:]))
