"""Message-passing layers (GCN, GIN, GAT, GraphSAGE) on padded jraph graphs, and a small stack.

Every layer maps node features `x: [N, F]` and the connectivity of a `jraph.GraphsTuple`
(`senders`, `receivers`: `[E]`, an edge `s -> r` carries a message from `s` to `r`) to
`[N, F']`. Write `N(i)` for the senders of the edges received by `i` and `w_e` for an
optional per-edge weight (`edge_weight`, default 1) times an optional `edge_mask`.

* GCN (Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks",
  ICLR 2017, arXiv:1609.02907):
  `H' = D^-1/2 (A + c I) D^-1/2 H W + b`, `D_ii = c + sum_{e: r_e = i} w_e`, with
  self-loop weight `c` (1 in the paper; STABLE uses 2). `gcn_propagate` is the
  parameter-free `Â H`.
* GIN (Xu, Hu, Leskovec & Jegelka, "How Powerful are Graph Neural Networks?", ICLR 2019,
  arXiv:1810.00826): `h_i' = MLP((1 + eps) h_i + sum_{j in N(i)} w_e h_j)`, learnable `eps`
  (GIN-eps) or fixed (GIN-0).
* GAT (Velickovic et al., "Graph Attention Networks", ICLR 2018, arXiv:1710.10903), head k:
  `e_ij = LeakyReLU_0.2(a_k^T [W_k h_i || W_k h_j])`, `alpha_ij = softmax_{j in N(i) + {i}}(e_ij)`,
  `h_i' = ||_k sum_j alpha_ij W_k h_j` (heads concatenated; averaged for an output layer).
  The softmax is `jraph.segment_softmax` over each node's incoming edges; masked edges get
  zero attention, and a node whose incoming edges are all masked gets 0 (+ bias), not NaN.
* GraphSAGE-mean (Hamilton, Ying & Leskovec, "Inductive Representation Learning on Large
  Graphs", NeurIPS 2017, arXiv:1706.02216):
  `h_i' = W_self h_i + W_neigh mean_{j in N(i)} h_j + b` (the paper's `W [h_i || mean]`),
  optionally L2-normalised; a node without neighbours aggregates 0.

Padding. Layers need no masks for graphs padded by `padding.pad_graph`: every padding edge
is a self-loop on a padding node, so real nodes never receive padding messages. Readouts
(`pool_nodes`), losses and metrics must use the masks of `padding`. `edge_mask` /
`edge_weight` exist to drop or reweight real edges (target-link removal, attacks, refined
adjacencies) without changing static shapes.

`GNN` stacks one kind of layer for node classification (last layer emits the logits, as in
the GCN and GAT papers) or graph classification (masked `sum | mean | max` pooling and a
linear head). Dropout is applied only when a `key` is passed, which keeps the modules pure
for `nnx.split` / `jax.jit` / `nnx.merge` training steps.

Differences from the papers: degrees for GCN normalisation are weighted in-degrees (the
PyG convention; equal to Kipf's for symmetric graphs); GIN's MLP is Linear-ReLU-Linear
without batch norm (batch statistics would need masking); GraphSAGE uses the full
neighbourhood (no neighbour sampling); the stack has no jumping-knowledge readout.
"""

import jax
import jax.numpy as jnp
import jraph
from flax import nnx

from jaxrepro.models.graph import padding

CONVS = ("gcn", "gin", "gat", "sage")
POOLINGS = ("sum", "mean", "max")
TASKS = ("node", "graph")
ACTIVATIONS = {"relu": jax.nn.relu, "elu": jax.nn.elu, "gelu": jax.nn.gelu,
               "tanh": jnp.tanh, "identity": lambda x: x}


