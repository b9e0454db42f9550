"""Absorbing ("masked") discrete diffusion: schedules, forward masking, time-agnostic losses.

Shared block B7 of the diffusion family. The process and losses follow

* Zheng et al., "Masked Diffusion Models are Secretly Time-Agnostic Masked Models and Exploit
  Inaccurate Categorical Sampling", ICLR 2025, arXiv:2409.02908 (section 3);
* Ou et al., "Your Absorbing Discrete Diffusion Secretly Models the Conditional Distributions
  of Clean Data", 2024, arXiv:2406.03736 (RADD: the lambda-DCE and k-DCE losses);
* Sahoo et al., "Simple and Effective Masked Diffusion Language Models", 2024,
  arXiv:2406.07524 (MDLM: schedules and the continuous-time ELBO).

Forward process. Each token of a clean sequence x_0 in {0..V-1}^L is independently replaced
by the mask token M by time t with probability 1 - alpha_t (alpha decreasing, alpha_0 = 1):

  q(x_t^i | x_0^i) = alpha_t 1[x_t^i = x_0^i] + (1 - alpha_t) 1[x_t^i = M].

Continuous-time ELBO (MDLM eq. 10):

  -log p(x_0) <= int_0^1 w(t) E[ sum_{i: x_t^i = M} -log p_theta(x_0^i | x_t) ] dt,
  w(t) = -alpha'_t / (1 - alpha_t).

For a network that does not see t, the substitution lambda = 1 - alpha_t (the mask
probability) removes the schedule (RADD eq. 13, "lambda-DCE"):

  L_lambda(x_0) = E_{lambda ~ U(0, 1]} [ (1/lambda) sum_{i masked} -log p_theta(x_0^i | x_lambda) ],

and conditioning on the number k of masked tokens gives k-DCE, the any-order AR bound:

  L_k(x_0) = sum_{k=1}^{L} (1/k) E_{|M|=k} [ sum_{i in M} -log p_theta(x_0^i | x_{-M}) ]
           = E_{k ~ U{1..L}} [ (L/k) E_{|M|=k} [ ... ] ].

All three are the same number for every schedule: the paper's "time-agnostic" result.

Schedules (mask probability 1 - alpha_t, inverse and derivative in closed form):
  linear:     alpha_t = 1 - t;
  cosine:     alpha_t = 1 - sin(pi t / 2)  (= 1 - cos(pi (1 - t) / 2), as in MD4 and MaskGIT);
  loglinear:  sigma(t) = -log(1 - (1 - eps) t), alpha_t = e^{-sigma(t)} = 1 - (1 - eps) t
              (SEDD / RADD; alpha_1 = eps, so a few tokens survive at t = 1).

Differences from the papers' code:
* lambda is drawn on (0, 1], never 0, and stratified over the batch (one draw per stratum)
  like RADD's `Batch_Uniform_Sampler`; MDLM instead floors t at `sampling_eps`.
* Losses return a per-sequence sum in nats, shape [B]; divide by L for nats per token.
* `any_order_nll_bound` sums over k exactly (L network calls along one random order per
  sequence) instead of drawing t, an unbiased estimate with far lower variance.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

SCHEDULES = ("linear", "cosine", "loglinear")

LogitsFn = Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class MaskSchedule:
  """An alpha_t schedule of the absorbing process; hashable, so it can be a static argument.

  Attributes:
    name: one of `SCHEDULES`.
    eps: loglinear only: alpha_1 = eps, the fraction of tokens still clean at t = 1.
  """
  name: str = "linear"
  eps: float = 1e-3

  def __post_init__(self):
    if self.name not in SCHEDULES:
      raise ValueError(f"MaskSchedule.name={self.name!r}; choose one of {SCHEDULES}")
    if not 0.0 <= self.eps < 1.0:
      raise ValueError(f"MaskSchedule.eps={self.eps} must lie in [0, 1)")

  def mask_prob(self, t: jax.Array) -> jax.Array:
    """1 - alpha_t, computed directly (not as 1 - alpha) to keep precision near t = 0."""
    t = jnp.asarray(t)
    if self.name == "linear":
      return t
    if self.name == "cosine":
      return jnp.sin(0.5 * math.pi * t)
    return (1.0 - self.eps) * t

  def alpha(self, t: jax.Array) -> jax.Array:
    """alpha_t, the probability that a token is still clean at time t; same shape as t."""
    return 1.0 - self.mask_prob(t)

  def mask_prob_inv(self, m: jax.Array) -> jax.Array:
    """The time t with 1 - alpha_t = m, clipped to [0, 1] so rounding never leaves it.

    Samplers invert the mask probability rather than alpha: m is what they compute, and
    1 - (1 - m) would lose float32 precision when m is small (t near 0).
    """
    m = jnp.asarray(m)
    if self.name == "linear":
      t = m
    elif self.name == "cosine":
      t = (2.0 / math.pi) * jnp.arcsin(jnp.clip(m, 0.0, 1.0))
    else:
      t = m / (1.0 - self.eps)
    return jnp.clip(t, 0.0, 1.0)

  def alpha_inv(self, a: jax.Array) -> jax.Array:
    """The time t with alpha_t = a, clipped to [0, 1]."""
    return self.mask_prob_inv(1.0 - jnp.asarray(a))

  def alpha_prime(self, t: jax.Array) -> jax.Array:
    """d alpha_t / dt (negative)."""
    t = jnp.asarray(t)
    if self.name == "linear":
      return -jnp.ones_like(t)
    if self.name == "cosine":
      return -0.5 * math.pi * jnp.cos(0.5 * math.pi * t)
    return -(1.0 - self.eps) * jnp.ones_like(t)

  def elbo_weight(self, t: jax.Array) -> jax.Array:
    """w(t) = -alpha'_t / (1 - alpha_t), the ELBO weight of the masked cross-entropy at t."""
    return -self.alpha_prime(t) / self.mask_prob(t)


