"""Experiment driver for `superposed_decoding` (library: `algorithms.decoding.superposed_decoding`).

No training: the model is the shipped SynthLang target (`launch.pretrained_lms`) and the
n-gram tables are counted from fresh sequences of the same source. The temperature tau is
chosen on dev prompts (card 2.4), then on separate test prompts every method continues each
prompt by `max_new` tokens:

* superposed: k drafts, one model call per position (the paper's method);
* nucleus: k independent nucleus samples (top-p), k calls per position (the baseline);
* greedy; beam: the same n-gram-smoothed scoring with k cache rows (k calls per position);
* superposed, alpha = 0: without the n-gram term (the card's ablation).

(The last three are `eval.baselines`; the smoke variant leaves them out to save compiles.)

Quality is the exact per-token NLL of each continuation given its prompt under the true
source (`pretrained_lms.language()`), never the model's own likelihood; "best of k" is the
lowest of a prompt's k continuations. Cost is counted model calls (sequence-forwards), and
single-prompt wall clock measured side by side. The linearity probe reports the cosine per
layer between the state of a superposed input and the superposition of the drafts' states,
on the superposed drafts and (under stress) on the nucleus samples.
"""

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxrepro.algorithms.decoding import sampling, speculative
from jaxrepro.algorithms.decoding import superposed_decoding as sd
from jaxrepro.configs import common
from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, experiment, metric_writers, plotting, pretrained_lms

PAPER = "superposed_decoding"
# The paper's speedup for k >= 3 drafts (abstract: "at least 2.44x faster").
PAPER_SPEEDUP = 2.44

CLAIMS = (
    experiment.Claim(
        "k_drafts_for_one_pass",
        "k = 3 superposed drafts cost one model pass per position: the 3 nucleus samples "
        "need at least 3x as many model calls (counted sequence-forwards)",
        "calls_ratio_nucleus_over_superposed", 3.0,
        note="Counted, so exact: T calls of batch 1 for the k drafts vs kT. Every call is the "
        "same width-1 forward, so the virtual clock (card 0.1) gives the same 3.0 on the "
        "measured CPU costs and in the memory-bound regime; it leaves out the n-gram lookups "
        "and top-k selection, which the wall-clock claim includes."),
    experiment.Claim(
        "best_draft_at_least_nucleus_best",
        "The best of the 3 superposed drafts is at least as good as the best of 3 nucleus "
        "samples (p = 0.9) in true-process NLL per token: mean over prompts of best-of-3 "
        "superposed minus best-of-3 nucleus, nats/token", "best_of_k_nll_gap", 0.0, "<=",
        note="The issue's restatement of 'as coherent as nucleus sampling' (the paper uses "
        "Llama-70B perplexity on OpenWebText); here the judge is the exact source. Best = "
        "oracle choice by true NLL for both methods."),
    experiment.Claim(
        "drafts_10pct_lower_nll",
        "The 3 superposed drafts have a mean true NLL per token at least 10% lower than the 3 "
        "nucleus samples (relative reduction)", "mean_nll_relative_reduction", 0.10,
        note="Card 2.4 claim (b). Superposed Decoding is a beam-like search: its drafts "
        "share most of their tokens (superposed/pairwise_differing_tokens in the summary) "
        "while nucleus samples differ almost everywhere, so part of the gap is diversity "
        "traded for likelihood; n-gram-smoothed beam search (beam/..., k calls per "
        "position) is the like-for-like reference."),
    experiment.Claim(
        "wall_clock_speedup",
        "Single-prompt decoding of 3 superposed drafts is at least 2.44x faster in wall "
        "clock than 3 sequential nucleus samples (the paper's figure for k >= 3)",
        "wall_clock_speedup_vs_sequential_nucleus", PAPER_SPEEDUP,
        note="CPU, batch 1: each method decodes the timing prompts one after another "
        "inside one jitted computation (one dispatch per timed call), median of interleaved "
        "rounds. (Changed after earlier runs that timed one jitted call per decode from "
        "Python: on this machine, shared by many processes, dispatch waits swung that ratio "
        "between 1.8 and 8.1.) Expected to fall short at this scale: the tiny model's "
        "forward (~60-75 us) is comparable to the superposed step's own work (n-gram "
        "lookups by binary search in the sparse 4-gram table, top-2k over k x V, draft "
        "buffer gathers), so a superposed step costs ~2x a plain one; for a 7B model the "
        "forward dwarfs that work. Trial in-jit runs on this busy machine gave 1.3-1.9x. "
        "Batching the 3 nucleus samples in one batch-3 pass is nearly free when decoding is "
        "memory-bound (card 2.3's caveat); that ratio is reported as "
        "wall_clock_speedup_vs_batched_nucleus."),
)


