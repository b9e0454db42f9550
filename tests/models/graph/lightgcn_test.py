"""LightGCN on jraph against dense normalised-adjacency powers, and its BPR loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrepro.models.graph import lightgcn

_N_USERS, _N_ITEMS = 6, 5


def _pairs():
  rng = np.random.default_rng(0)
  dense = rng.random((_N_USERS, _N_ITEMS)) < 0.5
  dense[:, 4] = False  # An isolated item: must stay finite and propagate to zero.
  dense[0, 0] = True
  return np.argwhere(dense).astype(np.int32), dense.astype(np.float64)


def _dense_final(dense, ego, num_layers):
  """mean_{l=0..L} Â^l E with Â = D^-1/2 A D^-1/2 of the (U + I)-node bipartite graph."""
  n = _N_USERS + _N_ITEMS
  adj = np.zeros((n, n))
  adj[:_N_USERS, _N_USERS:] = dense
  adj[_N_USERS:, :_N_USERS] = dense.T
  deg = adj.sum(1)
  inv_sqrt = np.divide(1.0, np.sqrt(deg), out=np.zeros_like(deg), where=deg > 0)
  a_hat = inv_sqrt[:, None] * adj * inv_sqrt[None, :]
  layers = [ego]
  for _ in range(num_layers):
    layers.append(a_hat @ layers[-1])
  return np.mean(layers, axis=0)


@pytest.mark.parametrize("num_layers", [0, 1, 3])
def test_propagation_equals_dense_matrix_powers(num_layers):
  pairs, dense = _pairs()
  # Duplicate pairs must not change the normalisation.
  graph = lightgcn.build_bipartite_graph(np.concatenate([pairs, pairs[:2]]), _N_USERS,
                                         _N_ITEMS)
  assert graph.senders.shape == (2 * len(pairs),)
  ego = np.random.default_rng(1).normal(size=(_N_USERS + _N_ITEMS, 3)).astype(np.float32)
  out = jax.jit(lightgcn.propagate, static_argnums=2)(graph, ego, num_layers)
  expected = _dense_final(dense, ego.astype(np.float64), num_layers)
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(out))


def test_bpr_loss_and_model_call_match_numpy():
  pairs, dense = _pairs()
  graph = lightgcn.build_bipartite_graph(pairs, _N_USERS, _N_ITEMS)
  model = lightgcn.LightGCN(_N_USERS, _N_ITEMS, 4, num_layers=2, init_std=0.5,
                            rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  batch = {"users": jnp.array([0, 2, 5], jnp.int32),
           "pos_items": jnp.array([0, 1, 3], jnp.int32),
           "neg_items": jnp.array([[4, 2], [0, 4], [1, 2]], jnp.int32)}

  @jax.jit
  def loss_and_final(state):
    model = nnx.merge(graphdef, state)
    return lightgcn.bpr_loss(model, graph, batch, 0.1), model(graph)

  (loss, aux), final = loss_and_final(state)
  ego_u, ego_i = np.asarray(model.user[...], np.float64), np.asarray(model.item[...], np.float64)
  ref = _dense_final(dense, np.concatenate([ego_u, ego_i]), 2)
  np.testing.assert_allclose(final["user"], ref[:_N_USERS], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(final["item"], ref[_N_USERS:], rtol=1e-5, atol=1e-6)

  users, pos, neg = (np.asarray(batch[k]) for k in ("users", "pos_items", "neg_items"))
  e_u = ref[:_N_USERS][users]
  s_pos = np.sum(e_u * ref[_N_USERS:][pos], -1)
  s_neg = np.einsum("bd,bmd->bm", e_u, ref[_N_USERS:][neg])
  bpr = np.mean(np.logaddexp(0.0, -(s_pos[:, None] - s_neg)))
  l2 = 0.5 * (np.sum(ego_u[users] ** 2) + np.sum(ego_i[pos] ** 2)
              + np.sum(ego_i[neg] ** 2) / 2) / 3
  np.testing.assert_allclose(aux["bpr"], bpr, rtol=1e-5)
  np.testing.assert_allclose(aux["l2"], l2, rtol=1e-5)
  np.testing.assert_allclose(loss, bpr + 0.1 * l2, rtol=1e-5)


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="train_pairs"):
    lightgcn.build_bipartite_graph(np.zeros((2, 3), np.int32), 2, 2)
  with pytest.raises(ValueError, match="n_items"):
    lightgcn.build_bipartite_graph(np.array([[0, 2]]), 2, 2)
  graph = lightgcn.build_bipartite_graph(np.array([[0, 1]]), 2, 2)
  with pytest.raises(ValueError, match="embeddings"):
    lightgcn.propagate(graph, jnp.zeros((3, 2)), 1)
  with pytest.raises(ValueError, match="num_layers"):
    lightgcn.propagate(graph, jnp.zeros((4, 2)), -1)
