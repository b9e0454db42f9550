"""Tests of the NNX transformer: shapes, causal / bidirectional dependence, attention oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrepro.models import transformer as tfm

L, VOCAB = 8, 11


@pytest.fixture(scope="module", params=[False, True], ids=["bidirectional", "causal"])
def model(request):
  cfg = tfm.TransformerConfig(vocab_size=VOCAB, max_len=L, num_layers=2, d_model=32,
                              num_heads=4, causal=request.param, output_size=VOCAB - 1)
  graphdef, params = tfm.init_transformer(cfg, jax.random.key(0))
  apply = jax.jit(lambda p, x: tfm.apply_transformer(graphdef, p, x))
  return cfg, params, apply


def test_shapes_and_dtype(model):
  cfg, params, apply = model
  x = jax.random.randint(jax.random.key(1), (3, L), 0, VOCAB)
  out = apply(params, x)
  assert out.shape == (3, L, VOCAB - 1) and out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))
  # Shorter sequences use the first rows of the position table.
  assert apply(params, x[:, :5]).shape == (3, 5, VOCAB - 1)


def test_dependence_structure(model):
  cfg, params, apply = model
  x = jax.random.randint(jax.random.key(2), (1, L), 0, VOCAB)
  base = np.asarray(apply(params, x))[0]
  for j in range(L):
    y = x.at[0, j].set((x[0, j] + 1) % VOCAB)
    diff = np.abs(np.asarray(apply(params, y))[0] - base).max(-1)  # [L]
    if cfg.causal:
      # Outputs before j cannot see token j; outputs at and after j must.
      assert np.all(diff[:j] == 0.0), j
      assert np.all(diff[j:] > 1e-6), j
    else:
      assert np.all(diff > 1e-6), j


def test_batch_rows_are_independent(model):
  _, params, apply = model
  x = jax.random.randint(jax.random.key(3), (4, L), 0, VOCAB)
  full = np.asarray(apply(params, x))
  for b in range(4):
    np.testing.assert_allclose(np.asarray(apply(params, x[b:b + 1]))[0], full[b],
                               rtol=1e-5, atol=1e-5)


def test_attention_matches_numpy_reference():
  rngs = nnx.Rngs(params=jax.random.key(4))
  attn = tfm.MultiHeadAttention(16, 4, dtype=jnp.float32, rngs=rngs)
  h = np.asarray(jax.random.normal(jax.random.key(5), (2, 6, 16)))
  mask = np.asarray(tfm.causal_mask(6))
  out = np.asarray(attn(jnp.asarray(h), jnp.asarray(mask)))

  def dense(layer, z):
    return z @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

  q, k, v = (dense(m, h).reshape(2, 6, 4, 4) for m in (attn.query, attn.key, attn.value))
  ref = np.zeros((2, 6, 4, 4))
  for b in range(2):
    for head in range(4):
      s = q[b, :, head] @ k[b, :, head].T / 2.0
      s = np.where(mask[0, 0], s, -np.inf)
      w = np.exp(s - s.max(-1, keepdims=True))
      ref[b, :, head] = (w / w.sum(-1, keepdims=True)) @ v[b, :, head]
  ref = dense(attn.out, ref.reshape(2, 6, 16))
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_no_shared_submodules_and_param_count():
  cfg = tfm.TransformerConfig(vocab_size=VOCAB, max_len=L, num_layers=3, d_model=16,
                              num_heads=2, d_ff=24)
  _, params = tfm.init_transformer(cfg, jax.random.key(6))
  leaves = jax.tree.leaves(params)
  assert len({id(x) for x in leaves}) == len(leaves)
  d, f = 16, 24
  per_block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d
  expected = VOCAB * d + L * d + 3 * per_block + 2 * d + d * VOCAB + VOCAB
  assert sum(x.size for x in leaves) == expected


def test_bfloat16_runs():
  cfg = tfm.TransformerConfig(vocab_size=VOCAB, max_len=L, d_model=16, num_heads=2,
                              dtype="bfloat16")
  graphdef, params = tfm.init_transformer(cfg, jax.random.key(7))
  out = tfm.apply_transformer(graphdef, params, jnp.zeros((2, L), jnp.int32))
  assert out.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(out)))


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_heads=3), "num_heads"),
    (dict(num_layers=0), "num_layers"),
    (dict(dtype="float16"), "dtype"),
])
def test_config_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    tfm.TransformerConfig(vocab_size=VOCAB, max_len=L, **kwargs)


def test_too_long_input_raises():
  cfg = tfm.TransformerConfig(vocab_size=VOCAB, max_len=4, d_model=16, num_heads=2)
  graphdef, params = tfm.init_transformer(cfg, jax.random.key(8))
  with pytest.raises(ValueError, match="max_len"):
    tfm.apply_transformer(graphdef, params, jnp.zeros((1, 5), jnp.int32))
