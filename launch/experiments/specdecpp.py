"""Experiment driver for `specdecpp` (library: `jaxrepro.algorithms.decoding.specdecpp`).

Uses the shipped SynthLang target/draft pair unchanged and trains only SpecDec++'s
acceptance head on target-generated responses with exact soft labels (the official data
pipeline: draft tokens at every response position, mixing ratio, class-weighted loss). Then
it decodes dev and test prompts with every policy (constant K, SpecDec++'s threshold rule,
the oracle-threshold rule with true acceptances, HF's heuristic), chooses the best K and h
on dev, and compares them on test.

Speed is stated in virtual time (decoding card 0.1, `algorithms.decoding.virtual_clock`):
each decode logs its rounds (drafted, accepted), and a round costs drafted * t_draft +
t_target(drafted + 1), with per-call costs measured on this machine. Two regimes are
reported side by side: `cpu` (the measured t_target(w): verifying w tokens costs r(w) > 1
single-token calls on a compute-bound CPU) and `memory_bound` (t_target(w) = t_target(1),
the GPU-like regime the paper measures in). SpecDec++'s head runs once per drafted token;
its measured cost is added to its draft calls. The real wall-clock ratio of SpecDec++ to
the best constant K at batch 1 (CPU regime's choices) is reported next to them
(`wallclock/*`).

The per-call costs come from the shared `virtual_clock.measure_costs` (calls chained inside
one jitted loop, as the decoders run them); the head's own cost is timed the same way.
"""

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

from jaxrepro.algorithms.decoding import sampling, specdecpp, speculative, virtual_clock
from jaxrepro.algorithms.decoding import table_lm as tl
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

PAPER = "specdecpp"
REGIMES = ("cpu", "memory_bound")
_REGIME_TEXT = {"cpu": "this CPU's measured costs (r(w) > 1)",
                "memory_bound": "the memory-bound regime (r = 1, same t_draft/t_target)"}

CLAIMS = (
    experiment.Claim(
        "specdecpp_beats_best_constant_memory_bound",
        "SpecDec++ (h chosen on dev) decodes at least 1.03x as many tokens per virtual second "
        "as speculative decoding with the best constant K (chosen on dev), on the test "
        "prompts, in the memory-bound regime (r = 1)",
        "memory_bound/specdecpp_over_best_constant", 1.03,
        note="The paper's +7-11% over the best constant K is wall-clock on A100s, where "
        "verification is memory-bound; virtual time with the measured t_draft/t_target(1) "
        "and r = 1 stands in for it. Threshold from the card (1.4), fixed before measuring. "
        "Demo runs of 2026-11-25: 0.950 on a quiet machine, 0.968 under heavy load (best "
        "K = 3, h = 0.6; SpecDec++ drafted 2.5 tokens/round). Its head predicts little beyond "
        "the mean acceptance (head KL 0.90x the constant's), while the same rule with true "
        "acceptances is 1.15x SpecDec++: the threshold rule pays, the 32-d one-layer draft "
        "state is too weak a predictor here."),
    experiment.Claim(
        "specdecpp_beats_best_constant_cpu",
        "The same comparison in virtual time with this CPU's measured costs, where "
        "verifying w tokens costs r(w) > 1 single-token target calls",
        "cpu/specdecpp_over_best_constant", 1.03,
        note="Not a regime the paper measures in: long candidate lists cost more to verify "
        "here, which shifts the best K and h down (both are re-chosen on dev per regime). "
        "The real wall-clock ratio at batch 1 with this regime's K and h (one prompt after "
        "another, verification cost following k) is reported next to it as "
        "wallclock/specdecpp_over_best_constant; on a shared 2-core machine it is noisy. "
        "Demo of 2026-11-25 on a quiet machine: 0.968 (best K = 3), wall-clock ratio 0.78. "
        "(An earlier run at load ~19 measured 0.316 from non-monotone per-call costs; "
        "costs measured under load are not usable.)"),
    experiment.Claim(
        "oracle_at_least_specdecpp_memory_bound",
        "The oracle-threshold rule (true acceptances min(1, p/q) in place of the head) is at "
        "least as fast as SpecDec++ on test (ratio of tokens per virtual second, r = 1)",
        "memory_bound/oracle_over_specdecpp", 1.0,
        note="Card 1.4 (a). The oracle keeps SpecDec++'s one-token lag, so the two differ "
        "only in the acceptance estimate; its shadow target calls are not charged."),
    experiment.Claim(
        "oracle_at_least_specdecpp_cpu",
        "The oracle-threshold rule is at least as fast as SpecDec++ on test with this CPU's "
        "measured costs", "cpu/oracle_over_specdecpp", 1.0),
    experiment.Claim(
        "head_kl_below_constant",
        "The head's binary KL to the soft labels on held-out positions is at most 0.8x that "
        "of the constant predictor (the mean training label)", "head/kl_ratio", 0.8, "<=",
        note="With class weight w = 6 the head is trained towards a / (a + w(1 - a)), not a; "
        "its outputs s are mapped back by w s / (1 - s + w s) before the KL (decided before "
        "measuring). The raw KL against the best constant under the same weighted loss is "
        "reported as head/kl_ratio_weighted. Demo of 2026-11-25: 0.905 (weighted 0.884)."),
    experiment.Claim(
        "lossless_with_threshold_policy",
        "With SpecDec++'s stopping rule (random head) the decoder's output law equals the "
        "target's: total-variation distance of 200k samples of 3 tokens (table LMs, V = 4) "
        "from the exact law", "lossless/tv", 0.01, "<=",
        note="Card oracle 1.5.2; the sampling noise of the TV is about 0.004 here "
        "(lossless/tv_noise)."),
)


