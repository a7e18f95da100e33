"""The teacher cache (`fastkd cache-teacher`) and distillation from it, on tiny random Llamas:
round trip against the teacher's own logits, resume after an interruption, corrupted shards,
mismatched runs, and `fastkd distill --teacher-cache` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _trainer_fixtures import build_tokenizer, corpus_texts, save_llama

from fastkd import cache as cache_mod
from fastkd.cache import CachePlan, TeacherCache, cache_teacher
from fastkd.cli import main
from fastkd.data import load_blocks
from fastkd.models import load_lm
from fastkd.trainer import DistillConfig, run_distillation

SEQ_LEN, TEMPERATURE = 24, 2.0


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


def test_round_trip_matches_the_teacher(assets, topk_cache):
    cache = TeacherCache(topk_cache)
    m = cache.manifest
    assert m["complete"] and m["mode"] == "topk" and m["k"] == 6
    assert m["temperature"] == TEMPERATURE and m["seq_len"] == SEQ_LEN
    assert m["data"][0]["sha256"] == cache_mod.sha256_file(Path(assets.data[0]))
    assert len([s for s in m["shards"] if s["split"] == "train"]) > 1  # several shards
    train, heldout = load_blocks(assets.data, assets.tokenizer, SEQ_LEN, 0.05)
    cached_train, cached_heldout = cache.blocks("train"), cache.blocks("heldout")
    assert torch.equal(cached_train.input_ids, train.input_ids)
    assert torch.equal(cached_heldout.attention_mask, heldout.attention_mask)
    # the cached targets are the teacher's top-k log softmax(t / T)
    teacher = load_lm(str(assets.teacher), "teacher", torch.float32, torch.device("cpu"))
    rows = torch.tensor([0, 17, len(train) - 1])
    batch = cached_train.select(rows)
    ids, logprobs = batch.targets.load()
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float16
    assert ids.shape == (3, SEQ_LEN - 1, 6)
    with torch.no_grad():
        h = teacher.hidden(batch.input_ids, batch.attention_mask)[:, :-1]
        want = torch.log_softmax((h @ teacher.weight.T) / TEMPERATURE, -1)
    want_lp, want_ids = want.topk(6, -1)
    assert torch.equal(ids.long(), want_ids)
    torch.testing.assert_close(logprobs.float(), want_lp, rtol=2e-3, atol=2e-3)


def test_sampled_cache_resumes_identically(assets, monkeypatch):
    full = assets.root / "sample_full"
    cache_teacher(plan(assets, full, mode="sample", k=8, samples=8))
    part = assets.root / "sample_part"
    writes = []
    real_write = cache_mod._atomic_write

    def killed_after_two_shards(path, write):
        if path.suffix == ".safetensors":
            if len(writes) == 2:
                raise KeyboardInterrupt  # the run dies mid-way
            writes.append(path)
        real_write(path, write)

    monkeypatch.setattr(cache_mod, "_atomic_write", killed_after_two_shards)
    with pytest.raises(KeyboardInterrupt):
        cache_teacher(plan(assets, part, mode="sample", k=8, samples=8))
    monkeypatch.setattr(cache_mod, "_atomic_write", real_write)
    with pytest.raises(ValueError, match="incomplete"):
        TeacherCache(part)
    assert len(json.loads((part / "manifest.json").read_text())["shards"]) == 2
    cache_teacher(plan(assets, part, mode="sample", k=8, samples=8))  # resumes
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (full, part))
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    # sampled targets: distinct ids, log(count / samples), counts summing to `samples`
    ids, logprobs = TeacherCache(full).blocks("train").select(torch.arange(4)).targets.load()
    used = ids >= 0
    counts = (logprobs.float().exp() * 8).round()
    assert ((counts * used).sum(-1) == 8).all()
    with pytest.raises(ValueError, match="holds a different teacher cache"):
        cache_teacher(plan(assets, full, mode="sample", k=8, samples=4))


def test_corrupted_and_mismatched_caches(assets, topk_cache, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(topk_cache, bad)
    shard = bad / "train-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="train-00001.safetensors is corrupted"):
        TeacherCache(bad)
    shard.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    with pytest.raises(ValueError, match="train-00001.safetensors"):
        TeacherCache(bad)
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


def test_distill_from_cache_cli(assets, topk_cache, tmp_path, capsys):
    # `fastkd cache-teacher` (sampled) then `fastkd distill --teacher-cache` with no teacher
    sampled = tmp_path / "sampled"
    assert main(["cache-teacher", "--teacher", str(assets.teacher), "--data", *assets.data,
                 "--out", str(sampled), "--mode", "sample", "--k", "8", "--temperature",
                 str(TEMPERATURE), "--seq-len", str(SEQ_LEN), "--shard-sequences", "64",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "MiB per million tokens" in out and "shards" in out
    for cache_dir, tail in ((sampled, "ignore"), (topk_cache, "bucket")):
        run = tmp_path / f"run-{tail}"
        code = main(["distill", "--teacher-cache", str(cache_dir), "--student",
                     str(assets.student), "--data", *assets.data, "--out", str(run),
                     "--steps", "4", "--warmup", "1", "--batch-size", "4", "--seq-len",
                     str(SEQ_LEN),
                     "--temperature", str(TEMPERATURE), "--eval-every", "2",
                     "--eval-sequences", "8", "--no-baseline", "--no-progress",
                     "--tokenizer", str(assets.root / "tokenizer"),
                     *(["--no-report"] if tail == "bucket" else [])])
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


def test_distill_from_cache_api_matches_online_kd(assets, topk_cache, tmp_path):
    # the cached run's first held-out KD (bucket tail, k = 6 of the teacher's ids) is a lower
    # bound of the online run's full-vocabulary KL: coarsening can only lose divergence
    base = dict(student=str(assets.student), data=assets.data, steps=1, warmup=0, batch_size=4,
                seq_len=SEQ_LEN, temperature=TEMPERATURE, eval_every=1, eval_sequences=8,
                baseline=False, report=False, progress=False,
                tokenizer=str(assets.root / "tokenizer"))
    cached = run_distillation(DistillConfig(teacher=None, out=str(tmp_path / "c"),
                                            teacher_cache=str(topk_cache), **base))
    online = run_distillation(DistillConfig(teacher=str(assets.teacher), out=str(tmp_path / "o"),
                                            **base))
    kd_cached, kd_online = cached["history"][0]["eval_kd"], online["history"][0]["eval_kd"]
    assert 0 < kd_cached <= kd_online * (1 + 1e-3)
    assert cached["history"][0]["eval_ce"] == pytest.approx(online["history"][0]["eval_ce"],
                                                            rel=1e-5)


def test_report_from_a_topk_cache_measures_kl_on_the_cached_rows(assets, topk_cache, tmp_path):
    # the report of an offline run: no teacher model; the students' KL is the bucket KL on the
    # cached top-k ids at the cache's temperature, checked here against the teacher's own logits
    from transformers import AutoModelForCausalLM

    result = run_distillation(DistillConfig(
        teacher=None, teacher_cache=str(topk_cache), student=str(assets.student),
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
    heldout = TeacherCache(topk_cache).blocks("heldout").select(torch.arange(5))
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
