"""A small text-conditioned UNet (Flax NNX) with a separable encoder/decoder and LoRA adapters.

Shared block B2 / stand-in S1 ("ToyT2I") of the diffusion family (spec card `diffusion.md`
section 0). Architecture after Ronneberger et al., "U-Net", 2015, arXiv:1505.04597, in the
diffusion form of Ho et al., "Denoising Diffusion Probabilistic Models", 2020, arXiv:2006.11239
and the text-conditioned form of Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", 2022, arXiv:2112.10752 (Stable Diffusion's UNet). LoRA after Hu et al.,
"LoRA: Low-Rank Adaptation of Large Language Models", 2021, arXiv:2106.09685.

Method. With x [B, H, W, C] (NHWC), t [B] float and a prompt context c [B, L, D]:

  temb = MLP(sinusoid(t)),  sinusoid(t)_i = cos(t f_i) (i < d/2), sin(t f_{i-d/2}) (i >= d/2),
         f_j = exp(-log(10000) j / (d/2))     (fractional t is fine: nothing is a table lookup)
  ResBlock(h) = skip(h) + Conv(SiLU(GN(Conv(SiLU(GN(h))) + W_t SiLU(temb))))
  AttnBlock(h) = h + P_out(T(P_in(GN(h)), c)),  with T on the HW tokens:
         u = u + SelfAttn(LN(u));  u = u + CrossAttn(LN(u), c);  u = u + MLP(LN(u))
  Attn(u, c) = W_o softmax(W_q u (W_k c)^T / sqrt(d_h)) W_v c   (multi-head)

The encoder E is conv_in + down levels (ResBlocks [+ AttnBlocks], strided-conv downsampling)
+ the mid block (ResBlock, AttnBlock, ResBlock); it returns the bottleneck h and the skip list.
The decoder D is the up levels (ResBlocks on [h, skip] concatenations [+ AttnBlocks],
nearest-neighbour upsampling + conv) + GN/SiLU/conv_out. `__call__` is literally
`decode(*encode(x, t, c), t, c)`, so Faster Diffusion's encoder propagation (reuse E's outputs
across steps, run D at other timesteps) is exact at key steps.

LoRA. Every attention projection (q, k, v, out) and the 1x1 token projections P_in/P_out are
`LoRALinear`: y = x W + b + (alpha / r) (x A) B, A [in, r] (`LoRAParam`, normal init with std
1/sqrt(in)), B [r, out] (`LoRAParam`, zeros), so a fresh adapter is the identity.
`LoRAParam` is flax's `nnx.LoRAParam` (a `nnx.Param` subclass): `nnx.split(model, LoRAParam,
nnx.Param)` separates adapters from base weights; `merge_lora` folds them in (W += (alpha/r) A B,
B = 0). Adapters draw from their own key stream, so the base weights of a rank-r model equal
those of the rank-0 model built from the same key.

Differences from the papers / official code:
* Pixel space, tiny widths (defaults: channels (32, 64), 16x16x3, attention only in the 8x8
  mid block) -- the spec card's S1 stand-in, not SD's latent UNet. The default has 0.71 M
  parameters, above the card's 0.3-0.5 M estimate (the card's widths and block counts were
  kept; the estimate omitted the decoder's concatenation widths).
* The token MLP is GELU, not GEGLU; no dropout; no linear-attention or flash kernels.
* The output conv is NOT zero-initialised (SD zero-inits it), so a freshly initialised model
  already depends on x, t and the prompt (the unit tests rely on that).
* The optional text front end is only a token + learned position embedding; the spec card's
  2-layer text transformer lives elsewhere (`models/transformer.py`) and feeds `context`.
* Not yet implemented from B2: external K/V buffers for attention, channel/block gate masks,
  swappable quantised Dense/Conv layers.
"""

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrepro.models.attention import attention_with_lse

