"""SFT behaviour on the tiny model: what trains, what does not, what the run leaves behind."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

from llmtune.config import load_recipe
from llmtune.train import sft
from tests.helpers import run_cli, write_recipe


def _base_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_lora_changes_only_the_adapter_and_loss_falls(tmp_path, chat_file):
    recipe = load_recipe(write_recipe(tmp_path, chat_file, train={"epochs": 6, "logging_steps": 1}))
    session = sft.build_trainer(recipe)
    model = session.trainer.model
    base_before, lora_before = _base_state(model), _lora_state(model)
    assert lora_before and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)

    session.trainer.train()

    for name, tensor in _base_state(model).items():
        assert torch.equal(tensor, base_before[name]), f"base weight changed: {name}"
    changed = [n for n, t in _lora_state(model).items() if not torch.equal(t, lora_before[n])]
    assert len(changed) == len(lora_before), "every LoRA matrix should move"
    losses = [r["loss"] for r in session.trainer.state.log_history if "loss" in r]
    assert len(losses) >= 30
    assert sum(losses[-5:]) / 5 < 0.9 * sum(losses[:5]) / 5, losses  # a random tiny model moves slowly


def test_train_command_writes_a_complete_loadable_run(tmp_path, chat_file):
    path = write_recipe(tmp_path, chat_file, data={"train": [{"path": str(chat_file)}], "validation_fraction": 0.25})
    result = run_cli("train", str(path))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja",
            "recipe.yaml", "manifest.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pkl", ".pth"))], files  # safe formats only
    assert "{% generation %}" in (out / "chat_template.jinja").read_text()  # the template the data used

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["train"]["rows"] == 18 and manifest["data"]["validation"]["rows"] == 6
    assert manifest["data"]["sources"][0]["sha256"] and manifest["seed"] == 0
    assert manifest["libraries"]["trl"] and manifest["wall_seconds"] > 0
    assert manifest["train"]["tokens_per_second"] > 0 and manifest["memory"]["peak_rss_mb"] > 100
    assert any("eval_loss" in r for r in manifest["train"]["log"])
    assert load_recipe(out / "recipe.yaml").train == load_recipe(path).train  # the resolved recipe round-trips

    # A second run into a finished folder is refused, not mixed in.
    again = run_cli("train", str(path))
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    # --overwrite starts again: the old manifest is gone before training, a new one marks the new run.
    overwritten = run_cli("train", str(path), "--overwrite", "--set", "train.max_steps=2")
    assert overwritten.returncode == 0, overwritten.stderr[-2000:]
    assert json.loads((out / "manifest.json").read_text())["train"]["steps"] == 2

    # The adapter loads with plain transformers + peft in a fresh process and generates.
    script = f"""
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
base = AutoModelForCausalLM.from_pretrained({str(manifest_base(out))!r})
model = PeftModel.from_pretrained(base, {str(out)!r})
tok = AutoTokenizer.from_pretrained({str(out)!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "What is item 3?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=5, do_sample=False)
print(out.shape[1] - ids["input_ids"].shape[1])
"""
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert int(loaded.stdout.strip().splitlines()[-1]) >= 1


def manifest_base(out):
    from llmtune.builtin_models import cache_dir

    assert "builtin:tiny" in (out / "recipe.yaml").read_text()
    return cache_dir() / "models" / "tiny"


def _loss_curve(tmp_path, chat_file, batch_size: int, grad_accum: int) -> list[float]:
    folder = tmp_path / f"b{batch_size}x{grad_accum}"
    folder.mkdir()
    recipe = load_recipe(
        write_recipe(
            folder,
            chat_file,
            # random batches and fp32: length grouping orders rows by batch size, bf16 rounds sums differently
            train={"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 5, "logging_steps": 1,
                   "learning_rate": 1e-2, "lr_scheduler": "constant", "group_by_length": False, "precision": "fp32"},
        )
    )
    session = sft.build_trainer(recipe)
    session.trainer.train()
    return [r["loss"] for r in session.trainer.state.log_history if "loss" in r]


def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, chat_file):
    big_batch = _loss_curve(tmp_path, chat_file, batch_size=4, grad_accum=1)
    accumulated = _loss_curve(tmp_path, chat_file, batch_size=1, grad_accum=4)
    assert len(big_batch) == len(accumulated) == 5
    assert big_batch[-1] < big_batch[0]  # it trains, so equal curves are not trivially flat
    assert accumulated == pytest.approx(big_batch, rel=1e-3), (big_batch, accumulated)


def test_packed_rows_never_attend_across_samples(tmp_path, chat_file):
    recipe = load_recipe(
        # fp32: the comparison below is exact to 1e-5
        write_recipe(tmp_path, chat_file, data={"train": [{"path": str(chat_file)}], "packing": True, "max_length": 96},
                     train={"precision": "fp32"})
    )
    session = sft.build_trainer(recipe)
    trainer = session.trainer
    batch = next(iter(trainer.get_train_dataloader()))
    positions, input_ids = batch["position_ids"][0], batch["input_ids"][0]
    starts = (positions == 0).nonzero().flatten().tolist()
    assert len(starts) >= 3, "several samples should share a packed row"
    assert "attention_mask" not in batch or batch["attention_mask"] is None  # padding-free: isolation by positions

    model = trainer.model.eval()
    with torch.no_grad():
        packed_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
        bounds = [*starts, len(input_ids)]
        for begin, end in itertools.pairwise(bounds):
            alone = model(input_ids=input_ids[begin:end].unsqueeze(0)).logits[0]
            torch.testing.assert_close(packed_logits[begin:end], alone, atol=1e-5, rtol=1e-4)
    # Labels at each sample start are masked, so no sample learns to predict the next one's first token.
    assert all(batch["labels"][0][s] == -100 for s in starts)


@pytest.mark.parametrize("adapter", [{"kind": "dora"}, {"rslora": True}, {"target_modules": ["q_proj", "v_proj"]}])
def test_adapter_variants_train_and_save_their_config(tmp_path, chat_file, adapter):
    recipe = load_recipe(write_recipe(tmp_path, chat_file, adapter=adapter, train={"max_steps": 3}))
    sft.main(recipe)
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["use_dora"] == (adapter.get("kind") == "dora")
    assert config["use_rslora"] == adapter.get("rslora", False)
    expected = set(adapter.get("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                     "down_proj"]))
    assert {name.rsplit(".", 1)[-1] for name in config["target_modules"]} == expected
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "adapter_model.safetensors")
    assert any("lora_magnitude_vector" in k for k in weights) == (adapter.get("kind") == "dora")
    assert all(w.abs().sum() > 0 for k, w in weights.items() if "lora_B" in k)  # B starts at zero; it moved


def test_group_by_length_batches_rows_of_similar_length(tmp_path):
    """`train.group_by_length`: transformers' LengthGroupedSampler, so batches pad far less than random ones."""
    rows = [{"messages": [{"role": "user", "content": f"Question {i}?"},
                          {"role": "assistant", "content": " ".join(["word"] * (1 + (i * 7) % 40))}]}
            for i in range(48)]
    data = tmp_path / "varied.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    padding = {}
    for grouped in (False, True):
        recipe = load_recipe(write_recipe(tmp_path, data, train={"batch_size": 4, "group_by_length": grouped}))
        loader = sft.build_trainer(recipe).trainer.get_train_dataloader()
        padding[grouped] = sum(int((batch["attention_mask"] == 0).sum()) for batch in loader)
    assert padding[True] < padding[False] / 2, padding
