"""Device meshes with the suite's fixed axis vocabulary.

Axis names: `data` (batch), `fsdp`, `tensor`, `seq` (sequence parallelism), `clients`
(federated clients), `workers` (decentralized workers). Library functions take the mesh
and the axis name as arguments and never rely on a global mesh, so they compose with a
caller's own `jax.set_mesh`.
"""

from collections.abc import Sequence

import jax
import numpy as np

AXIS_NAMES = ("data", "fsdp", "tensor", "seq", "clients", "workers")


def make_mesh(axis_shapes: Sequence[int], axis_names: Sequence[str],
              *, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: every device of every process).

  Axes are `AxisType.Auto`, chosen deliberately: a `jax.shard_map`ed function then accepts
  arrays of any layout and `jit` inserts the transfers, which is what a user importing one
  of our collectives into their own program expects. (`jax.make_mesh` defaults to
  `Explicit` since jax 0.9, where `in_specs` must match the argument shardings exactly.)

  Raises:
    ValueError: on an unknown axis name or when the shape does not use the devices.
  """
  unknown = [n for n in axis_names if n not in AXIS_NAMES]
  if unknown:
    raise ValueError(f"unknown mesh axis {unknown[0]!r}; use one of {AXIS_NAMES}")
  if len(axis_shapes) != len(axis_names):
    raise ValueError(f"{len(axis_shapes)} axis sizes for {len(axis_names)} axis names")
  devices = list(jax.devices() if devices is None else devices)
  if int(np.prod(axis_shapes)) != len(devices):
    raise ValueError(
        f"mesh shape {tuple(axis_shapes)} needs {int(np.prod(axis_shapes))} devices, "
        f"{len(devices)} are available (on CPU set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax)")
  axis_types = (jax.sharding.AxisType.Auto,) * len(axis_names)
  return jax.make_mesh(tuple(axis_shapes), tuple(axis_names), axis_types=axis_types,
                       devices=devices)


def require_devices(n: int) -> None:
  """Raises a helpful error when fewer than `n` devices are visible."""
  if jax.device_count() < n:
    raise ValueError(
        f"this needs {n} devices but jax sees {jax.device_count()}; on CPU set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax")


def replicate_global(tree, mesh: jax.sharding.Mesh | None = None):
  """`tree` as global arrays replicated over every device of every process.

  In a multi-process run, arrays created by ordinary JAX calls live on one local device
  and cannot be checkpointed or combined with global arrays. Every process must pass the
  same values (e.g. parameters initialised from the same seed). Typed PRNG keys keep their
  implementation.

  Args:
    tree: a pytree of arrays (host-local or numpy).
    mesh: the global mesh (default: all devices on one `data` axis).
  """
  if mesh is None:
    mesh = make_mesh((jax.device_count(),), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      data = leaf(jax.random.key_data(x))
      return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl),
                     out_shardings=replicated)(data)
    return jax.make_array_from_process_local_data(replicated, np.asarray(x))

  return jax.tree.map(leaf, tree)
