"""Helpers shared by every `configs/<short>.py` file.

A config file is `get_config(arg)` returning an `ml_collections.ConfigDict`. The colon
argument of `--config=configs/<short>.py:<variant>` selects one of three variants:

* `smoke`: seconds on a laptop CPU; the unit-level end-to-end test runs it.
* `demo` (the default): the CPU-scale reproduction checked by `launch.reproduce`.
* `paper`: the paper's own scale, for a GPU or TPU.

Config files import only ml_collections and this module, so they load instantly and can be
read by notebooks without JAX. Fields whose values come from a closed set are declared in a
module-level `CHOICES` dict (`{"sampler.name": ("fhs", "tau_leap")}`); the launcher checks
them with `check_choices` before anything runs.
"""

from collections.abc import Mapping, Sequence

import ml_collections

VARIANTS = ("smoke", "demo", "paper")
DEFAULT_VARIANT = "demo"


class ConfigError(ValueError):
  """A config (or a field of it) that the experiment cannot use.

  The message is a single line naming the field and the values it accepts; the launcher
  prints it as is and exits with status 2.
  """


def parse_variant(arg: str | None, variants: Sequence[str] = VARIANTS) -> str:
  """Returns the variant named by the config-file argument (`None` means the default)."""
  variant = DEFAULT_VARIANT if arg in (None, "") else arg
  if variant not in variants:
    raise ConfigError(
        f"unknown config variant {variant!r}; valid variants: {', '.join(variants)}")
  return variant


def base_config(name: str, variant: str, *, seed: int = 0) -> ml_collections.ConfigDict:
  """The fields every paper config starts with: `name`, `variant` and `seed`.

  `name` is the paper's fixed short name; the launcher finds the experiment driver
  `jaxrepro.launch.experiments.<name>` by it.
  """
  config = ml_collections.ConfigDict()
  config.name = name
  config.variant = variant
  config.seed = seed
  return config


def train_config(*, num_steps: int, log_every: int, checkpoint_every: int,
                 keep_checkpoints: int = 2) -> ml_collections.ConfigDict:
  """The train-loop block shared by every paper that trains (see `launch.train_loop`).

  `log_every` is also the length of the scanned chunk of steps run between host-side
  logging, so `checkpoint_every` must be a multiple of it.
  """
  return ml_collections.ConfigDict(dict(
      num_steps=num_steps, log_every=log_every, checkpoint_every=checkpoint_every,
      keep_checkpoints=keep_checkpoints))


def get_field(config: ml_collections.ConfigDict, path: str):
  """Reads a dotted field path (`"sampler.name"`) from a config."""
  value = config
  for part in path.split("."):
    value = value[part]
  return value


def check_choices(config: ml_collections.ConfigDict,
                  choices: Mapping[str, Sequence]) -> None:
  """Raises `ConfigError` if a field declared in `choices` holds another value."""
  for path, allowed in choices.items():
    value = get_field(config, path)
    if value not in allowed:
      raise ConfigError(
          f"config.{path}={value!r} is not allowed; choose one of: "
          + ", ".join(repr(a) for a in allowed))


def check_positive(config: ml_collections.ConfigDict, *paths: str) -> None:
  """Raises `ConfigError` unless each named numeric field is > 0."""
  for path in paths:
    value = get_field(config, path)
    if not value > 0:
      raise ConfigError(f"config.{path}={value!r} must be > 0")


def comma_list(text, kind=float) -> list:
  """`"1,2, 4"` -> `[kind(1), kind(2), kind(4)]` in order, blanks skipped: the list-valued
  fields of configs are comma-separated strings (ml_collections has no list type that the
  command line can override)."""
  return [kind(s) for s in str(text).split(",") if s.strip()]

