"""GCN, GIN, GAT and GraphSAGE layers against dense-adjacency formulas; padding invariance."""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrepro.algorithms.graph import metrics
from jaxrepro.models.graph import layers, padding

_N, _F = 7, 5


def _directed_graph(seed=0, n=_N, p=0.35):
  """A random directed graph without duplicate edges or self-loops, plus features."""
  rng = np.random.default_rng(seed)
  dense = (rng.random((n, n)) < p) & ~np.eye(n, dtype=bool)
  dense[:, n - 1] = dense[n - 1, :] = False  # An isolated node.
  receivers, senders = np.nonzero(dense)      # dense[r, s]: edge s -> r
  x = rng.normal(size=(n, _F)).astype(np.float32)
  graph = jraph.GraphsTuple(
      nodes=x, edges=None, globals=None, senders=senders.astype(np.int32),
      receivers=receivers.astype(np.int32), n_node=np.array([n], np.int32),
      n_edge=np.array([senders.size], np.int32))
  return graph, x.astype(np.float64)


def _dense_adj(graph, weight=None):
  """`A[r, s]` = total weight of edges `s -> r` (float64)."""
  w = np.ones(graph.senders.size) if weight is None else np.asarray(weight, np.float64)
  a = np.zeros((_N, _N))
  np.add.at(a, (graph.receivers, graph.senders), w)
  return a


def _np(p):
  return np.asarray(p[...], np.float64)


