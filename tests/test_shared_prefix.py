"""Shared prefixes (llmtune/train/shared_prefix.py): the plan, and the same loss and gradients as the plain
forward when rows of a batch begin alike (a system prompt; a DPO pair's prompt)."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl.trainer.utils import add_fused_lm_head

import llmtune.train.shared_prefix as shared_prefix
from llmtune.config import load_recipe
from llmtune.train import sft
from llmtune.train.lm_head import OUTPUTS, install_label_only_lm_head
from llmtune.train.shared_prefix import RowPacking, plan_cost, plan_levels
from tests.helpers import write_recipe
from tests.test_speed import _lora_model


def _rows_batch(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (prompt, answer) rows; labels on the answers only."""
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        attention_mask[i, :n] = 1
        labels[i, len(prompt) : n] = torch.tensor(answer)
    return input_ids, attention_mask, labels


def _tokens(generator: torch.Generator, vocab: int, low: int, high: int) -> list[int]:
    return torch.randint(3, vocab, (int(torch.randint(low, high, (1,), generator=generator)),),
                         generator=generator).tolist()


def _sft_batch(vocab: int) -> tuple[torch.Tensor, ...]:
    """Five rows that share a 9-token system prompt, then differ."""
    g = torch.Generator().manual_seed(1)
    system = _tokens(g, vocab, 9, 10)
    return _rows_batch([(system + _tokens(g, vocab, 3, 9), _tokens(g, vocab, 2, 7)) for _ in range(5)])


def _dpo_batch(vocab: int) -> tuple[torch.Tensor, ...]:
    """TRL's [chosen; rejected] layout: three pairs, each pair one prompt; every prompt starts alike."""
    g = torch.Generator().manual_seed(2)
    system = _tokens(g, vocab, 6, 7)
    prompts = [system + _tokens(g, vocab, 5, 12) for _ in range(3)]
    chosen = [(p, _tokens(g, vocab, 2, 9)) for p in prompts]
    return _rows_batch(chosen + [(p, _tokens(g, vocab, 2, 9)) for p in prompts])


@pytest.fixture
def shared_calls(monkeypatch) -> list[int]:
    """Sharing forced on for any prefix (no pass cost); one entry per forward that took the shared path."""
    monkeypatch.setattr(shared_prefix, "LEVEL_COST_TOKENS", 0)
    calls: list[int] = []
    original = shared_prefix.shared_prefix_hidden
    monkeypatch.setattr("llmtune.train.lm_head.shared_prefix_hidden", lambda *args: calls.append(1) or original(*args))
    return calls


def _levels(levels) -> list[tuple[list[int], list[int], list[int] | None]]:
    return [(lv.rows.tolist(), lv.end.tolist(), None if lv.parent is None else lv.parent.tolist()) for lv in levels]


def test_the_plan_runs_the_batch_prefix_then_each_pairs_prompt_then_the_rows(monkeypatch):
    monkeypatch.setattr(shared_prefix, "LEVEL_COST_TOKENS", 0)
    input_ids, attention_mask, labels = _dpo_batch(500)
    levels = plan_levels(input_ids, attention_mask, labels[:, 1:] != -100)
    prompt_ends = [int((labels[i] != -100).int().argmax()) - 1 for i in range(3)]
    lengths = attention_mask.sum(1).tolist()
    assert _levels(levels) == [([0], [6], None), ([0, 1, 2], prompt_ends, [0, 0, 0]),
                               ([0, 1, 2, 3, 4, 5], lengths, [0, 1, 2, 0, 1, 2])]
    assert plan_cost(levels) < sum(lengths)


def test_the_plan_runs_every_row_as_one_level_when_sharing_saves_too_little():
    input_ids, attention_mask, labels = _sft_batch(500)
    label_mask = labels[:, 1:] != -100
    every_row = [([0, 1, 2, 3, 4], attention_mask.sum(1).tolist(), None)]
    assert _levels(plan_levels(input_ids, attention_mask, label_mask))[0] == ([0], [9], None)  # 4 x 9 tokens saved
    three_shared = input_ids.clone()
    three_shared[:, 3] = torch.arange(5) + 3  # 4 x 3 tokens saved: less than one more level costs
    assert _levels(plan_levels(three_shared, attention_mask, label_mask)) == every_row
    assert _levels(plan_levels(input_ids, attention_mask, label_mask, share_prefixes=False)) == every_row
    left_padded = attention_mask.flip(1)
    assert plan_levels(input_ids, left_padded, label_mask) is None  # only right padding is understood
    empty_row = attention_mask.clone()
    empty_row[2] = 0
    assert plan_levels(input_ids, empty_row, label_mask) is None


def test_the_packed_row_holds_each_real_token_once_in_row_order():
    input_ids, attention_mask, labels = _dpo_batch(500)
    lengths = attention_mask.sum(1)
    every_row = plan_levels(input_ids, attention_mask, labels[:, 1:] != -100, share_prefixes=False)
    ids, positions, (level,) = shared_prefix.pack_levels(input_ids, every_row)
    assert torch.equal(ids[0], input_ids[attention_mask.bool()])  # no padding token
    assert torch.equal(positions[0], torch.cat([torch.arange(int(n)) for n in lengths]))
    slots = ids[0][level.gather].view(level.units, level.width)  # attention's padded layout, back from the row
    assert torch.equal(slots[attention_mask.bool()], ids[0])
    assert torch.equal(level.gather[level.real], torch.arange(ids.shape[1]))


