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

Design notes:
* Attention is its own sub-module (`MultiHeadAttention`) taking an explicit boolean mask, so a
  KV-cache variant can replace it without touching the blocks.
* Tree-mode safe: no sub-module is shared, blocks live in an `nnx.List`.
* Attention logits and softmax run in float32 whatever `dtype` is.
Differences from the papers: learned absolute position embeddings (not sinusoidal or
rotary), GELU MLP, no dropout, untied input and output embeddings.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx


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

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Logits for every position.

    Args:
      tokens: [B, L] int in 0..vocab_size-1, L <= max_len.

    Returns:
      [B, L, output_size] logits, float32.
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
    return self.head(self.ln_final(h)).astype(jnp.float32)


def init_transformer(cfg: TransformerConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds a Transformer from a typed key and splits it: (graphdef, params)."""
  return nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=key)))


def apply_transformer(graphdef: nnx.GraphDef, params: nnx.State, tokens: jax.Array) -> jax.Array:
  """Functional forward pass (merge inside, for use in `jax.jit`): [B, L] -> [B, L, out]."""
  return nnx.merge(graphdef, params)(tokens)
