"""Multiple choice by log-likelihood, the way lm-eval scores MedQA/MedMCQA-style tasks: each option is a
continuation of the question; the model picks the option with the highest summed log-probability (`acc`) or
the highest per character (`acc_norm`, which removes the bias towards short options).

All options of a batch of items go through one forward pass: rows are left-padded with explicit position
ids, so every continuation ends at the last position and only the last `max continuation + 1` positions go
through the output layer (`logits_to_keep`), not the whole vocabulary at every position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmtune.eval.items import LETTERS, McqItem
from llmtune.inference.loading import Loaded


@dataclass(frozen=True)
class Option:
    context: list[int]
    continuation: list[int]
    chars: int  # length of the option's text, for acc_norm (as lm-eval)


def build_options(loaded: Loaded, item: McqItem, style: str, system_prompt: str | None,
                  choices_format: str = "cloze") -> list[Option]:
    """Context and continuation tokens of each option, split exactly as lm-eval splits them (so an exported
    task scores the same)."""
    question, answers = item.question, list(item.choices)
    if choices_format == "letters":
        question = letters_question(item)
        answers = list(LETTERS[: len(item.choices)])
    if style == "chat":
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        messages.append({"role": "user", "content": question})
        context = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        continuations = answers
    else:
        context = (f"{system_prompt}\n\n" if system_prompt else "") + f"Question: {question}\nAnswer:"
        continuations = [f" {answer}" for answer in answers]
    # lm-eval's split: trailing whitespace of the context moves into the continuation; the pair is encoded
    # whole and the context's own tokens are cut off the front.
    tokenizer = loaded.tokenizer
    spaces = len(context) - len(context.rstrip())
    context, moved = (context[:-spaces], context[-spaces:]) if spaces else (context, "")
    context_ids = _encode(tokenizer, context)  # once per item, not per option
    return [Option(context_ids, _encode(tokenizer, context + moved + text)[len(context_ids) :], len(answer))
            for text, answer in zip(continuations, answers, strict=True)]


def letters_question(item: McqItem) -> str:
    """MMLU's layout: the question, then each option on its own line as `A. text`."""
    listed = "\n".join(f"{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
    return f"{item.question}\n{listed}"


def _encode(tokenizer, text: str) -> list[int]:
    # The tokenizer's own special tokens, unless the text (a rendered chat template) already starts with BOS.
    bos = tokenizer.bos_token
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


@torch.no_grad()
def option_logprobs(loaded: Loaded, options: list[Option], rows_per_pass: int) -> list[float]:
    """Summed log-probability of each option's continuation given its context.

    The options of an item share their context, so each distinct context is run once and its key/value cache
    is copied to its options, which then run only their continuation tokens: an MCQ item costs one context
    plus four short continuations instead of four whole sequences (a letters item, one context and nothing
    more). The sums equal per-option scoring to float32 rounding (tests/test_eval.py checks this)."""
    contexts: dict[tuple[int, ...], int] = {}
    owner = [contexts.setdefault(tuple(o.context), len(contexts)) for o in options]
    unique = list(contexts)
    scores = [0.0] * len(options)
    per_pass = max(1, rows_per_pass // max(1, len(options) // max(1, len(unique))))
    for start in range(0, len(unique), per_pass):
        group = range(start, min(start + per_pass, len(unique)))
        members = [i for i, o in enumerate(owner) if o in group]
        for i, value in zip(members, _score_shared(loaded, [list(unique[g]) for g in group],
                                                   [options[i] for i in members], [owner[i] - start for i in members]),
                            strict=True):
            scores[i] = value
    return scores


def _score_shared(loaded: Loaded, contexts: list[list[int]], options: list[Option], owners: list[int]) -> list[float]:
    model, pad = loaded.model, loaded.tokenizer.pad_token_id
    width = max(len(c) for c in contexts)
    context_ids = torch.tensor([[pad] * (width - len(c)) + c for c in contexts])
    context_mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])
    positions = (context_mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=context_ids, attention_mask=context_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # each context's next-token distribution
    scores = [first[owner, option.continuation[0]].double().item() for option, owner in zip(options, owners,
                                                                                               strict=True)]
    rest = [i for i, option in enumerate(options) if len(option.continuation) > 1]
    if not rest:
        return scores
    # The continuation tokens but the last, each predicting the next; right-padded after the shared context.
    length = max(len(options[i].continuation) - 1 for i in rest)
    index = torch.tensor([owners[i] for i in rest])
    cache = out.past_key_values
    cache.reorder_cache(index)  # one copy of its context's keys and values per option
    ids = torch.tensor([options[i].continuation[:-1] + [pad] * (length + 1 - len(options[i].continuation))
                        for i in rest])
    own = torch.tensor([[1] * (len(options[i].continuation) - 1) + [0] * (length + 1 - len(options[i].continuation))
                        for i in rest])
    mask = torch.cat([context_mask[index], own], dim=-1)
    steps = context_mask[index].sum(-1, keepdim=True) + torch.arange(length)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=steps, past_key_values=cache).logits.float()
    logprobs = torch.log_softmax(logits, dim=-1)
    for row, i in enumerate(rest):
        targets = torch.tensor(options[i].continuation[1:])
        predicted = logprobs[row, : len(targets)].gather(-1, targets[:, None])
        scores[i] += predicted.double().sum().item()  # float64 sums: float32 ones drift
    return scores


def mcq_length(item: McqItem) -> tuple[int, int]:
    """A cheap proxy for an item's padded cost: its question's length, then its longest option's."""
    return len(item.question), max(map(len, item.choices))


def score_mcq(loaded: Loaded, items: list[McqItem], style: str, system_prompt: str | None, batch_size: int,
              advance: Callable[[int], None] = lambda n: None, choices_format: str = "cloze"
              ) -> list[dict[str, Any]]:
    results = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        per_item = [build_options(loaded, item, style, system_prompt, choices_format) for item in chunk]
        flat = option_logprobs(loaded, [o for options in per_item for o in options], sum(map(len, per_item)))
        offset = 0
        for item, options in zip(chunk, per_item, strict=True):
            logprobs = flat[offset : offset + len(options)]
            offset += len(options)
            normalised = [lp / o.chars for lp, o in zip(logprobs, options, strict=True)]
            pred = max(range(len(options)), key=logprobs.__getitem__)
            pred_norm = max(range(len(options)), key=normalised.__getitem__)
            results.append({"id": item.id, "category": item.category, "answer": item.answer,
                            "logprobs": [round(lp, 6) for lp in logprobs], "pred": pred, "pred_norm": pred_norm,
                            "acc": float(pred == item.answer), "acc_norm": float(pred_norm == item.answer)})
        advance(len(chunk))
    return results
