"""The training order: what a resumed run needs to serve the same samples with the same prompt dropout.

Each epoch's order of the training rows and its prompt-dropout draws come from a generator
seeded by (``data.seed``, epoch) alone, never from the global random state, so any epoch can
be rebuilt in another process. A run resumed from a checkpoint taken in the middle of an
epoch starts that epoch after the samples trained before the checkpoint (Lightning restores
the epoch and the number of batches done; it calls ``set_epoch`` at the start of every epoch).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class EpochOrder(Sampler):
    """Yields (row position, drop the prompt) for one epoch of ``size`` training rows."""

    def __init__(self, size: int, prompt_dropout: float, seed: int, resume_epoch: int = 0, resume_skip: int = 0):
        self.size, self.prompt_dropout, self.seed = size, prompt_dropout, seed
        self.epoch = self.resume_epoch = resume_epoch
        self.resume_skip = resume_skip

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skipped(self) -> int:
        """Samples of this epoch already trained before the checkpoint the run resumed from."""
        return self.resume_skip if self.epoch == self.resume_epoch else 0

    def __len__(self) -> int:
        # The whole epoch, also when resumed in it: Lightning counts the epoch's batches from its restored progress,
        # and reads the loader's length once (a shorter one would cut every later epoch short).
        return self.size

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        generator = np.random.default_rng((self.seed, self.epoch))
        order = generator.permutation(self.size)
        dropped = generator.random(self.size) < self.prompt_dropout
        for position in range(self.skipped(), self.size):
            yield int(order[position]), bool(dropped[position])