@pytest.mark.parametrize("self_loop_weight", [1.0, 2.0, 0.0])
def test_gcn_equals_dense_normalised_adjacency(self_loop_weight):
  graph, x = _directed_graph(0)
  rng = np.random.default_rng(1)
  weight = rng.uniform(0.5, 2.0, graph.senders.size).astype(np.float32)
  mask = rng.random(graph.senders.size) < 0.8
  layer = layers.GCNConv(_F, 4, self_loop_weight=self_loop_weight, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.arange(4.0)
  out = jax.jit(lambda x, g, m, w: layer(x, g, edge_mask=m, edge_weight=w))(
      graph.nodes, graph, mask, weight)
  a = _dense_adj(graph, weight * mask) + self_loop_weight * np.eye(_N)
  deg = a.sum(1)
  inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
  a_hat = inv[:, None] * a * inv[None, :]
  expected = a_hat @ x @ _np(layer.linear.kernel) + np.arange(4.0)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  if self_loop_weight == 0.0:
    np.testing.assert_allclose(out[_N - 1], np.arange(4.0))  # Isolated: 0 + bias, finite.
  raw = layers.gcn_propagate(graph.nodes, graph, normalize=False)
  np.testing.assert_allclose(raw, (_dense_adj(graph) + np.eye(_N)) @ x, rtol=1e-5, atol=1e-5)


def test_gcn_matches_jraph_graph_convolution_on_symmetric_graphs():
  graph, _ = _directed_graph(2)
  sym = graph._replace(senders=np.concatenate([graph.senders, graph.receivers]),
                       receivers=np.concatenate([graph.receivers, graph.senders]))
  a = _dense_adj(sym)
  keep = np.nonzero(a)  # Drop duplicates created by symmetrising.
  sym = sym._replace(senders=keep[1].astype(np.int32), receivers=keep[0].astype(np.int32))
  ours = layers.gcn_propagate(sym.nodes, sym)
  theirs = jraph.GraphConvolution(lambda v: v, add_self_edges=True)(sym).nodes
  np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("train_eps", [True, False])
def test_gin_equals_dense_sum_aggregation(train_eps):
  graph, x = _directed_graph(3)
  layer = layers.GINConv(_F, 3, hidden_features=6, train_eps=train_eps, eps=0.25,
                         rngs=nnx.Rngs(1))
  weight = np.random.default_rng(4).uniform(0, 2, graph.senders.size).astype(np.float32)
  out = layer(graph.nodes, graph, edge_weight=weight)
  h = 1.25 * x + _dense_adj(graph, weight) @ x
  h = np.maximum(h @ _np(layer.mlp_in.kernel) + _np(layer.mlp_in.bias), 0.0)
  expected = h @ _np(layer.mlp_out.kernel) + _np(layer.mlp_out.bias)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  assert isinstance(layer.eps, nnx.Param) == train_eps


def _dense_gat(layer, graph, x, mask, self_loops):
  """Per head: masked row softmax of LeakyReLU(a_dst.h_r + a_src.h_s) over in-neighbours."""
  heads, out = layer.heads, layer.out_features
  h = (x @ _np(layer.linear.kernel)).reshape(_N, heads, out)
  adj = _dense_adj(graph, mask) > 0
  if self_loops:
    adj |= np.eye(_N, dtype=bool)
  src = np.einsum("nhc,hc->nh", h, _np(layer.att_src))
  dst = np.einsum("nhc,hc->nh", h, _np(layer.att_dst))
  result = np.zeros((_N, heads, out))
  alpha_dense = np.zeros((heads, _N, _N))
  for k in range(heads):
    e = dst[:, k][:, None] + src[:, k][None, :]              # [r, s]
    e = np.where(e > 0, e, 0.2 * e)
    e = np.where(adj, e, -np.inf)
    row_max = np.max(np.where(adj, e, -1e300), axis=1, keepdims=True)
    p = np.where(adj, np.exp(e - row_max), 0.0)
    alpha = p / np.maximum(p.sum(1, keepdims=True), 1e-300)
    alpha_dense[k] = alpha
    result[:, k] = alpha @ h[:, k]
  return result, alpha_dense


@pytest.mark.parametrize("concat, self_loops", [(True, True), (False, True), (True, False)])
def test_gat_equals_dense_masked_softmax_attention(concat, self_loops):
  graph, x = _directed_graph(5)
  mask = np.random.default_rng(6).random(graph.senders.size) < 0.75
  layer = layers.GATConv(_F, 4, heads=3, concat=concat, add_self_loops=self_loops,
                         rngs=nnx.Rngs(2))
  out, (alpha, s, r) = jax.jit(lambda x, g, m: layer(x, g, edge_mask=m,
                                                      return_attention=True))(
      graph.nodes, graph, mask)
  dense, alpha_dense = _dense_gat(layer, graph, x, mask, self_loops)
  expected = dense.reshape(_N, -1) if concat else dense.mean(1)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # Coefficients: equal to the dense softmax on real edges, 0 on masked ones, and summing
  # to 1 over each node's unmasked incoming edges (0 for nodes with none).
  np.testing.assert_allclose(alpha, np.transpose(alpha_dense, (1, 2, 0))[r, s], atol=1e-6)
  full_mask = np.concatenate([mask, np.ones(_N, bool)]) if self_loops else mask
  np.testing.assert_array_equal(np.asarray(alpha)[~full_mask], 0.0)
  sums = jax.ops.segment_sum(alpha, r, _N)
  has_in = np.zeros(_N, bool)
  has_in[np.asarray(r)[full_mask]] = True
  np.testing.assert_allclose(sums, np.where(has_in, 1.0, 0.0)[:, None] * np.ones(3),
                             atol=1e-6)
  assert np.all(np.isfinite(out))
  if not self_loops:
    assert not has_in[_N - 1]  # The isolated node: 0 attention, output = bias.


def test_gat_attention_dropout_needs_a_key():
  graph, _ = _directed_graph(7)
  layer = layers.GATConv(_F, 2, heads=2, attention_dropout=0.5, rngs=nnx.Rngs(0))
  base = layer(graph.nodes, graph)
  np.testing.assert_array_equal(base, layer(graph.nodes, graph))
  dropped = layer(graph.nodes, graph, key=jax.random.key(0))
  assert not np.allclose(base, dropped)


@pytest.mark.parametrize("normalize", [False, True])
def test_sage_equals_dense_mean_aggregation(normalize):
  graph, x = _directed_graph(8)
  layer = layers.SAGEConv(_F, 3, normalize=normalize, rngs=nnx.Rngs(3))
  mask = np.random.default_rng(9).random(graph.senders.size) < 0.7
  out = layer(graph.nodes, graph, edge_mask=mask)
  a = _dense_adj(graph, mask)
  deg = a.sum(1, keepdims=True)
  mean = np.where(deg > 0, a @ x / np.where(deg > 0, deg, 1.0), 0.0)
  expected = (x @ _np(layer.lin_self.kernel) + _np(layer.lin_self.bias)
              + mean @ _np(layer.lin_neigh.kernel))
  if normalize:
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def _small_graphs():
  """Undirected graphs of varied sizes, including a lone node and an edgeless graph."""
  rng = np.random.default_rng(10)
  graphs = []
  for n in (4, 1, 6, 3, 5):
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n) if rng.random() < 0.5]
    if n == 3:
      pairs = []
    s = np.array([p[0] for p in pairs] + [p[1] for p in pairs], np.int32)
    r = np.array([p[1] for p in pairs] + [p[0] for p in pairs], np.int32)
    graphs.append(jraph.GraphsTuple(
        nodes=rng.normal(size=(n, 4)).astype(np.float32), edges=None, globals=None,
        senders=s, receivers=r, n_node=np.array([n], np.int32),
        n_edge=np.array([s.size], np.int32)))
  return graphs


