"""Which examples and which augmentation each process reads at each step: pure functions of (seed, step).

The training order is a function of ``(seed, step)`` only: epoch ``e`` is a permutation of the whole split
drawn from ``(seed, e)``; global batch ``k`` of the epoch is rows ``[k*B, (k+1)*B)`` of it (the remainder is
dropped, a different one each epoch); process ``p`` of ``P`` reads rows ``[p*B/P, (p+1)*B/P)`` of that global
batch. Augmentation randomness of a global batch is drawn from ``(seed, step)`` for all its rows and sliced
the same way. So resuming at a step is ``epoch, k = divmod(step, steps_per_epoch)`` with no replay and no
iterator state, and a step's global batch does not depend on the number of processes, devices or workers.

No I/O here; every ``global_batch`` must be a multiple of ``process_count`` (the Pipeline checks that once).
"""

from __future__ import annotations

import functools

import numpy as np

# Distinct random streams derived from the seed.
PERMUTATION_STREAM, AUGMENT_STREAM = 0, 1


def process_rows(global_batch: int, process_index: int, process_count: int) -> slice:
    """Rows of a global batch that process ``process_index`` of ``process_count`` reads."""
    per_process = global_batch // process_count
    return slice(process_index * per_process, (process_index + 1) * per_process)


@functools.lru_cache(maxsize=4)
def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The (read-only) order of the training split in ``epoch``."""
    perm = np.random.default_rng([seed, PERMUTATION_STREAM, epoch]).permutation(num_examples)
    perm.flags.writeable = False
    return perm


def train_indices(
    num_examples: int, global_batch: int, step: int, seed: int, *, process_index: int = 0, process_count: int = 1
) -> np.ndarray:
    """Split indices read by one process at training ``step`` (its rows of the global batch)."""
    steps_per_epoch = num_examples // global_batch
    if steps_per_epoch == 0:
        raise ValueError(f"global batch {global_batch} is larger than the split ({num_examples} examples)")
    epoch, k = divmod(step, steps_per_epoch)
    batch = epoch_permutation(num_examples, seed, epoch)[k * global_batch : (k + 1) * global_batch]
    return batch[process_rows(global_batch, process_index, process_count)]


def num_eval_batches(num_examples: int, global_batch: int) -> int:
    """Batches of one evaluation pass; the last one is padded."""
    return -(-num_examples // global_batch)


def eval_indices(
    num_examples: int, global_batch: int, batch_index: int, *, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, mask) read by one process for eval batch ``batch_index``; padding rows have mask 0."""
    positions = batch_index * global_batch + np.arange(global_batch)
    mask = positions < num_examples
    rows = process_rows(global_batch, process_index, process_count)
    # Padding rows point at example 0 so they can be read like any other; the mask removes them.
    return np.where(mask, positions, 0)[rows], mask[rows].astype(np.float32)


def augment_params(
    seed: int, step: int, global_batch: int, translate: int, flip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Crop offsets (y, x) in [0, 2*translate] and flip flags for every row of a global batch."""
    rng = np.random.default_rng([seed, AUGMENT_STREAM, step])
    offsets = rng.integers(0, 2 * translate + 1, size=(2, global_batch))
    flips = rng.random(global_batch) < 0.5 if flip else np.zeros(global_batch, bool)
    return offsets[0], offsets[1], flips


def example_seeds(seed: int, step: int, global_batch: int) -> np.ndarray:
    """One seed per row of a global batch, for augmentation drawn per example (random-resized crops)."""
    return np.random.default_rng([seed, AUGMENT_STREAM, step]).integers(0, 2**63, size=global_batch)
