"""NCN and NCNC: neural common neighbours (with completion) for link prediction.

Paper: Xiyuan Wang, Haotong Yang, Muhan Zhang, "Neural Common Neighbor with Completion for
Link Prediction", ICLR 2024, arXiv:2302.00890. Official code: GraphPKU/NeuralCommonNeighbor
(`model.py`: `CNLinkPredictor`, `IncompleteCN1Predictor`, `CN0LinkPredictor`; `utils.py`:
`adjoverlap`, `sparsesample_reweight`; `NeighborOverlap.py`: training with target link
removal).

Method. An MPNN encodes every node, `h = MPNN(A, X)`; here the paper's default "puregcn"
(`h = Â^L (X W)` with `Â = D^-1/2 (A + I) D^-1/2`, optional residuals and a learnable
jumping-knowledge sum) or a stack of GCN layers. A target link `(i, j)` is scored by

    x   = h + MLP_x(h)                                          (optional `use_xlin`)
    z_ij = MLP_ij(h_i * h_j) + beta * MLP_cn( sum_{k in N(i) & N(j)} x_k )      (NCN)
    s_ij = MLP_out(z_ij),  beta learnable (initialised to 1),

so the common neighbours' representations are pooled, not just counted. GAE is the same
model without the CN term, `s_ij = MLP_out(MLP_ij(h_i * h_j))` (the official `cn0`).
Target link removal (TLR): while training, the batch's positive links are removed from the
adjacency seen by the encoder and by the CN sets, so a positive never explains itself.

NCNC completes the common neighbourhood of an incomplete graph with NCN's own predictions:

    sum_{k in N(i) & N(j)} x_k + sum_{k in N(i) \\ N(j)} p_jk x_k + sum_{k in N(j) \\ N(i)} p_ik x_k

where `p_jk` comes from NCN's logit `s_jk` (no gradient), recalibrated as in the official
code: `p0 = sigmoid(scale (s - offset))`, `p = alpha pt p0 / (pt p0 + 1 - p0)`. Candidates
of each side are subsampled to at most `resdeg` (8 in training, 128 in test by the class
defaults): with `c > resdeg` candidates, `resdeg` of them are drawn uniformly with
replacement and each is weighted `c / resdeg` (an unbiased estimate of the sum). NCNC2
(`depth = 2`) recurses: the inner predictions are themselves NCNC at depth 1.

Static shapes. Common neighbours use padded, sorted neighbour lists `[N, D]` (`D` = the
largest degree) with the directed edge id of every slot, instead of dense adjacency rows:
membership of `k` in `N(j)` is a binary search in row `j`, so a pair costs `O(D log D)`
rather than `O(N)`, and the completion's candidates (`[P, resdeg]` slots per side) are
directly available, which dense rows `A[i] * (1 - A[j])` would only give as `[P, N]` masks.
Removing edges (TLR, edge dropout) is a mask over edge ids: the lists never change shape.

Where this version differs from the paper or the official code:

* The paper writes the NCN pair representation as a concatenation; like the official code
  we add the two branches (`MLP_cn(.) * beta + MLP_ij(.)`) before `MLP_out`.
* In the official NCNC the inner NCN call receives `x + MLP_x(x)` as its node features,
  so the inner prediction applies `MLP_x` twice and takes `h_j, h_k` after it, and runs in
  training mode (dropout, a fresh edge dropout). Here `p_jk` is NCN's own logit on `h`
  exactly as it scores a target pair, without dropout (what the paper describes).
* Evaluation without a key uses every completion candidate when `test_resdeg` covers the
  largest degree (the demo; the official ogbl-collab command uses all candidates too);
  otherwise pass `key` to `score_pairs` to sample as the official code does at test time.
* Negatives are uniform random node pairs; pairs that are observed edges or self-pairs get
  zero weight in the loss instead of being rejected (PyG `negative_sampling`). Positives are
  drawn uniformly with replacement each step instead of in shuffled epochs.
* Not implemented: CN sampling (`cndeg`, default off), a learnable `pt` (`learnablept`,
  default off), validation edges as input (`use_valedges_as_input`, ogbl-collab).
* Parameters use Flax's default initialisers (LeCun-normal kernels, zero biases) rather
  than PyTorch's; the jumping-knowledge weights are `N(0, 1)` as in the official code.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jraph
import numpy as np
from flax import nnx

from jaxrepro.algorithms.graph import metrics
from jaxrepro.models.graph import layers

PREDICTORS = ("gae", "ncn", "ncnc")
CONVS = ("puregcn", "gcn")


# ------------------------------------------------------------------ neighbour lists (host)


class NeighborLists(NamedTuple):
  """Padded, sorted out-neighbour lists of a graph (a pytree of two int32 arrays).

  Attributes:
    neighbors: `[N, D]` int32; row `v` holds the receivers of the edges sent by `v` in
      ascending order, padded with the sentinel `N` (larger than every node id).
    edge_ids: `[N, D]` int32 directed edge id of each slot (its index in `senders`), `E`
      for padding slots, so `concat([edge_mask, [False]])[edge_ids]` masks the slots.
  """
  neighbors: jax.Array
  edge_ids: jax.Array


def neighbor_lists(senders, receivers, n_nodes: int) -> NeighborLists:
  """Builds `NeighborLists` on the host from a directed edge list.

  For an undirected graph pass every edge in both directions (`graphs.Graph.senders` /
  `receivers`: edge `e < M` as `i -> j`, edge `M + e` as `j -> i`).

  Args:
    senders: `[E]` integer senders.
    receivers: `[E]` integer receivers.
    n_nodes: number of nodes `N`.

  Returns:
    `NeighborLists` with `D = max(1, max out-degree)` (device arrays).

  Raises:
    ValueError: on mismatched shapes, ids outside `[0, N)` or duplicated edges.
  """
  senders, receivers = np.asarray(senders), np.asarray(receivers)
  if senders.ndim != 1 or senders.shape != receivers.shape:
    raise ValueError(f"senders and receivers must both be [E], got {senders.shape}, "
                     f"{receivers.shape}")
  if n_nodes < 1:
    raise ValueError(f"n_nodes={n_nodes}; must be >= 1")
  if senders.size and (min(senders.min(), receivers.min()) < 0
                       or max(senders.max(), receivers.max()) >= n_nodes):
    raise ValueError(f"senders/receivers hold node ids outside [0, n_nodes={n_nodes})")
  codes = senders.astype(np.int64) * n_nodes + receivers
  if np.unique(codes).size != codes.size:
    raise ValueError("senders/receivers hold a duplicated directed edge; CN sets need a "
                     "simple graph")
  n_edges = senders.size
  # Sort by (sender, receiver): each row is then one contiguous, ascending run.
  order = np.lexsort((receivers, senders))
  deg = np.bincount(senders, minlength=n_nodes)
  width = max(1, int(deg.max(initial=0)))
  rank = np.arange(n_edges) - np.repeat(np.cumsum(deg) - deg, deg)
  neighbors = np.full((n_nodes, width), n_nodes, np.int32)
  edge_ids = np.full((n_nodes, width), n_edges, np.int32)
  neighbors[senders[order], rank] = receivers[order]
  edge_ids[senders[order], rank] = order
  return NeighborLists(jnp.asarray(neighbors), jnp.asarray(edge_ids))


# ------------------------------------------------------------- common neighbours (jittable)


def slot_mask(lists: NeighborLists, edge_mask=None) -> jax.Array:
  """`[N, D]` bool: slots holding a real edge that `edge_mask` keeps.

  Args:
    lists: `NeighborLists` built from `E` directed edges.
    edge_mask: optional `[E]` bool over directed edge ids; False drops the edge.
  """
  real = lists.neighbors < lists.neighbors.shape[0]
  if edge_mask is None:
    return real
  edge_mask = jnp.asarray(edge_mask, bool)
  if edge_mask.ndim != 1:
    raise ValueError(f"edge_mask must be [E] bool, got shape {edge_mask.shape}")
  # The appended False is what padding slots (edge id E) read.
  return real & jnp.concatenate([edge_mask, jnp.zeros((1,), bool)])[lists.edge_ids]


def _member(queries: jax.Array, rows: jax.Array, rows_valid: jax.Array) -> jax.Array:
  """`[P, D]` bool: whether each query id occurs at a valid slot of its sorted row.

  Args:
    queries: `[P, D]` node ids (any, including the sentinel).
    rows: `[P, D]` sorted neighbour rows.
    rows_valid: `[P, D]` bool slot masks of `rows`.
  """
  pos = jax.vmap(lambda r, q: jnp.searchsorted(r, q, method="sort"))(rows, queries)
  pos = jnp.minimum(pos, rows.shape[1] - 1)
  hit = jnp.take_along_axis(rows, pos, axis=1) == queries
  # Rows hold no duplicates, so the found slot is the only candidate; a masked-out slot
  # (TLR, edge dropout) means the edge is absent.
  return hit & jnp.take_along_axis(rows_valid, pos, axis=1)


def _check_pairs(pairs: jax.Array) -> None:
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(f"pairs must have shape [P, 2], got {pairs.shape}")


def pair_neighbor_masks(lists: NeighborLists, valid: jax.Array,
                        pairs: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Common and one-sided neighbours of target pairs, as slot masks.

  Args:
    lists: `NeighborLists` (`[N, D]`).
    valid: `[N, D]` bool slot mask from `slot_mask`.
    pairs: `[P, 2]` int target pairs `(i, j)`.

  Returns:
    `(common, only_i, only_j)`, each `[P, D]` bool: `common` and `only_i` index the slots
    of `i` (`N(i) & N(j)`, `N(i) \\ N(j)`), `only_j` the slots of `j` (`N(j) \\ N(i)`).
  """
  _check_pairs(pairs)
  i, j = pairs[:, 0], pairs[:, 1]
  nb_i, nb_j = lists.neighbors[i], lists.neighbors[j]
  v_i, v_j = valid[i], valid[j]
  in_j = _member(nb_i, nb_j, v_j)
  in_i = _member(nb_j, nb_i, v_i)
  return v_i & in_j, v_i & ~in_j, v_j & ~in_i


