"""Text corpora as tfds datasets: local files via the `LocalText` builder, or the tfds catalog.

Both kinds end up as ArrayRecord files read with random access (no TensorFlow needed) through
tfds's ArrayRecord data source (the random-access source `grain.MapDataset.source` takes), and
`load_documents` hands back an indexable `Documents` sequence of strings over it; iterating it
reads ahead with Grain. Local files are checked up front; every problem with them is one
`DataError` naming the file and the fix.

A local corpus is identified by its files' real paths, sizes and modification times (plus
the splitting options): that fingerprint is the builder config name, so editing a file
prepares a fresh dataset while an untouched one is reused.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import glob
import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence

import jax
import tensorflow_datasets as tfds

from fmjax.errors import disk_full, write_error

log = logging.getLogger("fmjax")

DOCUMENT_SPLITS = ("file", "blank_line")
_READ_CHUNK = 1024  # documents per ArrayRecord read when iterating a corpus
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*(?:\n[ \t\r\f\v]*)*\n")


class DataError(ValueError):
  """Unusable input data; the message names the file and what to do about it.

  Args:
    message: one line naming the file (and line) and what to do.
    function, argument: when the data may be fine but an argument read it wrongly, the
      function and argument the message suggests checking (as fmjax.errors.ArgumentError
      has them, e.g. "TableFormat", "quoting"); None otherwise. Kept as attributes.
  """

  def __init__(self, message: str, *, function: str | None = None,
               argument: str | None = None):
    super().__init__(message)
    self.function, self.argument = function, argument


def resolve_files(patterns: str | Sequence[str]) -> list[str]:
  """Expands paths/globs into a sorted-per-pattern list of existing, non-empty files.

  Args:
    patterns: a path or glob, or a sequence of them; order across patterns is kept.

  Returns:
    Absolute real paths, without duplicates.

  Raises:
    DataError: a pattern matches nothing, a directory or an empty file.
  """
  patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
  files = []
  for pattern in map(os.fspath, patterns):
    matches = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not matches:
      raise DataError(f"{pattern}: no file matches this path or glob; check the spelling "
                      f"(relative paths are taken from {os.getcwd()})")
    for path in matches:
      if os.path.isdir(path):
        raise DataError(f"{path} is a directory, not a text file; pass the files inside it, "
                        f"e.g. '{os.path.join(path, '*.txt')}'")
      if os.path.getsize(path) == 0:
        raise DataError(f"{path} is empty (0 bytes); remove it from the corpus or fill it")
      path = os.path.realpath(path)
      if path not in files:
        files.append(path)
  return files


def read_text_file(path: str) -> str:
  """Reads a UTF-8 file, raising DataError on bad bytes or whitespace-only content.

  Args:
    path: the file.

  Returns:
    Its text.

  Raises:
    DataError: the file is not valid UTF-8 (names the byte and line) or holds only whitespace.
  """
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise DataError(
        f"{path} is not valid UTF-8: byte {raw[e.start]:#04x} at byte offset {e.start} "
        f"(line {line}); convert it, e.g. `iconv -f latin1 -t utf-8`") from None
  if not text.strip():
    raise DataError(f"{path} contains only whitespace; remove it from the corpus or fill it")
  return text


def split_documents(text: str, document_split: str) -> list[str]:
  """Cuts one file's text into documents.

  Args:
    text: the file's content.
    document_split: "file" (the whole text, verbatim, is one document) or "blank_line"
      (runs of blank lines separate documents; the separating newlines are dropped).

  Returns:
    The non-empty documents, in file order.
  """
  if document_split == "file":
    return [text]
  if document_split == "blank_line":
    return [d for d in _BLANK_LINES.split(text.strip("\n")) if d.strip()]
  raise ValueError(f"document_split must be one of {DOCUMENT_SPLITS}, got {document_split!r}")


def split_fraction(documents: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Splits documents at a character boundary: the first part trains, the rest validates.

  The cut is at character `int(n * (1 - val_fraction))` of the concatenated documents
  (n characters in all), as nanoGPT's `data[:int(n*0.9)]`; a document spanning the cut
  is split in two.

  Args:
    documents: the documents, in order.
    val_fraction: the trailing fraction of the characters that validates, in (0, 1).

  Returns:
    (train documents, validation documents), lists of non-empty strings.
  """
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  cut = int(sum(map(len, documents)) * (1.0 - val_fraction))
  train, val, start = [], [], 0
  for doc in documents:
    head, tail = doc[:max(cut - start, 0)], doc[max(cut - start, 0):]
    train += [head] if head else []
    val += [tail] if tail else []
    start += len(doc)
  return train, val


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
  """Which local files make which split; build with `LocalTextConfig.for_files`."""
  train_files: tuple[str, ...] = ()
  eval_files: tuple[str, ...] = ()
  document_split: str = "file"
  val_fraction: float = 0.0

  @classmethod
  def for_files(cls, train_path, eval_path=None, *, document_split="file",
                val_fraction=0.0) -> LocalTextConfig:
    """Resolves the paths/globs and names the config after the files' fingerprint.

    Args:
      train_path: a path/glob or a sequence of them (see `resolve_files`): the "train" split.
      eval_path: path/glob(s) of the "validation" split, or None.
      document_split: "file" or "blank_line" (see `split_documents`).
      val_fraction: without eval_path, the trailing fraction of the training characters that
        forms "validation" (0: no validation split).

    Returns:
      A config named "<document_split>_<16 hex digits>", a hash of the files' real paths,
      sizes and modification times and of the options.

    Raises:
      ValueError: an unknown document_split, or both eval_path and val_fraction.
      DataError: a path that matches no usable file.
    """
    if document_split not in DOCUMENT_SPLITS:
      raise ValueError(f"document_split must be one of {DOCUMENT_SPLITS}, got {document_split!r}")
    if eval_path is not None and val_fraction:
      raise ValueError("give either eval_path or val_fraction for the validation split, not both")
    train = tuple(resolve_files(train_path))
    evals = tuple(resolve_files(eval_path)) if eval_path is not None else ()
    stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in train + evals]
    key = json.dumps([stats, len(train), document_split, val_fraction])
    name = f"{document_split}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return cls(name=name, train_files=train, eval_files=evals,
               document_split=document_split, val_fraction=val_fraction)


