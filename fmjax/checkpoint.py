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

Integrity: once a step's save is complete, process 0 records the size and CRC-32 of each of
its files in `<step>/fmjax_checksums.json` (in a background thread, so training goes on).
Restoring checks them first: a step whose files do not match (flipped bits, a truncated or
deleted file) is reported by name, and a run resumes from the newest intact step instead,
moving the damaged one aside to `damaged-<step>` (a name orbax does not read, so nothing is
lost). A step written before checksums were recorded restores unverified, with a note.
"""

import dataclasses
import json
import logging
import os
import re
import shutil
import threading
import time
import zlib
from typing import Any, NoReturn

import jax
import numpy as np
import orbax.checkpoint as ocp

from fmjax import runtime as fruntime
from fmjax.errors import ArgumentError

log = logging.getLogger("fmjax")

CHECKSUMS = "fmjax_checksums.json"  # in each step's directory, next to orbax's items


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


# A test hook: FMJAX_TEST_KILL_AT="POINT@STEP" sends this process SIGKILL at POINT of the save
# of STEP into a training run's checkpoints/ (not the best-params copy): "before_save" (nothing of it written), "in_save" (orbax's save started, not yet
# committed) or "before_checksums" (committed, no checksums yet). tests/test_reliability.py
# kills there and checks the rerun resumes to the uninterrupted run.


def _kill_if_asked(point: str, step: int, directory: str) -> None:
  if (os.environ.get("FMJAX_TEST_KILL_AT") == f"{point}@{step}"
      and os.path.basename(os.path.normpath(directory)) == "checkpoints"):
    log.warning("FMJAX_TEST_KILL_AT=%s@%d: SIGKILL", point, step)
    os.kill(os.getpid(), 9)


_CHUNK = 4 << 20  # bytes read at a time: CRC-32 runs at memory speed, a file never in memory


def _crc32(path: str) -> tuple[int, str]:
  """(size, CRC-32 as 8 hex digits) of a file, read in chunks."""
  crc, size, buffer = 0, 0, bytearray(_CHUNK)
  view = memoryview(buffer)
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(view):
      crc, size = zlib.crc32(view[:n], crc), size + n
  return size, f"{crc:08x}"


def _step_files(step_dir: str) -> list[str]:
  """The files under a step's directory, as sorted '/'-joined relative paths (not the
  checksums file itself or its temporaries)."""
  names = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      if not name.startswith(CHECKSUMS):
        names.append(os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/"))
  return sorted(names)


def write_checksums(step_dir: str) -> dict:
  """Records the size and CRC-32 of every file of a complete checkpoint step.

  Written atomically to `step_dir/fmjax_checksums.json`; `Checkpointer` calls it once orbax
  has finished a save.

  Args:
    step_dir: a complete checkpoint step's directory, e.g. "WORKDIR/checkpoints/40".

  Returns:
    The record written: {"algorithm": "crc32", "files": {relative path: {"size", "crc32"}}}.
  """
  files = {}
  for name in _step_files(step_dir):
    size, crc = _crc32(os.path.join(step_dir, name))
    files[name] = {"size": size, "crc32": crc}
  record = {"algorithm": "crc32", "files": files}
  temporary = os.path.join(step_dir, f"{CHECKSUMS}.tmp-{os.getpid()}")
  with open(temporary, "w") as f:
    json.dump(record, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, os.path.join(step_dir, CHECKSUMS))
  return record


def verify_step(step_dir: str) -> str | None:
  """What is wrong with a checkpoint step's files, checked against its recorded checksums.

  Args:
    step_dir: a checkpoint step's directory, e.g. "WORKDIR/checkpoints/40".

  Returns:
    None when every recorded file is there with its size and CRC-32, or when the step has no
    checksums (saved before fmjax recorded them: see `has_checksums`); else the first problem
    as a phrase naming the file, e.g. "state/ocdbt.process_0/d/1a2b does not match its
    checksum".
  """
  try:
    with open(os.path.join(step_dir, CHECKSUMS)) as f:
      files = json.load(f)["files"]
    expected = {name: (int(v["size"]), str(v["crc32"])) for name, v in files.items()}
  except FileNotFoundError:
    return None
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f"{CHECKSUMS} cannot be read ({_cause(e)})"
  for name, (size, _) in sorted(expected.items()):  # the cheap checks first
    path = os.path.join(step_dir, name)
    if not os.path.isfile(path):
      return f"{name} is missing"
    if os.path.getsize(path) != size:
      return (f"{name} does not match its checksum ({os.path.getsize(path)} bytes, "
              f"{size} when saved)")
  for name, want in sorted(expected.items()):
    try:
      got = _crc32(os.path.join(step_dir, name))
    except OSError as e:
      return f"{name} cannot be read ({_cause(e)})"
    if got != want:
      return f"{name} does not match its checksum"
  return None


def has_checksums(step_dir: str) -> bool:
  """Whether a checkpoint step has its checksums recorded (steps saved by older fmjax do not).

  Args:
    step_dir: a checkpoint step's directory.

  Returns:
    True when `step_dir/fmjax_checksums.json` exists.
  """
  return os.path.exists(os.path.join(step_dir, CHECKSUMS))


# Steps verified by this process (their directory and every file's size and mtime): `restore`
# after `restorable_step`, or `restore_params` after `read_latest`, read the files only once.
_verified: set = set()


def _agree(value: int) -> int:
  """Process 0's `value` on every process (a collective when there are several)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _check(directory: str, step: int) -> str | None:
  """verify_step of `directory/step` on process 0 (once per process), agreed by all.

  Returns:
    None when intact or unverified; the problem otherwise (other processes: a pointer to
    process 0's log).
  """
  step_dir = os.path.join(directory, str(step))
  key = _signature(step_dir)
  problem = None
  if jax.process_index() == 0 and (key is None or key not in _verified):
    problem = verify_step(step_dir)
  if _agree(problem is not None):
    return problem or "see process 0's log"
  if key is not None:
    _verified.add(key)
  return None


