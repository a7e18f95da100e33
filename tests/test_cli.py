"""The command line end to end (in subprocesses), Ctrl-C handling, the report, and the demo."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _trainer_fixtures import build_tokenizer, save_llama, write_data

from fastkd.checkpoint import latest_checkpoint
from fastkd.cli import main
from fastkd.config import DistillConfig
from fastkd.demo import run_demo
from fastkd.trainer import run_distillation

ROWS = ["teacher", "distilled student", "hard-label student (same budget)",
        "distilled student, int8 dynamic"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_assets")
    tokenizer = build_tokenizer(root / "tokenizer")
    return {"teacher": save_llama(root / "teacher", tokenizer, hidden=48, layers=2, seed=1),
            "student": save_llama(root / "student", tokenizer, hidden=24, seed=2),
            "data": write_data(root / "data")}


def fastkd(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "fastkd", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, **kwargs)


def distill_args(models, out: Path, *extra: str) -> list[str]:
    return ["distill", "--teacher", str(models["teacher"]), "--student", str(models["student"]),
            "--data", *models["data"], "--out", str(out), "--seq-len", "32", "--batch-size", "4",
            "--lr", "1e-2", "--warmup", "1", "--eval-sequences", "8", "--no-progress", *extra]


def test_cli_end_to_end_writes_a_sensible_report(models, tmp_path):
    out = tmp_path / "run"
    proc = fastkd(*distill_args(models, out, "--steps", "4", "--eval-every", "2",
                                "--divergence", "jsd", "--beta", "0.4", "--grad-accum", "2",
                                "--baseline"))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "| model | params |" in stdout and "completed" in stdout

    report = json.loads((out / "report.json").read_text())
    rows = {row["model"]: row for row in report["rows"]}
    assert list(rows) == ROWS
    for row in rows.values():
        assert 1.0 < row["perplexity"] < 10 * report["config"]["seq_len"] ** 3
        assert math.isfinite(row["perplexity"]) and 0.0 <= row["top1_agreement"] <= 1.0
        assert row["kl_to_teacher"] >= -1e-6 and row["tokens_per_s"] > 0
        assert row["params"] > 0 and row["size_bytes"] > 0
    teacher, student = rows["teacher"], rows["distilled student"]
    int8 = rows["distilled student, int8 dynamic"]
    assert teacher["top1_agreement"] == 1.0 and abs(teacher["kl_to_teacher"]) < 1e-6
    assert student["kl_to_teacher"] > 0 and teacher["params"] > student["params"]
    assert int8["size_bytes"] < student["size_bytes"] and int8["params"] == student["params"]
    assert abs(int8["perplexity"] / student["perplexity"] - 1) < 0.2  # int8 stays close
    assert report["config"]["divergence"] == "jsd" and report["distill"]["step"] == 4
    assert report["threads"] == report["config"]["threads"] >= 1  # the run's own count

    md = (out / "report.md").read_text()
    for name in ROWS:
        assert f"| {name} |" in md
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "baseline" / "student" / "model.safetensors").is_file()
    # The report names the models by their paths (absolute: the run resumes from anywhere).
    assert f"Teacher `{models['teacher']}` → student `{models['student']}`" in md


def test_ctrl_c_saves_a_checkpoint_and_resume_continues(models, tmp_path, capsys):
    """Ctrl-C saves and stops; while the run trains, a second copy of the command on its
    directory is refused at once, naming the running one's pid (not a bare errno)."""
    out = tmp_path / "run"
    proc = fastkd(*distill_args(models, out, "--steps", "100000", "--eval-every", "100000",
                                "--save-every", "100000", "--no-baseline", "--no-report"))
    log = out / "log.jsonl"
    deadline = time.monotonic() + 120
    while not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.2)
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--resume", str(out), "--no-progress"])
    assert exit_info.value.code == 2
    assert (f"fastkd distill: error: run directory {out} is in use by another process (pid "
            f"{proc.pid}), which holds the lock {out / '.fastkd.lock'}") in capsys.readouterr().err
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "SIGINT received" in stderr and "Traceback" not in stderr

    checkpoint = latest_checkpoint(out)
    stopped_at = json.loads((checkpoint / "meta.json").read_text())["step"]
    assert stopped_at >= 2 and checkpoint.name == f"step-{stopped_at:08d}"
    config = DistillConfig.load(out)
    result = run_distillation(DistillConfig(**{**vars(config), "resume": True, "stop_after": 2}))
    assert result["status"] == "stopped" and result["distill"]["step"] == stopped_at + 2


