"""Seeded numpy generators of synthetic graphs, splits and local-file loaders for graph papers.

Every generator is host-side numpy, deterministic in its `seed` and returns frozen
dataclasses of numpy arrays, so a driver can build jraph `GraphsTuple`s (`to_graphs_tuple`)
or JAX constants from them once. At the spec cards' sizes the graph generators take well
under a second; `random_molecules` costs about 1.3 ms per molecule (3 ms with explicit
hydrogens), mostly the geometry relaxation of ring molecules.

Generators:

* `bipartite_sbm`: a user-item interaction graph from a bipartite stochastic block model
  with Pareto item popularity (used by UltraGCN and GraphHash). Users and items belong to
  latent communities; each user mostly interacts with popular items of its own community,
  which is the low-rank-plus-popularity structure that collaborative filtering exploits.
* `sbm`, `heterophilous_sbm`, `cora_sized_sbm`: node-classification graphs from a
  stochastic block model with class-dependent bag-of-words or Gaussian features (STABLE,
  GMN, graph valuation, NCN). `sbm_probabilities` turns a target average degree and edge
  homophily into `(p_in, p_out)`.
* `random_geometric_graph`: points in the unit square joined within a radius, with
  uninformative (or weakly informative) noisy features (NCN).
* `random_molecules`: QM9-like molecules with typed atoms (H, C, N, O, F), typed bonds
  (orders 1-3) that respect valences, and optional 3-D coordinates (PONITA, EHGNN).

Splits: `node_split` (random or per-class node masks) and `edge_split` (link-prediction
train/val/test edges with sampled negatives).

Loaders read local files only (no downloads): `load_planetoid` (the `ind.<name>.*` files of
Cora/Citeseer/Pubmed), `load_ogbl` (ogbl-style edge lists, CSV or NPZ, with NPZ splits) and
`load_interactions` (MovieLens-style `user item [rating] [timestamp]` files and
Gowalla/LightGCN-style `train.txt`/`test.txt` adjacency lists).
"""

import dataclasses
import os
import pickle
from collections.abc import Sequence

import jraph
import numpy as np
import scipy.sparse as sp
from scipy import optimize, spatial


@dataclasses.dataclass(frozen=True, eq=False)
class BipartiteInteractions:
  """Implicit-feedback interactions, split per user into train and test.

  Attributes:
    train_pairs: `[N_train, 2]` int32 `(user, item)` pairs, unique, sorted by user then item.
    test_pairs: `[N_test, 2]` int32 pairs, disjoint from `train_pairs`, same order.
    n_users: number of users `U`; user ids are `0..U-1`.
    n_items: number of items `I`; item ids are `0..I-1`.
    user_community: `[U]` int32 latent community of each user.
    item_community: `[I]` int32 latent community of each item.
    item_popularity: `[I]` float64 Pareto popularity weight of each item (before sampling).
  """
  train_pairs: np.ndarray
  test_pairs: np.ndarray
  n_users: int
  n_items: int
  user_community: np.ndarray
  item_community: np.ndarray
  item_popularity: np.ndarray


def _weighted_without_replacement(rng: np.random.Generator, ids: np.ndarray,
                                 weights: np.ndarray, k: int) -> np.ndarray:
  """`k` distinct `ids`, drawn one after another with probability proportional to weight.

  Successive weighted draws without replacement have the same law as the first `k`
  distinct values of a stream of draws *with* replacement, which costs `O(k log n)` by
  inverse-CDF search instead of `O(n)` per call for `rng.choice(..., replace=False, p=...)`.
  """
  cdf = np.cumsum(weights)
  got = np.zeros(0, np.int64)
  for _ in range(32):
    if got.size >= k:
      return got[:k]
    draws = np.searchsorted(cdf, rng.random(2 * k + 8) * cdf[-1], side="right")
    stream = np.concatenate([got, ids[np.minimum(draws, ids.size - 1)]])
    _, first = np.unique(stream, return_index=True)
    got = stream[np.sort(first)]
  # Extremely skewed weights: finish exactly with Gumbel-top-k on the remaining ids, which
  # has the same sequential law and works in log space (tiny weights do not underflow).
  left = ~np.isin(ids, got)
  keys = np.log(weights[left]) + rng.gumbel(size=int(left.sum()))
  extra = ids[left][np.argsort(-keys, kind="stable")[:k - got.size]]
  return np.concatenate([got, extra])


def bipartite_sbm(seed: int, n_users: int = 2000, n_items: int = 1500,
                  n_communities: int = 25, interactions_per_user: float = 12.0,
                  in_community: float = 0.8, pareto_alpha: float = 1.5,
                  test_fraction: float = 0.2) -> BipartiteInteractions:
  """User-item interactions from a bipartite SBM with Pareto item popularity.

  Generative process (all draws from `np.random.default_rng(seed)`):

  1. Items are dealt round-robin to `C = n_communities` communities and shuffled (so every
     community has `I / C` items, +-1); users get a uniform random community.
  2. Item popularity `p_i = 1 + Pareto(pareto_alpha)` (classical Pareto with scale 1).
  3. User `u` makes `n_u = max(2, Poisson(interactions_per_user))` distinct interactions:
     `Binomial(n_u, in_community)` of them drawn without replacement from its own
     community's items, the rest from all other items, both with probability
     proportional to `p_i`.
  4. Per user, `floor(test_fraction * n_u + U[0, 1))` interactions (stochastic rounding,
     so the expected test share is exactly `test_fraction`; at most `n_u - 1`) go to test,
     the rest to train. Users whose draw rounds to zero have no test items.

  The defaults are the UltraGCN spec card's calibrated setting (2000 users x 1500 items,
  25 communities, about 12 interactions per user, 80% in-community, Pareto(1.5), 80/20).

  Args:
    seed: integer seed; the same seed always gives the same data.
    n_users: number of users, >= 1.
    n_items: number of items, >= n_communities.
    n_communities: number of latent communities, >= 1.
    interactions_per_user: mean interactions per user, in (0, n_items / 2].
    in_community: probability that an interaction stays in the user's community, in [0, 1].
    pareto_alpha: Pareto shape of item popularity (smaller is heavier-tailed), > 0.
    test_fraction: expected share of each user's interactions held out, in [0, 1).

  Returns:
    A `BipartiteInteractions`.

  Raises:
    ValueError: on an argument outside the ranges above.
  """
  if n_users < 1:
    raise ValueError(f"n_users={n_users}; need at least 1 user")
  if n_communities < 1:
    raise ValueError(f"n_communities={n_communities}; need at least 1 community")
  if n_items < n_communities:
    raise ValueError(f"n_items={n_items} must be >= n_communities={n_communities} so "
                     "every community has an item")
  if not 0 < interactions_per_user <= n_items / 2:
    raise ValueError(f"interactions_per_user={interactions_per_user}; must be in "
                     f"(0, n_items / 2 = {n_items / 2}]")
  if not 0.0 <= in_community <= 1.0:
    raise ValueError(f"in_community={in_community}; must be a probability in [0, 1]")
  if pareto_alpha <= 0:
    raise ValueError(f"pareto_alpha={pareto_alpha}; must be > 0")
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction}; must be in [0, 1)")

  rng = np.random.default_rng(seed)
  item_comm = rng.permutation(np.arange(n_items) % n_communities).astype(np.int32)
  user_comm = rng.integers(n_communities, size=n_users).astype(np.int32)
  popularity = 1.0 + rng.pareto(pareto_alpha, size=n_items)

  # Per-community pools of item ids (inside and outside) with their popularity weights.
  pools_in, pools_out = [], []
  for c in range(n_communities):
    inside = item_comm == c
    for pool, sel in ((pools_in, inside), (pools_out, ~inside)):
      ids = np.flatnonzero(sel)
      pool.append((ids, popularity[ids]))

  n_per_user = np.maximum(2, rng.poisson(interactions_per_user, size=n_users))
  n_per_user = np.minimum(n_per_user, n_items)
  n_in = rng.binomial(n_per_user, in_community)
  uniforms = rng.random(n_users)

  train, test = [], []
  for u in range(n_users):
    c = user_comm[u]
    ids_in, w_in = pools_in[c]
    ids_out, w_out = pools_out[c]
    # Clip to pool sizes: a tiny community cannot supply more distinct items than it has.
    k_in = min(int(n_in[u]), ids_in.size)
    k_out = min(int(n_per_user[u]) - k_in, ids_out.size)
    items = rng.permutation(np.concatenate([
        _weighted_without_replacement(rng, ids_in, w_in, k_in),
        _weighted_without_replacement(rng, ids_out, w_out, k_out)]))
    n_test = min(int(np.floor(test_fraction * items.size + uniforms[u])), items.size - 1)
    test.extend((u, i) for i in items[:n_test])
    train.extend((u, i) for i in items[n_test:])

  def as_pairs(rows):
    arr = np.asarray(rows, dtype=np.int32).reshape(-1, 2)
    return arr[np.lexsort((arr[:, 1], arr[:, 0]))]

  return BipartiteInteractions(
      train_pairs=as_pairs(train), test_pairs=as_pairs(test), n_users=int(n_users),
      n_items=int(n_items), user_community=user_comm, item_community=item_comm,
      item_popularity=popularity)


