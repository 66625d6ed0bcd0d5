"""Where a model's transformer blocks are, whatever wraps it (PEFT, a classification head): the ModuleList of
decoder layers (`model.layers` in Llama, `transformer.h` in GPT-2), and which block each parameter is in."""

from __future__ import annotations

import torch
from transformers.pytorch_utils import Conv1D

from llmtune.config import RecipeError
from llmtune.errors import LlmtuneError


class BlocksNotFoundError(LlmtuneError, ValueError):
    pass


def find_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The qualified name and module of the decoder layers: the ModuleList of `num_hidden_layers` modules holding
    the most parameters (a multimodal model's vision tower has its own, smaller list)."""
    count = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == count]
    if not found:
        raise BlocksNotFoundError(f"{type(model).__name__}: no list of {count} transformer blocks found "
                                  "(`num_hidden_layers` in its config); freezing and `adapter.layers` need one")
    return max(found, key=lambda item: sum(p.numel() for p in item[1].parameters()))


def parameter_blocks(model: torch.nn.Module) -> dict[str, int | None]:
    """Each parameter name (as `model.named_parameters()` gives it) -> its block index; None outside the blocks."""
    _, blocks = find_blocks(model)
    index = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    return {name: index.get(id(p)) for name, p in model.named_parameters()}


def resolve_block_indices(indices: list[int], count: int, key: str) -> list[int]:
    """Recipe block indices (negative: from the last) as sorted indices in [0, count); `key` names the setting."""
    wrong = [i for i in indices if not -count <= i < count]
    if wrong:
        raise RecipeError(f"{key}: block {wrong[0]} does not exist: the model has {count} blocks "
                          f"(0 to {count - 1}, or -{count} to -1 counting from the last)")
    return sorted({i % count for i in indices})


def linear_module_names(blocks: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside the blocks (`q_proj`, ..., `down_proj`): PEFT's `all-linear`."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in blocks.named_modules()
                   if isinstance(module, torch.nn.Linear | Conv1D)})
