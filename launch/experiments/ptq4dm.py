"""Experiment driver for `ptq4dm` (library: `jaxrepro.algorithms.diffusion.ptq4dm`).

Quantizes the toy diffusion UNet (ToyT2I, used unconditionally with the empty prompt) after
training, with MSE-searched steps (weights per output channel, activations per tensor, first
and last layer at 8 bits), at each weight bit width of `q.w_bits` and `q.a_bits`-bit
activations, calibrating the activation steps on five calibration sets (`CALIB_SETS`). Each
quantized model is scored by its eps-prediction MSE to the float model along float DDIM
trajectories (teacher forced: both see the same states) and by the judge's KID and Frechet
distance of its own DDIM samples (same initial noise as the float model's) to real ToyShapes
images.
"""

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrepro.algorithms.diffusion import ptq4dm, samplers
from jaxrepro.algorithms.diffusion import schedules as sch
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, experiment, metric_writers, plotting
from jaxrepro.models import unet

PAPER = "ptq4dm"

# name -> (source of x, time-step mode, legacy index labels).
CALIB_SETS = {
    "a_forward_uniform": ("forward_t", "uniform", False),
    "b_backward_uniform": ("backward_t", "uniform", False),
    "c_backward_ndtc": ("backward_t", "normal", False),
    "single_t": ("backward_t", "single", False),
    "c_legacy_index": ("backward_t", "normal", True),
}

# Sets whose quantized models also generate samples for KID/FD (card claim (1)).
KID_SETS = ("a_forward_uniform", "b_backward_uniform", "c_backward_ndtc")

CLAIMS = (
    experiment.Claim(
        "w8a8_matches_fp_kid",
        "At W8A8 every calibration set (a, b, c) gives a sample KID within 5% of the float "
        "model's (max relative increase over the three sets)", "w8a8_kid_rel_increase_max",
        0.05, "<=",
        note="Card claim (1) with the toy judge's features in place of Inception; 256 samples "
        "per model from the same initial noise as the float model, so the KID difference is "
        "mostly the quantization's. A relative gap is fragile when the float KID is near 0."),
    experiment.Claim(
        "w8a8_matches_fp_fd",
        "At W8A8 every calibration set (a, b, c) gives a Frechet distance within 5% of the "
        "float model's (max relative increase)", "w8a8_fd_rel_increase_max", 0.05, "<=",
        note="The card's 5% margin applied to the judge's FD as well."),
    experiment.Claim(
        "w8a8_eps_close",
        "At W8A8 the eps-prediction MSE to the float model, along float DDIM trajectories, is "
        "at most 1% of the float prediction's mean square for every set (a, b, c)",
        "w8a8_eps_rel_mse_max", 0.01, "<=",
        note="Threshold fixed before measuring (the card states no eps margin at W8A8). "
        "Fails narrowly (0.0105, set (a); 0.0100 (b), 0.0099 (c)), while KID and FD at W8A8 "
        "are within the margins: weights are rounded to nearest (no block reconstruction)."),
    experiment.Claim(
        "w4a8_ndtc_beats_forward",
        "At W4A8 trajectory calibration with NDTC time steps (c) has at least 10% lower "
        "eps-MSE than forward-noised real images at uniform t (a): ratio (c)/(a)",
        "w4a8_eps_mse_ratio_c_over_a", 0.9, "<=",
        note="Card claim (2). Without block reconstruction the calibration set only sets "
        "the 8-bit activation steps (weights are rounded to nearest with data-free MSE "
        "steps), which limits how much the set can matter."),
    experiment.Claim(
        "w4a8_ndtc_beats_single_t",
        "At W4A8 NDTC calibration (c) has lower eps-MSE than calibrating every sample at one "
        "time step (index N // 2, the code's 'mean' mode): ratio (c)/(single)",
        "w4a8_eps_mse_ratio_c_over_single", 1.0, "<="),
    experiment.Claim(
        "legacy_index_hurts",
        "Reproducing the official code's index/time mislabelling of the trajectory states "
        "increases the W4A8 eps-MSE relative to correctly labelled NDTC (c): ratio "
        "legacy/(c)", "w4a8_eps_mse_ratio_legacy_over_c", 1.0, ">=",
        note="Card claim (3)."),
)


