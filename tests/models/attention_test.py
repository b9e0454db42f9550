"""Tests for attention with log-sum-exp and the partial-merge rule, against numpy oracles."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.models.attention import attention_with_lse, merge_partials, reference_attention


def _numpy_attention(q, k, v, q_pos, kv_pos, causal, scale=None):
  """Naive float64 softmax attention with repeated K/V heads; rows with no key -> 0/-inf."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  groups = q.shape[2] // k.shape[2]
  k = np.repeat(k, groups, axis=2)
  v = np.repeat(v, groups, axis=2)
  scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
  s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
  if causal:
    s = np.where(np.asarray(kv_pos)[None, :] <= np.asarray(q_pos)[:, None], s, -np.inf)
  m = s.max(-1, keepdims=True)
  m = np.where(np.isfinite(m), m, 0.0)
  p = np.exp(s - m)
  z = p.sum(-1, keepdims=True)
  with np.errstate(divide="ignore"):
    lse = np.where(z > 0, np.log(np.where(z > 0, z, 1.0)) + m, -np.inf)[..., 0]
  o = np.einsum("bhqk,bkhd->bqhd", p / np.where(z > 0, z, 1.0), v)
  return o, np.moveaxis(lse, 1, 2)


def _qkv(seed, b=2, lq=24, lk=32, h=4, hkv=2, d=8, dv=8, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (b, lq, h, d), dtype),
          jax.random.normal(kk, (b, lk, hkv, d), dtype),
          jax.random.normal(kv, (b, lk, hkv, dv), dtype))


@functools.cache
def _jitted(causal, kv_block_size):
  return jax.jit(lambda q, k, v, qp, kp: attention_with_lse(
      q, k, v, q_positions=qp, kv_positions=kp, causal=causal, kv_block_size=kv_block_size))


_merge = jax.jit(merge_partials)


@pytest.mark.parametrize("causal,kv_block_size,hkv,dv", [
    (False, None, 4, 8), (True, None, 2, 8), (False, None, 1, 12),
    (True, 8, 1, 12), (False, 8, 2, 8), (True, 8, 4, 8)])
def test_attention_with_lse_matches_numpy(causal, kv_block_size, hkv, dv):
  q, k, v = _qkv(0, hkv=hkv, dv=dv)
  # Queries sit at positions 8..31 of a 32-token sequence, so no row is empty.
  q_pos = np.arange(8, 32)
  kv_pos = np.arange(32)
  o, lse = _jitted(causal, kv_block_size)(q, k, v, q_pos, kv_pos)
  o_ref, lse_ref = _numpy_attention(q, k, v, q_pos, kv_pos, causal)
  assert o.shape == (2, 24, 4, dv) and o.dtype == jnp.float32
  assert lse.shape == (2, 24, 4) and lse.dtype == jnp.float32
  np.testing.assert_allclose(o, o_ref, atol=2e-6, rtol=0)
  np.testing.assert_allclose(lse, lse_ref, atol=2e-6, rtol=0)


def test_reference_attention_matches_numpy():
  q, k, v = _qkv(1, lq=32)
  for causal in (False, True):
    o, lse = jax.jit(reference_attention, static_argnums=3)(q, k, v, causal)
    o_ref, lse_ref = _numpy_attention(q, k, v, np.arange(32), np.arange(32), causal)
    np.testing.assert_allclose(o, o_ref, atol=2e-6, rtol=0)
    np.testing.assert_allclose(lse, lse_ref, atol=2e-6, rtol=0)


def test_positions_permutation_invariance():
  # Causal attention on a shuffled sequence with its positions equals the unshuffled one.
  q, k, v = _qkv(2, lq=32)
  perm = np.random.default_rng(0).permutation(32)
  o, lse = _jitted(True, None)(q, k, v, np.arange(32), np.arange(32))
  o_p, lse_p = _jitted(True, None)(q[:, perm], k[:, perm], v[:, perm], perm, perm)
  np.testing.assert_allclose(o_p, o[:, perm], atol=2e-6)
  np.testing.assert_allclose(lse_p, lse[:, perm], atol=2e-6)


def _random_partial(key, shape=(2, 6, 3, 5), empty_rows=()):
  ko, kl = jax.random.split(key)
  o = jax.random.normal(ko, shape)
  lse = 3 * jax.random.normal(kl, shape[:-1])
  for row in empty_rows:
    o = o.at[:, row].set(0.0)
    lse = lse.at[:, row].set(-jnp.inf)
  return o, lse


def test_merge_is_associative_and_commutative():
  keys = jax.random.split(jax.random.key(3), 3)
  # Row 1 is empty in a, row 2 in b and c, row 3 in all three.
  a = _random_partial(keys[0], empty_rows=(1, 3))
  b = _random_partial(keys[1], empty_rows=(2, 3))
  c = _random_partial(keys[2], empty_rows=(2, 3))
  ab = _merge(*a, *b)
  ba = _merge(*b, *a)
  # Symmetric formula; only FMA contraction order can differ, so equal to rounding.
  np.testing.assert_allclose(ab[0], ba[0], atol=1e-6, rtol=0)
  np.testing.assert_allclose(ab[1], ba[1], atol=1e-6, rtol=0)
  left = _merge(*ab, *c)
  right = _merge(*a, *_merge(*b, *c))
  np.testing.assert_allclose(left[0], right[0], atol=1e-6)
  np.testing.assert_allclose(left[1], right[1], atol=1e-6)
  # Oracle: softmax-weighted average of the three partials in float64.
  lses = np.stack([np.asarray(x[1], np.float64) for x in (a, b, c)])
  os_ = np.stack([np.asarray(x[0], np.float64) for x in (a, b, c)])
  top = np.max(lses, 0)
  top = np.where(np.isfinite(top), top, 0)
  w = np.exp(lses - top)
  tot = w.sum(0)
  with np.errstate(divide="ignore"):
    lse_ref = np.where(tot > 0, top + np.log(np.where(tot > 0, tot, 1)), -np.inf)
  o_ref = (w[..., None] * os_).sum(0) / np.where(tot > 0, tot, 1)[..., None]
  np.testing.assert_allclose(left[0], o_ref, atol=1e-6)
  np.testing.assert_allclose(left[1], lse_ref, atol=1e-6)
  assert np.all(np.isneginf(left[1][:, 3])) and np.all(left[0][:, 3] == 0)


