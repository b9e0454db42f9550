"""Oracle tests for GraphHash: modularity, Louvain codes, hashes, table sizes, hashed MF."""

import math

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import pytest

from jaxrepro.algorithms.graph import graphhash as gh
from jaxrepro.algorithms.graph import ultragcn
from jaxrepro.configs import common
from jaxrepro.configs import graphhash as graphhash_config
from jaxrepro.launch.data import graphs
from jaxrepro.launch.experiments import graphhash as driver

_loss_and_grad = jax.jit(jax.value_and_grad(lambda p, b, c: gh.bpr_loss(p, b, c)[0]))
_score = jax.jit(gh.score_users)


def _random_pairs(seed, n_users, n_items, density):
  """Pairs of a random bipartite graph with the last user and the last item isolated."""
  rng = np.random.default_rng(seed)
  dense = rng.random((n_users, n_items)) < density
  dense[-1, :] = False
  dense[:, -1] = False
  return np.argwhere(dense).astype(np.int32), dense.astype(np.float64)


def _sbm(seed=0):
  return graphs.bipartite_sbm(seed, n_users=240, n_items=200, n_communities=6,
                              interactions_per_user=12, in_community=0.9)


def _brute_force_modularity(dense, cu, ci, gamma):
  m = dense.sum()
  k_u, k_i = dense.sum(1), dense.sum(0)
  q = 0.0
  for u in range(dense.shape[0]):
    for i in range(dense.shape[1]):
      if cu[u] == ci[i]:
        q += dense[u, i] - gamma * k_u[u] * k_i[i] / m
  return q / m


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_modularity_equals_double_sum_and_networkx(gamma):
  pairs, dense = _random_pairs(0, 14, 11, 0.3)
  rng = np.random.default_rng(1)
  cu, ci = rng.integers(0, 4, 14), rng.integers(0, 4, 11)
  # Duplicated pairs must not count twice (the official biadjacency is 0/1).
  ours = gh.bipartite_modularity(np.concatenate([pairs, pairs[:5]]), 14, 11, cu, ci, gamma)
  np.testing.assert_allclose(ours, _brute_force_modularity(dense, cu, ci, gamma), rtol=1e-12)
  # networkx's directed modularity on user -> item edges is Barber's bipartite modularity.
  labels = np.concatenate([cu, ci])
  communities = [set(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)]
  reference = nx.community.modularity(gh.bipartite_digraph(pairs, 14, 11), communities,
                                      resolution=gamma)
  np.testing.assert_allclose(ours, reference, rtol=1e-12)


def test_louvain_levels_increase_modularity_and_beat_the_planted_partition():
  data = _sbm()
  u, i, pairs = data.n_users, data.n_items, data.train_pairs
  # Each Louvain level (local moves, then aggregation) leaves Q non-decreasing.
  levels = list(nx.community.louvain_partitions(gh.bipartite_digraph(pairs, u, i), seed=0,
                                                weight=None))
  qs = []
  for level in levels:
    labels = gh._labels_from_communities(level, u + i)
    qs.append(gh.bipartite_modularity(pairs, u, i, labels[:u], labels[u:]))
  assert len(qs) >= 2 and all(b >= a - 1e-12 for a, b in zip(qs, qs[1:])), qs

  cu, ci = gh.louvain_bipartite(pairs, u, i, seed=0)
  found = gh.bipartite_modularity(pairs, u, i, cu, ci)
  np.testing.assert_allclose(found, qs[-1], rtol=1e-12)
  planted = gh.bipartite_modularity(pairs, u, i, data.user_community, data.item_community)
  rng = np.random.default_rng(0)
  shuffled = gh.bipartite_modularity(pairs, u, i, rng.permutation(data.user_community),
                                     rng.permutation(data.item_community))
  assert planted > shuffled + 0.5  # The planted partition beats random ones of its sizes.
  assert found >= planted - 1e-9


