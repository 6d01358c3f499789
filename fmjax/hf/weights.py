"""Reading and writing Hugging Face model directories (config.json + safetensors weights).

The tables in `fmjax/hf/tables.py` say which HF tensor is which fmjax parameter; this module
finds the files, checks every name and shape against the fmjax model's own `jax.eval_shape`
of `init`, converts, initialises a task head the checkpoint lacks, and places the result on
devices (optionally straight into the NamedShardings of a mesh).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pathlib
import re
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
import safetensors
import safetensors.numpy

from fmjax import sharding
from fmjax.checkpoint import stack_layers, unflatten_params, unstack_layers
from fmjax.hf import decoders, tables
from fmjax.hf.tables import Architecture, Variant, expand, labels_to_hf, num_labels_of
from fmjax.runtime import Runtime

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"

# Every model_type fmjax reads: tables.py's (bert, gpt2, vit) and decoders.py's families.
ARCHITECTURES = {**tables.ARCHITECTURES, **decoders.ARCHITECTURES}
TASKS = {**tables.TASKS, "causal_lm": {**tables.TASKS["causal_lm"], **decoders.CAUSAL_LM}}


def read_weights(directory: str | os.PathLike, *, task: str | None = None,
                 num_labels: int | None = None, seed: int = 0,
                 runtime: Runtime | None = None) -> tuple[Any, dict]:
  """Reads a Hugging Face BERT, GPT-2 or ViT directory into fmjax's config and parameter names.

  (An fmjax workdir's trained parameters are read by fmjax.checkpoint.load_params instead.)

  Args:
    directory: holds config.json and model.safetensors (or a sharded model.safetensors.index.json;
      pytorch_model.bin is read only when torch is installed).
    task, num_labels, seed: the model to read it as, as in from_pretrained.
    runtime: how the model will run (default Runtime()): its scan_layers stacks the layers on
      a leading axis, as nn.scan wants; its param_dtype is the dtype the weights are cast to.
      The architecture always comes from config.json.

  Returns:
    (config, params): a BertConfig, GPTConfig or ViTConfig and a nested dict of numpy arrays
    whose paths equal those of `model.init(...)["params"]` of from_pretrained's model, e.g.
    BertForPreTraining's when the checkpoint has the pretraining heads and no task is given,
    {"bert": BertEncoder's params} for a BertModel; GPT's for GPT-2; ViT's for a
    ViTForImageClassification, else {"encoder": ViTEncoder's params}.

  Raises:
    FileNotFoundError: no such directory, no config.json or no weights file.
    ValueError: unsupported model_type, task or config, a missing tensor or a shape mismatch.
  """
  model, variant, params = _load(directory, runtime or Runtime(), task=task,
                                 num_labels=num_labels, seed=seed)
  return model.config, params


def from_pretrained(directory: str | os.PathLike, *, task: str | None = None,
                    num_labels: int | None = None, seed: int = 0,
                    mesh: jax.sharding.Mesh | None = None, rules=None, dtype=None,
                    runtime: Runtime | None = None) -> tuple[nn.Module, dict]:
  """Builds the fmjax model of a Hugging Face BERT, GPT-2 or ViT directory and loads its weights.

  With a task (fmjax.hf.TASKS), the model is that task's, whatever head the checkpoint has:
    "causal_lm"             GPT-2 -> GPT, llama, mistral, qwen2, qwen3, gemma, gemma2,
                            gemma3_text -> fmjax.models.decoder.Decoder: logits (B, T, V)
    "masked_lm"             BERT -> BertForMaskedLM: logits (B, T, V) (HF's BertForMaskedLM)
    "classification"        BERT -> BertForSequenceClassification(config, num_labels):
                            logits (B, num_labels); num_labels = 1: a regression score
    "question_answering"    BERT -> BertForQuestionAnswering: start and end logits (B, T) each
    "image_classification"  ViT -> ViT: logits (B, num_labels)
  The task's head is loaded when the checkpoint has it (HF's classifier.*, qa_outputs.*,
  cls.predictions.*) and initialised from `seed` (logged) when it has none of it, e.g. a
  classifier on a pretrained BertModel or BertForPreTraining; the checkpoint's other heads
  are left out (logged).

  Without a task, the model is the class the checkpoint was saved from: BERT's pretraining
  heads (cls.predictions.*, cls.seq_relationship.*) give a BertForPreTraining, the MLM head
  alone a BertForMaskedLM, classifier.* a BertForSequenceClassification, qa_outputs.* a
  BertForQuestionAnswering, none a BertEncoder (HF's BertModel); GPT-2 gives a GPT with its
  tied LM head; ViTForImageClassification gives a ViT, ViTModel a ViTEncoder (its pooler is not
  read). `model.apply(variables, ...)` then matches transformers' outputs:
  BertEncoder -> (last_hidden_state, pooler_output), BertForPreTraining -> its dict of logits,
  GPT -> logits, ViT -> logits, ViTEncoder -> last_hidden_state (images channels last:
  pixel_values.transpose(0, 2, 3, 1)).

  Args:
    directory: a Hugging Face model directory (see read_weights).
    task: one of fmjax.hf.TASKS, or None for the model the checkpoint holds.
    num_labels: the label count of a classifier; default config.json's (the length of its
      id2label, else num_labels, else 2, as transformers). A checkpoint head of another size
      is an error.
    seed: initialises a head the checkpoint lacks.
    mesh: if given, each weight is placed directly into its NamedSharding on this mesh as
      it is read, one device's shard at a time, before the next tensor is read: the host
      holds at most one tensor of the checkpoint (tests/test_sharded_load.py).
    rules: logical-axis rules (a name of fmjax.sharding.RULES or a rule list); default "fsdp".
    dtype: parameter and compute dtype, e.g. "bfloat16"; default the runtime's.
    runtime: how the model runs (fmjax.runtime.Runtime, default Runtime()), e.g.
      Runtime(attention_impl="xla", scan_layers=True); `dtype` overrides its dtypes.

  Returns:
    (model, variables) with variables = {"params": tree of jax.Arrays}.

  Raises:
    ValueError: an unknown task, a task this model_type cannot serve (e.g. "classification"
      of GPT-2), num_labels that differ from the checkpoint's head, and read_weights' errors.
  """
  runtime = runtime or Runtime()
  if dtype is not None:
    runtime = dataclasses.replace(runtime, dtype=jnp.dtype(dtype).name,
                                  param_dtype=jnp.dtype(dtype).name)
  rules = sharding.get_rules(rules or "fsdp") if isinstance(rules, (str, type(None))) else rules

  def placer(model, variant):
    """Each tensor straight into its NamedSharding as it is read, one device's shard at a
    time: no device (nor the host) ever holds the whole model unsharded. Scanned layers are
    placed layer by layer (their stacked sharding without the layer axis), stacked on device."""
    abstract = jax.eval_shape(model.init, jax.random.key(0),
                              _dummy_input(_architecture_of(model)[0], model.config))
    sharding.check_divisible(abstract, mesh, rules)
    shardings = _flatten(sharding.shardings_of(abstract, mesh, rules)["params"])
    skip = len(variant.root) + 1 if variant.root else 0

    def place(path, x, shape, dtype):
      path = path[skip:]
      if path in shardings:
        return _put(x, shardings[path], shape, dtype)
      s = shardings[_stacked_path(path)]  # one layer of a scanned stack
      return _put(x, NamedSharding(s.mesh, PartitionSpec(*s.spec[1:])), shape, dtype)

    def stack(path, layers):
      return _stack_on_device(layers, shardings[path[skip:]])
    return place, stack

  model, variant, params = _load(directory, runtime, task=task, num_labels=num_labels,
                                 seed=seed, placer=None if mesh is None else placer)
  tree = params[variant.root] if variant.root else params
  if mesh is None:
    return model, {"params": jax.tree_util.tree_map(jnp.asarray, tree)}
  return model, {"params": tree}


def save_pretrained(model: nn.Module, variables, directory: str | os.PathLike, *,
                    id2label=None, max_shard_size: int | str | None = None) -> None:
  """Writes config.json and model.safetensors that transformers' AutoModel* loads.

  BertForPreTraining -> HF BertForPreTraining, BertEncoder -> BertModel, BertForMaskedLM ->
  BertForMaskedLM, BertForSequenceClassification -> BertForSequenceClassification (config.json
  with num_labels, id2label, label2id; problem_type "regression" for num_labels = 1),
  BertForQuestionAnswering -> BertForQuestionAnswering, GPT -> GPT2LMHeadModel,
  ViT -> ViTForImageClassification, ViTEncoder -> ViTModel (without its pooler).
  Weights keep their dtype, so export then import round-trips bit for bit. Under several
  processes every process must call this; process 0 writes.

  Args:
    model: the fmjax module whose `variables` these are (its config says the architecture).
    variables: {"params": ...} or the params tree itself (boxed or plain, sharded or not).
    directory: created if needed; existing config.json / model.safetensors are overwritten.
    id2label: a classifier's label names, a list or {index: name}; default "LABEL_0", ...
    max_shard_size: None writes one model.safetensors; bytes (an int, or "500MB", "2GiB", ...
      as transformers spells it) write model-0000i-of-0000n.safetensors files of at most that
      size (a larger tensor gets a file of its own) and model.safetensors.index.json, as
      transformers' save_pretrained(max_shard_size=...) does.

  Raises:
    ValueError: a model with no HF equivalent (e.g. a rotary GPT), or params that do not fit it.
  """
  arch, variant = _architecture_of(model)
  config = model.config
  hf_config = arch.config_to_hf(config)  # raises first if the config has no HF equivalent
  num_labels = variant.labels.count(model) if variant.labels else 0
  if num_labels:
    hf_config.update(labels_to_hf(num_labels, id2label))
  elif id2label is not None:
    raise ValueError(f"id2label names the labels of a classifier; a {type(model).__name__} has "
                     "none, so leave id2label out")
  params = nn.meta.unbox(variables.get("params", variables))
  flat = {path: _to_host(x) for path, x in _flatten(params).items()}
  if model.runtime.scan_layers:
    flat = unstack_layers(flat)
  prefix = variant.root + "/" if variant.root else ""
  flat = {prefix + p: x for p, x in flat.items()}
  shapes = _param_shapes(arch, variant, model)
  for path, shape in shapes.items():
    if path not in flat:
      raise ValueError(f"variables have no parameter {path[len(prefix):]!r}, which "
                       f"{variant.module.__name__} needs; pass the variables of this model")
    if tuple(flat[path].shape) != shape:
      raise ValueError(f"parameter {path[len(prefix):]!r} has shape {tuple(flat[path].shape)} "
                       f"but {variant.module.__name__}({config}) needs {shape}")
  extra = sorted(set(flat) - set(shapes))
  if extra:
    raise ValueError(f"variables have parameters {variant.module.__name__} does not define: "
                     f"{[p[len(prefix):] for p in extra[:5]]}; pass the variables of this model")
  unpadded = _param_shapes(arch, variant, _unpadded(model))
  flat = {path: _fit(x, unpadded[path]) for path, x in flat.items()}
  shard_bytes = None if max_shard_size is None else _bytes(max_shard_size)
  tensors = {}
  for r in expand(variant.rules(config), config.num_layers):
    name = r.hf[len(arch.prefix):] if variant.base_model else r.hf
    tensors[name] = np.ascontiguousarray(r.to_hf([flat[p] for p in r.fm]))
  if jax.process_index() != 0:
    return
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _write_tensors(directory, tensors, shard_bytes)
  hf_config = {"architectures": [variant.hf_class], "model_type": arch.model_type, **hf_config,
               "dtype": jnp.dtype(model.runtime.param_dtype).name}
  (directory / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2) + "\n")


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10,
          "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def _bytes(size: int | str) -> int:
  """max_shard_size as a positive number of bytes: an int or "<number><unit>" (_UNITS)."""
  given = size
  if isinstance(size, str):
    text = size.strip().upper()
    unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), None)
    try:
      size = int(float(text[:-len(unit)]) * _UNITS[unit]) if unit else int(text)
    except ValueError:
      size = None
  if isinstance(size, bool) or not isinstance(size, int) or size < 1:
    raise ValueError(f"max_shard_size={given!r}; give a positive number of bytes, e.g. 5_000_000 "
                     f"or \"5MB\" (units {list(_UNITS)})")
  return size


def _write_tensors(directory: pathlib.Path, tensors: dict, shard_bytes: int | None) -> None:
  """model.safetensors, or (shard_bytes) shards of at most that size and their index; files a
  previous save left in the other layout are removed, since readers prefer model.safetensors."""
  groups = [list(tensors)]
  if shard_bytes is not None:
    groups, size = [[]], 0
    for name, t in tensors.items():
      if groups[-1] and size + t.nbytes > shard_bytes:
        groups, size = groups + [[]], 0
      groups[-1].append(name)
      size += t.nbytes
  for stale in [directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX,
                *directory.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  if shard_bytes is None:
    safetensors.numpy.save_file(tensors, directory / SAFETENSORS_FILE, metadata={"format": "pt"})
    return
  weight_map = {}
  for i, names in enumerate(groups):
    name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
    safetensors.numpy.save_file({n: tensors[n] for n in names}, directory / name,
                                metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(names, name))
  index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
           "weight_map": weight_map}
  (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def _load(directory, runtime: Runtime, *, task=None, num_labels=None,
          seed=0, placer=None) -> tuple[nn.Module, Variant, dict]:
  """(model, variant, params) for read_weights and from_pretrained.

  placer(model, variant), if given, returns (place, stack): place(path, x, shape, dtype) -> x
  on devices, fitted to `shape` and cast to `dtype` there (see _put), called on each tensor as
  soon as it is read, before the next is read (params then holds placed arrays);
  stack(path, per-layer arrays) -> the scanned stack, when runtime.scan_layers."""
  if task is not None and task not in TASKS:
    raise ValueError(f"unknown task={task!r}; choose one of {list(TASKS)}, or task=None for "
                     "the model the checkpoint holds")
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory} is not a directory; give a Hugging Face model "
                            f"directory with {CONFIG_FILE} and {SAFETENSORS_FILE}")
  hf_config = _read_config(directory)
  model_type = hf_config.get("model_type")
  if model_type not in ARCHITECTURES:
    by = lambda m: sorted(k for k, a in ARCHITECTURES.items() if a.modality == m)
    raise ValueError(f"{directory / CONFIG_FILE} has model_type={model_type!r}; fmjax.hf "
                     f"supports {by('text')} (text) and {by('image')} (images)")
  arch = ARCHITECTURES[model_type]
  config = arch.config_from_hf(hf_config)
  checkpoint = _Checkpoint(directory)
  names = {arch.canonical(n): n for n in checkpoint.names}
  variant = _variant(arch, task, config, set(names), directory)
  labels = _num_labels(variant, num_labels, hf_config)
  model = variant.make(config, labels, runtime=runtime)
  config = model.config  # a ViT's num_classes follows num_labels
  shapes = _param_shapes(arch, variant, _unpadded(model))  # the checkpoint's vocabulary
  dtype = runtime.params_dtype
  padded = _param_shapes(arch, variant, model)
  if placer is None:
    place = lambda path, x, shape, dtype: _fit(x.astype(dtype), shape)
    stack = lambda path, layers: np.stack(layers)
  else:
    place, stack = placer(model, variant)
  rules = expand(variant.rules(config), config.num_layers)
  head = [r for r in rules if variant.head and r.hf.startswith(variant.head)]
  fresh = [] if any(r.hf in names for r in head) else head  # no head in the checkpoint
  flat, used = {}, set()
  for r in rules:
    if r in fresh:
      continue
    if r.hf not in names:
      raise ValueError(
          f"{checkpoint.describe()} has no tensor {_bare(arch, variant, r.hf)!r} (fmjax "
          f"{'/'.join(r.fm)}), which a {variant.hf_class} with this config.json needs; the "
          f"checkpoint is incomplete or of another class. Re-save it with transformers' "
          f"{variant.hf_class}.save_pretrained")
    w = checkpoint.get(names[r.hf])
    fm_shapes = [shapes[p] for p in r.fm]
    expected = r.hf_shape(fm_shapes)
    if tuple(w.shape) != expected and r in head and variant.labels:
      given = ("the argument" if num_labels is not None
               else f"{CONFIG_FILE}'s {'id2label' if hf_config.get('id2label') else 'num_labels'}")
      raise ValueError(
          f"{checkpoint.describe()}: head tensor {names[r.hf]!r} has shape {tuple(w.shape)}, but "
          f"num_labels={labels} ({given}) needs {expected}; the checkpoint's head has "
          f"{w.shape[0]} labels: pass num_labels={w.shape[0]}, or a directory without "
          f"{variant.head[0]}* for a new head")
    if tuple(w.shape) != expected:
      raise ValueError(
          f"{checkpoint.describe()}: tensor {names[r.hf]!r} has shape {tuple(w.shape)}, but "
          f"{CONFIG_FILE} ({_summary(config)}) needs {expected}; the weights and "
          f"{CONFIG_FILE} do not belong together")
    for path, x in zip(r.fm, r.to_fmjax(w, fm_shapes)):
      flat[path] = place(path, x, padded[path], dtype)
    del w, x  # before the next tensor is read: one tensor at a time on the host
    used.add(r.hf)
  if fresh:
    flat.update({path: place(path, x, padded[path], x.dtype) for path, x in _init_head(
        arch, model, [p for r in fresh for p in r.fm], seed).items()})
    log.warning("%s has no %s head (%s*): initialised %s with seed %d; train it before use",
                directory, variant.hf_class, ", ".join(variant.head),
                [p for r in fresh for p in r.fm], seed)
  missing = set(shapes) - set(flat)
  if missing:  # a table that misses a parameter is a bug here, not in the checkpoint
    raise RuntimeError(f"fmjax.hf's {arch.model_type} table maps no tensor to {sorted(missing)}")
  for name, source in arch.tied.items():
    if name in names and name not in used and not np.array_equal(
        checkpoint.get(names[name]), checkpoint.get(names[source])):
      raise ValueError(f"{checkpoint.describe()}: {names[name]!r} differs from {names[source]!r}, "
                       "but fmjax ties them (one shared tensor); untied output layers are not "
                       "supported for this model")
    used.add(name)
  unused = sorted(names[n] for n in set(names) - used if not arch.ignored(n))
  if unused and task is not None:  # asked for: e.g. the pretraining heads under a classifier
    log.info("task=%r leaves out %d tensors of %s that a %s does not have: %s", task,
             len(unused), checkpoint.describe(), variant.hf_class, unused[:8])
  elif unused:
    warnings.warn(f"fmjax.hf ignores {len(unused)} tensors of {checkpoint.describe()} that a "
                  f"{variant.hf_class} does not have: {unused[:8]}", stacklevel=3)
  if runtime.scan_layers:  # each stack built from its layers, then they are dropped
    flat = {path: stack(path, x) if isinstance(x, list) else x
            for path, x in stack_layers(flat, stack=list).items()}
  return model, variant, unflatten_params(flat)


def _variant(arch: Architecture, task, config, names: set[str], directory) -> Variant:
  """The task's Variant for this model_type, or (task None) the checkpoint's own."""
  if task is None:
    return arch.variant(config, names)
  if arch.model_type not in TASKS[task]:
    serves = [t for t, by_type in TASKS.items() if arch.model_type in by_type]
    raise ValueError(f"task={task!r} needs a {' or '.join(TASKS[task])} checkpoint, but "
                     f"{directory / CONFIG_FILE} has model_type={arch.model_type!r}, which "
                     f"serves tasks {serves}")
  return TASKS[task][arch.model_type]


def _num_labels(variant: Variant, num_labels, hf_config: dict) -> int | None:
  """The label count to build the variant with: the argument, else config.json's."""
  if variant.labels is None:
    if num_labels is not None:
      with_labels = [t for t, by_type in TASKS.items()
                     if any(v.labels for v in by_type.values())]
      raise ValueError(f"num_labels={num_labels!r} sizes a classifier's head, but a "
                       f"{variant.hf_class} has no labels; pass it with task in {with_labels}")
    return None
  if num_labels is None:
    return num_labels_of(hf_config)
  if isinstance(num_labels, bool) or not isinstance(num_labels, (int, np.integer)) or (
      num_labels < 1):
    raise ValueError(f"num_labels={num_labels!r}; give a positive int (1: a regression score)")
  return int(num_labels)


def _init_head(arch: Architecture, model: nn.Module, paths: list[str], seed: int) -> dict:
  """"/"-path -> numpy value of the given (head) parameters of model.init(key(seed)). Only they
  are returned, so XLA drops the rest of init: the encoder is never initialised."""
  model = model.clone(runtime=dataclasses.replace(model.runtime, scan_layers=False))
  example = _dummy_input(arch, model.config)

  def init(key):
    params = nn.meta.unbox(model.init(key, jnp.zeros(example.shape, example.dtype))["params"])
    return {p: x for p, x in _flatten(params).items() if p in paths}

  values = jax.device_get(jax.jit(init)(jax.random.key(seed)))
  return {p: np.asarray(x) for p, x in values.items()}


def _read_config(directory: pathlib.Path) -> dict:
  path = directory / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{directory} has no {CONFIG_FILE}; a Hugging Face model directory "
                            "needs it (written by save_pretrained) next to the weights")
  try:
    return json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); re-save the model") from None


class _Checkpoint:
  """The tensors of a model directory, read lazily one by one (a large checkpoint is never
  held twice in memory while it is converted)."""

  def __init__(self, directory: pathlib.Path):
    self.directory = directory
    self._torch = None
    if (directory / SAFETENSORS_FILE).is_file():
      self.files = {None: directory / SAFETENSORS_FILE}
      with safetensors.safe_open(self.files[None], framework="numpy") as f:
        self._file_of = {n: None for n in f.keys()}
    elif (directory / SAFETENSORS_INDEX).is_file():
      weight_map = json.loads((directory / SAFETENSORS_INDEX).read_text())["weight_map"]
      self.files = {f: directory / f for f in set(weight_map.values())}
      self._file_of = dict(weight_map)
    elif (directory / TORCH_FILE).is_file() or (directory / TORCH_INDEX).is_file():
      self._torch = _read_torch(directory)
      self.files = {None: directory / TORCH_FILE}
      self._file_of = {n: None for n in self._torch}
    else:
      raise FileNotFoundError(f"{directory} has no {SAFETENSORS_FILE} (nor {SAFETENSORS_INDEX} "
                              f"or {TORCH_FILE}); save the weights there with transformers' "
                              "save_pretrained")
    self.names = list(self._file_of)

  def describe(self) -> str:
    files = sorted(str(p.name) for p in self.files.values())
    return str(self.directory / files[0]) if len(files) == 1 else f"{self.directory} ({files})"

  def get(self, name: str) -> np.ndarray:
    if self._torch is not None:
      return self._torch[name]
    with safetensors.safe_open(self.files[self._file_of[name]], framework="numpy") as f:
      return f.get_tensor(name)


def _read_torch(directory: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise FileNotFoundError(
        f"{directory} has only {TORCH_FILE}, which needs torch to read; install torch or convert "
        f"it to {SAFETENSORS_FILE} (transformers' save_pretrained writes safetensors)") from None
  if (directory / TORCH_FILE).is_file():
    files = [directory / TORCH_FILE]
  else:
    weight_map = json.loads((directory / TORCH_INDEX).read_text())["weight_map"]
    files = [directory / f for f in sorted(set(weight_map.values()))]
  out = {}
  for f in files:
    for name, t in torch.load(f, map_location="cpu", weights_only=True).items():
      # numpy has no bfloat16: go through float32, which holds every bfloat16 exactly.
      out[name] = (t.float().numpy().astype(jnp.bfloat16) if t.dtype == torch.bfloat16
                   else t.numpy())
  return out


def _architecture_of(model: nn.Module) -> tuple[Architecture, Variant]:
  for arch in ARCHITECTURES.values():
    for variant in arch.variants:
      if type(model) is variant.module and arch.owns(model.config):
        return arch, variant
  known = [v.module.__name__ for a in ARCHITECTURES.values() for v in a.variants]
  raise ValueError(f"fmjax.hf cannot export a {type(model).__name__}; exportable models: {known}")


def _dummy_input(arch: Architecture, config):
  if arch.example_input is not None:
    return arch.example_input(config)
  return jax.ShapeDtypeStruct((1, 1), jnp.int32)


def _param_shapes(arch: Architecture, variant: Variant,
                  model: nn.Module) -> dict[str, tuple[int, ...]]:
  """"/"-path -> shape of the model's params, unscanned, under the variant's root."""
  config = model.config
  unscanned = model.clone(runtime=dataclasses.replace(model.runtime, scan_layers=False))
  abstract = jax.eval_shape(unscanned.init, jax.random.key(0),
                            _dummy_input(arch, config))
  prefix = variant.root + "/" if variant.root else ""
  return {prefix + p: tuple(x.shape)
          for p, x in _flatten(nn.meta.unbox(abstract["params"])).items()}


def _unpadded(model: nn.Module) -> nn.Module:
  """The model with its vocabulary unpadded (vocab_multiple=1): the shapes in HF checkpoints."""
  config = model.config
  return (model.clone(config=dataclasses.replace(config, vocab_multiple=1))
          if hasattr(config, "vocab_multiple") else model)


def _put(x: np.ndarray, target: jax.sharding.Sharding, shape: tuple[int, ...],
         dtype) -> jax.Array:
  """x, fitted to `shape` (as _fit) and cast to `dtype`, as a jax.Array with sharding `target`.

  Each addressable device's shard is cut from x, converted and copied to its device before the
  next is cut, so besides x the host holds one shard at a time (jax.make_array_from_callback
  would hold every local shard at once, and x.astype a whole converted copy). The copy is
  awaited, since an asynchronous one keeps its host shard alive until it is done. On CPU, jax
  may adopt the numpy shard as the device buffer; it is copied into a buffer of XLA's own, so
  the loaded model never pins arrays the loader made (and host memory stays measurable).
  """
  arrays = []
  for device, index in target.addressable_devices_indices_map(shape).items():
    shard = jax.device_put(_fit_shard(x, index, shape, dtype), device)
    if device.platform == "cpu":
      shard = jnp.copy(shard)
    arrays.append(shard.block_until_ready())
  return jax.make_array_from_single_device_arrays(shape, target, arrays)


def _fit_shard(x: np.ndarray, index: tuple, shape: tuple[int, ...], dtype) -> np.ndarray:
  """_fit(x, shape)[index] cast to dtype, a new C-contiguous array the size of the shard."""
  index = tuple(index) + (slice(None),) * (len(shape) - len(index))
  bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
  out = np.zeros([stop - start for start, stop in bounds], dtype)
  have = tuple(slice(start, max(start, min(stop, m))) for (start, stop), m in zip(bounds, x.shape))
  out[tuple(slice(0, h.stop - h.start) for h in have)] = x[have]
  return out


@functools.partial(jax.jit, static_argnums=1)
def _stack_on_device(layers: list, target: jax.sharding.Sharding) -> jax.Array:
  """The per-layer device arrays stacked on a leading axis into sharding `target`."""
  return jax.lax.with_sharding_constraint(jnp.stack(layers), target)


def _stacked_path(path: str) -> str:
  """"...blocks/layer_{i}/p" -> "...blocks/layers/p" (where nn.scan keeps it)."""
  return re.sub(r"^(.*?blocks/)layer_\d+/", r"\1layers/", path)


def _fit(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """x cut or zero-padded at the end of each axis to `shape`: the vocabulary rows between a
  checkpoint's true vocabulary and fmjax's tables padded to vocab_multiple (layers.Embed)."""
  x = x[tuple(slice(0, n) for n in shape)]
  return np.pad(x, [(0, n - m) for n, m in zip(shape, x.shape)]) if x.shape != shape else x


def _summary(config) -> str:
  fields = ("vocab_size", "max_len", "image_size", "patch_size", "num_layers", "num_heads",
            "embed_dim", "mlp_dim")
  return ", ".join(f"{f}={getattr(config, f)}" for f in fields if hasattr(config, f))


def _bare(arch: Architecture, variant: Variant, name: str) -> str:
  """A canonical name as this variant's HF class would save it."""
  return name[len(arch.prefix):] if variant.base_model and name.startswith(arch.prefix) else name


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def _flatten(tree, prefix: str = "") -> dict:
  """Nested mappings -> {"a/b/c": leaf}."""
  out = {}
  for k, v in tree.items():
    if hasattr(v, "items"):
      out.update(_flatten(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = v
  return out
