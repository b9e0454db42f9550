"""A small pre-LN transformer over token sequences (Flax NNX), causal or bidirectional.

Architecture: Vaswani et al., "Attention Is All You Need", 2017, arXiv:1706.03762, in the
pre-LayerNorm arrangement of GPT-2 (Radford et al., 2019) / Xiong et al., arXiv:2002.04745:

  h_0 = E_tok[x] + E_pos[0..L-1]
  h_l = h'_l + MLP(LN(h'_l)),  h'_l = h_{l-1} + MHA(LN(h_{l-1}))
  logits = W_out LN(h_n) + b_out,   MHA(h) = W_o concat_k softmax(q_k k_k^T / sqrt(d_h) + M) v_k

with M = -inf above the diagonal when `causal`, else 0. Used bidirectionally and without any
time input as the masked-diffusion denoiser (spec card B7: MDLM / RADD / the first-hitting
sampler, where the input vocabulary includes the mask token and the head predicts only the
clean tokens), and causally as the decoder-only model of the speculative-decoding papers.

Incremental decoding (causal models; spec card S1 of the decoding papers). A static-shape
KV cache holds, per layer, the keys and values of the tokens seen so far,
`k, v [num_layers, B, H, T_max, Dh]` (head-major), and per-row `lengths [B]`: slots
`j < lengths[b]` are the row's committed context. A cached forward on `T >= 1` new tokens at
explicit positions writes their keys/values into slots `lengths .. lengths + T - 1` and lets
new token i attend to

  every committed slot j < lengths,  and new token j' when  mask[i, j']

(`mask` = lower-triangular by default, or any boolean matrix such as a token tree's ancestor
mask). Slots at or beyond `lengths` are never attended, so rollback is lowering `lengths`
(no copy), and a chunk's garbage writes past the committed length are harmless.
The pieces (`embed`, `embed_soft`, `add_positions`, `run_layers`, `head`) are exposed so a
paper can feed mixed token embeddings, inject hidden states at an intermediate layer or
read the final hidden state; `apply_cached` chains them.

Design notes:
* Attention is its own sub-module (`MultiHeadAttention`) taking an explicit boolean mask; its
  `cached` method is the KV-cache variant, so the blocks are shared by both paths.
* Cache writes are one dynamic-update-slice per layer at batch 1 (in place) and a scatter
  at per-row slots otherwise; callers size the cache so that no write passes `T_max`. The
  attention of a cached step spans all `T_max` slots with a mask, so every decode step has
  the same static shapes.
* The cache is head-major because a [.., T_max, H, Dh] layout made XLA transpose every
  layer's keys and values on each call (measured on the 2-core CPU, 4-layer d_model-96
  model, 152 slots: a 1-token step 84 -> 62 us; a 4-token step 140 -> 172 us, from small
  transposes of the new tokens' queries and outputs).
* Tree-mode safe: no sub-module is shared, blocks live in an `nnx.List`.
* Attention logits and softmax run in float32 whatever `dtype` is.
Differences from the papers: learned absolute position embeddings (not sinusoidal or
rotary), GELU MLP, no dropout, untied input and output embeddings.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of `Transformer` (hashable, so it can be a static argument).

  Attributes:
    vocab_size: input vocabulary size (for MDMs: V clean tokens + 1 mask token).
    max_len: the longest sequence (size of the position table).
    num_layers: number of pre-LN blocks.
    d_model: width of the residual stream.
    num_heads: attention heads; must divide d_model.
    d_ff: MLP hidden width (default 4 * d_model).
    causal: whether position i may only attend to positions <= i.
    output_size: width of the output head (default vocab_size; V for MDMs, excluding mask).
    dtype: computation dtype of the dense layers (parameters are float32).
  """
  vocab_size: int
  max_len: int
  num_layers: int = 2
  d_model: int = 64
  num_heads: int = 4
  d_ff: int | None = None
  causal: bool = False
  output_size: int | None = None
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("vocab_size", "max_len", "num_layers", "d_model", "num_heads"):
      if getattr(self, name) < 1:
        raise ValueError(f"TransformerConfig.{name} must be >= 1; got {getattr(self, name)}")
    if self.d_model % self.num_heads:
      raise ValueError(f"TransformerConfig.num_heads={self.num_heads} must divide "
                       f"d_model={self.d_model}")
    if self.d_ff is not None and self.d_ff < 1:
      raise ValueError(f"TransformerConfig.d_ff must be >= 1; got {self.d_ff}")
    if self.output_size is not None and self.output_size < 1:
      raise ValueError(f"TransformerConfig.output_size must be >= 1; got {self.output_size}")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"TransformerConfig.dtype must be 'float32' or 'bfloat16'; got "
                       f"{self.dtype!r}")


