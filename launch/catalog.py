"""Prints the suite's 62 papers with their status, or the README's paper table.

    python -m jaxrepro.launch.catalog [--family=graph] [--status=done]
    python -m jaxrepro.launch.catalog --markdown   # the README table, with measured results
    python -m jaxrepro.launch.catalog --update_readme=README.md   # rewrite it in place

The catalog itself is `launch/catalog.json` (one row per paper of
`shared/papers/CATALOG.md`, with fixed short names). The `--markdown` table takes each
paper's measured results from `REPRODUCTION.md`, so the README never states a number the
reproduction runner did not print; a test checks that the README holds this exact table.
"""

import sys

from absl import app, flags

from jaxrepro.launch import experiment, report

FLAGS = flags.FLAGS
flags.DEFINE_string("family", None, "Only papers whose family contains this text.")
flags.DEFINE_enum("status", None, list(experiment.STATUSES), "Only papers with this status.")
flags.DEFINE_bool("markdown", False, "Print the README's paper table.")
flags.DEFINE_string("reproduction", "REPRODUCTION.md",
                    "Report to take measured results from (with --markdown).")
flags.DEFINE_string("update_readme", None,
                    "Rewrite the paper table between the markers of this README file.")

BEGIN, END = "<!-- papers:begin -->\n", "<!-- papers:end -->"


def _result_cell(short: str, sections: dict[str, str]) -> str:
  data = report.section_data(sections.get(short, ""))
  if not data:
    return "-"
  if data.get("error"):
    return "run crashed (see REPRODUCTION.md)"
  cells = []
  for c in data.get("claims", []):
    sign = "≥" if c["direction"] == ">=" else "≤"
    verdict = "PASS" if c["passed"] else "**FAIL**"
    cells.append(f"{c['name']} {c['measured']:.3g} ({sign} {c['threshold']:.3g}) {verdict}")
  return "; ".join(cells) or "-"


def markdown_table(reproduction_path: str) -> str:
  """The README's table of all papers, with results from the reproduction report."""
  sections = report.read_sections(reproduction_path)
  rows = []
  for p in experiment.catalog():
    if p.status == "done":
      links = " · ".join([f"[config](configs/{p.short}.py)", f"[module]({p.module})",
                          f"[notebook]({p.notebook})"])
    else:
      links = "-"
    rows.append([p.number, f"`{p.short}`", p.family, p.status, links,
                 _result_cell(p.short, sections)])
  return report.markdown_table(["#", "paper", "family", "status", "code", "measured (demo)"],
                               rows)


def update_readme(path: str, reproduction_path: str) -> None:
  """Replaces the table between the paper markers of `path`."""
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    raise app.UsageError(f"{path} has no {BEGIN.strip()} ... {END} markers")
  head, rest = text.split(BEGIN, 1)
  tail = rest.split(END, 1)[1]
  with open(path, "w") as f:
    f.write(head + BEGIN + markdown_table(reproduction_path) + END + tail)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.update_readme:
    update_readme(FLAGS.update_readme, FLAGS.reproduction)
    return
  if FLAGS.markdown:
    sys.stdout.write(markdown_table(FLAGS.reproduction))
    return
  papers = [p for p in experiment.catalog()
            if (FLAGS.family is None or FLAGS.family.lower() in p.family.lower())
            and (FLAGS.status is None or p.status == FLAGS.status)]
  width = max(len(p.short) for p in papers) if papers else 10
  for p in papers:
    print(f"{p.number:>2}  {p.short:<{width}}  {p.status:<8} {p.family:<52} {p.title}")
  done = sum(p.status == "done" for p in experiment.catalog())
  print(f"{len(papers)} papers listed; {done} of {len(experiment.catalog())} done")


if __name__ == "__main__":
  app.run(main)
