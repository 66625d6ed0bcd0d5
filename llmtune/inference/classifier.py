"""A trained classifier from its run folder (`task: classification`): the base from the saved recipe with a head
over the recipe's labels, then the adapter (LoRA + the trained head) on it, or the fully fine-tuned model
itself; texts are tokenized exactly as in training and each gets one of the labels."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from peft import PeftModel
from transformers import AutoTokenizer

from llmtune.config import ClassificationSection, DataSection, ModelSection
from llmtune.data.classification import encode_text
from llmtune.errors import LlmtuneError
from llmtune.models import ModelSource, classifier_config, load_model, resolve_source


class ClassifierLoadError(LlmtuneError, ValueError):
    pass


@dataclass
class Classifier:
    model: torch.nn.Module
    tokenizer: object
    labels: list[str]
    max_length: int | None = None
    truncation: str = "keep_start"

    @torch.no_grad()
    def logits(self, texts: list[str], batch_size: int = 8) -> torch.Tensor:
        """[len(texts), len(labels)] float32 logits, in batches (right-padded; the head reads each row's last
        real token)."""
        self.model.eval()
        device = next(self.model.parameters()).device
        parts = []
        for start in range(0, len(texts), batch_size):
            rows = [{"input_ids": encode_text(self.tokenizer, text, self.max_length, self.truncation)}
                    for text in texts[start : start + batch_size]]
            batch = self.tokenizer.pad(rows, padding=True, return_tensors="pt").to(device)
            parts.append(self.model(**batch).logits.float().cpu())
        return torch.cat(parts) if parts else torch.empty(0, len(self.labels))

    def predict(self, texts: list[str], batch_size: int = 8) -> list[str]:
        return [self.labels[i] for i in self.logits(texts, batch_size).argmax(-1).tolist()]


@contextmanager
def _quiet_load_report() -> Iterator[None]:
    """transformers warns that the base has no head ("score.weight MISSING ... newly initialized"); the adapter's
    trained head replaces it right after, so here the warning would only mislead."""
    logger = logging.getLogger("transformers.modeling_utils")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def is_classifier_run(path: str | Path) -> bool:
    saved = Path(path) / "recipe.yaml"
    return saved.is_file() and (yaml.safe_load(saved.read_text()) or {}).get("task") == "classification"


def load_classifier(run: str | Path) -> Classifier:
    """The classifier a `task: classification` run saved (adapter + head, or the full model), in eval mode."""
    run = Path(run).resolve()
    if not is_classifier_run(run):
        raise ClassifierLoadError(f"{run}: not a finished `task: classification` run (recipe.yaml, weights)")
    saved = yaml.safe_load((run / "recipe.yaml").read_text())
    section = ClassificationSection.model_validate(saved["classification"])
    data = DataSection.model_validate(saved["data"])
    base = ModelSection.model_validate(saved["model"])
    tokenizer = AutoTokenizer.from_pretrained(run)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    config = classifier_config(section.labels, tokenizer.pad_token_id)
    if (run / "adapter_config.json").is_file():
        # Never quantized here, like llmtune/inference/loading.py: the adapter was trained on the same weights.
        with _quiet_load_report():
            model = load_model(base, None, resolve_source(base), **config)
        model = PeftModel.from_pretrained(model, str(run))
    else:  # full fine-tuning saved the whole classifier (config with its labels, weights)
        model = load_model(base.model_copy(update={"name_or_path": str(run), "gguf_file": None}), None,
                           ModelSource(str(run)), **config)
    model.eval()
    return Classifier(model, tokenizer, section.labels, data.max_length, data.truncation)
