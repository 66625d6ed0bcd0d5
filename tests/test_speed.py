"""The fast training defaults (llmtune/train/speed.py, lm_head.py, adapter_speed.py) and their numerics."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from llmtune.config import load_recipe
from llmtune.train import sft, speed
from llmtune.train.adapter_speed import SPARSE_MAX_P, DropoutLinear, dropped_positions, fuse_dropouts, fuse_lora_b
from llmtune.train.lm_head import OUTPUTS, install_label_only_lm_head
from tests.helpers import write_recipe


def _lora_model(model_dir, seed: int = 0):
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    add_fused_lm_head(base, outputs=OUTPUTS)  # what TRL's trainers install (SFT: three of these, DPO: all)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False))
    return model


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, vocab, (3, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 14:] = 0  # a padded row
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :8] = -100  # prompt positions carry no label
    return input_ids, attention_mask, labels


def test_label_only_head_matches_trls_full_head(tiny_model_dir):
    """Same loss, per-token outputs and LoRA gradients as TRL's fused head, which scores every position on CPU."""
    results = []
    for replace in (False, True):
        model = _lora_model(tiny_model_dir)
        if replace:
            assert install_label_only_lm_head(model.get_base_model())
        input_ids, attention_mask, labels = _batch(model.config.vocab_size)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out, grads))
    (theirs, their_grads), (ours, our_grads) = results
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    for field in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(ours, field), getattr(theirs, field), rtol=1e-4, atol=1e-5)
    assert torch.equal(ours.is_top1.bool(), theirs.is_top1.bool())
    assert torch.equal(ours.label_mask, theirs.label_mask)
    assert their_grads.keys() == our_grads.keys() and len(our_grads) > 0
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_label_only_head_computes_only_the_fields_the_trainer_asked_for(tiny_model_dir, tmp_path, chat_file):
    """TRL's SFT asks its head for log-probs, entropy and top-1 only; the other fields cost a pass over the
    vocabulary each, so they are None, as TRL's own head leaves them."""
    sft_fields = ("log_probs", "entropy", "is_top1")
    trainer = sft.build_trainer(load_recipe(write_recipe(tmp_path, chat_file, train={"max_steps": 1}))).trainer
    causal_lm = trainer.model.get_base_model()
    assert causal_lm._label_only_lm_head_fields == sft_fields  # read from the forward TRL's trainer patched

    results = []
    for replace in (False, True):
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        add_fused_lm_head(base, outputs=sft_fields)
        if replace:
            assert install_label_only_lm_head(base)
        input_ids, attention_mask, labels = _batch(base.config.vocab_size)
        results.append(base(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True))
    theirs, ours = results
    for field in ("log_sum_sq_probs", "mean_logits"):
        assert getattr(theirs, field) is None and getattr(ours, field) is None, field
    torch.testing.assert_close(ours.log_probs, theirs.log_probs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.entropy, theirs.entropy, rtol=1e-4, atol=1e-5)
    assert torch.equal(ours.is_top1.bool(), theirs.is_top1.bool())


@pytest.mark.parametrize("frozen_head", [True, False])
def test_label_only_head_scores_large_batches_in_chunks(tiny_model_dir, monkeypatch, frozen_head):
    """A frozen head (LoRA) scores blocks of rows with the hidden states' gradient computed on the way; a trained
    one (full fine-tuning) recomputes the log-probs of each chunk above CHUNK_ROWS. Either way the loss and the
    gradients do not depend on the block size."""
    from llmtune.train import lm_head

    def refuse(*args):
        raise AssertionError("wrong path")

    monkeypatch.setattr(lm_head, "_score_chunk" if frozen_head else "_FrozenHeadScores", refuse)
    results = []
    for size in (10_000, 1):  # FROZEN_HEAD_BLOCK 1 gives blocks of 16 rows; the batch has 30 labelled rows
        monkeypatch.setattr(lm_head, "FROZEN_HEAD_BLOCK" if frozen_head else "CHUNK_ROWS", size)
        if frozen_head:
            model = _lora_model(tiny_model_dir)
            install_label_only_lm_head(model.get_base_model())
        else:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
            add_fused_lm_head(model, outputs=OUTPUTS)
            install_label_only_lm_head(model)
        input_ids, attention_mask, labels = _batch(model.config.vocab_size)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (whole, whole_grads), (blocks, block_grads) = results
    for field in ("loss", *OUTPUTS):
        torch.testing.assert_close(getattr(blocks, field), getattr(whole, field), msg=field)
    assert len(block_grads) > 0
    for a, b in zip(whole_grads, block_grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.001])
