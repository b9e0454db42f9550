"""TokenRing: sequence-parallel attention that moves queries one way and results the other.

Paper: Zongwu Wang, Fangxin Liu, Mingshuai Li, Li Jiang, "TokenRing: An Efficient
Parallelism Framework for Infinite-Context LLMs via Bidirectional Communication", 2024,
arXiv:2412.20501. Official code (PyTorch, forward only): ACA-Lab-SJTU/token-ring,
`casual_test/token_ring/zigzag_token_ring.py` and `utils.py`.

Method. The sequence is sharded over the n devices of a mesh axis. Ring Attention keeps Q
and rotates K/V; TokenRing keeps K/V local and moves Q, and sends every partial result
straight back to the owner of its queries, so Q traffic and result traffic use the two
directions of each link. At step s = 0..n-1 device r holds the queries of owner
(r + s) mod n (Q moves r -> r - 1 between steps) and computes the partial (o_b, lse_b) of
those queries against its local K/V; the partial is sent with offset s, r -> r + s, to the
owner, which merges all n partials with the log-sum-exp rule

  lse' = logaddexp(lse, lse_b),   o' = exp(lse - lse') o + exp(lse_b - lse') o_b

(`jaxrepro.models.attention.merge_partials`; the official code uses the equivalent form
`o - sigmoid(lse_b - lse) (o - o_b)`, `lse - logsigmoid(lse - lse_b)`). Because the offset
changes with s, the n steps are unrolled in Python: `lax.ppermute` permutations are static.

Causal attention uses the zig-zag layout (`jaxrepro.sharding.zigzag`): device r holds
chunks r (early half) and 2n-1-r (late half). When device r holds owner o's queries:
  o > r (r + s < n): the full Q of o against the early half of local K/V;
  o < r (r + s >= n): only the late half of Q of o against all of local K/V.
As in the official code only the late half of Q travels on the hops where the receiver
needs no more (half-sends), and only the late half of the partial is returned when the
sender only computed that. In SPMD every device runs the same program, so a half-send is a
`ppermute` whose permutation lists only the (sender, receiver) pairs that need the early
half; the other receivers get zeros, which they never use (Q) or mask with lse = -inf
(partials).

Differences from the paper and its code.
* Gradients: the official code is forward only (its backward is not implemented); here the
  function is differentiable by JAX autodiff through `ppermute` (the backward sends Q and
  result cotangents in the opposite directions). There is no `custom_vjp` with
  recomputation, so the backward keeps every step's probabilities as residuals (about
  L^2 / n floats per head per device, as for the autodiff ring baseline).
* Scheduling: the official code issues the partial of step s at step s + 1 and overlaps Q
  sends with compute by hand (NCCL streams); here `lax.optimization_barrier` imposes the
  same step order and XLA's scheduler places the transfers (no overlap can be observed on
  simulated CPU devices).
* Blocks are dense XLA einsums (`attention_with_lse`), not FlashAttention calls.
* Non-causal TokenRing (the DiT case of the paper, run through xDiT there) uses contiguous
  shards and full-size sends.

The bytes functions count what each device sends per forward (`tokenring_ledger`); the
memory helper reads XLA's per-device memory analysis of the compiled sharded forward.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrepro.models.attention import attention_with_lse, merge_partials
from jaxrepro.sharding.ledger import CommLedger
from jaxrepro.sharding.mesh import make_mesh
from jaxrepro.sharding.ring_attention import (
  ring_attention_ledger,
  shard_over_sequence,
  zigzag_pair_partials,
)

P = jax.sharding.PartitionSpec


def _halves(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  c = x.shape[1] // 2
  return x[:, :c], x[:, c:]


def tokenring_attention_shard(q: jax.Array, k: jax.Array, v: jax.Array, *, axis_name: str,
                              causal: bool = False, scale: float | None = None,
                              precision: lax.PrecisionLike = None
                              ) -> tuple[jax.Array, jax.Array]:
  """Per-device body of TokenRing; call inside `jax.shard_map` over `axis_name`.

  Args:
    q: `[B, Lc, H, D]` this device's queries (its two zig-zag chunks when `causal`).
    k: `[B, Lc, Hkv, D]` this device's keys (never sent).
    v: `[B, Lc, Hkv, Dv]` this device's values (never sent).
    axis_name: the mesh axis the sequence is sharded over (n devices).
    causal: causal mask in the zig-zag layout (`Lc` even).
    scale: default `1 / sqrt(D)`.
    precision: einsum precision.

  Returns:
    `o` `[B, Lc, H, Dv]` in `q.dtype` and `lse` `[B, Lc, H]` float32 for this device's
    queries.
  """
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be [B, L, H, D], got {q.shape}, {k.shape}, {v.shape}")
  if causal and q.shape[1] % 2:
    raise ValueError(f"causal TokenRing needs an even local length, got {q.shape[1]}")
  n = lax.axis_size(axis_name)
  rank = lax.axis_index(axis_name)
  kw = dict(scale=scale, precision=precision)
  # Step 0: own queries against own K/V. The zig-zag local order is increasing in global
  # position, so the local causal mask is the global one.
  o, lse = attention_with_lse(q, k, v, causal=causal, **kw)
  o = o.astype(jnp.float32)
  back = [(j, (j - 1) % n) for j in range(n)]

  # Scheduling: step s may start only once step s - 1 is computed (an optimization
  # barrier on its inputs and the previous partial), so the unrolled steps cannot all be
  # hoisted together and, as in the official code, the partial of step s - 1 is sent back
  # while step s computes and the queries of step s + 1 are in flight. (XLA's CPU buffer
  # assignment still keeps 2-3 steps' score buffers alive, against 1 for the rolled ring
  # loop; measured with `forward_memory_per_device`.)
  barrier = lax.optimization_barrier

  if not causal:
    acc = last = (o, lse)
    q_cur = q
    for s in range(1, n + 1):
      if s < n:
        q_cur = lax.ppermute(q_cur, axis_name, back)  # the queries of owner rank + s
        q_cur, last = barrier((q_cur, last))
      if s > 1:
        # Offset-(s-1) send straight back to the owner, which receives from rank - s + 1.
        o_b, lse_b = lax.ppermute((last[0].astype(q.dtype), last[1]), axis_name,
                                  [(j, (j + s - 1) % n) for j in range(n)])
        acc = merge_partials(*acc, o_b, lse_b)
      if s < n:
        last = attention_with_lse(q_cur, k, v, **kw)
    return acc[0].astype(q.dtype), acc[1]

  q_e, q_l = _halves(q)
  k_e, k_l = _halves(k)
  v_e, v_l = _halves(v)
  acc_e = (o[:, :q_e.shape[1]], lse[:, :q_e.shape[1]])
  acc_l = (o[:, q_e.shape[1]:], lse[:, q_e.shape[1]:])
  last = (acc_e, acc_l)
  cur_e, cur_l = q_e, q_l
  for s in range(1, n + 1):
    if s < n:
      # The late half of owner (rank + s)'s queries reaches every device; the early half
      # only devices j with j + s < n (owner later than j), from j + 1 (which also needed
      # it at step s - 1). Other devices receive zeros and select q_l below instead.
      cur_l = lax.ppermute(cur_l, axis_name, back)
      cur_e = lax.ppermute(cur_e, axis_name, [(j + 1, j) for j in range(n - s)])
      cur_e, cur_l, last = barrier((cur_e, cur_l, last))
    if s > 1:
      # Partials of step t = s - 1 go back with offset t in the input dtype (the official
      # code sends the kernel's fp16/bf16 output and fp32 lse). Only senders whose owner
      # is later computed an early half (j + t < n), so only owners rank >= t get one.
      t = s - 1
      (p_e, pl_e), (p_l, pl_l) = last
      p_l, pl_l = lax.ppermute((p_l.astype(q.dtype), pl_l), axis_name,
                               [(j, (j + t) % n) for j in range(n)])
      p_e, pl_e = lax.ppermute((p_e.astype(q.dtype), pl_e), axis_name,
                               [(j, j + t) for j in range(n - t)])
      pl_e = jnp.where(rank >= t, pl_e, jnp.full_like(pl_e, -jnp.inf))
      acc_e = merge_partials(*acc_e, p_e, pl_e)
      acc_l = merge_partials(*acc_l, p_l, pl_l)
    if s < n:
      last = zigzag_pair_partials(cur_e, cur_l, k_e, k_l, v_e, v_l,
                                  q_is_later=rank + s < n, **kw)
  o_e, lse_e = acc_e
  o_l, lse_l = acc_l
  o = jnp.concatenate([o_e, o_l], axis=1)
  lse = jnp.concatenate([lse_e, lse_l], axis=1)
  return o.astype(q.dtype), lse


def tokenring_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                        mesh: jax.sharding.Mesh, axis_name: str = "seq",
                        causal: bool = False, scale: float | None = None,
                        precision: lax.PrecisionLike = None) -> tuple[jax.Array, jax.Array]:
  """TokenRing attention over the sequence axis of `mesh`; jit and differentiate freely.

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
  return shard_over_sequence(tokenring_attention_shard, q, k, v, mesh=mesh,
                             axis_name=axis_name, causal=causal, scale=scale,
                             precision=precision)


