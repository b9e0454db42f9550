"""Oracle tests for EHGNN: DHT involution, hypergraph conv vs dense incidence, per-graph
top-k vs NumPy, padding invariance, GMPool closed form, determinism."""

import math

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest
from flax import nnx

from jaxrepro.algorithms.graph import ehgnn
from jaxrepro.launch.data import graphs
from jaxrepro.models.graph import padding


def _molecule_batch(seed, n=4, pad=None):
  """A padded batch of generated molecules, one edge per bond, one-hot bond types."""
  mols = graphs.random_molecules(seed, n, coordinates=False)
  parts = [jraph.GraphsTuple(
      nodes=m.features, edges=np.eye(3, dtype=np.float32)[m.edge_types - 1], globals=None,
      senders=m.edges[:, 0].astype(np.int32), receivers=m.edges[:, 1].astype(np.int32),
      n_node=np.array([m.n_nodes], np.int32), n_edge=np.array([len(m.edges)], np.int32))
      for m in mols]
  batch = padding.batch_graphs(parts)
  padded = padding.pad_graph(batch) if pad is None else padding.pad_graph(batch, *pad)
  return batch, jax.tree.map(jnp.asarray, padded)


def _dense_reference(x, senders, receivers, n_nodes, *, self_loops, keep=None):
  """`D^-1 H B^-1 H^T x` with a dense `[m, n]` incidence in float64 NumPy."""
  m = len(senders)
  h = np.zeros((m, n_nodes))
  h[np.arange(m), senders] = 1.0
  h[np.arange(m), receivers] = 1.0
  if keep is not None:
    h = h * keep[:, None]
  if self_loops:
    h = h[:, h.sum(0) > 1]                                # drop size-1 hyperedges
    loops = np.eye(m) if keep is None else np.diag(keep.astype(float))
    h = np.concatenate([h, loops], axis=1)
  b, d = h.sum(0), h.sum(1)
  inv_b = np.where(b > 0, 1.0 / np.maximum(b, 1), 0.0)
  inv_d = np.where(d > 0, 1.0 / np.maximum(d, 1), 0.0)
  return inv_d[:, None] * (h @ (inv_b[:, None] * (h.T @ x)))


def test_dht_is_an_involution_and_swaps_sides():
  _, g = _molecule_batch(0)
  dual = ehgnn.dual_of_graph(g)
  n, m = g.nodes.shape[0], g.senders.shape[0]
  assert dual.nodes.shape[0] == m and dual.hyperedges.shape[0] == n
  np.testing.assert_array_equal(dual.n_node, g.n_edge)
  np.testing.assert_array_equal(dual.n_hyperedge, g.n_node)
  # Every dual node lies in exactly two hyperedges (its edge's endpoints).
  np.testing.assert_array_equal(np.bincount(np.asarray(dual.node_index), minlength=m),
                                np.full(m, 2))
  back = ehgnn.incidence_to_graph(ehgnn.dht(dual))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(g._replace(globals=None)),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The dense incidence of the dual is the transpose of the graph's.
  inc = np.zeros((n, m))
  inc[np.asarray(g.senders), np.arange(m)] += 1
  inc[np.asarray(g.receivers), np.arange(m)] += 1
  dual_inc = np.zeros((m, n))
  np.add.at(dual_inc, (np.asarray(dual.node_index), np.asarray(dual.hyperedge_index)), 1)
  np.testing.assert_array_equal(dual_inc, inc.T)


def test_path_p3_closed_form():
  # e1 = (0, 1), e2 = (1, 2), no self-loops: e1' = 1/2 [e1 + 1/2 (e1 + e2)].
  g = jraph.GraphsTuple(nodes=jnp.zeros((3, 1)), edges=jnp.array([[1.0, 0.0], [0.0, 1.0]]),
                        senders=jnp.array([0, 1]), receivers=jnp.array([1, 2]),
                        n_node=jnp.array([3]), n_edge=jnp.array([2]), globals=None)
  out = ehgnn.hypergraph_propagate(g.edges, ehgnn.dual_of_graph(g), self_loops=False)
  e1, e2 = np.array([1.0, 0.0]), np.array([0.0, 1.0])
  np.testing.assert_allclose(out[0], 0.5 * (e1 + 0.5 * (e1 + e2)), rtol=1e-6)
  np.testing.assert_allclose(out[1], 0.5 * (e2 + 0.5 * (e1 + e2)), rtol=1e-6)


