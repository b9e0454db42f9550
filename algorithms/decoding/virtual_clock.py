"""The virtual clock: decoding time from counted model calls and measured per-call costs.

On a CPU, tiny models are compute-bound (verifying K+1 tokens costs several times one token)
and dispatch dominates wall time, so a speed-up measured there says little about the
memory-bound GPU regime the decoding papers target. Following the decoding spec cards
(section 0.1), speed claims on CPU are stated in *virtual time*:

  T_sequential = sum_rounds [ drafted_r * t_draft + t_target(w_r) ],   w_r = drafted_r + 1,
  T_AR = n_tokens * t_target(1),

where t_target(w) is the measured cost of one cached target forward over w new tokens and
t_draft that of one draft token. Overlapping schemes (PEARL) combine the same per-round terms
with `max` instead of `+`. `CostModel.memory_bound(...)` gives the GPU-like regime where a
target call costs the same for every width (r = 1), so both regimes can be reported side by
side. Every number here is a model of time, and reports must say so.
"""

import dataclasses
import functools
import statistics
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrepro.algorithms.decoding import speculative


@dataclasses.dataclass(frozen=True)
class CostModel:
  """Per-call costs in seconds.

  Attributes:
    target: `target[w - 1]` is one target forward over `w` new tokens, w = 1..len(target).
    draft: one draft forward over one new token.
  """
  target: tuple[float, ...]
  draft: float

  def __post_init__(self):
    if not self.target or min(self.target) <= 0 or self.draft < 0:
      raise ValueError(f"CostModel needs positive target costs and draft >= 0; got {self}")

  def target_cost(self, width) -> np.ndarray:
    """t_target(w) for an array of widths (clipped to the measured range)."""
    width = np.clip(np.asarray(width, np.int64), 1, len(self.target))
    return np.asarray(self.target)[width - 1]

  @property
  def cost_ratio(self) -> float:
    """c = t_draft / t_target(1)."""
    return self.draft / self.target[0]

  def verify_ratio(self, width: int) -> float:
    """r(w) = t_target(w) / t_target(1): 1 when memory-bound, larger when compute-bound."""
    return float(self.target_cost(width)) / self.target[0]

  def memory_bound(self) -> "CostModel":
    """The same draft/target ratio, with a target call costing t_target(1) at any width."""
    return CostModel(target=(self.target[0],) * len(self.target), draft=self.draft)


def round_log(out: speculative.DecodeOutput) -> tuple[np.ndarray, np.ndarray]:
  """(drafted, accepted) per round of one decode, padding rounds removed."""
  drafted, accepted = np.asarray(out.drafted), np.asarray(out.accepted)
  keep = drafted >= 0
  return drafted[keep], accepted[keep]


def speculative_time(costs: CostModel, drafted: Sequence[int]) -> float:
  """Virtual time of sequential speculative rounds (draft, then verify K+1 tokens)."""
  drafted = np.asarray(drafted, np.int64)
  return float(np.sum(drafted * costs.draft + costs.target_cost(drafted + 1)))


def autoregressive_time(costs: CostModel, num_tokens: int) -> float:
  """Virtual time of decoding `num_tokens` tokens one target call each."""
  return float(num_tokens * costs.target[0])


def measure_costs(target: speculative.LM, target_params, draft: speculative.LM,
                  draft_params, *, max_width: int, context: int = 64, calls: int = 50,
                  repeats: int = 5) -> CostModel:
  """Measures cached forward costs on this device (batch 1, a cache holding `context`).

  A call is timed the way the decoding loops run it: `calls` forwards inside one jitted
  `fori_loop` (so Python dispatch is not counted), divided by `calls`; the median of
  `repeats` such runs is kept, interleaved across widths so that slow drift of the machine
  affects all of them alike.
  """
  if max_width < 1 or context < 1 or calls < 1 or repeats < 1:
    raise ValueError(f"max_width={max_width}, context={context}, calls={calls} and "
                     f"repeats={repeats} must all be >= 1")
  slots = context + max_width

  def prepare(lm, params):
    cache = lm.init_cache(1, slots)
    return lm.apply(params, cache, jnp.zeros((1, context), jnp.int32)).cache

  def loop(lm, width):
    def run(params, cache):
      def body(i, acc):
        # Tokens change with i so that XLA cannot hoist the forward out of the loop.
        tokens = (jnp.arange(width, dtype=jnp.int32)[None] + i) % lm.vocab_size
        return acc + lm.apply(params, cache, tokens).logits[0, -1, 0]
      return jax.lax.fori_loop(0, calls, body, jnp.float32(0))
    return jax.jit(run)

  target_cache, draft_cache = prepare(target, target_params), prepare(draft, draft_params)
  loops = {("draft", 1): (loop(draft, 1), draft_params, draft_cache)}
  for w in range(1, max_width + 1):
    loops[("target", w)] = (loop(target, w), target_params, target_cache)
  runs = {name: functools.partial(*args) for name, args in loops.items()}
  for fn in runs.values():
    jax.block_until_ready(fn())  # compile
  samples = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append((time.perf_counter() - start) / calls)
  median = {name: statistics.median(s) for name, s in samples.items()}
  return CostModel(target=tuple(median[("target", w)] for w in range(1, max_width + 1)),
                   draft=median[("draft", 1)])
