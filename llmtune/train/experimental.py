"""TRL's experimental trainers llmtune uses, imported in one place.

ORPO lives in `trl.experimental` in TRL 1.16 ("APIs here are unstable"); the tests in
tests/test_preference.py pin the behaviour we rely on (loss formula at step 0, adapter-only training).
"""

from __future__ import annotations

import os
import warnings

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

__all__ = ["ORPOConfig", "ORPOTrainer"]
