"""SpecDec++: adaptive candidate lengths from an acceptance-prediction head on the draft.

Paper: Kaixuan Huang, Xudong Guo, Mengdi Wang, "SpecDec++: Boosting Speculative Decoding via
Adaptive Candidate Lengths", ICML 2024 ES-FoMo workshop / COLM 2025, arXiv:2405.19715.
Official code: github.com/Kaffaljidhmah2/SpecDec_pp (`specdec_pp/wrap_model.py`, `train.py`,
`hf_generation.py`, `data/gen_*.py`), read for the details below.

Method. Speculative sampling (`speculative.make_speculative_decoder`) drafts x_1..x_k and
verifies them with one target call; token i survives with probability
a_i = min(1, p_i(x_i) / q_i(x_i)). The paper casts the choice of k as a Markov decision
process and shows the optimal policy is a threshold policy: stop drafting as soon as the
probability that at least one drafted candidate will be rejected exceeds h. In practice
(independence approximation) a small head on the draft's final hidden state predicts
a_hat_i, and after the draft has proposed its s-th candidate the round stops when

  1 - prod_{j < s} a_hat_j > h,      a_hat_j = softmax(head(z_j))[1],          (1)

forced to continue while s < k_min and to stop at s = k_max (`bound = [2, 20]` in the code).
z_j is the draft's final hidden state at the position of x_j, i.e. after it has consumed
x_j; that state only exists once x_j is fed back in, so the product in (1) lags one token
behind (the code's `acc_prob = 1` at the first step), which is what `DraftInfo.hidden`
provides. Head: `num_layers` residual blocks z <- z + SiLU(W z + b), then a 2-way linear
classifier (class 0 = rejected, 1 = accepted); the draft is frozen.

Training data (`data/gen_*.py`, `train.py`): responses x sampled from the target; at every
response position a draft token y_i ~ q(. | prefix, x_<i) labelled with the soft acceptance

  a_i = exp(min(0, log p(y_i | prefix, x_<i) - log q(y_i | prefix, x_<i))),           (2)

and the head's input sequence keeps x_i with probability r (mixing ratio 0.15; those
positions carry no loss) and y_i otherwise, so the draft's context contains draft tokens as
it does while drafting. Loss: soft-label cross-entropy with class weight w on "rejected",

  L = sum_i m_i [w (1 - a_i)(-log s_i0) + a_i (-log s_i1)] / sum_i m_i [w (1 - a_i) + a_i],  (3)

and the validation metric is the binary KL(Bern(a_i) || Bern(s_i1)). For w != 1 the
pointwise minimiser of (3) is s_1 = a / (a + w (1 - a)) (`weighted_optimum`), not a: the
weight deliberately biases predictions towards "rejected", and h absorbs the bias.

Also here: the oracle-threshold policy of the spec card (rule (1) with the true a_j, read
from a shadow copy of the target that follows the draft), and the i.i.d. theory of the
card's oracle 6: with acceptance a for every token and a target call costing c draft calls,
the best constant length is K* = argmax_K E(K) / (K + c), E(K) = (1 - a^{K+1}) / (1 - a).

Stopping rules that read only draft-side state (or the target's distributions of tokens
already drafted, as the oracle does) are stopping times of the drafted sequence, so the
decoder's output law stays exactly the target's (tested by enumeration).

Differences from the paper and its code:
* The code builds `nn.Sequential(*([ResBlock(d)] * num_layers), ...)`, which repeats ONE
  block, so its residual blocks share weights; `shared_blocks=True` (our default) follows
  the code, `False` gives independent blocks as the paper's description reads.
* Linear layers use PyTorch's default initialisation U(+-1/sqrt(fan_in)), as the code's
  `nn.Linear`; no bf16.
* Batch size 1 only in the paper; here rows of a `vmap` each carry their own k.
* The oracle-threshold policy is the card's; the code's `oracle` schedule (a precomputed
  list of k per round) is not implemented.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrepro.algorithms.decoding import sampling, speculative

PyTree = Any
REJECTED, ACCEPTED = 0, 1


# ------------------------------------------------------------------------------------ head


def _torch_uniform(key, shape, dtype=jnp.float32, fan_in=None):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for nn.Linear weights and bias."""
  bound = 1.0 / np.sqrt(fan_in if fan_in is not None else shape[0])
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _linear(d_in: int, d_out: int, rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, kernel_init=_torch_uniform,
                    bias_init=lambda k, s, dt=jnp.float32: _torch_uniform(k, s, dt, d_in),
                    rngs=rngs)


