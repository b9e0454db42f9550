"""First-hitting sampler and categorical-precision analysis for masked diffusion models.

Paper: Zheng, Chen, Mao, Liu, Zhu, Zhang, "Masked Diffusion Models are Secretly
Time-Agnostic Masked Models and Exploit Inaccurate Categorical Sampling", ICLR 2025,
arXiv:2409.02908. The process, schedules and losses live in
`jaxrepro.algorithms.diffusion.masked`.

Time-stepped sampler (the original MDM/MDLM sampler the paper starts from). On the grid
t_k = 1 - k/N, each still-masked token at step t -> s is drawn from the (V + 1)-way
categorical

  p(x_s^i = v | x_t) = (alpha_s - alpha_t) / (1 - alpha_t) * p_theta(v | x_t),
  p(x_s^i = M | x_t) = (1 - alpha_s) / (1 - alpha_t),

so the network is called at every one of the N steps (NFE = N) even when nothing unmasks.

First-hitting sampler (FHS, paper section 4). With n tokens masked at time t, their
unmasking times are i.i.d. with P(still masked at s | masked at t) = (1 - alpha_s)/(1 - alpha_t),
so the first of them happens at

  tau = alpha^{-1}(1 - (1 - alpha_t) U^{1/n}),  U ~ U(0, 1)  (linear schedule: tau = t U^{1/n}),

at which exactly one uniformly chosen masked position is unmasked with a token from
p_theta(. | x_t). Because the network never sees t, the token sequence is distributed exactly
as random-order any-order-autoregressive decoding, whatever the schedule, and takes exactly
one network call per token (NFE = number of masked tokens, L for unconditional sampling).

Categorical precision (paper section 5). A Gumbel-max draw argmax_i (log p_i + G_i) is the
exponential race argmax_i p_i / E_i with E_i = -log U_i. In float32, U lies on a 2^-b grid
(b = 23 in JAX, 24 in torch), so E_i >= ~2^-b, and an option whose probability ratio r_i =
p_i / p_max to the dominant option (in the time-stepped sampler: "stay masked") is tiny is
under-sampled. For a b-bit grid (our derivation, card 8):

  P(i) ~ p_i m(c_i),  c_i = 2^-b / r_i,  m(c) = c e^{-c} / (1 - e^{-c}) = c / (e^c - 1),

which lowers the effective temperature and the entropy of the samples. float64 (b = 52)
removes the bias at any realistic r.

Differences from the paper and the code it analyses (kuleshov-group/mdlm `diffusion.py`):
* MDLM draws the race in probability space (`probs / (1e-10 - log(rand + 1e-10))`, 24-bit
  torch uniforms); we use JAX's Gumbel-max in log space (23-bit uniforms, `mode="low"` pinned
  so the jax flag `jax_use_high_dynamic_range_gumbel` cannot change the result). The two
  races have the same truncation up to one bit.
* The FHS chooses its position with an exact uniform integer over the masked positions rather
  than a masked Gumbel top-1 (no float ties); the token draw uses the selectable precision.
* Our samplers are batched natively over [B, L] (the network call is batched); every
  sequence has its own first-hitting times. Only single-token FHS is implemented (no
  parallel or high-order variants).
"""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro.algorithms.diffusion.masked import MaskSchedule

LogitsFn = Callable[[jax.Array], jax.Array]

LINEAR = MaskSchedule("linear")

# JAX float32 uniforms randomise 23 mantissa bits, float64 ones 52 (`jax.random.uniform`).
MANTISSA_BITS = {"float32": 23, "float64": 52}


class FHSOutput(NamedTuple):
  """Result of `first_hitting_sample`.

  Attributes:
    tokens: [B, L] int32 samples, no mask left.
    times: [B, L] float32 time at which each position was unmasked (t_start for positions
      that were already clean in x_init); decreasing along the unmasking order.
    nfe: scalar int32, the number of network calls (the largest masked count in x_init).
  """
  tokens: jax.Array
  times: jax.Array
  nfe: jax.Array


class SteppedOutput(NamedTuple):
  """Result of `time_stepped_sample`.

  Attributes:
    tokens: [B, L] int32 samples, no mask left.
    nfe: scalar int32, the number of network calls (= num_steps).
  """
  tokens: jax.Array
  nfe: jax.Array


