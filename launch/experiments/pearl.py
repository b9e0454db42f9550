"""Experiment driver for `pearl` (library: `jaxrepro.algorithms.decoding.pearl`).

Uses the shipped SynthLang target/draft pair unchanged (`launch.pretrained_lms`; no
training). For each temperature it decodes dev and test prompts with standard speculative
decoding (SD, `speculative.make_speculative_decoder`) at every fixed draft length K and with
PEARL (`pearl.make_pearl_decoder`) at every window gamma, chooses the best K and the best
gamma on dev per cost regime, and compares them on test.

Time is virtual (decoding card 0.1, `algorithms.decoding.virtual_clock`), and this is the
whole point for PEARL: one device cannot run the draft and the target at the same time, so
the decoders run both models in program order and every round is charged from per-call
costs measured on this machine:

  SD round:     K t_draft + t_target(K + 1)
  PEARL round:  max(gamma t_draft, t_target(w)),  w = 1 (pre-verify) or gamma (post-verify),

the max being the overlap two devices would give. Two regimes are reported side by side:
`cpu` (this CPU's measured t_target(w), compute-bound, r(w) > 1) and `memory_bound`
(t_target(w) = t_target(1), the GPU-like regime of the paper). Tokens per virtual second
are verified tokens over the summed round costs (prefill excluded for both). Next to it the
measured wall-clock ratio of the one-device decoders (PEARL *without* overlap, i.e. gamma
t_d + t_t(w) per round, vs SD) is reported; it says nothing about the overlap.

Per-call costs are measured with calls chained inside one jitted loop (each call's argmax
feeds the next, so none can be skipped), the loop's fixed cost removed by timing two loop
lengths, as this process's CPU time (median over interleaved repeats): on a machine shared
with other jobs wall time mostly measures the other tenants (`virtual_clock.measure_costs`
times wall-clock medians, which measured the draft dearer than the target here).
"""

import functools
import json
import os
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from jaxrepro.algorithms.decoding import pearl, sampling, speculative, virtual_clock
from jaxrepro.algorithms.decoding import table_lm as tl
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, experiment, metric_writers, plotting, pretrained_lms

PAPER = "pearl"
REGIMES = ("cpu", "memory_bound")
_REGIME_TEXT = {"cpu": "this CPU's measured costs (r(w) > 1)",
                "memory_bound": "memory-bound regime (r = 1)"}
_VIRTUAL_NOTE = (
    "Virtual time: one device cannot overlap two models, so both run in program order and "
    "each PEARL round is charged max(gamma t_d, t_t(w)) from per-call costs measured here "
    "(SD: K t_d + t_t(K + 1)); best K and gamma chosen on 100 dev prompts, measured on 100 "
    "test prompts x 64 tokens. Threshold 1.2 from the card (3.4), fixed before measuring. "
    "Per-call costs are this process's CPU time: a first demo run timed wall-clock minima "
    "and, under a load average of ~20 on the 2 shared cores, measured the 1-layer draft "
    "dearer than the 4-layer target (95 vs 73 us; the quiet-machine values are ~8 vs 75 "
    "us), so the measurement was switched before the run reported here (same prompts and "
    "seeds; thresholds unchanged).")
_FAIL_NOTE = (
    " Borderline, and it moves with the measured per-call costs (cost/*), which vary "
    "between runs on this CPU: four demo runs on 2026-11-25 measured 1.14-1.22 at "
    "temperature 1 (memory-bound) with c = t_t/t_d between 1.8 and 5.2, one of them "
    "above 1.2; the run reported here is the last one, not the best. With a small c "
    "PEARL's best window is gamma ~ 3-4, and at temperature 1 about half of its rounds "
    "are pre-verify rounds (speedups.json: pre_fraction), each yielding one token for a "
    "full target call, so the overlap saves about gamma t_d per post-verify round only. "
    "The paper's 1.52x is a best case over pairs with larger c and higher acceptance "
    "(greedy, code).")

_CPU_NOTE = (
    " The measured per-call costs (cost/*) vary between runs on this CPU, and this claim "
    "with them: the four demo runs of 2026-11-25 gave 1.09-1.32 at temperature 1 and "
    "1.20-1.42 greedy; the run reported here is the last one.")

