"""A batch in one packed row: no padding token runs, and tokens that rows share at their start run once.

Padding free: the rows' tokens are laid end to end in one row, so every layer but attention (the matmuls, the
norms, the MLP, the LoRA layers) sees each real token once; on the SFT benchmark's length-grouped batches 9% of
a padded batch was padding. Attention runs per unit of a level (`_level_attention`): its queries, keys and
values are gathered into a padded [units, heads, width, d] layout for that step only.

Shared prefixes: a DPO batch is [chosen; rejected], each pair repeating its prompt (on the clinical preference
pairs about half of every row); an SFT batch repeats its system prompt and chat header in every row. None of
those tokens carries a label, so the rest of a row needs only their keys and values. The row is laid out in
levels:

1. the prefix common to the whole batch, once;
2. each prompt shared by a group of rows (a DPO pair), once per group, attending to level 1's keys;
3. every row's own tokens, attending to its group's keys.

Each batch takes the cheapest plan (every row as one level; 1 and 3; 2 and 3; or all three): a plan costs its
tokens plus LEVEL_COST_TOKENS per level. Gradients flow back through the gathered keys and values to the one
computation of a prefix, so the loss and the LoRA gradients equal the plain padded forward's up to float
rounding (tests/test_shared_prefix.py). One difference under LoRA dropout: the rows of a group share the
dropout mask of their common prefix, where a plain batch draws one per row.

Written by hand: TRL's `padding_free` needs flash-attention kernels (none on a CPU) and neither TRL nor
transformers shares prefixes between training rows.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from transformers import AttentionInterface, PreTrainedConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import eager_attention_forward

# What one more level costs, in tokens of work (per layer: the gathers of its queries, keys and values, one more
# attention call and its mask). Too small to measure here: on a 962-token SFT batch, a plan sharing a 1-token
# prefix (one more level, 7 tokens saved) ran 2.29 s forward + backward against 2.40 s for one level (medians of
# 12). 16 is a margin, so that sharing is taken only when it saves more than a few tokens.
LEVEL_COST_TOKENS = 16


@dataclass(frozen=True)
class RowPacking:
    """How a batch is laid out (recipe keys `train.padding_free` and `train.shared_prefix`); sharing prefixes
    needs the packed row."""

    padding_free: bool = True
    share_prefixes: bool = True


PACKED = RowPacking()  # the default: packed, prefixes shared


@dataclass(frozen=True)
class Level:
    """Unit u runs the tokens of input row `rows[u]` from where its parent unit `parent[u]` of the level before
    ended (position 0 on the first level, `parent` None) up to `end[u]`, attending to the parent's keys."""

    rows: torch.Tensor
    end: torch.Tensor
    parent: torch.Tensor | None


def plan_levels(input_ids: torch.Tensor, attention_mask: torch.Tensor, label_mask: torch.Tensor,
                share_prefixes: bool = True) -> list[Level] | None:
    """The cheapest levels for the batch, or None where the packed row does not apply (fewer than two rows, an
    empty row, or rows that are not right-padded).

    `label_mask[i, j]` says that position j's hidden state predicts a label (the shifted labels' mask): a
    shared prefix must end at or before a row's first such position."""
    rows, width = input_ids.shape
    lengths = attention_mask.sum(1)
    right_padded = torch.arange(width, device=attention_mask.device)[None, :] < lengths[:, None]
    lengths = lengths.cpu()
    if rows < 2 or not torch.equal(attention_mask.bool(), right_padded) or int(lengths.min()) == 0:
        return None  # an empty row would be a unit with no token to attend to
    every_row = [Level(torch.arange(rows), lengths, None)]
    if not share_prefixes or not bool(label_mask.any(1).all()):
        return every_row
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

    candidates = [every_row]
    if shared > 0:
        candidates.append([batch_prefix, Level(torch.arange(rows), lengths, torch.zeros(rows, dtype=torch.long))])
    if len(groups) < rows and int(group_end.min()) > 0:  # some rows share their whole prompt (DPO pairs)
        candidates.append([Level(group_rows, group_end, None), Level(torch.arange(rows), lengths, row_group)])
        if 0 < shared < int(group_end.min()):
            candidates.append([batch_prefix, Level(group_rows, group_end, torch.zeros(len(groups), dtype=torch.long)),
                               Level(torch.arange(rows), lengths, row_group)])
    return min(candidates, key=plan_cost)


def plan_cost(levels: list[Level]) -> int:
    """Tokens the levels run plus the fixed cost of each level."""
    cost, start = 0, None
    for level in levels:
        begin = torch.zeros_like(level.end) if level.parent is None else start[level.parent]
        cost += int((level.end - begin).sum()) + LEVEL_COST_TOKENS
        start = level.end
    return cost


