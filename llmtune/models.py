"""Load a base model and its tokenizer as a recipe describes: hub id, local folder, GGUF file or builtin;
dtype; bitsandbytes 4-bit/8-bit; attention implementation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from llmtune.builtin_models import ensure_builtin
from llmtune.config import BUILTIN_PREFIX, ModelSection, QuantizationSection
from llmtune.errors import LlmtuneError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(LlmtuneError, RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    path: str  # folder or hub id
    gguf_file: str | None = None


def resolve_source(section: ModelSection) -> ModelSource:
    name = section.name_or_path
    if name.startswith(BUILTIN_PREFIX):
        return ModelSource(str(ensure_builtin(name.removeprefix(BUILTIN_PREFIX))))
    if name.endswith(".gguf"):
        return ModelSource(str(Path(name).parent), Path(name).name)
    return ModelSource(name, section.gguf_file)  # folder, or hub id (offline: read from the local hub cache)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}


def resolve_dtype(section: ModelSection) -> torch.dtype:
    if section.dtype != "auto":
        return _DTYPES[section.dtype]
    # Weights in bf16 where the accelerator computes in it natively; fp32 on CPU keeps numerics exact.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def quantization_config(section: QuantizationSection | None) -> BitsAndBytesConfig | None:
    if section is None:
        return None
    if section.load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=section.quant_type,
        bnb_4bit_use_double_quant=section.double_quant,
        bnb_4bit_compute_dtype=_DTYPES[section.compute_dtype],
        bnb_4bit_quant_storage=_DTYPES[section.compute_dtype],  # lets FSDP shard the packed weights
    )


def load_tokenizer(section: ModelSection, source: ModelSource | None = None):
    source = source or resolve_source(section)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.path,
            gguf_file=source.gguf_file,
            revision=section.revision,
            trust_remote_code=section.trust_remote_code,
        )
    except OSError as err:
        raise ModelLoadError(_explain_load_error(section.name_or_path, err)) from None
    if section.chat_template is not None:
        tokenizer.chat_template = Path(section.chat_template).read_text()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    section: ModelSection,
    quantization: QuantizationSection | None = None,
    source: ModelSource | None = None,
    device_map: str | dict | None = None,
    auto_class: type = AutoModelForCausalLM,
    **config_overrides,
) -> PreTrainedModel:
    """The model as `auto_class` (a causal LM unless told); `config_overrides` update its config (num_labels)."""
    source = source or resolve_source(section)
    kwargs = {
        "gguf_file": source.gguf_file,
        "revision": section.revision,
        "trust_remote_code": section.trust_remote_code,
        "dtype": resolve_dtype(section),
        # `auto` is decided per training run (llmtune/train/speed.py); everything else runs sdpa.
        "attn_implementation": "sdpa" if section.attn_implementation == "auto" else section.attn_implementation,
        "use_safetensors": None if source.gguf_file else True,  # never unpickle weights we did not write
        **config_overrides,
    }
    bnb = quantization_config(quantization)
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = device_map or {"": _local_device()}
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = auto_class.from_pretrained(source.path, **kwargs)
    except OSError as err:
        raise ModelLoadError(_explain_load_error(section.name_or_path, err)) from None
    if bnb is not None:
        guard_bnb_cpu_kernels(model)
    return model


def classifier_config(labels: list[str], pad_token_id: int | None) -> dict:
    """Config overrides that turn a base model into a sequence classifier over `labels` (in this order).

    The pad id is how decoder classifiers (Llama's `score` head) find each row's last real token."""
    return {
        "auto_class": AutoModelForSequenceClassification,
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {label: index for index, label in enumerate(labels)},
        "problem_type": "single_label_classification",
        "pad_token_id": pad_token_id,
    }


def _local_device() -> str | int:
    if torch.cuda.is_available():
        return int(os.environ.get("LOCAL_RANK", "0"))
    return "cpu"


def guard_bnb_cpu_kernels(model: torch.nn.Module) -> int:
    """Keep bitsandbytes off its AVX512-BF16 CPU repack path; returns how many modules were guarded.

    Upstream bug (bitsandbytes 0.50.2, CPU only): on AVX512-BF16 CPUs a no-grad forward in eval mode repacks
    4-bit weights for a fused kernel that has no autograd formula; training steps after it silently produce
    wrong LoRA gradients (up to 69% off; bnb warns "gemv_4bit: an autograd kernel was not registered").
    Remove once bitsandbytes registers autograd for the packed CPU kernel.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    guarded = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            guarded += 1
    return guarded


def _explain_load_error(name: str, err: Exception) -> str:
    hint = ""
    if _hub_offline() and not Path(name).exists():
        hint = (
            " (HF_HUB_OFFLINE is set and the model is not in the local cache: use a local folder, a .gguf file "
            "or a builtin such as `builtin:smollm2-135m-instruct`)"
        )
    return f"cannot load model `{name}`{hint}: {err}"
