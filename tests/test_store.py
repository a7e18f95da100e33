"""The token store (fastkd.store, fastkd.prepare): the same rows, batch order and trained weights as
the in-memory reference path (tests/_reference_data.py), bit for bit; resume; a stale store prepared
again; a kill -9 during preparation; two preparations at once; two torchrun ranks on one store;
pre-tokenized data; worker processes; damaged stores; `cache-teacher` on a prepared store."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import _reference_data as reference
import pytest
import torch
from _trainer_fixtures import build_chat_tokenizer, chats, corpus_texts, save_llama, write_data
from safetensors.torch import load_file

from fastkd import prepare, readers, tokens
from fastkd.cli import main
from fastkd.config import DistillConfig
from fastkd.data import Batches, Blocks
from fastkd.readers import DataSpec
from fastkd.store import StoreOptions, TokenStore, load_blocks, open_store
from fastkd.trainer import run_distillation

TESTS = Path(__file__).parent
SEQ_LEN = 64
FIELDS = ("input_ids", "attention_mask", "counted", "position_ids")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("store_assets")
    tokenizer = build_chat_tokenizer(root / "tokenizer")
    text = write_data(root / "data")
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps(c) + "\n" for c in chats() * 6))
    pc = root / "pc.jsonl"
    pc.write_text("".join(json.dumps({"prompt": f"Q{i}: what does heapq.{n} do?",
                                      "completion": f" It {n}s." * (1 + i % 4)}) + "\n"
                          for i, n in enumerate(["push", "pop", "merge", "heapify"] * 8)))
    data = {"text": text, "chat": [str(chat)], "prompt-completion": [str(pc)],
            "mixed": [text[0], str(chat), text[1], str(pc)]}
    return SimpleNamespace(root=root, tokenizer=tokenizer, data=data,
                           teacher=save_llama(root / "teacher", tokenizer, hidden=32, seed=1),
                           student=save_llama(root / "student", tokenizer, hidden=24, seed=2))


def assert_same(got: Blocks, want: Blocks) -> None:
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert (a is None) == (b is None), name
        if b is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name


@pytest.mark.parametrize("packing", [True, False])
@pytest.mark.parametrize("kind", ["text", "chat", "prompt-completion", "mixed"])
def test_rows_and_batch_order_equal_the_in_memory_reference(assets, tmp_path, kind, packing):
    paths = assets.data[kind]
    old_train, old_held = reference.load_blocks(paths, assets.tokenizer, SEQ_LEN, 0.1,
                                                packing=packing)
    train, held = load_blocks(paths, assets.tokenizer, SEQ_LEN, 0.1, packing=packing,
                              options=StoreOptions(str(tmp_path)))
    assert_same(train.load(), old_train)
    assert_same(held.load(), old_held)
    assert train.packed == old_train.packed == (packing and kind != "text")
    old_batches, batches = reference.Batches(old_train, 4, seed=3), Batches(train, 4, seed=3)
    for _ in range(2 * len(old_train) // 4 + 1):  # past an epoch's end
        assert_same(next(batches), next(old_batches))
    batches.load_state_dict(old_batches.state_dict())
    assert_same(next(batches), next(old_batches))
    # The store holds ids in the narrowest width: a 323-token vocabulary takes uint16.
    store = TokenStore(next(p for p in tmp_path.iterdir() if p.is_dir()))
    assert all(part["columns"]["input_ids"] == "uint16" for part in
               store.manifest["parts"].values())


def _train(assets, out: Path, data: list[str], monkeypatch=None, **overrides) -> dict:
    config = DistillConfig(teacher=str(assets.teacher), student=str(assets.student), data=data,
                           out=str(out), tokenizer=str(assets.root / "tokenizer"),
                           **{"steps": 4, "batch_size": 4, "seq_len": SEQ_LEN, "lr": 1e-2,
                              "warmup": 1, "eval_every": 2, "save_every": 2,
                              "eval_sequences": 4, "device": "cpu", "baseline": False,
                              "report": False, "progress": False,
                              "data_cache": str(out.parent / "store"), **overrides})
    result = run_distillation(config)
    assert result["status"] in ("completed", "stopped")
    return result


def untimed(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "tokens_per_s")} for r in history]


@pytest.mark.parametrize("packing", [True, False])
def test_trained_weights_equal_the_in_memory_reference_and_a_resume_maps_the_store(assets, tmp_path,
                                                                        monkeypatch, packing):
    import fastkd.loop
    import fastkd.trainer

    data = assets.data["mixed"]
    new = _train(assets, tmp_path / "new", data, packing=packing)
    with monkeypatch.context() as patch:  # the reference path: rows in memory, its batches
        patch.setattr(fastkd.trainer, "load_blocks", lambda paths, tokenizer, seq_len, fraction,
                      packing, utf8_errors, options, routes: reference.load_blocks(
                          paths, tokenizer, seq_len, fraction, packing=packing,
                          utf8_errors=utf8_errors))
        patch.setattr(fastkd.loop, "Batches", reference.Batches)
        old = _train(assets, tmp_path / "old", data, packing=packing)
    got, want = load_file(f"{new['run_dir']}/student/model.safetensors"), load_file(
        f"{old['run_dir']}/student/model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert untimed(new["history"]) == untimed(old["history"])

    # Stopped after 2 steps, then resumed: the store is mapped, not prepared again.
    _train(assets, tmp_path / "stopped", data, packing=packing, stop_after=2)
    with monkeypatch.context() as patch:
        patch.setattr(prepare.Preparation, "run", lambda self: pytest.fail("prepared again"))
        resumed = run_distillation(dataclasses.replace(DistillConfig.load(tmp_path / "stopped"),
                                                       resume=True))
    assert resumed["status"] == "completed"
    got = load_file(f"{resumed['run_dir']}/student/model.safetensors")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_changed_data_file_makes_the_store_stale_and_it_is_prepared_again(assets, tmp_path,
                                                                           caplog):
    text = tmp_path / "corpus.txt"
    text.write_text(corpus_texts()[0])
    options = StoreOptions(str(tmp_path / "store"))
    first = load_blocks([str(text)], assets.tokenizer, SEQ_LEN, 0.1, options=options)[0].load()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastkd"):
        load_blocks([str(text)], assets.tokenizer, SEQ_LEN, 0.1, options=options)
    assert "mapped" in caplog.text and "preparing" not in caplog.text
    text.write_text(corpus_texts()[0] + corpus_texts()[1])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastkd"):
        train, held = load_blocks([str(text)], assets.tokenizer, SEQ_LEN, 0.1, options=options)
    assert f"the data file {text} changed since the token store was prepared" in caplog.text
    assert "stale" in caplog.text
    old_train, old_held = reference.load_blocks([str(text)], assets.tokenizer, SEQ_LEN, 0.1)
    assert_same(train.load(), old_train)
    assert_same(held.load(), old_held)
    assert len(train) > len(first)
    stores = [p.name for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1  # prepared again in place; no leftovers
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".tmp")]
    # Another seq_len (or tokenizer, packing, utf8_errors) is another store.
    load_blocks([str(text)], assets.tokenizer, 32, 0.1, options=options)
    assert len([p for p in (tmp_path / "store").iterdir() if not p.name.startswith(".")]) == 2


# A process that prepares a store: "kill" SIGKILLs itself once 2 chunks are written, "slow"
# holds the lock 5 s before preparing (so that a second process started with it must wait).
PREPARER = """
import logging, os, signal, sys, time
from transformers import AutoTokenizer
from fastkd import prepare
from fastkd.store import StoreOptions, open_store
mode, tokenizer, cache, *data = sys.argv[1:]
logging.basicConfig(level=logging.INFO, format="%(message)s")
prepare.CHUNK_BYTES = 256
if mode == "kill":
    flush = prepare.PartWriter._flush
    def flush_then_die(self):
        flush(self)
        if len(self.chunks) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
    prepare.PartWriter._flush = flush_then_die
