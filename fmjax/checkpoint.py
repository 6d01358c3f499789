"""Checkpoints through orbax: the train state plus a small JSON record of everything else.

A checkpoint step holds two items:
  state: TrainingState (params, optimizer state, step), written shard by shard from every process
  meta:  JSON — the model's architecture, the runtime it ran under (fmjax.runtime), the data
         iterator's position and the rng seed

Restoring reads `meta` first and compares the architecture with the running one, so a
workdir that holds another model's checkpoint is refused before anything is touched. The
runtime may differ (another attention kernel, remat policy, dtype or dropout); a change of
scan_layers changes the parameter layout, which `stack_layers` / `unstack_layers` convert.

Crash safety: orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it when
complete, so a process killed mid-save leaves only a temporary directory, which is never
restored and which the next training run removes (`Checkpointer.remove_unfinished`). A
save that fails (disk full) or a checkpoint that cannot be read (truncated, corrupted
files) raises one of the errors below, naming the step, the directory and the checkpoints
that are still good.
"""

import dataclasses
import json
import os
import re
import shutil
import threading
import time
from typing import Any, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmjax import runtime as fruntime


class CheckpointMismatchError(ValueError):
  """The workdir's checkpoint was written for another model."""


class CheckpointReadError(ValueError):
  """A checkpoint's files cannot be read: truncated, corrupted or partly deleted."""


class CheckpointWriteError(OSError):
  """Saving a checkpoint failed (e.g. the disk is full); the earlier ones are intact."""


def _cause(e: BaseException) -> str:
  """An exception as one short line: its type and the first line of its message."""
  text = str(e).strip().splitlines()
  first = text[0] if text else ""
  return f"{type(e).__name__}: {first[:300]}{'...' if len(first) > 300 else ''}"


def _restore(manager, step: int, what: str, **items):
  """manager.restore of `items` at `step`; a damaged checkpoint raises CheckpointReadError."""
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax, tensorstore and json report damage in many types
    path = os.path.join(os.fspath(manager.directory), str(step))
    earlier = [s for s in manager.all_steps() if s < step]
    advice = (f"Move it aside (mv {path} {path}.damaged) to resume from step {max(earlier)}, "
              "the previous one," if earlier else "Remove it to start afresh,")
    raise CheckpointReadError(
        f"checkpoint {path} cannot be read ({what}: {_cause(e)}): its files are incomplete "
        f"or damaged. {advice} or use a new workdir. Nothing was changed.") from e


def model_signature(model_config) -> dict:
  """JSON-able description of a model's architecture, used to recognise its checkpoints.

  Runtime fields do not belong in it.

  Args:
    model_config: a model config dataclass, or a dict of them (e.g. {"encoder": ..., ...}).

  Returns:
    The config's fields as a JSON round-tripped dict (values JSON cannot hold become strings).
  """
  fields = dataclasses.asdict(model_config) if dataclasses.is_dataclass(model_config) else dict(model_config)
  return json.loads(json.dumps(fields, default=str))


def saved_scan_layers(meta: dict) -> bool:
  """Whether a checkpoint's params are stacked for nn.scan: its runtime's scan_layers.

  Args:
    meta: a checkpoint's JSON meta; meta written before the runtime split kept scan_layers
      among the model fields, which is read instead.

  Returns:
    True if the params were saved in nn.scan's layout ("...blocks/layers/...").
  """
  return bool(meta.get("runtime", meta.get("model", {})).get("scan_layers", False))


