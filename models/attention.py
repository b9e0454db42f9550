"""Softmax attention that also returns the log-sum-exp, and the rule that merges partials.

Shared building block for sequence-parallel attention (Ring Attention, Liu et al., "Ring
Attention with Blockwise Transformers for Near-Infinite Context", 2023, arXiv:2310.01889;
TokenRing, Wang et al., "TokenRing: An Efficient Parallelism Framework for Infinite-Context
LLMs via Bidirectional Communication", 2024, arXiv:2412.20501) and for any paper that
splits attention over key/value blocks.

Method. For one query row q and a set of keys K with values V, with scores
`s_j = scale * <q, k_j>` (scale = 1/sqrt(D) by default) restricted to the visible keys,

  lse = log sum_j exp(s_j),      o = sum_j exp(s_j - lse) v_j.

Two partial results over disjoint key sets, (o_1, lse_1) and (o_2, lse_2), combine exactly:

  lse = logaddexp(lse_1, lse_2),   o = exp(lse_1 - lse) o_1 + exp(lse_2 - lse) o_2.

This merge is associative and commutative, so attention over a sequence split into blocks
can be assembled in any order (FlashAttention's online softmax, Ring Attention, TokenRing).
A row that sees no key has lse = -inf and o = 0, and merging with it is the identity.

Differences from the papers' code. The official TokenRing and ring-flash-attention code call
the FlashAttention CUDA kernel per block and merge with the equivalent sigmoid form
`o - sigmoid(lse_b - lse) (o - o_b)`, which yields NaN when both lse are -inf; here the merge
shifts by the larger lse and divides by a guarded sum, so fully masked rows give 0 and -inf
and no NaN in values or gradients. Blocks are dense XLA einsums (optionally scanned over
key/value chunks with `kv_block_size`), not a fused kernel.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _check_qkv(q, k, v) -> tuple[int, int]:
  """Validates `[B, L, H, D]` operands; returns (num kv heads, query heads per kv head)."""
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape [B, L, H, D], got shape {x.shape}")
  if k.shape[:3] != v.shape[:3]:
    raise ValueError(f"k and v must agree on [B, Lk, Hkv], got {k.shape} and {v.shape}")
  if q.shape[0] != k.shape[0]:
    raise ValueError(f"q and k must have the same batch size, got {q.shape} and {k.shape}")
  if q.shape[3] != k.shape[3]:
    raise ValueError(f"q and k must have the same head dim, got {q.shape} and {k.shape}")
  h, hkv = q.shape[2], k.shape[2]
  if hkv == 0 or h % hkv:
    raise ValueError(f"the number of q heads ({h}) must be a multiple of the number of "
                     f"k/v heads ({hkv})")
  return hkv, h // hkv


def _positions(positions, length: int, name: str) -> jax.Array:
  if positions is None:
    return jnp.arange(length, dtype=jnp.int32)
  positions = jnp.asarray(positions)
  if positions.shape != (length,):
    raise ValueError(f"{name} must have shape [{length}], got {positions.shape}")
  return positions


def _block_attention(qh, kh, vh, q_pos, kv_pos, causal, scale, precision):
  """Dense attention of head-major queries against one K/V block.

  Args are `qh` `[B, Hkv, R, D]` (R = G * Lq rows: the G query heads sharing a kv head,
  stacked), `kh` `[B, Hkv, Lk, D]`, `vh` `[B, Hkv, Lk, Dv]`, `q_pos` `[R]`, `kv_pos` `[Lk]`.
  Head-major operands make both products plain batched matmuls, so XLA does not transpose
  the `[R, Lk]` probabilities (a 1.5x slowdown on CPU at Lq = Lk = 2048).

  Returns float32 `o` `[B, Hkv, R, Dv]` and `lse` `[B, Hkv, R]`.
  """
  s = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, precision=precision,
                 preferred_element_type=jnp.float32) * scale
  if causal:
    visible = kv_pos[None, :] <= q_pos[:, None]  # [R, Lk]
    s = jnp.where(visible, s, -jnp.inf)
  m = jnp.max(s, axis=-1)
  # A row with no visible key has m = -inf; shifting by 0 instead keeps exp() at 0 rather
  # than exp(-inf + inf) = NaN. The shift cancels exactly, so it carries no gradient.
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  p = jnp.exp(s - m[..., None])
  denom = jnp.sum(p, axis=-1)
  has_key = denom > 0
  # Double `where`: log and division only ever see the guarded value, so the gradient of
  # a fully masked row is 0, not 0 * inf.
  denom_safe = jnp.where(has_key, denom, 1.0)
  lse = jnp.where(has_key, m + jnp.log(denom_safe), -jnp.inf)
  o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(vh.dtype), vh, precision=precision,
                 preferred_element_type=jnp.float32)
  return o / denom_safe[..., None], lse


def merge_partials(o1: jax.Array, lse1: jax.Array, o2: jax.Array,
                   lse2: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Combines two attention partials computed over disjoint key sets.

  Associative and commutative (to rounding); a partial with lse = -inf is the
  identity, and two such partials give o = 0, lse = -inf with finite gradients.

  Args:
    o1: `[..., L, H, D]` partial output (any float dtype).
    lse1: `[..., L, H]` its log-sum-exp (float32 recommended).
    o2: same shape as `o1`.
    lse2: same shape as `lse1`.

  Returns:
    `(o, lse)`, float32, shapes of `o1` and `lse1`.
  """
  if o1.shape != o2.shape or lse1.shape != lse2.shape or o1.shape[:-1] != lse1.shape:
    raise ValueError("merge_partials needs o1, o2 of one shape [..., D] and lse1, lse2 of "
                     f"shape [...]; got o {o1.shape}, {o2.shape} and lse {lse1.shape}, "
                     f"{lse2.shape}")
  lse1 = lse1.astype(jnp.float32)
  lse2 = lse2.astype(jnp.float32)
  m = jnp.maximum(lse1, lse2)
  m = lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  # Weights relative to the larger lse are in [0, 1], one of them is 1 unless both are
  # empty, so nothing overflows; exp(-inf - m) = 0 makes an empty partial drop out.
  w1 = jnp.exp(lse1 - m)
  w2 = jnp.exp(lse2 - m)
  total = w1 + w2
  nonempty = total > 0
  total_safe = jnp.where(nonempty, total, 1.0)
  lse = jnp.where(nonempty, m + jnp.log(total_safe), -jnp.inf)
  o = (w1[..., None] * o1.astype(jnp.float32) + w2[..., None] * o2.astype(jnp.float32))
  return o / total_safe[..., None], lse


