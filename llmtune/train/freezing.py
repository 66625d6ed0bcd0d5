"""Which transformer blocks train (recipe `freeze:`): full fine-tuning of the last N blocks only
(`train_last_blocks`), and gradual unfreezing (`gradual`, ULMFiT): the last blocks first, then
`blocks_per_phase` more, downwards, every `every` steps or epochs.

Any trainer uses it in two lines, once its model has its adapter (TRL's trainers add it in their constructor):

    class MyTrainer(GradualUnfreezingOptimizer, ..., Trainer): ...
    attach(recipe, trainer)

Gradual unfreezing changes `requires_grad` at phase boundaries (a callback, from `state.global_step` or
`state.epoch`, so a resumed run lands in its phase). The Trainer puts only parameters that require a gradient
into the optimizer, so `GradualUnfreezingOptimizer` builds it with every parameter the schedule will ever train;
until its phase a frozen parameter's gradient stays None, and torch's optimizers skip it (no step, no weight
decay: tests/test_freezing.py checks). It runs in one process only: DDP fixes the parameters it synchronises
when it wraps the model, so more than one process is refused.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_callback import ExportableState

from llmtune.config import FreezeSection, GradualUnfreezing, Recipe
from llmtune.distributed import process_state
from llmtune.errors import LlmtuneError
from llmtune.train.blocks import find_blocks, parameter_blocks

log = logging.getLogger("llmtune.freeze")

# The new head of a *ForSequenceClassification model: it starts random, so it trains whatever is frozen.
HEADS = frozenset({"score", "classifier"})
_PEFT_PREFIX = "base_model.model."


class FreezeError(LlmtuneError, RuntimeError):
    pass


def always_trained(recipe: Recipe) -> frozenset[str]:
    """Modules that train in every phase: a classification head and `adapter.modules_to_save`."""
    return HEADS | frozenset(recipe.adapter.modules_to_save if recipe.adapter else ())


@dataclass(frozen=True)
class FreezePlan:
    """Every parameter of the model with its block (None: outside the blocks) and whether the schedule ever
    trains it; `allowed` are the blocks that may train (the last `train_last_blocks`, or all)."""

    parameters: dict[str, torch.nn.Parameter]
    blocks: dict[str, int | None]
    trainable: frozenset[str]
    num_blocks: int
    allowed: range

    def last_blocks(self, count: int) -> range:
        """The last `count` blocks, within `allowed`."""
        return range(max(self.num_blocks - count, self.allowed.start), self.num_blocks)

    def names_for(self, blocks: range) -> list[str]:
        """Trainable parameters of `blocks`, and those outside the blocks (they train from the start)."""
        return [n for n in self.trainable if self.blocks[n] is None or self.blocks[n] in blocks]

    def train_only(self, blocks: range) -> list[str]:
        """Set `requires_grad` for `blocks`; returns the names that train."""
        names = self.names_for(blocks)
        chosen = set(names)
        for name, parameter in self.parameters.items():
            parameter.requires_grad_(name in chosen)
        return sorted(names)

    @contextlib.contextmanager
    def everything_trainable(self) -> Iterator[None]:
        """Inside the `with`, every parameter the schedule will ever train requires a gradient; restored after."""
        before = {name: p.requires_grad for name, p in self.parameters.items()}
        self.train_only(self.allowed)
        try:
            yield
        finally:
            for name, parameter in self.parameters.items():
                parameter.requires_grad_(before[name])

    def describe(self, blocks: range, names: list[str]) -> str:
        """`blocks 2-3 (+ score): 12 tensors, 34,816 parameters`."""
        span = f"block {blocks.start}" if len(blocks) == 1 else f"blocks {blocks.start}-{blocks.stop - 1}"
        outside = sorted({_module_label(n) for n in names if self.blocks[n] is None})
        extra = f" (+ {', '.join(outside)})" if outside else ""
        count = sum(self.parameters[n].numel() for n in names)
        return f"{span}{extra}: {len(names)} tensors, {count:,} parameters"


def _module_label(name: str) -> str:
    """`base_model.model.score.modules_to_save.default.weight` -> `score`."""
    module = name.removeprefix(_PEFT_PREFIX).rsplit(".", 1)[0]
    return module.split(".modules_to_save.", 1)[0]


def freeze_plan(model: torch.nn.Module, freeze: FreezeSection, always: frozenset[str]) -> FreezePlan:
    """With an adapter the schedule trains what PEFT made trainable (LoRA weights, `modules_to_save`); in full
    fine-tuning the blocks' weights and the `always` modules outside them; never embeddings, final norm, LM head."""
    blocks = parameter_blocks(model)
    num_blocks = len(find_blocks(model)[1])
    allowed = range(num_blocks - min(freeze.train_last_blocks or num_blocks, num_blocks), num_blocks)
    parameters = dict(model.named_parameters())
    adapter = is_peft_model(model)

    def ever(name: str) -> bool:
        block = blocks[name]
        if block is not None:
            return block in allowed and (parameters[name].requires_grad or not adapter)
        return parameters[name].requires_grad if adapter else not always.isdisjoint(name.split("."))

    trainable = frozenset(n for n in parameters if ever(n))
    return FreezePlan(parameters, blocks, trainable, num_blocks, allowed)


