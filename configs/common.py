"""Pieces every run config shares: the train, mesh, sharding and runtime blocks, and model
presets as ConfigDicts.

Each program's config file (gpt.py, ...) starts from `base_config()` and fills in its model
(`config.model`: the architecture, a preset's fields) and data. How the model runs is
`config.runtime` (the fields of fmjax.runtime.Runtime: attention_impl, scan_layers,
remat_policy, dtype, param_dtype, dropout_rate, attention_dropout_rate); changing it keeps
a workdir's checkpoints resumable.
"""

import dataclasses
import typing

import ml_collections
from ml_collections import config_dict

from fmjax.runtime import Runtime


def model_config(preset) -> ml_collections.ConfigDict:
  """A model preset (frozen dataclass) as a ConfigDict: every field overridable from the CLI,
  and a mistyped field is an error.

  A field whose value is None (e.g. GPTConfig.num_kv_heads) becomes a placeholder of its
  annotated type (`int | None` -> int), so --config.model.num_kv_heads=2 can set it; the
  ConfigDict still reads back as None until it is set.
  """
  fields = dataclasses.asdict(preset)
  hints = typing.get_type_hints(type(preset))
  for name, value in fields.items():
    types = [t for t in typing.get_args(hints[name]) if t is not type(None)]
    if value is None and len(types) == 1:
      fields[name] = config_dict.placeholder(types[0])
  return ml_collections.ConfigDict(fields)


def lora_config() -> ml_collections.ConfigDict:
  """config.lora: low-rank adapters on a frozen base (fmjax.lora); rank 0 trains everything.

  e.g. --config.lora.rank=8 --config.lora.alpha=16 --config.lora.targets=query,value
  """
  return ml_collections.ConfigDict({
      "rank": 0,  # 0: full finetuning; r > 0: adapters of rank r, the base frozen
      "alpha": 16.0,  # the adapters' scale is alpha / rank
      "dropout": 0.0,  # on the adapters' inputs while training
      # Comma-separated regular expressions of Dense paths ("query", "attn/out", ...); "":
      # fmjax.lora.DEFAULT_TARGETS, the attention and MLP projections of every layer.
      "targets": "",
  })


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = ""  # a workdir whose latest checkpoint's params start this run
  # Mesh sizes; one may be -1 ("the rest of the devices").
  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  config.sharding = "fsdp"  # a rule set of fmjax/sharding.py: dp | fsdp | fsdp_tp
  # How the model runs (fmjax.runtime.Runtime), e.g. --config.runtime.dtype=bfloat16
  # --config.runtime.attention_impl=chunked --config.runtime.remat_policy=dots.
  config.runtime = ml_collections.ConfigDict(dataclasses.asdict(Runtime()))

  t = config.train = ml_collections.ConfigDict()
  t.steps = 1000  # an explicit number of steps wins over train.epochs (where a recipe has it)
  t.batch_size = 32  # global batch (all hosts)
  t.accum_steps = 1  # gradient accumulation: micro-batches per optimizer step
  t.learning_rate = 1e-3
  t.allow_nonpositive_learning_rate = False  # True: a learning rate <= 0 is not refused
  t.warmup_steps = 100
  t.decay = "cosine"  # cosine | linear | constant
  t.end_factor = 0.1  # final learning rate = end_factor * learning_rate
  t.weight_decay = 0.1
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.grad_clip = 1.0
  t.log_every = 50
  t.eval_every = 500
  t.eval_batches = 20
  t.save_every = 500
  t.keep_checkpoints = 3
  # Resume from this checkpoint step (0: the newest intact one; a damaged one is passed over).
  # The newer steps are kept aside as checkpoints/superseded-N; rerunning with it rewinds again.
  t.restore_step = 0
  t.best_metric = ""  # e.g. "eval/accuracy": keep the best evaluation's params in WORKDIR/best
  t.time_budget_s = 0.0  # >0: stop (and save) after this many seconds of training
  # A step with a NaN/inf loss, gradient or update never changes the state (fmjax/training.py).
  # False: stop with an error naming the step and the last good checkpoint. True: go on,
  # counting such steps as the logged metric skipped_steps (stops after max(log_every, 10)
  # failing in a row).
  t.skip_nonfinite = False
  # Memory plan (fmjax/memory.py), logged before compiling. auto_memory: pick the remat policy
  # and accum_steps that fit memory_budget_gb per device (0: what the device reports; on CPU
  # 80% of the host's free RAM). A plan over budget is refused before compiling (naming what
  # would fit) unless allow_over_budget: for when you know the planner overestimates your run.
  t.auto_memory = False
  t.memory_budget_gb = 0.0
  t.allow_over_budget = False
  return config
