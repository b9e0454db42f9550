"""Experiment driver for `aptp` (library: `jaxrepro.algorithms.diffusion.aptp`, `aptp_gates`).

Prunes the frozen toy text-to-image UNet (ToyT2I) with prompt-routed architecture codes and
compares it with one static mask (K = 1) trained the same way and with routing by plain
argmax (no optimal transport, one model per seed of `no_ot_seeds`). All models train
jointly in one `train_loop.fit` run (stacked and vmapped, same batches; their metrics are
prefixed `aptp/`, `static/`, `no_ot_s<seed>/`), then, on held-out prompts: the routed MACs
ratio per prompt family ("simple": no texture word, "complex": "striped"), the code shares,
the eps-MSE of each pruned model to the dense teacher at the same noisy inputs, and the
judge's scores of CFG samples from the teacher, the routed experts and the static mask.
A plot (`aptp_routing.png`) shows code usage per family and the distribution of the routed
MACs ratios.

Prompt families. The card's complex family has two or three objects plus stripes; the
stand-in teacher only learned single objects and 12-token captions, so compositing objects
would produce prompts outside its training distribution (and captions longer than its
context). We keep single objects and make the texture word the complex attribute (the
"text-like" detail), which the teacher has seen in 30% of its captions.
"""

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from jaxrepro.algorithms.diffusion import aptp, aptp_gates
from jaxrepro.algorithms.diffusion import schedules as sch
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, experiment, metric_writers, train_loop
from jaxrepro.models import unet

PAPER = "aptp"
POOL_SEED = 4242

CLAIMS = (
    experiment.Claim(
        "complex_prompts_get_more_flops",
        "Routed experts give complex (striped) prompts a mean prunable-MACs ratio at least "
        "0.1 above simple prompts' (complex - simple)", "flops_gap_complex_minus_simple",
        0.1, ">=",
        note="Card claim (a). Complex = the stripe texture on one object (the stand-in never "
        "saw multi-object prompts; see the driver docstring). Routing at inference is argmax "
        "cosine similarity with fixed Gumbel noise. Fails (demo: -0.011): at inference 89% "
        "of simple and 94% of complex prompts go to the same code (ratio 0.57), so there is "
        "no per-family capacity split to measure. With a frozen UNet, 240 steps and a "
        "bag-of-words router that after pre-training learns only from the contrastive loss, "
        "nothing ties the router's clusters to how hard a prompt is to prune."),
    experiment.Claim(
        "routed_beats_static_distill",
        "At (about) equal average MACs, the routed experts' eps-MSE to the dense teacher on "
        "held-out prompts is at least 10% lower than one static mask's: 1 - aptp / static",
        "distill_mse_reduction_vs_static", 0.1, ">=",
        note="Card claim (b). Both trained with the same losses, target and steps; UNet "
        "weights frozen (no expert fine-tuning). Passes (demo: 0.21, eps-MSE 0.080 vs 0.101) "
        "but the MACs are not equal: the static mask ends at ratio 0.50, the routed experts "
        "at 0.59 on average (avg_flops_ratio/*), so part or all of the gap is the static "
        "mask's deeper pruning; the resource loss only holds the ratio near p = 0.6 and the "
        "fixed-noise inference masks differ from the training draws."),
    experiment.Claim(
        "comparison_at_equal_macs",
        "Claim (b)'s comparison is at equal average MACs: the routed experts' and the static "
        "mask's mean prunable-MACs ratios differ by at most 0.03 (absolute)",
        "avg_flops_ratio_gap_abs/aptp_vs_static", 0.03, "<=",
        note="Added by the lead after the first demo run, to make claim (b)'s condition "
        "checkable rather than a footnote (it makes the check stricter, not looser). Fails "
        "(demo: 0.098; 0.59 vs 0.50): the resource loss pulls both towards p = 0.6 but the "
        "static mask overshoots, so (b)'s 21% gain is not a like-for-like comparison."),
    experiment.Claim(
        "sinkhorn_balances_codes",
        "With Sinkhorn routing during training, the largest code share of held-out prompts "
        "(inference routing) is at most 1/K + 0.1", "max_code_share/ot", 0.35, "<=",
        note="Card claim (c), first half, K = 4, measured on held-out prompts with inference "
        "routing (fixed before measuring). Fails (demo: 0.91) although Sinkhorn balances the "
        "training batches (train_max_share/aptp = 0.36 over the last quarter of the steps, "
        "vs 0.73 and 0.74 for the no-OT seeds): inference argmax routing has no balancing "
        "term and the router's vectors (fixed noise shared across prompts) are close to one "
        "code for most prompts."),
    experiment.Claim(
        "argmax_collapses",
        "Without optimal transport (plain argmax in training) the largest code share is at "
        "least 0.7 in at least one seed (max over the no-OT seeds)", "max_code_share/no_ot",
        0.7, ">=",
        note="Card claim (c), second half. Passes (demo: 0.996 and 0.82 for the two seeds; "
        "training batches 0.73 / 0.74), but so does the Sinkhorn-trained model at inference "
        "(0.91), so the contrast the card expects shows only in the training assignments."),
)


