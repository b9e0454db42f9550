"""Experiment driver for `faster_diffusion` (library: `algorithms.diffusion.faster_diffusion`).

Encoder propagation is training-free, so nothing is trained here (no checkpoint to resume):
the driver loads the shipped toy text-to-image stand-in (`launch.toy_t2i`, the family's
"Stable Diffusion") and the toy judge (`launch.toy_judge`, its "CLIP + Inception"), then

1. samples the same prompts from the same initial noise with DDIM-N on the full UNet,
   DDIM-N with encoder propagation (key steps `fd.key_steps`, |K| encoder calls) and
   DDIM-|K| (the same number of encoder calls, each with its own decoder), all with
   classifier-free guidance, and scores them with the judge (prompt accuracy, FD, KID
   against real ToyShapes images);
2. measures, along the full sampler's trajectory, how much every encoder output (bottleneck
   and skips) and every decoder stage output changes between adjacent steps (the paper's
   motivating observation, its Fig. 3);
3. times the three jitted samplers side by side on one batch (compile excluded) and counts
   encoder/decoder calls and their FLOPs (XLA's cost analysis of one call each).
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrepro.algorithms.diffusion import faster_diffusion as fd
from jaxrepro.algorithms.diffusion import samplers as smp
from jaxrepro.algorithms.diffusion import schedules as sch
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, experiment, metric_writers, plotting
from jaxrepro.models import unet as unet_lib

PAPER = "faster_diffusion"
METHODS = ("ddim_full", "enc_prop", "ddim_few")

CLAIMS = (
    experiment.Claim(
        "encoder_calls_cut",
        "Encoder propagation on the paper's DDIM-50 key steps {0,1,2,3,5,10,15,25,35} "
        "evaluates the UNet encoder 9 times instead of 50 (exact count)",
        "encoder_calls/enc_prop", 9, "<=",
        note="Counted statically from the spans and checked at run time by a host-callback "
        "counter in the unit tests. The smoke config uses 10 steps with keys 0, 3, 6, 9."),
    experiment.Claim(
        "encoder_features_change_less",
        "Between adjacent DDIM-50 steps the median relative change ||f_k - f_{k-1}|| / "
        "||f_k|| of the decoder's stage outputs is at least 2x that of the encoder's outputs "
        "(bottleneck and skips)", "feature_change/decoder_over_encoder", 2.0, ">=",
        note="Card claim (a). Medians over steps, samples and tensors of the full guided "
        "sampler's trajectory (conditional prompts). Fails on the shipped stand-in (6000 "
        "training steps, 185k parameters; 2026-11-25): 1.16, encoder 0.021 vs decoder "
        "0.024 (1.24 on the earlier 700-step checkpoint). In this 2-level pixel-space UNet "
        "the skips are one conv away from x_t (the conv_in skip changes as much as the "
        "decoder's last stages), unlike SD's deep latent encoder; the decoder's first stage "
        "does change most (0.041 vs 0.016-0.039)."),
    experiment.Claim(
        "kid_within_25pct_of_full",
        "KID of encoder propagation is at most 25% above KID of the full DDIM-50 sampler "
        "(ratio KID(enc-prop) / KID(DDIM-50))", "kid_ratio/enc_prop_over_ddim_full", 1.25,
        "<=", note="Card claim (b). Judge features of the toy stand-in, same prompts and "
        "initial noise for all samplers; the paper reports FID/CLIP score on MS-COCO. Fails "
        "on the shipped stand-in (3.88; KID 2.8e4 vs 7.2e3, FD 1669 vs 868): encoder "
        "propagation lands farther from the full sampler's images (RMSE 0.27) than DDIM-9 "
        "(0.09). On the earlier 700-step checkpoint the ratio was 1.71, and 1.61 without "
        "the noise injection (other seeds), so the injection is not the cause: the stale "
        "encoder features over spans of up to 15 steps are, in a UNet whose encoder changes "
        "about as fast as its decoder (encoder_features_change_less)."),
    experiment.Claim(
        "kid_beats_ddim_few",
        "Encoder propagation has a lower KID than DDIM with as many steps as it has encoder "
        "calls (KID(DDIM-9) - KID(enc-prop) >= 0)", "kid_gap/ddim_few_minus_enc_prop", 0.0,
        ">=", note="Card claim (b), second half. Fails on the shipped stand-in: KID 6.1e3 "
        "(DDIM-9) vs 2.8e4 (encoder propagation); see kid_within_25pct_of_full."),
    experiment.Claim(
        "fd_within_25pct_of_full",
        "The judge's Frechet distance of encoder propagation is at most 25% above that of "
        "the full DDIM-50 sampler", "fd_ratio/enc_prop_over_ddim_full", 1.25, "<=",
        note="Our extension of the card's KID margin to FD. Fails on the shipped stand-in "
        "(1.92; 1.275 on the earlier 700-step checkpoint)."),
    experiment.Claim(
        "prompt_accuracy_kept",
        "The judge's prompt accuracy (all attributes right) of encoder propagation is at most "
        "0.05 below that of the full DDIM-50 sampler", "prompt_accuracy_drop/enc_prop", 0.05,
        "<=", note="Stands in for the paper's CLIP score; the 0.05 margin is ours. Weakly "
        "informative: the stand-in gets all attributes right for only ~2-3% of prompts with "
        "every sampler (colour accuracy 0.63 full vs 0.54 encoder propagation)."),
    experiment.Claim(
        "lower_wall_time",
        "The jitted encoder-propagation sampler is faster per batch than the jitted full "
        "DDIM-50 sampler (wall-clock ratio, compile excluded)",
        "wall_clock_speedup/enc_prop_vs_ddim_full", 1.0, ">=",
        note="Card claim (c). The tiny UNet's decoder costs more than its encoder (see "
        "flops/*), so the ideal gain is far below SD's 1.8x; `flops_speedup` gives the "
        "machine-independent ratio (1.44x at 37% encoder FLOPs; measured 1.14x on a loaded "
        "2-core CPU). CPU timings on a shared machine are noisy."),
)


# ------------------------------------------------------------------------------- config


def parse_key_rule(text: str) -> str | int:
  """The config's `fd.key_steps` string: a rule name, or digits for every m-th step."""
  text = str(text).strip()
  return int(text) if text.isdigit() else text


