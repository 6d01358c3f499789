"""One run per workdir: an exclusive lock held for the whole run, and a refused run leaves no
new workdir behind.

`hold(workdir)` makes the directory if it is missing and takes an exclusive `fcntl.flock` on
WORKDIR/.lock, which records the holder's pid, start time and command so that a second run
can name it. The kernel releases a flock when its process ends, however it ends (kill -9
included), so a lock file left by a dead process blocks nothing. `hold` is re-entrant within
a process: a program holds the workdir for its whole `run`, and `fmjax.trainer.fit` holds it
again (a no-op then) so that a library user calling `fit` directly is protected too.

When the outermost `hold` ends with an exception before training started (`Lock.keep` was
not called: `fit` calls it just before it records config.json), a directory that this hold
created is removed again, with everything the run put there (a tokenizer, a token cache),
since nothing else could have written into it meanwhile. A directory that existed before is
never removed from.

Several processes of one multi-process run share a workdir: each takes its own lock file
(.lock for process 0, .lock.N for process N), so two runs conflict process by process, and
only process 0 removes a refused run's new directory.
"""

import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import threading
import time

__all__ = ["WorkdirInUse", "Lock", "hold", "held", "check_free"]

log = logging.getLogger("fmjax")

_HELD: dict[str, "Lock"] = {}  # real path of a workdir -> this process's lock on it
_GUARD = threading.Lock()


class WorkdirInUse(OSError):
  """Another process holds the workdir's lock.

  Args:
    path: the workdir.
    owner: what the lock file says of its holder: {"pid", "started", "command"} (empty
      when the holder has not written them yet).
    advice: what to do, ending the message.
  """

  def __init__(self, path: str, owner: dict,
               advice: str = "wait for it to finish or use another workdir"):
    self.path, self.owner = path, owner
    if owner.get("pid"):
      who = (f"process {owner['pid']} (started {owner.get('started', '?')}, command "
             f"{owner.get('command', '?')})")
    else:
      who = "another process"
    super().__init__(f"workdir {path} is in use by {who}; {advice}")


class Lock:
  """This process's exclusive lock on a workdir, as `hold` yields it.

  Args:
    path: the workdir as given.
    lock_file: the lock file's path.
    fd: the lock file's descriptor, flock-ed.
    created: the directories this hold created, outermost first (the workdir last); removed
      again on a failure before `keep`.
    process: this process's index in a multi-process run.
  """

  def __init__(self, path: str, lock_file: str, fd: int, created: list[str], process: int):
    self.path, self.lock_file, self.created = path, lock_file, created
    self._fd, self._process, self._keep = fd, process, False

  def keep(self) -> None:
    """Marks the workdir as holding this run's work: it stays, whatever happens next."""
    self._keep = True

  def _release(self, failed: bool) -> None:
    if failed and not self._keep and self.created and self._process == 0:
      # This run made the directory and was refused before any training: what is in it is
      # this run's alone (it held the lock). Parents it made go too, but only when empty:
      # another run may have been started in one meanwhile.
      shutil.rmtree(self.created[-1], ignore_errors=True)
      for parent in reversed(self.created[:-1]):
        with contextlib.suppress(OSError):
          os.rmdir(parent)
    with contextlib.suppress(OSError):
      os.unlink(self.lock_file)  # while still locked: see _acquire's check of the inode
    os.close(self._fd)


def _lock_name(process: int) -> str:
  return ".lock" if process == 0 else f".lock.{process}"


def _process_index() -> int:
  import jax  # only when a lock is taken: importing this module stays cheap
  return jax.process_index()


def _command() -> str:
  """This process's command line, as typed (Linux: /proc), else sys.argv."""
  try:
    with open("/proc/self/cmdline", "rb") as f:
      args = f.read().split(b"\0")
    return " ".join(a.decode(errors="replace") for a in args if a)
  except OSError:
    return " ".join([os.path.basename(sys.executable), *sys.argv])


def _read_owner(lock_file: str) -> dict:
  """The holder's record; briefly waits for a holder that has locked but not yet written it."""
  for _ in range(10):
    try:
      with open(lock_file) as f:
        return json.load(f)
    except (OSError, ValueError):
      time.sleep(0.05)
  return {}


def _make(path: str) -> list[str]:
  """Makes `path` and its missing parents; returns the directories made, outermost first."""
  missing, head = [], os.path.abspath(path)
  while not os.path.exists(head):
    missing.append(head)
    parent = os.path.dirname(head)
    if parent == head:
      break
    head = parent
  os.makedirs(path, exist_ok=True)
  return missing[::-1]


def _acquire(path: str, process: int) -> Lock:
  created = _make(path)
  lock_file = os.path.join(path, _lock_name(process))
  while True:
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirInUse(path, _read_owner(lock_file)) from None
    except OSError as e:  # a file system without flock (some network mounts)
      os.close(fd)
      log.warning("cannot lock workdir %s (%s): two runs on it would not be stopped", path,
                  e.strerror)
      return Lock(path, lock_file, os.open(os.devnull, os.O_RDONLY), created, process)
    try:  # the holder before us may have unlinked the file we opened: lock the current one
      if os.fstat(fd).st_ino == os.stat(lock_file).st_ino:
        break
    except FileNotFoundError:
      pass
    os.close(fd)
  record = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": _command()}
  os.ftruncate(fd, 0)
  os.write(fd, json.dumps(record).encode())
  return Lock(path, lock_file, fd, created, process)


@contextlib.contextmanager
def hold(path: str):
  """Holds the exclusive lock on workdir `path` for the `with` block (see the module docstring).

  Re-entrant: inside a block already holding `path`, yields the same Lock and does nothing.

  Args:
    path: the workdir; made (with its parents) when missing.

  Yields:
    The Lock; call its `keep()` once the run has written work worth keeping.

  Raises:
    WorkdirInUse: another process holds the workdir.
    OSError: the directory cannot be made.
  """
  key = os.path.realpath(path)
  with _GUARD:
    outer = _HELD.get(key)
  if outer is not None:
    yield outer
    return
  lock = _acquire(path, _process_index())
  with _GUARD:
    _HELD[key] = lock
  failed = True
  try:
    yield lock
    failed = False
  finally:
    with _GUARD:
      _HELD.pop(key, None)
    lock._release(failed)  # pylint: disable=protected-access


def held(path: str) -> Lock | None:
  """This process's Lock on a workdir.

  Args:
    path: the workdir.

  Returns:
    The Lock that `hold` yields, or None when this process holds none on `path`.
  """
  with _GUARD:
    return _HELD.get(os.path.realpath(path))


def check_free(path: str) -> None:
  """Raises WorkdirInUse when another process holds the existing workdir `path`'s lock.

  Takes nothing: a caller outside `hold` learns early that its run would be refused.

  Args:
    path: the workdir (an existing directory).
  """
  if held(path) is not None:
    return
  with hold(path):
    pass
