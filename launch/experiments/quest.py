"""Experiment driver for `quest` (library: `jaxrepro.algorithms.diffusion.quest`).

Quantizes the toy diffusion UNet (ToyT2I used unconditionally with the empty prompt, as the
PTQ4DM driver does) at W4A4 and compares, on eps-MSE to the float model along float DDIM
trajectories (teacher forced) and on the judge's sample KID:

* `ptq`: the PTQ baseline (`ptq4dm.quantize_unet`: MSE steps, weights per output channel,
  activations per tensor, first/last layer at 8 bits) calibrated on Q-Diffusion's set;
* `timewise`: the same weights with per-timestep activation steps (MSE per timestep);
* `quest`: time-wise steps + stage 1 + stage 2 fine-tuning (`launch.train_loop.fit`);
* `no_timewise`: per-tensor steps (only step 0 of each table is used and trained) + both
  stages;
* `no_stage1`: time-wise steps + stage 2 only.

Every fine-tuning run logs and checkpoints under `workdir` with its own prefix, so a rerun
resumes. The AdaRound baseline of the card is not run (see the report in `CLAIMS`' notes).
"""

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from jaxrepro.algorithms.diffusion import fake_quant as fq
from jaxrepro.algorithms.diffusion import ptq4dm, quest, samplers
from jaxrepro.algorithms.diffusion import schedules as sch
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, experiment, metric_writers, plotting, train_loop
from jaxrepro.launch.experiments import ptq4dm as ptq4dm_exp
from jaxrepro.models import unet

PAPER = "quest"
MODELS = ("ptq", "timewise", "quest", "no_timewise", "no_stage1")

CLAIMS = (
    experiment.Claim(
        "w4a4_eps_mse_drop",
        "At W4A4, QuEST's eps-MSE to the float model averaged over the DDIM trajectory is at "
        "least 30% below the PTQ baseline's: ratio QuEST / PTQ", "eps_mse_ratio_quest_over_ptq",
        0.7, "<=",
        note="Card claim (a). Teacher-forced eps-MSE along 20-step float DDIM trajectories "
        "of the stand-in; fine-tuning runs 100 Adam updates per model (CPU budget). Most of "
        "the gain comes from the per-timestep steps alone (ratio 0.72 before fine-tuning)."),
    experiment.Claim(
        "w4a4_kid_improves",
        "At W4A4, QuEST's samples have a lower judge KID to real ToyShapes images than the "
        "PTQ baseline's: ratio QuEST / PTQ", "kid_ratio_quest_over_ptq", 1.0, "<=",
        note="Card claim (b) with the toy judge's features in place of Inception; 256 "
        "samples from the same initial noise as the float model's. Fails on the demo (KID "
        "5419 vs 5180, float 3360): the eps-MSE gain is concentrated at the least noisy "
        "DDIM steps (t <= 150; t = 1 alone dominates the average), where an eps error is "
        "scaled by sqrt(1 - abar_t) in x0 and so moves the samples little, and ~100 Adam updates at 10x the paper's rates are far from the paper's schedule; "
        "a 256-sample KID also carries a few percent of noise."),
    experiment.Claim(
        "finetuned_fraction",
        "Fewer than 10% of the model's values are fine-tuned (stage-1 and stage-2 weights "
        "and biases plus every trained activation step), relative to the float UNet's "
        "parameter count", "finetuned_fraction", 0.10, "<=",
        note="Card claim (c). The toy UNet is tiny (185k parameters) and its attention and "
        "feed-forward layers, which stage 2 trains, are a larger share of it than in an LDM "
        "or SD, where convolutions dominate. Fails on the demo (17.4%: 31216 weights and "
        "biases plus 940 activation-step entries of 184947 parameters); with the official "
        "stage-1 choice (`q.stage1_layers=emb_layers`) the share is still above 10%."),
    experiment.Claim(
        "ablation_timewise_helps",
        "Removing the per-timestep steps (one step per quantizer, both stages still run) "
        "increases the W4A4 eps-MSE: ratio no_timewise / QuEST",
        "eps_mse_ratio_no_timewise_over_quest", 1.0, ">=", note="Card claim (d)."),
    experiment.Claim(
        "ablation_stage1_helps",
        "Removing stage 1 (time-embedding fine-tuning) increases the W4A4 eps-MSE: ratio "
        "no_stage1 / QuEST", "eps_mse_ratio_no_stage1_over_quest", 1.0, ">=",
        note="Card claim (d)."),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "sampler.num_steps", "calib.per_step", "eval.num_samples",
                        "eval.eps_samples", "eval.batch_size", "q.num_candidates", "q.step",
                        "q.lr_w", "q.lr_delta", "q.lr_delta_stage1", "q.stage1_epochs",
                        "q.stage2_epochs", "train.log_every")
  q = config.q
  if any(not 2 <= b <= 16 for b in (q.w_bits, q.a_bits)):
    raise ConfigError("config.q.w_bits and config.q.a_bits must lie in [2, 16]")
  for field in ("eval.num_samples", "eval.eps_samples"):
    if common.get_field(config, field) % config.eval.batch_size:
      raise ConfigError(f"config.eval.batch_size={config.eval.batch_size} must divide "
                        f"config.{field}={common.get_field(config, field)}")
  if config.eval.eps_samples > config.eval.num_samples:
    raise ConfigError(f"config.eval.eps_samples={config.eval.eps_samples} must be <= "
                      f"config.eval.num_samples={config.eval.num_samples}")
  if (q.num_candidates - 1) * q.step >= 1:
    raise ConfigError(f"config.q.num_candidates={q.num_candidates} and config.q.step="
                      f"{q.step} give shrink factors <= 0 (need (K - 1) step < 1)")
  if config.sampler.num_steps > 1000:
    raise ConfigError(f"config.sampler.num_steps={config.sampler.num_steps} must be <= 1000")