def test_dropped_positions_drop_each_element_independently_with_probability_p(p):
    count = 400_000
    positions = dropped_positions(count, p, seed=0)
    assert positions.dtype == torch.int64
    assert bool((positions[1:] > positions[:-1]).all()) and positions[0] >= 0 and positions[-1] < count
    dropped = torch.zeros(count, dtype=torch.bool)
    dropped[positions] = True
    sd = (p * (1 - p) / count) ** 0.5
    assert abs(dropped.float().mean().item() - p) < 5 * sd
    for part in dropped.view(8, -1):  # uniform along the input
        assert abs(part.float().mean().item() - p) < 5 * sd * 8**0.5
    for lane in range(3):  # no structure in the position modulo a small number either
        assert abs(dropped[lane::3].float().mean().item() - p) < 5 * sd * 3**0.5
    # independence: after a dropped element, the next is dropped with probability p again
    follows = dropped[1:][dropped[:-1]].float()
    assert abs(follows.mean().item() - p) < 5 * (p * (1 - p) / len(follows)) ** 0.5
    assert torch.equal(dropped_positions(count, p, seed=0), positions)
    assert not torch.equal(dropped_positions(count, p, seed=1), positions)


def test_dropped_positions_for_inputs_smaller_than_one_draw():
    for count in (1, 2, 7):
        sizes = [len(dropped_positions(count, 0.5, seed)) for seed in range(400)]
        assert max(sizes) <= count and abs(sum(sizes) / 400 - count / 2) < 5 * (count / 4 / 400) ** 0.5
        assert all(bool((dropped_positions(count, 0.5, seed) < count).all()) for seed in range(50))


def _reference_dropout_linear(layer: DropoutLinear, x: torch.Tensor, seed: int) -> torch.Tensor:
    keep = torch.ones(x.numel())
    keep[dropped_positions(x.numel(), layer.dropout_p, seed)] = 0
    return torch.nn.functional.linear(x * keep.view(x.shape) / (1 - layer.dropout_p), layer.weight)


def test_fused_dropout_linear_matches_dropout_then_linear(monkeypatch):
    """Same output and gradients as dropout (with the same mask) followed by the LoRA A matmul."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 4, bias=False)
    layer.__class__, layer.dropout_p = DropoutLinear, 0.3
    x = torch.randn(2, 5, 12, requires_grad=True)
    seeds = []
    real_randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda *a, **k: seeds.append(int(real_randint(*a, **k))) or
                        torch.tensor(seeds[-1]))
    out = layer(x)
    (out * torch.arange(4.0)).sum().backward()
    fused_grads = x.grad.clone(), layer.weight.grad.clone()
    x.grad, layer.weight.grad = None, None
    expected = _reference_dropout_linear(layer, x, seeds[0])
    (expected * torch.arange(4.0)).sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(fused_grads[0], x.grad)
    torch.testing.assert_close(fused_grads[1], layer.weight.grad)
    layer.eval()
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight))


@pytest.mark.parametrize(("p", "fused"), [(0.1, True), (SPARSE_MAX_P, True), (0.9, False), (0.0, False)])
def test_only_dropout_up_to_the_sparse_limit_is_fused(tiny_model_dir, p, fused):
    """Above SPARSE_MAX_P, drawing each dropped position costs more than torch's dense dropout: PEFT's stays."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", lora_dropout=p))
    layers = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    assert fuse_dropouts(model) == (len(layers) if fused else 0)
    assert all(isinstance(m.lora_A["default"], DropoutLinear) == fused for m in layers)


def _lora_logits_and_grads(model_dir, fuse: bool, autocast: bool):
    model = _lora_model(model_dir)
    if fuse:
        assert fuse_lora_b(model) == sum(isinstance(m, LoraLinear) for m in model.modules()) > 0
    input_ids, attention_mask, _ = _batch(model.config.vocab_size)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return model, logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_addmm_lora_layers_match_peft(tiny_model_dir):
    """In fp32, the same output and gradients as PEFT's `result + lora_B(lora_A(x)) * scaling` (up to summation
    order); under bf16 autocast, as close to fp32 as PEFT's own bf16 path. Disabling the adapter (DPO's
    reference) and merging still go through PEFT."""
    _, reference, reference_grads = _lora_logits_and_grads(tiny_model_dir, fuse=False, autocast=False)
    model, logits, grads = _lora_logits_and_grads(tiny_model_dir, fuse=True, autocast=False)
    torch.testing.assert_close(logits, reference)
    for name, grad in reference_grads.items():  # the B product is summed into the output: rounding order only
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-4, msg=name)

    def error(a, b):
        return ((a - b).norm() / b.norm()).item()

    _, peft_bf16, peft_bf16_grads = _lora_logits_and_grads(tiny_model_dir, fuse=False, autocast=True)
    _, ours_bf16, ours_bf16_grads = _lora_logits_and_grads(tiny_model_dir, fuse=True, autocast=True)
    assert error(ours_bf16, reference) < 1.5 * error(peft_bf16, reference)
    ours_errors = [error(ours_bf16_grads[n], g) for n, g in reference_grads.items()]
    peft_errors = [error(peft_bf16_grads[n], g) for n, g in reference_grads.items()]
    assert max(ours_errors) < 1.5 * max(peft_errors) and sum(ours_errors) < 1.2 * sum(peft_errors)

    input_ids, attention_mask, _ = _batch(model.config.vocab_size)
    with torch.no_grad():
        with model.disable_adapter():
            without = model(input_ids=input_ids, attention_mask=attention_mask).logits
        assert not torch.allclose(without, logits)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        torch.testing.assert_close(without, base(input_ids=input_ids, attention_mask=attention_mask).logits)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, LoraLinear) for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=input_ids, attention_mask=attention_mask).logits, reference,
                                   rtol=1e-4, atol=1e-4)


