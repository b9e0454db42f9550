"""Superposed Decoding: k drafts from one autoregressive pass over superposed embeddings.

Paper: Shen, Fan, Pratt, Park, Wallingford, Kakade, Holtzman, Krishna, Farhadi, Kusupati,
"Superposed Decoding: Multiple Generations from a Single Autoregressive Inference Pass",
NeurIPS 2024, arXiv:2405.18400 (official code: RAIVNLab/SuperposedDecoding).

Method. Keep k drafts x^1..x^k with cumulative scores s_j. At every step the model gets ONE
input embedding, the score-weighted superposition of the drafts' last tokens,

  e~ = sum_v m(v) E[v],   m = normalise( sum_j softmax(s)_j one_hot(x^j_last) ),       (1)

(drafts that share their last token add their weights), so one forward and one KV-cache row
serve all k drafts. The model returns one distribution p~ = softmax(z / tau), truncated to
its m most likely tokens and renormalised. Each draft smooths it log-linearly with an
interpolated n-gram model over its own last tokens,

  log p_j(v) = (1 - alpha) log p~(v) + alpha log p_ng(v | x^j),
  p_ng(v | x^j) = sum_c lambda_c p_{c+1}(v | last c tokens of x^j)   (c = 1..C),         (2)

where p_{c+1} is the maximum-likelihood (c+1)-gram table of a corpus, a context the corpus
never saw contributes nothing, p_ng is only used on p~'s top-m support (zero elsewhere),
and a draft whose p_ng vanishes on the whole support falls back to (1 - alpha) log p~ minus
a penalty (200). Expansion is the beam step of tensor2tensor: the scores s_j + log p_j(v)
over the k x V grid give the top 2k candidates; the best k that do not end in EOS become
the alive drafts, and the EOS-terminated ones merge into a top-k list of finished drafts.
On the first step after the prompt every draft is the prompt, so the candidates are the
top 2k tokens of one draft. T new tokens cost exactly T model calls, whatever k is.

`make_decoder(..., superpose=False)` runs the same scoring with one cache row per draft
(beam search with n-gram smoothing: k rows per call), the k-passes reference for the
superposition. `linearity_probe` measures the premise of (1): the cosine, per layer,
between the state of a superposed input sequence and the same superposition of the
drafts' own states.

N-gram tables (`count_ngrams`): order n = c + 1 is stored densely, [V^c, V] probabilities
and a [V^c] "context seen" mask, when V^n is small, else as sorted int32 codes
(context * V + token) with their probabilities and the sorted seen contexts, looked up with
`jnp.searchsorted`, so the whole decoding step stays inside `jit`.

Differences from the paper and its code (`superposed/llama/superpose.py`, `params/*.json`):
* alpha = 0 turns the n-gram term off (p_j = p~, the code's `smoothing=None`); with the
  code's "geom" smoothing alpha = 0 gives 0 * log 0 = NaN for tokens without n-gram
  support. alpha = 1 is the n-gram ranking restricted to p~'s support (the code's formula
  gives NaN outside the support there; we give -inf).
* The interpolation weights lambda_c are used as given, unnormalised (as in the code:
  (0.01, 0.04, 0.15) for the released 4-gram config); `p_15_d3_mixed` adds 5- and 6-grams.
  Context codes are int32, so orders with V^n >= 2^31 are rejected (they need hashing).
* Ties in the top-m truncation and in the top-2k / top-k selections go to the lower token
  index or candidate index (`lax.top_k`); torch's `topk` leaves them unspecified.
* One prompt per call (vmap over prompts); prompts have a fixed length (no padding or
  staggered starts), and no dynamic early exit: a fixed number of new tokens, with the
  finished (EOS) list kept alongside the alive drafts, as in the code's `return_results`.
* The mixing vector is fed as `weights @ E` through `models.transformer.embed_soft`, the
  same product as the code's `tok_mixing_embeddings` (the transposed embedding matrix).
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro.models import transformer as tfm

PyTree = Any


# ------------------------------------------------------------------------------ the config


@dataclasses.dataclass(frozen=True)
class SuperposedConfig:
  """Settings of Superposed Decoding (hashable: a static jit argument).

  Defaults are the official 4-gram release `params/p15_d3_ngram4_mixed.json`.

  Attributes:
    n_drafts: k >= 1 drafts.
    n_token_sample: m, the tokens of p~ kept per step; >= 2k so that the top-2k candidates
      of the first step are all in the support (the released configs use m = 3k).
    temperature: tau > 0 of p~ = softmax(z / tau).
    alpha: weight of the n-gram term in (2), in [0, 1]; 0 turns the n-gram term off.
    ngram_weights: lambda_c for context lengths c = 1..C (orders 2..C+1), >= 0.
    penalty: subtracted from a draft's log-probabilities when its n-gram model has no
      support on p~'s top-m tokens, >= 0.
    eos_id: the end-of-sequence token, or None (no finished drafts).
  """
  n_drafts: int = 3
  n_token_sample: int = 9
  temperature: float = 0.1
  alpha: float = 0.55
  ngram_weights: tuple[float, ...] = (0.01, 0.04, 0.15)
  penalty: float = 200.0
  eos_id: int | None = None

  def __post_init__(self):
    if self.n_drafts < 1:
      raise ValueError(f"SuperposedConfig.n_drafts must be >= 1; got {self.n_drafts}")
    if self.n_token_sample < 2 * self.n_drafts:
      raise ValueError(f"SuperposedConfig.n_token_sample must be >= 2 * n_drafts = "
                       f"{2 * self.n_drafts}; got {self.n_token_sample}")
    if not self.temperature > 0:
      raise ValueError(f"SuperposedConfig.temperature must be > 0; got {self.temperature}")
    if not 0 <= self.alpha <= 1:
      raise ValueError(f"SuperposedConfig.alpha must lie in [0, 1]; got {self.alpha}")
    if any(not w >= 0 for w in self.ngram_weights):
      raise ValueError(f"SuperposedConfig.ngram_weights must be >= 0; got "
                       f"{self.ngram_weights}")
    if self.alpha > 0 and not any(w > 0 for w in self.ngram_weights):
      raise ValueError("SuperposedConfig.ngram_weights must hold a positive weight when "
                       "alpha > 0")
    if not self.penalty >= 0:
      raise ValueError(f"SuperposedConfig.penalty must be >= 0; got {self.penalty}")

  @property
  def context_lengths(self) -> tuple[int, ...]:
    """c = 1..C, the n-gram context lengths (orders c + 1)."""
    return tuple(range(1, len(self.ngram_weights) + 1))


# ------------------------------------------------------------------------------ n-gram tables


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["probs", "keys", "contexts"],
                   meta_fields=["order", "vocab_size", "dense"])
@dataclasses.dataclass(frozen=True)
class NGramTable:
  """Maximum-likelihood n-gram probabilities p(v | c) of one order (a pytree).

  Context codes are big-endian in base V: code(c_1..c_{n-1}) = sum_i c_i V^(n-1-i) (c_1
  the oldest token).

  Attributes:
    order: n >= 2 (context length n - 1).
    vocab_size: V.
    dense: storage form.
    probs: dense: [V^(n-1), V] float32 p(v | context); sparse: [K] float32, the
      probability of each observed (context, token) code in `keys`.
    keys: sparse: [K] int32 sorted codes context * V + token; dense: [0] int32.
    contexts: dense: [V^(n-1)] bool, whether the context was observed; sparse: [C] int32
      sorted observed context codes.
  """
  order: int
  vocab_size: int
  dense: bool
  probs: jax.Array
  keys: jax.Array
  contexts: jax.Array


def count_ngrams(corpus, order: int, vocab_size: int, *,
                 dense_limit: int = 1 << 22) -> NGramTable:
  """Counts the order-n table of a corpus (host-side numpy): p(v | c) = N(c, v) / N(c).

  Every window of n consecutive tokens inside a corpus row is counted (rows are
  independent documents), as the official `make_corpus.py` does.

  Args:
    corpus: [N, L] int tokens in 0..V-1 (L >= order).
    order: n >= 2.
    vocab_size: V.
    dense_limit: store densely when V^n <= dense_limit, else sorted codes.

  Returns:
    The table; probabilities float32.
  """
  corpus = np.asarray(corpus)
  if order < 2:
    raise ValueError(f"order must be >= 2; got {order}")
  if vocab_size ** order >= 2 ** 31:
    raise ValueError(f"order={order} with vocab_size={vocab_size} needs codes beyond int32 "
                     f"(V^n = {vocab_size ** order}); use a lower order")
  if (corpus.ndim != 2 or corpus.shape[1] < order or not np.issubdtype(corpus.dtype, np.integer)
      or corpus.min() < 0 or corpus.max() >= vocab_size):
    raise ValueError(f"corpus must be int [N, L] with L >= order={order} and tokens in "
                     f"0..{vocab_size - 1}; got {corpus.dtype} {list(corpus.shape)}")
  width = corpus.shape[1] - order + 1
  codes = np.zeros((corpus.shape[0], width), np.int64)
  for j in range(order):
    codes = codes * vocab_size + corpus[:, j:j + width]
  keys, counts = np.unique(codes.ravel(), return_counts=True)
  ctx = keys // vocab_size
  contexts, first, per_context = np.unique(ctx, return_index=True, return_counts=True)
  totals = np.repeat(np.add.reduceat(counts, first), per_context)
  probs = (counts / totals).astype(np.float32)
  if vocab_size ** order <= dense_limit:
    table = np.zeros(vocab_size ** order, np.float32)
    table[keys] = probs
    seen = np.zeros(vocab_size ** (order - 1), bool)
    seen[contexts] = True
    return NGramTable(order, vocab_size, True,
                      jnp.asarray(table.reshape(-1, vocab_size)),
                      jnp.zeros((0,), jnp.int32), jnp.asarray(seen))
  return NGramTable(order, vocab_size, False, jnp.asarray(probs),
                    jnp.asarray(keys, jnp.int32), jnp.asarray(contexts, jnp.int32))


def build_ngram_tables(corpus, context_lengths: Sequence[int], vocab_size: int, *,
                       dense_limit: int = 1 << 22) -> tuple[NGramTable, ...]:
  """The tables of orders c + 1 for each context length c (e.g. (1, 2, 3): 2-4-grams)."""
  return tuple(count_ngrams(corpus, c + 1, vocab_size, dense_limit=dense_limit)
               for c in context_lengths)


def ngram_lookup(table: NGramTable, context: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Next-token probabilities of the order-n table after given contexts (jit-able).

  Args:
    table: an `NGramTable` of order n.
    context: [..., n - 1] int tokens, oldest first.

  Returns:
    (probs [..., V] float32, zero for unseen (context, token) pairs; seen [...] bool,
    whether the context occurs in the corpus).
  """
  n, v = table.order, table.vocab_size
  if context.shape[-1] != n - 1:
    raise ValueError(f"context must end in n - 1 = {n - 1} tokens; got shape "
                     f"{list(context.shape)}")
  powers = jnp.asarray(v ** np.arange(n - 2, -1, -1), jnp.int32)
  code = jnp.sum(context.astype(jnp.int32) * powers, axis=-1)
  if table.dense:
    return table.probs[code], table.contexts[code]
  queries = code[..., None] * v + jnp.arange(v, dtype=jnp.int32)
  found = _sorted_find(table.keys, queries)
  probs = jnp.where(found >= 0, table.probs[jnp.maximum(found, 0)], 0.0)
  return probs, _sorted_find(table.contexts, code) >= 0


