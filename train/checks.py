"""One validation pass over a run config, before any work (data, tokenizer, compile) starts.

Every program in train/ calls `validate` first (train/common.prepare_workdir does, before it
creates the workdir), so a config that cannot work is refused in one line naming the key as
the user types it, its value and what to do:

  --config.train.batch_size=0: must be an integer >= 1
  --config.runtime.dtype=bfloat61: not a floating-point dtype; choose one of ['float32', ...]

instead of a ZeroDivisionError ten steps in, a 20-line traceback, or an exit 0 that trained
nothing. Three passes, each only once the one before found nothing:
  RULES       each key of any program's run config -> its type and range, its choices, or
              the file, folder or glob it names; train.steps (0 only to train by epochs) and
              train.learning_rate (> 0 unless allowed) look at one other key. A key the
              config does not have is skipped, so one table serves all six programs.
  DEPENDENT   settings checked together: batch_size against accum_steps, the mesh against
              the devices, index ranges, label names against num_labels, init_from.
  MODELS      config.model (and caption's config.vit) built into its model dataclass, sizes
              taken from the data (-1) stood in for, so the model's own checks (heads that
              divide the width, patches that tile the image, ...) run now, not after the data
              (not with init_from: the source brings its architecture).
What needs the data (a prompt's characters against the tokenizer, labels against
num_labels) is checked where the data is read.
"""

import dataclasses
import glob
import importlib
import math
import os
import re
from typing import Any, Callable

import jax.numpy as jnp

from fmjax import attention, sharding
from fmjax.models import bert, gpt, seq2seq, vit
from fmjax.transformer import REMAT_POLICIES


def validate(config) -> None:
  """Checks a run config (an ml_collections.ConfigDict of configs/*.py) before any work.

  Args:
    config: the run config of any program in train/.

  Raises:
    ValueError: one line naming every bad key as `--config.a.b=value: what is wrong`,
      separated by "; ".
  """
  problems = [p for key, rule in RULES.items() if (p := _check(config, key, rule))]
  for checks in (DEPENDENT, MODELS):
    if problems:
      break
    problems = [p for check in checks if (p := check(config))]
  if problems:
    raise ValueError("; ".join(problems))


def flag(key: str, value) -> str:
  """`--config.key=value`, the value as it is typed on the command line."""
  shown = "''" if value == "" else value
  return f"--config.{key}={shown}"


# Rules: value (and the config, for a rule that depends on another key) -> what is wrong, or None

@dataclasses.dataclass(frozen=True)
class Int:
  """An integer (not a bool) >= low (and <= high), or one of `also` (e.g. -1: from the data)."""
  low: int | None = None
  high: int | None = None
  also: tuple = ()
  note: str = ""

  def __call__(self, value, config=None) -> str | None:
    if value in self.also and not isinstance(value, bool):
      return None
    ok = isinstance(value, int) and not isinstance(value, bool) and \
        (self.low is None or value >= self.low) and (self.high is None or value <= self.high)
    if ok:
      return None
    bounds = [f">= {self.low}"] if self.low is not None else []
    bounds += [f"<= {self.high}"] if self.high is not None else []
    return (" ".join(["must be an integer", " and ".join(bounds)]).rstrip()
            + "".join(f", or {a}" for a in self.also) + _note(self.note))


@dataclasses.dataclass(frozen=True)
class Float:
  """A finite number in the interval low..high, each end open or closed (None: unbounded)."""
  low: float | None = None
  high: float | None = None
  open_low: bool = False
  open_high: bool = False
  note: str = ""

  def __call__(self, value, config=None) -> str | None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and math.isfinite(value) and \
        (self.low is None or (value > self.low if self.open_low else value >= self.low)) and \
        (self.high is None or (value < self.high if self.open_high else value <= self.high)):
      return None
    if self.low is None:
      return "must be a finite number" + _note(self.note)
    if self.high is None:
      where = f"{'>' if self.open_low else '>='} {self.low:g}"
    else:
      where = (f"in {'(' if self.open_low else '['}{self.low:g}, {self.high:g}"
               f"{')' if self.open_high else ']'}")
    return f"must be a number {where}" + _note(self.note)


