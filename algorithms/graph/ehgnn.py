"""EHGNN: edge representation learning with the dual hypergraph transformation.

Paper: Jaehyeong Jo, Jinheon Baek, Seul Lee, Dongki Kim, Minki Kang, Sung Ju Hwang,
"Edge Representation Learning with Hypergraphs", NeurIPS 2021, arXiv:2106.15845.
Official code: harryjo97/EHGNN (`models/models.py`, `models/layers.py`).

Method.

* Dual Hypergraph Transformation (DHT). A graph `G = (X, M, E)` with node features
  `X [n, F]`, edge features `E [m, F_e]` and incidence `M in {0,1}^{n x m}` maps to its dual
  `G* = (E, M^T, X)`: every edge becomes a node (features `E`) and every node becomes a
  hyperedge holding its incident edges (features `X`). Transposing twice is the identity, so
  DHT is an involution. Here a (hyper)graph is a `Hypergraph` of incidence pairs
  `(node_index[p], hyperedge_index[p])`; a graph is the hypergraph whose hyperedges are its
  edges, each with its two endpoints (`graph_incidence`), and `dht` swaps the two sides.
* Hypergraph convolution on `G*` (message passing between edges):

      E' = D^-1 H B^-1 H^T E Theta + b,   H = M^T,

  with `D` the number of hyperedges holding each dual node and `B` the hyperedge sizes, both
  from `segment_sum`s over the incidence pairs (no dense incidence). As in the official DHT
  with `add_loops`, every dual node also gets a singleton hyperedge of its own and
  size-1 hyperedges (degree-1 nodes of `G`) are dropped; `self_loops=False` is the plain
  formula. For an edge `e = (u, v)` without loops: `e' = mean over {u, v} of the mean of the
  edges at that endpoint`, times `Theta`.
* HyperCluster (graph reconstruction). Hypergraph convs on `G*`, then graph multiset
  pooling (GMPool) of the dual nodes: `num_seeds` learnable seeds `S` attend over the edges
  of each graph, `A = softmax(fc_q(S) K^T / sqrt(d))` with keys/values `K, V` from
  hypergraph convs, `O = Q + A V`, `O <- O + relu(fc_o(O))`; with `cluster` the softmax runs
  over the seeds (each edge is softly assigned to clusters), as in the official ZINC run.
  Unpooling is `A^T O`, followed by hypergraph convs and a last hypergraph conv to the edge
  classes (bond types), trained with cross-entropy.
* HyperDrop (graph classification). Layer `l` runs a GCN on `G` with the current edge
  weights and, except in the last layer, a hypergraph conv on `G*` (ReLU) and a score conv
  `s = tanh(HyperConv(E))`; the top `ceil(r m_g)` edges of each graph `g` (among those still
  kept) survive, and their scores clamped to `[0, 1]` weight the next GCN. The readout is
  `sum_l [max, mean, sum]` pooling of the node features, then an MLP.

Padding. Graphs are padded `jraph.GraphsTuple`s (`models.graph.padding`) with ONE directed
edge per undirected bond (see below). Padding edges become padding dual nodes, which only
share the padding node's hyperedge, so real dual nodes never receive padding messages; the
masks keep padding out of the top-k, the pooling attention, the readouts and the losses.

Differences from the paper / official code:

* One dual node per undirected edge. PyG lists each bond twice, which gives two dual nodes
  (and two HyperDrop scores) per bond; here each bond is one edge `i -> j` of the padded
  graph, and node convolutions see it in both directions (`undirected`).
* GMPool uses one attention head and no layer norm (the official ZINC run: `num_heads 1`,
  no `--ln`); padding keys get zero attention explicitly (the official code relies on the
  zero rows of `to_dense_batch`).
* Per-graph top-k breaks score ties towards the lower edge index (PyG's `topk` does not
  specify ties).
* The node-autoencoder baseline (node GCNs, GMPool over nodes with GCN keys/values, unpool,
  node GCNs, bond type decoded from `[h_u + h_v, h_u * h_v]`) is ours; the paper compares
  against node-pooling autoencoders (DiffPool, GMPool, ...) that decode adjacency.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

from jaxrepro.models.graph import layers, padding

KV_CONVS = ("hyper", "gcn", "linear")


class Hypergraph(NamedTuple):
  """A batch of (padded) hypergraphs given by incidence pairs.

  Attributes:
    nodes: `[V, F]` node features (or any pytree / None).
    hyperedges: `[H, F']` hyperedge features (or any pytree / None).
    node_index: `[P]` int32, the node of incidence pair `p`.
    hyperedge_index: `[P]` int32, the hyperedge of incidence pair `p`.
    n_node: `[G]` int32 nodes per graph (nodes are contiguous per graph).
    n_hyperedge: `[G]` int32 hyperedges per graph.
  """
  nodes: object
  hyperedges: object
  node_index: jax.Array
  hyperedge_index: jax.Array
  n_node: jax.Array
  n_hyperedge: jax.Array


def graph_incidence(graph: jraph.GraphsTuple) -> Hypergraph:
  """A graph as a hypergraph: every edge is a hyperedge holding its two endpoints.

  Args:
    graph: a (padded) `GraphsTuple` with `E` edges; `nodes [N, F]`, `edges [E, F_e]`.

  Returns:
    `Hypergraph` with `2E` incidence pairs ordered edge by edge, sender then receiver:
    pair `2e` is `(senders[e], e)` and pair `2e + 1` is `(receivers[e], e)`.
  """
  n_edge = graph.senders.shape[0]
  nodes_of = jnp.stack([graph.senders, graph.receivers], axis=1).reshape(-1)
  return Hypergraph(nodes=graph.nodes, hyperedges=graph.edges,
                    node_index=nodes_of.astype(jnp.int32),
                    hyperedge_index=jnp.repeat(jnp.arange(n_edge, dtype=jnp.int32), 2),
                    n_node=graph.n_node, n_hyperedge=graph.n_edge)


def dht(hypergraph: Hypergraph) -> Hypergraph:
  """The dual hypergraph transformation `(X, M, E) -> (E, M^T, X)` (an involution).

  Args:
    hypergraph: any `Hypergraph`, e.g. `graph_incidence(graph)`.

  Returns:
    The dual: nodes and hyperedges (features, indices and per-graph counts) swapped. On a
    graph with `n` nodes and `m` edges it has `m` nodes and `n` hyperedges, and each dual
    node lies in exactly two hyperedges.
  """
  h = hypergraph
  return Hypergraph(nodes=h.hyperedges, hyperedges=h.nodes, node_index=h.hyperedge_index,
                    hyperedge_index=h.node_index, n_node=h.n_hyperedge,
                    n_hyperedge=h.n_node)


def dual_of_graph(graph: jraph.GraphsTuple) -> Hypergraph:
  """`dht(graph_incidence(graph))`: edges as nodes, nodes as hyperedges."""
  return dht(graph_incidence(graph))


def incidence_to_graph(hypergraph: Hypergraph) -> jraph.GraphsTuple:
  """Inverse of `graph_incidence` (pairs ordered as it orders them).

  Args:
    hypergraph: a hypergraph whose pairs come in consecutive `(sender, receiver)` pairs per
      hyperedge, e.g. `dht(dht(graph_incidence(g)))`.

  Returns:
    The `GraphsTuple` with `nodes`, `edges = hyperedges` and the senders/receivers.
  """
  pairs = hypergraph.node_index.reshape(-1, 2)
  return jraph.GraphsTuple(nodes=hypergraph.nodes, edges=hypergraph.hyperedges,
                           senders=pairs[:, 0], receivers=pairs[:, 1],
                           n_node=hypergraph.n_node, n_edge=hypergraph.n_hyperedge,
                           globals=None)


def undirected(graph: jraph.GraphsTuple) -> jraph.GraphsTuple:
  """Both directions of every edge (edges `e` and `E + e`), for node message passing.

  Edge features are repeated and `n_edge` doubles, but the edges are no longer grouped by
  graph, so jraph's edge padding mask does not apply: mask with
  `concatenate([mask, mask])` of the one-direction graph. Padding edges stay self-loops on
  the first padding node, so real nodes still receive no padding messages.
  """
  edges = None if graph.edges is None else jax.tree.map(
      lambda x: jnp.concatenate([x, x]), graph.edges)
  return graph._replace(senders=jnp.concatenate([graph.senders, graph.receivers]),
                        receivers=jnp.concatenate([graph.receivers, graph.senders]),
                        n_edge=2 * graph.n_edge, edges=edges)


# ------------------------------------------------------------------- hypergraph convolution


def hypergraph_propagate(x: jax.Array, hypergraph: Hypergraph, *, node_mask=None,
                         self_loops: bool = True) -> jax.Array:
  """Parameter-free `D^-1 H B^-1 H^T x` on a hypergraph, with segment sums.

  Args:
    x: `[V, F]` float node features (the dual nodes: edges of the original graph).
    hypergraph: connectivity (`node_index`, `hyperedge_index`: `[P]`); its `hyperedges`
      features `[H, ...]` fix the static hyperedge count `H`.
    node_mask: optional `[V]` bool; False removes the node from every hyperedge (HyperDrop's
      dropped edges). Removed nodes output 0.
    self_loops: the official `add_loops`: size-1 hyperedges are dropped and every node gets
      a singleton hyperedge of its own (`D` grows by 1, the node adds itself once).

  Returns:
    `[V, F]`, dtype of `x`. A node in no hyperedge (and no loop) gets 0.
  """
  v = x.shape[0]
  n_hyper = jax.tree.leaves(hypergraph.hyperedges)[0].shape[0]
  ni, hi = hypergraph.node_index, hypergraph.hyperedge_index
  w = jnp.ones(ni.shape, x.dtype)
  if node_mask is not None:
    w = jnp.where(node_mask[ni], w, 0.0)
  size = jax.ops.segment_sum(w, hi, n_hyper)
  if self_loops:
    w = jnp.where(size[hi] > 1, w, 0.0)
    size = jax.ops.segment_sum(w, hi, n_hyper)
  inv_b = jnp.where(size > 0, 1.0 / jnp.maximum(size, 1.0), 0.0)
  # Node -> hyperedge mean, then hyperedge -> node mean.
  hyper = jax.ops.segment_sum(x[ni] * w[:, None], hi, n_hyper) * inv_b[:, None]
  total = jax.ops.segment_sum(hyper[hi] * w[:, None], ni, v)
  degree = jax.ops.segment_sum(w, ni, v)
  if self_loops:
    total, degree = total + x, degree + 1.0
  out = total * jnp.where(degree > 0, 1.0 / jnp.maximum(degree, 1.0), 0.0)[:, None]
  if node_mask is not None:
    out = jnp.where(node_mask[:, None], out, 0.0)
  return out.astype(x.dtype)


class HypergraphConv(nnx.Module):
  """`D^-1 H B^-1 H^T x Theta + b` (the official `HypergraphConv` without attention)."""

  def __init__(self, in_features: int, out_features: int, *, self_loops: bool = True,
               rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, use_bias=False,
                             kernel_init=nnx.initializers.glorot_uniform(), rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((out_features,)))
    self.self_loops = self_loops

  def __call__(self, x: jax.Array, hypergraph: Hypergraph, *, node_mask=None) -> jax.Array:
    """`[V, F_in]` -> `[V, F_out]`; `node_mask` as in `hypergraph_propagate`."""
    h = hypergraph_propagate(self.linear(x), hypergraph, node_mask=node_mask,
                             self_loops=self.self_loops)
    return h + self.bias[...]


# ----------------------------------------------------------------------------- HyperDrop


def topk_per_graph(score: jax.Array, segment: jax.Array, mask: jax.Array, n_segments: int,
                   ratio: float) -> jax.Array:
  """Keeps the `ceil(ratio * m_g)` highest-scoring masked items of each graph `g`.

  Args:
    score: `[E]` float scores.
    segment: `[E]` int graph index of each item.
    mask: `[E]` bool; only True items compete, `m_g` counts them.
    n_segments: static number of graphs `G`.
    ratio: kept fraction, in `(0, 1]`.

  Returns:
    `[E]` bool keep mask (a subset of `mask`); ties go to the lower index.
  """
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"ratio={ratio}; the kept edge fraction must lie in (0, 1]")
  e = score.shape[0]
  count = jax.ops.segment_sum(mask.astype(jnp.int32), segment, n_segments)
  # ceil in float32 can overshoot for exact products (0.5 * 4); round first.
  k = jnp.ceil(jnp.round(ratio * count.astype(jnp.float32), 4)).astype(jnp.int32)
  key = jnp.where(mask, -score, jnp.inf)
  order = jnp.lexsort((jnp.arange(e), key, segment))  # graph, then score desc, then index
  seg_sorted = segment[order]
  start = jnp.searchsorted(seg_sorted, jnp.arange(n_segments), side="left")
  rank_sorted = jnp.arange(e) - start[seg_sorted]
  rank = jnp.zeros((e,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
  return mask & (rank < k[segment])


class GraphClassifier(nnx.Module):
  """HyperDrop (`hyperdrop=True`) or its node-only baseline (a GCN stack, no edge drop).

  Both: `num_convs` GCN layers (ReLU), readout `sum_l [max, mean, sum]`, an MLP
  `3h -> h -> h/2 -> classes` with dropout. HyperDrop adds `num_convs - 1` hypergraph convs
  on the dual (edge features, ReLU) and score convs to 1 channel.
  """

  def __init__(self, node_features: int, edge_features: int, hidden: int, edge_hidden: int,
               num_classes: int, *, num_convs: int = 3, edge_ratio: float = 0.75,
               hyperdrop: bool = True, dropout: float = 0.0, rngs: nnx.Rngs):
    if num_convs < 1:
      raise ValueError(f"num_convs={num_convs}; must be >= 1")
    if not 0.0 < edge_ratio <= 1.0:
      raise ValueError(f"edge_ratio={edge_ratio}; must lie in (0, 1]")
    self.convs = nnx.List([layers.GCNConv(node_features if i == 0 else hidden, hidden,
                                          rngs=rngs) for i in range(num_convs)])
    self.hyperdrop = hyperdrop
    if hyperdrop:
      self.hyperconvs = nnx.List([HypergraphConv(edge_features if i == 0 else edge_hidden,
                                                 edge_hidden, rngs=rngs)
                                  for i in range(num_convs - 1)])
      self.scoreconvs = nnx.List([HypergraphConv(edge_hidden, 1, rngs=rngs)
                                  for _ in range(num_convs - 1)])
    self.mlp = nnx.List([nnx.Linear(3 * hidden, hidden, rngs=rngs),
                         nnx.Linear(hidden, hidden // 2, rngs=rngs),
                         nnx.Linear(hidden // 2, num_classes, rngs=rngs)])
    self.edge_ratio = float(edge_ratio)
    self.dropout = float(dropout)

  def __call__(self, graph: jraph.GraphsTuple, *, key=None
               ) -> tuple[jax.Array, jax.Array]:
    """Logits `[G, classes]` and the final kept-edge mask `[E]`.

    Args:
      graph: padded graph, one directed edge per bond; `nodes [N, F]`, `edges [E, F_e]`.
      key: dropout key for the MLP (None: no dropout).
    """
    n_graph = graph.n_node.shape[0]
    keep = padding.edge_mask(graph)
    segment = padding.edge_graph_index(graph)
    dual = dual_of_graph(graph)
    both = undirected(graph)
    weight = jnp.ones(keep.shape, jnp.float32)
    x, e, readout = graph.nodes, graph.edges, 0.0
    for i, conv in enumerate(self.convs):
      w2, m2 = jnp.concatenate([weight, weight]), jnp.concatenate([keep, keep])
      x = jax.nn.relu(conv(x, both, edge_mask=m2, edge_weight=w2))
      if self.hyperdrop and i < len(self.convs) - 1:
        e = jax.nn.relu(self.hyperconvs[i](e, dual, node_mask=keep))
        score = jnp.tanh(self.scoreconvs[i](e, dual, node_mask=keep)[:, 0])
        keep = topk_per_graph(score, segment, keep, n_graph, self.edge_ratio)
        weight = jnp.clip(score, 0.0, 1.0)
      readout = readout + jnp.concatenate(
          [layers.pool_nodes(x, graph, k) for k in ("max", "mean", "sum")], axis=-1)
    h = readout
    keys = [None] * 2 if key is None else list(jax.random.split(key, 2))
    for lin, k in zip(self.mlp[:-1], keys, strict=True):
      h = layers.dropout(jax.nn.relu(lin(h)), self.dropout, k)
    return self.mlp[-1](h), keep


# --------------------------------------------------------------------- GMPool / HyperCluster


def dense_batch(segment: jax.Array, mask: jax.Array, n_segments: int, max_size: int
                ) -> tuple[jax.Array, jax.Array]:
  """Slots of a `[G, K]` dense layout for items listed contiguously per graph.

  Args:
    segment: `[E]` int graph index (non-decreasing over real items).
    mask: `[E]` bool real items.
    n_segments: static `G`.
    max_size: static `K`, at least the most real items in any graph.

  Returns:
    `(slot [E] int32, valid [G, K] bool)`: item `e` sits at flat position `slot[e]` of
    `[G * K]` (`G * K`, out of range, for padding items); `valid` marks the used slots.
  """
  e = segment.shape[0]
  count = jax.ops.segment_sum(mask.astype(jnp.int32), segment, n_segments)
  first = jax.ops.segment_min(jnp.where(mask, jnp.arange(e), e), segment, n_segments)
  pos = jnp.arange(e) - first[segment]
  slot = jnp.where(mask & (pos < max_size), segment * max_size + pos, n_segments * max_size)
  valid = jnp.arange(max_size)[None, :] < jnp.minimum(count, max_size)[:, None]
  return slot.astype(jnp.int32), valid


def to_dense(x: jax.Array, slot: jax.Array, n_segments: int, max_size: int) -> jax.Array:
  """`[E, F]` -> `[G, K, F]` (empty slots 0)."""
  out = jnp.zeros((n_segments * max_size, x.shape[-1]), x.dtype)
  return out.at[slot].set(x, mode="drop").reshape(n_segments, max_size, -1)


def from_dense(dense: jax.Array, slot: jax.Array) -> jax.Array:
  """`[G, K, F]` -> `[E, F]` (padding items 0)."""
  flat = dense.reshape(-1, dense.shape[-1])
  return jnp.take(flat, slot, axis=0, mode="fill", fill_value=0)


class GMPool(nnx.Module):
  """Graph multiset pooling with one attention head: learnable seeds attend over items.

  Keys and values come from a graph conv of the items (`kv_conv`: `"hyper"` for the dual
  hypergraph as in HyperCluster, `"gcn"` for nodes of a graph, `"linear"` for none).
  """

  def __init__(self, dim: int, num_seeds: int, *, kv_conv: str = "hyper",
               cluster: bool = True, rngs: nnx.Rngs):
    if kv_conv not in KV_CONVS:
      raise ValueError(f"kv_conv={kv_conv!r}; must be one of {KV_CONVS}")
    if num_seeds < 1:
      raise ValueError(f"num_seeds={num_seeds}; must be >= 1")
    limit = math.sqrt(6.0 / (num_seeds + dim))
    self.seeds = nnx.Param(jax.random.uniform(rngs.params(), (num_seeds, dim),
                                              minval=-limit, maxval=limit))
    self.fc_q = nnx.Linear(dim, dim, rngs=rngs)
    self.fc_o = nnx.Linear(dim, dim, rngs=rngs)
    if kv_conv == "hyper":
      self.fc_k, self.fc_v = (HypergraphConv(dim, dim, rngs=rngs) for _ in range(2))
    elif kv_conv == "gcn":
      self.fc_k, self.fc_v = (layers.GCNConv(dim, dim, rngs=rngs) for _ in range(2))
    else:
      self.fc_k, self.fc_v = (nnx.Linear(dim, dim, rngs=rngs) for _ in range(2))
    self.kv_conv = kv_conv
    self.cluster = cluster
    self.dim = dim

  def __call__(self, x: jax.Array, structure, slot: jax.Array, valid: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """Pools `[E, d]` items into `[G, S, d]`.

    Args:
      x: `[E, d]` item features.
      structure: the `Hypergraph` (hyper) or `GraphsTuple` (gcn) the items live on; unused
        for linear.
      slot, valid: from `dense_batch`.

    Returns:
      `(pooled [G, S, d], attention [G, S, K])`; attention on empty slots is 0.
    """
    g, k = valid.shape
    if self.kv_conv == "linear":
      keys, values = self.fc_k(x), self.fc_v(x)
    else:
      keys, values = self.fc_k(x, structure), self.fc_v(x, structure)
    keys, values = to_dense(keys, slot, g, k), to_dense(values, slot, g, k)
    q = self.fc_q(self.seeds[...])                       # [S, d]
    logits = jnp.einsum("sd,gkd->gsk", q, keys) / math.sqrt(self.dim)
    logits = jnp.where(valid[:, None, :], logits, -1e9)
    attention = jax.nn.softmax(logits, axis=1 if self.cluster else 2)
    attention = jnp.where(valid[:, None, :], attention, 0.0)
    out = q[None] + jnp.einsum("gsk,gkd->gsd", attention, values)
    return out + jax.nn.relu(self.fc_o(out)), attention


def unpool(pooled: jax.Array, attention: jax.Array, slot: jax.Array) -> jax.Array:
  """`A^T O`: `[G, S, d]`, `[G, S, K]` -> item features `[E, d]`."""
  return from_dense(jnp.einsum("gsk,gsd->gkd", attention, pooled), slot)


class HyperCluster(nnx.Module):
  """Edge autoencoder: hypergraph convs, GMPool over edges, unpool, convs, edge classes."""

  def __init__(self, edge_features: int, hidden: int, num_classes: int, num_seeds: int, *,
               num_convs: int = 2, cluster: bool = True, rngs: nnx.Rngs):
    self.convs = nnx.List([HypergraphConv(edge_features if i == 0 else hidden, hidden,
                                          rngs=rngs) for i in range(num_convs)])
    self.pool = GMPool(hidden, num_seeds, kv_conv="hyper", cluster=cluster, rngs=rngs)
    self.unconvs = nnx.List([HypergraphConv(hidden, hidden, rngs=rngs)
                             for _ in range(num_convs)])
    self.last = HypergraphConv(hidden, num_classes, rngs=rngs)

  def __call__(self, graph: jraph.GraphsTuple, max_edges: int) -> jax.Array:
    """Edge-class logits `[E, classes]` of a padded graph from its edge features.

    Args:
      graph: padded graph, one directed edge per bond, `edges [E, F_e]`.
      max_edges: static most real edges in one graph (the dense pooling width).
    """
    dual = dual_of_graph(graph)
    mask = padding.edge_mask(graph)
    slot, valid = dense_batch(padding.edge_graph_index(graph), mask, graph.n_node.shape[0],
                              max_edges)
    e = graph.edges
    for conv in self.convs:
      e = jax.nn.relu(conv(e, dual))
    pooled, attention = self.pool(e, dual, slot, valid)
    e = unpool(pooled, attention, slot)
    for conv in self.unconvs:
      e = jax.nn.relu(conv(e, dual))
    return self.last(e, dual)


class NodeAutoencoder(nnx.Module):
  """Baseline: node GCNs, GMPool over nodes (GCN keys/values), unpool, node GCNs, and
  bond classes decoded from the endpoint pair `[h_u + h_v, h_u * h_v]` (symmetric)."""

  def __init__(self, node_features: int, hidden: int, num_classes: int, num_seeds: int, *,
               num_convs: int = 2, cluster: bool = True, rngs: nnx.Rngs):
    self.convs = nnx.List([layers.GCNConv(node_features if i == 0 else hidden, hidden,
                                          rngs=rngs) for i in range(num_convs)])
    self.pool = GMPool(hidden, num_seeds, kv_conv="gcn", cluster=cluster, rngs=rngs)
    self.unconvs = nnx.List([layers.GCNConv(hidden, hidden, rngs=rngs)
                             for _ in range(num_convs)])
    self.edge_mlp = nnx.List([nnx.Linear(2 * hidden, hidden, rngs=rngs),
                              nnx.Linear(hidden, num_classes, rngs=rngs)])

  def __call__(self, graph: jraph.GraphsTuple, max_nodes: int) -> jax.Array:
    """Edge-class logits `[E, classes]` from node features `[N, F]` only.

    Args:
      graph: padded graph, one directed edge per bond.
      max_nodes: static most real nodes in one graph.
    """
    n = graph.n_node.shape[0]
    both = undirected(graph)
    mask = padding.node_mask(graph)
    slot, valid = dense_batch(padding.node_graph_index(graph), mask, n, max_nodes)
    x = graph.nodes
    for conv in self.convs:
      x = jax.nn.relu(conv(x, both))
    pooled, attention = self.pool(x, both, slot, valid)
    x = unpool(pooled, attention, slot)
    for conv in self.unconvs:
      x = jax.nn.relu(conv(x, both))
    hu, hv = x[graph.senders], x[graph.receivers]
    h = jax.nn.relu(self.edge_mlp[0](jnp.concatenate([hu + hv, hu * hv], axis=-1)))
    return self.edge_mlp[1](h)
