"""Tests of the federated round engine against a dense per-client reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.federated import engine
from jaxrepro.sharding.mesh import make_mesh

C = 16
DIM = 3


def _toy_algorithm():
  """Exercises every engine feature: payload, client state, keys, mean and total."""

  def init(params, num_clients):
    return engine.FedState({"s": params}, {"z": jnp.zeros((num_clients,), jnp.float32)},
                           jnp.zeros((), jnp.int32))

  def broadcast(server):
    return 2.0 * server["s"]

  def client_update(payload, state, data, key):
    noise = jax.random.normal(key, (DIM,))
    up = {"u": data["v"] * (1.0 + state["z"]) + payload + 0.1 * noise,
          "n": jnp.sum(data["v"] > 0).astype(jnp.int32)[None]}
    return up, {"m": jnp.sum(data["v"])}, {"z": state["z"] + 1.0}

  def server_update(server, agg):
    assert agg.total["n"].dtype == jnp.int32  # integer uplinks are summed exactly
    return {"s": server["s"] + agg.mean["u"] + agg.total["n"] / agg.num_clients}

  return engine.FederatedAlgorithm(init, broadcast, client_update, server_update)


def _reference_round(s, z, v, w, key):
  """Dense NumPy loop over clients: the engine's contract written out by hand."""
  keys = jax.random.split(key, C)
  payload = 2.0 * s
  ups, ns, ms, z_new = [], [], [], z.copy()
  for i in range(C):
    noise = np.asarray(jax.random.normal(keys[i], (DIM,)))
    ups.append(v[i] * (1.0 + z[i]) + payload + 0.1 * noise)
    ns.append((v[i] > 0).sum())
    ms.append(v[i].sum())
    if w[i] > 0:
      z_new[i] = z[i] + 1.0
  present = w > 0
  mean = sum(w[i] * ups[i] for i in range(C) if present[i]) / w.sum()
  total = sum(ns[i] for i in range(C) if present[i])
  s_new = s + mean + total / C
  m = sum(w[i] * ms[i] for i in range(C) if present[i]) / w.sum()
  return s_new, z_new, m, present.sum()


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((8,), ("clients",))


@pytest.fixture(scope="module")
def sharded_round(mesh):
  return engine.make_round(_toy_algorithm(), mesh)


def _inputs():
  rng = np.random.default_rng(0)
  v = rng.normal(size=(C, DIM)).astype(np.float32)
  w = rng.uniform(0.5, 2.0, size=C).astype(np.float32)
  w[[1, 5, 6, 12]] = 0.0  # absent clients
  return v, w


def test_sharded_round_matches_reference_loop(sharded_round, mesh):
  v, w = _inputs()
  algo = _toy_algorithm()
  state = engine.place_state(algo.init(jnp.ones((DIM,), jnp.float32), C), mesh)
  s, z = np.ones(DIM, np.float32), np.zeros(C, np.float32)
  batch = engine.place_on_mesh(engine.ClientBatch({"v": jnp.asarray(v)}, jnp.asarray(w)),
                               mesh, per_client=True)
  compiled_before = sharded_round._cache_size()
  for r in range(2):
    key = jax.random.key(r)
    state, metrics = sharded_round(state, batch, key)
    s, z, m, n_present = _reference_round(s, z, v, w, key)
    np.testing.assert_allclose(state.server["s"], s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.clients["z"], z)
    np.testing.assert_allclose(metrics["m"], m, rtol=1e-5, atol=1e-6)
    assert float(metrics["num_present"]) == n_present == 12
  assert int(state.round) == 2
  # Absent clients kept their state, present ones counted both rounds.
  assert state.clients["z"][1] == 0.0 and state.clients["z"][0] == 2.0
  # With placed inputs both rounds share one compiled program (static shapes).
  assert sharded_round._cache_size() <= compiled_before + 1


def test_single_device_layout_matches_sharded(sharded_round):
  v, w = _inputs()
  algo = _toy_algorithm()
  state = algo.init(jnp.zeros((DIM,), jnp.float32), C)
  batch = engine.ClientBatch({"v": jnp.asarray(v)}, jnp.asarray(w))
  key = jax.random.key(7)
  a, ma = sharded_round(state, batch, key)
  b, mb = engine.make_round(algo, None)(state, batch, key)
  np.testing.assert_allclose(a.server["s"], b.server["s"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ma["m"], mb["m"], rtol=1e-6)


def test_client_state_is_sharded_over_clients_axis(sharded_round, mesh):
  v, w = _inputs()
  state = _toy_algorithm().init(jnp.zeros((DIM,), jnp.float32), C)
  batch = engine.ClientBatch({"v": jnp.asarray(v)}, jnp.asarray(w))
  state, _ = sharded_round(state, batch, jax.random.key(0))
  assert state.clients["z"].sharding.spec == jax.P("clients")
  assert len(state.clients["z"].addressable_shards) == 8
  assert state.clients["z"].addressable_shards[0].data.shape == (C // 8,)


def test_no_client_present_leaves_server_unchanged():
  algo = _toy_algorithm()
  state = algo.init(jnp.ones((DIM,), jnp.float32), C)
  batch = engine.ClientBatch({"v": jnp.ones((C, DIM))}, jnp.zeros((C,)))
  new, metrics = engine.make_round(algo, None)(state, batch, jax.random.key(0))
  np.testing.assert_array_equal(new.server["s"], state.server["s"])
  assert float(metrics["num_present"]) == 0.0


def test_bad_inputs_raise(mesh):
  algo = _toy_algorithm()
  state = algo.init(jnp.ones((DIM,), jnp.float32), 12)
  batch = engine.ClientBatch({"v": jnp.ones((12, DIM))}, jnp.ones((12,)))
  with pytest.raises(ValueError, match="multiple of"):
    engine.make_round(algo, mesh)(state, batch, jax.random.key(0))
  with pytest.raises(ValueError, match="axis_name"):
    engine.make_round(algo, mesh, axis_name="workers")
  bad = engine.ClientBatch({"v": jnp.ones((8, DIM))}, jnp.ones((12,)))
  with pytest.raises(ValueError, match="leading axis"):
    engine.make_round(algo, None)(state, bad, jax.random.key(0))
  with pytest.raises(ValueError, match="clients_per_round"):
    engine.sample_mask(jax.random.key(0), 4, 5)


def test_sample_mask_picks_exactly_m_distinct_clients():
  masks = np.stack([np.asarray(engine.sample_mask(jax.random.key(i), 10, 3))
                    for i in range(20)])
  assert set(np.unique(masks)) == {0.0, 1.0}
  np.testing.assert_array_equal(masks.sum(1), 3)
  assert len({m.tobytes() for m in masks}) > 1  # differs between rounds


def test_round_ledger_counts_payload_and_uplink():
  algo = _toy_algorithm()
  state = algo.init(jnp.ones((DIM,), jnp.float32), C)
  batch = engine.ClientBatch({"v": jnp.ones((C, DIM))}, jnp.ones((C,)))
  ledger = engine.round_ledger(algo, state, batch, count=5)
  assert ledger.total_bytes("down") == 5 * DIM * 4  # 2 * s, float32
  assert ledger.total_bytes("up") == 5 * (DIM + 1) * 4  # u [3] float32 and n [1] int32