@dataclasses.dataclass(frozen=True)
class Bool:
  """True or False."""

  def __call__(self, value, config=None) -> str | None:
    return None if isinstance(value, bool) else "must be true or false"


@dataclasses.dataclass(frozen=True)
class Choice:
  """One of `choices`: a tuple, or a function giving it (for modules imported only when used)."""
  choices: tuple | Callable[[], Any]

  def __call__(self, value, config=None) -> str | None:
    choices = list(self.choices() if callable(self.choices) else self.choices)
    return None if value in choices else f"not one of {choices}; choose one of them"


@dataclasses.dataclass(frozen=True)
class DType:
  """A floating-point dtype name, as fmjax.runtime.Runtime takes it."""

  def __call__(self, value, config=None) -> str | None:
    try:
      if isinstance(value, str) and jnp.issubdtype(jnp.dtype(value), jnp.floating):
        return None
    except TypeError:
      pass
    return "not a floating-point dtype; choose one of ['float32', 'bfloat16', 'float16']"


@dataclasses.dataclass(frozen=True)
class Path:
  """A local file, folder, or (glob=True) a path or glob matching at least one file; '' (unset)
  and remote paths (gs://...) pass."""
  kind: str = "file"  # "file" | "dir" | "any"
  glob: bool = False

  def __call__(self, value, config=None) -> str | None:
    if not isinstance(value, str):
      return "must be a path (a string)"
    if not value or "://" in value:
      return None
    path = os.path.expanduser(value)
    where = f"check the spelling (relative paths are taken from {os.getcwd()})"
    if self.glob:
      return None if glob.glob(path, recursive=True) else \
          f"no file matches this path or glob; {where}"
    if not os.path.exists(path):
      return f"no such {'folder' if self.kind == 'dir' else 'file'}; {where}"
    if self.kind == "dir" and not os.path.isdir(path):
      return "is a file, not a folder"
    if self.kind == "file" and os.path.isdir(path):
      return "is a folder, not a file"
    return None


@dataclasses.dataclass(frozen=True)
class Steps:
  """train.steps: >= 1, or 0 where the config trains by train.epochs (> 0) instead."""

  def __call__(self, value, config=None) -> str | None:
    if "epochs" not in config.train:
      return Int(1)(value)
    problem = Int(0)(value)
    if problem:
      return problem + " (0: train by --config.train.epochs)"
    if value == 0 and config.train.epochs == 0:
      return ("trains nothing with --config.train.epochs=0: set one of them (steps wins when "
              "both are set)")
    return None


@dataclasses.dataclass(frozen=True)
class LearningRate:
  """train.learning_rate: > 0, unless train.allow_nonpositive_learning_rate (e.g. 0 to
  evaluate loaded weights without changing them)."""

  def __call__(self, value, config=None) -> str | None:
    if config.train.get("allow_nonpositive_learning_rate", False):
      return Float()(value)
    if Float(0, open_low=True)(value) is None:
      return None
    return ("must be a number > 0 (a negative one climbs the loss, 0 trains nothing); to run "
            "with it anyway pass --config.train.allow_nonpositive_learning_rate=true")


def _note(note: str) -> str:
  return f" ({note})" if note else ""


def _lazy(module: str, name: str) -> Callable[[], Any]:
  return lambda: getattr(importlib.import_module(module), name)


POSITIVE = Int(1)
COUNT = Int(0)  # 0 allowed: "none" or "all" as the key's comment says
FRACTION = Float(0, 1, open_high=True)  # [0, 1)
PROBABILITY = Float(0, 1)
NONNEGATIVE = Float(0)
SEQUENCE = Int(5, note="room for [CLS] A [SEP] B [SEP] and some text")

