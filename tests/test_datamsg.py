"""Data messages (issue 16, item 5, and the checks that need the data): each bad input is
refused with one message naming the file (and line), the value, and the fix, before training.

- the char vocabulary is learned on all the text (train + validation); a character a
  tokenizer still lacks is named with its file, line and `--config.data.tokenizer=byte`;
- `config.sample.prompt` is checked against the tokenizer before training;
- a full disk while writing the token cache, a tokenizer, a prepared dataset or predictions
  says "disk full" and names the file (fmjax.errors.writing);
- a too-small SentencePiece vocab_size is one sentence with the minimum;
- a label outside the classes (an MNIST label byte of 200) is named with its file and index;
- preparing local files is logged as such, not as tfds's "Downloading and preparing".

Mostly in-process; two subprocess runs prove the exit code, the one `error:` line and that
nothing was trained (no checkpoints, no tokenizer saved).
"""

import errno
import gzip
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from fmjax import data, errors
from fmjax.data import images, packing, text, tokenizers

REPO = pathlib.Path(__file__).resolve().parents[1]


def write(path, content: str) -> str:
  pathlib.Path(path).write_text(content, encoding="utf-8")
  return str(path)


def gpt_config(train_path, **data_fields):
  from configs import gpt as gpt_configs
  config = gpt_configs.get_config("tiny")
  config.data.update(train_path=str(train_path), **data_fields)
  return config


def gpt_source(config, workdir):
  d = config.data
  return dict(data_dir=os.path.join(workdir, "data"), train_path=d.train_path,
              eval_path=d.eval_path or None, tfds_name=None, text_key="text",
              val_fraction=0.0 if d.eval_path else d.val_fraction,
              document_split=d.document_split)


# ------------------------------------------------------------------------ char vocabulary


def test_char_vocabulary_is_learned_on_train_and_validation_text(tmp_path):
  """A one-line corpus whose 'Z' and 'Q' sit only in the last 10% (the validation split)."""
  from train import pretrain_gpt
  corpus = write(tmp_path / "one_line.txt", "abc " * 100 + "ZQ")  # 402 characters, no newline
  config = gpt_config(corpus)
  source = gpt_source(config, tmp_path)
  train = data.load_documents(split="train", **source)
  val = data.load_documents(split="validation", **source)
  assert "Z" not in "".join(train) and "Z" in "".join(val)
  tok = pretrain_gpt.build_tokenizer(config, str(tmp_path), train, None, val)
  assert tok.chars == " QZabc"
  stream = pretrain_gpt.token_stream(config, str(tmp_path), tok, "validation", source)
  assert tok.decode(stream) == "".join(val)  # encodes: no unknown character


def test_a_character_the_tokenizer_lacks_names_file_line_and_the_byte_tokenizer(tmp_path):
  """A saved (resumed) char tokenizer meets a file with a new character on its line 3."""
  from train import pretrain_gpt
  corpus = write(tmp_path / "corpus.txt", "one\ntwo\nthr\u00e9e\nfour\n" * 5)
  config = gpt_config(corpus)
  source = gpt_source(config, tmp_path)
  tok = data.CharTokenizer.from_text("onetwhrfu\n")
  with pytest.raises(tokenizers.UnknownCharacter) as library:
    data.load_token_stream(tok, split="train", **source)
  assert library.value.where == f"{os.path.realpath(corpus)} line 3"
  assert library.value.char == "\u00e9" and library.value.vocabulary == 10
  assert str(library.value).startswith(
      f"character '\u00e9' (U+00E9) at {os.path.realpath(corpus)} line 3 is not in this "
      "CharTokenizer's 10-character vocabulary")
  with pytest.raises(ValueError) as program:
    pretrain_gpt.token_stream(config, str(tmp_path), tok, "train", source, resumed=True)
  assert str(program.value) == (
      f"{os.path.realpath(corpus)} line 3: character '\u00e9' (U+00E9) is not in the tokenizer "
      f"saved in {tmp_path}/tokenizer (resuming) (10 characters); rerun in a new --workdir with "
      "--config.data.tokenizer=byte (it encodes any text), or remove the character")
  config.data.tokenizer_path = "/some/tokenizer"
  with pytest.raises(ValueError, match=r"not in the tokenizer of --config.data.tokenizer_path="
                     r"/some/tokenizer \(10 characters\); rerun with --config.data.tokenizer="
                     r"byte --config.data.tokenizer_path='' \(it encodes any text\)"):
    pretrain_gpt.token_stream(config, str(tmp_path), tok, "train", source)
  # Not written: a rerun must not find half a cache.
  assert not [p for p in pathlib.Path(tmp_path, "data").rglob("fmjax_tokens*")]


