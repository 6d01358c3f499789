"""Checkpoint integrity: checksums written with every save, checked on every restore.

In this process, with the Checkpointer on a small pytree: the checksums of an asynchronous
save; 4 KB of flipped bytes (and a deleted file) found by name; the fallback to the newest
intact step with its exact values; restore_step; every step damaged; a step saved before
checksums existed. Then once through the GPT program: a damaged step-20 checkpoint, rerun
to step 30, resumes from step 10 and finishes.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # train/ (the flag an ArgumentError maps to)

from fmjax import checkpoint  # noqa: E402
from fmjax.errors import ArgumentError  # noqa: E402
from train import common  # noqa: E402

STEPS = (1, 2, 3)


def state(step):
  """A small train-state-like pytree whose values depend on `step` (128 KB of incompressible
  floats: the largest file of a step is bigger than the 4 KB flipped)."""
  rng = np.random.default_rng(step)
  return {"params": {"w": jnp.asarray(rng.standard_normal((128, 256)), jnp.float32),
                     "b": jnp.full((7,), step, jnp.int32)},
          "step": jnp.asarray(step, jnp.int32)}


def target():
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state(0))


def assert_equal(a, b):
  la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in la] == [p for p, _ in lb]
  for (path, x), (_, y) in zip(la, lb):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)


def files(step_dir):
  """{relative path: bytes} of a step's files, the checksums too."""
  step_dir = pathlib.Path(step_dir)
  return {p.relative_to(step_dir).as_posix(): p.read_bytes()
          for p in sorted(step_dir.rglob("*")) if p.is_file()}


def largest(step_dir):
  """The relative path of a step's largest file (its array data)."""
  return max((name for name in files(step_dir) if name != checkpoint.CHECKSUMS),
             key=lambda name: os.path.getsize(os.path.join(step_dir, name)))


def flip(path, n=4096):
  """Inverts n bytes in the middle of a file (the size stays)."""
  data = bytearray(pathlib.Path(path).read_bytes())
  start = max(0, len(data) // 2 - n // 2)
  for i in range(start, min(len(data), start + n)):
    data[i] ^= 0xFF
  pathlib.Path(path).write_bytes(bytes(data))


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  """A workdir whose checkpoints/ holds steps 1, 2, 3, saved asynchronously; and whether each
  step's checksums were on disk before close (written at the next save)."""
  workdir = tmp_path_factory.mktemp("pristine")
  directory = workdir / "checkpoints"
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1, keep=5)
  early = []
  for step in STEPS:
    assert ckpt.save(step, state(step), {"step": step})
    if step > 1:  # the previous step is finished: its checksums come without a wait or close
      deadline = time.monotonic() + 30
      while not checkpoint.has_checksums(str(directory / str(step - 1))):
        assert time.monotonic() < deadline
        time.sleep(0.01)
      early.append(step - 1)
  ckpt.close()
  return workdir, early


@pytest.fixture
def workdir(pristine, tmp_path):
  shutil.copytree(pristine[0], tmp_path / "run")
  return tmp_path / "run"


