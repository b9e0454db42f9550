"""Seeded numpy generators of synthetic graphs for the graph-learning papers.

Every generator is host-side numpy, deterministic in its `seed`, runs in well under a
second at the spec cards' sizes and returns a frozen dataclass of numpy arrays, so a
driver can build jraph `GraphsTuple`s or JAX constants from it once.

Generators:

* `bipartite_sbm`: a user-item interaction graph from a bipartite stochastic block model
  with Pareto item popularity (used by UltraGCN and GraphHash). Users and items belong to
  latent communities; each user mostly interacts with popular items of its own community,
  which is the low-rank-plus-popularity structure that collaborative filtering exploits.
"""

import dataclasses

import numpy as np


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
