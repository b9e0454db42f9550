"""Oracle tests for UltraGCN: fixed point, beta and omega formulas, loss and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.graph import ultragcn as ug

_loss = jax.jit(ug.loss_fn, static_argnames="hparams")
_grad = jax.jit(jax.grad(lambda p, b, c, hparams: ug.loss_fn(p, b, c, hparams)[0]),
                static_argnames="hparams")


def _random_pairs(seed, n_users, n_items, density):
  """Unique pairs of a random bipartite graph with user 0 and the last item isolated."""
  rng = np.random.default_rng(seed)
  dense = rng.random((n_users, n_items)) < density
  dense[0, :] = False
  dense[:, -1] = False
  return np.argwhere(dense).astype(np.int32), dense.astype(np.float64)


def _log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def test_beta_matches_formula_and_is_finite():
  pairs, dense = _random_pairs(0, 9, 7, 0.4)
  # Duplicated rows must not change degrees (the official code uses a 0/1 matrix).
  beta_u, beta_i = ug.constraint_coefficients(np.concatenate([pairs, pairs[:3]]), 9, 7)
  assert beta_u.shape == (9,) and beta_i.shape == (7,)
  assert beta_u.dtype == np.float32 and beta_i.dtype == np.float32
  for u in range(9):
    d = dense[u].sum()
    np.testing.assert_allclose(beta_u[u], np.sqrt(d + 1) / d if d else 0.0, rtol=1e-6)
  for i in range(7):
    np.testing.assert_allclose(beta_i[i], 1 / np.sqrt(dense[:, i].sum() + 1), rtol=1e-6)
  assert beta_u[0] == 0.0 and beta_i[-1] == 1.0


def test_fixed_point_is_invariant_under_lightgcn_self_loop_step():
  pairs, dense = _random_pairs(1, 12, 10, 0.35)
  beta_u, beta_i = ug.constraint_coefficients(pairs, 12, 10)
  e_item = np.random.default_rng(2).normal(size=(10, 5))
  # e_u = sum_i beta_{u,i} e_i (the infinite-layer limit).
  e_user = (dense * np.outer(beta_u, beta_i).astype(np.float64)) @ e_item
  d_u, d_i = dense.sum(1), dense.sum(0)
  stepped = e_user / (d_u + 1)[:, None] + (
      dense / np.sqrt(np.outer(d_u + 1, d_i + 1))) @ e_item
  np.testing.assert_allclose(stepped, e_user, rtol=1e-6, atol=1e-7)
  assert np.abs(e_user).sum() > 1.0  # The check is not vacuous.


@pytest.mark.parametrize("exclude_self", [False, True])
def test_omega_is_the_dense_top_k(exclude_self):
  n_users, n_items, k = 30, 12, 4
  pairs, dense = _random_pairs(3, n_users, n_items, 0.25)
  # Item 10 gets a single user who has nothing else: its G row is only its diagonal.
  dense[:, 10] = 0
  dense[n_users - 1] = 0
  dense[n_users - 1, 10] = 1
  pairs = np.argwhere(dense).astype(np.int32)
  nbrs, wts = ug.item_item_constraints(pairs, n_users, n_items, k,
                                       exclude_self=exclude_self)
  assert nbrs.shape == wts.shape == (n_items, k)
  assert nbrs.dtype == np.int32 and wts.dtype == np.float32

  g = dense.T @ dense
  deg = g.sum(1)
  row = np.divide(np.sqrt(deg + 1), deg, out=np.zeros_like(deg), where=deg > 0)
  omega = g * row[:, None] / np.sqrt(deg + 1)[None, :]
  if exclude_self:
    np.fill_diagonal(omega, 0.0)
  for i in range(n_items):
    positive = wts[i] > 0
    assert np.all(wts[i] >= 0) and positive.sum() == min(k, (omega[i] > 0).sum())
    expected = np.sort(omega[i])[::-1][:k]
    np.testing.assert_allclose(wts[i], expected, rtol=1e-5)
    np.testing.assert_allclose(omega[i, nbrs[i, positive]], wts[i, positive], rtol=1e-5)
    assert len(set(nbrs[i, positive])) == positive.sum()
  assert np.all(wts[-1] == 0)  # The isolated item has no constraint.
  assert (wts[10] > 0).sum() == (0 if exclude_self else 1)


def _mf_inputs(seed, n_users=8, n_items=11, dim=4, batch=6, m=3):
  rng = np.random.default_rng(seed)
  params = {"user": rng.normal(0, 0.7, (n_users, dim)).astype(np.float32),
            "item": rng.normal(0, 0.7, (n_items, dim)).astype(np.float32)}
  batch_ = {"users": rng.permutation(n_users)[:batch].astype(np.int32),
            "pos_items": rng.integers(0, n_items, batch).astype(np.int32),
            "neg_items": rng.integers(0, n_items, (batch, m)).astype(np.int32)}
  constants = {"beta_user": rng.uniform(0.1, 1, n_users).astype(np.float32),
               "beta_item": rng.uniform(0.1, 1, n_items).astype(np.float32),
               "ii_neighbors": rng.integers(0, n_items, (n_items, 2)).astype(np.int32),
               "ii_weights": rng.uniform(0, 1, (n_items, 2)).astype(np.float32)}
  return params, batch_, constants


def test_mf_bce_special_case_equals_plain_bce():
  params, batch, constants = _mf_inputs(4)
  hparams = ug.mf_bce_hparams(negative_weight=7.0, l2_weight=0.03)
  loss, aux = _loss(params, batch, constants, hparams)

  p = {k: v.astype(np.float64) for k, v in params.items()}
  e_u = p["user"][batch["users"]]
  s_pos = np.sum(e_u * p["item"][batch["pos_items"]], -1)
  s_neg = np.einsum("bd,bmd->bm", e_u, p["item"][batch["neg_items"]])
  bce = -_log_sigmoid(s_pos).sum() - 7.0 * _log_sigmoid(-s_neg).mean(1).sum()
  l2 = 0.5 * (np.sum(p["user"] ** 2) + np.sum(p["item"] ** 2))
  np.testing.assert_allclose(loss, bce + 0.03 * l2, rtol=1e-5)
  np.testing.assert_allclose(aux["l2"], l2, rtol=1e-5)
  assert float(aux["ii"]) == 0.0


@pytest.mark.parametrize("ii_weight", [0.0, 0.7])
def test_user_gradient_matches_closed_form(ii_weight):
  """Pure L_C (w1 = w3 = 0, w2 = w4 = 1) plus optionally gamma L_I, no L2."""
  params, batch, constants = _mf_inputs(5)
  nw, m = 2.5, batch["neg_items"].shape[1]
  hparams = ug.LossHParams(w1=0.0, w2=1.0, w3=0.0, w4=1.0, negative_weight=nw,
                           ii_weight=ii_weight, l2_weight=0.0)
  grad = np.asarray(_grad(params, batch, constants, hparams)["user"], np.float64)

  p = {k: v.astype(np.float64) for k, v in params.items()}
  bu = constants["beta_user"].astype(np.float64)
  bi = constants["beta_item"].astype(np.float64)
  expected = np.zeros_like(p["user"])
  for u, i, negs in zip(batch["users"], batch["pos_items"], batch["neg_items"]):
    e_u = p["user"][u]
    # d/de_u [-b log s(e_u.e_i)] = -b (1 - s(e_u.e_i)) e_i.
    g = -bu[u] * bi[i] * (1 - _sigmoid(e_u @ p["item"][i])) * p["item"][i]
    for j in negs:  # d/de_u [-b log s(-e_u.e_j)] = b s(e_u.e_j) e_j, averaged and scaled.
      g += nw / m * bu[u] * bi[j] * _sigmoid(e_u @ p["item"][j]) * p["item"][j]
    for j, w in zip(constants["ii_neighbors"][i], constants["ii_weights"][i]):
      g += -ii_weight * w * (1 - _sigmoid(e_u @ p["item"][j])) * p["item"][j]
    expected[u] += g
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)
  assert np.abs(expected).sum() > 1e-2


def test_loss_with_item_item_term_matches_numpy():
  params, batch, constants = _mf_inputs(6)
  hparams = ug.LossHParams(w1=0.5, w2=2.0, w3=0.25, w4=3.0, negative_weight=4.0,
                           ii_weight=0.3, l2_weight=0.01)
  loss, aux = _loss(params, batch, constants, hparams)
  p = {k: v.astype(np.float64) for k, v in params.items()}
  u, i, n = batch["users"], batch["pos_items"], batch["neg_items"]
  bu, bi = constants["beta_user"], constants["beta_item"]
  e_u = p["user"][u]
  s_pos = np.sum(e_u * p["item"][i], -1)
  s_neg = np.einsum("bd,bmd->bm", e_u, p["item"][n])
  w_pos = 0.5 + 2.0 * bu[u] * bi[i]
  w_neg = 0.25 + 3.0 * bu[u][:, None] * bi[n]
  nb = constants["ii_neighbors"][i]
  s_nb = np.einsum("bd,bkd->bk", e_u, p["item"][nb])
  ii = -(constants["ii_weights"][i] * _log_sigmoid(s_nb)).sum()
  l2 = 0.5 * sum(np.sum(t ** 2) for t in p.values())
  expected = (-(w_pos * _log_sigmoid(s_pos)).sum()
              - 4.0 * (w_neg * _log_sigmoid(-s_neg)).mean(1).sum() + 0.3 * ii + 0.01 * l2)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(aux["ii"], ii, rtol=1e-5)


def test_sample_batch_shapes_ranges_and_determinism():
  pairs = jnp.asarray(np.array([[0, 3], [1, 4], [2, 5], [2, 0]], np.int32))
  sample = jax.jit(ug.sample_batch, static_argnums=(2, 3, 4))
  batch = sample(jax.random.key(0), pairs, 6, 64, 5)
  assert batch["users"].shape == (64,) and batch["pos_items"].shape == (64,)
  assert batch["neg_items"].shape == (64, 5)
  assert all(v.dtype == jnp.int32 for v in batch.values())
  drawn = {tuple(x) for x in np.stack([batch["users"], batch["pos_items"]], 1).tolist()}
  assert drawn <= {tuple(x) for x in np.asarray(pairs).tolist()} and len(drawn) == 4
  neg = np.asarray(batch["neg_items"])
  assert neg.min() >= 0 and neg.max() < 6 and len(np.unique(neg)) == 6
  again = sample(jax.random.key(0), pairs, 6, 64, 5)
  assert all(np.array_equal(batch[k], again[k]) for k in batch)


def test_init_params_and_score_users():
  params = ug.init_params(jax.random.key(0), 5, 7, 3, init_std=0.5)
  assert params["user"].shape == (5, 3) and params["item"].shape == (7, 3)
  assert 0.2 < float(jnp.std(params["item"])) < 1.0
  scores = jax.jit(ug.score_users)(params, jnp.array([4, 0], jnp.int32))
  expected = np.asarray(params["user"])[[4, 0]] @ np.asarray(params["item"]).T
  np.testing.assert_allclose(scores, expected, rtol=1e-6)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="train_pairs"):
    ug.constraint_coefficients(np.zeros((3, 3), np.int32), 4, 4)
  with pytest.raises(ValueError, match="n_items"):
    ug.constraint_coefficients(np.array([[0, 9]]), 4, 4)
  with pytest.raises(ValueError, match="k=0"):
    ug.item_item_constraints(np.array([[0, 1]]), 4, 4, 0)
  with pytest.raises(ValueError, match="negative_weight"):
    ug.LossHParams(negative_weight=-1.0)
  params, batch, constants = _mf_inputs(7)
  del constants["ii_neighbors"]
  with pytest.raises(ValueError, match="ii_neighbors"):
    ug.loss_fn(params, batch, constants, ug.LossHParams())
  with pytest.raises(ValueError, match="neg_items"):
    ug.loss_fn(params, {**batch, "neg_items": batch["users"]}, constants,
               ug.mf_bce_hparams())
