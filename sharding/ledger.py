"""The bytes ledger: what each party sends and receives, counted from shapes and dtypes.

Communication claims (federated uplinks, ring attention traffic, gossip) are checked with
this analytic ledger, never by timing on a CPU. An algorithm records every array it
actually transmits (`add_array`) or, for compressed payloads, the number of values and
their bit width (`add`). Sparse payloads pay for their indices: `k` values of a length-`d`
vector cost `k * (value_bits + ceil(log2 d))` bits.
"""

import dataclasses
import math
from collections import defaultdict

import numpy as np


@dataclasses.dataclass(frozen=True)
class Entry:
  """One transfer: `count` messages of `bits` bits each, in one direction."""
  name: str
  direction: str
  bits: int
  count: int = 1

  @property
  def total_bytes(self) -> float:
    return self.bits * self.count / 8


@dataclasses.dataclass
class CommLedger:
  """Accumulates transfers by direction (`up`, `down`, `send`, `recv`, ...).

  Directions are free-form strings so that each paper can use its own words (a federated
  client sends `up` and receives `down`; a ring device does `send`).
  """
  entries: list[Entry] = dataclasses.field(default_factory=list)

  def add(self, name: str, direction: str, *, n_values: int, bits_per_value: int,
          n_index_values: int = 0, bits_per_index: int = 0, count: int = 1) -> None:
    """Records `count` messages of `n_values` values (plus optional indices)."""
    bits = n_values * bits_per_value + n_index_values * bits_per_index
    self.entries.append(Entry(name, direction, int(bits), int(count)))

  def add_array(self, name: str, direction: str, shape, dtype, *, count: int = 1) -> None:
    """Records `count` messages each carrying one dense array of `shape` and `dtype`."""
    n_values = int(np.prod(shape))
    self.add(name, direction, n_values=n_values,
             bits_per_value=np.dtype(dtype).itemsize * 8, count=count)

  def add_tree(self, name: str, direction: str, tree, *, count: int = 1) -> None:
    """Records `count` messages carrying every leaf of a pytree of arrays."""
    import jax  # Local: the ledger itself is usable without JAX.
    for leaf in jax.tree.leaves(tree):
      self.add_array(name, direction, leaf.shape, leaf.dtype, count=count)

  def total_bytes(self, direction: str | None = None) -> float:
    """Bytes over all entries, or over one direction."""
    return sum(e.total_bytes for e in self.entries
               if direction is None or e.direction == direction)

  def by_name(self) -> dict[str, float]:
    """Bytes per entry name, summed over directions."""
    totals = defaultdict(float)
    for e in self.entries:
      totals[e.name] += e.total_bytes
    return dict(totals)


def sparse_bits(k: int, d: int, value_bits: int = 32) -> int:
  """Bits of `k` values of a length-`d` vector sent with their indices."""
  return k * (value_bits + max(1, math.ceil(math.log2(d))))


def ring_allreduce_bytes(size_bytes: float, n: int) -> float:
  """Bytes each device sends in a ring all-reduce of a `size_bytes` buffer."""
  return 2 * (n - 1) / n * size_bytes


def allgather_bytes(size_bytes: float, n: int) -> float:
  """Bytes each device sends in a ring all-gather (or reduce-scatter) of the full buffer."""
  return (n - 1) / n * size_bytes
