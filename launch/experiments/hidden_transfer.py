"""Experiment driver for `hidden_transfer`.

Library: `jaxrepro.algorithms.decoding.hidden_transfer`.

The shipped SynthLang target (`launch.pretrained_lms`, 4 layers, d = 96) stays frozen. Two
drafters for the same k future offsets are trained on the same data with the same budget
(`launch.train_loop`, one prefix and checkpoint directory each, so both runs log and
resume): hidden-transfer maps injected at layer t, and Medusa-1 heads on the final hidden
state (the baseline). Every step draws the same source sequences and cut points for both
(the batch depends only on the step's key, and both runs share the base key).

Evaluation:
* top-1/top-5 accuracy of each offset's draft on held-out source text, per method;
* each method's sparse tree (Medusa's greedy construction from its own held-out rank
  accuracies, the same node budget), then greedy tree decoding of held-out prompts, one
  target pass per round, checked token for token against greedy autoregressive decoding;
* accepted tokens per target pass, target passes per token, and the speed-up over
  autoregressive decoding in virtual time (`algorithms.decoding.virtual_clock`): a round
  costs one tree pass t_tree (measured per method: hidden transfer's pass carries k pseudo
  states per node, so it is N (1 + k) slots wide; Medusa's is N wide plus its heads), a
  token of autoregressive decoding one single-token call t_ar. Two regimes: `cpu` (the costs
  measured here, chained inside one jitted loop, minimum over repeats) and `memory_bound`
  (every pass costs t_ar, the GPU regime the paper measures in, where the speed-up equals
  tokens per pass). A batch-1 wall-clock ratio on a few prompts is reported next to them.
"""

import functools
import json
import math
import os
import tempfile
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from jaxrepro.algorithms.decoding import hidden_transfer as ht
from jaxrepro.algorithms.decoding import sampling, speculative, virtual_clock
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import (
  benchmarking,
  experiment,
  metric_writers,
  plotting,
  pretrained_lms,
  train_loop,
)
from jaxrepro.models import transformer as tfm

PAPER = "hidden_transfer"
METHODS = ("hidden_transfer", "medusa")
REGIMES = ("cpu", "memory_bound")

