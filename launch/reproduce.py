"""The reproduction runner: checks each paper's headline claim at CPU scale.

    python -m jaxrepro.launch.reproduce [--papers=a,b] [--variant=demo] [--workdir=DIR]

For every paper it runs the config variant (default `demo`) through the same path as the
launcher, compares each registered claim's measured value with its threshold, prints a
table (paper, claim, measured, threshold, PASS/FAIL, seconds), updates `REPRODUCTION.md`
(date, jax version and device kind per paper) and exits with status 1 if any claim fails
or any run crashes. A failing claim is a result: it is reported with its number.
"""

import os
import sys
import tempfile
import time
import traceback

import jax
from absl import app, flags

from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import experiment, report, run

FLAGS = flags.FLAGS
flags.DEFINE_list("papers", None, "Papers to check (default: every implemented paper).")
flags.DEFINE_string("variant", "demo", "Config variant to run.")
flags.DEFINE_string("workdir", None, "Root for the runs' workdirs (default: a temp dir).")
flags.DEFINE_string("output", "REPRODUCTION.md", "The report to update.")

PREAMBLE = """
Each paper's headline claim restated at CPU scale and measured by
`python -m jaxrepro.launch.reproduce --papers=<name>` (the `demo` config variant). A claim
that fails is reported here with its measured number; thresholds are fixed in the paper's
experiment driver before measuring and are never loosened after the fact.
"""


def reproduce(name: str, variant: str, root: str) -> tuple[list, float, str | None]:
  """Runs one paper; returns (claim checks, seconds, error message or None)."""
  start = time.perf_counter()
  try:
    driver = experiment.load(name)
    config = experiment.config_module(name).get_config(variant)
    summary = run.run_experiment(config, os.path.join(root, name), quiet=True)
    checks = experiment.check_claims(driver.CLAIMS, summary)
    return checks, time.perf_counter() - start, None
  except Exception as e:  # A crash is reported as a failure of every claim of the paper.
    traceback.print_exc()
    return [], time.perf_counter() - start, f"{type(e).__name__}: {e}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  names = FLAGS.papers or list(experiment.implemented())
  try:
    configs = [experiment.config_module(n).get_config(FLAGS.variant) for n in names]
    # One process runs every paper, so it asks once (before JAX starts a backend) for the
    # most simulated CPU devices any of them needs.
    run.configure_cpu_devices(max(c.get("cpu_devices", 1) for c in configs))
    for name in names:
      experiment.load(name)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  root = FLAGS.workdir or tempfile.mkdtemp(prefix="jaxrepro-reproduce-")
  rows, sections, failed = [], {}, False
  for name in names:
    print(f"--- {name} ({FLAGS.variant})", flush=True)
    checks, seconds, error = reproduce(name, FLAGS.variant, root)
    paper_rows = []
    if error:
      failed = True
      paper_rows.append([name, "(run crashed)", error.splitlines()[0][:80], "", "FAIL",
                         f"{seconds:.0f}"])
    for claim, measured, ok in checks:
      failed |= not ok
      paper_rows.append([name, claim.name, f"{measured:.4g}",
                         f"{claim.direction} {claim.threshold:.4g}",
                         "PASS" if ok else "FAIL", f"{seconds:.0f}"])
    rows += paper_rows
    sections[name] = _section(name, checks, seconds, error)
  header = ["paper", "claim", "measured", "threshold", "result", "seconds"]
  print(report.markdown_table(header, rows))
  if jax.process_index() == 0:
    report.update(FLAGS.output, "Reproduction report", PREAMBLE, sections,
                  [p.short for p in experiment.catalog()])
    print(f"wrote {FLAGS.output}; workdirs under {root}")
  sys.exit(1 if failed else 0)


def _section(name, checks, seconds, error) -> str:
  paper = experiment.paper(name)
  lines = [f"## `{name}`: {paper.title}", "",
           f"Variant `{FLAGS.variant}`; {report.provenance()}; {seconds:.0f} s.", ""]
  if error:
    lines += [f"**The run crashed**: `{error.splitlines()[0]}`", ""]
  table = [[c.statement, f"{m:.4g}", f"{c.direction} {c.threshold:.4g}",
            "PASS" if ok else "**FAIL**"] for c, m, ok in checks]
  if table:
    lines.append(report.markdown_table(["claim", "measured", "threshold", "result"], table))
  notes = [f"* `{c.name}` ({'passes' if ok else '**fails**'}): {c.note}"
           for c, _, ok in checks if c.note]
  if notes:
    lines += ["Notes:", "", *notes, ""]
  data = {"variant": FLAGS.variant, "seconds": round(seconds, 1), "error": error,
          "claims": [{"name": c.name, "metric": c.metric, "measured": m,
                      "threshold": c.threshold, "direction": c.direction, "passed": ok}
                     for c, m, ok in checks]}
  return report.make_section("\n".join(lines), data)


if __name__ == "__main__":
  app.run(main)
