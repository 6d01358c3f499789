"""Checkpoints through orbax: the train state plus a small JSON record of everything else.

A checkpoint step holds two items:
  state: TrainState (params, optimizer state, step), written shard by shard from every process
  meta:  JSON — the model's configuration, the data iterator's position and the rng seed

Restoring reads `meta` first and compares the model configuration with the running one,
so a workdir that holds another model's checkpoint is refused before anything is touched.
"""

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written for another model."""


def model_signature(model_config) -> dict:
  """JSON-able description of a model config (dataclass), used to recognise its checkpoints."""
  fields = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(model_config)
  return json.loads(json.dumps(fields, default=str))


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep`, async where orbax allows."""

  def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    # should_save_fn, not save_interval_steps: orbax's default policy also saves the first
    # step it sees (a step-1 checkpoint). The trainer forces the final and time-budget saves.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, should_save_fn=lambda step, _: step % save_every == 0, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check_compatible(self, signature: dict, step: int | None = None) -> dict:
    """Reads meta of `step` (default latest) and raises if its model differs from `signature`."""
    step = self.latest_step() if step is None else step
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    saved = meta.get("model", {})
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
             for k, v in signature.items() if saved.get(k) != v]
    diffs += [f"{k}: checkpoint {saved[k]!r} vs config (absent)" for k in saved if k not in signature]
    if diffs:
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model: "
          + "; ".join(diffs[:5]) + ". Use a new --workdir, or the config that wrote it. "
          "Nothing was changed.")
    return meta

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores (state, meta) into the shardings carried by `abstract_state`'s leaves.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set — the layout to
        restore into, which may differ from the one that saved (another mesh or topology).
    """
    step = self.latest_step() if step is None else step
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved."""
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def flatten_params(tree) -> dict[str, Any]:
  """{"bert/ln_embed/scale": leaf, ...}: a params tree keyed by slash-joined paths."""
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_latest(workdir: str) -> tuple[int, dict, dict]:
  """(step, meta, params metadata by path) of a workdir's latest checkpoint, read-only.

  The params metadata maps each path to an object with `.shape` and `.dtype`.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory; pass a workdir that a "
                            "training run wrote (or hf:DIRECTORY for a Hugging Face model)")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint")
  meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  tree = manager.item_metadata(step)["state"]
  tree = getattr(tree, "tree", tree)
  manager.close()
  return step, meta, flatten_params(tree["params"])


def restore_params(workdir: str, step: int, targets: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """Reads only the params named in `targets` (path -> ShapeDtypeStruct with a sharding) from
  `workdir`'s checkpoint `step`, each straight into its sharding. Returns path -> jax.Array."""
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  nested: dict = {}
  for path, target in targets.items():
    node = nested
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = target
  item = {"params": nested}
  manager = ocp.CheckpointManager(directory, item_names=("state",),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True)))["state"]
  manager.close()
  return flatten_params(restored["params"])


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for Checkpointer.restore."""
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