def test_documents_without_files_are_named_by_split_and_document():
  tok = data.CharTokenizer("ab")
  with pytest.raises(tokenizers.UnknownCharacter, match=r"^character 'c' \(U\+0063\) at "
                     r"document 2 is not in"):
    data.pack_documents(["ab", "ba", "abc"], tok)


# ------------------------------------------------------------------------ the sample prompt


def test_prompt_check_names_the_key_the_characters_and_the_fixes():
  from train import pretrain_gpt
  config = gpt_config("unused")
  lowercase = data.CharTokenizer.from_text("romeo: wherefore art thou\n")
  with pytest.raises(ValueError) as e:
    pretrain_gpt.check_prompt(config, lowercase)
  assert str(e.value) == (
      "--config.sample.prompt='ROMEO:': the char tokenizer cannot encode 'R', 'O', 'M', 'E' "
      "(not in the training text); give another --config.sample.prompt, skip the sample with "
      "--config.sample.num_tokens=0, or use --config.data.tokenizer=byte, which encodes any "
      "text")
  with pytest.raises(ValueError, match=r"--config.data.tokenizer=byte in a new --workdir, "):
    pretrain_gpt.check_prompt(config, lowercase, resumed=True)
  pretrain_gpt.check_prompt(config, data.ByteTokenizer())  # any text
  config.sample.prompt = "romeo:"
  pretrain_gpt.check_prompt(config, lowercase)
  config.sample.prompt, config.sample.num_tokens = "ROMEO:", 0  # no sample: no check
  pretrain_gpt.check_prompt(config, lowercase)
  config.sample.prompt, config.sample.num_tokens = "", 10
  with pytest.raises(ValueError, match=r"^--config.sample.prompt is empty; give another"):
    pretrain_gpt.check_prompt(config, lowercase)


def test_missing_characters_per_kind():
  assert data.CharTokenizer("abc").missing_characters("abxcyx") == ["x", "y"]
  assert data.ByteTokenizer().missing_characters("\u00e9\u20ac") == []
  sp = data.train_sentencepiece(["the cat sat on the mat\n"] * 20, vocab_size=30)
  assert sp.missing_characters("The cat!") == ["T", "!"]  # SentencePiece: UNK, silently


# ------------------------------------------------------------------------ disk full


def enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, "No space left on device")


class FullDisk:
  """A file whose writes fail with ENOSPC after `room` bytes (as a full disk's do)."""

  def __init__(self, path, mode="wb", room=100, **kwargs):
    self.file, self.room = open(path, mode, **kwargs), room  # noqa: SIM115

  def write(self, b):
    n = len(memoryview(b).cast("B")) if not isinstance(b, str) else len(b)
    if n > self.room:
      raise OSError(errno.ENOSPC, "No space left on device")
    self.room -= n
    return self.file.write(b)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.file.close()


def test_token_cache_on_a_full_disk_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setattr(packing, "open", FullDisk, raising=False)
  cache = tmp_path / "fmjax_tokens.train.bin"
  tok = data.CharTokenizer("ab")
  with pytest.raises(errors.WriteError) as e:
    data.pack_documents(["ab" * 1000] * 3, tok, cache_path=str(cache))
  assert str(e.value) == (
      f"cannot write the token cache {cache}: disk full (No space left on device); free space "
      f"on the disk that holds {tmp_path}, or write to another disk")
  assert e.value.errno == errno.ENOSPC and isinstance(e.value, OSError)
  assert list(tmp_path.iterdir()) == []  # no cache, no temporary file
  monkeypatch.undo()
  ids = data.pack_documents(["ab", "b"], tok, cache_path=str(cache))  # the real write
  np.testing.assert_array_equal(ids, [0, 1, 2, 1, 2])
  assert cache.read_bytes() == np.array([0, 1, 2, 1, 2], "<u2").tobytes()


def test_numpys_short_write_reads_as_disk_full(tmp_path):
  error = errors.write_error(OSError("1003855 requested and 223232 written"),
                             tmp_path / "x.bin", "token cache")
  assert str(error).startswith(f"cannot write the token cache {tmp_path}/x.bin: disk full "
                               "(only 223232 of 1003855 bytes were written);")
  assert errors.disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
  other = errors.write_error(PermissionError(errno.EACCES, "Permission denied"), "/ro/t.json",
                             "tokenizer")
  assert str(other) == "cannot write the tokenizer /ro/t.json: Permission denied"