def tokenring_ledger(*, n: int, rank: int, batch: int, seq_len: int, num_heads: int,
                     head_dim: int, dtype, v_head_dim: int | None = None,
                     causal: bool = False, lse_dtype=np.float32) -> CommLedger:
  """Bytes device `rank` sends in one TokenRing forward, by direction.

  "backward" (to rank - 1): queries. Non-causal: n - 1 blocks `[B, L/n, H, D]`. Causal
  (zig-zag, c = L/(2n)): n - 1 late halves `[B, c, H, D]` plus, at the steps s where the
  receiver's owner is later (1 <= rank <= n - s), the early half: n - rank of them for
  rank >= 1, none for rank 0.
  "forward" (to rank + s): partial results, `o` in `dtype` and `lse` in `lse_dtype`.
  Non-causal: n - 1 of `[B, L/n, H, Dv]` and `[B, L/n, H]`. Causal: n - 1 late halves
  `[B, c, H, Dv]` + `[B, c, H]` plus n - 1 - rank early halves.
  K and V are never sent, so the ledger does not depend on the number of kv heads.

  Args:
    n: devices on the ring.
    rank: the sending device, `0 <= rank < n`.
    batch, seq_len, num_heads, head_dim: global Q shape `[B, L, H, D]`.
    dtype: dtype of Q and of the partial outputs.
    v_head_dim: value head dim (output width), default `head_dim`.
    causal: zig-zag causal schedule with half-sends, or full attention.
    lse_dtype: dtype of the sent log-sum-exp (float32).

  Returns:
    A `CommLedger` with entries "q", "q_early", "o", "lse", "o_early", "lse_early".
  """
  if not 0 <= rank < n:
    raise ValueError(f"rank must be in [0, n) = [0, {n}), got {rank}")
  parts = 2 * n if causal else n
  if seq_len % parts:
    raise ValueError(f"seq_len={seq_len} must be a multiple of {parts}")
  dv = head_dim if v_head_dim is None else v_head_dim
  ledger = CommLedger()
  if n == 1:
    return ledger
  rows = seq_len // parts
  ledger.add_array("q", "backward", (batch, rows, num_heads, head_dim), dtype, count=n - 1)
  ledger.add_array("o", "forward", (batch, rows, num_heads, dv), dtype, count=n - 1)
  ledger.add_array("lse", "forward", (batch, rows, num_heads), lse_dtype, count=n - 1)
  if causal:
    q_early = n - rank if rank >= 1 else 0
    ledger.add_array("q_early", "backward", (batch, rows, num_heads, head_dim), dtype,
                     count=q_early)
    ledger.add_array("o_early", "forward", (batch, rows, num_heads, dv), dtype,
                     count=n - 1 - rank)
    ledger.add_array("lse_early", "forward", (batch, rows, num_heads), lse_dtype,
                     count=n - 1 - rank)
  return ledger