# ----------------------------------------------------------------------------------------
# Node-level graphs: a common container, SBMs, random geometric graphs.


@dataclasses.dataclass(frozen=True, eq=False)
class Graph:
  """An undirected graph with optional node and edge data (host numpy).

  Attributes:
    edges: `[M, 2]` int32 undirected edges `(i, j)` with `i < j`, unique, sorted by `i`
      then `j` (no self-loops).
    n_nodes: number of nodes `N`; node ids are `0..N-1`.
    features: `[N, F]` float32 node features, or None.
    labels: `[N]` int32 node classes (`-1` = unlabelled), or None.
    positions: `[N, D]` float32 coordinates (RGG points, atom positions), or None.
    node_types: `[N]` int32 node types (atom types, indices into `ATOM_TYPES`), or None.
    edge_types: `[M]` int32 edge types aligned with `edges` (bond orders 1-3), or None.
  """
  edges: np.ndarray
  n_nodes: int
  features: np.ndarray | None = None
  labels: np.ndarray | None = None
  positions: np.ndarray | None = None
  node_types: np.ndarray | None = None
  edge_types: np.ndarray | None = None

  @property
  def senders(self) -> np.ndarray:
    """`[2M]` int32: every edge in both directions, `i -> j` for all edges then `j -> i`."""
    return np.concatenate([self.edges[:, 0], self.edges[:, 1]])

  @property
  def receivers(self) -> np.ndarray:
    """`[2M]` int32 receivers matching `senders`."""
    return np.concatenate([self.edges[:, 1], self.edges[:, 0]])


