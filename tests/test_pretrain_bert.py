"""End-to-end proofs of train/pretrain_bert.py (configs/bert.py), as real subprocesses."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMINGS = ("tokens_per_second", "mfu")
BERT_KEYS = {"masked_lm_loss", "masked_lm_accuracy", "next_sentence_loss", "next_sentence_accuracy"}

pytestmark = pytest.mark.slow


def program(env, workdir, *overrides, config="configs/bert.py:tiny"):
  cmd = [sys.executable, "-m", "train.pretrain_bert", f"--config={config}", f"--workdir={workdir}",
         *overrides]
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("bert") / "run"
  proc = program(env, workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_cli_writes_bert_metrics_and_artifacts(tiny_run):
  workdir, proc = tiny_run
  rows = metrics(workdir)
  assert [r["step"] for r in rows] == [5, 10]
  assert {f"train/{k}" for k in BERT_KEYS} <= set(rows[0])
  assert {f"eval/{k}" for k in BERT_KEYS} <= set(rows[-1])
  last = rows[-1]
  # loss = MLM + NSP, both logged: the train loss is their sum (same batch, same params)
  assert abs(last["train/loss"] - last["train/masked_lm_loss"] - last["train/next_sentence_loss"]) < 1e-4
  assert 0.0 <= last["eval/masked_lm_accuracy"] <= 1.0
  assert "eval/masked_lm_accuracy=" in proc.stdout
  assert (workdir / "tokenizer" / "fmjax_tokenizer.json").exists()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10"]
  assert (workdir / "loss_curve.png").exists()


def test_two_phase_recipe_switches_sequence_length(env, tmp_path):
  """phase1_fraction=0.5 of 10 steps: steps 1-5 at 64 tokens, 6-10 at 128 (own instances),
  the second phase resumes from the first's checkpoint; a rerun changes nothing."""
  workdir = tmp_path / "two"
  args = ["--config.data.phase1_fraction=0.5", "--config.data.phase2_max_seq_length=128",
          "--config.data.phase2_max_predictions_per_seq=20", "--config.train.save_every=5"]
  proc = program(env, workdir, *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = metrics(workdir)
  assert [r["step"] for r in rows] == [5, 10]
  assert rows[0]["tokens_per_second"] > 0
  prepared = sorted(p.name for p in (workdir / "data" / "bert_pretraining_examples").iterdir())
  assert len(prepared) == 2  # one instance set per sequence length
  before = (workdir / "metrics.jsonl").read_text()
  again = program(env, workdir, *args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert (workdir / "metrics.jsonl").read_text() == before


def test_resume_equals_uninterrupted(env, tmp_path):
  """Kill after step 5's checkpoint (simulated by deleting step 10's), rerun: identical metrics."""
  full = tmp_path / "full"
  proc = program(env, full, "--config.train.save_every=5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  copy = tmp_path / "copy"
  shutil.copytree(full, copy)
  shutil.rmtree(copy / "checkpoints" / "10")
  proc = program(env, copy, "--config.train.save_every=5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed" in proc.stderr
  strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]
  assert strip(metrics(copy)) == strip(metrics(full))


@pytest.mark.parametrize("content,needle", [
    ("only one document\nwith two sentences\n", "NSP needs"),
    ("", "empty"),
])
def test_bad_corpus_is_one_clear_error(env, tmp_path, content, needle):
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(content)
  proc = program(env, tmp_path / "w", f"--config.data.train_path={corpus}")
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert needle in lines[0] and "corpus.txt" in lines[0], lines[0]
  assert "Traceback" not in proc.stderr


def test_sample_overfits_mlm_and_nsp(env, tmp_path):
  """The acceptance run: a mini BERT memorises the sample text's instances. Evaluated (and
  saved) once, at the end: the intermediate evaluations cost a third of the run's time."""
  proc = program(env, tmp_path / "sample", "--config.train.eval_every=300",
                 "--config.train.save_every=300", config="configs/bert.py:sample")
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = metrics(tmp_path / "sample")[-1]
  assert last["eval/masked_lm_accuracy"] >= 0.95, last
  assert last["eval/next_sentence_accuracy"] >= 0.95, last


def test_prepare_wikitext_converts_articles_to_documents_of_sentences():
  from train import prepare_wikitext
  lines = [" \n", " = Lobster = \n", " \n", " A big @-@ clawed animal . It is 1 @,@ 000 g ! Yes ? \n",
           " = = Habitat = = \n", " Sea . \n", " = Crab = \n", " Small 2 @.@ 5 cm . \n"]
  assert prepare_wikitext.convert(lines) == [
      ["A big-clawed animal .", "It is 1,000 g !", "Yes ?", "Sea ."], ["Small 2.5 cm ."]]


def test_prepare_corpus_groups_table_rows_into_documents_after_wikitext(tmp_path):
  from train import prepare_corpus
  table = tmp_path / "train.tsv"
  table.write_text("sentence\tlabel\nit 's  good \t1\nbad\t0\nfine\t1\n", encoding="utf-8")
  wiki = tmp_path / "wiki.txt"
  wiki.write_text(" = Lobster = \n A big animal . It is blue . \n", encoding="utf-8")
  out = tmp_path / "corpus.txt"
  prepare_corpus.main([str(out), f"--wikitext={wiki}", f"--table={table}:sentence",
                       "--per_document=2"])
  assert out.read_text() == "A big animal .\nIt is blue .\n\nit 's good\nbad\n\nfine\n"
  with pytest.raises(SystemExit) as e:
    prepare_corpus.main([str(out), f"--table={table}"])  # no :COLUMN
  assert e.value.code == 2
