"""What the benchmark measures: loss cases, the distillation heads of real model pairs, and sweeps.

A head is the last layer of a teacher/student pair: student width D_s, teacher width D_t, student
vocab V, teacher vocab V_t (K = min(V, V_t) ids are shared: the divergence runs over K ids, CE over
V) and the final-logit softcap. A Shape is one head at N tokens, a share of them labelled
ignore_index (10% by default, as prompt tokens would be). Each head is swept over N; one more
sweep ("vocab") runs over V at a fixed N with the Llama head's widths, and one ("counted") over the
share of ignored tokens at that N: ignored tokens cost fastkd nothing, so its time should follow
the counted tokens.

The FLOP floor is the matmul work no method can skip (the softmax work is O(N V), not O(N V D)),
over the N_c counted tokens (ignored ones need nothing):
    forward:           2 N_c (V D_s + K D_t)          student and teacher logits
    forward+backward:  2 N_c (3 V D_s + K D_t)        plus dH = G W_s and dW_s = G^T H_s
With K = V that is the familiar 2 N V (3 D_s + D_t). The CE-only case has no teacher term, nor
has the sparse case (`fastkd.fused_sparse_distill_loss` on the teacher's top-k ids, as a teacher
cache holds them: no teacher GEMM, floor 2 N_c V 3 D_s). The `floor` method times those GEMMs
alone in the same run, the measured floor the CPU tables divide by.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastkd import DistillOptions


@dataclass(frozen=True)
class Head:
    """One distillation head: the LM-head sizes of a teacher -> student pair."""

    name: str
    title: str
    d_s: int
    d_t: int
    v: int
    v_t: int
    softcap: float | None = None

    def scaled(self, d_div: int, v_div: int) -> Head:
        """The same head with widths divided by d_div and vocabularies by v_div (CPU-sized)."""
        return replace(
            self, title=f"{self.title} (D /{d_div}, V /{v_div} for CPU)",
            d_s=max(1, self.d_s // d_div), d_t=max(1, self.d_t // d_div),
            v=max(1, self.v // v_div), v_t=max(1, self.v_t // v_div),
        )


PRESETS: dict[str, Head] = {
    "llama": Head("llama", "Llama-3.1-8B -> Llama-3.2-1B", d_s=2048, d_t=4096, v=128256,
                  v_t=128256),
    # Qwen2.5-7B pads its vocabulary to 152064 rows; the 0.5B student has 151936.
    "qwen": Head("qwen", "Qwen2.5-7B -> Qwen2.5-0.5B", d_s=896, d_t=3584, v=151936, v_t=152064),
    "gemma": Head("gemma", "Gemma-2-9B -> Gemma-2-2B", d_s=2304, d_t=3584, v=256000, v_t=256000,
                  softcap=30.0),
}
CPU_D_DIV, CPU_V_DIV = 16, 32  # CPU heads: D <= 256, V <= 8000

# The CPU floor grid (`--grid floor`, issue 31): heads as they are (no scaling), D_s = 256,
# D_t = 512 (Llama-3's widths / 8), Llama-2's and Llama-3's vocabularies, three token counts;
# every divergence alone, CE alone and the sparse loss, forward + backward.
FLOOR_HEADS = (Head("v32k", "D_s 256, D_t 512, V 32000", d_s=256, d_t=512, v=32000, v_t=32000),
               Head("v128k", "D_s 256, D_t 512, V 128256", d_s=256, d_t=512, v=128256,
                    v_t=128256))
FLOOR_N = (512, 2048, 8192)
FLOOR_CASES = ("kd", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "ce", "sparse")

# Default sweeps per device type, (full, quick).
N_SWEEP = {
    "cuda": ((1024, 2048, 4096, 8192, 16384, 32768), (1024, 4096, 16384)),
    "cpu": ((64, 128, 256), (64, 256)),
}
V_SWEEP = {
    "cuda": ((32000, 65536, 128256, 151936, 256000), (32000, 128256, 256000)),
    "cpu": ((1000, 2000, 4000, 8000), (2000, 8000)),
}
V_SWEEP_N = {"cuda": 4096, "cpu": 128}
IGNORED_SWEEP = {  # shares of ignored tokens of the "counted" sweep (at V_SWEEP_N tokens)
    "cuda": ((0.0, 0.5, 0.9, 0.99), (0.0, 0.5, 0.9)),
    "cpu": ((0.0, 0.5, 0.9), (0.0, 0.9)),
}
X_NAMES = {"vocab": "V", "counted": "counted tokens"}  # the swept variable; N elsewhere
SPARSE_K = 64  # teacher ids per token of the sparse case (the cache's default k)


@dataclass(frozen=True)
class Shape:
    """One problem size; sweep names its curve: a head's name (x = N) or "vocab" (x = V)."""

    sweep: str
    title: str
    n: int
    d_s: int
    d_t: int
    v: int
    v_t: int
    softcap: float | None
    ignored: float = 0.1  # share of the N tokens labelled ignore_index

    @property
    def n_ignored(self) -> int:
        return round(self.n * self.ignored)

    @property
    def x(self) -> int:
        """The swept variable: V for the vocab sweep, counted tokens for the counted sweep, N
        otherwise."""
        if self.sweep == "vocab":
            return self.v
        return self.n - self.n_ignored if self.sweep == "counted" else self.n

    @property
    def x_name(self) -> str:
        return X_NAMES.get(self.sweep, "N")