def _bits_list(config) -> list[int]:
  return common.comma_list(config.q.w_bits, int)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "sampler.num_steps", "calib.num_samples", "calib.batch_size",
                        "eval.num_samples", "eval.eps_samples", "eval.batch_size", "q.a_bits",
                        "q.num_candidates", "q.step", "calib.normal_std")
  bits = _bits_list(config)
  if 8 not in bits or 4 not in bits:
    raise ConfigError(f"config.q.w_bits={config.q.w_bits!r} must include 8 and 4 (the "
                      "claims compare W8A8 and W4A8)")
  if any(not 2 <= b <= 16 for b in bits + [config.q.a_bits]):
    raise ConfigError("config.q.w_bits and config.q.a_bits must lie in [2, 16]")
  for field in ("calib.num_samples", "eval.num_samples", "eval.eps_samples"):
    part = field.split(".")[0]
    if common.get_field(config, field) % config[part].batch_size:
      raise ConfigError(f"config.{part}.batch_size={config[part].batch_size} must divide "
                        f"config.{field}={common.get_field(config, field)}")
  if config.eval.eps_samples > config.eval.num_samples:
    raise ConfigError(f"config.eval.eps_samples={config.eval.eps_samples} must be <= "
                      f"config.eval.num_samples={config.eval.num_samples}")
  if (config.q.num_candidates - 1) * config.q.step >= 1:
    raise ConfigError(f"config.q.num_candidates={config.q.num_candidates} and config.q.step="
                      f"{config.q.step} give shrink factors <= 0 (need (K - 1) step < 1)")
  if config.sampler.num_steps > 1000:
    raise ConfigError(f"config.sampler.num_steps={config.sampler.num_steps} must be <= 1000")


# ----------------------------------------------------------------------------------- model


def load_model(config):
  """(graphdef, params, UNetConfig, alphas_cumprod, prompt length) of the float model."""
  if config.model.source == "toy_t2i":
    from jaxrepro.launch import toy_t2i  # the shipped stand-in (checkpoint in assets)
    from jaxrepro.launch.data import toy_shapes
    s = toy_t2i.load(config.model.root or None)
    params = unet.merge_lora(s.params, s.config) if s.config.lora_rank else s.params
    return s.graphdef, params, s.config, s.alphas_cumprod, toy_shapes.PROMPT_LEN
  cfg = unet.UNetConfig(channels=config.model.channels,
                        channel_mult=tuple(common.comma_list(config.model.channel_mult, int)),
                        vocab_size=16, max_prompt_len=4)
  graphdef, params = unet.random_unet(cfg, config.seed)
  return graphdef, params, cfg, sch.make_alphas_cumprod("linear", 1000), 4


# ----------------------------------------------------------------------- jitted programs


@functools.partial(jax.jit, static_argnames=("graphdef", "clip_x0"))
def _ddim_trajectory(graphdef, params, x_init, cond, alphas_cumprod, timesteps, clip_x0):
  fn = unet.make_model_fn(graphdef, params)
  return samplers.ddim(fn, x_init, cond, alphas_cumprod, timesteps, clip_x0=clip_x0,
                       return_trajectory=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "clip_x0"))
def _ddim(graphdef, params, x_init, cond, alphas_cumprod, timesteps, clip_x0):
  fn = unet.make_model_fn(graphdef, params)
  x = samplers.ddim(fn, x_init, cond, alphas_cumprod, timesteps, clip_x0=clip_x0)
  return jnp.clip(x, -1.0, 1.0)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eps_along(graphdef, params, traj_x, traj_t, cond):
  """The model's eps at every recorded state: [N, B, H, W, C]."""
  fn = unet.make_model_fn(graphdef, params)
  return jax.lax.map(lambda inp: fn(inp[0], jnp.full((inp[0].shape[0],), inp[1], jnp.int32),
                                    cond), (traj_x, traj_t))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _eps_errors(graphdef, params, traj_x, traj_t, cond, eps_ref):
  """Per-step sums of (eps - eps_ref)^2 over a trajectory chunk: [N]."""
  eps = _eps_along(graphdef, params, traj_x, traj_t, cond)
  return jnp.sum((eps - eps_ref) ** 2, axis=tuple(range(1, eps.ndim)))


def _chunks(n: int, size: int):
  return [slice(i, i + size) for i in range(0, n, size)]


# ------------------------------------------------------------------------------------ run