CLAIMS = (
    experiment.Claim(
        "pearl_beats_best_sd_memory_bound",
        "PEARL decodes at least 1.2x as many tokens per virtual second as speculative "
        "decoding with the best fixed draft length, at temperature 1, in the memory-bound "
        "regime (t_target(w) = t_target(1))", "T=1/memory_bound/pearl_over_best_sd", 1.2,
        note=_VIRTUAL_NOTE + " The paper reports up to 1.52x over SD on GPUs (greedy)."
        + _FAIL_NOTE),
    experiment.Claim(
        "pearl_beats_best_sd_cpu",
        "The same comparison at temperature 1 with this CPU's measured costs, where "
        "verifying w tokens costs r(w) > 1 single-token target calls",
        "T=1/cpu/pearl_over_best_sd", 1.2,
        note="Not a regime the paper measures in: wide verification is dear here (r(w) "
        "grows with w), which hurts SD's K + 1-token verification more than PEARL's "
        "width-1 pre-verify calls. The measured wall-clock ratio of the one-device "
        "emulation (no overlap: gamma t_d + t_t(w) per round) is "
        "T=1/wallclock/pearl_over_best_sd, reported next to it; it is not a PEARL speed."
        + _CPU_NOTE),
    experiment.Claim(
        "pearl_beats_best_sd_greedy_memory_bound",
        "Greedy decoding (the paper's setting): PEARL >= 1.2x the best fixed-K SD in "
        "tokens per virtual second, memory-bound regime", "T=0/memory_bound/pearl_over_best_sd",
        1.2, note="Same protocol as at temperature 1." + _FAIL_NOTE),
    experiment.Claim(
        "pearl_beats_best_sd_greedy_cpu",
        "Greedy decoding: PEARL >= 1.2x the best fixed-K SD, this CPU's measured costs",
        "T=0/cpu/pearl_over_best_sd", 1.2, note=_CPU_NOTE.strip()),
    experiment.Claim(
        "mean_accepted_tokens_at_least_sd",
        "PEARL's mean accepted tokens (drafts accepted between two rejections) is at least "
        "SD's (drafts accepted per round) at the same draft length gamma = K: minimum of "
        "the ratio over the gammas that are also SD lengths, both temperatures, test split",
        "min_mat_ratio", 1.0,
        note="The paper's theorem (card 3.1); compared at gamma in both sweeps (2..8). "
        "Definitions as in the official code's num_acc_tokens."),
    experiment.Claim(
        "lossless",
        "PEARL's output law equals the target's: total-variation distance of 200k samples "
        "of 4 tokens (table LMs, V = 4, gamma = 2) from the exact law", "lossless/tv", 0.01,
        "<=", note="Card oracle 3.5.2; the sampling noise of the TV is lossless/tv_noise."),
)


def _ints(text) -> list[int]:
  return sorted(set(common.comma_list(text, int)))


def _floats(text) -> list[float]:
  return sorted(set(common.comma_list(text)), reverse=True)


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "spec.prompt_len", "spec.max_new", "spec.dev_prompts",
                        "spec.test_prompts", "clock.context", "clock.calls",
                        "clock.repeats", "lossless.samples", "lossless.gamma")
  s = config.spec
  if s.prompt_len < 2:
    raise ConfigError(f"config.spec.prompt_len={s.prompt_len} must be >= 2 (SD re-feeds "
                      "the last two committed tokens)")
  temps = _floats(s.temperatures)
  if not temps or min(temps) < 0:
    raise ConfigError(f"config.spec.temperatures={s.temperatures!r} must list values >= 0 "
                      "(0 = greedy)")
  ks, gammas = _ints(s.sd_ks), _ints(s.pearl_gammas)
  if not ks or ks[0] < 1:
    raise ConfigError(f"config.spec.sd_ks={s.sd_ks!r} must list draft lengths >= 1")
  if not gammas or gammas[0] < 1:
    raise ConfigError(f"config.spec.pearl_gammas={s.pearl_gammas!r} must list windows >= 1")
  max_len = pretrained_lms.MAX_LEN
  # SD feeds positions up to P + N + K - 2; PEARL up to P + N + 2 gamma - 4 (pearl._check).
  need = max(s.prompt_len + s.max_new + ks[-1] - 2,
             s.prompt_len + s.max_new + 2 * gammas[-1] - 4)
  if need >= max_len:
    raise ConfigError(f"config.spec: prompt_len + max_new + max(sd_ks, 2 pearl_gammas) needs "
                      f"positions up to {need}, beyond the models' max_len {max_len}")
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
  draft: speculative.LM
  draft_params: object


