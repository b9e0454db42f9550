"""Tests of the seeded graph generators: determinism, sizes, block structure."""

import collections
import pickle

import numpy as np
import pytest
import scipy.sparse as sp

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


# ----------------------------------------------------------------------------------------
# Node-level generators, molecules, conversion, splits and loaders.


def _graph_fields_equal(a, b):
  return all((getattr(a, f) is None and getattr(b, f) is None)
             or np.array_equal(getattr(a, f), getattr(b, f))
             for f in ("edges", "features", "labels", "positions", "node_types", "edge_types"))


def _is_canonical(edges, n):
  return (edges.dtype == np.int32 and np.all(edges[:, 0] < edges[:, 1]) and edges.min() >= 0
          and edges.max() < n and len(np.unique(edges, axis=0)) == len(edges)
          and np.all(np.diff(edges[:, 0].astype(np.int64) * n + edges[:, 1]) > 0))


def test_triangle_index_decoding_matches_triu_indices():
  for n in (2, 3, 7, 50, 1001):
    i, j = graphs._triangle_index_to_pair(np.arange(n * (n - 1) // 2), n)
    ii, jj = np.triu_indices(n, 1)
    np.testing.assert_array_equal(i, ii)
    np.testing.assert_array_equal(j, jj)
  n = 200_000  # Large n: the last index still decodes to the last pair.
  i, j = graphs._triangle_index_to_pair(np.array([n * (n - 1) // 2 - 1]), n)
  assert (i[0], j[0]) == (n - 2, n - 1)


@pytest.fixture(scope="module")
def stable_sbm():
  return graphs.sbm(0)


def test_sbm_determinism_sizes_homophily_and_features(stable_sbm):
  g = stable_sbm
  assert _graph_fields_equal(g, graphs.sbm(0))
  assert not _graph_fields_equal(g, graphs.sbm(1))
  assert g.n_nodes == 1000 and g.features.shape == (1000, 300)
  assert g.features.dtype == np.float32 and g.labels.dtype == np.int32
  assert np.bincount(g.labels).tolist() == [250] * 4
  assert _is_canonical(g.edges, 1000)
  expected_degree = 0.012 * 249 + 0.0008 * 750
  assert abs(2 * len(g.edges) / 1000 - expected_degree) < 0.1 * expected_degree
  expected_h = 0.012 * 249 / expected_degree
  assert abs(graphs.edge_homophily(g.edges, g.labels) - expected_h) < 0.04
  # Bag of words: a word is on with probability 0.06 in its topic's class, else 0.015.
  rates = np.array([g.features[g.labels == c].mean(0) for c in range(4)])   # [C, F]
  in_topic = rates.max(0)
  assert abs(in_topic.mean() - 0.06) < 0.006
  assert abs((rates.sum(0) - in_topic).mean() / 3 - 0.015) < 0.003


def test_sbm_edge_probabilities_are_exact_on_average():
  n_in = n_out = 0
  for seed in range(300):
    g = graphs.sbm(seed, n_nodes=8, n_classes=2, p_in=0.5, p_out=0.2, features="none")
    same = g.labels[g.edges[:, 0]] == g.labels[g.edges[:, 1]]
    n_in += same.sum()
    n_out += (~same).sum()
  assert g.features is None
  # 2 classes of 4: 12 same-class and 16 cross-class pairs per graph.
  assert abs(n_in / (300 * 12) - 0.5) < 0.03
  assert abs(n_out / (300 * 16) - 0.2) < 0.025


def test_heterophilous_cora_sized_and_gaussian_sbms():
  h = graphs.heterophilous_sbm(0, n_nodes=1200, n_classes=4, avg_degree=10, homophily=0.1,
                               features="gaussian", n_features=16, mean_scale=2.0)
  assert abs(graphs.edge_homophily(h.edges, h.labels) - 0.1) < 0.03
  assert abs(2 * len(h.edges) / 1200 - 10) < 0.5
  means = np.array([h.features[h.labels == c].mean(0) for c in range(4)])
  within = np.mean([h.features[h.labels == c].std(0).mean() for c in range(4)])
  assert abs(within - 1.0) < 0.1 and np.std(means, axis=0).mean() > 1.0
  c = graphs.cora_sized_sbm(0)
  assert c.n_nodes == 2708 and c.features.shape == (2708, 1433) and c.labels.max() == 6
  assert abs(2 * len(c.edges) / 2708 - 3.9) < 0.3
  assert abs(graphs.edge_homophily(c.edges, c.labels) - 0.81) < 0.03
  assert abs(c.features.sum(1).mean() - 18) < 1.5
  p_in, p_out = graphs.sbm_probabilities(1000, 4, 10.0, 0.25)
  assert p_in * 249 + p_out * 750 == pytest.approx(10.0)
  assert p_in * 249 / 10.0 == pytest.approx(0.25)


def test_random_geometric_graph_respects_the_radius():
  g = graphs.random_geometric_graph(0, n_nodes=400, radius=0.08, n_features=8)
  assert _graph_fields_equal(g, graphs.random_geometric_graph(0, n_nodes=400, radius=0.08,
                                                              n_features=8))
  assert _is_canonical(g.edges, 400)
  dist = np.linalg.norm(g.positions[:, None] - g.positions[None], axis=-1)
  expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(dist <= 0.08, 1)))}
  assert set(map(tuple, g.edges.tolist())) == expected
  assert g.positions.min() >= 0 and g.positions.max() < 1
  assert g.features.shape == (400, 8) and abs(g.features.std() - 1) < 0.1
  # Uninformative by default: features are uncorrelated with positions.
  corr = np.corrcoef(np.concatenate([g.positions, g.features], 1).T)[:2, 2:]
  assert np.abs(corr).max() < 0.2
  informative = graphs.random_geometric_graph(0, n_nodes=400, radius=0.08, n_features=8,
                                              feature_signal=20.0)
  corr = np.corrcoef(np.concatenate([informative.positions, informative.features], 1).T)
  assert np.abs(corr[:2, 2:]).max() > 0.5
  ncn = graphs.random_geometric_graph(0)  # The NCN card's graph: average degree ~9.5.
  assert abs(2 * len(ncn.edges) / 1000 - 9.5) < 0.8


@pytest.mark.parametrize("hydrogens", [False, True])
def test_random_molecules_respect_valences_and_bond_lengths(hydrogens):
  mols = graphs.random_molecules(0, 150, hydrogens=hydrogens)
  again = graphs.random_molecules(0, 150, hydrogens=hydrogens)
  assert all(_graph_fields_equal(a, b) for a, b in zip(mols, again))
  errors, gaps = [], []
  for m in mols:
    heavy = int(np.sum(m.node_types > 0))
    assert 3 <= heavy <= 9 and (hydrogens or heavy == m.n_nodes)
    assert _is_canonical(m.edges, m.n_nodes) and set(m.edge_types.tolist()) <= {1, 2, 3}
    np.testing.assert_array_equal(m.features.argmax(1), m.node_types)
    used = np.zeros(m.n_nodes, int)
    np.add.at(used, m.edges[:, 0], m.edge_types)
    np.add.at(used, m.edges[:, 1], m.edge_types)
    valence = graphs.VALENCES[m.node_types]
    assert np.all(used <= valence) and np.all(used >= 1)
    if hydrogens:
      np.testing.assert_array_equal(used, valence)
      has_h = (m.node_types[m.edges[:, 0]] == 0) | (m.node_types[m.edges[:, 1]] == 0)
      assert np.all(m.edge_types[has_h] == 1)
    # Connected: a BFS from atom 0 reaches every atom.
    seen, frontier = {0}, [0]
    while frontier:
      a = frontier.pop()
      for b in m.edges[m.edges[:, 0] == a, 1].tolist() + m.edges[m.edges[:, 1] == a, 0].tolist():
        if b not in seen:
          seen.add(b)
          frontier.append(b)
    assert len(seen) == m.n_nodes
    target = np.array([graphs._bond_length(o, m.node_types[i], m.node_types[j])
                       for (i, j), o in zip(m.edges, m.edge_types)])
    length = np.linalg.norm(m.positions[m.edges[:, 0]] - m.positions[m.edges[:, 1]], axis=1)
    errors.append(np.abs(length - target))
    dist = np.linalg.norm(m.positions[:, None] - m.positions[None], axis=-1)
    bonded = np.eye(m.n_nodes, dtype=bool)
    bonded[m.edges[:, 0], m.edges[:, 1]] = bonded[m.edges[:, 1], m.edges[:, 0]] = True
    if (~bonded).any():
      gaps.append(dist[~bonded].min())
    np.testing.assert_allclose(m.positions.mean(0), 0.0, atol=1e-5)
  errors = np.concatenate(errors)
  assert np.median(errors) < 1e-3 and np.quantile(errors, 0.99) < 0.1 and errors.max() < 0.3
  assert min(gaps) > 0.9
  assert sum(len(m.edges) >= m.n_nodes for m in mols) > 30  # Rings occur.
  assert all(m.positions is None for m in graphs.random_molecules(0, 3, coordinates=False))


def test_to_graphs_tuple_single_and_batched():
  mols = graphs.random_molecules(1, 3)
  one = graphs.to_graphs_tuple(mols[0])
  m = len(mols[0].edges)
  assert one.n_edge.tolist() == [2 * m] and one.nodes.shape == (mols[0].n_nodes, 5)
  np.testing.assert_array_equal(one.senders[:m], mols[0].edges[:, 0])
  np.testing.assert_array_equal(one.senders[m:], mols[0].edges[:, 1])
  np.testing.assert_array_equal(one.receivers[:m], one.senders[m:])
  np.testing.assert_array_equal(one.edges, np.concatenate([mols[0].edge_types] * 2))
  batch = graphs.to_graphs_tuple(mols, positions=True)
  assert batch.n_node.tolist() == [g.n_nodes for g in mols]
  assert batch.nodes["positions"].shape == (sum(g.n_nodes for g in mols), 3)
  offset = mols[0].n_nodes
  np.testing.assert_array_equal(batch.senders[2 * m:2 * m + len(mols[1].edges)],
                                mols[1].edges[:, 0] + offset)
  bare = graphs.to_graphs_tuple(graphs.sbm(0, 20, 2, 0.3, 0.1, features="none"))
  assert bare.nodes.shape == (20, 0) and bare.edges is None
  with pytest.raises(ValueError, match="positions"):
    graphs.to_graphs_tuple(graphs.sbm(0, 20, 2, 0.3, 0.1), positions=True)


def test_node_split_counts_and_disjointness(stable_sbm):
  labels = stable_sbm.labels.copy()
  labels[:50] = -1
  s = graphs.node_split(0, labels, 100, 100, 600)
  assert (s.train.sum(), s.val.sum(), s.test.sum()) == (100, 100, 600)
  assert not (s.train & s.val).any() and not (s.train & s.test).any() \
      and not (s.val & s.test).any()
  assert not (s.train | s.val | s.test)[:50].any()
  rest = graphs.node_split(0, labels, 100, 100)
  assert rest.test.sum() == 950 - 200
  np.testing.assert_array_equal(s.train, graphs.node_split(0, labels, 100, 100, 600).train)
  planetoid = graphs.node_split(1, labels, 20, 500, 300, per_class=True)
  assert np.bincount(labels[planetoid.train]).tolist() == [20] * 4
  with pytest.raises(ValueError, match="n_val"):
    graphs.node_split(0, labels, 100, 900)


def test_edge_split_partitions_edges_and_samples_true_negatives():
  g = graphs.random_geometric_graph(0, n_nodes=300, radius=0.1, n_features=0)
  s = graphs.edge_split(0, g)
  m = len(g.edges)
  assert (len(s.val), len(s.test)) == (round(0.05 * m), round(0.1 * m))
  assert len(s.train) + len(s.val) + len(s.test) == m
  all_pairs = np.concatenate([s.train, s.val, s.test])
  assert len(np.unique(all_pairs, axis=0)) == m
  codes = lambda e: set((e[:, 0].astype(np.int64) * 300 + e[:, 1]).tolist())
  assert codes(all_pairs) == codes(g.edges)
  negatives = np.concatenate([s.val_negatives, s.test_negatives])
  assert len(s.val_negatives) == len(s.val) and len(s.test_negatives) == len(s.test)
  assert not codes(negatives) & codes(g.edges)
  assert len(codes(negatives)) == len(negatives) and np.all(negatives[:, 0] < negatives[:, 1])
  shared = graphs.edge_split(0, g, n_negatives=500)
  assert len(shared.val_negatives) == len(shared.test_negatives) == 500
  np.testing.assert_array_equal(s.test, graphs.edge_split(0, g).test)
  with pytest.raises(ValueError, match="val_fraction"):
    graphs.edge_split(0, g, 0.5, 0.5)


def _write_pickle(path, obj):
  """Protocol 2 with the module names the original (2016) Planetoid pickles use."""
  data = pickle.dumps(obj, protocol=2)
  for new, old in ((b"scipy.sparse._csr", b"scipy.sparse.csr"),
                   (b"numpy._core.multiarray", b"numpy.core.multiarray"),
                   (b"builtins", b"__builtin__")):
    data = data.replace(b"c" + new + b"\n", b"c" + old + b"\n")
  path.write_bytes(data)


def test_load_planetoid_on_tiny_files_with_a_test_index_gap(tmp_path):
  # 10 nodes: 0-5 in allx (0-2 labelled for training), tests 6, 8, 9 listed as 9, 6, 8;
  # node 7 is in the test range but has no features or label (Citeseer's situation).
  rng = np.random.default_rng(0)
  feats = (rng.random((10, 6)) < 0.4).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2, 1, -1, 0, 2])
  onehot = np.zeros((10, 3))
  onehot[np.arange(10)[labels >= 0], labels[labels >= 0]] = 1
  order = [9, 6, 8]
  parts = {"x": sp.csr_matrix(feats[:3]), "y": onehot[:3], "allx": sp.csr_matrix(feats[:6]),
           "ally": onehot[:6], "tx": sp.csr_matrix(feats[order]), "ty": onehot[order],
           "graph": collections.defaultdict(list, {0: [1, 2, 1], 1: [0], 2: [0, 2], 3: [4],
                                                   4: [3], 5: [], 6: [9], 9: [6], 8: []})}
  for name, obj in parts.items():
    _write_pickle(tmp_path / f"ind.tiny.{name}", obj)
  (tmp_path / "ind.tiny.test.index").write_text("9\n6\n8\n")
  g, split = graphs.load_planetoid(str(tmp_path), "tiny")
  expected = feats.copy()
  expected[7] = 0.0
  np.testing.assert_array_equal(g.features, expected)
  np.testing.assert_array_equal(g.labels, labels)
  assert g.edges.tolist() == [[0, 1], [0, 2], [3, 4], [6, 9]]   # Deduplicated, no loops.
  np.testing.assert_array_equal(np.flatnonzero(split.train), [0, 1, 2])
  np.testing.assert_array_equal(np.flatnonzero(split.test), [6, 8, 9])
  np.testing.assert_array_equal(np.flatnonzero(split.val), np.arange(3, 10))
  with pytest.raises(ValueError, match="ind.missing"):
    graphs.load_planetoid(str(tmp_path), "missing")


