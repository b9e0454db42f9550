"""Padding buckets, masks, our zero-out-padding and one compilation per bucket."""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import pytest

from jaxrepro.models.graph import padding


def _graph(n_node, n_edge, seed=0, width=3):
  rng = np.random.default_rng(seed)
  return jraph.GraphsTuple(
      nodes=rng.normal(size=(n_node, width)).astype(np.float32),
      edges=rng.normal(size=(n_edge, 2)).astype(np.float32),
      globals=rng.normal(size=(1, 4)).astype(np.float32),
      senders=rng.integers(0, max(n_node, 1), n_edge).astype(np.int32),
      receivers=rng.integers(0, max(n_node, 1), n_edge).astype(np.int32),
      n_node=np.array([n_node], np.int32), n_edge=np.array([n_edge], np.int32))


@pytest.mark.parametrize("n, expected", [(0, 1), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8),
                                         (1000, 1024), (1025, 2048)])
def test_next_power_of_two(n, expected):
  assert padding.next_power_of_two(n) == expected


def test_bucket_sizes_leave_room_for_the_padding_graph():
  assert padding.bucket_sizes(7, 8, 1) == (8, 8, 2)
  assert padding.bucket_sizes(8, 9, 3) == (16, 16, 4)
  assert padding.bucket_sizes(0, 0, 0) == (1, 1, 1)  # pad_graph still needs a real graph
  with pytest.raises(ValueError, match="n_node"):
    padding.bucket_sizes(-1, 0, 1)


def test_pad_graph_masks_and_index():
  batch = padding.batch_graphs([_graph(3, 4, 0), _graph(0, 0, 1), _graph(5, 2, 2)])
  padded = padding.pad_graph(batch)
  assert padded.nodes.shape == (16, 3) and padded.senders.shape == (8,)
  assert padded.n_node.shape == (4,) and padded.n_node.dtype == np.int32

  @jax.jit
  def masks(g):
    return (padding.node_mask(g), padding.edge_mask(g), padding.graph_mask(g),
            padding.node_graph_index(g), padding.edge_graph_index(g))

  nodes, edges, graphs, node_graph, edge_graph = masks(padded)
  np.testing.assert_array_equal(nodes, np.arange(16) < 8)
  np.testing.assert_array_equal(edges, np.arange(8) < 6)
  np.testing.assert_array_equal(graphs, [True, True, True, False])
  np.testing.assert_array_equal(node_graph, [0] * 3 + [2] * 5 + [3] * 8)
  np.testing.assert_array_equal(edge_graph, [0] * 4 + [2] * 2 + [3] * 2)
  # Padding edges are self-loops on the first padding node: real nodes receive nothing.
  assert set(padded.senders[6:]) == set(padded.receivers[6:]) == {8}
  # Without node features the node count must be given.
  np.testing.assert_array_equal(padding.node_mask(padded._replace(nodes=None), 16), nodes)
  with pytest.raises(ValueError, match="num_nodes"):
    padding.node_mask(padded._replace(nodes=None))


def test_explicit_budget_and_too_small_budget():
  g = _graph(5, 6)
  padded = padding.pad_graph(g, n_node=6, n_edge=6, n_graph=3)
  assert padded.nodes.shape == (6, 3) and padded.n_node.tolist() == [5, 1, 0]
  for kwargs in ({"n_node": 5}, {"n_edge": 5}, {"n_graph": 1}):
    with pytest.raises(ValueError, match="too small"):
      padding.pad_graph(g, **kwargs)
  with pytest.raises(ValueError, match="graphs"):
    padding.batch_graphs([])


def test_zero_out_padding_zeroes_every_padding_leaf_even_nan():
  padded = padding.pad_graph(padding.batch_graphs([_graph(3, 4, 0), _graph(2, 1, 1)]))
  poisoned = padded._replace(
      nodes={"x": np.where(np.arange(8)[:, None] >= 5, np.nan, padded.nodes)},
      edges=np.where(np.arange(8)[:, None] >= 5, np.inf, padded.edges),
      globals=padded.globals + 1.0)
  out = jax.jit(padding.zero_out_padding)(poisoned)
  np.testing.assert_array_equal(out.nodes["x"][:5], padded.nodes[:5])
  np.testing.assert_array_equal(out.nodes["x"][5:], 0.0)
  np.testing.assert_array_equal(out.edges[:5], padded.edges[:5])
  np.testing.assert_array_equal(out.edges[5:], 0.0)
  np.testing.assert_array_equal(out.globals[:2], padded.globals[:2] + 1.0)
  np.testing.assert_array_equal(out.globals[2:], 0.0)
  assert out.nodes["x"].dtype == np.float32
  # Graphs without features pass through.
  bare = padded._replace(nodes=None, edges=None, globals=None)
  assert padding.zero_out_padding(bare).nodes is None


def test_fully_connected_graph_matches_brute_force():
  g = padding.fully_connected_graph([3, 0, 2])
  pairs = set(zip(g.senders.tolist(), g.receivers.tolist()))
  expected = {(i, j) for i in range(3) for j in range(3) if i != j} | {(3, 4), (4, 3)}
  assert pairs == expected and len(g.senders) == len(expected)
  assert g.n_edge.tolist() == [6, 0, 2]
  loops = padding.fully_connected_graph([2], self_edges=True)
  assert sorted(zip(loops.senders.tolist(), loops.receivers.tolist())) == [
      (0, 0), (0, 1), (1, 0), (1, 1)]


def test_padded_batches_compile_once_per_bucket():
  rng = np.random.default_rng(0)
  graphs = [_graph(int(rng.integers(1, 12)), int(rng.integers(0, 20)), seed=i)
            for i in range(60)]

  @jax.jit
  def masked_mean(g):
    mask = padding.node_mask(g)
    total = jnp.sum(jnp.where(mask[:, None], g.nodes, 0.0), axis=0)
    return total / jnp.sum(mask)

  buckets = set()
  batches = list(padding.padded_batches(graphs, 3))
  assert len(batches) == 20
  for batch, start in zip(batches, range(0, 60, 3)):
    buckets.add((batch.nodes.shape[0], batch.senders.shape[0], batch.n_node.shape[0]))
    real = np.concatenate([g.nodes for g in graphs[start:start + 3]])
    np.testing.assert_allclose(masked_mean(batch), real.mean(0), rtol=1e-5, atol=1e-6)
  assert 1 < len(buckets) < 20
  assert masked_mean._cache_size() == len(buckets)
  assert len(list(padding.padded_batches(graphs[:7], 3, drop_remainder=True))) == 2