@pytest.mark.parametrize("self_loops", [False, True])
def test_hypergraph_conv_matches_dense_incidence(self_loops):
  batch, g = _molecule_batch(1, n=3)
  real = int(batch.n_edge.sum())
  x = np.random.default_rng(0).normal(size=(g.senders.shape[0], 4)).astype(np.float32)
  keep = np.random.default_rng(1).random(g.senders.shape[0]) < 0.7
  keep[real:] = False
  dual = ehgnn.dual_of_graph(g)
  for mask in (None, keep):
    out = ehgnn.hypergraph_propagate(jnp.asarray(x), dual, self_loops=self_loops,
                                     node_mask=None if mask is None else jnp.asarray(mask))
    ref = _dense_reference(x[:real].astype(np.float64), batch.senders, batch.receivers,
                           int(batch.n_node.sum()), self_loops=self_loops,
                           keep=None if mask is None else mask[:real])
    np.testing.assert_allclose(np.asarray(out)[:real], ref, rtol=1e-5, atol=1e-6)
  # The layer is the propagation of x Theta plus the bias.
  conv = ehgnn.HypergraphConv(4, 3, self_loops=self_loops, rngs=nnx.Rngs(0))
  theta = np.asarray(conv.linear.kernel[...], np.float64)
  ref = _dense_reference(x[:real] @ theta, batch.senders, batch.receivers,
                         int(batch.n_node.sum()), self_loops=self_loops)
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x), dual))[:real], ref,
                             rtol=1e-4, atol=1e-5)


def _topk_reference(score, segment, mask, n_seg, ratio):
  keep = np.zeros(len(score), bool)
  for s in range(n_seg):
    idx = np.flatnonzero((segment == s) & mask)
    k = math.ceil(round(ratio * len(idx), 4))
    order = idx[np.argsort(-score[idx], kind="stable")]
    keep[order[:k]] = True
  return keep


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75, 1.0])
def test_topk_per_graph_matches_numpy(ratio):
  _, g = _molecule_batch(2, n=5)
  e = g.senders.shape[0]
  rng = np.random.default_rng(3)
  score = np.round(rng.normal(size=e), 1).astype(np.float32)   # rounded: ties occur
  mask = np.asarray(padding.edge_mask(g)) & (rng.random(e) < 0.8)
  segment = np.asarray(padding.edge_graph_index(g))
  n_seg = g.n_node.shape[0]
  keep = ehgnn.topk_per_graph(jnp.asarray(score), jnp.asarray(segment), jnp.asarray(mask),
                              n_seg, ratio)
  np.testing.assert_array_equal(np.asarray(keep),
                                _topk_reference(score, segment, mask, n_seg, ratio))
  counts = np.bincount(segment[np.asarray(keep)], minlength=n_seg)
  expected = [math.ceil(round(ratio * ((segment == s) & mask).sum(), 4)) for s in range(n_seg)]
  np.testing.assert_array_equal(counts, expected)
  if ratio == 1.0:
    np.testing.assert_array_equal(np.asarray(keep), mask)
  with pytest.raises(ValueError, match="ratio"):
    ehgnn.topk_per_graph(jnp.asarray(score), jnp.asarray(segment), jnp.asarray(mask),
                         n_seg, 0.0)


def test_gmpool_one_seed_uniform_attention_is_mean_pooling():
  _, g = _molecule_batch(4, n=3)
  dual = ehgnn.dual_of_graph(g)
  mask = padding.edge_mask(g)
  slot, valid = ehgnn.dense_batch(padding.edge_graph_index(g), mask, g.n_node.shape[0], 16)
  pool = ehgnn.GMPool(3, 1, kv_conv="linear", cluster=False, rngs=nnx.Rngs(0))
  # Zero query weights give equal logits, i.e. uniform attention over each graph's edges.
  pool.fc_q.kernel[...] = jnp.zeros((3, 3))
  pool.fc_q.bias[...] = jnp.zeros((3,))
  pool.fc_v.kernel[...] = jnp.eye(3)
  pool.fc_v.bias[...] = jnp.zeros((3,))
  pool.fc_o.kernel[...] = jnp.zeros((3, 3))
  pool.fc_o.bias[...] = jnp.zeros((3,))
  pooled, attention = pool(g.edges, dual, slot, valid)
  seg = np.asarray(padding.edge_graph_index(g))
  real = np.asarray(mask)
  for s in range(int(np.asarray(padding.graph_mask(g)).sum())):
    rows = np.asarray(g.edges)[(seg == s) & real]
    np.testing.assert_allclose(pooled[s, 0], rows.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(attention.sum(-1))[np.asarray(valid).any(-1)], 1.0,
                             rtol=1e-5)
  # Unpooling puts each edge back at its own slot.
  back = ehgnn.from_dense(ehgnn.to_dense(g.edges, slot, *valid.shape), slot)
  np.testing.assert_array_equal(np.asarray(back)[real], np.asarray(g.edges)[real])


