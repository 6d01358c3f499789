"""Issue 16, item 1: one validation pass over the run config before any work (train/checks.py).

Every bad value is refused by `train.checks.validate` (which `common.prepare_workdir` calls
before it creates the workdir) in one line naming the key as it is typed, the value and what
is allowed, where before it was a ZeroDivisionError ten steps in, a 20-line TypeError, an exit
0 that trained nothing, or a missing predict_path reported after the whole training. The
table below runs in-process (milliseconds a case); a few subprocess runs prove the exit code
2, the single `error:` line and the workdir never created.
"""

import importlib
import json
import pathlib
import subprocess
import sys
import types

import pytest
from absl import flags
from ml_collections import config_flags

from fmjax import trainer
from fmjax.models import gpt
from train import checks, common

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULES = {"gpt": "configs.gpt", "bert": "configs.bert", "finetune": "configs.finetune",
           "translate": "configs.translate", "caption": "configs.caption", "vit": "configs.vit",
           "detect": "configs.detect"}


@pytest.fixture(autouse=True)
def in_repo(monkeypatch):
  monkeypatch.chdir(REPO)  # the tiny recipes name their data relative to the repository


def config_of(name: str, **overrides):
  """The tiny recipe of configs/<name>.py with overrides {"train.batch_size": 0, ...}."""
  config = importlib.import_module(MODULES[name]).get_config("tiny")
  for key, value in overrides.items():
    *parents, last = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[last] = value
  return config


def refusal(config) -> str:
  with pytest.raises(ValueError) as e:
    checks.validate(config)
  message = str(e.value)
  assert "\n" not in message
  return message


