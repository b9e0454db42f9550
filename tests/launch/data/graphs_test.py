"""Tests of the seeded graph generators: determinism, sizes, block structure."""

import numpy as np
import pytest

from jaxrepro.launch.data import graphs


@pytest.fixture(scope="module")
def default_data():
  return graphs.bipartite_sbm(0)


def _same(a, b):
  return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in
             ("train_pairs", "test_pairs", "user_community", "item_community",
              "item_popularity"))


def test_same_seed_same_data_and_new_seed_new_data(default_data):
  assert _same(default_data, graphs.bipartite_sbm(0))
  assert not _same(default_data, graphs.bipartite_sbm(1))


def test_sizes_split_and_uniqueness(default_data):
  d = default_data
  assert (d.n_users, d.n_items) == (2000, 1500)
  for pairs in (d.train_pairs, d.test_pairs):
    assert pairs.dtype == np.int32 and pairs.ndim == 2 and pairs.shape[1] == 2
    assert pairs[:, 0].min() >= 0 and pairs[:, 0].max() < d.n_users
    assert pairs[:, 1].min() >= 0 and pairs[:, 1].max() < d.n_items
  both = np.concatenate([d.train_pairs, d.test_pairs])
  assert len(np.unique(both, axis=0)) == len(both)  # Unique and train/test disjoint.
  assert 11.5 < len(both) / d.n_users < 12.5
  assert 0.19 < len(d.test_pairs) / len(both) < 0.21
  # Every user keeps at least one training interaction.
  assert len(np.unique(d.train_pairs[:, 0])) == d.n_users
  assert np.bincount(d.item_community, minlength=25).min() == 1500 // 25


def test_in_community_fraction(default_data):
  d = default_data
  both = np.concatenate([d.train_pairs, d.test_pairs])
  inside = d.user_community[both[:, 0]] == d.item_community[both[:, 1]]
  assert abs(inside.mean() - 0.8) < 0.02
  for p in (0.0, 1.0):
    e = graphs.bipartite_sbm(3, n_users=300, n_items=200, n_communities=5,
                             interactions_per_user=6, in_community=p)
    pairs = np.concatenate([e.train_pairs, e.test_pairs])
    assert np.mean(e.user_community[pairs[:, 0]] == e.item_community[pairs[:, 1]]) == p


def test_popular_items_get_more_interactions(default_data):
  d = default_data
  counts = np.bincount(d.train_pairs[:, 1], minlength=d.n_items)
  top_decile = np.argsort(-d.item_popularity)[: d.n_items // 10]
  # Pareto(1.5) popularity: the top 10% of items draw far more than 10% of interactions.
  assert counts[top_decile].sum() / counts.sum() > 0.3


@pytest.mark.parametrize("kwargs, name", [
    ({"n_items": 10, "n_communities": 20}, "n_items"),
    ({"in_community": 1.5}, "in_community"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"pareto_alpha": 0.0}, "pareto_alpha"),
    ({"interactions_per_user": 0}, "interactions_per_user"),
])
def test_bad_arguments_raise(kwargs, name):
  with pytest.raises(ValueError, match=name):
    graphs.bipartite_sbm(0, **kwargs)


def test_weighted_sampling_without_replacement_law():
  # Exact law of two successive weighted draws without replacement from weights 6:3:1.
  weights = np.array([0.6, 0.3, 0.1])
  exact = {(a, b): weights[a] * weights[b] / (1 - weights[a])
           for a in range(3) for b in range(3) if a != b}
  rng = np.random.default_rng(0)
  ids = np.arange(3)
  n = 20000
  counts = {}
  for _ in range(n):
    pair = tuple(graphs._weighted_without_replacement(rng, ids, weights, 2).tolist())
    counts[pair] = counts.get(pair, 0) + 1
  for pair, p in exact.items():
    assert abs(counts.get(pair, 0) / n - p) < 0.01, (pair, counts.get(pair, 0) / n, p)


def test_extreme_popularity_still_gives_distinct_items():
  # Pareto(0.05) weights span many decades: rejection sampling gives up on some users and
  # the Gumbel-top-k fallback completes them.
  weights = 10.0 ** np.arange(40, 0, -4)  # Draws with replacement never reach the tail.
  got = graphs._weighted_without_replacement(np.random.default_rng(0), np.arange(10),
                                             weights, 10)
  np.testing.assert_array_equal(got, np.arange(10))
  d = graphs.bipartite_sbm(0, n_users=50, n_items=20, n_communities=2,
                           interactions_per_user=9, pareto_alpha=0.05)
  both = np.concatenate([d.train_pairs, d.test_pairs])
  assert len(np.unique(both, axis=0)) == len(both)
