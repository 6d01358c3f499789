"""End-to-end proofs of train/text_to_image.py and train/sample_images.py (the tiny recipe),
as real subprocesses: both phases learn (tokenizer MSE and generator loss fall), samples are
drawn at each evaluation, a rerun resumes without retraining the tokenizer, sample_images
writes one PNG per prompt in order with grid.png and index.jsonl, CLIP-style reranking keeps
the best candidate, and bad input is one error line. The subprocess runs are marked slow
(about 3 minutes on a busy 2-core CPU, mostly compilation)."""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from fmjax import data as fdata
from fmjax.metrics import read_metrics
from fmjax.models import text_to_image as t2i
from train import checks
from train import sample_images as program
from train import text_to_image as t2i_program

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(env, module, *args):
  return subprocess.run([sys.executable, "-m", f"train.{module}", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)


def check_ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_every_key_of_every_variant_has_a_rule_or_a_reason():
  module = importlib.import_module("configs.text_to_image")

  def leaves(config, prefix=""):
    for key, value in config.items():
      if hasattr(value, "keys"):
        yield from leaves(value, f"{prefix}{key}.")
      else:
        yield prefix + key
  for variant in module.VARIANTS:
    config = module.get_config(variant)
    unruled = set(leaves(config)) - set(checks.RULES) - checks.FREE_FORM
    assert not unruled, f"{variant}: add these keys to train/checks.py RULES: {unruled}"
  config = module.get_config("tiny")
  config.vq_train.steps, config.sample.guidance = 0, -1.0
  with pytest.raises(ValueError, match=r"--config\.vq_train\.steps=0: must be an integer >= 1"
                                       r".*--config\.sample\.guidance=-1\.0"):
    checks.validate(config)


@pytest.fixture(scope="module")
def trained(env, tmp_path_factory):
  """The tiny recipe trained once (tokenizer 40 steps, generator 60), then resumed to 70."""
  workdir = tmp_path_factory.mktemp("t2i") / "tiny"
  first = run(env, "text_to_image", "--config=configs/text_to_image.py:tiny",
              f"--workdir={workdir}")
  check_ok(first)
  rows = read_metrics(workdir / "metrics.jsonl")
  vq_rows = read_metrics(workdir / "tokenizer_vq" / "metrics.jsonl")
  again = run(env, "text_to_image", "--config=configs/text_to_image.py:tiny",
              f"--workdir={workdir}", "--config.train.steps=70")
  return workdir, rows, vq_rows, again


@pytest.mark.slow
def test_tiny_learns_samples_and_resumes(trained):
  workdir, rows, vq_rows, again = trained
  assert [r["step"] for r in vq_rows] == [20, 40]
  assert vq_rows[-1]["train/mse"] < vq_rows[0]["train/mse"]
  assert "eval/psnr" in vq_rows[-1]
  assert [r["step"] for r in rows] == [20, 40, 60]
  assert rows[-1]["train/loss"] < rows[0]["train/loss"] - 0.2
  assert rows[-1]["eval/loss"] < np.log(32)  # below uniform over the 32 codes
  codes = np.load(workdir / "codes_train.npy")
  assert codes.shape == (2 * (1024 - 128), 16) and 0 <= codes.min() and codes.max() < 32  # 2 captions each
  grid = np.asarray(Image.open(workdir / "samples" / "step_000060.png"))
  assert grid.shape == (2 + 2 * 66, 2 + 2 * 66)  # 2 prompts x 2 images, 16 px zoomed to 64
  assert list((workdir / "tensorboard").iterdir())

  # The empty caption encodes to the null caption that caption dropout and guidance use.
  tok = fdata.load_tokenizer(str(workdir / "tokenizer"))
  text, mask = t2i_program.encode_text(tok, [""], 16)
  null_text, null_mask = t2i.null_caption(1, 16, tok.eos_id)
  np.testing.assert_array_equal(text, null_text)
  np.testing.assert_array_equal(mask, null_mask)

  check_ok(again)  # the rerun resumes the generator; the finished tokenizer is not retrained
  assert "resumed from" in again.stderr and "step 60" in again.stderr
  assert [r["step"] for r in read_metrics(workdir / "metrics.jsonl")] == [20, 40, 60, 70]
  assert read_metrics(workdir / "tokenizer_vq" / "metrics.jsonl") == vq_rows


@pytest.mark.slow
def test_sample_images_writes_one_png_per_prompt_in_order(trained, env, tmp_path):
  workdir = trained[0]
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a handwritten three\n\nThe number 8.\nseven\n", encoding="utf-8")
  out = tmp_path / "out"
  proc = run(env, "sample_images", f"--workdir={workdir}", f"--prompts={prompts}",
             f"--out={out}", "--num_candidates=2", "--guidance=2", "--seed=3")
  check_ok(proc)
  index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
  assert index == [{"prompt": p, "file": f"{i:05d}.png", "clip_score": None}
                   for i, p in enumerate(["a handwritten three", "The number 8.", "seven"])]
  images = [np.asarray(Image.open(out / f"{i:05d}.png")) for i in range(3)]
  assert all(x.shape == (16, 16) for x in images)  # grey, the tokenizer's 16 x 16
  assert np.asarray(Image.open(out / "grid.png")).shape == (2 + 66, 2 + 3 * 66)


def test_bad_prompts_file_is_one_error_line(env, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("\n  \n", encoding="utf-8")
  for path, expected in ((tmp_path / "missing.txt", "no such file"),
                         (empty, "holds no prompts")):
    proc = run(env, "sample_images", f"--workdir={tmp_path}", f"--prompts={path}",
               f"--out={tmp_path / 'out'}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --prompts=") and expected in lines[0]


def test_reranking_keeps_the_best_candidate(tmp_path):
  """A stand-in for CLIP (brightness) picks each prompt's brightest candidate; its score is
  written to index.jsonl."""
  candidates = np.zeros((2, 3, 4, 4, 1), np.uint8)
  candidates[0, :, ..., 0] = np.asarray([10, 200, 50])[:, None, None]
  candidates[1, :, ..., 0] = np.asarray([90, 30, 60])[:, None, None]
  scorer = lambda prompt, images: images.mean(axis=(1, 2, 3)) / 255
  rows = program.write_samples(str(tmp_path), ["a", "b"], candidates, scorer)
  assert [r["clip_score"] for r in rows] == pytest.approx([200 / 255, 90 / 255])
  assert np.asarray(Image.open(tmp_path / "00000.png")).max() == 200
  assert np.asarray(Image.open(tmp_path / "00001.png")).max() == 90
  rows = program.write_samples(str(tmp_path / "first"), ["a", "b"], candidates)
  assert [r["clip_score"] for r in rows] == [None, None]
  assert np.asarray(Image.open(tmp_path / "first" / "00000.png")).max() == 10


def test_more_captions_copy_the_training_images_and_keep_the_held_out_ones_plain():
  import ml_collections
  from fmjax.data import captions
  from train import text_to_image as program
  config = ml_collections.ConfigDict({"seed": 0, "data": {"captions_per_image": 3,
                                                          "filler_words": 1.0}})
  images = np.arange(7, dtype=np.uint8).reshape(7, 1, 1, 1)
  labels = np.array([7, 1, 8, 0, 3, 5, 9])
  texts = [f"plain {i}" for i in range(7)]
  more, captions_ = program._more_captions(images, labels, texts, 5, config)
  assert more[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4] * 3 + [5, 6]
  assert captions_[-2:] == ["plain 5", "plain 6"]  # the held-out ones: as they were
  for i in range(5):  # the first copy: the image's own caption, with filler words added
    words = captions_[i].split()
    assert len(words) > 2 and words[0] != "plain" or words.index("plain") < words.index(str(i))
    assert {"plain", str(i)} <= set(words) and set(words) - {"plain", str(i)} <= set(
        captions.FILLER_WORDS)
  for k in (1, 2):  # the others: new phrasings of the image's digit (with filler words)
    for i in range(5):
      words = re.findall(r"[a-z0-9]+", captions_[k * 5 + i].lower())  # "a 1.", "1, ..."
      assert captions.DIGIT_WORDS[labels[i]] in words or str(labels[i]) in words
  assert len(set(captions_[:15])) == 15
