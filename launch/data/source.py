"""The random-access source protocol, and deterministic batches drawn from a source.

A source is anything with `__len__` and `__getitem__(i) -> {name: array}`: an in-memory
`ArraySource` of generated data, or a `TfdsSource` over prepared ArrayRecord files. Batch
`s` of a run is a pure function of (seed, s): each epoch has its own permutation seeded by
(seed, epoch), so a resumed run reads exactly the batches the uninterrupted run read, with
no iterator state to checkpoint.
"""

from collections.abc import Callable, Mapping
from typing import Protocol, runtime_checkable

import numpy as np

Record = Mapping[str, np.ndarray]


@runtime_checkable
class RandomAccessSource(Protocol):
  """A finite dataset readable by index."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Record: ...


class ArraySource:
  """A source over equal-length arrays held in memory (generated data)."""

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"arrays must have equal lengths, got {lengths}")
    self.arrays = {name: np.asarray(a) for name, a in arrays.items()}
    self._len = next(iter(lengths.values()))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> Record:
    return {name: a[index] for name, a in self.arrays.items()}

  def take(self, indices: np.ndarray) -> Record:
    """Vectorised batch read (the fast path `load_batch` uses when available)."""
    return {name: a[indices] for name, a in self.arrays.items()}


def batch_indices(num_records: int, batch_size: int, step: int, seed: int,
                  *, shuffle: bool = True) -> np.ndarray:
  """Record indices of batch `step`: consecutive slices of per-epoch permutations.

  Batches may straddle an epoch boundary; every record is read once per epoch.
  """
  if num_records <= 0 or batch_size <= 0:
    raise ValueError(f"num_records={num_records} and batch_size={batch_size} must be > 0")
  positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
  epochs, offsets = np.divmod(positions, num_records)
  if not shuffle:
    return offsets
  out = np.empty_like(offsets)
  for epoch in np.unique(epochs):
    perm = np.random.default_rng([seed, int(epoch)]).permutation(num_records)
    sel = epochs == epoch
    out[sel] = perm[offsets[sel]]
  return out


def load_batch(source: RandomAccessSource, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Reads and stacks the records at `indices`."""
  if hasattr(source, "take"):
    return dict(source.take(indices))
  records = [source[int(i)] for i in indices]
  return {name: np.stack([np.asarray(r[name]) for r in records]) for name in records[0]}


def host_batches(source: RandomAccessSource, batch_size: int, seed: int, *,
                 shuffle: bool = True) -> Callable[[int, int], dict[str, np.ndarray]]:
  """`(start_step, n) -> batches stacked [n, batch_size, ...]` for `train_loop.fit`."""
  def batches(start_step: int, n: int) -> dict[str, np.ndarray]:
    per_step = [load_batch(source, batch_indices(len(source), batch_size, s, seed,
                                                 shuffle=shuffle))
                for s in range(start_step, start_step + n)]
    return {name: np.stack([b[name] for b in per_step]) for name in per_step[0]}
  return batches