CLAIMS = (
    experiment.Claim(
        "more_tokens_per_pass_than_medusa",
        "Greedy tree decoding with hidden-transfer drafts commits at least as many tokens per "
        "target pass as with Medusa-1 heads trained on the same data with the same budget and "
        "the same tree size (ratio of the means over held-out prompts)",
        "tokens_per_pass/hidden_transfer_over_medusa", 1.0,
        note="Card 4.4 ('mean accepted length >= Medusa's'); tokens per pass count the "
        "target's bonus token. Each method decodes with its own sparse tree of the same "
        "node budget, built from its own held-out accuracies, as Medusa does. The paper's "
        "own numbers (LLaMA-scale) could not be read; the threshold is the card's. Fails "
        "here (demo run 2026-11-25: 3.55 vs 3.88 tokens per pass). Our reading: the shipped "
        "target has 4 layers, so pseudo states injected at layer 2 pass only 2 frozen "
        "blocks and the frozen LM head (28k trainable parameters), while every Medusa head "
        "trains its own output layer (56k in all); with the equal step budget hidden "
        "transfer's loss was still falling (2.35 -> 2.17 from step 200 to 400) where "
        "Medusa's had levelled off (1.87 -> 1.77). Budget and threshold are kept as fixed "
        "before measuring."),
    experiment.Claim(
        "higher_top1_at_offsets_2_3",
        "Hidden transfer's held-out top-1 accuracy at offsets +2 and +3 exceeds Medusa-1's "
        "by at least 2 points (the smaller of the two gains)", "top1_gain/min_offsets_2_3",
        0.02,
        note="Card 4.4; the abstract's 'superior predictive accuracy of the future tokens'. "
        "Offsets are relative to the last context token (+1 is the target's own next token). "
        "Fails in the demo (top-1 at +2/+3: 0.49/0.50 vs Medusa's 0.60/0.55); see the "
        "previous claim's note for our reading."),
    experiment.Claim(
        "lossless_hidden_transfer",
        "Greedy tree decoding with hidden transfer equals greedy autoregressive decoding "
        "token for token (fraction of held-out prompts with identical output)",
        "lossless/hidden_transfer", 1.0),
    experiment.Claim(
        "lossless_medusa",
        "Greedy tree decoding with Medusa heads equals greedy autoregressive decoding token "
        "for token (fraction of held-out prompts)", "lossless/medusa", 1.0),
)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(
      config, "transfer.num_future", "data.seq_len", "data.cuts_per_seq", "data.min_context",
      "data.val_sequences", "optimizer.learning_rate", "optimizer.batch_size",
      "tree.num_candidates", "tree.max_rank", "decode.max_new", "decode.num_prompts",
      "clock.context", "clock.calls", "clock.repeats")
  target = pretrained_lms.CONFIGS[config.model.target]
  t, k, d = config.transfer, config.transfer.num_future, config.data
  if not 0 <= t.layer <= target.num_layers:
    raise ConfigError(f"config.transfer.layer={t.layer} must be in 0..{target.num_layers} "
                      "(the target's number of layers)")
  if d.min_context + k + 2 > d.seq_len:
    raise ConfigError(f"config.data.seq_len={d.seq_len} must be >= data.min_context + "
                      f"transfer.num_future + 2 = {d.min_context + k + 2} (a cut needs its "
                      "k + 1 future tokens)")
  if d.seq_len > target.max_len:
    raise ConfigError(f"config.data.seq_len={d.seq_len} exceeds the target's max_len "
                      f"{target.max_len}")
  if config.tree.max_rank > target.vocab_size:
    raise ConfigError(f"config.tree.max_rank={config.tree.max_rank} must be <= the "
                      f"vocabulary size {target.vocab_size}")
  p = config.decode
  if p.prompt_len < 2:
    raise ConfigError(f"config.decode.prompt_len={p.prompt_len} must be >= 2")
  if p.prompt_len + p.max_new + k - 1 > target.max_len:
    raise ConfigError(f"config.decode.prompt_len + decode.max_new + transfer.num_future - 1 = "
                      f"{p.prompt_len + p.max_new + k - 1} exceeds max_len {target.max_len}")
  if config.train.checkpoint_every % config.train.log_every:
    raise ConfigError(f"config.train.checkpoint_every={config.train.checkpoint_every} must "
                      f"be a multiple of train.log_every={config.train.log_every}")
  if config.optimizer.warmup_steps < 0:
    raise ConfigError(f"config.optimizer.warmup_steps={config.optimizer.warmup_steps} must "
                      "be >= 0")
  if config.clock.wallclock_prompts < 0:
    raise ConfigError(f"config.clock.wallclock_prompts={config.clock.wallclock_prompts} "
                      "must be >= 0")


# ---------------------------------------------------------------------------------- models


class Drafter(NamedTuple):
  """A trained drafter: its graphdef and params, the `TreeLM` and its params."""
  graphdef: object
  params: object
  lm: ht.TreeLM
  lm_params: tuple


def init_drafter(config, method: str, target: pretrained_lms.PretrainedLM):
  """(graphdef, params) of a fresh drafter for `method`."""
  k = config.transfer.num_future
  key = jax.random.key(config.seed + 7)
  if method == "hidden_transfer":
    return ht.init_transfer(target.config.d_model, k, key, init=config.transfer.init)
  return ht.init_medusa_heads(target.graphdef, target.params, k, key)


def drafts_fn(config, method: str, target: pretrained_lms.PretrainedLM, graphdef):
  """`(params, tokens [B, S], cuts [B, C]) -> [B, C, k, V]` teacher-forced drafts."""
  if method == "hidden_transfer":
    return functools.partial(_transfer_drafts, target.graphdef, target.params, graphdef,
                             layer=config.transfer.layer)
  return functools.partial(_medusa_drafts, target.graphdef, target.params, graphdef)


def _transfer_drafts(tg, tp, graphdef, params, tokens, cuts, *, layer):
  return ht.transfer_drafts(tg, tp, graphdef, params, tokens, cuts, layer=layer)


