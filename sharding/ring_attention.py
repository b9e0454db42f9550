"""Ring Attention: sequence-parallel attention with K/V blocks rotating around a ring.

Paper: Hao Liu, Matei Zaharia, Pieter Abbeel, "Ring Attention with Blockwise Transformers
for Near-Infinite Context", 2023, arXiv:2310.01889. Used here as the baseline of TokenRing
(`jaxrepro.algorithms.parallel.tokenring`).

Method. The sequence is sharded over the n devices of a mesh axis. Device r keeps its
queries Q_r and, at step s = 0..n-1, holds the key/value block of device (r - s) mod n:
it computes the partial (o, lse) of Q_r against that block and merges it into its running
result with the log-sum-exp rule (`jaxrepro.models.attention.merge_partials`), while the
K/V block moves on to device r + 1 (`lax.ppermute`). After n steps each device holds the
exact attention output of its queries; every device sends n - 1 K/V blocks.

Causal attention uses the zig-zag layout (`jaxrepro.sharding.zigzag`): device r holds
chunks r (early half) and 2n-1-r (late half). Against another device b's block only two
quarter-size products are unmasked and both are fully visible:
  b < r: Q_early x KV_early(b) and Q_late x KV_early(b)  (the full Q, first half of KV);
  b > r: Q_late x KV_early(b) and Q_late x KV_late(b)    (the late Q, all of KV).
The shared product Q_late x KV_early is computed unconditionally and the second one on
operands selected with the device index (`zigzag_pair_partials`), so every device does the
same work with static shapes, as zhuzilin/ring-flash-attention's zig-zag variant does.

Differences from the paper and its code. The paper's code (haoliuhl/ringattention) uses a
`custom_vjp` and an inner blockwise loop; here the forward is a `lax.fori_loop` of dense
blocks and gradients come from JAX autodiff through `ppermute` (the backward pass thus
rotates K/V cotangents the other way). K/V for step s + 1 are sent before step s is
computed so XLA may overlap the transfer with the block; the last step sends nothing.
"""

import jax
import jax.numpy as jnp
from jax import lax

from jaxrepro.models.attention import attention_with_lse, merge_partials
from jaxrepro.sharding.ledger import CommLedger

P = jax.sharding.PartitionSpec


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  c = x.shape[1] // 2
  return x[:, :c], x[:, c:]


