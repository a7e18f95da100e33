"""python -m bench: fastkd beside its peers and the hardware's limit, in one command.

    python -m bench                                  # every preset, sweep and case on this device
    python -m bench --quick                          # fewer sizes and repeats
    python -m bench --preset llama --cases distill --sweep-n 1024,4096,16384 --sweep-v none
    python -m bench --preset none --sweep-v none --sweep-ignored 0,50,90,99  # ignored tokens
    python -m bench --methods fastkd,liger --dtype bf16 --out /tmp/bench
    python -m bench --grid floor --out bench/results/cpu-floor   # the CPU floor grid (issue 31)

On a machine without CUDA the same command runs CPU-sized shapes (the heads' widths / 16,
vocabularies / 32, N <= 256, fp32) and labels everything "CPU numbers, not GPU". `--grid floor`
runs instead the heads D_s 256, D_t 512, V 32000 and 128256 unscaled at N 512, 2048, 8192, every
divergence alone, CE alone and the sparse loss, forward + backward only, beside the GEMMs alone
(the `floor` method): each method's time over the floor's is the headline (3 alternating rounds,
the float64 check up to N = 2048). Writes
results.json, results.md and bench_<case>.png into --out (default ./bench-results/<device-slug>/,
git-ignored: a run never dirties the checkout; the committed tables are written with
--out bench/results/<device-slug>).
Exit status 1 if any measurement failed with an error other than out-of-memory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench import report
from bench.harness import MODES, REPO, Settings, device_info, run
from bench.methods import METHODS
from bench.shapes import (
    CPU_D_DIV,
    CPU_V_DIV,
    FLOOR_CASES,
    FLOOR_HEADS,
    FLOOR_N,
    IGNORED_SWEEP,
    N_SWEEP,
    PRESETS,
    V_SWEEP,
    V_SWEEP_N,
    Shape,
    build_shapes,
    cases,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The floor grid's calls take seconds to a minute: 3 alternating rounds (after a first call and
# one under memory accounting), the float64 check up to N = 2048.
FLOOR_SETTINGS = {"rounds": 3, "check_max_n": 2048}


def _names(text: str, allowed: list[str], what: str) -> list[str]:
    names = allowed if text == "all" else [t for t in text.split(",") if t and t != "none"]
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {unknown}; choose from {allowed}")
    return names


def _ints(text: str) -> tuple[int, ...]:
    if text in ("", "none"):
        return ()
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected integers a,b,c; got {text!r}") from err
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return values


def _percents(text: str) -> tuple[float, ...]:
    if text in ("", "none"):
        return ()
    try:
        values = tuple(float(t) / 100 for t in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected percents a,b,c; got {text!r}") from err
    if any(not 0 <= v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"percents must lie in [0, 100), got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="all",
                   help=f"heads to sweep over N: comma list of {list(PRESETS)}, 'all' or 'none'")
    p.add_argument("--sweep-n", type=_ints, help="token counts N for every preset (comma list)")
    p.add_argument("--sweep-v", type=_ints,
                   help="vocab sizes for the V sweep (Llama widths), or 'none' to skip it; "
                        "--grid floor: which of its heads (32000, 128256) to run")
    p.add_argument("--v-sweep-n", type=int, help="tokens N of the V and counted sweeps")
    p.add_argument("--sweep-ignored", type=_percents,
                   help="percent of ignored tokens for the counted sweep (Llama head), or 'none'")
    p.add_argument("--grid", choices=["default", "floor"], default="default",
                   help="floor: the CPU floor grid (D_s 256, D_t 512, V 32000 and 128256 "
                        "unscaled, N 512, 2048, 8192, no V or counted sweep, every divergence, "
                        "ce and sparse, fwd+bwd only)")
    p.add_argument("--methods", default="all", help=f"comma list of {list(METHODS)} or 'all'")
    p.add_argument("--cases",
                   help="comma list of distill, kd, rkl, jsd, skew_fkl, skew_rkl, tvd, ce, "
                        "sparse (the sparse loss on the teacher's top-64) or 'all' (the "
                        "default; --grid floor: all but distill)")
    p.add_argument("--modes", help="comma list of fwd, fwd_bwd, or 'all' (the default; --grid "
                                   "floor: fwd_bwd)")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--temperature", type=float, default=2.0,
                   help="T of the distill, kd, rkl, jsd and sparse cases")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default cuda when available")
    p.add_argument("--out", type=Path,
                   help="output folder (default ./bench-results/<device-slug>/, git-ignored; the "
                        "committed tables live in bench/results/<device-slug>/)")
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    p.add_argument("--rounds", type=int,
                   help="timed rounds at least (default: 3 with --quick or --grid floor, 5 on "
                        "CPU, 10 on CUDA): fewer where one call takes a minute")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of --out's results.json (same device and dtype) that this "
                        "run does not re-measure: one results folder from several shorter runs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multi-teacher", action="store_true",
                   help="run the multi-teacher case instead (bench/multi_teacher.py: K routed "
                        "teachers against one, a mixture against the floor; takes --device, "
                        "--dtype, --quick, --seed, --out)")
    args = p.parse_args(argv)
    try:
        args.preset = _names(args.preset, list(PRESETS), "preset")
        args.methods = _names(args.methods, list(METHODS), "method")
        default_cases = ",".join(FLOOR_CASES) if args.grid == "floor" else "all"
        args.cases = _names(args.cases or default_cases, list(cases(args.temperature)), "case")
        args.modes = _names(args.modes or ("fwd_bwd" if args.grid == "floor" else "all"),
                            list(MODES), "mode")
    except argparse.ArgumentTypeError as err:
        p.error(str(err))
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    return args


def _keep_kernels_folder_off_path() -> None:
    """`python -m bench` puts the working directory first on sys.path. From the repo root that
    makes the folder kernels/ importable as a top-level `kernels`, the name of a Hugging Face
    package that transformers (imported by liger-kernel) probes and imports. bench and fastkd are
    imported by now (fastkd is installed, its kernels as `fastkd.kernels`): drop the entry."""
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO]


def settings_from(args: argparse.Namespace) -> Settings:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    kind = device.type
    if args.grid == "floor":  # every token counted: N is the tokens each method computes
        heads = [h for h in FLOOR_HEADS if not args.sweep_v or h.v in args.sweep_v]
        shapes = [Shape(h.name, h.title, n, h.d_s, h.d_t, h.v, h.v_t, h.softcap, ignored=0.0)
                  for h in heads for n in args.sweep_n or FLOOR_N]
    else:
        shapes = _default_shapes(args, kind)
    all_cases = cases(args.temperature)
    dtype = DTYPES[args.dtype or ("fp32" if kind == "cpu" else "bf16")]
    fixed = {**(FLOOR_SETTINGS if args.grid == "floor" else {}),
             **({} if args.rounds is None else {"rounds": args.rounds})}
    return Settings(device, dtype, tuple(all_cases[c] for c in args.cases), tuple(shapes),
                    quick=args.quick, seed=args.seed, modes=tuple(args.modes), grid=args.grid,
                    **fixed)


def _default_shapes(args: argparse.Namespace, kind: str) -> list[Shape]:
    heads = [PRESETS[name] for name in args.preset]
    v_head = PRESETS["llama"]
    if kind == "cpu":
        heads = [h.scaled(CPU_D_DIV, CPU_V_DIV) for h in heads]
        v_head = v_head.scaled(CPU_D_DIV, CPU_V_DIV)
    return build_shapes(
        heads,
        args.sweep_n if args.sweep_n is not None else N_SWEEP[kind][args.quick],
        args.sweep_v if args.sweep_v is not None else V_SWEEP[kind][args.quick],
        args.v_sweep_n or V_SWEEP_N[kind], v_head,
        args.sweep_ignored if args.sweep_ignored is not None else IGNORED_SWEEP[kind][args.quick],
    )


def _earlier_run(out: Path, settings: Settings) -> dict | None:
    path = out / "results.json"
    if not path.exists():
        return None
    earlier = json.loads(path.read_text())
    here = (device_info(settings.device)["name"], str(settings.dtype).removeprefix("torch."))
    if (earlier["device"]["name"], earlier["dtype"]) != here:
        raise SystemExit(f"--merge: {path} holds {earlier['device']['name']}, {earlier['dtype']}; "
                         f"this run is {here[0]}, {here[1]}")
    return earlier


def default_out(slug: str) -> Path:
    """Where a run writes without --out: ./bench-results/<slug>, which .gitignore lists, so a
    user's run leaves the tracked bench/results/ alone."""
    return Path.cwd() / "bench-results" / slug


def main(argv: list[str] | None = None) -> int:
    _keep_kernels_folder_off_path()
    args = parse_args(argv)
    if args.multi_teacher:
        from bench import multi_teacher

        return multi_teacher.main(args)
    settings = settings_from(args)
    out = args.out or default_out(device_info(settings.device)["slug"])
    earlier = _earlier_run(out, settings) if args.merge else None

    def merged(doc: dict) -> dict:
        return doc if earlier is None else report.merge(earlier, doc)

    doc = run(settings, [METHODS[m] for m in args.methods],
              emit=lambda d: report.write(merged(d), out, plots=False))
    for path in report.write(merged(doc), out):
        print(f"wrote {path}")
    if doc["cpu"]:
        print("CPU numbers, not GPU.")
    errors = [r for r in doc["results"] if r["status"] == "error"]
    for r in errors:
        print(f"error: {r['case']} {r['sweep']} x={r['x']} {r['method']}: {r['reason']}",
              file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