def load_models(config) -> Models:
  t = pretrained_lms.load(config.model.target)
  d = pretrained_lms.load(config.model.draft)
  return Models(speculative.transformer_lm(t.config, t.graphdef), t.params,
                speculative.transformer_lm(d.config, d.graphdef), d.params)


def prompts_for(config, split: str) -> jax.Array:
  """[n, P] source prefixes; each split has its own seed."""
  n = {"dev": config.spec.dev_prompts, "test": config.spec.test_prompts}[split]
  offset = {"dev": 3000, "test": 4000}[split]
  return jnp.asarray(pretrained_lms.language().sample(offset + config.seed, n,
                                                      config.spec.prompt_len))


# ----------------------------------------------------------------------------------- costs


def _chained_call(lm: speculative.LM, width: int, context: int):
  """A jitted `(params, calls) -> token`: `calls` cached calls of `width` new tokens in a
  loop, each fed the previous call's argmax (so none can be skipped or merged)."""
  def run(params, calls):
    cache = lm.init_cache(1, context + width)
    cache = lm.apply(params, cache, jnp.zeros((1, context), jnp.int32)).cache

    def body(_, tokens):
      out = lm.apply(params, cache, tokens)
      nxt = jnp.argmax(out.logits[:, -1], axis=-1).astype(jnp.int32)
      return jnp.broadcast_to(nxt[:, None], tokens.shape)

    return lax.fori_loop(0, calls, body, jnp.zeros((1, width), jnp.int32))
  return jax.jit(run)


