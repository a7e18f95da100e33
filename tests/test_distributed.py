"""The trainer under torchrun: 2 CPU processes (gloo) against 1, with FSDP2 and with DDP, from the
teacher and from its cache; a rank killed mid-run, a SIGTERM to the launcher, and resumes.

Every launch is the user's command, `python -m torch.distributed.run --standalone
--nproc-per-node 2 -m fastkd distill ...` (a free rendezvous port each time), under a timeout:
a hang fails the test instead of stalling the suite, and so do a non-zero exit status and
"terminate called" / SIGABRT in the output (a process group left alive at exit).

Tolerance, 2 processes against 1 (fp32): the runs differ only in the order of fp32 sums (each rank
sums its rows, then the gradients are averaged across ranks), ~1e-7 relative per sum. AdamW turns
a gradient's relative error into the same relative error of the update (m / sqrt(v)), times
lr=1e-2, over 4 steps: parameters agree to ~1e-6 (measured: <= 7e-7). We allow rtol = atol = 1e-5,
against updates of ~2e-2 per parameter: a wrong shard, a lost micro-batch or a local clip norm
moves them by orders of magnitude more. Adam and clipping would hide a wrong loss scale in the
parameters, so the logged loss and gradient norm are compared too (rel 1e-5, or abs 1e-7: a KL
near 0 between near-uniform tiny models, e.g. 2.7e-4, is a sum of fp32 terms of size log V, and
a different order of the sums moves it by ~1e-8 absolute).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _torchrun import (
    OPTIONS,
    assert_clean,
    assert_ended_without_abort,
    assert_same_training,
    log_records,
    torchrun,
    untimed,
    weights,
)
from _trainer_fixtures import build_tokenizer, save_llama, write_data
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from fastkd import distributed
from fastkd.cache_teacher import cache_teacher
from fastkd.checkpoint import latest_checkpoint
from fastkd.config import DistillConfig
from fastkd.plans import CachePlan
from fastkd.trainer import run_distillation


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_assets")
    tokenizer = build_tokenizer(root / "tokenizer")
    return SimpleNamespace(
        root=root, data=write_data(root / "data"),
        teacher=save_llama(root / "teacher", tokenizer, hidden=32, layers=2, seed=1),
        student=save_llama(root / "student", tokenizer, hidden=24, layers=2, seed=2),
        tied=save_llama(root / "tied", tokenizer, hidden=24, layers=2, tie=True, seed=4))


def config(assets, out: Path, student: Path, **overrides) -> DistillConfig:
    return DistillConfig(teacher=str(assets.teacher), student=str(student), data=assets.data,
                         out=str(out), **{**OPTIONS, **overrides})


def cli_args(cfg: DistillConfig) -> list[str]:
    """The `fastkd distill` options of a config (the ones these tests change)."""
    teacher = (["--teacher-cache", cfg.teacher_cache, "--tokenizer", cfg.tokenizer]
               if cfg.teacher_cache else ["--teacher", cfg.teacher])
    args = [*teacher, "--student", cfg.student, "--data", *cfg.data,
            "--out", cfg.out, "--parallel", cfg.parallel,
            "--teacher-placement", cfg.teacher_placement, "--no-progress"]
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "lr", "warmup", "clip",
                 "eval_every", "save_every", "eval_sequences", "seed", "device", "dist_timeout"):
        args += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    if cfg.lora_r is not None:
        args += ["--lora-r", str(cfg.lora_r), "--lora-alpha", str(cfg.lora_alpha)]
    return args + (["--baseline"] if cfg.baseline else ["--no-baseline"]) + (
        [] if cfg.report else ["--no-report"])


@pytest.fixture(scope="module")
def fsdp_run(assets, tmp_path_factory):
    """Tied embeddings, FSDP2 student, sharded teacher: 2 processes and the same run in 1."""
    root = tmp_path_factory.mktemp("fsdp")
    cfg = config(assets, root / "two", assets.tied, parallel="fsdp", teacher_placement="shard")
    rc, out, err, seconds = torchrun(cli_args(cfg))
    assert_clean(rc, err)
    one = run_distillation(config(assets, root / "one", assets.tied))
    assert one["status"] == "completed"
    return SimpleNamespace(cfg=cfg, out=out, err=err, seconds=seconds, one=one, root=root)


def test_fsdp_two_processes_equal_one(fsdp_run, assets):
    two = Path(fsdp_run.cfg.out)
    history = log_records(two)
    assert_same_training(weights(two), weights(fsdp_run.one["run_dir"]), history,
                         fsdp_run.one["history"])
    assert all(r["grad_norm"] > OPTIONS["clip"] for r in history[1:])  # clipping acted
    # The tied head's gradient reached the shards: the tied weight moved (equally, above).
    moved = weights(two)["model.embed_tokens.weight"] - load_file(
        str(assets.tied / "model.safetensors"))["model.embed_tokens.weight"]
    assert moved.abs().max() > 1e-3
    assert "lm_head.weight" not in weights(two)  # tied: stored once, as save_pretrained does
    # Each rank wrote its own shards; rank 0 alone wrote the log, the output and the report.
    checkpoint = latest_checkpoint(two)
    assert checkpoint.name == "step-00000004"
    assert sorted(p.name for p in (checkpoint / "dcp").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert (checkpoint / "rng-0.pt").is_file() and (checkpoint / "rng-1.pt").is_file()
    assert json.loads((checkpoint / "meta.json").read_text())["world_size"] == 2
    assert [r["step"] for r in history] == [0, 1, 2, 3, 4]
    assert fsdp_run.out.count("completed in") == 1
    assert fsdp_run.err.count(" held-out sequences of ") == 1
    assert fsdp_run.err.count("preparing the token store") == 1  # rank 0's; rank 1 mapped it


def test_resume_with_another_world_size_is_refused(fsdp_run, tmp_path):
    run = tmp_path / "run"  # the run, its export not done yet (a finished run resumes nothing)
    shutil.copytree(fsdp_run.cfg.out, run)
    shutil.rmtree(run / "student")
    resumed = DistillConfig.load(run)
    with pytest.raises(ValueError, match=r"written by 2 process\(es\), this run has 1"):
        run_distillation(dataclasses.replace(resumed, out=str(run), resume=True))


def test_batch_size_must_split_across_the_ranks(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with pytest.raises(ValueError, match="batch_size=3 .* split evenly across the 2 processes"):
        run_distillation(config(assets, tmp_path / "run", assets.student, batch_size=3))


def test_ddp_two_processes_equal_one_with_baseline_and_report(assets, tmp_path):
    """DDP student, sharded teacher, both phases, stopped after 2 steps (--stop-after) and
    resumed: equals the uninterrupted run in 1 process; rank 0 writes the report after teardown
    (it loads the teacher whole for it)."""
    cfg = config(assets, tmp_path / "two", assets.student, parallel="ddp",
                 teacher_placement="shard", steps=3, baseline=True, report=True)
    rc, _, err, _ = torchrun([*cli_args(cfg), "--stop-after", "2"])
    assert_clean(rc, err)
    assert latest_checkpoint(cfg.out).name == "step-00000002"
    assert not (Path(cfg.out) / "student").exists()
    rc, out, err, _ = torchrun(["--resume", cfg.out, "--no-progress"])
    assert_clean(rc, err)
    one = run_distillation(config(assets, tmp_path / "one", assets.student, steps=3,
                                  baseline=True))
    assert_same_training(weights(cfg.out), weights(one["run_dir"]), log_records(cfg.out),
                         one["history"])
    assert_same_training(weights(cfg.out, "baseline/student"),
                         weights(one["run_dir"], "baseline/student"),
                         log_records(Path(cfg.out) / "baseline"), one["baseline_history"])
    report = json.loads((Path(cfg.out) / "report.json").read_text())
    assert [row["model"] for row in report["rows"]][:2] == ["teacher", "distilled student"]
    assert out.count("report:") == 1


def test_cache_teacher_on_two_processes_then_fsdp_from_the_cache(assets, tmp_path):
    """Caching under torchrun: `fastkd cache-teacher` on 2 processes, rank 1 killed (SIGKILL)
    after its first shard; the rerun on 2 processes resumes it, as does one on 1 process (another
    world size); both equal the 1-process cache byte for byte, and 3 steps of distillation from
    each give identical weights. Then FSDP2 over 2 processes trains from the cache, no teacher
    loaded, as 1 process does; the report measures KL on the cached held-out rows."""
    plan = dict(k=8, temperature=2.0, seq_len=OPTIONS["seq_len"], batch_size=16,
                shard_sequences=128)
    one = tmp_path / "cache-one"
    cache_teacher(CachePlan(teacher=str(assets.teacher), data=assets.data, out=str(one),
                            progress=False, **plan))
    two = tmp_path / "cache-two"
    args = ["--teacher", str(assets.teacher), "--data", *assets.data, "--out", str(two),
            "--device", "cpu", "--no-progress",
            *[f"--{k.replace('_', '-')}={v}" for k, v in plan.items()]]
    rc, _, err, seconds = torchrun(args, fault="1:1:kill-after-shard", command="cache-teacher")
    assert rc != 0 and seconds < 120, err[-3000:]
    assert_ended_without_abort(err)
    written = sorted(p.name for p in two.glob("*.safetensors"))
    manifest_one = json.loads((one / "manifest.json").read_text())
    assert 1 <= len(written) < len(manifest_one["shards"])
    assert not json.loads((two / "manifest.json").read_text())["complete"]
    other_world = tmp_path / "cache-resumed-alone"
    shutil.copytree(two, other_world)
    cache_teacher(CachePlan(teacher=str(assets.teacher), data=assets.data,
                            out=str(other_world), progress=False, **plan))
    rc, _, err, _ = torchrun(args, command="cache-teacher")
    assert_clean(rc, err)
    for made in (two, other_world):
        assert json.loads((made / "manifest.json").read_text()) == manifest_one
        for entry in manifest_one["shards"]:
            assert (made / entry["file"]).read_bytes() == (one / entry["file"]).read_bytes()

    def cached(out: Path, cache: Path, **kw) -> DistillConfig:
        return dataclasses.replace(
            config(assets, out, assets.student, **kw), teacher=None, teacher_cache=str(cache),
            tokenizer=str(assets.root / "tokenizer"))

    from_one = run_distillation(cached(tmp_path / "from-one", one, steps=3))
    from_two = run_distillation(cached(tmp_path / "from-two", two, steps=3))
    got, want = weights(from_two["run_dir"]), weights(from_one["run_dir"])
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    cfg = cached(tmp_path / "fsdp", two, parallel="fsdp", steps=3, report=True)
    rc, out, err, _ = torchrun(cli_args(cfg))
    assert_clean(rc, err)
    history = log_records(cfg.out)
    assert_same_training(weights(cfg.out), want, history, from_one["history"])
    assert [r["step"] for r in history] == [0, 1, 2, 3] and history[-1]["kd"] > 0
    report = json.loads((Path(cfg.out) / "report.json").read_text())
    assert report["teacher_cache"]["kl_tail"] == "bucket"
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["distilled student"]["kl_to_teacher"] > 0
    assert out.count("report:") == 1


def test_killed_rank_then_sigterm_then_resume_equal_the_uninterrupted_run(fsdp_run):
    cfg = dataclasses.replace(fsdp_run.cfg, out=str(fsdp_run.root / "faults"))
    out = Path(cfg.out)

    # Rank 1 dies (SIGKILL) in step 3: the launch fails promptly instead of hanging, and the
    # step-2 checkpoint is the one left.
    rc, _, err, seconds = torchrun(cli_args(cfg), fault="1:3:kill")
    assert rc != 0 and seconds < 120, err[-3000:]
    assert latest_checkpoint(out).name == "step-00000002"
    assert not (out / "student").exists()

    # Resume; in its first step (step 3) the launcher gets SIGTERM: every rank finishes the step,
    # writes its part of the step-3 checkpoint, and exits.
    resume = ["--resume", cfg.out, "--no-progress"]
    rc, _, err, _ = torchrun(resume, fault="0:1:sigterm-launcher")
    assert rc != 0, err[-3000:]
    assert_ended_without_abort(err)
    assert err.count("SIGTERM received: finishing this step") == 2, err[-3000:]
    checkpoint = latest_checkpoint(out)
    assert checkpoint.name == "step-00000003"
    assert sorted(p.name for p in (checkpoint / "dcp").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    assert not list((out / "checkpoints").glob(".tmp-step-*"))

    # One byte of rank 1's step-3 shard flips on disk: rank 0 finds it against the checksum,
    # and both ranks resume from step 2 instead.
    shard = checkpoint / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))

    # The last resume, with the teacher replicated instead of sharded (where it runs is not part
    # of the run), completes: the same parameters, bit for bit, and the same log.
    rc, _, err, _ = torchrun([*resume, "--teacher-placement", "replicate"])
    assert_clean(rc, err)
    assert err.count(f"{shard} is damaged") == 1, err[-3000:]  # rank 0 tells
    assert "resuming from the previous checkpoint, step-00000002" in err
    assert (out / "checkpoints" / "damaged-step-00000003").is_dir()
    want, got = weights(fsdp_run.cfg.out), weights(out)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert untimed(log_records(out)) == untimed(log_records(fsdp_run.cfg.out))


def test_nan_from_one_ranks_teacher_stops_every_rank_before_the_step(fsdp_run):
    """One rank's teacher gives NaN: the loss is summed over the ranks before the update, so every
    rank raises the same error at the same step, the launch ends promptly (no hang, no abort),
    and the checkpoint on disk is the one before."""
    cfg = dataclasses.replace(fsdp_run.cfg, out=str(fsdp_run.root / "nan"))
    out = Path(cfg.out)
    rc, _, err, _ = torchrun([*cli_args(cfg), "--stop-after", "2"])
    assert_clean(rc, err)
    assert latest_checkpoint(out).name == "step-00000002"
    rc, _, err, seconds = torchrun(["--resume", cfg.out, "--no-progress"], fault="1:0:nan-teacher")
    assert rc != 0 and seconds < 120, err[-3000:]
    assert_ended_without_abort(err)
    assert err.count("fastkd distill: error: distill: step 3 of 4: the KD term is not finite "
                     "while the student's cross-entropy is: the teacher's outputs hold NaN") == 2, (
        err[-3000:])
    assert latest_checkpoint(out).name == "step-00000002"
    assert not list((out / "checkpoints").glob("*step-00000003"))


# LoRA students: rank-4 adapters on every linear layer (the output layer included), base frozen.
LORA = {"lora_r": 4, "lora_alpha": 8.0}
HEAD = "base_model.model.lm_head.lora_"  # the output layer's adapter, as PEFT saves it


def adapter(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def lora_one(assets, tmp_path_factory):
    """The LoRA run in one process."""
    one = run_distillation(config(assets, tmp_path_factory.mktemp("lora") / "one", assets.student,
                                  **LORA))
    assert one["status"] == "completed"
    return one


def test_lora_fsdp_two_processes_equal_one_and_resume_exactly(assets, lora_one, tmp_path):
    """FSDP2 over a LoRA student: the adapters (and the merged export) equal one process's, as do
    the logged losses; the checkpoints' DCP shards hold the adapters alone, so the base cannot
    drift; stopped after 2 steps and resumed, the run equals the uninterrupted one bit for bit."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from fastkd import lora

    cfg = config(assets, tmp_path / "two", assets.student, parallel="fsdp", **LORA)
    rc, _, err, _ = torchrun(cli_args(cfg))
    assert_clean(rc, err)
    got, want = adapter(cfg.out), adapter(lora_one["run_dir"])
    assert_same_training(got, want, log_records(cfg.out), lora_one["history"])
    assert_same_training(weights(cfg.out), weights(lora_one["run_dir"]), [], [])
    # The output layer's adapter moved: B from 0, A from its seeded initial value.
    model = AutoModelForCausalLM.from_pretrained(assets.student)
    torch.manual_seed(OPTIONS["seed"])
    initial_a = lora.add_lora(model, 4, 8.0, None).lm_head.lora_A["default"].weight
    assert got[HEAD + "B.weight"].abs().max() > 1e-3
    assert (got[HEAD + "A.weight"] - initial_a).abs().max() > 1e-3
    # The base did not move: the shards hold the trained parameters alone, the frozen base is
    # the initial model's on resume, and the merged export keeps the unadapted weights as they were.
    dcp_to_torch_save(latest_checkpoint(cfg.out) / "dcp", tmp_path / "dcp.pt")
    shards = torch.load(tmp_path / "dcp.pt", weights_only=True)["model"]
    assert len(shards) == len(got) and all("lora_" in name for name in shards)
    initial = load_file(str(assets.student / "model.safetensors"))
    for name in ("model.norm.weight", "model.embed_tokens.weight"):
        assert torch.equal(weights(cfg.out)[name], initial[name]), name

    resumed = dataclasses.replace(cfg, out=str(tmp_path / "resumed"))
    rc, _, err, _ = torchrun([*cli_args(resumed), "--stop-after", "2"])
    assert_clean(rc, err)
    assert latest_checkpoint(resumed.out).name == "step-00000002"
    rc, _, err, _ = torchrun(["--resume", resumed.out, "--no-progress"])
    assert_clean(rc, err)
    for run in (weights, adapter):
        want, got = run(cfg.out), run(resumed.out)
        assert want.keys() == got.keys()
        assert all(torch.equal(got[name], want[name]) for name in want)
    assert untimed(log_records(resumed.out)) == untimed(log_records(cfg.out))


def test_lora_ddp_two_processes_equal_one_and_export_loads(assets, lora_one, tmp_path):
    """DDP over a LoRA student equals one process; the merged export is a plain HF model whose
    logits are the base's with the adapter (PEFT)."""
    from peft import PeftModel

    cfg = config(assets, tmp_path / "two", assets.student, parallel="ddp", **LORA)
    rc, _, err, _ = torchrun(cli_args(cfg))
    assert_clean(rc, err)
    assert_same_training(adapter(cfg.out), adapter(lora_one["run_dir"]), log_records(cfg.out),
                         lora_one["history"])
    assert_same_training(weights(cfg.out), weights(lora_one["run_dir"]), [], [])
    merged = AutoModelForCausalLM.from_pretrained(Path(cfg.out) / "student")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets.student),
                                     str(Path(cfg.out) / "adapter"))
    ids = torch.arange(16).unsqueeze(0)
    torch.testing.assert_close(merged(input_ids=ids).logits, peft(input_ids=ids).logits,
                               rtol=1e-4, atol=1e-5)
