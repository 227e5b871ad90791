"""Pair sampling as in the official loader (docs/method.md §2.7, §2.8), but seeded.

Training: for each image, one of its classes uniformly, then a partner uniformly among all images
holding that class (possibly itself), so a pair always shares a class. Localization: k related
images per class, drawn with replacement. The official code has no seed; here every epoch's
order and partners follow from (seed, epoch), so a resumed run sees the same pairs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from mcis_cli.errors import McisError


class PairSampler:
    def __init__(self, labels: Sequence[Sequence[int]], seed: int):
        self.labels = [tuple(sorted(set(row))) for row in labels]
        self.seed = seed
        self.by_class: dict[int, list[int]] = {}
        for index, row in enumerate(self.labels):
            for c in row:
                self.by_class.setdefault(c, []).append(index)

    def __len__(self) -> int:
        return len(self.labels)

    def partner(self, index: int, rng: random.Random) -> int:
        """A random positive class of `index`, then a random image holding it.

        An image without any label (background only) gets a uniformly random partner.
        """
        row = self.labels[index]
        if not row:
            return rng.randrange(len(self.labels))
        return rng.choice(self.by_class[rng.choice(row)])

    def related(self, cls: int, k: int, rng: random.Random) -> list[int]:
        """k images holding `cls`, drawn with replacement (the test-time partners of §2.8)."""
        if cls not in self.by_class:
            raise McisError(f"no training image holds class {cls}; cannot draw related images")
        return rng.choices(self.by_class[cls], k=k)

    def _rng(self, stream: str, epoch: int) -> random.Random:
        return random.Random(f"{stream}:{self.seed}:{epoch}")  # str seeds hash stably (sha512)

    def epoch_order(self, epoch: int) -> list[int]:
        """The shuffled visiting order of an epoch."""
        order = list(range(len(self.labels)))
        self._rng("order", epoch).shuffle(order)
        return order

    def epoch_partners(self, epoch: int) -> list[int]:
        """partners[i] is image i's partner in this epoch; independent of the visiting order."""
        rng = self._rng("partners", epoch)
        return [self.partner(index, rng) for index in range(len(self.labels))]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    """This rank's share of an epoch's order for DDP: strided, padded by repeating from the start
    so every rank gets the same count (as torch's DistributedSampler)."""
    if not indices:
        return []
    total = -(-len(indices) // world) * world
    padded = list(indices) * (total // len(indices)) + list(indices[: total % len(indices)])
    return padded[rank::world]
