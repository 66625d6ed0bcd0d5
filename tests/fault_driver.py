"""Run `llmtune train` with a fault injected at an exact point; the resume tests launch this as a process.

    python -m tests.fault_driver RECIPE --sigkill-at-step N | --sigkill-at-epoch-end E |
                                        --sigkill-during-save N | --sigterm-at-step N

The faults are real signals sent to this process (SIGKILL cannot be caught: it is `kill -9`).
"""

from __future__ import annotations

import argparse
import os
import signal

from transformers import Trainer, TrainerCallback

from llmtune.config import load_recipe
from llmtune.train import preference, sft


class SignalAt(TrainerCallback):
    def __init__(self, sig: signal.Signals, step: int | None = None, epoch: int | None = None) -> None:
        self.sig, self.step, self.epoch = sig, step, epoch
        self.only_rank = os.environ.get("FAULT_ONLY_RANK")  # e.g. "0": the signal reaches one rank only

    def on_step_end(self, args, state, control, **kwargs):
        if self.only_rank is not None and os.environ.get("RANK", "0") != self.only_rank:
            return
        if self.step is not None and state.global_step == self.step:
            os.kill(os.getpid(), self.sig)

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.epoch is not None and round(state.epoch) == self.epoch:
            os.kill(os.getpid(), self.sig)


def _kill_during_save(step: int) -> None:
    # Die after the model and optimizer are written but before the RNG state and the checkpoint listing.
    original = Trainer._save_rng_state

    def dying(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)

    Trainer._save_rng_state = dying


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--sigkill-at-step", type=int)
    parser.add_argument("--sigkill-at-epoch-end", type=int)
    parser.add_argument("--sigkill-during-save", type=int)
    parser.add_argument("--sigterm-at-step", type=int)
    args = parser.parse_args()

    fault: TrainerCallback | None = None
    if args.sigkill_at_step:
        fault = SignalAt(signal.SIGKILL, step=args.sigkill_at_step)
    elif args.sigkill_at_epoch_end:
        fault = SignalAt(signal.SIGKILL, epoch=args.sigkill_at_epoch_end)
    elif args.sigterm_at_step:
        fault = SignalAt(signal.SIGTERM, step=args.sigterm_at_step)
    elif args.sigkill_during_save:
        _kill_during_save(args.sigkill_during_save)

    recipe = load_recipe(args.recipe)
    method = sft if recipe.method == "sft" else preference
    build = method.build_trainer

    def build_with_fault(recipe):
        session = build(recipe)
        if fault is not None:
            session.trainer.add_callback(fault)
        return session

    method.build_trainer = build_with_fault
    out = method.main(recipe)
    print("finished" if out else "stopped")


if __name__ == "__main__":
    main()