def _ints(text) -> list[int]:
  return sorted(set(common.comma_list(text, int)))


def _floats(text) -> list[float]:
  return sorted(set(common.comma_list(text)))


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(
      config, "head.weight_mismatch", "data.prompt_len", "data.train_sequences",
      "data.val_sequences", "data.response_len", "data.decode_chunk",
      "optimizer.learning_rate", "optimizer.batch_size", "spec.max_new", "spec.dev_prompts",
      "spec.test_prompts", "spec.k_min", "spec.heuristic_k_init", "clock.context",
      "clock.calls", "clock.repeats", "clock.wall_rounds", "lossless.samples")
  if config.clock.wall_prompts < 0:
    raise ConfigError(f"config.clock.wall_prompts={config.clock.wall_prompts} must be >= 0")
  s, d = config.spec, config.data
  if config.head.num_layers < 0:
    raise ConfigError(f"config.head.num_layers={config.head.num_layers} must be >= 0")
  if not 0 <= config.head.mixing_ratio < 1:
    raise ConfigError(f"config.head.mixing_ratio={config.head.mixing_ratio} must lie in "
                      "[0, 1) (1 leaves no position with a loss)")
  if s.temperature <= 0:
    raise ConfigError(f"config.spec.temperature={s.temperature} must be > 0: soft labels "
                      "min(1, p/q) and the claims are about sampling (greedy is tested)")
  if d.prompt_len < 2:
    raise ConfigError(f"config.data.prompt_len={d.prompt_len} must be >= 2 (the decoders "
                      "re-feed the last two committed tokens)")
  if s.k_min > s.k_max:
    raise ConfigError(f"config.spec.k_min={s.k_min} must be <= spec.k_max={s.k_max}")
  ks = _ints(s.constant_ks)
  if not ks or ks[0] < 1 or ks[-1] > s.k_max:
    raise ConfigError(f"config.spec.constant_ks={s.constant_ks!r} must list lengths in "
                      f"1..spec.k_max={s.k_max}")
  hs = _floats(s.thresholds)
  if not hs or hs[0] < 0 or hs[-1] > 1:
    raise ConfigError(f"config.spec.thresholds={s.thresholds!r} must list values in [0, 1]")
  max_len = pretrained_lms.MAX_LEN
  if d.prompt_len + s.max_new + s.k_max - 1 > max_len:
    raise ConfigError(
        f"config.data.prompt_len + spec.max_new + spec.k_max - 1 = "
        f"{d.prompt_len + s.max_new + s.k_max - 1} exceeds the models' max_len {max_len}")
  if d.prompt_len + d.response_len > max_len:
    raise ConfigError(f"config.data.prompt_len + data.response_len = "
                      f"{d.prompt_len + d.response_len} exceeds the models' max_len {max_len}")
  if d.train_sequences < config.optimizer.batch_size:
    raise ConfigError(f"config.data.train_sequences={d.train_sequences} must be >= "
                      f"optimizer.batch_size={config.optimizer.batch_size}")
  if not 0 <= config.optimizer.warmup_fraction < 1:
    raise ConfigError(f"config.optimizer.warmup_fraction={config.optimizer.warmup_fraction} "
                      "must lie in [0, 1)")
  t = config.train
  if t.checkpoint_every % t.log_every:
    raise ConfigError(f"config.train.checkpoint_every={t.checkpoint_every} must be a "
                      f"multiple of train.log_every={t.log_every}")
  lo = config.lossless
  if lo.vocab_size < 2 or lo.order < 1 or lo.new_tokens < 1 or \
      lo.vocab_size ** lo.new_tokens > 4096:
    raise ConfigError(f"config.lossless needs vocab_size >= 2, order >= 1, new_tokens >= 1 "
                      f"and vocab_size ** new_tokens <= 4096 (enumerated); got "
                      f"{lo.vocab_size}, {lo.order}, {lo.new_tokens}")


# -------------------------------------------------------------------------------- models


class Models(NamedTuple):
  """The shipped pair as `speculative.LM`s with their parameters."""
  target: speculative.LM
  target_params: object
  target_graphdef: object
  draft: speculative.LM
  draft_params: object
  draft_graphdef: object
  draft_width: int


def load_models(config) -> Models:
  t = pretrained_lms.load(config.model.target)
  d = pretrained_lms.load(config.model.draft)
  return Models(speculative.transformer_lm(t.config, t.graphdef), t.params, t.graphdef,
                speculative.transformer_lm(d.config, d.graphdef), d.params, d.graphdef,
                d.config.d_model)


