"""The routed teacher form: K teachers, and each token distils from one of them (teacher_index).

Each teacher keeps its own form (dense, sparse, vocab-parallel) and head settings: a `Member`.
This form orders the chunk loop's tokens by teacher, stably, ignored ones gathered out
(`row_order`), so each teacher's tokens are one contiguous segment of the loop; its row op hands
each chunk's rows to the members' row ops by segment. One Function, one chunk loop: the student's
logits once per token, dH, dW and db accumulated over every teacher's tokens, each token paying
its own teacher's FLOPs only (no token is projected through a head it does not use). The dense
members share one teacher-logit buffer per compute dtype: memory does not grow with K beyond the
teachers' own tensors.

The teacher tuple: (route (N,) int64, the teacher of each token; slot (N,) int64, the token's row
in its teacher's tensors; then each member's tensors: dense (hidden, weight, bias), sparse (ids,
logprobs)). A member's tensors cover every token (slot: the token's index) or only its own
tokens, compact, in token order (slot: the token's rank among them; `routes`).

The row op reads the K segment sizes once per chunk loop: a host sync inside the loop (the only
one under check_labels=False, where the custom op keeps it out of a compiled graph).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from fastkd import reference_multi
from fastkd.autograd import OUTPUTS, padded_rows
from fastkd.forms import FORMS, Deferred, Plan, TeacherForm, register
from fastkd.frontend import check_int_tensor
from fastkd.reference_multi import TeacherComponents, head_options
from fastkd.sparse import SparseTeacher
from fastkd.teachers import TeacherHead, TeacherLogprobs
from fastkd.vocab_parallel import collective_device

KD = OUTPUTS.index("kd")


def _dtype_key(dtype: torch.dtype | None) -> str:
    return "None" if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Member:
    """One teacher of a multi-teacher form: its form, its head's softcap and logit scale (the
    DistillOptions fields it overrides), and its compute dtype (None: the student's; a sparse
    teacher has no GEMM)."""

    form: TeacherForm
    softcap: float | None = None
    logit_scale: float = 1.0
    dtype: torch.dtype | None = None

    @property
    def sparse(self) -> bool:
        return isinstance(self.form, SparseTeacher)

    @property
    def arity(self) -> int:
        """Tensors this member holds in the teacher tuple."""
        return 2 if self.sparse else 3

    def options(self, opts):
        return head_options(opts, self.softcap, self.logit_scale)

    def plan(self, plan: Plan) -> Plan:
        """The member's plan under the routed form's."""
        return replace(plan, form=self.form, opts=self.options(plan.opts),
                       dtypes=(plan.dtypes[0], self.dtype or plan.dtypes[0]))

    def describe(self, tensors: tuple, dtype: torch.dtype):
        """The member as a public description (for the spec), a dense head cast to `dtype`."""
        if self.sparse:
            return TeacherLogprobs(*tensors, tail=self.form.tail)
        h, w, b = (None if x is None else x.to(dtype) for x in tensors)
        return TeacherHead(h, w, b, softcap=self.softcap, logit_scale=self.logit_scale)

    def key(self) -> str | None:
        form = self.form.op_key()
        if form is None:
            return None
        return f"{form}@{self.softcap!r}@{self.logit_scale!r}@{_dtype_key(self.dtype)}"

    @classmethod
    def from_key(cls, key: str) -> Member:
        form, softcap, scale, dtype = key.split("@")
        return cls(FORMS[form.split(":")[0]].from_op_key(form),
                   None if softcap == "None" else float(softcap), float(scale),
                   None if dtype == "None" else getattr(torch, dtype))


def split_members(members, tensors) -> list[tuple]:
    """The members' tensors, from the flat tuple after (route, slot)."""
    out, at = [], 0
    for member in members:
        out.append(tuple(tensors[at:at + member.arity]))
        at += member.arity
    return out


def is_compact(first: torch.Tensor, lead: torch.Size) -> bool:
    """Whether a teacher's tensors (first: its hidden states or ids) hold its own tokens only:
    any leading shape but the student's."""
    return first.shape[:-1] != lead


def routes(teacher_index, lead: torch.Size, compact: list[bool]):
    """(route, slot), each (N,) int64, from teacher_index: the hidden states' leading shape (a
    teacher per token) or (B,) for (B, L, ...) (a teacher per row); compact[k]: whether teacher
    k's tensors hold its own tokens only. Values are checked later (`RoutedTeachers.check`):
    here an index out of range matches no teacher."""
    check_int_tensor("teacher_index", teacher_index)
    if teacher_index.shape == lead:
        route = teacher_index.reshape(-1)
    elif len(lead) >= 2 and teacher_index.shape == lead[:1]:  # a teacher per row
        route = teacher_index.reshape(-1, 1).expand(lead[0], lead[1:].numel()).reshape(-1)
    else:
        rows = f" or {tuple(lead[:1])} (a teacher per row)" if len(lead) >= 2 else ""
        raise ValueError(f"teacher_index must have the hidden states' leading shape "
                         f"{tuple(lead)} (a teacher per token){rows}, got "
                         f"{tuple(teacher_index.shape)}")
    route = route.long()
    slot = torch.arange(route.numel(), device=route.device)
    if any(compact):  # a token's rank among its teacher's tokens
        mine = route.unsqueeze(1) == torch.arange(len(compact), device=route.device)
        rank = ((mine.long().cumsum(0) - 1) * mine).sum(1)
        compact_here = (mine & torch.tensor(compact, device=route.device)).any(1)
        slot = torch.where(compact_here, rank, slot)
    return route, slot