def measure_costs(models: Models, *, max_width: int, context: int, calls: int,
                  repeats: int) -> virtual_clock.CostModel:
  """Per-call costs inside a jitted loop (seconds of process CPU time), target widths
  1..max_width.

  Each (model, width) is timed at `calls` and `calls // 2` chained calls, `repeats` times
  interleaved; per call = (median of the long loop - median of the short one) /
  (calls - calls // 2), which removes the loop's prefill and dispatch. CPU time of this
  process, not wall time: on a machine shared with other jobs, wall time mostly measures
  the other tenants (it measured the 1-layer draft dearer than the 4-layer target here).
  """
  fns = {("draft", 1): (_chained_call(models.draft, 1, context), models.draft_params)}
  for w in range(1, max_width + 1):
    fns[("target", w)] = (_chained_call(models.target, w, context), models.target_params)
  half = max(1, calls // 2)
  lengths = (calls, half) if calls > half else (calls,)
  for fn, params in fns.values():
    jax.block_until_ready(fn(params, calls))  # compile (the trip count is traced)
  samples = {(name, n): [] for name in fns for n in lengths}
  for _ in range(repeats):
    for name, (fn, params) in fns.items():
      for n in lengths:
        start = time.process_time()
        jax.block_until_ready(fn(params, n))
        samples[name, n].append(time.process_time() - start)
  med = {key: statistics.median(v) for key, v in samples.items()}
  per = {name: med[name, calls] / calls for name in fns}
  if len(lengths) == 2:
    for name in fns:
      diff = (med[name, calls] - med[name, half]) / (calls - half)
      if diff > 0:  # else too few calls to resolve it: keep the plain average
        per[name] = diff
  return virtual_clock.CostModel(
      target=tuple(float(per["target", w]) for w in range(1, max_width + 1)),
      draft=float(per["draft", 1]))


def regime_costs(costs: virtual_clock.CostModel) -> dict[str, virtual_clock.CostModel]:
  return {"cpu": costs, "memory_bound": costs.memory_bound()}


# -------------------------------------------------------------------------------- decoding


def _length_policy() -> speculative.DraftPolicy:
  """Fixed draft length K given as the policy parameter (one compile for every K)."""
  return speculative.DraftPolicy(
      init=lambda k: (), stop=lambda k, s, info: (info.index + 1 >= k, s),
      end_round=lambda k, s, drafted, accepted: s)


def make_sd(config, models: Models, cfg: sampling.SamplingConfig):
  """A jitted `(k, prompts [n, P], keys [n]) -> DecodeOutput`, one prompt after another
  (batch 1, `lax.map`); verification branches per length so its cost follows K."""
  s = config.spec
  dec = speculative.make_speculative_decoder(
      models.target, models.draft, prompt_len=s.prompt_len, max_new=s.max_new,
      k_max=max(_ints(s.sd_ks)), config=cfg, policy=_length_policy(), verify_branches=True)

  @jax.jit
  def run(k, prompts, keys):
    return lax.map(lambda a: dec(models.target_params, models.draft_params, a[0],
                                 s.prompt_len, a[1], k), (prompts, keys))
  return run


def make_pearl(config, models: Models, cfg: sampling.SamplingConfig, gamma: int):
  """A jitted `(prompts [n, P], keys [n]) -> PearlOutput`, one prompt after another."""
  s = config.spec
  dec = pearl.make_pearl_decoder(models.target, models.draft, prompt_len=s.prompt_len,
                                 max_new=s.max_new, gamma=gamma, config=cfg)

  @jax.jit
  def run(prompts, keys):
    return lax.map(lambda a: dec(models.target_params, models.draft_params, a[0],
                                 s.prompt_len, a[1]), (prompts, keys))
  return run


class Run(NamedTuple):
  """One setting's decodes of one split, reduced to what the clocks need."""
  kind: str  # "sd" or "pearl"
  length: int  # K or gamma
  tokens: int  # verified tokens over all decodes
  widths: np.ndarray  # SD: drafted per round; PEARL: target width per round
  accepted: np.ndarray  # accepted drafts per round
  mat: tuple[int, int]  # (accepted drafts, runs or rounds) for mean accepted tokens
  wall_s: float  # measured seconds of the (compiled) batch-1 decodes


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(f"pearl: {message}", flush=True)


def sweep(config, sd, pearls: dict, split: str, *, ks, key) -> dict[str, Run]:
  """Decodes one split with SD at every K (`sd` from `make_sd`) and PEARL at every gamma
  (`pearls[gamma]` from `make_pearl`)."""
  prompts = prompts_for(config, split)
  keys = jax.random.split(key, prompts.shape[0])
  runs = {}
  for k in ks:
    _say(f"{split}: SD K={k}")
    out, wall = benchmarking.warm_timed(sd, jnp.int32(k), prompts, keys)
    drafted, accepted = np.asarray(out.drafted), np.asarray(out.accepted)
    keep = drafted >= 0
    runs[f"sd_k{k}"] = Run("sd", k, int(np.asarray(out.num_generated).sum()), drafted[keep],
                           accepted[keep], (int(accepted[keep].sum()), int(keep.sum())), wall)
  for g, decode in pearls.items():
    _say(f"{split}: PEARL gamma={g}")
    out, wall = benchmarking.warm_timed(decode, prompts, keys)
    widths, accepted = np.asarray(out.width), np.asarray(out.accepted)
    mats = [pearl.mean_accepted_tokens(a[w >= 0], w[w >= 0])
            for a, w in zip(accepted, widths)]
    keep = widths >= 0
    runs[f"pearl_g{g}"] = Run("pearl", g, int(np.asarray(out.num_generated).sum()),
                              widths[keep], accepted[keep],
                              (sum(m[0] for m in mats), sum(m[1] for m in mats)), wall)
  return runs


def virtual_seconds(run: Run, costs: virtual_clock.CostModel) -> float:
  if run.kind == "sd":
    return virtual_clock.speculative_time(costs, run.widths)
  return pearl.overlapped_time(costs, run.length, run.widths)


def throughput(run: Run, costs: virtual_clock.CostModel) -> float:
  """Verified tokens per virtual second."""
  return run.tokens / virtual_seconds(run, costs)


def _mat(run: Run) -> float:
  return run.mat[0] / max(1, run.mat[1])


# ------------------------------------------------------------------------------- lossless


def lossless_check(config) -> dict[str, float]:
  """Card oracle 3.5.2 at demo time: PEARL's output law vs the exact law (table LMs)."""
  lo = config.lossless
  v, order, n_new = lo.vocab_size, lo.order, lo.new_tokens
  keys = jax.random.split(jax.random.key(config.seed), 3)
  target = tl.random_table(keys[0], v, order)
  draft = tl.mixed_draft(keys[1], target, 0.4)
  lm = tl.table_lm(v, order)
  prompt = jnp.asarray([1, 0, 0, 0], jnp.int32)  # prompt_len 2: tokens (1, 0)
  decode = pearl.make_pearl_decoder(lm, lm, prompt_len=4, max_new=n_new, gamma=lo.gamma)
  run = jax.jit(jax.vmap(lambda k: decode(target, draft, prompt, 2, k)))
  out = run(jax.random.split(keys[2], lo.samples))
  codes = (np.asarray(out.tokens) * v ** np.arange(n_new)[::-1]).sum(1)
  law = np.bincount(codes, minlength=v ** n_new) / lo.samples
  exact = tl.continuation_probs(target, np.asarray(prompt[:2]), n_new).ravel()
  return {"lossless/tv": float(0.5 * np.abs(law - exact).sum()),
          # E|p_hat - p| per cell ~ sqrt(2 p (1 - p) / (pi n)); half their sum is the
          # expected TV of a correct sampler.
          "lossless/tv_noise": float(0.5 * np.sum(np.sqrt(2 * exact * (1 - exact)
                                                          / (np.pi * lo.samples))))}


# ------------------------------------------------------------------------------------- run


def _tag(temperature: float) -> str:
  return f"T={temperature:g}"


def evaluate_temperature(config, models: Models, costs: virtual_clock.CostModel,
                         temperature: float) -> tuple[dict, dict]:
  """Dev selection and test comparison at one temperature: (summary, report)."""
  s = config.spec
  cfg = sampling.SamplingConfig(temperature=temperature)
  ks, gammas = _ints(s.sd_ks), _ints(s.pearl_gammas)
  base = jax.random.key(config.seed + int(round(temperature * 1000)))
  k_dev, k_test = jax.random.split(base)
  sd = make_sd(config, models, cfg)
  pearls = {g: make_pearl(config, models, cfg, g) for g in gammas}
  dev = sweep(config, sd, pearls, "dev", ks=ks, key=k_dev)
  test = sweep(config, sd, pearls, "test", ks=ks, key=k_test)
  tag = _tag(temperature)
  out, report = {}, {"dev": {}, "test": {}}
  for regime, c in regime_costs(costs).items():
    ar_tps = 1.0 / c.target[0]
    tps_dev = {name: throughput(r, c) for name, r in dev.items()}
    tps_test = {name: throughput(r, c) for name, r in test.items()}
    best_k = max(ks, key=lambda k: tps_dev[f"sd_k{k}"])
    best_g = max(gammas, key=lambda g: tps_dev[f"pearl_g{g}"])
    sd_name, pe_name = f"sd_k{best_k}", f"pearl_g{best_g}"
    p = f"{tag}/{regime}"
    out.update({
        f"{p}/best_k": best_k, f"{p}/best_gamma": best_g,
        f"{p}/pearl_over_best_sd": tps_test[pe_name] / tps_test[sd_name],
        f"{p}/speedup_vs_ar/best_sd": tps_test[sd_name] / ar_tps,
        f"{p}/speedup_vs_ar/pearl": tps_test[pe_name] / ar_tps,
        # Without overlap (the one-device emulation's own rounds): gamma t_d + t_t(w).
        f"{p}/pearl_sequential_over_best_sd":
            test[pe_name].tokens / pearl.sequential_time(c, best_g, test[pe_name].widths)
            / tps_test[sd_name],
        # On test, PEARL at its best gamma against SD at its best K, both chosen on test
        # (an upper bound on the baseline; for reference).
        f"{p}/pearl_over_best_sd_oracle":
            max(tps_test[f"pearl_g{g}"] for g in gammas)
            / max(tps_test[f"sd_k{k}"] for k in ks),
    })
    report["dev"][regime] = {n: v / ar_tps for n, v in tps_dev.items()}
    report["test"][regime] = {n: v / ar_tps for n, v in tps_test.items()}
  # Real seconds of the one-device decoders (no overlap), at the memory-bound choices.
  sd_name = f"sd_k{out[f'{tag}/memory_bound/best_k']}"
  pe_name = f"pearl_g{out[f'{tag}/memory_bound/best_gamma']}"
  out[f"{tag}/wallclock/pearl_over_best_sd"] = (
      (test[pe_name].tokens / test[pe_name].wall_s) / (test[sd_name].tokens
                                                          / test[sd_name].wall_s))
  out[f"{tag}/wallclock/sd_tokens_per_s"] = test[sd_name].tokens / test[sd_name].wall_s
  out[f"{tag}/wallclock/pearl_tokens_per_s"] = test[pe_name].tokens / test[pe_name].wall_s
  common_lengths = sorted(set(ks) & set(gammas))
  for g in common_lengths:
    out[f"{tag}/mat/pearl_g{g}"] = _mat(test[f"pearl_g{g}"])
    out[f"{tag}/mat/sd_k{g}"] = _mat(test[f"sd_k{g}"])
  if common_lengths:
    out[f"{tag}/min_mat_ratio"] = min(_mat(test[f"pearl_g{g}"]) / _mat(test[f"sd_k{g}"])
                                      for g in common_lengths)
  sd1 = test[f"sd_k{ks[0]}"]
  out[f"{tag}/sd_acceptance_k{ks[0]}"] = float(sd1.accepted.sum() / sd1.widths.sum())
  report["mat"] = {name: _mat(r) for name, r in test.items()}
  report["wall_s"] = {name: r.wall_s for name, r in test.items()}
  report["pre_fraction"] = {name: float(np.mean(r.widths == 1)) for name, r in test.items()
                            if r.kind == "pearl"}
  return out, report


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  s = config.spec
  models = load_models(config)
  start = time.perf_counter()
  _say("measuring per-call costs")
  max_width = max(max(_ints(s.sd_ks)) + 1, max(_ints(s.pearl_gammas)))
  costs = measure_costs(models, max_width=max_width, context=config.clock.context,
                        calls=config.clock.calls, repeats=config.clock.repeats)
  summary = {"cost/t_target_us": costs.target[0] * 1e6, "cost/t_draft_us": costs.draft * 1e6,
             "cost/target_over_draft": costs.target[0] / costs.draft,
             f"cost/r_verify_{max_width}": costs.verify_ratio(max_width),
             "cost/seconds": round(time.perf_counter() - start, 1)}
  report = {"costs": {"target": costs.target, "draft": costs.draft}}
  for temperature in _floats(s.temperatures):
    _say(f"decoding at temperature {temperature:g}")
    start = time.perf_counter()
    out, rep = evaluate_temperature(config, models, costs, temperature)
    summary.update(out)
    summary[f"{_tag(temperature)}/seconds"] = round(time.perf_counter() - start, 1)
    report[_tag(temperature)] = rep
  ratios = [v for k, v in summary.items() if k.endswith("/min_mat_ratio")]
  summary["min_mat_ratio"] = min(ratios) if ratios else float("nan")
  _say("lossless check (table LMs)")
  summary.update(lossless_check(config))
  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(0, {f"final/{k}": v for k, v in summary.items()
                             if isinstance(v, (int, float))})
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "speedups.json"), "w") as f:
      json.dump(report, f, indent=1)
    _plot(workdir, config, report)
  return summary