# ----------------------------------------------------------------------- jitted programs


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _fp_labels(graphdef, params, x, t, cond):
  """The float model's eps and time-embedding outputs on one calibration batch."""
  model = nnx.merge(graphdef, params)
  return model(x, t, cond), quest.time_embedding_outputs(model, t)


@functools.partial(jax.jit, static_argnames=("spec",))
def _q_eps_errors(spec, params, rest, w_scales, timewise, traj_x, traj_t, cond, eps_ref):
  """Per-step sums of (eps_q - eps_ref)^2 along recorded states: [N]."""
  fn = quest.make_model_fn(spec, params, rest, w_scales, timewise)

  def one(inp):
    x, t, e = inp
    eps = fn(x, jnp.full((x.shape[0],), t, jnp.int32), cond)
    return jnp.sum((eps - e) ** 2)

  return jax.lax.map(one, (traj_x, traj_t, eps_ref))


@functools.partial(jax.jit, static_argnames=("spec", "clip_x0"))
def _q_ddim(spec, params, rest, w_scales, timewise, x_init, cond, alphas_cumprod, timesteps,
            clip_x0):
  fn = quest.make_model_fn(spec, params, rest, w_scales, timewise)
  x = samplers.ddim(fn, x_init, cond, alphas_cumprod, timesteps, clip_x0=clip_x0)
  return jnp.clip(x, -1.0, 1.0)


# ------------------------------------------------------------------------------ training


@functools.lru_cache(maxsize=4)
def stage_step(spec, w_scales_key, stage: str, lr_w: float, lr_delta: float, label_key):
  """The jitted-once training step of one stage, shared by every model trained in it.

  QuEST and its two ablations train the same stage with the same graph and labels; only
  their parameters, frozen rest and time-wise flag differ. Those ride in the state and the
  batch, so `train_loop.fit` (which caches its jitted chunk per step function) compiles one
  UNet training step per stage instead of one per model and stage. The cache keys wrap the
  unhashable pytrees (`_Key`) by identity.
  """
  w_scales, label_tree = w_scales_key.value, label_key.value
  tx = quest.optimizer(label_tree, lr_w, lr_delta)

  def loss_fn(p, batch, key):
    del key
    return quest.stage_loss(spec, p, batch["rest"], w_scales, batch, stage, batch["timewise"])

  return tx, train_loop.make_train_step(loss_fn, tx)


class _Key:
  """Hashes a pytree by identity, so an `lru_cache` key can hold it."""

  def __init__(self, value):
    self.value = value

  def __hash__(self):
    return id(self.value)

  def __eq__(self, other):
    return isinstance(other, _Key) and other.value is self.value


