"""Tests of the time-conditioned MLP eps-model (`models.time_mlp`)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.models import time_mlp as tm

CFG = tm.TimeMLPConfig(data_dim=3, hidden=16, num_layers=2, time_embed_dim=8)


def np_forward(params, x, t):
  """Independent numpy forward from the raw weights (tanh-approximate GELU as Flax's)."""
  def gelu(v):
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))

  def stack(layers, h):
    n = len(layers)
    for i in range(n):
      h = h @ np.asarray(layers[i]["kernel"]) + np.asarray(layers[i]["bias"])
      h = gelu(h) if i < n - 1 else h
    return h

  half = CFG.time_embed_dim // 2
  freqs = np.exp(-np.log(10000.0) * np.arange(half) / half)
  args = np.asarray(t, np.float64)[:, None] * freqs
  emb = np.concatenate([np.cos(args), np.sin(args)], axis=1)
  e = stack(params["time_mlp"]["layers"], emb)
  return stack(params["net"]["layers"], np.concatenate([x, e], axis=1))


def test_forward_matches_numpy_and_depends_on_time():
  graphdef, params = tm.init_time_mlp(CFG, jax.random.key(0))
  x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
  t = np.array([0, 1, 10, 500, 999], np.int32)
  out = jax.jit(lambda p, x, t: tm.apply_time_mlp(graphdef, p, x, t))(params, x, t)
  assert out.shape == (5, 3) and out.dtype == jnp.float32
  np.testing.assert_allclose(out, np_forward(params, x, t), rtol=1e-4, atol=1e-5)
  other = tm.apply_time_mlp(graphdef, params, x, t[::-1].copy())
  assert not np.allclose(out, other)
  model_fn = tm.make_model_fn(graphdef, params)
  np.testing.assert_allclose(model_fn(x, t, None), out, rtol=1e-6)


def test_init_is_deterministic_in_the_key():
  _, a = tm.init_time_mlp(CFG, jax.random.key(1))
  _, b = tm.init_time_mlp(CFG, jax.random.key(1))
  _, c = tm.init_time_mlp(CFG, jax.random.key(2))
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(u, v)
  assert not np.array_equal(a["net"]["layers"][0]["kernel"], c["net"]["layers"][0]["kernel"])


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="time_embed_dim"):
    tm.TimeMLPConfig(time_embed_dim=7)
  with pytest.raises(ValueError, match="num_layers"):
    tm.TimeMLPConfig(num_layers=0)
  graphdef, params = tm.init_time_mlp(CFG, jax.random.key(0))
  with pytest.raises(ValueError, match="x must"):
    tm.apply_time_mlp(graphdef, params, jnp.zeros((2, 2)), jnp.zeros((2,), jnp.int32))
  with pytest.raises(ValueError, match="t must"):
    tm.apply_time_mlp(graphdef, params, jnp.zeros((2, 3)), jnp.zeros((3,), jnp.int32))
