"""Oracle tests for STABLE: pruning and top-k refinement, the advanced GCN's propagation and
the contrastive loss against dense NumPy references, the card's limits, and determinism."""

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrepro.algorithms.graph import stable
from jaxrepro.configs import common
from jaxrepro.launch.experiments import stable as driver
from jaxrepro.models.graph import layers

N = 12


def _graph(seed=0, n=N, p=0.35):
  """A random undirected graph: `(pairs [M, 2] with i < j, dense [N, N] 0/1)`."""
  rng = np.random.default_rng(seed)
  upper = np.triu(rng.random((n, n)) < p, k=1)
  pairs = np.argwhere(upper).astype(np.int32)
  dense = (upper | upper.T).astype(np.float64)
  return pairs, dense


def _padded(pairs, extra=3):
  """`pairs` with `extra` padding rows (pointing at node 0) and the validity mask."""
  pad = np.zeros((len(pairs) + extra, 2), np.int32)
  pad[:len(pairs)] = pairs
  return jnp.asarray(pad), jnp.asarray(np.arange(len(pad)) < len(pairs))


def _dense_from_directed(senders, receivers, mask, n):
  """Dense `A[r, s]` counting every valid directed edge (so duplicates would show)."""
  a = np.zeros((n, n))
  for s, r, m in zip(np.asarray(senders), np.asarray(receivers), np.asarray(mask)):
    if m:
      a[r, s] += 1
  return a


def _cosine_matrix(z):
  z = np.asarray(z, np.float64)
  norm = np.linalg.norm(z, axis=1, keepdims=True)
  u = z / np.where(norm > 0, norm, 1.0)
  return u @ u.T


# ---------------------------------------------------------------------------- similarity


def test_jaccard_matches_set_formula_and_prunes_to_a_subgraph():
  pairs, _ = _graph(1)
  rng = np.random.default_rng(2)
  x = (rng.random((N, 20)) < 0.3).astype(np.float32)
  x[3] = 0.0  # a featureless node: 0/0 similarity keeps its edges (official NaN compare)
  padded, mask = _padded(pairs)
  sim = np.asarray(stable.jaccard_similarity(jnp.asarray(x), padded))[:len(pairs)]
  for (i, j), got in zip(pairs, sim):
    a, b = set(np.flatnonzero(x[i])), set(np.flatnonzero(x[j]))
    want = len(a & b) / len(a | b) if a | b else 1.0
    np.testing.assert_allclose(got, want, rtol=1e-6)
  threshold = float(np.median(sim))
  kept = np.asarray(stable.jaccard_keep(jnp.asarray(x), padded, mask, threshold))
  np.testing.assert_array_equal(kept[:len(pairs)], sim >= threshold)
  assert not kept[len(pairs):].any()  # padding rows never survive
  assert 0 < kept.sum() < len(pairs)  # the check is not vacuous


def test_cosine_pruning_matches_dense_reference():
  pairs, dense = _graph(3)
  z = np.random.default_rng(4).normal(size=(N, 6)).astype(np.float32)
  padded, mask = _padded(pairs)
  threshold = 0.1
  kept = np.asarray(stable.cosine_keep(jnp.asarray(z), padded, mask, threshold))
  # Dense reference: A_clean = A * [cos > threshold], read back at the pair positions.
  clean = dense * (_cosine_matrix(z) > threshold)
  np.testing.assert_array_equal(kept[:len(pairs)], clean[pairs[:, 0], pairs[:, 1]] > 0)
  assert not kept[len(pairs):].any()
  # A subgraph of the perturbed graph, and neither everything nor nothing.
  assert np.all(clean <= dense) and 0 < kept.sum() < len(pairs)


# ---------------------------------------------------------------------------- refinement


def _reference_refinement(dense, z, cos, k, degree_threshold):
  """Dense NumPy version of `main.py`: cosine pruning then `get_reliable_neighbors`, with
  non-candidates at -inf and the diagonal cleared."""
  sim = _cosine_matrix(z)
  clean = dense * (sim > cos)
  degree = clean.sum(1)
  candidate_sim = np.where((degree > degree_threshold)[None, :], sim, -np.inf)
  refined = clean.copy()
  for i in range(len(dense)):
    top = np.argsort(-candidate_sim[i], kind="stable")[:k]
    refined[i, top[np.isfinite(candidate_sim[i, top])]] = 1.0
    refined[i, i] = 0.0
  return clean, refined