def key_steps(config) -> tuple[int, ...]:
  """The static key-step set of a config (ConfigError when the rule is invalid)."""
  try:
    return fd.key_steps(parse_key_rule(config.fd.key_steps), config.sampler.num_steps)
  except ValueError as e:
    raise ConfigError(f"config.fd.key_steps={config.fd.key_steps!r}: {e}") from None


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "sampler.num_steps", "eval.num_samples", "eval.num_reference",
                        "eval.batch_size", "features.num_samples", "timing.rounds")
  n = config.sampler.num_steps
  if n > 1000:
    raise ConfigError(f"config.sampler.num_steps={n} must be <= 1000 (the stand-in's T)")
  keys = key_steps(config)
  if len(keys) >= n:
    raise ConfigError(f"config.fd.key_steps={config.fd.key_steps!r} keys all {n} steps; "
                      "encoder propagation needs fewer keys than steps")
  e = config.eval
  if e.num_samples % e.batch_size:
    raise ConfigError(f"config.eval.num_samples={e.num_samples} must be a multiple of "
                      f"config.eval.batch_size={e.batch_size} (static batch shapes)")
  if e.num_samples < 2 or e.num_reference < 2:
    raise ConfigError("config.eval.num_samples and config.eval.num_reference must be >= 2 "
                      "(KID is an unbiased U-statistic)")
  if config.features.num_samples > e.batch_size:
    raise ConfigError(f"config.features.num_samples={config.features.num_samples} must be <= "
                      f"config.eval.batch_size={e.batch_size} (taken from the first batch)")
  if config.fd.noise_inject_alpha < 0 or not 0 <= config.fd.noise_inject_tfrac <= 1:
    raise ConfigError(f"config.fd.noise_inject_alpha={config.fd.noise_inject_alpha} must be "
                      f">= 0 and config.fd.noise_inject_tfrac={config.fd.noise_inject_tfrac} "
                      "in [0, 1]")
  if config.sampler.clip_x0 < 0:
    raise ConfigError(f"config.sampler.clip_x0={config.sampler.clip_x0} must be >= 0 "
                      "(0 disables clipping)")


# ----------------------------------------------------------------------------- samplers