# The keys of every program's run config (configs/*.py), as typed after --config.
RULES: dict[str, Callable] = {
    "seed": Int(0, 2**32 - 1),
    "task": Choice(_lazy("train.finetune", "TASKS")),
    "mesh.data": Int(1, also=(-1,), note="-1: the devices the other axes leave"),
    "mesh.fsdp": Int(1, also=(-1,), note="-1: the devices the other axes leave"),
    "mesh.tensor": Int(1, also=(-1,), note="-1: the devices the other axes leave"),
    "sharding": Choice(tuple(sharding.RULES)),
    # runtime: how the model runs (fmjax.runtime.Runtime)
    "runtime.attention_impl": Choice(attention.IMPLEMENTATIONS),
    "runtime.scan_layers": Bool(),
    "runtime.remat_policy": Choice(tuple(REMAT_POLICIES)),
    "runtime.dtype": DType(),
    "runtime.param_dtype": DType(),
    "runtime.dropout_rate": FRACTION,
    "runtime.attention_dropout_rate": FRACTION,
    # train: the loop and the optimizer
    "train.steps": Steps(),
    "train.epochs": NONNEGATIVE,
    "train.batch_size": POSITIVE,
    "train.accum_steps": POSITIVE,
    "train.learning_rate": LearningRate(),
    "train.allow_nonpositive_learning_rate": Bool(),
    "train.warmup_steps": COUNT,
    "train.warmup_fraction": FRACTION,
    "train.decay": Choice(("cosine", "linear", "constant")),
    "train.end_factor": PROBABILITY,
    "train.weight_decay": NONNEGATIVE,
    "train.b1": FRACTION,
    "train.b2": FRACTION,
    "train.eps": Float(0, open_low=True),
    "train.grad_clip": Float(0, note="0: no clipping"),
    "train.log_every": POSITIVE,
    "train.eval_every": POSITIVE,
    "train.eval_batches": POSITIVE,
    "train.save_every": POSITIVE,
    "train.keep_checkpoints": Int(1, note="0 would keep no checkpoint: a rerun starts over"),
    "train.restore_step": Int(0, note="0: the newest intact checkpoint"),
    "train.time_budget_s": Float(0, note="0: no budget"),
    "train.skip_nonfinite": Bool(),
    "train.auto_memory": Bool(),
    "train.memory_budget_gb": Float(0, note="0: what the device reports"),
    "train.allow_over_budget": Bool(),
    "train.label_smoothing": FRACTION,
    "train.mixup_alpha": Float(0, note="0: no mixup"),
    # data: pretrain_gpt
    "data.train_path": Path(glob=True),
    "data.eval_path": Path(glob=True),
    "data.predict_path": Path(glob=True),
    "data.val_fraction": FRACTION,
    "data.document_split": Choice(_lazy("fmjax.data.text", "DOCUMENT_SPLITS")),
    "data.tokenizer": Choice(("char", "byte", "sentencepiece")),
    "data.vocab_size": POSITIVE,
    "data.tokenizer_path": Path("any"),
    "data.seq_len": POSITIVE,
    "data.mode": Choice(_lazy("fmjax.data.batches", "MODES")),
    # data: pretrain_bert
    "data.eval_fraction": FRACTION,
    "data.lowercase": Bool(),
    "data.max_seq_length": SEQUENCE,
    "data.max_predictions_per_seq": POSITIVE,
    "data.masked_lm_prob": PROBABILITY,
    "data.short_seq_prob": PROBABILITY,
    "data.dupe_factor": POSITIVE,
    "data.whole_word_mask": Bool(),
    "data.dynamic_masking": Bool(),
    "data.phase1_fraction": Float(0, 1, open_low=True),
    "data.phase2_max_seq_length": SEQUENCE,
    "data.phase2_max_predictions_per_seq": POSITIVE,
    # data: finetune
    "data.max_train_examples": Int(0, note="0: all"),
    "data.format": Choice(lambda: ("", *importlib.import_module("fmjax.data.glue").FORMATS)),
    "data.header": Bool(),
    "data.quoting": Choice(_lazy("fmjax.data.glue", "QUOTING")),
    "data.num_labels": POSITIVE,
    "data.bucket": Bool(),
    "data.min_bucket_length": POSITIVE,
    "data.group_batches": Int(0, note="0: a plain shuffle"),
    "data.eval_batch_size": Int(0, note="0: train.batch_size"),
    "data.doc_stride": POSITIVE,
    "data.max_query_length": POSITIVE,
    "data.n_best_size": POSITIVE,
    "data.max_answer_length": POSITIVE,
    "data.tokenizer_dir": Path("dir"),
    # data: translate
    "data.train_source": Path(), "data.train_target": Path(),
    "data.eval_source": Path(), "data.eval_target": Path(),
    "data.test_source": Path(), "data.test_target": Path(),
    "data.max_length": Int(2, note="a token and the EOS"),
    "data.length_multiple": POSITIVE,
    "data.shared_vocab": Bool(),
    "eval.num_beams": POSITIVE,
    "eval.final_num_beams": POSITIVE,
    "eval.length_penalty": Float(),
    "eval.max_examples": Int(0, note="0: every eval pair"),
    "eval.batch_size": POSITIVE,
    # data: caption
    "data.train_folder": Path("dir"),
    "data.eval_folder": Path("dir"),
    "data.num_train": POSITIVE,
    "data.num_eval": POSITIVE,
    # data: classify_images
    "data.train_images": Path(), "data.train_labels": Path(),
    "data.eval_images": Path(), "data.eval_labels": Path(),
    "data.train_dir": Path("dir"), "data.eval_dir": Path("dir"),
    "data.manual_dir": Path("dir"),
    "data.train_start": COUNT, "data.train_stop": Int(0, note="0: to the end"),
    "data.eval_start": COUNT, "data.eval_stop": Int(0, note="0: to the end"),
    "data.in_memory": Bool(),
    "data.crop_padding": Int(0, note="0: no crop"),
    "data.flip": Bool(),
    # data: sft
    "data.prompt_format": Choice(_lazy("fmjax.data.sft", "FORMATS")),
    "data.packing": Bool(),
    # data and loss: detect
    "data.image_dir": Path("dir"),
    "data.shapes_train": POSITIVE, "data.shapes_eval": POSITIVE,
    "data.max_boxes": POSITIVE,
    "data.min_scale": Float(0, 1, open_low=True, note="1: no scale jitter"),
    **{f"loss.{k}": NONNEGATIVE for k in ("class_weight", "l1_weight", "giou_weight",
                                          "no_object_weight")},
    # clip (train/clip.py): the data kind, the joint space (config.model), the text tower
    # (config.text; config.vit is caption's block)
    "data.kind": Choice(("digits", "shapes", "folder")),  # where image-caption pairs come from
    "model.init_temperature": Float(0.01, note="the logit scale 1 / temperature is at most 100"),
    **{f"text.{k}": rule for k, rule in {
        "vocab_size": Int(1, also=(-1,), note="-1: the tokenizer's"),
        **{k: POSITIVE for k in ("vocab_multiple", "max_length", "num_layers", "num_heads",
                                 "embed_dim", "mlp_dim")},
        "causal": Bool(), "pool": Choice(_lazy("fmjax.models.clip", "POOLS"))}.items()},
    # sample: pretrain_gpt's sample at the end; sft's answers at each evaluation
    "sample.num_prompts": Int(0, note="0: none"),
    "sample.num_tokens": Int(0, note="0: no sample"),
    "sample.temperature": Float(0, note="0: greedy"),
    "sample.top_k": Int(0, note="0: every token"),
    # model (and caption's vit): the sizes; choices and sizes that must agree are the model
    # dataclass's own checks (MODELS below)
    **{f"{block}.{key}": rule for block in ("model", "vit") for key, rule in {
        "vocab_size": Int(1, also=(-1,), note="-1: the tokenizer's"),
        "source_vocab_size": Int(0, also=(-1,), note="-1: the source tokenizer's, 0: shared"),
        "num_classes": Int(0, also=(-1,), note="-1: the data's, 0: no head"),
        "num_kv_heads": Int(1, also=(None,), note="None: one per query head"),
        "vocab_multiple": POSITIVE,
        "norm_eps": Float(0, open_low=True),
        **{k: POSITIVE for k in ("max_len", "type_vocab_size", "num_layers", "num_heads",
                                 "embed_dim", "mlp_dim", "decoder_layers", "image_size",
                                 "patch_size", "num_channels", "backbone_layers",
                                 "num_queries")},
        "encoder_layers": Int(0),
        **{k: Bool() for k in ("gated_mlp", "use_bias", "tie_embeddings", "pre_ln")},
    }.items()},
    # text_to_image: the image tokenizer (config.vq), its phase's train keys, the samples
    "tokenizer_from": Path("dir"),
    **{f"vq.{k}": POSITIVE for k in ("image_size", "channels", "res_blocks", "groups",
                                     "codebook_size", "code_dim", "kmeans_iters")},
    "vq.widths": lambda value, config=None: None if isinstance(value, (tuple, list)) and value \
        and all(Int(1)(w) is None for w in value) else "must be a list of positive integers",
    "vq.commitment": NONNEGATIVE,
    "vq.ema_decay": FRACTION,
    "vq.epsilon": Float(0, open_low=True),
    "vq.restart_below": NONNEGATIVE,
    **{f"vq_train.{k}": POSITIVE for k in ("steps", "batch_size", "log_every", "eval_every",
                                           "save_every")},
    "vq_train.learning_rate": Float(0, open_low=True),
    "vq_train.warmup_steps": COUNT,
    "vq_train.weight_decay": NONNEGATIVE,
    "train.caption_dropout": FRACTION,
    "data.captions_per_image": POSITIVE,
    "data.filler_words": FRACTION,
    "sample.per_prompt": POSITIVE,
    "sample.guidance": Float(0, note="0: no guidance"),
    # lora: low-rank adapters on a frozen base (fmjax.lora)
    "lora.rank": Int(0, note="0 trains every parameter; e.g. 8 trains adapters of rank 8"),
    "lora.alpha": Float(0, open_low=True, note="the adapters' scale is alpha / rank"),
    "lora.dropout": FRACTION,
    "lora.targets": lambda value, config=None: _lora_targets(value),
}