BASELINES = ("greedy", "beam", "superposed_alpha0")


def _names(text: str) -> list[str]:
  return [s.strip() for s in str(text).split(",") if s.strip()]


def check_config(config: ml_collections.ConfigDict) -> None:
  common.check_positive(config, "ngram.corpus_sequences", "eval.prompt_len", "eval.max_new",
                        "eval.num_prompts", "eval.dev_prompts", "superposed.n_drafts",
                        "nucleus.temperature", "nucleus.top_p", "probe.num_prompts")
  s, e = config.superposed, config.eval
  weights, temps = common.comma_list(config.ngram.weights), common.comma_list(s.temperatures)
  if not weights or min(weights) < 0 or max(weights) == 0:
    raise ConfigError(f"config.ngram.weights={config.ngram.weights!r} must list >= 0 "
                      "interpolation weights for context lengths 1, 2, ..., one of them > 0")
  if not temps or min(temps) <= 0:
    raise ConfigError(f"config.superposed.temperatures={s.temperatures!r} must list "
                      "temperatures > 0")
  if s.n_token_sample < 2 * s.n_drafts:
    raise ConfigError(f"config.superposed.n_token_sample={s.n_token_sample} must be >= "
                      f"2 * n_drafts = {2 * s.n_drafts}")
  if not 0 <= s.alpha <= 1:
    raise ConfigError(f"config.superposed.alpha={s.alpha} must lie in [0, 1]")
  unknown = set(_names(e.baselines)) - set(BASELINES)
  if unknown:
    raise ConfigError(f"config.eval.baselines={e.baselines!r} names unknown methods "
                      f"{sorted(unknown)}; choose among {', '.join(BASELINES)}")
  if e.prompt_len < 2:
    raise ConfigError(f"config.eval.prompt_len={e.prompt_len} must be >= 2 (the "
                      "autoregressive baselines need two real prompt tokens)")
  if e.prompt_len + e.max_new > pretrained_lms.MAX_LEN:
    raise ConfigError(f"config.eval.prompt_len + max_new = {e.prompt_len + e.max_new} must "
                      f"be <= {pretrained_lms.MAX_LEN} (the models' context)")
  if config.ngram.corpus_length <= len(weights):
    raise ConfigError(f"config.ngram.corpus_length={config.ngram.corpus_length} must exceed "
                      f"the longest n-gram order {len(weights) + 1}")
  if config.probe.num_prompts > e.num_prompts:
    raise ConfigError(f"config.probe.num_prompts={config.probe.num_prompts} must be <= "
                      f"eval.num_prompts={e.num_prompts}")


def superposed_config(config, alpha=None) -> sd.SuperposedConfig:
  s = config.superposed
  return sd.SuperposedConfig(
      n_drafts=s.n_drafts, n_token_sample=s.n_token_sample, temperature=common.comma_list(
          s.temperatures)[0], alpha=s.alpha if alpha is None else alpha,
      ngram_weights=tuple(common.comma_list(config.ngram.weights)), penalty=s.penalty)