def sampling_config(config) -> sampling.SamplingConfig:
  return sampling.SamplingConfig(temperature=config.spec.temperature)


def prompts_for(config, split: str, n: int) -> jax.Array:
  """[n, P] source prefixes; each split has its own seed."""
  offset = {"train": 1000, "val": 2000, "dev": 3000, "test": 4000}[split]
  lang = pretrained_lms.language()
  return jnp.asarray(lang.sample(offset + config.seed, n, config.data.prompt_len))


def chunked(fn, chunk: int, *batched):
  """Applies a function of row-batched arrays in chunks of `chunk` rows (the last one
  padded by repeating rows, so every call has the same shape and compiles once)."""
  n = batched[0].shape[0]
  outs = []
  for start in range(0, n, chunk):
    parts = [x[start:start + chunk] for x in batched]
    m = parts[0].shape[0]
    if m < chunk and n > chunk:
      parts = [jnp.concatenate([p, jnp.repeat(p[-1:], chunk - m, axis=0)]) for p in parts]
    outs.append(jax.tree.map(lambda y, m=m: np.asarray(y)[:m], fn(*parts)))
  return jax.tree.map(lambda *ys: np.concatenate(ys), *outs)


# ----------------------------------------------------------------------------- head data


class HeadData(NamedTuple):
  """Head training examples, one row per response.

  Attributes:
    features: [n, N, H] float32, the draft's final hidden state at each mixed input token.
    labels: [n, N] float32 soft labels a = min(1, p(y)/q(y)) of the draft tokens y.
    mask: [n, N] bool, positions holding a draft token (the loss applies there).
  """
  features: np.ndarray
  labels: np.ndarray
  mask: np.ndarray


def make_head_data(config, models: Models, split: str, n: int) -> HeadData:
  """The official pipeline (`data/gen_*.py`, `train.py`) on target-generated responses."""
  p_len, n_new = config.data.prompt_len, config.data.response_len
  cfg = sampling_config(config)
  prompts = prompts_for(config, split, n)
  ar = speculative.make_autoregressive_decoder(models.target, prompt_len=p_len,
                                               max_new=n_new, config=cfg)
  ar = jax.jit(jax.vmap(ar, in_axes=(None, 0, None, 0)))
  base = jax.random.key(config.seed + (11 if split == "train" else 12))
  k_gen, k_label = jax.random.split(base)
  gen_keys = jax.random.split(k_gen, n)
  responses = chunked(lambda p, k: ar(models.target_params, p, p_len, k).tokens,
                      config.data.decode_chunk, prompts, gen_keys)

  @jax.jit
  def label_and_embed(prompts, responses, key):
    k_y, k_m = jax.random.split(key)
    seq = jnp.concatenate([prompts, responses], axis=1)
    # Row t of the logits predicts token t + 1: positions P-1 .. P+N-2 predict the response.
    p = sampling.probs(tfm.apply_transformer(models.target_graphdef, models.target_params,
                                             seq[:, :-1])[:, p_len - 1:], cfg)
    q = sampling.probs(tfm.apply_transformer(models.draft_graphdef, models.draft_params,
                                             seq[:, :-1])[:, p_len - 1:], cfg)
    y = sampling.sample_probs(k_y, q)
    pick = lambda d: jnp.take_along_axis(d, y[..., None], axis=-1)[..., 0]
    labels = specdecpp.soft_labels(jnp.log(jnp.maximum(pick(p), 1e-30)),
                                   jnp.log(pick(q)))
    tokens, mask = specdecpp.mix_inputs(k_m, responses, y, config.head.mixing_ratio)
    _, hidden = tfm.apply_transformer(models.draft_graphdef, models.draft_params,
                                      jnp.concatenate([prompts, tokens], axis=1),
                                      return_hidden=True)
    return hidden[:, p_len:].astype(jnp.float32), labels, mask

  chunk = config.data.decode_chunk
  keys = jax.random.split(k_label, math.ceil(n / chunk))
  parts = [label_and_embed(prompts[i * chunk:(i + 1) * chunk],
                           jnp.asarray(responses[i * chunk:(i + 1) * chunk]), keys[i])
           for i in range(len(keys))]
  feats, labels, mask = (np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(3))
  return HeadData(feats, labels, mask)


# -------------------------------------------------------------------------- head training


def head_kl(graphdef, params, data: HeadData, weight: float) -> dict[str, float]:
  """Mean binary KL over the labelled positions: raw outputs and un-weighted ones."""
  logits = specdecpp.head_logits(graphdef, params, jnp.asarray(data.features))
  s = jax.nn.softmax(logits, axis=-1)[..., specdecpp.ACCEPTED]
  labels, mask = jnp.asarray(data.labels), jnp.asarray(data.mask)
  mean = lambda x: float(jnp.sum(jnp.where(mask, x, 0.0)) / jnp.sum(mask))
  calibrated = specdecpp.probability_logits(specdecpp.unweight(s, weight))
  return {"kl_raw": mean(specdecpp.binary_kl(labels, logits)),
          "kl": mean(specdecpp.binary_kl(labels, calibrated)),
          "mean_prediction": mean(specdecpp.unweight(s, weight))}


