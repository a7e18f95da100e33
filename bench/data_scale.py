"""The data path at scale: preparing the token store of 1 M, 10 M and 100 M tokens, and what a
second start on the same data costs.

    python bench/data_scale.py                  # writes bench/results/data/data_scale.{json,md}
    python bench/data_scale.py --sizes 1M 10M   # a shorter run

Corpus: the Python standard library's .py sources (site-packages and tests left out), one JSON
Lines record {"text": source} each, repeated in order until the size's token count is reached,
in shards of 32 MB (`--data DIR`: a directory, as `datasets.load_dataset(data_files=...)` takes
it). Tokenizer: an 8k byte-level BPE trained on 8 MB of the same sources. Models: random tiny
Llamas (hidden 32, one layer), so that the data path is what is measured. Every command runs as
its own process, as a user runs it:

- preparation: `fastkd prepare-data` into an empty --data-cache; its seconds and tokens/s are
  the preparation's own (the manifest's), its peak RSS the process's (`wait4`);
- the tokenizer's own batched rate: `tokenizer(texts, add_special_tokens=False)` on batches of
  4 MiB of the same corpus's text (what the preparation hands it), in this process, measured just
  before and just after the preparation (the mean: the machine is shared, so the load drifts);
  the ratio is the preparation's rate over it;
- a second start: `fastkd distill` (1 step) on the prepared store: "data ready" is the time the
  trainer's log gives for mapping the store (every data file's stamp, the tokenizer's
  fingerprint, the lock, the manifest, the Arrow streams); peak RSS the process's;
- 2 ranks: `torchrun --nproc-per-node 2 -m fastkd distill` (gloo, DDP) on the 10 M corpus with an
  empty --data-cache, against the same run in 1 process (also preparing); each rank's peak RSS
  (VmHWM, polled), and how many processes prepared.

Peak RSS counts the pages of the memory-mapped store a process touched (they are the page cache's,
shared between processes and reclaimable). CPU only; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

SIZES = {"1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}
SHARD_BYTES = 32 << 20
SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DISTILL = ["--steps", "1", "--batch-size", "8", "--seq-len", "256", "--eval-sequences", "2",
           "--save-every", "100", "--eval-every", "100", "--device", "cpu", "--no-baseline",
           "--no-report", "--no-progress"]


def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for path in sorted(root.rglob("*.py")):
        if SKIP.intersection(path.relative_to(root).parts[:-1]) or not path.is_file():
            continue
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return texts


def build_tokenizer(texts: list[str], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if not (out / "tokenizer.json").is_file():
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=["<|endoftext|>"],
                                      show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        sample, size = [], 0
        for text in texts:
            sample.append(text)
            size += len(text)
            if size > 8_000_000:
                break
        bpe.train_from_iterator(sample, trainer)
        PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                pad_token="<|endoftext|>", model_max_length=1 << 30
                                ).save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def save_models(tokenizer, out: Path) -> tuple[Path, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    dirs = []
    for name, seed in (("teacher", 1), ("student", 2)):
        path = out / name
        if not (path / "config.json").is_file():
            config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2,
                                 num_key_value_heads=2, max_position_embeddings=256,
                                 bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
            torch.manual_seed(seed)
            LlamaForCausalLM(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
        dirs.append(path)
    return dirs[0], dirs[1]


def write_corpus(texts: list[str], tokens: int, bytes_per_token: float, out: Path) -> Path:
    """The sources as JSON Lines records, repeated until about `tokens` tokens (at
    bytes_per_token bytes of text a token), in shards."""
    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    target, written, shard, f = tokens * bytes_per_token, 0, 0, None
    while written < target:
        for text in texts:
            if f is None or f.tell() >= SHARD_BYTES:
                if f is not None:
                    f.close()
                f = open(out / f"part-{shard:04d}.jsonl", "w")
                shard += 1
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text.encode())
            if written >= target:
                break
    f.close()
    (out / "done").write_text("")
    return out


def tokenizer_rate(tokenizer, corpus: Path, limit: int) -> tuple[float, float]:
    """(tokens/s, tokens per CPU second) of tokenizer(texts, add_special_tokens=False) on
    batches of 4 MiB of the corpus's text, up to `limit` tokens (the CPU seconds: this process's,
    every thread's, which is the tokenizer's while it runs)."""
    done, seconds, cpu, batch, chars = 0, 0.0, 0.0, [], 0

    def run(batch):
        started, started_cpu = time.perf_counter(), time.process_time()
        ids = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        return (sum(map(len, ids)), time.perf_counter() - started,
                time.process_time() - started_cpu)

    for shard in sorted(corpus.glob("*.jsonl")):
        with open(shard) as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                chars += len(batch[-1])
                if chars >= 4 << 20:
                    n, s, c = run(batch)
                    done, seconds, cpu, batch, chars = done + n, seconds + s, cpu + c, [], 0
                    if done >= limit:
                        return done / seconds, done / cpu
    if batch:
        n, s, c = run(batch)
        done, seconds, cpu = done + n, seconds + s, cpu + c
    return done / seconds, done / cpu


PEAK = str(Path(__file__).with_name("peak_rss.py"))  # `python -m fastkd` + its peak RSS


def run(cmd: list[str], log: Path) -> dict:
    """Run `fastkd` (cmd: the launcher, then peak_rss.py's arguments), its output to log:
    seconds, CPU seconds (its processes'), and each fastkd process's peak RSS (peak_rss.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    text = log.read_text()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}):\n{text[-3000:]}")
    peaks = [int(b) for b in re.findall(r"^peak-rss \d+ (\d+)$", text, re.M)]
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss": peaks, "log": text}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def manifest(store_root: Path) -> dict:
    stores = [p for p in store_root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(stores) == 1, stores
    return json.loads((stores[0] / "manifest.json").read_text())


def ready_seconds(log: str) -> float:
    found = re.findall(r"token store \S+ (?:mapped|prepared) in ([\d.]+) s", log)
    return float(found[-1])


def measure_size(name: str, tokens: int, work: Path, tokenizer, models,
                 bytes_per_token: float) -> dict:
    corpus = write_corpus(TEXTS, tokens, bytes_per_token, work / f"corpus-{name}")
    store = work / f"store-{name}"
    shutil.rmtree(store, ignore_errors=True)
    limit = min(tokens, 10_000_000)
    before = tokenizer_rate(tokenizer, corpus, limit)
    prep = run([sys.executable, PEAK, "prepare-data", "--data", str(corpus),
                "--tokenizer", str(work / "tokenizer"), "--seq-len", "256", "--data-cache",
                str(store), "--no-progress"], work / f"prepare-{name}.log")
    after = tokenizer_rate(tokenizer, corpus, limit)
    m = manifest(store)
    teacher, student = models
    second = run([sys.executable, PEAK, "distill", "--teacher", str(teacher),
                  "--student", str(student), "--data", str(corpus), "--data-cache", str(store),
                  "--out", str(work / f"run-{name}"), *DISTILL], work / f"second-{name}.log")
    shutil.rmtree(work / f"run-{name}", ignore_errors=True)
    rate, cpu_rate = ((b + a) / 2 for b, a in zip(before, after, strict=True))
    prep_cpu_rate = m["tokenized"] / m["cpu_seconds"]
    return {"size": name, "tokens": m["tokens"], "tokenized": m["tokenized"], "rows": m["rows"],
            "corpus_bytes": sum(p.stat().st_size for p in corpus.glob("*.jsonl")),
            "store_bytes": sum(p["bytes"] for p in m["parts"].values()),
            "prepare_seconds": m["seconds"], "prepare_cpu_seconds": m["cpu_seconds"],
            "prepare_wall_seconds": prep["seconds"],
            "prepare_tokens_per_s": m["tokens_per_s"], "tokenizer_tokens_per_s": rate,
            "tokenizer_before_after": [before, after], "ratio": m["tokens_per_s"] / rate,
            "prepare_tokens_per_cpu_s": prep_cpu_rate, "tokenizer_tokens_per_cpu_s": cpu_rate,
            "cpu_ratio": prep_cpu_rate / cpu_rate, "prepare_peak_rss": prep["peak_rss"][0],
            "second_start_ready_seconds": ready_seconds(second["log"]),
            "second_start_wall_seconds": second["seconds"],
            "second_start_peak_rss": second["peak_rss"][0], "load": load()}


def measure_ranks(work: Path, models, bytes_per_token: float) -> dict:
    """2 torchrun ranks against 1 process, each preparing the 10 M corpus's store anew."""
    corpus = write_corpus(TEXTS, SIZES["10M"], bytes_per_token, work / "corpus-10M")
    teacher, student = models
    common = ["--teacher", str(teacher), "--student", str(student), "--data", str(corpus),
              *DISTILL]
    out = {}
    for procs in (1, 2):
        store = work / f"store-ranks-{procs}"
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(work / f"run-ranks-{procs}", ignore_errors=True)
        launcher = [sys.executable, PEAK] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", PEAK]
        result = run([*launcher, "distill", *common, "--data-cache", str(store), "--out",
                      str(work / f"run-ranks-{procs}"), "--parallel", "ddp",
                      "--teacher-placement", "replicate"],
                     work / f"ranks-{procs}.log")
        out[procs] = {"peak_rss": result["peak_rss"], "seconds": result["seconds"],
                      "prepared": result["log"].count("preparing the token store"),
                      "stores": len([p for p in store.iterdir() if p.is_dir()
                                     and not p.name.startswith(".")])}
        shutil.rmtree(work / f"run-ranks-{procs}", ignore_errors=True)
    out["load"] = load()
    return out


def render(results: dict) -> str:
    mib = 2 ** 20
    lines = [
        "# The data path at scale (bench/data_scale.py)", "",
        f"{results['machine']}; load average at the start {results['load_start']}, at the end "
        f"{results['load_end']}. Corpus: the Python standard library's sources as JSON Lines, "
        "repeated; an 8k byte-level BPE; seq_len 256; tiny random Llamas. CPU only.", "",
        "| size | tokens | corpus | store | prepare s | tokens/s | tokenizer alone, tokens/s | "
        "ratio | ratio per CPU s | prepare peak RSS | 2nd start: data ready s | 2nd start peak RSS"
        " | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results["sizes"]:
        lines.append(
            f"| {r['size']} | {r['tokens']:,} | {r['corpus_bytes'] / mib:,.0f} MiB | "
            f"{r['store_bytes'] / mib:,.0f} MiB | {r['prepare_seconds']:.1f} | "
            f"{r['prepare_tokens_per_s']:,.0f} | {r['tokenizer_tokens_per_s']:,.0f} | "
            f"{r['ratio']:.2f} | {r['cpu_ratio']:.2f} | {r['prepare_peak_rss'] / mib:,.0f} MiB | "
            f"{r['second_start_ready_seconds']:.2f} | {r['second_start_peak_rss'] / mib:,.0f} MiB"
            f" | {r['load']} |")
    sizes = {r["size"]: r for r in results["sizes"]}
    if "1M" in sizes and "100M" in sizes:
        grow = (sizes["100M"]["second_start_peak_rss"] - sizes["1M"]["second_start_peak_rss"])
        lines += ["", f"Second start, peak RSS at 100 M tokens minus at 1 M: {grow / mib:+.1f} MiB "
                  "(target: at most +64 MiB)."]
    ranks = results.get("ranks")
    if ranks:
        one, two = ranks[1], ranks[2]
        lines += ["", "2 torchrun ranks (gloo, DDP) on the 10 M corpus, an empty --data-cache, "
                  "against 1 process:", "",
                  "| processes | peak RSS per process | processes that prepared | stores | "
                  "seconds |", "|---|---|---:|---:|---:|",
                  f"| 1 | {', '.join(f'{p / mib:,.0f} MiB' for p in one['peak_rss'])} | "
                  f"{one['prepared']} | {one['stores']} | {one['seconds']:.0f} |",
                  f"| 2 | {', '.join(f'{p / mib:,.0f} MiB' for p in two['peak_rss'])} | "
                  f"{two['prepared']} | {two['stores']} | {two['seconds']:.0f} |", "",
                  f"Load average after: {ranks['load']}."]
    return "\n".join(lines) + "\n"


TEXTS: list[str] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--no-ranks", action="store_true", help="skip the 2-rank torchrun run")
    parser.add_argument("--work", default=None, help="corpora, stores and logs (default: "
                        "$FASTKD_CACHE/bench-data, else ~/.cache/fastkd/bench-data)")
    parser.add_argument("--out", default="bench/results/data")
    args = parser.parse_args()
    from fastkd.fsio import user_cache_dir

    work = Path(args.work) if args.work else user_cache_dir() / "bench-data"
    work.mkdir(parents=True, exist_ok=True)
    TEXTS.extend(stdlib_texts())
    tokenizer = build_tokenizer(TEXTS, work / "tokenizer")
    models = save_models(tokenizer, work)
    sample = "".join(TEXTS[:400])
    bytes_per_token = len(sample.encode()) / len(tokenizer(sample, verbose=False)["input_ids"])
    results = {"machine": f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
               "load_start": load(), "sizes": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.sizes:
        result = measure_size(name, SIZES[name], work, tokenizer, models, bytes_per_token)
        results["sizes"].append(result)
        print(json.dumps(result), flush=True)
    if not args.no_ranks:
        results["ranks"] = measure_ranks(work, models, bytes_per_token)
        print(json.dumps(results["ranks"]), flush=True)
    results["load_end"] = load()
    (out / "data_scale.json").write_text(json.dumps(results, indent=1))
    (out / "data_scale.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