NUMBERS = "must be an integer >= 1"
DTYPE = "not a floating-point dtype; choose one of ['float32', 'bfloat16', 'float16']"
CASES = [
    # The cases issue 16 reports, then others of the same kinds.
    ("gpt", {"train.keep_checkpoints": 0},
     "--config.train.keep_checkpoints=0: must be an integer >= 1 (0 would keep no checkpoint"),
    ("gpt", {"train.batch_size": 0}, f"--config.train.batch_size=0: {NUMBERS}"),
    ("gpt", {"train.batch_size": -4}, f"--config.train.batch_size=-4: {NUMBERS}"),
    ("gpt", {"data.seq_len": 0}, f"--config.data.seq_len=0: {NUMBERS}"),
    ("gpt", {"data.seq_len": -1}, f"--config.data.seq_len=-1: {NUMBERS}"),
    ("gpt", {"train.log_every": 0}, f"--config.train.log_every=0: {NUMBERS}"),
    ("gpt", {"train.save_every": 0}, f"--config.train.save_every=0: {NUMBERS}"),
    ("gpt", {"train.eval_every": 0}, f"--config.train.eval_every=0: {NUMBERS}"),
    ("gpt", {"train.accum_steps": 0}, f"--config.train.accum_steps=0: {NUMBERS}"),
    ("gpt", {"train.steps": 0}, f"--config.train.steps=0: {NUMBERS}"),
    ("gpt", {"train.steps": -3}, f"--config.train.steps=-3: {NUMBERS}"),
    ("translate", {"train.steps": 0}, f"--config.train.steps=0: {NUMBERS}"),
    ("gpt", {"train.learning_rate": -1e-3},
     "--config.train.learning_rate=-0.001: must be a number > 0 (a negative one climbs the "
     "loss, 0 trains nothing); to run with it anyway pass "
     "--config.train.allow_nonpositive_learning_rate=true"),
    ("vit", {"train.learning_rate": 0.0}, "--config.train.learning_rate=0.0: must be a number > 0"),
    ("gpt", {"runtime.dtype": "bfloat61"}, f"--config.runtime.dtype=bfloat61: {DTYPE}"),
    ("bert", {"runtime.param_dtype": "int8"}, f"--config.runtime.param_dtype=int8: {DTYPE}"),
    ("finetune", {"data.predict_path": "missing.tsv"},
     "--config.data.predict_path=missing.tsv: no file matches this path or glob; check the "
     f"spelling (relative paths are taken from {REPO})"),
    # numbers: every program's keys
    ("gpt", {"train.eval_batches": 0}, f"--config.train.eval_batches=0: {NUMBERS}"),
    ("gpt", {"train.warmup_steps": -1}, "--config.train.warmup_steps=-1: must be an integer >= 0"),
    ("gpt", {"train.b2": 1.0}, "--config.train.b2=1.0: must be a number in [0, 1)"),
    ("gpt", {"train.eps": 0.0}, "--config.train.eps=0.0: must be a number > 0"),
    ("gpt", {"train.end_factor": 2.0}, "--config.train.end_factor=2.0: must be a number in [0, 1]"),
    ("gpt", {"train.weight_decay": -0.1},
     "--config.train.weight_decay=-0.1: must be a number >= 0"),
    ("gpt", {"train.grad_clip": -1.0}, "--config.train.grad_clip=-1.0: must be a number >= 0"),
    ("gpt", {"train.time_budget_s": -5.0},
     "--config.train.time_budget_s=-5.0: must be a number >= 0 (0: no budget)"),
    ("gpt", {"train.memory_budget_gb": -1.0}, "--config.train.memory_budget_gb=-1.0: must be"),
    ("gpt", {"runtime.dropout_rate": 1.0},
     "--config.runtime.dropout_rate=1.0: must be a number in [0, 1)"),
    ("gpt", {"seed": -1}, "--config.seed=-1: must be an integer >= 0"),
    ("gpt", {"mesh.data": 0}, "--config.mesh.data=0: must be an integer >= 1, or -1"),
    ("gpt", {"data.val_fraction": 1.0},
     "--config.data.val_fraction=1.0: must be a number in [0, 1)"),
    ("gpt", {"sample.num_tokens": -1}, "--config.sample.num_tokens=-1: must be an integer >= 0"),
    ("gpt", {"sample.temperature": -0.5},
     "--config.sample.temperature=-0.5: must be a number >= 0"),
    ("gpt", {"sample.top_k": -1}, "--config.sample.top_k=-1: must be an integer >= 0"),
    ("bert", {"data.max_seq_length": 4},
     "--config.data.max_seq_length=4: must be an integer >= 5 (room for [CLS] A [SEP] B [SEP]"),
    ("bert", {"data.masked_lm_prob": 1.5},
     "--config.data.masked_lm_prob=1.5: must be a number in [0, 1]"),
    ("bert", {"data.dupe_factor": 0}, f"--config.data.dupe_factor=0: {NUMBERS}"),
    ("bert", {"data.phase1_fraction": 0.0},
     "--config.data.phase1_fraction=0.0: must be a number in (0, 1]"),
    ("finetune", {"train.steps": -1},
     "--config.train.steps=-1: must be an integer >= 0 (0: train by --config.train.epochs)"),
    ("finetune", {"train.steps": 0},  # the tiny variant's epochs are 0
     "--config.train.steps=0: trains nothing with --config.train.epochs=0: set one of them"),
    ("finetune", {"train.epochs": -1.0}, "--config.train.epochs=-1.0: must be a number >= 0"),
    ("finetune", {"data.group_batches": -1},
     "--config.data.group_batches=-1: must be an integer >= 0 (0: a plain shuffle)"),
    ("finetune", {"data.eval_batch_size": -8}, "--config.data.eval_batch_size=-8: must be"),
    ("finetune", {"data.num_labels": 0}, f"--config.data.num_labels=0: {NUMBERS}"),
    ("finetune", {"data.doc_stride": 0}, f"--config.data.doc_stride=0: {NUMBERS}"),
    ("translate", {"eval.num_beams": 0}, f"--config.eval.num_beams=0: {NUMBERS}"),
    ("translate", {"data.max_length": 1}, "--config.data.max_length=1: must be an integer >= 2"),
    ("translate", {"data.length_multiple": 0}, f"--config.data.length_multiple=0: {NUMBERS}"),
    ("caption", {"data.num_train": 0}, f"--config.data.num_train=0: {NUMBERS}"),
    ("caption", {"vit.patch_size": 0}, f"--config.vit.patch_size=0: {NUMBERS}"),
    ("vit", {"data.crop_padding": -1}, "--config.data.crop_padding=-1: must be an integer >= 0"),
    ("vit", {"train.mixup_alpha": -0.1}, "--config.train.mixup_alpha=-0.1: must be a number >= 0"),
    ("vit", {"train.label_smoothing": 1.0},
     "--config.train.label_smoothing=1.0: must be a number in [0, 1)"),
    ("vit", {"model.num_classes": -2},
     "--config.model.num_classes=-2: must be an integer >= 0, or -1 (-1: the data's"),
    ("gpt", {"model.vocab_size": 0}, "--config.model.vocab_size=0: must be an integer >= 1, or -1"),
    ("gpt", {"model.num_layers": 0}, f"--config.model.num_layers=0: {NUMBERS}"),
    ("gpt", {"model.num_kv_heads": 0},
     "--config.model.num_kv_heads=0: must be an integer >= 1, or None"),
    ("gpt", {"train.batch_size": True}, f"--config.train.batch_size=True: {NUMBERS}"),
    # choices
    ("gpt", {"data.tokenizer": "chars"},
     "--config.data.tokenizer=chars: not one of ['char', 'byte', 'sentencepiece']; choose one"),
    ("gpt", {"train.decay": "cosin"},
     "--config.train.decay=cosin: not one of ['cosine', 'linear', 'constant']"),
    ("gpt", {"sharding": "fsdp2"}, "--config.sharding=fsdp2: not one of ['dp', 'fsdp', 'fsdp_tp']"),
    ("gpt", {"runtime.attention_impl": "flash"},
     "--config.runtime.attention_impl=flash: not one of ['xla', 'chunked', 'cudnn', 'splash'"),
    ("gpt", {"runtime.remat_policy": "all"},
     "--config.runtime.remat_policy=all: not one of ['none', 'full', 'dots', 'dots_no_batch']"),
    ("gpt", {"data.mode": "shuffled"},
     "--config.data.mode=shuffled: not one of ['random', 'sequential']"),
    ("gpt", {"data.document_split": "paragraph"},
     "--config.data.document_split=paragraph: not one of ['file', 'blank_line']"),
    ("finetune", {"task": "ner"},
     "--config.task=ner: not one of ['classification', 'regression', 'qa']"),
    ("finetune", {"data.format": "xml"}, "--config.data.format=xml: not one of ['', 'tsv', 'csv'"),
    ("finetune", {"data.quoting": "all"}, "--config.data.quoting=all: not one of ['none', 'csv']"),
    # the model's own checks, before any data
    ("gpt", {"model.num_heads": 5}, "--config.model.embed_dim=64 is not divisible by num_heads=5"),
    ("gpt", {"model.num_kv_heads": 3}, "--config.model.num_kv_heads=3 does not divide num_heads=4"),
    ("gpt", {"model.position": "rotary"}, "--config.model.position='rotary' is not one of"),
    ("gpt", {"model.position": "rope", "model.num_heads": 64, "model.embed_dim": 64},
     "--config.model: rotary positions rotate pairs of dimensions"),
    ("vit", {"model.patch_size": 5},
     "--config.model.image_size=28 is not a multiple of patch_size=5"),
    ("caption", {"vit.num_heads": 3}, "--config.vit.embed_dim=64 is not divisible by num_heads=3"),
    # settings checked together
    ("gpt", {"train.batch_size": 10, "train.accum_steps": 4},
     "--config.train.batch_size=10 does not split into --config.train.accum_steps=4 micro-batches"),
    ("gpt", {"mesh.data": 1000}, "--config.mesh: the mesh {'data': 1000, 'fsdp': 1, 'tensor': 1} "
     "needs 1000 devices"),
    ("gpt", {"mesh.fsdp": -1}, "--config.mesh: the mesh {'data': -1, 'fsdp': -1, 'tensor': 1}: "
     "at most one size may be -1"),
    ("vit", {"data.train_start": 10, "data.train_stop": 5},
     "--config.data.train_start=10 with --config.data.train_stop=5 selects no examples"),
    ("finetune", {"data.label_names": "neg,neutral,pos"},
     "--config.data.label_names=neg,neutral,pos names 3 labels but --config.data.num_labels=2"),
    ("gpt", {"init_from": "workdirs/nowhere"},
     "--config.init_from=workdirs/nowhere: no such folder"),
    ("finetune", {"init_from": "hf:nowhere"}, "--config.init_from=hf:nowhere: no such folder"),
    # files and folders named in config.data
    ("gpt", {"data.eval_path": "data/missing.txt"},
     "--config.data.eval_path=data/missing.txt: no file matches this path or glob"),
    ("gpt", {"data.train_path": "data/*.nothing"},
     "--config.data.train_path=data/*.nothing: no file matches this path or glob"),
    ("gpt", {"data.tokenizer_path": "missing.model"},
     "--config.data.tokenizer_path=missing.model: no such file"),
    ("bert", {"data.eval_path": "nothing.txt"}, "--config.data.eval_path=nothing.txt: no file"),
    ("finetune", {"data.tokenizer_dir": "data/finetune_tiny/sentiment_train.tsv"},
     "--config.data.tokenizer_dir=data/finetune_tiny/sentiment_train.tsv: is a file, not a folder"),
    ("translate", {"data.train_source": "data/missing.de"},
     "--config.data.train_source=data/missing.de: no such file"),
    ("caption", {"data.train_folder": "nowhere"},
     "--config.data.train_folder=nowhere: no such folder"),
    ("vit", {"data.eval_labels": "data"},
     "--config.data.eval_labels=data: is a folder, not a file"),
]


