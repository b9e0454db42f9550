"""Tests for the zig-zag sequence layout helpers."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxrepro.sharding.zigzag import (
  zigzag_chunk_order,
  zigzag_permute,
  zigzag_positions,
  zigzag_unpermute,
)


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_each_device_holds_chunks_r_and_2n_minus_1_minus_r(n):
  c = 3
  seq_len = 2 * n * c
  x = jnp.arange(seq_len)[None, :, None]
  local = np.asarray(zigzag_permute(x, n))[0, :, 0].reshape(n, 2 * c)
  for r in range(n):
    # Oracle: the official extract_local, concatenating chunk r and chunk 2n-1-r.
    expected = np.concatenate([np.arange(r * c, (r + 1) * c),
                               np.arange((2 * n - 1 - r) * c, (2 * n - r) * c)])
    np.testing.assert_array_equal(local[r], expected)
  np.testing.assert_array_equal(zigzag_positions(seq_len, n), local.reshape(-1))
  assert sorted(zigzag_chunk_order(n)) == list(range(2 * n))


def test_unpermute_inverts_permute_on_any_axis():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 16, 5)))
  for axis in (2, -2):
    y = zigzag_permute(x, 4, axis=axis)
    assert not np.array_equal(y, x)
    np.testing.assert_array_equal(zigzag_unpermute(y, 4, axis=axis), x)


def test_bad_length_raises():
  with pytest.raises(ValueError, match="multiple of 2 \\* n"):
    zigzag_permute(jnp.zeros((1, 12)), 4)
  with pytest.raises(ValueError, match="n \\(number of devices\\)"):
    zigzag_positions(8, 0)
