"""SCAFFOLD oracles: the paper's update formulas by hand, client drift, invariant, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.federated import engine, fedavg, scaffold
from jaxrepro.sharding.mesh import make_mesh

C, DIM = 16, 4


def _quad_loss(params, ex):
  """f_i(x) = 1/2 sum_d h_d (x_d - a_d)^2 per example, [B]."""
  return 0.5 * jnp.sum(ex["h"] * (params["x"] - ex["a"]) ** 2, axis=-1)


def _quad_clients(seed=0):
  """One example per client: heterogeneous curvatures h_i and optima a_i (non-IID)."""
  rng = np.random.default_rng(seed)
  h = rng.uniform(0.2, 2.0, size=(C, 1, DIM)).astype(np.float32)
  a = rng.normal(scale=2.0, size=(C, 1, DIM)).astype(np.float32)
  return {"h": h, "a": a}, np.ones((C, 1), bool)


def _batch(examples, mask, weight):
  return engine.ClientBatch(
      (jax.tree.map(jnp.asarray, examples), jnp.asarray(mask)), jnp.asarray(weight))


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((8,), ("clients",))


def _reference_scaffold_round(x, c, ci, h, a, present, *, lr, server_lr, k):
  """Algorithm 1 of Karimireddy et al. 2020 with option II, written out per client."""
  ci_new = ci.copy()
  dys, dcs = [], []
  for i in np.flatnonzero(present):
    y = x.copy()
    for _ in range(k):
      grad = h[i] * (y - a[i])
      y = y - lr * (grad - ci[i] + c)
    ci_new[i] = ci[i] - c + (x - y) / (k * lr)
    dys.append(y - x)
    dcs.append(ci_new[i] - ci[i])
  x_new = x + server_lr * np.mean(dys, axis=0)
  c_new = c + np.sum(dcs, axis=0) / C
  return x_new, c_new, ci_new


def test_control_variates_follow_option_ii_formulas(mesh):
  examples, mask = _quad_clients()
  h, a = examples["h"][:, 0].astype(np.float64), examples["a"][:, 0].astype(np.float64)
  lr, server_lr, k = 0.1, 0.8, 5
  algo = scaffold.make_scaffold(_quad_loss, client_lr=lr, server_lr=server_lr,
                                num_epochs=k, batch_size=1, shuffle=False)
  round_fn = engine.make_round(algo, mesh)
  x0 = np.linspace(-1, 1, DIM)
  state = algo.init({"x": jnp.asarray(x0, jnp.float32)}, C)
  x, c, ci = x0, np.zeros(DIM), np.zeros((C, DIM))
  for r in range(3):
    present = np.random.default_rng(r).permutation(C) < 6  # 6 of 16 clients
    state, _ = round_fn(state, _batch(examples, mask, present.astype(np.float32)),
                        jax.random.key(r))
    x, c, ci = _reference_scaffold_round(x, c, ci, h, a, present, lr=lr,
                                         server_lr=server_lr, k=k)
    np.testing.assert_allclose(state.server["params"]["x"], x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.server["control"]["x"], c, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.clients["x"], ci, rtol=1e-5, atol=1e-5)
    # c = (1/N) sum_i c_i is preserved under partial participation.
    np.testing.assert_allclose(state.server["control"]["x"],
                               np.asarray(state.clients["x"]).mean(0), atol=1e-5)


def test_scaffold_removes_client_drift_that_biases_fedavg(mesh):
  examples, mask = _quad_clients(1)
  h, a = examples["h"][:, 0].astype(np.float64), examples["a"][:, 0].astype(np.float64)
  # Optimum of the average objective (1/C) sum_i f_i, in closed form.
  x_star = (h * a).sum(0) / h.sum(0)
  kw = dict(client_lr=0.1, num_epochs=10, batch_size=1, shuffle=False)
  batch = _batch(examples, mask, np.ones(C, np.float32))
  dist = {}
  for name, make in (("fedavg", fedavg.make_fedavg), ("scaffold", scaffold.make_scaffold)):
    algo = make(_quad_loss, **kw)
    round_fn = engine.make_round(algo, mesh)
    state = algo.init({"x": jnp.zeros((DIM,), jnp.float32)}, C)
    for r in range(60):
      state, _ = round_fn(state, batch, jax.random.key(r))
    params = state.server if name == "fedavg" else state.server["params"]
    dist[name] = float(np.linalg.norm(np.asarray(params["x"]) - x_star))
  # FedAvg with 10 local steps settles at a drifted fixed point; SCAFFOLD reaches x*.
  assert dist["scaffold"] < 1e-3, dist
  assert dist["fedavg"] > 0.05, dist


def test_ledger_doubles_fedavg_both_ways():
  examples, mask = _quad_clients()
  batch = _batch(examples, mask, np.ones(C, np.float32))
  params = {"x": jnp.zeros((DIM,), jnp.float32), "m": jnp.zeros((3, 2), jnp.float32)}
  n_bytes = (DIM + 6) * 4
  algo = scaffold.make_scaffold(lambda p, ex: _quad_loss({"x": p["x"]}, ex),
                                client_lr=0.1, batch_size=1)
  ledger = engine.round_ledger(algo, algo.init(params, C), batch)
  assert ledger.total_bytes("up") == 2 * n_bytes  # delta y and delta c
  assert ledger.total_bytes("down") == 2 * n_bytes  # x and c