def common_neighbor_counts(lists: NeighborLists, pairs: jax.Array,
                           edge_mask=None) -> jax.Array:
  """The CN heuristic `|N(i) & N(j)|` for each pair, `[P]` float32."""
  common, _, _ = pair_neighbor_masks(lists, slot_mask(lists, edge_mask), pairs)
  return jnp.sum(common, axis=1, dtype=jnp.float32)


def target_link_mask(edge_index: jax.Array, n_edges: int) -> jax.Array:
  """Target link removal: `[2M]` bool keeping every edge except the batch's positives.

  Args:
    edge_index: `[B]` int ids in `[0, M)` of the batch's undirected positive edges.
    n_edges: `M`, the number of undirected training edges.

  Returns:
    `[2M]` bool over directed edges in the `graphs.Graph.senders` order (`e` and `M + e`
    are the two directions of undirected edge `e`); False on both directions of each id.
  """
  keep = jnp.ones((n_edges,), bool).at[edge_index].set(False)
  return jnp.concatenate([keep, keep])


# ------------------------------------------------------------------------- completion maths


@dataclasses.dataclass(frozen=True)
class Completion:
  """Common-neighbour completion settings of NCNC (hashable: pass it static).

  Defaults are the official class defaults (`IncompleteCN1Predictor`).

  Attributes:
    depth: completion steps; 0 is NCN, 1 NCNC, 2 NCNC2.
    scale: `probscale`, the slope of the logit recalibration.
    offset: `proboffset`, the logit at which `p0 = 1/2`.
    pt: prior odds factor of the recalibration, in (0, 1].
    alpha: overall weight of completed neighbours, >= 0.
    train_resdeg: candidates kept per side in training (<= 0: all).
    test_resdeg: candidates kept per side in evaluation (<= 0: all).
  """
  depth: int = 1
  scale: float = 5.0
  offset: float = 3.0
  pt: float = 0.5
  alpha: float = 1.0
  train_resdeg: int = 8
  test_resdeg: int = 128

  def __post_init__(self):
    if self.depth < 0:
      raise ValueError(f"Completion.depth={self.depth}; must be >= 0")
    if not 0.0 < self.pt <= 1.0:
      raise ValueError(f"Completion.pt={self.pt}; must be in (0, 1]")
    if not self.alpha >= 0.0:
      raise ValueError(f"Completion.alpha={self.alpha}; must be >= 0")


