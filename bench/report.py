"""Outputs of a run: results.json (every figure), results.md (the tables), bench_<case>.png (plots).

`python -m bench.report path/to/results.json` re-renders the table and plots from a JSON file, e.g.
one left by a run that was cut off (the harness writes the JSON and table after every problem).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from bench.shapes import X_NAMES  # noqa: E402

COLUMNS = """Columns: **fwd ms**: forward only (the loss under `no_grad`), median. **fwd+bwd ms**:
loss and dH, dW_s, median [20th, 80th percentile]. **TFLOP/s**: the fwd+bwd FLOP floor
2·N_c·(3·V·D_s + K·D_t) over the N_c counted (not ignored) tokens (= 2·N·V·(3·D_s + D_t) when
K = min(V, V_t) = V and no token is ignored; no teacher term in the CE-only and sparse cases:
2·N_c·V·3·D_s) over the median
time. **× floor**: the median time over the time the measured matmul
rate needs for that floor (1.0 is the hardware's limit). **× GEMMs**: the median time over the
`floor` method's, the same GEMMs timed alone in the same run (where it ran). **peak MiB**: peak
memory of one fwd+bwd call beyond the inputs (the returned gradients included). **loss / dH / dW
rel err**: against fastkd.reference in float64 over all N tokens; loss |Δ|/|ref|, gradients
max|Δ|/max|ref|."""


def _num(value: float | None, fmt: str) -> str:
    if value is None:
        return "n/a"
    return "nan" if math.isnan(value) else format(value, fmt)


def _time_cell(fig: dict | None, spread: bool) -> str:
    if fig is None:
        return "—"
    if fig["status"] != "ok":
        return {"oom": "OOM", "error": "error", "skipped": "OOM (smaller)"}[fig["status"]]
    cell = _num(fig["median_ms"], ".4g")
    return cell + (f" [{fig['p20_ms']:.4g}, {fig['p80_ms']:.4g}]" if spread else "")


def _ok(row: dict, mode: str = "fwd_bwd") -> dict:
    """The row's figures in mode if they ran, else {}."""
    fig = row.get(mode)
    return fig if fig and fig["status"] == "ok" else {}


def _x_gemms(row: dict, floors: dict, key: str = "median_ms") -> float | None:
    """fwd+bwd median (of `key`: wall or CPU time) over the floor method's at the same case and
    shape."""
    floor = floors.get((row["case"], row["sweep"], row["x"]))
    mine = _ok(row).get(key)
    return None if floor is None or mine is None or key not in floor else mine / floor[key]


def _floors(doc: dict) -> dict:
    return {(r["case"], r["sweep"], r["x"]): _ok(r) for r in doc["results"]
            if r["method"] == "floor" and _ok(r)}


def _row_cells(row: dict, floors: dict) -> list[str]:
    fb = _ok(row)
    check = row["check"] or {}
    return [
        str(row["x"]), row["method"],
        _time_cell(row["fwd"], spread=False), _time_cell(row["fwd_bwd"], spread=True),
        _num(fb.get("tflops"), ".3g"), _num(fb.get("x_floor"), ".3g"),
        _num(_x_gemms(row, floors), ".3g"), _num(fb.get("peak_mib"), ".4g"),
        *(_num(check.get(k), ".1e") for k in ("loss_rel_diff", "dh_rel_diff", "dw_rel_diff")),
    ]


def summary(doc: dict, key: str = "median_ms") -> list[str]:
    """One line per case and shape: the GEMMs' time, then per method its fwd+bwd time over the
    GEMMs' and its peak memory (the CPU floor grid's headline table); key "cpu_median_ms": the
    same by the process's CPU time."""
    floors = _floors(doc)
    if not floors or not any(key in f for f in floors.values()):
        return []
    methods = [m for m in dict.fromkeys(r["method"] for r in doc["results"]) if m != "floor"]
    methods = [m for m in methods if any(r["method"] == m and _ok(r) for r in doc["results"])]
    title = ("## Summary: fwd+bwd time over the GEMMs alone (× GEMMs), and peak MiB"
             if key == "median_ms" else
             "## The same by CPU time: the process's CPU time a call over the GEMMs'")
    lines = [title, "", "| case | V | N | GEMMs ms | " + " | ".join(methods) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(methods)]
    rows = {(r["case"], r["sweep"], r["x"], r["method"]): r for r in doc["results"]}
    for case, sweep, x in sorted(floors, key=lambda k: (
            list(doc["cases"]).index(k[0]), rows[(*k, "floor")]["v"], k[2])):
        cells = []
        for method in methods:
            row = rows.get((case, sweep, x, method))
            ratio = None if row is None else _x_gemms(row, floors, key)
            if ratio is None:
                cells.append("—")
                continue
            peak = _ok(row).get("peak_mib") if key == "median_ms" else None
            cells.append(f"{ratio:.2f}×" + ("" if peak is None else f", {peak:.0f}"))
        floor_row = rows[(case, sweep, x, "floor")]
        lines.append(f"| {case} | {floor_row['v']} | {x} | {floors[case, sweep, x][key]:.4g} | "
                     + " | ".join(cells) + " |")
    note = ("A dash: the method does not compute that loss, or was not run there (see the case's "
            "table below for why)." if key == "median_ms" else
            "CPU time counts every thread of the process, spin-waits included: steadier than the "
            "wall time where other work shares the cores, and no substitute for it.")
    return [*lines, "", note, ""]


def _sections(doc: dict) -> list[tuple[str, str, list[dict]]]:
    """(case, sweep, rows sorted by x): cases and sweeps in order of first appearance (merged runs
    included), the vocab and counted sweeps last in each case."""
    order: dict[tuple[str, str], list[dict]] = {}
    for row in doc["results"]:
        order.setdefault((row["case"], row["sweep"]), []).append(row)
    cases = list(dict.fromkeys(case for case, _ in order))
    keys = sorted(order, key=lambda k: (cases.index(k[0]), k[1] in X_NAMES))
    return [(case, sweep, sorted(order[case, sweep], key=lambda r: r["x"]))
            for case, sweep in keys]


def merge(earlier: dict, doc: dict) -> dict:
    """doc plus the rows of an earlier run (same device and dtype) that doc did not re-measure."""
    def key(row: dict) -> tuple:
        return row["case"], row["sweep"], row["x"], row["method"]

    new = {key(r) for r in doc["results"]}
    return {**doc, "earlier_runs": [*earlier.get("earlier_runs", []), earlier["timestamp"]],
            "cases": {**earlier["cases"], **doc["cases"]},
            "methods": {**earlier["methods"], **doc["methods"]},
            "results": [r for r in earlier["results"] if key(r) not in new] + doc["results"]}


def _sweep_heading(sweep: str, rows: list[dict]) -> str:
    r = rows[0]
    if sweep == "counted":
        return f"{r['title']} (N {r['n']}, D_s {r['d_s']}, D_t {r['d_t']}, V {r['v']})"
    if sweep == "vocab":
        return f"{r['title']}, D_s {r['d_s']}, D_t {r['d_t']}"
    cap = f", softcap {r['softcap']:g}" if r["softcap"] else ""
    return f"{r['title']}: D_s {r['d_s']}, D_t {r['d_t']}, V {r['v']}, V_t {r['v_t']}{cap}"


def markdown(doc: dict) -> str:
    dev, ver, mm = doc["device"], doc["versions"], doc["matmul"]
    if dev["type"] == "cuda":
        where = (f"CUDA, capability {dev['capability']}, {dev['sms']} SMs, "
                 f"{dev['memory_gib']} GiB, CUDA {dev['cuda']}")
    else:
        end = dev.get("load_avg_1m_end")
        threads = f"{dev['threads']} thread" + ("s" if dev["threads"] != 1 else "")
        where = (f"CPU, {threads}, {dev['memory_gib']} GiB; 1-minute load average "
                 f"{dev['load_avg_1m']:.2f} at the start"
                 + ("" if end is None else f", {end:.2f} at the end") + ": other work shares "
                 "the cores when it exceeds the threads")
    peers = ", ".join(f"{k} {v or 'not installed'}" for k, v in ver.items()
                      if k not in ("python", "torch", "triton", "fastkd", "fastkd_commit"))
    lines = [f"# fastkd benchmark: {dev['name']}, {doc['dtype']}", ""]
    if doc["cpu"] and doc.get("grid") == "floor":
        lines += ["**CPU numbers, not GPU.** The CPU floor grid: heads as they are (not scaled "
                  "down), every method beside the GEMMs alone, timed in alternating rounds.", ""]
    elif doc["cpu"]:
        lines += ["**CPU numbers, not GPU.** CPU-sized shapes (heads scaled down), for the harness "
                  "and CI; they say nothing about GPU speed.", ""]
    lines += [
        f"- Device: {dev['name']} ({where})",
        f"- Versions: python {ver['python']}, torch {ver['torch']}, triton {ver['triton']}, "
        f"fastkd {ver['fastkd']} ({ver['fastkd_commit'] or 'commit unknown'}); {peers}",
        f"- Run: {doc['timestamp']}{', --quick' if doc['quick'] else ''}"
        + "".join(f" (+ rows kept from the run of {t})" for t in doc.get("earlier_runs", []))
        + "; times are quantiles "
        f"{'/'.join(str(q) for q in doc['quantiles'])} over the timed calls",
        f"- Matmul rate (the floor's yardstick): {mm['tflops']:.3g} TFLOP/s, {mm['n']}^3 "
        f"{mm['dtype']} GEMM, median of {mm['reps']}",
        "", *summary(doc), *summary(doc, "cpu_median_ms"), COLUMNS, "",
    ]
    header = ["method", "fwd ms", "fwd+bwd ms [p20, p80]", "TFLOP/s", "× floor", "× GEMMs",
              "peak MiB", "loss rel err", "dH rel err", "dW rel err"]
    floors = _floors(doc)
    case_shown = None
    for case, sweep, rows in _sections(doc):
        if case != case_shown:
            lines += [f"## {case}: {doc['cases'][case]['title']}", ""]
            case_shown = case
        x_name = X_NAMES.get(sweep, "N")
        lines += [f"### {_sweep_heading(sweep, rows)}", "",
                  "| " + " | ".join([x_name, *header]) + " |",
                  "|" + "|".join(["---:", "---"] + ["---:"] * (len(header) - 1)) + "|"]
        skipped: dict[str, str] = {}
        notes: dict[str, None] = {}
        for row in rows:
            if row["status"] == "skipped" and row["fwd"] is None:
                skipped[row["method"]] = row["reason"]
                continue
            lines.append("| " + " | ".join(_row_cells(row, floors)) + " |")
            if row["status"] == "error":
                notes[f"{row['method']} at {x_name}={row['x']}: {row['reason']}"] = None
            if row.get("check_note"):
                notes[row["check_note"]] = None
        lines.append("")
        lines += [f"- not run: {m} ({reason})" for m, reason in skipped.items()]
        lines += [f"- {note}" for note in notes]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot(doc: dict, out_dir: Path) -> list[Path]:
    """Per case one PNG: a row per sweep, fwd+bwd (solid) and fwd (dotted) time, and peak memory."""
    paths = []
    by_case: dict[str, list[tuple[str, list[dict]]]] = {}
    for case, sweep, rows in _sections(doc):
        by_case.setdefault(case, []).append((sweep, rows))
    for case, sweeps in by_case.items():
        fig, axes = plt.subplots(len(sweeps), 2, figsize=(12, 3.6 * len(sweeps)), squeeze=False)
        for (sweep, rows), (ax_t, ax_m) in zip(sweeps, axes, strict=True):
            _plot_sweep(rows, ax_t, ax_m)
            ax_t.set_title(_sweep_heading(sweep, rows), fontsize=8)
            ax_m.set_title("peak memory beyond the inputs, fwd+bwd", fontsize=8)
        tag = "CPU numbers, not GPU" if doc["cpu"] else doc["device"]["name"]
        fig.suptitle(f"fastkd bench, {case}: {doc['cases'][case]['title']} | {tag}, {doc['dtype']}")
        fig.tight_layout()
        path = out_dir / f"bench_{case}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def _plot_sweep(rows: list[dict], ax_t, ax_m) -> None:
    x_name = X_NAMES.get(rows[0]["sweep"], "N")
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for i, method in enumerate(methods):
        mine = [r for r in rows if r["method"] == method]
        color = f"C{i}"
        ooms = [r["x"] for r in mine if r["status"] == "oom"]
        label = method + (f" (OOM at {x_name}={min(ooms)})" if ooms else "")
        for mode, style in (("fwd_bwd", "-"), ("fwd", ":")):
            ok = [r for r in mine if r[mode] and r[mode]["status"] == "ok"]
            if not ok:
                continue
            xs = [r["x"] for r in ok]
            ax_t.plot(xs, [r[mode]["median_ms"] for r in ok], style, marker="o", ms=3, color=color,
                      label=label if mode == "fwd_bwd" else None)
            if mode == "fwd_bwd":
                ax_t.fill_between(xs, [r[mode]["p20_ms"] for r in ok],
                                  [r[mode]["p80_ms"] for r in ok], color=color, alpha=0.2)
                mem = [r for r in ok if r[mode]["peak_mib"] is not None]
                if mem:
                    ax_m.plot([r["x"] for r in mem], [r[mode]["peak_mib"] for r in mem], "-",
                              marker="o", ms=3, color=color, label=method)
    # each figure's floor time is its median / x_floor (the matmul rate of the run that measured it)
    floor = sorted({r["x"]: r["fwd_bwd"]["median_ms"] / r["fwd_bwd"]["x_floor"] for r in rows
                    if r["fwd_bwd"] and r["fwd_bwd"]["status"] == "ok"}.items())
    if floor:
        ax_t.plot([x for x, _ in floor], [ms for _, ms in floor], "--", color="black", lw=1,
                  label="fwd+bwd FLOP floor at the measured matmul rate")
    xs = sorted({r["x"] for r in rows})
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, ylabel in ((ax_t, "ms (solid fwd+bwd, dotted fwd)"), (ax_m, "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="both", labelsize=7)
        ax.set_xlabel({"V": "V (vocab)", "N": "N (tokens)"}.get(x_name, x_name))
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)


def write(doc: dict, out_dir: Path, plots: bool = True) -> list[Path]:
    """results.json and results.md, and the plots unless plots=False. Returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(doc, indent=1, allow_nan=True) + "\n")
    md_path.write_text(markdown(doc))
    return [json_path, md_path, *(plot(doc, out_dir) if plots else [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("json", type=Path, help="a results.json written by python -m bench")
    parser.add_argument("--out", type=Path, help="output folder (default: the JSON's folder)")
    args = parser.parse_args(argv)
    for path in write(json.loads(args.json.read_text()), args.out or args.json.parent):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
