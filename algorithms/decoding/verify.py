"""Speculative-sampling verification: residual distribution, chain and greedy verifiers (S3).

Speculative sampling (Leviathan, Kalman, Matias, "Fast Inference from Transformers via
Speculative Decoding", ICML 2023, arXiv:2211.17192; Chen et al., "Accelerating Large Language
Model Decoding with Speculative Sampling", 2023, arXiv:2302.01318). A draft proposes
x_1..x_k with distributions q_1..q_k; one target call on the prefix plus the drafts gives
p_1..p_{k+1}. Token i is accepted while

  u_i < p_i(x_i) / q_i(x_i),   u_i ~ U[0, 1)  i.i.d.,

and at the first rejection n the next token is drawn from the residual

  r_n = normalize(max(p_n - q_n, 0))      (p_n itself when p_n = q_n, where no rejection
                                           can occur);

if all k are accepted a bonus token is drawn from p_{k+1}. Each emitted token is then
distributed exactly as p given its prefix, because for every token x

  q(x) min(1, p(x)/q(x)) + (1 - sum_y min(p(y), q(y))) r(x) = p(x),

the identity the tests check. The expected acceptance of one token is
alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q).

Greedy verification accepts x_i while it equals argmax p_i and then emits argmax p_n; it
is what the chain rule reduces to for one-hot p and q (see `sampling.probs`).

Differences from the papers' code: the test is written `u q(x) < p(x)` (no division), the
emitted token is drawn by inverse CDF from one more uniform, the number of drafted tokens
can be below the static buffer length (`num_drafted`, for adaptive draft lengths), and the
single-chain functions are vmapped for batches. Multi-draft and tree verifiers are left to
the papers that need them.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxrepro.algorithms.decoding import sampling


class Verdict(NamedTuple):
  """Outcome of verifying one chain of drafted tokens.

  Attributes:
    num_accepted: int32 scalar n in 0..num_drafted, drafted tokens kept.
    next_token: int32 scalar, the token emitted after them (residual or bonus sample).
  """
  num_accepted: jax.Array
  next_token: jax.Array


def residual(p: jax.Array, q: jax.Array) -> jax.Array:
  """normalize(max(p - q, 0)), or p where that mass is 0: [..., V] -> [..., V] float32."""
  r = jnp.maximum(p - q, 0.0)
  mass = jnp.sum(r, axis=-1, keepdims=True)
  return jnp.where(mass > 0, r / jnp.where(mass > 0, mass, 1.0), p)


def acceptance_rate(p: jax.Array, q: jax.Array) -> jax.Array:
  """Probability that one drafted token is accepted, sum_x min(p, q): [..., V] -> [...]."""
  return jnp.sum(jnp.minimum(p, q), axis=-1)


def _check(p, q, draft):
  k = draft.shape[-1]
  if p.ndim != 2 or p.shape[0] != k + 1 or (q is not None and q.shape != (k, p.shape[1])):
    raise ValueError(f"need p [K+1, V], q [K, V], draft [K]; got p {list(p.shape)}, "
                     f"q {None if q is None else list(q.shape)}, draft {list(draft.shape)}")


def verify_chain(key: jax.Array, p: jax.Array, q: jax.Array, draft: jax.Array,
                 num_drafted: jax.Array | int | None = None) -> Verdict:
  """Rejection-sampling verification of one chain of drafted tokens (exact).

  Args:
    key: typed PRNG key.
    p: [K+1, V] float target distributions at the K+1 verified positions (row i is the
      distribution of the token after the prefix and drafts 1..i).
    q: [K, V] float draft distributions the drafts were sampled from.
    draft: [K] int drafted tokens.
    num_drafted: int32 scalar k <= K, how many drafts are real (default K); rows beyond
      are ignored, and the bonus token comes from p[k].

  Returns:
    Verdict(num_accepted, next_token).
  """
  return verify_chain_uniform(jax.random.uniform(key, (draft.shape[0] + 1,)), p, q, draft,
                              num_drafted)


def verify_chain_uniform(u: jax.Array, p: jax.Array, q: jax.Array, draft: jax.Array,
                         num_drafted: jax.Array | int | None = None) -> Verdict:
  """`verify_chain` driven by given uniforms (for decoders that pre-draw their randomness).

  Args:
    u: [K+1] float in [0, 1): u[:K] are the acceptance tests, u[K] draws the emitted token
      (residual or bonus) by inverse CDF.
    p, q, draft, num_drafted: as in `verify_chain`.

  Returns:
    Verdict(num_accepted, next_token).
  """
  _check(p, q, draft)
  k_max = draft.shape[0]
  k = jnp.asarray(k_max if num_drafted is None else num_drafted, jnp.int32)
  idx = jnp.arange(k_max)
  p_x = p[idx, draft]
  q_x = q[idx, draft]
  ok = (u[:k_max] * q_x < p_x) & (idx < k)
  # Accepted = the length of the leading run of successes.
  n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32))).astype(jnp.int32)
  p_n = p[n]
  q_n = q[jnp.minimum(n, k_max - 1)]
  dist = jnp.where(n < k, residual(p_n, q_n), p_n)
  return Verdict(n, sampling.inverse_cdf(u[k_max], dist))


def verify_greedy(p: jax.Array, draft: jax.Array,
                  num_drafted: jax.Array | int | None = None) -> Verdict:
  """Greedy verification: keep drafts while they equal the target's argmax.

  Args:
    p: [K+1, V] target logits or probabilities (only the argmax is used).
    draft: [K] int drafted tokens.
    num_drafted: as in `verify_chain`.

  Returns:
    Verdict(num_accepted, next_token = argmax of p[num_accepted]).
  """
  _check(p, None, draft)
  k_max = draft.shape[0]
  k = jnp.asarray(k_max if num_drafted is None else num_drafted, jnp.int32)
  target = sampling.greedy(p)
  ok = (draft == target[:-1]) & (jnp.arange(k_max) < k)
  n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32))).astype(jnp.int32)
  return Verdict(n, target[n])