def test_graph_hash_maps_every_id_to_one_bucket_and_counts_buckets():
  pairs, dense = _random_pairs(2, 40, 30, 0.12)
  codes = gh.graph_hash(pairs, 40, 30, resolution=1.0, seed=3)
  cu, ci = gh.louvain_bipartite(pairs, 40, 30, resolution=1.0, seed=3)
  for side, c, labels, degree in (("user", codes.user, cu, dense.sum(1)),
                                  ("item", codes.item, ci, dense.sum(0))):
    buckets = getattr(codes, f"n_{side}_buckets")
    assert c.shape == labels.shape and c.dtype == np.int32
    assert c.min() == 0 and c.max() == buckets - 1
    assert set(c.tolist()) == set(range(buckets))  # Every row of the table is used.
    active = degree > 0
    # The documented rule: clusters met by interacting ids, plus one cold bucket.
    assert buckets == len(set(labels[active].tolist())) + (not active.all())
    assert np.all(c[~active] == buckets - 1)
    # Two interacting ids share a bucket exactly when Louvain put them in one cluster.
    same_code = c[active][:, None] == c[active][None, :]
    same_label = labels[active][:, None] == labels[active][None, :]
    np.testing.assert_array_equal(same_code, same_label)
  again = gh.graph_hash(pairs, 40, 30, resolution=1.0, seed=3)
  np.testing.assert_array_equal(again.user, codes.user)
  np.testing.assert_array_equal(again.item, codes.item)


def test_graph_hash_recovers_sbm_communities_and_bigger_resolution_gives_more_buckets():
  data = _sbm(1)
  codes = gh.graph_hash(data.train_pairs, data.n_users, data.n_items, seed=0)
  assert codes.n_user_buckets == codes.n_item_buckets == 6
  # Buckets are the planted communities, up to a few users with mostly foreign items.
  majority = sum(np.bincount(data.user_community[codes.user == b]).max() for b in range(6))
  assert majority >= 0.97 * data.n_users
  fine = gh.graph_hash(data.train_pairs, data.n_users, data.n_items, resolution=30.0, seed=0)
  assert fine.table_rows > 3 * codes.table_rows
  rate, sized = gh.resolution_for_budget(data.train_pairs, data.n_users, data.n_items, 100,
                                         iterations=5)
  assert 12 <= sized.table_rows <= 100 and rate > 0


def test_table_accounting_closed_forms():
  codes = gh.modulo_hash(1000, 600, 10, 6)
  assert codes.table_rows == 16
  assert codes.size_reduction == pytest.approx(1 - 16 / 1600)
  assert codes.param_bytes(32) == 16 * 32 * 4
  assert codes.param_bytes(32, jnp.bfloat16) == 16 * 32 * 2
  full = gh.identity_hash(1000, 600)
  assert full.table_rows == 1600 and full.size_reduction == 0.0


@pytest.mark.parametrize("n,b", [(23, 5), (40, 8), (7, 7), (9, 1)])
def test_modulo_collisions_match_the_closed_form(n, b):
  codes = gh.modulo_hash(n, n, b, b)
  q, r = divmod(n, b)
  closed = r * math.comb(q + 1, 2) + (b - r) * math.comb(q, 2)
  brute = sum(codes.user[x] == codes.user[y] for x in range(n) for y in range(x + 1, n))
  assert gh.collision_pairs(codes.user) == brute == closed
  np.testing.assert_array_equal(codes.item, np.arange(n) % b)


def test_frequency_hash_gives_the_most_frequent_ids_their_own_rows():
  pairs, dense = _random_pairs(4, 30, 25, 0.2)
  codes = gh.frequency_hash(pairs, 30, 25, 8, 6, cutoff=0.5)
  for c, degree, buckets in ((codes.user, dense.sum(1), 8), (codes.item, dense.sum(0), 6)):
    k = buckets // 2
    order = sorted(range(degree.size), key=lambda x: (-degree[x], x))
    for rank, x in enumerate(order):
      assert c[x] == (buckets - k + rank if rank < k else x % (buckets - k))