@pytest.mark.parametrize("k,degree_threshold", [(1, 1.0), (3, 1.0), (4, 2.0)])
def test_pruning_and_topk_adding_match_dense_reference(k, degree_threshold):
  pairs, dense = _graph(5)
  z = np.random.default_rng(6).normal(size=(N, 5)).astype(np.float32)
  padded, mask = _padded(pairs)
  cos = 0.0

  @jax.jit
  def refine(z):
    kept = stable.cosine_keep(z, padded, mask, cos)
    deg = stable.degrees(padded, kept, N)
    nbrs, valid = stable.reliable_neighbors(z, deg, k, degree_threshold)
    return (deg, nbrs, valid) + stable.refined_graph(padded, kept, nbrs, valid)

  deg, nbrs, valid, senders, receivers, emask = refine(jnp.asarray(z))
  clean, refined = _reference_refinement(dense, z, cos, k, degree_threshold)
  np.testing.assert_array_equal(np.asarray(deg), clean.sum(1))
  got = _dense_from_directed(senders, receivers, emask, N)
  np.testing.assert_array_equal(got, refined)  # also: no directed edge appears twice
  # The card's invariants: at most k additions per row, no self-loops, only candidates.
  added = (got > 0) & (clean == 0)
  candidates = clean.sum(1) > degree_threshold
  assert added.sum(1).max() <= k and not np.any(np.diag(got))
  assert not added[:, ~candidates].any()
  assert added.sum() > 0
  # Row i's valid neighbours are the top candidates by similarity.
  sim = _cosine_matrix(z)
  for i in range(N):
    chosen = np.asarray(nbrs[i])[np.asarray(valid[i])]
    others = [j for j in np.flatnonzero(candidates) if j not in chosen and j != i]
    if len(chosen) and others:
      assert sim[i, chosen].min() >= sim[i, others].max() - 1e-6


def test_reliable_neighbors_never_picks_padding_and_batches_agree():
  z = np.random.default_rng(7).normal(size=(N, 4)).astype(np.float32)
  degree = jnp.full((N,), 3.0)
  node_mask = jnp.asarray(np.arange(N) < N - 2)
  full = stable.reliable_neighbors(jnp.asarray(z), degree, 3, node_mask=node_mask)
  batched = stable.reliable_neighbors(jnp.asarray(z), degree, 3, node_mask=node_mask,
                                      batch_size=5)
  for a, b in zip(full, batched):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  nbrs, valid = map(np.asarray, full)
  assert not np.any(nbrs[valid] >= N - 2) and not valid[N - 2:].any()


def test_recover_limits_and_count():
  pairs, _ = _graph(8)
  padded, mask = _padded(pairs)
  kept = mask & jnp.asarray(np.arange(len(mask)) % 3 != 0)
  deleted = int(jnp.sum(mask & ~kept))
  key = jax.random.key(0)
  np.testing.assert_array_equal(stable.recover_edges(key, kept, mask, 0.0), kept)
  np.testing.assert_array_equal(stable.recover_edges(key, kept, mask, 1.0), mask)
  view = np.asarray(stable.recover_edges(key, kept, mask, 0.5))
  assert np.all(view >= np.asarray(kept)) and np.all(view <= np.asarray(mask))
  assert view.sum() - int(jnp.sum(kept)) == deleted // 2


# ------------------------------------------------------------------------- normalisation


def _reference_norm(adj, alpha):
  """`adj_new_norm` of the official utils.py on a dense (row = receiver) adjacency."""
  a = adj + np.eye(len(adj))
  d = a.sum(1)
  w = a * np.power(d, alpha)[None, :] * np.power(d, alpha)[:, None]
  return w if alpha == -0.5 else w / w.sum(1, keepdims=True)


def _dense_weights(graph, n):
  a = np.zeros((n, n))
  np.add.at(a, (np.asarray(graph.receivers), np.asarray(graph.senders)),
            np.asarray(graph.edges, np.float64))
  return a