# ---------------------------------------------------------------------------------- methods


def build(config):
  """The model, its two LM views, the exact source and the n-gram tables."""
  model = pretrained_lms.load(config.model)
  lang = pretrained_lms.language()
  n = config.ngram
  corpus = lang.sample(n.corpus_seed, n.corpus_sequences, n.corpus_length)
  lengths = tuple(range(1, len(common.comma_list(n.weights)) + 1))
  tables = sd.build_ngram_tables(corpus, lengths, model.config.vocab_size)
  return model, lang, tables


def make_methods(config, model):
  """Jitted `(params, tables, prompts [N, P], key) -> tokens [N, k, T]` per method, and
  each method's model calls (sequence-forwards) per prompt."""
  e, k = config.eval, config.superposed.n_drafts
  p_len, t_new = e.prompt_len, e.max_new
  slm = sd.transformer_lm(model.config, model.graphdef)
  alm = speculative.transformer_lm(model.config, model.graphdef)

  def superposed(alpha, superpose):
    dec = sd.make_decoder(slm, prompt_len=p_len, max_new=t_new,
                          config=superposed_config(config, alpha), superpose=superpose)

    @jax.jit
    def run(params, tables, prompts, key, temperature):
      del key
      out = jax.vmap(dec, in_axes=(None, None, 0, None))(params, tables, prompts,
                                                         temperature)
      return out.tokens, out.row_forwards[0]
    return run

  def autoregressive(cfg, samples):
    dec = speculative.make_autoregressive_decoder(alm, prompt_len=p_len, max_new=t_new,
                                                  config=cfg)

    @jax.jit
    def run(params, tables, prompts, key, temperature):
      del tables, temperature
      keys = jax.random.split(key, (prompts.shape[0], samples))
      one = lambda prompt, ks: jax.vmap(lambda kk: dec(params, prompt, p_len, kk))(ks)
      out = jax.vmap(one)(prompts, keys)
      # Model calls after the prefill (as for the superposed decoder), `samples` sequences.
      return out.tokens, samples * out.target_calls[0, 0]
    return run

  nucleus = sampling.SamplingConfig(config.nucleus.temperature, 0, config.nucleus.top_p)
  extra = {
      "greedy": lambda: autoregressive(sampling.GREEDY, 1),
      "beam": lambda: superposed(None, False),
      "superposed_alpha0": lambda: superposed(0.0, True),
  }
  methods = {"superposed": superposed(None, True), "nucleus": autoregressive(nucleus, k)}
  methods.update({name: extra[name]() for name in _names(config.eval.baselines)})
  return methods