def _prompt_groups(input_ids: torch.Tensor, first_label: torch.Tensor) -> list[list[int]]:
    """Rows whose tokens before their first scored position are identical (a DPO pair's two rows)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for row, end in enumerate(first_label.tolist()):
        groups.setdefault(tuple(input_ids[row, :end].tolist()), []).append(row)
    return list(groups.values())


@dataclass(frozen=True)
class PackedLevel:
    """A level in the packed row: its units' real tokens, one unit after the other.

    Attention sees it as `units` x `width` slots: slot (u, j) is packed token `gather[u * width + j]` (a
    padding slot repeats one of its unit's tokens and is masked out), and `real` lists the slots that are real
    tokens, in packed order. A unit's keys are its parent's keys then its own: `valid` says which of those exist
    (not padding), `key_positions` their positions, `query_positions` the positions of its own slots."""

    unit_start: torch.Tensor
    gather: torch.Tensor
    real: torch.Tensor
    parent: torch.Tensor | None
    valid: torch.Tensor
    key_positions: torch.Tensor
    query_positions: torch.Tensor

    @property
    def units(self) -> int:
        return self.query_positions.shape[0]

    @property
    def width(self) -> int:
        return self.query_positions.shape[1]

    def slots(self, states: torch.Tensor) -> torch.Tensor:
        """[1, heads, packed, d] states (a view of [1, packed, heads, d]) as this level's [units, heads, width, d]."""
        tokens = states.transpose(1, 2)[0].index_select(0, self.gather)
        return tokens.unflatten(0, (self.units, self.width)).transpose(1, 2)

    def allowed(self, sliding_window: int | None) -> torch.Tensor:
        """[units, 1, width, keys]: which keys each slot attends to (causal, not padding, inside the window)."""
        distance = self.query_positions[:, :, None] - self.key_positions[:, None, :]
        allowed = (distance >= 0) & self.valid[:, None, :]
        if sliding_window is not None:
            allowed &= distance < sliding_window
        return allowed[:, None]


@dataclass
class LevelPlan:
    """What `_level_attention` needs: the levels and the attention implementation that computes each one."""

    levels: list[PackedLevel]
    implementation: str
    masks: dict = field(default_factory=dict)  # (level, window, dtype) -> mask, built once per forward

    def mask(self, index: int, sliding_window: int | None, dtype: torch.dtype) -> torch.Tensor:
        key = (index, sliding_window, dtype if self.implementation == "eager" else torch.bool)
        if key not in self.masks:
            allowed = self.levels[index].allowed(sliding_window)
            if self.implementation == "eager":  # an additive mask, as transformers' eager attention takes it
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
                    ~allowed, torch.finfo(dtype).min)
            self.masks[key] = allowed
        return self.masks[key]


def pack_levels(input_ids: torch.Tensor, levels: list[Level]) -> tuple[torch.Tensor, torch.Tensor, list[PackedLevel]]:
    """The packed row's token ids and positions ([1, tokens] each), and its levels."""
    device = input_ids.device
    packed: list[PackedLevel] = []
    ids, positions = [], []
    offset, start, valid, key_positions = 0, None, None, None
    for level in levels:
        rows, end = level.rows.to(device), level.end.to(device)
        parent = None if level.parent is None else level.parent.to(device)
        begin = torch.zeros_like(end) if parent is None else start[parent]
        lengths = end - begin
        width = int(lengths.max())
        columns = torch.arange(width, device=device)
        slot_positions = begin[:, None] + columns
        own = columns < lengths[:, None]
        unit_start = offset + lengths.cumsum(0) - lengths
        gather = unit_start[:, None] + torch.minimum(columns, lengths[:, None] - 1)
        ids.append(input_ids[rows[:, None], slot_positions.clamp(max=input_ids.shape[1] - 1)][own])
        positions.append(slot_positions[own])
        valid = own if parent is None else torch.cat([valid[parent], own], dim=1)
        key_positions = slot_positions if parent is None else torch.cat([key_positions[parent], slot_positions], 1)
        packed.append(PackedLevel(unit_start, gather.flatten(),
                                  own.flatten().nonzero().squeeze(1), parent, valid, key_positions, slot_positions))
        offset, start = offset + int(lengths.sum()), end
    return torch.cat(ids)[None], torch.cat(positions)[None], packed