def _models():
  return {"hypercluster": ehgnn.HyperCluster(3, 8, 3, 2, rngs=nnx.Rngs(0)),
          "hyperdrop": ehgnn.GraphClassifier(5, 3, 8, 8, 2, edge_ratio=0.6, rngs=nnx.Rngs(0)),
          "node_ae": ehgnn.NodeAutoencoder(5, 8, 3, 2, rngs=nnx.Rngs(0))}


def _run(name, model, g):
  if name == "hypercluster":
    return np.asarray(model(g, 16)), padding.edge_mask(g)
  if name == "node_ae":
    return np.asarray(model(g, 16)), padding.edge_mask(g)
  logits, keep = model(g)
  return np.asarray(logits), padding.graph_mask(g), np.asarray(keep)


@pytest.mark.parametrize("name", ["hypercluster", "hyperdrop", "node_ae"])
def test_padding_does_not_change_results_and_runs_are_deterministic(name):
  batch, small = _molecule_batch(5, n=4)
  _, big = _molecule_batch(5, n=4, pad=(96, 80, 9))
  model = _models()[name]
  out_small, out_big = _run(name, model, small), _run(name, model, big)
  mask_s, mask_b = np.asarray(out_small[1]), np.asarray(out_big[1])
  np.testing.assert_allclose(out_small[0][mask_s], out_big[0][mask_b], rtol=1e-5, atol=1e-5)
  if name == "hyperdrop":
    real = int(batch.n_edge.sum())
    np.testing.assert_array_equal(out_small[2][:real], out_big[2][:real])
    assert not out_big[2][real:].any()
    n_edge = np.asarray(batch.n_edge)
    kept = np.add.reduceat(out_small[2][:real].astype(int), np.cumsum(n_edge) - n_edge)
    # Two drops with r = 0.6: ceil(0.6 ceil(0.6 m)) edges stay.
    np.testing.assert_array_equal(kept, [math.ceil(round(0.6 * math.ceil(
        round(0.6 * m, 4)), 4)) for m in n_edge])
  again = _run(name, _models()[name], small)
  np.testing.assert_array_equal(out_small[0], again[0])
  other = {"hypercluster": ehgnn.HyperCluster(3, 8, 3, 2, rngs=nnx.Rngs(1)),
           "hyperdrop": ehgnn.GraphClassifier(5, 3, 8, 8, 2, rngs=nnx.Rngs(1)),
           "node_ae": ehgnn.NodeAutoencoder(5, 8, 3, 2, rngs=nnx.Rngs(1))}[name]
  assert not np.allclose(_run(name, other, small)[0], out_small[0])


def test_node_relabelling_and_edge_reordering_are_equivariant():
  batch, g = _molecule_batch(6, n=1)
  n, m = int(batch.n_node[0]), int(batch.n_edge[0])
  rng = np.random.default_rng(0)
  node_perm, edge_perm = rng.permutation(n), rng.permutation(m)   # new id -> old id
  new_of_old = np.argsort(node_perm)
  perm = jraph.GraphsTuple(
      nodes=batch.nodes[node_perm], edges=batch.edges[edge_perm], globals=None,
      senders=new_of_old[batch.senders[edge_perm]].astype(np.int32),
      receivers=new_of_old[batch.receivers[edge_perm]].astype(np.int32),
      n_node=batch.n_node, n_edge=batch.n_edge)
  gp = jax.tree.map(jnp.asarray, padding.pad_graph(perm, *[x.shape[0] for x in (
      g.nodes, g.senders, g.n_node)]))
  model = ehgnn.HyperCluster(3, 8, 3, 2, rngs=nnx.Rngs(0))
  np.testing.assert_allclose(np.asarray(model(gp, 16))[:m], np.asarray(model(g, 16))[edge_perm],
                             rtol=1e-5, atol=1e-5)


def test_undirected_keeps_padding_masks():
  _, g = _molecule_batch(7, n=2)
  both = ehgnn.undirected(g)
  e = g.senders.shape[0]
  np.testing.assert_array_equal(both.senders[e:], g.receivers)
  np.testing.assert_array_equal(both.receivers[e:], g.senders)
  np.testing.assert_array_equal(both.n_edge, 2 * g.n_edge)
  # Real nodes receive no padding messages: every padding edge is a padding self-loop.
  pad = ~np.concatenate([padding.edge_mask(g)] * 2)
  assert (np.asarray(both.receivers)[pad] >= int(np.asarray(padding.node_mask(g)).sum())).all()
  with pytest.raises(ValueError, match="kv_conv"):
    ehgnn.GMPool(4, 1, kv_conv="attention", rngs=nnx.Rngs(0))
