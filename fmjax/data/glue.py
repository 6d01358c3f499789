"""Sentence and sentence-pair tasks (GLUE-style): rows from files or tfds, encoded for BERT.

Shape key: N examples, T max_seq_length.

  local TSV / CSV / JSONL  --read_table-->  [Example(texts, label, where)]
  tfds catalog (glue/sst2) --read_tfds--/         |
                                        encode_examples  ->  {"input_ids", "token_type_ids",
                                                              "input_mask", "label", "weight"} (N, T)

Files differ in the details, so each is a setting: a header row or not, columns by name (or
0-based index without a header), the quoting (GLUE's SST-2 has none: a `"` is text; RTE
quotes fields CSV-style), and labels as written integers, names mapped to ids, or floats.
Every problem is reported with its file and line.

An example is encoded by the tokenizer's batch call (`tokenizer(texts, text_pairs, ...)`),
as transformers and google-research/bert's run_classifier.py do:
  [CLS] A [SEP]            token type 0 ...
  [CLS] A [SEP] B [SEP]    token type 0 for [CLS] A [SEP], 1 for B [SEP]
a pair too long for max_seq_length losing tokens from the end of the longer text first
(fmjax.data.tokenizers.truncate: Hugging Face tokenizers' longest_first).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import gzip
import json
import os
from collections.abc import Sequence

import numpy as np

from fmjax.data.text import DataError
from fmjax.data.tokenizers import Tokenizer
from fmjax.errors import ArgumentError

FORMATS = ("tsv", "csv", "jsonl")
QUOTING = {"none": csv.QUOTE_NONE, "csv": csv.QUOTE_MINIMAL}


@dataclasses.dataclass(frozen=True)
class Example:
  """One row of a sentence or sentence-pair task.

  Attributes:
    texts: one text, or a pair.
    label: the class id (int) or regression score (float); None where the file has no
      labels (prediction only).
    where: "file:line" (or "tfds:name/split[i]"), for messages and prediction files.
  """
  texts: tuple[str, ...]  # one text, or a pair
  label: int | float | None  # None where the file has no labels (prediction only)
  where: str  # "file:line", for messages and prediction files


@dataclasses.dataclass(frozen=True)
class TableFormat:
  """How to read one kind of file.

  Attributes:
    format: "tsv", "csv" or "jsonl"; "" picks it from the file extension.
    header: the first row names the columns (tsv/csv).
    quoting: "none" (every character is text, GLUE SST-2) or "csv" (fields may be wrapped
      in double quotes with doubled inner quotes, GLUE RTE).
    text_columns: the text column(s): names, or 0-based indices as strings when header=False.
    label_column: the label column, "" for unlabelled files.
    label_names: label strings in id order (e.g. ("entailment", "not_entailment")); empty:
      labels are written as ids 0..num_labels-1 (or floats for regression).
    num_labels: number of classes; 1 means regression (float labels).

  Raises:
    ArgumentError: a format or quoting not among the choices (the message lists them).
  """
  text_columns: tuple[str, ...]
  label_column: str = "label"
  format: str = ""
  header: bool = True
  quoting: str = "none"
  label_names: tuple[str, ...] = ()
  num_labels: int = 2

  def __post_init__(self):
    for name, choices in (("format", ("", *FORMATS)), ("quoting", tuple(QUOTING))):
      if getattr(self, name) not in choices:
        raise ArgumentError(f"TableFormat.{name}={getattr(self, name)!r}: choose one of "
                            f"{list(choices)}", function="TableFormat", argument=name)


def expand_paths(pattern: str) -> list[str]:
  """A path or glob -> the sorted list of files; an error naming the pattern when none.

  Args:
    pattern: a file path, or a glob with `*`, `?` or `[`.

  Returns:
    The matching file paths, sorted (just `pattern` when it is not a glob).

  Raises:
    FileNotFoundError: nothing matches, or the path is not a file.
  """
  paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
  missing = [p for p in paths if not os.path.isfile(p)]
  if not paths or missing:
    where = missing[0] if missing else pattern
    raise FileNotFoundError(f"{where}: no such file" + ("" if where == pattern else
                                                        f" (matched by {pattern!r})")
                            + f"; relative paths are taken from {os.getcwd()}")
  return paths


def _format_of(path: str, fmt: str) -> str:
  if fmt:
    return fmt  # one of FORMATS (TableFormat checks)
  base = path[:-3] if path.endswith(".gz") else path
  ext = os.path.splitext(base)[1].lstrip(".").lower()
  ext = {"json": "jsonl", "txt": "tsv"}.get(ext, ext)
  if ext not in FORMATS:
    raise ArgumentError(f"{path}: cannot tell the format from the extension {ext!r}; set "
                        f"TableFormat.format to one of {list(FORMATS)}", function="TableFormat",
                        argument="format")
  return ext


def parse_label(value, fmt: TableFormat, where: str) -> int | float:
  """A written label -> its id (or float score for regression), or a DataError.

  Args:
    value: the label as read (a string from a table, a number from JSON or tfds).
    fmt: the TableFormat: num_labels (1: regression) and label_names.
    where: "file:line", for the error message.

  Returns:
    The class id in [0, num_labels) (a name's index in label_names, or a written id), or the
    float score when num_labels == 1.

  Raises:
    DataError: the label is not a number (regression), not a known name, or out of range.
  """
  text = str(value).strip()
  if fmt.num_labels == 1:
    try:
      return float(text)
    except ValueError:
      raise DataError(f"{where}: label {text!r} is not a number (this is a regression "
                      "task: num_labels=1)") from None
  if fmt.label_names:
    if text in fmt.label_names:
      return fmt.label_names.index(text)
    if text.isdigit() and int(text) < len(fmt.label_names):  # exported with ids already
      return int(text)
    raise DataError(f"{where}: label {text!r} is not one of {list(fmt.label_names)}; fix the "
                    "row or set TableFormat.label_names", function="TableFormat",
                    argument="label_names")
  if text.lstrip("-").isdigit() and 0 <= int(text) < fmt.num_labels:
    return int(text)
  raise DataError(f"{where}: label {text!r} is not in the label set 0..{fmt.num_labels - 1}; "
                  "set TableFormat.num_labels, or TableFormat.label_names for named labels",
                  function="TableFormat", argument="num_labels")


def _check_text(text, column: str, where: str) -> str:
  if not isinstance(text, str):
    raise DataError(f"{where}: column {column!r} holds {type(text).__name__} {text!r}, not text")
  if not text.strip():
    raise DataError(f"{where}: column {column!r} is empty; remove the row or fill it in")
  return text


def read_table(path: str, fmt: TableFormat, *, labelled: bool = True) -> list[Example]:
  """Reads one file (plain or .gz) of examples.

  Args:
    path: the file.
    fmt: its TableFormat.
    labelled: require the label column (False: read labels when present, else None).

  Returns:
    The examples in file order.

  Raises:
    DataError: a problem with the file's contents, naming the file and line.
  """
  kind = _format_of(path, fmt.format)
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rt", encoding="utf-8", newline="") as f:
      if kind == "jsonl":
        return _read_jsonl(f, path, fmt, labelled)
      return _read_delimited(f, path, kind, fmt, labelled)
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _field_naming(column: str, fmt: TableFormat) -> str:
  """"text_columns" or "label_column": the TableFormat field that asked for `column`."""
  return "text_columns" if column in fmt.text_columns else "label_column"


def _read_delimited(f, path, kind, fmt, labelled):
  reader = csv.reader(f, delimiter="\t" if kind == "tsv" else ",", quoting=QUOTING[fmt.quoting])
  rows = iter(reader)
  if fmt.header:
    header = next(rows, None)
    if header is None:
      raise DataError(f"{path}: the file is empty (no header row)")
    names = [h.strip() for h in header]
  else:
    names = None

  def column(name: str) -> int:
    if names is not None:
      if name not in names:
        field = _field_naming(name, fmt)
        raise DataError(f"{path}:1: no column {name!r} in the header {names}; set "
                        f"TableFormat.{field}", function="TableFormat", argument=field)
      return names.index(name)
    if not name.isdigit():
      raise DataError(f"{path}: TableFormat.header is False, so columns are 0-based indices, "
                      f"but {name!r} is not a number", function="TableFormat",
                      argument=_field_naming(name, fmt))
    return int(name)

  text_idx = [column(c) for c in fmt.text_columns]
  has_label = bool(fmt.label_column) and (labelled or names is None or fmt.label_column in names)
  label_idx = column(fmt.label_column) if has_label else None
  width = len(names) if names is not None else None
  examples = []
  for row in rows:
    line = reader.line_num
    where = f"{path}:{line}"
    if not row or row == [""]:
      continue  # a blank line (e.g. at the end of the file)
    if width is not None and len(row) != width:
      raise DataError(f"{where}: {len(row)} fields where the header has {width} "
                      f"({names}); a ragged row, or a quote or tab inside a field (is "
                      f"TableFormat.quoting={fmt.quoting!r} right for this file?)",
                      function="TableFormat", argument="quoting")
    needed = max(text_idx + ([label_idx] if label_idx is not None else []))
    if len(row) <= needed:
      raise DataError(f"{where}: {len(row)} fields, but column {needed} is needed")
    texts = tuple(_check_text(row[i], fmt.text_columns[k], where) for k, i in enumerate(text_idx))
    label = parse_label(row[label_idx], fmt, where) if label_idx is not None else None
    examples.append(Example(texts, label, where))
  return examples


def _read_jsonl(f, path, fmt, labelled):
  examples = []
  for line_number, line in enumerate(f, start=1):
    if not line.strip():
      continue
    where = f"{path}:{line_number}"
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: not a JSON object ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
      raise DataError(f"{where}: a JSON {type(record).__name__}, expected an object per line")
    for name in fmt.text_columns + ((fmt.label_column,) if labelled and fmt.label_column else ()):
      if name not in record:
        field = _field_naming(name, fmt)
        raise DataError(f"{where}: no key {name!r} (keys: {sorted(record)}); set "
                        f"TableFormat.{field}", function="TableFormat", argument=field)
    texts = tuple(_check_text(record[c], c, where) for c in fmt.text_columns)
    label = (parse_label(record[fmt.label_column], fmt, where)
             if fmt.label_column and fmt.label_column in record else None)
    examples.append(Example(texts, label, where))
  return examples


def read_examples(pattern: str, fmt: TableFormat, *, labelled: bool = True) -> list[Example]:
  """Every file matching a path or glob, in sorted order; an error when there are no rows.

  Args:
    pattern: a file path or a glob (see `expand_paths`).
    fmt: the files' TableFormat.
    labelled: require the label column (False: read labels when present, else None).

  Returns:
    The examples of all the files, file by file in sorted order.

  Raises:
    DataError: no examples, or a problem in a file (naming the file and line).
  """
  examples = [e for path in expand_paths(pattern) for e in read_table(path, fmt, labelled=labelled)]
  if not examples:
    raise DataError(f"{pattern}: no examples (only a header or blank lines)")
  return examples


def read_tfds(name: str, split: str, fmt: TableFormat, data_dir: str | None = None) -> list[Example]:
  """A tfds catalog dataset (e.g. "glue/sst2", split "validation") as Examples.

  Its features named by fmt.text_columns / label_column (glue/sst2: "sentence", "label";
  glue/rte: "sentence1", "sentence2", "label"); unlabelled rows (GLUE test, label -1) get
  label None. Needs the prepared dataset (it downloads and prepares on first use online).

  Args:
    name: the tfds name, e.g. "glue/sst2".
    split: the split, e.g. "train", "validation".
    fmt: the TableFormat naming the text and label features, num_labels and label_names.
    data_dir: the tfds data directory; None (or "") for tfds's default.

  Returns:
    The examples in the split's order, `where` being "tfds:name/split[i]".
  """
  import tensorflow_datasets as tfds  # the data machinery, imported only when asked for
  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  examples = []
  for i in range(len(source)):
    record = source[i]
    where = f"tfds:{name}/{split}[{i}]"
    texts = tuple(_check_text(_to_str(record[c]), c, where) for c in fmt.text_columns)
    raw = record.get(fmt.label_column) if fmt.label_column else None
    label = None
    if raw is not None and not (fmt.num_labels > 1 and int(raw) < 0):
      label = float(raw) if fmt.num_labels == 1 else parse_label(int(raw), fmt, where)
    examples.append(Example(texts, label, where))
  return examples


def _to_str(value) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


# Encoding --------------------------------------------------------------------------------------

def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
  """The [CLS] and [SEP] ids, or an error saying the tokenizer lacks them.

  Args:
    tokenizer: the tokenizer.

  Returns:
    (cls_id, sep_id).

  Raises:
    ValueError: the tokenizer has no [CLS] or no [SEP] token (not a BERT tokenizer).
  """
  try:
    return tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  except KeyError:
    raise ValueError("the tokenizer has no [CLS]/[SEP] tokens: finetuning needs a BERT "
                     "tokenizer (the one pretrain_bert saved, or a Hugging Face BERT's)") from None


def encode_examples(examples: Sequence[Example], tokenizer: Tokenizer,
                    max_seq_length: int) -> tuple[dict[str, np.ndarray], int]:
  """Encodes examples as BERT inputs with the tokenizer's batch call, padded to max_seq_length.

  fmjax.data.bucketing cuts batches of them shorter. A text or pair too long loses tokens
  from the end of the longer text first (`truncate`'s "longest_first").

  Args:
    examples: N examples, all with one text or all with a pair.
    tokenizer: a BERT tokenizer (with [CLS] and [SEP]).
    max_seq_length: T, the padded length, special tokens included.

  Returns:
    ({"input_ids", "token_type_ids", "input_mask": (N, T) int32, "label": (N,) int32 or float32
      (0 where unlabelled), "weight": (N,) float32 ones}, number of truncated examples).

  Raises:
    ValueError: the tokenizer has no [CLS]/[SEP] tokens.
  """
  special_ids(tokenizer)  # finetuning wants the BERT template: say so when it is missing
  arity = len(examples[0].texts)
  texts = [e.texts[0] for e in examples]
  pairs = [e.texts[1] for e in examples] if arity > 1 else None
  encoded = tokenizer(texts, pairs, max_length=max_seq_length, padding="max_length",
                      truncation=True)
  full = tokenizer(texts, pairs, padding=False, truncation=False)["input_ids"]
  truncated = sum(len(ids) > max_seq_length for ids in full)
  regression = any(isinstance(e.label, float) for e in examples)
  labels = np.array([0 if e.label is None else e.label for e in examples],
                    np.float32 if regression else np.int32)
  return {"input_ids": encoded["input_ids"], "token_type_ids": encoded["token_type_ids"],
          "input_mask": encoded["attention_mask"], "label": labels,
          "weight": np.ones(len(examples), np.float32)}, truncated