# Adapter weights: a `nnx.Param` subclass, so the first matching filter in
# `nnx.split(model, LoRAParam, nnx.Param)` sends them to their own state.
LoRAParam = nnx.LoRAParam


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  """Hyper-parameters of `UNet` (hashable, so it can be a static argument).

  Attributes:
    image_size: H = W of the input; must be divisible by 2^(levels - 1).
    in_channels: C of x.
    out_channels: channels of the prediction (default in_channels).
    channels: base width (level 0); level i has channels * channel_mult[i].
    channel_mult: per-level width multipliers (len = number of resolutions).
    num_res_blocks: ResBlocks per down level (up levels have one more).
    attention_resolutions: spatial sizes (e.g. (8,)) at which AttnBlocks follow ResBlocks;
      each must be one of the level resolutions. The mid block always has one, so the
      default () gives the spec card's S1: one self- plus one cross-attention at 8x8.
    num_heads: heads of every attention; must divide every attended width.
    time_embed_dim: width of the time embedding (default 4 * channels).
    context_dim: D of the prompt context [B, L, D].
    vocab_size: if > 0, integer prompts [B, L] are embedded by a token + position table.
    max_prompt_len: size of the position table (used only when vocab_size > 0).
    num_groups: GroupNorm groups; must divide every width.
    lora_rank: LoRA rank r (0 = no adapters).
    lora_alpha: LoRA scale numerator (scale = alpha / r); default r (scale 1).
    dtype: computation dtype, "float32" or "bfloat16" (parameters stay float32).
  """
  image_size: int = 16
  in_channels: int = 3
  out_channels: int | None = None
  channels: int = 32
  channel_mult: tuple[int, ...] = (1, 2)
  num_res_blocks: int = 1
  attention_resolutions: tuple[int, ...] = ()
  num_heads: int = 4
  time_embed_dim: int | None = None
  context_dim: int = 64
  vocab_size: int = 0
  max_prompt_len: int = 16
  num_groups: int = 8
  lora_rank: int = 0
  lora_alpha: float | None = None
  dtype: str = "float32"

  def __post_init__(self):
    for name in ("image_size", "in_channels", "channels", "num_res_blocks", "num_heads",
                 "context_dim", "max_prompt_len", "num_groups"):
      if getattr(self, name) < 1:
        raise ValueError(f"UNetConfig.{name} must be >= 1; got {getattr(self, name)}")
    for name in ("out_channels", "time_embed_dim"):
      if getattr(self, name) is not None and getattr(self, name) < 1:
        raise ValueError(f"UNetConfig.{name} must be None or >= 1; got {getattr(self, name)}")
    if self.vocab_size < 0 or self.lora_rank < 0:
      raise ValueError(f"UNetConfig.vocab_size and UNetConfig.lora_rank must be >= 0; got "
                       f"{self.vocab_size}, {self.lora_rank}")
    if not self.channel_mult or min(self.channel_mult) < 1:
      raise ValueError(f"UNetConfig.channel_mult must be a non-empty tuple of ints >= 1; got "
                       f"{self.channel_mult}")
    down = 2 ** (len(self.channel_mult) - 1)
    if self.image_size % down:
      raise ValueError(f"UNetConfig.image_size={self.image_size} must be divisible by "
                       f"2^(len(channel_mult) - 1) = {down}")
    sizes = self.resolutions
    for r in self.attention_resolutions:
      if r not in sizes:
        raise ValueError(f"UNetConfig.attention_resolutions entry {r} is not a level "
                         f"resolution; allowed: {sizes}")
    for w in self.widths:
      if w % self.num_groups:
        raise ValueError(f"UNetConfig.num_groups={self.num_groups} must divide every width "
                         f"{self.widths}")
      if w % self.num_heads:
        raise ValueError(f"UNetConfig.num_heads={self.num_heads} must divide every width "
                         f"{self.widths}")
    if self.temb_dim % 2 or self.channels % 2:
      raise ValueError("UNetConfig.channels and UNetConfig.time_embed_dim must be even "
                       "(sinusoid halves)")
    if self.dtype not in ("float32", "bfloat16"):
      raise ValueError(f"UNetConfig.dtype must be 'float32' or 'bfloat16'; got {self.dtype!r}")

  @property
  def resolutions(self) -> tuple[int, ...]:
    """Spatial size of each level."""
    return tuple(self.image_size // 2 ** i for i in range(len(self.channel_mult)))

  @property
  def widths(self) -> tuple[int, ...]:
    """Channel width of each level."""
    return tuple(self.channels * m for m in self.channel_mult)

  @property
  def temb_dim(self) -> int:
    """Width of the time embedding after its MLP."""
    return self.time_embed_dim or 4 * self.channels

  @property
  def lora_scale(self) -> float:
    """alpha / r (0 when LoRA is off)."""
    if self.lora_rank == 0:
      return 0.0
    return (self.lora_alpha if self.lora_alpha is not None else self.lora_rank) / self.lora_rank


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos(t f), sin(t f)], f_j = max_period^(-j / (dim/2)).

  Args:
    t: [B] timesteps, int or float (fractional values are embedded exactly).
    dim: even output width.
    max_period: the slowest period.

  Returns:
    [B, dim] float32.
  """
  if dim % 2:
    raise ValueError(f"dim must be even; got {dim}")
  t = jnp.asarray(t, jnp.float32)
  if t.ndim != 1:
    raise ValueError(f"t must have shape [B]; got {t.shape}")
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class LoRALinear(nnx.Module):
  """Dense layer on the last axis with an optional low-rank adapter.

  y = x W + b + scale (x A) B with A [in, r] ~ N(0, 1/in) and B [r, out] = 0 (LoRA paper:
  B = 0 makes the adapted model start equal to the base one). On NHWC tensors this is a 1x1
  convolution.
  """

  def __init__(self, in_features: int, out_features: int, *, rank: int, scale: float,
               use_bias: bool = True, dtype, rngs: nnx.Rngs):
    self.base = nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                           rngs=rngs)
    self.rank = rank
    self.scale = scale
    self.dtype = dtype
    if rank > 0:
      # Own stream `lora`: the base weights do not depend on whether adapters exist.
      key = rngs.lora() if "lora" in rngs else rngs.params()
      self.lora_a = LoRAParam(jax.random.normal(key, (in_features, rank)) /
                              math.sqrt(in_features))
      self.lora_b = LoRAParam(jnp.zeros((rank, out_features)))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[..., in] -> [..., out] in `dtype`."""
    y = self.base(x)
    if self.rank > 0:
      x = x.astype(self.dtype)
      low = x @ self.lora_a[...].astype(self.dtype)
      y = y + self.scale * (low @ self.lora_b[...].astype(self.dtype))
    return y


