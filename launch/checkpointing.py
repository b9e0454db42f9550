"""The one checkpoint facade of the suite, over orbax V1 `training.Checkpointer`.

Saves every `save_every` steps, keeps the latest `keep`, restores against an abstract
state (`jax.eval_shape` output, with shardings) so a checkpoint never silently lands on
another topology. The V1 API is used through its public names only.

Two guarantees the launcher relies on:

* A checkpoint that cannot be read (missing files, garbled data) raises a
  `CheckpointError` that names the step and directory, before anything is written; a run
  never starts over in a directory whose checkpoints it could not read, so good
  checkpoints are never evicted by a fresh run.
* Saves are synchronous: when `save` returns, the step is on disk, so a run killed right
  after can resume from it.
"""

import os
from typing import Any

import jax
from orbax.checkpoint import v1 as ocp

PyTree = Any


class CheckpointError(RuntimeError):
  """A checkpoint could not be found or read; the message says which and where."""


def abstract_like(tree: PyTree) -> PyTree:
  """Shapes, dtypes and shardings of `tree`, for restoring onto the same layout."""
  def leaf(x):
    sharding = getattr(x, "sharding", None)
    if sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


class Checkpoints:
  """Periodic checkpoints of one run's state in `directory`.

  Args:
    directory: where step folders live (created on first save).
    save_every: save when `step % save_every == 0` (and always when forced).
    keep: how many of the latest checkpoints to keep.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int = 2):
    if save_every <= 0 or keep <= 0:
      raise ValueError(f"save_every={save_every} and keep={keep} must be > 0")
    self.directory = os.path.abspath(directory)
    self._checkpointer = ocp.training.Checkpointer(
        self.directory,
        save_decision_policy=ocp.training.save_decision_policies.FixedIntervalPolicy(
            save_every),
        preservation_policy=ocp.training.preservation_policies.LatestN(keep))

  def steps(self) -> list[int]:
    """Steps of the committed checkpoints, oldest first."""
    return sorted(int(m.step) for m in self._checkpointer.checkpoints)

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: PyTree, *, force: bool = False) -> bool:
    """Saves `state` at `step` if the interval says so (or `force`); returns whether it did."""
    if not force and not self._checkpointer.should_save(step):
      return False
    saved = self._checkpointer.save(step, state, force=force)
    self._checkpointer.wait()
    return bool(saved)

  def restore(self, like: PyTree, step: int | None = None) -> PyTree:
    """Loads the checkpoint at `step` (default: the latest) onto the layout of `like`.

    Args:
      like: a state, or its `jax.eval_shape`/`abstract_like` abstraction, giving the
        tree structure, shapes, dtypes and shardings to restore onto.
      step: which checkpoint; `None` means the latest.

    Raises:
      CheckpointError: when there is no such checkpoint or it cannot be read.
    """
    available = self.steps()
    if step is None:
      if not available:
        raise CheckpointError(f"no checkpoint to resume from in {self.directory}")
      step = available[-1]
    if step not in available:
      raise CheckpointError(
          f"no checkpoint for step {step} in {self.directory}; available steps: "
          f"{available or 'none'}")
    abstract = abstract_like(like) if not _is_abstract(like) else like
    try:
      return self._checkpointer.load(step, abstract)
    except Exception as e:  # orbax raises many types; all mean "unreadable".
      others = [s for s in available if s != step]
      raise CheckpointError(
          f"checkpoint for step {step} in {self.directory} is unreadable "
          f"({type(e).__name__}); it was left untouched. Delete "
          f"{os.path.join(self.directory, str(step))} to resume from an earlier step "
          f"({others or 'none'}), or use a fresh workdir") from e

  def restore_raw(self, step: int | None = None) -> PyTree:
    """Loads a checkpoint as saved (nested dicts of arrays on the first device).

    For inspection and comparisons when the state's Python structure is not at hand; a run
    resumes with `restore`, which rebuilds the exact state type and layout.
    """
    step = self.latest_step() if step is None else step
    if step is None or step not in self.steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.directory}")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        self._checkpointer.metadata(step).metadata,
        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    return self.restore(abstract, step)

  def close(self) -> None:
    self._checkpointer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _is_abstract(tree: PyTree) -> bool:
  return all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(tree))


def save_tree(path: str, tree: PyTree, *, metadata: dict | None = None,
              overwrite: bool = False) -> None:
  """Saves one pytree (e.g. a shipped pretrained model) to the directory `path`.

  `metadata` (JSON: the training command, seed, measured quality) is stored with it and
  read back by `tree_metadata`.
  """
  ocp.save(os.path.abspath(path), tree, overwrite=overwrite, custom_metadata=metadata)


def load_tree(path: str, like: PyTree | None = None) -> PyTree:
  """Loads a pytree saved by `save_tree`, onto the layout of `like` (default: as saved,
  on the first device).

  Raises:
    CheckpointError: when `path` is missing or unreadable.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"no saved tree at {path}")
  try:
    if like is None:
      device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      like = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          ocp.metadata(path).metadata,
          is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
    elif not _is_abstract(like):
      like = abstract_like(like)
    return ocp.load(path, like)
  except Exception as e:  # orbax raises many types; all mean "unreadable".
    raise CheckpointError(f"the saved tree at {path} is unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]})") from e


def tree_metadata(path: str) -> dict:
  """The JSON metadata stored by `save_tree` (empty if none)."""
  return dict(ocp.metadata(os.path.abspath(path)).custom_metadata or {})