@pytest.mark.parametrize("alpha", [-0.5, 0.6, 1.0])
def test_normalize_adjacency_matches_dense_reference(alpha):
  pairs, dense = _graph(9)
  padded, mask = _padded(pairs)
  senders, receivers, dmask = stable.directed(padded, mask)
  # Make it asymmetric, as after top-k adding: one extra in-edge 0 <- 5 only.
  senders = jnp.concatenate([senders, jnp.array([5], jnp.int32)])
  receivers = jnp.concatenate([receivers, jnp.array([0], jnp.int32)])
  dmask = jnp.concatenate([dmask, jnp.array([dense[0, 5] == 0])])
  adj = dense.copy()
  adj[0, 5] = 1.0
  graph = stable.normalize_adjacency(senders, receivers, dmask, N, alpha)
  got = _dense_weights(graph, N)
  np.testing.assert_allclose(got, _reference_norm(adj, alpha), rtol=1e-5, atol=1e-7)
  if alpha == -0.5:
    # On a symmetric graph it is the shared GCN normalisation with self-loops.
    sym = stable.normalize_adjacency(*stable.directed(padded, mask), N, alpha)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(N, 3)), jnp.float32)
    conn = jraph.GraphsTuple(nodes=None, edges=None, globals=None,
                             senders=stable.directed(padded, mask)[0],
                             receivers=stable.directed(padded, mask)[1],
                             n_node=jnp.array([N]), n_edge=jnp.array([2 * len(padded)]))
    want = layers.gcn_propagate(x, conn, edge_mask=stable.directed(padded, mask)[2])
    np.testing.assert_allclose(_dense_weights(sym, N) @ np.asarray(x), want, rtol=1e-5,
                               atol=1e-6)
  else:
    np.testing.assert_allclose(got.sum(1), 1.0, rtol=1e-5)


def test_advanced_gcn_equals_dense_matrix_reference():
  pairs, dense = _graph(10)
  padded, mask = _padded(pairs)
  graph = stable.normalize_adjacency(*stable.directed(padded, mask), N, 0.6)
  model = stable.AdvancedGCN(7, 5, 3, dropout_rate=0.5, rngs=nnx.Rngs(0))
  x = np.random.default_rng(11).normal(size=(N, 7)).astype(np.float32)
  a_hat = _reference_norm(dense, 0.6)
  w1 = np.asarray(model.conv1.linear.kernel[...], np.float64)
  w2 = np.asarray(model.conv2.linear.kernel[...], np.float64)
  # Non-zero biases so they are checked too.
  b1, b2 = np.full(5, 0.1), np.full(3, -0.2)
  model.conv1.bias = nnx.Param(jnp.asarray(b1, jnp.float32))
  model.conv2.bias = nnx.Param(jnp.asarray(b2, jnp.float32))
  graphdef, params = nnx.split(model)
  logits = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, graph))(params, jnp.asarray(x))
  want = a_hat @ np.maximum(a_hat @ x @ w1 + b1, 0.0) @ w2 + b2
  np.testing.assert_allclose(np.asarray(logits), want, rtol=1e-4, atol=1e-5)
  # Dropout is active only with a key.
  noisy = nnx.merge(graphdef, params)(jnp.asarray(x), graph, key=jax.random.key(0))
  assert not np.allclose(np.asarray(noisy), want, atol=1e-4)


# ------------------------------------------------------------------------------ contrast


def _connectivity(pairs, mask):
  return driver.connectivity(pairs, mask, N)


def _reference_dgi_loss(model, x, dense_pre, dense_views, perm, beta):
  """Dense NumPy version of `robcon.py: DGI.forward` + BCEWithLogits."""
  w = np.asarray(model.encoder.linear.kernel[...], np.float64)
  b = np.asarray(model.encoder.bias[...], np.float64)
  slope = float(np.asarray(model.encoder.act.negative_slope[...]))
  bil = np.asarray(model.discriminator.weight[...], np.float64)
  bil_b = float(np.asarray(model.discriminator.bias[...]))

  def norm(a):  # D^-1/2 a D^-1/2 with a's own row sums
    d = a.sum(1) ** -0.5
    return a * d[:, None] * d[None, :]

  def enc(feats, a):
    h = a @ feats @ w + b
    return np.where(h > 0, h, slope * h)

  sigmoid = lambda v: 1 / (1 + np.exp(-v))
  eye = np.eye(len(x))
  a_pre = norm(dense_pre + beta * eye)
  h0, h2 = enc(x, a_pre), enc(x[perm], a_pre)
  pos, neg = 0.0, 0.0
  for view in dense_views:
    # normalize_adj2 adds another identity to A_v + beta I.
    s = sigmoid(enc(x, norm(view + (beta + 1) * eye)).mean(0))
    pos = pos + h0 @ bil @ s + bil_b
    neg = neg + h2 @ bil @ s + bil_b
  logits = np.concatenate([pos, neg])
  labels = np.concatenate([np.ones(len(x)), np.zeros(len(x))])
  return np.mean(np.logaddexp(0, logits) - labels * logits)


