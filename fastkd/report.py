"""The trade-off report: teacher, distilled student, hard-label baseline and int8 student, measured.

Each row: parameter count, size on disk, held-out perplexity, top-1 agreement with the teacher, KL
from the teacher, and inference throughput. The held-out metrics use full logits (the held-out set
is small) and the spec's per-token losses, `fastkd.reference.token_losses`, at temperature 1:

    perplexity = exp(mean CE),  KL = mean KL(p_teacher || p_model) over the shared vocabulary ids,
    agreement  = mean [argmax_{v<K} model logits == argmax_{v<K} teacher logits],

all over the held-out next-token targets. Throughput is a full forward (logits included) over the
held-out batches, timed after a warm-up. Writes RUN_DIR/report.md, report.json and loss_curve.png.

An offline run (`teacher_cache`) has no teacher model: its held-out rows carry the cached targets,
so KL is the sparse forward KL on the cached ids at the cache's temperature (`tail="bucket"` for a
top-k cache: a lower bound on the full KL; the plug-in estimate for a sampled one) and agreement
compares with the cached top-1 id (top-k caches only). What needs the teacher model itself (its
perplexity, throughput) is reported as not measured, never silently left out.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from fastkd import fsio, reference
from fastkd.cache import CachedBlocks, default_tail
from fastkd.data import Blocks, eval_batches
from fastkd.options import DistillOptions

METRIC_LOGITS = 2**26  # logits elements per held-out metric batch (256 MiB in fp32)
# Fewer held-out next-token targets than this: the run and the report warn that its perplexity
# and KL are too noisy to compare models by (e.g. 3 sequences of 256 tokens: 765).
MIN_HELDOUT_TARGETS = 1000


def small_heldout(heldout: Blocks) -> str | None:
    """The warning for a held-out set below MIN_HELDOUT_TARGETS targets, else None."""
    targets = heldout.count_targets()
    if targets >= MIN_HELDOUT_TARGETS:
        return None
    return (f"the held-out set holds {targets:,} next-token targets ({len(heldout)} sequences), "
            f"fewer than the {MIN_HELDOUT_TARGETS:,} fastkd asks for: its perplexity and KL are "
            "too noisy to compare models by; hold out more (--eval-fraction, --eval-sequences)")


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings count once)."""
    return sum(p.numel() for p in model.parameters())


def weights_size(path: Path) -> int:
    """Bytes of one weight file, or of a model directory's *.safetensors (else *.bin) files."""
    if path.is_file():
        return path.stat().st_size
    files = list(path.rglob("*.safetensors")) or list(path.rglob("*.bin"))
    return sum(f.stat().st_size for f in files)


def quantize_int8(model: torch.nn.Module) -> torch.nn.Module:
    """A CPU copy of model with every nn.Linear dynamically quantized to int8 (torch.ao)."""
    from torch.ao.quantization import quantize_dynamic

    cpu_copy = copy.deepcopy(model).float().cpu().eval()
    with warnings.catch_warnings():
        # torch.ao eager quantization warns that it is deprecated in favour of torchao; it still
        # works, and it is what this report measures.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(cpu_copy, {torch.nn.Linear}, dtype=torch.qint8)


