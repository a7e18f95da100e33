"""The teacher cache (`fastkd cache-teacher`) and distillation from it, on tiny random Llamas:
the compact rows against the teacher's own logits, the fixed (/1) layout, format /1 caches still
read, resume after an interruption, integrity (corrupted and truncated shards and manifests,
swapped splits, a newer format), the faults an independent check found (a NaN teacher, a padded
teacher vocabulary, a cache used with another teacher, a corrupted shard on rerun), mismatched
runs, and `fastkd distill --teacher-cache` end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _trainer_fixtures import build_tokenizer, corpus_texts, save_llama
from safetensors.torch import load_file, save_file

from fastkd import cache as cache_mod
from fastkd import cache_write
from fastkd.cache import TeacherCache
from fastkd.cache_format import VERSION, write_manifest
from fastkd.cache_teacher import cache_teacher
from fastkd.cli import main
from fastkd.config import DistillConfig
from fastkd.fsio import sha256_file
from fastkd.models import load_lm
from fastkd.plans import CachePlan
from fastkd.store import load_blocks
from fastkd.trainer import run_distillation

SEQ_LEN, TEMPERATURE, STEP = 24, 2.0, 0.125


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_assets")
    texts = corpus_texts()[:3]
    tokenizer = build_tokenizer(root / "tokenizer", texts=texts)
    data = root / "data.txt"
    data.write_text("\n\n".join(t[:2500] for t in texts))
    return SimpleNamespace(
        root=root, tokenizer=tokenizer, data=[str(data)],
        teacher=save_llama(root / "teacher", tokenizer, hidden=32, seed=1),
        student=save_llama(root / "student", tokenizer, hidden=16, seed=2),
        # a student whose head scales its logits (Cohere: times logit_scale)
        cohere=save_llama(root / "cohere", tokenizer, hidden=16, seed=2, arch="cohere",
                          logit_scale=0.5, initializer_range=0.1),
    )


def plan(assets, out, **kw):
    base = dict(teacher=str(assets.teacher), data=assets.data, out=str(out), mode="topk", k=6,
                temperature=TEMPERATURE, seq_len=SEQ_LEN, batch_size=16, shard_sequences=16,
                progress=False)
    return CachePlan(**{**base, **kw})


@pytest.fixture(scope="module")
def topk_cache(assets):
    out = assets.root / "topk"
    cache_teacher(plan(assets, out))
    return out


@pytest.fixture(scope="module")
def fixed_cache(assets):
    out = assets.root / "fixed"
    cache_teacher(plan(assets, out, layout="fixed"))
    return out


def teacher_logprobs(assets, batch, vocab=None):
    """log softmax(t / T) of the teacher over the tokenizer's ids, (B, L-1, V)."""
    teacher = load_lm(str(assets.teacher), "teacher", torch.float32, torch.device("cpu"))
    with torch.no_grad():
        h = teacher.hidden(batch.input_ids, batch.attention_mask)[:, :-1]
        logits = h @ teacher.weight[:vocab].T
    return torch.log_softmax(logits / TEMPERATURE, -1)


def by_id(ids, values):
    """Rows sorted by id (unused slots last): compares target sets whatever their slot order."""
    order = torch.where(ids >= 0, ids.long(), 1 << 40).argsort(-1)
    return ids.long().gather(-1, order), values.float().gather(-1, order)


def test_compact_round_trip_matches_the_teacher(assets, topk_cache, fixed_cache):
    cache = TeacherCache(topk_cache)
    m = cache.manifest
    assert m["format"] == f"fastkd-teacher-cache/{VERSION}" and m["layout"] == "compact"
    assert m["complete"] and m["mode"] == "topk" and m["k"] == 6 and m["vocab"] == 320
    assert m["data"][0]["sha256"] == sha256_file(Path(assets.data[0]))
    assert len([s for s in m["shards"] if s["split"] == "train"]) > 1  # several shards
    train, heldout = (r.load() for r in load_blocks(assets.data, assets.tokenizer, SEQ_LEN,
                                                    0.05))
    cached_train, cached_heldout = cache.blocks("train"), cache.blocks("heldout")
    assert torch.equal(cached_train.input_ids, train.input_ids)
    assert torch.equal(cached_heldout.attention_mask, heldout.attention_mask)
    # the last sequence ends in padding: its positions that do not count carry no targets
    rows = torch.tensor([0, 17, len(train) - 1])
    batch = cached_train.select(rows)
    ids, logprobs = batch.targets.load()
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float32
    assert ids.shape == (3, SEQ_LEN - 1, 6)
    counted = batch.attention_mask[:, 1:].bool()
    assert not counted.all() and (ids[~counted] == -1).all() and (ids[counted] >= 0).all()
    want_lp, want_ids = teacher_logprobs(assets, batch).topk(6, -1)
    # the same ids, the argmax first; each log-probability within the codec's bound (2.5 step)
    assert torch.equal(ids[counted][:, 0].long(), want_ids[counted][:, 0])
    got_ids, got_lp = by_id(ids[counted], logprobs[counted])
    exp_ids, exp_lp = by_id(want_ids[counted], want_lp[counted])
    assert torch.equal(got_ids, exp_ids)
    err = (got_lp - exp_lp).abs()
    assert err.max() <= 2.5 * STEP and err.mean() < STEP / 2
    # the row's mass is kept (to the grid's rounding of log(P / (1 - P)))
    mass_err = (got_lp.exp().sum(-1) - exp_lp.exp().sum(-1)).abs()
    assert mass_err.max() < STEP / 2
    # the fixed layout: fp16 log-probabilities, 6 int32 ids a position, every position
    fixed = TeacherCache(fixed_cache)
    f_ids, f_lp = fixed.blocks("train").select(rows).targets.load()
    assert f_lp.dtype == torch.float16
    assert torch.equal(f_ids[counted].long(), want_ids[counted])
    torch.testing.assert_close(f_lp[counted].float(), want_lp[counted], rtol=2e-3, atol=2e-3)
    # everything in the directory counts: compact < fixed
    assert cache.bytes_per_position() < 0.6 * fixed.bytes_per_position()
    assert cache.disk_bytes() == sum(p.stat().st_size for p in topk_cache.iterdir())


