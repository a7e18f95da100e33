"""The embedded default: a complete distillation on a CPU-only machine with nothing downloaded.

1. Corpus: a deterministic sample of the Python standard library's own .py sources (every Python
   install has them; picked by a hash of each file's path, so the sample spans the whole library).
2. Tokenizer: a byte-level BPE trained on it with `tokenizers`, as a PreTrainedTokenizerFast.
3. Teacher: a Llama-architecture model trained on hard labels, cached under a key that hashes the
   corpus, the plan and the fastkd version: a second run skips it, an interrupted one resumes it.
4. Student: a smaller Llama distilled from the teacher; then the same student trained on hard
   labels with the same budget; then the report (teacher, distilled, hard-label, int8 distilled).
5. `offline=True` (`fastkd demo --offline`): the teacher cached three times (`fastkd.cache`, kept
   beside the teacher): top-k in the compact layout (the default) and in the fixed one (fp16,
   format /1's: the near-exact reference), and sampled; the same student distilled from each
   cache with no teacher in memory, and a section of the report that puts the online, top-k,
   sampled and hard-label students side by side (held-out perplexity, KL to the teacher, wall
   time, peak memory, cache bytes per counted position). The offline students' budget, seed and
   loss are the online student's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fastkd
from fastkd import fsio
from fastkd.config import RUN_MARKER, DistillConfig, check_new_run_dir, mark_run_dir
from fastkd.trainer import run_distillation, torch_threads

log = logging.getLogger("fastkd")

EOS = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
MAX_FILE_BYTES = 100_000  # skip generated giants (e.g. pydoc_data/topics.py): the sample mixes more
# The offline variant's caches: k slots per position; the sampled cache draws as many samples.
OFFLINE_K = 16


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budgets of the demo. The teacher's part is cached; the students' part reruns."""

    corpus_bytes: int
    vocab_size: int
    seq_len: int
    batch_size: int
    teacher: dict  # LlamaConfig sizes
    student: dict
    teacher_steps: int
    teacher_lr: float
    teacher_eval_every: int
    student_steps: int
    student_lr: float
    student_eval_every: int
    eval_sequences: int
    seed: int = 0


