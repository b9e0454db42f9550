"""The shared GCN-epoch benchmark: its graph, and that ours and the dense baseline agree."""

import importlib.util

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.launch import gcn_benchmark


def test_random_graph_is_symmetric_without_self_loops_and_deterministic():
  senders, receivers, x, y, train = gcn_benchmark.random_graph(3, 50, 400)
  assert senders.shape == receivers.shape == (400,)
  assert not np.any(senders == receivers)
  forward = set(zip(senders.tolist(), receivers.tolist(), strict=True))
  assert forward == set(zip(receivers.tolist(), senders.tolist(), strict=True))
  again = gcn_benchmark.random_graph(3, 50, 400)
  for a, b in zip((senders, receivers, x, y, train), again, strict=True):
    np.testing.assert_array_equal(a, b)
  assert x.shape == (50, gcn_benchmark.FEATURES) and y.max() < gcn_benchmark.CLASSES


def test_sparse_and_dense_epochs_both_train():
  # Each callable is a real training epoch: chance-level loss at first, then lower. (That
  # the sparse layer equals the dense formula is tested in models/graph/layers_test.py.)
  data = gcn_benchmark.random_graph(0, 200, 2000)
  for make in (gcn_benchmark.ours_epoch, gcn_benchmark.dense_epoch):
    epoch = make(data)
    losses = [float(epoch()) for _ in range(30)]
    assert np.isfinite(losses).all()
    assert abs(losses[0] - np.log(gcn_benchmark.CLASSES)) < 0.5
    assert losses[-1] < losses[0] - 0.1


def test_rows_report_every_comparison_or_why_it_was_skipped():
  rows = gcn_benchmark.rows("stable", quick=True)
  assert len(rows) == 3 if importlib.util.find_spec("torch_geometric") is None else 2
  dense = rows[-1]
  assert dense.baseline == "dense-adjacency JAX GCN"
  assert dense.ours_value > 0 and dense.baseline_value > 0
  assert dense.ratio == pytest.approx(dense.baseline_value / dense.ours_value)
  if importlib.util.find_spec("torch_geometric") is None:
    assert "torch_geometric" in rows[1].skipped and jnp.isnan(rows[1].ratio)