def constant_kl(train: HeadData, val: HeadData, weight: float) -> dict[str, float]:
  """KL of the best constant predictors: the mean label, and the optimum of the weighted
  loss (3) over constants, a_bar / (a_bar + w (1 - a_bar))."""
  a_bar = float(train.labels[train.mask].mean())
  labels = jnp.asarray(val.labels[val.mask])
  kl = lambda s: float(jnp.mean(specdecpp.binary_kl(
      labels, specdecpp.probability_logits(jnp.full_like(labels, s)))))
  return {"mean_label": a_bar, "kl_constant": kl(a_bar),
          "kl_constant_weighted": kl(float(specdecpp.weighted_optimum(a_bar, weight)))}


def train_head(config, workdir: str, train: HeadData, val: HeadData, hidden_size: int
               ) -> tuple[object, object, train_loop.FitResult]:
  """Trains the acceptance head with `train_loop.fit` (resumable); returns (graphdef,
  params, fit result)."""
  h, o, t = config.head, config.optimizer, config.train
  graphdef, params = specdecpp.init_head(hidden_size, jax.random.key(config.seed + 21),
                                         num_layers=h.num_layers,
                                         shared_blocks=h.shared_blocks)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, o.learning_rate, max(1, int(o.warmup_fraction * t.num_steps)), t.num_steps)
  tx = optax.adamw(schedule, weight_decay=o.weight_decay)

  def loss_fn(params, batch, key):
    del key
    feats, labels, mask = batch
    logits = specdecpp.head_logits(graphdef, params, feats)
    loss = specdecpp.weighted_bce(logits, labels, mask, h.weight_mismatch)
    kl = jnp.sum(jnp.where(mask, specdecpp.binary_kl(labels, logits), 0.0)) / jnp.maximum(
        jnp.sum(mask), 1)
    return loss, {"kl_raw": kl}

  n = train.features.shape[0]
  batch = o.batch_size

  def host_batches(start: int, steps: int):
    # Epoch-wise permutations seeded by (seed, epoch): batch s is the same whether or not
    # the run was interrupted and resumed.
    g = np.arange(start * batch, (start + steps) * batch)
    epochs, within = np.divmod(g, n)
    perms = {e: np.random.default_rng((config.seed, e)).permutation(n)
             for e in np.unique(epochs)}
    idx = np.asarray([perms[e][i] for e, i in zip(epochs, within)]).reshape(steps, batch)
    return (jnp.asarray(train.features[idx]), jnp.asarray(train.labels[idx]),
            jnp.asarray(train.mask[idx]))

  def eval_fn(p):
    return head_kl(graphdef, p, val, h.weight_mismatch)

  state = train_loop.TrainState.create(params, tx, jax.random.key(config.seed + 22))
  result = train_loop.fit(state, train_loop.make_train_step(loss_fn, tx), num_steps=t.num_steps,
                          log_every=t.log_every, workdir=workdir,
                          checkpoint_every=t.checkpoint_every,
                          keep_checkpoints=t.keep_checkpoints, eval_fn=eval_fn,
                          host_batches=host_batches, description="specdecpp head")
  return graphdef, result.state.params, result


# ----------------------------------------------------------------------------------- costs


def measure_head_cost(head_graphdef, head_params, hidden_size: int, *, calls: int,
                      repeats: int) -> float:
  """Seconds per application of the acceptance head to one draft state (batch 1).

  Timed like `virtual_clock.measure_costs` times model calls: `calls` applications inside
  one jitted `fori_loop`, median of `repeats` runs. SpecDec++ pays it once per drafted
  token, on top of the draft call.
  """
  def run(params):
    def body(i, acc):
      # The input changes with i so that XLA cannot hoist the head out of the loop.
      z = jnp.full((1, hidden_size), i, jnp.float32) * 1e-3
      return acc + specdecpp.head_logits(head_graphdef, params, z)[0, 0]
    return lax.fori_loop(0, calls, body, jnp.float32(0))

  fn = jax.jit(run)
  jax.block_until_ready(fn(head_params))  # compile
  samples = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(head_params))
    samples.append((time.perf_counter() - start) / calls)
  return float(np.median(samples))


def measure_costs(config, models: Models, head_graphdef, head_params
                  ) -> tuple[virtual_clock.CostModel, float]:
  """The shared virtual clock's per-call costs (widths 1..K_max + 1) and the head's cost."""
  c = config.clock
  costs = virtual_clock.measure_costs(
      models.target, models.target_params, models.draft, models.draft_params,
      max_width=config.spec.k_max + 1, context=c.context, calls=c.calls, repeats=c.repeats)
  t_head = measure_head_cost(head_graphdef, head_params, models.draft_width, calls=c.calls,
                             repeats=c.repeats)
  return costs, t_head


# -------------------------------------------------------------------------------- decoding