def make_samplers(standin, config) -> dict:
  """Jitted `(params, tokens [B, L], x_init [B, 16, 16, 3]) -> images` for each method."""
  from jaxrepro.launch.data import toy_shapes
  g, ac = standin.graphdef, standin.alphas_cumprod
  t_max = int(ac.shape[0])
  n, spacing = config.sampler.num_steps, config.sampler.spacing
  keys = key_steps(config)
  ts = sch.make_timesteps(n, t_max, spacing)
  ts_few = sch.make_timesteps(len(keys), t_max, spacing)
  clip = config.sampler.clip_x0 or None
  scale = config.guidance.scale
  null = jnp.asarray(toy_shapes.null_tokens(1), jnp.int32)
  f = config.fd

  def plain(timesteps):
    # The baselines: the standard CFG wrapper around the full UNet (`samplers.cfg`).
    def run(params, tokens, x):
      guided = smp.cfg(unet_lib.make_model_fn(g, params), scale, null)
      return smp.ddim(guided, x, tokens, ac, timesteps, clip_x0=clip)
    return run

  def enc_prop(params, tokens, x):
    enc, dec = fd.guided(*fd.unet_fns(g, params), scale, null)
    return fd.sample(enc, dec, x, tokens, ac, ts, keys, parallel=f.parallel,
                     noise_inject_alpha=f.noise_inject_alpha,
                     noise_inject_tfrac=f.noise_inject_tfrac, clip_x0=clip)

  return {"ddim_full": jax.jit(plain(ts)), "enc_prop": jax.jit(enc_prop),
          "ddim_few": jax.jit(plain(ts_few))}


def _x_init(config, batch_index: int) -> jax.Array:
  shape = (config.eval.batch_size, 16, 16, 3)
  return jax.random.normal(jax.random.fold_in(jax.random.key(config.eval.noise_seed),
                                              batch_index), shape, jnp.float32)


def generate(config, standin, samplers) -> tuple[dict, object]:
  """Images of every method for the same prompts and the same initial noise.

  Returns:
    ({method: float32 [n, 16, 16, 3] in [-1, 1]}, the prompts' `ToyBatch`).
  """
  from jaxrepro.launch.data import toy_shapes
  e = config.eval
  prompts = toy_shapes.sample(e.prompt_seed, e.num_samples)
  images = {m: [] for m in METHODS}
  for i in range(e.num_samples // e.batch_size):
    tokens = jnp.asarray(prompts.tokens[i * e.batch_size:(i + 1) * e.batch_size], jnp.int32)
    x = _x_init(config, i)
    for m in METHODS:
      # The stand-in's own sampler clips the final images to the data range.
      images[m].append(np.clip(np.asarray(samplers[m](standin.params, tokens, x)), -1, 1))
  return {m: np.concatenate(v) for m, v in images.items()}, prompts


# -------------------------------------------------------------------- feature analysis


def feature_changes(config, standin, tokens) -> tuple[dict, tuple]:
  """Median adjacent-step relative change of encoder outputs and decoder stage outputs.

  Runs the full guided DDIM sampler on the first `features.num_samples` prompts and noises
  of batch 0 and evaluates, at every step's state and timestep, the encoder's outputs
  (bottleneck and skips) and the decoder's stage outputs for the conditional prompt.

  Args:
    tokens: int32 [>= k, L] the prompts of batch 0.

  Returns:
    (summary numbers, (encoder curve [N - 1], decoder curve [N - 1]) for the plot).
  """
  from jaxrepro.launch.data import toy_shapes
  k = config.features.num_samples
  g, ac = standin.graphdef, standin.alphas_cumprod
  ts = sch.make_timesteps(config.sampler.num_steps, int(ac.shape[0]), config.sampler.spacing)
  null = jnp.asarray(toy_shapes.null_tokens(1), jnp.int32)

  @jax.jit
  def features(params, x, tokens):
    guided = smp.cfg(unet_lib.make_model_fn(g, params), config.guidance.scale, null)
    _, traj = smp.ddim(guided, x, tokens, ac, ts, clip_x0=config.sampler.clip_x0 or None,
                       return_trajectory=True)

    def one(inp):
      x, t = inp
      tb = jnp.full((k,), t, jnp.int32)
      h, skips = unet_lib.unet_encode(g, params, x, tb, tokens)
      dec = fd.unet_decoder_features(g, params, h, skips, tb, tokens)
      return (h,) + tuple(skips), dec[:-1], dec[-1]
    return jax.lax.map(one, (traj.x, traj.t))

  enc, dec, out = features(standin.params, _x_init(config, 0)[:k], tokens[:k])
  changes = lambda f: np.asarray(fd.adjacent_relative_change(f))  # [N - 1, k]
  enc_m = [float(np.median(changes(f))) for f in enc]
  dec_m = [float(np.median(changes(f))) for f in dec]
  summary = {f"feature_change/encoder_{i}": v for i, v in enumerate(enc_m)}
  summary.update({f"feature_change/decoder_{i}": v for i, v in enumerate(dec_m)})
  summary["feature_change/encoder_median"] = float(np.median(enc_m))
  summary["feature_change/decoder_median"] = float(np.median(dec_m))
  summary["feature_change/prediction"] = float(np.median(changes(out)))
  summary["feature_change/decoder_over_encoder"] = (
      summary["feature_change/decoder_median"] / summary["feature_change/encoder_median"])
  # Per-step curves for the plot (median over samples, then over tensors).
  curve = lambda fs: np.median(np.stack([np.median(changes(f), axis=1) for f in fs]), axis=0)
  return summary, (curve(enc), curve(dec))


# ------------------------------------------------------------------------------ costs


def call_flops(standin, batch: int) -> tuple[float, float]:
  """XLA's FLOP count of one guided encoder call and one guided decoder call (2 * batch)."""
  g, p = standin.graphdef, standin.params
  x = jnp.zeros((2 * batch, 16, 16, 3), jnp.float32)
  t = jnp.zeros((2 * batch,), jnp.int32)
  c = jnp.zeros((2 * batch, standin.config.max_prompt_len), jnp.int32)
  enc = jax.jit(lambda p, x, t, c: unet_lib.unet_encode(g, p, x, t, c))
  h, skips = jax.eval_shape(enc, p, x, t, c)
  dec = jax.jit(lambda p, h, s, t, c: unet_lib.unet_decode(g, p, h, s, t, c))

  def flops(lowered):
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))

  return flops(enc.lower(p, x, t, c)), flops(dec.lower(p, h, skips, t, c))