def _sorted_find(sorted_keys: jax.Array, queries: jax.Array) -> jax.Array:
  """Index of each query in a sorted key array, -1 where absent."""
  if sorted_keys.shape[0] == 0:
    return jnp.full(queries.shape, -1, jnp.int32)
  idx = jnp.clip(jnp.searchsorted(sorted_keys, queries), 0, sorted_keys.shape[0] - 1)
  return jnp.where(sorted_keys[idx] == queries, idx, -1).astype(jnp.int32)


def ngram_mixture(tables: Sequence[NGramTable], weights: Sequence[float], history: jax.Array,
                  length: jax.Array) -> jax.Array:
  """p_ng of (2) after each draft: sum_c lambda_c p_{c+1}(v | last c tokens).

  Orders whose context is unseen, or longer than the history, contribute nothing.

  Args:
    tables: the tables of context lengths 1..C, in that order.
    weights: lambda_1..lambda_C.
    history: [k, N] int token buffers; the first `length` tokens are the drafts.
    length: int32 scalar, the drafts' current length.

  Returns:
    [k, V] float32 (unnormalised: the lambdas need not sum to 1).
  """
  if not tables or len(tables) != len(weights):
    raise ValueError(f"need one table per weight (at least one); got {len(tables)} tables "
                     f"and {len(weights)} weights")
  out = jnp.zeros((history.shape[0], tables[0].vocab_size), jnp.float32)
  for c, (table, weight) in enumerate(zip(tables, weights), start=1):
    if table.order != c + 1:
      raise ValueError(f"tables must have orders 2..C+1 in order; table {c - 1} has order "
                       f"{table.order}")
    if weight == 0:
      continue
    # The slice start is clipped at 0 when length < c; such an order is masked out below.
    context = lax.dynamic_slice_in_dim(history, length - c, c, axis=1)
    probs, seen = ngram_lookup(table, context)
    usable = seen & (length >= c)
    out = out + weight * jnp.where(usable[:, None], probs, 0.0)
  return out


