"""The package's one seeded sampler: few-shot draws, expert samples and a longer expert list's
sample all go through `sample_indices`, so the same (n, k, seed) always draws the same items."""
from __future__ import annotations

import random
from typing import Sequence


def sample_indices(n: int, k: int, seed: int) -> list[int]:
    """k distinct positions of n, in drawn order, from a private random.Random(seed): the
    package's one sampler (few-shot draws, expert samples). The global RNG is neither read nor
    advanced, and the draw depends only on (n, k, seed)."""
    return random.Random(seed).sample(range(n), k)


def sample_names(names: Sequence[str], n: int, seed: int) -> list[str]:
    """n distinct names drawn with the seed from the sorted names, returned sorted: the same
    experts for every method of a (task, seed), whatever order they were listed in."""
    if not 1 <= n <= len(names):
        raise ValueError(f"cannot sample {n} experts from {len(names)}; pass more experts or "
                         "lower -n")
    ordered = sorted(names)
    return sorted(ordered[i] for i in sample_indices(len(ordered), n, seed))

