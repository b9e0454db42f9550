"""Logits warpers (temperature, top-k, top-p) and sampling with explicit keys (card S2).

Shared by the speculative and parallel decoding papers (SpecDec++, arXiv:2405.19715;
Superposed Decoding; PEARL; Hidden Transfer, arXiv:2404.12022). A `SamplingConfig` turns
logits z into the distribution the decoder actually samples from,

  p = softmax(z / T)  restricted to the top-k tokens and then to the smallest set of most
  likely tokens whose mass reaches top_p (nucleus, Holtzman et al. 2019, arXiv:1904.09751),

and temperature 0 means greedy decoding, represented as the one-hot distribution of the
argmax. That representation keeps speculative sampling exact for greedy decoding too:
with one-hot p and q the rejection rule accepts exactly when the draft's token is the
target's argmax and the residual is the target's argmax (see `verify`).

Differences from the usual implementations (HF `LogitsWarper`s, the papers' `norm_logits`):
the top-k and top-p filters keep every token tied with the cut-off value (so they can keep
more than k tokens on exact ties, and the result does not depend on sort stability); top-k
is applied before top-p, as in HF's default order. Besides Gumbel-max (`sample`), tokens can
be drawn by inverse CDF from a given uniform (`inverse_cdf`), which lets a decoder draw all
its uniforms with one RNG call; float32 CDFs resolve probabilities down to ~2^-24 of the
total, the same order as the float32 Gumbel race.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How logits become a sampling distribution (hashable: a static jit argument).

  Attributes:
    temperature: >= 0; 0 means greedy (argmax).
    top_k: keep the k largest logits; 0 disables.
    top_p: nucleus mass in (0, 1]; 1 disables.
  """
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"SamplingConfig.temperature must be >= 0; got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k must be >= 0 (0 = off); got {self.top_k}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p must lie in (0, 1]; got {self.top_p}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = SamplingConfig(temperature=0.0)
DEFAULT = SamplingConfig()  # temperature 1, no truncation


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
  """Sets every logit below the k-th largest to -inf: [..., V] -> [..., V] float32."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
  """Keeps the smallest set of most likely tokens with mass >= p (at least one token).

  Args:
    logits: [..., V] float (may hold -inf).
    p: nucleus mass in (0, 1]; 1 returns logits unchanged.

  Returns:
    [..., V] logits with the tokens outside the nucleus set to -inf.
  """
  if p >= 1.0:
    return logits
  order = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(order, axis=-1)
  # A token is kept when the mass strictly before it is below p; the first always is.
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = mass_before < p
  cutoff = jnp.min(jnp.where(kept, order, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def warp_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Temperature, then top-k, then top-p: [..., V] -> [..., V] float32 (-inf = excluded).

  For a greedy config the logits are returned unscaled (only their argmax matters).
  """
  z = logits.astype(jnp.float32)
  if not config.greedy:
    z = z / config.temperature
  z = top_k_filter(z, config.top_k)
  return top_p_filter(z, config.top_p)


def probs(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """The sampling distribution: [..., V] logits -> [..., V] float32 probabilities.

  Greedy configs give the one-hot of the argmax (first index on ties).
  """
  if config.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(warp_logits(logits, config), axis=-1)


def greedy(logits: jax.Array) -> jax.Array:
  """Argmax token (first index on ties): [..., V] -> [...] int32."""
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sample(key: jax.Array, logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """One token per row from the warped distribution: [..., V] -> [...] int32."""
  if config.greedy:
    return greedy(logits)
  return jax.random.categorical(key, warp_logits(logits, config), axis=-1).astype(jnp.int32)


def sample_probs(key: jax.Array, p: jax.Array) -> jax.Array:
  """One token per row of probabilities p [..., V] (zeros allowed) -> [...] int32."""
  logp = jnp.where(p > 0, jnp.log(jnp.where(p > 0, p, 1.0)), -jnp.inf)
  return jax.random.categorical(key, logp, axis=-1).astype(jnp.int32)


def inverse_cdf(u: jax.Array, p: jax.Array) -> jax.Array:
  """The token whose CDF interval holds u: u [...] in [0, 1), p [..., V] >= 0 -> [...] int32.

  p need not be normalised. Zero-probability tokens are never returned (their CDF interval
  is empty; the clip at the end guards against u * total rounding up to the total). Used by
  the decoders with uniforms drawn once per decode, which on CPU is much cheaper than a
  Gumbel draw (one RNG call) per token.
  """
  cdf = jnp.cumsum(p, axis=-1)
  idx = jnp.sum(cdf <= (u * cdf[..., -1])[..., None], axis=-1)
  last = p.shape[-1] - 1 - jnp.argmax(p[..., ::-1] > 0, axis=-1)
  return jnp.minimum(idx, last).astype(jnp.int32)