def save_int8(model: torch.nn.Module, path: Path) -> Path:
    """Save an int8 dynamic model as safetensors: int8 weights with their scales, the rest as is."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    tensors = {name: t.contiguous() for name, t in model.state_dict().items()
               if isinstance(t, torch.Tensor) and not t.is_quantized}
    for name, module in model.named_modules():
        if isinstance(module, DynamicLinear):
            weight = module.weight()
            tensors[f"{name}.weight.int8"] = weight.int_repr().contiguous()
            if weight.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                scales = torch.tensor([weight.q_scale()])
                zeros = torch.tensor([weight.q_zero_point()])
            else:
                scales, zeros = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
            tensors[f"{name}.weight.scale"] = scales.float()
            tensors[f"{name}.weight.zero_point"] = zeros.to(torch.int32)
            if module.bias() is not None:
                tensors[f"{name}.bias"] = module.bias().detach().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return path


@torch.no_grad()
def heldout_metrics(models: dict[str, tuple[torch.nn.Module, torch.device]],
                    teacher: torch.nn.Module | None, heldout: Blocks,
                    device: torch.device) -> dict:
    """Per model: held-out ce, perplexity, top-1 agreement with the teacher, KL(teacher||model).

    ce and perplexity from the model's full logits at temperature 1. The teacher side: the
    teacher model's full logits (temperature 1; KL and agreement over the shared vocabulary ids),
    or, with teacher=None (an offline run), the held-out rows' cached targets (`CachedBlocks`):
    KL from the cached (id, log-probability) pairs at the cache's temperature T with the cache's
    own tail (`fastkd.cache.default_tail`: for top-k, "bucket", the exact KL between the
    distributions coarsened to the k ids plus the rest, a lower bound on the full KL; for sampled
    targets, "ignore", the plug-in estimate sum p^ (log p^ - log q)), top-1 agreement with the
    cached top-1 id for a top-k cache (its first slot is the teacher's argmax), None for a sampled
    one (the most frequent sample need not be the argmax).
    """
    vocabs = [m.config.get_text_config().vocab_size for m, _ in models.values()]
    if teacher is None:  # offline: the cached targets
        cache = heldout.targets.cache
        tail, agreement = default_tail(cache.mode), cache.mode == "topk"
        opts = DistillOptions(temperature=cache.manifest["temperature"], ce_weight=1.0,
                              kd_weight=1.0, divergence="forward_kl")
    else:
        tail, agreement = None, True
        opts = DistillOptions(temperature=1.0, ce_weight=1.0, kd_weight=1.0)
        vocabs.append(teacher.get_output_embeddings().weight.shape[0])
    seq_len = heldout.input_ids.shape[1]
    batch_size = max(1, METRIC_LOGITS // (seq_len * max(vocabs)))
    sums = {name: torch.zeros(3, dtype=torch.float64) for name in models}
    count = 0
    for batch in eval_batches(heldout, batch_size):
        labels = batch.labels(opts.ignore_index)[:, 1:].reshape(-1).to(device)
        count += batch.count_targets()
        if teacher is None:
            ids, logprobs = batch.targets.load()
            target = (ids.flatten(0, 1).to(device), logprobs.flatten(0, 1).to(device).float())
        else:
            target = _logits(teacher, batch, device, device)
        for name, (model, model_device) in models.items():
            s_logits = target if model is teacher else _logits(model, batch, model_device, device)
            ce, kl, agree = _token_metrics(s_logits, target, labels, opts, tail)
            sums[name] += torch.stack([ce.sum(), kl.sum(), agree.sum()]).double().cpu()
    out = {}
    for name, (ce, kl, agree) in sums.items():
        ce_mean = ce.item() / count
        out[name] = {"ce": ce_mean, "perplexity": math.exp(min(ce_mean, 50.0)),
                     "top1_agreement": agree.item() / count if agreement else None,
                     "kl_to_teacher": kl.item() / count}
    return out


def _logits(model: torch.nn.Module, batch: Blocks, model_device: torch.device,
            device: torch.device) -> torch.Tensor:
    """A model's next-token logits, (B * (L-1), V), compared on the teacher's device in fp32 (the
    int8 model runs on the CPU)."""
    # use_cache=False: with a KV cache transformers would ignore packed examples' position_ids.
    logits = model(**batch.model_inputs(model_device), use_cache=False).logits
    return logits[:, :-1].float().flatten(0, 1).to(device)


def _token_metrics(s_logits: torch.Tensor, target, labels: torch.Tensor, opts: DistillOptions,
                   tail: str | None):
    """Per-token (ce, kl, agree) of a model's logits against the teacher side: its logits (the
    spec's dense token losses, argmaxes over the shared ids), or the cached (ids, logprobs) (the
    sparse token losses with `tail`, argmax against the cached top-1 id)."""
    if isinstance(target, torch.Tensor):
        _, ce, kl = reference.token_losses(s_logits, target, labels, opts)
        shared = min(s_logits.shape[-1], target.shape[-1])
        agree = s_logits[:, :shared].argmax(-1) == target[:, :shared].argmax(-1)
    else:
        ids, logprobs = target
        _, ce, kl = reference.sparse_token_losses(s_logits, ids, logprobs, labels, opts, tail)
        agree = s_logits.argmax(-1) == ids[:, 0]
    return ce, kl, agree & (labels != opts.ignore_index)


def safetensors_params(path: Path) -> int | None:
    """Parameters stored in a model directory's *.safetensors files (headers only: nothing is
    loaded), or None when there are none."""
    from safetensors import safe_open

    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else []
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total or None


def offline_teacher_row(cache) -> dict:
    """The teacher's row of an offline run: what its files tell (parameters, size on disk, when
    the manifest's teacher is a local directory); the rest needs the model (None: not measured)."""
    path = Path(str(cache.manifest["teacher"]))
    return {"model": "teacher", "params": safetensors_params(path),
            "size_bytes": weights_size(path) if path.is_dir() else None, "ce": None,
            "perplexity": None, "top1_agreement": None, "kl_to_teacher": None,
            "tokens_per_s": None, "device": None, "dtype": None}