def canonical_edges(pairs, n_nodes: int, edge_types=None):
  """Undirected edge list: `i < j`, self-loops and duplicates dropped, sorted.

  Args:
    pairs: `[M, 2]` integer node pairs in any order or direction.
    n_nodes: number of nodes; ids must lie in `[0, n_nodes)`.
    edge_types: optional `[M]` ints; for duplicates the first occurrence's type is kept.

  Returns:
    `[M', 2]` int32 edges, and the `[M']` int32 types if `edge_types` was given.

  Raises:
    ValueError: if `pairs` is not `[M, 2]` or has ids outside `[0, n_nodes)`.
  """
  pairs = np.asarray(pairs)
  if pairs.size == 0:
    pairs = pairs.reshape(0, 2)
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(f"pairs must have shape [M, 2], got {pairs.shape}")
  pairs = pairs.astype(np.int64)
  if pairs.size and (pairs.min() < 0 or pairs.max() >= n_nodes):
    raise ValueError(f"pairs hold node ids outside [0, n_nodes={n_nodes})")
  lo, hi = pairs.min(axis=1), pairs.max(axis=1)
  keep = lo != hi
  codes = lo[keep] * n_nodes + hi[keep]
  # np.unique returns the first occurrence of each code, which fixes the kept type.
  codes, first = np.unique(codes, return_index=True)
  edges = np.stack([codes // n_nodes, codes % n_nodes], axis=1).astype(np.int32)
  if edge_types is None:
    return edges
  return edges, np.asarray(edge_types)[keep][first].astype(np.int32)


def edge_homophily(edges, labels) -> float:
  """Fraction of edges whose endpoints share a label (Zhu et al. 2020's edge homophily)."""
  edges, labels = np.asarray(edges), np.asarray(labels)
  if len(edges) == 0:
    return float("nan")
  return float(np.mean(labels[edges[:, 0]] == labels[edges[:, 1]]))


def _distinct_uniform(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
  """A uniformly random `k`-subset of `range(m)` (int64, unordered), `O(k)` when `k << m`."""
  if k > m:
    raise ValueError(f"cannot draw {k} distinct values from {m}")
  if k == 0:
    return np.zeros(0, np.int64)
  if m <= 4 * k or m <= 1_000_000:
    return rng.choice(m, size=k, replace=False).astype(np.int64)
  got = np.zeros(0, np.int64)
  while got.size < k:
    got = np.unique(np.concatenate([got, rng.integers(m, size=2 * (k - got.size) + 8)]))
  # The distinct values of i.i.d. uniform draws form a uniform subset of their size, and a
  # uniform sub-subset of it is a uniform k-subset.
  return rng.choice(got, size=k, replace=False)


def _triangle_index_to_pair(t: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Row-major index `t` of the strict upper triangle of an `n x n` matrix -> `(i, j)`."""
  t = np.asarray(t, np.int64)
  # Closed-form inversion of t = i n - i (i + 1) / 2 + (j - i - 1); float64 is exact enough
  # for n up to ~1e7, and the +-1 correction below removes rounding at row boundaries.
  i = n - 2 - np.floor(np.sqrt(-8.0 * t + 4.0 * n * (n - 1) - 7) / 2.0 - 0.5).astype(np.int64)
  row_start = lambda r: r * n - r * (r + 1) // 2
  i = np.where(t < row_start(i), i - 1, i)
  i = np.where(t >= row_start(i + 1), i + 1, i)
  return i, t - row_start(i) + i + 1


def sbm_probabilities(n_nodes: int, n_classes: int, avg_degree: float,
                      homophily: float) -> tuple[float, float]:
  """`(p_in, p_out)` of a balanced SBM with the given expected degree and edge homophily.

  With `s = N / C` nodes per class, a node expects `p_in (s - 1)` same-class and
  `p_out (N - s)` other-class neighbours; solving for their sum `avg_degree` and the
  same-class share `homophily` gives the probabilities.
  """
  if n_classes < 1 or n_nodes < 2 * n_classes:
    raise ValueError(f"n_nodes={n_nodes}, n_classes={n_classes}: need n_classes >= 1 and "
                     "at least 2 nodes per class")
  if not 0.0 <= homophily <= 1.0 or avg_degree <= 0:
    raise ValueError(f"homophily={homophily} must be in [0, 1] and avg_degree={avg_degree} "
                     "> 0")
  if n_classes == 1 and homophily < 1.0:
    raise ValueError(f"homophily={homophily} < 1 needs n_classes >= 2")
  size = n_nodes / n_classes
  p_in = homophily * avg_degree / (size - 1)
  p_out = 0.0 if n_classes == 1 else (1.0 - homophily) * avg_degree / (n_nodes - size)
  if max(p_in, p_out) > 1.0:
    raise ValueError(f"avg_degree={avg_degree} with homophily={homophily} needs an edge "
                     f"probability > 1 (p_in={p_in:.3g}, p_out={p_out:.3g})")
  return float(p_in), float(p_out)


FEATURE_KINDS = ("bow", "gaussian", "none")


def _class_features(rng: np.random.Generator, labels: np.ndarray, n_classes: int,
                    kind: str, n_features: int, word_in: float, word_out: float,
                    mean_scale: float, noise_std: float) -> np.ndarray | None:
  """Class-conditional node features (see `sbm`)."""
  n = labels.size
  if kind == "none":
    return None
  if kind == "bow":
    # Each word belongs to one class's topic (dealt round-robin, then shuffled).
    topic = rng.permutation(np.arange(n_features) % n_classes)
    prob = np.where(topic[None, :] == labels[:, None], word_in, word_out)
    return (rng.random((n, n_features)) < prob).astype(np.float32)
  means = mean_scale * rng.standard_normal((n_classes, n_features))
  return (means[labels] + noise_std * rng.standard_normal((n, n_features))).astype(np.float32)


def sbm(seed: int, n_nodes: int = 1000, n_classes: int = 4, p_in: float = 0.012,
        p_out: float = 0.0008, *, features: str = "bow", n_features: int = 300,
        word_in: float = 0.06, word_out: float = 0.015, mean_scale: float = 1.0,
        noise_std: float = 1.0) -> Graph:
  """Stochastic block model with class-conditional features.

  Generative process (all draws from `np.random.default_rng(seed)`):

  1. Labels: `n_classes` balanced classes (`N / C` nodes each, +-1), randomly permuted.
  2. Edges: each unordered pair is an edge independently with probability `p_in` (same
     class) or `p_out` (different classes). Sampled exactly per block pair by drawing the
     edge count from `Binomial(#pairs, p)` and then a uniform subset of that size.
  3. Features, `"bow"`: binary `[N, n_features]`; each word belongs to one class's topic and
     is present with probability `word_in` for nodes of that class, `word_out` otherwise.
     `"gaussian"`: `x_i = mu_{y_i} + noise_std * N(0, I)` with class means
     `mu_c ~ N(0, mean_scale^2 I)`. `"none"`: no features.

  `p_in > p_out` gives a homophilous graph, `p_in < p_out` a heterophilous one; the
  defaults are the STABLE card's calibrated graph (1000 nodes, 4 classes, homophily about
  0.82, 300-word features with 0.06 / 0.015 word probabilities).

  Args:
    seed: integer seed; the same seed always gives the same graph.
    n_nodes: number of nodes, >= 2 * n_classes.
    n_classes: number of classes, >= 1.
    p_in: same-class edge probability, in [0, 1].
    p_out: different-class edge probability, in [0, 1].
    features: one of `FEATURE_KINDS`.
    n_features: feature dimension (ignored for `"none"`).
    word_in: `"bow"` word probability inside the node's topic, in [0, 1].
    word_out: `"bow"` word probability outside it, in [0, 1].
    mean_scale: `"gaussian"` standard deviation of the class means.
    noise_std: `"gaussian"` standard deviation of the per-node noise.

  Returns:
    A `Graph` with `edges`, `labels` and (unless `"none"`) `features`.

  Raises:
    ValueError: on an argument outside the ranges above.
  """
  if n_classes < 1 or n_nodes < 2 * n_classes:
    raise ValueError(f"n_nodes={n_nodes}, n_classes={n_classes}: need n_classes >= 1 and "
                     "n_nodes >= 2 * n_classes")
  for name, p in (("p_in", p_in), ("p_out", p_out), ("word_in", word_in),
                  ("word_out", word_out)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f"{name}={p}; must be a probability in [0, 1]")
  if features not in FEATURE_KINDS:
    raise ValueError(f"features={features!r}; must be one of {FEATURE_KINDS}")
  if features != "none" and n_features < 1:
    raise ValueError(f"n_features={n_features}; must be >= 1")

  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.arange(n_nodes) % n_classes).astype(np.int32)
  members = [np.flatnonzero(labels == c) for c in range(n_classes)]
  blocks = []
  for a in range(n_classes):
    for b in range(a, n_classes):
      na, nb = members[a].size, members[b].size
      n_pairs = na * (na - 1) // 2 if a == b else na * nb
      k = rng.binomial(n_pairs, p_in if a == b else p_out)
      t = _distinct_uniform(rng, n_pairs, int(k))
      if a == b:
        i, j = _triangle_index_to_pair(t, na)
        blocks.append(np.stack([members[a][i], members[a][j]], axis=1))
      else:
        blocks.append(np.stack([members[a][t // nb], members[b][t % nb]], axis=1))
  edges = canonical_edges(np.concatenate(blocks), n_nodes)
  x = _class_features(rng, labels, n_classes, features, n_features, word_in, word_out,
                      mean_scale, noise_std)
  return Graph(edges=edges, n_nodes=int(n_nodes), features=x, labels=labels)


def heterophilous_sbm(seed: int, n_nodes: int = 1000, n_classes: int = 4,
                      avg_degree: float = 10.0, homophily: float = 0.1,
                      **feature_kwargs) -> Graph:
  """An SBM whose edges mostly join different classes (`sbm_probabilities` + `sbm`).

  Args:
    seed: integer seed.
    n_nodes: number of nodes.
    n_classes: number of classes (>= 2 for homophily < 1).
    avg_degree: expected average degree.
    homophily: expected edge homophily, in [0, 1] (below `1 / C` is heterophilous).
    **feature_kwargs: feature arguments of `sbm` (`features`, `n_features`, ...).
  """
  p_in, p_out = sbm_probabilities(n_nodes, n_classes, avg_degree, homophily)
  return sbm(seed, n_nodes, n_classes, p_in, p_out, **feature_kwargs)


def cora_sized_sbm(seed: int, homophily: float = 0.81, *, features: str = "bow") -> Graph:
  """A Cora-sized SBM: 2708 nodes, 7 classes, 1433 features, average degree 3.9.

  Cora has 5278 undirected edges (average degree 3.90), edge homophily 0.81 and about 18
  words per node; the bag-of-words probabilities (0.035 in-topic, 0.0088 otherwise) give
  about 18 words per node with a 4:1 topic contrast, as in the STABLE card's SBM.
  """
  p_in, p_out = sbm_probabilities(2708, 7, 3.9, homophily)
  return sbm(seed, 2708, 7, p_in, p_out, features=features, n_features=1433,
             word_in=0.035, word_out=0.0088)


def random_geometric_graph(seed: int, n_nodes: int = 1000, radius: float = 0.0566, *,
                           dim: int = 2, n_features: int = 32,
                           feature_signal: float = 0.0) -> Graph:
  """Random geometric graph in the unit (hyper)cube with noisy node features.

  Points are uniform in `[0, 1)^dim`; `(i, j)` is an edge iff `|p_i - p_j|_2 <= radius`.
  Features are `feature_signal * p_i P + N(0, I)` with a random projection `P [dim, F]`
  (`N(0, 1)` entries), so `feature_signal = 0` gives the uninformative Gaussian features of
  the NCN card (only the structure carries signal).

  Args:
    seed: integer seed; the same seed always gives the same graph.
    n_nodes: number of points, >= 1.
    radius: connection radius, > 0 (the expected degree is about `N pi r^2` in 2-D, less
      near the border).
    dim: dimension of the cube, >= 1.
    n_features: feature dimension, >= 0 (0 gives `features=None`).
    feature_signal: weight of the position signal in the features, >= 0.

  Returns:
    A `Graph` with `edges`, `positions` `[N, dim]` and `features`.
  """
  if n_nodes < 1 or radius <= 0 or dim < 1 or n_features < 0 or feature_signal < 0:
    raise ValueError(f"n_nodes={n_nodes} >= 1, radius={radius} > 0, dim={dim} >= 1, "
                     f"n_features={n_features} >= 0 and feature_signal={feature_signal} >= 0 "
                     "are required")
  rng = np.random.default_rng(seed)
  pos = rng.random((n_nodes, dim))
  pairs = spatial.cKDTree(pos).query_pairs(radius, output_type="ndarray")
  edges = canonical_edges(pairs.reshape(-1, 2), n_nodes)
  features = None
  if n_features:
    proj = rng.standard_normal((dim, n_features))
    noise = rng.standard_normal((n_nodes, n_features))
    features = (feature_signal * pos @ proj + noise).astype(np.float32)
  return Graph(edges=edges, n_nodes=int(n_nodes), features=features,
               positions=pos.astype(np.float32))


# ----------------------------------------------------------------------------------------
# QM9-like random molecules.

ATOM_TYPES = ("H", "C", "N", "O", "F")
VALENCES = np.array([1, 4, 3, 2, 1], np.int32)
# Heavy-atom composition roughly as in QM9 (mostly carbon, then O and N, little F).
_HEAVY_TYPES = np.array([1, 2, 3, 4])
_HEAVY_PROBS = np.array([0.70, 0.12, 0.16, 0.02])
# Bond lengths in angstrom: X-H, then single / double / triple between heavy atoms.
_H_BOND_LENGTH = 1.05
_BOND_LENGTHS = {1: 1.50, 2: 1.34, 3: 1.20}
_CLASH_DISTANCE = 1.2


def _bond_length(order: int, type_a: int, type_b: int) -> float:
  return _H_BOND_LENGTH if 0 in (type_a, type_b) else _BOND_LENGTHS[order]


def _molecule_topology(rng: np.random.Generator, n_heavy: int, hydrogens: bool,
                       ring_rate: float, multiple_bond_prob: float):
  """Atom types, `{(i, j): order}` bonds and tree parents of one molecule."""
  types = rng.choice(_HEAVY_TYPES, size=n_heavy, p=_HEAVY_PROBS)
  backbone = [int(t) for t in types if t != 4]
  n_fluorine = n_heavy - len(backbone)
  # A tree over the backbone (valence >= 2) keeps sum(valence) - 2 (k - 1) >= 2 free slots;
  # fluorines (valence 1) can only be leaves, so excess ones become carbons.
  if not backbone:
    backbone, n_fluorine = [1], n_fluorine - 1
  while n_fluorine > VALENCES[backbone].sum() - 2 * (len(backbone) - 1):
    backbone, n_fluorine = backbone + [1], n_fluorine - 1
  atoms = backbone + [4] * n_fluorine
  free = VALENCES[atoms].astype(np.int64)
  bonds, parent = {}, [-1]
  for m in range(1, len(atoms)):
    p = int(rng.choice(np.flatnonzero(free[:m] > 0)))
    bonds[(p, m)] = 1
    parent.append(p)
    free[p] -= 1
    free[m] -= 1
  for _ in range(rng.poisson(ring_rate)):
    open_atoms = np.flatnonzero(free > 0)
    pairs = [(int(i), int(j)) for i in open_atoms for j in open_atoms
             if i < j and (i, j) not in bonds]
    if not pairs:
      break
    i, j = pairs[rng.integers(len(pairs))]
    bonds[(i, j)] = 1
    free[i] -= 1
    free[j] -= 1
  keys = list(bonds)
  for idx in rng.permutation(len(keys)):
    i, j = keys[idx]
    while bonds[(i, j)] < 3 and free[i] > 0 and free[j] > 0 \
        and rng.random() < multiple_bond_prob:
      bonds[(i, j)] += 1
      free[i] -= 1
      free[j] -= 1
  if hydrogens:
    for i in range(len(free)):
      for _ in range(int(free[i])):
        atoms.append(0)
        bonds[(i, len(atoms) - 1)] = 1
        parent.append(i)
  return np.asarray(atoms, np.int32), bonds, parent


def _relax(pos: np.ndarray, pairs: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  """Least-squares bond lengths plus a soft clash penalty (closes rings), by BFGS."""
  n = len(pos)
  iu, ju = np.triu_indices(n, 1)
  bonded = np.zeros((n, n), bool)
  bonded[pairs[:, 0], pairs[:, 1]] = bonded[pairs[:, 1], pairs[:, 0]] = True
  free_i, free_j = iu[~bonded[iu, ju]], ju[~bonded[iu, ju]]

  def energy(flat):
    x = flat.reshape(n, 3)
    grad = np.zeros_like(x)
    d = x[pairs[:, 0]] - x[pairs[:, 1]]
    r = np.linalg.norm(d, axis=1)
    g = (2 * (r - lengths) / np.maximum(r, 1e-9))[:, None] * d
    np.add.at(grad, pairs[:, 0], g)
    np.add.at(grad, pairs[:, 1], -g)
    e = np.sum((r - lengths) ** 2)
    d = x[free_i] - x[free_j]
    r = np.linalg.norm(d, axis=1)
    short = np.maximum(_CLASH_DISTANCE - r, 0.0)
    g = (-2 * short / np.maximum(r, 1e-9))[:, None] * d
    np.add.at(grad, free_i, g)
    np.add.at(grad, free_j, -g)
    return e + np.sum(short ** 2), grad.ravel()

  res = optimize.minimize(energy, pos.ravel(), jac=True, method="BFGS",
                          options={"maxiter": 500, "gtol": 1e-6})
  return res.x.reshape(n, 3)


def _molecule_coordinates(rng: np.random.Generator, atoms: np.ndarray, bonds: dict,
                          parent: list) -> np.ndarray:
  """3-D positions: grow the spanning tree at bond length, then relax if needed."""
  n = len(atoms)
  pos = np.zeros((n, 3))
  clash = False
  for m in range(1, n):
    p = parent[m]
    length = _bond_length(bonds[(p, m)], atoms[p], atoms[m])
    best, best_gap = None, -np.inf
    others = np.delete(pos[:m], p, axis=0)
    for _ in range(20):
      u = rng.standard_normal(3)
      cand = pos[p] + length * u / np.linalg.norm(u)
      gap = np.sqrt(np.min(np.sum((others - cand) ** 2, axis=1))) if m > 1 else np.inf
      if gap > best_gap:
        best, best_gap = cand, gap
      if gap >= _CLASH_DISTANCE + 0.2:
        break
    pos[m] = best
    clash |= best_gap < _CLASH_DISTANCE
  tree = {(parent[m], m) for m in range(1, n)}
  if clash or len(bonds) > len(tree):
    pairs = np.array(list(bonds), np.int64)
    lengths = np.array([_bond_length(o, atoms[i], atoms[j]) for (i, j), o in bonds.items()])
    pos = _relax(pos, pairs, lengths)
  return pos - pos.mean(axis=0)


def random_molecules(seed: int, n_molecules: int = 100, *, min_heavy_atoms: int = 3,
                     max_heavy_atoms: int = 9, hydrogens: bool = False,
                     coordinates: bool = True, ring_rate: float = 0.7,
                     multiple_bond_prob: float = 0.25) -> list[Graph]:
  """QM9-like random molecules with typed atoms, valence-respecting typed bonds and 3-D shape.

  Per molecule (all draws from `np.random.default_rng(seed)`, molecule after molecule):

  1. `n ~ U{min_heavy_atoms..max_heavy_atoms}` heavy atoms of types C/N/O/F with QM9-like
     frequencies (0.70 / 0.12 / 0.16 / 0.02).
  2. A random spanning tree: each atom bonds to a uniformly chosen earlier atom with free
     valence (valences H 1, C 4, N 3, O 2, F 1; fluorines are leaves).
  3. `Poisson(ring_rate)` ring closures: single bonds between random non-bonded atoms that
     both have free valence.
  4. Bond orders: each bond is raised to double, then triple, with probability
     `multiple_bond_prob` per step while both atoms have free valence.
  5. With `hydrogens`, every free valence is filled by an explicit H atom (sum of bond
     orders = valence everywhere); otherwise hydrogens are implicit (sum <= valence).
  6. Coordinates: atoms are placed along the spanning tree at their bond length (X-H 1.05,
     single 1.50, double 1.34, triple 1.20 angstrom) in random directions avoiding clashes;
     molecules with rings (or a clash) are relaxed by BFGS on squared bond-length errors
     plus a penalty on non-bonded distances below 1.2 angstrom; then centred.
  Atom indices are finally shuffled, so index order carries no information.

  Args:
    seed: integer seed; the same seed always gives the same molecules.
    n_molecules: number of molecules, >= 1.
    min_heavy_atoms: fewest heavy atoms, >= 1.
    max_heavy_atoms: most heavy atoms, >= min_heavy_atoms.
    hydrogens: add explicit hydrogens.
    coordinates: compute 3-D positions.
    ring_rate: mean number of ring-closure attempts, >= 0.
    multiple_bond_prob: probability of each bond-order increase, in [0, 1].

  Returns:
    A list of `Graph`s with `node_types` (indices into `ATOM_TYPES`), `features` (`[N, 5]`
    one-hot atom types, float32), `edges` with `edge_types` (bond orders 1-3) and, with
    `coordinates`, `positions` `[N, 3]` float32.
  """
  if n_molecules < 1 or min_heavy_atoms < 1 or max_heavy_atoms < min_heavy_atoms:
    raise ValueError(f"n_molecules={n_molecules} >= 1 and 1 <= min_heavy_atoms="
                     f"{min_heavy_atoms} <= max_heavy_atoms={max_heavy_atoms} are required")
  if ring_rate < 0 or not 0.0 <= multiple_bond_prob <= 1.0:
    raise ValueError(f"ring_rate={ring_rate} must be >= 0 and multiple_bond_prob="
                     f"{multiple_bond_prob} in [0, 1]")
  rng = np.random.default_rng(seed)
  molecules = []
  for _ in range(n_molecules):
    n_heavy = int(rng.integers(min_heavy_atoms, max_heavy_atoms + 1))
    atoms, bonds, parent = _molecule_topology(rng, n_heavy, hydrogens, ring_rate,
                                              multiple_bond_prob)
    pos = _molecule_coordinates(rng, atoms, bonds, parent) if coordinates else None
    perm = rng.permutation(len(atoms))   # perm[new] = old
    new_id = np.argsort(perm)
    pairs = new_id[np.array(list(bonds), np.int64).reshape(-1, 2)]
    edges, orders = canonical_edges(pairs, len(atoms), np.array(list(bonds.values())))
    atoms = atoms[perm]
    molecules.append(Graph(
        edges=edges, n_nodes=len(atoms), node_types=atoms, edge_types=orders,
        features=np.eye(len(ATOM_TYPES), dtype=np.float32)[atoms],
        positions=None if pos is None else pos[perm].astype(np.float32)))
  return molecules


# ----------------------------------------------------------------------------------------
# Conversion to jraph, and splits.


def to_graphs_tuple(graphs: Graph | Sequence[Graph], *,
                    positions: bool = False) -> jraph.GraphsTuple:
  """Host `GraphsTuple` of one graph or a batch, every edge in both directions.

  Args:
    graphs: a `Graph` or a sequence of them (batched in order, as `jraph.batch_np`).
    positions: make `nodes` the dict `{"features", "positions"}` instead of the features.

  Returns:
    A numpy `GraphsTuple`. Per graph, edge `e < M` is `edges[e]` as `i -> j` and edge
    `M + e` its reverse `j -> i`; `nodes` is `features` (`[N, 0]` float32 if None);
    `edges` holds `edge_types` per directed edge (`[2M]` int32) or None; `n_node`,
    `n_edge`, `senders`, `receivers` are int32; `globals` is None.
  """
  if not isinstance(graphs, Graph):
    if not graphs:
      raise ValueError("graphs must hold at least one Graph")
    return jraph.batch_np([to_graphs_tuple(g, positions=positions) for g in graphs])
  g = graphs
  x = np.zeros((g.n_nodes, 0), np.float32) if g.features is None else g.features
  if positions:
    if g.positions is None:
      raise ValueError("positions=True but the graph has no positions")
    x = {"features": x, "positions": g.positions}
  types = None if g.edge_types is None else np.concatenate([g.edge_types] * 2)
  return jraph.GraphsTuple(
      nodes=x, edges=types, globals=None, senders=g.senders.astype(np.int32),
      receivers=g.receivers.astype(np.int32), n_node=np.array([g.n_nodes], np.int32),
      n_edge=np.array([2 * len(g.edges)], np.int32))


@dataclasses.dataclass(frozen=True, eq=False)
class NodeSplit:
  """Disjoint node masks for semi-supervised node classification.

  Attributes:
    train: `[N]` bool.
    val: `[N]` bool.
    test: `[N]` bool.
  """
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray


def node_split(seed: int, labels, n_train: int = 100, n_val: int = 100,
               n_test: int | None = None, *, per_class: bool = False) -> NodeSplit:
  """Random train/val/test node masks over the labelled nodes (`label >= 0`).

  Args:
    seed: integer seed.
    labels: `[N]` int labels; `-1` marks unlabelled nodes, which are never selected.
    n_train: training nodes in total, or per class with `per_class` (Planetoid: 20).
    n_val: validation nodes, drawn from the labelled nodes left after training.
    n_test: test nodes drawn from the rest; default all remaining labelled nodes.
    per_class: draw `n_train` nodes from every class (the Planetoid protocol).

  Returns:
    A `NodeSplit` with exactly the requested counts.

  Raises:
    ValueError: if a count is negative or there are not enough labelled nodes.
  """
  labels = np.asarray(labels)
  if min(n_train, n_val, 0 if n_test is None else n_test) < 0:
    raise ValueError(f"n_train={n_train}, n_val={n_val}, n_test={n_test} must be >= 0")
  rng = np.random.default_rng(seed)
  labelled = np.flatnonzero(labels >= 0)
  order = rng.permutation(labelled)
  if per_class:
    train = []
    for c in np.unique(labels[labelled]):
      members = order[labels[order] == c]
      if members.size < n_train:
        raise ValueError(f"class {c} has {members.size} labelled nodes < n_train={n_train}")
      train.append(members[:n_train])
    train = np.concatenate(train)
    rest = order[~np.isin(order, train)]
  elif n_train > order.size:
    raise ValueError(f"n_train={n_train} > {order.size} labelled nodes")
  else:
    train, rest = order[:n_train], order[n_train:]
  n_test = rest.size - n_val if n_test is None else n_test
  if n_test < 0 or n_val + n_test > rest.size:
    raise ValueError(f"{rest.size} labelled nodes left after training cannot provide "
                     f"n_val={n_val} and n_test={n_test}")
  masks = [np.zeros(labels.size, bool) for _ in range(3)]
  for mask, ids in zip(masks, (train, rest[:n_val], rest[n_val:n_val + n_test])):
    mask[ids] = True
  return NodeSplit(*masks)


@dataclasses.dataclass(frozen=True, eq=False)
class EdgeSplit:
  """Link-prediction edges: positives per split and sampled (or given) negatives.

  Attributes:
    train: `[M_train, 2]` int32 training edges (build the message-passing graph from them).
    val: `[M_val, 2]` int32 validation positives.
    test: `[M_test, 2]` int32 test positives.
    val_negatives: `[K_val, 2]` int32 validation negatives (non-edges).
    test_negatives: `[K_test, 2]` int32 test negatives.
  """
  train: np.ndarray
  val: np.ndarray
  test: np.ndarray
  val_negatives: np.ndarray
  test_negatives: np.ndarray


def _sample_non_edges(rng: np.random.Generator, n_nodes: int, forbidden: np.ndarray,
                      k: int) -> np.ndarray:
  """`k` distinct uniform pairs `i < j` whose code `i * N + j` is not in `forbidden`."""
  n_pairs = n_nodes * (n_nodes - 1) // 2
  if k > n_pairs - forbidden.size:
    raise ValueError(f"cannot sample {k} non-edges: only {n_pairs - forbidden.size} exist")
  got = np.zeros(0, np.int64)
  while got.size < k:
    t = rng.integers(n_pairs, size=2 * (k - got.size) + 16)
    i, j = _triangle_index_to_pair(t, n_nodes)
    codes = i * n_nodes + j
    codes = codes[~np.isin(codes, forbidden)]
    # Keep first occurrences in draw order, so the sample is a uniform k-subset.
    stream = np.concatenate([got, codes])
    _, first = np.unique(stream, return_index=True)
    got = stream[np.sort(first)]
  got = got[:k]
  return np.stack([got // n_nodes, got % n_nodes], axis=1).astype(np.int32)


def edge_split(seed: int, graph: Graph, val_fraction: float = 0.05,
               test_fraction: float = 0.1, n_negatives: int | None = None) -> EdgeSplit:
  """Random link-prediction split of a graph's edges, with uniform negative pairs.

  Positives: a random `round(val_fraction M)` / `round(test_fraction M)` of the
  undirected edges go to validation / test, the rest to training (the NCN card's
  85/5/10 split is the default). Negatives: distinct uniform pairs `i < j` that are not
  edges of the full graph, disjoint between validation and test; by default as many as
  the split's positives, else `n_negatives` each (ogbl-collab shares its negatives among
  all positives of a split; use `algorithms.graph.metrics.hits_at_k`).

  Args:
    seed: integer seed.
    graph: the full graph.
    val_fraction: share of edges for validation, in [0, 1).
    test_fraction: share of edges for test; `val_fraction + test_fraction < 1`.
    n_negatives: negatives per split (default: the split's positive count).

  Returns:
    An `EdgeSplit`; all arrays are sorted edge lists with `i < j`.
  """
  if not (0.0 <= val_fraction and 0.0 <= test_fraction and val_fraction + test_fraction < 1):
    raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be "
                     ">= 0 with a sum < 1")
  if n_negatives is not None and n_negatives < 0:
    raise ValueError(f"n_negatives={n_negatives}; must be >= 0")
  rng = np.random.default_rng(seed)
  m = len(graph.edges)
  n_val, n_test = int(round(val_fraction * m)), int(round(test_fraction * m))
  perm = rng.permutation(m)
  val_ids, test_ids, train_ids = np.split(perm, [n_val, n_val + n_test])
  pick = lambda ids: graph.edges[np.sort(ids)]
  forbidden = graph.edges[:, 0].astype(np.int64) * graph.n_nodes + graph.edges[:, 1]
  k_val = n_val if n_negatives is None else n_negatives
  k_test = n_test if n_negatives is None else n_negatives
  negatives = _sample_non_edges(rng, graph.n_nodes, forbidden, k_val + k_test)

  def sort(pairs):
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]

  return EdgeSplit(train=pick(train_ids), val=pick(val_ids), test=pick(test_ids),
                   val_negatives=sort(negatives[:k_val]),
                   test_negatives=sort(negatives[k_val:]))


# ----------------------------------------------------------------------------------------
# Loaders of local dataset files.

PLANETOID_PARTS = ("x", "y", "tx", "ty", "allx", "ally", "graph")


class _PlanetoidUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds numpy arrays, scipy sparse matrices and plain containers.

  The Planetoid files are (Python 2) pickles; refusing every other class means a tampered
  file cannot run code while it is read.
  """

  _ALLOWED = {("collections", "defaultdict"), ("collections", "OrderedDict"),
              ("copyreg", "_reconstructor"), ("builtins", "object"), ("builtins", "list"),
              ("builtins", "dict"), ("builtins", "set"), ("builtins", "tuple"),
              ("_codecs", "encode"), ("numpy", "ndarray"), ("numpy", "dtype"),
              ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar")}
  # Python 2 module names, which the base class maps to their Python 3 names.
  _PY2_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

  def find_class(self, module, name):
    if module.startswith("scipy.sparse") and name.endswith(("_matrix", "_array")) \
        and hasattr(sp, name):
      # The files name private modules (`scipy.sparse.csr`), deprecated since SciPy 1.8.
      return getattr(sp, name)
    if module == "numpy.core.multiarray":
      module = "numpy._core.multiarray"  # numpy 2 renamed it; the old alias warns.
    if (self._PY2_NAMES.get(module, module), name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a Planetoid file")


def _read_planetoid_part(path: str):
  with open(path, "rb") as f:
    # latin1 decodes the numpy buffers of Python 2 pickles byte for byte.
    return _PlanetoidUnpickler(f, encoding="latin1").load()


def load_planetoid(root: str, name: str) -> tuple[Graph, NodeSplit]:
  """Cora / Citeseer / Pubmed from the Planetoid files of Yang et al. (2016) in `root`.

  Reads `ind.<name>.{x,y,tx,ty,allx,ally,graph}` (pickles of scipy sparse feature
  matrices, one-hot label arrays and a `{node: [neighbours]}` dict) and
  `ind.<name>.test.index`, as Kipf & Welling's `gcn/utils.py:load_data` and PyG's
  `read_planetoid_data` do: features are `vstack(allx, tx)` with the test rows moved to
  their `test.index` positions; when the test indices have gaps (Citeseer's isolated
  nodes) `tx`/`ty` are first extended with zero rows to cover the full index range.

  Differences: duplicate edges and self-loops are dropped (the GCN layers add their own
  self-loops); nodes whose one-hot label row is all zero get label `-1` instead of 0.

  Args:
    root: directory holding the files.
    name: dataset name in the file names, e.g. `"cora"`.

  Returns:
    `(graph, split)`: a `Graph` with raw float32 `features` (not row-normalised) and int32
    `labels`, and the standard split (train = the first `len(y)` nodes, val = the next
    500, test = the sorted `test.index` nodes).

  Raises:
    ValueError: if a file is missing or the files are inconsistent.
  """
  prefix = os.path.join(root, f"ind.{name}.")
  missing = [p for p in (*PLANETOID_PARTS, "test.index") if not os.path.exists(prefix + p)]
  if missing:
    raise ValueError(f"root={root!r} lacks Planetoid files for name={name!r}: "
                     f"{[f'ind.{name}.{p}' for p in missing]}")
  x, y, tx, ty, allx, ally, adjacency = (_read_planetoid_part(prefix + p)
                                         for p in PLANETOID_PARTS)
  test_index = np.loadtxt(prefix + "test.index", dtype=np.int64, ndmin=1)
  test_sorted = np.sort(test_index)
  dense = lambda m: np.asarray(m.todense() if sp.issparse(m) else m, np.float32)
  tx, ty = dense(tx), np.asarray(ty)
  span = test_sorted[-1] - test_sorted[0] + 1
  if span > len(test_sorted):
    # Citeseer: some test indices are missing; pad the range with empty rows.
    tx_full = np.zeros((span, tx.shape[1]), np.float32)
    ty_full = np.zeros((span, ty.shape[1]), ty.dtype)
    tx_full[test_sorted - test_sorted[0]] = tx
    ty_full[test_sorted - test_sorted[0]] = ty
    tx, ty = tx_full, ty_full
  features = np.concatenate([dense(allx), tx])
  onehot = np.concatenate([np.asarray(ally), ty])
  if features.shape[0] != onehot.shape[0] or test_sorted[-1] >= features.shape[0]:
    raise ValueError(f"inconsistent Planetoid files for name={name!r}: {features.shape[0]} "
                     f"feature rows, {onehot.shape[0]} label rows, max test index "
                     f"{test_sorted[-1]}")
  features[test_index] = features[test_sorted]
  onehot[test_index] = onehot[test_sorted]
  labels = np.where(onehot.sum(1) > 0, onehot.argmax(1), -1).astype(np.int32)
  n = features.shape[0]
  pairs = [(u, v) for u, vs in adjacency.items() for v in vs]
  edges = canonical_edges(np.asarray(pairs, np.int64).reshape(-1, 2), n)
  masks = [np.zeros(n, bool) for _ in range(3)]
  n_train = np.asarray(y).shape[0]
  masks[0][:n_train] = True
  masks[1][n_train:n_train + 500] = True
  masks[2][test_sorted] = True
  return (Graph(edges=edges, n_nodes=n, features=features, labels=labels),
          NodeSplit(*masks))


def _find(root: str, names: Sequence[str]) -> str | None:
  """First existing `root/raw/<name>` or `root/<name>`."""
  for name in names:
    for folder in (os.path.join(root, "raw"), root):
      if os.path.exists(os.path.join(folder, name)):
        return os.path.join(folder, name)
  return None


def _read_table(path: str, dtype) -> np.ndarray:
  """A headerless CSV (optionally .gz) or an `.npz` (first array) / `.npy` as a 2-D array."""
  if path.endswith(".npz"):
    with np.load(path) as data:
      return np.asarray(data[data.files[0]], dtype)
  if path.endswith(".npy"):
    return np.asarray(np.load(path), dtype)
  return np.loadtxt(path, delimiter=",", dtype=dtype, ndmin=2)


def load_ogbl(root: str, split: str | None = None) -> tuple[Graph, EdgeSplit | None]:
  """An ogbl-style link-prediction dataset from a local directory.

  Layout (files may sit in `root/raw/` as in OGB downloads, or in `root/`):

  * `edge.csv[.gz]` (OGB's headerless `src,dst` rows) or `edge.npz` / `edge.npy` with an
    `[M, 2]` int array: the graph's undirected edges.
  * optional `num-node-list.csv[.gz]` (node count; default: 1 + the largest id, or the
    feature rows) and `node-feat.csv[.gz]` / `node-feat.npy` (`[N, F]` floats).
  * optional `split/<split>/{train,valid,test}.npz`, each with `edge` `[M_s, 2]` and, for
    valid/test, `edge_neg` `[K_s, 2]`. OGB ships these as torch `.pt` dicts; convert once
    (outside this package) with `np.savez(out, **{k: v.numpy() for k, v in d.items()})`.
    Per-source negatives (ogbl-citation2's `target_node_neg`) are not supported.

  Args:
    root: dataset directory.
    split: split folder name under `split/`; default the only one present (if any).

  Returns:
    `(graph, edge_split)`: the `Graph` of the edge file (deduplicated, `i < j`) and the
    split as given in the files (order and duplicates kept, as OGB evaluates them), or
    None when there is no `split/` folder.

  Raises:
    ValueError: if the edge file or a split file is missing or malformed.
  """
  edge_path = _find(root, ("edge.csv", "edge.csv.gz", "edge.npz", "edge.npy"))
  if edge_path is None:
    raise ValueError(f"root={root!r} has no edge.csv[.gz] / edge.npz / edge.npy (also "
                     "looked in raw/)")
  pairs = _read_table(edge_path, np.int64)
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(f"{edge_path} must hold [M, 2] node pairs, got shape {pairs.shape}")
  feat_path = _find(root, ("node-feat.csv", "node-feat.csv.gz", "node-feat.npy"))
  features = None if feat_path is None else _read_table(feat_path, np.float32)
  count_path = _find(root, ("num-node-list.csv", "num-node-list.csv.gz"))
  if count_path is not None:
    n_nodes = int(_read_table(count_path, np.int64).ravel()[0])
  else:
    n_nodes = max(int(pairs.max(initial=-1)) + 1,
                  0 if features is None else features.shape[0])
  if features is not None and features.shape[0] != n_nodes:
    raise ValueError(f"{feat_path} has {features.shape[0]} rows but there are {n_nodes} "
                     "nodes")
  graph = Graph(edges=canonical_edges(pairs, n_nodes), n_nodes=n_nodes, features=features)

  split_root = os.path.join(root, "split")
  if not os.path.isdir(split_root):
    return graph, None
  if split is None:
    names = sorted(os.listdir(split_root))
    if len(names) != 1:
      raise ValueError(f"{split_root} holds splits {names}; pass split= one of them")
    split = names[0]
  parts = {}
  for part in ("train", "valid", "test"):
    path = os.path.join(split_root, split, f"{part}.npz")
    if not os.path.exists(path):
      raise ValueError(f"missing split file {path}")
    with np.load(path) as data:
      if "edge" not in data.files or (part != "train" and "edge_neg" not in data.files):
        raise ValueError(f"{path} needs arrays 'edge'" + ("" if part == "train" else
                                                          " and 'edge_neg'"))
      parts[part] = {k: np.asarray(data[k], np.int32).reshape(-1, 2) for k in data.files
                     if k in ("edge", "edge_neg")}
  return graph, EdgeSplit(
      train=parts["train"]["edge"], val=parts["valid"]["edge"], test=parts["test"]["edge"],
      val_negatives=parts["valid"]["edge_neg"], test_negatives=parts["test"]["edge_neg"])


def _split_line(line: str) -> list[str]:
  for sep in ("::", "\t", ","):
    if sep in line:
      return [t.strip() for t in line.split(sep)]
  return line.split()


def _is_int(token: str) -> bool:
  try:
    int(token)
  except ValueError:
    return False
  return True


def _interactions_result(train: np.ndarray, test: np.ndarray, n_users: int,
                         n_items: int) -> BipartiteInteractions:
  def sort(pairs):
    pairs = np.asarray(pairs, np.int32).reshape(-1, 2)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]

  train, test = sort(train), sort(test)
  return BipartiteInteractions(
      train_pairs=train, test_pairs=test, n_users=int(n_users), n_items=int(n_items),
      user_community=np.full(n_users, -1, np.int32),
      item_community=np.full(n_items, -1, np.int32),
      item_popularity=np.bincount(train[:, 1], minlength=n_items).astype(np.float64))


def load_interactions(path: str, *, test_fraction: float = 0.2, seed: int = 0,
                      min_rating: float | None = None,
                      temporal: bool = False) -> BipartiteInteractions:
  """User-item interactions from local files, as `BipartiteInteractions`.

  Two formats:

  * A directory with `train.txt` and `test.txt` in the LightGCN / UltraGCN format
    (Gowalla, Yelp2018, Amazon-book): each line is `user item item ...` with 0-based ids.
    Ids are kept; `n_users`, `n_items` are 1 + the largest ids in both files. The split is
    the files' split (`test_fraction`, `seed`, `min_rating`, `temporal` are unused),
    except that a test pair also listed in train is dropped (the splits must be disjoint).
  * A file with one interaction per line, `user item [rating] [timestamp]`, separated by
    `::` (MovieLens-1M `ratings.dat`), tabs (MovieLens-100k `u.data`), commas (a header
    line is skipped) or spaces. Raw ids (any strings) are mapped to `0..U-1` / `0..I-1`
    in sorted order (numeric ids numerically); rows with `rating < min_rating` are dropped
    (e.g. 4 for implicit feedback); repeated pairs count once (their latest timestamp).
    Each user with `n_u` interactions puts `min(round(test_fraction n_u), n_u - 1)` of them
    in test: the latest ones with `temporal` (needs timestamps), else random ones.

  Loaded data has no latent communities (`user_community`, `item_community` are `-1`) and
  `item_popularity` is each item's training interaction count.

  Args:
    path: directory (adjacency format) or file (pair format).
    test_fraction: per-user test share for the pair format, in [0, 1).
    seed: seed of the random per-user split.
    min_rating: keep rows with `rating >= min_rating` (needs a rating column).
    temporal: hold out each user's latest interactions instead of random ones.

  Returns:
    A `BipartiteInteractions` with sorted, unique, disjoint `train_pairs`, `test_pairs`.

  Raises:
    ValueError: on a missing path, malformed lines or missing rating / timestamp columns.
  """
  if os.path.isdir(path):
    lists = []
    for name in ("train.txt", "test.txt"):
      file = os.path.join(path, name)
      if not os.path.exists(file):
        raise ValueError(f"path={path!r} is a directory but has no {name}")
      rows = []
      with open(file) as f:
        for line in f:
          ids = [int(t) for t in line.split()]
          rows.extend((ids[0], i) for i in ids[1:])
      lists.append(np.unique(np.asarray(rows, np.int64).reshape(-1, 2), axis=0))
    train, test = lists
    both = np.concatenate([train, test])
    n_users = int(both[:, 0].max(initial=-1)) + 1
    n_items = int(both[:, 1].max(initial=-1)) + 1
    # The container promises disjoint splits: a test pair repeated in train is dropped.
    test = test[~np.isin(test[:, 0] * n_items + test[:, 1], train[:, 0] * n_items + train[:, 1])]
    return _interactions_result(train, test, n_users, n_items)

  if not os.path.isfile(path):
    raise ValueError(f"path={path!r} is neither a directory nor a file")
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction={test_fraction}; must be in [0, 1)")
  with open(path) as f:
    rows = [_split_line(line) for line in f if line.strip()]
  if rows and not _is_int(rows[0][0]) and not _is_int(rows[0][1]):
    rows = rows[1:]  # A header such as `userId,movieId,rating,timestamp`.
  if not rows or min(len(r) for r in rows) < 2:
    raise ValueError(f"{path}: every line needs at least `user item`")
  width = min(len(r) for r in rows)
  if min_rating is not None and width < 3:
    raise ValueError(f"min_rating={min_rating} but {path} has no rating column")
  if temporal and width < 4:
    raise ValueError(f"temporal=True but {path} has no timestamp column")
  users_raw = [r[0] for r in rows]
  items_raw = [r[1] for r in rows]
  keep = np.ones(len(rows), bool)
  if min_rating is not None:
    keep = np.array([float(r[2]) for r in rows]) >= min_rating
  stamps = np.array([float(r[3]) for r in rows]) if width >= 4 else np.arange(len(rows),
                                                                              dtype=float)

  def codes(raw):
    numeric = all(_is_int(t) for t in raw)
    values = np.array([int(t) for t in raw]) if numeric else np.array(raw)
    uniq, inverse = np.unique(values[keep], return_inverse=True)
    return inverse.astype(np.int64), uniq.size

  users, n_users = codes(users_raw)
  items, n_items = codes(items_raw)
  stamps = stamps[keep]
  # Sort by (user, time), keep each pair's latest row.
  order = np.lexsort((stamps, items, users))
  users, items, stamps = users[order], items[order], stamps[order]
  last = np.ones(users.size, bool)
  last[:-1] = (users[1:] != users[:-1]) | (items[1:] != items[:-1])
  users, items, stamps = users[last], items[last], stamps[last]
  rng = np.random.default_rng(seed)
  train, test = [], []
  bounds = np.searchsorted(users, np.arange(n_users + 1))  # Rows are sorted by user.
  for u in range(n_users):
    sel = np.arange(bounds[u], bounds[u + 1])
    n_u = sel.size
    n_test = min(int(round(test_fraction * n_u)), max(n_u - 1, 0))
    ranked = sel[np.argsort(stamps[sel], kind="stable")] if temporal else rng.permutation(sel)
    held = ranked[n_u - n_test:] if temporal else ranked[:n_test]
    test.append(held)
    train.append(np.setdiff1d(sel, held))
  pick = lambda idx: np.stack([users[np.concatenate(idx)], items[np.concatenate(idx)]], 1)
  return _interactions_result(pick(train), pick(test), n_users, n_items)