def _seeds(config) -> list[int]:
  return common.comma_list(config.no_ot_seeds, int)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "aptp.num_codes", "aptp.target_ratio", "aptp.gumbel_temp",
                        "aptp.sinkhorn_eps", "aptp.sinkhorn_iters", "aptp.router_hidden",
                        "aptp.temps.arch", "aptp.temps.prompt", "optim.router_lr",
                        "optim.codes_lr", "train.num_steps", "train.batch_size",
                        "train.pool_size", "eval.num_prompts", "eval.batch_size",
                        "eval.sample_steps")
  a = config.aptp
  if a.target_ratio > 1:
    raise ConfigError(f"config.aptp.target_ratio={a.target_ratio} must lie in (0, 1]")
  if a.loss_weights.commit != 0:
    raise ConfigError("config.aptp.loss_weights.commit must be 0: the official quantizer "
                      "computes no commitment term (its beta is unused)")
  if a.num_codes < 2:
    raise ConfigError(f"config.aptp.num_codes={a.num_codes} must be >= 2 (K = 1 is the "
                      "static baseline the driver trains itself)")
  if config.train.batch_size < a.num_codes:
    raise ConfigError(f"config.train.batch_size={config.train.batch_size} must be >= "
                      f"config.aptp.num_codes={a.num_codes}")
  if config.eval.num_prompts % config.eval.batch_size:
    raise ConfigError(f"config.eval.batch_size={config.eval.batch_size} must divide "
                      f"config.eval.num_prompts={config.eval.num_prompts}")
  if not 0 <= config.eval.num_samples <= config.eval.num_prompts:
    raise ConfigError(f"config.eval.num_samples={config.eval.num_samples} must lie in "
                      f"[0, config.eval.num_prompts={config.eval.num_prompts}] (0: no judge)")
  if not _seeds(config):
    raise ConfigError("config.no_ot_seeds must name at least one seed, e.g. '1,2'")
  t = config.train
  if t.checkpoint_every % t.log_every:
    raise ConfigError(f"config.train.checkpoint_every={t.checkpoint_every} must be a "
                      f"multiple of config.train.log_every={t.log_every}")


# ----------------------------------------------------------------------------------- model


def load_teacher(config):
  """(graphdef, params, UNetConfig, alphas_cumprod) of the dense teacher (LoRA merged)."""
  from jaxrepro.launch.data import toy_shapes
  if config.model.source == "toy_t2i":
    from jaxrepro.launch import toy_t2i
    s = toy_t2i.load(config.model.root or None)
    if s.config.lora_rank:
      raise ConfigError("the toy_t2i checkpoint has LoRA adapters; aptp needs a plain UNet")
    return s.graphdef, s.params, s.config, s.alphas_cumprod
  cfg = unet.UNetConfig(channels=config.model.channels,
                        channel_mult=tuple(common.comma_list(config.model.channel_mult, int)),
                        vocab_size=len(toy_shapes.VOCAB), max_prompt_len=toy_shapes.PROMPT_LEN)
  graphdef, params = unet.random_unet(cfg, config.seed)
  return graphdef, params, cfg, sch.make_alphas_cumprod("linear", 1000)


def settings_from(config, *, optimal_transport: bool = True) -> aptp.Settings:
  a = config.aptp
  return aptp.Settings(
      temperature=a.gumbel_temp, base=a.base, target_ratio=a.target_ratio,
      resource_kind=a.resource_kind, epsilon=a.sinkhorn_eps, iterations=a.sinkhorn_iters,
      optimal_transport=optimal_transport, resource_aware=a.resource_aware,
      distill_weight=a.loss_weights.distill, resource_weight=a.loss_weights.resource,
      contrastive_weight=a.loss_weights.contrastive, arch_temperature=a.temps.arch,
      prompt_temperature=a.temps.prompt)


