"""Score only the positions that carry a label on devices without Triton (CPU).

TRL 1.16's fused LM head (`trl.trainer.utils.add_fused_lm_head`) projects only the labelled positions through the
LM head on Triton devices, but every position elsewhere, through a tiled fp32 kernel written for GPUs: on a CPU,
with a 49k vocabulary and loss on the answers only, that head took ~45% of a SmolLM2 training step.

This replacement keeps TRL's contract: `model(..., labels=, fused_lm_head=True)` returns a `FusedCausalLMOutput`
with per-token `log_probs`, `entropy`, `log_sum_sq_probs`, `mean_logits`, `is_top1` and `label_mask`, zero on
ignored positions, so TRL's trainers and metrics are unchanged. It gathers the labelled hidden states first and
projects only those, in the head's own dtype (bf16 under autocast), with a float32 log-softmax like
transformers' own loss. Models the TRL head treats specially (softcapped or scaled logits, MoE router losses)
keep TRL's forward.
"""

from __future__ import annotations

import functools
import types

import torch
from accelerate.utils import is_peft_model
from torch.utils.checkpoint import checkpoint
from trl.trainer.utils import FusedCausalLMOutput

from llmtune.train.shared_prefix import PACKED, RowPacking, plan_levels, shared_prefix_hidden

# Rows of [rows, vocab] float32 log-probs kept at once: 2048 x 49k is 400 MB. Larger batches are scored in
# chunks whose log-probs are recomputed in the backward pass instead of stored.
CHUNK_ROWS = 2048
# A frozen head scores blocks of FROZEN_HEAD_BLOCK // vocab rows (170 at 49k): below ~128 rows the head matmul
# slows down, and past ~32 MB a block's logits no longer come from memory the allocator keeps.
FROZEN_HEAD_BLOCK = 2**23
# The frozen head's block buffers (logits and probabilities in fp32, the logits' product in the head's dtype),
# kept for the process (80 MB): a fresh 32 MB block each time is paid in page faults (glibc maps allocations that
# large anew; the bf16 to fp32 copy of a block took 22 ms in training, 5.5 ms into reused memory). +1.6-2.3% on
# whole SFT steps (same batches alternating in one process).
_SCRATCH: dict[tuple[str, int, torch.dtype], torch.Tensor] = {}
OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")  # FusedCausalLMOutput fields


class LabelOnlyLMHead:
    """Trainer mixin for TRL trainers that patch a fused LM head (SFT, DPO, KTO): replaces it once installed.
    `packing` lays each batch out as one row without padding, its shared prefixes once (shared_prefix.py)."""

    def __init__(self, *args, packing: RowPacking = PACKED, **kwargs):
        self._packing = packing  # before super(): TRL's DPO runs its reference pass in __init__
        super().__init__(*args, **kwargs)
        install_label_only_lm_head(self._causal_lm(), packing)

    def _precompute_ref_logps(self, *args, **kwargs):
        # TRL's DPO precomputes the reference log-probs inside its own __init__, before the install above: with
        # TRL's head there, that pass scored every position through the 49k vocabulary (on SmolLM2, 1.3 s
        # instead of 1.0 s per 8 pairs).
        install_label_only_lm_head(self._causal_lm(), self._packing)
        return super()._precompute_ref_logps(*args, **kwargs)

    def _causal_lm(self) -> torch.nn.Module:
        return self.model.get_base_model() if is_peft_model(self.model) else self.model