def _medusa_drafts(tg, tp, graphdef, params, tokens, cuts):
  return ht.medusa_drafts(tg, tp, graphdef, params, tokens, cuts)


def tree_lm(config, method: str, target: pretrained_lms.PretrainedLM, graphdef) -> ht.TreeLM:
  k = config.transfer.num_future
  if method == "hidden_transfer":
    return ht.hidden_transfer_lm(target.config, target.graphdef, graphdef, num_future=k,
                                 layer=config.transfer.layer)
  return ht.medusa_lm(target.config, target.graphdef, graphdef, num_heads=k)


# ------------------------------------------------------------------------------------ data


def batch_fn(config):
  """`key -> (tokens [B, S], cuts [B, C])`: source sequences and random cut points.

  Both methods call it with the same per-step keys, so they see the same data.
  """
  lang = pretrained_lms.language()
  d, k, b = config.data, config.transfer.num_future, config.optimizer.batch_size

  def sample(key):
    k_seq, k_cut = jax.random.split(key)
    tokens = lang.sample_jax(k_seq, b, d.seq_len)
    # A cut n needs x_{n+2..n+k+1}: n <= S - k - 2.
    cuts = jax.random.randint(k_cut, (b, d.cuts_per_seq), d.min_context,
                              d.seq_len - k - 1)
    return tokens, cuts
  return sample


def val_data(config) -> tuple[jax.Array, jax.Array]:
  """Held-out source sequences and every valid cut of each: ([n, S], [n, C_all])."""
  d, k = config.data, config.transfer.num_future
  tokens = pretrained_lms.language().sample(2000 + config.seed, d.val_sequences, d.seq_len)
  cuts = np.arange(d.min_context, d.seq_len - k - 1)
  return jnp.asarray(tokens), jnp.asarray(np.broadcast_to(cuts, (d.val_sequences, len(cuts))))


def prompts(config, n: int, split: int = 3000) -> jax.Array:
  """[n, P] held-out source prefixes (a seed range no training or validation data uses)."""
  return jnp.asarray(pretrained_lms.language().sample(split + config.seed, n,
                                                      config.decode.prompt_len))


# -------------------------------------------------------------------------------- training


def accuracy_fn(config, drafts, num_ranks: int):
  """A jitted `(params, tokens [b, S], cuts [b, C]) -> [k, num_ranks]` rank accuracy."""
  k = config.transfer.num_future
  return jax.jit(lambda p, x, c: ht.rank_accuracy(drafts(p, x, c), ht.future_targets(x, c, k),
                                                  num_ranks))


def rank_accuracy(acc_fn, params, tokens, cuts, max_chunk: int = 64) -> np.ndarray:
  """acc[i, r] over held-out cuts, in equal chunks of sequences (one compiled shape)."""
  n = tokens.shape[0]
  chunk = math.gcd(n, max_chunk)
  parts = [np.asarray(acc_fn(params, tokens[i:i + chunk], cuts[i:i + chunk]))
           for i in range(0, n, chunk)]
  return np.mean(np.stack(parts), axis=0)


