"""What every program in train/ shares: flags, the workdir, the model config, errors.

A program is `run(config, workdir)` plus `main`; `main` parses --config (an ml_collections
config file with `:variant`, any leaf overridable as --config.a.b=value, unknown keys are
errors) and --workdir, and turns expected failures into one line on stderr and exit code 2.
"""

import dataclasses
import json
import logging
import os
import sys

import tensorflow_datasets as tfds
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from fmjax.trainer import Task, fit  # noqa: F401  (re-exported for the programs)

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file("config", None, "config file, e.g. configs/gpt.py:tiny",
                                          lock_config=True)
flags.DEFINE_string("workdir", None, "directory for checkpoints, logs and the tokenizer")

# Failures a user can fix; anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (ValueError, FileNotFoundError, PermissionError, NotADirectoryError,
                   IsADirectoryError, UnicodeDecodeError, KeyError)


def prepare_workdir(config, workdir: str) -> None:
  """Creates the workdir (refusing an unwritable one) and records the resolved config."""
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, ".write_test")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"workdir {workdir!r} is not writable ({e.strerror}); "
                          "pass a --workdir you can write to") from None
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


def model_config(cls, cfg, tokenizer):
  """Builds the model's frozen dataclass from config.model; vocab_size -1 takes the tokenizer's."""
  fields = dict(cfg)
  unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
  if unknown:
    raise ValueError(f"config.model has keys {sorted(unknown)} that {cls.__name__} does not know")
  if fields.get("vocab_size", -1) == -1:
    fields["vocab_size"] = tokenizer.vocab_size
  elif fields["vocab_size"] < tokenizer.vocab_size:
    raise ValueError(f"config.model.vocab_size={fields['vocab_size']} is smaller than the "
                     f"tokenizer's vocabulary ({tokenizer.vocab_size}); use -1 to take the tokenizer's")
  return cls(**fields)


def report(workdir: str, last: dict) -> None:
  """Tells the user where everything went."""
  keys = ("train/loss", "eval/loss", "eval/accuracy", "tokens_per_second", "mfu")
  summary = ", ".join(f"{k}={last[k]:.4g}" for k in keys if k in last)
  print(f"\nfinal: {summary}\n"
        f"workdir: {os.path.abspath(workdir)}\n"
        f"  metrics:     {os.path.join(workdir, 'metrics.jsonl')} (and loss_curve.png)\n"
        f"  tensorboard: tensorboard --logdir {os.path.join(workdir, 'tensorboard')}\n"
        f"  checkpoints: {os.path.join(workdir, 'checkpoints')}\n"
        f"  tokenizer:   {os.path.join(workdir, 'tokenizer')}")


def main(run, argv) -> None:
  """absl entry point shared by the programs."""
  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.workdir is None or _CONFIG.value is None:
      raise app.UsageError("both --config=FILE:VARIANT and --workdir=DIR are required")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    absl_logging.set_verbosity(absl_logging.ERROR)  # tfds and orbax chatter
    tfds.disable_progress_bar()
    try:
      run(_CONFIG.value, FLAGS.workdir)
    except EXPECTED_ERRORS as e:
      if os.environ.get("FMJAX_DEBUG"):
        raise
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
  app.run(_main, argv)
