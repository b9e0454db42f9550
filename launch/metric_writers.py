"""A CLU-shaped metric writer without TensorFlow: absl logging plus JSON lines.

CLU's writers import TensorFlow at import time, so the suite ships this small equivalent
with the same method names (`write_scalars`, `write_hparams`, `flush`, `close`). Files in
the workdir:

* `config.json`: the run's config (`write_hparams`).
* `metrics.jsonl`: one JSON object per `write_scalars` call, `{"step": N, "name": value}`.
  Floats are written with `repr` precision, so a resumed run's file can be compared bit for
  bit with an uninterrupted one.

Only process 0 of a multi-process run writes files; the others only log.
"""

import json
import math
import os
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def to_python(value):
  """Converts numpy/JAX scalars and arrays to JSON-ready Python values."""
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


def _json_number(value):
  # JSON has no NaN/Inf literals; write them as strings so the file stays standard JSON.
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  return value


class MetricWriter:
  """Writes scalars and hyper-parameters of one run.

  Args:
    workdir: the run directory (created if missing).
    is_chief: whether this process writes files (process 0); others only log.
  """

  def __init__(self, workdir: str, *, is_chief: bool | None = None):
    self.workdir = workdir
    self.is_chief = jax.process_index() == 0 if is_chief is None else is_chief
    self._file = None
    if self.is_chief:
      os.makedirs(workdir, exist_ok=True)
      self._file = open(os.path.join(workdir, METRICS_FILE), "a")

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    """Appends one line of named scalars at `step` and logs them."""
    row = {"step": int(step)}
    row.update({k: _json_number(to_python(v)) for k, v in scalars.items()})
    # Debug level: the launcher's progress bar shows the run; the rows are in the file.
    logging.debug("step %d: %s", step,
                 ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items() if k != "step"))
    if self._file is not None:
      self._file.write(json.dumps(row) + "\n")

  def write_hparams(self, hparams: Mapping) -> None:
    """Writes the run's config to `config.json`."""
    if self.is_chief:
      with open(os.path.join(self.workdir, CONFIG_FILE), "w") as f:
        json.dump(hparams, f, indent=2, sort_keys=True, default=str)

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self) -> None:
    if self._file is not None:
      self.flush()
      self._file.close()
      self._file = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `metrics.jsonl` (an empty list when there is none)."""
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def rewrite_metrics(workdir: str, rows: list[dict]) -> None:
  """Replaces `metrics.jsonl` with `rows` atomically (used when a run resumes: the rows
  after its checkpoint are dropped and then written again, identically)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, METRICS_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  os.replace(tmp, path)
