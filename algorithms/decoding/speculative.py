"""Speculative decoding and its autoregressive baseline as jitted `lax.while_loop` programs.

Speculative decoding (Leviathan, Kalman, Matias, "Fast Inference from Transformers via
Speculative Decoding", ICML 2023, arXiv:2211.17192; Chen et al., arXiv:2302.01318), the
shared loop S5 of the decoding papers (SpecDec++, arXiv:2405.19715, plugs its stopping rule
into `DraftPolicy`). With L tokens committed, one round

  1. drafts x_1..x_k autoregressively with the draft model (k <= K_max; a `DraftPolicy`,
     called after every drafted token, decides whether to stop),
  2. scores [x_L, x_1..x_k] with ONE target call, giving p_1..p_{k+1},
  3. verifies (`verify.verify_chain`, or `verify_greedy` at temperature 0) and commits the
     n accepted drafts plus one more token,

so the output has exactly the target's distribution (greedy: exactly greedy decoding), and
a round costs k draft calls + 1 target call for n + 1 tokens. Expected tokens per target
call at constant k with i.i.d. acceptance alpha: (1 - alpha^{k+1}) / (1 - alpha).

Static shapes. A single sequence (`jax.vmap` over prompts for batches) lives in a token
buffer of `P + max_new + K_max + 1` slots; both KV caches have as many slots. Invariants at
the start of a round with L committed tokens: the target cache holds L - 1 slots (all but
the last committed token); the draft cache is set to L - 2 slots and re-fed the last two
committed tokens in its first call of the round (a 2-token chunk), which covers both the
case where its cache already holds token L - 2 (rewriting the same key/value is harmless)
and the all-accepted case where it never saw the last draft. Rejected drafts are rolled
back by lowering `lengths` only. The verification call always scores K_max + 1 positions
(padded; causal masking keeps the padding from affecting the real ones) unless
`verify_branches=True`, which compiles one target call per draft length with `lax.switch`
so that the cost follows k (for adaptive policies; under `vmap` a switch becomes a select
that runs every branch, so use it at batch 1).

The LM protocol (`LM`) is a pair of pure functions (`init_cache`, cached `apply`) that the
NNX transformer (`transformer_lm`) and the table LMs of `table_lm` both satisfy.

Statistics: `target_calls` and `draft_calls` count model calls after the prefill (which
both decoders do once per model); `accepted[r]` and `drafted[r]` per round (-1 after the
last round); `num_generated` = rounds + sum(accepted) tokens, which can exceed `max_new`
by up to K_max (only the first `max_new` are returned).

Randomness: each decode draws all its uniforms with one RNG call before the loop and samples
by inverse CDF (`sampling.inverse_cdf`); on CPU one Gumbel draw per token costs more than a
draft forward of the tiny models.

Differences from the papers' code: the draft re-feeds two tokens per round instead of
keeping a separate "pending token" path; prompts need at least 2 tokens; no EOS handling
(fixed `max_new`); prefill calls are not counted.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.algorithms.decoding import sampling, verify
from jaxrepro.models import transformer as tfm

PyTree = Any


class LMOutput(NamedTuple):
  """What an LM's cached `apply` returns.

  Attributes:
    logits: [B, T, V] float32 next-token logits at each new token.
    hidden: [B, T, H] float features at each new token (the transformer's final hidden
      state; the table LMs' log-probabilities).
    cache: the cache with the new tokens written and `lengths` advanced by T.
  """
  logits: jax.Array
  hidden: jax.Array
  cache: PyTree


class LM(NamedTuple):
  """A causal LM as pure functions (hashable: a static argument of the decoders).

  Attributes:
    init_cache: `(batch_size, num_slots) -> cache`, a pytree with `.lengths [B] int32`
      that supports `cache._replace(lengths=...)` (rollback).
    apply: `(params, cache, tokens [B, T] int, positions [B, T] int | None,
      mask [B, T, T] bool | None) -> LMOutput`; new tokens go to slots lengths ..
      lengths + T - 1 and attend to the committed slots plus new tokens allowed by `mask`
      (default causal); positions default to lengths + 0..T-1.
    vocab_size: V, the width of the logits.
    max_len: positions must stay below this (None: unbounded).
  """
  init_cache: Callable[[int, int], PyTree]
  apply: Callable[..., LMOutput]
  vocab_size: int
  max_len: int | None = None


def transformer_lm(cfg: tfm.TransformerConfig, graphdef) -> LM:
  """The causal NNX transformer as an `LM` (params = its `nnx.State`)."""
  if not cfg.causal:
    raise ValueError("transformer_lm needs a causal TransformerConfig (causal=True)")

  def init_cache(batch_size: int, num_slots: int):
    return tfm.init_cache(cfg, batch_size, num_slots)

  def apply(params, cache, tokens, positions=None, mask=None):
    out = tfm.apply_cached(graphdef, params, cache, tokens, positions, mask)
    return LMOutput(out.logits, out.hidden, out.cache)

  return LM(init_cache, apply, cfg.output_size or cfg.vocab_size, cfg.max_len)


# ---------------------------------------------------------------------------- draft policies


class DraftInfo(NamedTuple):
  """What a draft-length policy sees after each drafted token (single sequence).

  Attributes:
    index: int32 scalar j >= 0: the token just drafted is x_{j+1} (j + 1 drafted so far).
    token: int32 scalar x_{j+1}.
    q: [V] float32, the (warped) draft distribution x_{j+1} was drawn from.
    logits: [V] float32 raw draft logits of that step.
    hidden: [H] the draft's hidden state at its input token of that step, i.e. after it
      consumed x_j (the last committed token when j = 0). SpecDec++'s head reads this.
    fed_token: int32 scalar, that input token.
    position: int32 scalar, the position of that input token in the sequence.
  """
  index: jax.Array
  token: jax.Array
  q: jax.Array
  logits: jax.Array
  hidden: jax.Array
  fed_token: jax.Array
  position: jax.Array


class DraftPolicy(NamedTuple):
  """A pluggable draft-length rule (pure functions; state is any pytree).

  Attributes:
    init: `policy_params -> state`, once per decode.
    stop: `(policy_params, state, DraftInfo) -> (stop bool scalar, state)`, after each
      drafted token; drafting also stops at K_max whatever it returns.
    end_round: `(policy_params, state, num_drafted, num_accepted) -> state`, after each
      verification.
  """
  init: Callable[[PyTree], PyTree]
  stop: Callable[[PyTree, PyTree, DraftInfo], tuple[jax.Array, PyTree]]
  end_round: Callable[[PyTree, PyTree, jax.Array, jax.Array], PyTree]


def constant_policy(k: int) -> DraftPolicy:
  """Draft exactly k tokens per round (standard speculative decoding)."""
  if k < 1:
    raise ValueError(f"constant_policy: k must be >= 1; got {k}")
  return DraftPolicy(init=lambda _: (),
                     stop=lambda _, state, info: (info.index + 1 >= k, state),
                     end_round=lambda _, state, drafted, accepted: state)


def heuristic_policy(k_init: int, k_min: int = 1, k_max: int | None = None) -> DraftPolicy:
  """HF assisted generation's rule: k += 2 if all drafts were accepted, else k - 1.

  The state is the current k (int32), kept in [k_min, k_max] (k_max None: only the
  decoder's K_max caps the drafted count, while the state may grow past it, as in HF).
  """
  if not 1 <= k_min <= k_init or (k_max is not None and k_max < k_init):
    raise ValueError(f"heuristic_policy needs 1 <= k_min <= k_init <= k_max; got {k_min}, "
                     f"{k_init}, {k_max}")

  def end_round(_, k, drafted, accepted):
    up = k + 2 if k_max is None else jnp.minimum(k + 2, k_max)
    return jnp.where(accepted >= drafted, up, jnp.maximum(k - 1, k_min)).astype(jnp.int32)

  return DraftPolicy(init=lambda _: jnp.int32(k_init),
                     stop=lambda _, k, info: (info.index + 1 >= k, k),
                     end_round=end_round)


# ---------------------------------------------------------------------------------- decoders


class DecodeOutput(NamedTuple):
  """Result of one decode (single sequence; add a leading axis under `vmap`).

  Attributes:
    tokens: [max_new] int32, the generated tokens (after the prompt).
    num_generated: int32 scalar, tokens committed (>= max_new; SD may overshoot).
    target_calls: int32 scalar, target calls after the prefill.
    draft_calls: int32 scalar, draft calls after the prefill (0 for AR).
    rounds: int32 scalar, verification rounds (= target_calls for SD, max_new for AR).
    accepted: [max_new] int32 accepted drafts per round, -1 after the last round.
    drafted: [max_new] int32 drafted tokens per round, -1 after the last round.
    policy_state: the draft policy's final state (`()` for AR), e.g. a policy's own logs.
  """
  tokens: jax.Array
  num_generated: jax.Array
  target_calls: jax.Array
  draft_calls: jax.Array
  rounds: jax.Array
  accepted: jax.Array
  drafted: jax.Array
  policy_state: PyTree = ()


def _check_sizes(lms, prompt_buffer: int, max_new: int, k_max: int):
  if prompt_buffer < 2 or max_new < 1 or k_max < 0:
    raise ValueError(f"need prompt buffer >= 2, max_new >= 1, K_max >= 0; got "
                     f"{prompt_buffer}, {max_new}, {k_max}")
  need = prompt_buffer + max_new + k_max
  for name, lm in lms:
    if lm.max_len is not None and need - 1 > lm.max_len:
      raise ValueError(f"{name}: prompt buffer {prompt_buffer} + max_new {max_new} + K_max "
                       f"{k_max} needs positions up to {need - 2}, beyond its max_len "
                       f"{lm.max_len}")


def _prefill(lm: LM, params, prompt, num_slots: int, committed):
  """Feeds the whole prompt buffer, then keeps `committed` slots (rollback of padding)."""
  cache = lm.init_cache(1, num_slots)
  out = lm.apply(params, cache, prompt[None], None, None)
  return out.cache._replace(lengths=jnp.reshape(committed, (1,)).astype(jnp.int32))


def _draw(u, logits, config):
  """A token from logits [V] with a given uniform (argmax when greedy)."""
  if config.greedy:
    return sampling.greedy(logits)
  return sampling.inverse_cdf(u, sampling.probs(logits, config))


def make_autoregressive_decoder(lm: LM, *, prompt_len: int, max_new: int,
                                config: sampling.SamplingConfig = sampling.DEFAULT):
  """Builds the jitted baseline: one cached target call per token.

  Args:
    lm: the model.
    prompt_len: P, the static length of the prompt buffer (>= 2).
    max_new: tokens to generate.
    config: sampling config (temperature 0 = greedy).

  Returns:
    `decode(params, prompt [P] int, prompt_len int32 scalar in 2..P, key) -> DecodeOutput`,
    jitted. The prompt occupies prompt[:prompt_len]; the rest is padding.
  """
  _check_sizes([("lm", lm)], prompt_len, max_new, 0)
  buf = prompt_len + max_new + 1

  def decode(params, prompt, length, key):
    length = jnp.asarray(length, jnp.int32)
    tokens = jnp.zeros((buf,), jnp.int32).at[:prompt_len].set(prompt.astype(jnp.int32))
    cache = _prefill(lm, params, tokens[:prompt_len], buf, length - 1)
    end = length + max_new
    uniforms = jax.random.uniform(key, (max_new,))

    def body(carry):
      tokens, cache, n = carry
      pos = length + n - 1
      out = lm.apply(params, cache, lax.dynamic_slice(tokens, (pos,), (1,))[None],
                     jnp.reshape(pos, (1, 1)), None)
      nxt = _draw(uniforms[n], out.logits[0, 0], config)
      return tokens.at[pos + 1].set(nxt), out.cache, n + 1

    tokens, _, n = lax.while_loop(lambda c: length + c[2] < end, body,
                                  (tokens, cache, jnp.int32(0)))
    zeros = jnp.zeros((max_new,), jnp.int32)
    return DecodeOutput(tokens=lax.dynamic_slice(tokens, (length,), (max_new,)),
                        num_generated=n, target_calls=n, draft_calls=jnp.int32(0), rounds=n,
                        accepted=zeros, drafted=zeros)

  return jax.jit(decode)


def make_speculative_decoder(target: LM, draft: LM, *, prompt_len: int, max_new: int,
                             k_max: int,
                             config: sampling.SamplingConfig = sampling.DEFAULT,
                             draft_config: sampling.SamplingConfig | None = None,
                             policy: DraftPolicy | None = None,
                             verify_branches: bool = False):
  """Builds the jitted speculative decoder (exact: output distributed as the target's).

  Args:
    target, draft: the two models (same vocabulary).
    prompt_len: P, the static length of the prompt buffer (>= 2).
    max_new: tokens to generate.
    k_max: K_max >= 1, the most drafts per round (static buffer length).
    config: the target's sampling config; temperature 0 = greedy SD (token-identical to
      greedy AR decoding).
    draft_config: the draft's sampling config (default `config`); any choice is exact.
    policy: the draft-length rule (default `constant_policy(k_max)`).
    verify_branches: compile one verification call per draft length (cost follows k);
      default pads every verification to K_max + 1 positions.

  Returns:
    `decode(target_params, draft_params, prompt [P] int, prompt_len int32 scalar in 2..P,
    key, policy_params=None) -> DecodeOutput`, jitted.
  """
  if target.vocab_size != draft.vocab_size:
    raise ValueError(f"target and draft vocabularies differ: {target.vocab_size} vs "
                     f"{draft.vocab_size}")
  if k_max < 1:
    raise ValueError(f"k_max must be >= 1; got {k_max}")
  _check_sizes([("target", target), ("draft", draft)], prompt_len, max_new, k_max)
  draft_config = config if draft_config is None else draft_config
  if config.greedy != draft_config.greedy:
    raise ValueError("config and draft_config must both be greedy or both sample")
  policy = constant_policy(k_max) if policy is None else policy
  buf = prompt_len + max_new + k_max + 1
  vocab = target.vocab_size

  def draft_round(draft_params, policy_params, tokens, length, dcache, pstate, u):
    """Drafts up to K_max tokens; returns (drafts [K], q [K, V], k, dcache, pstate)."""
    # Re-feed the last two committed tokens (see the module docstring).
    dcache = dcache._replace(lengths=jnp.reshape(length - 2, (1,)))
    pos = length - 2 + jnp.arange(2)
    out = draft.apply(draft_params, dcache, lax.dynamic_slice(tokens, (length - 2,), (2,))[None],
                      pos[None], None)

    def emit(j, out, fed, drafts, qs, pstate):
      logits = out.logits[0, -1]
      q = sampling.probs(logits, draft_config)
      x = sampling.greedy(logits) if draft_config.greedy else sampling.inverse_cdf(u[j], q)
      info = DraftInfo(index=j, token=x, q=q, logits=logits, hidden=out.hidden[0, -1],
                       fed_token=fed, position=length + j - 1)
      stop, pstate = policy.stop(policy_params, pstate, info)
      stop = stop | (j + 1 >= k_max)
      return drafts.at[j].set(x), qs.at[j].set(q), stop, pstate

    drafts0 = jnp.zeros((k_max,), jnp.int32)
    qs0 = jnp.zeros((k_max, vocab), jnp.float32)
    drafts, qs, stop, pstate = emit(jnp.int32(0), out, tokens[length - 1], drafts0, qs0,
                                    pstate)

    def body(c):
      j, dcache, drafts, qs, _, pstate = c
      fed = drafts[j - 1]
      out = draft.apply(draft_params, dcache, jnp.reshape(fed, (1, 1)),
                        jnp.reshape(length + j - 1, (1, 1)), None)
      drafts, qs, stop, pstate = emit(j, out, fed, drafts, qs, pstate)
      return j + 1, out.cache, drafts, qs, stop, pstate

    k, dcache, drafts, qs, _, pstate = lax.while_loop(
        lambda c: ~c[4], body, (jnp.int32(1), out.cache, drafts, qs, stop, pstate))
    return drafts, qs, k, dcache, pstate

  def score(target_params, tcache, chunk, length, k):
    """One target call on [x_L, x_1..] -> logits [K_max + 1, V], cache."""
    def call(t):
      out = target.apply(target_params, tcache, chunk[None, :t],
                         (length - 1 + jnp.arange(t))[None], None)
      pad = jnp.zeros((k_max + 1 - t, vocab), jnp.float32)
      return jnp.concatenate([out.logits[0], pad]), out.cache
    if not verify_branches:
      return call(k_max + 1)
    return lax.switch(k - 1, [lambda t=t: call(t) for t in range(2, k_max + 2)])

  def decode(target_params, draft_params, prompt, length, key, policy_params=None):
    length = jnp.asarray(length, jnp.int32)
    tokens = jnp.zeros((buf,), jnp.int32).at[:prompt_len].set(prompt.astype(jnp.int32))
    tcache = _prefill(target, target_params, tokens[:prompt_len], buf, length - 1)
    dcache = _prefill(draft, draft_params, tokens[:prompt_len], buf, length - 2)
    end = length + max_new
    minus = jnp.full((max_new,), -1, jnp.int32)
    # All randomness in one RNG call (per-token calls dominate CPU time at this model size):
    # per round, K_max uniforms for drafting, K_max acceptance tests and one for the
    # emitted token. There are at most max_new rounds.
    uniforms = jax.random.uniform(key, (max_new, 2 * k_max + 1))

    def body(c):
      tokens, cur, tcache, dcache, pstate, r, dcalls, acc_log, dr_log = c
      u = uniforms[r]
      drafts, qs, k, dcache, pstate = draft_round(draft_params, policy_params, tokens, cur,
                                                  dcache, pstate, u[:k_max])
      chunk = jnp.concatenate([tokens[cur - 1][None], drafts])
      logits, tcache = score(target_params, tcache, chunk, cur, k)
      if config.greedy:
        n, nxt = verify.verify_greedy(logits, drafts, k)
      else:
        n, nxt = verify.verify_chain_uniform(u[k_max:], sampling.probs(logits, config), qs,
                                             drafts, k)
      # Write all drafts, then the emitted token right after the accepted ones; slots past
      # it are garbage that later rounds overwrite.
      tokens = lax.dynamic_update_slice(tokens, drafts, (cur,)).at[cur + n].set(nxt)
      tcache = tcache._replace(lengths=jnp.reshape(cur + n, (1,)))
      pstate = policy.end_round(policy_params, pstate, k, n)
      return (tokens, cur + n + 1, tcache, dcache, pstate, r + 1, dcalls + k,
              acc_log.at[r].set(n), dr_log.at[r].set(k))

    init = (tokens, length, tcache, dcache, policy.init(policy_params), jnp.int32(0),
            jnp.int32(0), minus, minus)
    tokens, cur, _, _, pstate, r, dcalls, acc_log, dr_log = lax.while_loop(
        lambda c: c[1] < end, body, init)
    return DecodeOutput(tokens=lax.dynamic_slice(tokens, (length,), (max_new,)),
                        num_generated=cur - length, target_calls=r, draft_calls=dcalls,
                        rounds=r, accepted=acc_log, drafted=dr_log, policy_state=pstate)

  return jax.jit(decode)