def attention_with_lse(
    q: jax.Array, k: jax.Array, v: jax.Array, *,
    q_positions: jax.Array | None = None, kv_positions: jax.Array | None = None,
    causal: bool = False, scale: float | None = None, kv_block_size: int | None = None,
    precision: lax.PrecisionLike = None) -> tuple[jax.Array, jax.Array]:
  """Softmax attention of `q` against `k`, `v`, returning the output and its log-sum-exp.

  Grouped-query attention when `k`/`v` have fewer heads: query head `h` reads kv head
  `h // (H // Hkv)` (the `repeat_interleave` convention of the official code).

  Args:
    q: `[B, Lq, H, D]` queries.
    k: `[B, Lk, Hkv, D]` keys, `H % Hkv == 0`.
    v: `[B, Lk, Hkv, Dv]` values.
    q_positions: `[Lq]` integer global positions of the queries (default `arange(Lq)`).
    kv_positions: `[Lk]` integer global positions of the keys (default `arange(Lk)`).
    causal: if True a query sees the keys with `kv_position <= q_position`.
    scale: score scale, default `1 / sqrt(D)`.
    kv_block_size: if set, keys are processed in chunks of this size with `lax.scan` and
      merged with `merge_partials` (flash-style memory: `[Lq, kv_block_size]` scores).
      Must divide `Lk`.
    precision: passed to the two einsums (use `"highest"` for fp32 checks on GPU).

  Returns:
    `o` `[B, Lq, H, Dv]` in `q.dtype` (0 for rows with no visible key) and `lse`
    `[B, Lq, H]` float32 (-inf for rows with no visible key).
  """
  hkv, groups = _check_qkv(q, k, v)
  b, lq, h, d = q.shape
  lk = k.shape[1]
  q_pos = _positions(q_positions, lq, "q_positions")
  kv_pos = _positions(kv_positions, lk, "kv_positions")
  scale = 1.0 / np.sqrt(d) if scale is None else scale
  # Head-major layout [B, Hkv, G * Lq, D]: row g * Lq + i is query i of head hk * G + g.
  qh = jnp.transpose(q.reshape(b, lq, hkv, groups, d), (0, 2, 3, 1, 4))
  qh = qh.reshape(b, hkv, groups * lq, d)
  kh = jnp.transpose(k, (0, 2, 1, 3))
  vh = jnp.transpose(v, (0, 2, 1, 3))
  q_pos = jnp.tile(q_pos, groups)

  def block(kb, vb, pb):
    return _block_attention(qh, kb, vb, q_pos, pb, causal, scale, precision)

  if kv_block_size is None or kv_block_size >= lk:
    o, lse = block(kh, vh, kv_pos)
  else:
    if kv_block_size <= 0 or lk % kv_block_size:
      raise ValueError(f"kv_block_size must be a positive divisor of Lk={lk}, "
                       f"got {kv_block_size}")
    nb = lk // kv_block_size
    kb = jnp.moveaxis(kh.reshape(b, hkv, nb, kv_block_size, d), 2, 0)
    vb = jnp.moveaxis(vh.reshape(b, hkv, nb, kv_block_size, vh.shape[3]), 2, 0)
    pb = kv_pos.reshape(nb, kv_block_size)

    def body(carry, xs):
      return merge_partials(*carry, *block(*xs)), None

    # Start from block 0 rather than from (0, -inf) constants so the carry has the same
    # sharding type (varying manual axes) as the loop body inside `jax.shard_map`.
    init = block(kb[0], vb[0], pb[0])
    (o, lse), _ = lax.scan(body, init, (kb[1:], vb[1:], pb[1:]))
  o = jnp.transpose(o.reshape(b, hkv, groups, lq, -1), (0, 3, 1, 2, 4))
  lse = jnp.transpose(lse.reshape(b, hkv, groups, lq), (0, 3, 1, 2))
  return o.reshape(b, lq, h, -1).astype(q.dtype), lse.reshape(b, lq, h)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool = False, *,
                        scale: float | None = None,
                        precision: lax.PrecisionLike = None) -> tuple[jax.Array, jax.Array]:
  """Plain full-sequence softmax attention (materialised probabilities), the test oracle.

  Written independently of `attention_with_lse`: K/V heads are repeated, the causal mask is
  `tril(ones(Lq, Lk))` on local indices, and lse comes from `jax.nn.logsumexp`. Rows with
  no visible key (only possible when `Lq > Lk` with `causal`) give NaN here.

  Args:
    q: `[B, Lq, H, D]`.
    k: `[B, Lk, Hkv, D]`.
    v: `[B, Lk, Hkv, Dv]`.
    causal: lower-triangular mask `j <= i`.
    scale: default `1 / sqrt(D)`.
    precision: passed to the einsums.

  Returns:
    `o` `[B, Lq, H, Dv]` in `q.dtype` and `lse` `[B, Lq, H]` float32.
  """
  _, groups = _check_qkv(q, k, v)
  scale = 1.0 / np.sqrt(q.shape[3]) if scale is None else scale
  k = jnp.repeat(k, groups, axis=2).astype(jnp.float32)
  v = jnp.repeat(v, groups, axis=2).astype(jnp.float32)
  s = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k, precision=precision) * scale
  if causal:
    s = jnp.where(jnp.tril(jnp.ones(s.shape[-2:], bool)), s, -jnp.inf)
  lse = jax.nn.logsumexp(s, axis=-1)
  o = jnp.einsum("bhqk,bkhd->bqhd", jnp.exp(s - lse[..., None]), v, precision=precision)
  return o.astype(q.dtype), jnp.moveaxis(lse, 1, 2)
