"""The teacher cache's size at Llama-3's vocabulary, before (the fixed layout, format /1) and after
(the compact layout), and what the compact log-probabilities cost in KL.

    python bench/cache_size.py            # writes bench/results/cache/cache_size.{json,md}

A tiny Llama with a 128256-row head over a 128256-word tokenizer (a WordLevel vocabulary built
here with `tokenizers`), its head scaled so that its entropy is a real LM's (~2.6 nats at T = 1,
~12 distinct ids in 32 draws), runs over Zipf-distributed words. Each cache is written by
`fastkd.cache_teacher.cache_teacher`; bytes per counted position count every file in the cache
directory (manifest and input ids included). The KL is KL(p || p~) between the exact top-64
distribution (fp32, with its rest bucket) and the stored one, per counted position, averaged. CPU
only; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from pathlib import Path

import torch

VOCAB = 128256
TARGET_ENTROPY = 2.6
EOS = "<eos>"


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)}
    vocab[EOS] = VOCAB - 1
    word_level = Tokenizer(models.WordLevel(vocab, unk_token=EOS))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, eos_token=EOS,
                                        pad_token=EOS, model_max_length=1 << 30)
    tokenizer.save_pretrained(out)
    return tokenizer


def write_data(out: Path, words: int, seed: int) -> Path:
    """Zipf(1.1)-distributed words over the vocabulary, in documents of ~200 words."""
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, VOCAB, dtype=torch.float64)
    ids = torch.multinomial(ranks.pow(-1.1), words, replacement=True, generator=gen)
    text = " ".join(f"w{i}" for i in ids.tolist())
    docs = [" ".join(text.split()[i:i + 200]) for i in range(0, words, 200)]
    path = out / "data.txt"
    path.write_text("\n".join(docs))
    return path


def build_teacher(out: Path, tokenizer, data: Path, hidden: int, seed: int) -> dict:
    """A random tiny Llama whose head is scaled to TARGET_ENTROPY nats (bisection on one batch)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.tensor(tokenizer(data.read_text()[:20000])["input_ids"][:4 * 64]).view(4, 64)
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state.flatten(0, 1)
        w = model.lm_head.weight.clone()

        def entropy(scale: float) -> float:
            lp = torch.log_softmax(h @ (w * scale).T, -1)
            return float(-(lp.exp() * lp).sum(-1).mean())

        lo, hi = 1.0, 1e4
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if entropy(mid) > TARGET_ENTROPY else (lo, mid)
        model.lm_head.weight.mul_(hi)
        lp = torch.log_softmax(h @ model.lm_head.weight.T, -1)
        draws = torch.multinomial(lp.exp(), 32, replacement=True,
                                  generator=torch.Generator().manual_seed(0))
        distinct = sum(len(set(row)) for row in draws.tolist()) / len(draws)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"head_scale": hi, "entropy_nats": entropy(hi), "distinct_in_32_draws": distinct}


