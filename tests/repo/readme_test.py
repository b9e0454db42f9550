"""The README stays true: its quick start, its test command and its paper table."""

import os
import re

from jaxrepro.launch import catalog, experiment

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read(name):
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def quick_start_commands():
  section = read("README.md").split("## Quick start", 1)[1].split("\n## ", 1)[0]
  block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
  return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
  install_and_demo, install_and_test = quick_start_commands()
  assert "jaxrepro.launch.main --config=configs/" in install_and_demo
  assert "pytest" in install_and_test
  ci_lines = read(".ci/run").splitlines()
  assert install_and_test in ci_lines, ".ci/run must run exactly the README's test command"


def test_paper_table_is_generated_from_catalog_and_report():
  readme = read("README.md")
  table = readme.split("<!-- papers:begin -->\n", 1)[1].split("<!-- papers:end -->", 1)[0]
  expected = catalog.markdown_table(os.path.join(REPO, "REPRODUCTION.md"))
  assert table == expected, ("README paper table is stale: regenerate it with "
                             "python -m jaxrepro.launch.catalog --update_readme=README.md")
  assert len(experiment.catalog()) == 62
