"""Command-line checks of `--config=...` and `--config.<field>=...` before absl parses them.

`ml_collections.config_flags` reports a mistyped field as a bare `KeyError` and an unknown
variant as a traceback; here every such mistake becomes one line that names the field and
what is allowed, and the launcher exits with status 2 (a usage error). The checks load the
config file exactly as config_flags does (`get_config(<text after the colon>)`).
"""

import difflib
import importlib.util
import os
import sys
from collections.abc import Sequence

import ml_collections

from jaxrepro.configs.common import ConfigError
from jaxrepro.launch import experiment

USAGE_EXIT_CODE = 2
_TRUE, _FALSE = ("true", "1", "yes", "t", "y"), ("false", "0", "no", "f", "n")


def fail(message: str) -> None:
  """Prints a one-line error and exits with the usage status."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(USAGE_EXIT_CODE)


def resolve_config_argument(value: str) -> str:
  """Returns `path[:arg]` with `path` pointing at an existing config file.

  `configs/<name>.py` is resolved to the installed `jaxrepro.configs.<name>` when it does
  not exist relative to the working directory, so the launcher works from any directory.
  """
  path, sep, arg = value.partition(":")
  if os.path.exists(path):
    return value
  name = os.path.splitext(os.path.basename(path))[0]
  experiment.paper(name)  # ConfigError listing the valid papers if unknown.
  spec = importlib.util.find_spec(f"jaxrepro.configs.{name}")
  if spec is None or spec.origin is None:
    raise ConfigError(f"paper {name!r} has no config file yet; implemented papers: "
                      + ", ".join(experiment.implemented()))
  return spec.origin + sep + arg


def load_config(value: str) -> ml_collections.ConfigDict:
  """Loads `path[:arg]` the way config_flags does, with one-line errors."""
  path, _, arg = value.partition(":")
  spec = importlib.util.spec_from_file_location("_jaxrepro_config_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_override(config: ml_collections.ConfigDict, field: str, raw: str | None) -> None:
  """Checks one `--config.<field>=<raw>`: the field exists and `raw` parses as its type."""
  node, parts = config, field.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      parent = ".".join(parts[:depth]) or "config"
      choices = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      close = difflib.get_close_matches(part, choices, n=1)
      hint = f" (did you mean {'.'.join(parts[:depth] + close)!r}?)" if close else ""
      raise ConfigError(f"unknown config field {field!r}{hint}; fields of {parent}: "
                        + ", ".join(choices))
    node = node[part]
  if raw is None or isinstance(node, ml_collections.ConfigDict):
    return
  expected = type(node)
  try:
    if expected is bool:
      if raw.lower() not in _TRUE + _FALSE:
        raise ValueError
    elif expected is int:
      int(raw)
    elif expected is float:
      float(raw)
  except ValueError:
    raise ConfigError(f"config field {field!r} expects {expected.__name__} (default "
                      f"{node!r}), got {raw!r}") from None


def _join_values(argv: Sequence[str]) -> list[str]:
  """Rewrites `--config X` and `--config.f X` as `--config=X` and `--config.f=X`."""
  out, i = [argv[0]], 1
  while i < len(argv):
    arg = argv[i]
    takes_next = (arg == "--config" or arg.startswith("--config.")) and "=" not in arg
    if takes_next and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
      out.append(f"{arg}={argv[i + 1]}")
      i += 2
    else:
      out.append(arg)
      i += 1
  return out


def precheck(argv: Sequence[str]) -> list[str]:
  """Validates the config arguments of `argv`; returns argv with the config path resolved.

  Raises:
    ConfigError: unknown paper, variant or field, or a value of the wrong type.
  """
  argv = _join_values(argv)
  values = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
  if not values:
    raise ConfigError("--config is required, e.g. --config=configs/ultragcn.py:smoke")
  resolved = resolve_config_argument(values[-1])
  config = load_config(resolved)
  for arg in argv[1:]:
    if arg.startswith("--config."):
      field, eq, raw = arg[len("--config."):].partition("=")
      check_override(config, field, raw if eq else None)
  return [f"--config={resolved}" if a.startswith("--config=") else a for a in argv]