def calibrate_probabilities(logits: jax.Array, scale: float, offset: float, pt: float,
                            alpha: float) -> jax.Array:
  """`alpha pt p0 / (pt p0 + 1 - p0)` with `p0 = sigmoid(scale (logits - offset))`.

  With `pt = 1` and `alpha = 1` this is `p0`; `alpha = 0` switches the completion off.
  """
  p0 = jax.nn.sigmoid(scale * (logits - offset))
  return alpha * pt * p0 / (pt * p0 + 1.0 - p0)


def sample_candidates(key: jax.Array | None, mask: jax.Array,
                      resdeg: int) -> tuple[jax.Array, jax.Array]:
  """At most `resdeg` candidate slots per row, weighted as `sparsesample_reweight`.

  A row with `c <= R` candidates keeps all of them (weight 1); a row with `c > R` gets `R`
  uniform draws with replacement among its candidates, each weighted `c / R`, so the
  weighted sum over the draws is an unbiased estimate of the full sum.

  Args:
    key: typed PRNG key; needed only when some row can exceed `R` (`resdeg < D`).
    mask: `[P, D]` bool candidate slots.
    resdeg: `R`; `<= 0` or `>= D` keeps every slot (no sampling, `R = D`).

  Returns:
    `(slots [P, R] int32, weights [P, R] float32)`; unused entries have weight 0.
  """
  width = mask.shape[1]
  if resdeg <= 0 or resdeg >= width:
    return (jnp.broadcast_to(jnp.arange(width, dtype=jnp.int32), mask.shape),
            mask.astype(jnp.float32))
  if key is None:
    raise ValueError(f"sample_candidates needs a key when resdeg={resdeg} < D={width}")
  count = jnp.sum(mask, axis=1)                                      # [P]
  # Candidate slots first, in slot order (a stable sort of the negated mask).
  order = jnp.argsort(~mask, axis=1, stable=True).astype(jnp.int32)  # [P, D]
  draws = jax.random.uniform(key, (mask.shape[0], resdeg))
  sampled = jnp.minimum((draws * count[:, None]).astype(jnp.int32), width - 1)
  first = jnp.broadcast_to(jnp.arange(resdeg, dtype=jnp.int32), sampled.shape)
  over = (count > resdeg)[:, None]
  idx = jnp.where(over, sampled, first)
  weights = jnp.where(over, (count / resdeg)[:, None].astype(jnp.float32),
                      (first < count[:, None]).astype(jnp.float32))
  return jnp.take_along_axis(order, idx, axis=1), weights