def _lora_targets(value) -> str | None:
  """Comma-separated regular expressions of Dense module paths ("" for fmjax.lora's default)."""
  if not isinstance(value, str):
    return "must be a string of comma-separated patterns, e.g. 'query,value' ('' for the default)"
  for pattern in (p.strip() for p in value.split(",") if p.strip()):
    try:
      re.compile(pattern)
    except re.error as e:
      return f"{pattern!r} is not a regular expression ({e})"
  return None


# Keys with no rule above: strings that whoever reads them checks (a tfds name, a column, a
# metric, a prompt; the model's choices in MODELS, init_from in DEPENDENT). Every key of a
# run config is in RULES or here (tests/test_checks.py), so a new key gets a rule or a reason.
FREE_FORM = frozenset({
    "init_from", "train.best_metric", "sample.prompt", "sample.prompts",
    *(f"data.{k}" for k in ("tfds_name", "text_key", "data_dir", "train_split", "eval_split",
                            "test_split", "source_lang", "target_lang", "text_columns",
                            "label_column", "label_names")),
    *(f"{block}.{k}" for block in ("model", "vit")
      for k in ("position", "norm", "mlp_activation", "pool")),
})


def _check(config, key: str, rule) -> str | None:
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None  # not a key of this program's config
    node = node[part]
  problem = rule(node, config)
  return f"{flag(key, node)}: {problem}" if problem else None