def test_cli_argument_errors(models, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--teacher", str(models["teacher"]), "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    assert "--student, --data" in capsys.readouterr().err

    out = tmp_path / "run"
    out.mkdir()
    DistillConfig(teacher=str(models["teacher"]), student=str(models["student"]),
                  data=models["data"], out=str(out)).save(out)
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--resume", str(out), "--lr", "0.1"])
    assert exit_info.value.code == 2 and "--lr" in capsys.readouterr().err

    fresh = tmp_path / "fresh"
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--teacher", str(models["teacher"]), "--student", str(models["student"]),
              "--data", "missing.jsonl", "--out", str(fresh)])
    assert exit_info.value.code == 2
    assert "data file not found: missing.jsonl" in capsys.readouterr().err
    assert not (fresh / "config.json").exists()  # a failed start leaves no run to collide with


def test_demo_fast_runs_and_caches_its_teacher(tmp_path):
    first = run_demo(tmp_path / "demo", fast=True, cache_dir=tmp_path / "cache", progress=False)
    assert first["status"] == "completed" and not first["teacher"]["cached"]
    rows = {row["model"]: row for row in first["report"]["rows"]}
    assert list(rows) == ROWS
    teacher, student = rows["teacher"], rows["distilled student"]
    assert teacher["perplexity"] < student["perplexity"] < 512  # both learned (vocab: 512)
    # the teacher is named "teacher" (out/teacher links to its cache), not by its cache path
    assert "Teacher `teacher` → student `student-init`" in (tmp_path / "demo" / "report.md"
                                                               ).read_text()
    assert (tmp_path / "demo" / "teacher").resolve() == Path(first["teacher"]["dir"]).resolve()

    again = run_demo(tmp_path / "demo2", fast=True, cache_dir=tmp_path / "cache", progress=False)
    assert again["teacher"]["cached"] and again["teacher"]["dir"] == first["teacher"]["dir"]
    assert [r["loss"] for r in again["history"][1:]] == [r["loss"] for r in first["history"][1:]]


