"""Training data for the trainer: local files and saved datasets, tokenized, packed, split, batched.

Formats (per file; a .jsonl file's format is its first record's, and every record must match it):
- text: a .txt file (one document), .jsonl records with a string "text", or a dataset with a
  "text" column. Every document is tokenized and followed by the tokenizer's end-of-sequence token
  (if it has one); the token stream is cut into blocks of `seq_len`, the last, shorter block
  padded (attention mask 0, label `ignore_index`). Every token is a target; documents attend to the
  ones before them in the stream.
- chat: records with "messages" (a list of {"role", "content"} objects), rendered and tokenized
  with the tokenizer's chat template. Only the assistant turns are targets: the template's
  `{% generation %}` spans where it has them, else the text each assistant message adds to the
  rendering (see `chat_example`).
- prompt-completion: records with string "prompt" and "completion": the completion tokens and
  the end-of-sequence token are the targets, the prompt's are not.
- .parquet files and `datasets.Dataset.save_to_disk` directories (read through `datasets`) with
  the same columns ("messages" before "prompt"/"completion" before "text").

Chat and prompt-completion records are examples: never split, never attending to each other. An
example longer than `seq_len` is cut to its first `seq_len` tokens (one with no target left is
dropped). packing=True puts several examples in a row, each with position_ids counting from 0,
and the model gets no attention_mask (`Blocks.model_inputs`): transformers then builds a
block-diagonal causal mask from the position_ids resets (sdpa, eager, flex; flash-attention only
for one row a batch, so `check_packing` refuses it). packing=False gives each example its own
padded row.

Files are read as UTF-8: undecodable bytes or NUL bytes are refused with the file and byte offset
(utf8_errors="replace" opts into U+FFFD replacement). A fixed-seed split holds out some rows for
evaluation, so the held-out set stays put when the training seed changes. `Batches` hands out
training batches in a seeded order per epoch and saves and restores its position, which is what
makes resume exact.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastkd.fsio import UTF8_ERRORS

SPLIT_SEED = 1234  # the held-out split is the same for every training seed
GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")

log = logging.getLogger("fastkd")


# ----------------------------------------------------------------------------------------------
# Reading: (format, records) of one file or saved dataset.


def read_records(path: str | Path, utf8_errors: str = "strict") -> tuple[str, list[tuple]]:
    """(format, [(where, record)]) of one data file: format is "text", "chat" or
    "prompt-completion"; where names the file and line (or row) for error messages; each record is
    a dict with the format's fields, checked.

    Raises FileNotFoundError for a missing path, ValueError for a file that is not UTF-8, not
    valid JSON lines, has no records, or holds a record of another format or with a bad field.
    """
    path = Path(path)
    if utf8_errors not in UTF8_ERRORS:
        raise ValueError(f"utf8_errors must be one of {UTF8_ERRORS}, got {utf8_errors!r}")
    if path.is_dir() or path.suffix == ".parquet":
        fmt, records = _read_dataset(path)
    elif not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    elif path.suffix == ".jsonl":
        fmt, records = _read_jsonl(path, decode_utf8(path, path.read_bytes(), utf8_errors))
    else:
        text = decode_utf8(path, path.read_bytes(), utf8_errors)
        fmt, records = "text", [(str(path), {"text": text})]
    if fmt == "text":
        records = [(where, r) for where, r in records if r["text"].strip()]
    if not records:
        raise ValueError(f"data file is empty (no text): {path}")
    return fmt, records


def read_documents(path: str | Path, utf8_errors: str = "strict") -> list[str]:
    """The documents of a text-format file: each "text" of a .jsonl file, else the whole file."""
    fmt, records = read_records(path, utf8_errors)
    if fmt != "text":
        raise ValueError(f"{path}: holds {fmt} records, not text documents")
    return [record["text"] for _, record in records]


REPLACE_HINT = ("convert it to UTF-8, or pass utf8_errors='replace' (fastkd distill / "
                "cache-teacher --utf8-errors replace) to train on it with undecodable bytes "
                "replaced by U+FFFD")


def decode_utf8(path: Path, raw: bytes, utf8_errors: str = "strict",
                hint: str = REPLACE_HINT) -> str:
    """The file's text; strict: refuse undecodable bytes and NUL bytes (binary or UTF-16 data)
    with a ValueError naming the file, the byte offset and the line, then `hint`."""
    if utf8_errors == "replace":
        return raw.decode("utf-8", errors="replace")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: not UTF-8 text: byte offset {err.start} (line {line}) holds "
                         f"{raw[err.start:err.start + 4]!r} ({err.reason}); {hint}") from None
    nul = raw.find(b"\0")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise ValueError(f"{path}: not UTF-8 text: byte offset {nul} (line {line}) is a NUL byte "
                         f"(binary data, or UTF-16 text?); {hint}")
    return text


def json_lines(path: Path, text: str):
    """("FILE:LINE", record) for each non-empty line of a JSON Lines text; a line that is not
    JSON raises a ValueError naming the file and line."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg})") from None