def install_label_only_lm_head(model: torch.nn.Module, packing: RowPacking = PACKED) -> bool:
    """Wrap the TRL-patched forward of `model` (the causal LM, not its PEFT wrapper); False when not applicable."""
    config = model.config.get_text_config()
    special = (
        getattr(config, "final_logit_softcapping", None),
        getattr(config, "logit_scale", None),
        getattr(config, "output_multiplier", None),
        getattr(config, "lm_head_multiplier", None),
        getattr(config, "logits_scaling", None),
    )
    if any(value not in (None, 1, 1.0) for value in special) or getattr(config, "output_router_logits", False):
        return False
    if hasattr(model, "_label_only_lm_head_fields"):
        return True  # installed already (before the reference pass)
    fused_forward = model.forward
    fields = requested_outputs(fused_forward)

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        head = self.get_output_embeddings()
        if not fused_lm_head or labels is None or shift_labels is not None or head.weight.device.type != "cpu":
            return fused_forward(*args, fused_lm_head=fused_lm_head, labels=labels, shift_labels=shift_labels,
                                 num_items_in_batch=num_items_in_batch, **kwargs)
        labels = labels[:, 1:]
        mask = labels != -100
        hidden = _labelled_hidden(self, mask, packing, args, kwargs)
        scores = _score_labelled(head, hidden, labels[mask], fields)
        per_token = {name: None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)
                     for name, x in zip(OUTPUTS, scores, strict=True)}
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-per_token["log_probs"].sum() / count, label_mask=mask, **per_token)

    model.forward = types.MethodType(forward, model)
    model._label_only_lm_head_fields = fields  # also marks the head as installed
    return True


def requested_outputs(fused_forward) -> tuple[str, ...]:
    """The fields the trainer asked TRL's fused head for (`add_fused_lm_head(outputs=...)`, held in the patched
    forward's closure), in OUTPUTS order; every field when that cannot be read. SFT logs only entropy and
    accuracy, and each field left out saves a pass over [rows, vocab] (log_sum_sq_probs: ~90 ms a step on
    SmolLM2 with 490 labelled rows, 3% of it)."""
    function = getattr(fused_forward, "__func__", fused_forward)
    names, cells = function.__code__.co_freevars, function.__closure__ or ()
    if "outputs" in names:
        asked = cells[names.index("outputs")].cell_contents
        if isinstance(asked, tuple) and set(asked) <= set(OUTPUTS):
            return tuple(name for name in OUTPUTS if name == "log_probs" or name in asked)
    return OUTPUTS


def _labelled_hidden(model: torch.nn.Module, mask: torch.Tensor, packing: RowPacking, args: tuple,
                     kwargs: dict) -> torch.Tensor:
    """The body's last hidden states at the labelled positions; from one packed row without padding (shared
    prefixes run once) where that applies: plain keyword inputs only, not under gradient checkpointing."""
    kwargs["use_cache"] = False
    body = model.base_model
    # PEFT passes its unused arguments on as None (inputs_embeds, output_attentions, ...)
    extra = {k: v for k, v in kwargs.items() if k not in ("input_ids", "attention_mask", "use_cache", "return_dict")}
    plain_inputs = not args and all(value in (None, False) for value in extra.values())
    checkpointing = body.training and getattr(body, "gradient_checkpointing", False)
    if packing.padding_free and plain_inputs and not checkpointing and kwargs.get("attention_mask") is not None:
        input_ids = kwargs["input_ids"]
        levels = plan_levels(input_ids, kwargs["attention_mask"], mask, packing.share_prefixes)
        if levels is not None:
            return shared_prefix_hidden(body, input_ids, mask, levels)
    return body(*args, **kwargs).last_hidden_state[:, :-1][mask]


def _score_labelled(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                    fields: tuple[str, ...]) -> tuple[torch.Tensor | None, ...]:
    """Per labelled row, in OUTPUTS order (None for a field not in `fields`); only the target log-prob carries a
    gradient (TRL's trainers use the others detached, as metrics or WPO weights)."""
    if type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else head.weight.dtype
        with_grad = torch.is_grad_enabled() and hidden.requires_grad  # inside forward, grad mode is always off
        with torch.autocast("cpu", enabled=False):
            return _FrozenHeadScores.apply(hidden.to(dtype), head.weight.to(dtype), targets, fields, with_grad)
    if hidden.shape[0] <= CHUNK_ROWS:
        return _score_chunk(head, hidden, targets, fields)
    parts = [checkpoint(_score_chunk, head, h, t, fields, use_reentrant=False)
             for h, t in zip(hidden.split(CHUNK_ROWS), targets.split(CHUNK_ROWS), strict=True)]
    return tuple(None if values[0] is None else torch.cat(values) for values in zip(*parts, strict=True))


