"""Top-K ranking metrics for implicit-feedback recommendation (Recall@K, NDCG@K).

Used by UltraGCN (Mao et al., "UltraGCN: Ultra Simplification of Graph Convolutional
Networks for Recommendation", CIKM 2021, arXiv:2110.15114) and its baselines. This is
the all-ranking protocol of NGCF/LightGCN (He et al., SIGIR 2020, arXiv:2002.02126), as
implemented in the official UltraGCN code (reczoo/RecZoo
`matching/gnn/UltraGCN/main.py`, functions `test`, `RecallPrecision_ATk`, `NDCGatK_r`):
score every item for a user, set the user's *training* items to `-inf`, take the top K,
and compare with the user's test items `T_u`:

    Recall@K = |topK ∩ T_u| / |T_u|
    NDCG@K   = sum_{r < K} [topK_r in T_u] / log2(r + 2)  /  sum_{r < min(K, |T_u|)} 1 / log2(r + 2)

The recall denominator is the full `|T_u|` (not `min(K, |T_u|)`), exactly as in the
official code; the ideal DCG uses `min(K, |T_u|)` relevant items.

Item lists are passed as `-1`-padded `[U, L]` int arrays (`pad_item_lists`), which keeps
memory at `O(U L)` instead of a dense `U x I` mask and keeps shapes static under `jit`.

Differences from the official code:

* Users without test items are flagged invalid and excluded from the means. The official
  UltraGCN `test` sums over all users and divides by `n_user` (those users contribute 0);
  LightGCN's evaluates only users present in the test file, which is what we do.
* Ties between scores are broken towards the lower item id (`jax.lax.top_k` order); the
  official code uses `torch.topk`, whose tie order is unspecified.
* An item listed both as training and test is excluded from the ranking but still counts in
  `|T_u|`, as in the official code (our generators never produce such overlaps).
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def unique_interactions(train_pairs, n_users: int, n_items: int) -> np.ndarray:
  """Validates `[N, 2]` (user, item) pairs and returns them unique, as int64 numpy.

  A repeated interaction is one edge, as in the official UltraGCN and GraphHash code (a
  0/1 sparse biadjacency).

  Raises:
    ValueError: on a wrong shape, non-positive sizes or ids out of range.
  """
  pairs = np.asarray(train_pairs)
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(f"train_pairs must have shape [N, 2], got {pairs.shape}")
  if n_users < 1 or n_items < 1:
    raise ValueError(f"n_users={n_users} and n_items={n_items} must both be >= 1")
  if pairs.size and (pairs.min() < 0 or pairs[:, 0].max() >= n_users
                     or pairs[:, 1].max() >= n_items):
    raise ValueError(f"train_pairs ids must lie in [0, n_users={n_users}) x "
                     f"[0, n_items={n_items})")
  return np.unique(pairs.astype(np.int64), axis=0).reshape(-1, 2)


def pad_item_lists(pairs, n_users: int, max_len: int | None = None) -> np.ndarray:
  """Per-user item lists from `(user, item)` pairs, padded with `-1`.

  Args:
    pairs: `[N, 2]` integer `(user, item)` pairs (host numpy).
    n_users: number of users `U`.
    max_len: list width `L`; default is the largest per-user count (at least 1).

  Returns:
    `[U, L]` int32 numpy; row `u` holds user `u`'s items in the order given, then `-1`.

  Raises:
    ValueError: if `pairs` is not `[N, 2]`, a user id is out of range, or a user has more
      than `max_len` items.
  """
  pairs = np.asarray(pairs)
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(f"pairs must have shape [N, 2], got {pairs.shape}")
  users = pairs[:, 0].astype(np.int64)
  if users.size and (users.min() < 0 or users.max() >= n_users):
    raise ValueError(f"user ids must lie in [0, n_users={n_users})")
  counts = np.bincount(users, minlength=n_users)
  width = max(1, int(counts.max(initial=0))) if max_len is None else int(max_len)
  if counts.max(initial=0) > width:
    raise ValueError(f"max_len={max_len} but a user has {counts.max()} items")
  order = np.argsort(users, kind="stable")
  users_sorted = users[order]
  slot = np.arange(users.size) - np.searchsorted(users_sorted, users_sorted, side="left")
  lists = np.full((n_users, width), -1, np.int32)
  lists[users_sorted, slot] = pairs[order, 1]
  return lists


def _membership(items: jax.Array, n_items: int) -> jax.Array:
  """`[B, L]` `-1`-padded id lists -> `[B, I]` bool membership mask."""
  rows = jnp.arange(items.shape[0])[:, None]
  # `.at[-1]` would wrap to the last item, so padding is sent out of bounds and dropped.
  cols = jnp.where(items < 0, n_items, items)
  return jnp.zeros((items.shape[0], n_items), bool).at[rows, cols].set(True, mode="drop")


def topk_metrics(scores: jax.Array, train_items: jax.Array, test_items: jax.Array,
                 k: int) -> dict[str, jax.Array]:
  """Per-user Recall@K and NDCG@K with training items excluded (jittable, `k` static).

  Args:
    scores: `[B, I]` float scores.
    train_items: `[B, Lt]` int, each user's training items, `-1`-padded; excluded.
    test_items: `[B, Ls]` int, each user's test items, `-1`-padded (ids unique per row).
    k: cut-off K, `1 <= K <= I`.

  Returns:
    `{"recall": [B] f32, "ndcg": [B] f32, "valid": [B] bool}`; `valid` is False for users
    without test items, whose recall and NDCG are 0.

  Raises:
    ValueError: on mismatched shapes or `k` outside `[1, I]`.
  """
  if scores.ndim != 2 or train_items.ndim != 2 or test_items.ndim != 2 or not (
      scores.shape[0] == train_items.shape[0] == test_items.shape[0]):
    raise ValueError("need scores [B, I], train_items [B, Lt], test_items [B, Ls]; got "
                     f"{scores.shape}, {train_items.shape}, {test_items.shape}")
  n_items = scores.shape[1]
  if not 1 <= k <= n_items:
    raise ValueError(f"k={k}; must be in [1, n_items={n_items}]")
  masked = jnp.where(_membership(train_items, n_items), -jnp.inf, scores)
  _, top = jax.lax.top_k(masked, k)                                  # [B, K]
  is_test = _membership(test_items, n_items)
  hits = jnp.take_along_axis(is_test, top, axis=1).astype(jnp.float32)
  n_test = jnp.sum(is_test, axis=1)
  valid = n_test > 0

  discount = 1.0 / jnp.log2(jnp.arange(2, k + 2, dtype=jnp.float32))   # [K]
  dcg = hits @ discount
  ideal = jnp.cumsum(discount)[jnp.clip(n_test, 1, k) - 1]
  recall = jnp.where(valid, jnp.sum(hits, axis=1) / jnp.maximum(n_test, 1), 0.0)
  ndcg = jnp.where(valid, dcg / ideal, 0.0)
  return {"recall": recall, "ndcg": ndcg, "valid": valid}


@functools.partial(jax.jit, static_argnames=("score_fn", "k", "batch_size"))
def evaluate_in_batches(score_fn: Callable[..., jax.Array], params, train_items: jax.Array,
                        test_items: jax.Array, *, k: int = 20,
                        batch_size: int = 256) -> dict[str, jax.Array]:
  """Recall@K and NDCG@K of all users, scored `batch_size` users at a time in one jit.

  Users are padded to a multiple of `batch_size` (padding users have no test items and are
  invalid) and mapped with `lax.map`, so peak memory is `batch_size x I` scores and
  repeated calls with same-shaped arguments and the same `score_fn` object never retrace.

  Args:
    score_fn: `score_fn(params, users [b] int32) -> [b, I]` scores; a module-level
      function (hashable, static), e.g. `ultragcn.score_users`.
    params: pytree passed through to `score_fn`.
    train_items: `[U, Lt]` int `-1`-padded training items (`pad_item_lists`).
    test_items: `[U, Ls]` int `-1`-padded test items.
    k: cut-off K.
    batch_size: users scored per step.

  Returns:
    `{"recall": [] f32, "ndcg": [] f32}` means over valid users, `"n_valid": [] int32`, and
    per-user `"recall_per_user": [U]`, `"ndcg_per_user": [U]`, `"valid": [U] bool`.
  """
  n_users = train_items.shape[0]
  if test_items.shape[0] != n_users:
    raise ValueError(f"train_items has {n_users} users but test_items has "
                     f"{test_items.shape[0]}")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size}; must be >= 1")
  n_batches = -(-n_users // batch_size)
  pad = n_batches * batch_size - n_users
  # Padding users repeat user 0's scores but get an empty test list, so they are invalid.
  users = jnp.pad(jnp.arange(n_users, dtype=jnp.int32), (0, pad))
  train = jnp.pad(train_items, ((0, pad), (0, 0)), constant_values=-1)
  test = jnp.pad(test_items, ((0, pad), (0, 0)), constant_values=-1)

  def one_batch(xs):
    u, tr, te = xs
    return topk_metrics(score_fn(params, u), tr, te, k)

  per_batch = jax.lax.map(one_batch, (users.reshape(n_batches, batch_size),
                                      train.reshape(n_batches, batch_size, -1),
                                      test.reshape(n_batches, batch_size, -1)))
  per_user = jax.tree.map(lambda x: x.reshape(-1)[:n_users], per_batch)
  valid = per_user["valid"]
  n_valid = jnp.sum(valid.astype(jnp.int32))
  denom = jnp.maximum(n_valid, 1).astype(jnp.float32)
  return {"recall": jnp.sum(per_user["recall"]) / denom,
          "ndcg": jnp.sum(per_user["ndcg"]) / denom, "n_valid": n_valid,
          "recall_per_user": per_user["recall"], "ndcg_per_user": per_user["ndcg"],
          "valid": valid}
