"""GraphHash: bipartite modularity clusters as the hash of user and item embedding tables.

Paper: Xinyi Wu, Donald Loveland, Runjin Chen, Yozen Liu, Xin Chen, Leonardo Neves, Ali
Jadbabaie, Clark Mingxuan Ju, Neil Shah, Tong Zhao, "GraphHash: Graph Clustering Enables
Parameter Efficiency in Recommender Systems", WWW 2025, arXiv:2412.17245. Official code:
snap-research/GraphHash (`utils.py: graphClustering, frequency_hash, double_graph_hash`,
`train.py`, `models/mf.py`).

Method. Let `R` be the `[U, I]` 0/1 biadjacency of the training interactions, `m = sum R`,
`k_u`, `k_i` the degrees. Louvain (Blondel et al. 2008: greedy local moves, then
aggregation of clusters into nodes, repeated) maximises Barber's bipartite modularity with
resolution `gamma` over a joint labelling `c` of users and items:

    Q(c) = (1/m) sum_{u,i} (R_ui - gamma k_u k_i / m) delta(c_u, c_i)
         = sum_c [ L_c / m - gamma K^U_c K^I_c / m^2 ],

with `L_c` the edges inside cluster `c` and `K^U_c`, `K^I_c` its user and item degree
sums. The hash of a user is its cluster relabelled to `0..B_U-1` (likewise items), so
every user of a cluster shares one row of a `[B_U, D]` table:

    e_u = E_U[h(u)],   e_i = E_I[h(i)],   score(u, i) = e_u . e_i          (MF backbone)
    L_BPR = - mean log sigmoid(score(u, i) - score(u, j)),  j uniform over items.

A larger `gamma` gives more, smaller clusters; `resolution_for_budget` bisects it to meet
a table budget. Baselines at the same bucket counts `B_U`, `B_I` (the official rule: the
clustering fixes the table size, then every hash gets it): `modulo_hash` (`h(x) = x mod B`,
the official "random"), `frequency_hash` (the `floor(cutoff B)` most frequent ids keep
their own rows, the rest share `x mod (B - k)`), and `double_graph_hash` (codes `[N, 2]`:
a universal hash `((a x + b) mod p) mod B` and the cluster; the two rows are summed). The
full table is `identity_hash`. Tables shrink by `1 - (B_U + B_I) / (U + I)`.

Differences from the paper / official code:

* Louvain is networkx's `louvain_communities` on a directed graph with one edge
  user -> item per interaction. networkx's directed modularity (Dugue & Perez)
  `(1/m) sum_ij (A_ij - gamma k^out_i k^in_j / m) delta` is, on this graph (users have
  only out-edges, items only in-edges), exactly Barber's modularity above; it is also the
  objective of the official `sknetwork.Louvain(resolution).fit(R, force_bipartite=True)`
  (default `modularity='dugue'` on `[[0, R], [0, 0]]`; checked in sknetwork's
  `clustering/louvain.py` and `utils/format.py`). The heuristics differ: sknetwork visits
  nodes in index order with a pass tolerance of 1e-3, networkx in a seeded random order
  with a level threshold of 1e-7, so partitions can differ in detail and ours depend on
  `seed`.
* Ids without training interactions (isolated nodes; the official code indexes only ids
  seen in training, so it has none) would stay singleton clusters; here they share one
  extra "cold" bucket per side, so the bucket count is the number of clusters met by the
  side's interacting ids, plus one if any id of that side is isolated.
* The universal hash uses the fixed Mersenne prime `p = 2^31 - 1` with `a in [1, p)`,
  `b in [0, p)` drawn from `seed`; the official code draws a random ~60-bit prime with
  sympy and computes `a x` in int64, which can overflow.
* `frequency_hash` breaks frequency ties towards the lower id (official: reversed
  `argsort`, i.e. towards the higher id).
* BPR uses `softplus(-x)` instead of `-log(1e-10 + sigmoid(x))`; equal up to the 1e-10.
* The card asks for jraph degree sums per cluster; `np.bincount` on the host does it
  without a graph container, since clustering is host-side preprocessing.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import scipy.sparse as sp

from jaxrepro.algorithms.graph import ranking

Params = dict[str, jax.Array]
MERSENNE_PRIME = 2**31 - 1


@dataclasses.dataclass(frozen=True, eq=False)
class HashCodes:
  """The id -> bucket maps of both sides and the table sizes they index.

  Attributes:
    user: `[U]` or `[U, H]` int32 numpy; the bucket(s) of each user. With `H` codes per id
      the embedding is the sum of the `H` rows (double hashing).
    item: `[I]` or `[I, H]` int32 numpy; likewise for items.
    n_user_buckets: rows `B_U` of the user table; every code lies in `[0, B_U)`.
    n_item_buckets: rows `B_I` of the item table.
  """
  user: np.ndarray
  item: np.ndarray
  n_user_buckets: int
  n_item_buckets: int

  def __post_init__(self):
    for side, buckets in (("user", self.n_user_buckets), ("item", self.n_item_buckets)):
      codes = np.asarray(getattr(self, side))
      if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"{side} codes must be integers, got dtype {codes.dtype}")
      object.__setattr__(self, side, codes.astype(np.int32))  # Frozen: set once, here.
      if codes.ndim not in (1, 2) or codes.shape[0] < 1 or codes.size < 1:
        raise ValueError(f"{side} codes must be [N] or [N, H] with N, H >= 1, got "
                         f"{codes.shape}")
      if buckets < 1 or codes.min() < 0 or codes.max() >= buckets:
        raise ValueError(f"{side} codes must lie in [0, n_{side}_buckets={buckets})")

  @property
  def n_users(self) -> int:
    return int(self.user.shape[0])

  @property
  def n_items(self) -> int:
    return int(self.item.shape[0])

  @property
  def table_rows(self) -> int:
    """Rows of both tables together, `B_U + B_I`."""
    return int(self.n_user_buckets + self.n_item_buckets)

  @property
  def size_reduction(self) -> float:
    """`1 - (B_U + B_I) / (U + I)`: the share of embedding rows saved vs the full table."""
    return 1.0 - self.table_rows / (self.n_users + self.n_items)

  def param_bytes(self, dim: int, dtype=jnp.float32) -> int:
    """Bytes of the two `[B, dim]` tables (the codes are integer buffers, not parameters)."""
    return self.table_rows * dim * jnp.dtype(dtype).itemsize

  def arrays(self) -> dict[str, jax.Array]:
    """`{"user": [U(, H)] int32, "item": [I(, H)] int32}` device arrays for the model."""
    return {"user": jnp.asarray(self.user, jnp.int32), "item": jnp.asarray(self.item, jnp.int32)}


def _codes(user, item, n_user_buckets, n_item_buckets) -> HashCodes:
  return HashCodes(np.asarray(user, np.int32), np.asarray(item, np.int32),
                   int(n_user_buckets), int(n_item_buckets))


# ------------------------------------------------------------------------------ clustering


def biadjacency(train_pairs, n_users: int, n_items: int) -> sp.csr_matrix:
  """The `[U, I]` float64 0/1 interaction matrix `R` (repeated pairs count once)."""
  pairs = ranking.unique_interactions(train_pairs, n_users, n_items)
  return sp.csr_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])),
                       shape=(n_users, n_items))


def bipartite_modularity(train_pairs, n_users: int, n_items: int, user_labels,
                         item_labels, resolution: float = 1.0) -> float:
  """Barber's bipartite modularity `Q` of a joint user/item labelling (vectorised).

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` interactions (repeated pairs count once).
    n_users: number of users `U`.
    n_items: number of items `I`.
    user_labels: `[U]` non-negative int cluster of each user.
    item_labels: `[I]` non-negative int cluster of each item, in the *same* label space
      (a user and an item with equal labels are in one cluster).
    resolution: `gamma` >= 0.

  Returns:
    `Q = sum_c L_c / m - gamma K^U_c K^I_c / m^2`, a Python float.

  Raises:
    ValueError: on label shapes other than `[U]`, `[I]`, negative labels, a negative
      resolution or a graph without edges.
  """
  pairs = ranking.unique_interactions(train_pairs, n_users, n_items)
  cu, ci = np.asarray(user_labels), np.asarray(item_labels)
  if cu.shape != (n_users,) or ci.shape != (n_items,):
    raise ValueError(f"user_labels must be [{n_users}] and item_labels [{n_items}], got "
                     f"{cu.shape} and {ci.shape}")
  if cu.min() < 0 or ci.min() < 0:
    raise ValueError("labels must be non-negative integers")
  if not resolution >= 0:
    raise ValueError(f"resolution={resolution}; must be >= 0")
  m = len(pairs)
  if m == 0:
    raise ValueError("modularity is undefined for a graph without edges")
  inside = np.count_nonzero(cu[pairs[:, 0]] == ci[pairs[:, 1]])
  n_labels = int(max(cu.max(), ci.max())) + 1
  # Degree sums per cluster: each edge adds 1 to its user's and its item's cluster.
  k_user = np.bincount(cu[pairs[:, 0]], minlength=n_labels).astype(np.float64)
  k_item = np.bincount(ci[pairs[:, 1]], minlength=n_labels).astype(np.float64)
  return float(inside / m - resolution * (k_user @ k_item) / m**2)


def bipartite_digraph(train_pairs, n_users: int, n_items: int) -> nx.DiGraph:
  """Nodes `0..U-1` (users) and `U..U+I-1` (items), one edge user -> item per interaction.

  On this graph networkx's directed modularity equals Barber's bipartite modularity.
  """
  pairs = ranking.unique_interactions(train_pairs, n_users, n_items)
  graph = nx.DiGraph()
  graph.add_nodes_from(range(n_users + n_items))
  graph.add_edges_from(zip(pairs[:, 0].tolist(), (pairs[:, 1] + n_users).tolist()))
  return graph


def _labels_from_communities(communities, n_nodes: int) -> np.ndarray:
  """Sets of nodes -> `[n_nodes]` labels, clusters numbered by their smallest node."""
  order = sorted(communities, key=min)
  labels = np.empty(n_nodes, np.int64)
  for c, nodes in enumerate(order):
    labels[list(nodes)] = c
  return labels


def louvain_bipartite(train_pairs, n_users: int, n_items: int, *, resolution: float = 1.0,
                      seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Louvain on Barber's bipartite modularity (networkx, seeded).

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` interactions.
    n_users: number of users `U`.
    n_items: number of items `I`.
    resolution: `gamma` > 0; larger gives more clusters.
    seed: the node-visiting order of networkx's Louvain; the result is deterministic in it.

  Returns:
    `(user_labels [U], item_labels [I])` int64 numpy in one joint label space (clusters
    numbered by their smallest node, users first). Isolated ids are singleton clusters.
  """
  if not resolution > 0:
    raise ValueError(f"resolution={resolution}; must be > 0")
  graph = bipartite_digraph(train_pairs, n_users, n_items)
  communities = nx.community.louvain_communities(graph, weight=None, resolution=resolution,
                                                 seed=seed)
  labels = _labels_from_communities(communities, n_users + n_items)
  return labels[:n_users], labels[n_users:]


def _side_buckets(labels: np.ndarray, degree: np.ndarray) -> tuple[np.ndarray, int]:
  """Consecutive buckets for ids with interactions, one shared cold bucket for the rest."""
  active = degree > 0
  codes = np.zeros(labels.shape, np.int64)
  _, codes[active] = np.unique(labels[active], return_inverse=True)
  n_active = int(codes[active].max(initial=-1)) + 1
  if not active.all():
    codes[~active] = n_active
    return codes, n_active + 1
  return codes, n_active


def codes_from_clusters(train_pairs, n_users: int, n_items: int, user_labels,
                        item_labels) -> HashCodes:
  """Hash codes from a joint user/item clustering: each side relabelled to `0..B-1`.

  Relabelling keeps the sorted order of the labels (the official
  `map_to_consecutive_integers`). `B_U` is the number of clusters containing a user with
  training interactions, plus one shared bucket if some user has none (likewise items).

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` interactions (they decide which ids are
      isolated).
    n_users: number of users `U`.
    n_items: number of items `I`.
    user_labels: `[U]` int cluster of each user.
    item_labels: `[I]` int cluster of each item.

  Returns:
    A `HashCodes` with `[U]` and `[I]` codes.
  """
  cu, ci = np.asarray(user_labels), np.asarray(item_labels)
  if cu.shape != (n_users,) or ci.shape != (n_items,):
    raise ValueError(f"user_labels must be [{n_users}] and item_labels [{n_items}], got "
                     f"{cu.shape} and {ci.shape}")
  r = biadjacency(train_pairs, n_users, n_items)
  user, n_user_buckets = _side_buckets(cu, np.diff(r.indptr))
  item, n_item_buckets = _side_buckets(ci, np.diff(r.tocsc().indptr))
  return _codes(user, item, n_user_buckets, n_item_buckets)


def graph_hash(train_pairs, n_users: int, n_items: int, *, resolution: float = 1.0,
               seed: int = 0) -> HashCodes:
  """GraphHash codes: `louvain_bipartite`, then `codes_from_clusters`.

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` interactions.
    n_users: number of users `U`.
    n_items: number of items `I`.
    resolution: Louvain's `gamma` > 0.
    seed: Louvain's seed.

  Returns:
    A `HashCodes` with `[U]` and `[I]` codes.
  """
  user_labels, item_labels = louvain_bipartite(train_pairs, n_users, n_items,
                                               resolution=resolution, seed=seed)
  return codes_from_clusters(train_pairs, n_users, n_items, user_labels, item_labels)


def resolution_for_budget(train_pairs, n_users: int, n_items: int, max_rows: int, *,
                          low: float = 1e-2, high: float = 1e3, iterations: int = 12,
                          seed: int = 0) -> tuple[float, HashCodes]:
  """Bisects `log gamma` for the largest GraphHash table with at most `max_rows` rows.

  The cluster count grows with `gamma` but not strictly monotonically, so this returns the
  largest table within budget among the resolutions it tried (the paper's "tune gamma to
  the budget"; the official code fixes gamma per dataset instead).

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` interactions.
    n_users: number of users `U`.
    n_items: number of items `I`.
    max_rows: budget for `B_U + B_I`, >= 2.
    low: smallest resolution tried, > 0.
    high: largest resolution tried, > low.
    iterations: bisection steps after the two end points.
    seed: Louvain's seed.

  Returns:
    `(resolution, codes)` with `codes.table_rows <= max_rows`.

  Raises:
    ValueError: on a bad budget or range, or if even `low` exceeds the budget.
  """
  if max_rows < 2:
    raise ValueError(f"max_rows={max_rows}; need at least one row per side")
  if not 0 < low < high:
    raise ValueError(f"need 0 < low < high, got low={low}, high={high}")
  best = None

  def attempt(gamma):
    nonlocal best
    codes = graph_hash(train_pairs, n_users, n_items, resolution=gamma, seed=seed)
    fits = codes.table_rows <= max_rows
    if fits and (best is None or codes.table_rows > best[1].table_rows):
      best = (gamma, codes)
    return fits

  if attempt(high):
    return best
  if not attempt(low):
    raise ValueError(f"even resolution low={low} gives more than max_rows={max_rows} rows")
  lo, hi = math.log(low), math.log(high)
  for _ in range(iterations):
    mid = 0.5 * (lo + hi)
    if attempt(math.exp(mid)):
      lo = mid
    else:
      hi = mid
  return best


# ------------------------------------------------------------------------- other hashes


def _check_buckets(name: str, buckets: int, n_ids: int) -> None:
  if not 1 <= buckets <= n_ids:
    raise ValueError(f"{name}={buckets}; must be in [1, {n_ids}]")


def identity_hash(n_users: int, n_items: int) -> HashCodes:
  """The full tables: every id its own row."""
  if n_users < 1 or n_items < 1:
    raise ValueError(f"n_users={n_users} and n_items={n_items} must both be >= 1")
  return _codes(np.arange(n_users), np.arange(n_items), n_users, n_items)


def modulo_hash(n_users: int, n_items: int, n_user_buckets: int,
                n_item_buckets: int) -> HashCodes:
  """`h(x) = x mod B` on each side (the official `hash_type=random`)."""
  _check_buckets("n_user_buckets", n_user_buckets, n_users)
  _check_buckets("n_item_buckets", n_item_buckets, n_items)
  return _codes(np.arange(n_users) % n_user_buckets, np.arange(n_items) % n_item_buckets,
                n_user_buckets, n_item_buckets)


def _frequency_side(degree: np.ndarray, buckets: int, cutoff: float) -> np.ndarray:
  top_k = math.floor(cutoff * buckets)
  shared = buckets - top_k
  codes = np.arange(degree.size) % shared
  # Most frequent first; lexsort's last key is primary, ties go to the lower id.
  top = np.lexsort((np.arange(degree.size), -degree))[:top_k]
  codes[top] = shared + np.arange(top_k)
  return codes


def frequency_hash(train_pairs, n_users: int, n_items: int, n_user_buckets: int,
                   n_item_buckets: int, cutoff: float = 0.5) -> HashCodes:
  """The `floor(cutoff B)` most frequent ids keep their own rows; the rest `x mod (B - k)`.

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` interactions (frequencies = degrees).
    n_users: number of users `U`.
    n_items: number of items `I`.
    n_user_buckets: `B_U`, in `[1, U]`.
    n_item_buckets: `B_I`, in `[1, I]`.
    cutoff: share of the buckets given to frequent ids, in `[0, 1)` (official: 0.5).

  Returns:
    A `HashCodes` with `[U]` and `[I]` codes.
  """
  if not 0.0 <= cutoff < 1.0:
    raise ValueError(f"cutoff={cutoff}; must be in [0, 1)")
  _check_buckets("n_user_buckets", n_user_buckets, n_users)
  _check_buckets("n_item_buckets", n_item_buckets, n_items)
  r = biadjacency(train_pairs, n_users, n_items)
  return _codes(_frequency_side(np.diff(r.indptr), n_user_buckets, cutoff),
                _frequency_side(np.diff(r.tocsc().indptr), n_item_buckets, cutoff),
                n_user_buckets, n_item_buckets)


def universal_hash(ids, n_buckets: int, seed: int) -> np.ndarray:
  """`((a x + b) mod p) mod B` with `p = 2^31 - 1`, `a in [1, p)`, `b in [0, p)` from `seed`.

  Args:
    ids: int array of ids in `[0, p)`.
    n_buckets: `B` >= 1.
    seed: draws `a` and `b`.

  Returns:
    int64 numpy codes in `[0, B)`, the shape of `ids`.
  """
  ids = np.asarray(ids, np.int64)
  if n_buckets < 1:
    raise ValueError(f"n_buckets={n_buckets}; must be >= 1")
  if ids.size and (ids.min() < 0 or ids.max() >= MERSENNE_PRIME):
    raise ValueError(f"ids must lie in [0, {MERSENNE_PRIME})")
  rng = np.random.default_rng(seed)
  a = int(rng.integers(1, MERSENNE_PRIME))
  b = int(rng.integers(0, MERSENNE_PRIME))
  # a, x < 2^31, so a x + b < 2^63: exact in int64.
  return ((a * ids + b) % MERSENNE_PRIME) % n_buckets


def double_graph_hash(codes: HashCodes, seed: int = 0) -> HashCodes:
  """DoubleGraphHash: codes `[N, 2]` = (universal hash, cluster), rows summed.

  Args:
    codes: single GraphHash codes (`[U]`, `[I]`); the tables keep their sizes.
    seed: seed of the universal hashes (the item side uses `seed + 1`).

  Returns:
    A `HashCodes` with `[U, 2]` and `[I, 2]` codes.
  """
  if codes.user.ndim != 1 or codes.item.ndim != 1:
    raise ValueError("double_graph_hash needs single codes ([U] and [I])")
  user = np.stack([universal_hash(np.arange(codes.n_users), codes.n_user_buckets, seed),
                   codes.user], axis=1)
  item = np.stack([universal_hash(np.arange(codes.n_items), codes.n_item_buckets,
                                  seed + 1), codes.item], axis=1)
  return _codes(user, item, codes.n_user_buckets, codes.n_item_buckets)


def collision_pairs(codes) -> int:
  """Number of unordered id pairs sharing a bucket, `sum_b C(n_b, 2)`, for `[N]` codes."""
  counts = np.bincount(np.asarray(codes, np.int64).ravel())
  return int(np.sum(counts * (counts - 1) // 2))


# ------------------------------------------------------------------------------- the model


def init_params(key: jax.Array, codes: HashCodes, dim: int) -> Params:
  """Xavier-uniform `[B_U, D]` and `[B_I, D]` tables, as the official `nn.init.xavier_uniform_`.

  Args:
    key: a typed PRNG key (`jax.random.key`).
    codes: the hash; its bucket counts size the tables.
    dim: embedding size `D` >= 1.

  Returns:
    `{"user": [B_U, D] f32, "item": [B_I, D] f32}`; entries `U(-a, a)` with
    `a = sqrt(6 / (B + D))` (torch's fan-in `D`, fan-out `B` of an embedding weight).
  """
  if dim < 1:
    raise ValueError(f"dim={dim}; must be >= 1")
  k_user, k_item = jax.random.split(key)
  tables = {}
  for name, k, rows in (("user", k_user, codes.n_user_buckets),
                        ("item", k_item, codes.n_item_buckets)):
    bound = math.sqrt(6.0 / (rows + dim))
    tables[name] = jax.random.uniform(k, (rows, dim), jnp.float32, -bound, bound)
  return tables


def lookup(table: jax.Array, codes: jax.Array, ids: jax.Array) -> jax.Array:
  """Hashed embedding lookup: `table[codes[ids]]`, summed over the code axis if any.

  Args:
    table: `[B, D]` float embedding table.
    codes: `[N]` or `[N, H]` int32 bucket ids of every raw id.
    ids: int raw ids of any shape `S`.

  Returns:
    `[*S, D]` embeddings.
  """
  rows = table[codes[ids]]
  return rows.sum(axis=-2) if codes.ndim == 2 else rows


def bpr_loss(params: Params, batch: dict[str, jax.Array],
             codes: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MF-BPR on hashed tables, averaged over positives and their negatives.

  Args:
    params: `{"user": [B_U, D], "item": [B_I, D]}` tables.
    batch: `{"users": [B], "pos_items": [B], "neg_items": [B, M]}` raw int ids (e.g.
      `ultragcn.sample_batch`).
    codes: `HashCodes.arrays()`.

  Returns:
    `(loss, {"bpr": loss})`, `loss = mean softplus(s(u, j) - s(u, i))` over `[B, M]`.
  """
  users, pos, neg = batch["users"], batch["pos_items"], batch["neg_items"]
  if users.ndim != 1 or pos.shape != users.shape or neg.ndim != 2 \
      or neg.shape[0] != users.shape[0]:
    raise ValueError("batch must hold users [B], pos_items [B] and neg_items [B, M]; got "
                     f"{users.shape}, {pos.shape}, {neg.shape}")
  e_user = lookup(params["user"], codes["user"], users)             # [B, D]
  e_pos = lookup(params["item"], codes["item"], pos)                # [B, D]
  e_neg = lookup(params["item"], codes["item"], neg)                # [B, M, D]
  s_pos = jnp.sum(e_user * e_pos, axis=-1)
  s_neg = jnp.einsum("bd,bmd->bm", e_user, e_neg)
  # -log sigmoid(x) = softplus(-x), stable for large |x|.
  loss = jnp.mean(jax.nn.softplus(s_neg - s_pos[:, None]))
  return loss, {"bpr": loss}


def score_users(params: Params, codes: dict[str, jax.Array], users: jax.Array) -> jax.Array:
  """MF scores `e_u . e_i` of every item for some users.

  Args:
    params: `{"user": [B_U, D], "item": [B_I, D]}` tables.
    codes: `HashCodes.arrays()`.
    users: `[B]` int raw user ids.

  Returns:
    `[B, I]` float32 scores (items of one bucket tie under single hashing).
  """
  items = lookup(params["item"], codes["item"], jnp.arange(codes["item"].shape[0]))
  return lookup(params["user"], codes["user"], users) @ items.T