class Checkpointer:
  """Saves every `save_every` steps, keeps the last `keep`, async where orbax allows.

  Args:
    directory: where the step directories go (made absolute; created if missing).
    save_every: the save interval in steps; `save` without force writes only on multiples.
    keep: how many of the latest checkpoints to keep (orbax's max_to_keep).
    async_save: write in the background (orbax asynchronous checkpointing); `wait` joins it.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    # should_save_fn, not save_interval_steps: orbax's default policy also saves the first
    # step it sees (a step-1 checkpoint). The trainer forces the final and time-budget saves.
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, should_save_fn=lambda step, _: step % save_every == 0, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
    self._saving = None  # the step of the last save started (async: maybe not committed)

  def remove_unfinished(self) -> None:
    """Removes the temporary step directories of saves that never finished (a process
    killed while saving). For the run that writes here, before its first save (process 0
    only; every process makes its Checkpointer before the collective first step); never
    for a reader, which would remove a live run's save in progress."""
    if jax.process_index() != 0 or not os.path.isdir(self.directory):
      return
    for name in os.listdir(self.directory):
      if ".orbax-checkpoint-tmp" in name:
        shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def latest_step(self) -> int | None:
    """The latest complete checkpoint's step.

    Returns:
      The step number, or None when the directory holds no complete checkpoint.
    """
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    """Whether `save(step, ...)` without force would write a checkpoint.

    Args:
      step: the training step.

    Returns:
      True when `step` is a multiple of `save_every`.
    """
    return step % self.save_every == 0

  def check_compatible(self, signature: dict, step: int | None = None) -> dict:
    """Reads meta of `step` (default latest) and raises if its model differs from `signature`.

    Args:
      signature: the running model's `model_signature`.
      step: the checkpoint step to read; None for the latest.

    Returns:
      The checkpoint's meta dict (model, runtime, data iterator position, rng seed).

    Raises:
      CheckpointMismatchError: the checkpoint's architecture differs from `signature`.
      CheckpointReadError: the meta cannot be read or is not a JSON object.
    """
    step = self.latest_step() if step is None else step
    meta = _restore(self._manager, step, "meta", meta=ocp.args.JsonRestore())["meta"]
    if not isinstance(meta, dict):
      raise CheckpointReadError(f"checkpoint {os.path.join(self.directory, str(step))}: its "
                                f"meta is {type(meta).__name__}, not a JSON object: damaged")
    # Checkpoints from before the runtime split list runtime fields with the model: ignored.
    saved = {k: v for k, v in meta.get("model", {}).items() if k not in fruntime.FIELDS}
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs config {v!r}"
             for k, v in signature.items() if saved.get(k) != v]
    diffs += [f"{k}: checkpoint {saved[k]!r} vs config (absent)" for k in saved if k not in signature]
    if diffs:
      raise CheckpointMismatchError(
          f"{self.directory} holds a checkpoint (step {step}) of a different model: "
          + "; ".join(diffs[:5]) + ". Use a new workdir, or the config that wrote it. "
          "Nothing was changed.")
    return meta

  def restore(self, abstract_state: Any, step: int | None = None):
    """Restores (state, meta) into the shardings carried by `abstract_state`'s leaves.

    Args:
      abstract_state: pytree of jax.ShapeDtypeStruct with `.sharding` set — the layout to
        restore into, which may differ from the one that saved (another mesh or topology).
      step: the checkpoint step to restore; None for the latest.

    Returns:
      (state, meta): the state pytree of jax.Arrays in `abstract_state`'s shapes, dtypes and
      shardings, and the checkpoint's JSON meta dict.

    Raises:
      CheckpointReadError: the checkpoint's files are incomplete or damaged.
    """
    step = self.latest_step() if step is None else step
    restored = _restore(self._manager, step, "state",
                        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
    return restored["state"], restored["meta"]

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False) -> bool:
    """Saves when `step` is on the interval (or `force`); returns whether it saved.

    Args:
      step: the training step, the checkpoint's name.
      state: the pytree to save (the TrainingState), written shard by shard from every process.
      meta: the JSON-able record saved with it (model, runtime, data position, seed).
      force: save even when `step` is not a multiple of `save_every`.

    Returns:
      True if a save was started (asynchronous saves commit later; see `wait`).

    Raises:
      CheckpointWriteError: this save, or the previous asynchronous one, failed.
    """
    try:
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # also the previous async save's failure, reported here
      self._failed(self._saving if self._saving is not None else step, e)
    if saved:
      self._saving = step
    return saved

  def wait(self) -> None:
    """Blocks until the asynchronous saves in flight are committed.

    Raises:
      CheckpointWriteError: the save in flight failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._failed(self._saving, e)

  def close(self) -> None:
    """Waits for the saves in flight (see `wait`), then closes the orbax manager.

    Raises:
      CheckpointWriteError: the save in flight failed.
    """
    self.wait()
    self._manager.close()

  def _failed(self, step, e: Exception) -> NoReturn:
    """Stops orbax's remaining save threads, removes the unfinished step, and raises."""
    try:
      self._manager.close()
    except Exception:  # pylint: disable=broad-except  (the same failure again)
      pass
    # orbax stops waiting at the first failed write; its other writer threads are let
    # finish, so that the removal below is final and the exit is quiet.
    deadline = time.monotonic() + 300
    for thread in threading.enumerate():
      target = getattr(thread, "_target", None)
      owner = f"{type(thread).__module__} {getattr(target, '__module__', '')}"
      if "orbax" in owner and thread is not threading.current_thread() and not thread.daemon:
        try:
          thread.join(max(0.0, deadline - time.monotonic()))
        except Exception:  # pylint: disable=broad-except  (orbax's join re-raises its failure)
          pass
    self.remove_unfinished()
    kept = sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())
    raise CheckpointWriteError(
        f"saving checkpoint step {step} in {self.directory} failed ({_cause(e)}); its "
        f"unfinished files were removed, and the checkpoints kept are steps {kept}. "
        "Free space (or fix the cause) and rerun the same command to resume from step "
        f"{max(kept) if kept else 0}") from e