def zigzag_pair_partials(
    q_early: jax.Array, q_late: jax.Array, k_early: jax.Array, k_late: jax.Array,
    v_early: jax.Array, v_late: jax.Array, *, q_is_later: jax.Array,
    scale: float | None = None, precision: lax.PrecisionLike = None,
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """Causal partials of one device's zig-zag queries against another device's K/V.

  With the zig-zag layout, queries of device a (chunks a, 2n-1-a) against keys of device
  b != a (chunks b, 2n-1-b) need exactly two fully visible `[c x c]` products; which two
  depends only on whether a > b. Both cases share `Q_late x KV_early`.

  Args:
    q_early: `[B, c, H, D]` queries of chunk a.
    q_late: `[B, c, H, D]` queries of chunk 2n-1-a.
    k_early: `[B, c, Hkv, D]` keys of chunk b; `k_late` keys of chunk 2n-1-b.
    k_late: see `k_early`.
    v_early: `[B, c, Hkv, Dv]` values of chunk b; `v_late` values of chunk 2n-1-b.
    v_late: see `v_early`.
    q_is_later: bool scalar (may be traced): True iff a > b.
    scale: score scale, default `1 / sqrt(D)`.
    precision: einsum precision.

  Returns:
    `((o_early, lse_early), (o_late, lse_late))`, float32, `o` `[B, c, H, Dv]` and `lse`
    `[B, c, H]`. When `q_is_later` is False the early queries see nothing: `lse_early` is
    -inf and `o_early` must be ignored (merging it is the identity).
  """
  kw = dict(scale=scale, precision=precision)
  o1, l1 = attention_with_lse(q_late, k_early, v_early, **kw)
  # Select operands (not results) so only one more product is computed; the select is
  # O(c) memory traffic against O(c^2) work.
  q2 = jnp.where(q_is_later, q_early, q_late)
  k2 = jnp.where(q_is_later, k_early, k_late)
  v2 = jnp.where(q_is_later, v_early, v_late)
  o2, l2 = attention_with_lse(q2, k2, v2, **kw)
  neg_inf = jnp.full_like(l2, -jnp.inf)
  early = (o2.astype(jnp.float32), jnp.where(q_is_later, l2, neg_inf))
  late = merge_partials(o1, l1, o2, jnp.where(q_is_later, neg_inf, l2))
  return early, late


def _check_layout(q, k, v, n: int, causal: bool) -> None:
  for name, x in (("q", q), ("k", k), ("v", v)):
    if x.ndim != 4:
      raise ValueError(f"{name} must have shape [B, L, H, D], got {x.shape}")
  if not q.shape[1] == k.shape[1] == v.shape[1]:
    raise ValueError(f"q, k, v must have the same sequence length, got {q.shape[1]}, "
                     f"{k.shape[1]}, {v.shape[1]}")
  parts = 2 * n if causal else n
  if q.shape[1] % parts:
    raise ValueError(f"sequence length {q.shape[1]} must be a multiple of "
                     f"{'2 * n' if causal else 'n'} = {parts} for n = {n} devices")


def ring_attention_shard(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str,
                         causal: bool = False, scale: float | None = None,
                         precision: lax.PrecisionLike = None
                         ) -> tuple[jax.Array, jax.Array]:
  """Per-device body of Ring Attention; call inside `jax.shard_map` over `axis_name`.

  Args:
    q: `[B, Lc, H, D]` this device's queries (its two zig-zag chunks when `causal`).
    k: `[B, Lc, Hkv, D]` this device's keys.
    v: `[B, Lc, Hkv, Dv]` this device's values.
    axis_name: the mesh axis the sequence is sharded over (ring of `axis_size` devices).
    causal: causal mask in the zig-zag layout (`Lc` even).
    scale: default `1 / sqrt(D)`.
    precision: einsum precision.

  Returns:
    `o` `[B, Lc, H, Dv]` in `q.dtype` and `lse` `[B, Lc, H]` float32.
  """
  n = lax.axis_size(axis_name)
  _check_layout(q, k, v, 1, causal)
  kw = dict(scale=scale, precision=precision)
  # K/V travel r -> r + 1, so at step s device r holds the block of device r - s.
  perm = [(i, (i + 1) % n) for i in range(n)]
  rank = lax.axis_index(axis_name)
  # Step 0: local block. In the zig-zag layout the local token order is increasing in
  # global position, so the local causal mask is the global one.
  o, lse = attention_with_lse(q, k, v, causal=causal, **kw)
  o = o.astype(jnp.float32)
  if n == 1:
    return o.astype(q.dtype), lse

  if causal:
    q_e, q_l = _halves(q)
    acc = (*_halves(o), *_halves(lse))

    def step(s, acc, kv):
      o_e, o_l, l_e, l_l = acc
      k_e, k_l = _halves(kv[0])
      v_e, v_l = _halves(kv[1])
      src = (rank - s) % n
      (ob_e, lb_e), (ob_l, lb_l) = zigzag_pair_partials(
          q_e, q_l, k_e, k_l, v_e, v_l, q_is_later=src < rank, **kw)
      o_e, l_e = merge_partials(o_e, l_e, ob_e, lb_e)
      o_l, l_l = merge_partials(o_l, l_l, ob_l, lb_l)
      return o_e, o_l, l_e, l_l
  else:
    acc = (o, lse)

    def step(s, acc, kv):
      del s
      return merge_partials(*acc, *attention_with_lse(q, *kv, **kw))

  def body(s, carry):
    acc, kv = carry
    # Send the block needed at step s + 1 before computing step s.
    kv_next = lax.ppermute(kv, axis_name, perm)
    return step(s, acc, kv), kv_next

  kv = lax.ppermute((k, v), axis_name, perm)
  acc, kv = lax.fori_loop(1, n - 1, body, (acc, kv))
  acc = step(n - 1, acc, kv)
  if causal:
    o = jnp.concatenate(acc[:2], axis=1)
    lse = jnp.concatenate(acc[2:], axis=1)
  else:
    o, lse = acc
  return o.astype(q.dtype), lse


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: jax.sharding.Mesh,
                   axis_name: str = "seq", causal: bool = False,
                   scale: float | None = None, precision: lax.PrecisionLike = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Ring Attention over the sequence axis of `mesh`; jit and differentiate freely.

  Args:
    q: `[B, L, H, D]` queries. For `causal=True` the sequence must already be in zig-zag
      order (`jaxrepro.sharding.zigzag.zigzag_permute(x, n)`), n = mesh size on
      `axis_name`; for `causal=False` any order works.
    k: `[B, L, Hkv, D]` keys in the same order, `H % Hkv == 0`.
    v: `[B, L, Hkv, Dv]` values in the same order.
    mesh: mesh with axis `axis_name`; other axes are unused (inputs replicated on them).
    axis_name: the sequence-parallel axis.
    causal: causal attention (zig-zag layout) or full attention.
    scale: default `1 / sqrt(D)`.
    precision: einsum precision.

  Returns:
    `o` `[B, L, H, Dv]` (`q.dtype`) and `lse` `[B, L, H]` float32, in the input order,
    sharded over `axis_name` along L.
  """
  return shard_over_sequence(ring_attention_shard, q, k, v, mesh=mesh, axis_name=axis_name,
                             causal=causal, scale=scale, precision=precision)


def shard_over_sequence(shard_fn, q: jax.Array, k: jax.Array, v: jax.Array, *,
                        mesh: jax.sharding.Mesh, axis_name: str, causal: bool,
                        **kwargs) -> tuple[jax.Array, jax.Array]:
  """Checks the layout and runs a per-device attention body under `jax.shard_map`.

  Shared by every sequence-parallel schedule (ring attention, TokenRing): Q, K and V are
  split along the sequence over `axis_name`, `o` and `lse` come back split the same way.

  Args:
    shard_fn: `(q, k, v, *, axis_name, causal, **kwargs) -> (o, lse)` on local blocks.
    q, k, v: `[B, L, H(kv), D]` inputs (zig-zag order when causal).
    mesh, axis_name, causal: as in `ring_attention`.
    **kwargs: passed to `shard_fn` (scale, precision).
  """
  if axis_name not in mesh.shape:
    raise ValueError(f"axis_name {axis_name!r} is not an axis of the mesh {dict(mesh.shape)}")
  _check_layout(q, k, v, mesh.shape[axis_name], causal)
  spec = P(None, axis_name, None, None)
  fn = jax.shard_map(
      lambda q, k, v: shard_fn(q, k, v, axis_name=axis_name, causal=causal, **kwargs),
      mesh=mesh, in_specs=(spec, spec, spec), out_specs=(spec, P(None, axis_name, None)))
  return fn(q, k, v)


def ring_attention_ledger(*, n: int, batch: int, seq_len: int, num_kv_heads: int,
                          head_dim: int, dtype, v_head_dim: int | None = None,
                          causal: bool = False) -> CommLedger:
  """Bytes one device sends in one Ring Attention forward (the same for every device).

  Each of the n - 1 rotations sends this device's current K block `[B, L/n, Hkv, D]` and
  V block `[B, L/n, Hkv, Dv]` to rank + 1 (direction "forward"). The zig-zag layout only
  changes which products are computed, not what is sent, so `causal` does not matter.

  Args:
    n: devices on the ring.
    batch, seq_len, num_kv_heads, head_dim: global K shape `[B, L, Hkv, D]`.
    dtype: K/V dtype.
    v_head_dim: value head dim, default `head_dim`.
    causal: accepted for symmetry with the TokenRing ledger.

  Returns:
    A `CommLedger` with entries "k" and "v" in direction "forward".
  """
  del causal
  if n < 1 or seq_len % n:
    raise ValueError(f"n must be >= 1 and divide seq_len={seq_len}, got n={n}")
  dv = head_dim if v_head_dim is None else v_head_dim
  ledger = CommLedger()
  if n > 1:
    block = seq_len // n
    ledger.add_array("k", "forward", (batch, block, num_kv_heads, head_dim), dtype,
                     count=n - 1)
    ledger.add_array("v", "forward", (batch, block, num_kv_heads, dv), dtype, count=n - 1)
  return ledger
