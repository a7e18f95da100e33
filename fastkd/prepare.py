"""Preparing a token store: the data files read (fastkd.readers), tokenized (fastkd.tokens) and
packed (fastkd.data) as they stream by, and written as Arrow files, never the whole corpus in
memory. fastkd.store decides when to prepare one (and where, under a lock, atomically).

A store (format fastkd-token-store/1):

    STORE/manifest.json   what it is (the recipe: data files, tokenizer fingerprint, seq_len,
                          packing, utf8_errors; the data files' sizes and mtimes; the counts; per
                          part its columns and, per chunk, rows, byte range and sha256), with its
                          own checksum; written last
    STORE/text.arrow      the text rows (when the data has text)
    STORE/examples.arrow  the example rows (chat, prompt-completion, masked pre-tokenized)

Each .arrow file is an Arrow IPC stream, the format of `datasets`' own cache files
(`datasets.Dataset.from_file("STORE/text.arrow")` opens one), uncompressed, so that a reader
memory-maps it and reads a row without decoding anything else. One record batch is a chunk of
about CHUNK_BYTES of ids. Columns:

    input_ids     fixed_size_list<uintB>[seq_len]  B: the narrowest width that holds every id
    length        uintB                            tokens before the row's padding
    counted       fixed_size_list<bool>[seq_len]   examples: the targets (bit-packed)
    position_ids  fixed_size_list<uintB>[seq_len]  packed examples: positions from 0 per example

Arrow rather than nanoGPT's raw uint16 memmap or Megatron's .bin/.idx: the same memory-mapped,
fixed-width rows, in a format pyarrow and `datasets` read, that records its own schema (dtypes,
seq_len), and holds the masks bit-packed.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from collections import deque
from pathlib import Path

import numpy as np

from fastkd.data import ExamplePacker, Fitter, TextPacker
from fastkd.readers import DataSpec, expand_data, iter_records
from fastkd.teacher_set import TEACHER_FIELD
from fastkd.tokens import Encoder, text_units

FORMAT = "fastkd-token-store/1"
CHUNK_BYTES = 1 << 20  # ids a record batch holds: the unit read and checked (sha256) at once
BATCH_CHARS = 4 << 20  # text tokenized in one call (the tokenizer parallelises over a batch)
BATCH_RECORDS = {False: 4096, True: 256}  # records a batch: here, or sent to a worker process
AUTO_PROC_BYTES = 64 << 20  # num_proc=None: worker processes only for this much data or more
PARTS = ("text", "examples")

log = logging.getLogger("fastkd")


def pad_id_of(tokenizer) -> int:
    """The id padding takes: the pad token's, else the EOS token's, else 0."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def narrowest(top: int) -> np.dtype:
    """The narrowest unsigned int dtype that holds 0..top."""
    return next(np.dtype(t) for t in (np.uint8, np.uint16, np.uint32, np.uint64)
                if top <= np.iinfo(t).max)


def auto_num_proc(num_proc: int | None, sources: list[Path]) -> int:
    """num_proc, or for None: every core this process may use when the data is large enough to
    repay starting workers (AUTO_PROC_BYTES), else 1. fastkd.tokens.Encoder uses them only for
    what the tokenizer does not parallelise itself."""
    if num_proc is not None:
        return num_proc
    return len(os.sched_getaffinity(0)) if input_bytes(sources) >= AUTO_PROC_BYTES else 1


def input_bytes(sources: list[Path]) -> int:
    """The bytes of the data sources (a saved dataset: its .arrow files)."""
    return sum(f.stat().st_size for s in sources
               for f in ([s] if s.is_file() else s.rglob("*.arrow")))


# ----------------------------------------------------------------------------------------------
# Writing one part: rows into record batches of an Arrow stream.


