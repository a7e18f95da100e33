"""`fastkd distill` with several teachers (fastkd.teacher_set, fastkd.run_teachers): routing by
--data FILE:NAME and by a record's "teacher" field, a mixture, one online and one cached teacher
with an exact resume, the K = 1 identities, and each refusal before anything loads."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from _trainer_fixtures import build_tokenizer, corpus_texts, save_llama
from safetensors.torch import load_file

from fastkd.cli import main
from fastkd.config import DistillConfig
from fastkd.trainer import run_distillation


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    tokenizer = build_tokenizer(root / "tokenizer", vocab_size=200)
    texts = [t[:1500] for t in corpus_texts()]
    code = root / "code.jsonl"
    code.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:4]))
    mixed = root / "mixed.jsonl"  # each record names its teacher
    mixed.write_text("".join(json.dumps({"text": t, "teacher": "a" if i % 2 else "b"}) + "\n"
                             for i, t in enumerate(texts[4:])))
    return SimpleNamespace(
        root=root, tokenizer=tokenizer, code=str(code), mixed=str(mixed),
        a=str(save_llama(root / "a", tokenizer, hidden=32, seed=1)),
        b=str(save_llama(root / "b", tokenizer, hidden=48, seed=2)),
        student=str(save_llama(root / "student", tokenizer, hidden=16, seed=3)))


def config(assets, out, **overrides) -> DistillConfig:
    base = {"teacher": None, "student": assets.student, "data": [assets.code], "out": str(out),
            "steps": 4, "batch_size": 4, "seq_len": 32, "lr": 1e-2, "warmup": 1,
            "eval_every": 2, "save_every": 2, "eval_sequences": 8, "baseline": False,
            "report": False, "progress": False, "threads": 1}
    return DistillConfig(**{**base, **overrides})


def weights(out) -> dict:
    return load_file(str(out / "student" / "model.safetensors"))


def assert_close(want: dict, got: dict, atol: float = 0.0) -> None:
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(want[name], got[name], rtol=0, atol=atol), name


def test_one_teacher_an_unused_second_and_weight_one_give_the_same_student(assets, tmp_path):
    alone = run_distillation(config(assets, tmp_path / "alone", teacher=assets.a))
    named = config(assets, tmp_path / "named", teachers={"a": assets.a},
                   data=[assets.code + ":a"])
    assert named.teacher == assets.a and named.teachers is None  # K = 1: the one-teacher run
    run_distillation(named)
    assert_close(weights(tmp_path / "alone"), weights(tmp_path / "named"))  # bit-identical
    unused = config(assets, tmp_path / "unused", teachers={"a": assets.a, "b": assets.b},
                    data=[assets.code + ":a"])
    assert unused.data_teachers == ["a"] and unused.data == [assets.code]
    run_distillation(unused)
    assert_close(weights(tmp_path / "alone"), weights(tmp_path / "unused"), atol=1e-6)
    mixed = config(assets, tmp_path / "mix1", teachers={"a": assets.a, "b": assets.b},
                   teacher_weights={"a": 1.0})
    assert mixed.teacher_weights == {"a": 1.0, "b": 0.0}
    run_distillation(mixed)
    assert_close(weights(tmp_path / "alone"), weights(tmp_path / "mix1"), atol=1e-6)
    assert alone["history"][-1]["eval_kd"] == pytest.approx(
        run_distillation(dataclasses.replace(unused, resume=True))["history"][-1]["eval_kd_a"],
        rel=1e-5)


def test_routing_by_file_and_by_record_and_a_mixture_train_and_report(assets, tmp_path):
    routed = config(assets, tmp_path / "routed", teachers={"a": assets.a, "b": assets.b},
                    data=[assets.code + ":b", assets.mixed], report=True, baseline=True,
                    eval_fraction=0.3, eval_sequences=256)
    result = run_distillation(routed)
    final = result["history"][-1]
    assert final["eval_kd_a"] > 0 and final["eval_kd_b"] > 0
    # the per-teacher KLs are each teacher's own: the total is their token-weighted mean
    assert min(final["eval_kd_a"], final["eval_kd_b"]) <= final["eval_kd"] <= max(
        final["eval_kd_a"], final["eval_kd_b"])
    # the report: a row per student and teacher, each its final held-out KL to that teacher
    report = json.loads((tmp_path / "routed" / "report.json").read_text())
    assert [(r["model"].split()[0], r["teacher"]) for r in report["rows"]] == [
        ("distilled", "a"), ("distilled", "b"), ("hard-label", "a"), ("hard-label", "b")]
    assert [r["kl_to_teacher"] for r in report["rows"]] == [
        final["eval_kd_a"], final["eval_kd_b"], *(result["baseline_history"][-1][f"eval_kd_{n}"]
                                                  for n in "ab")]
    md = (tmp_path / "routed" / "report.md").read_text()
    assert "| model | KL to a | KL to b | held-out CE |" in md
    assert f"| distilled student | {final['eval_kd_a']:.4f} | {final['eval_kd_b']:.4f} |" in md
    assert result["report"]["png"] and (tmp_path / "routed" / "loss_curve.png").stat().st_size
    # routing changes the student: all of code.jsonl to a instead of b gives another one
    other = run_distillation(dataclasses.replace(routed, out=str(tmp_path / "other"),
                                                 data_teachers=None, report=False,
                                                 baseline=False,
                                                 data=[assets.code + ":a", assets.mixed]))
    assert other["history"][-1]["loss"] != result["history"][-1]["loss"]
    mix = run_distillation(config(assets, tmp_path / "mix", teachers={"a": assets.a,
                                  "b": assets.b}, teacher_weights={"a": 0.25, "b": 0.75},
                                  data=[assets.code, assets.mixed], eval_fraction=0.3))
    assert mix["status"] == "completed" and mix["history"][-1]["eval_kd_b"] > 0


def test_one_online_one_cached_teacher_resumes_exactly(assets, tmp_path):
    data = [assets.code, assets.mixed]
    assert main(["cache-teacher", "--teacher", assets.b, "--data", *data, "--out",
                 str(tmp_path / "cache_b"), "--seq-len", "32", "--k", "8", "--no-progress"]) == 0
    run = config(assets, tmp_path / "straight", teachers={"a": assets.a},
                 teacher_caches={"b": str(tmp_path / "cache_b")},
                 data=[assets.code + ":a", assets.mixed])
    straight = run_distillation(run)
    assert straight["history"][-1]["eval_kd_b"] > 0
    out = tmp_path / "resumed"
    first = run_distillation(dataclasses.replace(run, out=str(out), stop_after=2))
    assert first["status"] == "stopped"
    saved = DistillConfig.load(out)
    assert saved.teachers == {"a": assets.a} and saved.data_teachers == ["a", None]
    torch.manual_seed(1)
    resumed = run_distillation(dataclasses.replace(saved, resume=True))
    assert_close(weights(tmp_path / "straight"), weights(out))  # bit-identical
    # a cache of other sequences is refused, named
    assert main(["cache-teacher", "--teacher", assets.b, "--data", assets.code, "--out",
                 str(tmp_path / "cache_code"), "--seq-len", "32", "--k", "8",
                 "--no-progress"]) == 0
    with pytest.raises(ValueError, match="cache_code"):
        run_distillation(dataclasses.replace(run, out=str(tmp_path / "bad"), data_teachers=None,
                                             teacher_caches={"b": str(tmp_path / "cache_code")}))
    assert resumed["status"] == "completed"


def test_refusals_before_anything_loads(assets, tmp_path, capsys):
    def refused(*args) -> str:
        with pytest.raises(SystemExit) as exit_:
            main(["distill", "--student", assets.student, "--out", str(tmp_path / "r"), *args])
        assert exit_.value.code == 2
        return capsys.readouterr().err

    two = ["--teacher", f"a={assets.a}", "--teacher", f"b={assets.b}"]
    assert "did you mean 'b'" in refused(*two, "--data", assets.code + ":bb")
    assert "did you mean 'a'" in refused(*two, "--teacher-weights", "aa=1", "--data", assets.code)
    assert "name each one" in refused("--teacher", assets.a, "--teacher", f"b={assets.b}",
                                      "--data", assets.code)
    assert "sum to 1" in refused(*two, "--teacher-weights", "a=0.5,b=0.6", "--data", assets.code)
    # an example with no teacher: refused naming its record, before any model loads
    err = refused(*two, "--data", assets.code, "--seq-len", "32")
    assert f"{assets.code}:1" in err and "must be routed" in err
    assert not (tmp_path / "r" / "config.json").exists()
    # a path holding ':' or '=' is a path
    odd = tmp_path / "x:a.jsonl"
    odd.write_text(json.dumps({"text": "x " * 50, "teacher": "a"}) + "\n")
    built = config(assets, tmp_path / "o", teachers={"a": assets.a, "b": assets.b},
                   data=[str(odd)])
    assert built.data == [str(odd)] and built.data_teachers == [None]
