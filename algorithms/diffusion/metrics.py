"""Sample-quality metrics on feature sets: Frechet distance, KID and MMD (diffusion block B6).

Sources:
* Heusel et al., "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium", NeurIPS 2017, arXiv:1706.08500 (FID: the Frechet distance of Gaussians fitted
  to Inception features);
* Binkowski et al., "Demystifying MMD GANs", ICLR 2018, arXiv:1801.01401 (KID: the unbiased
  MMD^2 estimator with the cubic polynomial kernel);
* Gretton et al., "A Kernel Two-Sample Test", JMLR 2012 (the unbiased MMD^2 estimator).

With feature sets X = {x_i} (m rows) and Y = {y_j} (n rows) in R^d:

  FD(X, Y) = ||mu_X - mu_Y||^2 + tr(C_X + C_Y - 2 (C_X C_Y)^{1/2}),
    mu, C the sample mean and (ddof = 1) covariance;
  MMD^2_u(X, Y) = sum_{i != i'} k(x_i, x_i') / (m (m - 1)) + sum_{j != j'} k(y_j, y_j') /
    (n (n - 1)) - 2 sum_{i, j} k(x_i, y_j) / (m n);
  KID(X, Y) = MMD^2_u with k(x, y) = (x . y / d + 1)^3.

`frechet_distance` and `kid` are evaluation-only float64 numpy (scipy eigensolvers); `mmd2` is
JAX, jit-able and differentiable in both sets (the MMD-DDM paper trains through it) with a
Gaussian (a sum over bandwidths) or polynomial kernel.

Differences from the reference implementations: the trace of the matrix square root is
computed from symmetric eigenvalues instead of `scipy.linalg.sqrtm(C_a C_b)` (same value,
no complex round-off or singular-matrix failures); the features come from the toy judge
(`launch.toy_judge.features`, a stand-in for Inception); `kid` uses all pairs of the two
sets by default instead of averaging 100 random subsets of 1000 (`num_subsets` gives the
subset average); an unbiased estimate can be slightly negative.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

KERNELS = ("gaussian", "polynomial")


def _check_feats(name: str, f, min_rows: int = 2) -> np.ndarray:
  f = np.asarray(f, np.float64)
  if f.ndim != 2 or f.shape[0] < min_rows:
    raise ValueError(f"{name} must be [n, d] with n >= {min_rows}; got shape {f.shape}")
  return f


def frechet_distance_from_moments(mu_a, cov_a, mu_b, cov_b) -> float:
  """||mu_a - mu_b||^2 + tr(C_a + C_b - 2 (C_a C_b)^{1/2}) in float64.

  Args:
    mu_a, mu_b: [d] means.
    cov_a, cov_b: [d, d] symmetric positive semi-definite covariances.

  Returns:
    The Frechet (2-Wasserstein squared) distance of the two Gaussians, a Python float.
  """
  mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
  cov_a, cov_b = np.asarray(cov_a, np.float64), np.asarray(cov_b, np.float64)
  d = mu_a.shape[0]
  if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
    raise ValueError(f"moments must be mu [d], cov [d, d]; got {mu_a.shape}, {cov_a.shape}, "
                     f"{mu_b.shape}, {cov_b.shape}")
  # tr((C_a C_b)^{1/2}) = sum_i sqrt(lambda_i) with lambda_i the eigenvalues of
  # C_a^{1/2} C_b C_a^{1/2} (a PSD matrix similar to C_a C_b): symmetric eigensolvers only,
  # so singular covariances (dead ReLU features, n < d) need no regularisation.
  w, v = scipy.linalg.eigh(cov_a)
  root_a = (v * np.sqrt(np.maximum(w, 0.0))) @ v.T
  lam = scipy.linalg.eigvalsh(root_a @ cov_b @ root_a)
  trace_covmean = np.sum(np.sqrt(np.maximum(lam, 0.0)))
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_covmean)


def frechet_distance(feats_a, feats_b) -> float:
  """Frechet distance between Gaussians fitted to two feature sets (FID's formula).

  Args:
    feats_a: [m, d] features (any float dtype; computed in float64).
    feats_b: [n, d] features.

  Returns:
    A Python float >= 0 (up to rounding).
  """
  a, b = _check_feats("feats_a", feats_a), _check_feats("feats_b", feats_b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feats_a and feats_b must have the same width; got {a.shape[1]} and "
                     f"{b.shape[1]}")
  return frechet_distance_from_moments(a.mean(0), np.cov(a, rowvar=False),
                                       b.mean(0), np.cov(b, rowvar=False))


def _mmd2_from_kernels(kxx, kyy, kxy, xp):
  m, n = kxx.shape[0], kyy.shape[0]
  # Unbiased: drop the diagonal (self-similarity) terms of the within-set sums.
  sxx = (xp.sum(kxx) - xp.sum(xp.diagonal(kxx))) / (m * (m - 1))
  syy = (xp.sum(kyy) - xp.sum(xp.diagonal(kyy))) / (n * (n - 1))
  return sxx + syy - 2.0 * xp.mean(kxy)


def kid(feats_a, feats_b, *, num_subsets: int = 0, subset_size: int = 1000,
        seed: int = 0) -> float:
  """Kernel Inception Distance: unbiased MMD^2 with k(x, y) = (x . y / d + 1)^3.

  Args:
    feats_a: [m, d] features.
    feats_b: [n, d] features.
    num_subsets: 0 (default) uses all pairs of the full sets; k > 0 averages the estimator
      over k random subsets of `min(subset_size, m, n)` rows of each set (the KID paper's
      protocol), drawn with numpy `seed`.
    subset_size: rows per subset when `num_subsets > 0`.
    seed: numpy seed of the subsets.

  Returns:
    A Python float (can be slightly negative: the estimator is unbiased).
  """
  a, b = _check_feats("feats_a", feats_a), _check_feats("feats_b", feats_b)
  if a.shape[1] != b.shape[1]:
    raise ValueError(f"feats_a and feats_b must have the same width; got {a.shape[1]} and "
                     f"{b.shape[1]}")
  if num_subsets < 0:
    raise ValueError(f"num_subsets must be >= 0; got {num_subsets}")
  d = a.shape[1]

  def one(x, y):
    k = lambda u, v: (u @ v.T / d + 1.0) ** 3
    return _mmd2_from_kernels(k(x, x), k(y, y), k(x, y), np)

  if num_subsets == 0:
    return float(one(a, b))
  size = min(subset_size, a.shape[0], b.shape[0])
  if size < 2:
    raise ValueError(f"subset_size must be >= 2; got {subset_size}")
  rng = np.random.default_rng(seed)
  vals = [one(a[rng.choice(a.shape[0], size, replace=False)],
              b[rng.choice(b.shape[0], size, replace=False)]) for _ in range(num_subsets)]
  return float(np.mean(vals))


def gaussian_kernel(x: jax.Array, y: jax.Array,
                    bandwidths: float | Sequence[float] = 1.0) -> jax.Array:
  """sum_s exp(-||x_i - y_j||^2 / (2 s^2)) over the bandwidths s: [m, d], [n, d] -> [m, n]."""
  sq = (jnp.sum(x * x, -1)[:, None] + jnp.sum(y * y, -1)[None, :] - 2.0 * x @ y.T)
  sq = jnp.maximum(sq, 0.0)  # rounding can make the expanded square slightly negative
  bws = jnp.atleast_1d(jnp.asarray(bandwidths, x.dtype))
  return jnp.sum(jnp.exp(-sq[None] / (2.0 * bws[:, None, None] ** 2)), axis=0)


def polynomial_kernel(x: jax.Array, y: jax.Array, degree: int = 3,
                      coef: float = 1.0, gamma: float | None = None) -> jax.Array:
  """(gamma x_i . y_j + coef)^degree: [m, d], [n, d] -> [m, n]; gamma None means 1 / d (KID's
  kernel by default)."""
  gram = x @ y.T / x.shape[-1] if gamma is None else gamma * (x @ y.T)
  return (gram + coef) ** degree


def mmd2(x: jax.Array, y: jax.Array, kernel: str | Callable = "gaussian", *,
         bandwidths: float | Sequence[float] = 1.0, degree: int = 3,
         coef: float = 1.0) -> jax.Array:
  """Unbiased MMD^2 between two sample sets, in JAX (jit-able, differentiable).

  Args:
    x: float [m, d] (m >= 2).
    y: float [n, d] (n >= 2).
    kernel: "gaussian" (a sum of Gaussian kernels over `bandwidths`), "polynomial"
      ((x . y / d + coef)^degree) or a callable `k(x [m, d], y [n, d]) -> [m, n]`.
    bandwidths: Gaussian bandwidth(s) sigma.
    degree, coef: the polynomial kernel's parameters.

  Returns:
    float scalar.
  """
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or min(x.shape[0], y.shape[0]) < 2:
    raise ValueError(f"x and y must be [m, d] and [n, d] with m, n >= 2; got {x.shape}, "
                     f"{y.shape}")
  if callable(kernel):
    k = kernel
  elif kernel == "gaussian":
    k = lambda a, b: gaussian_kernel(a, b, bandwidths)
  elif kernel == "polynomial":
    k = lambda a, b: polynomial_kernel(a, b, degree, coef)
  else:
    raise ValueError(f"kernel={kernel!r}; choose one of {KERNELS} or pass a callable")
  return _mmd2_from_kernels(k(x, x), k(y, y), k(x, y), jnp)
