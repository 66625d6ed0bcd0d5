"""Length-grouped batches that a resumed run draws exactly as the uninterrupted one did.

Upstream bug (transformers 5.23, `Trainer._get_train_sampler`): the training `LengthGroupedSampler` is built
without a generator, so each epoch's order comes from the global RNG at the moment the epoch's iterator starts,
which a resumed run reaches in a different state: `train_sampling_strategy="group_by_length"` silently breaks
exact resume (tests/test_resume.py fails without this). The evaluation sampler does get a seeded generator.
Here each epoch's order is seeded by `data_seed + epoch`, through the `set_epoch` the Trainer already calls.
Remove when transformers seeds the training sampler per epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices


class EpochSeededLengthGroupedSampler(LengthGroupedSampler):
    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class ReproducibleLengthGrouping:
    """Trainer mixin: the length-grouped training sampler, seeded per epoch."""

    def _get_train_sampler(self, *args, **kwargs):
        sampler = super()._get_train_sampler(*args, **kwargs)
        if type(sampler) is not LengthGroupedSampler:
            return sampler
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return EpochSeededLengthGroupedSampler(sampler.batch_size, sampler.lengths, seed)