@pytest.mark.parametrize("tok", [data.CharTokenizer("ab"), "sentencepiece"])
def test_saving_a_tokenizer_on_a_full_disk(tok, tmp_path, monkeypatch):
  if tok == "sentencepiece":
    tok = data.train_sentencepiece(["the cat sat on the mat\n"] * 20, vocab_size=30)
    monkeypatch.setattr(pathlib.Path, "write_bytes", enospc)
    culprit = tmp_path / "tok" / "tokenizer.model"
  else:
    monkeypatch.setattr(pathlib.Path, "write_text", enospc)
    culprit = tmp_path / "tok" / "fmjax_tokenizer.json"
  with pytest.raises(errors.WriteError, match=f"^cannot write the tokenizer {culprit}: disk "
                     r"full \(No space left on device\)"):
    tok.save(tmp_path / "tok")
  assert not (tmp_path / "tok" / "fmjax_tokenizer.json").exists()


def test_preparing_a_dataset_on_a_full_disk_names_the_folder(tmp_path, monkeypatch):
  monkeypatch.setattr(text.LocalText, "download_and_prepare", enospc)
  corpus = write(tmp_path / "c.txt", "hello\n")
  with pytest.raises(errors.WriteError, match=f"^cannot write the prepared dataset "
                     f"{tmp_path}/data/local_text/file_[0-9a-f]+/1.0.0: disk full"):
    data.load_documents(data_dir=str(tmp_path / "data"), train_path=corpus)


def test_predictions_on_a_full_disk(tmp_path, monkeypatch):
  import ml_collections
  from train import finetune
  monkeypatch.setattr(finetune, "open", enospc, raising=False)
  config = ml_collections.ConfigDict({"task": "classification"})
  path = tmp_path / "predictions" / "dev.jsonl"
  with pytest.raises(errors.WriteError, match=f"^cannot write the predictions {path}: disk full"):
    finetune.write_predictions(config, str(path), {"logits": np.zeros((1, 2))},
                               [data.glue.Example(("a",), 0, "x:1")], None, None)


# ------------------------------------------------------------------------ SentencePiece vocab_size


def test_too_small_sentencepiece_vocabulary_is_one_sentence_with_the_minimum():
  from train import common
  corpus = ["abcdefghijklmnopqrstuvwxyz 0123456789\n"] * 5  # 37 characters + "\n"
  with pytest.raises(errors.ArgumentError) as e:
    data.train_sentencepiece(corpus, vocab_size=20)
  minimum = int(str(e.value).split("needs at least ")[1].split()[0])
  assert str(e.value) == (
      f"vocab_size=20 is too small for this corpus: SentencePiece needs at least {minimum} "
      "pieces (one per distinct character, plus the reserved and special ones). Raise "
      f"vocab_size to {minimum} or more, or use CharTokenizer / ByteTokenizer.")
  assert common.explain(e.value).startswith("--config.data.vocab_size: vocab_size=20 is too")
  assert minimum == 37 + 4  # the characters, PAD, EOS, UNK and the "\n" piece
  assert data.train_sentencepiece(corpus, vocab_size=minimum).vocab_size == minimum
  with pytest.raises(errors.ArgumentError, match=f"needs at least {minimum} pieces"):
    data.train_sentencepiece(corpus, vocab_size=minimum - 1)


# ------------------------------------------------------------------------ labels