def _plot(workdir, config, report):
  """Test speed-up over AR vs draft length, SD and PEARL, per temperature and regime:
  `throughput_vs_length.png`."""
  plt = plotting.plt
  temps = _floats(config.spec.temperatures)
  ks, gammas = _ints(config.spec.sd_ks), _ints(config.spec.pearl_gammas)
  fig, axes = plt.subplots(len(temps), len(REGIMES), figsize=(5.5 * len(REGIMES),
                                                              3.6 * len(temps)),
                           dpi=100, squeeze=False)
  for row, temperature in zip(axes, temps):
    for ax, regime in zip(row, REGIMES):
      test = report[_tag(temperature)]["test"][regime]
      ax.plot(ks, [test[f"sd_k{k}"] for k in ks], "o-", color="k", label="SD, fixed K")
      ax.plot(gammas, [test[f"pearl_g{g}"] for g in gammas], "s-", color="tab:red",
              label="PEARL, window gamma (overlapped)")
      ax.axhline(1.0, color="grey", linestyle="-.", label="autoregressive")
      ax.set(title=f"T = {temperature:g}, {_REGIME_TEXT[regime]}",
             xlabel="draft length K / window gamma",
             ylabel="speed-up over AR (virtual time)")
      ax.title.set_fontsize(8)
      ax.grid(alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "throughput_vs_length.png"))
  plt.close(fig)


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Real wall-clock of the one-device PEARL emulation vs SD and AR, batch 1, T = 1.

  One device cannot overlap the two models, so this measures PEARL *without* its overlap
  (gamma t_d + t_t(w) per round); the notes give the virtual-clock prediction with overlap
  from costs measured in the same process.
  """
  config = experiment.config_module(PAPER).get_config("smoke" if quick else "demo")
  config.unlock()
  config.spec.update(prompt_len=16, max_new=64, sd_ks="4", pearl_gammas="6")
  models = load_models(config)
  cfg = sampling.DEFAULT
  k, gamma = 4, 6
  n = 4 if quick else 16
  config.spec.update(test_prompts=n)
  prompts = prompts_for(config, "test")
  keys = jax.random.split(jax.random.key(5), n)
  s = config.spec
  ar_dec = speculative.make_autoregressive_decoder(models.target, prompt_len=16,
                                                   max_new=s.max_new, config=cfg)
  ar = jax.jit(lambda p, ks: lax.map(lambda a: ar_dec(models.target_params, a[0], 16, a[1]),
                                     (p, ks)))
  sd = make_sd(config, models, cfg)
  pe = make_pearl(config, models, cfg, gamma)
  t = benchmarking.interleaved(
      {"ar": functools.partial(ar, prompts, keys),
       "sd": functools.partial(sd, jnp.int32(k), prompts, keys),
       "pearl": functools.partial(pe, prompts, keys)}, rounds=3 if quick else 5)
  costs = measure_costs(models, max_width=max(k + 1, gamma), context=64, calls=64,
                        repeats=3 if quick else 5)
  sd_out, pe_out = sd(jnp.int32(k), prompts, keys), pe(prompts, keys)
  dr = np.asarray(sd_out.drafted)
  w = np.asarray(pe_out.width)
  sd_tps = float(np.asarray(sd_out.num_generated).sum()) / virtual_clock.speculative_time(
      costs, dr[dr >= 0])
  pe_tps = float(np.asarray(pe_out.num_generated).sum()) / pearl.overlapped_time(
      costs, gamma, w[w >= 0])
  shape = (f"{n} prompts x {s.max_new} new tokens, batch 1, SynthLang 4-layer target / "
           "1-layer draft, T = 1")
  return [
      benchmarking.time_row(
          PAPER, f"PEARL gamma={gamma} (one-device emulation, no overlap) vs SD K={k}, {shape}",
          ("PEARL emulation", t["pearl"]), (f"SD K={k}", t["sd"]),
          note=f"virtual clock with overlap predicts PEARL/SD = {pe_tps / sd_tps:.2f} from "
               f"costs measured here (t_t = {costs.target[0] * 1e6:.0f} us, t_d = "
               f"{costs.draft * 1e6:.1f} us); tokens per decode differ slightly (overshoot)"),
      benchmarking.time_row(
          PAPER, f"PEARL gamma={gamma} (one-device emulation) vs autoregressive, {shape}",
          ("PEARL emulation", t["pearl"]), ("autoregressive", t["ar"]),
          note="ratio > 1: the emulation is faster than AR in real time"),
  ]