# --------------------------------------------------------------------------- scoring pieces


def truncated_probs(logits: jax.Array, temperature: float, m: int) -> jax.Array:
  """p~: softmax(z / tau) restricted to its m most likely tokens, renormalised.

  Args:
    logits: [..., V] float.
    temperature: tau > 0.
    m: tokens kept (ties to the lower index).

  Returns:
    [..., V] float32 with exactly m non-zero entries per row.
  """
  z = logits.astype(jnp.float32) / temperature
  _, top = lax.top_k(z, m)
  keep = jnp.sum(jax.nn.one_hot(top, z.shape[-1], dtype=jnp.bool_), axis=-2) > 0
  return jax.nn.softmax(jnp.where(keep, z, -jnp.inf), axis=-1)


def interpolate(p_tilde: jax.Array, p_ng: jax.Array | None, alpha: float,
                penalty: float) -> jax.Array:
  """Per-draft log-probabilities (2): (1 - alpha) log p~ + alpha log p_ng on the support.

  Args:
    p_tilde: [..., V] truncated model distribution (zeros off its support).
    p_ng: [..., k, V] n-gram mixtures (or None when alpha = 0).
    alpha: static float in [0, 1]; 0 ignores p_ng.
    penalty: subtracted when a draft's p_ng is zero on the whole support.

  Returns:
    [..., k, V] float32, -inf off the support and where p_ng = 0.
  """
  support = p_tilde > 0
  log_p = jnp.where(support, jnp.log(jnp.where(support, p_tilde, 1.0)), -jnp.inf)
  if alpha == 0:
    return jnp.broadcast_to(log_p[..., None, :], p_ng.shape) if p_ng is not None else log_p
  support = support[..., None, :]
  log_p = log_p[..., None, :]
  ok = support & (p_ng > 0)
  # where() before the products: (1 - alpha) * -inf with alpha = 1 would be NaN.
  lm_term = (1 - alpha) * jnp.where(support, log_p, 0.0)
  mixed = jnp.where(ok, lm_term + alpha * jnp.log(jnp.where(ok, p_ng, 1.0)), -jnp.inf)
  none = ~jnp.any(ok, axis=-1, keepdims=True)
  fallback = jnp.where(support, lm_term - penalty, -jnp.inf)
  return jnp.where(none, fallback, mixed)


