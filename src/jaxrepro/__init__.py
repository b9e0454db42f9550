"""jaxrepro: functional JAX/Flax reimplementations of recent papers.

The import root is deliberately light: importing `jaxrepro` pulls in no JAX, Flax or
orbax, so `python -m jaxrepro.launch.catalog` and config files load instantly. The five
sub-packages (`algorithms`, `models`, `sharding`, `launch`, `configs`) live in top-level
folders of the repository and are mapped under this root by `pyproject.toml`.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("algorithms", "models", "sharding", "launch", "configs")


def __getattr__(name):
  # `jaxrepro.models` etc. resolve on first attribute access, maxtext style.
  if name in _SUBPACKAGES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_SUBPACKAGES))