def _float_dtype(dtype) -> np.dtype:
  """Validates a sampler precision: float32 always, float64 only with jax_enable_x64."""
  dt = np.dtype(dtype)
  if dt.name not in MANTISSA_BITS:
    raise ValueError(f"dtype must be float32 or float64; got {dt.name}")
  if dt.name == "float64" and not jax.config.read("jax_enable_x64"):
    raise ValueError("dtype=float64 needs jax_enable_x64; call "
                     "jax.config.update('jax_enable_x64', True) at program start")
  return dt


def gumbel_noise(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Standard Gumbel noise -log(-log U) with U on JAX's 2^-23 (float32) or 2^-52 grid.

  This is the only noise source of the token draws below, and it is exactly the truncated
  noise the paper analyses: the largest float32 value is -log(-log(1 - 2^-23)) ~ 15.9.

  Args:
    key: a typed PRNG key.
    shape: output shape.
    dtype: float32 or float64 (float64 needs jax_enable_x64).

  Returns:
    `shape` array of `dtype`.
  """
  dt = _float_dtype(dtype)
  # mode="low" pins the plain one-uniform sampler whatever the global jax flag says.
  return jax.random.gumbel(key, shape, dt, mode="low")


def categorical(key: jax.Array, logits: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Gumbel-max draw over the last axis, with noise and sum in precision `dtype`.

  Args:
    key: a typed PRNG key.
    logits: [..., K] unnormalised log-probabilities (-inf allowed for impossible options).
    dtype: float32 (the truncated sampler of the paper) or float64 (unbiased).

  Returns:
    [...] int32 indices in 0..K-1.
  """
  dt = _float_dtype(dtype)
  noise = gumbel_noise(key, logits.shape, dt)
  return jnp.argmax(logits.astype(dt) + noise, axis=-1).astype(jnp.int32)


def first_hitting_time(key: jax.Array, t: jax.Array, num_masked: jax.Array,
                       schedule: MaskSchedule) -> jax.Array:
  """The first unmasking time tau among n masked tokens, given time t.

  tau = alpha^{-1}(1 - (1 - alpha_t) U^{1/n}), so P(tau <= s) = ((1 - alpha_s)/(1 - alpha_t))^n.

  Args:
    key: a typed PRNG key.
    t: [...] float current times in (0, 1].
    num_masked: [...] int n >= 1 (broadcast against t).
    schedule: the alpha_t schedule.

  Returns:
    [...] float32 times in [0, t].
  """
  t = jnp.asarray(t, jnp.float32)
  n = jnp.asarray(num_masked, jnp.float32)
  shape = jnp.broadcast_shapes(t.shape, n.shape)
  # float32 pinned so the loop carry keeps its type when jax_enable_x64 is on.
  u = jax.random.uniform(key, shape, jnp.float32)
  # U^{1/n} through exp(log U / n): exact for large n and 0 when U = 0 (tau = 0).
  m = schedule.mask_prob(t) * jnp.exp(jnp.log(u) / jnp.maximum(n, 1.0))
  return jnp.minimum(schedule.mask_prob_inv(m), t).astype(jnp.float32)


def _check_x(x: jax.Array, mask_id: int) -> None:
  if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"x_init must be an integer array [B, L]; got {x.dtype}{list(x.shape)}")
  if not isinstance(mask_id, int) or mask_id < 0:
    raise ValueError(f"mask_id must be a non-negative Python int; got {mask_id!r}")


def _check_logits(logits: jax.Array, x: jax.Array) -> None:
  if logits.ndim != 3 or logits.shape[:2] != x.shape:
    raise ValueError(f"logits_fn must map tokens {list(x.shape)} to logits [B, L, V]; got "
                     f"{list(logits.shape)}")