def costs(config, standin, samplers) -> dict[str, float]:
  """Exact call counts, FLOPs per image and wall time of the jitted samplers."""
  n, keys = config.sampler.num_steps, key_steps(config)
  few = len(keys)
  calls = {"ddim_full": (n, n), "enc_prop": (fd.encoder_calls(keys, n),
                                             fd.decoder_calls(keys, n)), "ddim_few": (few, few)}
  b = config.eval.batch_size
  e_flops, d_flops = call_flops(standin, b)
  out = {}
  for m, (ne, nd) in calls.items():
    out[f"encoder_calls/{m}"] = ne
    out[f"decoder_calls/{m}"] = nd
    out[f"gflops_per_image/{m}"] = (ne * e_flops + nd * d_flops) / b / 1e9
  out["flops/encoder_share_of_unet"] = e_flops / (e_flops + d_flops)
  out["flops_speedup/enc_prop_vs_ddim_full"] = (out["gflops_per_image/ddim_full"]
                                                / out["gflops_per_image/enc_prop"])
  from jaxrepro.launch.data import toy_shapes
  tokens = jnp.asarray(toy_shapes.sample(config.eval.prompt_seed, b).tokens, jnp.int32)
  x = _x_init(config, 0)
  timings = benchmarking.interleaved(
      {m: (lambda m=m: samplers[m](standin.params, tokens, x)) for m in METHODS},
      rounds=config.timing.rounds)
  for m in METHODS:
    out[f"ms_per_image/{m}"] = timings[m].median_s / b * 1e3
  out["wall_clock_speedup/enc_prop_vs_ddim_full"] = (timings["ddim_full"].median_s
                                                     / timings["enc_prop"].median_s)
  out["wall_clock_speedup/ddim_few_vs_enc_prop"] = (timings["enc_prop"].median_s
                                                    / timings["ddim_few"].median_s)
  return out


# ------------------------------------------------------------------------------------- run


