"""Several teachers in the trainer (`fastkd distill --teacher NAME=PATH ...`; the rules:
fastkd.teacher_set): the rows with each token's teacher and the cached teachers' targets
(`TeacherRows`, `TeachersBlocks`), the teachers of a run (`Teachers`: resident ones wrapped as the
one teacher is, caches checked against the token store), and one batch's teachers as
`fastkd.multi_teacher_distill` takes them (`Teachers.heads`).

Routing is per token (the token store's `teacher` column, fastkd.prepare): a resident teacher runs
on the rows that hold any of its tokens, and its hidden states fill those rows of a (B, L-1, D_t)
tensor (the other rows are zeros no token of it reads); a cached teacher's targets are read for
the batch's rows. A mixture runs every teacher on every row. Each teacher's held-out KL is
`eval_kd_NAME` in the log and a column of the report: over the tokens routed to it (routing), over
every token (a mixture).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastkd import distributed, fsio
from fastkd.cache import CacheRows, TeacherCache, sparse_tail
from fastkd.cache_format import counted_positions
from fastkd.config import DistillConfig
from fastkd.data import Blocks, DiskRows
from fastkd.report import plot_losses
from fastkd.teacher_set import check_routing
from fastkd.teachers import TeacherHead, TeacherLogprobs


@dataclass
class TeachersBlocks(Blocks):
    """Rows whose `teacher` is each token's teacher index in the run (None: a mixture), with the
    cached teachers' targets, read when loaded: ((k, CacheRows), ...)."""

    cached: tuple = ()

    def select(self, index: torch.Tensor) -> TeachersBlocks:
        return dataclasses.replace(super().select(index), cached=tuple(
            (k, rows.select(index)) for k, rows in self.cached))


class TeacherRows(DiskRows):
    """One split of a token store's rows (its `StoredRows`), their store codes turned into the
    run's teacher indices (lookup), and each cache's targets for the same sequences."""

    def __init__(self, rows: DiskRows, split: str, lookup: torch.Tensor | None,
                 caches: dict[int, TeacherCache], index: torch.Tensor | None = None):
        super().__init__(index)
        self.rows, self.split, self.lookup, self.caches = rows, split, lookup, caches

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def packed(self) -> bool:
        return self.rows.packed

    def read(self, rows: torch.Tensor) -> TeachersBlocks:
        blocks = self.rows.take(rows)
        fields = {f.name: getattr(blocks, f.name) for f in dataclasses.fields(Blocks)}
        fields["teacher"] = None if self.lookup is None else self.lookup[blocks.teacher]
        counted = counted_positions(blocks)
        return TeachersBlocks(**fields, cached=tuple(
            (k, CacheRows(cache, self.split, rows, counted)) for k, cache in self.caches.items()))


def open_caches(config: DistillConfig, tokenizer, train: DiskRows, heldout: DiskRows
                ) -> dict[int, tuple[TeacherCache, str]]:
    """{teacher index: (its cache, the sparse tail)}: each checked as the one cache is, and
    refused, named, unless it covers the token store's sequences (the same split sizes)."""
    caches = {}
    for k, name in enumerate(config.teacher_names):
        directory = (config.teacher_caches or {}).get(name)
        if directory is None:
            continue
        cache = TeacherCache(directory)
        cache.check_run(tokenizer, config.seq_len, config.temperature, config.eval_fraction,
                        config.data)
        cache.check_options(packing=config.packing, utf8_errors=config.utf8_errors)
        cache.check_student(config.student)
        if name in (config.teachers or {}):
            cache.check_teacher(config.teachers[name])
        for split, rows in (("train", train), ("heldout", heldout)):
            if cache.sequences(split) != len(rows):
                raise ValueError(f"teacher cache {name!r} ({directory}) holds "
                                 f"{cache.sequences(split)} {split} sequences, the run's data "
                                 f"{len(rows)}: it does not cover the same sequences; build it "
                                 "with `fastkd cache-teacher` on the run's data and options")
        caches[k] = cache, sparse_tail(config.cache_tail, cache.mode, config.divergence)
    return caches


def teacher_rows(config: DistillConfig, train, heldout, caches: dict) -> tuple:
    """(train, held-out) as TeacherRows: the store's codes as the run's teacher indices (routing;
    every example's teacher checked, `check_routing`), the caches' targets beside."""
    lookup = None
    if config.teacher_weights is None:
        routing = train.store.manifest["routing"]
        check_routing(routing, config.teacher_names)
        # code 0 (padding): any teacher, as no token there counts
        lookup = torch.tensor([0] + [config.teacher_names.index(n) for n in routing["names"]])
    by_index = {k: cache for k, (cache, _) in caches.items()}
    return (TeacherRows(train, "train", lookup, by_index),
            TeacherRows(heldout, "heldout", lookup, by_index))