def _dense_undirected(pairs, m, n=N):
  a = np.zeros((n, n))
  for (i, j), keep in zip(np.asarray(pairs), np.asarray(m)):
    if keep:
      a[i, j] = a[j, i] = 1.0
  return a


def test_contrastive_loss_matches_numpy_reference_and_zero_discriminator():
  pairs, _ = _graph(12)
  padded, mask = _padded(pairs)
  rng = np.random.default_rng(13)
  x = rng.normal(size=(N, 6)).astype(np.float32)
  kept = mask & jnp.asarray(rng.random(len(mask)) < 0.6)
  views = [stable.recover_edges(jax.random.key(v), kept, mask, 0.5) for v in range(2)]
  both = lambda m: jnp.concatenate([m, m])
  graph, _ = _connectivity(padded, mask)
  perm = jnp.asarray(rng.permutation(N), jnp.int32)
  model = stable.DGI(6, 8, rngs=nnx.Rngs(1))
  model.encoder.bias = nnx.Param(jnp.full((8,), 0.05))
  model.discriminator.bias = nnx.Param(jnp.asarray(0.3))
  graphdef, params = nnx.split(model)
  beta = 2.0
  fn = jax.jit(lambda p: stable.dgi_loss(nnx.merge(graphdef, p), jnp.asarray(x), graph,
                                         both(kept), jnp.stack([both(v) for v in views]),
                                         perm, beta=beta)[0])
  want = _reference_dgi_loss(model, x.astype(np.float64), _dense_undirected(padded, kept),
                             [_dense_undirected(padded, v) for v in views],
                             np.asarray(perm), beta)
  np.testing.assert_allclose(float(fn(params)), want, rtol=1e-5)
  assert abs(want - np.log(2)) > 1e-3  # not the trivial value
  # A zero discriminator scores everything 0: the BCE is log 2 (see the module docstring).
  zero = jax.tree.map(jnp.zeros_like, params["discriminator"])
  params["discriminator"] = zero
  np.testing.assert_allclose(float(fn(params)), np.log(2), rtol=1e-6)


def test_contrastive_loss_ignores_padding_nodes():
  pairs, _ = _graph(14, n=N - 2)
  padded, mask = _padded(pairs)
  rng = np.random.default_rng(15)
  x = rng.normal(size=(N, 4)).astype(np.float32)
  graph, dmask = _connectivity(padded, mask)
  views = jnp.stack([dmask, dmask])
  perm = np.concatenate([rng.permutation(N - 2), [N - 2, N - 1]]).astype(np.int32)
  model = stable.DGI(4, 6, rngs=nnx.Rngs(2))
  node_mask = jnp.asarray(np.arange(N) < N - 2)
  x_other = x.copy()
  x_other[N - 2:] = 100.0  # padding features must not matter
  losses = [stable.dgi_loss(model, jnp.asarray(f), graph, dmask, views, jnp.asarray(perm),
                            node_mask=node_mask)[0] for f in (x, x_other)]
  np.testing.assert_allclose(float(losses[0]), float(losses[1]), rtol=1e-6)
  # ... and equal the loss on the unpadded graph.
  small = jraph.GraphsTuple(nodes=None, edges=None, globals=None, senders=graph.senders,
                            receivers=graph.receivers, n_node=jnp.array([N - 2]),
                            n_edge=graph.n_edge)
  ref = stable.dgi_loss(model, jnp.asarray(x[:N - 2]), small, dmask, views,
                        jnp.asarray(perm[:N - 2]))[0]
  np.testing.assert_allclose(float(losses[0]), float(ref), rtol=1e-5)


