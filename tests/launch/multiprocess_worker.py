"""One process of the two-process test in multiprocess_test.py (run as a script).

Joins a 2-process JAX run on localhost through `jaxrepro.launch.distributed`, builds a
global 8-device mesh (4 CPU devices per process), feeds each process's half of a global
batch, and runs one data-parallel SGD step whose gradient all-reduce crosses processes.
Prints one JSON line with the new weights; writes metrics only if it is process 0.
"""

import json
import os
import sys

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxrepro.launch import distributed, metric_writers  # noqa: E402
from jaxrepro.sharding import mesh as mesh_lib  # noqa: E402

distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2,
                       process_id=process_id)
mesh = mesh_lib.make_mesh((jax.device_count(),), ("data",))
rng = np.random.default_rng(0)
x_global = rng.normal(size=(16, 3)).astype(np.float32)
y_global = rng.normal(size=(16,)).astype(np.float32)
rows = slice(8 * process_id, 8 * (process_id + 1))
sharding = jax.NamedSharding(mesh, jax.P("data"))
x = jax.make_array_from_process_local_data(sharding, x_global[rows])
y = jax.make_array_from_process_local_data(sharding, y_global[rows])


def local_grad(w, xb, yb):
  # Gradient of the global mean squared error, summed over devices by psum.
  residual = xb @ w - yb
  return jax.lax.psum(2 * xb.T @ residual, "data") / x_global.shape[0]


grad_fn = jax.jit(jax.shard_map(local_grad, mesh=mesh, in_specs=(jax.P(), jax.P("data"),
                                                                  jax.P("data")),
                                out_specs=jax.P()))
w = jnp.ones((3,), jnp.float32)
w_new = w - 0.1 * grad_fn(w, x, y)
result = np.asarray(w_new.addressable_data(0)).tolist()
with metric_writers.MetricWriter(workdir) as writer:
  writer.write_scalars(1, {"w0": result[0]})
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "w": result,
                  "chief": distributed.is_chief()}), flush=True)
jax.distributed.shutdown()
