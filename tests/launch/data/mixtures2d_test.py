"""Tests of the 2-D Gaussian mixtures (diffusion stand-in S3)."""

import math

import numpy as np
import pytest

from jaxrepro.launch.data import mixtures2d as mx


def test_ring_and_grid_geometry():
  ring = mx.ring()
  assert ring.means.shape == (8, 2) and ring.std == 0.05
  np.testing.assert_allclose(np.linalg.norm(ring.means, axis=1), 1.0)
  np.testing.assert_allclose(ring.means[0], [1.0, 0.0])
  np.testing.assert_allclose(ring.means[2], [0.0, 1.0], atol=1e-12)
  grid = mx.grid()
  assert grid.means.shape == (25, 2) and grid.num_modes == 25 and grid.dim == 2
  assert set(np.round(grid.means[:, 0], 6)) == {-1.0, -0.5, 0.0, 0.5, 1.0}
  assert mx.make("grid", side=3).num_modes == 9


def test_sample_is_deterministic_with_labels_and_moments():
  ring = mx.ring()
  a, b = mx.sample(ring, 3, 20_000), mx.sample(ring, 3, 20_000)
  np.testing.assert_array_equal(a.points, b.points)
  assert a.points.dtype == np.float32 and a.labels.dtype == np.int32
  assert not np.array_equal(a.points, mx.sample(ring, 4, 20_000).points)
  # Every point is drawn from its labelled component: residuals are N(0, s^2).
  resid = a.points - ring.means[a.labels]
  np.testing.assert_allclose(resid.std(0), 0.05, rtol=0.03)
  np.testing.assert_allclose(np.bincount(a.labels) / 20_000, 1 / 8, atol=0.01)
  labels, _ = mx.nearest_mode(ring, a.points)
  np.testing.assert_array_equal(labels, a.labels)


def test_within_fraction_closed_form():
  # 2-D: P(||z|| <= 3) = 1 - exp(-9/2) for z ~ N(0, I).
  assert mx.within_fraction_of_data(2, 3.0) == pytest.approx(1 - math.exp(-4.5), rel=1e-12)
  assert mx.within_fraction_of_data(1, 2.0) == pytest.approx(math.erf(2 / math.sqrt(2)),
                                                             rel=1e-12)
  for mixture in (mx.ring(), mx.grid()):
    batch = mx.sample(mixture, 0, 50_000)
    frac = mx.within_fraction(mixture, batch.points)
    assert frac == pytest.approx(1 - math.exp(-4.5), abs=0.003)
  ring = mx.ring()
  # Points halfway between two modes, at the origin or not finite are outside.
  mid = (ring.means[0] + ring.means[1]) / 2
  pts = np.stack([mid, [0.0, 0.0], [np.nan, 0.0], ring.means[3] + [0.1, 0.0]])
  assert mx.within_fraction(ring, pts) == 0.25
  np.testing.assert_array_equal(mx.mode_counts(ring, pts), [0, 0, 0, 1, 0, 0, 0, 0])


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="name"):
    mx.make("spiral")
  with pytest.raises(ValueError, match="std"):
    mx.ring(std=0.0)
  with pytest.raises(ValueError, match="side"):
    mx.grid(side=1)
  with pytest.raises(ValueError, match="points"):
    mx.within_fraction(mx.ring(), np.zeros((4, 3)))
  with pytest.raises(ValueError, match="n must"):
    mx.sample(mx.ring(), 0, 0)