def _edge_weight(graph: jraph.GraphsTuple, edge_mask, edge_weight, dtype) -> jax.Array:
  """`[E]` weights: `edge_weight` (default 1) with masked edges set to 0."""
  n_edge = graph.senders.shape[0]
  w = jnp.ones((n_edge,), dtype) if edge_weight is None else jnp.asarray(edge_weight, dtype)
  if w.shape != (n_edge,):
    raise ValueError(f"edge_weight must have shape [E]=({n_edge},), got {w.shape}")
  if edge_mask is not None:
    if jnp.shape(edge_mask) != (n_edge,):
      raise ValueError(f"edge_mask must have shape [E]=({n_edge},), got {jnp.shape(edge_mask)}")
    w = jnp.where(edge_mask, w, jnp.zeros((), dtype))
  return w


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; the identity when `key` is None or `rate` is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros((), x.dtype))


def gcn_propagate(x: jax.Array, graph: jraph.GraphsTuple, *, edge_mask=None, edge_weight=None,
                  self_loop_weight: float = 1.0, normalize: bool = True) -> jax.Array:
  """Parameter-free GCN propagation `Â x` with `Â = D^-1/2 (A + c I) D^-1/2`.

  Args:
    x: `[N, F]` float node features.
    graph: connectivity; `senders`, `receivers` `[E]` int.
    edge_mask: optional `[E]` bool; False drops the edge.
    edge_weight: optional `[E]` float entries of `A` (default 1).
    self_loop_weight: `c`, the weight of the added self-loops (0 adds none).
    normalize: if False, return `(A + c I) x` without the degree normalisation.

  Returns:
    `[N, F]`, dtype of `x`. Nodes with zero degree (no edges, `c = 0`) get 0.
  """
  n = x.shape[0]
  w = _edge_weight(graph, edge_mask, edge_weight, x.dtype)
  s, r = graph.senders, graph.receivers
  if normalize:
    deg = jax.ops.segment_sum(w, r, n) + self_loop_weight
    # Isolated nodes without self-loops have degree 0: give them 0, not inf.
    inv_sqrt = jnp.where(deg > 0, jax.lax.rsqrt(jnp.maximum(deg, 1e-30)), 0.0)
    coef = w * inv_sqrt[s] * inv_sqrt[r]
    self_coef = self_loop_weight * jnp.square(inv_sqrt)
  else:
    coef, self_coef = w, jnp.full((n,), self_loop_weight, x.dtype)
  out = jax.ops.segment_sum(x[s] * coef[:, None], r, n)
  return out + x * self_coef[:, None]


