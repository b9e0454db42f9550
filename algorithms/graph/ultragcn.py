"""UltraGCN: ultra-simplified graph convolution for collaborative filtering.

Paper: Kelong Mao, Jieming Zhu, Xi Xiao, Biao Lu, Zhaowei Wang, Xiuqiang He, "UltraGCN:
Ultra Simplification of Graph Convolutional Networks for Recommendation", CIKM 2021,
arXiv:2110.15114. Official code: reczoo/RecZoo `matching/gnn/UltraGCN/main.py`.

Method. LightGCN with self-loops propagates
`e_u <- e_u / (d_u + 1) + sum_{i in N(u)} e_i / sqrt((d_u + 1)(d_i + 1))`. Its fixed point
(infinitely many layers) satisfies

    e_u = sum_{i in N(u)} beta_{u,i} e_i,   beta_{u,i} = (1 / d_u) sqrt((d_u + 1) / (d_i + 1)),

so instead of propagating, UltraGCN trains plain matrix-factorisation embeddings with a
constraint loss that pulls `e_u . e_i` up with weight `beta_{u,i}`:

    L_C = - sum_{(u,i) in N+} beta_{u,i} log s(e_u.e_i)
          - sum_{(u,j) in N-} beta_{u,j} log s(-e_u.e_j)
    L_O = - sum_{(u,i) in N+} log s(e_u.e_i) - sum_{(u,j) in N-} log s(-e_u.e_j)   (BCE)
    L_I = - sum_{(u,i) in N+} sum_{j in S(i)} omega_{i,j} log s(e_u.e_j)
    L   = L_O + lambda L_C + gamma L_I + l2 * ||E||^2 / 2

where `s` is the sigmoid, `beta_{u,i} = beta_uD[u] beta_iD[i]` factorises with
`beta_uD = sqrt(d + 1) / d` and `beta_iD = 1 / sqrt(d + 1)`, and `omega` is the same
coefficient computed on the item-item co-occurrence graph `G = A^T A` (its weighted
degrees), restricted to the top-K entries `S(i)` of each row. Inference is plain MF:
`score(u, i) = e_u . e_i`.

As in the official code, L_O and lambda L_C are folded into one weighted BCE: a positive
pair has weight `w1 + w2 beta_{u,i}`, a negative pair `w3 + w4 beta_{u,j}`; each positive's
negatives are *averaged* and the average is scaled by `negative_weight`; every term is
*summed* over the batch; the L2 term covers the full embedding tables. So `w1, w3` weigh
L_O and `w2, w4` play the paper's lambda. MF-BCE is the special case `w1 = w3 = 1`,
`w2 = w4 = 0`, no L_I (`mf_bce_hparams`).

Differences from the paper / official code:

* The official config's key `lambda` multiplies L_I and `gamma` multiplies L2, swapped
  relative to the paper; here they are `LossHParams.ii_weight` (paper gamma) and
  `LossHParams.l2_weight`.
* Positives are drawn uniformly with replacement each step (`sample_batch`) instead of
  iterating over shuffled epochs; negatives are uniform over all items, as in the official
  default `sampling_sift_pos = no`.
* Users with no training interaction get `beta_uD = 0` (the official formula gives inf or
  nan); such users never occur as positives, so only their negatives' weight changes.
* Top-K ties in `omega` are broken towards the lower item id (torch.topk is unspecified);
  rows with fewer than K nonzero entries are padded with the item itself at weight 0.
  Like the official default (`ii_diagonal_zero = False`) the diagonal `G_ii = d_i` is kept,
  so an item is usually among its own neighbours; `exclude_self=True` drops it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from jaxrepro.algorithms.graph import ranking

Params = dict[str, jax.Array]


def _beta_factors(degree: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """`(sqrt(d + 1) / d, 1 / sqrt(d + 1))` with the first factor 0 where `d = 0`."""
  degree = degree.astype(np.float64)
  row = np.where(degree > 0, np.sqrt(degree + 1.0) / np.maximum(degree, 1.0), 0.0)
  col = 1.0 / np.sqrt(degree + 1.0)
  return row, col


def constraint_coefficients(train_pairs, n_users: int,
                            n_items: int) -> tuple[np.ndarray, np.ndarray]:
  """The factorised fixed-point weights `beta_{u,i} = beta_u[u] * beta_i[i]`.

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` training interactions (duplicates count
      once).
    n_users: number of users `U`.
    n_items: number of items `I`.

  Returns:
    `(beta_u [U], beta_i [I])`, float32 numpy: `beta_u = sqrt(d_u + 1) / d_u` (0 for a user
    without interactions) and `beta_i = 1 / sqrt(d_i + 1)`.

  Raises:
    ValueError: if `train_pairs` is not `[N, 2]` or holds out-of-range ids.
  """
  pairs = ranking.unique_interactions(train_pairs, n_users, n_items)
  d_user = np.bincount(pairs[:, 0], minlength=n_users)
  d_item = np.bincount(pairs[:, 1], minlength=n_items)
  beta_u, _ = _beta_factors(d_user)
  _, beta_i = _beta_factors(d_item)
  return beta_u.astype(np.float32), beta_i.astype(np.float32)


def item_item_constraints(train_pairs, n_users: int, n_items: int, k: int, *,
                          exclude_self: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Top-K item-item constraint neighbours `S(i)` and weights `omega_{i,j}`.

  With `A` the `[U, I]` 0/1 interaction matrix, `G = A^T A` counts co-interacting users and
  `omega_{i,j} = G_{ij} sqrt(g_i + 1) / (g_i sqrt(g_j + 1))` with `g = G 1` (the weighted
  degrees of `G`). Each row keeps its `k` largest entries. Everything stays in
  `scipy.sparse`, so no dense `I x I` matrix is formed.

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` training interactions.
    n_users: number of users `U`.
    n_items: number of items `I`.
    k: neighbours kept per item, >= 1 (the paper uses 10).
    exclude_self: drop the diagonal `G_ii` before ranking (the official default keeps it).

  Returns:
    `(neighbors [I, k] int32, weights [I, k] float32)`, each row sorted by decreasing
    weight (ties: lower item id first). Rows with fewer than `k` nonzero entries are
    padded with the row's own item id at weight 0, so padding never contributes to L_I.

  Raises:
    ValueError: if `k < 1` or `train_pairs` is malformed.
  """
  if k < 1:
    raise ValueError(f"k={k}; the number of item neighbours must be >= 1")
  pairs = ranking.unique_interactions(train_pairs, n_users, n_items)
  a = sp.csr_matrix((np.ones(len(pairs), np.float64), (pairs[:, 0], pairs[:, 1])),
                    shape=(n_users, n_items))
  g = (a.T @ a).tocsr()
  g.sum_duplicates()
  g.sort_indices()
  row_factor, col_factor = _beta_factors(np.asarray(g.sum(axis=1)).ravel())

  rows = np.repeat(np.arange(n_items), np.diff(g.indptr))
  cols = g.indices.astype(np.int64)
  omega = g.data * row_factor[rows] * col_factor[cols]
  keep = omega > 0
  if exclude_self:
    keep &= rows != cols
  rows, cols, omega = rows[keep], cols[keep], omega[keep]

  # Sort by (row, -omega); lexsort is stable and columns are ascending within a row, so
  # ties go to the lower item id. Then rank entries within their row and keep rank < k.
  order = np.lexsort((-omega, rows))
  rows, cols, omega = rows[order], cols[order], omega[order]
  rank = np.arange(rows.size) - np.searchsorted(rows, rows, side="left")
  top = rank < k

  neighbors = np.repeat(np.arange(n_items, dtype=np.int32)[:, None], k, axis=1)
  weights = np.zeros((n_items, k), np.float32)
  neighbors[rows[top], rank[top]] = cols[top]
  weights[rows[top], rank[top]] = omega[top]
  return neighbors, weights


def make_constants(train_pairs, n_users: int, n_items: int,
                   num_neighbors: int = 10, *, exclude_self: bool = False) -> Params:
  """Device arrays `loss_fn` needs, computed once on the host.

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` training interactions.
    n_users: number of users `U`.
    n_items: number of items `I`.
    num_neighbors: K of the item-item graph; 0 skips it (no L_I possible).
    exclude_self: passed to `item_item_constraints`.

  Returns:
    `{"beta_user": [U] f32, "beta_item": [I] f32}` plus, when `num_neighbors > 0`,
    `{"ii_neighbors": [I, K] int32, "ii_weights": [I, K] f32}`.
  """
  beta_u, beta_i = constraint_coefficients(train_pairs, n_users, n_items)
  constants = {"beta_user": jnp.asarray(beta_u), "beta_item": jnp.asarray(beta_i)}
  if num_neighbors > 0:
    nbrs, wts = item_item_constraints(train_pairs, n_users, n_items, num_neighbors,
                                      exclude_self=exclude_self)
    constants["ii_neighbors"] = jnp.asarray(nbrs)
    constants["ii_weights"] = jnp.asarray(wts)
  return constants


@dataclasses.dataclass(frozen=True)
class LossHParams:
  """Loss weights of UltraGCN, named as in the official code (hashable: pass it static).

  Defaults are the official Gowalla config (`config/ultragcn_gowalla_m1.ini`).

  Attributes:
    w1: weight of a positive pair's plain BCE term (L_O).
    w2: weight of a positive pair's beta term (the paper's lambda on L_C).
    w3: weight of a negative pair's plain BCE term (L_O).
    w4: weight of a negative pair's beta term (the paper's lambda on L_C).
    negative_weight: multiplies the per-positive *mean* over its negatives.
    ii_weight: weight of the item-item loss L_I (the paper's gamma; the official config
      key `lambda`).
    l2_weight: weight of `||E_user||^2 / 2 + ||E_item||^2 / 2` over the full tables (the
      official config key `gamma`).
  """
  w1: float = 1e-6
  w2: float = 1.0
  w3: float = 1e-6
  w4: float = 1.0
  negative_weight: float = 300.0
  ii_weight: float = 5e-4
  l2_weight: float = 1e-4

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not value >= 0:  # Also rejects NaN.
        raise ValueError(f"LossHParams.{field.name}={value}; must be >= 0")


def mf_bce_hparams(negative_weight: float = 300.0, l2_weight: float = 1e-4) -> LossHParams:
  """The MF-BCE baseline: `w1 = w3 = 1`, `w2 = w4 = 0`, no item-item loss."""
  return LossHParams(w1=1.0, w2=0.0, w3=1.0, w4=0.0, negative_weight=negative_weight,
                     ii_weight=0.0, l2_weight=l2_weight)


def init_params(key: jax.Array, n_users: int, n_items: int, dim: int,
                init_std: float = 1e-4) -> Params:
  """Gaussian embedding tables, as `nn.init.normal_(std=init_std)` in the official code.

  Args:
    key: a typed PRNG key (`jax.random.key`).
    n_users: number of users `U`.
    n_items: number of items `I`.
    dim: embedding size `D`.
    init_std: standard deviation of the entries.

  Returns:
    `{"user": [U, D] f32, "item": [I, D] f32}`.
  """
  if min(n_users, n_items, dim) < 1:
    raise ValueError(f"n_users={n_users}, n_items={n_items}, dim={dim} must all be >= 1")
  k_user, k_item = jax.random.split(key)
  return {"user": init_std * jax.random.normal(k_user, (n_users, dim), jnp.float32),
          "item": init_std * jax.random.normal(k_item, (n_items, dim), jnp.float32)}


def sample_batch(key: jax.Array, train_pairs: jax.Array, n_items: int, batch_size: int,
                 num_negatives: int) -> dict[str, jax.Array]:
  """Uniform positives (with replacement) and uniform negatives over all items.

  Jittable with `batch_size` and `num_negatives` static.

  Args:
    key: a typed PRNG key.
    train_pairs: `[N, 2]` int32 `(user, item)` training interactions (a device array).
    n_items: number of items `I`.
    batch_size: positives per batch `B`.
    num_negatives: negatives per positive `M`.

  Returns:
    `{"users": [B] int32, "pos_items": [B] int32, "neg_items": [B, M] int32}`.
  """
  if batch_size < 1 or num_negatives < 1:
    raise ValueError(f"batch_size={batch_size} and num_negatives={num_negatives} must "
                     "both be >= 1")
  k_pos, k_neg = jax.random.split(key)
  idx = jax.random.randint(k_pos, (batch_size,), 0, train_pairs.shape[0])
  pos = jnp.take(train_pairs, idx, axis=0).astype(jnp.int32)
  neg = jax.random.randint(k_neg, (batch_size, num_negatives), 0, n_items, jnp.int32)
  return {"users": pos[:, 0], "pos_items": pos[:, 1], "neg_items": neg}


def loss_fn(params: Params, batch: dict[str, jax.Array], constants: Params,
            hparams: LossHParams) -> tuple[jax.Array, dict[str, jax.Array]]:
  """UltraGCN loss `L_O + lambda L_C + gamma L_I + L2`, folded as in the official code.

  Args:
    params: `{"user": [U, D], "item": [I, D]}` float embedding tables.
    batch: `{"users": [B], "pos_items": [B], "neg_items": [B, M]}` int arrays.
    constants: output of `make_constants` (`ii_*` entries needed when `ii_weight > 0`).
    hparams: `LossHParams` (static under `jax.jit`).

  Returns:
    `(loss, aux)`: the scalar loss (summed over the batch) and a dict of float32 scalars
    `loss`, `pos` (weighted positive BCE), `neg` (weighted, averaged and scaled negative
    BCE), `ii` (unweighted L_I), `l2` (unweighted `||E||^2 / 2`).
  """
  users, pos, neg = batch["users"], batch["pos_items"], batch["neg_items"]
  if users.ndim != 1 or pos.shape != users.shape or neg.ndim != 2 \
      or neg.shape[0] != users.shape[0]:
    raise ValueError("batch must hold users [B], pos_items [B] and neg_items [B, M]; got "
                     f"{users.shape}, {pos.shape}, {neg.shape}")
  if hparams.ii_weight > 0 and "ii_neighbors" not in constants:
    raise ValueError("hparams.ii_weight > 0 needs constants['ii_neighbors'] and "
                     "['ii_weights']; build them with make_constants(num_neighbors > 0)")
  e_user = params["user"][users]                                 # [B, D]
  e_pos = params["item"][pos]                                    # [B, D]
  e_neg = params["item"][neg]                                    # [B, M, D]
  s_pos = jnp.sum(e_user * e_pos, axis=-1)                       # [B]
  s_neg = jnp.einsum("bd,bmd->bm", e_user, e_neg)                # [B, M]

  beta_u = constants["beta_user"][users]
  w_pos = hparams.w1 + hparams.w2 * beta_u * constants["beta_item"][pos]
  w_neg = hparams.w3 + hparams.w4 * beta_u[:, None] * constants["beta_item"][neg]
  # -log s(x) = softplus(-x) and -log s(-x) = softplus(x), stable for large |x|.
  pos_term = jnp.sum(w_pos * jax.nn.softplus(-s_pos))
  neg_term = hparams.negative_weight * jnp.sum(
      jnp.mean(w_neg * jax.nn.softplus(s_neg), axis=-1))

  l2 = 0.5 * sum(jnp.sum(jnp.square(t)) for t in jax.tree.leaves(params))
  loss = pos_term + neg_term + hparams.l2_weight * l2

  if hparams.ii_weight > 0:
    # L_I reuses the batch's positives: each (u, i) pulls u towards i's K neighbours.
    nbrs = constants["ii_neighbors"][pos]                        # [B, K]
    omega = constants["ii_weights"][pos]                         # [B, K]
    s_nbr = jnp.einsum("bd,bkd->bk", e_user, params["item"][nbrs])
    ii = jnp.sum(omega * jax.nn.softplus(-s_nbr))
    loss = loss + hparams.ii_weight * ii
  else:
    ii = jnp.zeros((), loss.dtype)
  aux = {"loss": loss, "pos": pos_term, "neg": neg_term, "ii": ii, "l2": l2}
  return loss, aux


def score_users(params: Params, users: jax.Array) -> jax.Array:
  """MF inference `e_u . e_i` for every item.

  Args:
    params: `{"user": [U, D], "item": [I, D]}`.
    users: `[B]` int user ids.

  Returns:
    `[B, I]` float32 scores.
  """
  return params["user"][users] @ params["item"].T