def test_embeddings_are_permutation_equivariant():
  pairs, _ = _graph(16)
  padded, mask = _padded(pairs, extra=0)
  x = np.random.default_rng(17).normal(size=(N, 5)).astype(np.float32)
  model = stable.DGI(5, 4, rngs=nnx.Rngs(3))
  perm = np.random.default_rng(18).permutation(N)
  inv = np.argsort(perm)
  graph, dmask = _connectivity(padded, mask)
  h = stable.embed(model, jnp.asarray(x), graph, dmask)
  graph_p, dmask_p = _connectivity(jnp.asarray(inv[np.asarray(padded)], jnp.int32), mask)
  h_p = stable.embed(model, jnp.asarray(x[perm]), graph_p, dmask_p)
  np.testing.assert_allclose(np.asarray(h_p), np.asarray(h)[perm], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- determinism


def _short_contrastive_run(seed, steps=6):
  pairs, _ = _graph(19)
  padded, mask = _padded(pairs)
  x = jnp.asarray(np.random.default_rng(20).normal(size=(N, 5)), jnp.float32)
  graph, dmask = _connectivity(padded, mask)
  kept = mask & jnp.asarray(np.arange(len(mask)) % 4 != 0)
  views = [stable.recover_edges(k, kept, mask, 0.2)
           for k in jax.random.split(jax.random.key(seed), 2)]
  both = lambda m: jnp.concatenate([m, m])
  graphdef, params = nnx.split(stable.DGI(5, 4, rngs=nnx.Rngs(seed)))
  tx = optax.adam(1e-2)
  step = driver.make_dgi_step(graphdef, tx, x, graph, both(kept),
                              jnp.stack([both(v) for v in views]), beta=2.0, patience=3)
  state = driver.train_loop.TrainState(
      step=jnp.zeros((), jnp.int32),
      params=dict(model=params, best=params, best_loss=jnp.float32(1e9),
                  best_step=jnp.int32(0), wait=jnp.int32(0), stopped=jnp.bool_(False)),
      opt_state=tx.init(params), key=jax.random.key(seed + 1))
  state, m = jax.jit(lambda s: jax.lax.scan(lambda c, _: step(c), s, None, length=steps))(
      state)
  return np.asarray(m["loss"]), stable.embed(nnx.merge(graphdef, state.params["best"]), x,
                                             graph, both(kept))


def test_contrastive_training_is_deterministic_per_seed():
  loss_a, emb_a = _short_contrastive_run(0)
  loss_b, emb_b = _short_contrastive_run(0)
  loss_c, _ = _short_contrastive_run(1)
  np.testing.assert_array_equal(loss_a, loss_b)
  np.testing.assert_array_equal(np.asarray(emb_a), np.asarray(emb_b))
  assert not np.array_equal(loss_a, loss_c)
  assert loss_a[-1] < loss_a[0]  # it trains


# ---------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise():
  pairs, _ = _graph(21)
  padded, mask = _padded(pairs)
  z = jnp.ones((N, 3))
  with pytest.raises(ValueError, match="pairs"):
    stable.cosine_keep(z, padded[:, :1], mask, 0.1)
  with pytest.raises(ValueError, match="edge_mask"):
    stable.jaccard_keep(z, padded, mask[:-1], 0.1)
  with pytest.raises(ValueError, match="recover_percent"):
    stable.recover_edges(jax.random.key(0), mask, mask, 1.5)
  with pytest.raises(ValueError, match="k="):
    stable.reliable_neighbors(z, jnp.ones((N,)), N + 1)
  with pytest.raises(ValueError, match="dropout_rate"):
    stable.AdvancedGCN(3, 4, 2, dropout_rate=1.0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="senders"):
    stable.normalize_adjacency(jnp.zeros((3,), jnp.int32), jnp.zeros((4,), jnp.int32),
                               jnp.ones((3,), bool), N, 0.5)


@pytest.mark.parametrize("field,value", [("dgi.recover_percent", 1.5),
                                         ("gcn.dropout", 1.0),
                                         ("settings.attacked.k", 10_000),
                                         ("split.n_test", 10_000)])
def test_check_config_rejects_values_that_do_not_fit(field, value):
  config = driver.experiment.config_module("stable").get_config("smoke")
  node = config
  *path, last = field.split(".")
  for name in path:
    node = node[name]
  node[last] = value
  with pytest.raises(common.ConfigError):
    driver.check_config(config)


def test_configs_build_and_pass_their_own_check():
  for variant in ("smoke", "demo", "paper"):
    driver.check_config(driver.experiment.config_module("stable").get_config(variant))