# ---------------------------------------------------------------------------------- modules


class _Dense(nnx.Module):
  """`Linear -> [LayerNorm] -> Dropout -> ReLU`, the official code's MLP block."""

  def __init__(self, d_in: int, d_out: int, *, layer_norm: bool, rngs: nnx.Rngs):
    self.linear = nnx.Linear(d_in, d_out, rngs=rngs)
    # PyTorch's LayerNorm epsilon, as in the official code.
    self.norm = nnx.LayerNorm(d_out, epsilon=1e-5, rngs=rngs) if layer_norm else None

  def __call__(self, x, rate: float, key):
    x = self.linear(x)
    if self.norm is not None:
      x = self.norm(x)
    return jax.nn.relu(layers.dropout(x, rate, key))


class _MLP(nnx.Module):
  """A chain of `_Dense` blocks and an optional final `Linear`."""

  def __init__(self, d_in: int, d_hidden: int, layer_norms, *, d_out: int | None,
               rngs: nnx.Rngs):
    dims = [d_in] + [d_hidden] * len(layer_norms)
    self.blocks = nnx.List([_Dense(dims[b], dims[b + 1], layer_norm=ln, rngs=rngs)
                            for b, ln in enumerate(layer_norms)])
    self.final = None if d_out is None else nnx.Linear(dims[-1], d_out, rngs=rngs)

  def __call__(self, x, rate: float = 0.0, key=None):
    for b, block in enumerate(self.blocks):
      x = block(x, rate, None if key is None else jax.random.fold_in(key, b))
    return x if self.final is None else self.final(x)


