"""Orbax checkpoints of a run: the train state, the data position and the resolved config.

Layout: WORKDIR/checkpoints/<step>/{state, meta}. `state` holds step, params, ema_params and
opt_state; `meta` is JSON with the step the data iterator resumes at and the config. No PRNG
key is stored: every key is re-derived from (seed, step, example index).
"""

import os
import sys
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointStore:
  """Saves and restores the train state of one run (every process calls it; Orbax coordinates).

  Args:
    directory: WORKDIR/checkpoints.
    keep: how many of the newest checkpoints to keep.
    keep_every: also keep every checkpoint whose step is a multiple of this, for good (Orbax's
      keep_period); 0: none.
  """

  def __init__(self, directory: str, keep: int = 3, keep_every: int = 0):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max(keep, 1), keep_period=keep_every or None, create=True
    )
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
    )

  def latest_step(self) -> int | None:
    """The newest saved step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Every saved step, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Writes a checkpoint of `state` (a pytree of arrays) at `step`; asynchronous.

    Args:
      step: the number of train steps taken.
      state: the train state pytree.
      meta: JSON-serialisable facts (data position, config).
    """
    if step in self._manager.all_steps():
      # Only an unreadable checkpoint that `restore_latest` skipped can be here: the run has
      # recomputed its step from an older one, and the new checkpoint replaces it.
      logging.warning("replacing the unreadable checkpoint at step %d", step)
      self._manager.delete(step)
    self._manager.save(
      step,
      args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
      force=True,
    )

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Reads the checkpoint at `step`.

    Args:
      step: a saved step.
      abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) like the saved state;
        the restored arrays take its structure, dtypes and shardings.

    Returns:
      (state, meta).
    """
    _quiet_closed_loop_reports()
    # A field that is None here (a part of the state this run does not have) and that older
    # checkpoints, saved before the field existed, lack: restored without it, then None again.
    absent = []
    if isinstance(abstract_state, dict):
      saved = self._saved_keys(step)
      absent = [k for k, v in abstract_state.items() if v is None and saved and k not in saved]
      abstract_state = {k: v for k, v in abstract_state.items() if k not in absent}
    restored = self._manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()
      ),
    )
    state = restored["state"]
    if absent:
      state = {**state, **dict.fromkeys(absent)}
    return state, dict(restored["meta"])

  def _saved_keys(self, step: int) -> set[str] | None:
    """The top-level keys of the state saved at `step`, from its metadata (None: unreadable)."""
    try:
      saved = self._manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 - unreadable metadata: restoring tells
      return None
    saved = getattr(saved, "tree", saved)
    return set(saved) if isinstance(saved, dict) else None

  def mismatch(self, step: int, abstract_state: Any) -> str | None:
    """How the arrays saved at `step` differ from `abstract_state` (a missing, extra or
    differently shaped array), read from the checkpoint's metadata alone; None when they fit or
    the metadata cannot be read (a damaged checkpoint: restoring it tells)."""
    try:
      saved = self._manager.item_metadata(step)["state"]
    except Exception:  # noqa: BLE001 - unreadable metadata: left to restore
      return None
    saved = getattr(saved, "tree", saved)
    if saved is None:
      return None
    have, want = _shapes(saved), _shapes(abstract_state)
    for path, shape in want.items():
      if path not in have:
        return f"{path} is not in the checkpoint"
      if tuple(have[path]) != tuple(shape):
        return f"{path} has shape {tuple(shape)} here, {tuple(have[path])} in the checkpoint"
    for path in have.keys() - want.keys():
      return f"the checkpoint holds {path}, which this network has not"
    return None

  def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest readable checkpoint, falling back to older ones with a warning.

    Returns:
      (state, meta), or None when the directory holds no checkpoint.
    """
    restored = restore_latest_common([self], abstract_state)
    if restored is None:
      return None
    _, states, metas = restored
    return states[0], metas[0]

  def wait(self) -> None:
    """Blocks until every pending save is on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """A pytree of ShapeDtypeStruct (keeping shardings) for `tree`, for restoring into."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


def _quiet_closed_loop_reports() -> None:
  """When a restore fails, the reads Orbax still has in flight finish into its closed event loop
  and each prints a traceback ("Event loop is closed") from a background thread, some before the
  failure reaches the caller, who reports it. Drops those reports, and passes on any other."""
  previous = sys.unraisablehook
  if getattr(previous, "quiets_closed_loop", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
      previous(unraisable)

  hook.quiets_closed_loop = True
  sys.unraisablehook = hook


class IncompatibleCheckpoint(ValueError):
  """A readable checkpoint whose arrays do not fit the state asked for: another network."""


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{"params/conv_in/kernel": shape, ...} of a pytree of arrays or array metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  return {
    "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): (
      x.shape
    )
    for path, x in leaves
    if hasattr(x, "shape")
  }


def _is_incompatible(error: Exception) -> bool:
  """Whether a restore failed on shapes or structure (another config), not on damaged files."""
  text = str(error)
  return ("shape" in text and "compatible" in text) or "tree structure" in text.lower()


def restore_latest_common(
  stores: list[CheckpointStore], abstract_state: Any
) -> tuple[int, list[Any], list[dict[str, Any]]] | None:
  """Restores the newest step that every store holds readable, for runs that move together.

  The seeds of a study save the same steps, but an interruption between their saves can leave
  one seed a checkpoint ahead; all of them then resume from the newest step they share.
  Unreadable checkpoints are skipped with a warning.

  Args:
    stores: one store per run.
    abstract_state: the state's structure, as for `CheckpointStore.restore`.

  Returns:
    (step, [state per store], [meta per store]), or None when no store holds a checkpoint.

  Raises:
    ValueError: some stores hold checkpoints and others none (one line).
    IncompatibleCheckpoint: the newest checkpoint is readable but holds another network's
      arrays: the config differs from the one it was saved with. Older ones are not tried.
    RuntimeError: no step is readable in every store.
  """
  steps = [set(store.all_steps()) for store in stores]
  if not any(steps):
    return None
  if not all(steps):
    empty = [store.directory for store, s in zip(stores, steps, strict=True) if not s]
    raise ValueError(
      f"{', '.join(empty)} has no checkpoint while the runs saved with it have: a seed study "
      f"resumes only with the seeds it started with; start new seeds in a new --workdir"
    )
  for step in sorted(set.intersection(*steps), reverse=True):
    try:
      # Checked first from the metadata: a restore that fails part-way leaves Orbax's reads
      # reporting errors from background threads.
      detail = stores[0].mismatch(step, abstract_state)
      if detail is None:
        restored = [store.restore(step, abstract_state) for store in stores]
    except Exception as e:  # noqa: BLE001 - any unreadable checkpoint means: try the previous one
      if not _is_incompatible(e):
        first_line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        logging.warning(
          "checkpoint at step %d is damaged (%s); trying an older one", step, first_line
        )
        continue
      detail = str(e).strip().splitlines()[0][:300]
    if detail is not None:
      raise IncompatibleCheckpoint(
        f"the checkpoint at step {step} in {stores[0].directory} does not fit this config's "
        f"network ({detail}); sample or resume with the run's own config (--workdir alone "
        "uses its config.json), or train this config in a new --workdir"
      )
    return step, [state for state, _ in restored], [meta for _, meta in restored]
  where = stores[0].directory if len(stores) == 1 else f"{len(stores)} runs"
  raise RuntimeError(
    f"no readable checkpoint in {where} (steps {[sorted(s) for s in steps]}, all damaged); "
    "move the checkpoints directory away to train from the start"
  )
