"""Oracles for blind message passing, the Wasserstein distances, relevance and diversity."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from jaxrepro.algorithms.graph import graph_valuation as gv
from jaxrepro.launch.data import graphs
from jaxrepro.models.graph import padding


def _graph(seed=0, n=40, p_in=0.2, p_out=0.03):
  return graphs.sbm(seed, n, 2, p_in, p_out, features="none")


def _padded(g: graphs.Graph, n_node=64, n_edge=512):
  gt = padding.pad_graph(graphs.to_graphs_tuple(g), n_node, n_edge, 2)
  return gt, padding.node_mask(gt, n_node)


def _dense_a_hat(g: graphs.Graph) -> np.ndarray:
  a = np.zeros((g.n_nodes, g.n_nodes))
  a[g.edges[:, 0], g.edges[:, 1]] = a[g.edges[:, 1], g.edges[:, 0]] = 1
  a += np.eye(g.n_nodes)
  d = a.sum(1) ** -0.5
  return d[:, None] * a * d[None, :]


# ------------------------------------------------------------------ relevance and diversity


def test_identical_statistics_give_exactly_one_and_zero():
  lam = jnp.array([0.5, 1.0, 3.0])
  r, d = gv.relevance_diversity(lam, lam)
  assert float(r) == 1.0 and float(d) == 0.0


def test_relevance_and_diversity_closed_forms():
  r, d = gv.relevance_diversity(jnp.array([1.0, 4.0]), jnp.array([2.0, 2.0]))
  np.testing.assert_allclose([r, d], [np.sqrt(0.5 * 0.5), np.sqrt(0.5 * 0.5)], rtol=1e-6)
  r, d = gv.relevance_diversity(jnp.array([1.0, 1.0]), jnp.array([3.0, 1.0]))
  np.testing.assert_allclose(r, np.sqrt(1 / 3), rtol=1e-6)
  assert float(d) == 0.0  # one identical direction zeroes the geometric mean


def test_relevance_is_symmetric_and_both_scores_lie_in_unit_interval():
  rng = np.random.default_rng(0)
  for _ in range(20):
    lam, lam_hat = rng.exponential(size=(2, 6))
    r1, d1 = gv.relevance_diversity(jnp.array(lam), jnp.array(lam_hat))
    r2, d2 = gv.relevance_diversity(jnp.array(lam_hat), jnp.array(lam))
    np.testing.assert_allclose([r1, d1], [r2, d2], rtol=1e-5)
    assert 0 <= r1 <= 1 and 0 <= d1 <= 1


def test_eigen_statistics_and_covariance_match_numpy():
  rng = np.random.default_rng(1)
  x, y = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) * [1, 2, 3, 4]
  mask = np.arange(30) < 22  # padding rows must not count
  cov = gv.masked_covariance(jnp.array(x, jnp.float32), jnp.array(mask))
  np.testing.assert_allclose(cov, np.cov(x[:22].T), rtol=1e-4, atol=1e-5)
  lam, lam_hat = gv.eigen_statistics(jnp.array(np.cov(x.T)), jnp.array(np.cov(y.T)))
  w, u = np.linalg.eigh(np.cov(x.T))
  np.testing.assert_allclose(lam, w, rtol=1e-4)
  np.testing.assert_allclose(lam_hat, np.diag(u.T @ np.cov(y.T) @ u), rtol=1e-4)


def test_scores_are_invariant_to_a_shared_orthogonal_transform():
  rng = np.random.default_rng(2)
  x, y = rng.normal(size=(200, 5)), rng.normal(size=(150, 5)) * 1.5
  q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
  ones_x, ones_y = jnp.ones(200, bool), jnp.ones(150, bool)
  base = gv.featural_value(jnp.array(x), ones_x, jnp.array(y), ones_y)
  rotated = gv.featural_value(jnp.array(x @ q), ones_x, jnp.array(y @ q), ones_y)
  np.testing.assert_allclose(base, rotated, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- distances


@pytest.mark.parametrize("sizes", [(5, 7, 8, 9), (10, 10, 10, 10), (1, 4, 3, 6)])
def test_wasserstein_1d_matches_scipy_for_any_sizes(sizes):
  n_u, n_v, pad_u, pad_v = sizes
  rng = np.random.default_rng(n_u)
  u, v = rng.normal(size=pad_u), rng.normal(size=pad_v) + 0.4
  got = gv.wasserstein_1d(jnp.array(u), jnp.array(v), jnp.arange(pad_u) < n_u,
                          jnp.arange(pad_v) < n_v)
  np.testing.assert_allclose(got, scipy.stats.wasserstein_distance(u[:n_u], v[:n_v]),
                             rtol=1e-5)


def test_exact_w1_in_one_dimension_is_the_sorted_difference():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(12, 1)), rng.normal(size=(12, 1))
  np.testing.assert_allclose(gv.wasserstein_exact(a, b),
                             np.mean(np.abs(np.sort(a[:, 0]) - np.sort(b[:, 0]))), rtol=1e-12)


def test_exact_and_sliced_w1_are_metrics():
  rng = np.random.default_rng(4)
  sets = [rng.normal(size=(15, 3)) + shift for shift in (0.0, 0.5, 1.5)]
  exact = [[gv.wasserstein_exact(a, b) for b in sets] for a in sets]
  key, mask = jax.random.key(0), jnp.ones(15, bool)
  sliced = [[float(gv.sliced_wasserstein(key, jnp.array(a), jnp.array(b), mask, mask))
             for b in sets] for a in sets]
  for w in (exact, sliced):
    for i in range(3):
      assert w[i][i] == pytest.approx(0.0, abs=1e-6)
      for j in range(3):
        assert w[i][j] == pytest.approx(w[j][i], rel=1e-5)
        for k in range(3):
          assert w[i][k] <= w[i][j] + w[j][k] + 1e-6
  # A projection is 1-Lipschitz, so every slice (and their mean) is at most W1.
  assert all(sliced[i][j] <= exact[i][j] + 1e-5 for i in range(3) for j in range(3))


def test_exact_w1_rejects_unequal_sizes():
  with pytest.raises(ValueError, match="sliced_wasserstein"):
    gv.wasserstein_exact(np.zeros((3, 2)), np.zeros((4, 2)))


# ------------------------------------------------------------------- blind message passing


def test_shared_order_ranks_by_degree_with_padding_last():
  g = _graph()
  gt, mask = _padded(g)
  position = np.asarray(gv.shared_order(gt, mask, "degree"))
  degree = np.bincount(g.senders, minlength=g.n_nodes)
  expected = np.empty(g.n_nodes, int)
  expected[np.argsort(-degree, kind="stable")] = np.arange(g.n_nodes)
  np.testing.assert_array_equal(position[:g.n_nodes], expected)
  assert sorted(position[g.n_nodes:]) == list(range(g.n_nodes, 64))


def test_eigenvector_centrality_matches_dense_eigh():
  g = _graph(1)
  gt, mask = _padded(g)
  got = np.asarray(gv.eigenvector_centrality(gt, mask, iterations=300))
  a = np.zeros((g.n_nodes, g.n_nodes))
  a[g.edges[:, 0], g.edges[:, 1]] = a[g.edges[:, 1], g.edges[:, 0]] = 1
  vec = np.abs(np.linalg.eigh(a + np.eye(g.n_nodes))[1][:, -1])
  np.testing.assert_allclose(got[:g.n_nodes], vec, atol=1e-4)
  assert np.all(got[g.n_nodes:] == 0)


def test_blind_message_passing_equals_dense_propagation_and_ignores_padding():
  g = _graph(2)
  gt, mask = _padded(g)
  position = gv.shared_order(gt, mask)
  common = jax.random.normal(jax.random.key(5), (64, 6))
  s = np.asarray(gv.blind_message_passing(gt, position, common, mask, k_hops=3))
  r = np.asarray(common)[np.asarray(position)[:g.n_nodes]]
  expected = np.linalg.matrix_power(_dense_a_hat(g), 3) @ r
  np.testing.assert_allclose(s[:g.n_nodes], expected, rtol=1e-4, atol=1e-5)
  assert np.all(s[g.n_nodes:] == 0)


def test_blind_signals_do_not_depend_on_features():
  g = _graph(3)
  gt, mask = _padded(g)
  with_x = gt._replace(nodes=np.random.default_rng(0).normal(size=(64, 7)))
  key = jax.random.key(1)
  a = gv.blind_signals(key, gt, mask, gt, mask, k_hops=2, signal_dim=4)
  b = gv.blind_signals(key, with_x, mask, with_x, mask, k_hops=2, signal_dim=4)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)


def test_isomorphic_graphs_have_zero_disparity_under_the_true_permutation():
  g = _graph(4)
  perm = np.random.default_rng(0).permutation(g.n_nodes)  # node i of g is perm[i] in h
  h = graphs.Graph(edges=graphs.canonical_edges(perm[g.edges], g.n_nodes), n_nodes=g.n_nodes)
  (gt, gm), (ht, hm) = _padded(g), _padded(h)
  pos_g = gv.shared_order(gt, gm)
  pos_h = jnp.asarray(pos_g).at[perm].set(pos_g[:g.n_nodes])  # the true matching
  common = jax.random.normal(jax.random.key(2), (64, 5))
  sg = np.asarray(gv.blind_message_passing(gt, pos_g, common, gm, 2))[:g.n_nodes]
  sh = np.asarray(gv.blind_message_passing(ht, pos_h, common, hm, 2))[:g.n_nodes]
  assert gv.wasserstein_exact(sg, sh) == pytest.approx(0.0, abs=1e-6)
  # A graph with a different structure is at a positive distance.
  other = _padded(_graph(5, p_in=0.05))
  so = np.asarray(gv.blind_message_passing(other[0], gv.shared_order(*other), common,
                                           other[1], 2))[:g.n_nodes]
  assert gv.wasserstein_exact(sg, so) > 0.05


def test_bad_arguments_name_the_field():
  g = _graph()
  gt, mask = _padded(g)
  with pytest.raises(ValueError, match="matching="):
    gv.shared_order(gt, mask, "sinkhorn")
  with pytest.raises(ValueError, match="k_hops="):
    gv.blind_message_passing(gt, jnp.zeros(64, jnp.int32), jnp.zeros((64, 2)), mask, -1)