# Dependent settings -------------------------------------------------------------------------

def _accumulation(config) -> str | None:
  t = config.train
  if "accum_steps" in t and not t.get("auto_memory", False) and t.batch_size % t.accum_steps:
    return (f"{flag('train.batch_size', t.batch_size)} does not split into "
            f"--config.train.accum_steps={t.accum_steps} micro-batches; use a multiple of "
            f"{t.accum_steps}")
  return None


def _mesh(config) -> str | None:
  """The mesh against the devices (sharding.make_mesh's check, before any data is read)."""
  if "mesh" not in config:
    return None
  try:
    sharding.make_mesh(dict(config.mesh))
  except ValueError as e:
    return f"--config.mesh: {e}"
  return None


def _ranges(config) -> str | None:
  """classify_images' index ranges: [start, stop) must hold an example (stop 0: to the end)."""
  d = config.get("data", {})
  for split in ("train", "eval"):
    start, stop = d.get(f"{split}_start"), d.get(f"{split}_stop")
    if start is not None and stop and start >= stop:
      return (f"{flag(f'data.{split}_start', start)} with --config.data.{split}_stop={stop} "
              f"selects no examples; use a start below the stop (stop 0: to the end)")
  return None


def _label_names(config) -> str | None:
  d = config.get("data", {})
  if not d.get("label_names") or config.get("task") == "regression" or "num_labels" not in d:
    return None
  names = [n for n in (s.strip() for s in d.label_names.split(",")) if n]
  if len(names) != d.num_labels:
    return (f"{flag('data.label_names', d.label_names)} names {len(names)} labels but "
            f"--config.data.num_labels={d.num_labels}; give one name per label")
  return None


