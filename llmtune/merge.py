"""Merge a trained adapter into its base, verified; or combine several adapters of one base into one.

Merging into a 4-bit base silently ruins quality (peft#2321, transformers#31293), so the base is always
loaded in float here, whatever the run trained on. The merged model's logits are compared with the adapter
model's on probe prompts; beyond the tolerance nothing is written.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Literal

import torch
import yaml
from peft import PeftModel
from transformers import AutoTokenizer

from llmtune.atomic import atomic_folder
from llmtune.config import ModelSection
from llmtune.errors import LlmtuneError
from llmtune.models import load_model

log = logging.getLogger("llmtune.merge")

MERGE_MANIFEST = "llmtune-merge.json"
CombineMethod = Literal["linear", "cat", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
_PROBES = [
    [{"role": "user", "content": "What is the first-line treatment for type 2 diabetes?"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name one ACE inhibitor."}],
]


class MergeError(LlmtuneError, RuntimeError):
    pass


def run_base(run: Path) -> ModelSection:
    """The base model of a finished run, from its saved recipe, in float even if it trained in 4/8-bit."""
    saved = run / "recipe.yaml"
    if not (run / "adapter_config.json").is_file() or not saved.is_file():
        raise MergeError(f"{run}: not a finished llmtune run with an adapter (adapter_config.json, recipe.yaml)")
    recipe = yaml.safe_load(saved.read_text())
    if recipe.get("task") == "classification":  # the base would load as a causal LM, without the trained head
        raise MergeError(f"{run}: a classification run is used as its adapter (llmtune.inference.classifier); "
                         "merging it is not supported")
    section = ModelSection.model_validate(recipe["model"])
    if section.dtype == "auto":
        section = section.model_copy(update={"dtype": "float32"})
    return section


@torch.no_grad()
def merge_run(run: Path, output: Path, atol: float = 1e-3) -> Path:
    run, output = Path(run).resolve(), Path(output).resolve()
    tokenizer = AutoTokenizer.from_pretrained(run)
    base = load_model(run_base(run))  # never quantized: load_model gets no quantization section
    if not base.dtype.is_floating_point:
        raise MergeError(f"{run}: the base loaded as {base.dtype}; merging needs a float base")
    model = PeftModel.from_pretrained(base, str(run)).eval()
    probes = [_encode(tokenizer, messages) for messages in _PROBES]
    expected = [model(input_ids=ids).logits for ids in probes]
    merged = model.merge_and_unload().eval()
    worst = max((merged(input_ids=ids).logits - ref).abs().max().item() for ids, ref in zip(probes, expected,
                                                                                                strict=True))
    if worst > atol:
        raise MergeError(f"merged model differs from adapter model by {worst:.3g} in logits (> {atol}); "
                         "nothing was written")
    log.info("merged %s: max logit difference %.2e (tolerance %.0e)", run, worst, atol)
    with atomic_folder(output) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        shutil.copy(run / "recipe.yaml", staging / "recipe.yaml")
        (staging / MERGE_MANIFEST).write_text(json.dumps(
            {"source_run": str(run), "base": run_base(run).name_or_path, "dtype": str(merged.dtype),
             "max_logit_difference": worst, "tolerance": atol}, indent=2))
    return output


def combine_runs(runs: list[Path], output: Path, method: CombineMethod, weights: list[float] | None = None,
                 density: float = 0.5) -> Path:
    """One adapter from several trained on the same base (PEFT `add_weighted_adapter`)."""
    runs = [Path(r).resolve() for r in runs]
    if len(runs) < 2:
        raise MergeError("--combine needs at least two runs")
    bases = {str(r): run_base(r) for r in runs}
    identities = {(b.name_or_path, b.revision, b.gguf_file) for b in bases.values()}
    if len(identities) > 1:
        listing = "; ".join(f"{run}: {b.name_or_path}" for run, b in bases.items())
        raise MergeError(f"adapters trained on different bases cannot be combined: {listing}")
    weights = weights or [1.0 / len(runs)] * len(runs)
    if len(weights) != len(runs):
        raise MergeError(f"--weights: {len(weights)} values for {len(runs)} runs")
    model = PeftModel.from_pretrained(load_model(run_base(runs[0])), str(runs[0]), adapter_name="a0")
    for index, run in enumerate(runs[1:], start=1):
        model.load_adapter(str(run), adapter_name=f"a{index}")
    names = [f"a{i}" for i in range(len(runs))]
    kwargs = {"density": density} if method.startswith(("ties", "dare", "magnitude")) else {}
    model.add_weighted_adapter(names, weights, adapter_name="combined", combination_type=method, **kwargs)
    with atomic_folder(output) as staging:
        model.save_pretrained(str(staging), selected_adapters=["combined"])
        for item in (staging / "combined").iterdir():  # PEFT nests non-default adapters in a subfolder
            item.rename(staging / item.name)
        (staging / "combined").rmdir()
        AutoTokenizer.from_pretrained(runs[0]).save_pretrained(staging)
        shutil.copy(runs[0] / "recipe.yaml", staging / "recipe.yaml")
        (staging / MERGE_MANIFEST).write_text(json.dumps(
            {"combined_from": [str(r) for r in runs], "method": method, "weights": weights, "density": density,
             "recipes": {str(r): yaml.safe_load((r / "recipe.yaml").read_text()) for r in runs}}, indent=2))
    return output


def _encode(tokenizer, messages) -> torch.Tensor:
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    return encoded["input_ids"]