# ------------------------------------------------------------------------------- training


def run_specs(config) -> dict[str, tuple[int, int]]:
  """The trained models: name -> (routing mode, init seed)."""
  specs = {"aptp": (aptp.ROUTE_OT, config.seed), "static": (aptp.ROUTE_STATIC, config.seed)}
  for s in _seeds(config):
    specs[f"no_ot_s{s}"] = (aptp.ROUTE_ARGMAX, s)
  return specs


def train_all(config, workdir, teacher, structure, pool):
  """Trains every model of `run_specs` jointly; returns (router graphdef, {name: Params}).

  One `train_loop.fit` run on the sum of the models' losses. The models have disjoint
  parameters and Adam is per-parameter, so this equals training each alone on the same
  batches, while the dense teacher's prediction and one compiled program are shared: the
  models are stacked on a leading axis and vmapped, their routing mode (Sinkhorn, argmax,
  static) a traced value. The static baseline routes everything to its code 0 (its other
  codes get no gradient and are never used), i.e. one learned mask (K = 1).
  """
  from jaxrepro.launch.data import toy_shapes
  graphdef, uparams, _, ac = teacher
  vocab = len(toy_shapes.VOCAB)
  specs = run_specs(config)
  names = list(specs)
  inits = []
  for name in names:
    router_gd, p = aptp.init(jax.random.key(specs[name][1]), structure,
                             num_codes=config.aptp.num_codes, embed_dim=vocab,
                             hidden=config.aptp.router_hidden)
    inits.append(p)
  params = jax.tree.map(lambda *xs: jnp.stack(xs), *inits)
  modes = jnp.asarray([specs[n][0] for n in names], jnp.int32)
  settings = settings_from(config)

  def loss_fn(p, batch, key):
    x0, tokens, emb, pretrain = batch
    k_noise, k_gates = jax.random.split(key)
    x_t, t = aptp.noisy_batch(x0, k_noise, ac)
    teacher_eps = unet.apply_unet(graphdef, uparams, x_t, t, tokens)
    one = lambda q, mode, k: aptp.student_loss(
        structure, router_gd, graphdef, uparams, settings, q, x_t, t, tokens, emb,
        teacher_eps, k, mode=mode,
        # The static baseline is one mask from the start (the code's single-arch baseline).
        pretrain=jnp.logical_and(pretrain, mode != aptp.ROUTE_STATIC))
    losses, m = jax.vmap(one)(p, modes, jax.random.split(k_gates, len(names)))
    metrics = {f"{name}/{k}": v[i] for i, name in enumerate(names) for k, v in m.items()}
    return jnp.sum(losses), metrics

  # Per-group learning rates (card section 6.6): router and codebook.
  labels = aptp.Params(jax.tree.map(lambda _: "router", params.router), "codes")
  tx = optax.multi_transform({"router": optax.adam(config.optim.router_lr),
                              "codes": optax.adam(config.optim.codes_lr)}, labels)
  step = train_loop.make_train_step(loss_fn, tx)
  state = train_loop.TrainState.create(params, tx, jax.random.key(config.seed + 1000))
  bs = config.train.batch_size

  def host_batches(start: int, n: int):
    # Indices depend only on (seed, step): a resumed run draws the same batches.
    idx = np.stack([np.random.default_rng([config.seed, start + i]).integers(
        0, len(pool.tokens), bs) for i in range(n)])
    tokens = pool.tokens[idx]
    emb = np.asarray(aptp.bag_of_words(jnp.asarray(tokens.reshape(-1, tokens.shape[-1])),
                                       vocab)).reshape(n, bs, vocab)
    # The phase flag travels with the batch: the step function itself has no step count.
    pretrain = np.arange(start, start + n) < config.train.pretrain_steps
    return pool.images[idx], tokens, emb, pretrain

  t = config.train
  result = train_loop.fit(state, step, num_steps=t.num_steps, log_every=t.log_every,
                          workdir=workdir, checkpoint_every=t.checkpoint_every,
                          keep_checkpoints=t.keep_checkpoints, host_batches=host_batches,
                          description="aptp")
  trained = {n: jax.tree.map(lambda x, i=i: x[i], result.state.params)
             for i, n in enumerate(names)}
  return router_gd, trained, result.history