def legacy_copy(fixed_dir: Path, out: Path) -> Path:
    """The fixed-layout cache as format /1 wrote it (shards train-00000.safetensors ...)."""
    m = json.loads((fixed_dir / "manifest.json").read_text())
    out.mkdir()
    shards, counters = [], {"train": 0, "heldout": 0}
    for entry in m["shards"]:
        t = load_file(str(fixed_dir / entry["file"]))
        name = f"{entry['split']}-{counters[entry['split']]:05d}.safetensors"
        counters[entry["split"]] += 1
        mask = t["blocks.attention_mask"]
        bits = ((mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(1)
        save_file({"input_ids": load_cached_ids(fixed_dir, entry).int(),
                   "attention_mask": bits[:, :SEQ_LEN].to(torch.int8),
                   "ids": t["ids"], "logprobs": t["logprobs"]}, str(out / name))
        shards.append({"file": name, "split": entry["split"], "rows": entry["rows"],
                       "first": entry["first"], "sha256": sha256_file(out / name)})
    old = {k: m[k] for k in ("teacher", "tokenizer", "temperature", "mode", "k", "samples",
                             "seq_len", "eval_fraction", "dtype", "seed", "shard_sequences",
                             "data", "split")}
    (out / "manifest.json").write_text(json.dumps({"format": "fastkd-teacher-cache/1", **old,
                                                   "shards": shards, "complete": True}))
    return out


def load_cached_ids(cache_dir: Path, entry: dict) -> torch.Tensor:
    from fastkd.cache_reader import CacheReader

    shard = next(s for s in CacheReader(cache_dir, verify=False).splits[entry["split"]]
                 if s.entry["file"] == entry["file"])
    return shard.blocks()["input_ids"]


def test_format_1_caches_still_read_and_are_checked(assets, fixed_cache, tmp_path):
    legacy = legacy_copy(fixed_cache, tmp_path / "v1")
    old, new = TeacherCache(legacy), TeacherCache(fixed_cache)
    rows = torch.arange(5)
    a, b = old.blocks("train").select(rows), new.blocks("train").select(rows)
    assert torch.equal(a.input_ids, b.input_ids)
    for x, y in zip(a.targets.load(), b.targets.load(), strict=True):
        assert torch.equal(x, y)
    assert old.max_id == new.max_id
    # a format /1 writer checked nothing: a NaN in a shard is found when the cache is opened
    shard = legacy / "train-00001.safetensors"
    tensors = load_file(str(shard))
    tensors["logprobs"][3, 2, 1] = float("nan")
    save_file(tensors, str(shard))
    m = json.loads((legacy / "manifest.json").read_text())
    m["shards"][1]["sha256"] = sha256_file(shard)
    (legacy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="train-00001.safetensors holds non-finite"):
        TeacherCache(legacy)
    # and an old cache is not extended by a new writer
    with pytest.raises(ValueError, match="holds a cache of format fastkd-teacher-cache/1"):
        cache_teacher(plan(assets, legacy, layout="fixed"))


def test_sampled_cache_resumes_identically(assets, monkeypatch):
    full = assets.root / "sample_full"
    cache_teacher(plan(assets, full, mode="sample", k=8, samples=8))
    part = assets.root / "sample_part"
    writes = []
    real_write = cache_write.write_shard

    def killed_after_two_shards(*args):
        if len(writes) == 2:
            raise KeyboardInterrupt  # the run dies mid-way
        writes.append(real_write(*args))
        return writes[-1]

    monkeypatch.setattr(cache_write, "write_shard", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(plan(assets, part, mode="sample", k=8, samples=8))
    monkeypatch.setattr(cache_write, "write_shard", real_write)
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(part)
    assert len(list(part.glob("*.safetensors"))) == 2
    cache_teacher(plan(assets, part, mode="sample", k=8, samples=8))  # resumes
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (full, part))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    # sampled targets: distinct ids, log(count / samples), counts summing to `samples`, drawn
    # from the teacher: the draws' mean log-likelihood is the teacher's (minus entropy) within
    # the sampling noise
    batch = TeacherCache(full).blocks("train").select(torch.arange(12))
    ids, logprobs = batch.targets.load()
    counted = batch.attention_mask[:, 1:].bool()
    used = ids >= 0
    counts = (logprobs.exp() * 8).round()
    assert torch.allclose(logprobs.exp() * 8, counts, atol=1e-5)
    assert ((counts * used).sum(-1)[counted] == 8).all()
    assert (used.sum(-1)[~counted] == 0).all()
    lp = teacher_logprobs(assets, batch)
    drawn = (lp.gather(-1, ids.long().clamp(min=0)) * counts * used).sum(-1)[counted] / 8
    entropy = -(lp.exp() * lp).sum(-1)[counted]
    assert abs((drawn + entropy).mean()) < 4 * (drawn + entropy).std() / math.sqrt(len(drawn))
    with pytest.raises(ValueError, match="holds a different teacher cache"):
        cache_teacher(plan(assets, full, mode="sample", k=8, samples=4))


def test_corrupted_truncated_and_edited_caches(assets, topk_cache, tmp_path, caplog):
    bad = tmp_path / "bad"
    shutil.copytree(topk_cache, bad)
    m = json.loads((bad / "manifest.json").read_text())
    shard = bad / m["shards"][1]["file"]
    good = shard.read_bytes()
    data = bytearray(good)
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name} is corrupted"):
        TeacherCache(bad)
    # unverified, the corrupted stream still fails to decode, naming the shard
    cache = TeacherCache(bad, verify=False)
    with pytest.raises(ValueError, match=f"{shard.name} is corrupted"):
        cache.blocks("train").select(torch.arange(16, 32)).targets.load()
    shard.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(ValueError, match=shard.name):
        TeacherCache(bad)
    # rerunning cache-teacher over the complete cache rewrites the truncated shard
    caplog.set_level("WARNING", logger="fastkd")
    cache_teacher(plan(assets, bad))
    assert f"{shard.name} does not check out" in caplog.text
    assert shard.read_bytes() == good
    TeacherCache(bad)
    # the manifest: truncated, a newer format, swapped splits (checksum, then shard metadata)
    manifest = bad / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=f"{manifest} is not valid JSON"):
        TeacherCache(bad)
    m = json.loads(text)
    write_manifest(bad, {**m, "format": f"fastkd-teacher-cache/{VERSION + 1}"})
    with pytest.raises(ValueError, match=f"{manifest} was written by a newer fastkd"):
        TeacherCache(bad)
    train = [s for s in m["shards"] if s["split"] == "train"]
    held = [s for s in m["shards"] if s["split"] == "heldout"]
    swapped = [{**train[0], "split": "heldout"}, *train[1:], {**held[0], "split": "train"}]
    manifest.write_text(json.dumps({**m, "shards": swapped}))
    with pytest.raises(ValueError, match="checksum does not match"):
        TeacherCache(bad)
    write_manifest(bad, {**m, "shards": swapped})  # a careful edit, with its checksum: caught
    with pytest.raises(ValueError, match="does not belong where the manifest puts it"):
        TeacherCache(bad)


def test_mismatched_runs_are_refused(assets, topk_cache, tmp_path):
    cache = TeacherCache(topk_cache)
    with pytest.raises(ValueError, match="temperature is 1.0, the cache's is 2.0"):
        cache.check_run(assets.tokenizer, SEQ_LEN, 1.0, 0.05, assets.data)
    with pytest.raises(ValueError, match="seq_len is 32, the cache's is 24"):
        cache.check_run(assets.tokenizer, 32, TEMPERATURE, 0.05, assets.data)
    other = build_tokenizer(tmp_path / "tok", vocab_size=300, texts=corpus_texts()[:2])
    with pytest.raises(ValueError, match="tokenizer .* differs from the cache's"):
        cache.check_run(other, SEQ_LEN, TEMPERATURE, 0.05, assets.data)
    changed = tmp_path / "changed.txt"
    changed.write_text(Path(assets.data[0]).read_text() + "x")
    with pytest.raises(ValueError, match="data files"):
        cache.check_run(assets.tokenizer, SEQ_LEN, TEMPERATURE, 0.05, [str(changed)])
    # `--teacher-cache C --teacher X`: X must be C's own teacher
    base = dict(student=str(assets.student), data=assets.data, steps=1, warmup=0, batch_size=4,
                seq_len=SEQ_LEN, temperature=TEMPERATURE, baseline=False, report=False,
                progress=False, teacher_cache=str(topk_cache))
    run = tmp_path / "other-teacher"
    with pytest.raises(ValueError, match="was made from the teacher .* not from --teacher"):
        run_distillation(DistillConfig(teacher=str(assets.student), out=str(run), **base))
    assert not run.exists()
    same = run_distillation(DistillConfig(teacher=str(assets.teacher), out=str(tmp_path / "ok"),
                                          **base))
    assert same["status"] == "completed"


