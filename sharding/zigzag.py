"""The zig-zag sequence layout that balances causal attention over a ring of n devices.

Used by zig-zag Ring Attention (zhuzilin/ring-flash-attention) and by TokenRing (Wang et
al., "TokenRing: An Efficient Parallelism Framework for Infinite-Context LLMs via
Bidirectional Communication", 2024, arXiv:2412.20501). The sequence of length L is cut into
2n chunks of c = L / (2n) tokens and device r holds chunks r and 2n-1-r, in that order:

  permuted = [chunk 0, chunk 2n-1, chunk 1, chunk 2n-2, ..., chunk n-1, chunk n].

Under a causal mask every device then owns one early and one late chunk, so each device
does the same amount of work. Sharding the permuted sequence evenly over the mesh axis
gives device r its two chunks (the official code's `extract_local`).
"""

import jax
import jax.numpy as jnp
import numpy as np


def _check(seq_len: int, n: int) -> int:
  if n < 1:
    raise ValueError(f"n (number of devices) must be >= 1, got {n}")
  if seq_len % (2 * n):
    raise ValueError(f"the zig-zag layout needs the sequence length ({seq_len}) to be a "
                     f"multiple of 2 * n = {2 * n}")
  return seq_len // (2 * n)


def zigzag_chunk_order(n: int) -> np.ndarray:
  """`[2n]` int: the original chunk index at each chunk slot of the permuted sequence."""
  if n < 1:
    raise ValueError(f"n (number of devices) must be >= 1, got {n}")
  return np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)


def zigzag_positions(seq_len: int, n: int) -> np.ndarray:
  """`[L]` int32: the original position of each token of the permuted sequence.

  Device r's slice `[r * 2c, (r + 1) * 2c)` of it gives that device's global positions.
  """
  c = _check(seq_len, n)
  order = zigzag_chunk_order(n)
  return (order[:, None] * c + np.arange(c)[None, :]).reshape(-1).astype(np.int32)


def zigzag_permute(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
  """Reorders a full sequence into the zig-zag order for `n` devices.

  Args:
    x: array whose `axis` is the sequence, e.g. `[B, L, H, D]` with `axis=1`.
    n: number of devices on the sequence axis.
    axis: the sequence axis.

  Returns:
    `x` with the sequence chunks reordered; same shape and dtype.
  """
  axis = axis % x.ndim
  _check(x.shape[axis], n)
  chunks = x.reshape(*x.shape[:axis], 2 * n, -1, *x.shape[axis + 1:])
  return jnp.take(chunks, zigzag_chunk_order(n), axis=axis).reshape(x.shape)


def zigzag_unpermute(x: jax.Array, n: int, axis: int = 1) -> jax.Array:
  """Inverse of `zigzag_permute`: zig-zag order back to the natural sequence order."""
  axis = axis % x.ndim
  _check(x.shape[axis], n)
  chunks = x.reshape(*x.shape[:axis], 2 * n, -1, *x.shape[axis + 1:])
  inverse = np.argsort(zigzag_chunk_order(n))
  return jnp.take(chunks, inverse, axis=axis).reshape(x.shape)
