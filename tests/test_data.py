"""fastkd.readers, fastkd.tokens, fastkd.data: reading text / jsonl / json / chat /
prompt-completion / pre-tokenized / parquet / saved datasets, UTF-8, packing, the held-out split and
resumable batches."""

from __future__ import annotations

import json

import pytest
import torch
from _trainer_fixtures import CHATML, CHATML_GENERATION, build_chat_tokenizer, chats

from fastkd.data import Batches, Blocks, Fitter, pack, pack_examples, split
from fastkd.readers import read_documents, read_records
from fastkd.store import load_blocks
from fastkd.tokens import tokenize_examples


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    """A byte-level BPE with ChatML special tokens and a template without generation markers."""
    return build_chat_tokenizer(tmp_path_factory.mktemp("chat-tokenizer"))


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_text_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("line one\nline two\n")
    assert read_documents(txt) == ["line one\nline two\n"]
    jsonl = tmp_path / "b.jsonl"
    # U+2028 is a line break to str.splitlines, but not to JSON lines.
    jsonl.write_text(json.dumps({"text": "first\u2028"}, ensure_ascii=False) + "\n\n"
                     + json.dumps({"text": "second"}) + "\n")
    assert read_documents(jsonl) == ["first\u2028", "second"]
    assert read_records(write_jsonl(tmp_path / "c.jsonl", chats()))[0] == "chat"
    fmt, records = read_records(write_jsonl(tmp_path / "d.jsonl",
                                            [{"prompt": "p", "completion": "c", "id": 3}]))
    assert (fmt, records) == ("prompt-completion",
                              [(f"{tmp_path / 'd.jsonl'}:1", {"prompt": "p", "completion": "c"})])


def test_missing_empty_and_malformed_files_name_the_file_and_record(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    for text in ("  \n", ""):  # blank, and 0 bytes (no line end at all: read once, not forever)
        empty.write_text(text)
        with pytest.raises(ValueError, match="empty.txt"):
            read_documents(empty)
    no_text = tmp_path / "bad.jsonl"
    no_text.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*\"text\""):
        read_documents(no_text)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    with pytest.raises(ValueError, match="broken.jsonl:1: not valid JSON"):
        read_documents(broken)
    bad = [({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
           ({"messages": "hi"}, '"messages" must be a non-empty list'),
           ({"messages": [{"content": "x"}]}, '.*string "role"'),
           ({"text": "a text record in a chat file"}, '"messages" must be'),
           ]
    for record, message in bad:
        path = write_jsonl(tmp_path / "chat.jsonl", chats()[:2] + [record])
        with pytest.raises(ValueError, match=f"chat.jsonl:3: {message}"):
            read_records(path)
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "p", "completion": "c"},
                                              {"prompt": "p", "completion": ["c"]}])
    with pytest.raises(ValueError, match=r'pc.jsonl:2: expected string "prompt" and '
                                         r'"completion" .*completion=list'):
        read_records(path)


def test_files_that_are_not_utf8_are_refused_with_the_byte_offset(tmp_path):
    cases = {
        "random.txt": bytes(range(0x80, 0x100)) * 4,  # binary: a continuation byte first
        "latin1.txt": "plain line\ncaf\u00e9\n".encode("latin-1"),
        "utf16.txt": "hello".encode("utf-16"),  # with its byte-order mark
        "utf16le.txt": "hello".encode("utf-16-le"),  # no BOM: valid UTF-8, but NUL bytes
        "records.jsonl": b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n',
    }
    expected = {"random.txt": r"byte offset 0 \(line 1\)",
                "latin1.txt": r"byte offset 14 \(line 2\)",
                "utf16.txt": r"byte offset 0 \(line 1\) holds b'\\xff\\xfe",
                "utf16le.txt": r"byte offset 1 \(line 1\) is a NUL byte",
                "records.jsonl": r"byte offset 43 \(line 3\)"}
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(ValueError, match=rf"{name}: not UTF-8 text: {expected[name]}.*"
                                             "--utf8-errors replace"):
            read_documents(tmp_path / name)
    assert read_documents(tmp_path / "latin1.txt", "replace") == ["plain line\ncaf\ufffd\n"]
    assert read_documents(tmp_path / "records.jsonl", "replace")[2] == "caf\ufffd"
    with pytest.raises(ValueError, match="utf8_errors"):
        read_documents(tmp_path / "latin1.txt", "ignore")


def decoded_targets(tokenizer, ids, targets) -> str:
    return tokenizer.decode([i for i, t in zip(ids, targets, strict=True) if t])