def test_nan_teacher_is_refused_naming_the_sequence(assets, tmp_path):
    # the teacher's embedding of one rare token is NaN: the sequences holding it give NaN
    train = load_blocks(assets.data, assets.tokenizer, SEQ_LEN, 0.05)[0].load()
    counts = torch.bincount(train.input_ids.flatten(), minlength=320)
    token = int(torch.where(counts > 0, counts, 10**9).argmin())
    first = int((train.input_ids == token).any(1).nonzero()[0])
    weights = load_file(str(assets.teacher / "model.safetensors"))
    weights["model.embed_tokens.weight"][token] = float("nan")
    nan_teacher = tmp_path / "nan_teacher"
    shutil.copytree(assets.teacher, nan_teacher)
    save_file(weights, str(nan_teacher / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "cache"
    with pytest.raises(ValueError, match=rf"non-finite logits .* on train sequence {first}, "):
        cache_teacher(plan(assets, out, teacher=str(nan_teacher), shard_sequences=1024))
    assert not list(out.glob("*.safetensors"))  # nothing written for the bad shard
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(out)


def test_padded_scaled_teacher_caches_only_the_tokenizers_ids_of_its_logits(assets, tmp_path):
    # 384 head rows over a 320-token tokenizer: the padding rows are never cached, and the
    # log-probabilities are over the 320 shared ids (as the dense loss compares them); a Granite
    # teacher, whose head divides its logits by logits_scaling: the cached log-probabilities are
    # those of the model's own (scaled) logits
    padded = save_llama(tmp_path / "padded", assets.tokenizer, hidden=32, vocab_size=384, seed=3,
                        arch="granite", logits_scaling=0.25, initializer_range=0.1)
    out = tmp_path / "cache"
    cache_teacher(plan(assets, out, teacher=str(padded), k=8, layout="fixed"))
    cache = TeacherCache(out)
    assert cache.manifest["vocab"] == 320 and cache.max_id < 320
    batch = cache.blocks("train").select(torch.arange(4))
    ids, lp = batch.targets.load()
    counted = batch.attention_mask[:, 1:].bool()
    teacher = load_lm(str(padded), "teacher", torch.float32, torch.device("cpu"))
    assert teacher.logit_scale == 4.0
    with torch.no_grad():
        logits = teacher.model(input_ids=batch.input_ids,
                               attention_mask=batch.attention_mask).logits[:, :-1, :320]
        want_lp, want_ids = torch.log_softmax(logits / TEMPERATURE, -1).topk(8, -1)
    assert torch.equal(ids[counted].long(), want_ids[counted])
    torch.testing.assert_close(lp[counted].float(), want_lp[counted], rtol=2e-3, atol=2e-3)
    # the cache's largest id is checked against the student when the cache is opened
    cache.check_student("student", rows=320)
    with pytest.raises(ValueError, match=rf"ids up to {cache.max_id}, but the student small "
                                         rf"has only {cache.max_id} output rows"):
        cache.check_student("small", rows=cache.max_id)


def test_distill_from_cache_cli(assets, topk_cache, tmp_path, capsys):
    # `fastkd cache-teacher` (sampled) then `fastkd distill --teacher-cache` with no teacher
    sampled = tmp_path / "sampled"
    assert main(["cache-teacher", "--teacher", str(assets.teacher), "--data", *assets.data,
                 "--out", str(sampled), "--mode", "sample", "--k", "8", "--temperature",
                 str(TEMPERATURE), "--seq-len", str(SEQ_LEN), "--shard-sequences", "64",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "shards" in out
    for cache_dir, name in ((sampled, "ignore"), (topk_cache, "bucket")):
        run = tmp_path / f"run-{name}"
        code = main(["distill", "--teacher-cache", str(cache_dir), "--student",
                     str(assets.student), "--data", *assets.data, "--out", str(run),
                     "--steps", "4", "--warmup", "1", "--batch-size", "4", "--seq-len",
                     str(SEQ_LEN),
                     "--temperature", str(TEMPERATURE), "--eval-every", "2",
                     "--eval-sequences", "8", "--no-baseline", "--no-progress",
                     "--tokenizer", str(assets.root / "tokenizer"),
                     *(["--no-report"] if name == "bucket" else [])])
        assert code == 0
        log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
        assert log[-1]["step"] == 4
        assert all(math.isfinite(r["eval_kd"]) and r["eval_kd"] >= 0 for r in log
                   if "eval_kd" in r)
        # the KD term trained from the cache is logged like one trained from the teacher
        assert all(r["kd"] > 0 and math.isfinite(r["kd"]) for r in log if r["step"] > 0)
        assert (run / "student" / "model.safetensors").is_file()
    # the sampled run's report: the plug-in KL estimate, no agreement (not the teacher's argmax)
    report = json.loads((tmp_path / "run-ignore" / "report.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert rows["teacher"]["perplexity"] is None
    assert rows["distilled student"]["top1_agreement"] is None
    assert rows["distilled student"]["kl_to_teacher"] > 0
    assert report["teacher_cache"]["kl_tail"] == "ignore"
    assert "plug-in estimate" in (tmp_path / "run-ignore" / "report.md").read_text()
    assert "| model | params |" in capsys.readouterr().out
    # a run whose temperature differs from the cache's is refused, naming both
    with pytest.raises(SystemExit) as exc:
        main(["distill", "--teacher-cache", str(topk_cache), "--student", str(assets.student),
              "--data", *assets.data, "--out", str(tmp_path / "refused"), "--seq-len",
              str(SEQ_LEN), "--temperature", "1.0", "--no-baseline", "--no-report",
              "--tokenizer", str(assets.root / "tokenizer")])
    assert exc.value.code == 2
    assert "temperature is 1.0, the cache's is 2.0" in capsys.readouterr().err


def test_distill_from_cache_api_matches_online_kd(assets, fixed_cache, tmp_path):
    # the cached run's first held-out KD (bucket tail, k = 6 of the teacher's ids) is a lower
    # bound of the online run's full-vocabulary KL: coarsening can only lose divergence
    base = dict(student=str(assets.student), data=assets.data, steps=1, warmup=0, batch_size=4,
                seq_len=SEQ_LEN, temperature=TEMPERATURE, eval_every=1, eval_sequences=8,
                baseline=False, report=False, progress=False,
                tokenizer=str(assets.root / "tokenizer"))
    cached = run_distillation(DistillConfig(teacher=None, out=str(tmp_path / "c"),
                                            teacher_cache=str(fixed_cache), **base))
    online = run_distillation(DistillConfig(teacher=str(assets.teacher), out=str(tmp_path / "o"),
                                            **base))
    kd_cached, kd_online = cached["history"][0]["eval_kd"], online["history"][0]["eval_kd"]
    assert 0 < kd_cached <= kd_online * (1 + 1e-3)
    assert cached["history"][0]["eval_ce"] == pytest.approx(online["history"][0]["eval_ce"],
                                                            rel=1e-5)


def test_prefetched_targets_train_exactly_as_direct_loads(assets, topk_cache, tmp_path,
                                                         monkeypatch):
    """`fastkd distill --teacher-cache` decodes each step's cached targets, and the next step's,
    on a background thread (fastkd.cache.Prefetch). The run is bit-identical to one that loads
    every batch directly, with gradient accumulation, through a stop and a resume; every training
    load ran on that thread (none in the step's own thread), the held-out ones directly."""
    import threading

    from fastkd import loop

    threads = {"train": set(), "heldout": set()}
    load = cache_mod.CacheRows.load

    def recorded(rows):
        threads[rows.split].add(threading.current_thread().name)
        return load(rows)

    monkeypatch.setattr(cache_mod.CacheRows, "load", recorded)
    base = DistillConfig(teacher=None, teacher_cache=str(topk_cache), student=str(assets.student),
                         data=assets.data, out=str(tmp_path / "prefetch"), steps=5, warmup=1,
                         batch_size=4, grad_accum=2, seq_len=SEQ_LEN, temperature=TEMPERATURE,
                         eval_every=3, save_every=2, eval_sequences=8, baseline=False,
                         report=False, progress=False, tokenizer=str(assets.root / "tokenizer"))
    assert run_distillation(dataclasses.replace(base, stop_after=3))["status"] == "stopped"
    assert run_distillation(dataclasses.replace(DistillConfig.load(base.out), resume=True))[
        "status"] == "completed"
    assert threads["train"] and all(t.startswith("fastkd-cache") for t in threads["train"]), threads
    assert threads["heldout"] == {threading.main_thread().name}

    monkeypatch.setattr(loop, "Prefetch", lambda: None)  # every batch loaded when it is used
    direct = dataclasses.replace(base, out=str(tmp_path / "direct"))
    assert run_distillation(direct)["status"] == "completed"
    assert threading.main_thread().name in threads["train"]
    want, got = (load_file(str(Path(d) / "student" / "model.safetensors"))
                 for d in (direct.out, base.out))
    for name in want:
        assert torch.equal(want[name], got[name]), name


@pytest.fixture(scope="module")
def sampled_cache(assets):
    out = assets.root / "sampled"
    cache_teacher(plan(assets, out, mode="sample", k=8, samples=8))
    return out


def held_tensor_bytes(*roots) -> int:
    """Bytes of every tensor reachable from roots through Python objects (classes, functions
    and modules not followed): what those objects keep in memory."""
    import gc
    import types

    seen, stack, total = set(), list(roots), 0
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, (type, types.ModuleType, types.FunctionType)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            total += obj.untyped_storage().nbytes()
        else:
            stack.extend(gc.get_referents(obj))
    return total


@pytest.mark.parametrize("mode", ["topk", "sample"])
def test_a_cache_is_read_on_demand_and_holds_no_sequence(assets, topk_cache, sampled_cache,
                                                         monkeypatch, mode):
    """Training from a cache reads a batch's sequences when it is taken and their targets when
    they are loaded, as the token store's rows do: opening the cache, its rows and `Batches`
    read no sequence, a batch reads its own, and the process holds no sequence's fields,
    counted positions, stream offsets or row sizes: none for a top-k cache, one int64 a sequence
    (where its rows start) for a sampled one, a twentieth of what every sequence decoded at open
    would hold (over 400 bytes a sequence here). The batches (fields and targets) equal those of
    the same sequences all in memory, in Batches' seeded order, past an epoch and through a
    resume."""
    from fastkd.cache_reader import Shard
    from fastkd.data import Batches

    read = {"fields": 0, "targets": 0, "whole shards": 0}
    blocks, targets = Shard.blocks, Shard.targets

    def counted_blocks(shard, local=None):
        if local is None:
            read["whole shards"] += 1
        else:
            read["fields"] += len(local)
        return blocks(shard, local)

    def counted_targets(shard, local, counted, width):
        read["targets"] += len(local)
        return targets(shard, local, counted, width)

    monkeypatch.setattr(Shard, "blocks", counted_blocks)
    monkeypatch.setattr(Shard, "targets", counted_targets)
    cache = TeacherCache(topk_cache if mode == "topk" else sampled_cache)
    rows = cache.rows("train")
    batches = Batches(rows, 4, seed=3)
    assert read == {"fields": 0, "targets": 0, "whole shards": 0}
    assert held_tensor_bytes(cache, rows, batches) == batches._order.nbytes  # the seeded order
    batch = next(batches)
    assert read["fields"] == 4 and read["targets"] == 0
    batch.targets.load()
    assert read["fields"] == 4 and read["targets"] == 4

    monkeypatch.setattr(Shard, "blocks", blocks)
    monkeypatch.setattr(Shard, "targets", targets)
    in_memory = Batches(cache.blocks("train"), 4, seed=3)
    in_memory.load_state_dict(batches.state_dict())
    epoch = len(rows) // 4
    for step in range(epoch + 2):
        if step == epoch // 2:  # a resume: a new Batches at the saved position
            state, batches = batches.state_dict(), Batches(rows, 4, seed=3)
            batches.load_state_dict(state)
        got, want = next(batches), next(in_memory)
        for name in ("input_ids", "attention_mask", "counted", "position_ids"):
            a, b = getattr(got, name), getattr(want, name)
            assert (a is None and b is None) or torch.equal(a, b), name
        for a, b in zip(got.targets.load(), want.targets.load(), strict=True):
            assert torch.equal(a, b)
    assert rows.index is None  # the whole split: no index either
    kept = held_tensor_bytes(cache, rows)
    sequences, shards = cache.sequences("train"), len(cache.splits["train"])
    assert kept == 0 if mode == "topk" else 0 < kept <= 8 * (sequences + shards)
    assert 20 * 8 * (sequences + shards) < held_tensor_bytes(cache.blocks("train"))


def test_training_from_a_cache_on_disk_equals_it_in_memory(assets, sampled_cache, tmp_path,
                                                            monkeypatch):
    """A run from a cache whose sequences stay on disk (stopped and resumed, with gradient
    accumulation) trains the same weights, bit for bit, with the same records, as an
    uninterrupted run with every sequence of the cache in memory."""
    from fastkd import trainer

    base = DistillConfig(teacher=None, teacher_cache=str(sampled_cache),
                         student=str(assets.student), data=assets.data,
                         out=str(tmp_path / "disk"), steps=5, warmup=1, batch_size=4,
                         grad_accum=2, seq_len=SEQ_LEN, temperature=TEMPERATURE, eval_every=3,
                         save_every=2, eval_sequences=8, baseline=False, report=False,
                         progress=False, tokenizer=str(assets.root / "tokenizer"))
    assert run_distillation(dataclasses.replace(base, stop_after=3))["status"] == "stopped"
    disk = run_distillation(dataclasses.replace(DistillConfig.load(base.out), resume=True))
    open_cache = trainer._open_cache

    def in_memory(config, tokenizer):
        train, heldout, tail = open_cache(config, tokenizer)
        return train.load(), heldout.load(), tail

    monkeypatch.setattr(trainer, "_open_cache", in_memory)
    memory = run_distillation(dataclasses.replace(base, out=str(tmp_path / "memory")))
    assert disk["status"] == memory["status"] == "completed"
    untimed = [[{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")}
                for r in run["history"]] for run in (disk, memory)]
    assert untimed[0] == untimed[1]
    want, got = (load_file(str(tmp_path / d / "student" / "model.safetensors"))
                 for d in ("memory", "disk"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_report_from_a_topk_cache_measures_kl_on_the_cached_rows(assets, fixed_cache, tmp_path):
    # the report of an offline run: no teacher model; the students' KL is the bucket KL on the
    # cached top-k ids at the cache's temperature, checked here against the teacher's own logits
    from transformers import AutoModelForCausalLM

    result = run_distillation(DistillConfig(
        teacher=None, teacher_cache=str(fixed_cache), student=str(assets.student),
        data=assets.data, out=str(tmp_path / "run"), steps=2, warmup=0, batch_size=4,
        seq_len=SEQ_LEN, temperature=TEMPERATURE, eval_every=2, eval_sequences=5,
        baseline=True, progress=False, tokenizer=str(assets.root / "tokenizer")))
    rows = {row["model"]: row for row in result["report"]["rows"]}
    assert list(rows) == ["teacher", "distilled student", "hard-label student (same budget)",
                          "distilled student, int8 dynamic"]
    teacher_row = rows["teacher"]
    assert teacher_row["perplexity"] is None and teacher_row["kl_to_teacher"] is None
    assert teacher_row["tokens_per_s"] is None
    teacher = AutoModelForCausalLM.from_pretrained(assets.teacher, dtype=torch.float64)
    assert teacher_row["params"] == sum(p.numel() for p in teacher.parameters())
    assert teacher_row["size_bytes"] > 0

    # independent float64 check on the 5 held-out sequences (the cache's held-out split)
    heldout = TeacherCache(fixed_cache).blocks("heldout").select(torch.arange(5))
    student = AutoModelForCausalLM.from_pretrained(result["distill"]["student_dir"],
                                                   dtype=torch.float64)
    with torch.no_grad():
        t = teacher(input_ids=heldout.input_ids).logits[:, :-1].flatten(0, 1)
        s = student(input_ids=heldout.input_ids).logits[:, :-1].flatten(0, 1)
    labels = heldout.input_ids[:, 1:].flatten()
    valid = heldout.attention_mask[:, 1:].flatten().bool()
    log_p, log_q = (torch.log_softmax(x / TEMPERATURE, -1) for x in (t, s))
    top = log_p.topk(6, -1).indices
    p_k, q_k = log_p.gather(-1, top).exp(), log_q.gather(-1, top).exp()
    p_rest, q_rest = 1 - p_k.sum(-1), 1 - q_k.sum(-1)
    bucket_kl = (p_k * (p_k / q_k).log()).sum(-1) + p_rest * (p_rest / q_rest).log()
    full_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="none")
    agree = (s.argmax(-1) == t.argmax(-1)).double()
    distilled = rows["distilled student"]
    assert distilled["kl_to_teacher"] == pytest.approx(bucket_kl[valid].mean().item(), rel=1e-2)
    assert distilled["kl_to_teacher"] < full_kl[valid].mean().item()  # a lower bound
    assert distilled["perplexity"] == pytest.approx(math.exp(ce[valid].mean().item()), rel=1e-4)
    assert distilled["top1_agreement"] == pytest.approx(agree[valid].mean().item(), abs=1e-9)

    md = Path(result["report"]["md"]).read_text()
    assert "Offline run" in md and "lower bound" in md and "| teacher |" in md
    assert "n/a" in md and "Not measured" in md
    report = json.loads(Path(result["report"]["json"]).read_text())
    assert report["teacher_cache"]["mode"] == "topk" and report["teacher_cache"]["bytes"] > 0


def server_maps(assets, path: Path, k: int = 5, sequences: int = 12) -> list[dict]:
    """vLLM-style prompt_logprobs of the tiny teacher at T = 1 on sequences of 10..24 tokens:
    the top-k ids, plus the actual token where it is not among them (as vLLM returns them)."""
    train = load_blocks(assets.data, assets.tokenizer, SEQ_LEN, 0.05)[0].load()
    teacher = load_lm(str(assets.teacher), "teacher", torch.float32, torch.device("cpu"))
    records = []
    for i in range(sequences):
        ids = train.input_ids[i, :10 + (7 * i) % 15]
        with torch.no_grad():
            h = teacher.hidden(ids[None], torch.ones_like(ids)[None])[0]
            lp = torch.log_softmax(h @ teacher.weight.T, -1)  # position j predicts token j + 1
        entries = [None]
        for j in range(len(ids) - 1):
            if i % 3 == 0 and j < 4:  # a prompt: its positions do not count
                entries.append(None)
                continue
            top = lp[j].topk(k).indices.tolist()
            chosen = top + ([int(ids[j + 1])] if int(ids[j + 1]) not in top else [])
            entries.append({str(t): ({"logprob": lp[j, t].item(), "rank": 1,
                                      "decoded_token": "?"} if i % 2 else lp[j, t].item())
                            for t in chosen})
        records.append({"input_ids": ids.tolist(), "prompt_logprobs": entries})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_cache_import_of_server_logprobs(assets, tmp_path, capsys):
    maps = tmp_path / "maps.jsonl"
    records = server_maps(assets, maps)
    cache_dir = tmp_path / "imported"
    assert main(["cache-import", "--logprobs", str(maps), "--tokenizer",
                 str(assets.root / "tokenizer"), "--out", str(cache_dir), "--teacher",
                 "vllm:tiny", "--eval-fraction", "0.2", "--no-progress"]) == 0
    assert "bytes a counted position" in capsys.readouterr().out
    cache = TeacherCache(cache_dir)
    m = cache.manifest
    assert m["temperature"] == 1.0 and m["seq_len"] == 24 and m["k"] == 6
    assert m["split"] == {"seed": m["split"]["seed"], "train": 10, "heldout": 2}
    maps_given = sum(e is not None for r in records for e in r["prompt_logprobs"])
    assert m["positions"] == maps_given < sum(len(r["input_ids"]) - 1 for r in records)
    # every stored map is the server's (its ids; its log-probabilities within the grid's bound)
    seen = 0
    for split in ("train", "heldout"):
        blocks = cache.blocks(split)
        ids, lp = blocks.targets.load()
        for row in range(len(blocks)):
            length = int(blocks.attention_mask[row].sum())
            record = next(r for r in records
                          if r["input_ids"] == blocks.input_ids[row, :length].tolist())
            for j, entry in enumerate(record["prompt_logprobs"][1:]):
                if entry is None:  # a prompt position: nothing stored, no label
                    assert (ids[row, j] == -1).all() and blocks.labels(-100)[row, j + 1] == -100
                    continue
                want = {int(t): v["logprob"] if isinstance(v, dict) else v
                        for t, v in entry.items()}
                got = {int(t): float(v) for t, v in zip(ids[row, j], lp[row, j], strict=True)
                       if t >= 0}
                assert got.keys() == want.keys()
                assert max(abs(got[t] - want[t]) for t in want) <= 2.5 * STEP
                seen += 1
            assert (ids[row, length - 1:] == -1).all()  # padding stores nothing
    assert seen == m["positions"]
    # distillation from it, with the import as its data, at the import's temperature
    run = tmp_path / "run"
    assert main(["distill", "--teacher-cache", str(cache_dir), "--student", str(assets.student),
                 "--data", str(maps), "--out", str(run), "--steps", "2", "--warmup", "0",
                 "--batch-size", "2", "--seq-len", "24", "--temperature", "1",
                 "--eval-fraction", "0.2", "--eval-every", "2", "--no-baseline",
                 "--no-report", "--no-progress", "--tokenizer",
                 str(assets.root / "tokenizer")]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2 and log[-1]["kd"] > 0
    # bad input names the file and line
    lines = maps.read_text().splitlines()
    for edit, message in (
            (lambda r: r["prompt_logprobs"][3].update({"320": -9.0}),
             "id 320 exceeds the student's vocabulary: the tokenizer has 320 ids"),
            (lambda r: r["prompt_logprobs"][2].update({"7": float("nan")}),
             "the log-probability of id 7 is nan"),
            (lambda r: r["prompt_logprobs"][2].update({"7": -0.01, "8": -0.01}),
             "add up to more than 1"),
            (lambda r: r["prompt_logprobs"].pop(), "prompt_logprobs holds")):
        record = json.loads(lines[4])
        edit(record)
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join([*lines[:4], json.dumps(record), *lines[5:]]))
        with pytest.raises(ValueError, match=rf"{bad}:5: .*{message}"):
            from fastkd.cache_import import ImportPlan, import_logprobs

            import_logprobs(ImportPlan(str(bad), str(assets.root / "tokenizer"),
                                       str(tmp_path / "never"), progress=False))
    # a file that is not UTF-8 (a Latin-1 byte in line 5; UTF-16): named with the byte and line
    for data, message in ((("\n".join(lines[:4]) + "\n").encode() + b'{"input_ids": "\xe9"}\n',
                           r"not UTF-8 text: byte offset \d+ \(line 5\)"),
                          (lines[0].encode("utf-16-le"),
                           r"not UTF-8 text: byte offset 1 \(line 1\) is a NUL byte")):
        bad.write_bytes(data)
        with pytest.raises(ValueError, match=rf"{bad}: {message}"):
            import_logprobs(ImportPlan(str(bad), str(assets.root / "tokenizer"),
                                       str(tmp_path / "never"), progress=False))
    assert not (tmp_path / "never").exists()


def test_transformers_trainer_from_a_cache(assets, topk_cache, tmp_path):
    # CacheDataset + cache_collator + FusedKDTrainer(teacher_model=None): no teacher; the sparse
    # spec's loss on the student's full logits, a Cohere student's logit scale included (the
    # sparse loss applies it); DataLoader workers read the same batches
    from transformers import AutoModelForCausalLM, TrainingArguments

    from fastkd import reference
    from fastkd.integrations.cache import CacheDataset, cache_collator
    from fastkd.integrations.transformers import FusedKDTrainer
    from fastkd.options import DistillOptions

    train = CacheDataset(topk_cache, "train")
    assert train.temperature == TEMPERATURE and len(train) == TeacherCache(
        topk_cache).manifest["split"]["train"]
    opts = DistillOptions(temperature=TEMPERATURE, ce_weight=0.3, kd_weight=0.7)

    def trainer(workers: int, out: str) -> FusedKDTrainer:
        args = TrainingArguments(output_dir=str(tmp_path / out), per_device_train_batch_size=4,
                                 max_steps=2, learning_rate=1e-2, report_to=[],
                                 save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                                 dataloader_num_workers=workers)
        return FusedKDTrainer(model=AutoModelForCausalLM.from_pretrained(assets.cohere),
                              teacher_model=None, args=args, train_dataset=train,
                              data_collator=cache_collator, distill_options=opts)

    one = trainer(0, "w0")
    assert one.distill_options.student_logit_scale == 0.5
    batch = cache_collator([train[i] for i in (0, 5, len(train) - 1)])
    loss = one.compute_loss(one.model, batch)
    with torch.no_grad():
        logits = one.model(input_ids=batch["input_ids"]).logits[:, :-1].double().flatten(0, 1)
    labels = batch["labels"][:, 1:].flatten()
    total, _, _ = reference.sparse_token_losses(
        logits, batch["teacher_ids"].flatten(0, 1).long(),
        batch["teacher_logprobs"].flatten(0, 1).double(), labels,
        dataclasses.replace(opts, reduction="sum"), "bucket")
    counted = labels != -100
    assert loss.item() == pytest.approx((total[counted].sum() / counted.sum()).item(), rel=1e-5)
    one.train()
    two = trainer(1, "w1")  # a DataLoader worker decodes the rows
    two.train()
    for a, b in zip(one.model.parameters(), two.model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="the cache .* is 2.0"):
        FusedKDTrainer(model=one.model, teacher_model=None, args=one.args, train_dataset=train,
                       distill_options=DistillOptions(temperature=1.0))


def test_codec_and_block_fields_round_trip_at_the_edges():
    # the compact rows on random rows: 1..k ids a row, V < 2n (no low bits) and V = 2^17 + 1,
    # ids at 0 and V - 1, values below the floor, rows holding all the mass, empty sequences
    from dataclasses import dataclass

    from fastkd import codec
    from fastkd.cache_format import decode_block_field, encode_blocks

    g = torch.Generator().manual_seed(0)
    for vocab, width in ((5, 4), (300, 7), (2**17 + 1, 9)):
        seq_rows = torch.tensor([3, 0, 5, 1])
        rows = int(seq_rows.sum())
        n = torch.randint(1, width + 1, (rows,), generator=g).clamp(max=vocab)
        n[0] = min(width, vocab)
        perms = [torch.randperm(vocab, generator=g) for _ in range(rows)]
        for r, edge in ((1, 0), (2, vocab - 1)):  # ids 0 and V - 1 in a row's used slots
            perms[r] = torch.cat([torch.tensor([edge]), perms[r][perms[r] != edge]])
        ids = torch.stack([torch.nn.functional.pad(p[:width], (0, max(0, width - vocab)),
                                                   value=-1) for p in perms])
        logits = torch.randn(rows, width, generator=g, dtype=torch.float64) * 4
        logits[3, 1] = -1e4  # far below the floor
        used = torch.arange(width) < n.unsqueeze(-1)
        lp = torch.log_softmax(torch.where(used, logits, float("-inf")), -1)  # mass 1
        lp[4:] = lp[4:] - 0.3  # mass e^-0.3
        for layout, values in ((codec.Layout("logprobs", vocab, step=0.125), lp),
                               (codec.Layout("counts", vocab, samples=2 * width),
                                torch.where(used, 1, 0) + (torch.arange(width) == 0) * (
                                    2 * width - n).unsqueeze(-1))):
            streams = codec.encode(layout, ids, torch.where(used, values, 0), n, seq_rows)
            got_ids, got_lp = codec.decode(
                layout, streams["fixed"], streams["fixed_offsets"].diff(), streams["unary"],
                streams["unary_offsets"].diff(), n, seq_rows, width)
            for r in range(rows):
                want = {int(i): float(v) for i, v, u in zip(ids[r], values[r], used[r],
                                                            strict=True) if u}
                got = {int(i): float(v) for i, v in zip(got_ids[r], got_lp[r], strict=True)
                       if i >= 0}
                assert got.keys() == want.keys(), (vocab, layout.kind, r)
                if layout.kind == "counts":
                    assert all(abs(got[i] - math.log(want[i] / (2 * width))) < 1e-6
                               for i in want)
                else:
                    assert all(abs(got[i] - max(want[i], codec.FLOOR)) <= 2.5 * 0.125
                               for i in want)
                    assert int(got_ids[r, 0]) == max(want, key=want.get)  # the argmax first
                    mass = sum(math.exp(v) for v in want.values())
                    assert abs(sum(math.exp(v) for v in got.values()) - mass) < 0.07 * mass
            # a flipped bit in the unary stream: an error, not garbage
            broken = streams["unary"].clone()
            broken[0] ^= 1
            with pytest.raises(codec.CorruptRows):
                codec.decode(layout, streams["fixed"], streams["fixed_offsets"].diff(), broken,
                             streams["unary_offsets"].diff(), n, seq_rows, width)

    @dataclass
    class Fields:
        input_ids: torch.Tensor
        attention_mask: torch.Tensor
        position_ids: torch.Tensor
        other: torch.Tensor

    fields = Fields(torch.randint(0, 1000, (3, 13), generator=g), torch.ones(3, 13).long(),
                    torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5]] * 3),
                    torch.randint(-300, 300, (3, 13), generator=g))
    fields.attention_mask[2, 9:] = 0
    stored, encodings = encode_blocks(fields, 1000)
    assert [encodings[k][0] for k in ("input_ids", "attention_mask", "position_ids", "other")
            ] == ["bits10", "bits1", "resets", "int"]
    for name, value in vars(fields).items():
        assert torch.equal(decode_block_field(stored[f"blocks.{name}"], *encodings[name]), value)


# ----------------------------------------------------------------------------------------------
# Nothing lost, nothing silent: a changed teacher, a shard behind a manifest rebuilt by hand, a
# full disk, another copy of the command, an --out that is not a cache, the modes, the bar.


def flip_in_tensor(shard: Path, name: str, at: int = 3) -> None:
    """Flip the lowest bit of byte `at` of tensor `name`'s data in a safetensors file."""
    data = bytearray(shard.read_bytes())
    header = int.from_bytes(data[:8], "little")
    begin = json.loads(data[8:8 + header])[name]["data_offsets"][0]
    data[8 + header + begin + at] ^= 0x01
    shard.write_bytes(bytes(data))


def rebuild_manifest(cache_dir: Path) -> None:
    """What a hand repair does: each shard's sha256 and size recomputed, the checksum rewritten."""
    m = json.loads((cache_dir / "manifest.json").read_text())
    for entry in m["shards"]:
        entry.update(sha256=sha256_file(cache_dir / entry["file"]),
                     bytes=(cache_dir / entry["file"]).stat().st_size)
    write_manifest(cache_dir, m)


def test_a_shard_behind_a_rebuilt_manifest_is_caught_on_its_first_read(assets, topk_cache,
                                                                        tmp_path, monkeypatch):
    """A bit flipped in a shard's coded rows, the manifest rebuilt to match: the cache opens (its
    sha256 is the manifest's), and the rows decode, to other targets. The shard's own payload
    digest is checked on its first read, which in training runs on the prefetch thread."""
    import threading

    from fastkd.cache_reader import Shard

    bad = tmp_path / "bad"
    shutil.copytree(topk_cache, bad)
    m = json.loads((bad / "manifest.json").read_text())
    shard = bad / m["shards"][1]["file"]
    original = shard.read_bytes()
    good = TeacherCache(topk_cache).blocks("train").select(torch.arange(16, 32)).targets.load()
    check = Shard.check_payload
    for at in range(64):  # a flip that still decodes (most do), to other targets
        shard.write_bytes(original)
        flip_in_tensor(shard, "fixed", at)
        rebuild_manifest(bad)
        rows = TeacherCache(bad).blocks("train").select(torch.arange(16, 32)).targets
        with monkeypatch.context() as unchecked:  # what the rows decode to without the check
            unchecked.setattr(Shard, "check_payload", lambda self: None)
            try:
                got = rows.load()
            except ValueError:  # this flip breaks the stream: named already
                continue
        if not all(torch.equal(a, b) for a, b in zip(got, good, strict=True)):
            break  # silently wrong targets
    else:
        raise AssertionError("no flip decoded to other targets")
    rows = TeacherCache(bad).blocks("train").select(torch.arange(16, 32)).targets
    with pytest.raises(ValueError, match=rf"shard {shard} is corrupted: its tensors do not match "
                                         r"the digest in its own metadata"):
        rows.load()

    first_reads = []

    def recorded(self):
        if not self._payload_checked:
            first_reads.append((self.entry["split"], threading.current_thread().name))
        return check(self)

    monkeypatch.setattr(Shard, "check_payload", recorded)
    base = DistillConfig(teacher=None, teacher_cache=str(topk_cache), student=str(assets.student),
                         data=assets.data, out=str(tmp_path / "run"), steps=2, warmup=0,
                         batch_size=4, seq_len=SEQ_LEN, temperature=TEMPERATURE, eval_every=2,
                         eval_sequences=4, baseline=False, report=False, progress=False,
                         tokenizer=str(assets.root / "tokenizer"))
    assert run_distillation(base)["status"] == "completed"
    train = [name for split, name in first_reads if split == "train"]
    assert train and all(name.startswith("fastkd-cache") for name in train), first_reads
    with pytest.raises(ValueError, match=rf"shard {shard} is corrupted"):
        run_distillation(dataclasses.replace(base, teacher_cache=str(bad), steps=6,
                                             out=str(tmp_path / "bad-run")))


def test_a_teacher_changed_in_the_middle_is_not_resumed_into_its_cache(assets, tmp_path,
                                                                       monkeypatch):
    """The fingerprint hashes each weight file whole (remembered by inode, size, mtime and
    ctime): a teacher edited in the middle between a kill and a rerun, its size and mtime as
    they were, is refused rather than mixed into the cache."""
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "fastkd-cache"))
    teacher = save_llama(tmp_path / "big-teacher", assets.tokenizer, hidden=256, layers=2,
                         seed=5)
    weights = teacher / "model.safetensors"
    assert weights.stat().st_size > 3 << 20  # more than its first and last MiB
    out = tmp_path / "cache"
    real_write = cache_write.write_shard

    def killed_after_one_shard(*args):
        monkeypatch.setattr(cache_write, "write_shard", None)  # the next shard: a crash
        return real_write(*args)

    monkeypatch.setattr(cache_write, "write_shard", killed_after_one_shard)
    with pytest.raises(TypeError):
        cache_teacher(plan(assets, out, teacher=str(teacher)))
    monkeypatch.setattr(cache_write, "write_shard", real_write)
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # a weight in the middle
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(ValueError, match=r"holds a different teacher cache \(it differs in "
                                         r"\['teacher_fingerprint'\]\)"):
        cache_teacher(plan(assets, out, teacher=str(teacher)))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["teacher_fingerprint"]["weights_sha256"][0][2] != sha256_file(weights)


def test_full_disk_other_copies_and_foreign_dirs(assets, topk_cache, tmp_path, monkeypatch,
                                                 capsys):
    """A full disk mid-cache: one line naming the shard and the free space, no temp file left,
    and the rerun (space freed) is identical to an uninterrupted cache. Another process holding
    the directory, an --out that holds something else: refused by name, nothing written."""
    import safetensors.torch
    from safetensors import SafetensorError

    from fastkd import fsio

    out = tmp_path / "cache"
    args = ["cache-teacher", "--teacher", str(assets.teacher), "--data", *assets.data, "--out",
            str(out), "--k", "6", "--temperature", str(TEMPERATURE), "--seq-len", str(SEQ_LEN),
            "--batch-size", "16", "--shard-sequences", "16", "--no-progress"]
    real_save = safetensors.torch.save_file
    saved = []

    def disk_fills(tensors, path, metadata=None):
        if len(saved) == 2:
            Path(path).write_bytes(b"part of a shard")
            raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                  "(os error 28)")
        saved.append(path)
        return real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_fills)
    monkeypatch.setattr(fsio, "free_bytes", lambda path: 0)
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert re.search(rf"error: cannot write {out}/train-000000032-000000048.safetensors: no "
                     r"space left on device; 0.0 MiB free there \(free some space, then run "
                     r"the same command again\)\n$", err), err
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert main(args) == 0
    shards = [json.loads((d / "manifest.json").read_text())["shards"] for d in (out, topk_cache)]
    assert shards[0] == shards[1]
    mask = 0o666 & ~fsio.umask()  # the files take the umask's mode, as the manifest beside them
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir() if p.name != fsio.LOCK} == {
        p.name: mask for p in out.iterdir() if p.name != fsio.LOCK}

    with fsio.locked(out / fsio.LOCK, "a test"):  # another copy holds it
        with pytest.raises(SystemExit):
            main(args)
    assert re.search(rf"cache-teacher --out {out} is in use by another process \(pid "
                     rf"{os.getpid()}\)", capsys.readouterr().err)

    model = tmp_path / "model"
    shutil.copytree(assets.student, model)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    for command in (["cache-teacher", "--teacher", str(assets.teacher), "--data", *assets.data],
                    ["cache-import", "--logprobs", *assets.data, "--tokenizer",
                     str(assets.root / "tokenizer")]):
        with pytest.raises(SystemExit):
            main([*command, "--out", str(model), "--no-progress"])
        assert (f"out: {model} is not empty and holds no teacher cache (no manifest.json): it "
                "holds config.json, ") in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in model.iterdir()} == before


