"""Several teachers in `FusedKDTrainer` and `FusedDistillationTrainer` (docs/integrations.md,
"Several teachers"): the teachers as a trainer is given them (`teacher_model=[...]`, or a dict
{name: model}), how each token finds its teacher, the checks of both, a data collator that keeps
each row's teacher, and the teachers' side of `FusedKDTrainer`'s loss (`teachers_at`).

    routed   each row names its teacher in its `teacher_id` column (a position in the list, or a
             name of the dict): each teacher's model runs on its own rows only, and one
             `fastkd.multi_teacher_distill` call takes them all (teacher_index, compact teachers)
    mixed    teacher_weights, K floats summing to 1: every teacher runs on every row, and each
             token's loss is sum_k w_k D(p_k || q) (`fastkd.multi_teacher_distill`'s mixture)

One teacher in a list (or a dict of one) is the single-teacher trainer; the trainers call
`several_teachers` to tell.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fastkd.mixture import check_mixture_size
from fastkd.models import LMHead, head_weight_and_bias, lm_head, load_teacher
from fastkd.teachers import TeacherHead

__all__ = ["TEACHER_ID", "RoutedCollator", "TeacherRouting", "check_datasets", "check_mixable",
           "load_teachers", "several_teachers", "teachers_at"]

TEACHER_ID = "teacher_id"  # the dataset column naming each row's teacher (TRL PR #7215's name)


@dataclass(frozen=True)
class TeacherRouting:
    """How a batch's tokens find their teachers. names: what a row's teacher_id may hold, one per
    teacher in order (a list's positions 0..K-1, or a dict's keys); weights: None (each row names
    its teacher) or, for a mixture on every token, K floats >= 0 summing to 1."""

    names: tuple
    weights: tuple[float, ...] | None = None

    @property
    def routed(self) -> bool:
        return self.weights is None

    def label(self, k: int) -> str:
        """Teacher k as messages name it: by its name (a dict's), or its position in the list."""
        listed = self.names == tuple(range(len(self.names)))
        return f"teachers[{k}]" if listed else f"teacher {self.names[k]!r}"

    def index(self, value, where: str) -> int:
        """The position of the teacher a teacher_id value names; a ValueError naming `where` (the
        dataset and row, or the batch and row) when it names none. One teacher takes rows that
        name none."""
        if value is None:
            if len(self.names) == 1:
                return 0
            raise ValueError(f"{where} has no {TEACHER_ID}: with {len(self.names)} teachers every "
                             f"row names the one it distils from ({_listed(self.names)}), or "
                             "teacher_weights mixes them on every token")
        if hasattr(value, "item") and not isinstance(value, (str, int)):
            value = value.item()  # a tensor or numpy scalar
        if not isinstance(value, bool) and isinstance(value, (int, str)) and value in self.names:
            return self.names.index(value)
        raise ValueError(f"{where}: {TEACHER_ID} {value!r} is not one of the {len(self.names)} "
                         f"teachers ({_listed(self.names)})")


def _listed(names: tuple) -> str:
    return ", ".join(repr(n) for n in names)


def several_teachers(teacher_model, teacher_models, teacher_weights):
    """(sources, TeacherRouting) from a trainer's teacher arguments, or None for one teacher given
    as itself (a model or a path: the single-teacher trainer). teacher_model: a model, a path, a
    list of them or a dict {name: model or path}; teacher_models: the list or dict under TRL PR
    #7215's name (one of the two); teacher_weights: None, or K weights (a sequence, a (K,) tensor,
    or a dict by name) mixing the teachers on every token."""
    if teacher_models is not None:
        if teacher_model is not None:
            raise ValueError("pass only one of teacher_model and teacher_models")
        if not isinstance(teacher_models, (list, tuple, dict)):
            raise TypeError(f"teacher_models must be a list or a dict {{name: model or path}}, "
                            f"got {type(teacher_models).__name__}")
        teacher_model = teacher_models
    if not isinstance(teacher_model, (list, tuple, dict)):
        if teacher_weights is not None:
            raise ValueError("teacher_weights mixes several teachers: pass teacher_model as a "
                             "list (or a dict {name: model})")
        return None
    if isinstance(teacher_model, dict):
        names, sources = tuple(teacher_model), list(teacher_model.values())
        for name in names:
            if isinstance(name, bool) or not isinstance(name, (int, str)):
                raise TypeError(f"teacher names (the dict's keys) must be str or int, got {name!r}")
    else:
        names, sources = tuple(range(len(teacher_model))), list(teacher_model)
    if not sources:
        raise ValueError("no teachers: the teacher list is empty")
    for name, source in zip(names, sources, strict=True):
        if not isinstance(source, (str, torch.nn.Module)):
            raise TypeError(f"teacher {name!r} must be a causal LM or a path / hub id, got "
                            f"{type(source).__name__}")
    return sources, TeacherRouting(names, _weights(teacher_weights, names))


def _weights(weights, names: tuple) -> tuple[float, ...] | None:
    """teacher_weights as K floats in the teachers' order, checked: >= 0, summing to 1 within K
    fp32 eps (the loss's tolerance), at most 4 teachers (the mixture's)."""
    if weights is None:
        return None
    if isinstance(weights, Mapping):
        if set(weights) != set(names):
            raise ValueError(f"teacher_weights names {sorted(map(repr, weights))}, the teachers "
                             f"are {_listed(names)}: give each teacher one weight")
        weights = [weights[name] for name in names]
    elif isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    weights = list(weights)
    if len(weights) != len(names):
        raise ValueError(f"teacher_weights has {len(weights)} weights for {len(names)} teachers")
    check_mixture_size(len(names))
    for k, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or math.isinf(w):
            raise ValueError(f"teacher_weights[{k}] must be a finite number >= 0, got {w!r}")
    if abs(sum(weights) - 1) > len(weights) * torch.finfo(torch.float32).eps:
        raise ValueError(f"teacher_weights must sum to 1, got {weights} (sum {sum(weights):.9g})")
    return tuple(float(w) for w in weights)


def _readable_ids(dataset):
    """The teacher_id of every row of a dataset that can be read now: a list (None where a row has
    none), or None for a lazy dataset (checked batch by batch: `RoutedCollator`)."""
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return list(dataset[TEACHER_ID]) if TEACHER_ID in dataset.column_names else None
    if isinstance(dataset, (list, tuple)):
        return [row.get(TEACHER_ID) if isinstance(row, Mapping) else None for row in dataset]
    return None


def _named(train_dataset, eval_dataset) -> dict:
    named = {"train_dataset": train_dataset}
    if isinstance(eval_dataset, dict):
        named.update({f"eval_dataset[{k!r}]": v for k, v in eval_dataset.items()})
    else:
        named["eval_dataset"] = eval_dataset
    return {k: v for k, v in named.items() if v is not None}


def check_datasets(routing: TeacherRouting, train_dataset, eval_dataset) -> None:
    """Each row's teacher_id, when the trainer is built, in every dataset that can be read then
    (a `datasets.Dataset`, a list of rows): a ValueError naming the dataset, the column and the
    row. A mixture refuses a teacher_id column (it would be ignored)."""
    for name, dataset in _named(train_dataset, eval_dataset).items():
        columns = getattr(dataset, "column_names", None)
        ids = _readable_ids(dataset)
        has_column = (columns is not None and TEACHER_ID in columns) or (
            ids is not None and any(i is not None for i in ids))
        if not routing.routed:
            if has_column:
                raise ValueError(f"{name} has a {TEACHER_ID} column, but teacher_weights mixes "
                                 "every teacher on every token and would ignore it: drop the "
                                 "column or the weights")
            continue
        if len(routing.names) > 1 and columns is not None and TEACHER_ID not in columns:
            raise ValueError(f"{name} has no {TEACHER_ID!r} column: with {len(routing.names)} "
                             "teachers each row names the one it distils from "
                             f"({_listed(routing.names)}), or teacher_weights mixes them; "
                             f"its columns: {list(columns)}")
        for i, value in enumerate(ids or ()):
            routing.index(value, f"{name} row {i}")


class RoutedCollator:
    """A trainer's data collator with each row's teacher kept: the wrapped collator gets the rows
    without their teacher_id, and the batch gains `teacher_id`, the teachers' positions: (B,), a
    row each, or (1, T), a token each, when the collator packs the rows into one
    (`DataCollatorWithFlattening`). A row whose teacher_id names no teacher is a ValueError naming
    the batch (counted by this process: each DataLoader worker counts its own) and the row."""

    def __init__(self, collator, routing: TeacherRouting):
        self.collator, self.routing, self.batches = collator, routing, 0

    def __call__(self, rows: list) -> dict:
        self.batches += 1
        where = f"batch {self.batches} (counted by the process reading the data)"
        route = torch.tensor([self.routing.index(row.get(TEACHER_ID), f"{where}, row {i}")
                              for i, row in enumerate(rows)], dtype=torch.long)
        batch = self.collator([{k: v for k, v in row.items() if k != TEACHER_ID}
                               for row in rows])
        ids = batch["input_ids"]
        if ids.shape[0] == len(rows):
            batch[TEACHER_ID] = route
            return batch
        lengths = torch.tensor([len(row["input_ids"]) for row in rows])
        if ids.shape[0] != 1 or ids.shape[1] != int(lengths.sum()):
            raise ValueError(f"the data collator made input_ids of shape {tuple(ids.shape)} from "
                             f"{len(rows)} rows: neither a row each nor the rows packed into one, "
                             "so the rows' teachers cannot follow them")
        batch[TEACHER_ID] = route.repeat_interleave(lengths).unsqueeze(0)
        return batch


def load_teachers(sources: list, routing: TeacherRouting, device, dtype) -> list:
    """The teachers as `FusedKDTrainer` holds its one (`fastkd.models.load_teacher`): loaded (a
    path or hub id), on `device`, in `dtype`, frozen, in eval mode, each error naming the
    teacher."""
    return [load_teacher(source, dtype, device, role=routing.label(k)).model
            for k, source in enumerate(sources)]


def check_mixable(routing: TeacherRouting, student_vocab: int, heads: list) -> None:
    """A mixture compares one student distribution with every teacher's, over the K = min(V, V_t)
    ids they share, in one dtype: the teachers' output layers (heads) must agree on both."""
    if routing.routed:
        return
    shared = [min(student_vocab, h.weight.shape[0]) for h in heads]
    dtypes = [h.weight.dtype for h in heads]
    if len(set(shared)) > 1 or len(set(dtypes)) > 1:
        raise ValueError(f"teacher_weights mixes teachers over the ids they share with the "
                         f"student, in one dtype: got {shared} shared ids and dtypes "
                         f"{[str(d) for d in dtypes]} by teacher; route the rows with a "
                         f"{TEACHER_ID} column instead, or give the teachers one vocabulary size "
                         "and dtype")


def _take(name: str, value, keep: torch.Tensor, dim: int):
    """A model input restricted to one teacher's rows (dim 0) or packed tokens (dim 1)."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.dim() <= dim or value.shape[dim] != keep.numel():
        raise ValueError(f"the batch's {name!r} (shape {tuple(value.shape)}) has no row (or, "
                         "packed, no token) per routed unit: several teachers cannot split it")
    return value[keep] if dim == 0 else value[:, keep]


def _hidden_states(head: LMHead, inputs: dict) -> torch.Tensor:
    """The (B, L, D_t) hidden states a teacher's output layer receives on `inputs` (every model
    input of the batch, as its own forward passes them to its base), its logits never formed."""
    with torch.no_grad():
        return head.base(**inputs, use_cache=False).last_hidden_state


def _teacher_head(k: int, teacher, routing: TeacherRouting, inputs: dict, route) -> TeacherHead:
    """Teacher k as the multi-teacher loss takes it, at the (B, L-1) next-token positions: its
    hidden states on its own rows (packed: its tokens) in token order, compact (routed), or on
    every position (mixed); its head, with that head's softcap and logit scale."""
    head = lm_head(teacher, routing.label(k), probe=False)
    with torch.no_grad():
        weight, bias = head_weight_and_bias(teacher.get_output_embeddings())
    empty = weight.new_empty(0, weight.shape[1])
    if route is None:
        hidden = _hidden_states(head, inputs)[:, :-1]
    elif route.dim() == 1:  # a teacher per row
        rows = route == k
        hidden = empty if not bool(rows.any()) else _hidden_states(
            head, {n: _take(n, v, rows, 0) for n, v in inputs.items()})[:, :-1].flatten(0, 1)
    else:  # one packed row, a teacher per token: its sequences, packed on their own
        tokens = route[0] == k
        n = int(tokens[:-1].sum())  # its next-token positions: its tokens but the row's last
        hidden = empty if not bool(tokens.any()) else _hidden_states(
            head, {name: _take(name, v, tokens, 1) for name, v in inputs.items()})[0, :n]
    return TeacherHead(hidden, weight.detach(), None if bias is None else bias.detach(),
                       softcap=head.softcap, logit_scale=head.logit_scale)


def teachers_at(teachers: list, routing: TeacherRouting, inputs: dict, route):
    """The teachers of one `transformers.Trainer` batch as `fastkd.multi_teacher_distill` takes
    them, at its (B, L-1) next-token positions: (TeacherHeads, teacher_index, teacher_weights).
    inputs: the models' inputs (`model_inputs`); route: the batch's `teacher_id` ((B,) a teacher
    per row, or (1, T) per token of a packed row: `RoutedCollator`), None for a mixture.
    Routed, teacher k runs on its own rows only (packed: its own sequences, packed on their own);
    mixed, every teacher on the whole batch."""
    if routing.routed and route is None:
        raise ValueError(f"several teachers are routed by the batch's {TEACHER_ID!r}, which this "
                         "batch lacks (the trainer's data collator adds it: RoutedCollator)")
    heads = [_teacher_head(k, teacher, routing, inputs, route)
             for k, teacher in enumerate(teachers)]
    device = inputs["input_ids"].device
    if not routing.routed:
        return heads, None, torch.tensor(routing.weights, dtype=torch.float32, device=device)
    route = route.to(device)
    return heads, route if route.dim() == 1 else route[:, :-1], None