def true_nll(lang, prompts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """Exact per-token NLL of continuations given their prompts: [N, P], [N, k, T] -> [N, k]."""
  n, k, t = tokens.shape
  seqs = np.concatenate([np.repeat(prompts[:, None], k, 1), tokens], -1).reshape(n * k, -1)
  lp = lang.token_log_probs(seqs)[:, prompts.shape[1]:]
  return -lp.mean(-1).reshape(n, k)


def quality(lang, prompts, tokens) -> dict[str, float]:
  prompts, tokens = np.asarray(prompts), np.asarray(tokens)
  nll = true_nll(lang, prompts, tokens)
  k = tokens.shape[1]
  seqs = np.concatenate([np.repeat(prompts[:, None], k, 1), tokens], -1)
  valid = lang.is_valid(seqs.reshape(-1, seqs.shape[-1])).reshape(nll.shape)
  distinct = [len({tuple(r) for r in row}) for row in tokens]
  # Diversity: positions at which two continuations of the same prompt differ (mean pair).
  pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
  differ = (np.mean([np.sum(tokens[:, i] != tokens[:, j], -1) for i, j in pairs])
            if pairs else 0.0)
  # Factuality proxy (card 2.4 hit@k): the source's most likely next token is among the
  # first tokens of the k continuations.
  top = np.argmax(lang.next_token_probs(prompts), -1)
  return {"nll_mean": float(nll.mean()), "nll_best": float(nll.min(1).mean()),
          "nll_first": float(nll[:, 0].mean()), "nll_stderr": float(
              nll.mean(1).std(ddof=1) / np.sqrt(len(nll))) if len(nll) > 1 else 0.0,
          "valid_rate": float(valid.mean()), "distinct_per_prompt": float(np.mean(distinct)),
          "pairwise_differing_tokens": float(differ),
          "hit_at_k_first_token": float(np.mean(np.any(tokens[:, :, 0] == top[:, None], 1)))}


# -------------------------------------------------------------------------------------- run


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  start = time.perf_counter()
  e = config.eval
  model, lang, tables = build(config)
  methods = make_methods(config, model)
  summary = {"setup_seconds": round(time.perf_counter() - start, 2)}
  dev = jnp.asarray(lang.sample(e.dev_seed, e.dev_prompts, e.prompt_len), jnp.int32)
  test = jnp.asarray(lang.sample(e.prompt_seed, e.num_prompts, e.prompt_len), jnp.int32)
  key = jax.random.key(config.seed)

  # tau on the dev prompts: the lowest mean true NLL of the drafts.
  dev_nll = {}
  for tau in common.comma_list(config.superposed.temperatures):
    tokens, _ = methods["superposed"](model.params, tables, dev, key, jnp.float32(tau))
    dev_nll[tau] = true_nll(lang, np.asarray(dev), np.asarray(tokens)).mean()
    summary[f"dev/tau={tau}/nll_mean"] = float(dev_nll[tau])
  tau = min(dev_nll, key=dev_nll.get)
  summary["tau"] = tau

  outputs = {}
  start = time.perf_counter()
  for i, (name, run) in enumerate(methods.items()):
    tokens, calls = run(model.params, tables, test, jax.random.fold_in(key, i),
                        jnp.float32(tau))
    outputs[name] = np.asarray(tokens)
    summary[f"{name}/calls_per_prompt"] = int(calls)
    for metric, value in quality(lang, test, tokens).items():
      summary[f"{name}/{metric}"] = value
  summary["decode_seconds"] = round(time.perf_counter() - start, 2)

  sup, nuc = "superposed", "nucleus"
  summary["calls_ratio_nucleus_over_superposed"] = (
      summary[f"{nuc}/calls_per_prompt"] / summary[f"{sup}/calls_per_prompt"])
  summary["best_of_k_nll_gap"] = summary[f"{sup}/nll_best"] - summary[f"{nuc}/nll_best"]
  summary["mean_nll_relative_reduction"] = 1 - summary[f"{sup}/nll_mean"] / summary[
      f"{nuc}/nll_mean"]
  # Paired standard error of the best-of-k gap over prompts.
  best = {m: true_nll(lang, np.asarray(test), outputs[m]).min(1) for m in (sup, nuc)}
  diff = best[sup] - best[nuc]
  summary["best_of_k_nll_gap_stderr"] = float(diff.std(ddof=1) / np.sqrt(len(diff)))

  probe = make_probe(model)
  n = config.probe.num_prompts
  summary.update(linearity(probe, test[:n], outputs[sup][:n], "linearity"))
  # The same probe on the nucleus samples, which differ at almost every position: the
  # premise under stress rather than on the near-identical superposed drafts.
  summary.update(linearity(probe, test[:n], outputs[nuc][:n], "linearity_nucleus"))
  if config.timing.rounds > 0:
    summary.update(wall_clock(config, model, tables, np.asarray(test), tau))
  with metric_writers.MetricWriter(workdir) as writer:
    writer.write_scalars(0, {f"final/{k}": v for k, v in summary.items()})
  if jax.process_index() == 0:
    _write_samples(workdir, np.asarray(test), outputs, lang)
    _plot(workdir, summary, methods)
  return summary


def make_probe(model):
  """The jitted linearity probe over prompts: ([N, P], [N, k, T], [k]) -> LinearityProbe."""
  return jax.jit(jax.vmap(functools.partial(sd.linearity_probe, model.config, model.graphdef,
                                            model.params), in_axes=(0, 0, None)))


def linearity(probe, prompts, drafts, prefix: str) -> dict[str, float]:
  """Mean cosine per layer of the linearity probe on k continuations of each prompt.

  The weights are the uniform 1/k at every position (the drafts' own per-step weights are
  internal to the decoder; uniform is the hardest case, a single dominant draft is near
  linear by construction).
  """
  k = drafts.shape[1]
  out = probe(prompts, jnp.asarray(drafts), jnp.full((k,), 1.0 / k))
  cos = np.asarray(out.cosine).mean(0)
  return {f"{prefix}/cosine_layer{i}": float(c) for i, c in enumerate(cos)}


def _single_prompt_fns(config, model, tables, tau):
  """Jitted `(prompts [N, P], keys [N, k]) -> tokens` that decode the N prompts one after
  another inside one computation (batch 1 each): superposed, and per prompt k nucleus
  samples run one after another or as one batch-k pass.

  One dispatch per timed call, so the figure is compute (what the paper's pass count is
  about), not the Python dispatch of many small calls, which on a busy shared CPU waits
  for a core and swings by several x between runs.
  """
  e = config.eval
  sup = sd.make_decoder(sd.transformer_lm(model.config, model.graphdef),
                        prompt_len=e.prompt_len, max_new=e.max_new,
                        config=superposed_config(config))
  nucleus = speculative.make_autoregressive_decoder(
      speculative.transformer_lm(model.config, model.graphdef), prompt_len=e.prompt_len,
      max_new=e.max_new, config=sampling.SamplingConfig(config.nucleus.temperature, 0,
                                                        config.nucleus.top_p))
  def per_prompt(fn):
    # Parameters and tables are arguments (closing over them would embed them as
    # constants in the compiled computation).
    run = jax.jit(lambda params, tables, temperature, prompts, keys: jax.lax.map(
        lambda pk: fn(params, tables, temperature, *pk), (prompts, keys)))
    return functools.partial(run, model.params, tables, jnp.float32(tau))

  def one_nucleus(params, p, kk):
    return nucleus(params, p, e.prompt_len, kk).tokens

  return {
      "superposed": per_prompt(lambda params, tables, t, p, ks: sup(params, tables, p, t).tokens),
      "nucleus_sequential": per_prompt(lambda params, tables, t, p, ks: jax.lax.map(
          lambda kk: one_nucleus(params, p, kk), ks)),
      "nucleus_batched": per_prompt(lambda params, tables, t, p, ks: jax.vmap(
          one_nucleus, (None, None, 0))(params, p, ks)),
  }


def _time_single_prompt(config, model, tables, prompts, tau, rounds):
  """Median seconds per timed call (all prompts) of each decoder, interleaved rounds."""
  fns = _single_prompt_fns(config, model, tables, tau)
  prompts = jnp.asarray(prompts, jnp.int32)
  keys = jax.random.split(jax.random.key(config.seed + 7),
                          (prompts.shape[0], config.superposed.n_drafts))
  loops = {name: functools.partial(f, prompts, keys) for name, f in fns.items()}
  return benchmarking.interleaved(loops, rounds=rounds), prompts.shape[0]


def wall_clock(config, model, tables, prompts, tau) -> dict[str, float]:
  """Wall-clock ms per prompt and the speedups of the superposed decoder."""
  t, n = _time_single_prompt(config, model, tables, prompts[:config.timing.prompts], tau,
                             config.timing.rounds)
  per = {name: t[name].median_s / n for name in t}
  out = {f"wall_ms_per_prompt/{name}": 1e3 * v for name, v in per.items()}
  out["wall_clock_speedup_vs_sequential_nucleus"] = (per["nucleus_sequential"]
                                                     / per["superposed"])
  out["wall_clock_speedup_vs_batched_nucleus"] = per["nucleus_batched"] / per["superposed"]
  return out


def _write_samples(workdir, prompts, outputs, lang, num=5):
  """A few prompts with every method's continuations and their true NLL: `samples.json`."""
  rows = []
  for i in range(min(num, len(prompts))):
    row = {"prompt": prompts[i].tolist()}
    for name, tokens in outputs.items():
      nll = true_nll(lang, prompts[i:i + 1], tokens[i:i + 1])[0]
      row[name] = [{"tokens": t.tolist(), "true_nll": round(float(v), 4)}
                   for t, v in zip(tokens[i], nll)]
    rows.append(row)
  with open(os.path.join(workdir, "samples.json"), "w") as f:
    json.dump(rows, f, indent=1)


def _plot(workdir, summary, methods):
  """True NLL per method (mean and best of k) and the linearity cosines: `results.png`."""
  plt = plotting.plt
  fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 3.8), dpi=100)
  names = list(methods)
  x = np.arange(len(names))
  ax.bar(x - 0.2, [summary[f"{m}/nll_mean"] for m in names], 0.4, label="mean of drafts")
  ax.bar(x + 0.2, [summary[f"{m}/nll_best"] for m in names], 0.4, label="best of drafts")
  ax.set_xticks(x, [f"{m}\n{summary[f'{m}/calls_per_prompt']} calls" for m in names],
                fontsize=7)
  ax.set(ylabel="true NLL per token (nats)", title="continuation quality")
  ax.legend(fontsize=7)
  for prefix, label in (("linearity/", "superposed drafts"),
                        ("linearity_nucleus/", "nucleus samples")):
    cos = [v for k, v in sorted(summary.items()) if k.startswith(prefix)]
    bx.plot(range(len(cos)), cos, marker="o", label=label)
  bx.legend(fontsize=7)
  bx.set(xlabel="layer (0 = embeddings)", ylabel="cosine", ylim=(0, 1.05),
         title="superposed state vs superposition of states")
  bx.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "results.png"))
  plt.close(fig)