class _Exploit:
  def __reduce__(self):
    return (print, ("this must never run",))


def test_load_planetoid_refuses_arbitrary_pickled_callables(tmp_path):
  for name in graphs.PLANETOID_PARTS:
    _write_pickle(tmp_path / f"ind.bad.{name}", _Exploit())
  (tmp_path / "ind.bad.test.index").write_text("0\n")
  with pytest.raises(pickle.UnpicklingError, match="print"):
    graphs.load_planetoid(str(tmp_path), "bad")


def test_load_ogbl_on_tiny_files(tmp_path):
  raw = tmp_path / "raw"
  raw.mkdir()
  edges = np.array([[0, 1], [1, 2], [2, 0], [3, 4], [1, 0]])
  np.savetxt(raw / "edge.csv.gz", edges, fmt="%d", delimiter=",")
  np.savetxt(raw / "num-node-list.csv.gz", [6], fmt="%d")
  np.savetxt(raw / "node-feat.csv.gz", np.arange(12.0).reshape(6, 2), delimiter=",")
  g, split = graphs.load_ogbl(str(tmp_path))
  assert split is None and g.n_nodes == 6
  assert g.edges.tolist() == [[0, 1], [0, 2], [1, 2], [3, 4]]
  np.testing.assert_array_equal(g.features, np.arange(12.0).reshape(6, 2))
  folder = tmp_path / "split" / "time"
  folder.mkdir(parents=True)
  np.savez(folder / "train.npz", edge=edges[:3])
  np.savez(folder / "valid.npz", edge=edges[3:4], edge_neg=np.array([[0, 5], [2, 4]]))
  np.savez(folder / "test.npz", edge=edges[4:], edge_neg=np.array([[1, 5]]))
  g, split = graphs.load_ogbl(str(tmp_path))
  np.testing.assert_array_equal(split.train, edges[:3])
  np.testing.assert_array_equal(split.val_negatives, [[0, 5], [2, 4]])
  np.testing.assert_array_equal(split.test, [[1, 0]])  # As given: OGB evaluates it so.
  flat = tmp_path / "flat"
  flat.mkdir()
  np.savez(flat / "edge.npz", edge=edges)
  g, split = graphs.load_ogbl(str(flat))
  assert g.n_nodes == 5 and len(g.edges) == 4 and g.features is None and split is None
  with pytest.raises(ValueError, match="edge.csv"):
    graphs.load_ogbl(str(tmp_path / "split"))
  (tmp_path / "split" / "other").mkdir()
  with pytest.raises(ValueError, match="split="):
    graphs.load_ogbl(str(tmp_path))


