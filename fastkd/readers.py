"""Reading data files: each file's records, streamed, checked, with where each one came from.

Formats (per file; a JSON file's format is its first record's, and every record must match it):
- text: a .txt file (one document; any extension that is not one below), .jsonl / .json records
  with a string "text", or a dataset with a "text" column.
- chat: records with "messages", a list of {"role", "content"} objects (content a string, or a
  list of content parts; null only beside "tool_calls"), or ShareGPT's "conversations", a list
  of {"from", "value"} objects (from: human / gpt / system / tool, ...), read as messages.
- prompt-completion: records with string "prompt" and "completion".
- tokens: pre-tokenized records with "input_ids" (a list of token ids) and optionally a per-token
  target mask: "assistant_masks" or "completion_mask" (1: a target), or "labels" (-100: not a
  target, else the token itself). With a mask they are examples, as chat records are; without,
  documents of the text stream, as text is. They are read without tokenizing.
Record keys pick the format in that order: input_ids, messages, conversations,
prompt/completion, text. Other keys and columns are ignored.

Files: .jsonl (JSON Lines), .json (JSON Lines, or one JSON array of records, read whole),
.parquet (read by row batches through pyarrow), a `datasets` save_to_disk directory
(memory-mapped by `datasets`), anything else as one text document (read in pieces of
`PIECE_BYTES`, cut after a line end: fastkd.tokens joins them back). A directory that is not a
saved dataset stands for the data files under it (.txt, .jsonl, .json, .parquet, recursively), a
glob pattern for the files it matches (`**` recursive), both sorted, as
`datasets.load_dataset(data_files=...)` takes them (`expand_data`).

Text is UTF-8: undecodable bytes or NUL bytes are refused with the file, byte offset and line
(utf8_errors="replace" opts into U+FFFD). Nothing here imports torch.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fastkd.checks import check_seq_len, choice, path_list
from fastkd.teacher_set import TEACHER_FIELD, record_teacher

UTF8_ERRORS = ("strict", "replace")  # what undecodable bytes get: an error, or U+FFFD
DATA_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")  # what a directory stands for
PIECE_BYTES = 1 << 20  # a text file is read in pieces of about this many bytes
BATCH_ROWS = 1024  # rows a parquet or saved-dataset read brings in at once
MASK_COLUMNS = ("assistant_masks", "completion_mask", "labels")  # pre-tokenized targets
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system",
                  "tool": "tool", "function_response": "tool", "observation": "tool"}
REPLACE_HINT = ("convert it to UTF-8, or pass utf8_errors='replace' (fastkd distill / "
                "cache-teacher / prepare-data --utf8-errors replace) to train on it with "
                "undecodable bytes replaced by U+FFFD")

Meter = Callable[[int], None] | None  # told the bytes read, for a progress bar


# ----------------------------------------------------------------------------------------------
# Which files: directories and glob patterns expanded.


def is_saved_dataset(path: Path) -> bool:
    """Whether a directory was written by `datasets`' save_to_disk."""
    return any((path / name).is_file() for name in
               ("dataset_info.json", "state.json", "dataset_dict.json"))


def expand_data(paths: list[str]) -> list[Path]:
    """The data sources the paths stand for, in order: files, saved-dataset directories, the data
    files under other directories and the files glob patterns match (each sorted). A path or
    pattern that names nothing raises FileNotFoundError naming it."""
    sources: list[Path] = []
    for given in map(str, paths):
        if glob.has_magic(given):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(given), recursive=True))
            found = [p for p in found if p.is_file() or (p.is_dir() and is_saved_dataset(p))]
            if not found:
                raise FileNotFoundError(f"data: the pattern {given} matches no file")
            sources += found
            continue
        path = Path(given).expanduser()
        if path.is_dir() and not is_saved_dataset(path):
            found = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES
                           and p.is_file() and not any(part.startswith(".") for part in
                                                       p.relative_to(path).parts))
            if not found:
                raise FileNotFoundError(
                    f"data: the directory {path} holds no data file ({', '.join(DATA_SUFFIXES)});"
                    f" name the files, or a glob pattern such as {path}/**/*.py")
            sources += found
        elif path.exists():
            sources.append(path)
        else:
            raise FileNotFoundError(f"data file not found: {given}")
    return sources