def stored_vs_exact(cache_dir: Path, teacher: Path, sequences: int) -> dict:
    """KL(exact top-64 with its rest || stored) and the largest |log p error|, per position."""
    from fastkd.cache import TeacherCache
    from fastkd.models import load_lm

    cache = TeacherCache(cache_dir)
    batch = cache.rows("train").take(torch.arange(sequences))
    ids, lp = batch.targets.load()
    counted = batch.attention_mask[:, 1:].bool()
    model = load_lm(str(teacher), "teacher", torch.float32, torch.device("cpu"))
    kls, errors = [], []
    with torch.no_grad():
        for i in range(sequences):
            h = model.hidden(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1])[0, :-1]
            exact = torch.log_softmax(h @ model.weight.T, -1).double()[counted[i]]
            got_ids, got_lp = ids[i][counted[i]].long(), lp[i][counted[i]].double()
            want = exact.gather(1, got_ids)  # the exact log-probabilities of the stored ids

            def buckets(x):
                p = x.exp()
                return torch.cat([p, (1 - p.sum(-1, keepdim=True)).clamp(min=0)], -1)

            p, q = buckets(want), buckets(got_lp)
            kls.append((p * (p.clamp(min=1e-300).log() - q.clamp(min=1e-300).log())).sum(-1))
            errors.append((got_lp - want).abs().amax(-1))
            top = exact.topk(got_ids.shape[1], -1).indices.sort(-1).values
            assert torch.equal(top, got_ids.sort(-1).values), "the stored ids are the top-k"
    kl, err = torch.cat(kls), torch.cat(errors)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "logprob_error_max": float(err.max()), "logprob_error_mean": float(err.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache"))
    parser.add_argument("--sequences", type=int, default=64, help="packed sequences (128 tokens)")
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    from fastkd.cache import TeacherCache
    from fastkd.cache_teacher import cache_teacher
    from fastkd.plans import CachePlan

    torch.set_num_threads(max(1, torch.get_num_threads()))
    seq_len = 128
    results: dict = {"vocab": VOCAB, "seq_len": seq_len, "host": platform.node(),
                     "torch": torch.__version__, "caches": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = build_tokenizer(root / "tokenizer")
        data = write_data(root, args.sequences * seq_len, seed=0)
        results["teacher"] = build_teacher(root / "teacher", tokenizer, data, args.hidden, 0)
        print(json.dumps(results["teacher"]))
        variants = [("top-64, fixed fp16 (format /1, before)", dict(mode="topk", k=64,
                                                                    layout="fixed")),
                    ("sampled 32, fixed fp16 (format /1, before)",
                     dict(mode="sample", k=32, samples=32, layout="fixed")),
                    *[(f"top-64, compact, step 1/{round(1 / s)}",
                       dict(mode="topk", k=64, logprob_step=s)) for s in (0.25, 0.125, 0.0625)],
                    ("sampled 32, compact", dict(mode="sample", k=32, samples=32))]
        for name, kw in variants:
            out = root / name.replace(" ", "_").replace("/", "-").replace(",", "")
            started = time.perf_counter()
            manifest = cache_teacher(CachePlan(
                teacher=str(root / "teacher"), data=[str(data)], out=str(out), temperature=1.0,
                seq_len=seq_len, batch_size=4, shard_sequences=32, progress=False, **kw))
            seconds = time.perf_counter() - started
            cache = TeacherCache(out)
            row = {"cache": name, **kw, "positions": manifest["positions"],
                   "bytes": cache.disk_bytes(),
                   "bytes_per_position": round(cache.bytes_per_position(), 2),
                   "seconds": round(seconds, 1)}
            if kw["mode"] == "topk":
                row.update(stored_vs_exact(out, root / "teacher", 16))
            else:
                batch = cache.rows("train").take(torch.arange(16))
                ids, _ = batch.targets.load()
                counted = batch.attention_mask[:, 1:].bool()
                row["distinct_ids_mean"] = float((ids >= 0).sum(-1)[counted].float().mean())
            results["caches"].append(row)
            print(json.dumps(row))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache_size.json").write_text(json.dumps(results, indent=1))
    t = results["teacher"]
    lines = [
        "# Teacher-cache size at V = 128256 (`python bench/cache_size.py`)", "",
        f"A tiny Llama (hidden {args.hidden}) with a 128256-row head over a 128256-word "
        f"tokenizer, head scaled to an entropy of {t['entropy_nats']:.2f} nats at T = 1 "
        f"({t['distinct_in_32_draws']:.1f} distinct ids in 32 draws), over "
        f"{args.sequences} packed sequences of {seq_len} Zipf-distributed words. Bytes per "
        "counted position: every file in the cache directory (manifest, input ids included) "
        "over the counted positions. KL: KL(exact top-64 + rest || stored), per position, on 16 "
        "sequences; the error: |stored - exact log-probability|.", "",
        "| cache | bytes / position | KL mean (nats) | KL max | log-p error max | "
        "log-p error mean | distinct ids | write s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in results["caches"]:
        def fmt(key, spec, row=row):
            return format(row[key], spec) if key in row else ""

        lines.append(f"| {row['cache']} | {row['bytes_per_position']:.1f} | "
                     f"{fmt('kl_mean', '.2e')} | {fmt('kl_max', '.2e')} | "
                     f"{fmt('logprob_error_max', '.3f')} | {fmt('logprob_error_mean', '.3f')} | "
                     f"{fmt('distinct_ids_mean', '.1f')} | {row['seconds']} |")
    (out / "cache_size.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
