"""Two JAX processes on localhost run one sharded step with cross-process collectives.

This is the multi-host path of the launcher (`jax.distributed.initialize`, a global mesh,
only process 0 writes files) exercised on one machine: CPU collectives between processes
go through gloo. The oracle is the same SGD step computed by numpy on the whole batch.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_run_one_data_parallel_step(tmp_path):
  port = str(free_port())
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, WORKER, str(i), port, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
           for i in range(2)]
  outputs = []
  for p in procs:
    out, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-2000:]
    outputs.append(json.loads(out.strip().splitlines()[-1]))

  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 3)).astype(np.float64)
  y = rng.normal(size=(16,)).astype(np.float64)
  w = np.ones(3)
  expected = w - 0.1 * 2 * x.T @ (x @ w - y) / 16
  for out in outputs:
    assert out["processes"] == 2 and out["devices"] == 8
    np.testing.assert_allclose(out["w"], expected, rtol=1e-5)
  assert sorted(o["chief"] for o in outputs) == [False, True]
  with open(tmp_path / "metrics.jsonl") as f:
    assert len(f.readlines()) == 1  # only process 0 wrote


def launcher(args, *, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(env_extra or {})
  return subprocess.Popen([sys.executable, "-m", "jaxrepro.launch.main", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.mark.multiprocess
def test_launcher_trains_across_two_processes_like_one(tmp_path):
  # A training paper through the real launcher on 2 processes x 1 CPU device: the train
  # state is replicated over the global mesh, orbax checkpoints it from both processes,
  # and the result equals a single-process run of the same config (to float32 rounding:
  # XLA compiles a 2-device program, whose reductions may round in another order).
  args = ["--config=configs/mdm_fhs.py:smoke", "--config.train.num_steps=150",
          "--config.sampler.time_steps=8,32"]
  port = str(free_port())
  procs = [launcher(args + [f"--workdir={tmp_path}/multi", f"--coordinator_address=localhost:{port}",
                            "--num_processes=2", f"--process_id={i}"]) for i in range(2)]
  single = launcher(args + [f"--workdir={tmp_path}/single"])
  for p in procs + [single]:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  summaries = {}
  for name in ("multi", "single"):
    with open(tmp_path / name / "summary.json") as f:
      summaries[name] = json.load(f)["summary"]
  for key, value in summaries["single"].items():
    if "seconds" not in key and "speedup" not in key:
      np.testing.assert_allclose(summaries["multi"][key], value, rtol=1e-6, err_msg=key)
  assert (tmp_path / "multi" / "checkpoints" / "state" / "150").is_dir()
