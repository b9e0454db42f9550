"""The decoding family's shared speed check: speculative vs autoregressive decoding.

One prompt at batch 1 on the shipped SynthLang target and draft, both loops jitted
(`algorithms.decoding.speculative`). For each sampling setting (greedy and temperature 1)
it times the autoregressive decoder against speculative decoding with the best constant
draft length `K`, and puts next to the measured wall-clock ratio the numbers that explain
it (PERFORMANCE.md section 4): target calls per token, the acceptance rate `α`, the cost
ratio `c = t_draft / t_target(1)`, the verify ratio `r = t_target(K+1) / t_target(1)`
measured on this device, and the predicted speed-up `S = E / (K c + r)` with
`E = (1 - α^(K+1)) / (1 - α)`, both for the measured `r` and for `r = 1` (the
memory-bound regime of a GPU at batch 1). Called from a decoding driver's `benchmark`.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro.algorithms.decoding import sampling, speculative, virtual_clock
from jaxrepro.launch import benchmarking, pretrained_lms

PROMPT_LEN = 16


def predicted_speedup(alpha: float, k: int, c: float, r: float) -> float:
  """`S = E / (K c + r)`, `E = (1 - α^(K+1)) / (1 - α)` tokens per target call."""
  tokens = (k + 1) if alpha >= 1 else (1 - alpha ** (k + 1)) / (1 - alpha)
  return tokens / (k * c + r)


def core_rows(paper: str, quick: bool) -> list[benchmarking.Row]:
  """AR vs the best constant-K speculative decoder, greedy and at temperature 1."""
  target = pretrained_lms.load("synthlang_target")
  draft = pretrained_lms.load("synthlang_draft")
  tlm = speculative.transformer_lm(target.config, target.graphdef)
  dlm = speculative.transformer_lm(draft.config, draft.graphdef)
  prompt = jnp.asarray(pretrained_lms.language().sample(7, 1, PROMPT_LEN)[0], jnp.int32)
  max_new = 64 if quick else 128
  ks = (3,) if quick else (2, 3, 4, 5)
  rounds = 3 if quick else 7
  costs = virtual_clock.measure_costs(tlm, target.params, dlm, draft.params,
                                      max_width=max(ks) + 1, calls=10 if quick else 50,
                                      repeats=2 if quick else 5)
  c = costs.cost_ratio
  rows = []
  for label, config in (("greedy", sampling.GREEDY), ("temperature 1", sampling.DEFAULT)):
    key = jax.random.key(0)
    ar = speculative.make_autoregressive_decoder(
        tlm, prompt_len=PROMPT_LEN, max_new=max_new, config=config)
    candidates = {"ar": functools.partial(ar, target.params, prompt, PROMPT_LEN, key)}
    outputs = {}
    for k in ks:
      make = speculative.make_speculative_decoder(
          tlm, dlm, prompt_len=PROMPT_LEN, max_new=max_new, k_max=k, config=config)
      candidates[k] = functools.partial(make, target.params, draft.params, prompt,
                                        PROMPT_LEN, key)
      outputs[k] = candidates[k]()
    t = benchmarking.interleaved(candidates, rounds=rounds)
    best = min(ks, key=lambda k: t[k].median_s)
    out = outputs[best]
    drafted, accepted = virtual_clock.round_log(out)
    # Per-token acceptance estimated from the rounds: accepted / drafted.
    alpha = float(np.sum(accepted) / max(np.sum(drafted), 1))
    r = costs.verify_ratio(best + 1)
    calls_per_token = int(out.target_calls) / int(out.num_generated)
    rows.append(benchmarking.time_row(
        paper, f"decode {max_new} tokens, batch 1, {label} (SynthLang target 485k / draft 25k)",
        (f"speculative decoding, best K={best}", t[best]),
        ("autoregressive decoding (same target, jitted)", t["ar"]),
        note=f"target calls/token {calls_per_token:.2f} (AR 1.00); alpha {alpha:.2f}, "
             f"c {c:.3f}, r {r:.2f}; predicted S = E/(Kc+r) {predicted_speedup(alpha, best, c, r):.2f}"
             f" here, {predicted_speedup(alpha, best, c, 1.0):.2f} at r=1 (memory-bound)"))
  return rows