# --------------------------------------------------------------------------------------------- gradual


def phase_at(gradual: GradualUnfreezing, state: TrainerState) -> int:
    """The phase at this point of training: from the steps done or the epochs completed (as a checkpoint
    restores both, a resumed run continues in its phase)."""
    done = state.global_step if gradual.unit == "steps" else int(state.epoch or 0)
    return done // gradual.every


def blocks_in_phase(plan: FreezePlan, gradual: GradualUnfreezing, phase: int) -> range:
    return plan.last_blocks(gradual.start_blocks + phase * gradual.blocks_per_phase)


class GradualUnfreezingCallback(TrainerCallback, ExportableState):
    """Sets which blocks train at the start of training and of every step. `phases` records each change
    ({"phase", "step", "blocks", "trainable_parameters"}); it is saved in checkpoints, so a resumed run's
    record is the whole run's."""

    def __init__(self, plan: FreezePlan, gradual: GradualUnfreezing):
        self.plan, self.gradual = plan, gradual
        self.phases: list[dict[str, Any]] = []
        self._blocks: range | None = None  # the blocks training now

    def state(self) -> dict[str, Any]:
        return {"args": {}, "attributes": {"phases": self.phases}}

    def on_train_begin(self, args, state, control, **kwargs):
        # transformers restores a checkpoint's callback states only by re-creating the callback from `args`
        # (and only with `restore_callback_states_from_checkpoint`); this one reads its record back itself.
        saved = state.stateful_callbacks.get(type(self).__name__) if state.global_step else None
        self.phases = list(saved["attributes"]["phases"]) if isinstance(saved, dict) else []
        self._blocks = None
        self.apply(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self.apply(state)

    def apply(self, state: TrainerState) -> None:
        phase = phase_at(self.gradual, state)
        blocks = blocks_in_phase(self.plan, self.gradual, phase)
        if blocks == self._blocks:
            return
        self._blocks = blocks
        names = self.plan.train_only(blocks)
        log.info("gradual unfreezing phase %d from step %d: %s", phase, state.global_step,
                 self.plan.describe(blocks, names))
        if self.phases and self.phases[-1]["blocks"] == list(blocks):
            return  # resumed inside a phase the restored record holds
        count = sum(self.plan.parameters[n].numel() for n in names)
        self.phases.append({"phase": phase, "step": state.global_step, "blocks": list(blocks),
                            "trainable_parameters": count})


class GradualUnfreezingOptimizer:
    """Trainer mixin: the optimizer is built with every parameter the unfreezing schedule will ever train (the
    Trainer takes only those that require a gradient), then the current phase is restored."""

    def create_optimizer(self, model=None):
        schedule = gradual_callback(self)
        if schedule is None or self.optimizer is not None:
            return super().create_optimizer(model)
        with schedule.plan.everything_trainable():
            return super().create_optimizer(model)


def gradual_callback(trainer: Trainer) -> GradualUnfreezingCallback | None:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, GradualUnfreezingCallback)]
    return found[0] if found else None


def phase_record(trainer: Trainer) -> list[dict[str, Any]] | None:
    """The gradual unfreezing phases of the run (for the manifest); None without gradual unfreezing."""
    schedule = gradual_callback(trainer)
    return schedule.phases if schedule is not None else None


# --------------------------------------------------------------------------------------------- wiring


def prepare(recipe: Recipe, model: torch.nn.Module, always: frozenset[str] | None = None) -> list[TrainerCallback]:
    """Freeze `model` (with its adapter already on) as `recipe.freeze` says; the callbacks to add to the trainer.
    `always`: modules that train in every phase (default: `always_trained(recipe)`)."""
    freeze = recipe.freeze
    if freeze is None:
        return []
    plan = freeze_plan(model, freeze, always_trained(recipe) if always is None else always)
    gradual = freeze.gradual
    if gradual is None:
        names = plan.train_only(plan.allowed)
        log.info("freeze: training %s; the rest is frozen", plan.describe(plan.allowed, names))
        return []
    processes = process_state().num_processes
    if processes > 1:
        raise FreezeError(f"freeze.gradual runs in one process, not {processes}: DDP fixes the parameters it "
                          "synchronises when it wraps the model. Train in one process, or use "
                          "`freeze.train_last_blocks` / `adapter.layers`")
    schedule = GradualUnfreezingCallback(plan, gradual)
    plan.train_only(blocks_in_phase(plan, gradual, 0))  # what the trainer reports before training starts
    log.info("freeze: gradual unfreezing of blocks %d-%d: the last %d first, then %d more every %d %s",
             plan.allowed.start, plan.num_blocks - 1, gradual.start_blocks, gradual.blocks_per_phase,
             gradual.every, gradual.unit)
    return [schedule]


def attach(recipe: Recipe, trainer: Trainer, always: frozenset[str] | None = None) -> None:
    """`prepare` on the trainer's model, its callbacks added; gradual unfreezing needs the optimizer mixin."""
    callbacks = prepare(recipe, trainer.model, always)
    if callbacks and not isinstance(trainer, GradualUnfreezingOptimizer):
        raise TypeError(f"{type(trainer).__name__}: add GradualUnfreezingOptimizer to its bases for freeze.gradual")
    for callback in callbacks:
        trainer.add_callback(callback)
