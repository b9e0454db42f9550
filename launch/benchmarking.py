"""Fair side-by-side timing (PERFORMANCE.md section 0) and the rows benchmarks report.

Rules this module enforces: candidates are timed in one process, interleaved round by round
(A, B, A, B, ...), every timed call is `jax.block_until_ready`-ed, the first call (compile
plus run) is reported separately as compile time, and the figure is the median with its
spread. Each report also carries two calibration numbers of the machine (matmul GFLOP/s and
copy GB/s) so figures from different runners can be compared.
"""

import dataclasses
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Timing:
  """Seconds per call of one candidate: median and spread over `rounds`, and compile."""
  median_s: float
  min_s: float
  max_s: float
  compile_s: float
  rounds: int


def interleaved(candidates: Mapping[str, Callable[[], Any]], *, rounds: int = 5
                ) -> dict[str, Timing]:
  """Times each zero-argument callable `rounds` times, interleaved, after a warm-up call.

  `compile_s` is the first call's time minus the median run time (the cost of tracing and
  compiling, plus any one-off work).
  """
  first, samples = {}, {name: [] for name in candidates}
  for name, fn in candidates.items():
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first[name] = time.perf_counter() - start
  for _ in range(rounds):
    for name, fn in candidates.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      samples[name].append(time.perf_counter() - start)
  out = {}
  for name, times in samples.items():
    median = statistics.median(times)
    out[name] = Timing(median, min(times), max(times), max(0.0, first[name] - median), rounds)
  return out


def warm_timed(fn: Callable[..., Any], *args) -> tuple[Any, float]:
  """`(fn(*args), seconds)` of one call after a warm-up call (compile outside the timing).

  For drivers that need a measured run's output and its time together (`interleaved` is for
  side-by-side comparisons of several candidates).
  """
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Row:
  """One side-by-side comparison in a benchmark report.

  `ratio` is `baseline / ours` for costs (times, bytes): above 1 means ours is cheaper. For
  rates (steps/s) the driver passes the ratio it means and says so in `note`.
  """
  paper: str
  benchmark: str
  ours: str
  baseline: str
  ours_value: float
  baseline_value: float
  unit: str
  ratio: float
  note: str = ""
  skipped: str = ""


def time_row(paper: str, benchmark: str, ours: tuple[str, Timing],
             baseline: tuple[str, Timing], *, note: str = "", scale: float = 1e3,
             unit: str = "ms") -> Row:
  """A row comparing two `Timing`s by median (reported in ms by default)."""
  (ours_name, t_ours), (base_name, t_base) = ours, baseline
  spread = (f"ours {t_ours.min_s * scale:.3g}-{t_ours.max_s * scale:.3g}, baseline "
            f"{t_base.min_s * scale:.3g}-{t_base.max_s * scale:.3g} {unit} over "
            f"{t_ours.rounds} rounds; compile {t_ours.compile_s:.2f}/{t_base.compile_s:.2f} s")
  return Row(paper, benchmark, ours_name, base_name, t_ours.median_s * scale,
             t_base.median_s * scale, unit, t_base.median_s / t_ours.median_s,
             f"{note}; {spread}" if note else spread)


def skipped_row(paper: str, benchmark: str, anchor: str, reason: str) -> Row:
  """A row for an external anchor that could not run here (e.g. not importable)."""
  nan = float("nan")
  return Row(paper, benchmark, "-", anchor, nan, nan, "", nan, skipped=reason)


def calibrate(quick: bool = False) -> dict[str, float]:
  """Matmul GFLOP/s (fp32) and copy GB/s of this device, measured now."""
  n = 512 if quick else 1024
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  size = (8 if quick else 64) * 2**20 // 4
  x = jnp.ones((size,), jnp.float32)
  copy = jax.jit(lambda v: v * 1.0001)
  t = interleaved({"matmul": lambda: matmul(a), "copy": lambda: copy(x)}, rounds=5)
  return {"matmul_gflops": 2 * n**3 / t["matmul"].median_s / 1e9,
          # A scaled copy reads and writes every byte once.
          "copy_gbps": 2 * size * 4 / t["copy"].median_s / 1e9}
