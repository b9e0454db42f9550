"""Ring Attention on simulated CPU devices vs plain full-sequence softmax attention."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.models.attention import reference_attention
from jaxrepro.sharding.mesh import make_mesh
from jaxrepro.sharding.ring_attention import ring_attention, ring_attention_ledger
from jaxrepro.sharding.zigzag import zigzag_permute, zigzag_unpermute

B, L, H, HKV, D = 1, 64, 4, 2, 8


def _mesh(n):
  return make_mesh((n,), ("seq",), devices=jax.devices()[:n])


@functools.cache
def _inputs():
  keys = jax.random.split(jax.random.key(0), 5)
  q = jax.random.normal(keys[0], (B, L, H, D))
  k = jax.random.normal(keys[1], (B, L, HKV, D))
  v = jax.random.normal(keys[2], (B, L, HKV, D))
  # Random cotangents for o and lse, so the gradient check covers both outputs.
  w_o = jax.random.normal(keys[3], (B, L, H, D))
  w_lse = jax.random.normal(keys[4], (B, L, H))
  return q, k, v, w_o, w_lse


def _loss_and_grads(attn):
  """jit(value_and_grad) of <o, w_o> + <lse, w_lse>; inputs and outputs in natural order."""
  def loss(q, k, v, w_o, w_lse):
    o, lse = attn(q, k, v)
    return jnp.sum(o * w_o) + jnp.sum(lse * w_lse), (o, lse)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


@functools.cache
def _reference(causal):
  (_, (o, lse)), grads = _loss_and_grads(
      lambda q, k, v: reference_attention(q, k, v, causal))(*_inputs())
  return o, lse, grads


def _ring_natural_order(n, causal):
  mesh = _mesh(n)

  def attn(q, k, v):
    if not causal:
      return ring_attention(q, k, v, mesh=mesh, axis_name="seq", causal=False)
    zz = functools.partial(zigzag_permute, n=n)
    o, lse = ring_attention(zz(q), zz(k), zz(v), mesh=mesh, axis_name="seq", causal=True)
    return zigzag_unpermute(o, n), zigzag_unpermute(lse, n)
  return attn


@pytest.mark.parametrize("causal", [False, True])
def test_matches_reference_on_8_devices_with_gradients(causal):
  (_, (o, lse)), grads = _loss_and_grads(_ring_natural_order(8, causal))(*_inputs())
  o_ref, lse_ref, grads_ref = _reference(causal)
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=0)
  for name, g, g_ref in zip("qkv", grads, grads_ref):
    np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=0, err_msg=f"d/d{name}")


@pytest.mark.parametrize("n", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_fewer_devices_agree_with_reference(n, causal):
  q, k, v, _, _ = _inputs()
  o, lse = jax.jit(_ring_natural_order(n, causal))(q, k, v)
  o_ref, lse_ref, _ = _reference(causal)
  np.testing.assert_allclose(o, o_ref, atol=1e-5, rtol=0)
  np.testing.assert_allclose(lse, lse_ref, atol=1e-5, rtol=0)


def test_output_is_sharded_over_the_sequence_axis():
  q, k, v, _, _ = _inputs()
  mesh = _mesh(4)
  o, lse = jax.jit(functools.partial(ring_attention, mesh=mesh, causal=False))(q, k, v)
  assert o.sharding.is_equivalent_to(
      jax.sharding.NamedSharding(mesh, jax.P(None, "seq", None, None)), 4)
  assert lse.shape == (B, L, H) and lse.dtype == jnp.float32


def test_lowered_program_rotates_kv_inside_the_loop():
  q, k, v, _, _ = _inputs()
  mesh = _mesh(8)
  text = jax.jit(functools.partial(ring_attention, mesh=mesh, causal=True)).lower(
      q, k, v).as_text()
  assert "stablehlo.while" in text
  body = text[text.index("stablehlo.while"):]
  # K and V move one hop forward (i -> i + 1) with shape [B, L/8, Hkv, D] inside the loop.
  ring = "[" + ", ".join(f"[{i}, {(i + 1) % 8}]" for i in range(8)) + "]"
  pattern = (r"collective_permute.*source_target_pairs = dense<(\[\[.*?\]\])>.*"
             r"\(tensor<1x8x2x8xf32>\)")
  assert ring in re.findall(pattern, body)
  assert "all_gather" not in text and "all_to_all" not in text


@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_ledger_matches_hand_formula(n):
  # Hand formula: n - 1 sends of one K and one V block of L/n tokens, 4 bytes per value,
  # here with a value head dim (12) different from the key head dim (8).
  for dtype, nbytes in ((jnp.float32, 4), (jnp.bfloat16, 2)):
    ledger = ring_attention_ledger(n=n, batch=2, seq_len=512, num_kv_heads=3, head_dim=8,
                                   v_head_dim=12, dtype=dtype)
    expected = (n - 1) * 2 * (512 // n) * 3 * (8 + 12) * nbytes
    assert ledger.total_bytes("forward") == expected
    assert ledger.total_bytes() == expected


def test_bad_inputs_raise():
  q, k, v, _, _ = _inputs()
  mesh = _mesh(8)
  with pytest.raises(ValueError, match="multiple of 2 \\* n = 16"):
    ring_attention(q[:, :40], k[:, :40], v[:, :40], mesh=mesh, causal=True)
  with pytest.raises(ValueError, match="axis_name"):
    ring_attention(q, k, v, mesh=mesh, axis_name="data")
  with pytest.raises(ValueError, match="same sequence length"):
    ring_attention(q, k[:, :32], v[:, :32], mesh=mesh)
