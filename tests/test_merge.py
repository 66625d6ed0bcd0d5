"""Merge (verified, float base, atomic, idempotent) and combine (same base only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from llmtune.config import load_recipe
from llmtune.merge import MERGE_MANIFEST, MergeError, combine_runs, merge_run
from llmtune.train import sft
from tests.helpers import copy_run_files, run_cli, write_recipe


def _train(folder: Path, chat_file: Path, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    train = {"max_steps": 6, "learning_rate": 2e-2, **sections.pop("train", {})}
    return sft.main(load_recipe(write_recipe(folder, chat_file, train=train, **sections)))


@pytest.fixture(scope="module")
def module_chat(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("merge-data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Dose {i}?"}, {"role": "assistant", "content": f"{i} mg."}]}
            for i in range(16)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, module_chat) -> Path:
    return _train(tmp_path_factory.mktemp("lora"), module_chat)


def test_merge_matches_the_adapter_model_and_loads_with_plain_transformers(run, tmp_path):
    result = run_cli("merge", str(run), "-o", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-2000:]
    merged = tmp_path / "merged"
    manifest = json.loads((merged / MERGE_MANIFEST).read_text())
    assert manifest["max_logit_difference"] <= 1e-3 and manifest["dtype"] == "torch.float32"
    assert (merged / "model.safetensors").is_file() and not (merged / "adapter_config.json").exists()

    script = f"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(merged)!r})
model = AutoModelForCausalLM.from_pretrained({str(merged)!r})
ids = tok.apply_chat_template([{{"role": "user", "content": "Dose 3?"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
print(tok.decode(model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]))
"""
    plain = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert plain.returncode == 0, plain.stderr[-2000:]

    from llmtune.inference.generation import GenerationRequest, generate
    from llmtune.inference.loading import load_for_inference

    loaded = load_for_inference(str(run))
    request = GenerationRequest(adapter=next(iter(loaded.adapters)), max_new_tokens=6,
                                messages=[{"role": "user", "content": "Dose 3?"}])
    ours = generate(loaded, [request])[0][0].text
    assert plain.stdout.strip().startswith(ours.strip()[:10])  # same greedy text from the merged model

    again = run_cli("merge", str(run), "-o", str(merged))  # running twice is safe
    assert again.returncode == 0 and (merged / MERGE_MANIFEST).is_file()


def test_a_corrupted_merge_is_caught_and_nothing_is_written(run, tmp_path, monkeypatch):
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.merge_and_unload

    def corrupting(self, *args, **kwargs):
        model = original(self, *args, **kwargs)
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight.add_(0.5)
        return model

    monkeypatch.setattr(BaseTuner, "merge_and_unload", corrupting)
    with pytest.raises(MergeError, match="nothing was written"):
        merge_run(run, tmp_path / "merged")
    assert not any(tmp_path.iterdir())


def test_merging_a_4bit_trained_run_uses_a_float_base(tmp_path, module_chat):
    qlora = _train(tmp_path / "qlora", module_chat, quantization={"load_in": "4bit", "compute_dtype": "float32"})
    merged = merge_run(qlora, tmp_path / "merged")
    manifest = json.loads((merged / MERGE_MANIFEST).read_text())
    assert manifest["dtype"] == "torch.float32" and manifest["max_logit_difference"] <= 1e-3
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear"])
def test_combined_adapters_load(run, tmp_path, module_chat, method, tiny_model_dir):
    other = _train(tmp_path / "other", module_chat, train={"learning_rate": 1e-2, "max_steps": 4})
    combined = combine_runs([run, other], tmp_path / "combined", method, [0.5, 0.5])
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(combined))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    manifest = json.loads((combined / MERGE_MANIFEST).read_text())
    assert manifest["method"] == method and len(manifest["recipes"]) == 2


def test_combining_adapters_of_different_bases_is_refused(run, tmp_path):
    foreign = copy_run_files(run, tmp_path / "foreign")
    recipe = (foreign / "recipe.yaml").read_text().replace("builtin:tiny", "builtin:smollm2-135m-instruct")
    (foreign / "recipe.yaml").write_text(recipe)
    result = run_cli("merge", str(run), str(foreign), "--combine", "ties", "-o", str(tmp_path / "out"))
    assert result.returncode == 2 and "trained on different bases cannot be combined" in result.stderr
    assert not (tmp_path / "out").exists()