def causal_mask(length: int) -> jax.Array:
  """[1, 1, L, L] bool, True where query i may attend to key j (j <= i)."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


class MultiHeadAttention(nnx.Module):
  """Multi-head scaled dot-product self-attention with an explicit boolean mask."""

  def __init__(self, d_model: int, num_heads: int, *, dtype, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    dense = dict(dtype=dtype, rngs=rngs)
    self.query = nnx.Linear(d_model, d_model, **dense)
    self.key = nnx.Linear(d_model, d_model, **dense)
    self.value = nnx.Linear(d_model, d_model, **dense)
    self.out = nnx.Linear(d_model, d_model, **dense)

  def __call__(self, h: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Self-attention.

    Args:
      h: [B, L, D] float.
      mask: None (attend everywhere) or bool broadcastable to [B, H, L, L], True = attend.

    Returns:
      [B, L, D], the dtype of the dense layers.
    """
    b, length, _ = h.shape
    split = lambda y: y.reshape(b, length, self.num_heads, self.head_dim)
    q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
    # Logits and softmax in float32: bf16 logits lose the small differences softmax amplifies.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k.astype(jnp.float32))
    logits = logits / math.sqrt(self.head_dim)
    if mask is not None:
      # A large finite negative (not -inf) keeps a fully masked row NaN-free.
      logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, -1)
    return self.out(out)

  def cached(self, h: jax.Array, cache_k: jax.Array, cache_v: jax.Array, layer: int,
             lengths: jax.Array, visible: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Self-attention of T new tokens over one layer of a KV cache plus themselves.

    Args:
      h: [B, T, D] float, the new tokens' (normalised) states.
      cache_k, cache_v: [num_layers, B, H, T_max, Dh], the whole cache.
      layer: static index of this layer in the cache.
      lengths: [B] int32, committed slots per row; the new tokens go to lengths .. + T - 1.
      visible: [B, T, T_max] bool, which slots each new token attends to (`_visibility`).

    Returns:
      ([B, T, D] output, cache_k, cache_v with this layer's new slots written).
    """
    b, t, _ = h.shape
    # Head-major [B, H, T, Dh]: both attention products are then plain batched matmuls over
    # the cache, with no per-call transpose of the T_max slots.
    split = lambda y: y.reshape(b, t, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
    q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
    cache_k = _write_slots(cache_k, layer, lengths, k)
    cache_v = _write_slots(cache_v, layer, lengths, v)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q.astype(jnp.float32),
                        cache_k[layer].astype(jnp.float32)) / math.sqrt(self.head_dim)
    logits = jnp.where(visible[:, None], logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(cache_v.dtype)
    out = jnp.einsum("bhqk,bhkd->bqhd", weights, cache_v[layer]).reshape(b, t, -1)
    return self.out(out.astype(h.dtype)), cache_k, cache_v


def _write_slots(cache: jax.Array, layer: int, lengths: jax.Array, new: jax.Array) -> jax.Array:
  """Writes new [B, H, T, Dh] into cache [L, B, H, T_max, Dh] at slots lengths .. + T - 1.

  At batch 1 this is one dynamic-update-slice, which XLA does in place; a general scatter
  with T > 1 was compiled as a loop over the whole cache on CPU (a copy per layer and call).
  Rows use a scatter at B > 1. Slots past T_max must not be written (callers size the cache).
  """
  new = new.astype(cache.dtype)
  if new.shape[0] == 1:
    return lax.dynamic_update_slice(cache, new[None], (layer, 0, 0, lengths[0], 0))
  b, _, t, _ = new.shape
  rows = jnp.arange(b)[:, None, None]
  heads = jnp.arange(new.shape[1])[None, :, None]
  slots = (lengths[:, None] + jnp.arange(t)[None])[:, None, :]  # [B, 1, T]
  return cache.at[layer, rows, heads, slots].set(new, mode="drop")


class MLP(nnx.Module):
  """Position-wise two-layer GELU MLP."""

  def __init__(self, d_model: int, d_ff: int, *, dtype, rngs: nnx.Rngs):
    self.up = nnx.Linear(d_model, d_ff, dtype=dtype, rngs=rngs)
    self.down = nnx.Linear(d_ff, d_model, dtype=dtype, rngs=rngs)

  def __call__(self, h: jax.Array) -> jax.Array:
    """[B, L, D] -> [B, L, D]."""
    return self.down(jax.nn.gelu(self.up(h)))


class Block(nnx.Module):
  """Pre-LN residual block: h + MHA(LN(h)), then + MLP(LN(.))."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    self.ln_attn = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.attn = MultiHeadAttention(cfg.d_model, cfg.num_heads, dtype=dtype, rngs=rngs)
    self.ln_mlp = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.mlp = MLP(cfg.d_model, cfg.d_ff or 4 * cfg.d_model, dtype=dtype, rngs=rngs)

  def __call__(self, h: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """[B, L, D] -> [B, L, D]; `mask` as in `MultiHeadAttention`."""
    h = h + self.attn(self.ln_attn(h), mask)
    return h + self.mlp(self.ln_mlp(h))

  def cached(self, h, cache_k, cache_v, layer, lengths, visible):
    """The block on T new tokens against a KV cache; see `MultiHeadAttention.cached`."""
    a, cache_k, cache_v = self.attn.cached(self.ln_attn(h), cache_k, cache_v, layer, lengths,
                                           visible)
    h = h + a
    return h + self.mlp(self.ln_mlp(h)), cache_k, cache_v


class Transformer(nnx.Module):
  """Token + learned position embeddings, `num_layers` pre-LN blocks, final LN, linear head."""

  def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.pos_embed = nnx.Embed(cfg.max_len, cfg.d_model, rngs=rngs)
    self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.ln_final = nnx.LayerNorm(cfg.d_model, rngs=rngs)
    self.head = nnx.Linear(cfg.d_model, cfg.output_size or cfg.vocab_size,
                           dtype=jnp.dtype(cfg.dtype), rngs=rngs)

  def __call__(self, tokens: jax.Array, return_hidden: bool = False):
    """Logits for every position.

    Args:
      tokens: [B, L] int in 0..vocab_size-1, L <= max_len.
      return_hidden: also return the final hidden state (the head's input).

    Returns:
      [B, L, output_size] logits, float32; with `return_hidden`, the pair
      (logits, [B, L, D] hidden state after the final LayerNorm, in `dtype`).
    """
    if tokens.ndim != 2 or tokens.shape[1] > self.cfg.max_len:
      raise ValueError(f"tokens must be [B, L] with L <= max_len={self.cfg.max_len}; got "
                       f"shape {list(tokens.shape)}")
    length = tokens.shape[1]
    h = self.embed(tokens) + self.pos_embed(jnp.arange(length))[None]
    h = h.astype(jnp.dtype(self.cfg.dtype))
    mask = causal_mask(length) if self.cfg.causal else None
    for block in self.blocks:
      h = block(h, mask)
    logits, hidden = self.output(h)
    return (logits, hidden) if return_hidden else logits

  # ------------------------------------------------------------------ pieces and KV cache

  def embed_soft(self, weights: jax.Array) -> jax.Array:
    """Mixture of token embeddings: [..., vocab_size] float -> [..., D], `weights @ E`."""
    if weights.shape[-1] != self.cfg.vocab_size:
      raise ValueError(f"weights must end in vocab_size={self.cfg.vocab_size}; got shape "
                       f"{list(weights.shape)}")
    return weights @ self.embed.embedding[...]

  def add_positions(self, embeds: jax.Array, positions: jax.Array) -> jax.Array:
    """Layer-0 input: [B, T, D] token embeddings + position embeddings at [B, T] int."""
    return (embeds + self.pos_embed(positions)).astype(jnp.dtype(self.cfg.dtype))

  def run_layers(self, h: jax.Array, cache: "KVCache", start: int, stop: int,
                 mask: jax.Array | None = None) -> tuple[jax.Array, "KVCache"]:
    """Blocks `start .. stop - 1` on T new tokens against the cache; `lengths` unchanged."""
    if not 0 <= start <= stop <= self.cfg.num_layers:
      raise ValueError(f"need 0 <= start <= stop <= num_layers={self.cfg.num_layers}; got "
                       f"start={start}, stop={stop}")
    b, t = h.shape[:2]
    visible = _visibility(_new_token_mask(mask, b, t), cache.lengths, cache.k.shape[3])
    k, v = cache.k, cache.v
    for layer in range(start, stop):
      h, k, v = self.blocks[layer].cached(h, k, v, layer, cache.lengths, visible)
    return h, cache._replace(k=k, v=v)

  def output(self, h: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Final LayerNorm and head: [B, T, D] -> ([B, T, out] float32 logits, [B, T, D] hidden)."""
    hidden = self.ln_final(h)
    return self.head(hidden).astype(jnp.float32), hidden

  def decode(self, cache: "KVCache", tokens: jax.Array | None = None,
             positions: jax.Array | None = None, mask: jax.Array | None = None,
             embeds: jax.Array | None = None) -> "CachedOutput":
    """The cached forward (see `apply_cached`)."""
    if not self.cfg.causal:
      raise ValueError("the KV cache needs a causal model (TransformerConfig.causal=True)")
    if (tokens is None) == (embeds is None):
      raise ValueError("pass exactly one of tokens [B, T] and embeds [B, T, D]")
    if embeds is None:
      if tokens.ndim != 2:
        raise ValueError(f"tokens must be [B, T]; got shape {list(tokens.shape)}")
      embeds = self.embed(tokens)
    b, t = embeds.shape[:2]
    if positions is None:
      positions = cache.lengths[:, None] + jnp.arange(t)[None]
    h = self.add_positions(embeds, positions)
    h, cache = self.run_layers(h, cache, 0, self.cfg.num_layers, mask)
    logits, hidden = self.output(h)
    return CachedOutput(logits, hidden, cache._replace(lengths=cache.lengths + t))


def init_transformer(cfg: TransformerConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds a Transformer from a typed key and splits it: (graphdef, params)."""
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=key)))


def apply_transformer(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array,
                      return_hidden: bool = False):
  """Functional forward pass (merge inside, for use in `jax.jit`): [B, L] -> [B, L, out].

  With `return_hidden`, returns (logits, [B, L, D] final hidden state after the final LN).
  """
  return nnx.merge(graphdef, params)(tokens, return_hidden)


# ------------------------------------------------------------------------------- KV cache


class KVCache(NamedTuple):
  """Static-shape keys and values of a causal `Transformer`.

  Attributes:
    k: [num_layers, B, H, T_max, Dh] keys (head-major), in the model's dtype.
    v: [num_layers, B, H, T_max, Dh] values.
    lengths: [B] int32, committed slots per row (slots >= lengths are never attended).
  """
  k: jax.Array
  v: jax.Array
  lengths: jax.Array


class CachedOutput(NamedTuple):
  """What a cached forward returns.

  Attributes:
    logits: [B, T, output_size] float32, next-token logits at each new token.
    hidden: [B, T, D] final hidden state (after the final LayerNorm: the head's input).
    cache: the cache with the new tokens written and `lengths` advanced by T.
  """
  logits: jax.Array
  hidden: jax.Array
  cache: KVCache


def init_cache(cfg: TransformerConfig, batch_size: int, max_len: int | None = None) -> KVCache:
  """An empty cache: zeros `[num_layers, B, H, T_max, Dh]`, lengths 0.

  Args:
    cfg: the model's config.
    batch_size: B >= 1.
    max_len: T_max, the number of slots (default `cfg.max_len`). Slots and positions are
      independent, but a row's positions must stay below `cfg.max_len`.
  """
  max_len = cfg.max_len if max_len is None else max_len
  if batch_size < 1 or max_len < 1:
    raise ValueError(f"batch_size and max_len must be >= 1; got {batch_size}, {max_len}")
  shape = (cfg.num_layers, batch_size, cfg.num_heads, max_len, cfg.d_model // cfg.num_heads)
  return KVCache(k=jnp.zeros(shape, jnp.dtype(cfg.dtype)), v=jnp.zeros(shape, jnp.dtype(cfg.dtype)),
                 lengths=jnp.zeros((batch_size,), jnp.int32))


def _new_token_mask(mask: jax.Array | None, batch: int, t: int) -> jax.Array:
  """[B, T, T] bool among new tokens: causal when `mask` is None, else `mask` broadcast."""
  if mask is None:
    return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))
  mask = jnp.asarray(mask)
  if mask.dtype != jnp.bool_ or mask.shape[-2:] != (t, t) or mask.ndim not in (2, 3):
    raise ValueError(f"mask must be bool [T, T] or [B, T, T] with T={t}; got "
                     f"{mask.dtype} {list(mask.shape)}")
  return jnp.broadcast_to(mask, (batch, t, t))


