"""Recipe adapter section -> PEFT config (None when training the full model)."""

from __future__ import annotations

from peft import LoraConfig

from llmtune.config import AdapterSection


def lora_config(section: AdapterSection | None) -> LoraConfig | None:
    if section is None:
        return None
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=section.target_modules,
        use_dora=section.kind == "dora",
        use_rslora=section.rslora,
        modules_to_save=section.modules_to_save or None,
        bias="none",
    )