def superposition_weights(scores: jax.Array, tokens: jax.Array, vocab_size: int) -> jax.Array:
  """The mixing vector m of (1): softmax(scores) scattered onto the drafts' tokens.

  Args:
    scores: [k] float draft scores (-inf allowed, not all).
    tokens: [k] int, each draft's last token.
    vocab_size: V.

  Returns:
    [V] float32, sums to 1; tokens shared by several drafts get their summed weight.
  """
  w = jax.nn.softmax(scores.astype(jnp.float32))
  mix = jnp.zeros((vocab_size,), jnp.float32).at[tokens].add(w)
  return mix / jnp.sum(mix)


class Drafts(NamedTuple):
  """The alive and finished drafts of one prompt during decoding.

  Attributes:
    tokens: [k, N] int32 buffers (prompt, then the generated tokens), best first.
    scores: [k] float32 cumulative scores sum_t log p_j(x_t), descending.
    fin_tokens: [k, N] int32 finished (EOS-terminated) drafts, best first.
    fin_scores: [k] float32 their scores, -inf for empty slots.
    fin_lengths: [k] int32 generated tokens of each finished draft (EOS included), 0 if
      empty.
  """
  tokens: jax.Array
  scores: jax.Array
  fin_tokens: jax.Array
  fin_scores: jax.Array
  fin_lengths: jax.Array


