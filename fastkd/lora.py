"""LoRA students through PEFT: rank-r adapters on the student's linear layers, the base frozen.

`add_lora` injects the adapters (`peft.get_peft_model`, lora_dropout 0) into the Hugging Face
model itself, which then goes through the trainer unchanged: the fused loss takes the output
layer's effective weight `W + (alpha / r) B @ A` (`fastkd.models.head_weight_and_bias`), so its
gradient reaches the output layer's adapter too. A checkpoint holds the adapter alone, in PEFT's
format (`save_adapter`: adapter_config.json and adapter_model.safetensors); resuming loads the
initial student again and the adapter into it (`load_adapter`), which is exact since the base
never changes. `export_merged` writes the finished student as a plain HF model with the adapters
merged into its weights, and the adapter beside it.

Under torchrun the adapted model is wrapped (DDP or FSDP2) like any student; its checkpoints are
the DCP shards of the trained parameters, the adapters alone (fastkd.distributed.save_shards
leaves the frozen base out), and the export gathers the model once to rank 0, which saves the
adapter and merges it as one process does.
"""

from __future__ import annotations

from pathlib import Path

import torch

ADAPTER = "default"  # PEFT's adapter name
PREFIX = "base_model.model."  # a saved adapter's keys: the model's, as seen from the PeftModel


def has_adapters(model: torch.nn.Module) -> bool:
    """Whether add_lora injected adapters into model."""
    return bool(getattr(model, "peft_config", None))


def linear_layer_names(model: torch.nn.Module) -> list[str]:
    """The last name part of every nn.Linear in model (q_proj, ..., lm_head): the default
    targets, the output layer included."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def lora_config(model: torch.nn.Module, r: int, alpha: float | None, targets: list[str] | None):
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=0.0,
                      target_modules=targets or linear_layer_names(model), bias="none")


def add_lora(model: torch.nn.Module, r: int, alpha: float | None,
             targets: list[str] | None) -> torch.nn.Module:
    """Inject LoRA adapters into model, in place; only they require gradients. Returns model."""
    from peft import get_peft_model

    config = lora_config(model, r, alpha, targets)
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module name the model does not have
        raise ValueError(f"lora_targets {sorted(config.target_modules)}: {err}") from err
    return wrapped.get_base_model()  # model itself, the adapters inside


def save_adapter(model: torch.nn.Module, directory: Path,
                 state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter's weights and config in PEFT's format (PeftModel.from_pretrained loads it).
    state_dict: the model's, gathered whole (under torchrun), instead of model.state_dict()."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    # save_embedding_layers=False: the frozen output layer is not saved with its adapter.
    state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=ADAPTER,
                                      save_embedding_layers=False)
    save_file({PREFIX + k: v.detach().contiguous() for k, v in state.items()},
              str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    model.peft_config[ADAPTER].save_pretrained(str(directory))


def load_adapter(model: torch.nn.Module, directory: Path) -> None:
    """Load save_adapter's weights into a model with the same adapters injected (strict)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(str(directory / "adapter_model.safetensors"))
    state = {k.removeprefix(PREFIX): v for k, v in saved.items()}
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{directory}: the adapter does not fit the student (missing "
                         f"{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]})")


def export_merged(base: str, adapter: Path, tokenizer, target: Path, adapter_target: Path) -> None:
    """The base model with the adapter merged into its weights, as a plain HF model at target
    (with the tokenizer); the adapter itself copied to adapter_target. Both written whole into
    temp dirs, then renamed (fastkd.fsio)."""
    import shutil

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastkd import fsio

    if not adapter_target.exists():
        with fsio.temp_dir_beside(adapter_target) as tmp:
            shutil.copytree(adapter, tmp, dirs_exist_ok=True)
            fsio.publish_dir(tmp, adapter_target)
    if target.exists():
        return
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    with fsio.temp_dir_beside(target) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        fsio.publish_dir(tmp, target)
