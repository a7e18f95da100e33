"""Causal LMs as the fused loss sees them: `softcap(scale * (base(x).last_hidden_state @ W^T + b))`.

Loading through `from_pretrained` with errors that name the role, splitting a model into its base
and its LM head (its logit scale and softcap from its config; refusing heads whose logits the
fused loss cannot reproduce), the head's effective weight under a PEFT adapter
(`head_weight_and_bias`), the tokenizer checks, and `check_packing` (whether a model's
attention keeps packed examples apart). Shared by the trainer, the teacher cache and the Hugging
Face integrations.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from fastkd import reference
from fastkd.options import DistillOptions

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def logit_scale(config) -> float:
    """The factor a model's head multiplies its logits by after the matmul, before any softcap,
    from its (text) config, read as TRL 1.16's DistillationTrainer reads it: `logit_scale`
    (Cohere), else `output_multiplier` (Muse Glimmer), else `lm_head_multiplier` (Falcon-H1),
    else 1 / `logits_scaling` (Granite, MiniCPM3; HyperCLOVA X multiplies by it); 1 when none is
    set. The one place fastkd reads it; `lm_head`'s probe checks the model's own forward agrees."""
    for attr in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, attr, None)
        if value is not None:
            return float(value)
    scaling = getattr(config, "logits_scaling", None)
    if scaling is None:
        return 1.0
    return float(scaling) if getattr(config, "model_type", None) == "hyperclovax" else 1 / scaling


@dataclass
class LMHead:
    """A causal LM as the fused loss sees it:
    `softcap(logit_scale * (base(x).last_hidden_state @ W^T + b))`."""

    model: torch.nn.Module
    base: torch.nn.Module
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    softcap: float | None
    logit_scale: float = 1.0

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, D) last hidden states of the base model: the HF head (full logits) never runs.
        Packed examples (fastkd.data.Blocks.model_inputs): position_ids and no attention_mask."""
        out = self.base(input_ids=input_ids, attention_mask=attention_mask,
                        position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]