# ------------------------------------------------------------------------------ evaluation


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _teacher(graphdef, params, x0, tokens, key, alphas_cumprod):
  x_t, t = aptp.noisy_batch(x0, key, alphas_cumprod)
  return x_t, t, unet.apply_unet(graphdef, params, x_t, t, tokens)


@functools.partial(jax.jit, static_argnames=("structure", "graphdef"))
def _expert_errors(structure, graphdef, params, masks, x_t, t, tokens, teacher_eps):
  """Per-sample eps-MSE [B] of the UNet gated per sample by `masks` [B, G] to the teacher."""
  pred = aptp_gates.gated_apply(structure, graphdef, params, x_t, t, tokens, masks)
  return jnp.mean((pred - teacher_eps) ** 2, axis=(1, 2, 3))


@functools.partial(jax.jit, static_argnames=("structure", "router_gd", "settings"))
def _route(structure, router_gd, settings, params, emb):
  return aptp.route(structure, router_gd, params, emb, settings)


def evaluate(config, teacher, structure, router_gd, params, ev, emb, *, settings,
             eps: bool = True, static: bool = False):
  """Routing, MACs and (optionally) eps-MSE of one trained model on the evaluation prompts."""
  graphdef, uparams, _, ac = teacher
  index, masks = _route(structure, router_gd, settings, params, jnp.asarray(emb))
  index, masks = np.asarray(index), np.asarray(masks)
  if static:
    index = np.zeros_like(index)  # the single-mask baseline always uses its code 0
  ratios = np.asarray(aptp_gates.resource_ratio(structure, jnp.asarray(masks)))
  out = dict(index=index, masks=masks, code_ratios=ratios, prompt_ratios=ratios[index])
  if not eps:
    return out
  errs = np.zeros(len(emb))
  bs = config.eval.batch_size
  key = jax.random.key(config.eval.seed + 1)
  for lo in range(0, len(emb), bs):
    sl = slice(lo, lo + bs)
    tokens = jnp.asarray(ev.tokens[sl])
    x_t, t, teacher_eps = _teacher(graphdef, uparams, jnp.asarray(ev.images[sl]), tokens,
                                   jax.random.fold_in(key, lo), ac)
    errs[sl] = np.asarray(_expert_errors(structure, graphdef, uparams,
                                         jnp.asarray(masks[index[sl]]), x_t, t, tokens,
                                         teacher_eps))
  out["eps_mse"] = float(errs.mean())
  return out


@functools.partial(jax.jit, static_argnames=("structure",))
def _gate(structure, params, mask):
  return aptp_gates.gate_params(structure, params, mask)