class Encoder(nnx.Module):
  """The MPNN of NCN: `puregcn` (input linear + parameter-free GCN steps) or `gcn`.

  `puregcn` (official `GCN` with `PureConv`): `x = Dropout_g(Linear(Dropout_x(X)))`, then
  per layer `x' = Â x` (`Dropout_t` after the last), `x <- x' + x` with `res`, and with `jk`
  the output is `sum_l w_l x_l`, `w ~ N(0, 1)` learnable. `gcn`: `Dropout_x(X)` then GCN
  layers; the first is followed by `[LayerNorm] -> Dropout_g -> ReLU`, as are the others
  except the last.

  Attributes:
    conv: `"puregcn"` or `"gcn"`; `num_layers`, `res`, `jk` as above.
    x_dropout, gnn_dropout, tail_dropout, edge_dropout: the official `xdp`, `gnndp`, `tdp`
      and `gnnedp` rates (edge dropout rescales kept edges by `1 / (1 - p)`).
  """

  def __init__(self, in_features: int, hidden: int, num_layers: int = 1, *,
               conv: str = "puregcn", layer_norm: bool = False, res: bool = False,
               jk: bool = False, x_dropout: float = 0.0, gnn_dropout: float = 0.0,
               tail_dropout: float = 0.0, edge_dropout: float = 0.0, rngs: nnx.Rngs):
    if conv not in CONVS:
      raise ValueError(f"conv={conv!r}; must be one of {CONVS}")
    if num_layers < 1:
      raise ValueError(f"num_layers={num_layers}; must be >= 1")
    for name, rate in (("x_dropout", x_dropout), ("gnn_dropout", gnn_dropout),
                       ("tail_dropout", tail_dropout), ("edge_dropout", edge_dropout)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}={rate}; must be in [0, 1)")
    self.conv, self.num_layers, self.res = conv, num_layers, res
    self.x_dropout, self.gnn_dropout = float(x_dropout), float(gnn_dropout)
    self.tail_dropout, self.edge_dropout = float(tail_dropout), float(edge_dropout)
    self.input = nnx.Linear(in_features, hidden, rngs=rngs) if conv == "puregcn" else None
    if conv == "gcn":
      dims = [in_features] + [hidden] * num_layers
      self.convs = nnx.List([layers.GCNConv(dims[k], dims[k + 1], rngs=rngs)
                             for k in range(num_layers)])
      n_norm = max(1, num_layers - 1)
      self.norms = nnx.List([nnx.LayerNorm(hidden, epsilon=1e-5, rngs=rngs)
                             for _ in range(n_norm)]) if layer_norm else None
    else:
      self.convs, self.norms = None, None
    self.jk = nnx.Param(jax.random.normal(rngs.params(), (num_layers,))) if jk else None

  def __call__(self, graph: jraph.GraphsTuple, *, edge_mask=None,
               key: jax.Array | None = None) -> jax.Array:
    """Node representations `[N, hidden]` of `graph` (`nodes` `[N, in_features]`).

    Args:
      graph: connectivity and features (every undirected edge in both directions).
      edge_mask: optional `[E]` bool; False drops the edge (target link removal).
      key: dropout key; None disables every dropout (evaluation).
    """
    keys = [None] * (3 + self.num_layers) if key is None else list(
        jax.random.split(key, 3 + self.num_layers))
    x = layers.dropout(graph.nodes, self.x_dropout, keys[0])
    if self.input is not None:
      x = layers.dropout(self.input(x), self.gnn_dropout, keys[1])
    outs = []
    for layer in range(self.num_layers):
      weight = None
      if self.edge_dropout > 0 and keys[3 + layer] is not None:
        kept = jax.random.bernoulli(keys[3 + layer], 1.0 - self.edge_dropout,
                                    graph.senders.shape)
        weight = kept / (1.0 - self.edge_dropout)
      k_l = None if key is None else jax.random.fold_in(keys[2], layer)
      if self.conv == "puregcn":
        x1 = layers.gcn_propagate(x, graph, edge_mask=edge_mask, edge_weight=weight)
        if layer == self.num_layers - 1:
          x1 = layers.dropout(x1, self.tail_dropout, k_l)
      else:
        x1 = self.convs[layer](x, graph, edge_mask=edge_mask, edge_weight=weight)
        if layer == 0 or layer < self.num_layers - 1:
          if self.norms is not None:
            x1 = self.norms[min(layer, len(self.norms) - 1)](x1)
          x1 = jax.nn.relu(layers.dropout(x1, self.gnn_dropout, k_l))
      x = x1 + x if self.res and x1.shape == x.shape else x1
      outs.append(x)
    if self.jk is None:
      return x
    return jnp.einsum("l,lnh->nh", self.jk[...], jnp.stack(outs))