@torch.inference_mode()
def throughput(model: torch.nn.Module, heldout: Blocks, batch_size: int, device: torch.device,
               min_seconds: float = 1.0) -> float:
    """Tokens per second of a full forward over the held-out batches: the median of timed passes
    (at least three, for at least min_seconds), after a warm-up pass."""
    batches = [b.model_inputs(device) for b in eval_batches(heldout, batch_size)]
    rates: list[float] = []
    deadline = time.perf_counter() + min_seconds
    while True:
        start, tokens = time.perf_counter(), 0
        for inputs in batches:
            model(**inputs)
            tokens += inputs["input_ids"].numel()
        if device.type == "cuda":
            torch.cuda.synchronize()  # sync: the pass's kernels must finish inside its timing
        rates.append(tokens / (time.perf_counter() - start))
        if len(rates) > 3 and time.perf_counter() >= deadline:
            break
    return statistics.median(rates[1:])  # the first pass is the warm-up


def plot_losses(results: dict, teacher_ce: float | None, temperature: float, path: Path) -> Path:
    """Train and held-out CE of both students (the teacher's held-out CE for scale); held-out KD."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax_ce, ax_kd = fig.subplots(1, 2)
    runs = [("distilled", results["history"], "tab:blue")]
    if results.get("baseline_history"):
        runs.append(("hard-label baseline", results["baseline_history"], "tab:orange"))
    for label, history, color in runs:
        train = [r for r in history if r.get("ce") is not None and r["step"] > 0]
        evals = [r for r in history if r.get("eval_ce") is not None]
        ax_ce.plot([r["step"] for r in train], [r["ce"] for r in train], color=color, alpha=0.35,
                   lw=1, label=f"{label}: train CE")
        ax_ce.plot([r["step"] for r in evals], [r["eval_ce"] for r in evals], color=color,
                   marker="o", lw=2, label=f"{label}: held-out CE")
        kd = [r for r in evals if r.get("eval_kd") is not None]
        ax_kd.plot([r["step"] for r in kd], [r["eval_kd"] for r in kd], color=color, marker="o",
                   label=label)
    if teacher_ce is not None:  # None: an offline run, no teacher model to measure
        ax_ce.axhline(teacher_ce, color="black", ls="--", lw=1, label="teacher: held-out CE")
    ax_ce.set(xlabel="optimizer step", ylabel="cross-entropy (nats / token)",
              title="Cross-entropy")
    ax_kd.set(xlabel="optimizer step", ylabel="divergence (nats / token)",
              title=f"Held-out KD divergence to the teacher (T = {temperature:g})")
    for ax in (ax_ce, ax_kd):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    return path


NOT_MEASURED = "n/a"


def _fmt_count(n: float | None) -> str:
    if n is None:
        return NOT_MEASURED
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def fmt_bytes(n: float | None) -> str:
    return NOT_MEASURED if n is None else f"{n / 2**20:.2f} MiB"


def _fmt(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
    return NOT_MEASURED if value is None else f"{value * scale:{spec}}{suffix}"


def change(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.1f}%"


def measure_rows(config, run_dir: Path, teacher, heldout: Blocks, device: torch.device,
                 results: dict) -> list[dict]:
    """One row per model: params, size on disk, held-out metrics, throughput, device and dtype."""
    from transformers import AutoModelForCausalLM

    distilled_dir = Path(results["distill"]["student_dir"])
    student = AutoModelForCausalLM.from_pretrained(distilled_dir, dtype=torch.float32)
    models = {}  # name -> (model, its device, its size on disk)
    offline = isinstance(heldout, CachedBlocks)  # a teacher cache, no teacher model
    if not offline:
        # A hub teacher has no directory of ours to measure: count its parameter bytes instead.
        teacher_path = Path(config.teacher)
        teacher_size = (weights_size(teacher_path) if teacher_path.is_dir() else
                        sum(p.numel() * p.element_size() for p in teacher.model.parameters()))
        models["teacher"] = (teacher.model, device, teacher_size)
    models["distilled student"] = (student.to(device).eval(), device,
                                   weights_size(distilled_dir))
    if results.get("baseline"):
        baseline_dir = Path(results["baseline"]["student_dir"])
        baseline = AutoModelForCausalLM.from_pretrained(baseline_dir, dtype=torch.float32)
        models["hard-label student (same budget)"] = (baseline.to(device).eval(), device,
                                                      weights_size(baseline_dir))
    int8 = quantize_int8(student)
    int8_path = save_int8(int8, run_dir / "int8" / "model.safetensors")
    models["distilled student, int8 dynamic"] = (int8, torch.device("cpu"),
                                                 weights_size(int8_path))

    model_devices = {name: (m, dev) for name, (m, dev, _) in models.items()}
    metrics = heldout_metrics(model_devices, None if offline else teacher.model, heldout, device)
    rows = [offline_teacher_row(heldout.targets.cache)] if offline else []
    for name, (model, model_device, size) in models.items():
        quantized = model is int8
        rows.append({
            "model": name, "params": parameter_count(student if quantized else model),
            "size_bytes": size, **metrics[name],
            "tokens_per_s": throughput(model, heldout, config.batch_size, model_device),
            "device": str(model_device),
            "dtype": "int8 (dynamic)" if quantized else str(
                next(model.parameters()).dtype).removeprefix("torch."),
        })
    return rows


def _offline_text(heldout: CachedBlocks) -> list[str]:
    """What an offline report measured from the cache, and what it could not."""
    cache = heldout.targets.cache
    m = cache.manifest
    per_position = cache.bytes_per_position()
    stored = (f"{m.get('layout', 'fixed')} layout, {fmt_bytes(cache.disk_bytes())} on disk"
              + (f", {per_position:.1f} bytes a counted position" if per_position else ""))
    if m.get("logprob_step"):
        stored += (f", log-probabilities on a {m['logprob_step']:g}-nat grid (each within about "
                   "one step of the teacher's)")
    if m["mode"] == "sample":
        kl = (f"the plug-in estimate Σ p̂·(log p̂ − log q) from the {m['samples']} samples per "
              "position (p̂: their frequencies; its cross-entropy part is unbiased, the p̂·log p̂ "
              "part makes it biased upward)")
        agreement = ("top-1 agreement is not measured (the most frequent sample need not be the "
                     "teacher's argmax)")
    else:
        kl = (f"the exact KL between the distributions coarsened to the {m['k']} cached ids plus "
              "one bucket for the rest of the vocabulary (a lower bound on the full KL)")
        agreement = "top-1 agreement compares the model's argmax with the cached top-1 id"
    return [
        f"Offline run: the teacher `{m['teacher']}` was not loaded; its targets come from the "
        f"cache `{cache.dir}` ({m['mode']}, k = {m['k']}, T = {m['temperature']:g}, "
        f"{stored}). KL(teacher‖model) is measured on the cached held-out rows "
        f"at the cache's temperature T = {m['temperature']:g}: {kl}; {agreement}. "
        f"Not measured ({NOT_MEASURED}), as they need the teacher model or its full "
        "distribution: the teacher's perplexity, agreement and throughput, and the full-vocabulary "
        "KL at temperature 1 an online report gives.",
        "",
    ]


def _shown(path: str, run_dir: str) -> str:
    """A model's path as the report shows it: relative to the run directory when inside it."""
    try:
        return Path(path).relative_to(run_dir).as_posix()
    except ValueError:
        return path