def to_arrow(values: np.ndarray):
    """A 1-D numpy array as an Arrow array over its buffer (bools bit-packed). Not `pa.array`:
    on numpy input that imports pandas, a second's start-up in a process that needs none."""
    import pyarrow as pa

    if values.dtype == bool:
        return pa.Array.from_buffers(pa.bool_(), len(values), [
            None, pa.py_buffer(np.packbits(values, bitorder="little"))])
    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values),
                                 [None, pa.py_buffer(values)])


class PartWriter:
    """Rows appended to an Arrow IPC stream at path (created with the first row), in record
    batches of chunk_rows; `close` returns the part's manifest entry, with each chunk's rows,
    byte range and sha256 (read back from the file: what readers will check)."""

    def __init__(self, path: Path, columns: dict[str, np.dtype], seq_len: int, chunk_rows: int):
        import pyarrow as pa

        self.path, self.columns, self.seq_len, self.chunk_rows = path, columns, seq_len, chunk_rows
        self.schema = pa.schema([
            (name, pa.list_(pa.from_numpy_dtype(dtype), seq_len) if name != "length"
             else pa.from_numpy_dtype(dtype)) for name, dtype in columns.items()])
        self.buffers = {name: np.empty((chunk_rows,) if name == "length" else
                                       (chunk_rows, seq_len), dtype=dtype)
                        for name, dtype in columns.items()}
        self.filled, self.rows, self.chunks = 0, 0, []
        self.sink = self.writer = None
        self.ended = False

    def append(self, **arrays: np.ndarray) -> None:
        """Rows: each column (k, seq_len), length (k,)."""
        k, done = len(arrays["input_ids"]), 0
        while done < k:
            n = min(k - done, self.chunk_rows - self.filled)
            for name, buffer in self.buffers.items():
                buffer[self.filled:self.filled + n] = arrays[name][done:done + n]
            self.filled, done = self.filled + n, done + n
            if self.filled == self.chunk_rows:
                self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self.writer is None:
            self.sink = pa.OSFile(str(self.path), "wb")
            self.writer = pa.ipc.new_stream(self.sink, self.schema)
        columns = []
        for name, buffer in self.buffers.items():
            values = to_arrow(buffer[:self.filled].reshape(-1))
            columns.append(values if name == "length" else
                           pa.FixedSizeListArray.from_arrays(values, self.seq_len))
        start = self.sink.tell()
        self.writer.write_batch(pa.record_batch(columns, schema=self.schema))
        self.chunks.append([self.filled, start, self.sink.tell() - start])
        self.rows += self.filled
        self.filled = 0

    def close(self) -> dict | None:
        """Write the last chunk, end the stream: the part's entry (None: no rows)."""
        if self.filled:
            self._flush()
        if self.writer is None:
            return None
        self.abort()
        with open(self.path, "rb") as f:
            for chunk in self.chunks:
                f.seek(chunk[1])
                chunk.append(hashlib.sha256(f.read(chunk[2])).hexdigest())
        return {"file": self.path.name, "rows": self.rows, "bytes": self.path.stat().st_size,
                "columns": {name: dtype.name for name, dtype in self.columns.items()},
                "chunks": self.chunks}

    def abort(self) -> None:
        """End the stream and close the file (close's first step; on an error, the only one)."""
        if self.writer is not None and not self.ended:
            self.ended = True
            self.writer.close()
            self.sink.close()


# ----------------------------------------------------------------------------------------------
# The preparation.


class _Progress:
    """A bar over the input bytes, with the tokens and tokens/s so far."""

    def __init__(self, total: int, enabled: bool):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                        desc="prepare data", disable=not enabled, dynamic_ncols=True)
        self.tokens, self.started = 0, time.perf_counter()

    def read(self, nbytes: int) -> None:
        self.bar.update(nbytes)

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix(tokens=f"{self.tokens:,}", tok_s=f"{rate:,.0f}", refresh=False)


