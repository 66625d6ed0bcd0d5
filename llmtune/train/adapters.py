"""Recipe adapter section -> PEFT config (None when training the full model)."""

from __future__ import annotations

import torch
from peft import LoraConfig

from llmtune.config import AdapterSection
from llmtune.train.blocks import find_blocks, linear_module_names, resolve_block_indices


def lora_config(
    section: AdapterSection | None, model: torch.nn.Module | None = None, task_type: str = "CAUSAL_LM"
) -> LoraConfig | None:
    """`model` (the base the adapter goes on) is needed only for `adapter.layers`: its blocks resolve the indices."""
    if section is None:
        return None
    targets, layers, pattern = section.target_modules, None, None
    if section.layers is not None:
        if model is None:
            raise ValueError("lora_config: `adapter.layers` needs the model to resolve its block indices")
        name, blocks = find_blocks(model)
        layers = resolve_block_indices(section.layers, len(blocks), "adapter.layers")
        pattern = name.rsplit(".", 1)[-1]  # `layers`: where PEFT reads the block index in a module's name
        if targets == "all-linear":  # PEFT (0.21) refuses `layers_to_transform` with a str `target_modules`
            targets = linear_module_names(blocks)
    return LoraConfig(
        task_type=task_type,
        r=section.r,
        lora_alpha=section.alpha,
        lora_dropout=section.dropout,
        target_modules=targets,
        layers_to_transform=layers,
        layers_pattern=pattern,
        use_dora=section.kind == "dora",
        use_rslora=section.rslora,
        modules_to_save=list(section.modules_to_save) or None,  # a copy: PEFT's SEQ_CLS extends it in place
        bias="none",
    )