def first_hitting_sample(key: jax.Array, logits_fn: LogitsFn, x_init: jax.Array, *,
                         mask_id: int, schedule: MaskSchedule = LINEAR,
                         t_start: float = 1.0, dtype=jnp.float32) -> FHSOutput:
  """First-hitting sampler: one network call per unmasked token.

  A `lax.fori_loop` over unmasking events; event i draws every sequence's next first-hitting
  time, picks one of its masked positions uniformly and samples that position's token from
  `logits_fn(x)`. Sequences with no mask left are carried unchanged.

  Args:
    key: a typed PRNG key.
    logits_fn: `tokens [B, L] int32 -> logits [B, L, V]` over the V clean tokens; a pure,
      time-free network (anything: a transformer, a lookup table).
    x_init: [B, L] int tokens, mask_id where masked (all mask for unconditional sampling).
    mask_id: the mask token id (tokens drawn are in 0..V-1).
    schedule: alpha_t schedule; it only changes `times`, never the tokens.
    t_start: the time x_init is at (1.0: fully noised).
    dtype: precision of the token draw, float32 or float64 (needs jax_enable_x64).

  Returns:
    FHSOutput(tokens [B, L] int32, times [B, L] float32, nfe int32 scalar).
  """
  _check_x(x_init, mask_id)
  dt = _float_dtype(dtype)
  x0 = x_init.astype(jnp.int32)
  batch, length = x0.shape
  masked0 = x0 == mask_id
  num_events = jnp.max(jnp.sum(masked0, axis=-1)).astype(jnp.int32)
  times0 = jnp.full((batch, length), t_start, jnp.float32)
  t0 = jnp.full((batch,), t_start, jnp.float32)

  def body(i, carry):
    x, t, times = carry
    key_tau, key_pos, key_tok = jax.random.split(jax.random.fold_in(key, i), 3)
    masked = x == mask_id
    n = jnp.sum(masked, axis=-1)
    active = n > 0
    tau = first_hitting_time(key_tau, t, n, schedule)
    # An exact uniform choice among the n masked positions: the r-th masked one, r ~ U{0..n-1}.
    r = jax.random.randint(key_pos, (batch,), 0, jnp.maximum(n, 1))
    rank = jnp.cumsum(masked, axis=-1) - 1
    hit = masked & (rank == r[:, None]) & active[:, None]
    logits = logits_fn(x)
    _check_logits(logits, x)
    pos = jnp.argmax(hit, axis=-1)
    row = jnp.take_along_axis(logits, pos[:, None, None], axis=1)[:, 0]
    token = categorical(key_tok, row, dt)
    x = jnp.where(hit, token[:, None], x)
    times = jnp.where(hit, tau[:, None], times)
    t = jnp.where(active, tau, t)
    return x, t, times

  x, _, times = lax.fori_loop(0, num_events, body, (x0, t0, times0))
  return FHSOutput(tokens=x, times=times, nfe=num_events)


def unmask_probability(schedule: MaskSchedule, t: jax.Array, s: jax.Array) -> jax.Array:
  """(alpha_s - alpha_t) / (1 - alpha_t): P(a token masked at t is clean at s < t)."""
  m_t = schedule.mask_prob(t)
  return (m_t - schedule.mask_prob(s)) / m_t


def time_stepped_sample(key: jax.Array, logits_fn: LogitsFn, x_init: jax.Array, *,
                        num_steps: int, mask_id: int,
                        schedule: MaskSchedule = LINEAR, t_start: float = 1.0,
                        dtype=jnp.float32) -> SteppedOutput:
  """The original N-step MDM sampler (MDLM `_ddpm_update` without caching), as a `lax.scan`.

  At step k (t = t_start (1 - k/N) -> s = t_start (1 - (k+1)/N)) every masked position draws
  from the (V + 1)-way categorical [(m_t - m_s) p_theta(. | x_t), m_s] (m = 1 - alpha), with
  a Gumbel-max in `dtype`. The last step has m_s = 0, so nothing stays masked.

  Args:
    key: a typed PRNG key.
    logits_fn: `tokens [B, L] int32 -> logits [B, L, V]`, a time-free network.
    x_init: [B, L] int tokens, mask_id where masked.
    num_steps: N >= 1, a Python int (static).
    mask_id: the mask token id.
    schedule: alpha_t schedule.
    t_start: the time x_init is at.
    dtype: float32 (the truncated Gumbel the paper analyses) or float64 (needs x64).

  Returns:
    SteppedOutput(tokens [B, L] int32, nfe int32 scalar = N).
  """
  _check_x(x_init, mask_id)
  if not isinstance(num_steps, int) or num_steps < 1:
    raise ValueError(f"num_steps must be a Python int >= 1; got {num_steps!r}")

  def body(x, k):
    logits = logits_fn(x)
    _check_logits(logits, x)
    return time_step(key, k, logits, x, num_steps=num_steps, mask_id=mask_id,
                     schedule=schedule, t_start=t_start, dtype=dtype), None

  x, _ = lax.scan(body, x_init.astype(jnp.int32), jnp.arange(num_steps, dtype=jnp.int32))
  return SteppedOutput(tokens=x, nfe=jnp.asarray(num_steps, jnp.int32))


