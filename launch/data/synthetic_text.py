"""S5a: a synthetic "language" with exact likelihoods, a random sparse Markov chain.

Stand-in S5a of the diffusion spec cards (used by the masked-diffusion papers: Zheng et al.,
"Masked Diffusion Models are Secretly Time-Agnostic Masked Models...", ICLR 2025,
arXiv:2409.02908; RADD, arXiv:2406.03736; SMDM). Real corpora cannot be downloaded and their
likelihood is unknown; this language has exact log-probabilities, per-position unigram and
bigram marginals and total entropy, so a generative model's samples can be scored exactly.

Model. Sequences x in {0..V-1}^L from an order-1 or order-2 Markov chain

  p(x) = pi(x_0) * [order 2: F(x_1 | x_0)] * prod_i T(x_i | context of the previous 1 or 2 tokens).

Every row (pi, each row of F and T) is drawn from a seed as: `support` successors chosen
uniformly without replacement, Dirichlet(concentration) weights on them (small concentration
= peaky), then mixed with the uniform distribution with weight `floor`:

  row = (1 - floor) * sparse_dirichlet + floor / V.

The floor keeps every sequence possible, so the exact NLL of any model sample is finite; a
token off the sparse support costs about log(V / floor) nats, which makes "off-grammar"
tokens (e.g. those a low-temperature sampler suppresses) visible in the NLL.

Marginals are propagated exactly: u_{i+1} = u_i T (order 1) or through the pair marginal
P_{i+1}[b, c] = sum_a P_i[a, b] T[a, b, c] (order 2). Tables are float64 numpy arrays; the
jitted sampler and `log_prob` run in float32 JAX.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _random_row(rng: np.random.Generator, vocab_size: int, support: int, concentration: float,
                floor: float) -> np.ndarray:
  """One sparse, peaky distribution over V tokens mixed with `floor` of uniform."""
  idx = rng.choice(vocab_size, size=support, replace=False)
  row = np.zeros(vocab_size)
  row[idx] = rng.dirichlet(np.full(support, concentration))
  return (1.0 - floor) * row + floor / vocab_size


@dataclasses.dataclass(frozen=True, eq=False)
class MarkovLanguage:
  """An order-1 or order-2 Markov chain over V tokens of fixed length L, with exact tables.

  Attributes:
    length: L, the sequence length (>= 2, and >= 3 for order 2).
    initial: [V] float64, p(x_0).
    transition: [V, V] (order 1, T[a, b] = p(x_i = b | x_{i-1} = a)) or [V, V, V]
      (order 2, T[a, b, c] = p(x_i = c | x_{i-2} = a, x_{i-1} = b)) float64.
    first: order 2 only: [V, V] float64, p(x_1 | x_0); None for order 1.
  """
  length: int
  initial: np.ndarray
  transition: np.ndarray
  first: np.ndarray | None = None

  def __post_init__(self):
    v = self.initial.shape[0] if np.ndim(self.initial) == 1 else -1
    if v < 1:
      raise ValueError(f"initial must be a [V] vector; got shape {np.shape(self.initial)}")
    order = np.ndim(self.transition) - 1
    if order not in (1, 2) or np.shape(self.transition) != (v,) * (order + 1):
      raise ValueError(f"transition must be [V, V] or [V, V, V] with V={v}; got shape "
                       f"{np.shape(self.transition)}")
    if (order == 2) != (self.first is not None):
      raise ValueError("first ([V, V], p(x_1 | x_0)) is required for order 2 and only then")
    if order == 2 and np.shape(self.first) != (v, v):
      raise ValueError(f"first must be [V, V] with V={v}; got shape {np.shape(self.first)}")
    if self.length < order + 1:
      raise ValueError(f"length must be >= {order + 1} for order {order}; got {self.length}")
    for name in ("initial", "transition", "first"):
      table = getattr(self, name)
      if table is not None and (np.any(table < 0) or
                                not np.allclose(np.sum(table, -1), 1.0, atol=1e-9)):
        raise ValueError(f"{name} rows must be probability vectors (non-negative, sum 1)")

  @property
  def vocab_size(self) -> int:
    return int(self.initial.shape[0])

  @property
  def order(self) -> int:
    return int(np.ndim(self.transition) - 1)

  # ----------------------------------------------------------------------------- exact tables

  def bigram(self) -> np.ndarray:
    """Exact adjacent-pair marginals p(x_i = a, x_{i+1} = b); [L - 1, V, V] float64."""
    pairs = []
    if self.order == 1:
      u = self.initial
      for _ in range(self.length - 1):
        pair = u[:, None] * self.transition
        pairs.append(pair)
        u = pair.sum(0)
    else:
      pair = self.initial[:, None] * self.first
      pairs.append(pair)
      for _ in range(self.length - 2):
        pair = np.einsum("ab,abc->bc", pair, self.transition)
        pairs.append(pair)
    return np.stack(pairs)

  def unigram(self) -> np.ndarray:
    """Exact per-position marginals p(x_i = v); [L, V] float64."""
    pairs = self.bigram()
    return np.concatenate([pairs.sum(2), pairs[-1:].sum(1)], axis=0)

  def entropy(self) -> float:
    """Exact entropy H(x) in nats per sequence (the best achievable mean NLL)."""
    def h(p):
      return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)

    total = float(h(self.initial))
    pairs = self.bigram()
    if self.order == 1:
      # Position i + 1 given x_i: sum_a u_i[a] H(T[a]).
      total += float(np.sum(pairs.sum(2) @ h(self.transition)))
    else:
      total += float(self.initial @ h(self.first))
      total += float(np.sum(pairs[:-1] * h(self.transition)[None]))
    return total

  # ----------------------------------------------------------------------- sampling and scoring

  def sample(self, key_or_seed: jax.Array | int, n: int) -> jax.Array:
    """n i.i.d. sequences by inverse-CDF sampling (no Gumbel truncation); [n, L] int32."""
    if n < 1:
      raise ValueError(f"n must be >= 1; got {n}")
    key = jax.random.key(key_or_seed) if isinstance(key_or_seed, int) else key_or_seed
    first = self.transition if self.first is None else self.first
    return _sample(key, jnp.asarray(self.initial, jnp.float32), jnp.asarray(first, jnp.float32),
                   jnp.asarray(self.transition, jnp.float32), n=n, length=self.length)

  def log_prob(self, x: jax.Array) -> jax.Array:
    """Exact log p(x) in nats; x [n, L] int in 0..V-1 -> [n] float32."""
    x = jnp.asarray(x)
    if x.ndim != 2 or x.shape[1] != self.length:
      raise ValueError(f"x must be [n, L={self.length}]; got shape {list(x.shape)}")
    first = self.transition if self.first is None else self.first
    return _log_prob(jnp.log(jnp.asarray(self.initial, jnp.float32)),
                     jnp.log(jnp.asarray(first, jnp.float32)),
                     jnp.log(jnp.asarray(self.transition, jnp.float32)), x.astype(jnp.int32))

  def nll_per_token(self, x: jax.Array) -> float:
    """Mean exact NLL of the sequences x [n, L], in nats per token."""
    return float(-jnp.mean(self.log_prob(x)) / self.length)

  def unigram_tv(self, x: jax.Array) -> float:
    """Mean over positions of TV(empirical p(x_i), exact p(x_i)) for samples x [n, L]."""
    emp = empirical_unigram(x, self.vocab_size)
    return float(np.mean(0.5 * np.abs(emp - self.unigram()).sum(-1)))

  def bigram_tv(self, x: jax.Array) -> float:
    """TV between the empirical and exact adjacent-pair tables, pooled over positions.

    Pooling (averaging the L - 1 pair tables) keeps the sampling noise of V^2 cells small
    at a few thousand samples; per-position tables would be dominated by that noise.
    """
    emp = empirical_bigram(x, self.vocab_size).mean(0)
    return float(0.5 * np.abs(emp - self.bigram().mean(0)).sum())


def empirical_unigram(x: jax.Array, vocab_size: int) -> np.ndarray:
  """Per-position token frequencies of samples x [n, L]; [L, V] float64."""
  x = np.asarray(x)
  counts = np.stack([np.bincount(col, minlength=vocab_size)[:vocab_size] for col in x.T])
  return counts / x.shape[0]


def empirical_bigram(x: jax.Array, vocab_size: int) -> np.ndarray:
  """Per-position adjacent-pair frequencies of x [n, L]; [L - 1, V, V] float64."""
  x = np.asarray(x).astype(np.int64)
  codes = x[:, :-1] * vocab_size + x[:, 1:]
  counts = np.stack([np.bincount(col, minlength=vocab_size ** 2) for col in codes.T])
  return counts.reshape(-1, vocab_size, vocab_size) / x.shape[0]


def make_markov_language(seed: int, *, vocab_size: int = 16, length: int = 16, order: int = 1,
                         support: int = 4, concentration: float = 1.0,
                         floor: float = 1e-3) -> MarkovLanguage:
  """A random sparse, peaky Markov language, deterministic in `seed`.

  Args:
    seed: numpy seed of the tables.
    vocab_size: V >= 2.
    length: L.
    order: 1 or 2 (context length).
    support: successors with Dirichlet mass per context, 1..V.
    concentration: Dirichlet concentration of the support weights (smaller = peakier).
    floor: total probability spread uniformly over all V tokens in every row, in [0, 1).

  Returns:
    A MarkovLanguage with float64 tables.
  """
  if vocab_size < 2:
    raise ValueError(f"vocab_size must be >= 2; got {vocab_size}")
  if order not in (1, 2):
    raise ValueError(f"order must be 1 or 2; got {order}")
  if not 1 <= support <= vocab_size:
    raise ValueError(f"support must lie in 1..vocab_size={vocab_size}; got {support}")
  if concentration <= 0:
    raise ValueError(f"concentration must be > 0; got {concentration}")
  if not 0.0 <= floor < 1.0:
    raise ValueError(f"floor must lie in [0, 1); got {floor}")
  rng = np.random.default_rng(seed)
  row = functools.partial(_random_row, rng, vocab_size, support, concentration, floor)
  initial = row()
  if order == 1:
    transition = np.stack([row() for _ in range(vocab_size)])
    return MarkovLanguage(length=length, initial=initial, transition=transition)
  first = np.stack([row() for _ in range(vocab_size)])
  transition = np.stack([np.stack([row() for _ in range(vocab_size)])
                         for _ in range(vocab_size)])
  return MarkovLanguage(length=length, initial=initial, transition=transition, first=first)


def _inverse_cdf(key: jax.Array, probs: jax.Array) -> jax.Array:
  """One draw per row of probs [n, V] by inverse CDF; [n] int32."""
  u = jax.random.uniform(key, probs.shape[:-1] + (1,), probs.dtype)
  cdf = jnp.cumsum(probs, axis=-1)
  # The token is the number of CDF steps at or below u; the clip absorbs a float32 CDF
  # that ends slightly below 1.
  token = jnp.sum(cdf[..., :-1] <= u, axis=-1)
  return jnp.minimum(token, probs.shape[-1] - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("n", "length"))
def _sample(key, initial, first, transition, *, n, length):
  order = transition.ndim - 1
  keys = jax.random.split(key, length)
  x0 = _inverse_cdf(keys[0], jnp.broadcast_to(initial, (n, initial.shape[0])))
  x1 = _inverse_cdf(keys[1], first[x0])

  def step(carry, key_i):
    prev2, prev1 = carry
    probs = transition[prev1] if order == 1 else transition[prev2, prev1]
    nxt = _inverse_cdf(key_i, probs)
    return (prev1, nxt), nxt

  _, rest = lax.scan(step, (x0, x1), keys[2:])
  return jnp.concatenate([x0[:, None], x1[:, None], rest.T], axis=1)


@jax.jit
def _log_prob(log_initial, log_first, log_transition, x):
  lp = log_initial[x[:, 0]] + log_first[x[:, 0], x[:, 1]]
  if log_transition.ndim == 2:
    lp += jnp.sum(log_transition[x[:, 1:-1], x[:, 2:]], axis=1)
  else:
    lp += jnp.sum(log_transition[x[:, :-2], x[:, 1:-1], x[:, 2:]], axis=1)
  return lp