def path_str(path) -> str:
  """A pytree key path as a slash-joined string, e.g. "bert/ln_embed/scale".

  Args:
    path: a key path from jax.tree_util (DictKey, GetAttrKey, SequenceKey... entries).

  Returns:
    The keys' `.key` (or `.name`, or the entry itself) joined by "/".
  """
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def flatten_params(tree) -> dict[str, Any]:
  """{"bert/ln_embed/scale": leaf, ...}: a params tree keyed by slash-joined paths.

  Args:
    tree: a params pytree (or any pytree, e.g. optimizer state).

  Returns:
    Dict of slash-joined path (see `path_str`) -> leaf, the leaves unchanged.
  """
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_params(flat: dict[str, Any]) -> dict:
  """The inverse of flatten_params: slash-joined paths -> a nested dict.

  Args:
    flat: dict of slash-joined path -> leaf.

  Returns:
    The nested dict of dicts, the leaves unchanged.
  """
  nested: dict = {}
  for path, x in flat.items():
    node = nested
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = x
  return nested


_LAYER = re.compile(r"^(.*?blocks/)layer_(\d+)/(.*)$")
_STACKED = re.compile(r"^(.*?blocks/)layers/(.*)$")


def is_stacked(path: str) -> bool:
  """Whether a parameter path is in nn.scan's layout ("...blocks/layers/...").

  Args:
    path: a slash-joined parameter path.

  Returns:
    True for a stacked path.
  """
  return _STACKED.match(path) is not None


def layer_paths(path: str, num_layers: int) -> list[str] | None:
  """A stacked path's per-layer paths in the Python-loop layout; None for another path.

  Args:
    path: a slash-joined parameter path, e.g. "gpt/blocks/layers/mlp/up/kernel".
    num_layers: the number of layers L stacked on its leading axis.

  Returns:
    ["...blocks/layer_0/...", ..., "...blocks/layer_{L-1}/..."], or None when `path` is not
    stacked.
  """
  m = _STACKED.match(path)
  return None if m is None else [f"{m[1]}layer_{i}/{m[2]}" for i in range(num_layers)]


def stack_layers(flat: dict, stack=np.stack) -> dict:
  """Flat params of a Python-loop stack -> nn.scan's layout.

  "...blocks/layer_{i}/p" for every i -> "...blocks/layers/p", the layers stacked on a
  leading axis.

  Args:
    flat: dict of slash-joined path -> array (any tree whose paths hold params, e.g.
      optimizer state, flattened).
    stack: the stacking function: np.stack; jnp.stack for device arrays.

  Returns:
    Dict of path -> array: each "...blocks/layers/p" of shape (L, ...) from the L per-layer
    arrays of shape (...); other paths unchanged.
  """
  out, stacked = {}, {}
  for path, x in flat.items():
    m = _LAYER.match(path)
    if m is None:
      out[path] = x
    else:
      stacked.setdefault(f"{m[1]}layers/{m[3]}", {})[int(m[2])] = x
  for path, layers in stacked.items():
    out[path] = stack([layers[i] for i in range(len(layers))])
  return out


def unstack_layers(flat: dict) -> dict:
  """Inverse of stack_layers: "...blocks/layers/p" (L, ...) -> "...blocks/layer_{i}/p".

  Args:
    flat: dict of slash-joined path -> array.

  Returns:
    Dict of path -> array: each stacked (L, ...) array split into L arrays of shape (...)
    under "...blocks/layer_{i}/p"; other paths unchanged.
  """
  out = {}
  for path, x in flat.items():
    m = _STACKED.match(path)
    if m is None:
      out[path] = x
    else:
      out.update({f"{m[1]}layer_{i}/{m[2]}": x[i] for i in range(x.shape[0])})
  return out