def load_models():
  """The shipped stand-in and the judge module (imported here: they read assets)."""
  from jaxrepro.launch import toy_judge, toy_t2i
  return toy_t2i.load(), toy_judge


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from jaxrepro.launch.data import toy_shapes
  start = time.perf_counter()
  standin, judge = load_models()
  samplers = make_samplers(standin, config)
  images, prompts = generate(config, standin, samplers)
  summary = {"generate_seconds": round(time.perf_counter() - start, 1)}
  reference = toy_shapes.sample(config.eval.reference_seed, config.eval.num_reference).images
  scores = {}
  for m in METHODS:
    scores[m] = judge.evaluate(images[m], prompts.labels, reference)
    summary.update({f"{k}/{m}": float(v) for k, v in scores[m].items()})
  kid = {m: scores[m]["kid"] for m in METHODS}
  fid = {m: scores[m]["frechet_distance"] for m in METHODS}
  summary["kid_ratio/enc_prop_over_ddim_full"] = kid["enc_prop"] / kid["ddim_full"]
  summary["kid_ratio/ddim_few_over_ddim_full"] = kid["ddim_few"] / kid["ddim_full"]
  summary["kid_gap/ddim_few_minus_enc_prop"] = kid["ddim_few"] - kid["enc_prop"]
  summary["fd_ratio/enc_prop_over_ddim_full"] = fid["enc_prop"] / fid["ddim_full"]
  summary["fd_ratio/ddim_few_over_ddim_full"] = fid["ddim_few"] / fid["ddim_full"]
  summary["prompt_accuracy_drop/enc_prop"] = (scores["ddim_full"]["prompt_accuracy"]
                                              - scores["enc_prop"]["prompt_accuracy"])
  summary["prompt_accuracy_drop/ddim_few"] = (scores["ddim_full"]["prompt_accuracy"]
                                              - scores["ddim_few"]["prompt_accuracy"])
  # How far each fast sampler lands from the full sampler's image for the same noise.
  for m in ("enc_prop", "ddim_few"):
    summary[f"rmse_to_ddim_full/{m}"] = float(np.sqrt(np.mean(
        (images[m] - images["ddim_full"]) ** 2)))
  changes, curves = feature_changes(config, standin, jnp.asarray(prompts.tokens, jnp.int32))
  summary.update(changes)
  summary.update(costs(config, standin, samplers))
  summary["seconds_total"] = round(time.perf_counter() - start, 1)
  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(0, {f"final/{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    _plot(workdir, config, images, prompts, curves)
    _plot_quality_vs_cost(workdir, summary)
  return summary


def _plot(workdir, config, images, prompts, curves):
  import matplotlib.pyplot as plt
  enc, dec = curves
  steps = list(range(1, len(enc) + 1))
  plotting.line_plot(
      os.path.join(workdir, "feature_change.png"),
      {"encoder outputs": (steps, enc), "decoder stage outputs": (steps, dec)},
      title="relative change between adjacent steps (full DDIM)", xlabel="sampling step k",
      ylabel="median ||f_k - f_{k-1}|| / ||f_k||", logy=True)
  cols = min(8, len(prompts.prompts))
  fig, axes = plt.subplots(len(METHODS), cols, figsize=(1.4 * cols, 1.6 * len(METHODS)),
                           dpi=100, squeeze=False)
  for r, m in enumerate(METHODS):
    for c in range(cols):
      ax = axes[r][c]
      ax.imshow((images[m][c] + 1) / 2)
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(m, fontsize=7)
      if r == 0:
        ax.set_title(prompts.prompts[c], fontsize=5)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "samples.png"))
  plt.close(fig)


