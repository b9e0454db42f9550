"""Tests of the client partitioners: coverage, determinism, skew, padding."""

import numpy as np
import pytest

from jaxrepro.launch.data import partitions

NUM_CLASSES = 10


def _labels(n=2000, seed=0):
  return np.random.default_rng(seed).integers(0, NUM_CLASSES, size=n)


def _assert_exact_cover(parts, n):
  allidx = np.concatenate(parts)
  assert allidx.shape[0] == n  # no example twice ...
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))  # ... and none missing


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_assigns_every_example_once(alpha):
  labels = _labels()
  parts = partitions.dirichlet_partition(labels, 16, alpha, seed=3)
  assert len(parts) == 16
  _assert_exact_cover(parts, labels.shape[0])


def test_dirichlet_is_deterministic_per_seed():
  labels = _labels()
  a = partitions.dirichlet_partition(labels, 8, 0.3, seed=1)
  b = partitions.dirichlet_partition(labels, 8, 0.3, seed=1)
  c = partitions.dirichlet_partition(labels, 8, 0.3, seed=2)
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def _mean_tv_to_global(labels, parts):
  """Mean total-variation distance between client label distributions and the global one."""
  hist = partitions.label_histograms(labels, parts, NUM_CLASSES).astype(np.float64)
  global_p = np.bincount(labels, minlength=NUM_CLASSES) / labels.shape[0]
  keep = hist.sum(1) > 0
  client_p = hist[keep] / hist[keep].sum(1, keepdims=True)
  return 0.5 * np.abs(client_p - global_p).sum(1).mean()


def test_small_alpha_is_more_skewed_than_large_alpha():
  labels = _labels()
  tv = {a: np.mean([_mean_tv_to_global(
      labels, partitions.dirichlet_partition(labels, 10, a, seed=s)) for s in range(3)])
        for a in (0.1, 1.0, 100.0)}
  assert tv[0.1] > tv[1.0] > tv[100.0], tv
  assert tv[0.1] > 0.5 and tv[100.0] < 0.1, tv
  iid = partitions.iid_partition(labels.shape[0], 10, seed=0)
  assert _mean_tv_to_global(labels, iid) < 0.1


def test_label_histograms_match_counting_by_hand():
  labels = np.array([0, 1, 1, 2, 2, 2])
  parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
  np.testing.assert_array_equal(partitions.label_histograms(labels, parts, 3),
                                [[1, 0, 1], [0, 2, 2]])


def test_min_size_is_respected():
  labels = _labels(500)
  parts = partitions.dirichlet_partition(labels, 10, 0.5, seed=0, min_size=10)
  assert min(p.shape[0] for p in parts) >= 10
  _assert_exact_cover(parts, 500)


def test_iid_partition_is_balanced_and_exact():
  parts = partitions.iid_partition(103, 8, seed=0)
  _assert_exact_cover(parts, 103)
  sizes = [p.shape[0] for p in parts]
  assert max(sizes) - min(sizes) <= 1


def test_pad_client_shards_layout_and_mask():
  x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
  y = np.arange(10)
  parts = [np.array([2, 5, 7]), np.array([0]), np.array([1, 3, 4, 6, 8])]
  padded, mask, counts = partitions.pad_client_shards({"x": x, "y": y}, parts,
                                                      multiple_of=4)
  assert padded["x"].shape == (3, 8, 3) and padded["y"].shape == (3, 8)
  np.testing.assert_array_equal(counts, [3, 1, 5])
  np.testing.assert_array_equal(mask.sum(1), counts)
  for c, p in enumerate(parts):
    np.testing.assert_array_equal(padded["y"][c, :len(p)], y[p])
    np.testing.assert_array_equal(padded["x"][c, :len(p)], x[p])
    assert not mask[c, len(p):].any() and (padded["x"][c, len(p):] == 0).all()


def test_invalid_arguments_raise():
  labels = _labels(100)
  with pytest.raises(ValueError, match="alpha"):
    partitions.dirichlet_partition(labels, 4, 0.0, seed=0)
  with pytest.raises(ValueError, match="labels"):
    partitions.dirichlet_partition(labels.astype(np.float32), 4, 1.0, seed=0)
  with pytest.raises(ValueError, match="min_size"):
    partitions.dirichlet_partition(labels, 4, 1.0, seed=0, min_size=30)
  with pytest.raises(ValueError, match="size"):
    partitions.pad_client_shards({"y": np.arange(5)}, [np.arange(5)], size=4)
