"""Tests of speculative verification: the single-step identity, exact output laws, greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.decoding import verify

V = 5


def _dists(seed, shape, alpha=0.5):
  return np.asarray(jax.random.dirichlet(jax.random.key(seed), jnp.full((V,), alpha), shape),
                    np.float64)


def test_single_step_identity():
  """q(x) min(1, p/q) + (1 - sum min(p, q)) r(x) = p(x), including degenerate pairs."""
  p, q = _dists(0, (50,)), _dists(1, (50,))
  one_hot = np.eye(V)
  cases = [(p, q), (p, p), (one_hot[[0, 1, 2]], one_hot[[0, 3, 2]]),
           (p[:5], np.tile([[1, 0, 0, 0, 0]], (5, 1)))]
  for pp, qq in cases:
    r = np.asarray(verify.residual(jnp.asarray(pp, jnp.float32), jnp.asarray(qq, jnp.float32)))
    ratio = np.where(qq > 0, np.minimum(1, pp / np.where(qq > 0, qq, 1)), 0)
    reject = 1 - np.minimum(pp, qq).sum(-1, keepdims=True)
    np.testing.assert_allclose(qq * ratio + reject * r, pp, atol=1e-6)
    np.testing.assert_allclose(r.sum(-1), 1, atol=1e-6)
  # Equal distributions: the residual falls back to p (the rejection mass is 0 anyway).
  np.testing.assert_allclose(verify.residual(jnp.asarray(p), jnp.asarray(p)), p, atol=1e-7)
  np.testing.assert_allclose(verify.acceptance_rate(jnp.asarray(p), jnp.asarray(q)),
                             1 - 0.5 * np.abs(p - q).sum(-1), atol=1e-6)


K = 3
P = _dists(2, (K + 1,))
Q = _dists(3, (K,))


@jax.jit
def _chains(keys, num_drafted):
  """Draws drafts from Q, verifies against P; returns (n, next, drafts)."""
  def one(key):
    k_d, k_v = jax.random.split(key)
    drafts = jax.random.categorical(k_d, jnp.log(jnp.asarray(Q, jnp.float32)))
    n, nxt = verify.verify_chain(k_v, jnp.asarray(P, jnp.float32),
                                 jnp.asarray(Q, jnp.float32), drafts, num_drafted)
    return n, nxt, drafts
  return jax.vmap(one)(keys)


@pytest.mark.parametrize("num_drafted", [3, 1])
def test_chain_emits_target_distributed_tokens(num_drafted):
  """With fixed rows p_i (no context dependence), the i-th emitted token of a chain must
  follow p_i exactly; the number accepted follows the product of acceptance rates."""
  n_samples = 100_000
  n, nxt, drafts = (np.asarray(a) for a in _chains(
      jax.random.split(jax.random.key(4), n_samples), num_drafted))
  alphas = np.minimum(P[:K], Q).sum(-1)
  for i in range(num_drafted + 1):
    reached = n >= i  # the i-th token is emitted iff the first i drafts were accepted
    tok = np.where(i < n, drafts[:, min(i, K - 1)], nxt)
    freq = np.bincount(tok[reached], minlength=V) / reached.sum()
    se = np.sqrt(P[i] * (1 - P[i]) / reached.sum())
    assert np.all(np.abs(freq - P[i]) <= 5 * se + 1e-9), (i, freq, P[i])
    expected_reach = np.prod(alphas[:i])
    assert abs(reached.mean() - expected_reach) < 5 * np.sqrt(expected_reach / n_samples)
  assert n.max() <= num_drafted


_greedy = jax.jit(verify.verify_greedy)
_chain = jax.jit(verify.verify_chain)


def test_greedy_verification_and_one_hot_chains_agree():
  rng = np.random.default_rng(5)
  for _ in range(30):
    logits = rng.normal(size=(K + 1, V))
    target = logits.argmax(-1)
    drafts = np.where(rng.random(K) < 0.6, target[:K], rng.integers(0, V, K))
    k = int(rng.integers(1, K + 1))
    n, nxt = _greedy(jnp.asarray(logits, jnp.float32), jnp.asarray(drafts), k)
    expected = 0
    while expected < k and drafts[expected] == target[expected]:
      expected += 1
    assert int(n) == expected and int(nxt) == target[expected]
    # One-hot p and q reduce rejection sampling to the greedy rule, for any key.
    n2, nxt2 = _chain(jax.random.key(int(rng.integers(1 << 30))), jnp.eye(V)[target],
                      jnp.eye(V)[drafts], jnp.asarray(drafts), k)
    assert (int(n2), int(nxt2)) == (expected, target[expected])


def test_shape_errors():
  with pytest.raises(ValueError, match="K\\+1"):
    verify.verify_chain(jax.random.key(0), jnp.ones((3, V)), jnp.ones((3, V)),
                        jnp.zeros((3,), jnp.int32))