class Predictor(nnx.Module):
  """The pair scorer of GAE (`"gae"`) or NCN / NCNC (`"ncn"`, `"ncnc"`: the same weights).

  Attributes:
    kind: `"gae" | "ncn" | "ncnc"`.
    xlin: `MLP_x` for the residual `x = h + MLP_x(h)` (None unless `use_xlin`).
    xcnlin: `MLP_cn` (None for GAE); `xijlin`: `MLP_ij`; `lin`: `MLP_out` -> 1 logit.
    beta: learnable scalar weight of the CN branch (None for GAE).
    dropout: the official `predp`; `edge_dropout`: `preedp` (drops CN-set edges).
  """

  def __init__(self, hidden: int, *, kind: str = "ncn", layer_norm: bool = True,
               use_xlin: bool = False, tailact: bool = False, twolayerlin: bool = False,
               beta_init: float = 1.0, dropout: float = 0.0, edge_dropout: float = 0.0,
               rngs: nnx.Rngs):
    if kind not in PREDICTORS:
      raise ValueError(f"kind={kind!r}; must be one of {PREDICTORS}")
    for name, rate in (("dropout", dropout), ("edge_dropout", edge_dropout)):
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name}={rate}; must be in [0, 1)")
    self.kind, self.dropout, self.edge_dropout = kind, float(dropout), float(edge_dropout)
    ln = layer_norm
    tail = None if tailact else hidden
    self.xijlin = _MLP(hidden, hidden, [ln], d_out=tail, rngs=rngs)
    self.lin = _MLP(hidden, hidden, [ln, ln] if twolayerlin else [ln], d_out=1, rngs=rngs)
    if kind == "gae":
      self.xcnlin, self.xlin, self.beta = None, None, None
    else:
      self.xcnlin = _MLP(hidden, hidden, [False, ln], d_out=tail, rngs=rngs)
      self.xlin = _MLP(hidden, hidden, [False, ln], d_out=None, rngs=rngs) if use_xlin \
          else None
      self.beta = nnx.Param(jnp.full((), beta_init, jnp.float32))


class LinkModel(nnx.Module):
  """Encoder plus predictor; use it through `encode`, `pair_logits` and `link_loss`."""

  def __init__(self, in_features: int, hidden: int, *, predictor: str = "ncn",
               encoder_kwargs: dict | None = None, predictor_kwargs: dict | None = None,
               rngs: nnx.Rngs):
    self.encoder = Encoder(in_features, hidden, **(encoder_kwargs or {}), rngs=rngs)
    self.predictor = Predictor(hidden, kind=predictor, **(predictor_kwargs or {}), rngs=rngs)


# ------------------------------------------------------------------ functional core (pure)


def encode(model: LinkModel, graph: jraph.GraphsTuple, *, edge_mask=None,
           key: jax.Array | None = None) -> jax.Array:
  """`h = MPNN(A, X)`: `[N, hidden]` float32 (see `Encoder.__call__`)."""
  return model.encoder(graph, edge_mask=edge_mask, key=key)


def _pair_logits(pred: Predictor, h, x_pad, lists, valid, pairs, *, completion, depth,
                 resdeg, dropout_key, sample_key):
  """Recursive scorer; `depth > 0` completes the CN set with depth-1 predictions.

  `dropout_key` (None: no dropout) drives the MLP dropouts of this level only; the inner
  predictions that weight completed neighbours run without dropout and only draw their
  own candidate samples (NCNC2) from `sample_key`.
  """
  i, j = pairs[:, 0], pairs[:, 1]
  rate = pred.dropout if dropout_key is not None else 0.0

  def mlp_key(b):
    return None if dropout_key is None else jax.random.fold_in(dropout_key, b)

  z = pred.xijlin(h[i] * h[j], rate, mlp_key(0))
  if pred.kind != "gae":
    common, only_i, only_j = pair_neighbor_masks(lists, valid, pairs)
    nb_i, nb_j = lists.neighbors[i], lists.neighbors[j]
    xcn = jnp.einsum("pd,pdh->ph", common.astype(h.dtype), x_pad[nb_i])
    if depth > 0:
      k1, k2, k_inner = ((None,) * 3 if sample_key is None
                         else jax.random.split(sample_key, 3))
      slots_i, w_i = sample_candidates(k1, only_i, resdeg)             # [P, R]
      slots_j, w_j = sample_candidates(k2, only_j, resdeg)
      cand_i = jnp.take_along_axis(nb_i, slots_i, axis=1)              # k in N(i) \ N(j)
      cand_j = jnp.take_along_axis(nb_j, slots_j, axis=1)              # k in N(j) \ N(i)
      r = cand_i.shape[1]
      # p_jk for k in N(i) \ N(j) and p_ik for k in N(j) \ N(i). Padding candidates (the
      # sentinel N) are clamped to a real node for the inner call and weighted 0 below.
      n = lists.neighbors.shape[0]
      inner = jnp.concatenate([
          jnp.stack([jnp.repeat(j, r), jnp.minimum(cand_i, n - 1).reshape(-1)], axis=1),
          jnp.stack([jnp.repeat(i, r), jnp.minimum(cand_j, n - 1).reshape(-1)], axis=1)])
      logits = jax.lax.stop_gradient(_pair_logits(
          pred, h, x_pad, lists, valid, inner, completion=completion, depth=depth - 1,
          resdeg=resdeg, dropout_key=None, sample_key=k_inner))
      c = completion
      prob = calibrate_probabilities(logits, c.scale, c.offset, c.pt, c.alpha)
      p_i = prob[:i.shape[0] * r].reshape(-1, r) * w_i
      p_j = prob[i.shape[0] * r:].reshape(-1, r) * w_j
      xcn = (xcn + jnp.einsum("pr,prh->ph", p_i, x_pad[cand_i])
             + jnp.einsum("pr,prh->ph", p_j, x_pad[cand_j]))
    z = z + pred.xcnlin(xcn, rate, mlp_key(1)) * pred.beta[...]
  return pred.lin(z, rate, mlp_key(2))[:, 0]