def _read_jsonl(path: Path, text: str) -> tuple[str, list[tuple]]:
    fmt, records = None, []
    for where, record in json_lines(path, text):
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if fmt is None:
            fmt = _format_of(record)
        records.append((where, _checked(fmt, record, where)))
    return fmt or "text", records


def _read_dataset(path: Path) -> tuple[str, list[tuple]]:
    """A .parquet file or a save_to_disk directory, through `datasets`."""
    import tempfile

    import datasets

    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        if path.is_dir():
            data = datasets.load_from_disk(str(path))
        else:  # a throwaway cache: reading a file leaves no Arrow copy behind
            with tempfile.TemporaryDirectory() as tmp:
                data = datasets.Dataset.from_parquet(str(path), cache_dir=tmp,
                                                     keep_in_memory=True)
    except Exception as err:  # datasets and pyarrow raise many types; name the path
        raise ValueError(f"{path}: not a readable dataset ({type(err).__name__}: {err})") from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise ValueError(f"{path}: a DatasetDict with splits {sorted(data)}; pass one split's "
                             f"directory (e.g. {path / sorted(data)[0]})")
        data = next(iter(data.values()))
    fmt = _format_of(dict.fromkeys(data.column_names))
    columns = {"text": ["text"], "chat": ["messages"],
               "prompt-completion": ["prompt", "completion"]}[fmt]
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise ValueError(f"{path}: expected a {', '.join(map(repr, columns))} column (or "
                         f"'text' or 'messages'), found columns {data.column_names}")
    data = data.select_columns(columns)
    return fmt, [(f"{path} row {i}", _checked(fmt, record, f"{path} row {i}"))
                 for i, record in enumerate(data)]


def _format_of(record: dict) -> str:
    if "messages" in record:
        return "chat"
    if "prompt" in record or "completion" in record:
        return "prompt-completion"
    return "text"


def _checked(fmt: str, record: dict, where: str) -> dict:
    """The record's fields of format fmt, or a ValueError naming where and the field."""
    if fmt == "text":
        if not isinstance(record.get("text"), str):
            raise ValueError(f'{where}: expected a JSON object with a string "text" field (or '
                             'a "messages" list, or "prompt" and "completion" strings, as the '
                             "file's first record has)")
        return {"text": record["text"]}
    if fmt == "prompt-completion":
        for key in ("prompt", "completion"):
            if not isinstance(record.get(key), str):
                raise ValueError(f'{where}: expected string "prompt" and "completion" fields '
                                 f"(a prompt-completion file), got {key}="
                                 f"{type(record.get(key)).__name__}")
        return {"prompt": record["prompt"], "completion": record["completion"]}
    messages = record.get("messages")
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise ValueError(f'{where}: "messages" must be a non-empty list of objects with a string '
                         '"role" (and "content")')
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f'{where}: no assistant turn (a message with role "assistant"): only '
                         "assistant turns are trained on, so this record would teach nothing")
    return {"messages": messages}