def bytes_per_device(*, n: int, batch: int, seq_len: int, num_heads: int, num_kv_heads: int,
                     head_dim: int, dtype, causal: bool = False) -> dict[str, np.ndarray]:
  """Per-device bytes sent in one forward, TokenRing by direction vs Ring Attention.

  Returns:
    `{"tokenring_backward", "tokenring_forward", "tokenring_total", "ring_forward"}`,
    each a float64 `[n]` array indexed by rank (Ring Attention is the same on all ranks).
  """
  tr = [tokenring_ledger(n=n, rank=r, batch=batch, seq_len=seq_len, num_heads=num_heads,
                         head_dim=head_dim, dtype=dtype, causal=causal) for r in range(n)]
  ring = ring_attention_ledger(n=n, batch=batch, seq_len=seq_len, num_kv_heads=num_kv_heads,
                               head_dim=head_dim, dtype=dtype, causal=causal)
  return {
      "tokenring_backward": np.array([lg.total_bytes("backward") for lg in tr]),
      "tokenring_forward": np.array([lg.total_bytes("forward") for lg in tr]),
      "tokenring_total": np.array([lg.total_bytes() for lg in tr]),
      "ring_forward": np.full(n, ring.total_bytes("forward")),
  }


AttentionFn = Callable[..., tuple[jax.Array, jax.Array]]