def render_markdown(config, rows: list[dict], results: dict, heldout: Blocks,
                    device: torch.device) -> str:
    """report.md: the setting, the table, and the comparisons the table supports, as measured."""
    offline = isinstance(heldout, CachedBlocks)
    return "\n".join([*_setting(config, results, heldout, device),
                      *(_offline_text(heldout) if offline else []), *_table(rows), "",
                      *_comparisons(config, rows, results, offline)])


def _setting(config, results: dict, heldout: Blocks, device: torch.device) -> list[str]:
    """The title and what ran: the models, the budget, the loss, the held-out set, the machine."""
    offline = isinstance(heldout, CachedBlocks)
    opts = config.loss_options()
    loss_text = (f"{opts.ce_weight:g}·CE + {opts.kd_weight:g}·T²·{opts.divergence}"
                 + (f"(β={opts.beta:g})" if opts.divergence == "jsd" else "")
                 + (f"(α={opts.skew:g})" if opts.divergence.startswith("skew_") else "")
                 + f", T = {opts.temperature:g}")
    if offline:
        loss_text += f" (sparse, tail {config.cache_tail})"
    teacher_name = heldout.targets.cache.manifest["teacher"] if offline else config.teacher
    return [
        "# fastkd distillation report",
        "",
        f"Teacher `{_shown(teacher_name, config.out)}` → student "
        f"`{_shown(config.student, config.out)}`. Budget per student: "
        f"{config.steps} optimizer steps × {config.batch_size * config.grad_accum} sequences × "
        f"{config.seq_len} tokens ({results['distill']['tokens']:,} training tokens); loss "
        f"{loss_text}; AdamW lr {config.lr:g}, warmup {config.warmup_steps} + cosine, seed "
        f"{config.seed}.",
        f"Held-out: {len(heldout)} sequences ({heldout.count_targets():,} "
        f"next-token targets). Device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}.",
        *([f"**Warning**: {small_heldout(heldout)}."] if small_heldout(heldout) else []),
        "",
    ]