def convert_layout(flat: dict, scanned: bool, stack=np.stack) -> dict:
  """Flat params in nn.scan's layout (`scanned`) or the Python loop's, whichever they are in.

  Args:
    flat: dict of slash-joined path -> array (params, or any tree holding them by path, e.g.
      a TrainingState, flattened).
    scanned: True for nn.scan's stacked layout, False for the Python loop's per-layer one.
    stack: the stacking function for `stack_layers` (np.stack; jnp.stack for device arrays).

  Returns:
    `flat` converted with `stack_layers` / `unstack_layers`, or unchanged when it is
    already in the wanted layout.
  """
  has_stacked = any(_STACKED.match(p) for p in flat)
  has_layers = any(_LAYER.match(p) for p in flat)
  if scanned and has_layers:
    return stack_layers(flat, stack)
  if not scanned and has_stacked:
    return unstack_layers(flat)
  return flat


def read_latest(workdir: str) -> tuple[int, dict, dict]:
  """(step, meta, params metadata by path) of a workdir's latest checkpoint, read-only.

  The params metadata maps each path to an object with `.shape` and `.dtype`.

  Args:
    workdir: a training run's workdir (the checkpoints are in `workdir/checkpoints`).

  Returns:
    (step, meta, params): the latest step, its JSON meta dict, and slash-joined param path ->
    metadata with `.shape` and `.dtype` (no array is read).

  Raises:
    FileNotFoundError: no checkpoints/ directory, or no complete checkpoint in it.
    CheckpointReadError: the checkpoint's meta or array list cannot be read.
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
  meta = _restore(manager, step, "meta", meta=ocp.args.JsonRestore())["meta"]
  try:
    tree = manager.item_metadata(step)["state"]
    tree = getattr(tree, "tree", tree)
    params = tree["params"]
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointReadError(f"checkpoint {os.path.join(directory, str(step))}: the list of "
                              f"its arrays cannot be read ({_cause(e)}): damaged") from e
  manager.close()
  return step, meta, flatten_params(params)


def restore_params(workdir: str, step: int, targets: dict[str, jax.ShapeDtypeStruct]) -> dict:
  """Reads only the params named in `targets` from `workdir`'s checkpoint `step`.

  Each param is read straight into its sharding.

  Args:
    workdir: a training run's workdir.
    step: the checkpoint step to read.
    targets: slash-joined param path -> jax.ShapeDtypeStruct with a sharding.

  Returns:
    Dict of path -> jax.Array in the target's shape, dtype and sharding.

  Raises:
    CheckpointReadError: the checkpoint's files are incomplete or damaged.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  item = {"params": unflatten_params(targets)}
  manager = ocp.CheckpointManager(directory, item_names=("state",),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  restored = _restore(manager, step, "params", state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))["state"]
  manager.close()
  return flatten_params(restored["params"])


def load_params(workdir: str, prefix: str = "") -> dict:
  """The params of `workdir`'s latest checkpoint as a nested dict on one device.

  To apply a trained model outside its program: a notebook, an export.

  Args:
    workdir: a training run's workdir.
    prefix: only that subtree, e.g. "bert" for the encoder of a finetuned classifier; ""
      for all the params.

  Returns:
    The nested params dict (of the subtree under `prefix`), jax.Arrays on the first device in
    their saved shapes and dtypes.

  Raises:
    KeyError: the params have no subtree `prefix`.
  """
  step, _, arrays = read_latest(workdir)
  if prefix and not any(p.startswith(prefix + "/") for p in arrays):
    raise KeyError(f"{workdir}: the checkpoint's params have no {prefix!r}; they start with "
                   f"{sorted({p.split('/')[0] for p in arrays})}")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  targets = {p: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device)
             for p, m in arrays.items() if not prefix or p.startswith(prefix + "/")}
  params = unflatten_params(restore_params(workdir, step, targets))
  return params[prefix] if prefix else params


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying the target shardings, for Checkpointer.restore.

  Args:
    abstract_tree: pytree of objects with `.shape` and `.dtype` (e.g. from jax.eval_shape).
    shardings: a pytree of jax.sharding.Sharding of the same structure.

  Returns:
    The pytree of jax.ShapeDtypeStruct(shape, dtype, sharding=...).
  """
  return jax.tree_util.tree_map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, shardings)
