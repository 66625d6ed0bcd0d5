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