def _table(rows: list[dict]) -> list[str]:
    lines = ["| model | params | size on disk | held-out ppl | top-1 agreement | "
             "KL(teacher‖model) | tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        speed = (NOT_MEASURED if row["tokens_per_s"] is None else
                 f"{row['tokens_per_s']:,.0f} ({row['device']}, {row['dtype']})")
        lines.append(
            f"| {row['model']} | {_fmt_count(row['params'])} | {fmt_bytes(row['size_bytes'])} | "
            f"{_fmt(row['perplexity'], '.2f')} | {_fmt(row['top1_agreement'], '.1f', 100, '%')} | "
            f"{_fmt(row['kl_to_teacher'], '.4f')} | {speed} |")
    return lines


def _comparisons(config, rows: list[dict], results: dict, offline: bool) -> list[str]:
    """What the table shows: distillation against hard labels, int8 against fp32, the student
    against the teacher; the training time; how each number was measured."""
    by_name = {row["model"]: row for row in rows}
    distilled = by_name["distilled student"]
    hard = by_name.get("hard-label student (same budget)")
    lines = []
    if hard is not None:
        verdict = ("distillation beats" if distilled["perplexity"] < hard["perplexity"]
                   else "distillation does not beat")
        lines.append(
            f"- **Distillation vs hard labels at the same budget**: {verdict} the hard-label "
            f"baseline on held-out perplexity ({distilled['perplexity']:.2f} vs "
            f"{hard['perplexity']:.2f}, {change(distilled['perplexity'], hard['perplexity'])}); "
            f"top-1 agreement {_fmt(distilled['top1_agreement'], '.1f', 100, '%')} vs "
            f"{_fmt(hard['top1_agreement'], '.1f', 100, '%')}; KL to the teacher "
            f"{distilled['kl_to_teacher']:.4f} vs {hard['kl_to_teacher']:.4f}.")
    int8_row = by_name["distilled student, int8 dynamic"]
    lines.append(
        f"- **int8 dynamic quantization** of the distilled student: size "
        f"{change(int8_row['size_bytes'], distilled['size_bytes'])}, perplexity "
        f"{change(int8_row['perplexity'], distilled['perplexity'])}, throughput "
        f"{int8_row['tokens_per_s'] / distilled['tokens_per_s']:.2f}× the fp32 student's "
        f"({int8_row['device']} vs {distilled['device']}).")
    teacher_row = by_name["teacher"]
    if teacher_row["perplexity"] is not None:
        lines.append(
            f"- **Student vs teacher**: {distilled['params'] / teacher_row['params']:.2f}× the "
            f"parameters, {distilled['tokens_per_s'] / teacher_row['tokens_per_s']:.2f}× the "
            f"throughput, perplexity "
            f"{change(distilled['perplexity'], teacher_row['perplexity'])}.")
    elif teacher_row["params"] is not None:
        lines.append(
            f"- **Student vs teacher**: {distilled['params'] / teacher_row['params']:.2f}× the "
            "parameters (from the teacher's files); its throughput and perplexity are not "
            "measured offline.")
    timing = (f"- Training time (optimizer steps only): distillation "
              f"{results['distill']['train_seconds']:.1f} s")
    if results.get("baseline"):
        timing += f", hard-label baseline {results['baseline']['train_seconds']:.1f} s"
    metrics_text = (
        "Held-out perplexity uses full logits at temperature 1; KL and agreement are measured "
        "from the cache as stated above. " if offline else
        "Held-out metrics use full logits at temperature 1; KL is KL(p_teacher ‖ p_model) over "
        "the shared vocabulary ids, per token; top-1 agreement compares argmaxes over the shared "
        "ids. ")
    return lines + [
        timing + ".",
        "",
        metrics_text +
        f"Throughput is a full forward (logits included) over held-out batches of "
        f"{config.batch_size} × {config.seq_len} tokens after a warm-up; int8 dynamic quantization "
        "runs on the CPU only.",
        "",
        "![loss curves](loss_curve.png)",
        "",
    ]