def pair_logits(model: LinkModel, h: jax.Array, lists: NeighborLists, pairs: jax.Array, *,
                valid: jax.Array | None = None, completion: Completion | None = None,
                training: bool = False, key: jax.Array | None = None) -> jax.Array:
  """Link logits of target pairs from node representations.

  Args:
    model: a `LinkModel` (or its merged copy inside a jitted function).
    h: `[N, H]` float node representations from `encode`.
    lists: `NeighborLists` of the graph the CN sets are read from.
    pairs: `[P, 2]` int target pairs.
    valid: `[N, D]` bool slot mask (`slot_mask`; default: every real slot).
    completion: settings of NCNC (required for `predictor="ncnc"`, ignored otherwise).
    training: apply the predictor's dropout and use `completion.train_resdeg` (else no
      dropout and `test_resdeg`).
    key: dropout and candidate-sampling key; None disables both (evaluation). NCNC needs
      it whenever a row has more candidates than the active `resdeg`.

  Returns:
    `[P]` float32 logits. GAE ignores `lists`; NCN uses the CN sum; NCNC completes it
    with NCN's stop-gradient predictions on the candidate pairs.
  """
  _check_pairs(pairs)
  pred = model.predictor
  if pred.kind == "ncnc" and completion is None:
    raise ValueError("predictor 'ncnc' needs completion=Completion(...)")
  n = h.shape[0]
  if lists.neighbors.shape[0] != n:
    raise ValueError(f"h has {n} rows but the neighbour lists have "
                     f"{lists.neighbors.shape[0]} nodes")
  valid = slot_mask(lists) if valid is None else valid
  x_pad = None
  k_drop, k_sample = (None, None) if key is None else jax.random.split(key)
  if not training:
    k_drop = None
  if pred.kind != "gae":
    x = h
    if pred.xlin is not None:
      k_x = None if k_drop is None else jax.random.fold_in(k_drop, 7)
      x = h + pred.xlin(h, pred.dropout if k_drop is not None else 0.0, k_x)
    # A zero row for the sentinel id N, so padding slots gather zeros.
    x_pad = jnp.concatenate([x, jnp.zeros((1, x.shape[1]), x.dtype)])
  depth = completion.depth if pred.kind == "ncnc" else 0
  resdeg = 0
  if depth > 0:
    resdeg = completion.train_resdeg if training else completion.test_resdeg
  return _pair_logits(pred, h, x_pad, lists, valid, pairs, completion=completion,
                      depth=depth, resdeg=resdeg, dropout_key=k_drop, sample_key=k_sample)


def sample_link_batch(key: jax.Array, train_edges: jax.Array, n_nodes: int,
                      batch_size: int) -> dict[str, jax.Array]:
  """Uniform positive edges (with replacement) and uniform random negative pairs.

  Args:
    key: typed PRNG key.
    train_edges: `[M, 2]` int32 undirected training edges.
    n_nodes: number of nodes `N`.
    batch_size: `B` positives and `B` negatives.

  Returns:
    `{"pos_ids": [B] int32 edge ids, "pos": [B, 2], "neg": [B, 2]}` (int32). Negatives
    are never self-pairs; they may be edges (see `link_loss`).
  """
  if batch_size < 1 or n_nodes < 2:
    raise ValueError(f"batch_size={batch_size} >= 1 and n_nodes={n_nodes} >= 2 required")
  k_pos, k_a, k_b = jax.random.split(key, 3)
  ids = jax.random.randint(k_pos, (batch_size,), 0, train_edges.shape[0], jnp.int32)
  a = jax.random.randint(k_a, (batch_size,), 0, n_nodes, jnp.int32)
  # b = a + U{1..N-1} mod N is uniform over the other nodes.
  b = (a + jax.random.randint(k_b, (batch_size,), 1, n_nodes, jnp.int32)) % n_nodes
  return {"pos_ids": ids, "pos": train_edges[ids].astype(jnp.int32),
          "neg": jnp.stack([a, b], axis=1)}