def _signature(step_dir: str) -> tuple | None:
  """A step's directory with every file's name, size and mtime; None if it cannot be listed."""
  try:
    return (step_dir, has_checksums(step_dir), tuple(
        (name, st.st_size, st.st_mtime_ns) for name in _step_files(step_dir)
        for st in [os.stat(os.path.join(step_dir, name))]))
  except OSError:
    return None


def _newest_intact(directory: str, steps) -> tuple[int | None, list[tuple[int, str]]]:
  """(the newest of `steps` whose files match their checksums or None, [(newer damaged
  step, its problem), ...] newest first); a chosen step without checksums gets a note."""
  damaged = []
  for step in sorted(steps, reverse=True):
    problem = _check(directory, step)
    if problem is None:
      _note_unverified(directory, step)
      return step, damaged
    damaged.append((step, problem))
  return None, damaged


def _note_unverified(directory: str, step: int) -> None:
  """The one-line note for a step restored without checksums to check (process 0)."""
  if jax.process_index() == 0 and not has_checksums(os.path.join(directory, str(step))):
    log.warning("checkpoint step %d in %s has no checksums (saved by an earlier fmjax): not "
                "verified", step, directory)


def _reader_step(directory: str, steps) -> int:
  """The newest intact of `steps` for a reader (which moves nothing), newer damaged steps
  reported by a warning; raises CheckpointReadError when all are damaged."""
  if not steps:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint")
  chosen, damaged = _newest_intact(directory, steps)
  if chosen is None:
    raise _nothing_intact(directory, damaged, "read another directory's checkpoints")
  if jax.process_index() == 0:
    for bad, why in damaged:
      log.warning("checkpoint step %d in %s is damaged: %s; reading step %d, the newest "
                  "intact one", bad, directory, why, chosen)
  return chosen