def test_chat_targets_are_the_assistant_turns_with_and_without_generation_markers(
        chat_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chats())
    fmt, records = read_records(path)
    assert chat_tokenizer.chat_template == CHATML
    diffed = tokenize_examples(str(path), fmt, records, chat_tokenizer)
    chat_tokenizer.chat_template = CHATML_GENERATION
    try:
        marked = tokenize_examples(str(path), fmt, records, chat_tokenizer)
    finally:
        chat_tokenizer.chat_template = CHATML
    assert diffed == marked  # same ids, same targets, both ways
    for (ids, targets), chat in zip(diffed, chats(), strict=True):
        said = "".join(m["content"] + "<|im_end|>\n" for m in chat["messages"]
                       if m["role"] == "assistant")
        assert decoded_targets(chat_tokenizer, ids, targets) == said
        assert ids == chat_tokenizer.apply_chat_template(chat["messages"], tokenize=True,
                                                          return_dict=True)["input_ids"]


def test_chat_errors_name_the_file_and_record(chat_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", chats())
    fmt, records = read_records(path)
    tok = chat_tokenizer
    try:
        tok.chat_template = None
        with pytest.raises(ValueError, match=r"chat.jsonl: chat records .* has none"):
            tokenize_examples(str(path), fmt, records, tok)
        # Shortens every assistant turn but the last (as templates that drop earlier reasoning
        # do): the rendering of a prefix is not a prefix of the whole.
        tok.chat_template = CHATML.replace("{{ m['content'] }}<|im_end|>\n{% else %}",
                                           "{{ m['content'] if loop.last else '...' }}"
                                           "<|im_end|>\n{% else %}")
        assert tok.chat_template != CHATML
        with pytest.raises(ValueError, match=r"chat.jsonl:2: .* does not render this "
                                             r"conversation incrementally"):
            tokenize_examples(str(path), fmt, records, tok)
        tok.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(ValueError, match=r"chat.jsonl:1: the chat template .* fails on this "
                                             r"record .*roles must alternate"):
            tokenize_examples(str(path), fmt, records, tok)
        tok.chat_template = CHATML
        first = write_jsonl(tmp_path / "first.jsonl",
                            [{"messages": [{"role": "assistant", "content": "Hi."}]}])
        with pytest.raises(ValueError, match=r"first.jsonl:1: the conversation opens with an "
                                             r"assistant turn"):
            tokenize_examples(str(first), *read_records(first), tok)
    finally:
        tok.chat_template = CHATML


def test_prompt_completion_targets_are_the_completion_and_eos(chat_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: sort a list? A:",
                                                "completion": " sorted(xs)"},
                                               {"prompt": "", "completion": "bisect"}])
    (ids, targets), (ids2, targets2) = tokenize_examples(str(path), *read_records(path),
                                                         chat_tokenizer)
    eos = chat_tokenizer.eos_token
    assert chat_tokenizer.decode(ids) == "Q: sort a list? A: sorted(xs)" + eos
    assert decoded_targets(chat_tokenizer, ids, targets) == " sorted(xs)" + eos
    assert targets == sorted(targets)  # the prompt, then the completion
    assert all(targets2)  # an empty prompt: (the first token cannot be predicted: pack_examples)


def test_pack_pads_the_last_block_and_masks_its_labels():
    blocks = pack(torch.arange(10), seq_len=4, pad_id=99)
    assert blocks.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert blocks.labels(-100)[2].tolist() == [8, 9, -100, -100]
    assert blocks.count_targets() == 7 and blocks.counted is None and blocks.position_ids is None
    assert set(blocks.model_inputs()) == {"input_ids", "attention_mask"}
    with pytest.raises(ValueError, match="seq_len"):
        pack(torch.arange(10), seq_len=1, pad_id=0)


def test_pack_examples_keeps_examples_whole_and_apart():
    t, f = True, False
    examples = [([1, 2, 3], [f, t, t]), ([4, 5], [t, t]), ([6, 7, 8, 9], [f, f, t, t]),
                ([10, 11], [f, t])]
    packed = pack_examples(examples, seq_len=6, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 0], [6, 7, 8, 9, 10, 11]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert packed.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6]
    # Each example's first token is never a target: the token before it is another example's.
    assert packed.labels(-1).tolist() == [[-1, 2, 3, -1, 5, -1], [-1, -1, 8, 9, -1, 11]]
    assert packed.count_targets() == 6
    assert set(packed.model_inputs()) == {"input_ids", "position_ids"}
    padded = pack_examples(examples, seq_len=6, pad_id=0, packing=False)
    assert padded.position_ids is None and len(padded) == 4
    assert padded.labels(-1)[2].tolist() == [-1, -1, 8, 9, -1, -1]
    assert set(padded.model_inputs()) == {"input_ids", "attention_mask"}
    rows = packed.select(torch.tensor([1]))
    assert rows.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]] and rows.counted.shape == (1, 6)


