"""Every implemented paper runs its `smoke` config through the launcher, and a killed
training run resumes to exactly the result of an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxrepro.launch import checkpointing, experiment, metric_writers

PAPERS = experiment.implemented()


def launch(*args, cwd):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  return subprocess.Popen([sys.executable, "-m", "jaxrepro.launch.main", *args], cwd=cwd,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("paper", PAPERS)
def test_smoke_config_runs_through_the_launcher(paper, tmp_path):
  # Run from a directory that is not the repo: configs/<paper>.py resolves to the package.
  proc = launch(f"--config=configs/{paper}.py:smoke", f"--workdir={tmp_path}/run",
                cwd=tmp_path)
  out, err = proc.communicate(timeout=900)
  assert proc.returncode == 0, err[-3000:]
  with open(tmp_path / "run" / "summary.json") as f:
    summary = json.load(f)
  assert summary["paper"] == paper and summary["variant"] == "smoke"
  claimed = {c.metric for c in experiment.load(paper).CLAIMS}
  assert claimed <= set(summary["summary"]), claimed - set(summary["summary"])
  assert f"== {paper} (smoke) ==" in out
  assert (tmp_path / "run" / "config.json").exists()
  assert list((tmp_path / "run").glob("*.png")), "a run writes at least one plot"


def comparable(rows):
  # Wall-clock figures differ between runs; every other number must be identical.
  return [{k: v for k, v in r.items() if "seconds" not in k and "speedup" not in k}
          for r in rows]


def test_killed_run_resumes_bit_identically(tmp_path):
  args = ["--config=configs/mdm_fhs.py:smoke", "--config.train.num_steps=400"]
  reference = launch(*args, f"--workdir={tmp_path}/reference", cwd=tmp_path)
  killed = launch(*args, f"--workdir={tmp_path}/killed", cwd=tmp_path)
  first_checkpoint = tmp_path / "killed" / "checkpoints" / "state" / "100"
  deadline = time.time() + 600
  while not first_checkpoint.exists() and time.time() < deadline:
    assert killed.poll() is None, killed.communicate()[1][-3000:]
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.communicate()
  assert killed.returncode == -signal.SIGKILL
  assert not (tmp_path / "killed" / "summary.json").exists()

  resumed = launch(*args, f"--workdir={tmp_path}/killed", cwd=tmp_path)
  for proc in (reference, resumed):
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]

  rows = {name: metric_writers.read_metrics(str(tmp_path / name))
          for name in ("reference", "killed")}
  assert comparable(rows["killed"]) == comparable(rows["reference"])
  leaves = []
  for name in ("reference", "killed"):
    with checkpointing.Checkpoints(str(tmp_path / name / "checkpoints" / "state"),
                                   save_every=100) as ckpts:
      assert ckpts.latest_step() == 400
      leaves.append(jax.tree.leaves(ckpts.restore_raw(400)))
  assert len(leaves[0]) == len(leaves[1]) > 0
  for a, b in zip(*leaves):
    np.testing.assert_array_equal(raw(a), raw(b))


def raw(x):
  """The array's data (typed PRNG keys as their uint32 words)."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)