def _visibility(new_mask: jax.Array, lengths: jax.Array, num_slots: int) -> jax.Array:
  """[B, T, T_max] bool: new token i sees slot j if j is committed (j < length) or j holds
  new token j - length and new_mask allows it; stale or rolled-back slots stay hidden."""
  b, t, _ = new_mask.shape
  rel = jnp.arange(num_slots)[None] - lengths[:, None]  # [B, T_max]
  in_new = (rel >= 0) & (rel < t)
  idx = jnp.broadcast_to(jnp.clip(rel, 0, t - 1)[:, None], (b, t, num_slots))
  return (rel < 0)[:, None] | (jnp.take_along_axis(new_mask, idx, axis=2) & in_new[:, None])


def apply_cached(graphdef: nnx.GraphDef, params: nnx.State, cache: KVCache,
                 tokens: jax.Array | None = None, positions: jax.Array | None = None,
                 mask: jax.Array | None = None, *,
                 embeds: jax.Array | None = None) -> CachedOutput:
  """Cached forward of a causal model on T >= 1 new tokens per row (use inside `jax.jit`).

  Args:
    graphdef, params: the split model (`init_transformer`).
    cache: the rows' context; new tokens are written at slots lengths .. lengths + T - 1.
    tokens: [B, T] int new tokens (or pass `embeds`).
    positions: [B, T] int position ids (< cfg.max_len) of the new tokens; default
      lengths + 0 .. T - 1 (a contiguous continuation). A token tree uses prefix + depth.
    mask: bool [T, T] or [B, T, T], True where new token i attends to new token j (include
      the diagonal); default causal. Committed slots are always visible.
    embeds: [B, T, D] float token embeddings instead of `tokens` (e.g. `embed_soft`).

  Returns:
    CachedOutput(logits [B, T, out] float32, hidden [B, T, D], cache with lengths + T).
  """
  return nnx.merge(graphdef, params).decode(cache, tokens, positions, mask, embeds)


