"""The process group, set up the way the Trainer will set it up.

A bare `PartialState()` on a CPU-only machine reports a non-distributed state even under torchrun, so every
rank believes it is the main process (and `main_process_first` does not order anything). The Trainer uses
`cpu=True` when there is no GPU; creating the shared state the same way first keeps both views identical.
"""

from __future__ import annotations

import gc

import torch
from accelerate import PartialState
from torch.nn.parallel import DistributedDataParallel


def process_state() -> PartialState:
    return PartialState(cpu=not torch.cuda.is_available())


def finish(state: PartialState) -> None:
    """All ranks meet, then the process group is torn down before the interpreter exits.

    A rank that exits while a peer is still inside a collective, or with a live gloo group, can die in
    C++ ("terminate called without an active exception", SIGABRT) after a clean run. And a DDP wrapper that
    outlives `destroy_process_group` deadlocks when it is freed: its Reducer's `~ProcessGroupGloo` waits on a
    mutex forever (pytorch/pytorch#75097; seen on torch 2.13 CPU, one rank hanging after a finished run). So
    the caller frees its DDP-wrapped model first (`release_wrapped_model`), and this checks that it did.
    """
    state.wait_for_everyone()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gc.collect()
        live = [o for o in gc.get_objects() if isinstance(o, DistributedDataParallel)]
        if live:
            raise RuntimeError(f"{len(live)} DistributedDataParallel wrapper(s) still alive before "
                               "destroy_process_group; freeing them later would deadlock (pytorch#75097)")
        torch.distributed.destroy_process_group()


def release_wrapped_model(trainer) -> None:
    """Drop a Trainer's DDP wrapper (and accelerate's references to it) while the process group is alive."""
    trainer.accelerator.free_memory()
    trainer.model_wrapped = trainer.model
    gc.collect()
