"""LightGCN propagation on a jraph bipartite graph, and its BPR loss.

Paper: Xiangnan He, Kuan Deng, Xiang Wang, Yan Li, Yongdong Zhang, Meng Wang, "LightGCN:
Simplifying and Powering Graph Convolution Network for Recommendation", SIGIR 2020,
arXiv:2002.02126. Official code: gusye1234/LightGCN-PyTorch (`code/model.py`).

Users and items are the `U + I` nodes of one undirected bipartite graph `A` (each training
interaction is an edge, stored in both directions). With `Â = D^{-1/2} A D^{-1/2}` a layer is
parameter-free, `E^{l+1} = Â E^l`, i.e. `e_u^{l+1} = sum_{i in N(u)} e_i^l / sqrt(d_u d_i)`,
and the final embedding is the mean of the layer outputs, `(1 / (L + 1)) sum_{l=0..L} E^l`.
Scores are `e_u . e_i`; training uses BPR with one sampled negative,
`-log s(e_u.e_i - e_u.e_j)`, plus `l2 / 2 (|e_u^0|^2 + |e_i^0|^2 + |e_j^0|^2) / B` on the layer-0
(ego) rows of the batch, as in the official code.

A layer is `jraph.GraphConvolution` (identity node update, no self edges, symmetric
normalisation), which computes `1 / sqrt(d)` from edge counts with a floor of 1, so
isolated nodes stay finite (they propagate to 0). The `GraphsTuple` is built once on the
host; its `nodes` field is filled with the embedding table at every call.

Differences from the official code: the graph is a `GraphsTuple` with edge lists and
`segment_sum` instead of a torch sparse matrix (same arithmetic); the BPR loss accepts
`M >= 1` negatives per positive and averages over them (`M = 1` is the official loss).
"""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from flax import nnx


def build_bipartite_graph(train_pairs, n_users: int, n_items: int) -> jraph.GraphsTuple:
  """The user+item interaction graph as one `GraphsTuple` (host numpy, built once).

  Node `u` is user `u`; node `U + i` is item `i`. Each unique interaction gives two
  directed edges, `u -> U + i` and `U + i -> u`.

  Args:
    train_pairs: `[N, 2]` integer `(user, item)` pairs; duplicates are dropped.
    n_users: number of users `U`.
    n_items: number of items `I`.

  Returns:
    A `GraphsTuple` with `nodes=None`, `senders`/`receivers` `[2N']` int32 (`N'` unique
    pairs), `n_node = [U + I]`, `n_edge = [2N']`.

  Raises:
    ValueError: if `train_pairs` is not `[N, 2]` or has out-of-range ids.
  """
  pairs = np.asarray(train_pairs)
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(f"train_pairs must have shape [N, 2], got {pairs.shape}")
  if pairs.size and (pairs.min() < 0 or pairs[:, 0].max() >= n_users
                     or pairs[:, 1].max() >= n_items):
    raise ValueError(f"train_pairs ids must lie in [0, n_users={n_users}) x "
                     f"[0, n_items={n_items})")
  # Duplicate edges would inflate jraph's edge-count degrees.
  pairs = np.unique(pairs.astype(np.int64), axis=0).reshape(-1, 2)
  users, items = pairs[:, 0], pairs[:, 1] + n_users
  senders = np.concatenate([users, items]).astype(np.int32)
  receivers = np.concatenate([items, users]).astype(np.int32)
  return jraph.GraphsTuple(
      nodes=None, edges=None, senders=senders, receivers=receivers, globals=None,
      n_node=np.array([n_users + n_items], np.int32),
      n_edge=np.array([senders.size], np.int32))


_CONV = jraph.GraphConvolution(update_node_fn=lambda x: x, add_self_edges=False,
                               symmetric_normalization=True)


