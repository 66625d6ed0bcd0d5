"""Tokens that rows of a batch share at their start run once, not once per row.

A DPO batch is [chosen; rejected]: each pair repeats its prompt (on the clinical preference pairs about half
of every row). An SFT batch repeats its system prompt and chat header in every row. None of those tokens
carries a label, so the rest of a row needs only their keys and values. The forward runs in levels:

1. the prefix common to the whole batch, once (one row);
2. each prompt shared by a group of rows (a DPO pair), once per group, attending to level 1's cache;
3. every row's own tokens, attending to its group's cache.

Each batch takes the cheapest plan of levels (1 and 3, 2 and 3, or all three; a level costs its tokens,
padding included, plus the fixed cost of one more pass, PASS_COST_TOKENS), or the plain forward where nothing
saves enough. Gradients flow back through the cached keys and values to the one prefix computation, so the
loss and the LoRA gradients equal the plain forward's up to float rounding (tests/test_shared_prefix.py).
One difference under LoRA dropout: the rows of a group share the dropout mask of their common prefix, where a
plain batch draws one per row.

Written by hand: neither TRL nor transformers shares prefixes between training rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache

# What one more pass over the layers costs, in tokens of work: on SmolLM2-135M (2 CPU cores, bf16 autocast,
# LoRA on all linear layers) a forward and backward of 4 tokens took 0.158 s and of 888 tokens 1.63 s, so the
# fixed cost of a pass (per-op overhead: a forward alone makes 630 matmul and ~2,900 copy/cast calls) is worth
# ~96 tokens. A plan pays it once per level.
PASS_COST_TOKENS = 96


@dataclass(frozen=True)
class Level:
    """One pass: unit u runs the tokens of input row `rows[u]` from where its parent unit `parent[u]` of the
    level before ended (position 0 on the first level, `parent` None) up to `end[u]`, attending to the parent's
    cached keys and values."""

    rows: torch.Tensor
    end: torch.Tensor
    parent: torch.Tensor | None


def plan_levels(input_ids: torch.Tensor, attention_mask: torch.Tensor, label_mask: torch.Tensor) -> list[Level] | None:
    """The cheapest passes that run shared prefixes once, or None when the plain forward is cheapest.

    `label_mask[i, j]` says that position j's hidden state predicts a label (the shifted labels' mask): a
    shared prefix must end at or before a row's first such position. Rows must be right-padded."""
    rows, width = input_ids.shape
    lengths = attention_mask.sum(1)
    right_padded = torch.arange(width, device=attention_mask.device)[None, :] < lengths[:, None]
    lengths = lengths.cpu()
    if rows < 2 or not torch.equal(attention_mask.bool(), right_padded) or not bool(label_mask.any(1).all()):
        return None
    first_label = label_mask.int().argmax(1).cpu()  # the first position whose output is scored, per row
    common = int((input_ids == input_ids[:1]).all(0).int().cumprod(0).sum())  # tokens all rows begin with
    shared = min(common, int(first_label.min()))
    batch_prefix = Level(rows=torch.zeros(1, dtype=torch.long), end=torch.tensor([shared]), parent=None)
    groups = _prompt_groups(input_ids, first_label)
    row_group = torch.empty(rows, dtype=torch.long)
    for index, members in enumerate(groups):
        row_group[members] = index
    group_end = torch.tensor([int(first_label[members[0]]) for members in groups])
    group_rows = torch.tensor([members[0] for members in groups])

    candidates: list[list[Level]] = []
    if shared > 0:
        candidates.append([batch_prefix, Level(torch.arange(rows), lengths, torch.zeros(rows, dtype=torch.long))])
    if len(groups) < rows:  # some rows share their whole prompt (DPO pairs)
        candidates.append([Level(group_rows, group_end, None), Level(torch.arange(rows), lengths, row_group)])
        if 0 < shared < int(group_end.min()):
            candidates.append([batch_prefix, Level(group_rows, group_end, torch.zeros(len(groups), dtype=torch.long)),
                               Level(torch.arange(rows), lengths, row_group)])
    plain_cost = rows * width + PASS_COST_TOKENS
    best = min(candidates, key=plan_cost, default=None)
    return best if best is not None and plan_cost(best) < plain_cost else None


def plan_cost(levels: list[Level]) -> int:
    """Tokens the passes run (padding included) plus the fixed cost of each pass."""
    cost, start = 0, None
    for level in levels:
        begin = torch.zeros_like(level.end) if level.parent is None else start[level.parent]
        cost += len(level.rows) * int((level.end - begin).max()) + PASS_COST_TOKENS
        start = level.end
    return cost


def _prompt_groups(input_ids: torch.Tensor, first_label: torch.Tensor) -> list[list[int]]:
    """Rows whose tokens before their first scored position are identical (a DPO pair's two rows)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, end in enumerate(first_label.tolist()):
        groups.setdefault(tuple(input_ids[row, :end].tolist()), []).append(row)
    return list(groups.values())


def shared_prefix_hidden(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         label_mask: torch.Tensor, levels: list[Level]) -> torch.Tensor:
    """The last hidden states at the positions `label_mask` selects, in `hidden[:, :-1][label_mask]` order,
    computed level by level (`model` is the transformer body, e.g. LlamaModel)."""
    device = input_ids.device
    cache, mask, start = DynamicCache(), None, None
    for level in levels:
        rows, end = level.rows.to(device), level.end.to(device)
        if level.parent is None:
            begin = torch.zeros_like(end)
        else:
            parent = level.parent.to(device)
            begin = start[parent]
            cache.reorder_cache(parent)  # one copy of the parent's keys and values per unit (differentiable)
            mask = mask[parent]
        positions = begin[:, None] + torch.arange(int((end - begin).max()), device=device)
        own = positions < end[:, None]
        ids = input_ids[rows[:, None], positions.clamp(max=input_ids.shape[1] - 1)]  # past `end`: masked out
        mask = own if mask is None else torch.cat([mask, own], dim=1)
        out = model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, past_key_values=cache,
                    use_cache=True)
        cache, start = out.past_key_values, end
    hidden = out.last_hidden_state
    row, column = label_mask.nonzero(as_tuple=True)
    return hidden[row, column - begin[row]]