def write_report(config, run_dir: Path, teacher, heldout: Blocks, device: torch.device,
                 results: dict) -> dict:
    """Measure every row, write report.md / report.json / loss_curve.png; returns paths and rows."""
    rows = measure_rows(config, run_dir, teacher, heldout, device, results)
    md_path, json_path = run_dir / "report.md", run_dir / "report.json"
    teacher_ce = next(row["ce"] for row in rows if row["model"] == "teacher")
    png_path = plot_losses(results, teacher_ce, config.temperature, run_dir / "loss_curve.png")
    md_path.write_text(render_markdown(config, rows, results, heldout, device))
    summary = {"rows": rows, "config": dataclasses.asdict(config),
               "distill": results["distill"], "baseline": results.get("baseline"),
               "heldout_sequences": len(heldout), "device": str(device),
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    if isinstance(heldout, CachedBlocks):  # offline: what the teacher-side numbers came from
        cache = heldout.targets.cache
        summary["teacher_cache"] = {
            "dir": str(cache.dir), "kl_tail": default_tail(cache.mode),
            "train_tail": config.cache_tail,
            "bytes": cache.disk_bytes(), "bytes_per_position": cache.bytes_per_position(),
            **{key: cache.manifest.get(key) for key in ("teacher", "mode", "k", "samples",
                                                         "temperature", "layout", "positions",
                                                         "logprob_step")}}
    json_path.write_text(json.dumps(summary, indent=2))
    return {"md": str(md_path), "json": str(json_path), "png": str(png_path), "rows": rows}