class Decoders(NamedTuple):
  """Vmapped decoders `(policy_params, prompts [n, P], keys [n]) -> DecodeOutput`."""
  constant: object
  specdecpp: object
  oracle: object
  heuristic: object


def make_decoders(config, models: Models, head_graphdef) -> Decoders:
  s, p_len = config.spec, config.data.prompt_len
  cfg = sampling_config(config)
  num_slots = p_len + s.max_new + s.k_max + 1

  def build(policy, k_max, pp_axes):
    dec = speculative.make_speculative_decoder(
        models.target, models.draft, prompt_len=p_len, max_new=s.max_new, k_max=k_max,
        config=cfg, policy=policy)
    vm = jax.vmap(dec, in_axes=(None, None, 0, None, 0, pp_axes))
    return jax.jit(lambda pp, prompts, keys: vm(models.target_params, models.draft_params,
                                                prompts, p_len, keys, pp))

  def oracle(pp_h, prompts, keys):
    pp = specdecpp.ThresholdParams(pp_h, specdecpp.OracleParams(
        models.target_params, prompts, jnp.int32(p_len)))
    return oracle_vm(pp, prompts, keys)

  oracle_vm = build(specdecpp.oracle_policy(models.target, prompt_len=p_len,
                                            num_slots=num_slots, config=cfg, k_min=s.k_min,
                                            k_max=s.k_max), s.k_max,
                    specdecpp.ThresholdParams(None, specdecpp.OracleParams(None, 0, None)))
  return Decoders(
      constant=build(specdecpp.constant_length_policy(), max(_ints(s.constant_ks)), None),
      specdecpp=build(specdecpp.specdecpp_policy(head_graphdef, k_min=s.k_min,
                                                 k_max=s.k_max), s.k_max, None),
      oracle=oracle,
      heuristic=build(speculative.heuristic_policy(s.heuristic_k_init), s.k_max, None))


class RunLog(NamedTuple):
  """What the virtual clock needs from a batch of decodes."""
  drafted: np.ndarray  # [rounds] drafted tokens of every round of every decode
  accepted: np.ndarray  # [rounds]
  tokens: int  # committed tokens over all decodes


def run_policy(decode, pp, prompts, keys, chunk: int) -> RunLog:
  out = chunked(lambda p, k: decode(pp, p, k), chunk, prompts, keys)
  drafted, accepted = np.asarray(out.drafted), np.asarray(out.accepted)
  keep = drafted >= 0
  return RunLog(drafted[keep], accepted[keep], int(np.asarray(out.num_generated).sum()))


def throughput(log: RunLog, costs: virtual_clock.CostModel, extra_draft: float = 0.0
               ) -> float:
  """Tokens per virtual second; `extra_draft` is added to every draft call (the head)."""
  costs = virtual_clock.CostModel(costs.target, costs.draft + extra_draft)
  return log.tokens / virtual_clock.speculative_time(costs, log.drafted)


def regime_costs(costs: virtual_clock.CostModel) -> dict[str, virtual_clock.CostModel]:
  return {"cpu": costs, "memory_bound": costs.memory_bound()}


def sweep(config, decoders: Decoders, head_params, split: str, n: int, *, ks,
          specdecpp_thresholds, oracle_thresholds, heuristic: bool) -> dict[str, RunLog]:
  """Decodes one split's prompts with each named policy setting."""
  prompts = prompts_for(config, split, n)
  keys = jax.random.split(jax.random.key(config.seed + (31 if split == "dev" else 32)), n)
  chunk = config.data.decode_chunk
  logs = {f"k{k}": run_policy(decoders.constant, jnp.int32(k), prompts, keys, chunk)
          for k in ks}
  for h in specdecpp_thresholds:
    logs[f"specdecpp_h{h:g}"] = run_policy(
        decoders.specdecpp, specdecpp.ThresholdParams(jnp.float32(h), head_params), prompts,
        keys, chunk)
  for h in oracle_thresholds:
    logs[f"oracle_h{h:g}"] = run_policy(decoders.oracle, jnp.float32(h), prompts, keys, chunk)
  if heuristic:
    logs["heuristic"] = run_policy(decoders.heuristic, None, prompts, keys, chunk)
  return logs


# ------------------------------------------------------------------------------- lossless


