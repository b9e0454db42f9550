"""The catalog of 62 papers, and that every paper marked done has what DONE.md asks for."""

import os

import pytest

from jaxrepro.configs.common import VARIANTS
from jaxrepro.launch import experiment, report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DONE = [p for p in experiment.catalog() if p.status == "done"]


def test_catalog_has_62_papers_with_fixed_unique_names():
  papers = experiment.catalog()
  assert len(papers) == 62
  assert [p.number for p in papers] == list(range(1, 63))
  assert len({p.short for p in papers}) == 62
  assert all(p.status in experiment.STATUSES for p in papers)
  assert {"ultragcn", "mdm_fhs", "tokenring"} <= {p.short for p in papers}


def test_every_implemented_paper_is_marked_done():
  assert set(experiment.implemented()) == {p.short for p in DONE}


@pytest.mark.parametrize("paper", DONE, ids=[p.short for p in DONE])
def test_done_paper_has_every_piece(paper):
  for path in (paper.module, paper.notebook, f"configs/{paper.short}.py",
               f"launch/experiments/{paper.short}.py"):
    assert path and os.path.exists(os.path.join(REPO, path)), path
  # Oracle tests live next to the module's mirror in tests/.
  test_file = os.path.join(REPO, "tests", paper.module.replace(".py", "_test.py"))
  assert os.path.exists(test_file), test_file
  module = experiment.config_module(paper.short)
  for variant in VARIANTS:
    config = module.get_config(variant)
    assert config.name == paper.short and config.variant == variant
  driver = experiment.load(paper.short)
  assert driver.CLAIMS and len({c.name for c in driver.CLAIMS}) == len(driver.CLAIMS)
  # The reproduction report has measured every claim of a done paper.
  data = report.section_data(report.read_sections(
      os.path.join(REPO, "REPRODUCTION.md")).get(paper.short, ""))
  assert {c["name"] for c in data.get("claims", [])} == {c.name for c in driver.CLAIMS}, (
      f"run python -m jaxrepro.launch.reproduce --papers={paper.short}")
  with open(os.path.join(REPO, paper.module)) as f:
    docstring = f.read(3000)
  assert paper.title.split(":")[0].split()[0] in docstring or "arXiv" in docstring