def test_the_bar_moves_per_batch_after_the_data_line(assets, tmp_path, monkeypatch, caplog):
    """cache-teacher says what it read first (as distill does), then its bar moves with each
    batch of sequences the teacher has done, not once a shard."""
    import tqdm

    updates = []

    class Bar(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            assert "data: " in caplog.text  # the data line came first
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    with caplog.at_level("INFO", logger="fastkd"):
        cache_teacher(plan(assets, tmp_path / "cache", batch_size=4, progress=True))
    assert re.search(r"data: \d+ training and \d+ held-out sequences of 24 tokens", caplog.text)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert sum(updates) == sum(manifest["split"][s] for s in ("train", "heldout"))
    assert max(updates) <= 4 and len(updates) > len(manifest["shards"])


def test_import_refuses_what_json_and_a_long_line_would_hide(assets, tmp_path, caplog):
    """An id given twice in one map ("284" twice: JSON keeps the last; "284" and "0284"), an input
    id 5.0 (not "outside the vocabulary": not an integer), a sequence longer than --seq-len
    (named by file and line), all refused naming the file and line; one long line that sets
    seq_len for every row is said."""
    from fastkd.cache_import import ImportPlan, import_logprobs

    maps = tmp_path / "maps.jsonl"
    records = server_maps(assets, maps)
    lines = maps.read_text().splitlines()
    tokenizer = str(assets.root / "tokenizer")

    def refused(line5: str, message: str, **plan) -> None:
        bad = tmp_path / "bad.jsonl"
        bad.write_text("\n".join([*lines[:4], line5, *lines[5:]]) + "\n")
        with pytest.raises(ValueError, match=rf"{bad}:5: {message}"):
            import_logprobs(ImportPlan(str(bad), tokenizer, str(tmp_path / "never"),
                                       progress=False, **plan))

    record = records[4]
    position = next(i for i, e in enumerate(record["prompt_logprobs"]) if e)
    key, value = next(iter(record["prompt_logprobs"][position].items()))
    pair = f"{json.dumps(key)}: {json.dumps(value)}"
    assert lines[4].count(pair) >= 1
    refused(lines[4].replace(pair, f"{pair}, {pair}", 1),
            rf"id {key} appears twice in one prompt_logprobs map \(as '{key}' and '{key}'\)")
    padded = json.loads(lines[4])
    padded["prompt_logprobs"][position]["0" + key] = value
    refused(json.dumps(padded), rf"id {key} appears twice .*\(as '{key}' and '0{key}'\)")
    floats = json.loads(lines[4])
    floats["input_ids"][3] = float(floats["input_ids"][3])
    refused(json.dumps(floats), rf"input id {floats['input_ids'][3]} \(input_ids\[3\]\) is not "
                                "an integer token id")
    assert [len(r["input_ids"]) for r in records][:3] == [10, 17, 24]  # 24: the longest
    with pytest.raises(ValueError, match=rf"{maps}:3: the sequence holds 24 ids, more than "
                                         rf"--seq-len 23; raise --seq-len \(to at least 24"):
        import_logprobs(ImportPlan(str(maps), tokenizer, str(tmp_path / "never"), seq_len=23,
                                   progress=False))
    assert not (tmp_path / "never").exists()

    # one line much longer than the rest sets seq_len for every row: a warning names it
    ids, entries = records[0]["input_ids"], records[0]["prompt_logprobs"]
    long = {"input_ids": ids * 8, "prompt_logprobs": entries + ([None] + entries[1:]) * 7}
    maps.write_text("\n".join([*lines, json.dumps(long)]) + "\n")
    with caplog.at_level("INFO", logger="fastkd"):
        manifest = import_logprobs(ImportPlan(str(maps), tokenizer, str(tmp_path / "long"),
                                              progress=False))
    assert manifest["seq_len"] == 8 * len(ids)
    assert re.search(rf"seq_len {8 * len(ids)} is set by one long sequence \({maps}:13\), \d+x "
                     r"the median length", caplog.text)
