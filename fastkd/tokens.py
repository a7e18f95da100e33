"""Tokenizing records (fastkd.readers): documents into token ids, examples into (ids, targets).

- text: each document is tokenized (no special tokens added) and followed by the tokenizer's
  end-of-sequence token, if it has one. A text file read in pieces (fastkd.readers) is cut only
  where the tokenizer gives the same tokens across the cut (`text_units`), so its tokens are
  those of the whole document.
- chat: rendered with the tokenizer's chat template; only the assistant turns are targets: the
  template's `{% generation %}` spans where it has them, else the text each assistant message
  adds to the rendering (see `chat_example`).
- prompt-completion: the completion tokens and the end-of-sequence token are the targets, the
  prompt's are not.
- tokens (pre-tokenized): ids as given, checked against the vocabulary; with a target mask an
  example, without one a document (followed by EOS, unless it already ends with it).

`Encoder` runs this on the calling process, or on worker processes where the tokenizer does not
parallelise itself (chat templates render in Python; slow tokenizers). `fingerprint` names what
makes a tokenizer's output what it is. Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable, Iterator

GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
CUT_WINDOW = 512  # characters each side of a cut that the cut check tokenizes
CUT_TRIES = 16  # line ends tried, from the end of a piece back, before it is carried on whole
# Tokenizer settings that say where it was loaded from, not what it does.
LOAD_KWARGS = {"name_or_path", "is_local", "local_files_only", "_commit_hash", "cache_dir",
               "token", "revision", "subfolder", "trust_remote_code", "_from_auto"}


def fingerprint(tokenizer) -> str:
    """sha256 of what decides a tokenizer's ids and renderings: its class, special tokens and ids,
    chat template and, for a fast tokenizer, its backend's full serialisation (normalizer,
    pre-tokenizer, model, added tokens); for a slow one, its vocabulary and settings. The same
    for a tokenizer built in memory and the one loaded from its save_pretrained directory."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    parts = {"class": f"{type(tokenizer).__module__}.{type(tokenizer).__name__}",
             "size": len(tokenizer), "special": tokenizer.all_special_tokens,
             "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
             "chat_template": getattr(tokenizer, "chat_template", None),
             "split_special_tokens": getattr(tokenizer, "split_special_tokens", None)}
    if backend is not None:
        parts["backend"] = backend.to_str()
    else:
        settings = {k: getattr(v, "content", v) for k, v in tokenizer.init_kwargs.items()
                    if k not in LOAD_KWARGS and not k.endswith("_file")}
        parts.update(vocab=sorted(tokenizer.get_vocab().items()), settings={
            k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool))})
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def encode(texts: list[str], tokenizer) -> list[list[int]]:
    """Each text's ids, no special tokens added; verbose=False: texts longer than the model's
    context are expected (they get packed)."""
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def _eos(tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__


# ----------------------------------------------------------------------------------------------
# Documents: token ids of the text stream.


def text_units(records: Iterable[tuple[str, dict]], tokenizer) -> Iterator[tuple[str, dict]]:
    """The text records as units tokenized apart, {"text", "eos"}: a whole document (eos), or
    the pieces of a text file (fastkd.readers) joined and cut again at a line end where the
    tokenizer gives the same tokens either way (`_safe_cut`), eos after the last. A document
    that is blank throughout yields nothing."""
    carry, started = "", False
    for where, record in records:
        text = carry + record["text"]
        routed = {k: record[k] for k in ("teacher",) if k in record}  # fastkd.teacher_set
        if record.get("more"):
            cut = _safe_cut(text, tokenizer) if text.strip() else 0
            if cut:
                yield where, {"text": text[:cut], "eos": False, **routed}
                started = True
            carry = text[cut:]
            continue
        if started or text.strip():
            yield where, {"text": text, "eos": True, **routed}
        carry, started = "", False


def _safe_cut(text: str, tokenizer) -> int:
    """An index i where the text may be cut, tokens(text[:i]) + tokens(text[i:]) equal to
    tokens(text): a line end after a character that is not whitespace (pre-tokenizers split
    there), checked on CUT_WINDOW characters each side; 0 if none of the last CUT_TRIES is."""
    at = len(text)
    for _ in range(CUT_TRIES):
        at = text.rfind("\n", 0, at)
        if at <= 0:
            return 0
        if text[at - 1].isspace():
            continue
        left, right = text[max(0, at - CUT_WINDOW):at], text[at:at + CUT_WINDOW]
        whole, head, tail = encode([left + right, left, right], tokenizer)
        if whole == head + tail:
            return at
    return 0


def tokenize_documents(records: list[tuple[str, dict]], tokenizer) -> list[list[int]]:
    """Each document's ids followed by EOS (text units: where "eos"; pre-tokenized ids: unless
    they end with it), the ids of pre-tokenized records checked against the vocabulary."""
    eos = _eos(tokenizer)
    if records and "input_ids" in records[0][1]:
        out = []
        for where, record in records:
            ids = check_ids(record["input_ids"], len(tokenizer), where)
            out.append(ids if ids[-1:] == eos else ids + eos)
        return out
    encoded = encode([r["text"] for _, r in records], tokenizer)
    return [ids + eos if r["eos"] else ids for ids, (_, r) in zip(encoded, records, strict=True)]


def check_ids(ids: list[int], vocab: int, where: str) -> list[int]:
    """Pre-tokenized ids, each in [0, vocab), or a ValueError naming the record."""
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab:
        raise ValueError(f"{where}: token id {low if low < 0 else high} lies outside the "
                         f"tokenizer's vocabulary [0, {vocab}): tokenized with another tokenizer?")
    return ids


# ----------------------------------------------------------------------------------------------
# Examples: (ids, targets).


def tokenize_examples(path: str, fmt: str, records: list[tuple],
                      tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(ids, targets) of each chat, prompt-completion or masked pre-tokenized record of one
    file."""
    if fmt == "prompt-completion":
        return completion_examples(records, tokenizer)
    if fmt == "tokens":
        return [(check_ids(r["input_ids"], len(tokenizer), where), r["targets"])
                for where, r in records]
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


def completion_examples(records: list[tuple], tokenizer) -> list[tuple[list[int], list[bool]]]:
    """(prompt + completion + EOS ids, targets: the completion and EOS) of each record. Prompt and
    completion are tokenized apart (no special tokens added, as for text), so the boundary is
    exact."""
    eos = _eos(tokenizer)
    prompts = encode([r["prompt"] for _, r in records], tokenizer)
    completions = encode([r["completion"] for _, r in records], tokenizer)
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


# ----------------------------------------------------------------------------------------------
# One batch of records, on this process or on workers.


def is_documents(fmt: str, record: dict) -> bool:
    """Whether a record of format fmt is a document of the text stream (else an example)."""
    return fmt == "text" or (fmt == "tokens" and record["targets"] is None)


def tokenize_batch(tokenizer, fmt: str, path: str, records: list[tuple[str, dict]]) -> list:
    """A batch of one file's records (text: `text_units`): documents' ids (lists) or examples'
    (ids, targets) (tuples)."""
    if is_documents(fmt, records[0][1]):
        return tokenize_documents(records, tokenizer)
    return tokenize_examples(path, fmt, records, tokenizer)


_WORKER_TOKENIZER = None  # a worker process's tokenizer (Encoder)


def _start_worker(tokenizer) -> None:
    import os

    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _work(fmt: str, path: str, records: list) -> list:
    return tokenize_batch(_WORKER_TOKENIZER, fmt, path, records)


class Encoder:
    """`tokenize_batch` over batches of records, in order: on this process, or (num_proc > 1,
    and a format the tokenizer does not parallelise itself: chat, or a slow tokenizer) on
    num_proc worker processes (spawned once, each with a copy of the tokenizer), at most
    2 x num_proc batches in flight, so nothing piles up in memory. A worker's error is raised
    here. Use it as a context manager: the workers end with it."""

    def __init__(self, tokenizer, num_proc: int = 1):
        self.tokenizer, self.num_proc = tokenizer, num_proc
        self._pool = None

    def parallel(self, fmt: str) -> bool:
        return self.num_proc > 1 and (fmt == "chat" or not getattr(self.tokenizer, "is_fast",
                                                                    False))

    def map(self, fmt: str, path: str, batches: Iterable[list]) -> Iterator[list]:
        if not self.parallel(fmt):
            for batch in batches:
                yield tokenize_batch(self.tokenizer, fmt, path, batch)
            return
        if self._pool is None:
            import multiprocessing

            # spawn: a fresh interpreter per worker; a fork would copy this process's threads'
            # locks (torch's, the tokenizer's) in whatever state they are in
            self._pool = multiprocessing.get_context("spawn").Pool(
                self.num_proc, initializer=_start_worker, initargs=(self.tokenizer,))
        pending = deque()
        for batch in batches:
            pending.append(self._pool.apply_async(_work, (fmt, path, batch)))
            if len(pending) >= 2 * self.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