@pytest.mark.parametrize("name,overrides,expected", CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}"
                              for n, o, _ in CASES])
def test_a_bad_value_is_one_line_naming_the_key(name, overrides, expected):
  assert refusal(config_of(name, **overrides)).startswith(expected)


@pytest.mark.parametrize("name,overrides", [
    *((name, {}) for name in MODULES),  # every tiny recipe as it is
    ("gpt", {"train.learning_rate": 0.0, "train.allow_nonpositive_learning_rate": True}),
    ("gpt", {"train.warmup_steps": 0, "sample.num_tokens": 0, "train.time_budget_s": 0.0}),
    ("gpt", {"train.batch_size": 10, "train.accum_steps": 4, "train.auto_memory": True}),
    ("gpt", {"model.num_kv_heads": 2, "model.position": "rope"}),
    ("gpt", {"data.train_path": "data/*.txt", "data.eval_path": "gs://bucket/eval.txt"}),
    ("finetune", {"train.steps": 0, "train.epochs": 1.0}),  # by epochs
    ("vit", {"model.num_classes": -1, "data.train_stop": 0}),
    ("translate", {"model.source_vocab_size": 0}),
    # init_from brings the architecture: the model's own checks wait for it (classify_images
    # keeps only the run's image_size and num_classes)
    ("vit", {"init_from": "hf:tests/golden/hf/vit", "model.image_size": 32}),
])
def test_good_values_pass(name, overrides):
  checks.validate(config_of(name, **overrides))