# ----------------------------------------------------------------------------------------------
# Decoding.


def decode_utf8(path: Path, raw: bytes, utf8_errors: str = "strict", hint: str = REPLACE_HINT,
                *, start: int = 0, line: int = 1) -> str:
    """The text of raw (the bytes of path from byte offset `start`, line `line` on); strict:
    refuse undecodable bytes and NUL bytes (binary or UTF-16 data) with a ValueError naming the
    file, the byte offset and the line, then `hint`."""
    if utf8_errors == "replace":
        return raw.decode("utf-8", errors="replace")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        at = line + raw.count(b"\n", 0, err.start)
        raise ValueError(f"{path}: not UTF-8 text: byte offset {start + err.start} (line {at}) "
                         f"holds {raw[err.start:err.start + 4]!r} ({err.reason}); {hint}"
                         ) from None
    nul = raw.find(b"\0")
    if nul >= 0:
        at = line + raw.count(b"\n", 0, nul)
        raise ValueError(f"{path}: not UTF-8 text: byte offset {start + nul} (line {at}) is a "
                         f"NUL byte (binary data, or UTF-16 text?); {hint}")
    return text


def json_lines(path: Path, text: str):
    """("FILE:LINE", record) for each non-empty line of a JSON Lines text; a line that is not
    JSON raises a ValueError naming the file and line."""
    for lineno, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            yield f"{path}:{lineno}", _json(line, f"{path}:{lineno}")


