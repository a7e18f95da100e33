"""bench: `python -m bench` end to end on tiny CPU shapes, out-of-memory as a result, the float64
ground truth and the FLOP floor."""

import json
import math
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from _bench import REPO, import_bench

from fastkd import reference

harness = import_bench("harness")
measure = import_bench("measure")
methods = import_bench("methods")
shapes = import_bench("shapes")


def _rows(doc: dict, method: str, case: str | None = None) -> list[dict]:
    return [r for r in doc["results"] if r["method"] == method and case in (None, r["case"])]


def test_cli_end_to_end_on_cpu(tmp_path):
    """One command: JSON, markdown and plots, CPU-labelled, finite figures, fastkd matching float64,
    absent peers recorded as skipped. Qwen's head has V_t > V, so the shared-vocab path runs too."""
    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "bench", "--quick", "--device", "cpu", "--preset", "qwen",
           "--sweep-n", "16,48", "--sweep-v", "300", "--v-sweep-n", "16", "--sweep-ignored", "0,75",
           "--cases", "distill,ce",
           "--methods", "fastkd,reference,liger,liger_kl,cce", "--out", str(out)]
    # One thread: shapes this small gain nothing from two, and lose a lot when the cores are shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "CPU numbers, not GPU" in proc.stdout

    doc = json.loads((out / "results.json").read_text())
    assert doc["cpu"] is True and doc["note"] == "CPU numbers, not GPU"
    assert doc["device"]["type"] == "cpu" and doc["versions"]["torch"] == torch.__version__
    assert doc["matmul"]["tflops"] > 0 and math.isfinite(doc["matmul"]["tflops"])
    assert {r["case"] for r in doc["results"]} == {"distill", "ce"}
    for method in ("fastkd", "reference"):
        rows = _rows(doc, method)
        assert len(rows) == 2 * 5  # two cases x (two N + one V + two shares ignored)
        assert sorted(r["x"] for r in rows if r["sweep"] == "counted") == [4, 4, 16, 16]
        for row in rows:
            assert row["status"] == "ok", row
            for mode in ("fwd", "fwd_bwd"):
                fig = row[mode]
                assert fig["reps"] >= 3
                assert 0 < fig["p20_ms"] <= fig["median_ms"] <= fig["p80_ms"]
                for key in ("tflops", "x_floor"):
                    assert math.isfinite(fig[key]) and fig[key] > 0
                assert fig["peak_mib"] is None or fig["peak_mib"] >= 0
            check = row["check"]
            assert check["loss_rel_diff"] < 1e-5
            assert check["dh_rel_diff"] < 1e-5 and check["dw_rel_diff"] < 1e-5
    qwen = next(r for r in _rows(doc, "fastkd", "distill") if r["sweep"] == "qwen")
    assert qwen["v_t"] > qwen["v"] and qwen["d_s"] <= 256 and qwen["v"] <= 8000
    for peer in ("liger", "liger_kl", "cce"):
        for row in _rows(doc, peer):
            assert row["status"] == "skipped" and row["reason"]

    table = (out / "results.md").read_text()
    assert "CPU numbers, not GPU" in table and "| fastkd |" in table
    assert "not run: cce" in table
    for case in ("distill", "ce"):
        png = (out / f"bench_{case}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def _tiny_settings(n_sweep=(8, 16)):
    head = shapes.Head("tiny", "tiny head", d_s=8, d_t=12, v=40, v_t=44)
    case = shapes.cases(2.0)["distill"]
    return harness.Settings(
        torch.device("cpu"), torch.float32, (case,),
        tuple(shapes.build_shapes([head], n_sweep, (), 8, head)), quick=True,
    )


def _raising(name: str, error: Exception):
    def build(problem):
        def loss(x):
            raise error
        return loss
    return methods.Method(name, f"raises {type(error).__name__}", build, lambda problem: None)


def test_default_out_is_git_ignored_and_leaves_tracked_results_alone(monkeypatch):
    """Without --out a run writes ./bench-results/<device>/, which git ignores: a user's run does
    not dirty the checkout (bench/results/ is where published tables are committed)."""
    main = import_bench("__main__")
    monkeypatch.chdir(REPO)
    out = main.default_out("cpu")
    assert out == REPO / "bench-results" / "cpu"
    assert REPO / "bench" / "results" not in out.parents
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "results.json")], cwd=REPO)
    tracked = subprocess.run(["git", "check-ignore", "-q",
                              str(REPO / "bench" / "results" / "cpu" / "results.json")], cwd=REPO)
    assert ignored.returncode == 0 and tracked.returncode == 1