def head_weight_and_bias(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The (V, D) weight and (V,) bias (or None) with which the output layer `layer` maps hidden
    states to logits, `logits = h @ weight.T + bias`, as tensors autograd can differentiate.

    - a plain linear layer: its own `weight` and `bias`;
    - a PEFT LoRA layer (`LoraConfig(target_modules=[..., "lm_head"])`): the effective
      `W + sum_a scaling_a * B_a @ A_a` over the active adapters (W transposed first for
      fan_in_fan_out), and `b + sum_a scaling_a * b_B,a` with lora_bias, so the fused loss's dW
      reaches lora_A and lora_B through autograd (reading `layer.weight` would give the frozen W
      alone and the adapter no gradient); merged or disabled adapters: W and b alone, as the
      layer's forward does;
    - a PEFT `modules_to_save` wrapper: the active copy's (the one its forward runs).

    An FSDP2-sharded weight (a DTensor, outside the wrapper's forward) comes back whole
    (`full_tensor()`, whose backward averages the gradient over the ranks and keeps the rank's
    shard). Refused with a ValueError, since one (weight, bias) cannot express them: active
    lora_dropout (dropout on the LoRA branch's input only), DoRA and the other LoRA variants, and
    any other PEFT tuner on the head.
    """
    if hasattr(layer, "modules_to_save") and hasattr(layer, "original_module"):
        active = layer.active_adapters
        use_copy = not layer.disable_adapters and active and active[0] in layer.modules_to_save
        return head_weight_and_bias(layer.modules_to_save[active[0]] if use_copy
                                    else layer.original_module)
    if not hasattr(layer, "get_base_layer"):  # not a PEFT tuner layer
        bias = getattr(layer, "bias", None)
        return _whole(layer.weight), None if bias is None else _whole(bias)
    kind = type(layer).__name__
    if not all(hasattr(layer, a) for a in ("lora_A", "lora_B", "scaling", "lora_dropout")):
        raise ValueError(f"the output layer carries a PEFT {kind} adapter: fastkd's fused loss "
                         "supports LoRA on the output layer only (or leave it out of "
                         "target_modules)")
    weight, bias = head_weight_and_bias(layer.get_base_layer())
    if getattr(layer, "fan_in_fan_out", False):
        weight = weight.T
    if layer.disable_adapters or layer.merged:
        return weight, bias
    for name in layer.active_adapters:
        if name not in layer.lora_A:
            continue
        if name in getattr(layer, "lora_variant", {}):
            raise ValueError(f"the output layer's LoRA adapter {name!r} is a variant (DoRA, ...): "
                             "fastkd's fused loss supports plain LoRA on the output layer only")
        dropout = layer.lora_dropout[name]
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            raise ValueError(
                f"the output layer's LoRA adapter {name!r} has lora_dropout={dropout.p}: dropout "
                "on the LoRA branch's input cannot fold into one head weight for the fused loss; "
                "use lora_dropout=0 (or leave the output layer out of target_modules)")
        lora_a, lora_b, scale = layer.lora_A[name], layer.lora_B[name], layer.scaling[name]
        weight = weight + (scale * (lora_b.weight @ lora_a.weight)).to(weight.dtype)
        if getattr(lora_b, "bias", None) is not None:
            extra = (scale * lora_b.bias).to(weight.dtype)
            bias = extra if bias is None else bias + extra
    return weight, bias


def _whole(x: torch.Tensor) -> torch.Tensor:
    """A DTensor (an FSDP2 shard, read outside its unit's forward) as one plain tensor; any other
    tensor as it is. Each rank's gradient of the whole tensor is its own batch's, so the backward
    averages it over the mesh before keeping the rank's shard (`Partial("avg")`), as FSDP's own
    reduce-scatter does for a parameter its forward gathered; a plain `full_tensor()` would keep
    the rank's own gradient and the ranks' shards would train on different data."""
    from torch.distributed.tensor import DTensor, Partial

    if not isinstance(x, DTensor):
        return x
    return x.full_tensor(grad_placements=[Partial("avg")] * x.device_mesh.ndim)


def lm_head(model: torch.nn.Module, role: str, probe: bool = True) -> LMHead:
    """Check that `model`'s logits are its head applied to its base's hidden states, and split it.

    Gemma-2-style `final_logit_softcapping` becomes the loss's softcap, and a head's logit scale
    (`logit_scale`: Cohere's logit_scale, Granite's 1 / logits_scaling, ...) its logit scale. A
    probe on 8 tokens then compares the model's own logits with the recomposed ones, which catches
    any other post-processing (and a scale attribute the model's forward does not apply).
    probe=False skips it (the config checks stay): for a model already sharded by FSDP or
    DeepSpeed ZeRO-3, whose weights outside its own forward are shards.
    """
    name = getattr(model, "name_or_path", "") or type(model).__name__
    config = model.config.get_text_config()
    scale = logit_scale(config)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"{role} model {name}: its config's logit scale is {scale} (from "
                         "logit_scale, output_multiplier, lm_head_multiplier or logits_scaling); "
                         "fastkd needs a finite scale > 0")
    softcap = getattr(config, "final_logit_softcapping", None)
    base = model.base_model
    head = model.get_output_embeddings()
    if base is model or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{role} model {name}: expected a causal LM with a base model and a "
                         f"linear output layer, got {type(model).__name__}")
    bias = getattr(head, "bias", None)
    result = LMHead(model, base, head.weight, bias, None if softcap is None else float(softcap),
                    scale)
    if not probe:
        return result
    weight, bias = head_weight_and_bias(head)  # a LoRA head: its effective weight

    # The probe: one 8-token forward with full logits, once at load time.
    was_training = model.training
    model.eval()
    ids = (torch.arange(8, device=head.weight.device) % result.vocab_size).unsqueeze(0)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        h = result.hidden(ids, mask).float()
        got = reference.head_logits(h @ weight.float().T + (0 if bias is None else bias.float()),
                                    result.logit_scale, result.softcap)
    model.train(was_training)
    tol = (1e-4 if weight.dtype == torch.float32 else 3e-2) * max(1.0, expected.abs().max())
    err = (expected - got).abs().max().item()
    if err > tol:
        raise ValueError(
            f"{role} model {name}: its logits are not its output layer applied to the base model's "
            f"last hidden state (max |difference| {err:.3g} > {tol:.3g}; fastkd applied logit "
            f"scale {result.logit_scale:g} and softcap {result.softcap} from its config): the "
            "model post-processes logits in a way fastkd cannot reproduce, so it refuses this model"
        )
    return result


def with_heads(opts: DistillOptions, student, teacher=None) -> DistillOptions:
    """opts with the models' own logit post-processing: each head's (`LMHead`, or anything with
    `softcap` and `logit_scale`) softcap and logit scale; without a teacher (a teacher cache, whose
    log-probabilities include its head's), the teacher's fields stay as they are."""
    opts = dataclasses.replace(opts, student_softcap=student.softcap,
                               student_logit_scale=student.logit_scale)
    if teacher is None:
        return opts
    return dataclasses.replace(opts, teacher_softcap=teacher.softcap,
                               teacher_logit_scale=teacher.logit_scale)


def from_pretrained(auto_class, source: str, role: str, **kwargs):
    """`auto_class.from_pretrained(source)`, with errors that name the role and the source.

    A source that cannot be a hub id ("name" or "org/name") must be a local directory: fail at
    once rather than after the hub's retries.
    """
    from safetensors import SafetensorError

    path = Path(source).expanduser()
    if not path.exists() and not _may_be_hub_id(source):
        raise FileNotFoundError(f"{role}: no such model directory: {source}")
    try:
        return auto_class.from_pretrained(str(path) if path.exists() else source, **kwargs)
    except OSError as err:
        raise OSError(f"{role} {source!r}: not a loadable local directory, and not loadable from "
                      f"the Hugging Face Hub: {err}") from err
    except SafetensorError as err:
        raise ValueError(f"{role} {source!r}: a safetensors file is damaged: {err}") from err


# ----------------------------------------------------------------------------------------------
# Checking a model source before anything loads: a run that would fail on its models fails in
# seconds, before the teacher loads, the data is tokenized or the run directory is written.

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
HUB_TIMEOUT_S = 10.0  # one probe of the Hub, no retries


def _may_be_hub_id(source: str) -> bool:
    """Whether source has a hub id's shape ("name" or "org/name"), not a path's."""
    return not (Path(source).is_absolute() or source.startswith((".", "~"))
                or source.count("/") > 1)


def check_model_source(source: str, role: str, files: str = "model") -> None:
    """Fail fast on a model (files="model") or tokenizer (files="tokenizer") that cannot load.

    A local directory must hold config.json (valid JSON) and weights whose safetensors headers
    match the files' sizes (a truncated download is named), or tokenizer files. Anything else
    must be a hub id: with HF_HUB_OFFLINE=1 it must be in the Hugging Face cache; otherwise one
    request (no retries) asks the Hub whether it exists. Raises FileNotFoundError or ValueError
    naming the role, the source and the file.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if files == "tokenizer":
            if not any((path / name).is_file() for name in TOKENIZER_FILES):
                raise FileNotFoundError(f"{role} {source}: the directory has no tokenizer (none of "
                                        f"{', '.join(TOKENIZER_FILES)})")
            return
        _read_json(path / "config.json", role)
        weights = [path / name for name in WEIGHT_FILES if (path / name).is_file()]
        if not weights and not list(path.glob("*.safetensors")):
            raise FileNotFoundError(f"{role} {source}: the directory has no weights (none of "
                                    f"{', '.join(WEIGHT_FILES)})")
        for file in _safetensors_files(path, role):
            check_safetensors(file, role)
        return
    if path.exists():
        raise FileNotFoundError(f"{role} {source}: not a directory (a model is a directory "
                                "holding config.json and its weights)")
    if not _may_be_hub_id(source):
        raise FileNotFoundError(f"{role}: no such model directory: {source}")
    _check_hub_id(source, role, "config.json")


def _read_json(path: Path, role: str):
    if not path.is_file():
        raise FileNotFoundError(f"{role}: {path} not found (a model directory holds "
                                "config.json and its weights)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{role}: {path} is damaged (not valid JSON: {err})") from err


def _safetensors_files(path: Path, role: str) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    shards = sorted(set(_read_json(index, role).get("weight_map", {}).values()))
    missing = [name for name in shards if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{role}: {index} lists shards that are missing: {missing}")
    return [path / name for name in shards]


def check_safetensors(path: Path, role: str) -> None:
    """A safetensors file whose header parses and whose size is what the header says (reads the
    header only): a truncated or overwritten file is named instead of failing mid-load."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"),
                  default=0)
    except (ValueError, KeyError, TypeError, IndexError) as err:
        raise ValueError(f"{role}: {path} is damaged (not a safetensors file: {err})") from err
    if size != 8 + n + end:
        raise ValueError(f"{role}: {path} is damaged: {size} bytes, its header says "
                         f"{8 + n + end} (truncated or overwritten)")


def _check_hub_id(repo_id: str, role: str, filename: str) -> None:
    """A hub id that from_pretrained can load: in the cache when offline, else on the Hub."""
    from huggingface_hub import constants, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.utils import build_hf_headers, get_session

    try:
        cached = isinstance(try_to_load_from_cache(repo_id, filename), str)
    except ValueError as err:  # not a valid repo id
        raise FileNotFoundError(f"{role}: {repo_id!r} is neither a local directory nor a "
                                f"Hugging Face Hub id ({err})") from err
    if cached:
        return
    if constants.is_offline_mode():
        raise FileNotFoundError(
            f"{role}: {repo_id!r} is not a local directory, and HF_HUB_OFFLINE is set while the "
            "Hugging Face cache holds no copy of it: pass a local directory, or download it "
            "first with network access")
    try:
        response = get_session().head(hf_hub_url(repo_id, filename), headers=build_hf_headers(),
                                      follow_redirects=True, timeout=HUB_TIMEOUT_S)
    except Exception as err:  # noqa: BLE001 - any network failure: name it, fail now
        raise OSError(
            f"{role}: {repo_id!r} is not a local directory, and the Hugging Face Hub cannot be "
            f"reached to fetch it ({type(err).__name__}: {err}); pass a local directory, or set "
            "HF_HUB_OFFLINE=1 to use the Hugging Face cache") from err
    if response.status_code != 200:
        raise FileNotFoundError(
            f"{role}: {repo_id!r} is not a local directory, and the Hugging Face Hub has no "
            f"{filename} for it (HTTP {response.status_code}: no such model, or a gated or "
            "private one you are not logged in for)")


def load_lm(name_or_path: str, role: str, dtype: torch.dtype | None,
            device: torch.device) -> LMHead:
    """A causal LM from a directory or hub id, in dtype (None: the checkpoint's), on device, split
    into base and head (`lm_head`)."""
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, name_or_path, role, dtype=dtype)
    model.config.use_cache = False
    return lm_head(model.to(device), role)


def load_teacher(source: str | torch.nn.Module, dtype: str | torch.dtype | None,
                 device: torch.device, role: str = "teacher") -> LMHead:
    """The teacher, frozen: in eval mode and with no gradients (so no optimizer state).

    Args:
        source: a model directory or hub id (loaded), or a causal LM (taken as it is).
        dtype: a name of `fastkd.plans.TEACHER_DTYPES` ("auto": bf16 on CUDA, fp32 elsewhere),
            a torch.dtype, or None (the checkpoint's, or the model's own).
        device: where it runs.
        role: the name errors give it ("teacher", or one of several: "teachers[1]").

    Returns:
        its `LMHead` (the model, its base and its head, checked by `lm_head`).
    """
    if dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    if isinstance(source, str):
        head = load_lm(source, role, dtype, device)
    else:
        head = lm_head(source.to(device=device, dtype=dtype), role)
    head.model.eval().requires_grad_(False)
    return head


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, source, "tokenizer")


def check_tokenizers(teacher_source: str, tokenizer, student: str) -> None:
    """Refuse a student that ships a different tokenizer: the loss compares ids one by one."""
    from transformers import AutoTokenizer

    local = Path(student)
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        return  # a bare model directory: it will use the teacher's tokenizer
    try:
        other = from_pretrained(AutoTokenizer, student, "student tokenizer")
    except (OSError, ValueError):
        return  # no tokenizer published with the student
    mine, theirs = tokenizer.get_vocab(), other.get_vocab()
    if mine != theirs or tokenizer.all_special_tokens != other.all_special_tokens:
        differing = sorted(set(mine.items()) ^ set(theirs.items()), key=lambda kv: kv[1])[:3]
        raise ValueError(
            f"different tokenizers: the teacher's ({teacher_source}, {len(mine)} tokens) and the "
            f"student's ({student}, {len(theirs)} tokens) disagree (e.g. {differing}); "
            "distillation compares logits id by id, so both models must share one tokenizer"
        )


def check_vocab(tokenizer, head: LMHead, role: str) -> None:
    """Padded vocabularies are fine (the loss masks to shared ids); a too-small head is not."""
    if len(tokenizer) > head.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the {role}'s output layer "
                         f"has only {head.vocab_size} rows")


@torch.no_grad()
def check_packing(model: torch.nn.Module, role: str) -> None:
    """Refuse a model whose attention lets packed examples see each other.

    One forward of 2 rows, each packing 2 short examples (input_ids and position_ids counting
    from 0 per example, no attention_mask: what `fastkd.data.Blocks.model_inputs` gives packed
    rows), against the second examples run alone: equal when the model turns position_ids resets
    into a block-diagonal mask (transformers' sdpa, eager and flex attention do; flash-attention
    does only for a single row). Runs on the model's device, in its dtype.
    """
    param = next(model.parameters())
    vocab = model.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    lengths = ((5, 4), (3, 6))
    ids = torch.randint(0, vocab, (2, 9), generator=g)
    positions = torch.tensor([list(range(a)) + list(range(b)) for a, b in lengths])
    was_training = model.training
    model.eval()
    try:
        packed = model(input_ids=ids.to(param.device), position_ids=positions.to(param.device),
                       use_cache=False).logits.float()
        alone = [model(input_ids=ids[r:r + 1, a:].to(param.device),
                       use_cache=False).logits[0].float() for r, (a, _) in enumerate(lengths)]
    finally:
        model.train(was_training)
    err = max((packed[r, a:] - alone[r]).abs().max().item() for r, (a, _) in enumerate(lengths))
    scale = max(1.0, max(x.abs().max().item() for x in alone))
    tol = (1e-4 if param.dtype in (torch.float32, torch.float64) else 3e-2) * scale
    if err > tol:
        name = getattr(model, "name_or_path", "") or type(model).__name__
        impl = getattr(model.config, "_attn_implementation", None)
        raise ValueError(
            f"{role} model {name}: with attention {impl!r} packed examples attend to each other "
            f"(max |logit difference| {err:.3g} > {tol:.3g} against each example alone); use "
            "sdpa or eager attention, or packing=False (--no-packing) to pad each example instead")