def init_drafts(prompt: jax.Array, n_drafts: int, num_slots: int) -> Drafts:
  """k copies of the prompt [P] in buffers of N = num_slots tokens, scores 0."""
  buf = jnp.zeros((num_slots,), jnp.int32).at[:prompt.shape[0]].set(prompt.astype(jnp.int32))
  tokens = jnp.broadcast_to(buf, (n_drafts, num_slots))
  return Drafts(tokens, jnp.zeros((n_drafts,), jnp.float32), tokens,
                jnp.full((n_drafts,), -jnp.inf, jnp.float32),
                jnp.zeros((n_drafts,), jnp.int32))


def expand(drafts: Drafts, log_probs: jax.Array, position: jax.Array, *, first: bool,
           eos_id: int | None, prompt_len: int) -> tuple[Drafts, jax.Array]:
  """One beam step: top 2k of s_j + log p_j(v), then the alive and finished top-k.

  Args:
    drafts: the current drafts (all of length `position`).
    log_probs: [k, V] float32 per-draft log-probabilities of the next token.
    position: int32 scalar, the buffer index of the new token.
    first: static; every draft is still the prompt, so only draft 0's row competes.
    eos_id: the EOS token or None.
    prompt_len: P (to record finished lengths).

  Returns:
    (new drafts, [k] int32 parent index of each new alive draft).
  """
  k, vocab = log_probs.shape
  if first:
    cand_scores, cand_tokens = lax.top_k(drafts.scores[0] + log_probs[0], 2 * k)
    parents = jnp.zeros((2 * k,), jnp.int32)
  else:
    flat = (drafts.scores[:, None] + log_probs).reshape(-1)
    cand_scores, idx = lax.top_k(flat, 2 * k)
    parents, cand_tokens = idx // vocab, idx % vocab
  seqs = drafts.tokens[parents].at[:, position].set(cand_tokens.astype(jnp.int32))
  if eos_id is None:
    finished = jnp.zeros((2 * k,), bool)
  else:
    finished = cand_tokens == eos_id
  # At most one EOS candidate per parent, so k of the 2k candidates are never finished.
  alive_scores, alive = lax.top_k(jnp.where(finished, -jnp.inf, cand_scores), k)
  all_scores = jnp.concatenate([drafts.fin_scores,
                                jnp.where(finished, cand_scores, -jnp.inf)])
  new_len = jnp.full((2 * k,), position - prompt_len + 1, jnp.int32)
  fin_scores, fin = lax.top_k(all_scores, k)
  out = Drafts(
      tokens=seqs[alive], scores=alive_scores,
      fin_tokens=jnp.concatenate([drafts.fin_tokens, seqs])[fin], fin_scores=fin_scores,
      fin_lengths=jnp.concatenate([drafts.fin_lengths, new_len])[fin])
  return out, parents[alive].astype(jnp.int32)


