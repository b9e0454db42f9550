"""Tests for the text-conditioned UNet: shapes, encode/decode split, LoRA, time embedding."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrepro.models import unet as U

# Tiny: 8x8x3 images, two levels of width 8, attention at 4x4 and in the mid block. One width
# keeps the number of distinct kernel shapes (each an eager init compile) small.
CFG = U.UNetConfig(image_size=8, channels=8, channel_mult=(1, 1), attention_resolutions=(4,),
                   num_heads=2, time_embed_dim=16, context_dim=8, num_groups=4, lora_rank=2,
                   lora_alpha=3.0)
BASE_CFG = U.UNetConfig(**{**CFG.__dict__, "lora_rank": 0, "lora_alpha": None})
B, L = 2, 3
# Cheap CPU compiles: the numbers checked here do not depend on XLA's optimisation level.
FAST = dict(compiler_options={"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})


@pytest.fixture(scope="module")
def fns():
  return dict(apply=jax.jit(U.apply_unet, static_argnums=0, **FAST),
              encode=jax.jit(U.unet_encode, static_argnums=0, **FAST),
              decode=jax.jit(U.unet_decode, static_argnums=0, **FAST))


@pytest.fixture(scope="module")
def model():
  return U.init_unet(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def inputs():
  kx, kc = jax.random.split(jax.random.key(1))
  x = jax.random.normal(kx, (B, 8, 8, 3))
  t = jnp.array([3.25, 517.0])  # fractional timestep on purpose
  c = jax.random.normal(kc, (B, L, 8))
  return x, t, c


def _with_random_lora_b(params, key):
  """Same state with every adapter B drawn N(0, 0.1^2) (so LoRA is active)."""
  pure = nnx.to_pure_dict(params)
  keys = iter(jax.random.split(key, 1000))

  def visit(node):
    if not isinstance(node, dict):
      return node
    node = {k: visit(v) for k, v in node.items()}
    if "lora_b" in node:
      node["lora_b"] = 0.1 * jax.random.normal(next(keys), node["lora_b"].shape)
    return node

  out = jax.tree.map(lambda x: x, params)
  nnx.replace_by_pure_dict(out, visit(pure))
  return out


def test_shape_dtype_and_encode_decode_split(fns, model, inputs):
  g, p = model
  x, t, c = inputs
  y = fns["apply"](g, p, x, t, c)
  assert y.shape == (B, 8, 8, 3) and y.dtype == jnp.float32
  assert np.all(np.isfinite(y))
  h, skips = fns["encode"](g, p, x, t, c)
  assert h.shape == (B, 4, 4, 8)
  # conv_in, 1 block + downsample at level 0, 1 block at level 1.
  assert [s.shape[1:] for s in skips] == [(8, 8, 8), (8, 8, 8), (4, 4, 8), (4, 4, 8)]
  np.testing.assert_array_equal(fns["decode"](g, p, h, skips, t, c), y)
  # The decoder really uses its own timestep (encoder propagation relies on it).
  y2 = fns["decode"](g, p, h, skips, t + 100.0, c)
  assert np.max(np.abs(y2 - y)) > 1e-4


def test_zero_lora_equals_base_and_merge_matches_patched(fns, model, inputs):
  g, p = model
  x, t, c = inputs
  g0, p0 = U.init_unet(BASE_CFG, jax.random.key(0))
  _, lora, base = nnx.split(nnx.merge(g, p), U.LoRAParam, nnx.Param)
  # 4 AttnBlocks (down 4x4, mid, 2 x up 4x4) x 10 LoRALinear (q, k, v, out twice, proj
  # in/out) x (A, B).
  assert len(jax.tree.leaves(lora)) == 4 * 10 * 2
  # Adapters draw from their own stream: base weights equal the rank-0 model's.
  jax.tree.map(np.testing.assert_array_equal, base, p0)
  y = fns["apply"](g, p, x, t, c)
  np.testing.assert_allclose(fns["apply"](g0, p0, x, t, c), y, rtol=0, atol=1e-6)

  patched = _with_random_lora_b(p, jax.random.key(2))
  y_patched = fns["apply"](g, patched, x, t, c)
  assert np.max(np.abs(y_patched - y)) > 1e-3  # the adapters do something
  merged = U.merge_lora(patched, CFG)
  for leaf in jax.tree.leaves(nnx.split(nnx.merge(g, merged), U.LoRAParam, ...)[1]):
    if leaf.shape[0] == CFG.lora_rank:  # B matrices are [r, out]
      np.testing.assert_array_equal(leaf, 0.0)
  np.testing.assert_allclose(fns["apply"](g, merged, x, t, c), y_patched, rtol=0, atol=1e-5)


def test_time_embedding_matches_numpy():
  t = np.array([0.0, 1.5, 999.0, 12.75], np.float32)
  dim = 10
  freqs = np.array([10000.0 ** (-j / 5) for j in range(5)])
  ref = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=1)
  np.testing.assert_allclose(U.timestep_embedding(jnp.asarray(t), dim), ref, atol=2e-4)
  assert math.isclose(float(U.timestep_embedding(jnp.array([0.0]), 4)[0, 0]), 1.0)


def test_output_depends_on_prompt(fns, model, inputs):
  g, p = model
  x, t, c = inputs
  y = fns["apply"](g, p, x, t, c)
  y2 = fns["apply"](g, p, x, t, c.at[1].multiply(-1.0))
  np.testing.assert_array_equal(y2[0], y[0])  # rows are independent
  assert np.max(np.abs(y2[1] - y[1])) > 1e-4


def test_integer_prompts_use_token_front_end():
  # Same shapes as CFG plus the token tables, so eager init reuses cached kernels.
  cfg = U.UNetConfig(**{**BASE_CFG.__dict__, "vocab_size": 5, "max_prompt_len": 4})
  g, p = U.init_unet(cfg, jax.random.key(3))
  tokens = np.array([[1, 2, 0], [4, 2, 3]])
  ref = (np.asarray(p["token_embed"]["embedding"][...])[tokens]
         + np.asarray(p["pos_embed"]["embedding"][...])[None, :3])
  np.testing.assert_allclose(nnx.merge(g, p).embed_context(jnp.asarray(tokens)), ref,
                             atol=1e-6)
  with pytest.raises(ValueError, match="max_prompt_len"):
    nnx.merge(g, p).embed_context(jnp.zeros((2, 5), jnp.int32))


def test_attention_block_is_permutation_equivariant(model):
  g, p = model
  # The mid block's AttnBlock (width 8), alone.
  gb, pb = nnx.split(nnx.merge(g, p).mid_attn)
  block = jax.jit(lambda h, ctx: nnx.merge(gb, pb)(h, ctx), **FAST)
  kh, kc, kp = jax.random.split(jax.random.key(6), 3)
  h = jax.random.normal(kh, (2, 4, 4, 8))
  ctx = jax.random.normal(kc, (2, 5, 8))
  perm = np.asarray(jax.random.permutation(kp, 16))
  permute = lambda a: a.reshape(2, 16, 8)[:, perm].reshape(2, 4, 4, 8)
  out = block(h, ctx)
  assert np.max(np.abs(permute(out) - out)) > 1e-3  # the permutation is not trivial
  np.testing.assert_allclose(block(permute(h), ctx), permute(out), atol=1e-5)
  # Cross-attention: the output depends on the context.
  assert np.max(np.abs(block(h, ctx + 1.0) - out)) > 1e-4


def test_training_step_lowers_denoising_loss(model, inputs):
  g, p = model
  x0, _, c = inputs
  eps = jax.random.normal(jax.random.key(7), x0.shape)
  t = jnp.array([100.0, 600.0])
  abar = jnp.array([0.9, 0.3])[:, None, None, None]
  xt = jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * eps
  opt = optax.adam(1e-3)

  def loss_fn(params):
    return jnp.mean((U.apply_unet(g, params, xt, t, c) - eps) ** 2)

  @jax.jit(**FAST)
  def train(params):
    def step(carry, _):
      params, state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, state = opt.update(grads, state, params)
      return (optax.apply_updates(params, updates), state), loss
    _, losses = jax.lax.scan(step, (params, opt.init(params)), length=6)
    return losses

  losses = np.asarray(train(p))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("field,kwargs", [
    ("image_size", dict(image_size=10, channel_mult=(1, 2, 4))),
    ("attention_resolutions", dict(attention_resolutions=(5,))),
    ("num_groups", dict(num_groups=7)),
    ("num_heads", dict(num_heads=3)),
    ("channel_mult", dict(channel_mult=())),
    ("lora_rank", dict(lora_rank=-1)),
    ("dtype", dict(dtype="float16")),
])
def test_bad_config_raises(field, kwargs):
  with pytest.raises(ValueError, match=field):
    U.UNetConfig(**kwargs)


def test_bad_inputs_raise(model, inputs):
  g, p = model
  x, t, c = inputs
  with pytest.raises(ValueError, match="x must be"):
    U.apply_unet(g, p, x[:, :4], t, c)
  with pytest.raises(ValueError, match="t must be"):
    U.apply_unet(g, p, x, t[:1], c)
  with pytest.raises(ValueError, match="context"):
    U.apply_unet(g, p, x, t, c[..., :3])
  with pytest.raises(ValueError, match="vocab_size"):
    U.apply_unet(g, p, x, t, jnp.zeros((B, L), jnp.int32))


def test_random_unet_matches_init_structure_and_statistics(model):
  """The NumPy initialiser gives the same tree (shapes, dtypes) as `init_unet`, kernels with
  variance 1/fan_in, unit norm scales and identity adapters (lora_b = 0)."""
  graphdef, params = U.random_unet(CFG, seed=0)
  ref_graphdef, ref = model
  assert graphdef == ref_graphdef
  flat = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(params))[0])
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(ref))[0])
  assert flat.keys() == flat_ref.keys()
  kernels = []
  for path, leaf in flat.items():
    assert leaf.shape == flat_ref[path].shape and leaf.dtype == flat_ref[path].dtype
    name = path[-1].key
    if name == "lora_b":
      assert not np.any(np.asarray(leaf))
    elif name == "kernel":
      kernels.append(np.asarray(leaf).reshape(-1, leaf.shape[-1]) * math.sqrt(
          np.prod(leaf.shape[:-1])))
    elif name == "scale":
      assert abs(float(np.mean(leaf)) - 1.0) < 0.2
  z = np.concatenate([k.ravel() for k in kernels])
  assert abs(z.std() - 1.0) < 0.05 and abs(z.mean()) < 0.05
  # Deterministic in the seed, different across seeds.
  again = nnx.to_pure_dict(U.random_unet(CFG, seed=0)[1])
  other = nnx.to_pure_dict(U.random_unet(CFG, seed=1)[1])
  same = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                      nnx.to_pure_dict(params), again))
  diff = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                                      nnx.to_pure_dict(params), other))
  assert all(same) and not all(diff)