# ----------------------------------------------------------------------------------------------
# Tokenizing: a token stream of documents, or examples (token ids, which tokens are targets).


def tokenize_documents(docs: list[str], tokenizer) -> list[int]:
    """The documents as one token stream, each followed by EOS if the tokenizer has one."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    # verbose=False: documents longer than the model's context are expected, they get packed.
    for ids in tokenizer(docs, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    return stream


def completion_examples(records: list[tuple], tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(prompt + completion + EOS ids, targets: the completion and EOS) of each record. Prompt and
    completion are tokenized apart (no special tokens added, as for text), so the boundary is
    exact."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    kwargs = {"add_special_tokens": False, "verbose": False}
    prompts = tokenizer([r["prompt"] for _, r in records], **kwargs)["input_ids"]
    completions = tokenizer([r["completion"] for _, r in records], **kwargs)["input_ids"]
    return [(p + c + eos, [False] * len(p) + [True] * (len(c) + len(eos)))
            for p, c in zip(prompts, completions, strict=True)]


def chat_example(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """(ids, targets) of one conversation through the tokenizer's chat template; targets mark the
    assistant turns' tokens.

    A template with `{% generation %}` markers says itself which text is the assistant's
    (`apply_chat_template(return_assistant_tokens_mask=True)`). Without markers, each assistant
    message i spans from the end of the rendering of messages[:i] with the generation prompt (its
    header) to the end of the rendering of messages[:i + 1] (its content and end-of-turn text); a
    template whose renderings are not prefixes of each other is refused. A token overlapping a
    span is a target (as transformers marks them).
    """
    if GENERATION_TAG.search(tokenizer.get_chat_template()):
        out = _render(tokenizer, where, messages, tokenize=True, return_dict=True,
                      return_assistant_tokens_mask=True)
        ids, targets = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    else:
        ids, targets = _diffed_chat(tokenizer, messages, where)
    if not any(targets):
        raise ValueError(f"{where}: the chat template of {_name(tokenizer)} renders no assistant "
                         "token for this record")
    return ids, targets


def _diffed_chat(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    def render(upto: int, generation_prompt: bool = False) -> str:
        return _render(tokenizer, where, messages[:upto], tokenize=False,
                       add_generation_prompt=generation_prompt)

    text = render(len(messages))
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise ValueError(f"{where}: the conversation opens with an assistant turn; the chat "
                             f"template of {_name(tokenizer)} has no {{% generation %}} markers, "
                             "so fastkd cannot tell that turn's header from its content")
        head, upto = render(i, generation_prompt=True), render(i + 1)
        if not (upto.startswith(head) and text.startswith(upto)):
            raise ValueError(
                f"{where}: the chat template of {_name(tokenizer)} does not render this "
                f"conversation incrementally (its first {i + 1} messages do not render to a prefix "
                "of the whole, or the generation prompt is not a prefix of the assistant turn), "
                "so fastkd cannot find the assistant tokens; use a template with "
                "{% generation %} markers")
        spans.append((len(head), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    targets = [any(start < span_end and end > span_start for span_start, span_end in spans)
               for start, end in enc["offset_mapping"]]
    return list(enc["input_ids"]), targets


def _render(tokenizer, where: str, messages: list[dict], **kwargs):
    """`tokenizer.apply_chat_template(messages, **kwargs)`, its errors naming the record."""
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as err:  # jinja2's and the template's own errors
        raise ValueError(f"{where}: the chat template of {_name(tokenizer)} fails on this "
                         f"record ({type(err).__name__}: {err})") from None


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


def tokenize_examples(path: str, fmt: str, records: list[tuple],
                      tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(ids, targets) of each chat or prompt-completion record of one file."""
    if fmt == "prompt-completion":
        return completion_examples(records, tokenizer)
    problem = "has none" if getattr(tokenizer, "chat_template", None) is None else None
    if problem is None:
        try:
            tokenizer.get_chat_template()
        except ValueError as err:  # several named templates, none the default
            problem = f"has no usable one ({err})"
    if problem is not None:
        raise ValueError(f'{path}: chat records ("messages") need a tokenizer with a chat '
                         f"template, and {_name(tokenizer)} {problem}; pass a tokenizer that "
                         "has one (--tokenizer), or set tokenizer.chat_template")
    return [chat_example(tokenizer, record["messages"], where) for where, record in records]


