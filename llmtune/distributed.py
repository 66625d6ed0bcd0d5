"""The process group, set up the way the Trainer will set it up.

A bare `PartialState()` on a CPU-only machine reports a non-distributed state even under torchrun, so every
rank believes it is the main process (and `main_process_first` does not order anything). The Trainer uses
`cpu=True` when there is no GPU; creating the shared state the same way first keeps both views identical.
"""

from __future__ import annotations

import torch
from accelerate import PartialState


def process_state() -> PartialState:
    return PartialState(cpu=not torch.cuda.is_available())


def finish(state: PartialState) -> None:
    """All ranks meet, then the process group is torn down before the interpreter exits.

    A rank that exits while a peer is still inside a collective, or with a live gloo group, can die in
    C++ ("terminate called without an active exception", SIGABRT) after a clean run.
    """
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
