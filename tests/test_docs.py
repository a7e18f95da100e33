"""The code in README.md and docs/*.md runs as written, so it cannot drift from the code.

Every ```python block is executed. The names a block uses but does not define (tiny local models,
small tensors, a teacher cache, a one-process gloo group) come from the setup named by the HTML
comment on the line before it, `<!-- setup: NAME -->` (SETUPS below); the block runs in an empty
temporary directory, and where a setup has a check (CHECKS) the block's result is compared with
a reference, so a snippet that runs but computes the wrong thing fails too. A block that cannot
run here says why, visibly in the Markdown source: `<!-- not run: REASON -->`; it is still
compiled, and such blocks must stay few (MAX_NOT_RUN).

Every ```bash block is read for commands: each `fastkd SUBCOMMAND ...` (also `torchrun ... -m
fastkd ...`) and `python -m bench ...` line is parsed by the real parser
(fastkd.cli_parser.build_parser, bench's parse_args), every `--flag` must be one of its options
spelled in full, and every `*.py` path must exist. The two commands of the README are pinned:
.ci/run and users depend on them."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import shlex
from pathlib import Path

import pytest
import torch
from _bench import import_bench
from _hf_fixtures import load, reference_loss
from _trainer_fixtures import build_chat_tokenizer, chats, corpus_texts, save_llama

from fastkd import reference
from fastkd.options import DistillOptions

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND_PAGES = [*PAGES, ROOT / "bench" / "README.md"]
MAX_NOT_RUN = 2  # blocks that cannot run on a CPU in one process; keep it this small

DEMO_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
                "pip install -e . && fastkd demo")
TEST_COMMAND = ("python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 && "
                'pip install -e ".[test]" && pytest')

FENCE = re.compile(r"^ {0,3}```\s*([\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*(setup|not run):\s*(.*?)\s*-->\s*$")
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]*")  # RUN_DIR, DIR_OR_ID, L


@dataclasses.dataclass(frozen=True)
class Block:
    page: Path
    line: int  # of the opening fence, 1-based
    lang: str
    code: str
    marker: tuple[str, str] | None  # ("setup", NAME) or ("not run", REASON)

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a Markdown page, each with the marker on the line before it."""
    out, lines, i = [], page.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        before = next((ln for ln in reversed(lines[:i]) if ln.strip()), "")
        found = MARKER.match(before)
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        assert end is not None, f"{page.relative_to(ROOT)}:{i + 1}: a code block that never closes"
        out.append(Block(page, i + 1, opening.group(1), "\n".join(lines[i + 1:end]) + "\n",
                         found.groups() if found else None))
        i = end + 1
    return out


ALL = [b for page in COMMAND_PAGES for b in blocks(page)]
PYTHON = [b for b in ALL if b.lang == "python" and b.page.parent != ROOT / "bench"]
RUN = [b for b in PYTHON if not (b.marker and b.marker[0] == "not run")]
NOT_RUN = [b for b in PYTHON if b.marker and b.marker[0] == "not run"]
BASH = [b for b in ALL if b.lang in ("bash", "sh", "shell")]


