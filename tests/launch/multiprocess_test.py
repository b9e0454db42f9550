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