# --------------------------------------------------------------------------------- the model


class SuperposedLM(NamedTuple):
  """A causal LM that accepts input embeddings (pure functions; static jit argument).

  Attributes:
    init_cache: `(batch_size, num_slots) -> cache` (a pytree; batch on axis 1 of every
      leaf with more than one axis, lengths [B] otherwise, as `transformer.KVCache`).
    apply: `(params, cache, tokens [B, T] int | None, embeds [B, T, D] | None) ->
      (logits [B, T, V] float32, cache with lengths + T)`.
    embed_soft: `(params, weights [..., V]) -> [..., D]`, weights @ E.
    vocab_size: V.
    max_len: positions must stay below this.
  """
  init_cache: Callable[[int, int], PyTree]
  apply: Callable[..., tuple[jax.Array, PyTree]]
  embed_soft: Callable[[PyTree, jax.Array], jax.Array]
  vocab_size: int
  max_len: int


def transformer_lm(cfg: tfm.TransformerConfig, graphdef) -> SuperposedLM:
  """The causal NNX transformer of `models.transformer` as a `SuperposedLM`."""
  if not cfg.causal:
    raise ValueError("transformer_lm needs a causal TransformerConfig (causal=True)")

  def apply(params, cache, tokens=None, embeds=None):
    out = tfm.apply_cached(graphdef, params, cache, tokens, embeds=embeds)
    return out.logits, out.cache

  return SuperposedLM(
      init_cache=lambda batch, slots: tfm.init_cache(cfg, batch, slots), apply=apply,
      embed_soft=lambda params, w: tfm.embed_soft(graphdef, params, w),
      vocab_size=cfg.output_size or cfg.vocab_size, max_len=cfg.max_len)


# ------------------------------------------------------------------------------- the decoder


class SuperposedOutput(NamedTuple):
  """Result of one decode (one prompt; a leading axis under `vmap`).

  Attributes:
    tokens: [k, T] int32 generated tokens of the alive drafts, best first.
    scores: [k] float32 their scores (sum of the per-step log p_j of (2)).
    fin_tokens: [k, T] int32 finished drafts (EOS included; tokens after it are 0).
    fin_scores: [k] float32, -inf for empty slots.
    fin_lengths: [k] int32 generated tokens of each finished draft, 0 if empty.
    mixtures: [T - 1, V] float32 mixing vectors fed at steps 2..T (superposed mode; for
      beam search, the drafts' own weights summed the same way, for reference).
    forwards: int32 scalar, model calls after the prefill (= T).
    row_forwards: int32 scalar, sequence-forwards: calls times cache rows (T superposed,
      kT beam search).
  """
  tokens: jax.Array
  scores: jax.Array
  fin_tokens: jax.Array
  fin_scores: jax.Array
  fin_lengths: jax.Array
  mixtures: jax.Array
  forwards: jax.Array
  row_forwards: jax.Array


