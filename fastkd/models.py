"""Causal LMs as the fused loss sees them: `softcap(base(x).last_hidden_state @ W^T + b)`.

Loading through `from_pretrained` with errors that name the role, splitting a model into its base
and its LM head (refusing heads whose logits the fused loss cannot reproduce), the head's effective
weight under a PEFT adapter (`head_weight_and_bias`), and the tokenizer checks.
Shared by the trainer, the teacher cache and the Hugging Face integrations.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fastkd import reference

# Config attributes of heads that rescale logits after the matmul (the fused loss would drop them).
SCALED_LOGITS = {
    "logit_scale": "multiplies its logits by it (Cohere)",
    "logits_scaling": "divides its logits by it (Granite)",
    "lm_head_multiplier": "multiplies its logits by it (Falcon-H1)",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class LMHead:
    """A causal LM as the fused loss sees it: `softcap(base(x).last_hidden_state @ W^T + b)`."""

    model: torch.nn.Module
    base: torch.nn.Module
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    softcap: float | None

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
    (`full_tensor()`, whose backward reduce-scatters the gradient). Refused with a ValueError,
    since one (weight, bias) cannot express them: active lora_dropout (dropout on the LoRA branch's
    input only), DoRA and the other LoRA variants, and any other PEFT tuner on the head.
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
    """A DTensor (an FSDP2 shard) as one plain tensor; any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def lm_head(model: torch.nn.Module, role: str, probe: bool = True) -> LMHead:
    """Check that `model`'s logits are its head applied to its base's hidden states, and split it.

    Gemma-2-style `final_logit_softcapping` becomes the loss's softcap; heads that rescale logits
    (`logit_scale`, `logits_scaling`, ...) are refused. A probe on 8 tokens then compares the
    model's own logits with the recomposed ones, which catches any other post-processing.
    probe=False skips it (the config checks stay): for a model already sharded by FSDP or
    DeepSpeed ZeRO-3, whose weights outside its own forward are shards.
    """
    name = getattr(model, "name_or_path", "") or type(model).__name__
    config = model.config.get_text_config()
    for attr, what in SCALED_LOGITS.items():
        value = getattr(config, attr, None)
        if value is not None and value != 1:
            raise ValueError(
                f"{role} model {name}: its head {what} (config.{attr}={value}); fastkd computes "
                "logits from the head weight and the base's hidden states and would drop that "
                "scale, so it refuses this model"
            )
    softcap = getattr(config, "final_logit_softcapping", None)
    base = model.base_model
    head = model.get_output_embeddings()
    if base is model or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(f"{role} model {name}: expected a causal LM with a base model and a "
                         f"linear output layer, got {type(model).__name__}")
    bias = getattr(head, "bias", None)
    result = LMHead(model, base, head.weight, bias, None if softcap is None else float(softcap))
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
        got = reference.softcap(h @ weight.float().T + (0 if bias is None else bias.float()),
                                result.softcap)
    model.train(was_training)
    tol = (1e-4 if weight.dtype == torch.float32 else 3e-2) * max(1.0, expected.abs().max())
    err = (expected - got).abs().max().item()
    if err > tol:
        raise ValueError(
            f"{role} model {name}: its logits are not its output layer applied to the base model's "
            f"last hidden state (max |difference| {err:.3g} > {tol:.3g}): the model post-processes "
            "logits in a way fastkd cannot reproduce, so it refuses this model"
        )
    return result


def from_pretrained(auto_class, source: str, role: str, **kwargs):
    """`auto_class.from_pretrained(source)`, with errors that name the role and the source.

    A source that cannot be a hub id ("name" or "org/name") must be a local directory: fail at
    once rather than after the hub's retries.
    """
    path = Path(source).expanduser()
    if not path.exists() and (path.is_absolute() or source.startswith((".", "~"))
                              or source.count("/") > 1):
        raise FileNotFoundError(f"{role}: no such model directory: {source}")
    try:
        return auto_class.from_pretrained(str(path) if path.exists() else source, **kwargs)
    except OSError as err:
        raise OSError(f"{role} {source!r}: not a loadable local directory, and not loadable from "
                      f"the Hugging Face Hub: {err}") from err


def load_lm(name_or_path: str, role: str, dtype: torch.dtype, device: torch.device) -> LMHead:
    from transformers import AutoModelForCausalLM

    model = from_pretrained(AutoModelForCausalLM, name_or_path, role, dtype=dtype)
    model.config.use_cache = False
    return lm_head(model.to(device), role)


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
