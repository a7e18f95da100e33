"""`fastkd distill` on chat data end to end: a tiny Llama teacher and student, a local tokenizer
with a ChatML template (no generation markers: the diffed path), two steps through the CLI. The
loss sees labels on the assistant turns only, and the logged target count is theirs."""

from __future__ import annotations

import json

import pytest
from _trainer_fixtures import build_chat_tokenizer, chats, save_llama

from fastkd import batch_loss
from fastkd.cli import main
from fastkd.options import DistillOptions

IGNORE = DistillOptions.ignore_index


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat_assets")
    tokenizer = build_chat_tokenizer(root / "tokenizer")
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats() * 6))
    return {"tokenizer": tokenizer, "data": str(data),
            "teacher": save_llama(root / "teacher", tokenizer, hidden=48, layers=2, seed=1),
            "student": save_llama(root / "student", tokenizer, hidden=32, seed=2)}


def test_distill_on_chat_counts_only_the_assistant_turns(assets, tmp_path, monkeypatch):
    seen = []  # (training?, inputs, labels) of every student forward
    forward = batch_loss.StudentLoss.forward

    def spy(self, inputs, labels, *args, **kwargs):
        seen.append((self.training, {k: v.clone() for k, v in inputs.items()}, labels.clone()))
        return forward(self, inputs, labels, *args, **kwargs)

    monkeypatch.setattr(batch_loss.StudentLoss, "forward", spy)
    out = tmp_path / "run"
    code = main(["distill", "--teacher", str(assets["teacher"]), "--student",
                 str(assets["student"]), "--data", assets["data"], "--out", str(out),
                 "--seq-len", "96", "--batch-size", "2", "--steps", "2", "--warmup", "0",
                 "--eval-every", "2", "--eval-sequences", "2", "--no-baseline", "--no-report",
                 "--no-progress"])
    assert code == 0
    tokenizer = assets["tokenizer"]
    said = {"".join(m["content"] + "<|im_end|>\n" for m in c["messages"]
                    if m["role"] == "assistant") for c in chats()}
    examples = 0
    for _, inputs, labels in seen:
        # Packed rows: position_ids, and no attention mask (it would join the examples).
        assert set(inputs) == {"input_ids", "position_ids"}
        ids, positions = inputs["input_ids"], inputs["position_ids"]
        assert labels.shape == (ids.shape[0], ids.shape[1] - 1)
        for row in range(ids.shape[0]):
            starts = (positions[row] == 0).nonzero().flatten().tolist() + [ids.shape[1]]
            for a, b in zip(starts[:-1], starts[1:], strict=True):
                example = tokenizer.decode(ids[row, a:b])
                if not example.startswith("<|im_start|>"):
                    assert (labels[row, max(a - 1, 0):b - 1] == IGNORE).all()  # the padding
                    continue
                targets = labels[row, a:b - 1]  # labels of tokens a+1 .. b-1 of this example
                assert tokenizer.decode(targets[targets != IGNORE]) in said
                examples += 1
                assert (targets == ids[row, a + 1:b]).logical_or(targets == IGNORE).all()
    assert examples >= 2 * 2 + 2  # two training batches of 2 rows, and the held-out rows
    train_calls = [labels for training, _, labels in seen if training]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    logged = [r["tokens"] for r in log if "tokens" in r]
    # The logged target count of each step is the assistant tokens its loss saw.
    assert logged == [int((x != IGNORE).sum()) for x in train_calls] and len(logged) == 2


