"""n-gram table LMs with the cached-LM calling convention, for exact decoding tests (card 0.1).

A "model" whose next-token distribution is a fixed table indexed by the last n - 1 tokens,

  p(x_{t+1} = v | x_<=t) = exp(table[c_1, .., c_{n-1}, v]),  c = (x_{t-n+2}, .., x_t),

where positions before the start of the sequence read a START symbol (index V). With a
tiny vocabulary (V ~ 4) and a few new tokens, every output sequence of a sampler can be
enumerated and its exact probability computed (`continuation_probs`), so samplers are
tested against exact distributions. A draft table with tunable acceptance is a mixture of
the target table with an independent random table (`mixed_draft`): its acceptance
sum_v min(p, q) is at least 1 - mix in every context.

The cache holds the tokens themselves (`TokenCache`, slot = position for committed tokens),
so the LM satisfies `speculative.LM` exactly like the transformer: new tokens are written
at slots lengths .. lengths + T - 1, the context of a new token is read from the new tokens
it may attend to (`mask`; the position of each is given explicitly, so token trees work)
and from committed slots, and rollback is lowering `lengths`.

Differences: no smoothing or learning; tables are random (Dirichlet rows).
"""

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro.algorithms.decoding import sampling
from jaxrepro.algorithms.decoding.speculative import LM, LMOutput


class TokenCache(NamedTuple):
  """The committed tokens of each row.

  Attributes:
    tokens: [B, T_max] int32, token at slot j (= position j for committed slots).
    lengths: [B] int32, committed slots.
  """
  tokens: jax.Array
  lengths: jax.Array


def random_table(key: jax.Array, vocab_size: int, order: int,
                 concentration: float = 0.5) -> jax.Array:
  """A random order-n table: log-probs [V+1]*(n-1) + [V] float32 (START = index V).

  Args:
    key: typed PRNG key.
    vocab_size: V >= 2.
    order: n >= 1 (1 = unigram, 2 = bigram, ...).
    concentration: Dirichlet concentration of each row (> 0; small = peaky).
  """
  if vocab_size < 2 or order < 1 or concentration <= 0:
    raise ValueError(f"random_table needs vocab_size >= 2, order >= 1, concentration > 0; "
                     f"got {vocab_size}, {order}, {concentration}")
  shape = (vocab_size + 1,) * (order - 1)
  p = jax.random.dirichlet(key, jnp.full((vocab_size,), concentration), shape)
  return jnp.log(jnp.maximum(p, 1e-30)).astype(jnp.float32)


def mixed_draft(key: jax.Array, table: jax.Array, mix: float,
                concentration: float = 0.5) -> jax.Array:
  """Draft table log((1 - mix) p + mix r), r a random table of the same shape.

  Acceptance sum_v min(p, q) >= 1 - mix in every context; mix = 0 gives the target itself.
  """
  if not 0 <= mix <= 1:
    raise ValueError(f"mixed_draft: mix must lie in [0, 1]; got {mix}")
  order = table.ndim
  other = random_table(key, table.shape[-1], order, concentration)
  q = (1 - mix) * jnp.exp(table) + mix * jnp.exp(other)
  return jnp.log(jnp.maximum(q, 1e-30)).astype(jnp.float32)


def table_lm(vocab_size: int, order: int) -> LM:
  """The table LM as a `speculative.LM`; params = a table from `random_table`."""
  if vocab_size < 2 or order < 1:
    raise ValueError(f"table_lm needs vocab_size >= 2 and order >= 1; got {vocab_size}, "
                     f"{order}")

  def init_cache(batch_size: int, num_slots: int) -> TokenCache:
    return TokenCache(tokens=jnp.zeros((batch_size, num_slots), jnp.int32),
                      lengths=jnp.zeros((batch_size,), jnp.int32))

  def apply(params, cache, tokens, positions=None, mask=None) -> LMOutput:
    b, t = tokens.shape
    if params.shape != (vocab_size + 1,) * (order - 1) + (vocab_size,):
      raise ValueError(f"table shape {params.shape} does not match V={vocab_size}, "
                       f"order={order}")
    if positions is None:
      positions = cache.lengths[:, None] + jnp.arange(t)[None]
    if mask is None:
      mask = jnp.tril(jnp.ones((t, t), bool))
    mask = jnp.broadcast_to(mask, (b, t, t))
    # Context lag j of new token i is the token at position positions[i] - j: a visible new
    # token at that position if any, else the committed slot, else START.
    ctx = []
    for lag in range(order - 1):
      want = positions - lag  # [B, T]
      match = mask & (positions[:, None, :] == want[:, :, None])  # [B, T(query), T(key)]
      from_new = jnp.sum(jnp.where(match, tokens[:, None, :], 0), axis=-1)
      slot = jnp.clip(want, 0, cache.tokens.shape[1] - 1)
      committed = jnp.take_along_axis(cache.tokens, slot, axis=1)
      tok = jnp.where(match.any(-1), from_new,
                      jnp.where((want >= 0) & (want < cache.lengths[:, None]), committed,
                                vocab_size))
      ctx.append(tok)
    # Table axes run oldest .. newest context token.
    logits = params[tuple(reversed(ctx))] if ctx else jnp.broadcast_to(params, (b, t,
                                                                                vocab_size))
    slots = cache.lengths[:, None] + jnp.arange(t)[None]
    new_tokens = cache.tokens.at[jnp.arange(b)[:, None], slots].set(tokens, mode="drop")
    new_cache = TokenCache(new_tokens, cache.lengths + t)
    return LMOutput(logits=logits, hidden=logits, cache=new_cache)

  return LM(init_cache=init_cache, apply=apply, vocab_size=vocab_size, max_len=None)


def continuation_probs(table: jax.Array, prompt, num_new: int,
                       config: sampling.SamplingConfig = sampling.DEFAULT
                       ) -> np.ndarray:
  """Exact distribution of the next `num_new` tokens after `prompt` under a sampler.

  Enumerates all V^num_new continuations; each step uses the table's row warped by
  `config` (what `make_autoregressive_decoder` samples from).

  Args:
    table: log-prob table of order n.
    prompt: [P] int tokens.
    num_new: N >= 1 (keep V^N small).
    config: sampling config applied at every step.

  Returns:
    [V] * N float64 array, probability of each continuation (sums to 1).
  """
  table = np.asarray(table)
  v, order = table.shape[-1], table.ndim
  prompt = [int(x) for x in np.asarray(prompt)]
  conts = np.array(list(itertools.product(range(v), repeat=num_new)), np.int64)
  seqs = np.concatenate([np.tile(prompt, (len(conts), 1)), conts], 1)
  prob = np.ones(len(conts))
  for i in range(num_new):
    t = len(prompt) + i  # predict seqs[:, t] from the n - 1 tokens before it
    ctx = [seqs[:, t - 1 - lag] if t - 1 - lag >= 0 else np.full(len(conts), v)
           for lag in range(order - 1)]
    rows = table[tuple(reversed(ctx))] if ctx else np.broadcast_to(table, (len(conts), v))
    step = np.asarray(sampling.probs(jnp.asarray(rows), config), np.float64)
    prob *= step[np.arange(len(conts)), seqs[:, t]]
  return prob.reshape((v,) * num_new)