if mode == "slow":
    run = prepare.Preparation.run
    def slow_run(self):
        time.sleep(5)
        return run(self)
    prepare.Preparation.run = slow_run
store = open_store(prepare.DataSpec(tuple(data), 32), AutoTokenizer.from_pretrained(tokenizer),
                   StoreOptions(cache))
print(store.dir, len(store))
"""


def preparer(assets, mode: str, cache: Path, data: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    return subprocess.Popen([sys.executable, "-c", PREPARER, mode, str(assets.root / "tokenizer"),
                             str(cache), *data], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_kill_9_during_preparation_leaves_nothing_trusted_and_a_rerun_prepares(assets, tmp_path,
                                                                              caplog):
    cache, data = tmp_path / "store", assets.data["text"]
    proc = preparer(assets, "kill", cache, data)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -9, err[-2000:]
    left = sorted(p.name for p in cache.iterdir())
    assert any(name.startswith(".tmp-") for name in left)  # half written, under its temp name
    assert not [name for name in left if not name.startswith(".")]  # no store a run would map
    with caplog.at_level(logging.INFO, logger="fastkd"):
        train, held = load_blocks(data, assets.tokenizer, 32, 0.1, options=StoreOptions(cache))
    assert "no token store for this data, tokenizer and options yet" in caplog.text
    old_train, old_held = reference.load_blocks(data, assets.tokenizer, 32, 0.1)
    assert_same(train.load(), old_train)
    assert_same(held.load(), old_held)
    assert not [p for p in cache.iterdir() if p.name.startswith(".tmp-")]  # cleaned up


def test_two_preparations_at_once_prepare_once_and_both_map_it(assets, tmp_path):
    cache, data = tmp_path / "store", assets.data["text"]
    procs = [preparer(assets, "slow", cache, data) for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err[-2000:]
    errs = [err for _, err in results]
    assert sum(err.count("preparing the token store") for err in errs) == 1
    waited = next(err for err in errs if "preparing" not in err)
    assert "waiting: the token store" in waited and "is in use by another process" in waited
    assert " mapped in " in waited
    assert results[0][0] == results[1][0]  # the same store, the same rows
    stores = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(stores) == 1
    old_train, _ = reference.load_blocks(data, assets.tokenizer, 32, 0.1)
    assert_same(load_blocks(data, assets.tokenizer, 32, 0.1,
                            options=StoreOptions(cache))[0].load(), old_train)


def test_damaged_stores_are_refused_naming_the_file(assets, tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_BYTES", 1024)  # several chunks
    data, options = assets.data["mixed"], StoreOptions(str(tmp_path))
    spec = DataSpec(tuple(data), SEQ_LEN)
    store = open_store(spec, assets.tokenizer, options)
    text = store.dir / "text.arrow"
    chunks = store.manifest["parts"]["text"]["chunks"]
    assert len(chunks) > 3
    raw = bytearray(text.read_bytes())
    raw[chunks[2][1] + chunks[2][2] - 20] ^= 1  # a byte of chunk 2's ids
    text.write_bytes(bytes(raw))
    rows = open_store(spec, assets.tokenizer, options).rows()  # opens: the size is right
    rows.take(torch.arange(2))  # chunk 0 checks out
    with pytest.raises(ValueError, match=rf"token store {text} is damaged \(chunk 2, rows "
                                         r"\d+-\d+, does not match its sha256\); delete"):
        rows.take(torch.tensor([chunks[0][0] + chunks[1][0] + 1]))
    with pytest.raises(ValueError, match=rf"{text} is damaged \(chunk 2"):
        TokenStore(store.dir).verify()
    text.write_bytes(bytes(raw[:len(raw) // 2]))
    with pytest.raises(ValueError, match=rf"{text} is damaged \(\d+ bytes, the manifest says "
                                         r"\d+: truncated\?\)"):
        open_store(spec, assets.tokenizer, options)
    manifest = store.dir / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"rows"', '"rowz"', 1))
    with pytest.raises(ValueError, match=rf"{manifest} is damaged \(its checksum"):
        open_store(spec, assets.tokenizer, options)


def test_pre_tokenized_datasets_are_read_without_tokenizing(assets, tmp_path, monkeypatch):
    import datasets

    tok = assets.tokenizer
    docs = [json.loads(line)["text"] for line in Path(assets.data["text"][1]).read_text()
            .splitlines()]
    chat_records = [json.loads(line) for line in Path(assets.data["chat"][0]).read_text()
                    .splitlines()]
    examples = [tokens.chat_example(tok, r["messages"], "x") for r in chat_records]
    datasets.Dataset.from_list([{"input_ids": tokens.encode([d], tok)[0], "text": "ignored"}
                                for d in docs]).to_parquet(str(tmp_path / "docs.parquet"))
    datasets.Dataset.from_list([{"input_ids": ids, "assistant_masks": [int(t) for t in targets]}
                                for ids, targets in examples]).save_to_disk(str(tmp_path / "sft"))
    (tmp_path / "sft.jsonl").write_text("".join(
        json.dumps({"input_ids": ids, "labels": [i if t else -100 for i, t in
                                                 zip(ids, targets, strict=True)]}) + "\n"
        for ids, targets in examples))
    want_docs = reference.load_blocks([assets.data["text"][1]], tok, SEQ_LEN, 0.1)
    want_chat = reference.load_blocks(assets.data["chat"], tok, SEQ_LEN, 0.1)
    monkeypatch.setattr(tokens, "encode", lambda *a: pytest.fail("tokenized"))
    monkeypatch.setattr(tokens, "chat_example", lambda *a: pytest.fail("tokenized"))
    options = StoreOptions(str(tmp_path / "store"))
    for paths, want in (([tmp_path / "docs.parquet"], want_docs),
                        ([tmp_path / "sft"], want_chat), ([tmp_path / "sft.jsonl"], want_chat)):
        got = load_blocks([str(p) for p in paths], tok, SEQ_LEN, 0.1, options=options)
        for a, b in zip(got, want, strict=True):
            assert_same(a.load(), b)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input_ids": [1, 2]}) + "\n"
                   + json.dumps({"input_ids": [1, len(tok)]}) + "\n")
    with pytest.raises(ValueError, match=rf"bad.jsonl:2: token id {len(tok)} lies outside the "
                                         rf"tokenizer's vocabulary \[0, {len(tok)}\)"):
        load_blocks([str(bad)], tok, SEQ_LEN, 0.1, options=options)
    bad.write_text(json.dumps({"input_ids": [1, 2], "completion_mask": [0, 1]}) + "\n"
                   + json.dumps({"input_ids": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: no target mask, unlike the file's first"):
        load_blocks([str(bad)], tok, SEQ_LEN, 0.1, options=options)


def test_directories_and_glob_patterns_stand_for_their_files(assets, tmp_path):
    folder = tmp_path / "corpus" / "part"
    folder.mkdir(parents=True)
    for i, text in enumerate(corpus_texts()[:3]):
        (folder / f"{i}.jsonl").write_text(json.dumps({"text": text}) + "\n")
    (folder / "notes.md").write_text("not data")  # not a data file's suffix
    listed = [str(folder / f"{i}.jsonl") for i in range(3)]
    assert readers.expand_data([str(tmp_path / "corpus")]) == list(map(Path, listed))
    assert readers.expand_data([str(tmp_path / "**" / "*.jsonl")]) == list(map(Path, listed))
    options = StoreOptions(str(tmp_path / "store"))
    want = reference.load_blocks(listed, assets.tokenizer, SEQ_LEN, 0.1)
    for given in ([str(tmp_path / "corpus")], [str(folder / "*.jsonl")]):
        got = load_blocks(given, assets.tokenizer, SEQ_LEN, 0.1, options=options)
        for a, b in zip(got, want, strict=True):
            assert_same(a.load(), b)
    with pytest.raises(FileNotFoundError, match=r"the pattern .*\*.parquet matches no file"):
        readers.expand_data([str(folder / "*.parquet")])
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("not data")
    with pytest.raises(FileNotFoundError, match=r"notes holds no data file \(.txt, .jsonl, "
                                                r".json, .parquet\); name the files"):
        readers.expand_data([str(tmp_path / "notes")])


def test_a_large_text_file_is_read_in_pieces_with_the_whole_documents_tokens(assets, tmp_path,
                                                                            monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(corpus_texts()))  # ~70 kB
    want = reference.load_blocks([str(big)], assets.tokenizer, SEQ_LEN, 0.1)
    monkeypatch.setattr(readers, "PIECE_BYTES", 2048)
    monkeypatch.setattr(tokens, "CUT_WINDOW", 64)
    pieces = list(readers.iter_records(big)[1])
    assert len(pieces) > 20 and all(p[1].get("more") for p in pieces[:-1])
    assert "".join(p[1]["text"] for p in pieces) == big.read_text()
    got = load_blocks([str(big)], assets.tokenizer, SEQ_LEN, 0.1,
                      options=StoreOptions(str(tmp_path / "store")))
    for a, b in zip(got, want, strict=True):
        assert_same(a.load(), b)


def test_worker_processes_give_the_same_rows(assets, tmp_path, monkeypatch):
    data = assets.data["mixed"]
    want = reference.load_blocks(data, assets.tokenizer, SEQ_LEN, 0.1)
    monkeypatch.setitem(prepare.BATCH_RECORDS, True, 4)  # several batches in flight on 2 workers
    got = load_blocks(data, assets.tokenizer, SEQ_LEN, 0.1, options=StoreOptions(
        str(tmp_path), num_proc=2))
    assert TokenStore(next(p for p in tmp_path.iterdir() if p.is_dir())).manifest["num_proc"] == 2
    for a, b in zip(got, want, strict=True):
        assert_same(a.load(), b)


def test_cache_teacher_maps_a_store_prepared_ahead(assets, tmp_path, monkeypatch, capsys):
    from fastkd.cache import TeacherCache

    cache_dir, data = str(tmp_path / "store"), assets.data["mixed"]
    tokenizer = str(assets.root / "tokenizer")
    args = ["--data", *data, "--seq-len", str(SEQ_LEN), "--data-cache", cache_dir]
    assert main(["prepare-data", *args, "--tokenizer", tokenizer, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"token store: {cache_dir}/part1-L{SEQ_LEN}-")
    assert "every chunk checked" in printed and "examples in" in printed
    monkeypatch.setattr(prepare.Preparation, "run", lambda self: pytest.fail("prepared again"))
    assert main(["cache-teacher", *args, "--teacher", str(assets.teacher), "--tokenizer",
                 tokenizer, "--out", str(tmp_path / "cache"), "--k", "4", "--no-progress"]) == 0
    cache = TeacherCache(tmp_path / "cache")
    want_train, want_held = reference.load_blocks(data, assets.tokenizer, SEQ_LEN, 0.05)
    for split, want in (("train", want_train), ("heldout", want_held)):
        assert_same(Blocks(**{n: getattr(cache.blocks(split), n) for n in FIELDS}), want)


def test_two_torchrun_ranks_share_one_store(assets, tmp_path):
    from test_distributed import assert_clean, torchrun

    store = tmp_path / "store"
    rc, out, err, _ = torchrun([
        "--teacher", str(assets.teacher), "--student", str(assets.student), "--tokenizer",
        str(assets.root / "tokenizer"), "--data", *assets.data["mixed"], "--out",
        str(tmp_path / "run"), "--data-cache", str(store), "--seq-len", str(SEQ_LEN),
        "--steps", "1", "--batch-size", "2", "--eval-sequences", "2", "--device", "cpu",
        "--parallel", "ddp", "--teacher-placement", "replicate", "--no-baseline", "--no-report",
        "--no-progress"])
    assert_clean(rc, err)
    assert err.count("preparing the token store") == 1 and err.count(" prepared in ") == 1
    assert len([p for p in store.iterdir() if not p.name.startswith(".")]) == 1
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()


def test_the_data_flags_are_in_the_help_and_bad_values_answer_before_torch_loads():
    probe = (
        "import sys\n"
        "from fastkd.cli import main\n"
        "for argv in (['prepare-data', '--help'], ['distill', '--help'], "
        "['cache-teacher', '--help'], ['prepare-data', '--data', 'd', '--tokenizer', 't', "
        "'--num-proc', '0'], ['prepare-data', '--data', 'd', '--tokenizer', 't', "
        "'--seq-len', '1']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        print('exit', exit.code, file=sys.stderr)\n"
        "print('loaded:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert "loaded: []" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count("exit 0") == 3 and proc.stderr.count("exit 2") == 2
    assert "num_proc must be a positive int or None, got 0" in proc.stderr
    assert "seq_len must be >= 2" in proc.stderr
    for command in ("prepare-data", "distill", "cache-teacher"):
        usage = proc.stdout.split(f"usage: fastkd {command}")[1].split("usage: ")[0]
        assert "--data-cache DIR" in usage and "--num-proc N" in usage, command
    assert "$FASTKD_CACHE/data" in proc.stdout and "(default: 256)" in proc.stdout


def test_a_store_this_user_cannot_write_is_mapped_without_the_lock(assets, tmp_path,
                                                                  monkeypatch):
    import errno

    from fastkd import fsio

    data, options = assets.data["text"], StoreOptions(str(tmp_path))
    train = load_blocks(data, assets.tokenizer, 32, 0.1, options=options)[0].load()

    def read_only(path, what, wait=False):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(fsio, "locked", read_only)  # a team's store, another user's files
    assert_same(load_blocks(data, assets.tokenizer, 32, 0.1, options=options)[0].load(), train)
    with pytest.raises(PermissionError, match=rf"data_cache {tmp_path}: the token store .* must "
                                              r"be prepared \(no token store for this data.*"
                                              r"this user cannot write there"):
        load_blocks(data, assets.tokenizer, 48, 0.1, options=options)