@dataclass(frozen=True)
class Case:
    """A loss configuration; reduction is always "mean"."""

    name: str
    title: str
    opts: DistillOptions
    sparse_k: int | None = None  # the sparse loss on the teacher's top-k (log-probs precomputed)

    @property
    def has_teacher(self) -> bool:
        return self.opts.kd_weight > 0

    @property
    def teacher_gemm(self) -> bool:
        """Whether the loss forms teacher logits (the sparse loss gets them as top-k log-probs)."""
        return self.has_teacher and self.sparse_k is None


def cases(temperature: float) -> dict[str, Case]:
    """distill: the headline loss; kd: distillation only, forward KL (Liger's fused-linear KL);
    rkl, jsd: distillation only, reverse KL and JSD (beta 0.5), TRL's DistillationTrainer
    divergences beside its kernel; skew_fkl, skew_rkl, tvd: the other divergences alone; ce: CE
    only; sparse: the headline loss's sparse form, on the teacher's top SPARSE_K ids (tail
    "bucket")."""
    t = f"{temperature:g}"
    kd_only = {"temperature": temperature, "ce_weight": 0.0, "kd_weight": 1.0}
    return {
        "distill": Case("distill", f"0.5 CE + 0.5 T^2 KL(p||q), T={t}",
                        DistillOptions(temperature=temperature, ce_weight=0.5, kd_weight=0.5)),
        "kd": Case("kd", f"T^2 KL(p||q), T={t}", DistillOptions(**kd_only)),
        "rkl": Case("rkl", f"T^2 KL(q||p) (reverse KL), T={t}",
                    DistillOptions(**kd_only, divergence="reverse_kl")),
        "jsd": Case("jsd", f"T^2 JSD, beta 0.5 (m = (p + q) / 2), T={t}",
                    DistillOptions(**kd_only, divergence="jsd", beta=0.5)),
        "skew_fkl": Case("skew_fkl", f"T^2 skew KL(p || 0.1 p + 0.9 q), T={t}",
                         DistillOptions(**kd_only, divergence="skew_forward_kl", skew=0.1)),
        "skew_rkl": Case("skew_rkl", f"T^2 skew KL(q || 0.9 p + 0.1 q), T={t}",
                         DistillOptions(**kd_only, divergence="skew_reverse_kl", skew=0.1)),
        "tvd": Case("tvd", f"T^2 TVD (1/2 sum |p - q|), T={t}",
                    DistillOptions(**kd_only, divergence="tvd")),
        "ce": Case("ce", "CE only (kd_weight=0; a width-1 teacher fills the teacher arguments)",
                   DistillOptions(ce_weight=1.0, kd_weight=0.0)),
        "sparse": Case("sparse", f"0.5 CE + 0.5 T^2 KL over the teacher's top-{SPARSE_K} ids + "
                       f"the rest bucket (fastkd sparse loss, precomputed targets), T={t}",
                       DistillOptions(temperature=temperature, ce_weight=0.5, kd_weight=0.5),
                       sparse_k=SPARSE_K),
    }


def problem_shape(case: Case, shape: Shape) -> Shape:
    """The shape a case runs: CE-only has no teacher, so it gets a width-1 teacher (the smallest
    input fastkd and the reference accept) instead of the head's."""
    return shape if case.has_teacher else replace(shape, d_t=1, v_t=shape.v)


def options(case: Case, shape: Shape) -> DistillOptions:
    """The case's options with the head's softcap on both models."""
    return replace(case.opts, student_softcap=shape.softcap, teacher_softcap=shape.softcap)


def flop_floor(shape: Shape, *, backward: bool, teacher: bool = True) -> int:
    """Matmul FLOPs: 2 N_c (V D_s + K D_t) forward, 2 N_c (3 V D_s + K D_t) with the backward,
    N_c = the counted tokens: an ignored token needs no logits, so no method must pay for it."""
    k = min(shape.v, shape.v_t)
    student = (3 if backward else 1) * shape.v * shape.d_s
    return 2 * (shape.n - shape.n_ignored) * (student + (k * shape.d_t if teacher else 0))


def build_shapes(heads: list[Head], n_sweep: tuple[int, ...], v_sweep: tuple[int, ...],
                 v_sweep_n: int, v_head: Head,
                 ignored_sweep: tuple[float, ...] = ()) -> list[Shape]:
    """Every head over n_sweep, then v_head's widths over v_sweep at v_sweep_n tokens (V_t = V),
    then v_head at v_sweep_n tokens over the shares of ignored tokens in ignored_sweep."""
    shapes = [Shape(h.name, h.title, n, h.d_s, h.d_t, h.v, h.v_t, h.softcap)
              for h in heads for n in n_sweep]
    title = f"vocab sweep: {v_head.name} widths, N={v_sweep_n}"
    shapes += [
        Shape("vocab", title, v_sweep_n, v_head.d_s, v_head.d_t, v, v, None) for v in v_sweep
    ]
    h = v_head
    shapes += [
        Shape("counted", f"counted sweep: {h.name} head, N={v_sweep_n}, a share of it ignored",
              v_sweep_n, h.d_s, h.d_t, h.v, h.v_t, h.softcap, ignored)
        for ignored in ignored_sweep
    ]
    return shapes