def make_decoder(lm: SuperposedLM, *, prompt_len: int, max_new: int,
                 config: SuperposedConfig = SuperposedConfig(), superpose: bool = True):
  """Builds the jitted Superposed Decoding (or n-gram-smoothed beam search) loop.

  The prompt's first P - 1 tokens are prefilled; call 1 feeds its last token (the first
  distribution), calls 2..T feed the superposed embedding (1) of the alive drafts' last
  tokens (one cache row) or, with `superpose=False`, each draft's own last token (k rows
  whose caches are reordered by parent, i.e. beam search with the same scores).

  Args:
    lm: the model.
    prompt_len: P >= 1, the static prompt length.
    max_new: T >= 1 new tokens per draft.
    config: the `SuperposedConfig`.
    superpose: one superposed row (True) or k separate rows (False).

  Returns:
    `decode(params, tables, prompt [P] int, temperature=None) -> SuperposedOutput`,
    jitted; `tables` is the tuple of `NGramTable`s for context lengths 1..C (ignored when
    alpha = 0; pass ()), and `temperature` (a float32 scalar, default
    `config.temperature`) is a runtime argument so a temperature sweep compiles once.
  """
  if prompt_len < 1 or max_new < 1:
    raise ValueError(f"prompt_len and max_new must be >= 1; got {prompt_len}, {max_new}")
  if prompt_len + max_new - 1 > lm.max_len:
    raise ValueError(f"prompt_len {prompt_len} + max_new {max_new} needs positions up to "
                     f"{prompt_len + max_new - 2}, beyond the model's max_len {lm.max_len}")
  k, vocab, slots = config.n_drafts, lm.vocab_size, prompt_len + max_new
  rows = 1 if superpose else k

  def log_probs_of(logits, tables, drafts, length, temperature):
    """[rows, V] logits -> [k, V] per-draft log-probabilities (2)."""
    p_tilde = truncated_probs(logits, temperature, config.n_token_sample)
    if config.alpha == 0:
      return interpolate(jnp.broadcast_to(p_tilde, (k, vocab)), None, 0.0, 0.0)
    p_ng = ngram_mixture(tables, config.ngram_weights, drafts.tokens, length)
    if superpose:
      return interpolate(p_tilde[0], p_ng, config.alpha, config.penalty)
    # Beam search: row j's distribution belongs to draft j only.
    return jax.vmap(lambda p, g: interpolate(p, g[None], config.alpha, config.penalty)[0]
                    )(p_tilde, p_ng)

  def decode(params, tables, prompt, temperature=None):
    temperature = jnp.asarray(config.temperature if temperature is None else temperature,
                              jnp.float32)
    prompt = prompt.astype(jnp.int32)
    if prompt.shape != (prompt_len,):
      raise ValueError(f"prompt must be [{prompt_len}]; got {list(prompt.shape)}")
    tables = tuple(tables)
    if config.alpha > 0 and len(tables) != len(config.ngram_weights):
      raise ValueError(f"need {len(config.ngram_weights)} n-gram tables (context lengths "
                       f"1..{len(config.ngram_weights)}); got {len(tables)}")
    cache = lm.init_cache(rows, slots)
    toks = jnp.broadcast_to(prompt, (rows, prompt_len))
    if prompt_len > 1:
      _, cache = lm.apply(params, cache, toks[:, :-1], None)
    logits, cache = lm.apply(params, cache, toks[:, -1:], None)
    drafts = init_drafts(prompt, k, slots)
    length = jnp.int32(prompt_len)
    log_probs = log_probs_of(logits[:, -1], tables, drafts, length, temperature)
    drafts, parents = expand(drafts, log_probs, length, first=True, eos_id=config.eos_id,
                             prompt_len=prompt_len)
    if not superpose:
      cache = _reorder(cache, parents)

    def step(carry, t):
      drafts, cache = carry
      length = prompt_len + t
      last = drafts.tokens[:, length - 1]
      mix = superposition_weights(drafts.scores, last, vocab)
      if superpose:
        logits, cache = lm.apply(params, cache, None, lm.embed_soft(params, mix)[None, None])
      else:
        logits, cache = lm.apply(params, cache, last[:, None], None)
      log_probs = log_probs_of(logits[:, -1], tables, drafts, length, temperature)
      drafts, parents = expand(drafts, log_probs, length, first=False, eos_id=config.eos_id,
                               prompt_len=prompt_len)
      if not superpose:
        cache = _reorder(cache, parents)
      return (drafts, cache), mix

    (drafts, _), mixtures = lax.scan(step, (drafts, cache),
                                     jnp.arange(1, max_new, dtype=jnp.int32))
    gen = lambda x: x[:, prompt_len:]
    return SuperposedOutput(
        tokens=gen(drafts.tokens), scores=drafts.scores, fin_tokens=gen(drafts.fin_tokens),
        fin_scores=drafts.fin_scores, fin_lengths=drafts.fin_lengths,
        mixtures=mixtures.reshape(max_new - 1, vocab), forwards=jnp.int32(max_new),
        row_forwards=jnp.int32(max_new * rows))

  return jax.jit(decode)