# --- tiny models and data, built once -------------------------------------------------------

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A chat tokenizer (ChatML template), a tiny Llama student (D=32, 1 layer) and teacher (D=48,
    2 layers) sharing it, saved with save_pretrained, and a short text file."""
    root = tmp_path_factory.mktemp("docs_assets")
    tokenizer = build_chat_tokenizer(root / "tokenizer")
    data = root / "corpus.txt"
    data.write_text("\n\n".join(t[:300] for t in corpus_texts()[:3]), encoding="utf-8")
    init = {"initializer_range": 0.3}  # far from uniform, so divergences are not vanishingly small
    return {
        "root": root, "tokenizer": tokenizer, "data": data,
        "student": save_llama(root / "student", tokenizer, hidden=32, seed=0, **init),
        "teacher": save_llama(root / "teacher", tokenizer, hidden=48, layers=2, seed=1, **init),
    }


def texts(n: int) -> list[str]:
    """n short snippets of uneven length from the stdlib corpus."""
    corpus = "\n".join(corpus_texts())
    return [corpus[200 * i: 200 * i + 40 + 23 * i] for i in range(n)]


def assert_moved(model, initial) -> None:
    before = dict(initial.named_parameters())
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach().cpu(),
                                                                          before[n].detach())]
    assert moved, "no parameter of the student changed"


# --- setups: each yields the names a block uses; checks compare its result with a reference ---

@contextlib.contextmanager
def setup_hf_loop(assets, tmp_path):
    batch = assets["tokenizer"](texts(3), padding=True, return_tensors="pt")  # right-padded
    assert (batch["attention_mask"] == 0).any()  # the padding is part of what is checked
    yield {"STUDENT": str(assets["student"]), "TEACHER": str(assets["teacher"]),
           "loader": [dict(batch)]}


def check_hf_loop(ns, assets):
    """The loop's loss on its one batch equals the loss from both models' full logits (float64
    spec, next-token labels, padding ignored), and the optimizer step moved the student."""
    batch = ns["loader"][0]
    initial, teacher = load(assets["student"]), load(assets["teacher"])
    labeled = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0,
                                                                 -100)}
    opts = DistillOptions(temperature=2.0, ce_weight=0.5, kd_weight=0.5)
    with torch.no_grad():
        expected = reference_loss(initial, teacher, labeled, opts)
    assert expected.item() > 0.1
    rel = 2e-2 if torch.cuda.is_available() else 1e-5  # the snippet runs bf16 autocast on a GPU
    assert ns["loss"].item() == pytest.approx(expected.item(), rel=rel)
    assert_moved(ns["student"], initial)
    assert all(p.grad is None for p in ns["teacher"].parameters())  # the teacher gets nothing


@contextlib.contextmanager
def setup_loss_tensors(assets, tmp_path):
    g = torch.Generator().manual_seed(0)
    lead, v, d_s, d_t = (3, 5), 37, 8, 12
    labels = torch.randint(0, v, lead, generator=g)
    labels[0, :2] = -100
    yield {"student_hidden": torch.randn(*lead, d_s, generator=g).requires_grad_(),
           "student_weight": torch.randn(v, d_s, generator=g).requires_grad_(),
           "teacher_hidden": torch.randn(*lead, d_t, generator=g),
           "teacher_weight": torch.randn(v, d_t, generator=g), "labels": labels}


def check_loss_tensors(ns, assets):
    """The first loss's gradients, its components (the entropy too) and the second (JSD) loss
    against the float64 spec."""
    names = ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")
    h_s, w_s, h_t, w_t = (ns[n].detach().double().requires_grad_() for n in names)
    parts = reference.distill_loss(h_s, w_s, h_t, w_t, ns["labels"],
                                   DistillOptions(temperature=2.0, ce_weight=0.5, kd_weight=0.5))
    for got, want in zip(ns["out"].columns(), parts.columns(), strict=True):
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
    first = parts[0]
    first.backward()
    torch.testing.assert_close(ns["student_hidden"].grad.double(), h_s.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ns["student_weight"].grad.double(), w_s.grad, rtol=1e-5, atol=1e-7)
    second = reference.distill_loss(h_s, w_s, h_t, w_t, ns["labels"],
                                    DistillOptions(temperature=2.0, divergence="jsd", beta=0.5))[0]
    assert ns["loss"].item() == pytest.approx(second.item(), rel=1e-5)


@contextlib.contextmanager
def setup_vocab_parallel(assets, tmp_path):
    """One process: a gloo group and a device mesh of size 1 (the shards are the whole heads).
    The same code on 2 and 3 ranks is tests/test_vocab_parallel.py's."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    assert not dist.is_initialized(), "a process group is left over from another test"
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        g = torch.Generator().manual_seed(1)
        n, v, d_s, d_t = 11, 37, 8, 12
        student = torch.nn.Module()
        student.lm_head = torch.nn.Linear(d_s, v, bias=False)
        w_t_full = torch.randn(v, d_t, generator=g)
        tp_mesh = init_device_mesh("cpu", (1,))
        yield {"h_s": torch.randn(n, d_s, generator=g).requires_grad_(),
               "h_t": torch.randn(n, d_t, generator=g),
               "labels": torch.randint(0, v, (n,), generator=g), "V": v, "v0": 0,
               "w_s_shard": torch.randn(v, d_s, generator=g).requires_grad_(),
               "w_t_shard": w_t_full, "w_t_full": w_t_full, "tp_group": tp_mesh.get_group(),
               "tp_mesh": tp_mesh, "student": student}
    finally:
        dist.destroy_process_group()