def test_every_file_of_an_async_save_gets_its_size_and_crc32(pristine):
  workdir, early = pristine
  assert early == [1, 2]
  for step in STEPS:
    step_dir = workdir / "checkpoints" / str(step)
    contents = files(step_dir)
    record = json.loads(contents.pop(checkpoint.CHECKSUMS))
    assert record["algorithm"] == "crc32"
    assert record["files"] == {name: {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
                               for name, data in contents.items()}
    assert any(name.startswith("state/") for name in record["files"])
    assert any(name.startswith("meta/") for name in record["files"])
    assert checkpoint.verify_step(str(step_dir)) is None
  # orbax reads a step with the checksums file in it
  ckpt = checkpoint.Checkpointer(str(workdir / "checkpoints"), save_every=1)
  restored, meta = ckpt.restore(target(), 3)
  ckpt.close()
  assert_equal(restored, state(3))
  assert meta == {"step": 3}


def test_flipped_bytes_and_a_missing_file_are_found_by_name(workdir):
  directory = workdir / "checkpoints"
  name = largest(directory / "3")
  flip(directory / "3" / name)
  assert checkpoint.verify_step(str(directory / "3")) == f"{name} does not match its checksum"
  assert checkpoint.verify_step(str(directory / "2")) is None
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  with pytest.raises(checkpoint.CheckpointReadError) as e:
    ckpt.restore(target(), 3)
  assert str(e.value) == (f"checkpoint step 3 in {directory} is damaged: {name} does not "
                          "match its checksum. Nothing was changed")
  ckpt.close()
  with pytest.raises(checkpoint.CheckpointReadError,
                     match=f"checkpoint step 3 in {directory} is damaged: {name} does not"):
    checkpoint.restore_params(str(workdir), 3, {"w": target()["params"]["w"]})
  os.remove(directory / "2" / "meta" / "metadata")
  assert checkpoint.verify_step(str(directory / "2")) == "meta/metadata is missing"
  truncated = largest(directory / "1")
  size = os.path.getsize(directory / "1" / truncated)
  os.truncate(directory / "1" / truncated, 100)
  assert checkpoint.verify_step(str(directory / "1")) == (
      f"{truncated} does not match its checksum (100 bytes, {size} when saved)")
  (directory / "1" / checkpoint.CHECKSUMS).write_text('{"files": {"a')
  assert checkpoint.verify_step(str(directory / "1")).startswith(
      f"{checkpoint.CHECKSUMS} cannot be read (JSONDecodeError: ")


def test_a_damaged_latest_step_falls_back_to_the_previous_one_and_is_kept(workdir, caplog):
  directory = workdir / "checkpoints"
  name = largest(directory / "3")
  flip(directory / "3" / name)
  damaged = files(directory / "3")
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  with caplog.at_level(logging.WARNING, logger="fmjax"):
    assert ckpt.restorable_step() == 2
  assert [r.getMessage() for r in caplog.records] == [
      f"checkpoint step 3 in {directory} is damaged: {name} does not match its checksum; "
      f"resuming from step 2, the newest intact one (step 3 will be kept as "
      f"{directory / 'damaged-3'})"]
  restored, meta = ckpt.restore(target(), 2)
  assert_equal(restored, state(2))
  assert meta == {"step": 2}
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]  # nothing moved before training
  ckpt.remove_unfinished()  # the writer, before its first save
  assert sorted(os.listdir(directory)) == ["1", "2", "damaged-3"]
  assert files(directory / "damaged-3") == damaged  # kept as it was
  assert ckpt.latest_step() == 2
  assert ckpt.save(3, state(30), {"step": 3})  # step 3 again, afresh
  ckpt.close()
  caplog.clear()
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  with caplog.at_level(logging.WARNING, logger="fmjax"):
    assert ckpt.restorable_step() == 3  # a rerun: consistent, no warning
  assert_equal(ckpt.restore(target(), 3)[0], state(30))
  ckpt.close()
  assert caplog.records == []
  # damaged again: a second name, the first one kept
  flip(directory / "3" / largest(directory / "3"))
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  assert ckpt.restorable_step() == 2
  ckpt.remove_unfinished()
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2", "damaged-3", "damaged-3+"]


def test_readers_take_the_newest_intact_step_and_refuse_a_damaged_one(workdir, caplog):
  directory = workdir / "checkpoints"
  name = largest(directory / "3")
  flip(directory / "3" / name)
  with caplog.at_level(logging.WARNING, logger="fmjax"):
    params = checkpoint.load_params(str(workdir))
  assert_equal(params, state(2)["params"])
  assert caplog.records[0].getMessage() == (
      f"checkpoint step 3 in {directory} is damaged: {name} does not match its checksum; "
      "reading step 2, the newest intact one")
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]  # a reader moves nothing


def test_restore_step_chooses_a_step_and_keeps_the_newer_ones(workdir, caplog):
  directory = workdir / "checkpoints"
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  with caplog.at_level(logging.WARNING, logger="fmjax"):
    assert ckpt.restorable_step(1) == 1
  assert [r.getMessage() for r in caplog.records] == [
      f"resuming from step 1 as asked: the newer steps [2, 3] will be kept as "
      f"{directory / 'superseded-2'}, {directory / 'superseded-3'}"]
  assert_equal(ckpt.restore(target(), 1)[0], state(1))
  ckpt.remove_unfinished()
  assert sorted(os.listdir(directory)) == ["1", "superseded-2", "superseded-3"]
  assert ckpt.restorable_step() == 1
  for bad in (7, -1):
    with pytest.raises(ArgumentError) as e:
      ckpt.restorable_step(bad)
    assert common.explain(e.value) == (
        f"--config.train.restore_step: step={bad}: {directory} holds no checkpoint step {bad} "
        "(its steps: [1]); pass one of them, or 0 for the newest intact one")
  ckpt.close()
  name = largest(directory / "1")
  flip(directory / "1" / name)
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  with pytest.raises(ArgumentError) as e:
    ckpt.restorable_step(1)
  ckpt.close()
  assert common.explain(e.value) == (
      f"--config.train.restore_step: step=1: checkpoint step 1 in {directory} is damaged: "
      f"{name} does not match its checksum; pass another of its steps [1], or 0 for the "
      "newest intact one")


