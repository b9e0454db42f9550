"""Running one paper from a config: validation, the workdir, the summary and its plot.

`run_experiment` is what the launcher, the reproduction runner and the notebooks call. It
checks the config before any work starts, prepares the workdir (a fresh run or a resume
of the same config, never a silent mix of two configs), calls the paper's
`train_and_evaluate`, then writes `summary.json`, `metrics.png` and prints the result.
"""

import json
import os
import shutil
import time
from collections.abc import Mapping
from types import ModuleType

import jax
import ml_collections

from jaxrepro.configs.common import ConfigError, check_choices
from jaxrepro.launch import checkpointing, experiment, metric_writers, plotting, train_loop

SUMMARY_FILE = "summary.json"
RESUME_MODES = train_loop.RESUME_MODES


def configure_cpu_devices(count: int) -> None:
  """Asks JAX for `count` simulated CPU devices, before its backends start.

  Papers whose demo needs a multi-device mesh on a laptop set `config.cpu_devices`; the
  option only shapes the CPU backend, so it is harmless on GPU and TPU hosts. Once a
  backend has started the count is fixed, and the paper's driver checks that it has the
  devices it needs (a clear error otherwise).
  """
  if count <= 1:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:
    pass  # Backend already initialised (a notebook, a test): keep its devices.


def validate(config: ml_collections.ConfigDict) -> ModuleType:
  """Checks a config against its paper and returns the paper's driver module.

  Raises:
    ConfigError: unknown paper, a paper without implementation, or a field outside its
      declared `CHOICES`; the message is one line naming the field and the valid values.
  """
  if "name" not in config:
    raise ConfigError("config has no 'name' field; it must name a paper of the catalog")
  experiment.paper(config.name)
  driver = experiment.load(config.name)
  choices = getattr(experiment.config_module(config.name), "CHOICES", {})
  check_choices(config, choices)
  if hasattr(driver, "check_config"):
    driver.check_config(config)
  return driver


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, resume: str) -> None:
  """Makes `workdir` ready for a run of `config`.

  A workdir with checkpoints is resumed only with the same config (`config.json`); one
  without is a fresh run, and the rows of an earlier unfinished attempt are dropped.
  """
  if resume not in RESUME_MODES:
    raise ConfigError(f"resume={resume!r} is not allowed; choose one of: "
                      + ", ".join(RESUME_MODES))
  ckpt_root = os.path.join(workdir, train_loop.CHECKPOINT_DIR)
  has_checkpoints = os.path.isdir(ckpt_root) and any(os.scandir(ckpt_root))
  if resume == "require" and not has_checkpoints:
    raise checkpointing.CheckpointError(f"--resume=require but {workdir} has no checkpoints")
  if resume == "never" and has_checkpoints:
    raise checkpointing.CheckpointError(
        f"{workdir} already holds a run's checkpoints; refusing to overwrite them: use a "
        "fresh --workdir or --resume=auto")
  config_path = os.path.join(workdir, metric_writers.CONFIG_FILE)
  new = json.loads(config.to_json_best_effort())
  if has_checkpoints and os.path.exists(config_path):
    with open(config_path) as f:
      old = json.load(f)
    diffs = _diff(old, new)
    if diffs:
      raise ConfigError(
          f"{workdir} holds a run of another config ({'; '.join(diffs[:3])}); resume it "
          "with the same config or use a fresh --workdir")
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  if not has_checkpoints:
    # Nothing to resume: outputs of an earlier attempt would mix with this run's.
    for name in (metric_writers.METRICS_FILE, SUMMARY_FILE):
      path = os.path.join(workdir, name)
      if os.path.exists(path):
        os.remove(path)
    if os.path.isdir(ckpt_root):
      shutil.rmtree(ckpt_root)
  with open(config_path, "w") as f:
    json.dump(new, f, indent=2, sort_keys=True)


def run_experiment(config: ml_collections.ConfigDict, workdir: str, *,
                   resume: str = "auto", quiet: bool = False) -> dict:
  """Runs the paper named by `config.name` end to end and returns its summary.

  The summary is the driver's flat dict of measured numbers plus `seconds`; it is written
  to `workdir/summary.json` together with the claims checked against it.
  """
  driver = validate(config)
  prepare_workdir(workdir, config, resume)
  start = time.perf_counter()
  summary = dict(driver.train_and_evaluate(config, workdir))
  summary["seconds"] = round(time.perf_counter() - start, 2)
  checks = experiment.check_claims(driver.CLAIMS, summary)
  if jax.process_index() == 0:
    write_summary(workdir, config, summary, checks)
    rows = metric_writers.read_metrics(workdir)
    if rows:
      plotting.plot_metrics(rows, os.path.join(workdir, plotting.METRICS_PLOT))
  if not quiet and jax.process_index() == 0:
    print(format_summary(config, summary, checks))
  return summary


def write_summary(workdir: str, config: ml_collections.ConfigDict, summary: Mapping,
                  checks) -> None:
  payload = {
      "paper": config.name, "variant": config.get("variant", ""),
      "summary": {k: metric_writers.to_python(v) for k, v in summary.items()},
      "claims": [{"name": c.name, "statement": c.statement, "metric": c.metric,
                  "measured": m, "threshold": c.threshold, "direction": c.direction,
                  "passed": ok} for c, m, ok in checks],
  }
  with open(os.path.join(workdir, SUMMARY_FILE), "w") as f:
    json.dump(payload, f, indent=2, default=str)


def format_summary(config: ml_collections.ConfigDict, summary: Mapping, checks) -> str:
  """The plain-text result printed at the end of a run."""
  lines = [f"== {config.name} ({config.get('variant', '')}) =="]
  for key, value in summary.items():
    lines.append(f"  {key:<44} {_fmt(value)}")
  if checks:
    note = "" if config.get("variant") == "demo" else " (thresholds are set for the demo variant)"
    lines.append(f"  claims{note}:")
    for claim, measured, ok in checks:
      lines.append(f"    [{'PASS' if ok else 'FAIL'}] {claim.name}: {_fmt(measured)} "
                   f"{claim.direction} {_fmt(claim.threshold)}")
  return "\n".join(lines)


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)


def _diff(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
  diffs = []
  for key in sorted(set(old) | set(new)):
    a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
    if isinstance(a, Mapping) and isinstance(b, Mapping):
      diffs += _diff(a, b, f"{prefix}{key}.")
    elif a != b:
      diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
  return diffs