def lossless_check(config, seed: int = 0) -> dict[str, float]:
  """Oracle 1.5.2 at demo time: output law of SD with SpecDec++'s rule vs the exact law."""
  lo = config.lossless
  v, order, n_new = lo.vocab_size, lo.order, lo.new_tokens
  keys = jax.random.split(jax.random.key(seed), 4)
  target = tl.random_table(keys[0], v, order)
  draft = tl.mixed_draft(keys[1], target, 0.4)
  lm = tl.table_lm(v, order)
  # The table LM's "hidden state" is its log-probability row: a random head on it makes
  # the stopping decision depend on the drafted tokens.
  head_graphdef, head_params = specdecpp.init_head(v, keys[2], num_layers=2)
  policy = specdecpp.specdecpp_policy(head_graphdef, k_min=1, k_max=n_new)
  prompt = jnp.asarray([1, 0, 0, 0], jnp.int32)  # prompt_len 2: tokens (1, 0)
  decode = speculative.make_speculative_decoder(lm, lm, prompt_len=4, max_new=n_new,
                                                k_max=n_new, policy=policy)
  pp = specdecpp.ThresholdParams(jnp.float32(0.5), head_params)
  run = jax.jit(jax.vmap(lambda k: decode(target, draft, prompt, 2, k, pp)))
  out = run(jax.random.split(keys[3], lo.samples))
  codes = (np.asarray(out.tokens) * v ** np.arange(n_new)[::-1]).sum(1)
  law = np.bincount(codes, minlength=v ** n_new) / lo.samples
  exact = tl.continuation_probs(target, np.asarray(prompt[:2]), n_new).ravel()
  drafted = np.asarray(out.drafted)
  return {"lossless/tv": float(0.5 * np.abs(law - exact).sum()),
          # E|p_hat - p| per cell ~ sqrt(2 p (1 - p) / (pi n)); half their sum is the
          # expected TV of a correct sampler.
          "lossless/tv_noise": float(0.5 * np.sum(np.sqrt(2 * exact * (1 - exact)
                                                          / (np.pi * lo.samples)))),
          "lossless/mean_drafted": float(drafted[drafted >= 0].mean())}


# ------------------------------------------------------------------------------------- run


def _stats(log: RunLog) -> dict[str, float]:
  return {"mean_drafted": float(log.drafted.mean()),
          "tokens_per_round": log.tokens / len(log.drafted),
          "acceptance": float(log.accepted.sum() / max(1, log.drafted.sum()))}


def select(config, logs: dict[str, RunLog], costs: virtual_clock.CostModel, t_head: float
           ) -> dict[str, dict]:
  """Per regime: throughput of every dev setting and the best K and h."""
  s = config.spec
  out = {}
  for regime, c in regime_costs(costs).items():
    tps = {name: throughput(log, c, t_head if name.startswith("specdecpp") else 0.0)
           for name, log in logs.items()}
    ks, hs = _ints(s.constant_ks), _floats(s.thresholds)
    out[regime] = {
        "tps": tps,
        "best_k": max(ks, key=lambda k: tps[f"k{k}"]),
        "specdecpp_h": max(hs, key=lambda h: tps[f"specdecpp_h{h:g}"]),
        "oracle_h": (max(hs, key=lambda h: tps[f"oracle_h{h:g}"]) if config.spec.oracle
                     else None),
    }
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  s = config.spec
  start = time.perf_counter()
  models = load_models(config)
  train = make_head_data(config, models, "train", config.data.train_sequences)
  val = make_head_data(config, models, "val", config.data.val_sequences)
  data_seconds = time.perf_counter() - start
  head_graphdef, head_params, fit = train_head(config, workdir, train, val,
                                               models.draft_width)
  w = config.head.weight_mismatch
  summary = {"head/data_seconds": round(data_seconds, 1),
             "head/train_seconds": round(fit.seconds, 1),
             "head/labelled_positions": int(train.mask.sum())}
  kl = head_kl(head_graphdef, head_params, val, w)
  const = constant_kl(train, val, w)
  summary.update({f"head/{k}": v for k, v in {**kl, **const}.items()})
  summary["head/kl_ratio"] = kl["kl"] / const["kl_constant"]
  summary["head/kl_ratio_weighted"] = kl["kl_raw"] / const["kl_constant_weighted"]

  start = time.perf_counter()
  costs, t_head = measure_costs(config, models, head_graphdef, head_params)
  summary.update({"cost/t_target_us": costs.target[0] * 1e6,
                  "cost/t_draft_us": costs.draft * 1e6, "cost/t_head_us": t_head * 1e6,
                  "cost/draft_over_target": costs.cost_ratio,
                  "cost/r_verify_5": costs.verify_ratio(5),
                  f"cost/r_verify_{s.k_max + 1}": costs.verify_ratio(s.k_max + 1),
                  "cost/seconds": round(time.perf_counter() - start, 1)})

  start = time.perf_counter()
  decoders = make_decoders(config, models, head_graphdef)
  hs, ks = _floats(s.thresholds), _ints(s.constant_ks)
  dev = sweep(config, decoders, head_params, "dev", s.dev_prompts, ks=ks,
              specdecpp_thresholds=hs, oracle_thresholds=hs if s.oracle else [],
              heuristic=False)
  chosen = select(config, dev, costs, t_head)
  summary["dev_seconds"] = round(time.perf_counter() - start, 1)
  start = time.perf_counter()
  test = sweep(config, decoders, head_params, "test", s.test_prompts, ks=ks,
               specdecpp_thresholds=sorted({c["specdecpp_h"] for c in chosen.values()}),
               oracle_thresholds=sorted({c["oracle_h"] for c in chosen.values()
                                         if c["oracle_h"] is not None}),
               heuristic=True)
  summary["test_seconds"] = round(time.perf_counter() - start, 1)

  report = {"costs": {"target": costs.target, "draft": costs.draft, "head": t_head},
            "dev": {}, "test": {}}
  for regime, c in regime_costs(costs).items():
    pick = chosen[regime]
    ar_tps = 1.0 / c.target[0]
    tps = {name: throughput(log, c, t_head if name.startswith("specdecpp") else 0.0)
           for name, log in test.items()}
    best = tps[f"k{pick['best_k']}"]
    sdpp = tps[f"specdecpp_h{pick['specdecpp_h']:g}"]
    if s.oracle:
      oracle = tps[f"oracle_h{pick['oracle_h']:g}"]
      summary.update({f"{regime}/oracle_h": pick["oracle_h"],
                      f"{regime}/speedup_vs_ar/oracle": oracle / ar_tps,
                      f"{regime}/oracle_over_specdecpp": oracle / sdpp})
    summary.update({
        f"{regime}/best_k": pick["best_k"],
        f"{regime}/specdecpp_h": pick["specdecpp_h"],
        f"{regime}/speedup_vs_ar/best_constant": best / ar_tps,
        f"{regime}/speedup_vs_ar/specdecpp": sdpp / ar_tps,
        f"{regime}/speedup_vs_ar/heuristic": tps["heuristic"] / ar_tps,
        f"{regime}/specdecpp_over_best_constant": sdpp / best,
        f"{regime}/heuristic_over_best_constant": tps["heuristic"] / best,
        # On dev the choices were made, so this ratio is biased upwards; for reference.
        f"{regime}/dev_specdecpp_over_best_constant":
            pick["tps"][f"specdecpp_h{pick['specdecpp_h']:g}"]
            / pick["tps"][f"k{pick['best_k']}"],
    })
    report["dev"][regime] = {k: v / ar_tps for k, v in pick["tps"].items()}
    report["test"][regime] = {k: v / ar_tps for k, v in tps.items()}
  pick = chosen["memory_bound"]
  names = [("best_constant", f"k{pick['best_k']}"),
           ("specdecpp", f"specdecpp_h{pick['specdecpp_h']:g}")]
  if s.oracle:
    names.append(("oracle", f"oracle_h{pick['oracle_h']:g}"))
  for name, key in names:
    summary.update({f"test/{name}/{k}": v for k, v in _stats(test[key]).items()})
  report["round_stats"] = {split: {name: _stats(log) for name, log in logs.items()}
                           for split, logs in (("dev", dev), ("test", test))}

  # Real seconds at batch 1 with the CPU regime's choices, next to the virtual clock.
  if config.clock.wall_prompts:
    summary.update(_wallclock_summary(config, models, head_graphdef, head_params,
                                      chosen["cpu"]))
  summary.update(lossless_check(config, seed=config.seed))
  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(config.train.num_steps,
                         {f"final/{k}": v for k, v in summary.items()
                          if isinstance(v, (int, float))})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "speedups.json"), "w") as f:
      json.dump(report, f, indent=1)
    _plot(workdir, config, report, summary)
  return summary