def _plot_quality_vs_cost(workdir, summary):
  """KID and Frechet distance against UNet GFLOPs per image: the speed/quality trade-off."""
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(8, 3.2), dpi=100)
  for ax, metric in zip(axes, ("kid", "frechet_distance")):
    for m in METHODS:
      x, y = summary[f"gflops_per_image/{m}"], summary[f"{metric}/{m}"]
      ax.scatter([x], [y])
      ax.annotate(f"{m} ({summary[f'encoder_calls/{m}']} enc, "
                  f"{summary[f'decoder_calls/{m}']} dec)", (x, y), fontsize=7)
    ax.margins(x=0.45, y=0.15)  # room for the labels
    ax.set_xlabel("UNet GFLOPs per image (guided)")
    ax.set_ylabel(metric)
  fig.suptitle("quality versus network cost (lower is better on both axes)", fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "quality_vs_cost.png"))
  plt.close(fig)


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """The jitted samplers side by side, and our scanned sampler against a Python loop.

  Rows (batch 64 with CFG, i.e. 128 UNet rows per call, on the shipped stand-in):
  DDIM-50 full vs encoder propagation, DDIM-9 vs encoder propagation, and the family row
  "sampler overhead": a host loop calling a jitted guided UNet step 50 times (the diffusers
  style) against our one jitted `lax.scan` DDIM-50 (checked to give the same images).
  """
  config = experiment.config_module(PAPER).get_config("demo")
  batch = 16 if quick else 64
  config.eval.update(batch_size=batch, num_samples=batch)
  standin, _ = load_models()
  samplers = make_samplers(standin, config)
  from jaxrepro.launch.data import toy_shapes
  tokens = jnp.asarray(toy_shapes.sample(config.eval.prompt_seed, batch).tokens, jnp.int32)
  x = _x_init(config, 0)
  p = standin.params
  ac = standin.alphas_cumprod
  n = config.sampler.num_steps
  ts = sch.make_timesteps(n, int(ac.shape[0]), config.sampler.spacing)
  null = jnp.asarray(toy_shapes.null_tokens(1), jnp.int32)
  clip = config.sampler.clip_x0 or None

  # One guided DDIM step as its own jitted program: the scan body, called from Python.
  @jax.jit
  def step(params, x, t, a_t, a_p, tokens):
    guided = smp.cfg(unet_lib.make_model_fn(standin.graphdef, params), config.guidance.scale,
                     null)
    eps = guided(x, jnp.full((x.shape[0],), t, jnp.int32), tokens)
    x0 = sch.eps_to_x0(x, eps, a_t)
    if clip is not None:
      x0 = jnp.clip(x0, -clip, clip)
      eps = sch.x0_to_eps(x, x0, a_t)
    return jnp.sqrt(a_p) * x0 + jnp.sqrt(1.0 - a_p) * eps

  a = np.asarray(ac)[ts]
  a_next = np.append(a[1:], 1.0).astype(np.float32)

  def python_loop():
    y = x
    for i in range(n):
      y = step(p, y, ts[i], a[i], a_next[i], tokens)
    return y

  gap = float(jnp.abs(python_loop() - samplers["ddim_full"](p, tokens, x)).max())
  if not gap <= 1e-4:
    raise AssertionError(f"the Python-loop sampler must match the scanned one; gap {gap}")
  t = benchmarking.interleaved(
      {"full": lambda: samplers["ddim_full"](p, tokens, x),
       "enc_prop": lambda: samplers["enc_prop"](p, tokens, x),
       "few": lambda: samplers["ddim_few"](p, tokens, x),
       "loop": python_loop},
      rounds=2 if quick else 5)
  shape = f"toy_t2i 16x16 UNet, batch {batch} + CFG, {n} DDIM steps"
  keys = key_steps(config)
  e_flops, d_flops = call_flops(standin, batch)
  ideal = n * (e_flops + d_flops) / (len(keys) * e_flops + n * d_flops)
  return [
      benchmarking.time_row(
          PAPER, f"encoder propagation ({len(keys)} encoder calls) vs full DDIM-{n}, {shape}",
          ("encoder propagation", t["enc_prop"]), (f"DDIM-{n} full UNet", t["full"]),
          note=f"ratio = wall-clock speed-up; FLOP ratio {ideal:.2f}x (the encoder is "
               f"{e_flops / (e_flops + d_flops):.0%} of the UNet's FLOPs)"),
      benchmarking.time_row(
          PAPER, f"encoder propagation vs DDIM-{len(keys)} (same encoder calls), {shape}",
          ("encoder propagation", t["enc_prop"]), (f"DDIM-{len(keys)}", t["few"]),
          note=f"ratio < 1: encoder propagation still runs the decoder at all {n} steps"),
      benchmarking.time_row(
          PAPER, f"sampler overhead: lax.scan DDIM-{n} vs Python loop over a jitted step, "
          f"{shape}", ("one jitted lax.scan sampler", t["full"]),
          ("Python loop + jitted guided step", t["loop"]),
          note=f"same computation (max |difference| {gap:.1e})"),
      benchmarking.skipped_row(
          PAPER, "encoder propagation vs the official PyTorch/diffusers pipeline",
          "hutaiHang/Faster-Diffusion (diffusers)", "diffusers/PyTorch are not installed"),
  ]