class Preparation:
    """The data of `spec` (its sources, expanded) into a store directory `out`: `run` reads,
    tokenizes and packs each source in order, writing rows as they fill, and returns the
    manifest's data fields. num_proc: worker processes (fastkd.tokens.Encoder)."""

    def __init__(self, spec: DataSpec, sources: list[Path], tokenizer, out: Path,
                 num_proc: int | None, progress: bool):
        self.spec, self.sources, self.tokenizer = spec, sources, tokenizer
        self.num_proc = auto_num_proc(num_proc, sources)
        self.pad_id, self.vocab = pad_id_of(tokenizer), len(tokenizer)
        ids = narrowest(max(self.vocab - 1, self.pad_id))
        small = narrowest(spec.seq_len)
        chunk_rows = max(1, CHUNK_BYTES // (spec.seq_len * ids.itemsize))
        # routed: each token's teacher, a code (0: none; c: routing["names"][c - 1])
        routed = {"teacher": np.dtype(np.uint8)} if spec.routes is not None else {}
        example_columns = {"input_ids": ids, "length": small, "counted": np.dtype(bool),
                           **({"position_ids": small} if spec.packing else {}), **routed}
        self.writers = {
            "text": PartWriter(out / "text.arrow", {"input_ids": ids, "length": small, **routed},
                               spec.seq_len, chunk_rows),
            "examples": PartWriter(out / "examples.arrow", example_columns, spec.seq_len,
                                   chunk_rows)}
        self.text = TextPacker(spec.seq_len, self.pad_id)
        self.examples = ExamplePacker(spec.seq_len, self.pad_id, spec.packing)
        # the codes packed in step with the tokens (the same cuts: the same lengths)
        self.text_codes = TextPacker(spec.seq_len, 0)
        self.example_codes = ExamplePacker(spec.seq_len, 0, spec.packing)
        self.routing = {"names": [], "first": {}, "unrouted": 0, "unrouted_at": None}
        self.source_routes = {} if spec.routes is None else {  # each file's route
            source: route for path, route in zip(spec.paths, spec.routes, strict=True)
            for source in expand_data([path])}
        self.progress = _Progress(input_bytes(sources), progress)
        self.stats = {"tokenized": 0, "tokens": 0, "targets": 0}

    def run(self) -> dict:
        started, cpu = time.perf_counter(), time.process_time()
        try:
            with Encoder(self.tokenizer, self.num_proc) as encoder:
                for source in self.sources:
                    self._source(source, encoder)
            self._finish()
            parts = {name: writer.close() for name, writer in self.writers.items()}
        except BaseException:
            for writer in self.writers.values():
                writer.abort()
            raise
        finally:
            self.progress.bar.close()
        seconds = time.perf_counter() - started
        text_rows, example_rows = (p["rows"] if p else 0 for p in parts.values())
        rows = text_rows + example_rows
        return {"seq_len": self.spec.seq_len, "packing": self.spec.packing,
                "pad_id": self.pad_id, "vocab": self.vocab,
                "parts": {name: part for name, part in parts.items() if part is not None},
                "rows": rows, "text_rows": text_rows, "example_rows": example_rows,
                "examples": self.examples.examples, "counted": example_rows > 0,
                "packed": example_rows > 0 and self.spec.packing, **self.stats,
                "padding": 1 - self.stats["tokens"] / max(1, rows * self.spec.seq_len),
                "seconds": seconds, "tokens_per_s": self.stats["tokenized"] / max(seconds, 1e-9),
                # this process's CPU seconds, every thread's (the tokenizer's too; not workers')
                "cpu_seconds": time.process_time() - cpu, "num_proc": self.num_proc,
                **({"routing": self.routing} if self.routed else {})}

    @property
    def routed(self) -> bool:
        return self.spec.routes is not None

    def _code(self, where: str, name: str | None) -> int:
        """A record's teacher as a code, noted in the routing summary (fastkd.teacher_set)."""
        if name is None:
            self.routing["unrouted"] += 1
            self.routing["unrouted_at"] = self.routing["unrouted_at"] or where
            return 0
        if name not in self.routing["first"]:
            if len(self.routing["names"]) == 255:
                raise ValueError(f"{where}: more than 255 teacher names in the data")
            self.routing["names"].append(name)
            self.routing["first"][name] = where
        return self.routing["names"].index(name) + 1

    def _source(self, source: Path, encoder: Encoder) -> None:
        """One data source, streamed: documents onto the text stream, examples fitted and
        packed."""
        fmt, records = iter_records(source, self.spec.utf8_errors, self.progress.read)
        if fmt == "text":
            records = text_units(records, self.tokenizer)
        fitter = Fitter(self.spec.seq_len, str(source))
        route = self.source_routes.get(source)
        codes = deque()  # each batch's records' codes: Encoder.map yields batches in order

        def coded(batches):
            for batch in batches:
                if self.routed:
                    codes.append([self._code(where, record.get(TEACHER_FIELD, route))
                                  for where, record in batch])
                yield batch

        for items in encoder.map(fmt, str(source), coded(_batches(records,
                                                                  encoder.parallel(fmt)))):
            batch_codes = codes.popleft() if self.routed else None
            tokenized = sum(len(item if isinstance(item, list) else item[0]) for item in items)
            self.stats["tokenized"] += tokenized
            self.progress.add(tokenized)
            if isinstance(items[0], list):  # documents
                ids = np.fromiter(itertools.chain.from_iterable(items), dtype=np.int64,
                                  count=tokenized)
                codes_here = None if batch_codes is None else self.text_codes.add(
                    np.repeat(batch_codes, [len(i) for i in items]))
                self._text_rows(self.text.add(ids), codes=codes_here)
                continue
            for n, (ids, targets) in enumerate(items):
                fitted = fitter.fit(ids, targets)
                if fitted is not None:
                    self._example_rows(self.examples.add(*fitted), None if batch_codes is None
                                       else self.example_codes.add([batch_codes[n]] *
                                                                   len(fitted[0]), fitted[1]))
        if fitter.seen:
            fitter.finish()

    def _finish(self) -> None:
        """The last text row and the last example row; data of fewer than 2 tokens refused."""
        last, last_codes = self.text.finish(), self.text_codes.finish()
        if last is not None:
            self._text_rows(last[0][None], np.array([last[1]]),
                            None if last_codes is None else last_codes[0][None])
        self._example_rows(self.examples.finish(), self.example_codes.finish())
        if (self.text.tokens or not self.examples.examples) and self.text.tokens < 2:
            raise ValueError(f"data files {list(self.spec.paths)} hold fewer than 2 tokens")

    def _text_rows(self, rows: np.ndarray, lengths: np.ndarray | None = None,
                   codes: np.ndarray | None = None) -> None:
        if lengths is None:
            lengths = np.full(len(rows), self.spec.seq_len)
        self.writers["text"].append(input_ids=rows, length=lengths,
                                    **({} if codes is None else {"teacher": codes}))
        self.stats["tokens"] += int(lengths.sum())
        self.stats["targets"] += int(np.maximum(lengths - 1, 0).sum())

    def _example_rows(self, rows: list[tuple], codes: list[tuple] | None = None) -> None:
        if not rows:
            return
        ids, lengths, counted, positions = (np.stack(column) for column in zip(*rows,
                                                                              strict=True))
        routed = {} if not self.routed else {"teacher": np.stack([c[0] for c in codes])}
        self.writers["examples"].append(input_ids=ids, length=lengths, counted=counted,
                                        position_ids=positions, **routed)
        self.stats["tokens"] += int(lengths.sum())
        self.stats["targets"] += int(counted[:, 1:].sum())


def _batches(records, parallel: bool):
    """Records in batches of at most BATCH_RECORDS[parallel] records or BATCH_CHARS of text."""
    batch, chars = [], 0
    for where, record in records:
        batch.append((where, record))
        chars += len(record.get("text", ""))
        if len(batch) >= BATCH_RECORDS[parallel] or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch
