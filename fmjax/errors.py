"""The error fmjax raises for a bad argument value, naming the argument, never a command-line flag.

A program that sets the argument from its own configuration (train/common.py maps
`("make_mesh", "sizes")` to `--config.mesh`) can catch it and add its flag; everyone else
reads the argument's name.

`WriteError` (with `writing`, the context manager that raises it) is the OSError of a file
that could not be written: it names the file and says "disk full" when that is why.
"""

import contextlib
import errno as _errno
import os
import re
from collections.abc import Iterator


class ArgumentError(ValueError):
  """A value of `argument` that `function` cannot use; the message says why and what to pass.

  Attributes:
    function: the public fmjax function that was given the value, e.g. "make_mesh".
    argument: its parameter (or config field) that holds it, e.g. "sizes".

  Args:
    message: what was wrong, with the offending value, and what to pass instead.
    function: sets the `function` attribute.
    argument: sets the `argument` attribute.
  """

  def __init__(self, message: str, *, function: str, argument: str):
    super().__init__(message)
    self.function, self.argument = function, argument


class WriteError(OSError):
  """A file that could not be written; the message names it, and says "disk full" when it is.

  Attributes:
    errno: the cause's error number (errno.ENOSPC for a full disk), or None.
    filename: the file that was being written.

  Args:
    message: what could not be written, where, why, and what to do.
    errno: sets the `errno` attribute.
    filename: sets the `filename` attribute.
  """

  def __init__(self, message: str, *, errno: int | None, filename: str):
    super().__init__(message)
    self.message = message
    self.errno, self.filename = errno, filename

  def __str__(self) -> str:
    return self.message  # not OSError's "[Errno 28] ...: 'FILE'"


# A full disk or quota; numpy's `tofile` reports a short write with no errno at all.
_FULL = (_errno.ENOSPC, _errno.EDQUOT, _errno.EFBIG)
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


def disk_full(error: OSError) -> bool:
  """Whether `error` says the disk (or the user's quota, or the file size limit) is full.

  Args:
    error: an OSError raised by a write.

  Returns:
    True for ENOSPC, EDQUOT, EFBIG and numpy's errno-less "N requested and M written".
  """
  return error.errno in _FULL or (error.errno is None and bool(_SHORT_WRITE.search(str(error))))


def write_error(error: OSError, path, what: str = "file") -> WriteError:
  """The `WriteError` reporting `error`, raised while writing `path`.

  Args:
    error: the OSError raised by the write (or the makedirs, open, rename around it).
    path: the file being written.
    what: what the file holds, for the message, e.g. "token cache", "tokenizer".

  Returns:
    A WriteError "cannot write the <what> <path>: disk full (...); ..." for a full disk
    (ENOSPC, EDQUOT, EFBIG, or a short write), else "cannot write the <what> <path>: <reason>".
  """
  path = os.fspath(path)
  short = _SHORT_WRITE.search(str(error)) if error.errno is None else None
  if disk_full(error):
    detail = (f"only {short.group(2)} of {short.group(1)} bytes were written" if short else
              error.strerror or str(error))
    return WriteError(
        f"cannot write the {what} {path}: disk full ({detail}); free space on the disk that "
        f"holds {os.path.dirname(os.path.abspath(path))}, or write to another disk",
        errno=error.errno if error.errno is not None else _errno.ENOSPC, filename=path)
  reason = error.strerror or str(error)
  where = f" ({error.filename})" if error.filename and os.fspath(error.filename) != path else ""
  return WriteError(f"cannot write the {what} {path}: {reason}{where}", errno=error.errno,
                    filename=path)


@contextlib.contextmanager
def writing(path, what: str = "file") -> Iterator[None]:
  """Reports an OSError raised in the block as `write_error(error, path, what)`.

  Wrap every write of a file the user will want to find again (token caches, tokenizers,
  predictions), so that a full disk says "disk full" and names the file:

    with writing(cache_path, "token cache"):
      ...

  Args:
    path: the file the block writes.
    what: what it holds, for the message.

  Yields:
    Nothing; exits the block normally or raises the WriteError.

  Raises:
    WriteError: the block raised an OSError (one that is already a WriteError passes as is).
  """
  try:
    yield
  except WriteError:
    raise
  except OSError as e:
    raise write_error(e, path, what) from e