def _packed_and_plain(make_model, make_batch, calls: list[int]) -> list[tuple]:
    """(loss, log-probs, LoRA gradients) of the plain padded forward, then of the packed row."""
    results = []
    for packed in (False, True):
        model = make_model()
        packing = RowPacking(padding_free=packed, share_prefixes=packed)
        assert install_label_only_lm_head(model.get_base_model(), packing)
        input_ids, attention_mask, labels = make_batch(model.config.vocab_size)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), out.log_probs.detach(), grads))
        assert len(calls) == int(packed)  # the packed path ran exactly when asked for
    return results


def _assert_same(results: list[tuple]) -> None:
    (plain_loss, plain_logps, plain_grads), (loss, logps, grads) = results
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logps, plain_logps, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("make_batch", [_sft_batch, _dpo_batch], ids=["sft", "dpo"])
def test_shared_prefixes_give_the_plain_forwards_loss_and_gradients(tiny_model_dir, shared_calls, make_batch):
    _assert_same(_packed_and_plain(lambda: _lora_model(tiny_model_dir), make_batch, shared_calls))


def _windowed_lora_model(attention: str, window: int | None):
    """A random two-layer Qwen2 whose first layer attends to a sliding window of `window` tokens."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=window is not None,
                         sliding_window=window,
                         layer_types=["sliding_attention" if window else "full_attention", "full_attention"],
                         attn_implementation=attention)
    base = Qwen2ForCausalLM(config)
    add_fused_lm_head(base, outputs=OUTPUTS)
    return get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_the_packed_row_keeps_sliding_windows_under_either_attention(shared_calls, attention):
    results = _packed_and_plain(lambda: _windowed_lora_model(attention, 4), _dpo_batch, shared_calls)
    _assert_same(results)
    shared_calls.clear()
    unwindowed = _packed_and_plain(lambda: _windowed_lora_model(attention, None), _dpo_batch, shared_calls)
    assert abs(float(unwindowed[1][0] - results[1][0])) > 1e-4  # the window changed the loss: it was applied


def test_sft_with_and_without_shared_prefixes_trains_the_same_adapter(tmp_path, tiny_model_dir, shared_calls):
    """Through the real trainer (fp32, no dropout): the shared path is taken and changes nothing but speed."""
    calls = shared_calls
    rows = [{"messages": [{"role": "system", "content": "You are a careful clinical reference assistant."},
                          {"role": "user", "content": f"What is the usual dose of drug {i}?"},
                          {"role": "assistant", "content": f"Drug {i} is taken as {i % 4 + 1} mg once a day."}]}
            for i in range(16)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {}
    for share in (True, False):
        calls.clear()
        (tmp_path / f"share-{share}").mkdir()
        recipe_path = write_recipe(tmp_path / f"share-{share}", data, model={"name_or_path": str(tiny_model_dir)},
                                   adapter={"r": 8, "alpha": 16, "dropout": 0.0},
                                   train={"max_steps": 4, "batch_size": 8, "learning_rate": 1e-2, "logging_steps": 1,
                                          "precision": "fp32", "padding_free": share, "shared_prefix": share})
        runs[share] = sft.main(load_recipe(recipe_path))
        assert len(calls) == (4 if share else 0)  # one shared forward per step
    from safetensors.torch import load_file

    shared, plain = (load_file(runs[s] / "adapter_model.safetensors") for s in (True, False))
    assert shared.keys() == plain.keys()
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
    losses = [json.loads((runs[s] / "manifest.json").read_text())["train"]["final_loss"] for s in (True, False)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_grouped_eager_attention_is_transformers_eager_attention_without_the_copies():
    from transformers.models.gemma2 import modeling_gemma2
    from transformers.models.llama.modeling_llama import eager_attention_forward
    from transformers.models.qwen2 import modeling_qwen2

    g = torch.Generator().manual_seed(0)
    module = torch.nn.Module()
    module.num_key_value_groups = 3  # 6 query heads on 2 key-value heads
    query = torch.randn(2, 6, 5, 8, generator=g).requires_grad_()
    key, value = (torch.randn(2, 2, 7, 8, generator=g).requires_grad_() for _ in range(2))
    allowed = torch.rand(2, 1, 5, 7, generator=g) > 0.3
    allowed[..., 0] = True
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    outputs = []
    for attention in (eager_attention_forward, shared_prefix.grouped_eager_attention):
        output, _ = attention(module, query, key, value, mask, scaling=0.3)
        grads = torch.autograd.grad(output.square().sum(), (query, key, value))
        outputs.append((output, *grads))
    for ours, theirs in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(ours, theirs)
    # used for the plain eager attention that most model files copy, not for one with its own twist
    assert shared_prefix.is_plain_eager(modeling_qwen2.eager_attention_forward)
    assert not shared_prefix.is_plain_eager(modeling_gemma2.eager_attention_forward)  # softcapping