@pytest.mark.parametrize("conv", layers.CONVS)
@pytest.mark.parametrize("task", layers.TASKS)
def test_batched_padded_equals_one_by_one(conv, task):
  graphs = _small_graphs()
  model = layers.GNN(conv, 4, 8, 3, num_layers=2, task=task, heads=2, output_heads=2,
                     pooling="max" if conv == "gin" else "mean", rngs=nnx.Rngs(4))
  graphdef, params = nnx.split(model)
  apply = jax.jit(lambda p, g: nnx.merge(graphdef, p)(g))
  batch = padding.pad_graph(padding.batch_graphs(graphs))
  out = np.asarray(apply(params, batch))
  offsets = np.cumsum([0] + [g.n_node[0] for g in graphs])
  for i, g in enumerate(graphs):
    alone = np.asarray(apply(params, padding.pad_graph(g)))
    if task == "node":
      np.testing.assert_allclose(out[offsets[i]:offsets[i + 1]], alone[:g.n_node[0]],
                                 rtol=1e-5, atol=1e-5)
      if i == 0:  # Node outputs need no padding at all (graph readouts need the masks).
        np.testing.assert_allclose(apply(params, g), alone[:g.n_node[0]], rtol=1e-5,
                                   atol=1e-5)
    else:
      np.testing.assert_allclose(out[i], alone[0], rtol=1e-5, atol=1e-5)
  assert np.all(np.isfinite(out))


def test_gnn_compiles_once_per_padding_bucket():
  graphs = _small_graphs()
  rng = np.random.default_rng(12)
  model = layers.GNN("gin", 4, 8, 2, task="graph", pooling="sum", rngs=nnx.Rngs(5))
  graphdef, params = nnx.split(model)
  apply = jax.jit(lambda p, g: nnx.merge(graphdef, p)(g))
  shape = lambda b: (b.nodes.shape[0], b.senders.shape[0], b.n_node.shape[0])
  buckets = set()
  for _ in range(20):
    chosen = [graphs[i] for i in rng.integers(0, len(graphs), rng.integers(1, 5))]
    batch = padding.pad_graph(padding.batch_graphs(chosen))
    single = padding.pad_graph(chosen[0])
    buckets |= {shape(batch), shape(single)}
    np.testing.assert_allclose(apply(params, batch)[0], apply(params, single)[0],
                               rtol=1e-5, atol=1e-5)
  assert 2 <= len(buckets) < 20
  assert apply._cache_size() == len(buckets)


