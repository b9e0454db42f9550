"""Tests for the benchmark timing helpers: warm-up outside the timing, outputs returned."""

import time

import jax.numpy as jnp

from jaxrepro.launch import benchmarking


def test_warm_timed_excludes_the_first_call_and_returns_the_output():
  calls = []

  def fn(x):
    calls.append(x)
    if len(calls) == 1:
      time.sleep(0.3)  # a "compile" that must not be timed
    return jnp.asarray(x) * 2

  out, seconds = benchmarking.warm_timed(fn, 3)
  assert calls == [3, 3] and int(out) == 6
  assert 0.0 <= seconds < 0.2


def test_interleaved_runs_every_candidate_rounds_plus_one_times():
  counts = {"a": 0, "b": 0}

  def make(name):
    def fn():
      counts[name] += 1
      return jnp.zeros(())
    return fn

  timings = benchmarking.interleaved({n: make(n) for n in counts}, rounds=3)
  assert counts == {"a": 4, "b": 4}
  assert all(t.rounds == 3 and t.min_s <= t.median_s <= t.max_s for t in timings.values())