def _check_tokens(x0: jax.Array, name: str = "x0") -> None:
  if x0.ndim != 2 or not jnp.issubdtype(x0.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array [B, L]; got {x0.dtype}{list(x0.shape)}")


def _check_mask_id(mask_id: int) -> None:
  if not isinstance(mask_id, int) or mask_id < 0:
    raise ValueError(f"mask_id must be a non-negative Python int; got {mask_id!r}")


def _random_ranks(key: jax.Array, shape: tuple[int, int]) -> jax.Array:
  """[B, L] int: each row a uniformly random permutation of 0..L-1 (rank in a random order)."""
  u = jax.random.uniform(key, shape, jnp.float32)
  return jnp.argsort(jnp.argsort(u, axis=-1), axis=-1)


def sample_mask_prob(key: jax.Array, batch_size: int, *, stratified: bool = True) -> jax.Array:
  """Mask probabilities lambda for a batch, in (0, 1].

  Args:
    key: a typed PRNG key.
    batch_size: B.
    stratified: one draw in each of the B strata ((i, i + 1] / B), then shuffled, which
      lowers the variance of the lambda-DCE batch mean; otherwise i.i.d. uniform.

  Returns:
    [B] float32 values in (0, 1]; 0 is excluded because the lambda-DCE weight is 1/lambda.
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1; got {batch_size}")
  key_u, key_perm = jax.random.split(key)
  # 1 - U lies in (0, 1] because jax.random.uniform draws from [0, 1).
  u = 1.0 - jax.random.uniform(key_u, (batch_size,), jnp.float32)
  if not stratified:
    return u
  lam = (jnp.arange(batch_size, dtype=jnp.float32) + u) / batch_size
  return jax.random.permutation(key_perm, lam)


def mask_tokens(key: jax.Array, x0: jax.Array, mask_prob: jax.Array, mask_id: int
                ) -> tuple[jax.Array, jax.Array]:
  """Forward process: masks each token independently with probability `mask_prob`.

  Args:
    key: a typed PRNG key.
    x0: [B, L] int clean tokens.
    mask_prob: [B] or scalar float, the per-sequence mask probability 1 - alpha_t.
    mask_id: the mask token id (usually V).

  Returns:
    (x_t [B, L] same dtype as x0, is_masked [B, L] bool).
  """
  _check_tokens(x0)
  _check_mask_id(mask_id)
  mask_prob = jnp.asarray(mask_prob)
  if mask_prob.ndim > 1 or (mask_prob.ndim == 1 and mask_prob.shape[0] != x0.shape[0]):
    raise ValueError(f"mask_prob must be a scalar or [B={x0.shape[0]}]; got "
                     f"{list(mask_prob.shape)}")
  prob = jnp.broadcast_to(jnp.reshape(mask_prob, (-1, 1)), x0.shape)
  is_masked = jax.random.uniform(key, x0.shape, jnp.float32) < prob
  return jnp.where(is_masked, jnp.asarray(mask_id, x0.dtype), x0), is_masked


def mask_k_tokens(key: jax.Array, x0: jax.Array, k: jax.Array, mask_id: int
                  ) -> tuple[jax.Array, jax.Array]:
  """Masks exactly k[b] positions of sequence b, chosen uniformly among all subsets of size k.

  Args:
    key: a typed PRNG key.
    x0: [B, L] int clean tokens.
    k: [B] int in 0..L.
    mask_id: the mask token id.

  Returns:
    (x_t [B, L], is_masked [B, L] bool).
  """
  _check_tokens(x0)
  _check_mask_id(mask_id)
  # The rank of each position in a uniformly random order; ranks < k is a uniform k-subset.
  ranks = _random_ranks(key, x0.shape)
  is_masked = ranks < jnp.reshape(jnp.asarray(k), (-1, 1))
  return jnp.where(is_masked, jnp.asarray(mask_id, x0.dtype), x0), is_masked


def token_nll(logits: jax.Array, x0: jax.Array) -> jax.Array:
  """-log softmax(logits)[x0] at every position, in float32.

  Args:
    logits: [B, L, V] float, over the V clean tokens (the mask class excluded, as in RADD;
      MDLM's -inf mask logit is equivalent).
    x0: [B, L] int targets in 0..V-1.

  Returns:
    [B, L] float32.
  """
  if logits.ndim != 3 or logits.shape[:2] != x0.shape:
    raise ValueError(f"logits must be [B, L, V] matching x0 {list(x0.shape)}; got "
                     f"{list(logits.shape)}")
  # The log-softmax runs in float32 even for bf16 logits: the loss sums many small terms.
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, x0[..., None].astype(jnp.int32), axis=-1)[..., 0]


def masked_nll_sum(logits: jax.Array, x0: jax.Array, is_masked: jax.Array) -> jax.Array:
  """sum_{i masked} -log p_theta(x0^i | x_t); [B] float32. Unmasked positions add nothing."""
  if is_masked.shape != x0.shape:
    raise ValueError(f"is_masked must have the shape of x0 {list(x0.shape)}; got "
                     f"{list(is_masked.shape)}")
  return jnp.sum(jnp.where(is_masked, token_nll(logits, x0), 0.0), axis=-1)


def lambda_dce_loss(logits: jax.Array, x0: jax.Array, is_masked: jax.Array,
                    mask_prob: jax.Array) -> jax.Array:
  """lambda-DCE: (1 / lambda) sum_{i masked} -log p_theta(x0^i | x_lambda).

  Its expectation over lambda ~ U(0, 1] and the masks is the schedule-free NLL bound.

  Args:
    logits: [B, L, V] network output on x_lambda.
    x0: [B, L] int clean tokens.
    is_masked: [B, L] bool, which positions x_lambda masks.
    mask_prob: [B] the lambda each sequence was masked with (from `sample_mask_prob`).

  Returns:
    [B] float32 per-sequence loss in nats.
  """
  return masked_nll_sum(logits, x0, is_masked) / jnp.asarray(mask_prob, jnp.float32)


def k_dce_loss(logits: jax.Array, x0: jax.Array, is_masked: jax.Array) -> jax.Array:
  """k-DCE: (L / k) sum_{i masked} -log p_theta(x0^i | x_{-M}), k = |M| (0 when k = 0).

  Unbiased for the bound when k ~ U{1..L} and M is a uniform k-subset (`mask_k_tokens`).

  Returns:
    [B] float32 per-sequence loss in nats.
  """
  length = x0.shape[-1]
  k = jnp.sum(is_masked, axis=-1).astype(jnp.float32)
  return masked_nll_sum(logits, x0, is_masked) * length / jnp.maximum(k, 1.0)


def time_weighted_loss(logits: jax.Array, x0: jax.Array, is_masked: jax.Array, t: jax.Array,
                       schedule: MaskSchedule) -> jax.Array:
  """The continuous-time ELBO integrand w(t) sum_{i masked} -log p_theta (MDLM's loss).

  With t ~ U(0, 1] and masks drawn with probability 1 - alpha_t this is unbiased for the
  same bound as `lambda_dce_loss`, whatever the schedule.

  Returns:
    [B] float32 per-sequence loss in nats.
  """
  return masked_nll_sum(logits, x0, is_masked) * schedule.elbo_weight(
      jnp.asarray(t, jnp.float32))


def any_order_nll_bound(key: jax.Array, logits_fn: LogitsFn, x0: jax.Array,
                        mask_id: int) -> jax.Array:
  """Unbiased estimate of the NLL bound L_k(x0) with exactly one network call per k.

  Along one uniformly random order per sequence, the k-th call masks the first k positions
  of the order (a uniform k-subset) and adds (1/k) sum_{i masked} -log p_theta. Because
  every k in 1..L is visited, only the choice of subsets is random; with the true
  conditionals of the data the expectation is exactly -log p(x0).

  Args:
    key: a typed PRNG key.
    logits_fn: `tokens [B, L] int -> logits [B, L, V]`, a time-free network.
    x0: [B, L] int clean tokens.
    mask_id: the mask token id.

  Returns:
    [B] float32 NLL-bound estimates in nats per sequence (divide by L for nats/token).
  """
  _check_tokens(x0)
  _check_mask_id(mask_id)
  batch, length = x0.shape
  ranks = _random_ranks(key, x0.shape)

  def body(total, k):
    is_masked = ranks < k
    x_t = jnp.where(is_masked, jnp.asarray(mask_id, x0.dtype), x0)
    return total + masked_nll_sum(logits_fn(x_t), x0, is_masked) / k, None

  ks = jnp.arange(1, length + 1, dtype=jnp.int32)
  total, _ = lax.scan(body, jnp.zeros((batch,), jnp.float32), ks)
  return total