def time_step(key: jax.Array, k: jax.Array, logits: jax.Array, x: jax.Array, *,
              num_steps: int, mask_id: int, schedule: MaskSchedule = LINEAR,
              t_start: float = 1.0, dtype=jnp.float32) -> jax.Array:
  """Step k of `time_stepped_sample`, given the network's logits at `x` (the scan body).

  Exposed so that a Python loop calling the network and this step (the diffusers style)
  draws exactly the tokens of the scanned sampler with the same key.

  Args:
    key: the sampler's key (step k uses `fold_in(key, k)`).
    k: int32 step index in [0, num_steps).
    logits: [B, L, V] network logits at `x`.
    x: [B, L] int32 current tokens.
    num_steps, mask_id, schedule, t_start, dtype: as in `time_stepped_sample`.

  Returns:
    [B, L] int32 tokens at the next time.
  """
  dt = _float_dtype(dtype)
  # Times and weights in the draw precision: (m_t - m_s) is ~1/N, and float64 keeps the
  # "stay" weight m_s / m_t from rounding for large N.
  t = t_start * (1.0 - k.astype(dt) / num_steps)
  s = t_start * (1.0 - (k + 1).astype(dt) / num_steps)
  m_t, m_s = schedule.mask_prob(t), schedule.mask_prob(s)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).astype(dt)
  log_stay = jnp.broadcast_to(jnp.log(m_s), logp.shape[:-1] + (1,))
  log_w = jnp.concatenate([logp + jnp.log(m_t - m_s), log_stay], axis=-1)
  draw = categorical(jax.random.fold_in(key, k), log_w, dt)
  vocab = logp.shape[-1]
  return jnp.where((x == mask_id) & (draw < vocab), draw, x)


def truncation_factor(c: jax.Array) -> jax.Array:
  """m(c) = c e^{-c} / (1 - e^{-c}) = c / expm1(c), with m(0) = 1 and m(inf) = 0."""
  c = jnp.asarray(c)
  # Three branches keep every intermediate finite: c/expm1(c) is exact for moderate c;
  # for large c, m = c e^{-c} (1 + O(e^{-c})), with c clipped so that inf * 0 never happens.
  moderate = jnp.clip(c, 1e-30, 50.0)
  large = jnp.clip(c, 50.0, 1e4)
  return jnp.where(c <= 0, 1.0, jnp.where(c < 50.0, moderate / jnp.expm1(moderate),
                                          large * jnp.exp(-large)))