def member_checks(k: int, form: TeacherForm, tensors: tuple, h_s, vocab: int, opts):
    """A member form's checks of teachers[k]'s tensors (`TeacherForm.check`), every error
    naming the teacher, those on values too."""
    try:
        deferred = form.check(tensors, h_s, vocab, opts)
    except (TypeError, ValueError) as error:
        raise type(error)(f"teachers[{k}]: {error}") from error

    def named(check: Deferred) -> Deferred:
        def error() -> Exception:
            found = check.error()
            return type(found)(f"teachers[{k}]: {found}")

        return Deferred(check.count, error)

    return [named(check) for check in deferred]


def _stand_in(lead: torch.Size, device: torch.device) -> torch.Tensor:
    """What a member's check reads of the student's hidden states (their leading shape and
    device), for a compact member: its own rows. One element, expanded."""
    return torch.zeros((), device=device).expand(*lead, 1)


@register
@dataclass(frozen=True)
class RoutedTeachers(TeacherForm):
    """K teachers, one per token: teacher = (route, slot, *each member's tensors)."""

    name = "routed"
    members: tuple[Member, ...] = ()

    @property
    def reference_backend(self) -> bool:
        return all(m.form.reference_backend for m in self.members)

    @property
    def collective(self) -> bool:
        return any(m.form.collective for m in self.members)

    @property
    def native_rows(self) -> bool:
        return all(m.form.native_rows for m in self.members)

    @property
    def extra_outputs(self) -> int:
        return len(self.members)

    def op_key(self) -> str | None:
        keys = [m.key() for m in self.members]
        return None if None in keys else f"{self.name}:" + "|".join(keys)

    @classmethod
    def from_op_key(cls, key: str) -> RoutedTeachers:
        return cls(tuple(Member.from_key(k) for k in key.partition(":")[2].split("|")))

    def check(self, teacher, h_s, vocab, opts):
        route, _, *tensors = teacher
        lead, n_teachers = h_s.shape[:-1], len(self.members)
        deferred = []
        for k, (member, own) in enumerate(zip(self.members, split_members(self.members, tensors),
                                              strict=True)):
            rows = own[0].shape[:-1] if isinstance(own[0], torch.Tensor) else None
            compact = rows is not None and is_compact(own[0], lead)
            if compact and len(rows) != 1:
                raise ValueError(
                    f"teachers[{k}]: its tensors must have the hidden states' leading shape "
                    f"{tuple(lead)} (every token) or one leading dim, a row per token routed to "
                    f"it (compact), got shape {tuple(own[0].shape)}")
            deferred += member_checks(k, member.form, own, _stand_in(rows, h_s.device)
                                      if compact else h_s, vocab, member.options(opts))
            if compact:
                deferred.append(Deferred(
                    ((route == k).sum() != rows[0]).long(), lambda k=k, n=rows[0]: ValueError(
                        f"teachers[{k}] holds {n} rows (compact: one per token routed to it), "
                        f"but teacher_index routes {(route == k).sum().item()} tokens to it")))
        bad = (route < 0) | (route >= n_teachers)
        deferred.insert(0, Deferred(bad.sum(), lambda: ValueError(
            f"teacher_index must lie in [0, {n_teachers}) (one of the {n_teachers} teachers); "
            f"found {route[bad][0].item()}")))
        return deferred

    def compute_dtype(self, teacher, s_dtype):
        dtypes = [m.dtype or s_dtype for m in self.members]
        out = dtypes[0]
        for dtype in dtypes[1:]:
            out = torch.promote_types(out, dtype)
        return out

    def select(self, teacher, index):
        route, slot, *tensors = teacher
        return (route.index_select(0, index), slot.index_select(0, index), *tensors)

    def row_order(self, teacher, ignored, n_counted):
        route = teacher[0]
        key = route if ignored is None or n_counted is None else torch.where(
            ignored, len(self.members), route)  # ignored tokens last, then cut off
        order = torch.argsort(key, stable=True)
        return order if n_counted is None else order[:n_counted]

    def _widths(self, tensors, vocab, device, s_dtype=None) -> dict:
        """Per compute dtype (a member's, else s_dtype), the widest dense member's shared ids
        (sparse members: "sparse")."""
        widths = {}
        for member, own in zip(self.members, split_members(self.members, tensors), strict=True):
            group = "sparse" if member.sparse else member.dtype or s_dtype
            widths[group] = max(widths.get(group, 0), member.form.width(own, vocab, device))
        return widths

    def width(self, teacher, vocab, device):
        return sum(self._widths(teacher[2:], vocab, device).values())

    def reference(self, teacher, h_s, w_s, b_s, labels, plan: Plan):
        route, _, *tensors = teacher
        teachers = [m.describe(own, m.dtype or plan.dtypes[0]) for m, own in
                    zip(self.members, split_members(self.members, tensors), strict=True)]
        return reference_multi.routed_distill_loss(h_s, w_s, teachers,
                                                   route.reshape(h_s.shape[:-1]), labels,
                                                   plan.opts, b_s)

    def components(self, out, call):
        """Each teacher's kd over its own counted tokens (`TeacherComponents`)."""
        route, labels, opts = call.teacher[0], call.labels, call.plan.opts
        valid = (torch.ones_like(route, dtype=torch.bool) if labels is None
                 else labels != opts.ignore_index)
        tokens = reference_multi.teacher_tokens(route, valid, len(self.members))
        kd = torch.stack(out[len(OUTPUTS):], -1)
        if opts.reduction == "mean":  # the Function's mean is over every counted token
            kd = kd * valid.sum() / tokens.clamp(min=1)
        return TeacherComponents(*out[:len(OUTPUTS)], kd, tokens)

    def rows(self, teacher, labels, row_scale, out, plan: Plan, grads, vocab):
        route, slot, *tensors = teacher
        n_teachers = len(self.members)
        # the segments, one host sync; an index out of range (check_labels=False) is an error
        counts = torch.cat([torch.bincount(route.clamp(0, n_teachers - 1), minlength=n_teachers),
                            ((route < 0) | (route >= n_teachers)).sum().reshape(1)]).tolist()
        if counts[-1]:
            raise ValueError(f"teacher_index must lie in [0, {n_teachers})")
        own = split_members(self.members, tensors)
        s_dtype = plan.dtypes[0]
        buffers = {dtype: padded_rows(min(plan.chunk, max(counts[:-1])), width, dtype,
                                      route.device)
                   for dtype, width in self._widths(tensors, vocab, route.device, s_dtype).items()
                   if dtype != "sparse"}
        staged = torch.empty(len(route), len(OUTPUTS), device=out.device, dtype=out.dtype)
        out[:, len(OUTPUTS):].zero_()
        segments, start = [], 0
        for k, (member, count) in enumerate(zip(self.members, counts, strict=False)):
            if count == 0:
                continue
            end = start + count
            kw = {} if member.sparse else {"t_buf": buffers[member.dtype or s_dtype]}
            op = member.form.rows(member.form.select(own[k], slot[start:end]),
                                  None if labels is None else labels[start:end],
                                  row_scale[start:end], staged[start:end], member.plan(plan),
                                  grads, vocab, **kw)
            segments.append((k, start, end, op))
            start = end

        def rows(i0, i1, s):
            for k, start, end, op in segments:
                j0, j1 = max(i0, start), min(i1, end)
                if j0 < j1:
                    op(j0 - start, j1 - start, s[j0 - i0:j1 - i0])
                    out[j0:j1, len(OUTPUTS) + k] = staged[j0:j1, KD]
            out[i0:i1, :len(OUTPUTS)] = staged[i0:i1]

        return rows

    def student_grad(self, dh):
        collective = [m.form for m in self.members if m.form.collective]
        return collective[0].student_grad(dh) if collective else dh

    def agree(self, call):
        """Vocab-parallel members: each member's agreement (`fastkd.vocab_parallel.agree`: its
        shards tile the vocabulary, the tokens, labels, chunk and options match), then one
        all-gather of the tokens routed to each teacher, which fix the segments and so the
        collectives every chunk runs: the same error on every rank when any differs."""
        if isinstance(call, Exception):
            return self.members[0].form.agree(call)  # raises the first failure everywhere
        route, _, *tensors = call.teacher
        agreed = call
        for member, own in zip(self.members, split_members(self.members, tensors), strict=True):
            sub = replace(call, plan=replace(call.plan, form=member.form), teacher=own)
            agreed = member.form.agree(sub)
        group = self.members[0].form.group
        # the tokens per teacher, and sum_i i route_i (exact in float64 below 2^53: a swap of two
        # tokens' teachers changes it)
        counts = torch.bincount(route.clamp(0, len(self.members) - 1), minlength=len(self.members))
        digest = (torch.arange(len(route), device=route.device) * route).sum().reshape(1)
        mine = torch.cat([counts, digest]).double().to(collective_device(group))
        table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(table, mine, group=group)
        if any(not torch.equal(row, table[0]) for row in table):
            raise ValueError("vocab-parallel loss: every rank must route the same tokens to the "
                             "same teachers; tokens per teacher by rank: "
                             f"{[row[:-1].long().tolist() for row in table]}")
        return replace(call, plan=replace(call.plan, chunk=agreed.plan.chunk),
                       vocab=agreed.vocab, label_range=agreed.label_range)
