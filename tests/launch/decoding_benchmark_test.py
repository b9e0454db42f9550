"""The decoding benchmark's speed-up formula (PERFORMANCE.md section 4) and its rows."""

import math

import pytest

from jaxrepro.launch import decoding_benchmark


@pytest.mark.parametrize("alpha,k,c,expected", [
    # The worked examples of PERFORMANCE.md section 4 (r = 1, the best K for each).
    (0.8, 8, 0.05, 3.09), (0.8, 6, 0.1, 2.47), (0.8, 4, 0.2, 1.87),
    (0.6, 4, 0.05, 1.92), (0.6, 3, 0.1, 1.67), (0.6, 2, 0.2, 1.40)])
def test_predicted_speedup_matches_the_worked_examples(alpha, k, c, expected):
  assert decoding_benchmark.predicted_speedup(alpha, k, c, 1.0) == pytest.approx(
      expected, abs=0.01)


def test_predicted_speedup_limits():
  # Every draft accepted: K + 1 tokens per round; nothing accepted: one token per round.
  assert decoding_benchmark.predicted_speedup(1.0, 3, 0.0, 1.0) == 4.0
  assert decoding_benchmark.predicted_speedup(0.0, 3, 0.1, 2.0) == pytest.approx(1 / 2.3)


@pytest.mark.slow
def test_core_rows_compare_speculative_with_autoregressive():
  rows = decoding_benchmark.core_rows("multidraft_sd", quick=True)
  assert len(rows) == 2
  for row in rows:
    assert row.ours_value > 0 and row.baseline_value > 0 and math.isfinite(row.ratio)
    assert "target calls/token" in row.note
