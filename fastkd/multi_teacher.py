"""The multi-teacher loss with its options as one `DistillOptions` (`multi_teacher_loss`, public as
`fastkd.multi_teacher_distill`): from the public teacher descriptions (`fastkd.teachers`) and
the routing or mixture arguments to one teacher form and its tensors, then the shared front-end
(`fastkd.frontend.fused_loss`):

    one teacher, neither teacher_index nor teacher_weights   its own form: the single-teacher
                                                              loss, bit for bit
    teacher_index (each token one teacher)                    `fastkd.routed.RoutedTeachers`
    teacher_weights (every token all of them, K <= 4 dense)   `fastkd.mixture.MixedTeachers`
"""

from __future__ import annotations

import torch

from fastkd.checks import choice
from fastkd.dense import DenseTeacher
from fastkd.frontend import check_tensor, fused_loss, model_dtype
from fastkd.mixture import MixedTeachers, check_mixture_size
from fastkd.options import DistillOptions
from fastkd.reference_multi import TeacherComponents, teacher_tokens
from fastkd.routed import Member, RoutedTeachers, is_compact, routes
from fastkd.sparse import SparseTeacher
from fastkd.teachers import TeacherHead, TeacherLogprobs, check_teachers
from fastkd.vocab_parallel import VocabParallelTeacher, agree

MIXTURES = ("divergences", "ensemble")
# set per teacher, on its TeacherHead (a TeacherLogprobs has them in its log-probabilities)
TEACHER_OPTIONS = ("teacher_softcap", "teacher_logit_scale")


def _head_dtype(k: int, head: TeacherHead) -> torch.dtype:
    """teachers[k]'s compute dtype (`fastkd.frontend.model_dtype`), its tensors' types checked
    first so a wrong one is named."""
    check_tensor(f"teachers[{k}].hidden", head.hidden)
    check_tensor(f"teachers[{k}].weight", head.weight, 2)
    if head.bias is not None:
        check_tensor(f"teachers[{k}].bias", head.bias, 1)
    return model_dtype(f"teachers[{k}]", head.tensors(), head.hidden.device.type)


def member(k: int, teacher, process_group, vocab_start: int) -> Member:
    """teachers[k] as a member of a multi-teacher form (vocab-parallel under a process group)."""
    if isinstance(teacher, TeacherLogprobs):
        if process_group is not None:
            raise ValueError(f"teachers[{k}] is a TeacherLogprobs: a sparse teacher's ids are "
                             "global, it has no vocab-parallel form (process_group)")
        return Member(SparseTeacher(teacher.tail))
    form = (DenseTeacher() if process_group is None
            else VocabParallelTeacher(process_group, vocab_start))
    return Member(form, teacher.softcap, teacher.logit_scale, _head_dtype(k, teacher))


def _routed(teachers, teacher_index, lead, process_group, vocab_start):
    members = tuple(member(k, t, process_group, vocab_start) for k, t in enumerate(teachers))
    compact = [isinstance(t.tensors()[0], torch.Tensor) and is_compact(t.tensors()[0], lead)
               for t in teachers]
    route, slot = routes(teacher_index, lead, compact)
    return RoutedTeachers(members), (route, slot, *(x for t in teachers for x in t.tensors()))


def _mixed(teachers, teacher_weights, mixture, process_group):
    check_mixture_size(len(teachers))
    for k, teacher in enumerate(teachers):
        if not isinstance(teacher, TeacherHead):
            raise ValueError(f"teacher_weights mixes dense teachers (TeacherHead) only: "
                             f"teachers[{k}] is a {type(teacher).__name__} (route its tokens with "
                             "teacher_index instead)")
    if process_group is not None:
        raise ValueError("teacher_weights: mixtures are not vocab-parallel (process_group); "
                         "routing (teacher_index) is")
    heads = tuple((t.softcap, t.logit_scale) for t in teachers)
    return (MixedTeachers(heads, mixture == "ensemble"),
            (teacher_weights, *(x for t in teachers for x in t.tensors())))