def _wallclock_summary(config, models, head_graphdef, head_params, pick) -> dict:
  """Measured seconds per decode at batch 1: SpecDec++ (h) vs SD (best K) vs AR."""
  start = time.perf_counter()
  wall = wallclock(config, models, head_graphdef, head_params, k=pick["best_k"],
                   h=pick["specdecpp_h"],
                   prompts=prompts_for(config, "test", config.clock.wall_prompts),
                   rounds=config.clock.wall_rounds)
  sec = {name: t.median_s for name, t in wall.items()}
  return {
      "wallclock/specdecpp_over_best_constant": sec["sd"] / sec["specdecpp"],
      "wallclock/speedup_vs_ar/best_constant": sec["ar"] / sec["sd"],
      "wallclock/speedup_vs_ar/specdecpp": sec["ar"] / sec["specdecpp"],
      "wallclock/seconds": round(time.perf_counter() - start, 1)}


def _plot(workdir, config, report, summary):
  """Test speed-up over AR vs constant K, adaptive policies as lines: `throughput_vs_k.png`."""
  plt = plotting.plt
  ks = _ints(config.spec.constant_ks)
  fig, axes = plt.subplots(1, len(REGIMES), figsize=(5.5 * len(REGIMES), 3.8), dpi=100,
                           squeeze=False)
  for ax, regime in zip(axes.flat, REGIMES):
    test = report["test"][regime]
    ax.plot(ks, [test[f"k{k}"] for k in ks], "o-", color="k", label="constant K")
    h = summary[f"{regime}/specdecpp_h"]
    lines = {f"SpecDec++ (h = {h:g})": (test[f"specdecpp_h{h:g}"], "tab:red", "-")}
    if config.spec.oracle:
      h = summary[f"{regime}/oracle_h"]
      lines[f"oracle threshold (h = {h:g})"] = (test[f"oracle_h{h:g}"], "tab:green", "--")
    lines.update({"HF heuristic": (test["heuristic"], "tab:blue", ":"),
                  "autoregressive": (1.0, "grey", "-.")})
    for label, (y, color, style) in lines.items():
      ax.axhline(y, color=color, linestyle=style, label=label)
    ax.set(title=f"test split, {_REGIME_TEXT[regime]}", xlabel="candidate length K",
           ylabel="speed-up over AR (virtual time)", xticks=ks)
    ax.title.set_fontsize(8)
    ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "throughput_vs_k.png"))
  plt.close(fig)