def link_loss(model: LinkModel, graph: jraph.GraphsTuple, lists: NeighborLists,
              batch: dict[str, jax.Array], key: jax.Array, *,
              completion: Completion | None = None,
              target_link_removal: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`-mean log s(pos) - mean log s(-neg)` with target link removal.

  Args:
    model: the (merged) `LinkModel`.
    graph: the training graph, every undirected edge `e < M` as `e` and `M + e`.
    lists: `neighbor_lists(graph.senders, graph.receivers, N)`.
    batch: `sample_link_batch` output.
    key: dropout / sampling key.
    completion: NCNC settings (for `predictor="ncnc"`).
    target_link_removal: drop the batch positives from the encoder's graph and the CN sets.

  Returns:
    `(loss, aux)` with float32 scalars `pos_loss`, `neg_loss`, `neg_used` (share of
    negatives that are non-edges and count in the loss).
  """
  n_directed = graph.senders.shape[0]
  if n_directed % 2:
    raise ValueError(f"graph has {n_directed} directed edges; need both directions of "
                     "every undirected edge")
  edge_mask = (target_link_mask(batch["pos_ids"], n_directed // 2)
               if target_link_removal else None)
  k_enc, k_pred, k_edge = jax.random.split(key, 3)
  h = encode(model, graph, edge_mask=edge_mask, key=k_enc)
  valid = slot_mask(lists, edge_mask)
  rate = model.predictor.edge_dropout
  if rate > 0:
    keep = jax.random.bernoulli(k_edge, 1.0 - rate, (n_directed + 1,))
    valid = valid & keep[lists.edge_ids]
  pairs = jnp.concatenate([batch["pos"], batch["neg"]])
  logits = pair_logits(model, h, lists, pairs, valid=valid, completion=completion,
                       training=True, key=k_pred)
  b = batch["pos"].shape[0]
  # A sampled "negative" that is an observed edge would teach the model the wrong label.
  is_edge = _member(batch["neg"][:, 1:2], lists.neighbors[batch["neg"][:, 0]],
                    slot_mask(lists)[batch["neg"][:, 0]])[:, 0]
  neg_ok = ~is_edge
  ones = jnp.ones((b,), jnp.float32)
  pos_loss = metrics.masked_binary_cross_entropy(logits[:b], ones)
  neg_loss = metrics.masked_binary_cross_entropy(logits[b:], 0.0 * ones, neg_ok)
  loss = pos_loss + neg_loss
  return loss, {"pos_loss": pos_loss, "neg_loss": neg_loss,
                "neg_used": jnp.mean(neg_ok.astype(jnp.float32))}


def score_pairs(model: LinkModel, graph: jraph.GraphsTuple, lists: NeighborLists,
                pairs: jax.Array, *, completion: Completion | None = None,
                chunk: int = 1024, key: jax.Array | None = None) -> jax.Array:
  """Evaluation logits of many pairs, `chunk` pairs at a time (jittable).

  The encoder runs once on the full graph without dropout; pairs are padded to a multiple
  of `chunk` and scored with `lax.map`, which bounds the memory of NCNC's candidates.

  Args:
    model, graph, lists, completion: as in `link_loss` / `pair_logits`.
    pairs: `[P, 2]` int target pairs.
    chunk: pairs per `lax.map` step.
    key: NCNC candidate-sampling key, needed only when `completion.test_resdeg` is
      below the largest degree (the official test-time sampling); no dropout is applied.

  Returns:
    `[P]` float32 logits.
  """
  _check_pairs(pairs)
  if chunk < 1:
    raise ValueError(f"chunk={chunk}; must be >= 1")
  h = encode(model, graph)
  valid = slot_mask(lists)
  p = pairs.shape[0]
  n_chunks = -(-p // chunk)
  padded = jnp.zeros((n_chunks * chunk, 2), pairs.dtype).at[:p].set(pairs)
  keys = (jnp.zeros((n_chunks,), bool) if key is None  # unused placeholders
          else jax.random.split(key, n_chunks))
  out = jax.lax.map(lambda a: pair_logits(model, h, lists, a[0], valid=valid,
                                          completion=completion,
                                          key=None if key is None else a[1]),
                    (padded.reshape(n_chunks, chunk, 2), keys))
  return out.reshape(-1)[:p]
