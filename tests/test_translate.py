"""End-to-end proofs of train/translate.py and train/caption.py (their tiny recipes), as
real subprocesses: they learn (loss falls, BLEU rises), write predictions, resume, and
refuse bad input with one error line."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from fmjax.metrics import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def program(env, module, config, workdir, *overrides):
  cmd = [sys.executable, "-m", f"train.{module}", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def check_ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]


def rows(workdir):
  return read_metrics(os.path.join(workdir, "metrics.jsonl"))


def test_translation_learns_decodes_and_resumes(env, tmp_path):
  workdir = tmp_path / "tiny"
  proc = program(env, "translate", "configs/translate.py:tiny", workdir)
  check_ok(proc)
  m = rows(workdir)
  assert m[-1]["train/loss"] < 0.5 * m[0]["train/loss"]
  evals = [r for r in m if "eval/bleu" in r]
  assert [r["step"] for r in evals] == [150, 300]
  assert evals[-1]["eval/bleu"] > evals[0]["eval/bleu"] + 4  # greedy BLEU on the eval pairs
  assert evals[-1]["eval/accuracy"] > 0.6
  results = json.loads((workdir / "eval_results.json").read_text())
  assert results["num_beams"] == 2 and results["eval/bleu"] > 5
  hypotheses = (workdir / "predictions" / "eval.txt").read_text().splitlines()
  assert len(hypotheses) == 64  # one line per eval pair, the last batch's padding dropped
  assert (workdir / "best" / "best.json").exists()

  # Rerunning with more steps resumes from the last checkpoint and continues the metrics.
  proc = program(env, "translate", "configs/translate.py:tiny", workdir,
                 "--config.train.steps=310")
  check_ok(proc)
  assert "resumed from" in proc.stderr and "step 300" in proc.stderr
  steps = [r["step"] for r in rows(workdir)]
  assert steps[:6] == [50, 100, 150, 200, 250, 300] and steps[-1] == 310


def test_bad_parallel_files_are_one_error_line(env, tmp_path):
  de, en = tmp_path / "x.de", tmp_path / "x.en"
  de.write_text("eins\nzwei\n")
  en.write_text("one\n")
  proc = program(env, "translate", "configs/translate.py:tiny", tmp_path / "w",
                 f"--config.data.train_source={de}", f"--config.data.train_target={en}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {de} has 2 lines but {en} has 1: parallel files must be line-aligned (one "
      "sentence and its translation per line)")
  proc = program(env, "translate", "configs/translate.py:tiny", tmp_path / "w",
                 "--config.data.train_source=", "--config.data.train_target=")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "error: no train data: set config.data.train_source and train_target")


def test_separate_vocabularies_give_two_embeddings(tmp_path):
  """config.data.shared_vocab=False: a tokenizer per language (both saved), the model gets
  source_vocab_size from the source one and its own source embedding."""
  import flax.linen as nn
  import jax
  from configs import translate as recipes
  from train import translate
  config = recipes.get_config("tiny")
  config.data.shared_vocab, config.data.vocab_size = False, 40
  pairs = translate.read_split(config, "train")
  source, target = translate.build_tokenizers(config, str(tmp_path), pairs)
  assert source is not target
  assert (tmp_path / "tokenizer").is_dir() and (tmp_path / "source_tokenizer").is_dir()
  c = translate.model_config(config, source, target)
  assert (c.source_vocab_size, c.vocab_size) == (source.vocab_size, target.vocab_size)
  model = translate.seq2seq.Seq2Seq(c)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jax.numpy.ones((1, 4), int),
                                             jax.numpy.ones((1, 4), bool),
                                             jax.numpy.ones((1, 3), int)))["params"]
  shapes = nn.meta.unbox(shapes)
  rows = -(-source.vocab_size // c.vocab_multiple) * c.vocab_multiple  # padded (layers.Embed)
  assert shapes["source_embed"]["embedding"].shape == (rows, c.embed_dim)
  again = translate.build_tokenizers(config, str(tmp_path), pairs)  # resuming: the saved ones
  assert again[0].fingerprint == source.fingerprint and again[1].fingerprint == target.fingerprint


def test_captioning_learns_and_writes_captions(env, tmp_path):
  workdir = tmp_path / "caption"
  proc = program(env, "caption", "configs/caption.py:tiny", workdir)
  check_ok(proc)
  m = rows(workdir)
  assert m[-1]["train/loss"] < 0.4 * m[0]["train/loss"]
  # Next caption token on held-out scenes: "a", "of", the second "a" and EOS follow from
  # the words before them (about half the tokens); above that, it reads the image.
  assert m[-1]["eval/accuracy"] > 0.55
  lines = (workdir / "predictions" / "eval.tsv").read_text().splitlines()
  assert lines[0] == "prediction\treference" and len(lines) == 1 + 256
  assert all(line.split("\t")[0].startswith("a ") for line in lines[1:])
