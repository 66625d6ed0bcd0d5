"""QLoRA on CPU: 4-bit base + LoRA trains with the gradients of an equivalent float model.

Guards the bitsandbytes 0.50.2 AVX512-BF16 bug (see llmtune.models.guard_bnb_cpu_kernels): an eval-mode
no-grad forward repacks the 4-bit weights for a kernel without autograd, after which LoRA gradients are
silently wrong. With the guard the gradients equal a float twin's; without it they do not.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM

from llmtune.config import AdapterSection, ModelSection, QuantizationSection, load_recipe
from llmtune.models import load_model
from llmtune.train import sft
from llmtune.train.adapters import lora_config
from tests.helpers import write_recipe

HAS_AVX512_BF16 = bool(bnb.functional.has_avx512bf16())


def _qlora_model(model_dir):
    quant = QuantizationSection(load_in="4bit", compute_dtype="float32")
    model = load_model(ModelSection(name_or_path=str(model_dir), dtype="float32"), quant)
    torch.manual_seed(0)
    model = get_peft_model(model, lora_config(AdapterSection(r=4, alpha=8, dropout=0.0)))
    with torch.no_grad():  # non-zero B, so gradients flow into A as well
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def _float_twin(qmodel, model_dir):
    """The same network in fp32: base weights are the dequantized 4-bit ones, LoRA weights copied."""
    twin = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    twin = get_peft_model(twin, lora_config(AdapterSection(r=4, alpha=8, dropout=0.0)))
    twin_modules = dict(twin.named_modules())
    with torch.no_grad():
        for name, module in qmodel.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                twin_modules[name].weight.copy_(weight.float())
        qparams = dict(qmodel.named_parameters())
        for name, param in twin.named_parameters():
            if "lora_" in name:
                param.copy_(qparams[name])
    return twin


def _lora_grads(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _worst_relative_error(grads, reference) -> float:
    return max(((grads[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference)


def _grads_after_an_eval_forward(model, ids) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():  # what the Trainer's evaluation loop and generation do
        model(input_ids=ids[:1, :1])
    return _lora_grads(model, ids)


def test_loading_4bit_guards_every_quantized_layer(tiny_model_dir):
    model = _qlora_model(tiny_model_dir)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    assert all(m.support_avx512bf16_for_cpu is False for m in layers)


def test_qlora_gradients_match_float_reference_with_guard(tiny_model_dir):
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    model = _qlora_model(tiny_model_dir)
    reference = _lora_grads(_float_twin(model, tiny_model_dir), ids)
    assert _worst_relative_error(_lora_grads(model, ids), reference) < 1e-4
    assert _worst_relative_error(_grads_after_an_eval_forward(model, ids), reference) < 1e-4


@pytest.mark.skipif(not HAS_AVX512_BF16, reason="the bnb bug only exists on CPUs with AVX512-BF16")
def test_without_guard_gradients_go_wrong(tiny_model_dir):
    ids = torch.randint(3, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    model = _qlora_model(tiny_model_dir)
    reference = _lora_grads(_float_twin(model, tiny_model_dir), ids)
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = True  # bitsandbytes' own default on this CPU
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        grads = _grads_after_an_eval_forward(model, ids)
    assert _worst_relative_error(grads, reference) > 0.1


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().view(torch.uint8).clone()


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_sft_trains_the_adapter_and_keeps_the_base(tmp_path, chat_file, bits):
    recipe = load_recipe(
        write_recipe(
            tmp_path,
            chat_file,
            quantization={"load_in": bits, "compute_dtype": "float32"},
            data={"train": [{"path": str(chat_file)}], "validation_fraction": 0.25},
            train={"max_steps": 8, "eval_steps": 4, "logging_steps": 1},
        )
    )
    session = sft.build_trainer(recipe)
    model = session.trainer.model
    # Packed 4-bit weights are stored in a float dtype; compare their bytes (some bit patterns are NaNs).
    packed = {n: _bits(p) for n, p in model.named_parameters() if "lora_" not in n}
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    session.trainer.train()  # evaluates mid-run: exactly the eval-then-train pattern the guard is for
    after = dict(model.named_parameters())
    assert all(torch.equal(_bits(after[n]), t) for n, t in packed.items())
    assert all(not torch.equal(after[n].detach(), t) for n, t in lora.items())
    assert any("eval_loss" in r for r in session.trainer.state.log_history)
