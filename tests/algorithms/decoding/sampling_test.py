"""Tests of the logits warpers and samplers against numpy references and sample frequencies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.decoding import sampling

V = 7
LOGITS = np.asarray(jax.random.normal(jax.random.key(0), (5, V))) * 2.0


def _softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _reference(z, temperature, top_k, top_p):
  """numpy: temperature, keep the k largest, then the smallest nucleus with mass >= p."""
  out = []
  for row in z / temperature:
    p = _softmax(row)
    keep = np.ones(V, bool)
    if top_k:
      keep &= row >= np.sort(row)[-top_k]
    p = np.where(keep, p, 0.0)
    p /= p.sum()
    if top_p < 1:
      order = np.argsort(-p)
      cum = np.cumsum(p[order])
      n = int(np.searchsorted(cum, top_p - 1e-12) + 1)  # first prefix reaching top_p
      nucleus = np.zeros(V, bool)
      nucleus[order[:n]] = True
      p = np.where(nucleus, p, 0.0)
      p /= p.sum()
    out.append(p)
  return np.stack(out)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 3, 1.0), (1.0, 0, 0.7), (0.8, 4, 0.9), (1.0, 1, 1.0),
])
def test_probs_match_numpy_reference(temperature, top_k, top_p):
  cfg = sampling.SamplingConfig(temperature, top_k, top_p)
  got = np.asarray(jax.jit(sampling.probs, static_argnums=1)(jnp.asarray(LOGITS), cfg))
  np.testing.assert_allclose(got, _reference(LOGITS, temperature, top_k, top_p), atol=1e-6)


def test_greedy_is_one_hot_argmax():
  got = np.asarray(sampling.probs(jnp.asarray(LOGITS), sampling.GREEDY))
  np.testing.assert_array_equal(got, np.eye(V)[LOGITS.argmax(-1)])
  toks = sampling.sample(jax.random.key(1), jnp.asarray(LOGITS), sampling.GREEDY)
  np.testing.assert_array_equal(toks, LOGITS.argmax(-1))
  assert toks.dtype == jnp.int32


@jax.jit
def _draw(keys, logits):
  cfg = sampling.SamplingConfig(0.8, 0, 0.9)
  p = sampling.probs(logits, cfg)
  return (jax.vmap(lambda k: sampling.sample(k, logits, cfg))(keys),
          jax.vmap(lambda k: sampling.sample_probs(k, p))(keys),
          jax.vmap(lambda k: sampling.inverse_cdf(jax.random.uniform(k), p))(keys))


def test_sample_frequencies_match_the_distribution():
  n = 40_000
  p = _reference(LOGITS[:1], 0.8, 0, 0.9)[0]
  for toks in _draw(jax.random.split(jax.random.key(2), n), jnp.asarray(LOGITS[0])):
    freq = np.bincount(np.asarray(toks), minlength=V) / n
    assert np.all(freq[p == 0] == 0)  # excluded tokens are never drawn
    # 5 standard errors per cell.
    assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9), (freq, p)


def test_inverse_cdf_edges():
  p = jnp.array([0.0, 0.5, 0.0, 0.5, 0.0])
  u = jnp.array([0.0, 0.49999, 0.5, 1.0 - 2.0 ** -24, 0.75])
  np.testing.assert_array_equal(sampling.inverse_cdf(u, p), [1, 1, 3, 3, 3])
  # Unnormalised weights are fine.
  np.testing.assert_array_equal(sampling.inverse_cdf(u, 4 * p), [1, 1, 3, 3, 3])


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    sampling.SamplingConfig(**kwargs)
