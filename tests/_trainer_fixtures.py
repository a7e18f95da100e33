"""Helpers for the trainer tests: a tiny BPE tokenizer, tiny Llama models and text files, all built
locally from the Python standard library's sources (nothing is downloaded)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Small, long-lived modules: a few tens of KB of real text on every Python install.
SOURCES = ("textwrap.py", "shlex.py", "fnmatch.py", "glob.py", "bisect.py", "colorsys.py",
           "keyword.py", "heapq.py")
EOS = "<|endoftext|>"


def corpus_texts() -> list[str]:
    return [(STDLIB / name).read_text(encoding="utf-8") for name in SOURCES]


def build_tokenizer(out_dir: Path, vocab_size: int = 320, texts: list[str] | None = None):
    """A byte-level BPE trained on stdlib text, saved with save_pretrained; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts or corpus_texts(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS,
                                        model_max_length=1 << 30)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def save_llama(out_dir: Path, tokenizer, hidden: int = 32, layers: int = 1,
               vocab_size: int | None = None, tie: bool = False, seed: int = 0,
               with_tokenizer: bool = True, arch: str = "llama", **config) -> Path:
    """A seeded random tiny Llama saved in HF format (loaded back through from_pretrained).
    arch="cohere" or "granite": the same tiny shape in an architecture whose head scales its
    logits (Cohere: times config.logit_scale; Granite: divided by config.logits_scaling)."""
    import transformers

    name = {"llama": "Llama", "cohere": "Cohere", "granite": "Granite"}[arch]
    cfg = getattr(transformers, f"{name}Config")(
        vocab_size=vocab_size or len(tokenizer), hidden_size=hidden,
        intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **config)
    torch.manual_seed(seed)
    getattr(transformers, f"{name}ForCausalLM")(cfg).save_pretrained(out_dir)
    if with_tokenizer:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def write_data(out_dir: Path) -> list[str]:
    """The corpus as one .txt file and one .jsonl file (a record per stdlib module)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    texts = corpus_texts()
    txt = out_dir / "part1.txt"
    txt.write_text("\n\n".join(texts[:4]))
    jsonl = out_dir / "part2.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "source": "stdlib"}) + "\n" for t in texts[4:]))
    return [str(txt), str(jsonl)]


# ChatML with {% generation %} markers around what the assistant says (and its end of turn), and
# the same template without them: both render identical text.
CHATML_GENERATION = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML = CHATML_GENERATION.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def build_chat_tokenizer(out_dir: Path, template: str = CHATML):
    """`build_tokenizer` with ChatML's <|im_start|> / <|im_end|> and a chat template, saved."""
    tokenizer = build_tokenizer(out_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def chats() -> list[dict]:
    """Three conversations: a system prompt, one and two assistant turns."""
    return [
        {"messages": [{"role": "system", "content": "Answer briefly."},
                      {"role": "user", "content": "What does textwrap do?"},
                      {"role": "assistant", "content": "It wraps and fills text."}]},
        {"messages": [{"role": "user", "content": "Name a heap function."},
                      {"role": "assistant", "content": "heappush"},
                      {"role": "user", "content": "Another?"},
                      {"role": "assistant", "content": "heapify, which works in place."}]},
        {"messages": [{"role": "user", "content": "fnmatch or glob?"},
                      {"role": "assistant", "content": "glob for paths, fnmatch for names."}]},
    ]