FULL = DemoPlan(
    corpus_bytes=3_000_000, vocab_size=2048, seq_len=128, batch_size=16,
    teacher={"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 4, "tie_word_embeddings": False},
    student={"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2,
             "num_attention_heads": 2, "tie_word_embeddings": False},
    teacher_steps=300, teacher_lr=3e-3, teacher_eval_every=50,
    student_steps=120, student_lr=3e-3, student_eval_every=20, eval_sequences=64,
)
FAST = DemoPlan(
    corpus_bytes=300_000, vocab_size=512, seq_len=64, batch_size=8,
    teacher={"hidden_size": 96, "intermediate_size": 256, "num_hidden_layers": 2,
             "num_attention_heads": 2, "tie_word_embeddings": False},
    student={"hidden_size": 48, "intermediate_size": 128, "num_hidden_layers": 1,
             "num_attention_heads": 2, "tie_word_embeddings": True},
    teacher_steps=60, teacher_lr=5e-3, teacher_eval_every=30,
    student_steps=30, student_lr=5e-3, student_eval_every=10, eval_sequences=16,
)


def stdlib_sources(max_bytes: int) -> list[Path]:
    """A deterministic sample of the standard library's .py files, about max_bytes in all."""
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if 0 < size <= MAX_FILE_BYTES:
            candidates.append((hashlib.sha256(rel.as_posix().encode()).hexdigest(), path, size))
    chosen, total = [], 0
    for _, path, size in sorted(candidates):
        if total >= max_bytes:
            break
        chosen.append(path)
        total += size
    if not chosen:
        raise FileNotFoundError(f"no Python sources found under the standard library at {root}")
    return sorted(chosen)


def corpus_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def train_tokenizer(files: list[Path], vocab_size: int, out_dir: Path):
    """A byte-level BPE over the corpus (deterministic), saved as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(
        (p.read_text(encoding="utf-8", errors="replace") for p in files), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS,
                                        model_max_length=1 << 30)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def save_llama(sizes: dict, tokenizer, seq_len: int, seed: int, out_dir: Path) -> Path:
    """A randomly initialised (seeded) Llama with the tokenizer beside it, in HF format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=seq_len,
                         num_key_value_heads=sizes["num_attention_heads"],
                         bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **sizes)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _config(plan: DemoPlan, steps: int, eval_every: int, **fields) -> DistillConfig:
    """The demo's settings for one run; checkpoints every 3 evaluations (they cost a few fsyncs)."""
    settings = {"batch_size": plan.batch_size, "seq_len": plan.seq_len,
                "warmup": max(1, steps // 10), "eval_every": eval_every,
                "save_every": 3 * eval_every, "eval_sequences": plan.eval_sequences,
                "eval_fraction": 0.05, "seed": plan.seed, "temperature": 2.0, "ce_weight": 0.5,
                "kd_weight": 0.5, "device": "cpu"}
    return DistillConfig(**{**settings, "steps": steps, **fields})


def _run(config: DistillConfig) -> dict:
    """Run a config, resuming its run dir when it already holds this very run."""
    resume = (Path(config.out) / "config.json").is_file()
    return run_distillation(dataclasses.replace(config, resume=resume))


def run_demo(out: str | Path = "fastkd-demo", fast: bool = False,
             cache_dir: str | Path | None = None, progress: bool = True,
             offline: bool = False, threads: int | None = None) -> dict:
    """Tokenizer, cached teacher, distilled student, hard-label baseline and report, under out/.

    Returns run_distillation's results for the student run, plus "teacher" (the trained teacher's
    directory, "cached": whether it was reused) and with offline=True "offline" (`run_offline`).
    out must be new, empty or a demo's run directory (it is marked as one before anything is
    written into it). Re-running with the same out resumes an interrupted demo and changes
    nothing in a finished one; an interrupted teacher resumes from its cache. threads: torch's
    CPU threads for the whole demo (None: as torch has them), given back afterwards; each run
    records its count, and a resume uses the recorded one.
    """
    out = Path(out)
    fsio.check_writable(out, "out")  # before anything is built or loaded
    if not (out / RUN_MARKER).is_file():
        check_new_run_dir(out)  # nothing of the user's is written over
        mark_run_dir(out)
    with torch_threads(threads or torch.get_num_threads()):
        return _run_demo(FAST if fast else FULL, out, cache_dir, progress, offline)


def _run_demo(plan: DemoPlan, out: Path, cache_dir: str | Path | None, progress: bool,
              offline: bool) -> dict:
    files = stdlib_sources(plan.corpus_bytes)
    plan_json = json.dumps(dataclasses.asdict(plan), sort_keys=True)
    key = hashlib.sha256(f"{fastkd.__version__}|{plan_json}|{corpus_digest(files)}".encode())
    teacher_root = Path(cache_dir or fsio.user_cache_dir()) / f"demo-teacher-{key.hexdigest()[:16]}"
    teacher_run = teacher_root / "run"
    data = [str(p) for p in files]
    log.info("corpus: %d Python standard-library files, %.1f MB, from %s", len(files),
             sum(p.stat().st_size for p in files) / 1e6, sysconfig.get_paths()["stdlib"])

    cached = (teacher_run / "student").is_dir()
    if cached:
        log.info("teacher: cached at %s", teacher_run / "student")
    else:
        fsio.check_writable(teacher_root, "cache_dir")
        tokenizer_dir = teacher_root / "tokenizer"
        if not (tokenizer_dir / "tokenizer.json").is_file():
            train_tokenizer(files, plan.vocab_size, tokenizer_dir)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        init = teacher_root / "init"
        if not (init / "config.json").is_file():
            save_llama(plan.teacher, tokenizer, plan.seq_len, plan.seed, init)
        log.info("teacher: training on hard labels (cached afterwards in %s)", teacher_root)
        trained = _run(_config(
            plan, plan.teacher_steps, plan.teacher_eval_every, lr=plan.teacher_lr, teacher=None,
            student=str(init), data=data, out=str(teacher_run), ce_weight=1.0, kd_weight=0.0,
            baseline=False, report=False, progress=progress))
        if trained["status"] != "completed":
            return {**trained, "teacher": {"dir": None, "cached": False}}
    teacher_dir = teacher_run / "student"

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    student_init = out / "student-init"
    if not (student_init / "config.json").is_file():
        save_llama(plan.student, tokenizer, plan.seq_len, plan.seed + 1, student_init)
    result = _run(_config(plan, plan.student_steps, plan.student_eval_every, lr=plan.student_lr,
                          teacher=str(_link_teacher(out, teacher_dir)),
                          student=str(student_init), data=data, out=str(out), baseline=True,
                          progress=progress))
    result["teacher"] = {"dir": str(teacher_dir), "cached": cached}
    if offline and result["status"] == "completed":
        result["offline"] = run_offline(plan, out, teacher_root, data, progress, result)
        if result["offline"]["status"] != "completed":
            result["status"] = result["offline"]["status"]
            result["signal"] = result["offline"]["signal"]
    return result


def _link_teacher(out: Path, teacher_dir: Path) -> Path:
    """out/teacher: a link to the cached teacher, so the run (and its report) names it "teacher"
    rather than by its place in the cache."""
    link = out / "teacher"
    if not (link.is_symlink() and link.resolve() == teacher_dir.resolve()):
        tmp = out / ".teacher.tmp"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(teacher_dir.resolve(), target_is_directory=True)
        os.replace(tmp, link)
    return link


def _teacher_cache(plan: DemoPlan, teacher_root: Path, data: list[str], mode: str, layout: str,
                   progress: bool) -> dict:
    """The demo teacher's cache in `mode` and `layout` (built once, kept beside the teacher): its
    directory, size on disk (every file in it), bytes a counted position, and the seconds its
    build took (kept beside it)."""
    from fastkd.cache import TeacherCache
    from fastkd.cache_teacher import cache_teacher
    from fastkd.plans import CachePlan

    name = f"cache-{mode}-{layout}-k{OFFLINE_K}"
    cache, timing = teacher_root / name, teacher_root / f"{name}.seconds.json"
    started = time.perf_counter()
    cache_teacher(CachePlan(
        teacher=str(teacher_root / "run" / "student"), data=data, out=str(cache), mode=mode,
        k=OFFLINE_K, samples=OFFLINE_K if mode == "sample" else None, temperature=2.0,
        seq_len=plan.seq_len, batch_size=plan.batch_size, eval_fraction=0.05, seed=plan.seed,
        layout=layout, device="cpu", progress=progress))
    if not timing.is_file():  # built now (a reused cache keeps its first build's time)
        timing.write_text(json.dumps({"seconds": time.perf_counter() - started}))
    opened = TeacherCache(cache, verify=False)
    return {"dir": str(cache), "mode": mode, "layout": layout, "k": OFFLINE_K,
            "bytes": opened.disk_bytes(), "bytes_per_position": opened.bytes_per_position(),
            "build_seconds": json.loads(timing.read_text())["seconds"]}


def run_offline(plan: DemoPlan, out: Path, teacher_root: Path, data: list[str], progress: bool,
                online: dict) -> dict:
    """Distil the demo's student from a top-k and a sampled cache of its teacher (no teacher in
    memory while training), measure every student against the teacher as the report does, and
    append the side-by-side section to out/report.md (and out/offline.json)."""
    if online.get("complete_before") and (out / "offline.json").is_file():  # measured before
        return {"status": "completed", "signal": None,
                **json.loads((out / "offline.json").read_text()),
                "md": str(out / "report.md"), "json": str(out / "offline.json")}
    students = {"online distillation (teacher in memory)":
                {"summary": online["distill"], "cache": None, "online": True},
                "hard labels (same budget)":
                {"summary": online["baseline"], "cache": None, "online": False}}
    caches = {("topk", "compact"): f"offline, top-{OFFLINE_K} cache",
              ("topk", "fixed"): f"offline, top-{OFFLINE_K} cache, fixed fp16",
              ("sample", "compact"): f"offline, sampled cache ({OFFLINE_K} samples)"}
    for (mode, layout), name in caches.items():
        cache = _teacher_cache(plan, teacher_root, data, mode, layout, progress)
        run = _run(_config(plan, plan.student_steps, plan.student_eval_every, lr=plan.student_lr,
                           teacher=None, teacher_cache=cache["dir"],
                           student=str(out / "student-init"), data=data,
                           out=str(out / "-".join(["offline", mode, *(["fixed"] if layout ==
                                                                      "fixed" else [])])),
                           baseline=False, report=False, progress=progress))
        if run["status"] != "completed":
            return {"status": run["status"], "signal": run["signal"]}
        students[name] = {"summary": run["distill"], "cache": cache, "online": False}

    from fastkd.demo_report import offline_comparison

    return {"status": "completed", "signal": None,
            **offline_comparison(plan, out, teacher_root / "run" / "student", data, students)}
