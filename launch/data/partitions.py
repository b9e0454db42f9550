"""Client partitions of a labelled dataset: Dirichlet(alpha) label skew, IID, and padding.

The Dirichlet split is the non-IID benchmark of Hsu, Qi, Brown, "Measuring the Effects of
Non-Identical Data Distribution for Federated Visual Classification", 2019,
arXiv:1909.06335: for every class k a vector of client proportions
p_k ~ Dirichlet(alpha * 1_C) is drawn and the (shuffled) examples of class k are cut into C
consecutive pieces of sizes proportional to p_k. Small alpha concentrates each class on few
clients (strong label skew); alpha -> inf gives the IID split.

Every example is assigned to exactly one client. Host-side NumPy, seeded with
`np.random.default_rng(seed)`, so a split is reproducible. `pad_client_shards` turns the
ragged shards into static `[C, N, ...]` arrays plus a `[C, N]` mask, the input layout of the
federated round engine (`jaxrepro.algorithms.federated.engine`).

Differences from common code bases (e.g. the FedLab / NIID-Bench splitters): those also
rebalance proportions so no client exceeds N / C examples and redraw until every client has
a minimum size; here only the redraw (`min_size`) is offered.
"""

from typing import Any

import numpy as np


def iid_partition(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """A uniformly random split into `num_clients` shards of (almost) equal size.

  Returns:
    A list of C int64 index arrays; shard sizes differ by at most one.
  """
  if num_clients < 1 or num_examples < 0:
    raise ValueError(f"need num_clients >= 1 and num_examples >= 0, got {num_clients}, "
                     f"{num_examples}")
  perm = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(s) for s in np.array_split(perm, num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        *, min_size: int = 0, max_tries: int = 1000) -> list[np.ndarray]:
  """A label-skewed split: class k is shared out with proportions Dirichlet(alpha * 1_C).

  Args:
    labels: int `[N]` class labels.
    num_clients: C.
    alpha: Dirichlet concentration (> 0); smaller = more skewed.
    seed: NumPy seed; the same seed gives the same split.
    min_size: redraw the whole split until every client has at least this many examples.
    max_tries: give up (ValueError) after this many draws.

  Returns:
    A list of C sorted int64 index arrays whose union is `range(N)`, disjoint.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} "
                     f"{labels.shape}")
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}")
  if min_size * num_clients > labels.shape[0]:
    raise ValueError(f"min_size={min_size} for {num_clients} clients needs more than "
                     f"{labels.shape[0]} examples")
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(max_tries):
    shards = [[] for _ in range(num_clients)]
    for k in classes:
      idx = rng.permutation(np.flatnonzero(labels == k))
      p = rng.dirichlet(np.full(num_clients, alpha))
      # Cut points from the cumulative proportions: every example lands in one piece.
      cuts = (np.cumsum(p)[:-1] * idx.shape[0]).astype(np.int64)
      for client, piece in enumerate(np.split(idx, cuts)):
        shards[client].append(piece)
    out = [np.sort(np.concatenate(s)).astype(np.int64) for s in shards]
    if min(s.shape[0] for s in out) >= min_size:
      return out
  raise ValueError(f"no Dirichlet(alpha={alpha}) split with min_size={min_size} in "
                   f"{max_tries} draws; lower min_size or raise alpha")


def label_histograms(labels: np.ndarray, partitions: list[np.ndarray],
                     num_classes: int) -> np.ndarray:
  """int64 `[C, num_classes]` counts of each label on each client."""
  labels = np.asarray(labels)
  return np.stack([np.bincount(labels[p], minlength=num_classes) for p in partitions])


def pad_client_shards(arrays: Any, partitions: list[np.ndarray], *,
                      size: int | None = None, multiple_of: int = 1
                      ) -> tuple[Any, np.ndarray, np.ndarray]:
  """Gathers each client's examples into static `[C, N, ...]` arrays with a mask.

  Args:
    arrays: a pytree (dict / tuple / list) of NumPy arrays with leading axis = examples.
    partitions: C index arrays (e.g. from `dirichlet_partition`).
    size: the padded shard size N; default the largest shard rounded up to
      `multiple_of` (e.g. the local batch size, so it divides N).
    multiple_of: see `size`.

  Returns:
    `(padded, mask, counts)`: `padded` has the structure of `arrays` with leaves
    `[C, N, ...]` (padding rows are zeros), `mask` is bool `[C, N]` (True = real example,
    real examples first), `counts` is int64 `[C]`.

  Raises:
    ValueError: if a shard is larger than `size` or `multiple_of < 1`.
  """
  import jax  # Local: pytree handling only; the splitters above are NumPy-only.

  if multiple_of < 1:
    raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
  counts = np.array([p.shape[0] for p in partitions], np.int64)
  if size is None:
    largest = int(counts.max()) if counts.size else 0
    size = max(multiple_of, -(-largest // multiple_of) * multiple_of)
  if counts.size and counts.max() > size:
    raise ValueError(f"size={size} is smaller than the largest shard ({counts.max()})")
  mask = np.arange(size)[None, :] < counts[:, None]

  def pad(x):
    x = np.asarray(x)
    out = np.zeros((len(partitions), size) + x.shape[1:], x.dtype)
    for c, p in enumerate(partitions):
      out[c, :p.shape[0]] = x[p]
    return out

  return jax.tree.map(pad, arrays), mask, counts
