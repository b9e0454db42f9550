"""The virtual clock's arithmetic against hand-computed times, and a real measurement."""

import jax
import numpy as np
import pytest

from jaxrepro.algorithms.decoding import speculative, table_lm, virtual_clock


def test_speculative_and_autoregressive_time_by_hand():
  costs = virtual_clock.CostModel(target=(1.0, 1.5, 2.0, 2.5), draft=0.1)
  # Rounds drafting 3, 1 and 0 tokens verify widths 4, 2 and 1.
  expected = (3 * 0.1 + 2.5) + (1 * 0.1 + 1.5) + (0 + 1.0)
  assert virtual_clock.speculative_time(costs, [3, 1, 0]) == pytest.approx(expected)
  assert virtual_clock.autoregressive_time(costs, 7) == pytest.approx(7.0)
  assert costs.cost_ratio == pytest.approx(0.1)
  assert costs.verify_ratio(3) == pytest.approx(2.0)
  flat = costs.memory_bound()
  assert flat.verify_ratio(4) == 1.0 and flat.draft == costs.draft
  # Widths beyond the measured range use the widest measured cost.
  assert costs.target_cost(9) == 2.5


def test_bad_costs_are_rejected():
  with pytest.raises(ValueError, match="positive target costs"):
    virtual_clock.CostModel(target=(), draft=0.1)
  with pytest.raises(ValueError, match="positive target costs"):
    virtual_clock.CostModel(target=(1.0,), draft=-1.0)


def test_round_log_drops_padding():
  out = speculative.DecodeOutput(
      tokens=np.zeros(4), num_generated=np.int32(5), target_calls=np.int32(2),
      draft_calls=np.int32(4), rounds=np.int32(2), accepted=np.array([2, 1, -1, -1]),
      drafted=np.array([3, 1, -1, -1]))
  drafted, accepted = virtual_clock.round_log(out)
  np.testing.assert_array_equal(drafted, [3, 1])
  np.testing.assert_array_equal(accepted, [2, 1])


def test_measured_costs_are_positive_and_cover_every_width():
  vocab, order = 4, 2
  table = table_lm.random_table(jax.random.key(0), vocab, order)
  lm = table_lm.table_lm(vocab, order)
  costs = virtual_clock.measure_costs(lm, table, lm, table, max_width=3, context=4, calls=5,
                                      repeats=2)
  assert len(costs.target) == 3 and min(costs.target) > 0 and costs.draft > 0
