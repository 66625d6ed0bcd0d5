"""Callbacks that stop training safely: on a non-finite gradient (before the optimizer applies it) and on
SIGTERM/SIGINT (a checkpoint at the next step boundary, all ranks agreeing on the step)."""

from __future__ import annotations

import logging
import math
import signal
from types import FrameType

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from llmtune.errors import LlmtuneError

log = logging.getLogger("llmtune.guards")


class TrainingDivergedError(LlmtuneError, FloatingPointError):
    """Raised before a poisoned optimizer step, so no checkpoint ever holds non-finite weights."""


def gradient_norm(model: torch.nn.Module) -> float:
    grads = [p.grad.detach() for p in model.parameters() if p.requires_grad and p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])).item()


class DivergenceGuard(TrainerCallback):
    """transformers only filters a NaN loss out of the logs and steps the optimizer anyway; we stop first."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        norm = gradient_norm(model)
        if not math.isfinite(norm):
            step = state.global_step + 1
            raise TrainingDivergedError(
                f"training diverged at step {step}: the gradient norm is {norm} (loss or gradients are not finite). "
                "Nothing from this step was applied or saved. Try a lower train.learning_rate, "
                "train.max_grad_norm > 0, precision fp32 or bf16 instead of fp16, and check the data near this step."
            )


class PreemptionGuard(TrainerCallback):
    """On SIGTERM or SIGINT: finish the current step, save a checkpoint, stop. Resume continues exactly."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self.stopped_at: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = signal.Signals(signum).name
        log.warning("%s received: saving a checkpoint at the end of this step, then stopping", self.requested)

    def _agreed(self) -> bool:
        # Ranks receive the signal at different moments; all must stop at the same step, so they vote.
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32)
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed():
            self.requested = self.requested or "SIGTERM (another rank)"
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
        return control


class ThroughputMeter(TrainerCallback):
    """Tokens seen by this process, so tokens/s stays honest after a resume."""

    def __init__(self) -> None:
        self.tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_at_start = int(state.num_input_tokens_seen)  # restored from the checkpoint by now