# --------------------------------------------------------------------------------- benchmark


def wallclock(config, models: Models, head_graphdef, head_params, *, k: int, h: float,
              prompts: jax.Array, rounds: int) -> dict[str, benchmarking.Timing]:
  """Real seconds per decode at batch 1 (one prompt after another, as the paper runs):
  AR, SD with constant K = k and SpecDec++ at threshold h, each verifying only the drafted
  tokens (`verify_branches`), so the target's cost follows the draft length."""
  s, p_len = config.spec, config.data.prompt_len
  cfg = sampling_config(config)
  ar = speculative.make_autoregressive_decoder(models.target, prompt_len=p_len,
                                               max_new=s.max_new, config=cfg)
  sd = speculative.make_speculative_decoder(models.target, models.draft, prompt_len=p_len,
                                            max_new=s.max_new, k_max=k, config=cfg)
  pp = specdecpp.ThresholdParams(jnp.float32(h), head_params)
  sdpp = speculative.make_speculative_decoder(
      models.target, models.draft, prompt_len=p_len, max_new=s.max_new, k_max=s.k_max,
      config=cfg, policy=specdecpp.specdecpp_policy(head_graphdef, k_min=s.k_min,
                                                    k_max=s.k_max), verify_branches=True)
  keys = jax.random.split(jax.random.key(5), prompts.shape[0])
  tp, dp = models.target_params, models.draft_params

  def each(fn):
    return lambda: [fn(prompts[i], keys[i]).tokens for i in range(prompts.shape[0])]

  return benchmarking.interleaved(
      {"ar": each(lambda p, key: ar(tp, p, p_len, key)),
       "sd": each(lambda p, key: sd(tp, dp, p, p_len, key)),
       "specdecpp": each(lambda p, key: sdpp(tp, dp, p, p_len, key, pp))}, rounds=rounds)


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Real wall-clock of SD (best constant K) and SpecDec++ vs AR decoding of the same target,
  and the measured c, r and predicted speed-up of PERFORMANCE.md section 4.

  The head is trained with the smoke settings (seconds), which is enough for timing: the
  stopping rule's cost does not depend on the head's quality, only the lengths do. K = 2
  and h = 0.3 (the official code's default threshold) are fixed here; the demo reports the
  same wall-clock ratio at its own dev-chosen K and h (`wallclock/*` in its summary).
  """
  config = experiment.config_module(PAPER).get_config("smoke" if quick else "demo")
  config.unlock()
  config.spec.update(max_new=64, k_max=8 if quick else 20)
  models = load_models(config)
  with tempfile.TemporaryDirectory() as workdir:
    small = experiment.config_module(PAPER).get_config("smoke")
    train = make_head_data(small, models, "train", small.data.train_sequences)
    val = make_head_data(small, models, "val", small.data.val_sequences)
    head_graphdef, head_params, _ = train_head(small, workdir, train, val, models.draft_width)
  costs, t_head = measure_costs(config, models, head_graphdef, head_params)
  k, h = 2, 0.3
  prompts = prompts_for(config, "test", 4 if quick else 16)
  t = wallclock(config, models, head_graphdef, head_params, k=k, h=h, prompts=prompts,
                rounds=3 if quick else 5)
  alpha = 0.775  # the shipped pair's measured acceptance at T = 1 (pretrained_lms metadata)
  c, r = costs.cost_ratio, costs.verify_ratio(k + 1)
  expected = (1 - alpha ** (k + 1)) / (1 - alpha)
  predicted = expected / (k * c + r)
  shape = (f"{prompts.shape[0]} prompts x {config.spec.max_new} new tokens, batch 1, "
           "SynthLang 4-layer target / 1-layer draft, T = 1")
  return [
      benchmarking.time_row(
          PAPER, f"SD with constant K={k} vs autoregressive, {shape}",
          (f"SD K={k}", t["sd"]), ("autoregressive", t["ar"]),
          note=f"measured c = t_draft/t_target = {c:.3f}, r({k + 1}) = {r:.2f}; PERFORMANCE.md "
               f"4 predicts S = E/(Kc + r) = {predicted:.2f} at alpha = {alpha}"),
      benchmarking.time_row(
          PAPER, f"SpecDec++ (h={h}, bounds [{config.spec.k_min}, {config.spec.k_max}]) vs "
          f"autoregressive, {shape}", ("SpecDec++", t["specdecpp"]),
          ("autoregressive", t["ar"]),
          note=f"head cost {t_head * 1e6:.1f} us per drafted token (chained); verify cost "
               "follows k (one compiled target call per length)"),
      benchmarking.time_row(
          PAPER, f"SpecDec++ vs SD with constant K={k}, {shape}", ("SpecDec++", t["specdecpp"]),
          (f"SD K={k}", t["sd"]), note="ratio > 1: SpecDec++ is faster in real time"),
  ]