@dataclass
class Teachers:
    """A run's K teachers: resident ones' forwards {k: TeacherForward, maybe wrapped}, cached
    ones' tails {k: tail}, their names, and the mixture's weights (None: routed)."""

    modules: dict
    tails: dict
    names: list[str]
    weights: tuple[float, ...] | None

    def heads(self, batch: TeachersBlocks, inputs: dict, device: torch.device):
        """(teachers, teacher_index, teacher_weights) of one batch for the multi-teacher loss."""
        route = batch.teacher
        heads = [None] * len(self.names)
        for k, rows in batch.cached:
            ids, logprobs = rows.load()
            heads[k] = TeacherLogprobs(ids.to(device), logprobs.to(device), tail=self.tails[k])
        for k, module in self.modules.items():
            mine = (torch.ones(len(batch), dtype=torch.bool) if route is None
                    else (route[:, :-1] == k).any(1))
            heads[k] = _hidden(module, inputs, mine)
        if route is None:
            return heads, None, torch.tensor(self.weights, dtype=torch.float32, device=device)
        return heads, route[:, :-1].to(device), None


def _hidden(module, inputs: dict, mine: torch.Tensor) -> TeacherHead:
    """A resident teacher on its rows (`mine`, (B,) bool), its hidden states in a (B, L-1, D_t)
    tensor, zeros in the other rows. Under torchrun every rank calls each teacher's forward
    (FSDP gathers its weights in it), on one row when it has none of its own."""
    shape = inputs["input_ids"].shape
    if not bool(mine.any()) and not distributed.is_distributed():
        out = module.model.get_output_embeddings()
        w, b = out.weight.detach(), out.bias
        hidden = w.new_zeros(shape[0], shape[1] - 1, w.shape[1])
    else:
        run = mine if bool(mine.any()) else torch.arange(len(mine)) == 0
        with torch.no_grad():
            h, w, b = module({name: v[run.to(v.device)] for name, v in inputs.items()})
        hidden = h.new_zeros(len(mine), *h.shape[1:])
        if bool(mine.any()):
            hidden[mine.to(h.device)] = h
    return TeacherHead(hidden, w, None if b is None else b.detach(), softcap=module.softcap,
                       logit_scale=module.logit_scale)


def write_teachers_report(config: DistillConfig, run_dir: Path, results: dict) -> dict:
    """The report of a run with several teachers: each student's final held-out KL to each
    teacher and its held-out CE (report.md, report.json: a row per student and teacher), and the
    loss curves (loss_curve.png, fastkd.report's)."""
    students = [("distilled student", results["history"])]
    if results.get("baseline_history"):
        students.append(("hard-label student (same budget)", results["baseline_history"]))
    finals = {model: next(r for r in reversed(history) if "eval_ce" in r)
              for model, history in students}
    rows = [{"model": model, "teacher": name, "kl_to_teacher": final.get(f"eval_kd_{name}"),
             "eval_ce": final["eval_ce"]}
            for model, final in finals.items() for name in config.teacher_names]
    png = plot_losses(results, None, config.temperature, run_dir / "loss_curve.png")
    lines = ["# fastkd report: several teachers", "",
             f"Held-out KL(teacher || student) at T = {config.temperature:g}, per teacher "
             "(routing: over its own tokens; a mixture: over every token), and the held-out "
             "cross-entropy.", "",
             "| model | " + " | ".join(f"KL to {name}" for name in config.teacher_names)
             + " | held-out CE |", "|---" * (len(config.teacher_names) + 2) + "|"]
    lines += [f"| {model} | " + " | ".join(_number(final.get(f"eval_kd_{name}"))
                                           for name in config.teacher_names)
              + f" | {final['eval_ce']:.4f} |" for model, final in finals.items()]
    lines += ["", "![loss curves](loss_curve.png)"]
    fsio.atomic_write_text(run_dir / "report.md", "\n".join(lines) + "\n")
    fsio.atomic_write_text(run_dir / "report.json", json.dumps({"rows": rows}, indent=2))
    return {"md": str(run_dir / "report.md"), "json": str(run_dir / "report.json"),
            "png": str(png), "rows": rows}


def _number(value: float | None) -> str:
    return "n/a (no token routed to it)" if value is None else f"{value:.4f}"