def test_merging_kv_blocks_equals_full_attention():
  q, k, v = _qkv(4, lq=16, lk=30)
  q_pos, kv_pos = np.arange(14, 30), np.arange(30)
  bounds = [0, 7, 11, 23, 30]  # uneven blocks; block [23, 30) is empty for early rows

  @jax.jit
  def blocks(q, k, v):
    return [attention_with_lse(q, k[:, a:e], v[:, a:e], q_positions=q_pos,
                               kv_positions=kv_pos[a:e], causal=True)
            for a, e in zip(bounds[:-1], bounds[1:])]

  parts = blocks(q, k, v)
  o_ref, lse_ref = _numpy_attention(q, k, v, q_pos, kv_pos, True)
  for order in ([0, 1, 2, 3], [3, 1, 0, 2]):
    acc = parts[order[0]]
    for i in order[1:]:
      acc = _merge(*acc, *parts[i])
    np.testing.assert_allclose(acc[0], o_ref, atol=2e-6)
    np.testing.assert_allclose(acc[1], lse_ref, atol=2e-6)


@pytest.mark.parametrize("kv_block_size", [None, 4])
def test_fully_masked_rows_give_zero_and_neg_inf_without_nan(kv_block_size):
  q, k, v = _qkv(5, lq=8, lk=8)
  # Queries 0..3 come before every key (positions 10..17); queries 4..7 see some keys.
  q_pos = np.array([0, 1, 2, 3, 12, 13, 16, 20])
  kv_pos = np.arange(10, 18)
  fn = _jitted(True, kv_block_size)
  o, lse = fn(q, k, v, q_pos, kv_pos)
  assert np.all(np.asarray(o[:, :4]) == 0)
  assert np.all(np.isneginf(np.asarray(lse[:, :4])))
  o_ref, lse_ref = _numpy_attention(q, k, v, q_pos, kv_pos, True)
  np.testing.assert_allclose(o, o_ref, atol=2e-6)
  np.testing.assert_allclose(lse[:, 4:], lse_ref[:, 4:], atol=2e-6)

  def loss(q, k, v):
    o, lse = fn(q, k, v, q_pos, kv_pos)
    return jnp.sum(o ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  grads = jax.jit(jax.grad(loss, (0, 1, 2)))(q, k, v)
  for g in grads:
    assert np.all(np.isfinite(g))
  np.testing.assert_array_equal(grads[0][:, :4], 0.0)


def test_merge_of_two_empty_partials_has_finite_gradients():
  o = jnp.ones((1, 3, 2, 4))
  lse = jnp.full((1, 3, 2), -jnp.inf)

  def loss(o1, o2, l1, l2):
    o, lse = merge_partials(o1, l1, o2, l2)
    return jnp.sum(o) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

  merged = _merge(o, lse, 2 * o, lse)
  assert np.all(np.asarray(merged[0]) == 0) and np.all(np.isneginf(np.asarray(merged[1])))
  for g in jax.jit(jax.grad(loss, (0, 1, 2, 3)))(o, 2 * o, lse, lse):
    assert np.all(np.isfinite(g))


def test_merge_with_empty_partial_is_identity():
  a = _random_partial(jax.random.key(6))
  empty = (jnp.zeros_like(a[0]), jnp.full_like(a[1], -jnp.inf))
  o, lse = _merge(*a, *empty)
  np.testing.assert_array_equal(o, a[0])
  np.testing.assert_array_equal(lse, a[1])


def test_bfloat16_inputs_keep_dtype():
  q, k, v = _qkv(7, lq=16, lk=16, dtype=jnp.bfloat16)
  o, lse = _jitted(True, None)(q, k, v, np.arange(16), np.arange(16))
  assert o.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  o_ref, lse_ref = _numpy_attention(q, k, v, np.arange(16), np.arange(16), True)
  np.testing.assert_allclose(np.asarray(o, np.float32), o_ref, atol=3e-2)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-5)


def test_bad_inputs_raise():
  q, k, v = _qkv(8, lq=8, lk=8, h=3, hkv=2)
  with pytest.raises(ValueError, match="multiple of the number of k/v heads"):
    attention_with_lse(q, k, v)
  q, k, v = _qkv(8, lq=8, lk=8)
  with pytest.raises(ValueError, match="kv_block_size"):
    attention_with_lse(q, k, v, kv_block_size=3)
  with pytest.raises(ValueError, match="q_positions"):
    attention_with_lse(q, k, v, q_positions=np.arange(5))
  with pytest.raises(ValueError, match="shape"):
    attention_with_lse(q[0], k, v)
  with pytest.raises(ValueError, match="k and v"):
    attention_with_lse(q, k, v[:, :4])
  with pytest.raises(ValueError, match="merge_partials"):
    merge_partials(q, q[..., 0], q[:, :4], q[:, :4, ..., 0])