def form_for(teachers, lead, teacher_index, teacher_weights, mixture, process_group, vocab_start):
    """(form, its tensors, the one teacher's `Member` or None) for the call; a ValueError for an
    argument that does not fit."""
    if teacher_index is not None and teacher_weights is not None:
        raise ValueError("pass teacher_index (each token one teacher) or teacher_weights (every "
                         "token a mixture), not both")
    if mixture != "divergences" and teacher_weights is None:
        raise ValueError(f"mixture={mixture!r} needs teacher_weights (a mixture of teachers)")
    if teacher_index is not None:
        return (*_routed(teachers, teacher_index, lead, process_group, vocab_start), None)
    if teacher_weights is not None:
        return (*_mixed(teachers, teacher_weights, mixture, process_group), None)
    if len(teachers) > 1:
        raise ValueError(f"{len(teachers)} teachers: pass teacher_index (which teacher each "
                         "token distils from) or teacher_weights (a mixture on every token)")
    one = member(0, teachers[0], process_group, vocab_start)
    return one.form, teachers[0].tensors(), one


def _as_teacher_components(out, n: int, labels, opts: DistillOptions) -> TeacherComponents:
    """One teacher's `Components` over n tokens as a `TeacherComponents` (its kd is the
    teacher's)."""
    valid = torch.ones(n, dtype=torch.bool, device=out.kd.device)
    if labels is not None:
        valid = labels.reshape(-1) != opts.ignore_index
    kd = out.kd.unsqueeze(-1)
    return TeacherComponents(*out.columns(), kd if opts.reduction == "none" else kd.reshape(1),
                             teacher_tokens(None, valid, 1))


def _prepare(student_hidden, teachers, opts, teacher_index, teacher_weights, mixture,
             process_group, vocab_start):
    """The checks of the multi-teacher arguments, then `form_for`."""
    teachers = check_teachers(teachers)
    choice("mixture", mixture, MIXTURES)
    if opts.teacher_softcap is not None or opts.teacher_logit_scale != 1.0:
        raise ValueError("the multi-teacher loss takes each teacher's softcap and logit scale on "
                         "its TeacherHead (softcap=, logit_scale=): leave DistillOptions' "
                         "teacher_softcap and teacher_logit_scale unset")
    if process_group is None and vocab_start != 0:
        raise ValueError(f"vocab_start={vocab_start!r} needs a process_group (vocab-parallel)")
    check_tensor("student_hidden", student_hidden)
    return form_for(teachers, student_hidden.shape[:-1], teacher_index, teacher_weights, mixture,
                    process_group, vocab_start)


def multi_teacher_loss(student_hidden, student_weight, teachers, labels, opts: DistillOptions, *,
                       teacher_index=None, teacher_weights=None, mixture="divergences",
                       student_bias=None, return_components=False, backend="auto",
                       chunk_size=None, check_labels=True, process_group=None, vocab_start=0):
    """`fastkd.fused_multi_teacher_loss` with the options as one `DistillOptions`; its teacher
    softcap and logit scale must be unset (they are per teacher, on each `TeacherHead`)."""
    try:
        form, tensors, one = _prepare(student_hidden, teachers, opts, teacher_index,
                                      teacher_weights, mixture, process_group, vocab_start)
    except (TypeError, ValueError) as error:
        if process_group is None:
            raise
        agree(process_group, error)  # the other ranks are in their agreement: raise everywhere
    if one is not None:  # one teacher, its own form: its head settings as the options'
        opts = one.options(opts)
    out = fused_loss(form, (student_hidden, student_weight, student_bias), tensors, labels, opts,
                     backend=backend, chunk_size=chunk_size, check_labels=check_labels,
                     return_components=return_components)
    if return_components and not isinstance(out, TeacherComponents):
        out = _as_teacher_components(out, student_hidden.shape[:-1].numel(), labels, opts)
    return out