# --------------------------------------------------------------------------------- benchmark


def benchmark(quick: bool) -> list[benchmarking.Row]:
  """Single-prompt decoding of k = 3 drafts: superposed vs 3 nucleus samples.

  Both baselines are reported: the paper's k sequential passes, and the k samples batched
  into one batch-k pass (card 2.3's caveat).
  """
  from jaxrepro.configs import superposed_decoding as sd_config  # Local: only needed here.
  config = sd_config.get_config("smoke" if quick else "demo")
  model, lang, tables = build(config)
  e = config.eval
  prompts = lang.sample(e.prompt_seed, config.timing.prompts, e.prompt_len)
  tau = common.comma_list(config.superposed.temperatures)[0]
  t, _ = _time_single_prompt(config, model, tables, prompts, tau, 3 if quick else 7)
  what = (f"{config.superposed.n_drafts} drafts of {e.max_new} tokens, {len(prompts)} "
          f"prompts of {e.prompt_len}, batch 1")
  note = ("each decodes the prompts one by one inside one jitted computation; superposed "
          "includes the n-gram lookups and top-k selection")
  return [
      benchmarking.time_row(PAPER, f"{what} vs sequential nucleus",
                            ("superposed (1 pass)", t["superposed"]),
                            ("3 nucleus samples, sequential", t["nucleus_sequential"]),
                            note=note),
      benchmarking.time_row(PAPER, f"{what} vs batched nucleus",
                            ("superposed (1 pass)", t["superposed"]),
                            ("3 nucleus samples, one batch-3 pass", t["nucleus_batched"]),
                            note=note),
  ]