# ----------------------------------------------------------------------------------------------
# Blocks: the (n, seq_len) rows every consumer reads.


@dataclass
class Blocks:
    """Rows of tokens, all (n, seq_len).

    input_ids: int64 token ids (padding: the pad id).
    attention_mask: int64, 1 at tokens, 0 at padding.
    counted: bool or None, True at tokens that are targets (predicted from the position before);
        None: every non-padding token is (text). False at prompts, non-assistant turns, padding
        and each example's first token.
    position_ids: int64 or None, positions counting from 0 in each packed example (and in the
        padding after the last); None: each row is one sequence (text, or padded examples).

    The model sees `model_inputs()`; the loss sees `labels(ignore_index)`, shifted by the caller
    ([:, 1:]); `count_targets()` counts them. counted and position_ids are keyword-only, so a
    subclass can add positional fields.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    counted: torch.Tensor | None = field(default=None, kw_only=True)
    position_ids: torch.Tensor | None = field(default=None, kw_only=True)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> Blocks:
        """The rows at index (every row field indexed; a subclass's other fields kept)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[index] for f in dataclasses.fields(Blocks)
            if getattr(self, f.name) is not None})

    def target_mask(self) -> torch.Tensor:
        """(n, seq_len) bool: the tokens that are targets."""
        return self.attention_mask != 0 if self.counted is None else self.counted

    def labels(self, ignore_index: int) -> torch.Tensor:
        """Labels aligned with input_ids (the loop shifts them): tokens that are not targets
        (padding, prompts, non-assistant turns) become ignore_index."""
        return self.input_ids.masked_fill(~self.target_mask(), ignore_index)

    def count_targets(self) -> int:
        """Next-token targets that count (labels after the shift); CPU tensors, no sync."""
        return int(self.target_mask()[:, 1:].sum())

    def model_inputs(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The model's keyword inputs: input_ids and attention_mask, or, for packed rows,
        input_ids and position_ids and no attention_mask (with a 2-D mask transformers would let
        the packed examples attend to each other). Call the model with use_cache=False too: with a
        KV cache (use_cache defaults to True) it ignores the position_ids resets as well."""
        inputs = {"input_ids": self.input_ids}
        if self.position_ids is None:
            inputs["attention_mask"] = self.attention_mask
        else:
            inputs["position_ids"] = self.position_ids
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}


def cat(parts: list[Blocks]) -> Blocks:
    """The rows of all parts; a part without counted / position_ids gets its rows' defaults."""
    if len(parts) == 1:
        return parts[0]
    packed = any(p.position_ids is not None for p in parts)
    seq_len = parts[0].input_ids.shape[1]

    def positions(p: Blocks) -> torch.Tensor:
        if p.position_ids is not None:
            return p.position_ids
        return torch.arange(seq_len).expand(len(p), seq_len)

    return Blocks(torch.cat([p.input_ids for p in parts]),
                  torch.cat([p.attention_mask for p in parts]),
                  counted=torch.cat([p.target_mask() for p in parts]),
                  position_ids=torch.cat([positions(p) for p in parts]) if packed else None)


def pack(stream: torch.Tensor, seq_len: int, pad_id: int) -> Blocks:
    """Cut a token stream into (n, seq_len) blocks; the last partial block is padded and masked."""
    _check_seq_len(seq_len)
    n = -(-stream.numel() // seq_len)
    ids = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    ids[: stream.numel()] = stream
    mask = torch.zeros(n * seq_len, dtype=torch.long)
    mask[: stream.numel()] = 1
    return Blocks(ids.view(n, seq_len), mask.view(n, seq_len))


def pack_examples(examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int,
                  packing: bool = True) -> Blocks:
    """Examples (ids, targets) into (n, seq_len) rows, in order: packing=True fills each row with
    as many whole examples as fit, with per-example position_ids; packing=False gives each its own
    row. Examples must be at most seq_len long (`fit_examples`)."""
    _check_seq_len(seq_len)
    rows: list[list[int]] = []
    used = seq_len
    for e, (ids, _) in enumerate(examples):
        if not packing or used + len(ids) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append(e)
        used += len(ids)
    input_ids = torch.full((len(rows), seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), seq_len, dtype=torch.long)
    counted = torch.zeros(len(rows), seq_len, dtype=torch.bool)
    positions = torch.zeros(len(rows), seq_len, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for e in members:
            ids, targets = examples[e]
            end = at + len(ids)
            input_ids[r, at:end] = torch.tensor(ids)
            mask[r, at:end] = 1
            counted[r, at:end] = torch.tensor(targets)
            counted[r, at] = False  # nothing before it in its example predicts it
            positions[r, at:end] = torch.arange(len(ids))
            at = end
        positions[r, at:] = torch.arange(seq_len - at)  # the padding: a segment of its own
    return Blocks(input_ids, mask, counted=counted, position_ids=positions if packing else None)


def fit_examples(examples: list[tuple[list[int], list[bool]]], seq_len: int, where: str):
    """The examples cut to their first seq_len tokens, without those left with no target (a
    target after the first token); logs how many were cut and dropped."""
    fitted, cut = [], 0
    for ids, targets in examples:
        if len(ids) > seq_len:
            ids, targets, cut = ids[:seq_len], targets[:seq_len], cut + 1
        if any(targets[1:]):
            fitted.append((ids, targets))
    dropped = len(examples) - len(fitted)
    if cut or dropped:
        log.warning("data: %s: %d of %d examples are longer than seq_len=%d and were cut; %d "
                    "kept no target and were dropped", where, cut, len(examples), seq_len,
                    dropped)
    if not fitted:
        raise ValueError(f"{where}: no example has a target within its first seq_len={seq_len} "
                         "tokens; raise seq_len")
    return fitted


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2 (a next-token target needs 2 tokens), "
                         f"got {seq_len}")


def split(blocks: Blocks, eval_fraction: float) -> tuple[Blocks, Blocks]:
    """(train, held-out): a fixed-seed random eval_fraction of the blocks (>= 1) is held out."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in (0, 1), got {eval_fraction}")
    n = len(blocks)
    n_eval = max(1, round(n * eval_fraction))
    if n - n_eval < 1:
        raise ValueError(
            f"the data packs into only {n} sequence(s): too few to hold out {n_eval} for "
            "evaluation and train on the rest; add data or lower seq_len"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return blocks.select(order[n_eval:].sort().values), blocks.select(order[:n_eval].sort().values)


def load_blocks(paths: list[str], tokenizer, seq_len: int, eval_fraction: float, *,
                packing: bool = True, utf8_errors: str = "strict") -> tuple[Blocks, Blocks]:
    """Read, tokenize, pack and split the data files: (train, held-out).

    Text documents of all files form one stream, cut into blocks (as always); chat and
    prompt-completion examples are packed apart (`pack_examples`) and their rows follow the
    text's.
    """
    if not paths:
        raise ValueError("data: pass at least one data file (text, jsonl, parquet or a saved "
                         "dataset directory)")
    _check_seq_len(seq_len)
    stream: list[int] = []
    examples: list[tuple[list[int], list[bool]]] = []
    for path in paths:
        fmt, records = read_records(path, utf8_errors)
        if fmt == "text":
            stream.extend(tokenize_documents([r["text"] for _, r in records], tokenizer))
        else:
            examples.extend(fit_examples(tokenize_examples(path, fmt, records, tokenizer),
                                         seq_len, str(path)))
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    parts = []
    if stream or not examples:
        if len(stream) < 2:
            raise ValueError(f"data files {paths} hold fewer than 2 tokens")
        parts.append(pack(torch.tensor(stream, dtype=torch.long), seq_len, pad_id))
    if examples:
        rows = pack_examples(examples, seq_len, pad_id, packing)
        log.info("data: %d examples in %d rows of %d tokens (%.0f%% padding, %d targets)",
                 len(examples), len(rows), seq_len,
                 100 * (1 - rows.attention_mask.float().mean().item()), rows.count_targets())
        parts.append(rows)
    return split(cat(parts), eval_fraction)


# ----------------------------------------------------------------------------------------------
# Packed rows need a model whose attention keeps the examples apart.


@torch.no_grad()
def check_packing(model: torch.nn.Module, role: str) -> None:
    """Refuse a model whose attention lets packed examples see each other.

    One forward of 2 rows, each packing 2 short examples (`Blocks.model_inputs`), against the
    second examples run alone: equal when the model turns position_ids resets into a
    block-diagonal mask (transformers' sdpa, eager and flex attention do; flash-attention does
    only for a single row). Runs on the model's device, in its dtype.
    """
    param = next(model.parameters())
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = ((5, 4), (3, 6))
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    positions = torch.tensor([list(range(a)) + list(range(b)) for a, b in lengths])
    rows = Blocks(ids, torch.ones_like(ids), position_ids=positions)
    was_training = model.training
    model.eval()
    try:
        packed = model(**rows.model_inputs(param.device), use_cache=False).logits.float()
        alone = [model(input_ids=ids[r:r + 1, a:].to(param.device),
                       use_cache=False).logits[0].float() for r, (a, _) in enumerate(lengths)]
    finally:
        model.train(was_training)
    err = max((packed[r, a:] - alone[r]).abs().max().item() for r, (a, _) in enumerate(lengths))
    scale = max(1.0, max(x.abs().max().item() for x in alone))
    tol = (1e-4 if param.dtype in (torch.float32, torch.float64) else 3e-2) * scale
    if err > tol:
        name = getattr(model, "name_or_path", "") or type(model).__name__
        impl = getattr(model.config, "_attn_implementation", None)
        raise ValueError(
            f"{role} model {name}: with attention {impl!r} packed examples attend to each other "
            f"(max |logit difference| {err:.3g} > {tol:.3g} against each example alone); use "
            "sdpa or eager attention, or packing=False (--no-packing) to pad each example instead")


# ----------------------------------------------------------------------------------------------
# Batches.


class Batches:
    """Endless training batches: each epoch a seeded permutation, cut into full batches.

    The position (epoch, offset) is the whole state: `state_dict` / `load_state_dict` resume it.
    """

    def __init__(self, blocks: Blocks, batch_size: int, seed: int):
        if len(blocks) < batch_size:
            raise ValueError(
                f"the training split has {len(blocks)} sequences, fewer than "
                f"batch_size={batch_size}; add data, lower seq_len or lower batch_size"
            )
        self.blocks, self.batch_size, self.seed = blocks, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.blocks), generator=generator)

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Blocks:
        if self.offset + self.batch_size > len(self.blocks):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation()
        index = self._order[self.offset : self.offset + self.batch_size]
        self.offset += self.batch_size
        return self.blocks.select(index)

    def peek(self, n: int) -> list[Blocks]:
        """The next n batches, without moving the position."""
        ahead = copy.copy(self)  # shares the permutation tensor, which next() only replaces
        return [next(ahead) for _ in range(n)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


def eval_batches(blocks: Blocks, batch_size: int):
    """The held-out blocks in order, in batches of at most batch_size."""
    for start in range(0, len(blocks), batch_size):
        yield blocks.select(torch.arange(start, min(start + batch_size, len(blocks))))
