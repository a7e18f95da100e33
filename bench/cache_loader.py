"""Training from a teacher cache inside transformers' Trainer: the step time with the cache's rows
read and decoded in the training process, and in DataLoader workers that overlap the steps; and in
`fastkd distill --teacher-cache`: the step's wait for its decoded targets, loaded when used and
prefetched on a background thread (fastkd.cache.Prefetch).

    python bench/cache_loader.py          # writes bench/results/cache/cache_loader.{json,md}

The cache: top-64, compact, at V = 128256 (the teacher of bench/cache_size.py: a tiny Llama with a
128256-row head, entropy 2.6 nats), 128-token sequences. The student: a tiny Llama with the same
head (hidden 64). `FusedKDTrainer` from the cache (no teacher; fastkd.integrations.cache) runs
`--steps` steps of batch 4 per setting after 3 warm-up steps; the step time is the mean over the
timed steps, and the decode time is `CacheDataset` + `cache_collator` for one batch, alone. CPU
only: the numbers say how long decoding takes beside a step, not what a GPU step costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from cache_size import build_teacher, build_tokenizer, write_data  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the training process (1: a shared machine's "
                             "cores do not stall torch's thread pool)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import (
        AutoModelForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        TrainerCallback,
        TrainingArguments,
    )

    from fastkd.cache_teacher import cache_teacher
    from fastkd.integrations.cache import CacheDataset, cache_collator
    from fastkd.integrations.transformers import FusedKDTrainer
    from fastkd.options import DistillOptions
    from fastkd.plans import CachePlan

    class StepTimes(TrainerCallback):
        """compute: on_step_begin (the batch is in hand) to on_step_end; wall: from one step's
        end to the next one's (the batch's fetch included)."""

        def __init__(self):
            self.compute, self.ends, self.t0 = [], [], None

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.ends.append(time.perf_counter())
            self.compute.append(self.ends[-1] - self.t0)

    results = {"host": platform.node(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "threads": args.threads, "load_average": os.getloadavg(), "settings": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = build_tokenizer(root / "tokenizer")
        data = write_data(root, args.sequences * 128, seed=0)
        build_teacher(root / "teacher", tokenizer, data, 64, 0)
        cache_teacher(CachePlan(teacher=str(root / "teacher"), data=[str(data)],
                                out=str(root / "cache"), temperature=1.0, seq_len=128,
                                batch_size=4, k=64, progress=False))
        cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                          max_position_embeddings=256, tie_word_embeddings=False)
        torch.manual_seed(1)
        LlamaForCausalLM(cfg).save_pretrained(root / "student")
        train = CacheDataset(root / "cache", "train")
        started = time.perf_counter()
        for i in range(8):
            cache_collator([train[(4 * i + j) % len(train)] for j in range(4)])
        results["decode_ms_per_batch"] = (time.perf_counter() - started) / 8 * 1e3
        whole = train._sequences()  # every row of the split in one call: the codec's rate
        started = time.perf_counter()
        whole.targets.load()
        results["decode_rows_per_s"] = whole.count_targets() / (time.perf_counter() - started)
        for workers in (0, 2):
            times = StepTimes()
            trainer = FusedKDTrainer(
                model=AutoModelForCausalLM.from_pretrained(root / "student"), teacher_model=None,
                args=TrainingArguments(output_dir=str(root / f"run{workers}"),
                                       per_device_train_batch_size=4,
                                       max_steps=args.steps + 3, learning_rate=1e-3,
                                       report_to=[], save_strategy="no", use_cpu=True, seed=0,
                                       disable_tqdm=True, dataloader_num_workers=workers,
                                       logging_strategy="no"),
                train_dataset=train, data_collator=cache_collator, callbacks=[times],
                distill_options=DistillOptions(temperature=1.0))
            trainer.train()
            compute, ends = times.compute[3:], times.ends[2:]
            row = {"dataloader_num_workers": workers,
                   "step_ms_compute": sum(compute) / len(compute) * 1e3,
                   "step_ms_wall": (ends[-1] - ends[0]) / (len(ends) - 1) * 1e3}
            results["settings"].append(row)
            print(json.dumps(row))
        results["distill"] = [distill_waits(root, data, prefetch, args.steps)
                              for prefetch in (False, True)]
        for row in results["distill"]:
            print(json.dumps(row))
    results["hidden"] = 64
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_loader.json").write_text(json.dumps(results, indent=1))
    (out / "cache_loader.md").write_text(render(results))
    print(render(results))
    return 0


def distill_waits(root: Path, data: Path, prefetch: bool, steps: int) -> dict:
    """`run_distillation` from the cache for 3 + steps steps: the mean step time and the mean
    time a step's own thread spent getting its cached targets (decoding them, or waiting for the
    prefetch thread), over the timed steps."""
    import threading

    from fastkd import cache, loop
    from fastkd.config import DistillConfig
    from fastkd.trainer import run_distillation

    waits: list[float] = []
    direct_load, prefetch_load, make = cache.CacheRows.load, cache.Prefetch.load, loop.Prefetch

    def timed(fn):
        def wrapper(self, *a):
            started = time.perf_counter()
            out = fn(self, *a)
            rows = a[0] if a else self
            if threading.current_thread() is threading.main_thread() and rows.split == "train":
                waits.append(time.perf_counter() - started)
            return out
        return wrapper

    cache.CacheRows.load, cache.Prefetch.load = timed(direct_load), timed(prefetch_load)
    loop.Prefetch = make if prefetch else (lambda: None)
    try:
        result = run_distillation(DistillConfig(
            teacher=None, teacher_cache=str(root / "cache"), student=str(root / "student"),
            data=[str(data)], out=str(root / f"distill-{prefetch}"),
            tokenizer=str(root / "tokenizer"), steps=steps + 3, warmup=1, batch_size=4,
            seq_len=128, temperature=1.0, lr=1e-3, eval_every=10_000, save_every=10_000,
            eval_sequences=4, baseline=False, report=False, progress=False))
    finally:
        cache.CacheRows.load, cache.Prefetch.load, loop.Prefetch = (direct_load, prefetch_load,
                                                                   make)
    seconds = [r["seconds"] for r in result["history"] if r["step"] > 3]
    timed_waits = waits[-steps:]  # one load a step (no accumulation): the timed steps' loads
    return {"prefetch": prefetch, "step_ms": sum(seconds) / len(seconds) * 1e3,
            "targets_wait_ms": sum(timed_waits) / len(timed_waits) * 1e3}


def render(results: dict) -> str:
    lines = ["# Training from a cache in transformers' Trainer (`python bench/cache_loader.py`)",
             "", f"CPU ({results['cpus']} cores, {results['threads']} torch thread(s), load "
             f"average {results['load_average'][0]:.1f} when it started), top-64 compact cache at "
             "V = 128256, batch 4 x 128 tokens, student hidden 64 with a 128256-row head. "
             f"Decoding one batch alone (CacheDataset items + cache_collator): "
             f"{results['decode_ms_per_batch']:.1f} ms; the codec on a whole split at once: "
             f"{results['decode_rows_per_s']:,.0f} counted positions a second.", "",
             "Step, wall: from one step's end to the next's; compute: from the step's start (its "
             "batch in hand) to its end; the difference is the time the step waited for its "
             "batch. The compute time moves with the machine's load (shared cores).", "",
             "| DataLoader workers | step, wall (ms) | step, compute (ms) | waiting for the batch "
             "(ms) |", "|---:|---:|---:|---:|"]
    for row in results["settings"]:
        lines.append(f"| {row['dataloader_num_workers']} | {row['step_ms_wall']:.0f} | "
                     f"{row['step_ms_compute']:.0f} | "
                     f"{row['step_ms_wall'] - row['step_ms_compute']:.0f} |")
    if results.get("distill"):
        lines += ["", "`fastkd distill --teacher-cache` on the same cache and student (batch 4, "
                  "one cached-target load a step): the step's time, and the part of it its "
                  "thread spent getting the step's decoded targets.", "",
                  "| cached targets | step (ms) | getting the targets (ms) |", "|---|---:|---:|"]
        for row in results["distill"]:
            how = "prefetched a step ahead" if row["prefetch"] else "loaded when used"
            lines.append(f"| {how} | {row['step_ms']:.0f} | {row['targets_wait_ms']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