def test_universal_and_double_hash():
  ids = np.arange(5000)
  h = gh.universal_hash(ids, 37, seed=0)
  assert h.min() >= 0 and h.max() < 37
  np.testing.assert_array_equal(h, gh.universal_hash(ids, 37, seed=0))
  assert not np.array_equal(h, gh.universal_hash(ids, 37, seed=1))
  assert np.bincount(h, minlength=37).min() > 0.5 * 5000 / 37  # Spread over all buckets.

  graph = gh.modulo_hash(20, 15, 4, 3)
  double = gh.double_graph_hash(graph, seed=5)
  assert double.user.shape == (20, 2) and double.item.shape == (15, 2)
  np.testing.assert_array_equal(double.user[:, 1], graph.user)
  params = gh.init_params(jax.random.key(0), double, 6)
  users = jnp.arange(20)
  emb = gh.lookup(params["user"], jnp.asarray(double.user), users)
  # Double hashing sums the two rows.
  expected = params["user"][double.user[:, 0]] + params["user"][double.user[:, 1]]
  np.testing.assert_allclose(emb, expected, rtol=1e-6)


def _numpy_bpr(user_table, item_table, batch):
  u = user_table[batch["users"]]
  s_pos = np.sum(u * item_table[batch["pos_items"]], -1)
  s_neg = np.einsum("bd,bmd->bm", u, item_table[batch["neg_items"]])
  return np.mean(np.logaddexp(0.0, s_neg - s_pos[:, None]))