def write_idx(path, array):
  array = np.asarray(array, np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  pathlib.Path(path).write_bytes(gzip.compress(header + array.tobytes()))
  return str(path)


@pytest.fixture
def idx_200(tmp_path):
  """40 grey 8 x 8 images, labels 0..9 repeated, but label byte 200 at index 23."""
  labels = np.arange(40) % 10
  labels[23] = 200
  rng = np.random.default_rng(0)
  return (write_idx(tmp_path / "images.gz", rng.integers(0, 256, (40, 8, 8))),
          write_idx(tmp_path / "labels.gz", labels))


def test_check_labels_names_file_index_and_value():
  labels = np.arange(40) % 10
  labels[23] = 200
  with pytest.raises(data.DataError) as e:
    images.check_labels([("l.gz", labels[:30], 0), ("l.gz", labels[30:], 30)])
  assert str(e.value) == (
      "l.gz: label 200 at index 23 would make 201 classes, but classes 10..199 (190 of them) "
      "never occur in the labels; fix the labels, or give num_classes if those classes are "
      "really absent from these examples")
  assert (e.value.function, e.value.argument) == ("check_labels", "num_classes")
  with pytest.raises(data.DataError, match=r"^l.gz: label 200 at index 23 is not a class id "
                     r"below num_classes=10; fix the labels"):
    images.check_labels([("l.gz", labels[:20], 0), ("l.gz", labels[20:], 20)], num_classes=10)
  assert images.check_labels([("l", labels[:20], 0)]) == 10
  assert images.check_labels([("l", np.array([0, 2]), 0)], num_classes=3) == 3
  with pytest.raises(data.DataError, match=r"^l: label 2 at index 1 would make 3 classes, "
                     r"but class 1 never occurs"):
    images.check_labels([("l", np.array([0, 2]), 0)])


def test_classify_images_refuses_a_label_byte_of_200_before_building_a_model(idx_200, tmp_path):
  from configs import vit as vit_configs
  from train import classify_images, common
  config = vit_configs.get_config("tiny")
  config.data.update(train_images=idx_200[0], train_labels=idx_200[1], train_stop=32,
                     eval_start=32, eval_stop=0)
  config.model.image_size, config.model.patch_size = 8, 4
  with pytest.raises(data.DataError) as e:
    classify_images.run(config, str(tmp_path / "w"))
  assert common.explain(e.value) == (
      f"--config.model.num_classes: {idx_200[1]}: label 200 at index 23 would make 201 "
      "classes, but classes 10..199 (190 of them) never occur in the labels; fix the labels, "
      "or give num_classes if those classes are really absent from these examples")
  config.model.num_classes = 10
  with pytest.raises(data.DataError, match=f"^{idx_200[1]}: label 200 at index 23 is not a "
                     "class id below num_classes=10"):
    classify_images.run(config, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "checkpoints").exists()


# ------------------------------------------------------------------------ tfds: local is local


def test_preparing_local_files_is_logged_as_local_not_as_a_download(tmp_path, caplog, capfd):
  corpus = write(tmp_path / "c.txt", "hello\n")
  with caplog.at_level(logging.INFO, logger="fmjax"):
    docs = data.load_documents(data_dir=str(tmp_path / "data"), train_path=corpus)
    data.load_documents(data_dir=str(tmp_path / "data"), train_path=corpus)  # prepared: silent
  assert list(docs) == ["hello\n"]
  lines = [r.getMessage() for r in caplog.records if r.name == "fmjax"]
  assert lines == [f"preparing local files {os.path.realpath(corpus)} into "
                   f"{docs.cache_dir}"]
  out, err = capfd.readouterr()
  assert "Downloading" not in out + err and "downloaded" not in out + err


def test_preparing_bert_examples_is_not_called_a_download(tmp_path, caplog, capfd):
  docs = [[f"sentence {i} of document {d} ." for i in range(4)] for d in range(3)]
  tok = data.train_sentencepiece([" ".join(doc) for doc in docs], vocab_size=60,
                                 pad_piece="[PAD]", unk_piece="[UNK]",
                                 special_tokens=("[CLS]", "[SEP]", "[MASK]"))
  with caplog.at_level(logging.INFO, logger="fmjax"):
    source = data.prepare_pretraining_dataset(docs, tok, data_dir=tmp_path, max_seq_length=16,
                                              max_predictions_per_seq=2, dupe_factor=1)
  (config_dir,) = (tmp_path / "bert_pretraining_examples").iterdir()
  assert [r.getMessage() for r in caplog.records if r.name == "fmjax"] == [
      f"preparing {len(source)} BERT pretraining examples into {config_dir / '1.1.0'}"]
  out, err = capfd.readouterr()
  assert "Downloading" not in out + err and "downloaded" not in out + err


# ------------------------------------------------------------------------ the program


def program(env, workdir, *overrides):
  cmd = [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
         f"--workdir={workdir}", *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def refused(proc):
  """The one error line of a refused run (other stderr lines are timestamped progress)."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr + proc.stdout
  errors_ = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors_) == 1, proc.stderr
  others = [line for line in proc.stderr.splitlines() if not line.startswith("error: ")]
  assert all(line[:4].isdigit() for line in others), others  # "2026-11-30 12:00:00,000 ..."
  return errors_[0]


@pytest.mark.parametrize("case", ["prompt", "vocab_size"])
def test_the_program_refuses_before_training(case, env, tmp_path):
  """The default prompt "ROMEO:" on a lowercase corpus; a 20-piece SentencePiece vocabulary."""
  corpus = write(tmp_path / "lower.txt", (REPO / "data" / "tiny_shakespeare.txt").read_text(
      encoding="utf-8")[:20_000].lower())
  workdir = tmp_path / "w"
  overrides = {"prompt": [],
               "vocab_size": ["--config.data.tokenizer=sentencepiece",
                              "--config.data.vocab_size=20"]}[case]
  line = refused(program(env, workdir, f"--config.data.train_path={corpus}", *overrides))
  if case == "prompt":
    assert line.startswith("error: --config.sample.prompt='ROMEO:': the char tokenizer cannot "
                           "encode 'R', 'O', 'M', 'E' (not in the training text)")
    assert "--config.sample.num_tokens=0" in line and "--config.data.tokenizer=byte" in line
  else:
    assert line.startswith("error: --config.data.vocab_size: vocab_size=20 is too small for "
                           "this corpus: SentencePiece needs at least ")
  assert not (workdir / "checkpoints").exists() and not (workdir / "tokenizer").exists()
  assert not (workdir / "metrics.jsonl").exists()