def train_drafter(config, workdir: str, method: str, target: pretrained_lms.PretrainedLM,
                  acc_fn=None) -> tuple[object, object, train_loop.FitResult]:
  """Trains one drafter with `train_loop.fit` (prefix `<method>/`, resumable).

  `acc_fn` (from `accuracy_fn`, optional) computes the held-out accuracy that is logged.
  """
  o, t, k = config.optimizer, config.train, config.transfer.num_future
  graphdef, params = init_drafter(config, method, target)
  drafts = drafts_fn(config, method, target, graphdef)
  warmup = max(1, min(o.warmup_steps, t.num_steps // 2))
  schedule = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup,
                                                max(t.num_steps, warmup + 1))
  tx = optax.adam(schedule)

  def loss_fn(params, batch, key):
    del key
    tokens, cuts = batch
    loss, per_offset = ht.draft_cross_entropy(drafts(params, tokens, cuts),
                                              ht.future_targets(tokens, cuts, k))
    return loss, {f"nll_offset_{i + 2}": per_offset[i] for i in range(k)}

  val_tokens, val_cuts = val_data(config)
  acc_fn = acc_fn or accuracy_fn(config, drafts, 1)

  def eval_fn(params):
    acc = rank_accuracy(acc_fn, params, val_tokens, val_cuts)
    return {f"top1_offset_{i + 2}": float(acc[i, 0]) for i in range(k)}

  # The same base key for both methods: step s draws the same batch for each.
  state = train_loop.TrainState.create(params, tx, jax.random.key(config.seed + 1))
  step = train_loop.make_train_step(loss_fn, tx, batch_fn=batch_fn(config))
  result = train_loop.fit(state, step, num_steps=t.num_steps, log_every=t.log_every,
                          workdir=workdir, checkpoint_every=t.checkpoint_every,
                          keep_checkpoints=t.keep_checkpoints, eval_fn=eval_fn,
                          prefix=f"{method}/", description=f"{method} drafter")
  return graphdef, result.state.params, result


# -------------------------------------------------------------------------------- decoding


class DecodeStats(NamedTuple):
  """Per-prompt results of greedy tree decoding."""
  tokens_per_pass: np.ndarray  # [n] committed tokens / target passes (bonus included)
  identical: np.ndarray  # [n] bool, output == greedy autoregressive output
  rounds: np.ndarray  # [n] target passes
  generated: np.ndarray  # [n] committed tokens (may exceed max_new by < tree depth)


def greedy_reference(config, target: pretrained_lms.PretrainedLM, prompt_batch) -> np.ndarray:
  """[n, max_new] greedy autoregressive continuations of the prompts."""
  p = config.decode
  ar = speculative.make_autoregressive_decoder(
      speculative.transformer_lm(target.config, target.graphdef), prompt_len=p.prompt_len,
      max_new=p.max_new, config=sampling.GREEDY)
  run = jax.jit(jax.vmap(ar, in_axes=(None, 0, None, None)))
  return np.asarray(run(target.params, prompt_batch, p.prompt_len, jax.random.key(0)).tokens)


def decode_tree(config, drafter: Drafter, tree: ht.Tree, prompt_batch, reference
                ) -> DecodeStats:
  p = config.decode
  dec = ht.make_tree_decoder(drafter.lm, tree, prompt_len=p.prompt_len, max_new=p.max_new)
  out = jax.jit(jax.vmap(dec, in_axes=(None, 0, None)))(drafter.lm_params, prompt_batch,
                                                         p.prompt_len)
  rounds, generated = np.asarray(out.rounds), np.asarray(out.num_generated)
  identical = np.all(np.asarray(out.tokens) == reference, axis=1)
  return DecodeStats(generated / rounds, identical, rounds, generated)


# ----------------------------------------------------------------------------------- costs


def _chained_pass(apply, params, tokens, positions, mask, init_cache, prefill, *,
                  context: int, calls: int):
  """A jitted `params -> token` running `calls` passes in a loop, each fed the previous
  pass's argmax (so none can be skipped, hoisted or merged)."""
  def run(params):
    cache = prefill(params, init_cache())

    def body(_, toks):
      out = apply(params, cache._replace(lengths=jnp.full((1,), context, jnp.int32)), toks,
                  positions, mask)
      nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
      if hasattr(out, "drafts"):
        # The drafts are part of a pass's output: make the loop depend on them too.
        nxt = (nxt + jnp.argmax(out.drafts[:, -1, -1], axis=-1).astype(jnp.int32)) % 2
      return (toks + nxt[:, None]) % 2
    return lax.fori_loop(0, calls, body, tokens)
  return jax.jit(run)


def measure_pass_costs(config, target: pretrained_lms.PretrainedLM,
                       drafters: dict[str, Drafter], trees: dict[str, ht.Tree]
                       ) -> dict[str, float]:
  """Seconds per pass: `ar` (one token, plain target) and each method's tree pass.

  Each pass kind is timed chained inside one jitted loop at `calls` and `calls // 2`
  passes; the difference removes the prefill, and the minimum over `repeats` interleaved
  timings is kept (on a shared machine slower samples measure the other tenants).
  """
  c = config.clock
  cfg, tg, tp = target.config, target.graphdef, target.params
  ar_lm = speculative.transformer_lm(cfg, tg)

  def prefill(params, cache):
    tparams = params[0] if isinstance(params, tuple) else params
    return tfm.apply_cached(tg, tparams, cache, jnp.zeros((1, c.context), jnp.int32)).cache

  kinds = {"ar": (ar_lm.apply, tp, jnp.zeros((1, 1), jnp.int32), None, None,
                  lambda: tfm.init_cache(cfg, 1, c.context + 1))}
  for name, d in drafters.items():
    tree = trees[name]
    n = tree.num_nodes
    slots = c.context + n * d.lm.slots_per_token
    kinds[name] = (d.lm.apply, d.lm_params, jnp.zeros((1, n), jnp.int32),
                   jnp.asarray(c.context + tree.depth)[None], jnp.asarray(tree.mask)[None],
                   functools.partial(tfm.init_cache, cfg, 1, slots))
  half = max(1, c.calls // 2)
  fns = {}
  for name, (apply, params, toks, pos, mask, init) in kinds.items():
    for calls in sorted({c.calls, half}):
      fn = _chained_pass(apply, params, toks, pos, mask, init, prefill, context=c.context,
                         calls=calls)
      fns[name, calls] = functools.partial(fn, params)
  for fn in fns.values():
    jax.block_until_ready(fn())  # compile
  best = {key: math.inf for key in fns}
  for _ in range(c.repeats):
    for key, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      best[key] = min(best[key], time.perf_counter() - start)
  out = {}
  for name in kinds:
    per = best[name, c.calls] / c.calls
    if c.calls > half and best[name, c.calls] > best[name, half]:
      per = (best[name, c.calls] - best[name, half]) / (c.calls - half)
    # Otherwise noise swamped the difference: keep the upper bound (prefill included).
    out[name] = per
  return out


def cost_model(costs: dict[str, float], method: str, tree: ht.Tree) -> virtual_clock.CostModel:
  """The shared clock's model of a method: width N (its tree) costs t_tree, width 1 t_ar.

  There is no draft model (draft cost 0): a round of `speculative_time` with N - 1 drafted
  tokens then costs exactly one tree pass.
  """
  n = tree.num_nodes
  return virtual_clock.CostModel(target=(costs["ar"],) + (costs[method],) * (n - 1), draft=0.0)


def wallclock(config, target, drafters, trees, prompt_batch, rounds: int = 3
              ) -> dict[str, benchmarking.Timing]:
  """Real seconds to decode the prompts one at a time (batch 1): AR and each tree decoder."""
  p = config.decode
  ar = speculative.make_autoregressive_decoder(
      speculative.transformer_lm(target.config, target.graphdef), prompt_len=p.prompt_len,
      max_new=p.max_new, config=sampling.GREEDY)
  key = jax.random.key(0)
  fns = {"ar": lambda: [ar(target.params, x, p.prompt_len, key).tokens for x in prompt_batch]}
  for name, d in drafters.items():
    dec = ht.make_tree_decoder(d.lm, trees[name], prompt_len=p.prompt_len, max_new=p.max_new)
    fns[name] = functools.partial(
        lambda dec, lp: [dec(lp, x, p.prompt_len).tokens for x in prompt_batch], dec,
        d.lm_params)
  return benchmarking.interleaved(fns, rounds=rounds)


# ------------------------------------------------------------------------------------- run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  target = pretrained_lms.load(config.model.target)
  k = config.transfer.num_future
  summary, report = {}, {"accuracy": {}, "trees": {}, "decode": {}}
  val_tokens, val_cuts = val_data(config)
  num_ranks = max(5, config.tree.max_rank)
  drafters, trees, acc = {}, {}, {}
  for method in METHODS:
    graphdef, _ = init_drafter(config, method, target)
    acc_fn = accuracy_fn(config, drafts_fn(config, method, target, graphdef), num_ranks)
    graphdef, params, fit = train_drafter(config, workdir, method, target, acc_fn)
    summary[f"{method}/train_seconds"] = round(fit.seconds, 1)
    summary[f"{method}/final_train_loss"] = fit.history[-1][f"{method}/train/loss"]
    acc[method] = rank_accuracy(acc_fn, params, val_tokens, val_cuts)
    for i in range(k):
      summary[f"{method}/top1/offset_{i + 2}"] = float(acc[method][i, 0])
      summary[f"{method}/top5/offset_{i + 2}"] = float(acc[method][i, :5].sum())
    lm = tree_lm(config, method, target, graphdef)
    drafters[method] = Drafter(graphdef, params, lm, (target.params, params))
    trees[method] = ht.sparse_tree(acc[method][:, :config.tree.max_rank],
                                   config.tree.num_candidates)
    summary[f"{method}/tree_depth"] = trees[method].max_depth
    summary[f"{method}/tree_expected_accepted"] = ht.expected_accepted(
        trees[method], acc[method][:, :config.tree.max_rank])
    report["accuracy"][method] = acc[method].tolist()
    report["trees"][method] = [list(p) for p in trees[method].paths]
  gains = [summary[f"hidden_transfer/top1/offset_{o}"] - summary[f"medusa/top1/offset_{o}"]
           for o in range(2, min(k, 2) + 2)]
  summary["top1_gain/min_offsets_2_3"] = float(min(gains))

  start = time.perf_counter()
  prompt_batch = prompts(config, config.decode.num_prompts)
  reference = greedy_reference(config, target, prompt_batch)
  stats = {m: decode_tree(config, drafters[m], trees[m], prompt_batch, reference)
           for m in METHODS}
  summary["decode_seconds"] = round(time.perf_counter() - start, 1)
  for m, s in stats.items():
    summary[f"tokens_per_pass/{m}"] = float(s.tokens_per_pass.mean())
    summary[f"accepted_per_pass/{m}"] = float(s.tokens_per_pass.mean() - 1.0)
    summary[f"passes_per_token/{m}"] = float(np.sum(s.rounds) / np.sum(s.generated))
    summary[f"lossless/{m}"] = float(s.identical.mean())
    report["decode"][m] = {"tokens_per_pass": s.tokens_per_pass.tolist(),
                           "rounds": s.rounds.tolist(), "generated": s.generated.tolist()}
  summary["tokens_per_pass/hidden_transfer_over_medusa"] = (
      summary["tokens_per_pass/hidden_transfer"] / summary["tokens_per_pass/medusa"])
  # Held-out prompts where hidden transfer commits more tokens per pass than Medusa.
  summary["tokens_per_pass/fraction_prompts_ht_better"] = float(np.mean(
      stats["hidden_transfer"].tokens_per_pass > stats["medusa"].tokens_per_pass))

  start = time.perf_counter()
  costs = measure_pass_costs(config, target, drafters, trees)
  summary["cost/seconds"] = round(time.perf_counter() - start, 1)
  summary["cost/t_ar_us"] = costs["ar"] * 1e6
  for m in METHODS:
    summary[f"cost/t_tree_{m}_us"] = costs[m] * 1e6
    summary[f"cost/r_tree_{m}"] = costs[m] / costs["ar"]
    model = cost_model(costs, m, trees[m])
    for regime, c in (("cpu", model), ("memory_bound", model.memory_bound())):
      s = stats[m]
      drafted = np.repeat(trees[m].num_nodes - 1, int(s.rounds.sum()))
      t_spec = virtual_clock.speculative_time(c, drafted)
      t_ar = virtual_clock.autoregressive_time(c, int(s.generated.sum()))
      summary[f"{regime}/speedup_vs_ar/{m}"] = t_ar / t_spec
  for regime in REGIMES:
    summary[f"{regime}/speedup/hidden_transfer_over_medusa"] = (
        summary[f"{regime}/speedup_vs_ar/hidden_transfer"]
        / summary[f"{regime}/speedup_vs_ar/medusa"])

  if config.clock.wallclock_prompts > 0:
    t = wallclock(config, target, drafters, trees,
                  prompt_batch[:config.clock.wallclock_prompts])
    for m in METHODS:
      summary[f"wallclock/speedup_vs_ar/{m}"] = t["ar"].median_s / t[m].median_s

  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(config.train.num_steps,
                         {f"final/{key}": v for key, v in summary.items()
                          if isinstance(v, (int, float))})
  if jax.process_index() == 0:
    report["costs_s"] = costs
    with open(os.path.join(workdir, "hidden_transfer.json"), "w") as f:
      json.dump(report, f, indent=1)
    _plot(workdir, config, acc, stats)
  return summary


def _plot(workdir, config, acc, stats):
  """Held-out top-1/top-5 accuracy per offset and tokens per pass: `hidden_transfer.png`."""
  plt = plotting.plt
  k = config.transfer.num_future
  offsets = np.arange(2, k + 2)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
  colors = {"hidden_transfer": "tab:red", "medusa": "tab:blue"}
  for m in METHODS:
    axes[0].plot(offsets, acc[m][:, 0], "o-", color=colors[m], label=f"{m} top-1")
    axes[0].plot(offsets, acc[m][:, :5].sum(1), "s--", color=colors[m], label=f"{m} top-5")
  axes[0].set(xlabel="offset (+1 = the target's next token)", ylabel="held-out accuracy",
              xticks=offsets, title="future-token accuracy")
  axes[0].legend(fontsize=7)
  data = [stats[m].tokens_per_pass for m in METHODS]
  axes[1].boxplot(data)
  axes[1].set_xticks(range(1, len(METHODS) + 1), METHODS)
  axes[1].set(ylabel="tokens per target pass", title="greedy tree decoding, held-out prompts")
  for ax in axes:
    ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "hidden_transfer.png"))
  plt.close(fig)


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Real wall-clock: one tree pass of each method vs one single-token target call, and
  batch-1 greedy decoding with each tree decoder vs autoregressive decoding.

  The drafters are trained with the smoke settings (seconds): pass costs do not depend on
  their quality, but the decode rows' tokens per pass (and so their speed) do, so those rows
  understate what the demo's drafters reach; the demo reports the trained numbers.
  """
  config = experiment.config_module(PAPER).get_config("demo")
  small = experiment.config_module(PAPER).get_config("smoke")
  config.unlock()
  config.clock.update(calls=32, repeats=3 if quick else 7)
  target = pretrained_lms.load(config.model.target)
  drafters, trees = {}, {}
  with tempfile.TemporaryDirectory() as workdir:
    for m in METHODS:
      graphdef, params, _ = train_drafter(small, workdir, m, target)
      drafters[m] = Drafter(graphdef, params, tree_lm(config, m, target, graphdef),
                            (target.params, params))
      trees[m] = ht.product_tree([4, 2, 2][:config.transfer.num_future])
  costs = measure_pass_costs(config, target, drafters, trees)
  n = trees["medusa"].num_nodes
  rows = []
  for m in METHODS:
    width = n * drafters[m].lm.slots_per_token
    rows.append(benchmarking.Row(
        PAPER, f"one tree pass ({n} nodes, {width} cache slots) vs one single-token target "
        f"call, context {config.clock.context}", f"{m} tree pass", "target, 1 token",
        costs[m] * 1e6, costs["ar"] * 1e6, "us", costs["ar"] / costs[m],
        "chained in a jitted loop, minimum over repeats; ratio < 1: the tree pass is dearer "
        "(on a GPU both are memory-bound and cost about the same)"))
  p = config.decode
  batch = prompts(config, 2 if quick else 8)
  t = wallclock(config, target, drafters, trees, batch, rounds=3 if quick else 5)
  for m in METHODS:
    rows.append(benchmarking.time_row(
        PAPER, f"greedy decoding at batch 1, {batch.shape[0]} prompts x {p.max_new} tokens, "
        f"{m} tree ({n} nodes) vs autoregressive", (f"{m} tree decoding", t[m]),
        ("autoregressive", t["ar"]),
        note="drafters trained for the smoke budget only (low acceptance); outputs are "
        "identical to autoregressive greedy"))
  return rows