def test_every_step_damaged_is_one_error_naming_them_and_nothing_moves(workdir):
  directory = workdir / "checkpoints"
  names = {}
  for step in STEPS:
    names[step] = largest(directory / str(step))
    flip(directory / str(step) / names[step])
  before = {step: files(directory / str(step)) for step in STEPS}
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  with pytest.raises(checkpoint.CheckpointReadError) as e:
    ckpt.restorable_step()
  ckpt.remove_unfinished()  # had it got this far: nothing set aside
  ckpt.close()
  assert str(e.value) == (
      f"no intact checkpoint in {directory}: steps 3, 2, 1 are damaged (step 3: {names[3]} "
      f"does not match its checksum; step 2: {names[2]} does not match its checksum; step 1: "
      f"{names[1]} does not match its checksum). Nothing was changed; use a new workdir, or "
      f"move {directory} aside to start afresh")
  assert {step: files(directory / str(step)) for step in STEPS} == before
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_a_step_saved_before_checksums_restores_unverified_with_a_note(workdir, caplog):
  directory = workdir / "checkpoints"
  for step in STEPS:
    os.remove(directory / str(step) / checkpoint.CHECKSUMS)
  assert checkpoint.verify_step(str(directory / "3")) is None
  assert not checkpoint.has_checksums(str(directory / "3"))
  ckpt = checkpoint.Checkpointer(str(directory), save_every=1)
  with caplog.at_level(logging.WARNING, logger="fmjax"):
    assert ckpt.restorable_step() == 3
  assert [r.getMessage() for r in caplog.records] == [
      f"checkpoint step 3 in {directory} has no checksums (saved by an earlier fmjax): not "
      "verified"]
  assert_equal(ckpt.restore(target(), 3)[0], state(3))
  ckpt.remove_unfinished()
  ckpt.close()
  assert sorted(os.listdir(directory)) == ["1", "2", "3"]


# ------------------------------------------------------------------------------ the GPT program


def test_the_program_resumes_from_the_last_intact_checkpoint(env, tmp_path):
  """Bytes flipped in step 20's largest file: the same command again warns naming step 20 and
  the file, resumes from step 10 and finishes as the first run did (rows and params), the
  damaged step kept as damaged-20. (The rerun's schedule is the first's, so it reuses its
  compiled steps and the results can be compared.)"""
  workdir = tmp_path / "run"
  directory = workdir / "checkpoints"

  def run():
    return subprocess.run(
        [sys.executable, "-m", "train.pretrain_gpt", "--config=configs/gpt.py:tiny",
         f"--workdir={workdir}", "--config.train.steps=20", "--config.train.save_every=10",
         "--config.sample.num_tokens=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

  def rows():
    return [{k: v for k, v in json.loads(line).items() if k == "step" or "/" in k}
            for line in open(workdir / "metrics.jsonl")]

  first = run()
  assert first.returncode == 0, first.stderr[-3000:]
  assert sorted(os.listdir(directory)) == ["10", "20"]
  assert all(checkpoint.has_checksums(str(directory / s)) for s in ("10", "20"))
  trained = rows()
  shutil.copytree(directory / "20", tmp_path / "original" / "checkpoints" / "20")
  name = largest(directory / "20")
  flip(directory / "20" / name)
  damaged = files(directory / "20")
  second = run()
  assert second.returncode == 0, second.stderr[-3000:]
  assert (f"checkpoint step 20 in {directory} is damaged: {name} does not match its "
          f"checksum; resuming from step 10, the newest intact one (step 20 will be kept as "
          f"{directory / 'damaged-20'})") in second.stderr
  assert f"resumed from {directory} step 10" in second.stderr
  assert sorted(os.listdir(directory)) == ["10", "20", "damaged-20"]
  assert files(directory / "damaged-20") == damaged
  assert all(checkpoint.verify_step(str(directory / s)) is None
             and checkpoint.has_checksums(str(directory / s)) for s in ("10", "20"))
  assert [r["step"] for r in trained] == [5, 10, 15, 20]
  assert rows() == trained
  assert_equal(checkpoint.load_params(str(workdir)),
               checkpoint.load_params(str(tmp_path / "original")))