class Attention(nnx.Module):
  """Multi-head attention of query tokens on context tokens (self-attention: context = x)."""

  def __init__(self, dim: int, context_dim: int, num_heads: int, *, rank: int, scale: float,
               dtype, rngs: nnx.Rngs):
    lin = dict(rank=rank, scale=scale, dtype=dtype, rngs=rngs)
    self.num_heads = num_heads
    self.query = LoRALinear(dim, dim, use_bias=False, **lin)
    self.key = LoRALinear(context_dim, dim, use_bias=False, **lin)
    self.value = LoRALinear(context_dim, dim, use_bias=False, **lin)
    self.out = LoRALinear(dim, dim, **lin)

  def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
    """x [B, N, dim], context [B, L, context_dim] (None: self-attention) -> [B, N, dim]."""
    context = x if context is None else context
    split = lambda y: y.reshape(y.shape[0], y.shape[1], self.num_heads, -1)
    q, k, v = split(self.query(x)), split(self.key(context)), split(self.value(context))
    # Scores and softmax run in float32 inside attention_with_lse (preferred_element_type).
    o, _ = attention_with_lse(q, k, v)
    return self.out(o.reshape(x.shape[0], x.shape[1], -1))


class AttnBlock(nnx.Module):
  """GN -> 1x1 in -> [self-attn, cross-attn, MLP] on HW tokens -> 1x1 out, plus residual."""

  def __init__(self, cfg: UNetConfig, dim: int, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    lin = dict(rank=cfg.lora_rank, scale=cfg.lora_scale, dtype=dtype, rngs=rngs)
    self.norm = nnx.GroupNorm(dim, num_groups=cfg.num_groups, rngs=rngs)
    self.proj_in = LoRALinear(dim, dim, **lin)
    self.ln_self = nnx.LayerNorm(dim, rngs=rngs)
    self.self_attn = Attention(dim, dim, cfg.num_heads, **lin)
    self.ln_cross = nnx.LayerNorm(dim, rngs=rngs)
    self.cross_attn = Attention(dim, cfg.context_dim, cfg.num_heads, **lin)
    self.ln_mlp = nnx.LayerNorm(dim, rngs=rngs)
    self.mlp_up = nnx.Linear(dim, 4 * dim, dtype=dtype, rngs=rngs)
    self.mlp_down = nnx.Linear(4 * dim, dim, dtype=dtype, rngs=rngs)
    self.proj_out = LoRALinear(dim, dim, **lin)

  def __call__(self, h: jax.Array, context: jax.Array) -> jax.Array:
    """h [B, H, W, dim], context [B, L, context_dim] -> [B, H, W, dim].

    No positional encoding and only per-position / global ops, so the block is
    equivariant to any permutation of the H*W positions.
    """
    b, hh, ww, c = h.shape
    u = self.proj_in(self.norm(h)).reshape(b, hh * ww, c)
    u = u + self.self_attn(self.ln_self(u))
    u = u + self.cross_attn(self.ln_cross(u), context)
    u = u + self.mlp_down(jax.nn.gelu(self.mlp_up(self.ln_mlp(u))))
    return h + self.proj_out(u).reshape(b, hh, ww, c).astype(h.dtype)


class ResBlock(nnx.Module):
  """GN-SiLU-conv, + time projection, GN-SiLU-conv, plus a (1x1 when widths differ) skip."""

  def __init__(self, cfg: UNetConfig, in_dim: int, out_dim: int, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(cfg.dtype)
    conv = dict(kernel_size=(3, 3), padding="SAME", dtype=dtype, rngs=rngs)
    self.norm1 = nnx.GroupNorm(in_dim, num_groups=cfg.num_groups, rngs=rngs)
    self.conv1 = nnx.Conv(in_dim, out_dim, **conv)
    self.time_proj = nnx.Linear(cfg.temb_dim, out_dim, dtype=dtype, rngs=rngs)
    self.norm2 = nnx.GroupNorm(out_dim, num_groups=cfg.num_groups, rngs=rngs)
    self.conv2 = nnx.Conv(out_dim, out_dim, **conv)
    self.skip = (nnx.Linear(in_dim, out_dim, dtype=dtype, rngs=rngs)
                 if in_dim != out_dim else None)

  def __call__(self, h: jax.Array, temb: jax.Array) -> jax.Array:
    """h [B, H, W, in], temb [B, temb_dim] -> [B, H, W, out]."""
    y = self.conv1(jax.nn.silu(self.norm1(h)))
    y = y + self.time_proj(jax.nn.silu(temb))[:, None, None, :]
    y = self.conv2(jax.nn.silu(self.norm2(y)))
    return (h if self.skip is None else self.skip(h)) + y


class Stage(nnx.Module):
  """A ResBlock optionally followed by an AttnBlock (one skip-producing unit)."""

  def __init__(self, cfg: UNetConfig, in_dim: int, out_dim: int, attn: bool, *,
               rngs: nnx.Rngs):
    self.res = ResBlock(cfg, in_dim, out_dim, rngs=rngs)
    self.attn = AttnBlock(cfg, out_dim, rngs=rngs) if attn else None

  def __call__(self, h, temb, context):
    """[B, H, W, in] -> [B, H, W, out]."""
    h = self.res(h, temb)
    return h if self.attn is None else self.attn(h, context)


class UNet(nnx.Module):
  """The text-conditioned UNet; see the module docstring for the layout."""

  def __init__(self, cfg: UNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    dtype = jnp.dtype(cfg.dtype)
    widths, sizes = cfg.widths, cfg.resolutions
    attn_at = set(cfg.attention_resolutions)
    skip_dims = build_encoder(self, cfg, rngs)
    prev = widths[-1]
    conv = dict(kernel_size=(3, 3), padding="SAME", dtype=dtype, rngs=rngs)

    # Decoder: levels in reverse, each ResBlock eats one skip (popped last-in first-out).
    up, upsample = [], []
    for i in reversed(range(len(widths))):
      level = []
      for _ in range(cfg.num_res_blocks + 1):
        level.append(Stage(cfg, prev + skip_dims.pop(), widths[i], sizes[i] in attn_at,
                           rngs=rngs))
        prev = widths[i]
      up.append(nnx.List(level))
      if i > 0:
        upsample.append(nnx.Conv(prev, prev, **conv))
    self.up = nnx.List(up)
    self.upsample = nnx.List(upsample)
    self.norm_out = nnx.GroupNorm(prev, num_groups=cfg.num_groups, rngs=rngs)
    self.conv_out = nnx.Conv(prev, cfg.out_channels or cfg.in_channels, **conv)

  # ----------------------------------------------------------------------------- inputs

  def time_embed(self, t: jax.Array) -> jax.Array:
    """t [B] (float or int) -> [B, temb_dim]."""
    emb = timestep_embedding(t, self.cfg.channels)
    return self.time_out(jax.nn.silu(self.time_in(emb)))

  def embed_context(self, context: jax.Array) -> jax.Array:
    """Integer prompts [B, L] -> [B, L, D] via the token front end; float [B, L, D] as is."""
    context = jnp.asarray(context)
    if jnp.issubdtype(context.dtype, jnp.integer):
      if self.cfg.vocab_size == 0:
        raise ValueError("integer context needs UNetConfig.vocab_size > 0")
      if context.ndim != 2 or context.shape[1] > self.cfg.max_prompt_len:
        raise ValueError(f"integer context must be [B, L] with L <= max_prompt_len="
                         f"{self.cfg.max_prompt_len}; got {context.shape}")
      pos = jnp.arange(context.shape[1])
      return self.token_embed(context) + self.pos_embed(pos)[None]
    if context.ndim != 3 or context.shape[2] != self.cfg.context_dim:
      raise ValueError(f"context must be [B, L, {self.cfg.context_dim}] float or [B, L] int; "
                       f"got {context.dtype} {context.shape}")
    return context

  def _check_x(self, x: jax.Array, t: jax.Array):
    s, c = self.cfg.image_size, self.cfg.in_channels
    if x.ndim != 4 or x.shape[1:] != (s, s, c):
      raise ValueError(f"x must be [B, {s}, {s}, {c}]; got {x.shape}")
    if jnp.shape(t) != (x.shape[0],):
      raise ValueError(f"t must be [B] = [{x.shape[0]}]; got {jnp.shape(t)}")

  # ------------------------------------------------------------------- encoder / decoder

  def encode(self, x: jax.Array, t: jax.Array,
             context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """Encoder E: conv_in, down levels and the mid block.

    Args:
      x: [B, H, W, C] noisy input.
      t: [B] timesteps (float or int).
      context: [B, L, D] float prompt embeddings or [B, L] int tokens (vocab_size > 0).

    Returns:
      (h [B, H / 2^(n-1), W / 2^(n-1), widths[-1]] bottleneck, skips: tuple of [B, h, w, c]
      in push order, consumed last-first by `decode`).
    """
    self._check_x(x, t)
    return run_encoder(self, x, t, context)

  def decode(self, h: jax.Array, skips: tuple[jax.Array, ...], t: jax.Array,
             context: jax.Array) -> jax.Array:
    """Decoder D: up levels and the output head, at timestep t with prompt context.

    Args:
      h: bottleneck from `encode` (possibly from another timestep).
      skips: skip tuple from `encode`.
      t: [B] timesteps.
      context: as in `encode`.

    Returns:
      [B, H, W, out_channels] float32 prediction.
    """
    # conv_in + num_res_blocks per level + one per downsample = levels * (blocks + 1).
    if len(skips) != len(self.cfg.channel_mult) * (self.cfg.num_res_blocks + 1):
      raise ValueError(f"skips has {len(skips)} entries, which does not match this config")
    temb, ctx = self.time_embed(t), self.embed_context(context)
    skips = list(skips)
    for j, level in enumerate(self.up):
      for stage in level:
        h = stage(jnp.concatenate([h, skips.pop()], axis=-1), temb, ctx)
      if j < len(self.upsample):
        b, hh, ww, c = h.shape
        h = jax.image.resize(h, (b, 2 * hh, 2 * ww, c), method="nearest")
        h = self.upsample[j](h)
    return self.conv_out(jax.nn.silu(self.norm_out(h))).astype(jnp.float32)

  def __call__(self, x: jax.Array, t: jax.Array, context: jax.Array) -> jax.Array:
    """Full UNet: `decode(*encode(x, t, context), t, context)`, [B, H, W, C_out] float32."""
    h, skips = self.encode(x, t, context)
    return self.decode(h, skips, t, context)


# ------------------------------------------------------------------ the encoder, shared


def build_encoder(module: nnx.Module, cfg: UNetConfig, rngs: nnx.Rngs) -> list[int]:
  """Creates the encoder's sub-modules as attributes of `module`; returns the skip widths.

  The encoder is the prompt/time front end (`token_embed`, `pos_embed`, `time_in`,
  `time_out`), `conv_in`, the down levels (`down`, `downsample`) and the mid block
  (`mid_res1`, `mid_attn`, `mid_res2`). `UNet` and SwiftDiffusion's ControlNet (a trainable
  copy of this encoder, initialised from the UNet's weights by path) both build it here, so
  their parameter paths agree by construction.

  Returns:
    The width of every skip in push order (what the decoder consumes, last first).
  """
  dtype = jnp.dtype(cfg.dtype)
  widths, sizes = cfg.widths, cfg.resolutions
  attn_at = set(cfg.attention_resolutions)
  if cfg.vocab_size > 0:
    module.token_embed = nnx.Embed(cfg.vocab_size, cfg.context_dim, rngs=rngs)
    module.pos_embed = nnx.Embed(cfg.max_prompt_len, cfg.context_dim, rngs=rngs)
  module.time_in = nnx.Linear(cfg.channels, cfg.temb_dim, dtype=dtype, rngs=rngs)
  module.time_out = nnx.Linear(cfg.temb_dim, cfg.temb_dim, dtype=dtype, rngs=rngs)
  module.conv_in = nnx.Conv(cfg.in_channels, widths[0], kernel_size=(3, 3), padding="SAME",
                            dtype=dtype, rngs=rngs)
  down, downsample, skip_dims = [], [], [widths[0]]
  prev = widths[0]
  for i, w in enumerate(widths):
    level = []
    for _ in range(cfg.num_res_blocks):
      level.append(Stage(cfg, prev, w, sizes[i] in attn_at, rngs=rngs))
      prev = w
      skip_dims.append(w)
    down.append(nnx.List(level))
    if i < len(widths) - 1:
      downsample.append(nnx.Conv(w, w, kernel_size=(3, 3), strides=(2, 2), padding="SAME",
                                 dtype=dtype, rngs=rngs))
      skip_dims.append(w)
  module.down = nnx.List(down)
  module.downsample = nnx.List(downsample)
  module.mid_res1 = ResBlock(cfg, prev, prev, rngs=rngs)
  module.mid_attn = AttnBlock(cfg, prev, rngs=rngs)
  module.mid_res2 = ResBlock(cfg, prev, prev, rngs=rngs)
  return skip_dims


def run_encoder(module: nnx.Module, x: jax.Array, t: jax.Array, context: jax.Array,
                inject: jax.Array | None = None) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """The encoder's forward on a module built by `build_encoder`.

  Args:
    module: a `UNet` or any module holding `build_encoder`'s attributes and a `cfg`.
    x: [B, H, W, C] noisy input; t: [B] timesteps; context: as `UNet.embed_context`.
    inject: optional [B, H, W, widths[0]] added after `conv_in` (a ControlNet's hint path).

  Returns:
    (bottleneck h, skips in push order), as `UNet.encode`.
  """
  temb, ctx = UNet.time_embed(module, t), UNet.embed_context(module, context)
  h = module.conv_in(x.astype(jnp.dtype(module.cfg.dtype)))
  if inject is not None:
    h = h + inject
  skips = [h]
  for i, level in enumerate(module.down):
    for stage in level:
      h = stage(h, temb, ctx)
      skips.append(h)
    if i < len(module.downsample):
      h = module.downsample[i](h)
      skips.append(h)
  h = module.mid_res2(module.mid_attn(module.mid_res1(h, temb), ctx), temb)
  return h, tuple(skips)


# ---------------------------------------------------------------------------- functional core


def init_unet(cfg: UNetConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
  """Builds a UNet from a typed key and splits it: (graphdef, params incl. LoRA adapters).

  Adapters use the stream `fold_in(key, 1)`, so base weights equal the rank-0 model's.
  """
  rngs = nnx.Rngs(params=key, lora=jax.random.fold_in(key, 1))
  return nnx.split(UNet(cfg, rngs=rngs))


def random_unet(cfg: UNetConfig, seed: int) -> tuple[nnx.GraphDef, nnx.State]:
  """A UNet with random weights drawn by NumPy: (graphdef, params), nothing compiled.

  `init_unet` is the faithful initialiser but runs dozens of eager NNX initialisers (25-45 s
  on a 2-core CPU); tests of exact equivalences, smoke runs and benchmarks only need *some*
  weights. Kernels are N(0, 1/fan_in), norm scales 1 + N(0, 0.1^2), biases and embeddings
  N(0, 0.1^2), LoRA `lora_b` zero (adapters start as the identity, as in `init_unet`).
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: UNet(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    x = rng.normal(size=leaf.shape).astype(np.float32)
    if name == "lora_b":
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == "kernel":
      x = x / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      x = (1.0 if name == "scale" else 0.0) + 0.1 * x
    return jnp.asarray(x, leaf.dtype)

  nnx.replace_by_pure_dict(
      state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state)))
  return graphdef, state


def apply_unet(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, t: jax.Array,
               context: jax.Array) -> jax.Array:
  """Functional forward (merge inside; use in `jax.jit`): x [B, H, W, C] -> [B, H, W, C_out]."""
  return nnx.merge(graphdef, params)(x, t, context)


def unet_encode(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, t: jax.Array,
                context: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
  """Functional `UNet.encode`: -> (bottleneck h, skips)."""
  return nnx.merge(graphdef, params).encode(x, t, context)


def unet_decode(graphdef: nnx.GraphDef, params: nnx.State, h: jax.Array,
                skips: tuple[jax.Array, ...], t: jax.Array, context: jax.Array) -> jax.Array:
  """Functional `UNet.decode`: (h, skips) at timestep t [B] -> [B, H, W, C_out] float32."""
  return nnx.merge(graphdef, params).decode(h, skips, t, context)


def make_model_fn(graphdef: nnx.GraphDef,
                  params: nnx.State) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """`model_fn(x, t, cond)` for `algorithms/diffusion/samplers.py` (cond = the context)."""
  return lambda x, t, cond: apply_unet(graphdef, params, x, t, cond)


def merge_lora(params: nnx.State, cfg: UNetConfig) -> nnx.State:
  """Folds every adapter into its base kernel: W <- W + (alpha / r) A B, then B <- 0.

  Pure (returns a new state; jit-friendly). The merged model computes the same function as
  the patched one up to float rounding, and its adapters are again the identity. The scale
  alpha / r is a static attribute (not in the state), hence `cfg`.

  Args:
    params: the full state of a UNet (as from `init_unet`), adapters included.
    cfg: the model's config (gives alpha / r).

  Returns:
    A state of the same structure and dtypes.
  """
  pure = nnx.to_pure_dict(params)

  def visit(node):
    if not isinstance(node, dict):
      return node
    node = {k: visit(v) for k, v in node.items()}
    if "lora_a" in node and "lora_b" in node and "base" in node:
      kernel = node["base"]["kernel"]
      delta = cfg.lora_scale * (node["lora_a"] @ node["lora_b"])
      node["base"] = dict(node["base"], kernel=(kernel + delta).astype(kernel.dtype))
      node["lora_b"] = jnp.zeros_like(node["lora_b"])
    return node

  merged = jax.tree.map(lambda x: x, params)  # fresh Variables; `params` is left untouched
  nnx.replace_by_pure_dict(merged, visit(pure))
  return merged