def _reorder(cache, parents: jax.Array):
  """Beam search: cache row j <- row parents[j] (batch axis 1 of k/v, 0 of lengths)."""
  return jax.tree.map(lambda x: x[:, parents] if x.ndim > 1 else x[parents], cache)


# ------------------------------------------------------------------------- linearity probe


class LinearityProbe(NamedTuple):
  """Per-layer states of a superposed sequence and of the superposed drafts' own states.

  Attributes:
    superposed: [num_layers + 1, D] state at the last position of the sequence whose
      generated positions hold sum_j w_j E[x^j_i] (layer 0 = embeddings + positions,
      layer l = after block l, before the final LayerNorm).
    combined: [num_layers + 1, D] sum_j w_j h_j at the same layer and position, h_j the
      state of draft j run on its own tokens and w the weights of the last position.
    cosine: [num_layers + 1] float32 cosine similarity of the two.
  """
  superposed: jax.Array
  combined: jax.Array
  cosine: jax.Array


def cosine(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity along the last axis: [..., D] x [..., D] -> [...] float32."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, 1e-30)


def linearity_probe(cfg: tfm.TransformerConfig, graphdef, params, prompt: jax.Array,
                    drafts: jax.Array, weights: jax.Array) -> LinearityProbe:
  """The premise of (1): is the state of a superposed input the superposition of states?

  Runs the k drafts (prompt + own tokens) and the superposed sequence (prompt + at each
  generated position i the embedding sum_j w_ij E[x^j_i]) through the transformer in one
  batch of k + 1 rows and compares their states at the last position, layer by layer.

  Args:
    cfg, graphdef, params: a causal `models.transformer` model.
    prompt: [P] int.
    drafts: [k, t] int generated tokens (t >= 1).
    weights: [k] (the same at every position) or [t, k] float draft weights, rows sum to 1.

  Returns:
    `LinearityProbe` with [num_layers + 1] cosines.
  """
  k, t = drafts.shape
  p = prompt.shape[0]
  weights = jnp.broadcast_to(jnp.asarray(weights, jnp.float32), (t, k))
  seqs = jnp.concatenate([jnp.broadcast_to(prompt, (k, p)), drafts], axis=1).astype(jnp.int32)
  own = tfm.embed(graphdef, params, seqs)  # [k, P + t, D]
  onehots = jax.nn.one_hot(drafts, cfg.vocab_size, dtype=jnp.float32)  # [k, t, V]
  mix = jnp.einsum("tk,ktv->tv", weights, onehots)
  sup = jnp.concatenate([own[0, :p], tfm.embed_soft(graphdef, params, mix)], axis=0)
  embeds = jnp.concatenate([own, sup[None]], axis=0)
  h = tfm.add_positions(graphdef, params, embeds,
                        jnp.broadcast_to(jnp.arange(p + t), (k + 1, p + t)))
  cache = tfm.init_cache(cfg, k + 1, p + t)
  states = [h[:, -1]]
  for layer in range(cfg.num_layers):
    h, cache = tfm.run_layers(graphdef, params, h, cache, start=layer, stop=layer + 1)
    states.append(h[:, -1])
  states = jnp.stack(states)  # [L + 1, k + 1, D]
  superposed = states[:, k]
  combined = jnp.einsum("k,lkd->ld", weights[-1], states[:, :k])
  return LinearityProbe(superposed, combined, cosine(superposed, combined))