class LocalText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local UTF-8 text files as a tfds dataset of `{"text": Text}` documents, in file order."""

  VERSION = tfds.core.Version("1.0.0")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # No checksums/metadata files sit next to this module, and tfds 4.9.10's lookup of them
    # imports the undeclared `importlib_resources` (tensorflow/datasets#11212).
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly: `dataset_info_from_configs` expects a catalog package directory.
    return tfds.core.DatasetInfo(
        builder=self, description="Local text files: " + ", ".join(self.builder_config.train_files),
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True)  # keep file order: nanoGPT-style splits are positional

  def _split_generators(self, dl_manager):
    config = self.builder_config
    documents = lambda paths: [d for p in paths
                               for d in split_documents(read_text_file(p), config.document_split)]
    train = documents(config.train_files)
    splits = {"train": train}
    if config.eval_files:
      splits["validation"] = documents(config.eval_files)
    elif config.val_fraction:
      splits["train"], splits["validation"] = split_fraction(train, config.val_fraction)
    for name, docs in splits.items():
      if not docs:
        raise DataError(f"split {name!r} of {config.train_files + config.eval_files} is empty; "
                        "lower val_fraction or add text")
    # Said once the files have been read and found good: a refused file is one error line.
    # (self.data_dir is tfds's temporary "incomplete.*" folder while preparing.)
    files = config.train_files + config.eval_files
    log.info("preparing local files %s into %s", ", ".join(files[:3]) + (
        f" (and {len(files) - 3} more)" if len(files) > 3 else ""),
        os.path.join(self.data_dir_root, self.name, config.name, str(self.version)))
    return {name: self._generate_examples(docs) for name, docs in splits.items()}

  # tfds announces "Downloading and preparing dataset ..." and "... downloaded and prepared":
  # nothing is downloaded here, and _split_generators says what is prepared.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _generate_examples(self, documents):
    for i, text in enumerate(documents):
      yield i, {"text": text}


class Documents(collections.abc.Sequence):
  """An indexable sequence of document strings read from a tfds ArrayRecord data source.

  Attributes:
    cache_dir: directory of the prepared tfds data, where derived caches (token streams) go.
    name: "dataset/config/version:split", for messages.
    files: the local files the documents were read from (empty for a tfds catalog dataset).
  """

  def __init__(self, source, *, text_key: str, cache_dir: str, name: str,
               files: Sequence[str] = ()):
    """Wraps a data source; `load_documents` builds it.

    Args:
      source: a random-access source of records (dicts), e.g. a tfds ArrayRecord data source.
      text_key: the record key holding the text (bytes or str).
      cache_dir: sets the `cache_dir` attribute.
      name: sets the `name` attribute.
      files: sets the `files` attribute.
    """
    self._source, self.text_key, self.cache_dir, self.name = source, text_key, cache_dir, name
    self.files = tuple(files)

  def locate(self, text: str, index: int | None = None) -> str:
    """Where `text` (e.g. a character a tokenizer lacks) first occurs, for a message.

    Args:
      text: what to look for.
      index: the document it was found in, if known.

    Returns:
      "FILE line N" for the first of `files` holding it, else the name (and the document).
    """
    for path in self.files:
      try:
        with open(path, encoding="utf-8") as f:
          for number, line in enumerate(f, 1):
            if text in line:
              return f"{path} line {number}"
      except (OSError, UnicodeDecodeError):
        continue
    return self.name + ("" if index is None else f" document {index}")

  def __len__(self) -> int:
    return len(self._source)

  def _text(self, record) -> str:
    if self.text_key not in record:
      raise DataError(f"{self.name} has no feature {self.text_key!r}; its features are "
                      f"{sorted(record)}: set text_key to the one holding the text")
    value = record[self.text_key]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    return self._text(self._source[index])

  def __iter__(self):
    # Chunks of 1024 documents, each one batched ArrayRecord read (one lookup per document is
    # slow on large corpora), read by Grain two chunks ahead in background threads while the
    # caller (e.g. the tokenizer) works on the current one.
    import grain  # on first use: importing grain imports orbax
    n = len(self)
    chunks = grain.MapDataset.range(0, n, _READ_CHUNK).map(
        lambda start: list(map(self._text, self._source.__getitems__(
            list(range(start, min(start + _READ_CHUNK, n)))))))
    for chunk in chunks.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)):
      yield from chunk


def load_documents(*, data_dir: str, split: str = "train", train_path=None, eval_path=None,
                   tfds_name: str | None = None, text_key: str = "text",
                   document_split: str = "file", val_fraction: float = 0.0) -> Documents:
  """Prepares (once) and opens a text corpus split.

  Args:
    data_dir: tfds data directory; prepared datasets (and token caches) live under it.
    split: "train", "validation", or any tfds split string (e.g. "train[:1%]").
    train_path: local path/glob (or a sequence of them) for the "train" split.
    eval_path: local path/glob(s) for the "validation" split.
    tfds_name: a tfds catalog name instead of local files, e.g. "tiny_shakespeare",
      "lm1b", "c4/en"; needs the internet the first time it is prepared.
    text_key: the feature holding the text in catalog datasets.
    document_split: for local files, "file" or "blank_line" (see `split_documents`).
    val_fraction: for local files without eval_path, the trailing fraction of the
      characters that forms "validation" (nanoGPT uses 0.1).

  Returns:
    The split's documents as strings.
  """
  if (train_path is None) == (tfds_name is None):
    raise ValueError("pass exactly one of train_path (local files) or tfds_name (catalog)")
  files = ()
  if train_path is not None:
    config = LocalTextConfig.for_files(train_path, eval_path, document_split=document_split,
                                       val_fraction=val_fraction)
    if split.startswith("validation") and not (config.eval_files or val_fraction):
      raise DataError(f"no validation split for {list(config.train_files)}: "
                      "set eval_path or val_fraction (e.g. 0.1)")
    make = lambda: LocalText(config=config, data_dir=data_dir, file_format="array_record")
    files = (config.eval_files if split.startswith("validation") and config.eval_files
             else config.train_files)
  else:
    make = lambda: tfds.builder(tfds_name, data_dir=data_dir, file_format="array_record")
  builder = prepare_once(make)
  source = builder.as_data_source(split=split)
  name = f"{builder.info.full_name}:{split}"
  return Documents(source, text_key=text_key, cache_dir=os.fspath(builder.data_dir), name=name,
                   files=files)


def prepare_once(make_builder) -> tfds.core.DatasetBuilder:
  """Returns make_builder()'s builder, prepared (in ArrayRecord), preparing it if needed.

  In a multi-process run process 0 prepares while the others wait and then open what it
  wrote (hosts that share a filesystem never write the same files at once; hosts with their
  own disks prepare their own copy).

  Args:
    make_builder: a function of no arguments returning a tfds DatasetBuilder; called again
      after the wait, since a builder made before the data existed has no splits.

  Returns:
    The prepared builder.
  """
  builder = make_builder()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    if jax.process_index() == 0 and not builder.is_prepared():
      _prepare(builder)
    multihost_utils.sync_global_devices(f"fmjax: prepared {builder.name}")
    builder = make_builder()  # a builder made before the data existed has no splits
  if not builder.is_prepared():
    _prepare(builder)
  return builder


def _prepare(builder: tfds.core.DatasetBuilder) -> None:
  """download_and_prepare in ArrayRecord, turning a missing module into advice."""
  try:
    builder.download_and_prepare(file_format="array_record")
  except OSError as e:  # a full disk or an unwritable data_dir: name the folder
    if not (disk_full(e) or isinstance(e, PermissionError)):
      raise  # e.g. a catalog's failed download
    raise write_error(e, builder.data_dir, "prepared dataset") from e
  except DataError:
    # tfds created the dataset folders before our generator found the bad file: remove the
    # empty ones so a refused corpus leaves nothing behind.
    root = os.fspath(builder.data_dir_root)
    for path, _, _ in os.walk(root, topdown=False):
      if path != root and not any(os.scandir(path)):
        os.rmdir(path)
    raise
  except ModuleNotFoundError as e:
    if e.name == "importlib_resources":
      advice = ("`pip install importlib_resources`: tfds 4.9.x needs it on Python >= 3.9 but "
                "does not declare it (tensorflow/datasets#11212)")
    else:
      advice = (f"this catalog builder needs it to generate the data (many, e.g. tiny_shakespeare "
                "and lm1b, use TensorFlow file I/O; c4 uses Apache Beam). Prepare it once where "
                f"that is installed with `tfds build {builder.name} --file_format=array_record "
                "--data_dir=DATA_DIR` and pass that data_dir, or pass the raw text files as "
                "train_path")
    raise ImportError(f"preparing tfds dataset {builder.info.full_name!r} failed: module "
                      f"{e.name!r} is not installed; {advice}") from e
