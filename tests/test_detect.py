"""Issue 20: the detection program (train/detect.py) end to end, as subprocesses.

The tiny model learns four generated scenes by heart (AP50 >= 0.8 through COCOeval), writes
a COCO results file with the input JSON's ids and a picture; a rerun from its middle
checkpoint ends where the uninterrupted run ended; --predict_path boxes a folder; 8 devices
(data x fsdp) give the losses of 1; a bad annotation is one error line naming the file and
the annotation id.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def start(env, workdir, *overrides, devices=None):
  cmd = [sys.executable, "-m", "train.detect", "--config=configs/detect.py:tiny",
         f"--workdir={workdir}", *overrides]
  if devices:
    env = {**env, "FMJAX_CPU_DEVICES": str(devices)}
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc):
  stdout, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 0, stderr[-3000:]
  return stdout, stderr


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_tiny_learns_writes_coco_results_and_resumes_exactly(env, tmp_path):
  """Four generated scenes learnt by heart (the tiny model, no augmentation): the whole
  path (matching, loss, boxes back to pixels, COCOeval) must find their objects again."""
  from fmjax.data import coco
  four = coco.write_shapes(str(tmp_path / "set"), 4, seed=0, name="four")
  work = tmp_path / "tiny"
  common = (f"--config.data.train_path={four}", f"--config.data.eval_path={four}",
            "--config.data.flip=False", "--config.data.min_scale=1.0",
            "--config.train.steps=600", "--config.train.batch_size=4",
            "--config.train.learning_rate=1e-3", "--config.train.log_every=100",
            "--config.train.eval_every=300", "--config.train.save_every=300")
  finish(start(env, work, *common))
  rows = metrics(work)
  losses = [r["train/loss"] for r in rows]
  assert losses[-1] < 0.3 * losses[0]  # 5.7 -> 0.92 here
  evals = [r for r in rows if "eval/mAP" in r]
  assert [r["step"] for r in evals] == [300, 600]
  assert evals[-1]["eval/AP50"] >= 0.8 and evals[-1]["eval/mAP"] >= 0.5  # 0.92 and 0.79 here
  truth = json.load(open(four))
  results = json.load(open(work / "predictions" / "eval.json"))
  assert len(results) == 4 * 8  # every eval image's 8 queries
  assert {r["image_id"] for r in results} == {im["id"] for im in truth["images"]}
  assert {r["category_id"] for r in results} <= {c["id"] for c in truth["categories"]}
  assert all(len(r["bbox"]) == 4 and 0 <= r["score"] <= 1 for r in results)
  assert (work / "predictions" / "eval.png").stat().st_size > 0
  final = json.load(open(work / "eval_results.json"))
  assert final["eval/mAP"] == max(r["eval/mAP"] for r in evals)

  # Rewind to step 300 and train again: the same losses and scores at 600 (data and
  # optimizer state restored); the final params box a folder of images.
  _, stderr = finish(start(env, work, *common, "--config.train.restore_step=300",
                           f"--config.data.predict_path={tmp_path / 'set'}"))
  assert "step 400/600" in stderr and "step 600/600" in stderr  # trained 300 -> 600 again
  again = [r for r in metrics(work) if r["step"] == 600]  # the rows after 300 rewritten
  assert again[-1]["train/loss"] == pytest.approx(rows[-1]["train/loss"], rel=1e-6)
  assert again[-1]["eval/mAP"] == pytest.approx(evals[-1]["eval/mAP"], rel=1e-6, abs=1e-9)
  boxed = json.load(open(work / "predictions" / "set.json"))
  assert boxed and {b["file_name"] for b in boxed} <= set(os.listdir(tmp_path / "set"))
  assert {b["category"] for b in boxed} <= set(coco.SHAPES)


@pytest.mark.slow
def test_eight_devices_equal_one(env, tmp_path):
  # One step: its loss is the initial params', the final evaluation the updated params'.
  common = ("--config.train.steps=1", "--config.train.log_every=1",
            "--config.train.eval_every=1", "--config.train.batch_size=16")
  one = start(env, tmp_path / "one", *common)
  eight = finish(start(env, tmp_path / "eight", *common, "--config.mesh.data=2",
                       "--config.mesh.fsdp=4", devices=8))
  finish(one)
  assert "x 8 devices" in eight[1]
  a, b = metrics(tmp_path / "one"), metrics(tmp_path / "eight")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1]
  for ra, rb in zip(a, b):
    for key in ("train/loss", "train/loss_l1", "grad_norm", "eval/mAP", "eval/AP50"):
      assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_bad_annotation_is_one_error_line(env, tmp_path):
  from fmjax.data import coco
  path = coco.write_shapes(str(tmp_path / "set"), 2, seed=0, name="train")
  data = json.load(open(path))
  data["annotations"][0]["bbox"][0] = 500.0
  json.dump(data, open(path, "w"))
  proc = start(env, tmp_path / "w", f"--config.data.train_path={path}",
               f"--config.data.eval_path={path}")
  _, stderr = proc.communicate(timeout=600)
  assert proc.returncode == 2
  lines = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and f"{path}: annotation id 1: bbox [500.0" in lines[0]