def embed(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
  """Token embeddings E[x] (no positions): [...] int -> [..., D] float32."""
  return nnx.merge(graphdef, params).embed(tokens)


def embed_soft(graphdef: nnx.GraphDef, params: nnx.State, weights: jax.Array) -> jax.Array:
  """Weighted mixture of token embeddings `weights @ E`: [..., V] float -> [..., D].

  `embed_soft(one_hot(x))` equals `embed(x)`; feed the result to `apply_cached(embeds=...)`.
  """
  return nnx.merge(graphdef, params).embed_soft(weights)


def add_positions(graphdef: nnx.GraphDef, params: nnx.State, embeds: jax.Array,
                  positions: jax.Array) -> jax.Array:
  """Layer-0 states: embeds [B, T, D] + position embeddings at positions [B, T] int."""
  return nnx.merge(graphdef, params).add_positions(embeds, positions)


def run_layers(graphdef: nnx.GraphDef, params: nnx.State, h: jax.Array, cache: KVCache, *,
               start: int, stop: int,
               mask: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """Runs blocks `start .. stop - 1` (static ints) on new-token states against a cache.

  The states enter block `start` (block 0 takes `add_positions` output) and leave block
  `stop - 1`; keys/values of those layers are written at slots lengths .. lengths + T - 1,
  and `lengths` is NOT advanced (advance it with `cache._replace(lengths=...)` once all
  layers have run). This lets a paper run a prefix of the layers, then inject extra states
  (e.g. Hidden Transfer's pseudo positions, appended after the real tokens) before the
  remaining layers.

  Args:
    h: [B, T, D] states of the T new tokens.
    cache: KVCache; mask: as in `apply_cached`.

  Returns:
    ([B, T, D] states after block stop - 1, cache with those layers written).
  """
  return nnx.merge(graphdef, params).run_layers(h, cache, start, stop, mask)


def head(graphdef: nnx.GraphDef, params: nnx.State,
         h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Final LayerNorm + output head: [B, T, D] -> (logits float32, normalised hidden [B, T, D])."""
  return nnx.merge(graphdef, params).output(h)


def compact_cache(cache: KVCache, start: jax.Array, indices: jax.Array) -> KVCache:
  """Moves chosen slots to a contiguous run: slot start + j <- slot start + indices[j].

  After tree verification the accepted path's nodes sit at scattered slots; compacting them
  behind the committed prefix makes the cache equal to one built by feeding the path
  sequentially (positions were given explicitly, so the keys need no change). `lengths` is
  not changed.

  Args:
    cache: KVCache with T_max slots.
    start: [B] int, the first slot of the block (usually the committed length).
    indices: [B, N] int, source offsets (relative to start) for the N destination slots;
      use j itself for slots that should stay.

  Returns:
    The cache with slots start .. start + N - 1 of every layer replaced.
  """
  b, n = indices.shape
  rows = jnp.arange(b)[:, None]
  src = start[:, None] + indices
  dst = start[:, None] + jnp.arange(n)[None]
  move = lambda x: x.at[:, rows, :, dst].set(x[:, rows, :, src], mode="drop")
  return cache._replace(k=move(cache.k), v=move(cache.v))