def _nothing_intact(directory: str, damaged, advice: str) -> CheckpointReadError:
  """The error for a directory whose every checkpoint step is damaged, ending in `advice`."""
  problems = "; ".join(f"step {s}: {why}" for s, why in damaged)
  steps = ", ".join(str(s) for s, _ in damaged)
  return CheckpointReadError(
      f"no intact checkpoint in {directory}: step{'s' if len(damaged) > 1 else ''} {steps} "
      f"{'are' if len(damaged) > 1 else 'is'} damaged ({problems}). Nothing was changed; "
      f"{advice}")


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
    self._keep = keep
    self._saving = None  # the step of the last save started (async: maybe not committed)
    self._unsummed = None  # a step saved whose checksums are not being written yet
    self._summing = None  # the thread writing a finished step's checksums
    self._set_aside = []  # (step, new name): passed over by restorable_step, for this run

  def remove_unfinished(self) -> None:
    """Readies the directory for this run's saves, before its first one.

    Removes the temporary step directories of saves that never finished (a process killed
    while saving), and moves the steps newer than the one `restorable_step` chose aside
    (kept, under names orbax does not read: damaged-<step>, superseded-<step>), so that this
    run saves those steps afresh. For the run that writes here (process 0 moves; every
    process makes its Checkpointer and calls this before the collective first step); never
    for a reader, which would remove a live run's save in progress.
    """
    if jax.process_index() == 0 and os.path.isdir(self.directory):
      for name in os.listdir(self.directory):
        if ".orbax-checkpoint-tmp" in name:
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
      for step, name in self._set_aside:
        os.rename(os.path.join(self.directory, str(step)), os.path.join(self.directory, name))
    if self._set_aside:
      if jax.process_count() > 1:  # every process lists the directory after the moves
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("fmjax checkpoints set aside")
      self._manager.reload()
      self._set_aside = []

  def restorable_step(self, step: int = 0) -> int | None:
    """The checkpoint step to resume from, checked against its checksums.

    Newer steps are passed over (for `remove_unfinished` to move aside): with `step` 0, the
    damaged ones, each reported by a warning naming its bad file; with an explicit `step`,
    all of them. A step saved without checksums is taken unverified, with a note.

    Args:
      step: 0 for the newest intact step; N > 0 for step N, which must be intact.

    Returns:
      The step, or None when the directory holds no checkpoint.

    Raises:
      ArgumentError: `step` is negative, not among the checkpoints, or damaged.
      CheckpointReadError: every checkpoint is damaged (nothing is moved).
    """
    steps = list(self._manager.all_steps())
    if step < 0 or (step and step not in steps):
      raise ArgumentError(
          f"step={step}: {self.directory} holds no checkpoint step {step} (its steps: "
          f"{sorted(steps) or 'none'}); pass one of them, or 0 for the newest intact one",
          function="restorable_step", argument="step")
    if not steps:
      return None
    if step:
      problem = _check(self.directory, step)
      if problem is not None:
        raise ArgumentError(
            f"step={step}: checkpoint step {step} in {self.directory} is damaged: {problem}; "
            f"pass another of its steps {sorted(steps)}, or 0 for the newest intact one",
            function="restorable_step", argument="step")
      _note_unverified(self.directory, step)
      chosen, damaged = step, []
    else:
      chosen, damaged = _newest_intact(self.directory, steps)
      if chosen is None:
        raise _nothing_intact(self.directory, damaged, "use a new workdir, or move "
                              f"{self.directory} aside to start afresh")
    taken = set(os.listdir(self.directory))
    self._set_aside = []
    for newer in sorted(s for s in steps if s > chosen):
      name = f"{'damaged' if any(s == newer for s, _ in damaged) else 'superseded'}-{newer}"
      while name in taken:  # an earlier run moved a step of that number aside
        name = f"{name}+"
      taken.add(name)
      self._set_aside.append((newer, name))
    moved = dict(self._set_aside)
    if jax.process_index() == 0:
      for bad, why in damaged:
        log.warning("checkpoint step %d in %s is damaged: %s; resuming from step %d, the "
                    "newest intact one (step %d will be kept as %s)", bad, self.directory, why,
                    chosen, bad, os.path.join(self.directory, moved[bad]))
      superseded = [s for s, name in self._set_aside if name.startswith("superseded")]
      if superseded:
        log.warning("resuming from step %d as asked: the newer steps %s will be kept as %s",
                    chosen, superseded, ", ".join(os.path.join(self.directory, moved[s])
                                                  for s in superseded))
    return chosen

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
      step: the checkpoint step to restore, checked against its checksums; None for the
        newest intact one (see `restorable_step`).

    Returns:
      (state, meta): the state pytree of jax.Arrays in `abstract_state`'s shapes, dtypes and
      shardings, and the checkpoint's JSON meta dict.

    Raises:
      CheckpointReadError: the checkpoint's files are incomplete or damaged (a file that does
        not match its checksum is named).
    """
    if step is None:
      step = _reader_step(self.directory, self._manager.all_steps())
    problem = _check(self.directory, step)
    if problem is not None:
      raise CheckpointReadError(f"checkpoint step {step} in {self.directory} is damaged: "
                                f"{problem}. Nothing was changed")
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
      if (force or self.due(step)) and self._unsummed is not None:
        self._manager.wait_until_finished()  # as orbax's save would: the previous one is done
      self._sum_finished()
      _kill_if_asked("before_save", step, self.directory)
      saved = self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
    except Exception as e:  # also the previous async save's failure, reported here
      self._failed(self._saving if self._saving is not None else step, e)
    if saved:
      _kill_if_asked("in_save", step, self.directory)
      self._saving = self._unsummed = step
      self._sum_finished()  # a synchronous save is finished already
    return saved

  def wait(self) -> None:
    """Blocks until the asynchronous saves in flight are committed and their checksums written.

    Raises:
      CheckpointWriteError: the save in flight failed.
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      self._failed(self._saving, e)
    self._sum_finished()
    if self._summing is not None:
      self._summing.join()

  def _sum_finished(self) -> None:
    """Starts writing the checksums of the last save once orbax has finished it (process 0;
    the files of every process are in the one directory). In a thread: reading the files
    costs the training loop nothing, and the previous step's thread is joined first."""
    if self._unsummed is None or self._manager.is_saving_in_progress():
      return
    step, self._unsummed = self._unsummed, None
    if jax.process_index() != 0:
      return
    if self._summing is not None:
      self._summing.join()
    self._summing = threading.Thread(target=self._write_checksums, args=(step,),
                                     name=f"fmjax checksums {step}", daemon=True)
    self._summing.start()
    if self._keep == 1:  # the next save deletes this step: not while it is being read
      self._summing.join()

  def _write_checksums(self, step: int) -> None:
    """write_checksums of a finished step; a failure (the disk, or the step gone: its save
    failed) leaves it without checksums, to be restored unverified, and says so."""
    step_dir = os.path.join(self.directory, str(step))
    if not os.path.isdir(step_dir):
      return
    _kill_if_asked("before_checksums", step, self.directory)
    try:
      write_checksums(step_dir)
    except OSError as e:
      log.warning("the checksums of checkpoint step %d in %s could not be written (%s): it "
                  "will be restored unverified", step, self.directory, _cause(e))

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
  """(step, meta, params metadata by path) of a workdir's newest intact checkpoint, read-only.

  The params metadata maps each path to an object with `.shape` and `.dtype`. A newer step
  whose files do not match their checksums is passed over with a warning naming the file.

  Args:
    workdir: a training run's workdir (the checkpoints are in `workdir/checkpoints`).

  Returns:
    (step, meta, params): the newest intact step, its JSON meta dict, and slash-joined param
    path -> metadata with `.shape` and `.dtype` (no array is read).

  Raises:
    FileNotFoundError: no checkpoints/ directory, or no complete checkpoint in it.
    CheckpointReadError: every step is damaged, or the checkpoint's meta or array list cannot
      be read.
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{workdir!r} has no checkpoints/ directory; pass a workdir that a "
                            "training run wrote (or hf:DIRECTORY for a Hugging Face model)")
  manager = ocp.CheckpointManager(directory, item_names=("state", "meta"), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  if manager.latest_step() is None:
    raise FileNotFoundError(f"{directory} holds no complete checkpoint")
  step = _reader_step(directory, manager.all_steps())
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
    step: the checkpoint step to read, checked against its checksums.
    targets: slash-joined param path -> jax.ShapeDtypeStruct with a sharding.

  Returns:
    Dict of path -> jax.Array in the target's shape, dtype and sharding.

  Raises:
    CheckpointReadError: the checkpoint's files are incomplete or damaged (a file that does
      not match its checksum is named).
  """
  directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
  problem = _check(directory, step)
  if problem is not None:
    raise CheckpointReadError(f"checkpoint step {step} in {directory} is damaged: {problem}")
  item = {"params": unflatten_params(targets)}
  manager = ocp.CheckpointManager(directory, item_names=("state",),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  restored = _restore(manager, step, "params", state=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
      partial_restore=True))["state"]
  manager.close()
  return flatten_params(restored["params"])


def load_params(workdir: str, prefix: str = "") -> dict:
  """The params of `workdir`'s newest intact checkpoint as a nested dict on one device.

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