def build_calibration_sets(config, graphdef, params, alphas_cumprod, timesteps, null
                           ) -> dict[str, ptq4dm.CalibSet]:
  """The `CalibSet`s of `CALIB_SETS`; one float DDIM run serves every trajectory set.

  (a) uses real ToyShapes images of seed `calib.seed`; the trajectory sets use the float
  model's DDIM states from initial noise of that seed. All sets share the drawn time indices
  of their mode, so (c) and its legacy twin differ only in the labels/state selection.
  """
  from jaxrepro.launch.data import toy_shapes
  c = config.calib
  n, steps = c.num_samples, len(timesteps)
  key = jax.random.key(c.seed)
  k_t, k_noise, k_fwd = jax.random.split(key, 3)
  t_index = {mode: ptq4dm.generate_t(k_t, n, steps, mode, normal_mean=c.normal_mean,
                                     normal_std=c.normal_std) for mode in ptq4dm.T_MODES}
  cond = null(n)
  x_init = jax.random.normal(k_noise, (n, 16, 16, 3))
  finals, xs = [], []
  for sl in _chunks(n, config.calib.batch_size):
    x_final, traj = _ddim_trajectory(graphdef, params, x_init[sl], cond[sl], alphas_cumprod,
                                     timesteps, config.sampler.clip_x0)
    finals.append(x_final)
    xs.append(traj.x)
  traj = samplers.Trajectory(jnp.concatenate(xs, axis=1), jnp.asarray(timesteps), None)
  x_final = jnp.concatenate(finals)
  real = jnp.asarray(toy_shapes.sample(c.seed, n).images)
  out = {}
  for name, (source, t_mode, legacy) in CALIB_SETS.items():
    if source == "forward_t":
      out[name] = ptq4dm.forward_calibration(k_fwd, real, t_index[t_mode], timesteps,
                                             alphas_cumprod, cond)
    else:
      x, t = ptq4dm.select_from_trajectory(traj, x_final, t_index[t_mode],
                                           legacy_index=legacy)
      out[name] = ptq4dm.CalibSet(x, t, cond)
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from jaxrepro.algorithms.diffusion import metrics
  from jaxrepro.launch import toy_judge
  from jaxrepro.launch.data import toy_shapes

  start = time.perf_counter()
  graphdef, params, cfg, ac, prompt_len = load_model(config)
  if (cfg.image_size, cfg.in_channels) != (16, 3):
    raise ConfigError("ptq4dm's judge and data need a 16x16x3 UNet")
  null = lambda n: jnp.zeros((n, prompt_len), jnp.int32)  # the empty prompt: unconditional
  timesteps = jnp.asarray(sch.make_timesteps(config.sampler.num_steps, int(ac.shape[0])))
  clip = config.sampler.clip_x0
  judge = toy_judge.load()
  feats = lambda images: toy_judge.features(np.asarray(images), judge)

  # Float model: evaluation trajectories (teacher-forcing states) and samples.
  e = config.eval
  x_init = jax.random.normal(jax.random.key(e.seed), (e.num_samples, 16, 16, 3))
  cond = null(e.batch_size)
  chunks = _chunks(e.num_samples, e.batch_size)
  traj_fp, eps_fp, fp_samples = [], [], []
  for i, sl in enumerate(chunks):
    x_final, traj = _ddim_trajectory(graphdef, params, x_init[sl], cond, ac, timesteps, clip)
    fp_samples.append(jnp.clip(x_final, -1.0, 1.0))
    if i * e.batch_size < e.eps_samples:
      traj_fp.append(traj)
      # The float eps at every state, once: each quantized model is compared against it.
      eps_fp.append(_eps_along(graphdef, params, traj.x, traj.t, cond))
  ref_energy = sum(np.asarray(jnp.sum(e ** 2, axis=(1, 2, 3, 4))) for e in eps_fp)
  ref_feats = feats(toy_shapes.sample(e.reference_seed, e.num_samples).images)
  fp_feats = feats(jnp.concatenate(fp_samples))
  summary = {"kid/fp": metrics.kid(fp_feats, ref_feats),
             "fd/fp": metrics.frechet_distance(fp_feats, ref_feats)}
  calib_sets = build_calibration_sets(config, graphdef, params, ac, timesteps, null)
  summary["calib_ndtc_fraction_at_t0"] = float(jnp.mean(
      calib_sets["c_backward_ndtc"].t == int(timesteps[-1])))

  per_step = {}
  q = config.q
  for w_bits in _bits_list(config):
    tag = f"w{w_bits}a{q.a_bits}"
    for name, calib in calib_sets.items():
      qg, qs = ptq4dm.quantize_unet(
          graphdef, params, calib, w_bits=w_bits, a_bits=q.a_bits,
          batch_size=config.calib.batch_size, head_stem_bits=q.head_stem_bits,
          method=q.method, num_candidates=q.num_candidates, step=q.step)
      err = sum(np.asarray(_eps_errors(qg, qs, traj.x, traj.t, cond, e))
                for traj, e in zip(traj_fp, eps_fp))
      numel = e.eps_samples * 16 * 16 * 3
      per_step[(tag, name)] = err / numel
      summary[f"eps_mse/{tag}/{name}"] = float(err.sum() / (numel * len(timesteps)))
      summary[f"eps_rel_mse/{tag}/{name}"] = float(err.sum() / ref_energy.sum())
      if name in KID_SETS:  # sampling is the costly part: only the sets the claims use
        samples = jnp.concatenate([_ddim(qg, qs, x_init[sl], cond, ac, timesteps, clip)
                                   for sl in chunks])
        f = feats(samples)
        summary[f"kid/{tag}/{name}"] = metrics.kid(f, ref_feats)
        summary[f"fd/{tag}/{name}"] = metrics.frechet_distance(f, ref_feats)

  main_sets = KID_SETS
  w8, w4 = f"w8a{q.a_bits}", f"w4a{q.a_bits}"
  rel = lambda m, base: (m - base) / abs(base) if base else float("inf")
  summary["w8a8_kid_rel_increase_max"] = max(
      rel(summary[f"kid/{w8}/{s}"], summary["kid/fp"]) for s in main_sets)
  summary["w8a8_fd_rel_increase_max"] = max(
      rel(summary[f"fd/{w8}/{s}"], summary["fd/fp"]) for s in main_sets)
  summary["w8a8_eps_rel_mse_max"] = max(summary[f"eps_rel_mse/{w8}/{s}"] for s in main_sets)
  eps4 = lambda s: summary[f"eps_mse/{w4}/{s}"]
  summary["w4a8_eps_mse_ratio_c_over_a"] = eps4("c_backward_ndtc") / eps4("a_forward_uniform")
  summary["w4a8_eps_mse_ratio_c_over_single"] = eps4("c_backward_ndtc") / eps4("single_t")
  summary["w4a8_eps_mse_ratio_legacy_over_c"] = eps4("c_legacy_index") / eps4("c_backward_ndtc")
  summary["seconds"] = round(time.perf_counter() - start, 1)

  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(0, {f"final/{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    ts = [int(t) for t in np.asarray(timesteps)]
    plotting.line_plot(
        f"{workdir}/eps_mse_per_step.png",
        {f"{tag} {name}": (ts, list(v)) for (tag, name), v in per_step.items() if tag == w4},
        title=f"{w4}: eps-MSE to the float model along DDIM", xlabel="timestep t",
        ylabel="eps-MSE", markers=True)
  return summary


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Fake-quantized W8A8 UNet forward vs the float forward, per batch of 64 images.

  Fake quantization adds quantize-dequantize work on top of float compute (no integer
  kernels exist here), so the ratio is below 1 by design: it is the simulation's cost, not a
  deployment speed.
  """
  config = experiment.config_module(PAPER).get_config("demo")
  cfg = unet.UNetConfig(channels=config.model.channels,
                        channel_mult=tuple(common.comma_list(config.model.channel_mult, int)),
                        vocab_size=16, max_prompt_len=4)
  graphdef, params = unet.random_unet(cfg, 0)
  batch = 16 if quick else 64
  key = jax.random.key(0)
  x = jax.random.normal(key, (batch, 16, 16, 3))
  t = jnp.linspace(0, 999, batch).astype(jnp.int32)
  cond = jnp.zeros((batch, 4), jnp.int32)
  calib = ptq4dm.CalibSet(x, t, cond)
  qg, qs = ptq4dm.quantize_unet(graphdef, params, calib, w_bits=8, a_bits=8,
                                batch_size=batch, num_candidates=20, step=0.04)
  fp = jax.jit(lambda p: unet.apply_unet(graphdef, p, x, t, cond))
  fake = jax.jit(lambda p: unet.apply_unet(qg, p, x, t, cond))
  timing = benchmarking.interleaved({"fake": lambda: fake(qs), "fp": lambda: fp(params)},
                                    rounds=3 if quick else 7)
  return [benchmarking.time_row(
      PAPER, f"UNet forward, batch {batch}, 16x16x3, channels {cfg.channels}: fake-quant "
      "W8A8 vs float32", ("fake-quant W8A8", timing["fake"]), ("float32", timing["fp"]),
      note="ratio < 1 expected: simulated quantization adds work; integer kernels are not "
      "implemented, so no deployment speed-up is measured")]
