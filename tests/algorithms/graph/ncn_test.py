"""Oracle tests for NCN / NCNC: dense-adjacency references, symmetry, padding, TLR, seeds."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from jaxrepro.algorithms.graph import ncn
from jaxrepro.configs import common
from jaxrepro.launch import train_loop
from jaxrepro.launch.data import graphs
from jaxrepro.launch.experiments import ncn as driver

N, F, H = 12, 5, 8


def _graph(seed=0, n=N, p=0.35):
  """A random simple graph with the last node isolated, its dense A and a GraphsTuple."""
  rng = np.random.default_rng(seed)
  upper = np.triu(rng.random((n, n)) < p, 1)
  upper[:, -1] = False
  edges = np.argwhere(upper).astype(np.int32)
  dense = (upper | upper.T).astype(np.float64)
  g = graphs.Graph(edges=edges, n_nodes=n,
                   features=rng.normal(size=(n, F)).astype(np.float32))
  return g, dense


def _all_pairs(n=N):
  return jnp.asarray(np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"),
                              -1).reshape(-1, 2), jnp.int32)


def _setup(kind, seed=0, **predictor_kwargs):
  g, dense = _graph(seed)
  model = ncn.LinkModel(F, H, predictor=kind, predictor_kwargs=predictor_kwargs,
                        rngs=nnx.Rngs(seed))
  gt = jax.tree.map(jnp.asarray, graphs.to_graphs_tuple(g))
  lists = ncn.neighbor_lists(g.senders, g.receivers, N)
  return g, dense, model, gt, lists


# ---------------------------------------------------------------- NumPy references


def _np(x):
  return np.asarray(x, np.float64)


def _np_mlp(mlp, x):
  """`_MLP` forward in NumPy (no dropout): [Linear -> LayerNorm? -> ReLU]* -> Linear?."""
  for block in mlp.blocks:
    x = x @ _np(block.linear.kernel[...]) + _np(block.linear.bias[...])
    if block.norm is not None:
      mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
      x = (x - mu) / np.sqrt(var + 1e-5) * _np(block.norm.scale[...]) + _np(
          block.norm.bias[...])
    x = np.maximum(x, 0.0)
  if mlp.final is not None:
    x = x @ _np(mlp.final.kernel[...]) + _np(mlp.final.bias[...])
  return x


def _np_logits(pred, h, dense, pairs, xcn_fn=None):
  """Dense reference of `pair_logits`: CN sums as `(A[i] * A[j]) @ x`."""
  pairs = np.asarray(pairs)
  i, j = pairs[:, 0], pairs[:, 1]
  z = _np_mlp(pred.xijlin, h[i] * h[j])
  if pred.kind != "gae":
    x = h if pred.xlin is None else h + _np_mlp(pred.xlin, h)
    xcn = (dense[i] * dense[j]) @ x
    if xcn_fn is not None:
      xcn = xcn + xcn_fn(i, j, x)
    z = z + _np_mlp(pred.xcnlin, xcn) * float(pred.beta[...])
  return _np_mlp(pred.lin, z)[:, 0]


def _np_calibrate(logits, c):
  p0 = 1.0 / (1.0 + np.exp(-c.scale * (logits - c.offset)))
  return c.alpha * c.pt * p0 / (c.pt * p0 + 1.0 - p0)


_encode = jax.jit(lambda m, g, mask=None: ncn.encode(m, g, edge_mask=mask))
_logits = jax.jit(lambda m, h, lists, pairs, completion=None: ncn.pair_logits(
    m, h, lists, pairs, completion=completion), static_argnames="completion")


# ------------------------------------------------------------------------------- tests


def test_neighbour_sets_match_dense_adjacency():
  g, dense = _graph(1)
  lists = ncn.neighbor_lists(g.senders, g.receivers, N)
  assert lists.neighbors.shape == (N, int(dense.sum(1).max()))
  pairs = _all_pairs()
  h = np.random.default_rng(0).normal(size=(N, 3))
  h_pad = np.concatenate([h, np.zeros((1, 3))])
  common, only_i, only_j = jax.jit(ncn.pair_neighbor_masks)(
      lists, ncn.slot_mask(lists), pairs)
  nb = np.asarray(lists.neighbors)
  i, j = np.asarray(pairs).T
  for mask, rows, ref in ((common, i, dense[i] * dense[j]),
                          (only_i, i, dense[i] * (1 - dense[j])),
                          (only_j, j, dense[j] * (1 - dense[i]))):
    got = np.einsum("pd,pdh->ph", np.asarray(mask, np.float64), h_pad[nb[rows]])
    np.testing.assert_allclose(got, ref @ h, atol=1e-12)
  # The CN heuristic is the count, (A A)_ij; it is symmetric and not vacuous.
  counts = np.asarray(ncn.common_neighbor_counts(lists, pairs)).reshape(N, N)
  np.testing.assert_array_equal(counts, dense @ dense)
  assert counts[~np.eye(N, dtype=bool)].max() >= 2


def test_edge_mask_removes_edges_from_the_neighbour_sets():
  g, dense = _graph(2)
  lists = ncn.neighbor_lists(g.senders, g.receivers, N)
  drop = np.array([0, 3, len(g.edges) - 1])
  mask = ncn.target_link_mask(jnp.asarray(drop), len(g.edges))
  # Both directions of every batch positive are gone, nothing else.
  expected = np.ones(2 * len(g.edges), bool)
  expected[drop] = expected[drop + len(g.edges)] = False
  np.testing.assert_array_equal(mask, expected)
  reduced = dense.copy()
  reduced[g.edges[drop, 0], g.edges[drop, 1]] = 0
  reduced[g.edges[drop, 1], g.edges[drop, 0]] = 0
  counts = ncn.common_neighbor_counts(lists, _all_pairs(), mask)
  np.testing.assert_array_equal(np.asarray(counts).reshape(N, N), reduced @ reduced)
  assert not np.array_equal(reduced @ reduced, dense @ dense)


def test_puregcn_encoder_matches_dense_propagation_with_target_link_removal():
  g, dense, model, gt, _ = _setup("ncn", 3)
  drop = jnp.asarray([1, 4])
  mask = ncn.target_link_mask(drop, len(g.edges))
  reduced = dense.copy()
  for e in (1, 4):
    a, b = g.edges[e]
    reduced[a, b] = reduced[b, a] = 0
  a_hat = reduced + np.eye(N)
  d = a_hat.sum(1)
  a_hat = a_hat / np.sqrt(np.outer(d, d))
  lin = model.encoder.input
  ref = a_hat @ (_np(g.features) @ _np(lin.kernel[...]) + _np(lin.bias[...]))
  np.testing.assert_allclose(_encode(model, gt, mask), ref, rtol=1e-4, atol=1e-5)


def test_gae_scores_equal_the_dot_product_reference():
  _, dense, model, gt, lists = _setup("gae", 4, layer_norm=False, tailact=True)
  pairs = _all_pairs()
  h = _np(_encode(model, gt))
  # The general case: MLP_out(MLP_ij(h_i * h_j)), lists unused.
  np.testing.assert_allclose(_logits(model, jnp.asarray(h, jnp.float32), lists, pairs),
                             _np_logits(model.predictor, h, dense, pairs),
                             rtol=1e-4, atol=1e-5)
  # With weights making both MLPs pass the Hadamard sum through ReLU as
  # relu(s) - relu(-s), GAE scores are exactly the inner products <h_i, h_j>.
  pred = model.predictor
  w = np.zeros((H, H), np.float32)
  w[:, 0], w[:, 1] = 1.0, -1.0
  pred.xijlin.blocks[0].linear.kernel[...] = jnp.asarray(w)
  pred.lin.blocks[0].linear.kernel[...] = jnp.eye(H)
  pred.lin.blocks[0].linear.bias[...] = jnp.zeros(H)
  out = np.zeros((H, 1), np.float32)
  out[0], out[1] = 1.0, -1.0
  pred.lin.final.kernel[...] = jnp.asarray(out)
  pred.lin.final.bias[...] = jnp.zeros(1)
  got = _logits(model, jnp.asarray(h, jnp.float32), lists, pairs)
  i, j = np.asarray(pairs).T
  np.testing.assert_allclose(got, np.sum(h[i] * h[j], -1), rtol=1e-4, atol=1e-5)


def test_ncn_scores_match_dense_reference_and_are_symmetric():
  _, dense, model, gt, lists = _setup("ncn", 5, use_xlin=True)
  model.predictor.beta[...] = jnp.float32(1.7)
  pairs = _all_pairs()
  h = _encode(model, gt)
  got = np.asarray(_logits(model, h, lists, pairs))
  ref = _np_logits(model.predictor, _np(h), dense, pairs)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  got = got.reshape(N, N)
  np.testing.assert_allclose(got, got.T, rtol=1e-5, atol=1e-5)


def test_ncnc_completion_matches_dense_reference():
  _, dense, model, gt, lists = _setup("ncnc", 6, use_xlin=True)
  comp = ncn.Completion(depth=1, scale=2.0, offset=0.3, pt=0.7, alpha=1.3,
                        train_resdeg=-1, test_resdeg=-1)
  pairs = _all_pairs()
  h = _encode(model, gt)
  pred, hn = model.predictor, _np(h)
  # p_uv for every pair from the NCN score of the same weights (no completion).
  prob = _np_calibrate(_np_logits(pred, hn, dense, pairs).reshape(N, N), comp)

  def completed(i, j, x):
    return ((dense[i] * (1 - dense[j]) * prob[j]) @ x
            + (dense[j] * (1 - dense[i]) * prob[i]) @ x)

  got = np.asarray(_logits(model, h, lists, pairs, comp))
  ref = _np_logits(pred, hn, dense, pairs, completed)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
  # The completion is not vacuous, and the pair score stays symmetric.
  ncn_ref = _np_logits(pred, hn, dense, pairs)
  assert np.abs(ref - ncn_ref).max() > 1e-2
  np.testing.assert_allclose(got.reshape(N, N), got.reshape(N, N).T, atol=1e-4)
  # alpha = 0 switches the completion off: NCNC equals NCN.
  off = ncn.Completion(depth=1, alpha=0.0, train_resdeg=-1, test_resdeg=-1)
  np.testing.assert_allclose(_logits(model, h, lists, pairs, off), ncn_ref,
                             rtol=1e-4, atol=1e-4)


def test_calibration_limits():
  logits = jnp.linspace(-4.0, 6.0, 11)
  np.testing.assert_allclose(ncn.calibrate_probabilities(logits, 1.0, 0.0, 1.0, 1.0),
                             jax.nn.sigmoid(logits), rtol=1e-6)
  c = ncn.Completion(scale=4.3, offset=2.8, pt=0.75, alpha=0.9)
  np.testing.assert_allclose(
      ncn.calibrate_probabilities(logits, c.scale, c.offset, c.pt, c.alpha),
      _np_calibrate(np.asarray(logits, np.float64), c), rtol=1e-5)


def test_candidate_sampling_keeps_at_most_resdeg_and_is_unbiased():
  rng = np.random.default_rng(7)
  mask = rng.random((6, 20)) < np.array([0.0, 0.1, 0.2, 0.5, 0.8, 1.0])[:, None]
  values = rng.normal(size=(6, 20))
  sample = jax.jit(lambda k: ncn.sample_candidates(k, jnp.asarray(mask), 4))
  slots, weights = sample(jax.random.key(0))
  assert slots.shape == weights.shape == (6, 4)
  count = mask.sum(1)
  taken = np.take_along_axis(mask, np.asarray(slots), 1)
  # Every used draw is a candidate; small rows are kept whole with weight 1.
  assert np.all(taken[np.asarray(weights) > 0])
  np.testing.assert_allclose(np.asarray(weights).sum(1), count, rtol=1e-6)
  for r in np.flatnonzero(count <= 4):
    assert sorted(np.asarray(slots)[r][: count[r]]) == list(np.flatnonzero(mask[r]))
  # The weighted sum over the draws is an unbiased estimate of the candidates' sum.
  keys = jax.random.split(jax.random.key(1), 2000)
  s, w = jax.vmap(sample)(keys)
  draws = (np.asarray(w) * np.take_along_axis(values[None].repeat(2000, 0), np.asarray(s),
                                              2)).sum(2)
  # Within 4 standard errors of the exact sum (exact for the rows that are not sampled).
  err = np.abs(draws.mean(0) - (values * mask).sum(1))
  assert np.all(err <= 4 * draws.std(0) / np.sqrt(2000) + 1e-9), err
  # resdeg >= D (or <= 0) keeps every slot without a key.
  slots, weights = ncn.sample_candidates(None, jnp.asarray(mask), -1)
  np.testing.assert_array_equal(weights, mask.astype(np.float32))


def test_relabelling_nodes_permutes_scores():
  g, _, model, gt, lists = _setup("ncnc", 8)
  comp = ncn.Completion(train_resdeg=-1, test_resdeg=-1)
  perm = np.random.default_rng(0).permutation(N)
  inv = np.argsort(perm)  # new id of old node v is inv[v]
  g2 = graphs.Graph(edges=np.sort(inv[g.edges], 1), n_nodes=N, features=g.features[perm])
  gt2 = jax.tree.map(jnp.asarray, graphs.to_graphs_tuple(g2))
  lists2 = ncn.neighbor_lists(g2.senders, g2.receivers, N)
  pairs = _all_pairs()
  a = _logits(model, _encode(model, gt), lists, pairs, comp)
  b = _logits(model, _encode(model, gt2), lists2, jnp.asarray(inv)[pairs], comp)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_padding_changes_nothing():
  g, _, model, gt, lists = _setup("ncnc", 9)
  comp = ncn.Completion(train_resdeg=-1, test_resdeg=-1)
  pairs = _all_pairs()
  ref = _logits(model, _encode(model, gt), lists, pairs, comp)
  # Isolated zero-feature padding nodes, wider neighbour lists (extra sentinel slots) and
  # pair chunks padded to a multiple of `chunk` (144 pairs in chunks of 25).
  n_pad, extra = N + 4, 3
  g_pad = graphs.Graph(edges=g.edges, n_nodes=n_pad, features=np.concatenate(
      [g.features, np.zeros((4, F), np.float32)]))
  gt_pad = jax.tree.map(jnp.asarray, graphs.to_graphs_tuple(g_pad))
  lp = ncn.neighbor_lists(g_pad.senders, g_pad.receivers, n_pad)
  lp = ncn.NeighborLists(
      jnp.pad(lp.neighbors, ((0, 0), (0, extra)), constant_values=n_pad),
      jnp.pad(lp.edge_ids, ((0, 0), (0, extra)), constant_values=len(g.senders)))
  got = ncn.score_pairs(model, gt_pad, lp, pairs, completion=comp, chunk=25)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_training_is_deterministic_per_seed():
  g, _ = _graph(10, n=16)
  task = driver.Task(g, graphs.EdgeSplit(g.edges[:2], g.edges[2:4], g.edges[4:6],
                                         np.array([[0, 15]]), np.array([[1, 15]])))
  tx = driver.create_optimizer(ml_collections.ConfigDict(dict(gnn_lr=1e-2, pred_lr=1e-2)))

  def init(seed):
    return nnx.split(ncn.LinkModel(F, H, predictor="ncn", rngs=nnx.Rngs(seed)))

  graphdef, _ = init(0)

  def loss_fn(p, batch, key):
    return ncn.link_loss(nnx.merge(graphdef, p), task.graph, task.lists, batch, key)

  # One compiled step for every run: the seeds differ only in the initial state.
  step = jax.jit(train_loop.make_train_step(loss_fn, tx, batch_fn=lambda key: (
      ncn.sample_link_batch(key, task.train_edges, 16, 8))))

  def run(seed):
    state = train_loop.TrainState.create(init(seed)[1], tx, jax.random.key(seed))
    losses = []
    for _ in range(3):
      state, m = step(state)
      losses.append(float(m["loss"]))
    return losses, jax.tree.leaves(state.params)

  (l0, p0), (l0b, p0b), (l1, _) = run(0), run(0), run(1)
  assert l0 == l0b
  for a, b in zip(p0, p0b):
    np.testing.assert_array_equal(a, b)
  assert l0 != l1


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="duplicated"):
    ncn.neighbor_lists(np.array([0, 0]), np.array([1, 1]), 3)
  with pytest.raises(ValueError, match="outside"):
    ncn.neighbor_lists(np.array([0]), np.array([3]), 3)
  _, _, model, gt, lists = _setup("ncnc", 11)
  h = _encode(model, gt)
  with pytest.raises(ValueError, match="completion"):
    ncn.pair_logits(model, h, lists, _all_pairs()[:4])
  with pytest.raises(ValueError, match=r"\[P, 2\]"):
    ncn.pair_logits(model, h, lists, jnp.zeros((4, 3), jnp.int32),
                    completion=ncn.Completion())
  with pytest.raises(ValueError, match="kind"):
    ncn.Predictor(H, kind="seal", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="pt"):
    ncn.Completion(pt=0.0)
  with pytest.raises(ValueError, match="key"):
    ncn.sample_candidates(None, jnp.ones((2, 5), bool), 2)
  # Test-time candidate sampling (resdeg below the largest degree) needs a key.
  comp = ncn.Completion(test_resdeg=1)
  with pytest.raises(ValueError, match="key"):
    ncn.score_pairs(model, gt, lists, _all_pairs()[:4], completion=comp)
  assert np.all(np.isfinite(ncn.score_pairs(model, gt, lists, _all_pairs()[:4],
                                            completion=comp, key=jax.random.key(0))))


def test_driver_rejects_inconsistent_configs():
  config = driver.experiment.config_module("ncn").get_config("smoke")
  driver.check_config(config)
  bad = config.copy_and_resolve_references()
  bad.settings.incomplete.methods = "cn,seal"
  with pytest.raises(common.ConfigError, match="seal"):
    driver.check_config(bad)
  bad = config.copy_and_resolve_references()
  bad.data.n_negatives = 10
  with pytest.raises(common.ConfigError, match="n_negatives"):
    driver.check_config(bad)