def test_demo_offline_compares_online_cached_and_hard_label_students(tmp_path, monkeypatch):
    # `fastkd demo --offline` on a shrunken fast plan: three teacher caches (top-k compact and
    # fixed, sampled), three offline students, and the side-by-side section, measured with the
    # report's own held-out metrics
    import dataclasses

    from fastkd import demo

    small = dataclasses.replace(demo.FAST, corpus_bytes=50_000, teacher_steps=10,
                                teacher_eval_every=10, student_steps=8, student_eval_every=8,
                                eval_sequences=8)
    monkeypatch.setattr(demo, "FAST", small)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    threads = torch.get_num_threads()
    out = tmp_path / "demo"
    assert main(["demo", "--fast", "--offline", "--out", str(out), "--cache-dir",
                 str(tmp_path / "cache"), "--no-progress"]) == 0
    assert torch.get_num_threads() == threads  # the demo ran on one thread, then gave them back
    for run in (out, *(tmp_path / "cache").glob("demo-teacher-*/run"), out / "offline-topk"):
        assert json.loads((run / "config.json").read_text())["threads"] == 1, run
    report = json.loads((out / "report.json").read_text())
    offline = json.loads((out / "offline.json").read_text())
    rows = {row["student"]: row for row in offline["rows"]}
    online = rows["online distillation (teacher in memory)"]
    hard = rows["hard labels (same budget)"]
    topk, sampled = rows["offline, top-16 cache"], rows["offline, sampled cache (16 samples)"]
    fixed = rows["offline, top-16 cache, fixed fp16"]
    assert len(rows) == 5 and online["teacher_in_memory"] and not topk["teacher_in_memory"]
    # the online and hard-label students measured as the main report measures them
    main_rows = {row["model"]: row for row in report["rows"]}
    for row, name in ((online, "distilled student"), (hard, "hard-label student (same budget)")):
        for key in ("perplexity", "kl_to_teacher", "top1_agreement"):
            assert row[key] == pytest.approx(main_rows[name][key], rel=1e-6)
    for row, mode, run in ((topk, "topk", "offline-topk"), (sampled, "sample", "offline-sample"),
                           (fixed, "topk", "offline-topk-fixed")):
        cache_dir = Path(row["cache"]["dir"])
        manifest = json.loads((cache_dir / "manifest.json").read_text())
        assert manifest["mode"] == mode and manifest["k"] == 16
        on_disk = sum(p.stat().st_size for p in cache_dir.iterdir())
        assert row["cache"]["bytes"] == on_disk
        assert row["cache"]["bytes_per_position"] == pytest.approx(
            on_disk / manifest["positions"])
        assert 1.0 < row["perplexity"] < 512 and row["kl_to_teacher"] > 0
        assert row["train_seconds"] > 0 and row["peak_memory_bytes"] > 0
        run_log = (out / run / "log.jsonl").read_text().splitlines()
        assert json.loads(run_log[-1])["step"] == small.student_steps
    # the compact top-k cache: a third of the fixed one's bytes, the same student (1 %)
    assert topk["cache"]["bytes_per_position"] < fixed["cache"]["bytes_per_position"] / 2
    assert topk["perplexity"] == pytest.approx(fixed["perplexity"], rel=1e-2)
    # the offline students learned from the teacher: distinct from the hard-label student
    assert topk["kl_to_teacher"] != hard["kl_to_teacher"]
    md = (out / "report.md").read_text()
    assert "## Offline distillation" in md and "| offline, top-16 cache |" in md
    assert "Compact vs fixed top-k cache" in md


def test_help_and_argument_errors_answer_without_importing_torch():
    """`fastkd --help`, each command's --help and a bad value answer before torch or
    transformers load (they took seconds); `import fastkd` stays lazy, its names still work."""
    probe = (
        "import sys, time\n"
        "from fastkd.cli import main\n"
        "for argv in (['--help'], ['distill', '--help'], ['cache-teacher', '--help'], "
        "['cache-import', '--help'], ['distill', '--teacher', 't', "
        "'--student', 's', '--data', 'd', '--out', 'o', '--steps', '6', '--warmup', '9']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as exit:\n"
        "        print('exit', exit.code, file=sys.stderr)\n"
        "print('loaded:', sorted(m for m in ('torch', 'transformers', 'triton') "
        "if m in sys.modules))\n")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60)
    seconds = time.perf_counter() - started
    assert "loaded: []" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stderr.count("exit 0") == 4 and "exit 2" in proc.stderr
    assert "warmup (--warmup) must be an int in [0, steps=6], got 9" in proc.stderr
    assert "--lora-r" in proc.stdout and "(default: 200)" in proc.stdout
    assert "--logprob-step" in proc.stdout and "(default: 0.125)" in proc.stdout  # their help
    assert seconds < 5, f"{seconds:.1f} s"  # interpreter start-up included; torch alone takes ~2

    import fastkd

    assert callable(fastkd.fused_distill_loss) and fastkd.DistillConfig.__name__ == "DistillConfig"
    with pytest.raises(AttributeError):
        fastkd.no_such_name  # noqa: B018