def test_pooling_is_masked():
  graphs = _small_graphs()
  batch = padding.pad_graph(padding.batch_graphs(graphs))
  x = batch.nodes.copy()
  x[sum(g.n_node[0] for g in graphs):] = 1e6  # Padding rows must not leak into readouts.
  for kind, fn in (("sum", np.sum), ("mean", np.mean), ("max", np.max)):
    pooled = np.asarray(jax.jit(layers.pool_nodes, static_argnums=2)(x, batch, kind))
    for i, g in enumerate(graphs):
      np.testing.assert_allclose(pooled[i], fn(g.nodes, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pooled[len(graphs):], 0.0)


def test_gnn_trains_on_a_planted_partition_with_masked_loss():
  rng = np.random.default_rng(11)
  n, classes = 120, 3
  labels = np.arange(n) % classes
  same = labels[:, None] == labels[None, :]
  upper = np.triu(rng.random((n, n)) < np.where(same, 0.15, 0.005), 1)
  r, s = np.nonzero(upper | upper.T)
  x = (np.eye(classes)[labels] + rng.normal(size=(n, classes))).astype(np.float32)
  graph = padding.pad_graph(jraph.GraphsTuple(
      nodes=x, edges=None, globals=None, senders=s.astype(np.int32),
      receivers=r.astype(np.int32), n_node=np.array([n], np.int32),
      n_edge=np.array([s.size], np.int32)))
  n_pad = graph.nodes.shape[0]
  train = np.zeros(n_pad, bool)
  train[:30] = True
  test = np.zeros(n_pad, bool)
  test[30:n] = True
  y = np.concatenate([labels, -np.ones(n_pad - n, int)]).astype(np.int32)
  model = layers.GNN("gcn", classes, 16, classes, dropout_rate=0.5, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx = optax.adam(0.02)

  @jax.jit
  def train_step(params, opt_state, key):
    def loss_fn(p):
      logits = nnx.merge(graphdef, p)(graph, key=key)
      return metrics.masked_cross_entropy(logits, y, train)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  for step in range(100):
    params, opt_state, loss = train_step(params, opt_state, jax.random.key(step))
  logits = nnx.merge(graphdef, params)(graph)
  assert float(metrics.masked_accuracy(logits, y, test)) > 0.85
  assert train_step._cache_size() == 1


@pytest.mark.parametrize("kwargs, name", [
    ({"conv": "gcnn"}, "conv"), ({"task": "edge"}, "task"), ({"pooling": "avg"}, "pooling"),
    ({"activation": "swish"}, "activation"), ({"num_layers": 0}, "num_layers"),
    ({"dropout_rate": 1.0}, "dropout_rate"),
    ({"conv": "gat", "heads": 3}, "heads"),
])
def test_bad_arguments_raise(kwargs, name):
  args = {"conv": "gcn", "in_features": 4, "hidden_features": 8, "out_features": 2, **kwargs}
  with pytest.raises(ValueError, match=name):
    layers.GNN(rngs=nnx.Rngs(0), **args)


def test_bad_call_arguments_raise():
  graph, _ = _directed_graph(0)
  layer = layers.GCNConv(_F, 2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="edge_weight"):
    layer(graph.nodes, graph, edge_weight=np.ones(3))
  with pytest.raises(ValueError, match="edge_mask"):
    layer(graph.nodes, graph, edge_mask=np.ones(3, bool))
  with pytest.raises(ValueError, match="kind"):
    layers.pool_nodes(graph.nodes, padding.pad_graph(graph), "median")
  gat = layers.GNN("gat", _F, 4, 2, heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="edge_weight"):
    gat(padding.pad_graph(graph), edge_weight=np.ones(16))