class ResBlock(nnx.Module):
  """z + SiLU(W z + b): [..., H] -> [..., H]."""

  def __init__(self, hidden_size: int, *, rngs: nnx.Rngs):
    self.linear = _linear(hidden_size, hidden_size, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    return z + jax.nn.silu(self.linear(z))


class AcceptanceHead(nnx.Module):
  """The acceptance-prediction head: residual blocks, then a 2-way linear classifier.

  Attributes:
    num_layers: how many residual blocks are applied.
    shared_blocks: one block applied `num_layers` times (the official code) or independent
      blocks. Either way no sub-module object is shared (tree-mode safe).
  """

  def __init__(self, hidden_size: int, num_layers: int = 3, *, shared_blocks: bool = True,
               rngs: nnx.Rngs):
    if hidden_size < 1 or num_layers < 0:
      raise ValueError(f"AcceptanceHead needs hidden_size >= 1 and num_layers >= 0; got "
                       f"{hidden_size}, {num_layers}")
    self.num_layers = num_layers
    self.shared_blocks = shared_blocks
    count = min(1, num_layers) if shared_blocks else num_layers
    self.blocks = nnx.List([ResBlock(hidden_size, rngs=rngs) for _ in range(count)])
    self.classifier = _linear(hidden_size, 2, rngs)

  def __call__(self, z: jax.Array) -> jax.Array:
    """[..., H] draft hidden states -> [..., 2] float32 logits (rejected, accepted)."""
    z = z.astype(jnp.float32)
    for i in range(self.num_layers):
      z = self.blocks[0 if self.shared_blocks else i](z)
    return self.classifier(z)


def init_head(hidden_size: int, key: jax.Array, *, num_layers: int = 3,
              shared_blocks: bool = True) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds an `AcceptanceHead` from a typed key and splits it: (graphdef, params)."""
  head = AcceptanceHead(hidden_size, num_layers, shared_blocks=shared_blocks,
                        rngs=nnx.Rngs(params=key))
  return nnx.split(head)


def head_logits(graphdef: nnx.GraphDef, params: nnx.State, hidden: jax.Array) -> jax.Array:
  """Functional head: [..., H] -> [..., 2] float32 logits (merge inside, for `jax.jit`)."""
  return nnx.merge(graphdef, params)(hidden)


def accept_probability(graphdef: nnx.GraphDef, params: nnx.State,
                       hidden: jax.Array) -> jax.Array:
  """Predicted acceptance a_hat = softmax(head(z))[1]: [..., H] -> [...] float32."""
  return jax.nn.softmax(head_logits(graphdef, params, hidden), axis=-1)[..., ACCEPTED]


# ---------------------------------------------------------------------------- data and loss


def soft_labels(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """Eq. (2): a = exp(min(0, log p(y) - log q(y))) = min(1, p(y)/q(y)); [...] -> [...]."""
  return jnp.exp(jnp.minimum(0.0, log_p - log_q))


def mix_inputs(key: jax.Array, target_tokens: jax.Array, draft_tokens: jax.Array,
               ratio: float) -> tuple[jax.Array, jax.Array]:
  """The code's mixed head input: keep the target's token with probability `ratio`.

  Args:
    key: typed PRNG key.
    target_tokens: [..., T] int, the target's response x.
    draft_tokens: [..., T] int, the draft tokens y_i drawn at each response position.
    ratio: r in [0, 1].

  Returns:
    (tokens [..., T] int32, loss_mask [..., T] bool): x_i where the target token was kept
    (no loss there), y_i otherwise (loss on its soft label).
  """
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"mix_inputs: ratio must lie in [0, 1]; got {ratio}")
  if target_tokens.shape != draft_tokens.shape:
    raise ValueError(f"target_tokens {list(target_tokens.shape)} and draft_tokens "
                     f"{list(draft_tokens.shape)} must have the same shape")
  keep_target = jax.random.uniform(key, target_tokens.shape) < ratio
  tokens = jnp.where(keep_target, target_tokens, draft_tokens).astype(jnp.int32)
  return tokens, ~keep_target


def weighted_bce(logits: jax.Array, labels: jax.Array, mask: jax.Array,
                 weight_mismatch: float) -> jax.Array:
  """Eq. (3), the code's class-weighted soft-label cross-entropy (float32 scalar).

  Args:
    logits: [..., 2] head logits (rejected, accepted).
    labels: [...] soft labels a in [0, 1].
    mask: [...] bool, positions that carry loss.
    weight_mismatch: w > 0, the weight of the "rejected" class.
  """
  if weight_mismatch <= 0:
    raise ValueError(f"weight_mismatch must be > 0; got {weight_mismatch}")
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  m = mask.astype(jnp.float32)
  rejected = weight_mismatch * (1.0 - labels) * m
  accepted = labels * m
  total = -(rejected * logp[..., REJECTED] + accepted * logp[..., ACCEPTED]).sum()
  # Normalised by the weighted label mass, as the code does (not by the position count).
  return total / jnp.maximum((rejected + accepted).sum(), 1e-12)


def _xlogy(x, y):
  return jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, y, 1.0)), 0.0)


def binary_kl(labels: jax.Array, logits: jax.Array) -> jax.Array:
  """KL(Bern(a) || Bern(s)), s = softmax(logits)[1], with 0 log 0 = 0: [...] -> [...]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  neg_entropy = _xlogy(labels, labels) + _xlogy(1.0 - labels, 1.0 - labels)
  cross = -(labels * logp[..., ACCEPTED] + (1.0 - labels) * logp[..., REJECTED])
  return cross + neg_entropy


def probability_logits(s: jax.Array) -> jax.Array:
  """[...] probabilities of "accepted" -> [..., 2] logits (log(1 - s), log s)."""
  s = jnp.clip(jnp.asarray(s, jnp.float32), 1e-7, 1 - 1e-7)
  return jnp.stack([jnp.log1p(-s), jnp.log(s)], axis=-1)


def weighted_optimum(a: jax.Array, weight_mismatch: float) -> jax.Array:
  """The prediction minimising (3) for label a: a / (a + w (1 - a))."""
  return a / (a + weight_mismatch * (1.0 - a))


def unweight(s: jax.Array, weight_mismatch: float) -> jax.Array:
  """Inverse of `weighted_optimum`: w s / (1 - s + w s), a calibrated acceptance estimate."""
  return weight_mismatch * s / (1.0 - s + weight_mismatch * s)


# --------------------------------------------------------------------------- stopping rule


def stop_rule(cum_accept: jax.Array, num_drafted: jax.Array, threshold: jax.Array, *,
              k_min: int, k_max: int) -> jax.Array:
  """Rule (1) with the code's bounds: stop iff s >= k_max, or s >= k_min and 1 - P > h.

  Args:
    cum_accept: [...] P, the predicted probability that every scored candidate survives.
    num_drafted: [...] int s, candidates drafted so far this round.
    threshold: h in [0, 1] (broadcast).
    k_min, k_max: the bounds on the candidate length (1 <= k_min <= k_max).

  Returns:
    [...] bool.
  """
  return (num_drafted >= k_max) | ((num_drafted >= k_min) & (1.0 - cum_accept > threshold))


class ThresholdParams(NamedTuple):
  """The `policy_params` of a threshold policy (arrays: no recompilation across values).

  Attributes:
    threshold: float32 scalar h.
    accept: whatever the policy's acceptance estimator reads (head params, oracle params).
  """
  threshold: jax.Array
  accept: PyTree


def _check_bounds(k_min: int, k_max: int):
  if not 1 <= k_min <= k_max:
    raise ValueError(f"need 1 <= k_min <= k_max; got k_min={k_min}, k_max={k_max}")


def threshold_policy(accept_fn: Callable[[PyTree, speculative.DraftInfo], jax.Array], *,
                     k_min: int = 2, k_max: int = 20) -> speculative.DraftPolicy:
  """A `DraftPolicy` applying rule (1) with a per-candidate acceptance estimate.

  Args:
    accept_fn: `(accept_params, info) -> a_hat` float32 scalar, the estimated acceptance of
      `info.fed_token` (the candidate the draft has just consumed). It is ignored at
      `info.index == 0`, where the fed token is the last committed one (taken as 1).
    k_min, k_max: bounds on the candidate length; the decoder's own K_max also caps it.

  Returns:
    A policy whose `policy_params` is a `ThresholdParams` and whose state is P, the running
    product of estimates within the round (float32 scalar).
  """
  _check_bounds(k_min, k_max)

  def stop(pp: ThresholdParams, cum, info: speculative.DraftInfo):
    first = info.index == 0
    a_hat = jnp.where(first, 1.0, accept_fn(pp.accept, info))
    cum = jnp.where(first, 1.0, cum) * a_hat
    return stop_rule(cum, info.index + 1, pp.threshold, k_min=k_min, k_max=k_max), cum

  return speculative.DraftPolicy(init=lambda _: jnp.float32(1.0), stop=stop,
                                 end_round=lambda _, cum, drafted, accepted: cum)


def specdecpp_policy(head_graphdef: nnx.GraphDef, *, k_min: int = 2,
                     k_max: int = 20) -> speculative.DraftPolicy:
  """SpecDec++: rule (1) with a_hat from the acceptance head on `DraftInfo.hidden`.

  `policy_params = ThresholdParams(threshold, head_params)`.
  """
  return threshold_policy(
      lambda params, info: accept_probability(head_graphdef, params, info.hidden),
      k_min=k_min, k_max=k_max)


def constant_length_policy() -> speculative.DraftPolicy:
  """Constant candidate length k read from `policy_params` (int32 scalar), so a sweep over
  k compiles once; equivalent to `speculative.constant_policy(k)`."""
  return speculative.DraftPolicy(init=lambda _: (),
                                 stop=lambda k, state, info: (info.index + 1 >= k, state),
                                 end_round=lambda _, state, drafted, accepted: state)


# --------------------------------------------------------------------------------- oracle


class OracleParams(NamedTuple):
  """What the oracle's shadow target needs (the `accept` field of `ThresholdParams`).

  Attributes:
    target: the target's parameters.
    prompt: [P] int, the decode's prompt buffer (the same one the decoder gets).
    prompt_len: int32 scalar, its real length (2..P).
  """
  target: PyTree
  prompt: jax.Array
  prompt_len: jax.Array


class OracleState(NamedTuple):
  """State of `oracle_policy` (single sequence).

  Attributes:
    cum: float32 P, the running product of true acceptances in the round.
    pending: float32, the true acceptance of the newest candidate (used one step later).
    cache: the shadow target's cache.
    round_tokens: [K_max + 1] int32, x_0 (the last committed token) and the round's drafts.
    accepted: int32, accepted drafts of the previous round.
    accept_log: [num_slots] float32, true acceptance of every drafted token, by position
      (later rounds overwrite; for tests and diagnostics).
    token_log: [num_slots] int32, the drafted token at each position.
  """
  cum: jax.Array
  pending: jax.Array
  cache: PyTree
  round_tokens: jax.Array
  accepted: jax.Array
  accept_log: jax.Array
  token_log: jax.Array


def oracle_policy(target: speculative.LM, *, prompt_len: int, num_slots: int,
                  config: sampling.SamplingConfig = sampling.DEFAULT, k_min: int = 2,
                  k_max: int = 20) -> speculative.DraftPolicy:
  """Oracle-threshold: rule (1) with the true a_j = min(1, p_j(x_j) / q_j(x_j)).

  A shadow copy of the target follows the draft token by token (its calls are not part of
  the decoding cost: it stands for a perfect head). Each round starts by re-feeding the last
  two committed tokens, as the decoder's draft does, so rejected drafts are rolled back by
  `lengths` alone. The same one-token lag as SpecDec++ is kept, so the two differ only in
  the quality of the estimate.

  Args:
    target: the target LM (the one the decoder verifies with).
    prompt_len: P, the decoder's static prompt buffer length.
    num_slots: shadow cache slots, at least P + max_new + K_max + 1 of the decoder.
    config: the target's sampling config (the decoder's `config`).
    k_min, k_max: bounds on the candidate length.

  Returns:
    A policy with `policy_params = ThresholdParams(h, OracleParams(...))` and `OracleState`.
  """
  _check_bounds(k_min, k_max)
  if num_slots < prompt_len + 2:
    raise ValueError(f"num_slots={num_slots} must exceed prompt_len={prompt_len} + 1")

  def init(pp: ThresholdParams) -> OracleState:
    o = pp.accept
    length = jnp.asarray(o.prompt_len, jnp.int32)
    cache = target.init_cache(1, num_slots)
    cache = target.apply(o.target, cache, o.prompt[None].astype(jnp.int32)).cache
    cache = cache._replace(lengths=jnp.reshape(length - 2, (1,)))
    tokens = jnp.zeros((k_max + 1,), jnp.int32).at[0].set(o.prompt[length - 2])
    return OracleState(jnp.float32(1.0), jnp.float32(1.0), cache, tokens, jnp.int32(0),
                       jnp.zeros((num_slots,), jnp.float32),
                       jnp.full((num_slots,), -1, jnp.int32))

  def stop(pp: ThresholdParams, s: OracleState, info: speculative.DraftInfo):
    first = info.index == 0
    # Tokens fed to the shadow: [x_{L-2}, x_{L-1}] at a round's start, else [x_j]; the
    # two-token form is used throughout (the second token is the new one) so the shapes
    # are static: at index j > 0 the first one is x_{j-1}, rewritten in place.
    prev = jnp.where(first, s.round_tokens[s.accepted],
                     s.round_tokens[jnp.maximum(info.index - 1, 0)])
    start = info.position - 1
    cache = s.cache._replace(lengths=jnp.reshape(start, (1,)))
    out = target.apply(pp.accept.target, cache, jnp.stack([prev, info.fed_token])[None],
                       (start + jnp.arange(2))[None], None)
    p_next = sampling.probs(out.logits[0, -1], config)
    # True acceptance of the candidate drafted now; the draft sampled it, so q(x) > 0.
    a_next = jnp.minimum(1.0, p_next[info.token] / info.q[info.token])
    a_hat = jnp.where(first, 1.0, s.pending)
    cum = jnp.where(first, 1.0, s.cum) * a_hat
    tokens = jnp.where(first, s.round_tokens.at[0].set(info.fed_token), s.round_tokens)
    tokens = tokens.at[info.index + 1].set(info.token)
    where = info.position + 1
    state = s._replace(cum=cum, pending=a_next, cache=out.cache, round_tokens=tokens,
                       accept_log=s.accept_log.at[where].set(a_next),
                       token_log=s.token_log.at[where].set(info.token))
    return stop_rule(cum, info.index + 1, pp.threshold, k_min=k_min, k_max=k_max), state

  def end_round(_, s: OracleState, drafted, accepted) -> OracleState:
    return s._replace(accepted=jnp.asarray(accepted, jnp.int32))

  return speculative.DraftPolicy(init=init, stop=stop, end_round=end_round)


# ------------------------------------------------------------------------- i.i.d. theory


def iid_expected_tokens(a, k) -> np.ndarray:
  """E(K) = (1 - a^{K+1}) / (1 - a): tokens per round at constant K, i.i.d. acceptance a."""
  a, k = np.asarray(a, np.float64), np.asarray(k, np.float64)
  return np.where(a < 1, (1 - a ** (k + 1)) / np.where(a < 1, 1 - a, 1.0), k + 1)


def iid_best_constant_k(a: float, cost_ratio: float, k_max: int) -> int:
  """K* = argmax_{1 <= K <= k_max} E(K) / (K + c), c = target cost / draft cost."""
  if not 0 <= a <= 1 or cost_ratio <= 0 or k_max < 1:
    raise ValueError(f"need a in [0, 1], cost_ratio > 0, k_max >= 1; got {a}, "
                     f"{cost_ratio}, {k_max}")
  ks = np.arange(1, k_max + 1)
  return int(ks[np.argmax(iid_expected_tokens(a, ks) / (ks + cost_ratio))])


def iid_threshold_interval(a: float, k: int, *, k_min: int, k_max: int
                           ) -> tuple[float, float]:
  """The thresholds h in [lo, hi) for which rule (1) with a_hat = a drafts exactly k.

  With the one-token lag, rule (1) stops at the first s >= k_min with 1 - a^{s-1} > h, so
  k > k_min needs 1 - a^{k-2} <= h < 1 - a^{k-1}; k = k_min needs h < 1 - a^{k_min-1}
  (lo = -inf); k = k_max needs h >= 1 - a^{k_max-2} (hi = +inf).
  """
  _check_bounds(k_min, k_max)
  if not k_min <= k <= k_max:
    raise ValueError(f"k={k} must lie in [k_min, k_max] = [{k_min}, {k_max}]")
  lo = -np.inf if k == k_min else 1 - a ** (k - 2)
  hi = np.inf if k == k_max else 1 - a ** (k - 1)
  return float(lo), float(hi)