def test_loss_options_are_typed_once():
    """DistillConfig's loss fields and `fastkd distill`'s "loss" flags are exactly the
    DistillOptions fields a trainer's user sets (options.TRAINER_OPTIONS); the trainers set the
    others (reduction, ignore_index; the heads' softcaps and logit scales from the models'
    configs). A new loss option is one field, plus its help if a trainer's user sets it."""
    import dataclasses

    from fastkd.cli_parser import build_parser
    from fastkd.options import NAMES, TRAINER_OPTIONS, DistillOptions

    set_by_trainers = {"ignore_index", "reduction", "student_softcap", "teacher_softcap",
                       "student_logit_scale", "teacher_logit_scale"}
    assert set(NAMES) == set(TRAINER_OPTIONS) | set_by_trainers
    config_fields = {f.name for f in dataclasses.fields(DistillConfig)}
    assert config_fields & set(NAMES) == set(TRAINER_OPTIONS)
    distill = build_parser()._subparsers._group_actions[0].choices["distill"]
    loss = next(g for g in distill._action_groups if g.title == "loss")
    assert [a.dest for a in loss._group_actions] == list(TRAINER_OPTIONS)
    args = distill.parse_args(["--temperature", "3", "--divergence", "jsd", "--beta", "0.2"])
    assert (args.temperature, args.divergence, args.beta) == (3.0, "jsd", 0.2)
    config = DistillConfig(teacher="t", student="s", data=["d"], out="o", temperature=3.0,
                           ce_weight=0.1, kd_weight=0.9, divergence="skew_reverse_kl", skew=0.3)
    assert config.loss_options() == DistillOptions(
        temperature=3.0, ce_weight=0.1, kd_weight=0.9, divergence="skew_reverse_kl", skew=0.3,
        reduction="sum")