def propagate(graph: jraph.GraphsTuple, embeddings: jax.Array, num_layers: int) -> jax.Array:
  """Mean of `num_layers + 1` LightGCN layer outputs `(1 / (L + 1)) sum_l Â^l E`.

  Args:
    graph: from `build_bipartite_graph` (numpy or device arrays).
    embeddings: `[U + I, D]` float layer-0 embeddings.
    num_layers: number of propagation layers `L >= 0` (static).

  Returns:
    `[U + I, D]` final embeddings, same dtype as `embeddings`.
  """
  if num_layers < 0:
    raise ValueError(f"num_layers={num_layers}; must be >= 0")
  n_node = int(np.sum(graph.n_node)) if isinstance(graph.n_node, np.ndarray) else None
  if embeddings.ndim != 2 or (n_node is not None and embeddings.shape[0] != n_node):
    raise ValueError(f"embeddings must be [U + I, D] = [{n_node}, D], "
                     f"got {embeddings.shape}")

  def layer(carry, _):
    x, total = carry
    x = _CONV(graph._replace(nodes=x)).nodes
    return (x, total + x), None

  (_, total), _ = jax.lax.scan(layer, (embeddings, embeddings), length=num_layers)
  return total / (num_layers + 1)


class LightGCN(nnx.Module):
  """User and item embedding tables with LightGCN propagation.

  Attributes:
    user: `[U, D]` layer-0 user embeddings (`nnx.Param`).
    item: `[I, D]` layer-0 item embeddings (`nnx.Param`).
    num_layers: propagation depth `L` (static).
  """

  def __init__(self, n_users: int, n_items: int, dim: int, num_layers: int = 3, *,
               init_std: float = 0.1, rngs: nnx.Rngs):
    if min(n_users, n_items, dim) < 1 or num_layers < 0:
      raise ValueError(f"n_users={n_users}, n_items={n_items}, dim={dim} must be >= 1 "
                       f"and num_layers={num_layers} >= 0")
    # The official code initialises both tables with N(0, 0.1^2).
    self.user = nnx.Param(init_std * jax.random.normal(rngs.params(), (n_users, dim)))
    self.item = nnx.Param(init_std * jax.random.normal(rngs.params(), (n_items, dim)))
    self.num_layers = num_layers

  def __call__(self, graph: jraph.GraphsTuple) -> dict[str, jax.Array]:
    """Final embeddings `{"user": [U, D], "item": [I, D]}` after propagation on `graph`."""
    n_users = self.user.shape[0]
    ego = jnp.concatenate([self.user[...], self.item[...]], axis=0)
    final = propagate(graph, ego, self.num_layers)
    return {"user": final[:n_users], "item": final[n_users:]}


def bpr_loss(model: LightGCN, graph: jraph.GraphsTuple, batch: dict[str, jax.Array],
             l2_weight: float = 1e-4) -> tuple[jax.Array, dict[str, jax.Array]]:
  """BPR loss with the official LightGCN ego-embedding L2 term.

  Call it inside a pure jitted function after `nnx.merge(graphdef, state)`.

  Args:
    model: a `LightGCN`.
    graph: from `build_bipartite_graph`.
    batch: `{"users": [B], "pos_items": [B], "neg_items": [B, M]}` int arrays (the format
      of `ultragcn.sample_batch`; `M = 1` is standard BPR).
    l2_weight: weight decay on the batch's layer-0 rows, divided by `B`.

  Returns:
    `(loss, aux)` with scalar float32 `aux["bpr"]` and `aux["l2"]` (unweighted).
  """
  users, pos, neg = batch["users"], batch["pos_items"], batch["neg_items"]
  if users.ndim != 1 or pos.shape != users.shape or neg.ndim != 2 \
      or neg.shape[0] != users.shape[0]:
    raise ValueError("batch must hold users [B], pos_items [B] and neg_items [B, M]; got "
                     f"{users.shape}, {pos.shape}, {neg.shape}")
  final = model(graph)
  e_user = final["user"][users]
  s_pos = jnp.sum(e_user * final["item"][pos], axis=-1)                   # [B]
  s_neg = jnp.einsum("bd,bmd->bm", e_user, final["item"][neg])            # [B, M]
  # -log s(x) = softplus(-x); averaged over the batch and the negatives.
  bpr = jnp.mean(jax.nn.softplus(s_neg - s_pos[:, None]))
  ego_user, ego_item = model.user[...], model.item[...]
  l2 = 0.5 * (jnp.sum(jnp.square(ego_user[users])) + jnp.sum(jnp.square(ego_item[pos]))
              + jnp.sum(jnp.square(ego_item[neg])) / neg.shape[1]) / users.shape[0]
  loss = bpr + l2_weight * l2
  return loss, {"loss": loss, "bpr": bpr, "l2": l2}