def effective_race_probabilities(p: jax.Array, bits: int) -> jax.Array:
  """Closed-form output distribution of an exponential race with b-bit uniforms.

  For every option other than the dominant one (argmax p), P(i) ~ p_i m(c_i) with
  c_i = 2^-b / r_i and r_i = p_i / p_max; the dominant option gets the remainder. Accurate
  when the dominant option holds most of the mass (r_i << 1), as "stay masked" does in the
  time-stepped sampler.

  Not modelled: the grid point U = 0 (probability 2^-b), where the dominant option's E is
  infinite (or, with JAX's `minval=tiny`, about 87) and a non-dominant option wins. It adds
  about 2^-b to the non-dominant total, which matters only when that total is itself of order
  2^-b (at b = 12: 256 options of r = 2^-14 measure 1.38e-3 against 1.15e-3 predicted;
  adding 2^-12 gives 1.39e-3).

  Args:
    p: [K] probabilities (normalised here; zeros allowed).
    bits: b >= 1, the number of random bits of the uniforms (23: JAX float32, 24: torch
      float32, 52/53: float64).

  Returns:
    [K] effective probabilities, same float dtype as p (float32 unless x64).
  """
  if not isinstance(bits, int) or bits < 1:
    raise ValueError(f"bits must be a Python int >= 1; got {bits!r}")
  p = jnp.asarray(p)
  if p.ndim != 1:
    raise ValueError(f"p must be a 1-D probability vector [K]; got shape {list(p.shape)}")
  p = p / jnp.sum(p)
  top = jnp.argmax(p)
  r = p / p[top]
  c = jnp.where(r > 0, 2.0 ** -bits / jnp.where(r > 0, r, 1.0), jnp.inf)
  q = jnp.where(r > 0, p * truncation_factor(c), 0.0)
  is_top = jnp.arange(p.shape[0]) == top
  q = jnp.where(is_top, 0.0, q)
  return jnp.where(is_top, 1.0 - jnp.sum(q), q)


def race_sample_counts(key: jax.Array, p: jax.Array, bits: int, num_samples: int,
                       chunk_size: int = 8192) -> jax.Array:
  """Monte-Carlo exponential race argmax_i p_i / E_i with E_i = -log U_i, U_i on a 2^-b grid.

  U = k 2^-b with k uniform in 0..2^b - 1, as float samplers produce; E is computed as
  -log1p(-j 2^-b) with j = 2^b - k so that the grid near U = 1, where truncation acts, is
  exact.

  Args:
    key: a typed PRNG key.
    p: [K] probabilities (or any positive weights).
    bits: 1..53; bits > 24 need jax_enable_x64 (64-bit integers and float64).
    num_samples: number of races, a multiple of chunk_size.
    chunk_size: races drawn at once (memory: chunk_size * K uniforms).

  Returns:
    [K] int32 counts of wins, summing to num_samples.
  """
  if not isinstance(bits, int) or not 1 <= bits <= 53:
    raise ValueError(f"bits must be a Python int in 1..53; got {bits!r}")
  if chunk_size < 1 or num_samples < 1 or num_samples % chunk_size:
    raise ValueError(f"num_samples ({num_samples}) must be a positive multiple of chunk_size "
                     f"({chunk_size})")
  wide = bits > 24
  if wide and not jax.config.read("jax_enable_x64"):
    raise ValueError(f"bits={bits} > 24 needs jax_enable_x64 (float64 and uint64)")
  p = jnp.asarray(p)
  if p.ndim != 1:
    raise ValueError(f"p must be a 1-D vector [K]; got shape {list(p.shape)}")
  fdt, udt, width = (jnp.float64, jnp.uint64, 64) if wide else (jnp.float32, jnp.uint32, 32)
  log_p = jnp.log(p.astype(fdt))
  num_options = p.shape[0]

  def body(i, counts):
    raw = jax.random.bits(jax.random.fold_in(key, i), (chunk_size, num_options), udt)
    k = lax.shift_right_logical(raw, jnp.asarray(width - bits, udt))
    j = (jnp.asarray(2 ** bits, udt) - k).astype(fdt)
    # E = -log(U) with U = 1 - j 2^-b; j = 2^b gives U = 0, E = inf, a race that never wins.
    e = -jnp.log1p(-j * (2.0 ** -bits))
    winner = jnp.argmax(log_p - jnp.log(e), axis=-1)
    return counts + jnp.bincount(winner, length=num_options).astype(jnp.int32)

  return lax.fori_loop(0, num_samples // chunk_size, body,
                       jnp.zeros((num_options,), jnp.int32))


def entropy(p: jax.Array) -> jax.Array:
  """Shannon entropy in nats over the last axis (0 log 0 = 0); [...] float."""
  p = jnp.asarray(p)
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


__all__ = [
    "FHSOutput", "SteppedOutput", "MANTISSA_BITS", "gumbel_noise", "categorical",
    "first_hitting_time", "first_hitting_sample", "unmask_probability", "time_stepped_sample",
    "time_step",
    "truncation_factor", "effective_race_probabilities", "race_sample_counts", "entropy",
]