def test_cache_teacher_help_gives_every_option_its_help_and_default(capsys):
    from fastkd.plans import CachePlan

    with pytest.raises(SystemExit):
        main(["cache-teacher", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--teacher DIR_OR_ID teacher:", "--data FILE [FILE ...] .txt, .jsonl",
                 "--out CACHE_DIR cache directory"):
        assert flag in text
    # the trainer's defaults for what a cache shares with `fastkd distill`, CachePlan's for the rest
    distill = DistillConfig.__dataclass_fields__
    assert f"T (as fastkd distill's) (default: {distill['temperature'].default})" in text
    assert f"(as fastkd distill's) (default: {distill['seq_len'].default})" in text
    assert f"slots per position (default: {CachePlan.__dataclass_fields__['k'].default})" in text
    assert "sequences per shard (default: " in text


def test_bad_paths_fail_before_anything_loads_or_is_written(models, tmp_path, monkeypatch,
                                                             capsys):
    """A bad --student (missing, no weights, a truncated weights file, a damaged config.json, a
    hub id while offline) or an unwritable --out is reported before the teacher loads or the data
    is read, and leaves no run behind; a directory whose only config.json came from a start that
    failed before its first step takes a new run."""
    import huggingface_hub.constants
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", no_loading)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", no_loading)
    out = tmp_path / "run"

    def error(student: str, out: Path = out) -> str:
        args = distill_args(models, out)
        args[args.index("--student") + 1] = student
        with pytest.raises(SystemExit) as exit_info:
            main(args)
        assert exit_info.value.code == 2
        assert not out.exists()
        return capsys.readouterr().err

    assert "student: no such model directory: /no/such/student" in error("/no/such/student")
    bare = tmp_path / "bare"
    shutil.copytree(models["student"], bare)
    (bare / "model.safetensors").unlink()
    assert f"student {bare}: the directory has no weights" in error(str(bare))
    damaged = tmp_path / "damaged"
    shutil.copytree(models["student"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert f"{weights} is damaged" in error(str(damaged))
    (damaged / "config.json").write_text('{"vocab_size": 3')
    assert f"{damaged / 'config.json'} is damaged (not valid JSON" in error(str(damaged))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    assert "HF_HUB_OFFLINE is set" in error("fastkd-test-org/no-such-model")
    assert time.perf_counter() - started < 5  # no Hub retries

    # --out: inside a file, or on a read-only file system (simulated: the probe write fails)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert f"out {blocker / 'run'}: {blocker} is a file" in error(str(models["student"]),
                                                                   blocker / "run")
    from fastkd import fsio

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(fsio.tempfile, "TemporaryFile", read_only)
    assert f"out {out}: cannot write there" in error(str(models["student"]))
    threads = torch.get_num_threads()  # demo --fast runs on one thread, then gives them back
    for argv in (["cache-teacher", "--teacher", str(models["teacher"]), "--data",
                  *models["data"], "--out", str(out)],
                 ["demo", "--fast", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        assert f"out {out}: cannot write there (its nearest existing folder {tmp_path}): a " \
               "read-only file system" in capsys.readouterr().err
        assert torch.get_num_threads() == threads
    monkeypatch.undo()

    # A config.json left by a start that never reached its first step does not hold the dir;
    # a config.json alone, with no run marker (a model's?), is not written over.
    from fastkd.config import check_run_dir, mark_run_dir

    out.mkdir()
    config = DistillConfig(teacher=str(models["teacher"]), student=str(models["student"]),
                           data=models["data"], out=str(out))
    config.save(out)
    with pytest.raises(ValueError, match="is not empty and is not a fastkd run directory"):
        check_run_dir(config)
    mark_run_dir(out)
    assert check_run_dir(config) == out
    (out / "log.jsonl").write_text("")
    with pytest.raises(ValueError, match="already holds a run"):
        check_run_dir(config)


def test_resume_from_another_directory(models, tmp_path, monkeypatch):
    """A run started with relative paths (and no --warmup: its default follows --steps) resumes
    with --resume RUN_DIR from any working directory: config.json holds absolute paths."""
    root = tmp_path / "work"
    root.mkdir()
    for name in ("teacher", "student"):
        (root / name).symlink_to(models[name])
    (root / "data.txt").symlink_to(models["data"][0])
    monkeypatch.chdir(root)
    args = ["distill", "--teacher", "teacher", "--student", "student", "--data", "data.txt",
            "--out", "run", "--steps", "3", "--seq-len", "32", "--batch-size", "4",
            "--eval-sequences", "4", "--no-report", "--no-progress"]
    assert main([*args, "--stop-after", "1"]) == 0
    saved = json.loads((root / "run" / "config.json").read_text())
    assert saved["teacher"] == str(root / "teacher") and saved["data"] == [str(root / "data.txt")]
    assert saved["warmup"] is None
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["distill", "--resume", str(root / "run"), "--no-progress"]) == 0
    assert (root / "run" / "student" / "model.safetensors").is_file()
    assert not (root / "run" / "baseline").exists()  # the baseline is opt-in (--baseline)


def test_unknown_options_get_their_commands_usage_and_a_hint(models, tmp_path, capsys):
    """An option another trainer spells differently (--learning-rate, --output_dir) or a typo:
    the subcommand's own usage and a "did you mean" per option, not the top-level usage line.
    `demo --out` into a model directory is refused before anything is built, as distill's is."""
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--teacher", "t", "--learning-rate", "3e-4", "--output_dir", "o",
              "--stepz", "3"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.startswith("usage: fastkd distill [-h]")
    assert ("fastkd distill: error: unrecognized arguments: --learning-rate 3e-4 --output_dir o "
            "--stepz 3\n--learning-rate -> did you mean --lr?\n--output_dir -> did you mean "
            "--out?\n--stepz -> did you mean --steps?\n") in err
    with pytest.raises(SystemExit):
        main(["cache-import", "--logprobs", "x", "--tokenizer", "t", "--out", "o",
              "--max-seq-length", "64"])
    err = capsys.readouterr().err
    assert err.startswith("usage: fastkd cache-import") and "did you mean --seq-len?" in err

    model = tmp_path / "model"
    shutil.copytree(models["student"], model)
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--fast", "--out", str(model), "--cache-dir", str(tmp_path / "cache")])
    assert exit_info.value.code == 2
    assert f"out: {model} is not empty and is not a fastkd run directory" in (
        capsys.readouterr().err)
    assert sorted(p.name for p in model.iterdir()) == sorted(
        p.name for p in models["student"].iterdir())
    assert not (tmp_path / "cache").exists()