def _samples(config, teacher, structure, masks, index, tokens):
  """CFG DDIM samples: each prompt from its expert's mask (masks None: the dense teacher)."""
  from jaxrepro.launch import toy_t2i
  graphdef, uparams, cfg, ac = teacher
  key = jax.random.key(config.eval.seed + 2)
  steps = config.eval.sample_steps
  if masks is None:
    return np.asarray(toy_t2i.generate(toy_t2i.StandIn(graphdef, uparams, cfg, ac), tokens,
                                       key, num_steps=steps))
  out = np.zeros((len(tokens), 16, 16, 3), np.float32)
  for k in np.unique(index):
    # Every expert samples all prompts (one batch shape, one compile of the sampler step,
    # the teacher's initial noise) and keeps the prompts routed to it.
    standin = toy_t2i.StandIn(graphdef, _gate(structure, uparams, jnp.asarray(masks[k])), cfg, ac)
    images = np.asarray(toy_t2i.generate(standin, tokens, key, num_steps=steps))
    out[index == k] = images[index == k]
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  from jaxrepro.launch import toy_judge
  from jaxrepro.launch.data import toy_shapes

  start = time.perf_counter()
  teacher = load_teacher(config)
  graphdef, uparams, cfg, ac = teacher
  if (cfg.image_size, cfg.in_channels) != (16, 3):
    raise ConfigError("aptp's data and judge need a 16x16x3 UNet")
  structure = aptp_gates.make_structure(cfg, toy_shapes.PROMPT_LEN)
  print(f"aptp: gates {aptp_gates.describe(structure)}")
  pool = toy_shapes.sample(POOL_SEED, config.train.pool_size)
  k = config.aptp.num_codes

  router_gd, trained, history = train_all(config, workdir, teacher, structure, pool)
  # Training-time routing balance (Sinkhorn / argmax on each batch): the mean per-batch
  # largest code share over the last quarter of the steps.
  tail = [row for row in history if row["step"] > 0.75 * config.train.num_steps]
  train_shares = {f"train_max_share/{name}": float(np.mean(
      [row[f"train/{name}/max_share"] for row in tail])) for name in trained
      if name != "static"}

  e = config.eval
  ev = toy_shapes.sample(e.seed, e.num_prompts)
  vocab = len(toy_shapes.VOCAB)
  emb = np.asarray(aptp.bag_of_words(jnp.asarray(ev.tokens), vocab))
  complex_ = np.array(["striped" in p.split() for p in ev.prompts])
  settings = settings_from(config)
  results = {name: evaluate(config, teacher, structure, router_gd, params, ev, emb,
                            settings=settings, eps=not name.startswith("no_ot"),
                            static=name == "static")
             for name, params in trained.items()}

  summary = {}
  r = results["aptp"]
  summary["flops_ratio/simple"] = float(r["prompt_ratios"][~complex_].mean())
  summary["flops_ratio/complex"] = float(r["prompt_ratios"][complex_].mean())
  summary["flops_gap_complex_minus_simple"] = (summary["flops_ratio/complex"]
                                               - summary["flops_ratio/simple"])
  for name, res in results.items():
    summary[f"avg_flops_ratio/{name}"] = float(res["prompt_ratios"].mean())
    if "eps_mse" in res:
      summary[f"eps_mse/{name}"] = res["eps_mse"]
    shares = np.bincount(res["index"], minlength=len(res["code_ratios"])) / len(res["index"])
    summary[f"max_code_share/{name}"] = float(shares.max())
  summary["avg_total_macs_ratio/aptp"] = float(np.mean(np.asarray(
      aptp_gates.total_macs_ratio(structure, jnp.asarray(r["masks"][r["index"]])))))
  summary["avg_flops_ratio_gap_abs/aptp_vs_static"] = abs(
      summary["avg_flops_ratio/aptp"] - summary["avg_flops_ratio/static"])
  static_mse = summary["eps_mse/static"]
  summary["distill_mse_reduction_vs_static"] = (
      1.0 - summary["eps_mse/aptp"] / static_mse if static_mse > 0 else float("nan"))
  summary["max_code_share/ot"] = summary["max_code_share/aptp"]
  summary["max_code_share/no_ot"] = max(summary[f"max_code_share/no_ot_s{s}"]
                                        for s in _seeds(config))
  for fam, sel in (("simple", ~complex_), ("complex", complex_)):
    counts = np.bincount(r["index"][sel], minlength=k) / max(1, sel.sum())
    for j in range(k):
      summary[f"code_share/{fam}/{j}"] = float(counts[j])
  for j in range(k):
    summary[f"code_flops_ratio/{j}"] = float(r["code_ratios"][j])

  # Judge quality of CFG samples for the first num_samples evaluation prompts.
  n = e.num_samples
  tokens, labels = ev.tokens[:n], {a: v[:n] for a, v in ev.labels.items()}
  reference = toy_shapes.sample(e.reference_seed, max(n, 2)).images
  judge = toy_judge.load() if n else None
  for name, masks, index in (("teacher", None, None),
                             ("aptp", r["masks"], r["index"][:n]),
                             ("static", results["static"]["masks"],
                              results["static"]["index"][:n])) if n else ():
    images = _samples(config, teacher, structure, masks, index, tokens)
    scores = toy_judge.evaluate(images, labels, reference, judge)
    for metric in ("prompt_accuracy", "colour_accuracy", "shape_accuracy", "kid",
                   "frechet_distance"):
      summary[f"judge/{name}/{metric}"] = float(scores[metric])
  summary["seconds"] = round(time.perf_counter() - start, 1)
  summary.update(train_shares)

  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(int(config.train.num_steps), {f"final/{k_}": v
                                                       for k_, v in summary.items()})
  if jax.process_index() == 0:
    _plot(os.path.join(workdir, "aptp_routing.png"), r, complex_, k)
  return summary


