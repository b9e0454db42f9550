"""The one launcher of the suite: runs any paper from its config file.

    python -m jaxrepro.launch.main --config=configs/<short>.py[:smoke|demo|paper] \\
        --workdir=/tmp/<short> [--config.<field>=<value> ...]

It parses flags, joins a multi-process run when asked, logs the environment and calls
`launch.run.run_experiment`, which finds the paper's driver by the config's `name`. A bad
paper, variant or field is a one-line error with exit status 2; a diverged run or an
unreadable checkpoint is a one-line error with status 1.

Several hosts (one process each, the same command everywhere):

    python -m jaxrepro.launch.main --config=... --workdir=... \\
        --coordinator_address=host0:1234 --num_processes=2 --process_id=<i>

or `--distributed_auto` on clusters JAX detects by itself (TPU pods, SLURM).
"""

import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import checkpointing, cli, distributed, run, train_loop

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Paper config: configs/<short>.py[:variant].", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints, plots, summary.")
flags.DEFINE_enum("resume", "auto", list(run.RESUME_MODES),
                  "auto: resume from the workdir's checkpoints when there are any; "
                  "require: fail without one; never: fail if the workdir holds a run.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.DEFINE_bool("distributed_auto", False,
                  "Call jax.distributed.initialize() with cluster auto-detection.")


def parse_flags(argv):
  """absl's flag parsing with the suite's one-line errors (exit status 2)."""
  try:
    argv = cli.precheck(argv)
    remaining = FLAGS(argv)
  except ConfigError as e:
    cli.fail(str(e))
  except flags.Error as e:
    cli.fail(str(e).splitlines()[0])
  if FLAGS.workdir is None:
    cli.fail("--workdir is required, e.g. --workdir=/tmp/run")
  if len(remaining) > 1:
    cli.fail(f"unexpected arguments: {' '.join(remaining[1:])}")
  return remaining


def main(argv):
  del argv
  run.configure_cpu_devices(FLAGS.config.get("cpu_devices", 1))
  distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id,
                         auto=FLAGS.distributed_auto)
  if not FLAGS["verbosity"].present:
    # orbax and jax log every checkpoint and compile at INFO; --verbosity=0 shows them.
    logging.set_verbosity(logging.WARNING)
  if distributed.is_chief():
    config = FLAGS.config
    print(f"jaxrepro: {config.name} ({config.get('variant', '')}) on {jax.device_count()} "
          f"{jax.devices()[0].platform} device(s), {jax.process_count()} process(es), "
          f"jax {jax.__version__}; workdir {FLAGS.workdir}", flush=True)
  try:
    run.run_experiment(FLAGS.config, FLAGS.workdir, resume=FLAGS.resume)
  except ConfigError as e:
    cli.fail(str(e))
  except (train_loop.NonFiniteError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


def run_app():
  """Console-script entry point (`jaxrepro-train`)."""
  jax.config.config_with_absl()
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run_app()