def test_every_problem_is_named_on_the_one_line():
  message = refusal(config_of("gpt", **{"train.batch_size": 0, "data.seq_len": -1}))
  assert message == (f"--config.train.batch_size=0: {NUMBERS}; "
                     f"--config.data.seq_len=-1: {NUMBERS}")


def test_a_refused_run_creates_no_workdir(tmp_path):
  workdir = tmp_path / "new" / "workdir"
  with pytest.raises(ValueError, match="keep_checkpoints=0"):
    common.prepare_workdir(config_of("gpt", **{"train.keep_checkpoints": 0}), str(workdir))
  assert not (tmp_path / "new").exists()
  common.prepare_workdir(config_of("gpt"), str(workdir))
  assert workdir.is_dir()


# --- None defaults overridable from the command line ---------------------------------------

def parse(*overrides, config="configs/gpt.py:tiny"):
  """The run config as `python -m train.X --config=... --config.a.b=v` parses it."""
  argv = ["program", f"--config={config}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)  # the overrides it accepts come from argv
  values(argv)
  return values.config


def test_num_kv_heads_is_set_from_the_command_line():
  tokenizer = types.SimpleNamespace(vocab_size=67)
  default = parse()
  assert default.model.num_kv_heads is None
  assert common.model_config(gpt.GPTConfig, default.model, tokenizer).num_kv_heads is None

  config = parse("--config.model.num_kv_heads=2")  # before: "Type NoneType ... not supported"
  assert config.model.num_kv_heads == 2
  checks.validate(config)
  model = common.model_config(gpt.GPTConfig, config.model, tokenizer)
  assert (model.num_kv_heads, model.vocab_size) == (2, 67)
  resolved = trainer.resolved_config(config, trainer.Schedule(steps=20), None, None, model)
  assert json.loads(resolved.to_json_best_effort())["model"]["num_kv_heads"] == 2
  assert json.loads(trainer.resolved_config(default, trainer.Schedule(steps=20), None, None,
                    common.model_config(gpt.GPTConfig, default.model, tokenizer))
                    .to_json_best_effort())["model"]["num_kv_heads"] is None

  with pytest.raises(ValueError, match=r"^--config.model.num_kv_heads=3 does not divide"):
    checks.validate(parse("--config.model.num_kv_heads=3"))


# --- the programs: exit 2, one error line, no workdir ------------------------------------------

@pytest.mark.parametrize("program,config,override,expected", [
    ("pretrain_gpt", "configs/gpt.py:tiny", "--config.train.batch_size=0",
     f"--config.train.batch_size=0: {NUMBERS}"),
    ("pretrain_gpt", "configs/gpt.py:tiny", "--config.runtime.dtype=bfloat61",
     f"--config.runtime.dtype=bfloat61: {DTYPE}"),
    ("finetune", "configs/finetune.py:tiny", "--config.data.predict_path=missing.tsv",
     "--config.data.predict_path=missing.tsv: no file matches this path or glob"),
    ("caption", "configs/caption.py:tiny", "--config.train.keep_checkpoints=0",
     "--config.train.keep_checkpoints=0: must be an integer >= 1"),
])
def test_the_program_exits_2_with_one_line_and_no_workdir(program, config, override, expected,
                                                          env, tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run([sys.executable, "-m", f"train.{program}", f"--config={config}",
                         f"--workdir={workdir}", override], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr + proc.stdout
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: " + expected), proc.stderr
  assert not workdir.exists()


def leaves(config, prefix=""):
  for key in config.keys():
    value = config[key]
    if hasattr(value, "keys"):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key


@pytest.mark.parametrize("name", MODULES)
def test_every_key_of_every_variant_has_a_rule_or_a_reason(name):
  module = importlib.import_module(MODULES[name])
  variants = getattr(module, "VARIANTS", None) or {
      "gpt": ("tiny", "shakespeare_char", "gpt2_small", "gpt2_medium"),
      "bert": ("tiny", "sample", "wikitext", "sst2_text", "base")}[name]
  for variant in variants:
    unruled = set(leaves(module.get_config(variant))) - set(checks.RULES) - checks.FREE_FORM
    assert not unruled, f"{name}:{variant}: add these keys to train/checks.py RULES: {unruled}"