def finetune(spec, params, rest, w_scales, batches, *, stage, label_tree, lr_w, lr_delta,
             epochs, timewise, workdir, prefix, log_every=1) -> tuple[dict, list]:
  """Runs one stage of one model with `train_loop.fit`: `epochs` passes over the batches.

  Args:
    spec, params, rest, w_scales: the fine-tunable model (`quest.make_finetunable`).
    batches: list of S batch dicts (one per calibration timestep, in sampler order).
    stage: "stage1" | "stage2"; label_tree: its `quest.labels`.
    lr_w, lr_delta: Adam step sizes of the weights and the activation steps.
    epochs: passes over the S batches (one update per batch).
    timewise: False trains the per-tensor ablation (step 0 of every table).
    workdir, prefix: the run directory and this run's metric/checkpoint prefix.

  Returns:
    (trained params, history rows).
  """
  tx, step = stage_step(spec, _Key(w_scales), stage, lr_w, lr_delta, _Key(label_tree))
  num_steps = epochs * len(batches)
  stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches)
  flag = jnp.asarray(timewise)

  def host_batches(start, n):
    idx = np.arange(start, start + n) % len(batches)
    # The frozen rest and the flag are per-model inputs of the shared step (see
    # `stage_step`), repeated along the chunk axis like the data.
    extra = jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape),
                         dict(rest=rest, timewise=flag))
    return {**jax.tree.map(lambda a: a[idx], stacked), **extra}

  # A jitted identity gives every leaf the kind of a jitted step's output, so the chunk
  # function compiles once rather than again after its first update.
  state = jax.jit(lambda s: s)(train_loop.TrainState.create(params, tx, jax.random.key(0)))
  every = max(log_every, num_steps - num_steps % log_every)
  result = train_loop.fit(state, step, num_steps=num_steps, log_every=log_every,
                          workdir=workdir, checkpoint_every=every, host_batches=host_batches,
                          prefix=prefix, description=prefix.rstrip("/"))
  return result.state.params, result.history