def test_a_teacher_cache_of_chat_data_keeps_the_targets_and_the_examples_apart(assets, tmp_path):
    import torch

    from fastkd.cache import TeacherCache
    from fastkd.cache_teacher import cache_teacher
    from fastkd.models import load_lm
    from fastkd.plans import CachePlan
    from fastkd.store import load_blocks

    seq_len, k, temperature = 160, 4, 2.0  # two chats fit in a row
    cache_teacher(CachePlan(teacher=str(assets["teacher"]), data=[assets["data"]],
                            out=str(tmp_path / "cache"), k=k, temperature=temperature,
                            seq_len=seq_len, layout="fixed", dtype="bfloat16", progress=False))
    train = load_blocks([assets["data"]], assets["tokenizer"], seq_len, 0.05)[0].load()
    cached = TeacherCache(tmp_path / "cache").blocks("train")
    for name in ("input_ids", "attention_mask", "counted", "position_ids"):
        assert torch.equal(getattr(cached, name), getattr(train, name)), name
    row = int((train.position_ids[:, 1:] == 0).any(1).nonzero()[0])  # a row of 2 examples
    batch = cached.select(torch.tensor([row]))
    assert torch.equal(batch.counted, train.counted[row:row + 1])  # select keeps them
    start = int((batch.position_ids[0, 1:] == 0).nonzero()[0]) + 1
    end = start + int(batch.attention_mask[0, start:].sum())
    ids, logprobs = batch.targets.load()
    # The second example's targets are those of the teacher run on it alone.
    teacher = load_lm(str(assets["teacher"]), "teacher", torch.float32, torch.device("cpu"))
    with torch.no_grad():
        h = teacher.hidden(batch.input_ids[:, start:end])[0, :-1]
    want_lp, want_ids = torch.log_softmax(h @ teacher.weight.T / temperature, -1).topk(k, -1)
    # only the positions whose next token is a target (the assistant's) carry targets
    counted = batch.counted[0, start + 1:end]
    assert counted.any() and not counted.all()
    assert (ids[0, start:end - 1][~counted] == -1).all()
    assert torch.equal(ids[0, start:end - 1][counted].long(), want_ids[counted])
    torch.testing.assert_close(logprobs[0, start:end - 1][counted].float(), want_lp[counted],
                               rtol=2e-2, atol=2e-2)


def test_the_reports_heldout_metrics_on_packed_chats_are_those_of_each_chat_alone(assets):
    import torch
    from transformers import AutoModelForCausalLM

    from fastkd.report import heldout_metrics
    from fastkd.store import load_blocks

    cpu = torch.device("cpu")
    student = AutoModelForCausalLM.from_pretrained(assets["student"], dtype=torch.float64).eval()
    teacher = AutoModelForCausalLM.from_pretrained(assets["teacher"], dtype=torch.float64).eval()
    heldout = load_blocks([assets["data"]], assets["tokenizer"], 160, 0.3)[1].load()
    assert heldout.position_ids is not None and len(heldout) >= 2
    got = heldout_metrics({"student": (student, cpu)}, teacher, heldout, cpu)["student"]
    ce, count = 0.0, 0
    for row in range(len(heldout)):  # each example alone, its assistant tokens only
        starts = (heldout.position_ids[row] == 0).nonzero().flatten().tolist()
        for a, b in zip(starts, starts[1:] + [heldout.input_ids.shape[1]], strict=True):
            ids = heldout.input_ids[row:row + 1, a:b]
            targets = heldout.counted[row, a + 1:b]
            with torch.no_grad():
                logits = student(input_ids=ids).logits[0, :-1]
            ce += float(torch.nn.functional.cross_entropy(
                logits[targets], ids[0, 1:][targets], reduction="sum"))
            count += int(targets.sum())
    assert count == heldout.count_targets() > 0
    assert got["ce"] == pytest.approx(ce / count, rel=1e-5)


def test_a_run_whose_data_options_differ_from_the_caches_is_refused(assets, tmp_path, capsys):
    from fastkd.cache_teacher import cache_teacher
    from fastkd.cli import main
    from fastkd.plans import CachePlan

    cache = tmp_path / "cache"
    cache_teacher(CachePlan(teacher=str(assets["teacher"]), data=[assets["data"]], out=str(cache),
                            k=2, seq_len=160, progress=False))  # packed, strict UTF-8
    run = ["distill", "--teacher-cache", str(cache), "--tokenizer", str(assets["teacher"]),
           "--student", str(assets["student"]), "--data", assets["data"], "--seq-len", "160",
           "--temperature", "1", "--steps", "1", "--batch-size", "2", "--no-report",
           "--no-progress"]
    for option, message in (("--no-packing", "packing is False, the cache's is True"),
                            ("--utf8-errors=replace", "utf8_errors is 'replace', the cache's is "
                                                      "'strict'")):
        with pytest.raises(SystemExit) as stop:
            main([*run, option, "--out", str(tmp_path / option.strip("-"))])
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert f"teacher_cache: the run's {message} ({cache})" in err
        assert not (tmp_path / option.strip("-")).exists()  # refused before the run starts
    assert main([*run, "--out", str(tmp_path / "same")]) == 0  # the cache's own options train