def _score_chunk(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                 fields: tuple[str, ...]) -> tuple[torch.Tensor | None, ...]:
    logits = head(hidden).float()
    log_probs = logits.log_softmax(-1)
    scores = {"log_probs": log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)}
    with torch.no_grad():
        if "entropy" in fields:
            # a batched dot product: 15 ms against 36 ms for (probs * log_probs).sum(-1) at 490 x 49k
            scores["entropy"] = -torch.bmm(log_probs.exp().unsqueeze(1), log_probs.unsqueeze(2)).view(-1)
        if "log_sum_sq_probs" in fields:
            scores["log_sum_sq_probs"] = (2 * log_probs).logsumexp(-1)
        if "mean_logits" in fields:
            scores["mean_logits"] = logits.mean(-1)
        if "is_top1" in fields:
            scores["is_top1"] = log_probs.argmax(-1) == targets
    return tuple(scores.get(name) for name in OUTPUTS)


class _FrozenHeadScores(torch.autograd.Function):
    """The scores of `_score_chunk` for a frozen bias-free head, a block of rows at a time, with the gradient of
    each target log-prob with respect to its hidden state computed in the same pass, (onehot - softmax) @ W:
    no [rows, vocab] tensor is kept for the backward pass or allocated whole (each is one fresh ~100 MB
    allocation at 490 x 49k, paid in page faults), and the log-softmax backward pass disappears. Rows x 49k
    vocabulary, forward and backward on SmolLM2: 252 ms against 368 ms for `_score_chunk` at 490 rows."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                fields: tuple[str, ...], with_grad: bool) -> tuple[torch.Tensor | None, ...]:
        rows = max(16, FROZEN_HEAD_BLOCK // weight.shape[0])
        blocks, grads = [], []
        for h, t in zip(hidden.split(rows), targets.split(rows), strict=True):
            product = torch.mm(h, weight.t(), out=_scratch("product", len(h), weight.shape[0], h.dtype))
            logits = _scratch("logits", len(h), weight.shape[0], torch.float32).copy_(product)
            top, top_index = logits.max(-1)
            logits -= top.unsqueeze(-1)  # shifted: each row's largest logit is 0
            probs = torch.exp(logits, out=_scratch("probs", len(h), weight.shape[0], torch.float32))
            total = probs.sum(-1)
            log_total = total.log()
            probs /= total.unsqueeze(-1)
            block = {"log_probs": logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - log_total}
            if "entropy" in fields:
                block["entropy"] = log_total - torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)
            if "log_sum_sq_probs" in fields:
                block["log_sum_sq_probs"] = torch.bmm(probs.unsqueeze(1), probs.unsqueeze(2)).view(-1).log()
            if "mean_logits" in fields:
                block["mean_logits"] = logits.mean(-1) + top
            if "is_top1" in fields:
                block["is_top1"] = top_index == t
            if with_grad:
                probs[torch.arange(len(t)), t] -= 1  # softmax - onehot: minus the gradient of the log-prob
                grads.append(product.copy_(probs) @ weight)
            blocks.append(block)
        if with_grad:
            ctx.save_for_backward(torch.cat(grads))
        scores = tuple(torch.cat([block[name] for block in blocks]) if name in blocks[0] else None
                       for name in OUTPUTS)
        ctx.mark_non_differentiable(*(x for x in scores[1:] if x is not None))
        return scores

    @staticmethod
    def backward(ctx, grad_log_probs: torch.Tensor, *unused):
        (minus_grad,) = ctx.saved_tensors
        grad_hidden = (minus_grad.float() * -grad_log_probs.unsqueeze(-1)).to(minus_grad.dtype)
        return grad_hidden, None, None, None, None


def _scratch(name: str, rows: int, columns: int, dtype: torch.dtype) -> torch.Tensor:
    """[rows, columns] of a CPU buffer kept between calls (see _SCRATCH), grown when a block needs more rows."""
    key = (name, columns, dtype)
    buffer = _SCRATCH.get(key)
    if buffer is None or buffer.shape[0] < rows:
        buffer = _SCRATCH[key] = torch.empty(max(rows, FROZEN_HEAD_BLOCK // columns), columns, dtype=dtype)
    return buffer[:rows]
