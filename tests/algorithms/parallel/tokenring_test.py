"""TokenRing on simulated CPU devices vs full-sequence attention, Ring Attention and ledgers."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.algorithms.parallel.tokenring import (
  bytes_per_device,
  forward_memory_per_device,
  tokenring_attention,
  tokenring_ledger,
)
from jaxrepro.models.attention import reference_attention
from jaxrepro.sharding.mesh import make_mesh
from jaxrepro.sharding.ring_attention import ring_attention
from jaxrepro.sharding.zigzag import zigzag_permute, zigzag_unpermute

B, L, H, HKV, D = 1, 64, 4, 2, 8


def _mesh(n):
  return make_mesh((n,), ("seq",), devices=jax.devices()[:n])


@functools.cache
def _inputs(dv=D):
  keys = jax.random.split(jax.random.key(1), 5)
  q = jax.random.normal(keys[0], (B, L, H, D))
  k = jax.random.normal(keys[1], (B, L, HKV, D))
  v = jax.random.normal(keys[2], (B, L, HKV, dv))
  w_o = jax.random.normal(keys[3], (B, L, H, dv))
  w_lse = jax.random.normal(keys[4], (B, L, H))
  return q, k, v, w_o, w_lse


def _loss_and_grads(attn):
  """jit(value_and_grad) of <o, w_o> + <lse, w_lse> wrt q, k, v (natural order)."""
  def loss(q, k, v, w_o, w_lse):
    o, lse = attn(q, k, v)
    return jnp.sum(o * w_o) + jnp.sum(lse * w_lse), (o, lse)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def _reference(causal):
  (_, (o, lse)), grads = _loss_and_grads(
      lambda q, k, v: reference_attention(q, k, v, causal))(*_inputs())
  return o, lse, grads


def _natural_order(fn, n, causal):
  """Wraps a sharded attention so it takes and returns the natural sequence order."""
  mesh = _mesh(n)

  def attn(q, k, v):
    if not causal:
      return fn(q, k, v, mesh=mesh, axis_name="seq", causal=False)
    zz = functools.partial(zigzag_permute, n=n)
    o, lse = fn(zz(q), zz(k), zz(v), mesh=mesh, axis_name="seq", causal=True)
    return zigzag_unpermute(o, n), zigzag_unpermute(lse, n)
  return attn


@functools.cache
def _forward(fn, n, causal):
  q, k, v, _, _ = _inputs()
  return jax.jit(_natural_order(fn, n, causal))(q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_on_8_devices_with_gradients(causal):
  (_, (o, lse)), grads = _loss_and_grads(
      _natural_order(tokenring_attention, 8, causal))(*_inputs())
  o_ref, lse_ref, grads_ref = _reference(causal)
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=0)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=f"d/d{name}")


@pytest.mark.parametrize("causal", [False, True])
def test_equals_ring_attention_baseline(causal):
  # Same mathematics scheduled differently: equal to float32 rounding.
  o, lse = _forward(tokenring_attention, 8, causal)
  o_ring, lse_ring = _forward(ring_attention, 8, causal)
  np.testing.assert_allclose(o, o_ring, atol=2e-6, rtol=0)
  np.testing.assert_allclose(lse, lse_ring, atol=2e-6, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_device_counts_agree(n, causal):
  o, lse = _forward(tokenring_attention, n, causal)
  o_ref, lse_ref, _ = _reference(causal)
  # n = 1 is a single local attention call: the reference up to summation order.
  np.testing.assert_allclose(o, o_ref, atol=1e-5 if n > 1 else 2e-6, rtol=0)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-5 if n > 1 else 2e-6, rtol=0)
  o8, lse8 = _forward(tokenring_attention, 8, causal)
  np.testing.assert_allclose(o, o8, atol=1e-5, rtol=0)
  np.testing.assert_allclose(lse, lse8, atol=1e-5, rtol=0)


def test_bfloat16_inputs():
  q, k, v, _, _ = _inputs()
  o, lse = jax.jit(_natural_order(tokenring_attention, 4, True))(
      q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16))
  assert o.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  o_ref, lse_ref, _ = _reference(True)
  np.testing.assert_allclose(np.asarray(o, np.float32), o_ref, atol=5e-2, rtol=0)
  np.testing.assert_allclose(lse, lse_ref, atol=5e-2, rtol=0)


_PERMUTE = re.compile(
    r"collective_permute\"\(%[^)]*\) <\{.*?source_target_pairs = dense<(\[\[.*?\]\])> : "
    r"tensor<\d+x2xi64>\}> : \(tensor<([^>]*)>\)")
_NBYTES = {"f32": 4, "bf16": 2, "f16": 2}


def _sends_from_hlo(text, n, d):
  """Bytes each device sends, by direction, read from the lowered program's permutes.

  Tensors with 4 dims and last dim `d` are queries ("backward"); the others are partial
  outputs and lse ("forward"). Also returns the number of collective permutes.
  """
  sent = {"backward": np.zeros(n), "forward": np.zeros(n)}
  ops = _PERMUTE.findall(text)
  for pairs, tensor in ops:
    *dims, dtype = tensor.split("x")
    dims = [int(x) for x in dims]
    nbytes = int(np.prod(dims)) * _NBYTES[dtype]
    is_query = len(dims) == 4 and dims[-1] == d
    for src, dst in json.loads(pairs):
      if is_query:
        assert dst == (src - 1) % n, "queries must move to rank - 1"
      sent["backward" if is_query else "forward"][src] += nbytes
  return sent, len(ops)


@pytest.mark.parametrize("causal", [False, True])
def test_hlo_sends_match_ledger(causal):
  # Value head dim 16 != key head dim 8, so query and output transfers are told apart.
  n, dv = 8, 16
  q, k, v, _, _ = _inputs(dv)
  mesh = _mesh(n)
  text = jax.jit(functools.partial(tokenring_attention, mesh=mesh, causal=causal)).lower(
      q, k, v).as_text()
  sent, count = _sends_from_hlo(text, n, D)
  # Per step: late Q, early Q, late (o, lse), early (o, lse) if causal; else Q, o, lse.
  assert count == (6 if causal else 3) * (n - 1)
  assert "all_gather" not in text and "all_to_all" not in text
  for r in range(n):
    ledger = tokenring_ledger(n=n, rank=r, batch=B, seq_len=L, num_heads=H, head_dim=D,
                              v_head_dim=dv, dtype=jnp.float32, causal=causal)
    assert ledger.total_bytes("backward") == sent["backward"][r], r
    assert ledger.total_bytes("forward") == sent["forward"][r], r


def _simulated_schedule_bytes(n, rank, b, seq_len, h, d, nbytes, causal):
  """Independent oracle: walk the steps and send a half only when someone needs it.

  At step s device j holds owner o = (j + s) % n. A query chunk x needs key chunk y iff
  y <= x. Device j's key chunks are j and 2n-1-j; owner o's query chunks are o and 2n-1-o.
  """
  parts = 2 * n if causal else n
  half = b * (seq_len // parts) * h
  back = fwd = 0
  for s in range(1, n):
    if not causal:
      back += half * d * nbytes
      fwd += half * (d * nbytes + 4)
      continue
    j, o = rank, (rank + s) % n
    for chunk in (o, 2 * n - 1 - o):
      if any(y <= chunk for y in (j, 2 * n - 1 - j)):  # j computes for this chunk
        fwd += half * (d * nbytes + 4)
    receiver = (rank - 1) % n  # the Q rank sends now is needed by rank - 1 at step s
    o_recv = (receiver + s) % n
    for chunk in (o_recv, 2 * n - 1 - o_recv):
      if any(y <= chunk for y in (receiver, 2 * n - 1 - receiver)):
        back += half * d * nbytes
  return back, fwd


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_ledger_matches_simulated_schedule(n, causal):
  for dtype, nbytes in ((jnp.float32, 4), (jnp.bfloat16, 2)):
    for r in range(n):
      ledger = tokenring_ledger(n=n, rank=r, batch=2, seq_len=48 * n, num_heads=3,
                                head_dim=8, dtype=dtype, causal=causal)
      back, fwd = _simulated_schedule_bytes(n, r, 2, 48 * n, 3, 8, nbytes, causal)
      assert ledger.total_bytes("backward") == back
      assert ledger.total_bytes("forward") == fwd


def test_bytes_per_device_against_ring():
  # Non-causal, no GQA: TokenRing sends (n-1)|Q| back and (n-1)(|O| + |lse|) forward, while
  # Ring Attention sends (n-1)(|K| + |V|) = (n-1) 2|Q| forward.
  n, blk = 8, 1 * (512 // 8) * 4 * 16
  table = bytes_per_device(n=n, batch=1, seq_len=512, num_heads=4, num_kv_heads=4,
                           head_dim=16, dtype=jnp.float32, causal=False)
  np.testing.assert_array_equal(table["tokenring_backward"], (n - 1) * blk * 4)
  np.testing.assert_array_equal(table["tokenring_forward"], (n - 1) * (blk * 4 + blk // 16 * 4))
  np.testing.assert_array_equal(table["ring_forward"], (n - 1) * 2 * blk * 4)
  # GQA with 4x fewer kv heads shrinks only the ring's traffic.
  gqa = bytes_per_device(n=n, batch=1, seq_len=512, num_heads=4, num_kv_heads=1,
                         head_dim=16, dtype=jnp.float32, causal=False)
  np.testing.assert_array_equal(gqa["ring_forward"], table["ring_forward"] / 4)
  np.testing.assert_array_equal(gqa["tokenring_total"], table["tokenring_total"])


def test_memory_per_device_falls_with_devices():
  shapes = dict(batch=1, seq_len=256, num_heads=2, num_kv_heads=1, head_dim=8, causal=True)
  one = forward_memory_per_device(tokenring_attention, n=1, **shapes)
  eight = forward_memory_per_device(tokenring_attention, n=8, **shapes)
  # Arguments are exactly the local Q, K, V shards: (256/n) * (2 + 1 + 1) * 8 floats.
  assert one["argument"] == 256 * 4 * 8 * 4
  assert eight["argument"] == 256 // 8 * 4 * 8 * 4
  assert eight["total"] <= 1.5 / 8 * one["total"]


def test_bad_inputs_raise():
  q, k, v, _, _ = _inputs()
  mesh = _mesh(8)
  with pytest.raises(ValueError, match="multiple of 2 \\* n = 16"):
    tokenring_attention(q[:, :40], k[:, :40], v[:, :40], mesh=mesh, causal=True)
  with pytest.raises(ValueError, match="axis_name"):
    tokenring_attention(q, k, v, mesh=mesh, axis_name="clients")
  with pytest.raises(ValueError, match="rank"):
    tokenring_ledger(n=4, rank=4, batch=1, seq_len=64, num_heads=1, head_dim=8,
                     dtype=jnp.float32)