def _init_from(config) -> str | None:
  """A workdir or hf:DIRECTORY that is not there (fmjax.sources reads it fully later)."""
  spec = config.get("init_from", "")
  path = spec[len("hf:"):] if spec.startswith("hf:") else spec
  if path and "://" not in path and not os.path.isdir(os.path.expanduser(path)):
    return (f"{flag('init_from', spec)}: no such folder; check the spelling (relative paths "
            f"are taken from {os.getcwd()})")
  return None


DEPENDENT: tuple[Callable, ...] = (_accumulation, _ranges, _label_names, _init_from, _mesh)


# The model's own checks, now ------------------------------------------------------------------

MODEL_CLASSES = (gpt.GPTConfig, bert.BertConfig, seq2seq.Seq2SeqConfig, vit.ViTConfig)
# Sizes a program takes from the data (-1) -> a value the dataclass accepts meanwhile.
FROM_DATA = {"vocab_size": 1, "source_vocab_size": 0, "num_classes": 0}


def _model(block: str) -> Callable:
  def check(config) -> str | None:
    if block not in config or not hasattr(config[block], "keys") or config.get("init_from"):
      return None  # with init_from, the source's architecture (config.model barely counts)
    fields = dict(config[block])
    cls = next((c for c in MODEL_CLASSES
                if {f.name for f in dataclasses.fields(c)} == set(fields)), None)
    if cls is None:
      return None  # not a model config this module knows; the program checks it
    fields.update({k: v for k, v in FROM_DATA.items() if fields.get(k) == -1})
    try:
      cls(**fields)
    except ValueError as e:  # "GPTConfig.field=value: ..." or "GPTConfig: ..."
      message = str(e)
      if message.startswith(cls.__name__ + "."):
        return f"--config.{block}.{message[len(cls.__name__) + 1:]}"
      return f"--config.{block}: {message.removeprefix(cls.__name__ + ': ')}"
    return None
  return check


MODELS: tuple[Callable, ...] = (_model("model"), _model("vit"))
