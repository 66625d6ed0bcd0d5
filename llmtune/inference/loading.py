"""Load what to generate with: a base model (hub id, folder, .gguf, builtin) or a trained run folder, plus any
number of named adapters on the one base. A run folder brings its base (from its saved recipe) and the chat
template it was trained with."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedModel

from llmtune.config import ModelSection
from llmtune.errors import LlmtuneError
from llmtune.models import load_model, load_tokenizer, resolve_source

log = logging.getLogger("llmtune.inference")

BASE = "__base__"  # peft's name for "no adapter" in mixed-adapter batches


class InferenceLoadError(LlmtuneError, ValueError):
    pass


@dataclass
class Loaded:
    model: PreTrainedModel
    tokenizer: object
    base_name: str  # what clients call the base model
    adapters: dict[str, Path] = field(default_factory=dict)  # name -> adapter folder
    base: ModelSection | None = None  # how the base was loaded

    @property
    def names(self) -> list[str]:
        return [self.base_name, *self.adapters]

    def adapter_for(self, name: str) -> str:
        """peft adapter name for a served model name (BASE for the base)."""
        if name == self.base_name:
            return BASE
        if name in self.adapters:
            return name
        raise KeyError(name)


def is_run_folder(path: str | Path) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and (path / "recipe.yaml").is_file()


def _base_section(target: str) -> ModelSection:
    if is_run_folder(target):
        saved = yaml.safe_load((Path(target) / "recipe.yaml").read_text())
        return ModelSection.model_validate(saved["model"])
    return ModelSection(name_or_path=target)


def serves_base_of(loaded: Loaded, target: str) -> bool:
    """Whether `loaded` already holds the model `target` names (a plain model, loaded the same way): its base
    with the adapters off serves it, no second copy needed."""
    return loaded.base is not None and not is_run_folder(target) and _base_section(target) == loaded.base


def load_for_inference(target: str, adapters: dict[str, str] | None = None) -> Loaded:
    """`target` is a model or a run folder; `adapters` maps served names to more run/adapter folders."""
    from llmtune.inference.classifier import is_classifier_run

    for folder in [target, *(adapters or {}).values()]:
        if is_classifier_run(folder):  # its head predicts labels; there is no LM head to generate with
            raise InferenceLoadError(f"{folder} is a classification run: load it with llmtune.inference."
                                     "classifier.load_classifier, or evaluate it with a `kind: classification` task")
    section = _base_section(target)
    source = resolve_source(section)
    named: dict[str, Path] = {}
    if is_run_folder(target):
        named[Path(target).resolve().name] = Path(target).resolve()
    for name, folder in (adapters or {}).items():
        if not (Path(folder) / "adapter_config.json").is_file():
            raise InferenceLoadError(f"--adapter {name}={folder}: no adapter_config.json there")
        named[name] = Path(folder).resolve()
    # The chat template travels with a trained run; otherwise the base tokenizer's own.
    tokenizer = AutoTokenizer.from_pretrained(named[next(iter(named))]) if named else load_tokenizer(section, source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    model = load_model(section, None, source)
    if named:
        first, *rest = named.items()
        model = PeftModel.from_pretrained(model, str(first[1]), adapter_name=first[0])
        for name, folder in rest:
            model.load_adapter(str(folder), adapter_name=name)
    model.eval()
    base_name = Path(section.name_or_path).name if Path(section.name_or_path).exists() else section.name_or_path
    log.info("serving %s%s", base_name, f" with adapters {', '.join(named)}" if named else "")
    return Loaded(model, tokenizer, base_name, named, section)
