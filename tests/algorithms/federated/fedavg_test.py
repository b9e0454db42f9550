"""FedAvg oracles: centralized GD in closed form, a NumPy client loop, masking, bytes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.federated import engine, fedavg
from jaxrepro.sharding.mesh import make_mesh

C, N, DIM = 16, 8, 5


def _loss(params, ex):
  """Per-example squared error of a linear model, [B]."""
  return 0.5 * (ex["x"] @ params["w"] + params["b"] - ex["y"]) ** 2


def _data(seed=0):
  rng = np.random.default_rng(seed)
  counts = rng.integers(3, N + 1, size=C)
  mask = np.arange(N)[None] < counts[:, None]
  x = rng.normal(size=(C, N, DIM)).astype(np.float32) * mask[..., None]
  # Client-specific targets: non-IID regression.
  w_true = rng.normal(size=(C, DIM)).astype(np.float32)
  y = (np.einsum("cnd,cd->cn", x, w_true) + 0.1 * rng.normal(size=(C, N))) * mask
  return {"x": x, "y": y.astype(np.float32)}, mask, counts


def _params():
  return {"w": jnp.linspace(-0.5, 0.5, DIM, dtype=jnp.float32),
          "b": jnp.asarray(0.3, jnp.float32)}


def _batch(examples, mask, weight):
  return engine.ClientBatch(
      (jax.tree.map(jnp.asarray, examples), jnp.asarray(mask)), jnp.asarray(weight))


@pytest.fixture(scope="module")
def mesh():
  return make_mesh((8,), ("clients",))


def test_one_full_batch_step_is_centralized_gradient_descent(mesh):
  examples, mask, counts = _data()
  lr = 0.1
  algo = fedavg.make_fedavg(_loss, client_lr=lr, batch_size=N, num_epochs=1,
                            shuffle=False)
  params = _params()
  state, _ = engine.make_round(algo, mesh)(
      algo.init(params, C), _batch(examples, mask, counts.astype(np.float32)),
      jax.random.key(0))
  # Closed form: gradient of the mean squared error over the union of real examples.
  x = examples["x"][mask].astype(np.float64)
  y = examples["y"][mask].astype(np.float64)
  w, b = np.asarray(params["w"], np.float64), float(params["b"])
  r = x @ w + b - y
  np.testing.assert_allclose(state.server["w"], w - lr * x.T @ r / len(y), rtol=1e-5)
  np.testing.assert_allclose(state.server["b"], b - lr * r.mean(), rtol=1e-5)


def _reference_fedavg(params, examples, mask, weight, key, *, lr, server_lr, epochs, bs):
  """Dense NumPy loop: shuffled minibatch SGD per client, then the weighted mean."""
  keys = jax.random.split(key, C)
  w0, b0 = np.asarray(params["w"], np.float64), float(params["b"])
  deltas, losses = [], []
  for i in range(C):
    w, b = w0.copy(), b0
    perms = [np.asarray(jax.random.permutation(k, N))
             for k in jax.random.split(keys[i], epochs)]
    step_losses = []
    for perm in perms:
      for start in range(0, N, bs):
        ix = perm[start:start + bs]
        x, y, m = examples["x"][i, ix], examples["y"][i, ix], mask[i, ix]
        r = (x @ w + b - y) * m
        denom = max(m.sum(), 1)
        step_losses.append(0.5 * (r ** 2).sum() / denom)
        w, b = w - lr * x.T @ r / denom, b - lr * r.sum() / denom
    deltas.append((w - w0, b - b0))
    losses.append(np.mean(step_losses))
  present = weight > 0
  tot = weight[present].sum()
  dw = sum(weight[i] * deltas[i][0] for i in range(C) if present[i]) / tot
  db = sum(weight[i] * deltas[i][1] for i in range(C) if present[i]) / tot
  loss = sum(weight[i] * losses[i] for i in range(C) if present[i]) / tot
  return w0 + server_lr * dw, b0 + server_lr * db, loss


def test_sharded_multi_step_round_matches_numpy_loop(mesh):
  examples, mask, counts = _data(1)
  weight = counts.astype(np.float32)
  weight[[0, 3, 9]] = 0.0
  kw = dict(lr=0.05, server_lr=0.7, epochs=2, bs=4)
  algo = fedavg.make_fedavg(_loss, client_lr=kw["lr"], server_lr=kw["server_lr"],
                            num_epochs=kw["epochs"], batch_size=kw["bs"])
  key = jax.random.key(3)
  state, metrics = engine.make_round(algo, mesh)(
      algo.init(_params(), C), _batch(examples, mask, weight), key)
  w, b, loss = _reference_fedavg(_params(), examples, mask, weight, key, **kw)
  np.testing.assert_allclose(state.server["w"], w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.server["b"], b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-4)


def test_partial_participation_equals_running_present_clients_only(mesh):
  examples, mask, counts = _data(2)
  algo = fedavg.make_fedavg(_loss, client_lr=0.1, batch_size=4, num_epochs=2,
                            shuffle=False)
  present = np.zeros(C, bool)
  present[[0, 2, 5, 6, 9, 11, 12, 15]] = True
  weight = np.where(present, counts, 0).astype(np.float32)
  round_fn = engine.make_round(algo, mesh)
  full, _ = round_fn(algo.init(_params(), C), _batch(examples, mask, weight),
                     jax.random.key(0))
  sub = jax.tree.map(lambda a: a[present], examples)
  only, _ = round_fn(algo.init(_params(), 8), _batch(sub, mask[present], weight[present]),
                     jax.random.key(0))
  for name in ("w", "b"):
    np.testing.assert_allclose(full.server[name], only.server[name], rtol=1e-6)


def test_ledger_bytes_are_parameter_count_times_dtype_size():
  examples, mask, counts = _data()
  algo = fedavg.make_fedavg(_loss, client_lr=0.1, batch_size=4)
  params = {"w": jnp.zeros((DIM,), jnp.float32), "b": jnp.zeros((), jnp.bfloat16)}
  state = algo.init(params, C)
  ledger = engine.round_ledger(algo, state, _batch(examples, mask, counts))
  expected = DIM * 4 + 1 * 2
  assert ledger.total_bytes("up") == expected
  assert ledger.total_bytes("down") == expected


def test_invalid_arguments_raise():
  examples, mask, counts = _data()
  algo = fedavg.make_fedavg(_loss, client_lr=0.1, batch_size=3)
  with pytest.raises(ValueError, match="batch_size"):
    engine.make_round(algo, None)(algo.init(_params(), C), _batch(examples, mask, counts),
                                  jax.random.key(0))
  with pytest.raises(ValueError, match="client_lr"):
    fedavg.make_fedavg(_loss, client_lr=0.0, batch_size=4)


def test_dirichlet_clients_with_sampling_train_end_to_end(mesh):
  """Partition -> pad -> sampled FedAvg rounds on the mesh lowers the union loss."""
  from jaxrepro.launch.data import partitions

  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=400)
  centers = np.array([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]], np.float32)
  x = (centers[labels] + 0.5 * rng.normal(size=(400, 2))).astype(np.float32)
  parts = partitions.dirichlet_partition(labels, C, 0.3, seed=0, min_size=1)
  padded, mask, counts = partitions.pad_client_shards({"x": x, "y": labels}, parts,
                                                      multiple_of=8)

  def xent(params, ex):
    logits = ex["x"] @ params["w"] + params["b"]
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ex["y"][:, None], 1)[:, 0]

  def union_loss(params):
    logits = x @ np.asarray(params["w"]) + np.asarray(params["b"])
    logits = logits - logits.max(1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    return -logp[np.arange(400), labels].mean()

  algo = fedavg.make_fedavg(xent, client_lr=0.2, batch_size=8, num_epochs=1)
  round_fn = engine.make_round(algo, mesh)
  state = algo.init({"w": jnp.zeros((2, 3)), "b": jnp.zeros((3,))}, C)
  start = union_loss(state.server)
  key = jax.random.key(0)
  for _ in range(8):
    key, k_sample, k_round = jax.random.split(key, 3)
    present = engine.sample_mask(k_sample, C, 8)
    state, metrics = round_fn(state, _batch(padded, mask, present * counts), k_round)
    assert float(metrics["num_present"]) == 8.0
  assert union_loss(state.server) < 0.5 * start