def fit_all(examples, seq_len, where):
    fitter = Fitter(seq_len, where)
    kept = [e for e in (fitter.fit(*example) for example in examples) if e is not None]
    fitter.finish()
    return kept


def test_fit_examples_cuts_long_examples_and_drops_those_left_without_targets(caplog):
    t, f = True, False
    examples = [([1, 2, 3, 4, 5], [f, f, t, t, t]), ([6, 7, 8, 9], [f, f, f, t]), ([1, 2], [t, f])]
    assert fit_all(examples, 3, "x.jsonl") == [([1, 2, 3], [f, f, t])]
    assert "x.jsonl: 2 of 3 examples are longer than seq_len=3 and were cut; 2 kept no target" \
        in caplog.text
    with pytest.raises(ValueError, match="x.jsonl: no example has a target"):
        fit_all(examples[1:], 3, "x.jsonl")


def test_parquet_and_saved_datasets_read_like_jsonl(chat_tokenizer, tmp_path):
    import datasets

    pc = [{"prompt": f"Q{i}:", "completion": f" answer {i}", "extra": i} for i in range(6)]
    jsonl_blocks = load_blocks([str(write_jsonl(tmp_path / "chat.jsonl", chats())),
                                str(write_jsonl(tmp_path / "pc.jsonl", pc))],
                               chat_tokenizer, 96, 0.2)
    datasets.Dataset.from_list(chats()).save_to_disk(str(tmp_path / "chat-ds"))
    datasets.Dataset.from_list(pc).to_parquet(str(tmp_path / "pc.parquet"))
    ds_blocks = load_blocks([str(tmp_path / "chat-ds"), str(tmp_path / "pc.parquet")],
                            chat_tokenizer, 96, 0.2)
    for a, b in zip(jsonl_blocks, ds_blocks, strict=True):
        a, b = a.load(), b.load()
        assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.counted, b.counted)
        assert torch.equal(a.position_ids, b.position_ids)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(pc),
                          "test": datasets.Dataset.from_list(pc)}).save_to_disk(
        str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"dict: a DatasetDict with splits \['test', 'train'\]"):
        read_records(tmp_path / "dict")
    datasets.Dataset.from_list([{"body": "x"}]).to_parquet(str(tmp_path / "cols.parquet"))
    with pytest.raises(ValueError, match=r"cols.parquet: expected a 'text' column"):
        read_records(tmp_path / "cols.parquet")
    datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "x"}]}]).to_parquet(
        str(tmp_path / "noassistant.parquet"))
    with pytest.raises(ValueError, match=r"noassistant.parquet row 0: no assistant turn"):
        read_records(tmp_path / "noassistant.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="junk.parquet: not a readable dataset"):
        read_records(tmp_path / "junk.parquet")


def test_load_blocks_mixes_text_and_examples(chat_tokenizer, tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("def heappush(heap, item):\n    heap.append(item)\n" * 8)
    chat = write_jsonl(tmp_path / "chat.jsonl", chats() * 4)
    train, held = (rows.load() for rows in load_blocks([str(text), str(chat)], chat_tokenizer, 96,
                                                       0.25))
    rows = Blocks(torch.cat([train.input_ids, held.input_ids]),
                  torch.cat([train.attention_mask, held.attention_mask]),
                  counted=torch.cat([train.counted, held.counted]),
                  position_ids=torch.cat([train.position_ids, held.position_ids]))
    n_text_only = sum(map(len, load_blocks([str(text)], chat_tokenizer, 96, 0.25)))
    n_text = sum(1 for row in rows.input_ids if chat_tokenizer.convert_tokens_to_ids(
        "<|im_start|>") not in row.tolist())
    # Text rows: one sequence each (positions 0..L-1), every token a target.
    is_text = rows.counted.sum(1) == rows.attention_mask.sum(1)
    assert int(is_text.sum()) == n_text == n_text_only
    assert (rows.position_ids[is_text] == torch.arange(96)).all()
    said = chat_tokenizer.decode(rows.input_ids[~is_text][rows.counted[~is_text]])
    assert said.count("heappush<|im_end|>") == 4 and "user" not in said


def test_split_is_fixed_disjoint_and_complete():
    blocks = pack(torch.arange(400), seq_len=4, pad_id=0)
    train, held = split(blocks, 0.1)
    train2, held2 = split(blocks, 0.1)
    assert torch.equal(held.input_ids, held2.input_ids) and len(held) == 10 and len(train) == 90
    firsts = set(train.input_ids[:, 0].tolist()) | set(held.input_ids[:, 0].tolist())
    assert firsts == set(range(0, 400, 4))
    with pytest.raises(ValueError, match="too few"):
        split(pack(torch.arange(4), seq_len=4, pad_id=0), 0.5)


def test_batches_cover_each_epoch_once_and_resume_exactly():
    blocks = Blocks(torch.arange(10).unsqueeze(1), torch.ones(10, 1, dtype=torch.long))
    batches = Batches(blocks, batch_size=3, seed=7)
    epoch0 = [next(batches).input_ids.flatten().tolist() for _ in range(3)]
    assert len(set(sum(epoch0, []))) == 9  # 3 full batches of distinct sequences; 1 left over
    state = batches.state_dict()
    ahead = [next(batches).input_ids.flatten().tolist() for _ in range(5)]
    again = Batches(blocks, batch_size=3, seed=7)
    again.load_state_dict(state)
    assert [next(again).input_ids.flatten().tolist() for _ in range(5)] == ahead
    other_seed = Batches(blocks, batch_size=3, seed=8)
    assert [next(other_seed).input_ids.flatten().tolist() for _ in range(3)] != epoch0
    with pytest.raises(ValueError, match="fewer than batch_size"):
        Batches(blocks, batch_size=11, seed=0)


def test_json_arrays_json_lines_and_sharegpt_are_read_as_records(chat_tokenizer, tmp_path):
    array = tmp_path / "a.json"
    array.write_text(json.dumps([{"text": "def f(): pass"}, {"text": "x = 1", "id": 2}]))
    assert read_records(array) == ("text", [(f"{array} element 0", {"text": "def f(): pass"}),
                                            (f"{array} element 1", {"text": "x = 1"})])
    lines = write_jsonl(tmp_path / "b.json", [{"text": "def f(): pass"}, {"text": "x = 1"}])
    assert read_documents(lines) == ["def f(): pass", "x = 1"]
    sharegpt = [{"conversations": [{"from": "system", "value": m["messages"][0]["content"]}]
                 + [{"from": {"user": "human", "assistant": "gpt"}.get(m2["role"], "system"),
                     "value": m2["content"]} for m2 in m["messages"][1:]]} for m in chats()]
    fmt, records = read_records(write_jsonl(tmp_path / "sharegpt.jsonl", sharegpt))
    assert fmt == "chat" and [r["messages"] for _, r in records] == [
        [{"role": "system", "content": c["messages"][0]["content"]}, *c["messages"][1:]]
        for c in chats()]
    # A JSON array of chats trains on the same rows as the same chats in JSON Lines.
    chat_array = tmp_path / "chats.json"
    chat_array.write_text(json.dumps(chats()))
    got, want = (load_blocks([str(p)], chat_tokenizer, 96, 0.3) for p in
                 (chat_array, write_jsonl(tmp_path / "chats.jsonl", chats())))
    assert torch.equal(got[0].load().input_ids, want[0].load().input_ids)
    bad = write_jsonl(tmp_path / "bad.jsonl", [sharegpt[0], {"conversations": [
        {"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: conversation turn 1 is from 'bot'; "
                                         r"fastkd reads ShareGPT turns from .*convert the record"):
        read_records(bad)
    one = tmp_path / "one.json"
    one.write_text(json.dumps({"version": 1, "data": [{"text": "x"}]}, indent=2))
    with pytest.raises(ValueError, match=r"one.json: one JSON object .* not JSON Lines or an "
                                         r"array of records; .*jq -c '.data\[\]'"):
        read_records(one)
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps(["a", "b"]))
    with pytest.raises(ValueError, match=r"strings.json element 0: expected a JSON object, got "
                                         r"str"):
        read_records(strings)


def test_an_empty_dataset_and_null_content_are_refused_naming_the_file(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([], pa.string())}), str(tmp_path / "e.parquet"))
    with pytest.raises(ValueError, match=r"e.parquet: the dataset is empty \(0 rows\)"):
        read_records(tmp_path / "e.parquet")
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(tmp_path / "e-ds"))
    with pytest.raises(ValueError, match=r"e-ds: the dataset is empty \(0 rows\)"):
        read_records(tmp_path / "e-ds")
    null = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    path = write_jsonl(tmp_path / "null.jsonl", [chats()[0], {"messages": null}])
    with pytest.raises(ValueError, match=r'null.jsonl:2: message 1 \(assistant\) has no '
                                         r'"content" \(null\)'):
        read_records(path)
    calls = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None,
                                                 "tool_calls": [{"name": "f"}]},
             {"role": "assistant", "content": "done"}]
    assert read_records(write_jsonl(tmp_path / "tools.jsonl", [{"messages": calls}]))[0] == "chat"
