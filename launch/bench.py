"""The benchmark runner: side-by-side timings of each paper against its baseline.

    python -m jaxrepro.launch.bench [--papers=a,b] [--quick] [--output=BENCHMARKS.md]

Runs each paper driver's `benchmark(quick)` in this one process, prints the rows (ours,
the baseline the paper beats or the library a user would pick instead, the medians and
the ratio), and updates `BENCHMARKS.md` with the machine's calibration figures, the date,
the jax version and the device. External anchors that are not importable are listed as
skipped with the reason.
"""

import math
import sys

import jax
from absl import app, flags

from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import benchmarking, experiment, report, run

FLAGS = flags.FLAGS
flags.DEFINE_list("papers", None, "Papers to benchmark (default: every paper with one).")
flags.DEFINE_bool("quick", False, "Fewer rounds and smaller sizes (for tests).")
flags.DEFINE_string("output", "BENCHMARKS.md", "The report to update.")

PREAMBLE = """
Side-by-side timings from `python -m jaxrepro.launch.bench`: ours and the baseline in one
process, interleaved rounds, medians (spread and compile time in the notes). `ratio` is
baseline / ours for costs, so above 1 means ours is cheaper. Calibration figures of the
machine that ran each section are given with it. On a CPU with simulated devices, parallel
methods can only show their overhead, not a speed-up (PERFORMANCE.md section 0).
"""


def _fmt(x: float) -> str:
  return "-" if isinstance(x, float) and math.isnan(x) else f"{x:.4g}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  names = FLAGS.papers or list(experiment.implemented())
  drivers = {}
  try:
    # Before JAX starts: the simulated CPU devices the demos need (as in reproduce).
    run.configure_cpu_devices(max(
        experiment.config_module(n).get_config("demo").get("cpu_devices", 1) for n in names))
    loaded = {name: experiment.load(name) for name in names}
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for name, driver in loaded.items():
    if hasattr(driver, "benchmark"):
      drivers[name] = driver
    elif FLAGS.papers:
      print(f"error: paper {name!r} has no benchmark", file=sys.stderr)
      sys.exit(2)
  calibration = benchmarking.calibrate(quick=FLAGS.quick)
  print(f"calibration: {calibration['matmul_gflops']:.1f} GFLOP/s matmul, "
        f"{calibration['copy_gbps']:.1f} GB/s copy")
  header = ["benchmark", "ours", "baseline", "ours", "baseline", "unit", "ratio", "note"]
  sections = {}
  for name, driver in drivers.items():
    print(f"--- {name}", flush=True)
    rows = driver.benchmark(FLAGS.quick)
    table = [[r.benchmark, r.ours, r.baseline, _fmt(r.ours_value), _fmt(r.baseline_value),
              r.unit, _fmt(r.ratio), r.skipped and f"skipped: {r.skipped}" or r.note]
             for r in rows]
    text = report.markdown_table(header, table)
    print(text)
    body = (f"## `{name}`\n\n{report.provenance()}; calibration "
            f"{calibration['matmul_gflops']:.1f} GFLOP/s fp32 matmul, "
            f"{calibration['copy_gbps']:.1f} GB/s copy"
            f"{' (quick)' if FLAGS.quick else ''}.\n\n{text}")
    sections[name] = report.make_section(
        body, {"calibration": calibration, "rows": [r.__dict__ for r in rows]})
  if jax.process_index() == 0 and sections:
    report.update(FLAGS.output, "Benchmarks", PREAMBLE, sections,
                  [p.short for p in experiment.catalog()])
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  app.run(main)