def _json(line: str, where: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None


# ----------------------------------------------------------------------------------------------
# Records: (format, an iterator of (where, checked record)) of one source.


def iter_records(path: str | Path, utf8_errors: str = "strict",
                 meter: Meter = None) -> tuple[str, Iterator[tuple[str, dict]]]:
    """(format, records) of one data source, streamed: format is "text", "chat",
    "prompt-completion" or "tokens"; each record is (where, fields), where naming the file and
    line (or row, element) for error messages, fields checked (a tokens record's "targets" is
    None without a mask). A text file yields pieces {"text", "more": True} but the last. Errors
    (FileNotFoundError, ValueError naming the file and record) come before the first record or
    while iterating."""
    path = Path(path)
    choice("utf8_errors", utf8_errors, UTF8_ERRORS)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    if is_text_file(path):
        return "text", _text_pieces(path, utf8_errors, meter)
    if path.suffix in (".jsonl", ".json"):
        fmt, raw = _json_records(path, utf8_errors, meter)
    else:
        fmt, raw = _dataset_rows(path, meter)
    return ("chat" if fmt == "sharegpt" else fmt), _checked_all(path, fmt, raw)


def is_text_file(path: Path) -> bool:
    """Whether a data source is read as one text document."""
    return path.is_file() and path.suffix not in (".jsonl", ".json", ".parquet")


def read_records(path: str | Path, utf8_errors: str = "strict") -> tuple[str, list[tuple]]:
    """`iter_records`, whole: the records in a list, a text file's pieces joined into its one
    document."""
    fmt, records = iter_records(path, utf8_errors)
    if not is_text_file(Path(path)):
        return fmt, list(records)
    return fmt, [(str(path), {"text": "".join(record["text"] for _, record in records)})]


def read_documents(path: str | Path, utf8_errors: str = "strict") -> list[str]:
    """The documents of a text-format file: each "text" of a JSON file, else the whole file."""
    fmt, records = read_records(path, utf8_errors)
    if fmt != "text":
        raise ValueError(f"{path}: holds {fmt} records, not text documents")
    return [record["text"] for _, record in records]


def _checked_all(path: Path, fmt: str, raw: Iterator[tuple[str, dict]]):
    """Each raw record checked as format fmt; blank text dropped; none at all refused; the
    records of a tokens file all with a target mask, or all without."""
    kept, masked = 0, None
    for where, record in raw:
        fields = _checked(fmt, record, where)
        if record.get(TEACHER_FIELD) is not None:
            fields[TEACHER_FIELD] = record_teacher(record[TEACHER_FIELD], where)
        if fmt == "text" and not fields["text"].strip():
            continue
        if fmt == "tokens":
            has_mask = fields["targets"] is not None
            if masked is not None and has_mask != masked:
                raise ValueError(f"{where}: {'no' if masked else 'a'} target mask, unlike the "
                                 f"file's first record ({', '.join(MASK_COLUMNS)}): give every "
                                 "record one, or none")
            masked = has_mask
        kept += 1
        yield where, fields
    if not kept:
        raise ValueError(f"data file is empty (no text): {path}")


def _text_pieces(path: Path, utf8_errors: str, meter: Meter):
    """A text file as pieces of about PIECE_BYTES, each ending at a line end (so no UTF-8
    sequence is cut), decoded; {"more": True} on all but the last (a file under PIECE_BYTES is
    one piece); a blank file refused."""
    blank, offset, line, carry = True, 0, 1, b""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while True:
            block = f.read(PIECE_BYTES)
            data, last = carry + block, not block or f.tell() >= size
            end = len(data) if last else data.rfind(b"\n") + 1
            if end == 0 and not last:  # no line end yet: read on
                carry = data
                continue
            raw, carry = data[:end], data[end:]
            text = decode_utf8(path, raw, utf8_errors, start=offset, line=line)
            offset, line = offset + len(raw), line + raw.count(b"\n")
            blank = blank and not text.strip()
            if meter:
                meter(len(raw))
            if last:
                break
            yield str(path), {"text": text, "more": True}
    if blank:
        raise ValueError(f"data file is empty (no text): {path}")
    yield str(path), {"text": text}


def _json_records(path: Path, utf8_errors: str, meter: Meter) -> tuple[str, Iterator]:
    """A .jsonl or .json file: JSON Lines, streamed; a .json file that opens with "[" is one
    JSON array of records, read whole (as `datasets` reads .json files)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if path.suffix == ".json" and head.startswith(b"["):
        raw = path.read_bytes()
        text = decode_utf8(path, raw, utf8_errors)
        records = _json(text, str(path))
        if meter:
            meter(len(raw))
        if not isinstance(records, list):
            raise ValueError(f"{path}: not a JSON array")
        items = ((f"{path} element {i}", r) for i, r in enumerate(records))
    else:
        items = _jsonl(path, utf8_errors, meter)
    first = next(items, None)
    if first is None:
        raise ValueError(f"data file is empty (no text): {path}")
    _object(*first)
    fmt = _format_of(first[1])

    def all_items():
        yield first
        for where, record in items:
            yield where, _object(where, record)

    return fmt, all_items()


def _jsonl(path: Path, utf8_errors: str, meter: Meter):
    offset = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line = decode_utf8(path, raw, utf8_errors, start=offset, line=lineno)
            offset += len(raw)
            if meter:
                meter(len(raw))
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                if lineno == 1 and path.suffix == ".json":
                    _one_object(path, utf8_errors)
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None


def _one_object(path: Path, utf8_errors: str) -> None:
    """A .json file that is one JSON object (not lines, not an array): say how to convert it."""
    try:
        whole = json.loads(decode_utf8(path, path.read_bytes(), utf8_errors))
    except json.JSONDecodeError:
        return
    if isinstance(whole, dict):
        keys = [k for k, v in whole.items() if isinstance(v, list)]
        key = keys[0] if keys else "KEY"
        raise ValueError(f"{path}: one JSON object (keys {sorted(whole)[:8]}), not JSON Lines or "
                         f"an array of records; write its records as JSON Lines, e.g. jq -c "
                         f"'.{key}[]' {path} > {path.with_suffix('.jsonl')}")


def _object(where: str, record) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _dataset_rows(path: Path, meter: Meter) -> tuple[str, Iterator]:
    """A .parquet file (pyarrow, by row batches) or a save_to_disk directory (`datasets`,
    memory-mapped): (format, its rows as dicts of the format's columns)."""
    if path.is_dir() and _saved_files(path) == []:  # `datasets` then fails to load it
        raise ValueError(f"{path}: the dataset is empty (0 rows)")
    try:
        if path.is_dir():
            try:
                import datasets
            except ModuleNotFoundError:
                raise ValueError(f"{path}: a saved dataset needs `pip install datasets`") from None
            table = datasets.load_from_disk(str(path))
        else:
            import pyarrow.parquet as pq

            table = pq.ParquetFile(str(path))
    except Exception as err:  # datasets and pyarrow raise many types; name the path
        raise ValueError(f"{path}: not a readable dataset ({type(err).__name__}: {err})") from None
    if path.is_dir():
        table = _one_split(path, table)
        names, rows = table.column_names, len(table)
    else:
        names, rows = table.schema_arrow.names, table.metadata.num_rows
    if rows == 0:
        raise ValueError(f"{path}: the dataset is empty (0 rows)")
    fmt = _format_of(dict.fromkeys(names))
    columns = {"text": ["text"], "chat": ["messages"], "sharegpt": ["conversations"],
               "prompt-completion": ["prompt", "completion"], "tokens": ["input_ids"]}[fmt]
    missing = [c for c in columns if c not in names]
    if missing:
        raise ValueError(f"{path}: expected a {', '.join(map(repr, columns))} column (or "
                         f"'text' or 'messages'), found columns {names}")
    if fmt == "tokens":
        columns += [c for c in (*MASK_COLUMNS, "attention_mask") if c in names]
    columns += [TEACHER_FIELD] if TEACHER_FIELD in names else []
    if path.is_dir():
        table = table.select_columns(columns)
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*.arrow")))

    def batches():
        done = 0
        for batch in (table.iter_batches(batch_size=BATCH_ROWS, columns=columns)
                      if path.is_file() else table.iter(batch_size=BATCH_ROWS)):
            records = batch.to_pylist() if path.is_file() else [
                dict(zip(batch, values, strict=True)) for values in zip(*batch.values(),
                                                                         strict=True)]
            for record in records:
                yield f"{path} row {done}", {k: record[k] for k in columns}
                done += 1
            if meter:
                meter(size * len(records) // rows)

    return fmt, batches()


def _saved_files(path: Path) -> list | None:
    """The data files a saved Dataset's state.json lists (None: not a Dataset's, or unreadable)."""
    try:
        return json.loads((path / "state.json").read_text()).get("_data_files")
    except (OSError, ValueError, AttributeError):
        return None


def _one_split(path: Path, data):
    """A saved dataset's one split (a DatasetDict of several is refused)."""
    import datasets

    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise ValueError(f"{path}: a DatasetDict with splits {sorted(data)}; pass one split's "
                             f"directory (e.g. {path / sorted(data)[0]})")
        data = next(iter(data.values()))
    return data


def _format_of(record: dict) -> str:
    if "input_ids" in record:
        return "tokens"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "prompt" in record or "completion" in record:
        return "prompt-completion"
    return "text"


# ----------------------------------------------------------------------------------------------
# Checking one record.


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
    if fmt == "tokens":
        return _token_fields(record, where)
    messages = _sharegpt(record, where) if fmt == "sharegpt" else record.get("messages")
    if not (isinstance(messages, list) and messages
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
        raise ValueError(f'{where}: "messages" must be a non-empty list of objects with a string '
                         '"role" (and "content")')
    for i, m in enumerate(messages):
        content = m.get("content")
        if content is None and not m.get("tool_calls"):
            raise ValueError(f'{where}: message {i} ({m["role"]}) has no "content" (null): give '
                             'it a string ("" for an empty turn)')
        if content is not None and not isinstance(content, (str, list)):
            raise ValueError(f'{where}: message {i} ({m["role"]}): "content" must be a string '
                             f"or a list of content parts, got {type(content).__name__}")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f'{where}: no assistant turn (a message with role "assistant"): only '
                         "assistant turns are trained on, so this record would teach nothing")
    return {"messages": messages}


def _sharegpt(record: dict, where: str) -> list[dict]:
    """ShareGPT's "conversations" ({"from", "value"}) as messages ({"role", "content"})."""
    turns = record.get("conversations")
    if not (isinstance(turns, list) and turns and all(isinstance(t, dict) for t in turns)):
        raise ValueError(f'{where}: "conversations" must be a non-empty list of '
                         '{"from", "value"} objects (ShareGPT)')
    messages = []
    for i, turn in enumerate(turns):
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f'{where}: conversation turn {i} is from {turn.get("from")!r}; '
                             f"fastkd reads ShareGPT turns from {sorted(SHAREGPT_ROLES)}; "
                             'convert the record to "messages" ({"role", "content"})')
        if not isinstance(turn.get("value"), str):
            raise ValueError(f'{where}: conversation turn {i} has no string "value"')
        messages.append({"role": role, "content": turn["value"]})
    return messages


def _token_fields(record: dict, where: str) -> dict:
    """input_ids (ints) and targets (bools, from the first mask column there is), or None."""
    ids = record.get("input_ids")
    if not (isinstance(ids, list) and ids and all(isinstance(i, int) and not isinstance(i, bool)
                                                  for i in ids)):
        raise ValueError(f'{where}: "input_ids" must be a non-empty list of token ids (ints)')
    attention = record.get("attention_mask")
    if attention is not None and not all(attention):
        raise ValueError(f'{where}: "attention_mask" holds zeros: padded rows; store each '
                         "sequence without its padding")
    name = next((c for c in MASK_COLUMNS if record.get(c) is not None), None)
    if name is None:
        return {"input_ids": ids, "targets": None}
    mask = record[name]
    if not (isinstance(mask, list) and len(mask) == len(ids)):
        raise ValueError(f'{where}: "{name}" must be a list as long as "input_ids" '
                         f"({len(ids)})")
    if name == "labels":
        if any(label != -100 and label != i for label, i in zip(mask, ids, strict=True)):
            raise ValueError(f'{where}: "labels" must be -100 (not a target) or the token at '
                             "that position (labels are not shifted)")
        return {"input_ids": ids, "targets": [label != -100 for label in mask]}
    if any(m not in (0, 1) for m in mask):
        raise ValueError(f'{where}: "{name}" must hold 0 and 1 only')
    return {"input_ids": ids, "targets": [bool(m) for m in mask]}


@dataclass(frozen=True)
class DataSpec:
    """What a token store holds: the data (files, directories, glob patterns: fastkd.readers,
    made absolute), in rows of seq_len, examples packed or not, read with utf8_errors."""

    paths: tuple[str, ...]
    seq_len: int
    packing: bool = True
    utf8_errors: str = "strict"
    # Several teachers, routed (fastkd.teacher_set): each path's teacher (None: its records name
    # theirs); the store then records each token's teacher. None: no routing recorded.
    routes: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        given = path_list("data", self.paths, "data file (text, jsonl, json, parquet, a saved "
                      "dataset directory, a directory or a glob pattern)")
        object.__setattr__(self, "paths", tuple(os.path.abspath(os.path.expanduser(p))
                                                for p in given))
        check_seq_len(self.seq_len)
        choice("utf8_errors", self.utf8_errors, UTF8_ERRORS)
        if self.routes is not None:
            object.__setattr__(self, "routes", tuple(self.routes))
            if len(self.routes) != len(self.paths):
                raise ValueError(f"routes: one a data path ({len(self.paths)}), got "
                                 f"{len(self.routes)}")