def _plot(path, result, complex_, k):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
  width = 0.38
  for i, (fam, sel) in enumerate((("simple", ~complex_), ("complex", complex_))):
    counts = np.bincount(result["index"][sel], minlength=k) / max(1, sel.sum())
    ax1.bar(np.arange(k) + (i - 0.5) * width, counts, width, label=fam)
  ax1.set_xticks(range(k), [f"code {j}\nr={result['code_ratios'][j]:.2f}" for j in range(k)])
  ax1.set_ylabel("share of prompts")
  ax1.set_title("code usage per prompt family")
  ax1.legend()
  bins = np.linspace(0, 1, 21)
  for fam, sel in (("simple", ~complex_), ("complex", complex_)):
    ax2.hist(result["prompt_ratios"][sel], bins=bins, alpha=0.6, label=fam, density=True)
  ax2.set_xlabel("prunable MACs ratio of the routed expert")
  ax2.set_title("FLOPs distribution")
  ax2.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Analytic MACs and measured CPU forward time of a sliced expert's ResBlocks vs dense.

  A gated expert still has the dense shapes, so its forward time is the dense one; the
  speed-up needs the pruned channels sliced away. We keep 5 of the 8 GroupNorm groups of
  every ResBlock's hidden channels of the toy UNet (close to the demo's p = 0.6), slice
  conv1 / time_proj / conv2 accordingly (genuinely smaller convolutions) and time the eight
  ResBlocks' convolutions against the dense ones. The ResBlocks hold most of the prunable
  MACs (see the MACs row); attention and norms are left out of the timing.
  """
  from flax import nnx

  from jaxrepro.launch.data import toy_shapes
  cfg = unet.UNetConfig(channels=16, vocab_size=len(toy_shapes.VOCAB),
                        max_prompt_len=toy_shapes.PROMPT_LEN)
  _, params = unet.random_unet(cfg, 0)
  structure = aptp_gates.make_structure(cfg, toy_shapes.PROMPT_LEN)
  pure = nnx.to_pure_dict(params)
  keep = 5
  mask = np.ones(structure.num_gates, np.float32)
  res_sets = [s for s in structure.gate_sets if s.kind == "res"]
  for s in res_sets:
    mask[s.offset + keep:s.offset + s.size] = 0.0
  ratio = float(aptp_gates.resource_ratio(structure, jnp.asarray(mask)))
  batch = 16 if quick else 64
  key = jax.random.key(0)
  temb = jax.random.normal(key, (batch, cfg.temb_dim))
  n_levels = len(cfg.resolutions)

  def stack(groups):
    layers, inputs = [], []
    for s in res_sets:
      path = structure.blocks[s.block].path
      p = pure
      for k_ in path:
        p = p[k_]
      kept = groups * s.unit
      layers.append((p["conv1"]["kernel"][..., :kept], p["conv1"]["bias"][:kept],
                     p["time_proj"]["kernel"][:, :kept], p["conv2"]["kernel"][:, :, :kept]))
      level = (path[1] if path[0] == "down" else
               n_levels - 1 - path[1] if path[0] == "up" else n_levels - 1)
      size = cfg.resolutions[level]
      inputs.append(jax.random.normal(key, (batch, size, size,
                                            p["conv1"]["kernel"].shape[2])))
    return layers, inputs

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @jax.jit
  def run(layers, inputs):
    total = 0.0
    for (w1, b1, wt, w2), x in zip(layers, inputs):
      y = conv(jax.nn.silu(x), w1) + b1 + (jax.nn.silu(temb) @ wt)[:, None, None]
      total = total + jnp.sum(conv(jax.nn.silu(y), w2))
    return total

  dense, sliced = stack(cfg.num_groups), stack(keep)
  timing = benchmarking.interleaved({"sliced": lambda: run(*sliced),
                                     "dense": lambda: run(*dense)}, rounds=3 if quick else 7)
  full = structure.full_prunable_macs
  return [
      benchmarking.Row(
          PAPER, f"analytic prunable MACs per image, ResBlock hidden width {keep}/"
          f"{cfg.num_groups} kept vs dense (toy UNet 16x16, channels 16)", "pruned expert",
          "dense", ratio * full / 1e6, full / 1e6, "M MACs", 1.0 / ratio,
          note=f"ratio = dense / pruned; whole network {structure.full_macs / 1e6:.2f} M "
               "MACs including non-prunable layers"),
      benchmarking.time_row(
          PAPER, f"8 ResBlocks' convolutions, batch {batch}, hidden channels sliced to "
          f"{keep}/{cfg.num_groups} groups vs dense", ("sliced expert", timing["sliced"]),
          ("dense", timing["dense"]),
          note="genuinely smaller convolutions (GroupNorm and attention not timed)"),
  ]