def forward_memory_per_device(attention_fn: AttentionFn, *, n: int, batch: int,
                              seq_len: int, num_heads: int, num_kv_heads: int,
                              head_dim: int, dtype=jnp.float32, causal: bool = False,
                              axis_name: str = "seq",
                              devices: Sequence[jax.Device] | None = None) -> dict[str, int]:
  """Per-device memory of the compiled, sharded forward, from XLA's memory analysis.

  Compiles (does not run) `attention_fn(q, k, v, mesh=..., axis_name=..., causal=...)`
  with Q/K/V sharded along the sequence over the first `n` devices.

  Args:
    attention_fn: `tokenring_attention` or `ring_attention` (or anything with that
      signature).
    n: number of devices on the sequence axis.
    batch, seq_len, num_heads, num_kv_heads, head_dim: global shapes.
    dtype: Q/K/V dtype.
    causal: passed to `attention_fn`.
    axis_name: mesh axis name.
    devices: devices to use, default `jax.devices()[:n]`.

  Returns:
    `{"argument", "output", "temp", "alias", "total"}` bytes per device, with
    total = argument + output + temp - alias.
  """
  devices = list(jax.devices()[:n] if devices is None else devices)
  if len(devices) != n:
    raise ValueError(f"n={n} devices requested, {len(devices)} available")
  mesh = make_mesh((n,), (axis_name,), devices=devices)
  sharding = jax.sharding.NamedSharding(mesh, P(None, axis_name, None, None))
  q = jax.ShapeDtypeStruct((batch, seq_len, num_heads, head_dim), dtype, sharding=sharding)
  kv = jax.ShapeDtypeStruct((batch, seq_len, num_kv_heads, head_dim), dtype,
                            sharding=sharding)
  fn = jax.jit(lambda q, k, v: attention_fn(q, k, v, mesh=mesh, axis_name=axis_name,
                                            causal=causal))
  stats = fn.lower(q, kv, kv).compile().memory_analysis()
  out = {
      "argument": int(stats.argument_size_in_bytes),
      "output": int(stats.output_size_in_bytes),
      "temp": int(stats.temp_size_in_bytes),
      "alias": int(stats.alias_size_in_bytes),
  }
  out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
  return out


def memory_scaling(attention_fn: AttentionFn, ns: Sequence[int] = (1, 2, 4, 8),
                   **shapes) -> dict[int, dict[str, int]]:
  """`forward_memory_per_device` for each device count in `ns` at a fixed total length."""
  return {n: forward_memory_per_device(attention_fn, n=n, **shapes) for n in ns}
