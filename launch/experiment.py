"""The protocol a paper's experiment driver implements, and how the runners find one.

A driver is the module `jaxrepro.launch.experiments.<short name>`. It is the only place
where a paper's config meets its library code, and it exposes:

* `train_and_evaluate(config, workdir) -> dict` (required): runs the paper end to end
  from a ConfigDict, writes metrics, checkpoints and plots under `workdir`, and returns a
  flat summary of named numbers (`{"recall@20/ultragcn": 0.46, ...}`).
* `CLAIMS` (required): the paper's headline claims restated at CPU scale, as `Claim`s
  whose `metric` names a key of that summary. `launch.reproduce` runs the `demo` variant
  and checks them.
* `benchmark(quick: bool) -> list[launch.benchmarking.Row]` (optional): side-by-side
  timings against the baseline the paper beats; `launch.bench` collects them.
* `check_config(config)` (optional): raises `ConfigError` for values that are valid one
  by one but not together (a length that the device count does not divide), so the
  launcher rejects them before any work starts.

Adding a paper never edits the launcher: the config's `name` field picks the driver.
"""

import dataclasses
import importlib
import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from importlib import resources
from types import ModuleType

from jaxrepro.configs.common import ConfigError

_DIRECTIONS = (">=", "<=")


@dataclasses.dataclass(frozen=True)
class Claim:
  """A checkable restatement of a paper's headline claim.

  Attributes:
    name: a short identifier, unique within the paper.
    statement: one sentence a reader can check against the paper.
    metric: the key of the driver's summary that holds the measured value.
    threshold: the bound the measured value must meet, fixed before measuring.
    direction: `">="` (at least the threshold) or `"<="` (at most).
    note: what a reader needs to judge the result: where the restatement departs from the
      paper, why a claim fails when it does. Printed under the report's table.
  """
  name: str
  statement: str
  metric: str
  threshold: float
  direction: str = ">="
  note: str = ""

  def __post_init__(self):
    if self.direction not in _DIRECTIONS:
      raise ValueError(f"Claim.direction={self.direction!r}; choose one of {_DIRECTIONS}")

  def passes(self, measured: float) -> bool:
    """Whether `measured` meets the threshold (NaN never does)."""
    if measured is None or math.isnan(measured):
      return False
    if self.direction == ">=":
      return measured >= self.threshold
    return measured <= self.threshold


@dataclasses.dataclass(frozen=True)
class Paper:
  """One row of the catalog (`launch/catalog.json`)."""
  number: int
  short: str
  family: str
  title: str
  status: str  # "planned" | "done"
  module: str = ""  # path of the library module, relative to the repo root
  notebook: str = ""  # path of the notebook that walks through it


STATUSES = ("planned", "done")


def catalog() -> tuple[Paper, ...]:
  """The 62 papers of the suite, in catalog order."""
  text = resources.files("jaxrepro.launch").joinpath("catalog.json").read_text()
  return tuple(Paper(**row) for row in json.loads(text)["papers"])


def paper(name: str) -> Paper:
  """The catalog row of `name`, or a `ConfigError` listing the valid short names."""
  for row in catalog():
    if row.short == name:
      return row
  names = ", ".join(sorted(p.short for p in catalog()))
  raise ConfigError(f"unknown paper {name!r}; valid papers: {names}")


def implemented() -> tuple[str, ...]:
  """Short names of the papers that have an experiment driver."""
  names = []
  for row in catalog():
    if importlib.util.find_spec(f"jaxrepro.launch.experiments.{row.short}") is not None:
      names.append(row.short)
  return tuple(names)


def load(name: str) -> ModuleType:
  """Imports the driver of paper `name` and checks that it implements the protocol."""
  row = paper(name)
  module_name = f"jaxrepro.launch.experiments.{name}"
  if importlib.util.find_spec(module_name) is None:
    raise ConfigError(
        f"paper {name!r} ({row.family}) has no implementation yet; implemented papers: "
        + (", ".join(implemented()) or "none"))
  module = importlib.import_module(module_name)
  for attribute in ("train_and_evaluate", "CLAIMS"):
    if not hasattr(module, attribute):
      raise TypeError(f"{module_name} does not define {attribute}")
  return module


def config_module(name: str) -> ModuleType:
  """The `jaxrepro.configs.<name>` module (for `get_config` and `CHOICES`)."""
  paper(name)
  return importlib.import_module(f"jaxrepro.configs.{name}")


def check_claims(claims: Sequence[Claim], summary: Mapping[str, float]
                 ) -> list[tuple[Claim, float, bool]]:
  """Pairs each claim with its measured value from `summary` and whether it passes."""
  rows = []
  for claim in claims:
    measured = summary.get(claim.metric, float("nan"))
    rows.append((claim, float(measured), claim.passes(float(measured))))
  return rows

