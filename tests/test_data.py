"""fastkd.data: reading text / jsonl, packing, the held-out split and resumable batches."""

from __future__ import annotations

import json

import pytest
import torch

from fastkd.data import Batches, Blocks, pack, read_documents, split


def test_read_text_and_jsonl(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("line one\nline two\n")
    assert read_documents(txt) == ["line one\nline two\n"]
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(json.dumps({"text": "first"}) + "\n\n" + json.dumps({"text": "second"}) + "\n")
    assert read_documents(jsonl) == ["first", "second"]


def test_missing_empty_and_malformed_files_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_documents(tmp_path / "missing.txt")
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
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


def test_pack_pads_the_last_block_and_masks_its_labels():
    blocks = pack(torch.arange(10), seq_len=4, pad_id=99)
    assert blocks.input_ids.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 99, 99]]
    assert blocks.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert blocks.labels(-100)[2].tolist() == [8, 9, -100, -100]
    with pytest.raises(ValueError, match="seq_len"):
        pack(torch.arange(10), seq_len=1, pad_id=0)


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