def test_trainer_streamlines_the_adapter_under_bf16(tmp_path, chat_file):
    recipe = load_recipe(write_recipe(tmp_path, chat_file, adapter={"dropout": 0.05},
                                      train={"precision": "bf16", "max_steps": 1}))
    model = sft.build_trainer(recipe).trainer.model
    layers = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    assert layers and all(isinstance(m.lora_A["default"], DropoutLinear) for m in layers)
    assert all(isinstance(m.lora_dropout["default"], torch.nn.Identity) for m in layers)
    assert next(model.get_base_model().parameters()).dtype == torch.bfloat16  # frozen base stored in bf16
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # the adapter is not
    # PEFT's input casts are skipped only inside the trainer's autocast: a plain forward afterwards still works.
    with torch.no_grad():
        assert model.eval()(input_ids=torch.tensor([[3, 4, 5]])).logits.isfinite().all()


def test_fused_dropout_runs_reproduce(tmp_path, chat_file):
    """Masks come from torch's generator: two runs with one seed train the same adapter."""
    adapters = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        recipe = load_recipe(write_recipe(tmp_path / name, chat_file, adapter={"dropout": 0.2},
                                          train={"precision": "bf16", "max_steps": 3}))
        session = sft.build_trainer(recipe)
        session.trainer.train()
        adapters.append({n: p.detach().clone() for n, p in session.trainer.model.named_parameters() if p.requires_grad})
    assert all(torch.equal(adapters[0][n], adapters[1][n]) for n in adapters[0])


def _losses(tmp_path, chat_file, precision: str) -> list[float]:
    recipe = load_recipe(write_recipe(tmp_path / precision, chat_file,
                                      train={"precision": precision, "epochs": 4, "learning_rate": 1e-2,
                                             "logging_steps": 1}))
    session = sft.build_trainer(recipe)
    session.trainer.train()
    return [r["loss"] for r in session.trainer.state.log_history if "loss" in r]


def test_bf16_loss_curve_tracks_fp32(tmp_path, chat_file):
    """bf16 autocast over a bf16 base (the CPU default on AVX512-BF16/AMX) against fp32 over the same 24 steps:
    the per-step losses differ by 1% on average and 3% at most, the final loss by 1% at most (measured: 0.03%,
    0.24% and 0.02%)."""
    (tmp_path / "fp32").mkdir()
    (tmp_path / "bf16").mkdir()
    fp32 = _losses(tmp_path, chat_file, "fp32")
    bf16 = _losses(tmp_path, chat_file, "bf16")
    assert len(fp32) == len(bf16) == 24
    assert fp32[-1] < fp32[0] - 0.5, "training should make progress for the comparison to mean anything"
    gaps = [abs(b - f) / f for f, b in zip(fp32, bf16, strict=True)]
    assert sum(gaps) / len(gaps) < 0.01 and max(gaps) < 0.03, (gaps, fp32, bf16)
    assert gaps[-1] < 0.01


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the GPU decides")
def test_auto_precision_follows_the_cpu(monkeypatch):
    monkeypatch.setattr(speed, "cpu_supports_bf16", lambda: True)
    assert speed.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(speed, "cpu_supports_bf16", lambda: False)
    assert speed.resolve_precision("auto") == "fp32"
    assert speed.resolve_precision("fp32") == "fp32"


@pytest.mark.parametrize("available_gb, expected", [(1000.0, False), (0.001, True)])
def test_auto_gradient_checkpointing_decides_from_memory(tmp_path, chat_file, monkeypatch, caplog,
                                                         available_gb, expected):
    monkeypatch.setattr(speed, "available_memory_gb", lambda: available_gb)
    recipe = load_recipe(write_recipe(tmp_path, chat_file, train={"max_steps": 1}))
    assert recipe.train.gradient_checkpointing == "auto"
    with caplog.at_level(logging.INFO, logger="llmtune.train"):
        trainer = sft.build_trainer(recipe).trainer
    assert trainer.args.gradient_checkpointing is expected
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("gradient checkpointing"))
    assert line.startswith(f"gradient checkpointing {'on' if expected else 'off'}: ~") and "GB available" in line


def test_eager_attention_only_for_short_rows_on_cpu(tmp_path, chat_file):
    recipe = load_recipe(write_recipe(tmp_path, chat_file))
    on_cpu = not torch.cuda.is_available()
    short = speed.training_model(recipe, longest_row=40).section.attn_implementation
    long = speed.training_model(recipe, longest_row=900).section.attn_implementation
    assert (short, long) == (("eager" if on_cpu else "sdpa"), "sdpa")
    pinned = load_recipe(write_recipe(tmp_path, chat_file, model={"attn_implementation": "sdpa"}))
    assert speed.training_model(pinned, longest_row=40).section.attn_implementation == "sdpa"
