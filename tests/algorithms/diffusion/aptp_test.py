"""Oracle tests of APTP: Sinkhorn (single and sharded), gates, parameter masks vs sliced
references, analytic MACs vs a hand count, losses, routing, gradient paths, config checks."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxrepro.algorithms.diffusion import aptp
from jaxrepro.algorithms.diffusion import aptp_gates as ag
from jaxrepro.models import unet as U

FAST = dict(compiler_options={"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})
# Tiny UNet: one level (8x8), mid attention with 2 heads, 4 GroupNorm groups.
CFG = U.UNetConfig(image_size=8, channels=8, channel_mult=(1,), num_heads=2, time_embed_dim=16,
                   context_dim=8, num_groups=4, vocab_size=10, max_prompt_len=3)
L = 3


@pytest.fixture(scope="module")
def model():
  graphdef, params = U.random_unet(CFG, 0)
  return graphdef, params, ag.make_structure(CFG, L)


def _np_sinkhorn(scores, eps, iters):
  # Independent float64 reference of SwAV's Sinkhorn-Knopp (K x B orientation).
  q = np.exp(np.asarray(scores, np.float64) / eps).T
  k, b = q.shape
  q /= q.sum()
  for _ in range(iters):
    q /= q.sum(axis=1, keepdims=True)
    q /= k
    q /= q.sum(axis=0, keepdims=True)
    q /= b
  return (q * b).T


# ------------------------------------------------------------------------------- sinkhorn


def test_sinkhorn_matches_reference_rows_sum_to_one_and_balances_codes():
  scores = jax.random.uniform(jax.random.key(0), (32, 4), minval=-1, maxval=1)
  q = np.asarray(jax.jit(lambda s: aptp.sinkhorn(s, epsilon=0.05, iterations=3))(scores))
  np.testing.assert_allclose(q, _np_sinkhorn(scores, 0.05, 3), rtol=2e-4, atol=1e-6)
  np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)
  # Code marginals approach B / K: closer after 3 rounds than the raw softmax's, and exact
  # (to float32) after many rounds at a milder temperature.
  soft = np.asarray(jax.nn.softmax(scores / 0.05, axis=1)).sum(axis=0)
  assert np.abs(q.sum(axis=0) - 8).max() < np.abs(soft - 8).max()
  q_many = np.asarray(aptp.sinkhorn(scores, epsilon=0.3, iterations=100))
  np.testing.assert_allclose(q_many.sum(axis=0), 32 / 4, rtol=1e-4)


def test_sinkhorn_constant_scores_give_uniform_assignment():
  q = np.asarray(aptp.sinkhorn(jnp.full((6, 3), 0.7)))
  np.testing.assert_allclose(q, 1.0 / 3, rtol=1e-6)


def test_sinkhorn_rebalances_a_collapsed_argmax():
  # Every sample prefers code 0 a little: argmax collapses, Sinkhorn spreads the batch.
  scores = np.zeros((16, 4), np.float32)
  scores[:, 0] = 0.2
  scores += 0.05 * np.random.default_rng(0).normal(size=scores.shape)
  assert np.all(np.argmax(scores, axis=1) == 0)
  idx = np.argmax(np.asarray(aptp.sinkhorn(jnp.asarray(scores))), axis=1)
  assert np.bincount(idx, minlength=4).max() <= 8


def test_sharded_sinkhorn_equals_single_device():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  scores = jax.random.normal(jax.random.key(1), (32, 4))
  single = aptp.sinkhorn(scores)
  sharded = aptp.sinkhorn_sharded(scores, mesh, "data")
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match="divisible"):
    aptp.sinkhorn_sharded(scores[:30], mesh, "data")
  with pytest.raises(ValueError, match=r"\[B, K\]"):
    aptp.sinkhorn(scores[0])


# ----------------------------------------------------------------------------------- gates


def test_gumbel_sigmoid_is_deterministic_and_hard_concrete_is_binary(model):
  _, _, st = model
  logits = jax.random.normal(jax.random.key(2), (5, st.num_gates)) * 3
  a = aptp.gumbel_sigmoid(logits, jax.random.key(7), structure=st)
  b = aptp.gumbel_sigmoid(logits, jax.random.key(7), structure=st)
  c = aptp.gumbel_sigmoid(logits, jax.random.key(8), structure=st)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  h = np.asarray(aptp.hard_concrete(a))
  assert set(np.unique(h)) <= {0.0, 1.0}
  # Straight-through: the gradient of sum(hard_concrete(s)) w.r.t. s is 1.
  g = jax.grad(lambda s: jnp.sum(aptp.hard_concrete(s)))(a)
  np.testing.assert_array_equal(np.asarray(g), 1.0)
  with pytest.raises(ValueError, match="temperature"):
    aptp.gumbel_sigmoid(logits, jax.random.key(0), temperature=0.0)


def test_width_sets_are_forced_non_zero(model):
  _, _, st = model
  s = aptp.gumbel_sigmoid(jnp.full((3, st.num_gates), -50.0), jax.random.key(0),
                          structure=st)
  h = np.asarray(aptp.hard_concrete(s))
  for gs in st.gate_sets:
    assert np.all(h[:, gs.offset:gs.offset + gs.size].sum(axis=1) >= 1)
  assert np.all(h[:, st.num_width:] == 0)  # depth gates may switch a block off


def test_all_gates_on_is_exactly_the_dense_unet(model):
  graphdef, params, st = model
  gated = jax.jit(lambda p: ag.gate_params(st, p, jnp.ones(st.num_gates)), **FAST)(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(gated)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="mask must have shape"):
    ag.gate_params(st, params, jnp.ones(st.num_gates + 1))


def _inputs(b=2):
  kx, kt = jax.random.split(jax.random.key(3))
  x = jax.random.normal(kx, (b, 8, 8, 8))
  temb = jax.random.normal(kt, (b, CFG.temb_dim))
  return x, temb


def _gn(x, scale, bias, groups, eps=1e-6):
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  var = xg.var(axis=(1, 2, 4), keepdims=True)
  return ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias


def _conv(x, w, b):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + b


def test_resblock_group_gate_equals_sliced_block(model):
  graphdef, params, st = model
  blk = st.blocks[[b.path for b in st.blocks].index(("mid_res1",))]
  gs = next(s for s in st.gate_sets if s.block == st.blocks.index(blk))
  mask = np.ones(st.num_gates, np.float32)
  mask[gs.offset + 1] = 0.0  # prune GroupNorm group 1 (channels 2, 3)
  mask[gs.offset + 3] = 0.0  # and group 3 (channels 6, 7)
  x, temb = _inputs()
  res = jax.jit(lambda p, m: nnx.merge(graphdef, ag.gate_params(st, p, m)).mid_res1(x, temb),
                **FAST)
  got = res(params, jnp.asarray(mask))
  # Reference: the channels of groups 1 and 3 sliced out of conv1, time_proj, norm2, conv2.
  p = nnx.to_pure_dict(params)["mid_res1"]
  keep = np.array([0, 1, 4, 5])
  y = _conv(jax.nn.silu(_gn(x, p["norm1"]["scale"], p["norm1"]["bias"], 4)),
            p["conv1"]["kernel"][..., keep], p["conv1"]["bias"][keep])
  y = y + (jax.nn.silu(temb) @ p["time_proj"]["kernel"][:, keep]
           + p["time_proj"]["bias"][keep])[:, None, None]
  y = jax.nn.silu(_gn(y, p["norm2"]["scale"][keep], p["norm2"]["bias"][keep], 2))
  want = x + _conv(y, p["conv2"]["kernel"][:, :, keep], p["conv2"]["bias"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  # The depth gate removes the residual branch: ResBlock(h) = h (equal widths).
  mask[blk.depth_index] = 0.0
  np.testing.assert_allclose(np.asarray(res(params, jnp.asarray(mask))), np.asarray(x),
                             atol=1e-6)


def test_head_ffn_and_depth_gates_of_the_attention_block(model):
  graphdef, params, st = model
  b = [blk.path for blk in st.blocks].index(("mid_attn",))
  sets = {s.kind: s for s in st.gate_sets if s.block == b}
  mask = np.ones(st.num_gates, np.float32)
  mask[sets["self_heads"].offset + 1] = 0.0
  mask[sets["cross_heads"].offset + 0] = 0.0
  mask[sets["ffn"].offset + 2] = 0.0
  x, _ = _inputs()
  ctx = jax.random.normal(jax.random.key(4), (2, L, 8))
  attn = jax.jit(lambda p, m: nnx.merge(graphdef, ag.gate_params(st, p, m)).mid_attn(x, ctx),
                 **FAST)
  got = attn(params, jnp.asarray(mask))
  # Reference by another parameterisation: a pruned head's values are zero (zero its W_v
  # columns), a pruned FFN unit's pre-activation is zero (gelu(0) = 0).
  pure = nnx.to_pure_dict(params)
  a = pure["mid_attn"]
  dh, unit = sets["self_heads"].unit, sets["ffn"].unit
  a["self_attn"]["value"]["base"]["kernel"] = (
      a["self_attn"]["value"]["base"]["kernel"].at[:, dh:2 * dh].set(0.0))
  a["cross_attn"]["value"]["base"]["kernel"] = (
      a["cross_attn"]["value"]["base"]["kernel"].at[:, :dh].set(0.0))
  a["mlp_up"]["kernel"] = a["mlp_up"]["kernel"].at[:, 2 * unit:3 * unit].set(0.0)
  a["mlp_up"]["bias"] = a["mlp_up"]["bias"].at[2 * unit:3 * unit].set(0.0)
  ref = jax.tree.map(lambda v: v, params)
  nnx.replace_by_pure_dict(ref, pure)
  want = attn(ref, jnp.ones(st.num_gates))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
  mask[st.blocks[b].depth_index] = 0.0
  np.testing.assert_allclose(np.asarray(attn(params, jnp.asarray(mask))), np.asarray(x),
                             atol=1e-6)


def test_macs_match_a_hand_count(model):
  _, _, st = model
  # Hand count for CFG (8x8, width 8, temb 16, 2 heads of 4, L = 3, context 8).
  res_in8 = 9 * 64 * 8 * 8 + 16 * 8 + 9 * 64 * 8 * 8  # conv1 + time_proj + conv2
  res_in16 = 9 * 64 * 16 * 8 + 16 * 8 + 9 * 64 * 8 * 8
  proj = 2 * 64 * 8 * 8
  self_attn = 3 * 64 * 8 * 8 + 2 * 64 * 64 * 8 + 64 * 8 * 8
  cross_attn = 64 * 8 * 8 + 2 * 3 * 8 * 8 + 2 * 64 * 3 * 8 + 64 * 8 * 8
  ffn = 2 * 64 * 8 * 32
  # down res, mid res1, mid res2 (in 8), up res x2 (in 16), mid attention.
  prunable = 3 * res_in8 + 2 * res_in16 + proj + self_attn + cross_attn + ffn
  fixed = (8 * 16 + 16 * 16) + 2 * 9 * 64 * 3 * 8 + 2 * 64 * 16 * 8  # time, in/out, skips
  assert st.full_prunable_macs == prunable
  assert st.fixed_macs == fixed
  assert st.full_macs == prunable + fixed
  np.testing.assert_allclose(float(ag.resource_ratio(st, jnp.ones(st.num_gates))), 1.0)
  np.testing.assert_allclose(float(ag.resource_ratio(st, jnp.zeros(st.num_gates))), 0.0)
  # One self-attention head and one ResBlock group off; then the attention block off.
  b = [blk.path for blk in st.blocks].index(("mid_attn",))
  heads = next(s for s in st.gate_sets if s.block == b and s.kind == "self_heads")
  res = st.gate_sets[0]
  mask = np.ones(st.num_gates, np.float32)
  mask[heads.offset] = 0.0
  mask[res.offset] = 0.0
  want = prunable - self_attn / 2 - res_in8 / 4
  np.testing.assert_allclose(float(ag.prunable_macs(st, jnp.asarray(mask))), want, rtol=1e-6)
  mask[st.blocks[b].depth_index] = 0.0
  want -= proj + self_attn / 2 + cross_attn + ffn
  np.testing.assert_allclose(float(ag.prunable_macs(st, jnp.asarray(mask))), want, rtol=1e-6)
  with pytest.raises(ValueError, match="lora_rank"):
    ag.make_structure(dataclasses.replace(CFG, lora_rank=2), L)


# ---------------------------------------------------------------------------------- losses


def test_resource_loss_zero_at_target_and_symmetric_in_log_space():
  p = 0.6
  assert float(aptp.resource_loss(jnp.float32(p), p)) == 0.0
  for c in (1.1, 1.5, 1.6):
    np.testing.assert_allclose(float(aptp.resource_loss(jnp.float32(p * c), p)),
                               float(aptp.resource_loss(jnp.float32(p / c), p)), rtol=1e-5)
    assert float(aptp.resource_loss(jnp.float32(p * c), p)) > 0
  assert float(aptp.resource_loss(jnp.float32(0.7), p, "mae")) == pytest.approx(0.1)
  with pytest.raises(ValueError, match="kind"):
    aptp.resource_loss(jnp.float32(0.5), p, "l1")


def test_contrastive_loss_is_minimal_when_similarities_agree():
  emb = jax.random.normal(jax.random.key(5), (8, 6))
  target = jax.nn.softmax(aptp._l2n(emb) @ aptp._l2n(emb).T, axis=-1)
  entropy = float(-jnp.mean(jnp.sum(target * jnp.log(target), axis=-1)))
  np.testing.assert_allclose(float(aptp.contrastive_loss(emb, emb)), entropy, rtol=1e-5)
  for seed in range(5):
    other = jax.random.normal(jax.random.key(10 + seed), (8, 6))
    assert float(aptp.contrastive_loss(emb, other)) > entropy


# --------------------------------------------------------------------- routing and training


def test_routing_ignores_batch_position_and_gradient_paths(model):
  graphdef, params, st = model
  router_gd, p = aptp.init(jax.random.key(0), st, num_codes=3, embed_dim=10, hidden=8)
  # Push codes apart so routing is not all ties.
  p = p._replace(codes=p.codes * 40.0 - 1.0)
  tokens = jax.random.randint(jax.random.key(6), (6, L), 1, 10)
  emb = aptp.bag_of_words(tokens, 10)
  s = aptp.Settings()
  route = jax.jit(lambda q, e: aptp.route(st, router_gd, q, e, s), **FAST)
  idx, masks = route(p, emb)
  idx_rev, _ = route(p, emb[::-1])
  np.testing.assert_array_equal(np.asarray(idx), np.asarray(idx_rev)[::-1])
  assert masks.shape == (3, st.num_gates)

  x_t = jax.random.normal(jax.random.key(7), (6, 8, 8, 3))
  t = jnp.arange(6) * 100
  s0 = s._replace(contrastive_weight=0.0)

  @functools.partial(jax.jit, **FAST)
  def grads(q):
    teacher = U.apply_unet(graphdef, params, x_t, t, tokens)
    fn = lambda q: aptp.student_loss(st, router_gd, graphdef, params, s0, q, x_t, t, tokens,
                                     emb, teacher, jax.random.key(9))
    g_main = jax.grad(lambda q: fn(q)[0])(q)
    g_con = jax.grad(lambda q: fn(q)[1]["contrastive"])(q)
    return g_main, g_con

  g_main, g_con = grads(p)
  # Without the contrastive term the router gets no gradient; the codes do, and the
  # contrastive loss reaches the router.
  assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g_main.router))
  assert float(jnp.abs(g_main.codes).max()) > 0.0
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_con.router)) > 0.0
  assert float(jnp.abs(g_con.codes).max()) == 0.0


def test_gated_apply_matches_parameter_masks_per_sample(model):
  graphdef, params, st = model
  x = jax.random.normal(jax.random.key(11), (3, 8, 8, 3))
  t = jnp.array([5, 500, 900])
  tokens = jnp.array([[1, 2, 3], [4, 5, 0], [7, 0, 0]])
  masks = (jax.random.uniform(jax.random.key(12), (3, st.num_gates)) > 0.4).astype(jnp.float32)
  got = jax.jit(lambda p, m: ag.gated_apply(st, graphdef, p, x, t, tokens, m), **FAST)(
      params, masks)
  one = jax.jit(lambda p, m, i: U.apply_unet(graphdef, ag.gate_params(st, p, m),
                                              x[i][None], t[i][None], tokens[i][None]), **FAST)
  for i in range(3):
    np.testing.assert_allclose(np.asarray(got[i]), np.asarray(one(params, masks[i], i)[0]),
                               atol=1e-5)
  dense = jax.jit(lambda p: U.apply_unet(graphdef, p, x, t, tokens), **FAST)(params)
  ones = jax.jit(lambda p: ag.gated_apply(st, graphdef, p, x, t, tokens,
                                          jnp.ones((3, st.num_gates))), **FAST)(params)
  np.testing.assert_allclose(np.asarray(ones), np.asarray(dense), atol=1e-6)
  with pytest.raises(ValueError, match="rows for a batch"):
    ag.gated_apply(st, graphdef, params, x, t, tokens, masks[:2])


def test_static_mode_routes_everything_to_code_zero(model):
  _, _, st = model
  gates = jax.random.uniform(jax.random.key(8), (5, st.num_gates))
  codes = jax.random.uniform(jax.random.key(9), (3, st.num_gates))
  a = aptp.assign(st, gates, codes, mode=jnp.int32(aptp.ROUTE_STATIC))
  np.testing.assert_array_equal(np.asarray(a.index), 0)
  b = aptp.assign(st, gates, codes, mode=jnp.int32(aptp.ROUTE_ARGMAX))
  c = aptp.assign(st, gates, codes, optimal_transport=False)
  np.testing.assert_array_equal(np.asarray(b.index), np.asarray(c.index))


def test_config_checks():
  from jaxrepro.configs import aptp as config_lib
  from jaxrepro.configs.common import ConfigError
  from jaxrepro.launch.experiments import aptp as driver
  config = config_lib.get_config("smoke")
  driver.check_config(config)
  config.aptp.loss_weights.commit = 0.25
  with pytest.raises(ConfigError, match="commit"):
    driver.check_config(config)
  config = config_lib.get_config("demo")
  config.aptp.num_codes = 1
  with pytest.raises(ConfigError, match="num_codes"):
    driver.check_config(config)
