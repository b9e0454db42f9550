"""Isotropic Gaussian mixtures in the plane: the 8-mode ring and the 5x5 grid (diffusion S3).

The shared low-dimensional stand-in of the diffusion family (spec card `diffusion.md`,
stand-in S3): MMD-DDM fine-tunes a few-step sampler on it, and Concept Arithmetics and
MT-Diffusion reuse it. A mixture is K equally weighted components N(mu_k, s^2 I) in R^D:

  ring: mu_k = r (cos(2 pi k / K), sin(2 pi k / K)),  k = 0..K-1  (default K = 8, r = 1);
  grid: mu_{(i, j)} = (x_i, x_j),  x_i = -h + 2 h i / (n - 1),  i, j = 0..n-1  (default
        n = 5, h = 1, so neighbouring modes are 0.5 apart).

Both default to s = 0.05, so the modes are separated by many standard deviations and a
sampler that bridges them is easy to see and to count.

Quality measure (`within_fraction`): the share of points whose distance to the nearest mode
is at most c s (c = 3 by default). For points drawn from the mixture itself (with modes this
far apart) it is P(chi_D <= c); in the plane that is 1 - exp(-c^2 / 2) = 0.9889 at c = 3
(`within_fraction_of_data`). Mode coverage (`mode_counts`) counts those points per mode.

Everything is float64 NumPy and deterministic in the integer seed; nothing is shipped.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

NAMES = ("ring", "grid")


@dataclasses.dataclass(frozen=True)
class Mixture:
  """Equal-weight isotropic Gaussian mixture.

  Attributes:
    name: a label ("ring", "grid" or the caller's own).
    means: float64 [K, D] component means.
    std: the per-coordinate standard deviation s of every component.
  """
  name: str
  means: np.ndarray
  std: float

  @property
  def num_modes(self) -> int:
    return int(self.means.shape[0])

  @property
  def dim(self) -> int:
    return int(self.means.shape[1])


class MixtureBatch(NamedTuple):
  """Samples of a mixture.

  Attributes:
    points: float32 [n, D].
    labels: int32 [n], the component each point was drawn from.
  """
  points: np.ndarray
  labels: np.ndarray


def _check_std(std: float) -> float:
  if not std > 0:
    raise ValueError(f"std must be > 0; got {std}")
  return float(std)


def ring(num_modes: int = 8, radius: float = 1.0, std: float = 0.05) -> Mixture:
  """K modes evenly spaced on a circle of `radius` (the first on the positive x axis)."""
  if num_modes < 1 or not radius > 0:
    raise ValueError(f"ring needs num_modes >= 1 and radius > 0; got {num_modes}, {radius}")
  angles = 2.0 * np.pi * np.arange(num_modes) / num_modes
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return Mixture("ring", means, _check_std(std))


def grid(side: int = 5, half_width: float = 1.0, std: float = 0.05) -> Mixture:
  """side x side modes on a square lattice spanning [-half_width, half_width]^2."""
  if side < 2 or not half_width > 0:
    raise ValueError(f"grid needs side >= 2 and half_width > 0; got {side}, {half_width}")
  axis = np.linspace(-half_width, half_width, side)
  xx, yy = np.meshgrid(axis, axis, indexing="ij")
  means = np.stack([xx.ravel(), yy.ravel()], axis=1)
  return Mixture("grid", means, _check_std(std))


def make(name: str, **kwargs) -> Mixture:
  """`ring(**kwargs)` or `grid(**kwargs)` by name."""
  if name == "ring":
    return ring(**kwargs)
  if name == "grid":
    return grid(**kwargs)
  raise ValueError(f"mixture name={name!r}; choose one of {NAMES}")


def sample(mixture: Mixture, seed: int | Sequence[int], n: int) -> MixtureBatch:
  """n points with their component labels, deterministic in `seed`.

  `seed` is an int or a sequence of ints (NumPy `SeedSequence` entropy: `[run, stream,
  step]` gives independent, reproducible streams).

  Components are drawn uniformly (equal weights), then Gaussian noise of scale `std`.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1; got {n}")
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, mixture.num_modes, size=n)
  points = mixture.means[labels] + mixture.std * rng.standard_normal((n, mixture.dim))
  return MixtureBatch(points.astype(np.float32), labels.astype(np.int32))


def _points(mixture: Mixture, points) -> np.ndarray:
  p = np.asarray(points, np.float64)
  if p.ndim != 2 or p.shape[1] != mixture.dim:
    raise ValueError(f"points must be [n, {mixture.dim}]; got shape {p.shape}")
  return p


def nearest_mode(mixture: Mixture, points) -> tuple[np.ndarray, np.ndarray]:
  """The nearest component mean of each point and the Euclidean distance to it.

  Args:
    mixture: the mixture.
    points: [n, D] array-like.

  Returns:
    (labels int32 [n], distances float64 [n]).
  """
  p = _points(mixture, points)
  d2 = np.sum((p[:, None, :] - mixture.means[None]) ** 2, axis=-1)  # [n, K]
  labels = np.argmin(d2, axis=1)
  return labels.astype(np.int32), np.sqrt(d2[np.arange(p.shape[0]), labels])


def within_fraction(mixture: Mixture, points, num_std: float = 3.0) -> float:
  """Share of points at most `num_std` standard deviations (Euclidean) from a mode.

  Non-finite points count as outside.
  """
  _, dist = nearest_mode(mixture, points)
  return float(np.mean(np.nan_to_num(dist, nan=np.inf) <= num_std * mixture.std))


def within_fraction_of_data(dim: int = 2, num_std: float = 3.0) -> float:
  """P(||z|| <= num_std) for z ~ N(0, I_dim): `within_fraction` of exact samples when the
  modes are far apart (D = 2: 1 - exp(-c^2 / 2))."""
  # Regularised lower incomplete gamma P(D/2, c^2/2) by its series (no scipy needed).
  a, x = dim / 2.0, num_std ** 2 / 2.0
  term = total = 1.0 / a
  k = 0
  while term > 1e-17 * total:
    k += 1
    term *= x / (a + k)
    total += term
  return float(total * math.exp(-x + a * math.log(x) - math.lgamma(a)))


def mode_counts(mixture: Mixture, points, num_std: float = 3.0) -> np.ndarray:
  """int64 [K]: how many points lie within `num_std` standard deviations of each mode."""
  labels, dist = nearest_mode(mixture, points)
  inside = np.nan_to_num(dist, nan=np.inf) <= num_std * mixture.std
  return np.bincount(labels[inside], minlength=mixture.num_modes)