def test_load_interactions_movielens_style_files(tmp_path):
  # MovieLens-1M `ratings.dat`: user::item::rating::timestamp, arbitrary raw ids.
  rows = [(10, 5, 5, 100), (10, 7, 4, 300), (10, 9, 2, 50), (10, 8, 4, 200), (10, 6, 5, 400),
          (20, 5, 4, 10), (20, 9, 5, 20), (20, 5, 5, 30), (30, 7, 1, 5)]
  path = tmp_path / "ratings.dat"
  path.write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
  d = graphs.load_interactions(str(path), min_rating=4, temporal=True, test_fraction=0.25)
  # User 30 has no rating >= 4 and item 9 survives only through user 20.
  assert (d.n_users, d.n_items) == (2, 5)
  # User 10 (id 0) keeps items 5, 7, 8, 6 (ids 0, 2, 3, 1); the latest (6, at t=400) is test.
  assert d.test_pairs.tolist() == [[0, 1]]
  assert d.train_pairs.tolist() == [[0, 0], [0, 2], [0, 3], [1, 0], [1, 4]]
  np.testing.assert_array_equal(d.item_popularity, [2, 0, 1, 1, 1])
  assert np.all(d.user_community == -1) and np.all(d.item_community == -1)
  # MovieLens-100k `u.data` (tabs) and a CSV with a header give the same interactions.
  tab = tmp_path / "u.data"
  tab.write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
  csv = tmp_path / "ratings.csv"
  csv.write_text("userId,movieId,rating,timestamp\n"
                 + "".join(f"{u},{i},{r},{t}\n" for u, i, r, t in rows))
  for other in (tab, csv):
    e = graphs.load_interactions(str(other), min_rating=4, temporal=True, test_fraction=0.25)
    np.testing.assert_array_equal(e.train_pairs, d.train_pairs)
  rand = graphs.load_interactions(str(path), test_fraction=0.5, seed=3)
  both = np.concatenate([rand.train_pairs, rand.test_pairs])
  assert len(np.unique(both, axis=0)) == len(both) == 8   # (20, 5) counted once.
  assert len(rand.test_pairs) == 3  # round(0.5 * 5) = 2 for user 10, 1 for user 20, 0 for 30.
  pairs_only = tmp_path / "pairs.txt"
  pairs_only.write_text("a x\nb y\n")
  with pytest.raises(ValueError, match="rating"):
    graphs.load_interactions(str(pairs_only), min_rating=4)
  with pytest.raises(ValueError, match="timestamp"):
    graphs.load_interactions(str(pairs_only), temporal=True)


def test_load_interactions_lightgcn_adjacency_files(tmp_path):
  (tmp_path / "train.txt").write_text("0 1 2 3\n1 0\n2 4 1\n")
  (tmp_path / "test.txt").write_text("0 4\n1 3 0\n2\n")
  d = graphs.load_interactions(str(tmp_path))
  assert (d.n_users, d.n_items) == (3, 5)
  assert d.train_pairs.tolist() == [[0, 1], [0, 2], [0, 3], [1, 0], [2, 1], [2, 4]]
  assert d.test_pairs.tolist() == [[0, 4], [1, 3]]   # (1, 0) is also in train: dropped.
  np.testing.assert_array_equal(d.item_popularity, [1, 2, 1, 1, 1])
  with pytest.raises(ValueError, match="test.txt"):
    (tmp_path / "test.txt").unlink()
    graphs.load_interactions(str(tmp_path))