def shared_prefix_hidden(model: torch.nn.Module, input_ids: torch.Tensor, label_mask: torch.Tensor,
                         levels: list[Level]) -> torch.Tensor:
    """The last hidden states at the positions `label_mask` selects, in `hidden[:, :-1][label_mask]` order,
    from one forward of the packed row (`model` is the transformer body, e.g. LlamaModel)."""
    ids, positions, packed = pack_levels(input_ids, levels)
    # transformers' eager attention, or sdpa for any other (a flex or flash kernel takes no such masks)
    plan = LevelPlan(packed, "eager" if model.config._attn_implementation == "eager" else "sdpa")
    with _attention_implementation(model, LEVEL_ATTENTION):
        hidden = model(input_ids=ids, position_ids=positions, attention_mask=_MASK_IN_PLAN, use_cache=False,
                       level_plan=plan).last_hidden_state
    last = packed[-1]  # every row of the batch, in order: the labelled positions are there
    row, column = label_mask.nonzero(as_tuple=True)
    begin = last.query_positions[:, 0]
    return hidden[0, last.unit_start[row] + column - begin[row]]


def _level_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, *, level_plan: LevelPlan, **kwargs):
    """Attention over the packed row, one level at a time: each unit's queries see its ancestors' keys and
    values (gathered per unit, so gradients flow back to the one computation of a shared prefix) and its own."""
    compute = _attention_function(module, level_plan.implementation)
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    kwargs.pop("position_ids", None)  # the packed row's, not a level's
    outputs, keys, values = [], None, None
    for index, level in enumerate(level_plan.levels):
        own_keys, own_values = level.slots(key), level.slots(value)
        if level.parent is None:
            keys, values = own_keys, own_values
        else:  # index_select: its backward is an index_add, not advanced indexing's slower index_put
            keys = torch.cat([keys.index_select(0, level.parent), own_keys], dim=2)
            values = torch.cat([values.index_select(0, level.parent), own_values], dim=2)
        mask = level_plan.mask(index, window, query.dtype)
        output, _ = compute(module, level.slots(query), keys, values, mask, **kwargs)  # [units, width, heads, d]
        outputs.append(output.flatten(0, 1).index_select(0, level.real))
    return torch.cat(outputs)[None], None


def _attention_function(module: torch.nn.Module, implementation: str) -> Callable:
    if implementation == "eager":
        return _eager_attention_of(type(module))
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)


@functools.cache
def _eager_attention_of(attention_class: type) -> Callable:
    """The eager attention for a model file's attention layers (each file has its own: softcapping, sinks ...),
    grouped where it is the plain one; decided once per class, not per layer and step."""
    own = getattr(sys.modules[attention_class.__module__], "eager_attention_forward", eager_attention_forward)
    return grouped_eager_attention if is_plain_eager(own) else own


def is_plain_eager(function: Callable) -> bool:
    """Whether `function` is transformers' own eager attention (Llama's, copied into most model files as it is)."""
    code, plain = getattr(function, "__code__", None), eager_attention_forward.__code__
    return code is not None and (code.co_code, code.co_consts, code.co_names) == (
        plain.co_code, plain.co_consts, plain.co_names)


def grouped_eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """Transformers' eager attention, with the query heads that share a key-value head stacked along the query
    length instead of the keys and values copied once per query head: no copies, and no sum over them in the
    backward pass (SmolLM2: 9 query heads on 3 key-value heads; +1.3% on whole SFT steps, same-batch A/B)."""
    units, heads, width, dim = query.shape
    kv_heads, keys = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    stacked = query.reshape(units, kv_heads, groups * width, dim)
    scores = (torch.matmul(stacked, key.transpose(2, 3)) * scaling).view(units, kv_heads, groups, width, keys)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs.view(units, kv_heads, groups * width, keys), value)
    return output.view(units, heads, width, dim).transpose(1, 2).contiguous(), None


@contextmanager
def _attention_implementation(model: torch.nn.Module, implementation: str) -> Iterator[None]:
    """Every attention layer of `model` runs `implementation` inside the block."""
    configs = _configs_of(model)
    before = [config._attn_implementation_internal for config in configs]
    try:
        for config in configs:
            config._attn_implementation_internal = implementation
        yield
    finally:
        for config, previous in zip(configs, before, strict=True):
            config._attn_implementation_internal = previous


def _configs_of(model: torch.nn.Module) -> list[PreTrainedConfig]:
    """The distinct configs of `model`'s modules, found once per model (a scan of SmolLM2's 2,495 modules with
    LoRA took 6.9 ms, once per forward before)."""
    if getattr(model, "_llmtune_configs", None) is None:
        found = {id(module.config): module.config for module in model.modules()
                 if isinstance(getattr(module, "config", None), PreTrainedConfig)}
        model._llmtune_configs = list(found.values())
    return model._llmtune_configs


LEVEL_ATTENTION = "llmtune_levels"
AttentionInterface.register(LEVEL_ATTENTION, _level_attention)
# transformers passes a 4-D attention mask on as it is; the real masks are in the plan
_MASK_IN_PLAN = torch.ones(1, 1, 1, 1, dtype=torch.bool)