def check_vocab_parallel(ns, assets):
    """The ColwiseParallel head's loss equals the plain loss over the whole heads (float64)."""
    w = ns["student"].lm_head.weight.to_local().detach().double()
    expected = reference.distill_loss(ns["h_s"].detach().double(), w, ns["h_t"].double(),
                                      ns["w_t_full"].double(), ns["labels"], DistillOptions())[0]
    assert ns["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert ns["w_s_shard"].grad is not None  # the first call's backward reached the shard


@contextlib.contextmanager
def setup_hf_trainer(assets, tmp_path):
    from datasets import Dataset

    tokenizer = assets["tokenizer"]
    rows = [{"input_ids": tokenizer(t)["input_ids"]} for t in texts(8)]
    yield {"student": load(assets["student"]), "teacher": load(assets["teacher"]),
           "tokenizer": tokenizer, "ds": Dataset.from_list(rows)}


@contextlib.contextmanager
def setup_trl_prompts(assets, tmp_path):
    from datasets import Dataset

    prompts = ["def f(x):", "import os", "return a + b", "class A(object):"]
    yield {"student": load(assets["student"]), "teacher": load(assets["teacher"]),
           "tokenizer": assets["tokenizer"],
           "prompts": Dataset.from_list([{"prompt": p} for p in prompts])}


@contextlib.contextmanager
def setup_trl_chats(assets, tmp_path):
    from datasets import Dataset

    yield {"student": load(assets["student"]), "teacher": load(assets["teacher"]),
           "tokenizer": assets["tokenizer"], "chats": Dataset.from_list(chats())}


@contextlib.contextmanager
def setup_multi_teacher_trainer(assets, tmp_path):
    """Two teachers of different widths ("code": D=48, "prose": D=40) sharing the student's
    tokenizer; tokenized rows and prompts, each with a teacher_id naming one of them."""
    from datasets import Dataset

    tokenizer, names = assets["tokenizer"], ("code", "prose")
    prose = save_llama(tmp_path / "prose", tokenizer, hidden=40, seed=5, initializer_range=0.3)
    prompts = ["def f(x):", "import os", "return a + b", "class A(object):"]
    yield {"student": load(assets["student"]), "teacher_a": load(assets["teacher"]),
           "teacher_b": load(prose), "tokenizer": tokenizer,
           "ds": Dataset.from_list([{"input_ids": tokenizer(t)["input_ids"],
                                     "teacher_id": names[i % 2]} for i, t in enumerate(texts(8))]),
           "prompts": Dataset.from_list([{"prompt": p, "teacher_id": names[i % 2]}
                                         for i, p in enumerate(prompts)])}


def check_routed_trained(ns, assets):
    """Trained (check_trained) from both teachers: each row's teacher is the one it names."""
    check_trained(ns, assets)
    trainer = ns["trainer"]
    assert trainer.teacher_routing.names == ("code", "prose") and len(trainer.teacher_model) == 2


@contextlib.contextmanager
def setup_cache_trainer(assets, tmp_path):
    """A top-8 teacher cache at ./CACHE_DIR (the block runs in tmp_path), as `fastkd
    cache-teacher` writes it."""
    from fastkd.cache_teacher import cache_teacher
    from fastkd.plans import CachePlan

    cache_teacher(CachePlan(teacher=str(assets["teacher"]), data=[str(assets["data"])],
                            out=str(tmp_path / "CACHE_DIR"), mode="topk", k=8, temperature=2.0,
                            seq_len=24, batch_size=16, eval_fraction=0.1, progress=False))
    yield {"student": load(assets["student"])}


def check_trained(ns, assets):
    """The trainer ran its steps, logged a finite positive loss and moved the student."""
    trainer = ns["trainer"]
    assert trainer.state.global_step >= 1
    losses = [h["train_loss"] for h in trainer.state.log_history if "train_loss" in h]
    assert losses and all(0 < x < math.inf for x in losses), trainer.state.log_history
    assert_moved(trainer.model, load(assets["student"]))


@contextlib.contextmanager
def setup_sparse_tensors(assets, tmp_path):
    g = torch.Generator().manual_seed(2)
    lead, v, d, k = (2, 7), 37, 8, 5
    teacher_logits = 3 * torch.randn(*lead, v, generator=g)
    teacher_ids = teacher_logits.topk(k).indices
    teacher_ids[0, :3, -1] = -1  # unused slots
    teacher_logprobs = torch.log_softmax(teacher_logits / 2.0, -1).gather(
        -1, teacher_ids.clamp(min=0)).masked_fill(teacher_ids < 0, 0.0)
    labels = torch.randint(0, v, lead, generator=g)
    labels[1, -2:] = -100
    yield {"student_hidden": torch.randn(*lead, d, generator=g).requires_grad_(),
           "student_weight": torch.randn(v, d, generator=g).requires_grad_(),
           "teacher_ids": teacher_ids, "teacher_logprobs": teacher_logprobs, "labels": labels}


def check_sparse_tensors(ns, assets):
    expected = reference.sparse_distill_loss(
        ns["student_hidden"].detach().double(), ns["student_weight"].detach().double(),
        ns["teacher_ids"], ns["teacher_logprobs"].double(), ns["labels"],
        DistillOptions(temperature=2.0, divergence="forward_kl"), tail="bucket")[0]
    assert ns["loss"].item() == pytest.approx(expected.item(), rel=1e-5)


@contextlib.contextmanager
def setup_multi_teacher_tensors(assets, tmp_path):
    """A (3, 5) batch, a dense teacher a (every token), a sparse teacher b for row 1's 5 tokens
    (compact), a dense teacher c with a wider, padded vocabulary."""
    g = torch.Generator().manual_seed(3)
    lead, v, d = (3, 5), 37, 8
    labels = torch.randint(0, v, lead, generator=g)
    labels[0, :2] = -100
    logits_b = 3 * torch.randn(5, v, generator=g)
    ids_b = logits_b.topk(6).indices
    yield {"student_hidden": torch.randn(*lead, d, generator=g).requires_grad_(),
           "student_weight": torch.randn(v, d, generator=g).requires_grad_(), "labels": labels,
           "h_a": torch.randn(*lead, 12, generator=g), "w_a": torch.randn(v, 12, generator=g),
           "ids_b": ids_b,
           "logprobs_b": torch.log_softmax(logits_b / 2.0, -1).gather(-1, ids_b),
           "h_c": torch.randn(*lead, 6, generator=g), "w_c": torch.randn(v + 3, 6, generator=g)}


def check_multi_teacher_tensors(ns, assets):
    """The routed loss, each teacher's kd and the mixture against the float64 spec."""
    from fastkd import reference_multi
    from fastkd.teachers import TeacherHead, TeacherLogprobs

    h_s, w_s = (ns[n].detach().double() for n in ("student_hidden", "student_weight"))
    a = TeacherHead(ns["h_a"].double(), ns["w_a"].double(), softcap=30.0)
    b = TeacherLogprobs(ns["ids_b"], ns["logprobs_b"].double())
    opts = DistillOptions(temperature=2.0)
    routed = reference_multi.routed_distill_loss(h_s, w_s, [a, b], ns["rows"], ns["labels"], opts)
    assert ns["loss"].item() == pytest.approx(routed.loss.item(), rel=1e-5)
    torch.testing.assert_close(ns["out"].teacher_kd.double(), routed.teacher_kd, rtol=1e-5,
                               atol=1e-7)
    assert ns["out"].teacher_tokens.tolist() == routed.teacher_tokens.tolist()
    c = TeacherHead(ns["h_c"].double(), ns["w_c"].double())
    mixed = reference_multi.mixture_distill_loss(
        h_s, w_s, [TeacherHead(a.hidden, a.weight), c], torch.tensor([0.7, 0.3]), ns["labels"],
        opts)
    assert ns["mixed"].item() == pytest.approx(mixed.loss.item(), rel=1e-5)
    assert ns["student_weight"].grad is not None


SETUPS = {
    "hf_loop": (setup_hf_loop, check_hf_loop),
    "loss_tensors": (setup_loss_tensors, check_loss_tensors),
    "vocab_parallel": (setup_vocab_parallel, check_vocab_parallel),
    "hf_trainer": (setup_hf_trainer, check_trained),
    "trl_prompts": (setup_trl_prompts, check_trained),
    "trl_chats": (setup_trl_chats, check_trained),
    "cache_trainer": (setup_cache_trainer, check_trained),
    "multi_teacher_trainer": (setup_multi_teacher_trainer, check_routed_trained),
    "sparse_tensors": (setup_sparse_tensors, check_sparse_tensors),
    "multi_teacher_tensors": (setup_multi_teacher_tensors, check_multi_teacher_tensors),
}


# --- the Python blocks ----------------------------------------------------------------------

@pytest.mark.parametrize("block", RUN, ids=[b.name for b in RUN])
def test_python_block_runs_as_written(block, assets, tmp_path, monkeypatch):
    name = block.marker[1] if block.marker else None
    assert name is None or name in SETUPS, (
        f"{block.name}: unknown setup {name!r}; known: {sorted(SETUPS)}")
    setup, check = SETUPS[name] if name else (None, None)
    monkeypatch.chdir(tmp_path)
    code = compile(block.code, block.name, "exec")
    with setup(assets, tmp_path) if name else contextlib.nullcontext({}) as given:
        ns = {"__name__": "__docs__", **given}
        try:
            exec(code, ns)
        except NameError as err:
            raise AssertionError(f"{block.name}: {err}; give the block a setup "
                                 "(<!-- setup: NAME --> on the line before it)") from err
        if check:
            check(ns, assets)


def test_blocks_and_markers_are_read(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n<!-- not run: needs a vLLM server -->\n\n```python\nserve()\n```\n"
                    "<!-- setup: hf_loop -->\n```python\nx = 1\n```\n```bash\nls\n```\n")
    got = [(b.line, b.lang, b.code, b.marker) for b in blocks(page)]
    assert got == [(4, "python", "serve()\n", ("not run", "needs a vLLM server")),
                   (8, "python", "x = 1\n", ("setup", "hf_loop")), (11, "bash", "ls\n", None)]


def test_blocks_that_do_not_run_say_why_and_stay_few():
    for block in NOT_RUN:
        assert len(block.marker[1]) >= 10, f"{block.name}: 'not run' needs a reason"
        compile(block.code, block.name, "exec")  # still valid Python
    assert len(NOT_RUN) <= MAX_NOT_RUN, [b.name for b in NOT_RUN]


def test_every_setup_is_used_and_every_marker_is_on_a_python_block():
    used = {b.marker[1] for b in RUN if b.marker}
    assert used == set(SETUPS), f"setups no block uses: {sorted(set(SETUPS) - used)}"
    stray = [b.name for b in ALL if b.marker and b.lang != "python"]
    assert not stray, f"markers on blocks that are not Python: {stray}"


# --- the shell blocks -----------------------------------------------------------------------

def commands(block: Block) -> list[list[str]]:
    """The commands of a shell block: continuation lines joined, comments dropped, split at
    &&, ||, ; and |."""
    out = []
    for line in block.code.replace("\\\n", " ").splitlines():
        words, current = shlex.split(line, comments=True), []
        for w in [*words, ";"]:
            if w in ("&&", "||", ";", "|"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(w)
    return out


def invocation(words: list[str]) -> tuple[str, list[str]] | None:
    """("fastkd" | "bench", its arguments) when the command runs fastkd's CLI or bench."""
    for i, w in enumerate(words):
        if w == "-m" and i + 1 < len(words) and words[i + 1] in ("fastkd", "bench"):
            return words[i + 1], words[i + 2:]
    if words and Path(words[0]).name == "fastkd":
        return "fastkd", words[1:]
    return None


def fastkd_options(subcommand: str) -> dict:
    """The subcommand's options, each spelling to its argparse action."""
    from fastkd.cli_parser import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert subcommand in sub.choices, f"fastkd has no subcommand {subcommand!r}"
    return {s: a for a in sub.choices[subcommand]._actions for s in a.option_strings}


def flags(args: list[str]) -> list[str]:
    return [a.split("=")[0] for a in args if a.startswith("--")]


def fill_placeholders(args: list[str], actions: dict) -> list[str]:
    """The documented arguments with their placeholders made parseable: `...` after an option
    that takes a value becomes one ("X"), elsewhere it is dropped; a placeholder value (RUN_DIR,
    L) of a typed option becomes "1". The other values are parsed as written."""
    out, previous = [], None
    for a in args:
        takes_value = previous is not None and previous.nargs != 0
        if a == "..." and takes_value:
            a = "X"
        if a != "..." and not (takes_value and PLACEHOLDER.fullmatch(a) and previous.type):
            out.append(a)
        elif a != "...":
            out.append("1")
        previous = actions.get(a.split("=")[0]) if a.startswith("--") else None
    return out


def check_fastkd(args: list[str], where: str) -> None:
    from fastkd.cli_parser import build_parser

    subcommand, rest = args[0], args[1:]
    options = fastkd_options(subcommand)
    unknown = [f for f in flags(rest) if f not in options]
    assert not unknown, f"{where}: fastkd {subcommand} has no option {unknown}"
    try:
        build_parser().parse_args([subcommand, *fill_placeholders(rest, options)])
    except SystemExit as err:
        raise AssertionError(f"{where}: fastkd {' '.join(args)} does not parse") from err


def check_bench(args: list[str], where: str) -> None:
    parse_args = import_bench("__main__").parse_args
    try:
        parsed = parse_args(args)
    except SystemExit as err:
        raise AssertionError(f"{where}: python -m bench {' '.join(args)} does not parse") from err
    known = {"--" + k.replace("_", "-") for k in vars(parsed)}
    unknown = [f for f in flags(args) if f not in known]  # no abbreviations
    assert not unknown, f"{where}: python -m bench has no option {unknown}"


@pytest.mark.parametrize("block", BASH, ids=[b.name for b in BASH])
def test_shell_block_commands_exist(block):
    for words in commands(block):
        found = invocation(words)
        if found and found[0] == "fastkd" and found[1]:
            check_fastkd(found[1], block.name)
        elif found and found[0] == "bench":
            check_bench(found[1], block.name)
        for w in words:
            if re.fullmatch(r"[\w./-]+\.py", w) and not w.startswith("-"):
                assert (ROOT / w).is_file(), f"{block.name}: {w} does not exist"


def test_the_shell_blocks_name_fastkd_and_bench():
    """The parsing above sees the commands (a regression in `commands` would pass vacuously)."""
    found = [invocation(w) for b in BASH for w in commands(b)]
    subcommands = {args[0] for tool, args in filter(None, found) if tool == "fastkd" and args}
    assert {"demo", "distill", "cache-teacher", "cache-import"} <= subcommands, subcommands
    assert any(tool == "bench" and args for tool, args in filter(None, found))


def test_the_two_commands_are_unchanged():
    readme = [b.code.strip() for b in blocks(ROOT / "README.md") if b.lang == "bash"]
    assert readme[:2] == [DEMO_COMMAND, TEST_COMMAND]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 && pip install -e \".[test]\"\npytest\n" in ci


def test_bad_flags_are_caught():
    """The checks above fail on a misspelt option, an abbreviation and an unknown subcommand."""
    for args in (["distill", "--temprature", "2"], ["distill", "--temp", "2"], ["distil"]):
        with pytest.raises(AssertionError):
            check_fastkd(args, "test")
    for args in (["--preset", "llama", "--sweepv", "none"], ["--quic"]):
        with pytest.raises(AssertionError):
            check_bench(args, "test")
    block = Block(ROOT / "README.md", 1, "bash", "pytest tests/test_nothing_here.py\n", None)
    with pytest.raises(AssertionError):
        test_shell_block_commands_exist(block)


def test_a_wrong_snippet_fails(assets, tmp_path, monkeypatch):
    """A snippet whose label shift is off by one runs, but its check fails."""
    (readme,) = [b for b in RUN if b.marker == ("setup", "hf_loop")]
    wrong = dataclasses.replace(readme, code=readme.code.replace("h_s[:, :-1]", "h_s[:, 1:]"))
    assert wrong.code != readme.code
    with pytest.raises(AssertionError):
        test_python_block_runs_as_written(wrong, assets, tmp_path, monkeypatch)

