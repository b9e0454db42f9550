"""Markdown reports made of one section per paper (`REPRODUCTION.md`, `BENCHMARKS.md`).

Re-running some papers replaces their sections and keeps the others. Each section carries
its own provenance line (date, jax version, device) and a machine-readable JSON comment, so
the README table can be generated from the report instead of being copied by hand.
"""

import datetime
import json
import os
import re
from collections.abc import Mapping

import jax

_SECTION = re.compile(r"<!-- begin:(\w+) -->\n(.*?)<!-- end:\1 -->\n", re.S)
_DATA = re.compile(r"<!-- data: (.*?) -->")


def provenance() -> str:
  """Date, jax version and device kind of this process, for a report line."""
  device = jax.devices()[0]
  return (f"{datetime.date.today().isoformat()}, jax {jax.__version__}, "
          f"{jax.device_count()} x {device.platform}:{device.device_kind}")


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def read_sections(path: str) -> dict[str, str]:
  """Section bodies of a report by paper name (empty when the file does not exist)."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return {m.group(1): m.group(2) for m in _SECTION.finditer(f.read())}


def section_data(body: str) -> dict:
  """The JSON payload embedded in a section body."""
  match = _DATA.search(body)
  return json.loads(match.group(1)) if match else {}


def make_section(body: str, data: Mapping) -> str:
  return f"{body.rstrip()}\n\n<!-- data: {json.dumps(data, default=str)} -->\n"


def update(path: str, title: str, preamble: str, sections: Mapping[str, str],
           order: list[str]) -> None:
  """Writes `path` with `sections` replacing same-named ones; others are kept.

  Args:
    path: the report file.
    title: its first heading.
    preamble: text under the title (what the report is, how to regenerate it).
    sections: new section bodies by paper name.
    order: the order of papers in the file (catalog order).
  """
  merged = read_sections(path)
  merged.update(sections)
  names = [n for n in order if n in merged] + sorted(set(merged) - set(order))
  parts = [f"# {title}\n\n{preamble.strip()}\n"]
  for name in names:
    parts.append(f"<!-- begin:{name} -->\n{merged[name]}<!-- end:{name} -->\n")
  with open(path, "w") as f:
    f.write("\n".join(parts))
