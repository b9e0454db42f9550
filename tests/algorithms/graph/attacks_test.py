"""Structure attacks: exact budgets, determinism, cross-class injection, Metattack strength."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxrepro.algorithms.graph import attacks, metrics
from jaxrepro.launch.data import graphs


@pytest.fixture(scope="module")
def small_sbm():
  g = graphs.sbm(0, n_nodes=240, n_classes=3, p_in=0.04, p_out=0.004, n_features=60,
                 word_in=0.15, word_out=0.05)
  split = graphs.node_split(0, g.labels, 30, 30)
  return g, split


def _codes(pairs, n):
  pairs = np.asarray(pairs, np.int64).reshape(-1, 2)
  return set((pairs[:, 0] * n + pairs[:, 1]).tolist())


def _check_perturbation(pert, clean_edges, n, budget):
  clean, added, removed = (_codes(p, n) for p in (clean_edges, pert.added, pert.removed))
  assert len(pert.added) + len(pert.removed) == budget
  assert len(added) == len(pert.added) and len(removed) == len(pert.removed)
  assert not added & clean and removed <= clean
  assert _codes(pert.edges, n) == (clean | added) - removed
  for p in (pert.edges, pert.added, pert.removed):
    assert p.dtype == np.int32 and np.all(p[:, 0] < p[:, 1])


def test_random_injection_budget_determinism_and_uniformity(small_sbm):
  g, _ = small_sbm
  pert = attacks.random_edge_injection(1, g.edges, g.n_nodes, 150)
  _check_perturbation(pert, g.edges, g.n_nodes, 150)
  again = attacks.random_edge_injection(1, g.edges, g.n_nodes, 150)
  np.testing.assert_array_equal(pert.edges, again.edges)
  assert not np.array_equal(pert.added, attacks.random_edge_injection(2, g.edges, g.n_nodes,
                                                                      150).added)
  # On a 5-node path every one of the 6 non-edges is equally likely.
  path = np.array([[0, 1], [1, 2], [2, 3], [3, 4]])
  counts = {}
  for seed in range(600):
    (pair,) = attacks.random_edge_injection(seed, path, 5, 1).added.tolist()
    counts[tuple(pair)] = counts.get(tuple(pair), 0) + 1
  assert len(counts) == 6 and min(counts.values()) > 60 and max(counts.values()) < 140


def test_heterophilous_injection_adds_only_cross_class_edges(small_sbm):
  g, _ = small_sbm
  budget = len(g.edges)
  pert = attacks.heterophilous_edge_injection(3, g.edges, g.labels, budget)
  _check_perturbation(pert, g.edges, g.n_nodes, budget)
  assert np.all(g.labels[pert.added[:, 0]] != g.labels[pert.added[:, 1]])
  # Homophily falls from ~0.8 towards ~0.4 when the edges double with cross-class ones.
  before = graphs.edge_homophily(g.edges, g.labels)
  after = graphs.edge_homophily(pert.edges, g.labels)
  assert after == pytest.approx(before * len(g.edges) / len(pert.edges))
  np.testing.assert_array_equal(
      pert.edges, attacks.heterophilous_edge_injection(3, g.edges, g.labels, budget).edges)


def test_budget_helpers_and_bad_budgets():
  assert attacks.budget_from_rate(1866, 0.2) == 373
  assert attacks.budget_from_rate(10, 1.0) == 10
  edges = np.array([[0, 1], [1, 2]])
  a = attacks.dense_adjacency(edges, 3)
  np.testing.assert_array_equal(a, [[0, 1, 0], [1, 0, 1], [0, 1, 0]])
  with pytest.raises(ValueError, match="budget"):
    attacks.random_edge_injection(0, edges, 3, 2)       # Only one non-edge exists.
  with pytest.raises(ValueError, match="budget"):
    attacks.heterophilous_edge_injection(0, edges, np.array([0, 0, 1]), 2)
  with pytest.raises(ValueError, match="edges"):
    attacks.random_edge_injection(0, np.array([[0, 5]]), 3, 1)
  with pytest.raises(ValueError, match="train_mask"):
    attacks.metattack(0, edges, np.eye(3), np.array([0, 1, 0]), np.zeros(3, bool), 1)


def _gcn_accuracy(edges, g, split, seed=0, steps=150):
  """Test accuracy of a 2-layer GCN (dense Â) trained on the labelled nodes of `edges`."""
  a = attacks.dense_adjacency(edges, g.n_nodes) + np.eye(g.n_nodes, dtype=np.float32)
  d = 1.0 / np.sqrt(a.sum(1))
  a_hat = jnp.asarray(d[:, None] * a * d[None, :])
  x, y = jnp.asarray(g.features), jnp.asarray(g.labels)
  init = jax.nn.initializers.glorot_uniform()
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"w1": init(k1, (x.shape[1], 16)), "w2": init(k2, (16, 3))}
  tx = optax.adamw(0.01, weight_decay=5e-4)

  def logits(p):
    return a_hat @ (jax.nn.relu(a_hat @ x @ p["w1"]) @ p["w2"])

  @jax.jit
  def fit(params):
    def step(carry, _):
      p, s = carry
      grads = jax.grad(lambda q: metrics.masked_cross_entropy(logits(q), y, split.train))(p)
      updates, s = tx.update(grads, s, p)
      return (optax.apply_updates(p, updates), s), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), length=steps)
    return metrics.masked_accuracy(logits(params), y, split.test)

  return float(fit(params))


def test_metattack_is_exact_deterministic_and_beats_random_injection(small_sbm):
  g, split = small_sbm
  budget = attacks.budget_from_rate(len(g.edges), 0.25)
  pert = attacks.metattack(0, g.edges, g.features, g.labels, split.train, budget,
                           flips_per_step=4)
  _check_perturbation(pert, g.edges, g.n_nodes, budget)
  again = attacks.metattack(0, g.edges, g.features, g.labels, split.train, budget,
                            flips_per_step=4)
  np.testing.assert_array_equal(pert.edges, again.edges)
  # Metattack mostly inserts edges, and prefers cross-class ones (random pairs: 1/3 same).
  assert len(pert.added) > len(pert.removed)
  assert graphs.edge_homophily(pert.added, g.labels) < 0.3

  clean = np.mean([_gcn_accuracy(g.edges, g, split, s) for s in range(2)])
  rand = attacks.random_edge_injection(0, g.edges, g.n_nodes, budget).edges
  rand_acc = np.mean([_gcn_accuracy(rand, g, split, s) for s in range(2)])
  meta_acc = np.mean([_gcn_accuracy(pert.edges, g, split, s) for s in range(2)])
  assert clean > 0.85
  print(f"GCN accuracy clean {clean:.3f} random {rand_acc:.3f} metattack {meta_acc:.3f}")
  assert meta_acc < rand_acc - 0.1, (clean, rand_acc, meta_acc)


def test_metattack_never_isolates_a_node():
  g = graphs.sbm(1, n_nodes=40, n_classes=2, p_in=0.1, p_out=0.02, n_features=10,
                 word_in=0.4, word_out=0.1)
  train = np.zeros(40, bool)
  train[:10] = True
  pert = attacks.metattack(1, g.edges, g.features, g.labels, train, 12, train_iters=20)
  _check_perturbation(pert, g.edges, 40, 12)
  degree = np.bincount(g.edges.ravel(), minlength=40)
  assert np.all(np.bincount(pert.edges.ravel(), minlength=40)[degree > 0] > 0)
  # A perfect matching: every removal would isolate two nodes, so only additions remain.
  matching = np.stack([np.arange(0, 40, 2), np.arange(1, 40, 2)], axis=1)
  pert = attacks.metattack(2, matching, g.features, g.labels, train, 8, train_iters=20)
  _check_perturbation(pert, matching, 40, 8)
  assert len(pert.removed) == 0
  empty = attacks.metattack(1, g.edges, g.features, g.labels, train, 0)
  np.testing.assert_array_equal(empty.edges, g.edges)