def test_identity_hash_is_the_full_model_and_hashing_ties_rows():
  n_users, n_items, dim = 12, 9, 5
  pairs, _ = _random_pairs(5, n_users, n_items, 0.4)
  batch = ultragcn.sample_batch(jax.random.key(1), jnp.asarray(pairs), n_items, 16, 3)
  full = gh.identity_hash(n_users, n_items)
  params = gh.init_params(jax.random.key(2), full, dim)
  assert params["user"].shape == (n_users, dim) and params["item"].shape == (n_items, dim)
  bound = math.sqrt(6 / (n_users + dim))
  assert float(jnp.abs(params["user"]).max()) <= bound
  loss, grads = _loss_and_grad(params, batch, full.arrays())
  np64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  np.testing.assert_allclose(loss, _numpy_bpr(np64["user"], np64["item"],
                                              jax.tree.map(np.asarray, batch)), rtol=1e-5)
  # Unhashed scores are plain MF (UltraGCN's inference is the same dot product).
  users = jnp.arange(n_users)
  np.testing.assert_allclose(_score(params, full.arrays(), users),
                             ultragcn.score_users(params, users), rtol=1e-6)

  # A hashed model is the MF whose full tables repeat rows: same loss and scores, and the
  # gradient of a bucket is the sum of its ids' full-table gradients.
  codes = gh.modulo_hash(n_users, n_items, 4, 3)
  small = gh.init_params(jax.random.key(3), codes, dim)
  expanded = {"user": small["user"][codes.user], "item": small["item"][codes.item]}
  loss_h, grads_h = _loss_and_grad(small, batch, codes.arrays())
  loss_e, grads_e = _loss_and_grad(expanded, batch, full.arrays())
  np.testing.assert_allclose(loss_h, loss_e, rtol=1e-6)
  for side, n_buckets in (("user", 4), ("item", 3)):
    summed = jax.ops.segment_sum(grads_e[side], jnp.asarray(getattr(codes, side)), n_buckets)
    np.testing.assert_allclose(grads_h[side], summed, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(_score(small, codes.arrays(), users),
                             ultragcn.score_users(expanded, users), rtol=1e-6)
  assert grads["user"].shape == (n_users, dim)


def test_bad_inputs_raise():
  pairs, _ = _random_pairs(6, 5, 4, 0.5)
  with pytest.raises(ValueError, match="train_pairs"):
    gh.graph_hash(pairs[:, :1], 5, 4)
  with pytest.raises(ValueError, match="train_pairs ids"):
    gh.graph_hash(pairs, 2, 4)
  with pytest.raises(ValueError, match="resolution"):
    gh.graph_hash(pairs, 5, 4, resolution=0.0)
  with pytest.raises(ValueError, match="user_labels"):
    gh.bipartite_modularity(pairs, 5, 4, np.zeros(3, int), np.zeros(4, int))
  with pytest.raises(ValueError, match="without edges"):
    gh.bipartite_modularity(np.zeros((0, 2), int), 5, 4, np.zeros(5, int), np.zeros(4, int))
  with pytest.raises(ValueError, match="n_user_buckets"):
    gh.modulo_hash(5, 4, 0, 2)
  with pytest.raises(ValueError, match="n_item_buckets"):
    gh.frequency_hash(pairs, 5, 4, 2, 5)
  with pytest.raises(ValueError, match="cutoff"):
    gh.frequency_hash(pairs, 5, 4, 2, 2, cutoff=1.0)
  with pytest.raises(ValueError, match="user codes"):
    gh.HashCodes(np.array([0, 3], np.int32), np.array([0], np.int32), 3, 1)
  with pytest.raises(ValueError, match="max_rows"):
    gh.resolution_for_budget(pairs, 5, 4, 1)
  with pytest.raises(ValueError, match="dim"):
    gh.init_params(jax.random.key(0), gh.identity_hash(5, 4), 0)
  with pytest.raises(ValueError, match="batch"):
    gh.bpr_loss(gh.init_params(jax.random.key(0), gh.identity_hash(5, 4), 2),
                {"users": jnp.zeros(3, int), "pos_items": jnp.zeros(3, int),
                 "neg_items": jnp.zeros(3, int)}, gh.identity_hash(5, 4).arrays())


@pytest.mark.parametrize("field,value,match", [
    ("methods", ("graph", "lsh"), "config.methods"),
    ("hash.sweep_sizes", (0.5, 1.5), "sweep_sizes"),
    ("hash.frequency_cutoff", 1.0, "frequency_cutoff"),
    ("batch_size", -1, "batch_size"),
    ("data.source", "interactions", "data.path"),
])
def test_check_config_rejects_values_that_do_not_fit(field, value, match):
  config = graphhash_config.get_config("smoke")
  parent, _, leaf = field.rpartition(".")
  (common.get_field(config, parent) if parent else config)[leaf] = value
  with pytest.raises(common.ConfigError, match=match):
    driver.check_config(config)
  driver.check_config(graphhash_config.get_config("smoke"))


def test_lookup_is_a_numpy_gather_and_singleton_clusters_are_the_full_table():
  table = np.asarray(jax.random.normal(jax.random.key(0), (7, 3)), np.float32)
  codes = np.random.default_rng(0).integers(0, 7, 40).astype(np.int32)
  ids = np.random.default_rng(1).integers(0, 40, (5, 4))
  got = gh.lookup(jnp.asarray(table), jnp.asarray(codes), jnp.asarray(ids))
  assert got.shape == (5, 4, 3)
  np.testing.assert_array_equal(got, table[codes[ids]])
  # Every id its own cluster: the codes are the identity, so the model is the full MF.
  pairs, dense = _random_pairs(7, 9, 8, 0.5)
  pairs = np.concatenate([pairs, [[8, 7]]])  # No isolated ids: no cold bucket.
  single = gh.codes_from_clusters(pairs, 9, 8, np.arange(9), 9 + np.arange(8))
  full = gh.identity_hash(9, 8)
  np.testing.assert_array_equal(single.user, full.user)
  np.testing.assert_array_equal(single.item, full.item)
  assert single.table_rows == full.table_rows


def test_driver_settings_share_bucket_counts_and_meet_the_sweep_budget():
  config = graphhash_config.get_config("smoke")
  config.methods = ("full", "graph", "modulo", "frequency", "double_graph")
  config.hash.sweep_sizes = (0.25,)
  data = _sbm(2)
  lists = {"louvain_seconds": [], "modularity/louvain": [], "modularity/planted": []}
  settings = dict(driver._settings(config, data, 0, lists))
  assert list(settings) == [driver.MAIN, "size0.25"]
  main = settings[driver.MAIN]
  assert set(main) == set(config.methods)
  graph = main["graph"]
  for method in ("modulo", "frequency", "double_graph"):
    assert (main[method].n_user_buckets, main[method].n_item_buckets) == (
        graph.n_user_buckets, graph.n_item_buckets)
  assert main["full"].table_rows == data.n_users + data.n_items
  sweep = settings["size0.25"]
  assert set(sweep) == {"graph", "modulo", "frequency"}
  assert graph.table_rows < sweep["graph"].table_rows <= 0.25 * (data.n_users + data.n_items)
  assert lists["modularity/louvain"][0] >= lists["modularity/planted"][0] - 1e-9