# ------------------------------------------------------------------------------------ run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from jaxrepro.algorithms.diffusion import metrics
  from jaxrepro.launch import toy_judge
  from jaxrepro.launch.data import toy_shapes

  start = time.perf_counter()
  graphdef, params, cfg, ac, prompt_len = ptq4dm_exp.load_model(config)
  if (cfg.image_size, cfg.in_channels) != (16, 3):
    raise ConfigError("quest's judge and data need a 16x16x3 UNet")
  null = lambda n: jnp.zeros((n, prompt_len), jnp.int32)  # the empty prompt: unconditional
  timesteps = jnp.asarray(sch.make_timesteps(config.sampler.num_steps, int(ac.shape[0])))
  n_steps = int(timesteps.shape[0])
  clip = config.sampler.clip_x0
  q, c, e = config.q, config.calib, config.eval
  l1, l2 = quest.STAGE1_LAYERS[q.stage1_layers], quest.STAGE2_LAYERS[q.stage2_layers]

  # Calibration (Q-Diffusion): every state of per_step float trajectories, timestep-major.
  x_cal = jax.random.normal(jax.random.key(c.seed), (c.per_step, 16, 16, 3))
  _, traj = ptq4dm_exp._ddim_trajectory(graphdef, params, x_cal, null(c.per_step), ac,
                                        timesteps, clip)
  calib = quest.trajectory_calibration(traj, null(c.per_step))
  batches = []
  for j in range(n_steps):
    sl = slice(j * c.per_step, (j + 1) * c.per_step)
    eps, emb = _fp_labels(graphdef, params, calib.x[sl], calib.t[sl], calib.cond[sl])
    batches.append(dict(x=calib.x[sl], t=calib.t[sl], cond=calib.cond[sl], eps=eps, emb=emb))

  # Baseline PTQ, then the time-wise model from it (tables start equal to its steps).
  t0 = time.perf_counter()
  qg, qs = ptq4dm.quantize_unet(graphdef, params, calib, w_bits=q.w_bits, a_bits=q.a_bits,
                                batch_size=c.per_step, head_stem_bits=q.head_stem_bits,
                                method=q.method, num_candidates=q.num_candidates, step=q.step)
  ptq_seconds = time.perf_counter() - t0
  tied_g, tied_s = fq.to_timewise(qg, qs, n_steps)
  tw_g, tw_s = quest.calibrate_timewise(tied_g, tied_s, calib, timesteps,
                                        batch_size=c.per_step, method=q.method)
  mk = functools.partial(quest.make_finetunable, fp_params=params, w_bits=q.w_bits,
                         timesteps=timesteps, layers=l1 + l2, method=q.method,
                         num_candidates=q.num_candidates, step=q.step)
  spec, p_tw, rest_tw, w_scales = mk(tw_g, tw_s)
  spec_tied, p_tied, rest_tied, _ = mk(tied_g, tied_s)
  if spec_tied != spec:
    raise AssertionError("tied and time-wise models must share one graphdef")
  lab1 = quest.labels(p_tw, "stage1", l1, l2)
  lab2 = quest.labels(p_tw, "stage2", l1, l2)

  # Fine-tuning: QuEST and the two ablations (train_loop: logs, checkpoints, resume).
  # no_timewise uses and trains only step 0 of its tied tables; no_stage1 skips stage 1.
  t0 = time.perf_counter()
  s1 = dict(stage="stage1", label_tree=lab1, lr_w=q.lr_w, lr_delta=q.lr_delta_stage1,
            epochs=q.stage1_epochs)
  s2 = dict(stage="stage2", label_tree=lab2, lr_w=q.lr_w, lr_delta=q.lr_delta,
            epochs=q.stage2_epochs)
  trained = {}
  for name, p, rest, timewise, stages in (
      ("quest", p_tw, rest_tw, True, (s1, s2)),
      ("no_timewise", p_tied, rest_tied, False, (s1, s2)),
      ("no_stage1", p_tw, rest_tw, True, (s2,))):
    for kw in stages:
      p, _ = finetune(spec, p, rest, w_scales, batches, timewise=timewise, workdir=workdir,
                      prefix=f"{name}/{kw['stage']}/", log_every=config.train.log_every, **kw)
    trained[name] = (p, rest, timewise)
  finetune_seconds = time.perf_counter() - t0

  # Evaluation trajectories and float eps (teacher forcing), float samples.
  judge = toy_judge.load()
  feats = lambda images: toy_judge.features(np.asarray(images), judge)
  x_init = jax.random.normal(jax.random.key(e.seed), (e.num_samples, 16, 16, 3))
  cond = null(e.batch_size)
  chunks = [slice(i, i + e.batch_size) for i in range(0, e.num_samples, e.batch_size)]
  trajs, eps_fp, fp_samples = [], [], []
  for i, sl in enumerate(chunks):
    x_final, tr = ptq4dm_exp._ddim_trajectory(graphdef, params, x_init[sl], cond, ac,
                                              timesteps, clip)
    fp_samples.append(jnp.clip(x_final, -1.0, 1.0))
    if i * e.batch_size < e.eps_samples:
      trajs.append(tr)
      eps_fp.append(ptq4dm_exp._eps_along(graphdef, params, tr.x, tr.t, cond))
  numel = e.eps_samples * 16 * 16 * 3
  ref_feats = feats(toy_shapes.sample(e.reference_seed, e.num_samples).images)
  summary = {"kid/fp": metrics.kid(feats(jnp.concatenate(fp_samples)), ref_feats)}

  models = {"ptq": None, "timewise": (p_tw, rest_tw, True), **trained}
  per_step = {}
  for name, m in models.items():
    if m is None:
      err = sum(np.asarray(ptq4dm_exp._eps_errors(qg, qs, tr.x, tr.t, cond, ef))
                for tr, ef in zip(trajs, eps_fp))
    else:
      p, rest, tw = m
      err = sum(np.asarray(_q_eps_errors(spec, p, rest, w_scales, jnp.asarray(tw), tr.x, tr.t,
                                         cond, ef)) for tr, ef in zip(trajs, eps_fp))
    per_step[name] = err / numel
    summary[f"eps_mse/{name}"] = float(err.sum() / (numel * n_steps))

  for name in ("ptq", "quest"):
    if name == "ptq":
      samples = [ptq4dm_exp._ddim(qg, qs, x_init[sl], cond, ac, timesteps, clip)
                 for sl in chunks]
    else:
      p, rest, tw = models[name]
      samples = [_q_ddim(spec, p, rest, w_scales, jnp.asarray(tw), x_init[sl], cond, ac,
                         timesteps, clip) for sl in chunks]
    summary[f"kid/{name}"] = metrics.kid(feats(jnp.concatenate(samples)), ref_feats)

  counts = quest.count_trained(p_tw, [lab1, lab2])
  total = sum(int(np.prod(np.shape(v))) for v in jax.tree.leaves(
      nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, params), nnx.Param))))
  eps = lambda name: summary[f"eps_mse/{name}"]
  summary.update({
      "eps_mse_ratio_quest_over_ptq": eps("quest") / eps("ptq"),
      "eps_mse_ratio_timewise_over_ptq": eps("timewise") / eps("ptq"),
      "eps_mse_ratio_no_timewise_over_quest": eps("no_timewise") / eps("quest"),
      "eps_mse_ratio_no_stage1_over_quest": eps("no_stage1") / eps("quest"),
      "kid_ratio_quest_over_ptq": summary["kid/quest"] / summary["kid/ptq"],
      "finetuned_fraction": counts["total"] / total,
      "finetuned/weights": counts["weight"], "finetuned/act_steps": counts["delta"],
      "params/total": total,
      "seconds/ptq_calibration": round(ptq_seconds, 2),
      "seconds/finetune_3_models": round(finetune_seconds, 2),
      "seconds": round(time.perf_counter() - start, 1),
  })
  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(0, {f"final/{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    ts = [int(t) for t in np.asarray(timesteps)]
    plotting.line_plot(
        f"{workdir}/eps_mse_per_step.png",
        {name: (ts, list(v)) for name, v in per_step.items()},
        title=f"W{q.w_bits}A{q.a_bits}: eps-MSE to the float model along DDIM",
        xlabel="timestep t", ylabel="eps-MSE", markers=True)
  return summary


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Fake-quant (time-wise W4A4) forward vs float, and QuEST's fine-tuning vs PTQ's cost.

  Fake quantization adds quantize-dequantize work (no integer kernels here), so the first
  ratio is below 1 by design. The second compares wall-clock seconds of one QuEST
  fine-tuning (both stages, compiles included) with the PTQ calibration it starts from.
  """
  config = experiment.config_module(PAPER).get_config("smoke")
  cfg = unet.UNetConfig(channels=32, channel_mult=(1, 2), vocab_size=16, max_prompt_len=4)
  graphdef, params = unet.random_unet(cfg, 0)
  batch, s = (16 if quick else 64), 4
  x = jax.random.normal(jax.random.key(0), (batch, 16, 16, 3))
  grid = jnp.asarray(sch.make_timesteps(s, 1000))
  t = jnp.tile(grid, batch // s)
  cond = jnp.zeros((batch, 4), jnp.int32)
  calib = ptq4dm.CalibSet(x, t, cond)
  t0 = time.perf_counter()
  qg, qs = ptq4dm.quantize_unet(graphdef, params, calib, w_bits=4, a_bits=4, batch_size=batch,
                                num_candidates=20, step=0.04)
  ptq_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  tg, ts = quest.calibrate_timewise(*fq.to_timewise(qg, qs, s), calib, grid, batch_size=batch)
  l1, l2 = quest.STAGE1_LAYERS["time_mlp"], quest.STAGE2_LAYERS["ldm_cond"]
  spec, p, rest, w_scales = quest.make_finetunable(tg, ts, params, w_bits=4, timesteps=grid,
                                                   layers=l1 + l2, num_candidates=20, step=0.04)
  eps = unet.apply_unet(graphdef, params, x, t, cond)
  model = nnx.merge(graphdef, params)
  b = dict(x=x, t=t, cond=cond, eps=eps, emb=quest.time_embedding_outputs(model, t))
  import tempfile
  with tempfile.TemporaryDirectory() as wd:
    for stage, lab in (("stage1", quest.labels(p, "stage1", l1, l2)),
                       ("stage2", quest.labels(p, "stage2", l1, l2))):
      p, _ = finetune(spec, p, rest, w_scales, [b], stage=stage, label_tree=lab,
                      lr_w=config.q.lr_w, lr_delta=config.q.lr_delta, epochs=4, timewise=True,
                      workdir=wd, prefix=f"{stage}/")
  quest_s = time.perf_counter() - t0
  fp = jax.jit(lambda pr: unet.apply_unet(graphdef, pr, x, t, cond))
  fake = jax.jit(lambda pr: quest.make_model_fn(spec, pr, rest, w_scales)(x, t, cond))
  timing = benchmarking.interleaved({"fake": lambda: fake(p), "fp": lambda: fp(params)},
                                    rounds=3 if quick else 7)
  cost = benchmarking.Row(
      PAPER, f"W4A4 quantization cost, random UNet channels 32, {s} timesteps x {batch // s} "
      "calibration samples: QuEST (time-wise calibration + 2 x 4 fine-tuning steps) vs PTQ "
      "calibration", "QuEST", "PTQ", quest_s, ptq_s, "s", ptq_s / quest_s,
      note="wall clock incl. compiles; ratio < 1: QuEST's extra cost on top of PTQ")
  return [benchmarking.time_row(
      PAPER, f"UNet forward, batch {batch}, 16x16x3, channels 32: time-wise fake-quant W4A4 "
      "vs float32", ("fake-quant W4A4", timing["fake"]), ("float32", timing["fp"]),
      note="ratio < 1 expected: simulated quantization adds work; no integer kernels"), cost]
