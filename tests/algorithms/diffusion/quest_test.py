"""Oracle tests of QuEST's time-wise quantizers and selective fine-tuning (card section 12.5).

Oracles: the time-wise model with all steps equal is the per-tensor PTQ model bit for bit;
each per-timestep step is the per-tensor MSE search on that timestep's inputs alone; frozen
values stay bit-identical under `optax.multi_transform` fine-tuning while the selected ones
move; trained weights stay on their quantization grid. (Grid, idempotence, 16-bit, STE and
MSE-search oracles of the quantizer itself are in `fake_quant_test.py`.)
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxrepro.algorithms.diffusion import fake_quant as fq
from jaxrepro.algorithms.diffusion import ptq4dm, quest, samplers
from jaxrepro.configs import quest as quest_config
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch.experiments import quest as quest_exp
from jaxrepro.models import unet

# Cheap CPU compiles: the properties checked here do not depend on XLA's optimisation level.
FAST = dict(compiler_options={"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True})
S, PER, K, STEP = 3, 4, 10, 0.05
L1, L2 = quest.STAGE1_LAYERS["time_mlp"], quest.STAGE2_LAYERS["ldm_cond"]


@pytest.fixture(scope="module")
def setup():
  cfg = unet.UNetConfig(channels=16, channel_mult=(1,), vocab_size=16, max_prompt_len=4)
  graphdef, params = unet.random_unet(cfg, 0)
  grid = jnp.array([901, 501, 101], jnp.int32)
  key = jax.random.key(0)
  # Timestep-major calibration set whose input scale grows with t, so tables differ.
  t = jnp.repeat(grid, PER)
  x = jax.random.normal(key, (S * PER, 16, 16, 3)) * (1.0 + t / 300.0)[:, None, None, None]
  calib = ptq4dm.CalibSet(x, t, jnp.zeros((S * PER, 4), jnp.int32))
  # Min-max baseline (one calibration pass, a cheaper compile); time-wise steps by MSE.
  qg, qs = ptq4dm.quantize_unet(graphdef, params, calib, w_bits=4, a_bits=4, batch_size=PER,
                                method="minmax", num_candidates=K, step=STEP)
  tied = fq.to_timewise(qg, qs, S)
  tw = quest.calibrate_timewise(*tied, calib, grid, batch_size=PER)
  mk = lambda g, s: quest.make_finetunable(g, s, params, w_bits=4, timesteps=grid,
                                           layers=L1 + L2, method="minmax")
  return dict(graphdef=graphdef, params=params, grid=grid, calib=calib, qg=qg, qs=qs,
              tied=mk(*tied), tw=mk(*tw), tw_model=tw)


@functools.partial(jax.jit, static_argnames="spec", **FAST)
def _forward(spec, p, rest, w_scales, timewise, x, t, cond):
  return quest.make_model_fn(spec, p, rest, w_scales, timewise)(x, t, cond)


def _apply(spec, p, rest, w_scales, calib, timewise=True):
  return _forward(spec, p, rest, w_scales, jnp.asarray(timewise), calib.x, calib.t, calib.cond)


def test_equal_steps_and_float_kernels_reproduce_ptq_exactly(setup):
  c = setup["calib"]
  ptq = jax.jit(lambda s: unet.apply_unet(setup["qg"], s, c.x, c.t, c.cond), **FAST)(
      setup["qs"])
  spec, p, rest, w_scales = setup["tied"]
  # Tables of equal steps: the time-wise model is the per-tensor one, whatever the index;
  # the trainable kernels, stored in float and fake-quantized on the fly, give the PTQ ones.
  np.testing.assert_array_equal(_apply(spec, p, rest, w_scales, c, True), ptq)
  np.testing.assert_array_equal(_apply(spec, p, rest, w_scales, c, False), ptq)
  assert len(spec.w_paths) == sum(quest._matches(path, L1 + L2) for path in spec.w_paths)
  # Per-timestep tables change the function, and reduce the error to the float model here.
  spec2, p2, rest2, _ = setup["tw"]
  assert spec2 == spec
  y_tw = _apply(spec2, p2, rest2, w_scales, c)
  fp = unet.apply_unet(setup["graphdef"], setup["params"], c.x, c.t, c.cond)
  assert not np.array_equal(y_tw, ptq)
  assert float(jnp.mean((y_tw - fp) ** 2)) < float(jnp.mean((ptq - fp) ** 2))


def test_per_timestep_steps_are_subset_mse_optima(setup):
  c = setup["calib"]
  conv_in = nnx.merge(*setup["tw_model"]).conv_in
  assert isinstance(conv_in, fq.TimewiseActQuant) and conv_in.bits == 8
  # conv_in's input is x itself: step j is the per-tensor MSE search on timestep j's x.
  for j in range(S):
    ref, _ = fq.quant_params(c.x[j * PER:(j + 1) * PER], bits=8, method="mse",
                             num_candidates=K, step=STEP)
    np.testing.assert_allclose(float(conv_in.scale[...][j]), float(ref), rtol=1e-5)


def test_labels_select_the_card_groups(setup):
  spec, p, _, _ = setup["tw"]
  lab1 = dict(fq.leaf_paths(quest.labels(p, "stage1", L1, L2)))
  lab2 = dict(fq.leaf_paths(quest.labels(p, "stage2", L1, L2)))
  time_names = {"time_in", "time_out", "time_proj"}
  for path, lab in lab1.items():
    in_time = bool(time_names & set(path))
    expect = ("weight" if path[-1] in ("kernel", "bias") else "delta"
              if path[-1] == "scale" and "inner" in quest._get(p, path[:-1]) else "frozen")
    assert lab == (expect if in_time else "frozen"), path
  w2 = {path for path, lab in lab2.items() if lab == "weight"}
  kernels = [path for path in w2 if path[-1] == "kernel"]
  assert all(quest._matches(path, L2) for path in w2)
  for piece in L2:  # every sensitive layer kind is selected, cross-attention k/v are not
    assert any(quest._matches(path, (piece,)) for path in kernels), piece
  assert not any(quest._matches(path, (("cross_attn", "key"),)) for path in w2)
  assert not any(time_names & set(path) for path in w2)
  d2 = {path for path, lab in lab2.items() if lab == "delta"}
  # Stage 2: every activation step table outside the time-embedding layers.
  n_act = sum(1 for path, _ in fq.leaf_paths(p) if path[-1] == "zero_point")
  n_time = sum(1 for path, _ in fq.leaf_paths(p) if path[-1] == "zero_point"
               and time_names & set(path))
  assert len(d2) == n_act - n_time and all(path[-1] == "scale" for path in d2)
  assert all(lab == "frozen" for path, lab in lab2.items() if path[-1] == "zero_point")
  counts = quest.count_trained(p, [quest.labels(p, s, L1, L2) for s in quest.STAGES])
  assert counts["delta"] == S * n_act and counts["total"] == counts["weight"] + counts["delta"]


def test_selective_finetuning_freezes_everything_else_bit_identically(setup):
  # Stage 1 (its loss has both terms); stage 2 differs only in its labels, tested above.
  stage = "stage1"
  spec, p, rest, w_scales = setup["tw"]
  c = setup["calib"]
  lab = quest.labels(p, stage, L1, L2)
  tx = quest.optimizer(lab, 1e-3, 1e-3)
  model = nnx.merge(setup["graphdef"], setup["params"])
  sl = slice(0, PER)
  batch = dict(x=c.x[sl], t=c.t[sl], cond=c.cond[sl],
               eps=model(c.x[sl], c.t[sl], c.cond[sl]),
               emb=quest.time_embedding_outputs(model, c.t[sl]))

  @functools.partial(jax.jit, **FAST)
  def step(p, opt):
    (loss, _), g = jax.value_and_grad(
        lambda q: quest.stage_loss(spec, q, rest, w_scales, batch, stage), has_aux=True)(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, loss

  p1, opt = p, tx.init(p)
  losses = []
  for _ in range(3):
    p1, opt, loss = step(p1, opt)
    losses.append(float(loss))
  moved = {"weight": 0, "delta": 0}
  for path, label in fq.leaf_paths(lab):
    before, after = np.asarray(quest._get(p, path)), np.asarray(quest._get(p1, path))
    if label == "frozen":
      np.testing.assert_array_equal(after, before, err_msg=str(path))
    else:
      moved[label] += not np.array_equal(after, before)
  assert moved["weight"] > 0 and moved["delta"] > 0
  assert all(np.isfinite(losses))
  # Trained weights stay on their per-channel grid in the forward pass.
  qw = quest.quantized_weights(spec, p1, w_scales)
  for path, s in zip(spec.w_paths, w_scales):
    k = np.asarray(quest._get(qw, path)) / np.asarray(s)
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert np.abs(k).max() <= 8


def test_trajectory_calibration_is_timestep_major():
  traj = samplers.Trajectory(jnp.arange(3 * 2 * 4.0).reshape(3, 2, 4), jnp.array([9, 5, 1]),
                             None)
  calib = quest.trajectory_calibration(traj, jnp.array([[7], [8]]))
  np.testing.assert_array_equal(calib.t, [9, 9, 5, 5, 1, 1])
  np.testing.assert_array_equal(calib.x[3], traj.x[1, 1])
  np.testing.assert_array_equal(calib.cond[:, 0], [7, 8, 7, 8, 7, 8])


def test_bad_inputs_and_configs(setup):
  spec, p, _, _ = setup["tw"]
  with pytest.raises(ValueError, match="stage"):
    quest.labels(p, "stage3", L1, L2)
  with pytest.raises(ValueError, match="layers"):
    quest.make_finetunable(*setup["tw_model"], setup["params"], w_bits=4,
                           timesteps=setup["grid"], layers=(("no_such_layer",),))
  for variant in ("smoke", "demo", "paper"):
    quest_exp.check_config(quest_config.get_config(variant))
  config = quest_config.get_config("smoke")
  config.eval.eps_samples = 16
  with pytest.raises(ConfigError, match="eps_samples"):
    quest_exp.check_config(config)
  config = quest_config.get_config("smoke")
  config.q.a_bits = 1
  with pytest.raises(ConfigError, match="a_bits"):
    quest_exp.check_config(config)
