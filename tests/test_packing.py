"""Packed examples (fastkd.data.pack_examples) through a real transformers model: the loss and its
gradient on a packed batch equal those of the examples run one by one, and
`fastkd.models.check_packing` refuses a model whose attention lets packed examples see each
other."""

from __future__ import annotations

import pytest
import torch

from fastkd import reference
from fastkd.data import pack_examples
from fastkd.models import check_packing
from fastkd.options import DistillOptions

VOCAB = 64
IGNORE = DistillOptions.ignore_index


def llama(attn: str, hidden: int, layers: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64, initializer_range=0.3,
                         attn_implementation=attn)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).double()


def examples(lengths, seed=0):
    """Random (ids, targets): a prompt of a third of the tokens, then targets."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (n,), generator=g).tolist(),
             [i >= n // 3 for i in range(n)]) for n in lengths]


def summed_loss(student, teacher, inputs: dict, labels: torch.Tensor, opts,
                use_cache: bool = False) -> torch.Tensor:
    s = student(**inputs, use_cache=use_cache).logits[:, :-1]
    with torch.no_grad():
        t = teacher(**inputs, use_cache=use_cache).logits[:, :-1]
    return reference.token_losses(s.reshape(-1, VOCAB), t.reshape(-1, VOCAB),
                                  labels[:, 1:].reshape(-1), opts)[0].sum()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_packed_batch_has_the_loss_and_gradient_of_its_examples_run_alone(attn):
    student, teacher = llama(attn, 32, 2, seed=0), llama(attn, 48, 1, seed=1)
    opts = DistillOptions(temperature=2.0, kd_weight=0.5, ce_weight=0.5)
    parts = examples((7, 3, 9, 5, 4, 11, 2))
    packed = pack_examples(parts, seq_len=16, pad_id=0)
    assert len(packed) < len(parts) and packed.position_ids is not None  # several a row

    loss = summed_loss(student, teacher, packed.model_inputs(), packed.labels(IGNORE), opts)
    grad = torch.autograd.grad(loss, list(student.parameters()))
    alone = 0.0
    for ids, targets in parts:
        ids = torch.tensor([ids])
        labels = ids.masked_fill(~torch.tensor([[False] + targets[1:]]), IGNORE)
        alone = alone + summed_loss(student, teacher, {"input_ids": ids}, labels, opts)
    alone_grad = torch.autograd.grad(alone, list(student.parameters()))
    tol = 1e-12 if attn == "sdpa" else 1e-6  # eager takes its softmax in fp32
    assert float(loss.detach()) == pytest.approx(float(alone.detach()), rel=tol)
    for g, h in zip(grad, alone_grad, strict=True):
        torch.testing.assert_close(g, h, rtol=tol, atol=tol * h.abs().max())

    # With a 2-D attention mask, or a KV cache, the examples would see each other.
    mask = {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask}
    with torch.no_grad():
        for inputs, use_cache in ((mask, False), (packed.model_inputs(), True)):
            leaky = summed_loss(student, teacher, inputs, packed.labels(IGNORE), opts, use_cache)
            assert abs(float(leaky) - float(alone)) > 1e-3 * abs(float(alone))
    check_packing(student, "student")


def test_check_packing_refuses_a_model_that_ignores_position_ids():
    from transformers import LlamaForCausalLM

    class NoPositions(LlamaForCausalLM):
        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    model = llama("sdpa", 32, 1, seed=0)
    model.__class__ = NoPositions
    with pytest.raises(ValueError, match=r"teacher model .* packed examples attend to each other"
                                         r".*--no-packing"):
        check_packing(model, "teacher")
