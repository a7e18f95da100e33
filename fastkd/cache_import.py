"""Teacher log-probabilities produced elsewhere (an inference server) turned into a teacher cache:
`fastkd cache-import`, `import_logprobs`.

Input: JSON Lines, one sequence a line, in the shape of vLLM's `prompt_logprobs`:

    {"input_ids": [t_0, t_1, ..., t_(n-1)],
     "prompt_logprobs": [null, {"ID": LOGPROB, ...}, ..., {"ID": LOGPROB, ...}]}

`prompt_logprobs[i]` (i >= 1) is the teacher's top-k at position i, log p(x_i = ID | x_<i), keys
the token ids as strings, values a number or an object with a "logprob" field (vLLM's Logprob:
{"logprob": -0.31, "rank": 1, "decoded_token": "a"}); entry 0 has no context (null). A null entry
at i >= 1 marks a position that does not count (a prompt): it stores nothing. The maps may hold
different numbers of ids (vLLM adds the actual token when it is not in the top k). SGLang's
`input_top_logprobs` (lists of [logprob, token_id, text]) convert with
`{str(tid): lp for lp, tid, _ in entry}`. Sequences are padded to seq_len (default: the longest),
one a row, and split into train and held-out as `fastkd distill` splits its data.

Temperature: the log-probabilities are at the temperature the server used (`prompt_logprobs` are
log softmax of the raw logits: T = 1), which `--temperature` records; `fastkd distill` must then
run at that temperature, and refuses another. Top-k log-probabilities cannot be re-tempered
exactly: softmax(lp / T') over the k ids is the tempered distribution renormalised to them, but the
mass at T' of the ids outside them needs every logit. The tail bucket of the sparse loss is then
1 - sum_k p_k at the server's temperature: the teacher's exact mass outside the k ids.

Bad input raises a ValueError naming the file and line: an input id that is not an integer, an
id outside the tokenizer's vocabulary (the student's), an id given twice in one map ("284" twice,
or "284" and "0284": JSON would keep the last), a value that is not a finite log-probability,
maps whose probabilities add up to more than 1, a prompt_logprobs list whose length is not the
sequence's, a sequence longer than --seq-len. Without --seq-len the longest sequence sets it (the
file and line that did are logged, with a warning when it is far longer than the others: every
row is padded to it). Shards are written atomically and checked on a rerun, as
`fastkd cache-teacher`'s: an interrupted import resumes.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path

import torch

from fastkd.cache_format import (
    FORMAT,
    Rows,
    data_fingerprint,
    plan_digest,
    tokenizer_fingerprint,
)
from fastkd.cache_write import build_cache
from fastkd.data import SPLIT_SEED, Blocks, split
from fastkd.plans import ImportPlan
from fastkd.readers import decode_utf8

log = logging.getLogger("fastkd")

MASS_SLACK = 1e-3  # maps whose probabilities add up to more: not log-probabilities
# The longest sequence this many times the median: a warning that it sets seq_len for every row.
LONG_SEQUENCE = 4


class Pairs(list):
    """A JSON object as its (key, value) pairs in file order, duplicates kept (a dict would keep
    the last value of a key given twice, silently)."""


def _value(where: str, key: str, value) -> float:
    if isinstance(value, Pairs):  # vLLM's Logprob object
        value = dict(value).get("logprob")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(
            value) or value > 1e-6:
        raise ValueError(f"{where}: the log-probability of id {key} is {value!r}, not a finite "
                         "number <= 0")
    return min(float(value), 0.0)


def read_sequence(where: str, record, vocab: int) -> tuple[list[int], list[dict | None]]:
    """(input_ids, maps) of one record: maps[i] is {id: log-probability} for position i's
    prediction of token i + 1, or None where it does not count."""
    if not isinstance(record, dict) or not isinstance(record.get("input_ids"), list) or \
            not isinstance(record.get("prompt_logprobs"), list):
        raise ValueError(f'{where}: expected a JSON object with lists "input_ids" and '
                         '"prompt_logprobs"')
    ids, entries = record["input_ids"], record["prompt_logprobs"]
    if len(ids) < 2 or len(entries) != len(ids):
        raise ValueError(f"{where}: prompt_logprobs holds {len(entries)} entries for "
                         f"{len(ids)} input ids (one an id, >= 2 ids)")
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"{where}: input id {token!r} (input_ids[{i}]) is not an integer "
                             "token id")
        if not 0 <= token < vocab:
            raise ValueError(f"{where}: input id {token} (input_ids[{i}]) lies outside the "
                             f"tokenizer's vocabulary [0, {vocab})")
    maps = []
    for entry in entries[1:]:
        if entry is None:
            maps.append(None)
            continue
        if not isinstance(entry, Pairs) or not entry:
            raise ValueError(f"{where}: a prompt_logprobs entry must be null or a non-empty "
                             f"object {{id: log-probability}}, got {str(entry)[:60]}")
        row, keys = {}, {}
        for key, value in entry:
            try:
                token = int(key)
            except ValueError:
                raise ValueError(f"{where}: {key!r} is not a token id") from None
            if not 0 <= token < vocab:
                raise ValueError(f"{where}: id {token} exceeds the student's vocabulary: the "
                                 f"tokenizer has {vocab} ids")
            if token in row:
                raise ValueError(f"{where}: id {token} appears twice in one prompt_logprobs "
                                 f"map (as {keys[token]!r} and {key!r}): one log-probability "
                                 "an id; fix the file that wrote it")
            row[token], keys[token] = _value(where, key, value), key
        if sum(math.exp(v) for v in row.values()) > 1 + MASS_SLACK:
            raise ValueError(f"{where}: the probabilities of a position add up to more than 1: "
                             "not log-probabilities of one distribution")
        maps.append(row)
    if all(m is None for m in maps):
        raise ValueError(f"{where}: no position carries log-probabilities")
    return ids, maps


def _records(path: Path, text: str):
    """("FILE:LINE", record) for each non-empty line, its objects read as `Pairs` (the records
    themselves as dicts); a line that is not JSON raises a ValueError naming the file and line."""
    decoder = json.JSONDecoder(object_pairs_hook=Pairs)
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = decoder.decode(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
        yield where, dict(record) if isinstance(record, Pairs) else record


def read_records(paths: list[str], vocab: int) -> list[tuple[str, list[int], list]]:
    """(FILE:LINE, input_ids, maps) of every sequence in the files."""
    sequences = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"logprobs file not found: {path}")
        text = decode_utf8(Path(path), Path(path).read_bytes(),
                           hint="a server's JSON output is UTF-8: is this the right file?")
        sequences += [(where, *read_sequence(where, record, vocab))
                      for where, record in _records(Path(path), text)]
    if not sequences:
        raise ValueError(f"logprobs files {paths} hold no sequence")
    return sequences


def choose_seq_len(sequences, seq_len: int | None) -> int:
    """seq_len as given (every sequence must fit: one that does not is named by file and line),
    else the longest sequence's length, logged with where it comes from; a warning when it is
    more than LONG_SEQUENCE times the median (every row is padded to it)."""
    lengths = [len(ids) for _, ids, _ in sequences]
    longest = max(range(len(sequences)), key=lengths.__getitem__)
    where = sequences[longest][0]
    if seq_len is not None:
        over = next((i for i, n in enumerate(lengths) if n > seq_len), None)
        if over is not None:
            raise ValueError(f"{sequences[over][0]}: the sequence holds {lengths[over]} ids, more "
                             f"than --seq-len {seq_len}; raise --seq-len (to at least "
                             f"{lengths[longest]}: {where}) or leave it out")
        return seq_len
    median = statistics.median(lengths)
    if lengths[longest] > LONG_SEQUENCE * median:
        log.warning("cache-import: seq_len %d is set by one long sequence (%s), %.0fx the median "
                    "length %g: every row is padded to it; give --seq-len (with shorter "
                    "sequences) to size the rows yourself", lengths[longest], where,
                    lengths[longest] / median, median)
    else:
        log.info("cache-import: seq_len %d, the longest sequence (%s); distill with --seq-len %d",
                 lengths[longest], where, lengths[longest])
    return lengths[longest]


def _blocks(sequences, seq_len: int, pad_id: int) -> tuple[Blocks, list]:
    """One row per sequence, padded; (Blocks, maps per row): token i + 1 is a target where
    position i has a map."""
    n = len(sequences)
    input_ids = torch.full((n, seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(n, seq_len, dtype=torch.long)
    counted = torch.zeros(n, seq_len, dtype=torch.bool)
    for r, (_, ids, maps) in enumerate(sequences):
        input_ids[r, :len(ids)] = torch.tensor(ids)
        mask[r, :len(ids)] = 1
        counted[r, 1:len(ids)] = torch.tensor([m is not None for m in maps])
    return Blocks(input_ids, mask, counted=counted), [maps for _, _, maps in sequences]


def import_logprobs(plan: ImportPlan) -> dict:
    """Turn the log-probability files of `plan` into a teacher cache under plan.out (or resume
    one); returns the manifest."""
    from fastkd.models import load_tokenizer

    tokenizer = load_tokenizer(plan.tokenizer)
    vocab = len(tokenizer)
    sequences = read_records(plan.logprobs, vocab)
    seq_len = choose_seq_len(sequences, plan.seq_len)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)
    blocks, maps = _blocks(sequences, seq_len, pad)
    # the split of fastkd.data, on the row numbers
    index = Blocks(torch.arange(len(blocks)).unsqueeze(-1), torch.ones(len(blocks), 1,
                                                                       dtype=torch.long))
    train_rows, heldout_rows = (b.input_ids[:, 0] for b in split(index, plan.eval_fraction))
    log.info("data: %d training and %d held-out sequences of %d tokens", len(train_rows),
             len(heldout_rows), seq_len)
    k = max(len(m) for row in maps for m in row if m is not None)
    compact = plan.layout == "compact"
    manifest = {
        "format": FORMAT, "teacher": plan.teacher, "teacher_fingerprint": {"imported":
                                                                           plan.teacher},
        "tokenizer": tokenizer_fingerprint(tokenizer), "vocab": vocab,
        "temperature": plan.temperature, "mode": "topk", "k": k, "samples": None, "slots": k,
        "layout": plan.layout, "logprob_step": plan.logprob_step if compact else None,
        "dtype": None if compact else plan.dtype, "seq_len": seq_len,
        "eval_fraction": plan.eval_fraction, "seed": None,
        "shard_sequences": plan.shard_sequences, "source": "import",
        "data": data_fingerprint(plan.logprobs),
        "split": {"seed": SPLIT_SEED, "train": len(train_rows), "heldout": len(heldout_rows)},
        "shards": [], "complete": False,
    }
    manifest["plan_sha256"] = plan_digest(manifest)
    rows_of_split = {"train": train_rows, "heldout": heldout_rows}

    def import_shards():
        def rows(split_name, first, part, _offset, _advance):  # fast: the bar moves per shard
            chosen = rows_of_split[split_name][first:first + len(part)].tolist()
            row_maps = [m for r in chosen for m in maps[r] if m is not None]
            ids = torch.full((len(row_maps), k), -1, dtype=torch.long)
            values = torch.zeros(len(row_maps), k, dtype=torch.float64)
            n = torch.tensor([len(m) for m in row_maps], dtype=torch.long)
            for i, m in enumerate(row_maps):
                ids[i, :len(m)] = torch.tensor(list(m))
                values[i, :len(m)] = torch.tensor(list(m.values()), dtype=torch.float64)
            # a map a hair above 1 (the server's rounding): brought to 1
            mass = torch.logsumexp(torch.where(ids >= 0, values, float("-inf")), -1)
            values = values - mass.clamp(min=0).unsqueeze(-1)
            return Rows(ids, values, n)

        return rows

    return build_cache(Path(plan.out), manifest,
                       {"train": blocks.select(train_rows), "heldout": blocks.select(heldout_rows)},
                       plan.shard_sequences, import_shards, plan.progress, "cache-import")