class GCNConv(nnx.Module):
  """Graph convolution `Â x W + b` (Kipf & Welling 2017).

  Attributes:
    linear: `Linear(in_features, out_features)` applied before propagation (cheaper when
      the output is narrower); its bias is added after propagation, as in the paper.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               self_loop_weight: float = 1.0, normalize: bool = True, rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_features, out_features, use_bias=False, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((out_features,))) if use_bias else None
    self.self_loop_weight = float(self_loop_weight)
    self.normalize = normalize

  def __call__(self, x: jax.Array, graph: jraph.GraphsTuple, *, edge_mask=None,
               edge_weight=None) -> jax.Array:
    """`[N, F_in]` -> `[N, F_out]`; see `gcn_propagate` for the masks and weights."""
    h = gcn_propagate(self.linear(x), graph, edge_mask=edge_mask, edge_weight=edge_weight,
                      self_loop_weight=self.self_loop_weight, normalize=self.normalize)
    return h if self.bias is None else h + self.bias[...]


class GINConv(nnx.Module):
  """Graph isomorphism layer `MLP((1 + eps) x_i + sum_j w_e x_j)` (Xu et al. 2019).

  Attributes:
    eps: scalar `nnx.Param` when `train_eps`, else a fixed float.
    mlp_in, mlp_out: the two linear layers of the MLP (ReLU between them).
  """

  def __init__(self, in_features: int, out_features: int, hidden_features: int | None = None,
               *, train_eps: bool = True, eps: float = 0.0, rngs: nnx.Rngs):
    hidden = out_features if hidden_features is None else hidden_features
    self.mlp_in = nnx.Linear(in_features, hidden, rngs=rngs)
    self.mlp_out = nnx.Linear(hidden, out_features, rngs=rngs)
    self.eps = nnx.Param(jnp.asarray(eps, jnp.float32)) if train_eps else float(eps)

  def __call__(self, x: jax.Array, graph: jraph.GraphsTuple, *, edge_mask=None,
               edge_weight=None) -> jax.Array:
    """`[N, F_in]` -> `[N, F_out]`."""
    w = _edge_weight(graph, edge_mask, edge_weight, x.dtype)
    agg = jax.ops.segment_sum(x[graph.senders] * w[:, None], graph.receivers, x.shape[0])
    eps = self.eps[...] if isinstance(self.eps, nnx.Param) else self.eps
    return self.mlp_out(jax.nn.relu(self.mlp_in((1.0 + eps) * x + agg)))


class GATConv(nnx.Module):
  """Multi-head graph attention (Velickovic et al. 2018).

  Attributes:
    linear: shared `Linear(in_features, heads * out_features)`, no bias.
    att_src, att_dst: `[heads, out_features]` halves of the attention vector `a`.
    bias: `[heads * out_features]` (concat) or `[out_features]` (mean) `nnx.Param`.
  """

  def __init__(self, in_features: int, out_features: int, heads: int = 1, *,
               concat: bool = True, add_self_loops: bool = True, negative_slope: float = 0.2,
               attention_dropout: float = 0.0, rngs: nnx.Rngs):
    if heads < 1:
      raise ValueError(f"heads={heads}; must be >= 1")
    if not 0.0 <= attention_dropout < 1.0:
      raise ValueError(f"attention_dropout={attention_dropout}; must be in [0, 1)")
    self.heads, self.out_features, self.concat = heads, out_features, concat
    self.add_self_loops, self.negative_slope = add_self_loops, float(negative_slope)
    self.attention_dropout = float(attention_dropout)
    self.linear = nnx.Linear(in_features, heads * out_features, use_bias=False, rngs=rngs)
    init = nnx.initializers.glorot_uniform()
    self.att_src = nnx.Param(init(rngs.params(), (heads, out_features)))
    self.att_dst = nnx.Param(init(rngs.params(), (heads, out_features)))
    self.bias = nnx.Param(jnp.zeros((heads * out_features if concat else out_features,)))

  def __call__(self, x: jax.Array, graph: jraph.GraphsTuple, *, edge_mask=None,
               key: jax.Array | None = None, return_attention: bool = False):
    """Attention-weighted aggregation.

    Args:
      x: `[N, F_in]` float node features.
      graph: connectivity (`senders`, `receivers` `[E]`).
      edge_mask: optional `[E]` bool; False edges get zero attention.
      key: dropout key for the attention coefficients (None: no dropout).
      return_attention: also return the coefficients.

    Returns:
      `[N, heads * F_out]` (concat) or `[N, F_out]`; with `return_attention`, also
      `(alpha [E', heads], senders [E'], receivers [E'])`, where the `N` self-loops (if
      added) follow the `E` edges. Over each node's unmasked incoming edges alpha sums to 1.
    """
    n = x.shape[0]
    h = self.linear(x).reshape(n, self.heads, self.out_features)
    s, r = graph.senders, graph.receivers
    mask = jnp.ones(s.shape, bool) if edge_mask is None else jnp.asarray(edge_mask, bool)
    if mask.shape != s.shape:
      raise ValueError(f"edge_mask must have shape [E]={s.shape}, got {mask.shape}")
    if self.add_self_loops:
      loops = jnp.arange(n, dtype=s.dtype)
      s, r = jnp.concatenate([s, loops]), jnp.concatenate([r, loops])
      mask = jnp.concatenate([mask, jnp.ones((n,), bool)])
    score_src = jnp.sum(h * self.att_src[...], axis=-1)                 # [N, H]
    score_dst = jnp.sum(h * self.att_dst[...], axis=-1)
    logits = jax.nn.leaky_relu(score_src[s] + score_dst[r], self.negative_slope)
    # A finite floor instead of -inf: a node whose incoming edges are all masked then gets
    # a uniform softmax (not 0/0 = NaN), which the multiplication by the mask zeroes.
    logits = jnp.where(mask[:, None], logits, jnp.finfo(logits.dtype).min)
    alpha = jraph.segment_softmax(logits, r, n) * mask[:, None]
    alpha_used = dropout(alpha, self.attention_dropout, key)
    out = jax.ops.segment_sum(alpha_used[..., None] * h[s], r, n)       # [N, H, C]
    out = out.reshape(n, -1) if self.concat else jnp.mean(out, axis=1)
    out = out + self.bias[...]
    return (out, (alpha, s, r)) if return_attention else out


class SAGEConv(nnx.Module):
  """GraphSAGE layer with the mean aggregator (Hamilton et al. 2017).

  Attributes:
    lin_self: `Linear(in_features, out_features)` on the node itself (carries the bias).
    lin_neigh: `Linear(in_features, out_features)`, no bias, on the neighbour mean.
  """

  def __init__(self, in_features: int, out_features: int, *, normalize: bool = False,
               rngs: nnx.Rngs):
    self.lin_self = nnx.Linear(in_features, out_features, rngs=rngs)
    self.lin_neigh = nnx.Linear(in_features, out_features, use_bias=False, rngs=rngs)
    self.normalize = normalize

  def __call__(self, x: jax.Array, graph: jraph.GraphsTuple, *, edge_mask=None,
               edge_weight=None) -> jax.Array:
    """`[N, F_in]` -> `[N, F_out]`; the mean is weighted by `edge_weight` if given."""
    n = x.shape[0]
    w = _edge_weight(graph, edge_mask, edge_weight, x.dtype)
    total = jax.ops.segment_sum(x[graph.senders] * w[:, None], graph.receivers, n)
    count = jax.ops.segment_sum(w, graph.receivers, n)
    # No (unmasked) neighbours: aggregate 0 rather than 0/0.
    mean = total / jnp.where(count > 0, count, 1.0)[:, None]
    out = self.lin_self(x) + self.lin_neigh(mean)
    if self.normalize:
      out = out / jnp.maximum(jnp.linalg.norm(out, axis=-1, keepdims=True), 1e-12)
    return out


def pool_nodes(x: jax.Array, graph: jraph.GraphsTuple, kind: str = "mean") -> jax.Array:
  """Masked per-graph readout of node features.

  Args:
    x: `[N, F]` node features of a padded graph.
    graph: the padded graph (`n_node` `[G]`).
    kind: `"sum" | "mean" | "max"`.

  Returns:
    `[G, F]`; padding nodes never contribute, and graphs without real nodes (padding
    graphs, empty graphs) read out 0 for every kind.
  """
  if kind not in POOLINGS:
    raise ValueError(f"kind={kind!r}; must be one of {POOLINGS}")
  n, n_graph = x.shape[0], graph.n_node.shape[0]
  seg = padding.node_graph_index(graph, n)
  real = padding.node_mask(graph, n)
  if kind == "max":
    pooled = jax.ops.segment_max(jnp.where(real[:, None], x, -jnp.inf), seg, n_graph)
    # Empty segments give -inf; replace them so padding graphs stay finite.
    return jnp.where(jnp.isneginf(pooled), 0.0, pooled).astype(x.dtype)
  total = jax.ops.segment_sum(jnp.where(real[:, None], x, 0.0), seg, n_graph)
  if kind == "sum":
    return total
  count = jax.ops.segment_sum(real.astype(x.dtype), seg, n_graph)
  return total / jnp.maximum(count, 1.0)[:, None]


class GNN(nnx.Module):
  """A stack of one kind of message-passing layer for node or graph classification.

  Node task: `num_layers` convolutions `in -> hidden -> ... -> out`, activation and
  dropout between layers (dropout also on the input, as in the GCN and GAT papers);
  returns `[N, out]` logits. Graph task: `num_layers` convolutions `in -> hidden`, each
  followed by the activation, then masked `pooling` and a linear head; returns `[G, out]`.

  For GAT, hidden layers have `heads` concatenated heads of `hidden_features // heads`
  features; the node-task output layer averages `output_heads` heads.

  Attributes:
    convs: the `nnx.List` of layers; `head` is the graph-task `Linear` (None for nodes).
  """

  def __init__(self, conv: str, in_features: int, hidden_features: int, out_features: int,
               num_layers: int = 2, *, task: str = "node", pooling: str = "mean",
               activation: str = "relu", dropout_rate: float = 0.0, heads: int = 1,
               output_heads: int = 1, attention_dropout: float = 0.0,
               self_loop_weight: float = 1.0, gin_train_eps: bool = True,
               sage_normalize: bool = False, rngs: nnx.Rngs):
    if conv not in CONVS:
      raise ValueError(f"conv={conv!r}; must be one of {CONVS}")
    if task not in TASKS:
      raise ValueError(f"task={task!r}; must be one of {TASKS}")
    if pooling not in POOLINGS:
      raise ValueError(f"pooling={pooling!r}; must be one of {POOLINGS}")
    if activation not in ACTIVATIONS:
      raise ValueError(f"activation={activation!r}; must be one of {tuple(ACTIVATIONS)}")
    if num_layers < 1:
      raise ValueError(f"num_layers={num_layers}; must be >= 1")
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f"dropout_rate={dropout_rate}; must be in [0, 1)")
    if conv == "gat" and hidden_features % heads:
      raise ValueError(f"hidden_features={hidden_features} must be divisible by "
                       f"heads={heads} for conv='gat'")
    self.conv, self.task, self.pooling = conv, task, pooling
    self.activation, self.dropout_rate = activation, float(dropout_rate)
    dims = [in_features] + [hidden_features] * num_layers
    if task == "node":
      dims[-1] = out_features
    layers = []
    for i in range(num_layers):
      d_in, d_out = dims[i], dims[i + 1]
      last_node_layer = task == "node" and i == num_layers - 1
      if conv == "gcn":
        layer = GCNConv(d_in, d_out, self_loop_weight=self_loop_weight, rngs=rngs)
      elif conv == "gin":
        layer = GINConv(d_in, d_out, train_eps=gin_train_eps, rngs=rngs)
      elif conv == "sage":
        layer = SAGEConv(d_in, d_out, normalize=sage_normalize and not last_node_layer,
                         rngs=rngs)
      elif last_node_layer:
        layer = GATConv(d_in, d_out, output_heads, concat=False,
                        attention_dropout=attention_dropout, rngs=rngs)
      else:
        layer = GATConv(d_in, d_out // heads, heads, attention_dropout=attention_dropout,
                        rngs=rngs)
      layers.append(layer)
    self.convs = nnx.List(layers)
    self.head = nnx.Linear(hidden_features, out_features, rngs=rngs) if task == "graph" else None

  def __call__(self, graph: jraph.GraphsTuple, *, edge_mask=None, edge_weight=None,
               key: jax.Array | None = None) -> jax.Array:
    """Logits for the nodes (`[N, out]`) or graphs (`[G, out]`) of `graph`.

    Args:
      graph: padded graph with `nodes` `[N, in_features]` float.
      edge_mask: optional `[E]` bool passed to every layer.
      edge_weight: optional `[E]` float for GCN/GIN/SAGE (GAT raises ValueError).
      key: dropout key; None disables dropout (evaluation).
    """
    if self.conv == "gat" and edge_weight is not None:
      raise ValueError("edge_weight is not supported by conv='gat'; use edge_mask")
    act = ACTIVATIONS[self.activation]
    x = graph.nodes
    n_layers = len(self.convs)
    for i, layer in enumerate(self.convs):
      k_in, k_att = (None, None) if key is None else jax.random.split(
          jax.random.fold_in(key, i))
      if self.task == "node":
        x = dropout(x, self.dropout_rate, k_in)
      if self.conv == "gat":
        x = layer(x, graph, edge_mask=edge_mask, key=k_att)
      else:
        x = layer(x, graph, edge_mask=edge_mask, edge_weight=edge_weight)
      if self.task == "graph" or i < n_layers - 1:
        x = act(x)
    if self.task == "node":
      return x
    pooled = pool_nodes(x, graph, self.pooling)
    k_head = None if key is None else jax.random.fold_in(key, n_layers)
    return self.head(dropout(pooled, self.dropout_rate, k_head))