def test_out_of_memory_is_a_result_not_a_crash():
    oom = _raising("oom", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB"))
    cublas = _raising("cublas", RuntimeError("CUDA error: out of memory"))
    broken = _raising("broken", ValueError("wrong shape"))
    chosen = [methods.METHODS["fastkd"], oom, cublas, broken]
    doc = harness.run(_tiny_settings(), chosen, log=lambda line: None)

    assert [r["status"] for r in _rows(doc, "fastkd")] == ["ok", "ok"]
    for name in ("oom", "cublas"):
        first, second = _rows(doc, name)
        assert first["status"] == "oom"
        assert first["fwd"] == {"status": "oom", "reason": "OOM at N=8"}
        assert first["fwd_bwd"]["reason"] == "OOM at N=8"
        # larger N of the same sweep is not tried once a smaller one ran out of memory
        assert second["fwd_bwd"] == {"status": "skipped", "reason": "OOM at N=8, larger not run"}
    assert {r["status"] for r in _rows(doc, "broken")} == {"error"}
    assert "ValueError: wrong shape" in _rows(doc, "broken")[0]["reason"]


def test_fp64_reference_in_chunks_matches_the_spec():
    """The ground truth, chunked over tokens, equals fastkd.reference on all tokens at once."""
    head = shapes.Head("h", "h", d_s=6, d_t=10, v=30, v_t=34, softcap=5.0)
    shape = shapes.build_shapes([head], (23,), (), 8, head)[0]
    problem = methods.Problem(shapes.cases(2.0)["distill"], shape, torch.float64,
                              torch.device("cpu"))
    x = harness.make_inputs(problem, seed=3)
    ref = harness.fp64_reference(x, problem.opts, rows=5)
    loss, _, _ = reference.distill_loss(x.h_s, x.w_s, x.h_t, x.w_t, x.labels, problem.opts)
    dh, dw = torch.autograd.grad(loss, (x.h_s, x.w_s))
    assert ref.loss == pytest.approx(loss.item(), rel=1e-12)
    assert harness.max_rel_diff(dh, ref.dh) < 1e-12
    assert harness.max_rel_diff(dw, ref.dw) < 1e-12
    assert math.isnan(harness.max_rel_diff(torch.full_like(dh, math.nan), ref.dh))


def test_flop_floor():
    n, d_s, d_t, v = 1024, 2048, 4096, 128256
    shape = shapes.Shape("llama", "", n, d_s, d_t, v, v, None, ignored=0.0)
    assert shapes.flop_floor(shape, backward=True) == 2 * n * v * (3 * d_s + d_t)
    assert shapes.flop_floor(shape, backward=False) == 2 * n * v * (d_s + d_t)
    assert shapes.flop_floor(shape, backward=True, teacher=False) == 6 * n * v * d_s
    # padded teacher vocab: only the K = min(V, V_t) shared ids need teacher logits
    padded = replace(shape, v_t=v + 128)
    assert shapes.flop_floor(padded, backward=True) == 2 * n * v * (3 * d_s + d_t)
    smaller = replace(shape, v_t=v - 256)
    assert shapes.flop_floor(smaller, backward=True) == 2 * n * (3 * v * d_s + (v - 256) * d_t)
    # ignored tokens need no work: the floor counts the counted ones (10% ignored by default)
    assert shapes.flop_floor(replace(shape, ignored=0.1), backward=False) == (
        2 * (n - 102) * v * (d_s + d_t))


def test_cpu_presets_are_small_and_keep_their_ratios():
    for head in shapes.PRESETS.values():
        small = head.scaled(shapes.CPU_D_DIV, shapes.CPU_V_DIV)
        assert max(small.d_s, small.d_t) <= 256 and max(small.v, small.v_t) <= 8000
        assert (small.v_t > small.v) == (head.v_t > head.v) and small.softcap == head.softcap
    assert max(shapes.N_SWEEP["cpu"][0]) <= 256


def test_sparse_case_runs_beside_the_dense_one():
    """The sparse case: fastkd's sparse loss on precomputed top-k targets (the teacher's, from its
    logits), checked against the sparse spec in float64, its floor without the teacher GEMM; the
    dense-only peers skip it."""
    settings = _tiny_settings(n_sweep=(13,))
    sparse = replace(shapes.cases(2.0)["sparse"], sparse_k=5)
    settings = replace(settings, cases=(settings.cases[0], sparse))
    chosen = [methods.METHODS[m] for m in ("fastkd", "liger")]
    doc = harness.run(settings, chosen, log=lambda line: None)
    dense_row, sparse_row = _rows(doc, "fastkd")
    assert (dense_row["case"], sparse_row["case"]) == ("distill", "sparse")
    n_c, v, d_s = 13 - round(13 * 0.1), 40, 8
    assert sparse_row["fwd_bwd"]["flops"] == 2 * n_c * v * 3 * d_s
    assert dense_row["fwd_bwd"]["flops"] == 2 * n_c * v * (3 * d_s + 12)
    check = sparse_row["check"]
    assert check["loss_rel_diff"] < 1e-5 and check["dw_rel_diff"] < 1e-5
    assert _rows(doc, "liger", "sparse")[0]["reason"] == "dense teacher only"
    # the targets are the teacher's top-k of log softmax(t / T) over the shared ids
    problem = methods.Problem(sparse, settings.shapes[0], torch.float64, torch.device("cpu"))
    assert methods.METHODS["compile"].skip(problem) == "dense teacher only"
    x = harness.make_inputs(problem, seed=1)
    want = torch.log_softmax(x.h_t @ x.w_t[:v].T / 2.0, -1).topk(5, -1)
    assert torch.equal(x.ids.long(), want.indices)
    torch.testing.assert_close(x.logprobs, want.values)
    ref = harness.fp64_reference(x, problem.opts, rows=4)
    loss = reference.sparse_distill_loss(x.h_s, x.w_s, x.ids, x.logprobs, x.labels, problem.opts,
                                         tail="bucket")[0]
    assert ref.loss == pytest.approx(loss.item(), rel=1e-12)


def test_gpu_session_script_rehearsed_on_cpu(tmp_path):
    """bench/gpu_session.sh, the one command a GPU session runs, end to end on CPU at tiny sizes:
    its pytest step (a few tests), `python -m bench.gpu_profile` (every step: ceilings, both
    target heads with the fp64 check and the breakdown, chunk sweep, row-kernel sweep, N sweep)
    and `python -m bench`, each writing under $OUT and packed into all.tgz. A GPU session's
    minutes are too few to find the script's own bugs there."""
    import tarfile

    out = tmp_path / "out"
    env = {
        **os.environ, "OUT": str(out), "INSTALL": "0", "TEST_DEVICE": "cpu",
        "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "BUDGET_S": "900",
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
        "PROFILE_ARGS": "--device cpu --n 20 --scale 64,256 --chunks 8 --blocks 128 --warps 4 "
                        "--row-shape 3,300 --ns 12,24 --gemm-n 64 --copy-mib 4",
        "BENCH_ARGS": "--device cpu --preset llama --sweep-n 16 --sweep-v none "
                      "--sweep-ignored none --cases distill --methods fastkd,reference,liger",
    }
    proc = subprocess.run(["bash", "bench/gpu_session.sh", "-k",
                           "test_matches_spec and forward_kl and not triton"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    log = (out / "session.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    for step in ("pytest", "profile", "bench", "sweeps"):
        assert f"{step} exit 0" in log, log[-3000:]
    # most important evidence first: the target shapes, then the peers, then the sweeps
    order = [log.index(s) for s in ("pytest exit", "profile exit", "bench exit", "sweeps exit")]
    assert order == sorted(order), order
    assert "=== [" in log and log.rstrip().endswith("done")

    junit = (out / "pytest_cuda.xml").read_text()
    assert 'failures="0"' in junit and 'errors="0"' in junit and 'tests="0"' not in junit

    prof = json.loads((out / "profile.json").read_text())
    assert prof["device"]["type"] == "cpu" and "CPU numbers" in prof["note"]
    assert not [k for k in prof if k.endswith("_error")], prof
    assert prof["ceilings"]["gemm_bf16"]["tflops"] > 0
    for head in ("llama", "gemma"):
        r = prof["targets"][head]
        assert "error" not in r, r
        assert r["shape"]["n"] == 20 and math.isfinite(r["x_floor"]) and r["x_floor"] > 0
        for key in ("loss_rel_diff", "dh_rel_diff", "dw_rel_diff"):
            assert r["check"][key] < 2e-2, r["check"]  # bf16 against the fp64 spec
        assert r["breakdown"]["ms_per_call"]["gemm"] > 0
    assert prof["targets"]["gemma"]["shape"]["softcap"] == 30.0
    assert [r["chunk"] for r in prof["chunks"]] == [8]
    assert [(r["divergence"], r["block_v"]) for r in prof["row_kernel"]] == [
        ("forward_kl", 128), ("jsd", 4096)]
    assert [r["n"] for r in prof["flat_in_n"]] == [12, 24]
    assert "CPU rehearsal" in (out / "profile.md").read_text()

    bench_doc = json.loads((out / "bench_results.json").read_text())
    assert {r["status"] for r in _rows(bench_doc, "fastkd")} == {"ok"}
    assert {r["status"] for r in _rows(bench_doc, "liger")} == {"skipped"}  # not installed here
    with tarfile.open(out / "all.tgz") as tgz:
        names = {n.removeprefix("./") for n in tgz.getnames()}
    assert {"session.log", "profile.json", "profile.md", "pytest_cuda.xml", "bench_results.json",
            "bench/results.md"} <= names


def test_timed_rounds_alternate_the_methods_order():
    """Every round calls each method once, the order reversed every other round, after each is
    warmed up: a shared machine's drift spreads over the methods instead of landing on one."""
    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b")]
    stats = measure.time_alternating(fns, [1.0, 1.0], torch.device("cpu"), 3, 100.0)
    rounds = stats[0]["reps"]
    assert rounds == stats[1]["reps"] == 100
    assert calls[:50] == ["a"] * 25 + ["b"] * 25  # 25 ms of warm-up each, at 1 ms a call
    assert calls[50:] == ["a", "b", "b", "a"] * (rounds // 2)


def test_floor_grid_is_the_issue_shapes():
    """--grid floor: D_s 256, D_t 512, V 32000 and 128256 as they are (not scaled for the CPU),
    N 512, 2048, 8192 with every token counted; every divergence alone, CE and the sparse loss;
    fwd+bwd only."""
    main = import_bench("__main__")
    settings = main.settings_from(main.parse_args(["--grid", "floor", "--device", "cpu"]))
    assert [(s.v, s.n) for s in settings.shapes] == [
        (v, n) for v in (32000, 128256) for n in (512, 2048, 8192)]
    assert {(s.d_s, s.d_t, s.v_t - s.v, s.n_ignored) for s in settings.shapes} == {(256, 512, 0, 0)}
    assert [c.name for c in settings.cases] == list(shapes.FLOOR_CASES)
    divergences = {c.opts.divergence for c in settings.cases if c.opts.kd_weight > 0}
    assert divergences == {"forward_kl", "reverse_kl", "jsd", "skew_forward_kl",
                           "skew_reverse_kl", "tvd"}
    assert settings.modes == ("fwd_bwd",) and settings.grid == "floor"


def test_the_floor_and_torch_linear_cross_entropy_beside_fastkd(monkeypatch):
    """The floor method (the GEMMs alone) is timed, not checked, and each method's time over it is
    the summary's headline; torch's linear_cross_entropy computes the ce case and forward KL (as
    CE on soft targets, less the teacher's entropy) to float64 accuracy; a method whose full
    logits would not fit in half the free memory is skipped, saying so."""
    settings = replace(_tiny_settings(n_sweep=(16,)), modes=("fwd_bwd",),
                       cases=tuple(shapes.cases(2.0)[c] for c in ("kd", "ce")))
    chosen = [methods.METHODS[m] for m in ("floor", "lce")]
    hungry = replace(methods.METHODS["reference"], name="hungry", logit_copies=1e9)
    monkeypatch.setattr(harness, "matmul_rate", lambda settings: {  # not what this test checks
        "n": 1, "dtype": "float32", "median_ms": 1.0, "reps": 1, "tflops": 1e-3})
    doc = harness.run(settings, [*chosen, hungry], log=lambda line: None)
    for row in _rows(doc, "floor"):
        assert row["status"] == "ok" and row["check"] is None and row["fwd"] is None
    for case in ("kd", "ce"):
        (row,) = _rows(doc, "lce", case)
        assert row["status"] == "ok", row
        assert row["check"]["loss_rel_diff"] < 1e-5 and row["check"]["dw_rel_diff"] < 1e-5
    jsd = methods.Problem(shapes.cases(2.0)["jsd"], settings.shapes[0], torch.float32,
                          torch.device("cpu"))
    assert "ce and kd cases" in methods.METHODS["lce"].skip(jsd)
    assert all("GiB free" in r["reason"] for r in _rows(doc, "hungry"))
    table = import_bench("report").markdown(doc)
    summary = table[table.index("## Summary"):table.index("## The same by CPU time")]
    assert summary.count("| kd |") == summary.count("| ce |") == 1
    assert "| GEMMs ms | lce |" in summary and "×, " in summary
    by_cpu = table[table.index("## The same by CPU time"):table.index("Columns:")]
    assert by_cpu.count("| kd |") == 1 and all(
        r["fwd_bwd"]["cpu_median_ms"] > 0 for r in _rows(doc, "lce") if r["status"] == "ok")
