"""Where a run's starting weights come from: the one module that reads `init_from`.

  source = sources.parse(init_from)   # "" (none), a workdir, or "hf:DIRECTORY"
  config = source.architecture(bert.BertConfig)      # the weights' architecture (or None)
  config = source.architecture((gpt.GPTConfig, decoder.DecoderConfig))  # whichever it is
  tokenizer = source.tokenizer()                     # the tokenizer that goes with them
  params = source.load(params, param_shardings, new_params=("classifier",))

A workdir is any directory a training program wrote (its latest checkpoint and tokenizer/);
"hf:DIRECTORY" a Hugging Face model directory read through fmjax.hf. `load` places each
parameter straight into its sharding, matched by path, whatever the runtime of the source or
of this run (scan_layers' stacked layout is converted). Another kind of source (e.g. a PEFT
adapter over a base model) is one more `Source` subclass and an entry in `PREFIXES`;
`Adapted` rewrites another source's parameters (e.g. position embeddings resized).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from typing import Any, Callable

import jax
import numpy as np

from fmjax import checkpoint
from fmjax.runtime import FIELDS as runtime_fields
from fmjax.runtime import Runtime

log = logging.getLogger("fmjax")


class Source:
  """No source: the run starts from fresh parameters. The base class of every source.

  Args:
    spec: the init_from string this source was parsed from ("" for none).

  Attributes:
    spec: the init_from string this source was parsed from ("" for none).
  """

  def __init__(self, spec: str = ""):
    self.spec = spec

  def __bool__(self) -> bool:
    return bool(self.spec)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.spec!r})"

  def architecture(self, cls):
    """The source's model config as an instance of `cls`, or None without a source.

    Args:
      cls: the model config class expected, e.g. bert.BertConfig, or a tuple of the classes
        a program can build (e.g. GPT-2's GPTConfig and the decoder families' DecoderConfig):
        the config is an instance of the one the weights hold.

    Returns:
      A `cls` instance with the weights' architecture; None for no source.

    Raises:
      ValueError: the source holds another kind of model.
    """
    return None

  def tokenizer(self):
    """The tokenizer that goes with the weights (an fmjax.data Tokenizer), or None."""
    return None

  def runtime(self) -> Runtime:
    """The runtime the weights were trained under, as far as the source knows.

    E.g. to sample from them as they ran.

    Returns:
      The Runtime saved with the weights; Runtime() when the source does not say.
    """
    return Runtime()

  def shapes(self) -> dict[str, tuple[int, ...]]:
    """path -> shape of every parameter, in the Python-loop layout ("blocks/layer_{i}/...").

    Returns:
      Dict of slash-joined parameter path -> shape tuple.
    """
    return {p: tuple(x.shape) for p, x in self.read().items()}

  def read(self) -> dict[str, np.ndarray]:
    """path -> every parameter on the host, in the Python-loop layout.

    Returns:
      Dict of slash-joined parameter path -> numpy array in its stored dtype.

    Raises:
      ValueError: no source (there are no weights to read).
    """
    raise ValueError("no init_from: there are no weights to read")

  def load(self, params, param_shardings, new_params: tuple[str, ...] = ()):
    """The params a run starts from: the source's wherever a path matches, `params`' elsewhere.

    Args:
      params: freshly initialised (sharded) params of the model being trained, in either
        layout (scanned or not).
      param_shardings: their shardings.
      new_params: path prefixes the source may lack (a new task head), or "*/NAME" for
        every parameter named NAME (fmjax.lora.NEW_PARAMS: adapters); every other
        parameter must be in the source with the same shape. Source parameters this model
        does not have (e.g. pretraining heads) are left out.
    Returns:
      The params tree, loaded leaves placed straight into their shardings.
    Raises:
      checkpoint.CheckpointMismatchError: a parameter missing, or one of another shape.
    """
    if not self:
      return params
    ours = checkpoint.flatten_params(params)
    shardings = checkpoint.flatten_params(param_shardings)
    scanned = any(checkpoint.is_stacked(p) for p in ours)
    view = {v: shape for p, x in ours.items() for v, shape in _loop_view(p, x.shape).items()}
    theirs = self.shapes()
    is_new = lambda path: any(path == p or path.startswith(p + "/") or (
        p.startswith("*/") and path.endswith(p[1:])) for p in new_params)
    missing, matched = [], set()
    for path, shape in view.items():
      if path not in theirs:
        if not is_new(path):
          missing.append(path)
        continue
      if tuple(theirs[path]) != tuple(shape):
        hint = (" (a task head: its size follows num_labels; use a checkpoint finetuned with "
                "the same labels, or the pretrained encoder's workdir)" if is_new(path) else "")
        raise checkpoint.CheckpointMismatchError(
            f"init_from={self.spec!r}: parameter {path} has shape {tuple(theirs[path])} there "
            f"but {tuple(shape)} in this model{hint}")
      matched.add(path)
    if missing:
      raise checkpoint.CheckpointMismatchError(
          f"init_from={self.spec!r} lacks {len(missing)} parameter(s) this model needs, e.g. "
          f"{missing[:3]}: it holds another architecture (compare its config.json)")
    targets = {p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings[p])
               for p, x in ours.items() if set(_loop_view(p, x.shape)) <= matched}
    loaded = self._place(targets, scanned)
    unused = sorted(set(theirs) - set(view))
    log.info("initialised %d parameter arrays from %s; fresh: %s; not used: %s", len(loaded),
             self.spec, sorted(set(ours) - set(loaded)) or "none",
             (unused[:6] + ["..."] if len(unused) > 6 else unused) or "none")
    return jax.tree_util.tree_map_with_path(
        lambda path, x: loaded.get(checkpoint.path_str(path), x), params)

  def _place(self, targets: dict[str, jax.ShapeDtypeStruct], scanned: bool) -> dict:
    """path -> jax.Array of each target (our layout), read through `read`."""
    flat = checkpoint.convert_layout(self.read(), scanned)
    return {p: jax.device_put(np.asarray(flat[p], t.dtype), t.sharding) for p, t in targets.items()}


class Workdir(Source):
  """The latest checkpoint of a directory a training program wrote, and its tokenizer/.

  Args:
    spec: the workdir; its latest checkpoint's meta and array list are read here.

  Raises:
    FileNotFoundError: no checkpoints/ directory, or no complete checkpoint in it.
    fmjax.checkpoint.CheckpointReadError: the checkpoint cannot be read.
  """

  def __init__(self, spec: str):
    super().__init__(spec)
    self.step, self.meta, self._arrays = checkpoint.read_latest(spec)
    self.scanned = checkpoint.saved_scan_layers(self.meta)

  def architecture(self, cls):
    saved = self.meta.get("model", {})
    classes = cls if isinstance(cls, tuple) else (cls,)
    names = lambda c: {f.name for f in dataclasses.fields(c)}
    held = [c for c in classes if names(c) <= set(saved)]  # older metas add runtime fields
    if not held:
      missing = sorted(names(classes[0]) - set(saved))
      raise ValueError(f"init_from={self.spec!r} holds a checkpoint of a model that is not a "
                       f"{_names(cls)} (missing {missing})")
    return _from_json(max(held, key=lambda c: len(names(c))), saved)

  def runtime(self):
    saved = self.meta.get("runtime")
    if saved is None:  # written before the runtime split: the fields sat with the model's
      model = self.meta.get("model", {})
      saved = {k: model[k] for k in runtime_fields if k in model}
    return Runtime(**saved)

  def tokenizer(self):
    from fmjax.data import tokenizers
    directory = os.path.join(self.spec, "tokenizer")
    if not os.path.exists(os.path.join(directory, tokenizers.METADATA_FILE)):
      raise FileNotFoundError(f"init_from={self.spec!r} has no tokenizer/ directory; use a "
                              "workdir that a training program wrote (it saves its tokenizer)")
    return tokenizers.load_tokenizer(directory)

  def shapes(self):
    return {v: shape for p, x in self._arrays.items()
            for v, shape in _loop_view(p, x.shape).items()}

  def read(self):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    arrays = checkpoint.restore_params(self.spec, self.step, {
        p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device)
        for p, x in self._arrays.items()})
    return checkpoint.convert_layout({p: np.asarray(x) for p, x in arrays.items()}, False)

  def _place(self, targets, scanned):
    if scanned == self.scanned:  # the same layout: each array read straight into its sharding
      return checkpoint.restore_params(self.spec, self.step, targets)
    return super()._place(targets, scanned)


class HuggingFace(Source):
  """A Hugging Face model directory ("hf:DIRECTORY"), read through fmjax.hf.

  The weights are read on first use (`architecture`, `read`, `load`), not when made.

  Args:
    spec: "hf:DIRECTORY".
  """

  def __init__(self, spec: str):
    super().__init__(spec)
    self.directory = os.path.expanduser(spec[len("hf:"):])
    self._loaded = None

  def _load(self):
    if self._loaded is None:
      from fmjax import hf  # only when asked for
      config, params = hf.read_weights(self.directory, runtime=Runtime())
      self._loaded = config, checkpoint.flatten_params(params)
    return self._loaded

  def architecture(self, cls):
    config = self._load()[0]
    if not isinstance(config, cls):
      raise ValueError(f"init_from={self.spec!r} is a {type(config).__name__}, not a "
                       f"{_names(cls)}")
    return config

  def tokenizer(self):
    from fmjax import hf
    return hf.tokenizer_from_pretrained(self.directory)

  def read(self):
    return dict(self._load()[1])

  def _place(self, targets, scanned):
    placed = super()._place(targets, scanned)
    self._loaded = None  # the host copy is not needed any more
    return placed


class Adapted(Source):
  """Another source with its parameters rewritten by `fn`.

  E.g. position embeddings resized for another image size, a head of another size dropped.

  Args:
    base: the source whose parameters are rewritten (its spec, architecture and tokenizer
      are this one's).
    fn: path -> numpy array dict in, path -> numpy array dict out, Python-loop layout; called
      once, on the first `read`.
    note: what `fn` changes, logged when it runs.
  """

  def __init__(self, base: Source, fn: Callable[[dict], dict], note: str):
    super().__init__(base.spec)
    self.base, self.fn, self.note = base, fn, note
    self._flat = None

  def architecture(self, cls):
    return self.base.architecture(cls)

  def tokenizer(self):
    return self.base.tokenizer()

  def read(self):
    if self._flat is None:
      log.info("init_from %s adapted: %s", self.spec, self.note)
      self._flat = self.fn(self.base.read())
    return dict(self._flat)

  def _place(self, targets, scanned):
    placed = super()._place(targets, scanned)
    self._flat = None  # the host copy is not needed any more
    return placed


PREFIXES: dict[str, Callable[[str], Source]] = {"hf:": HuggingFace}


def parse(init_from: str) -> Source:
  """The Source that `init_from` names.

  Args:
    init_from: "" for none, "hf:DIRECTORY" for a Hugging Face directory, else a workdir
      (checked here: it must hold a complete checkpoint).

  Returns:
    A Source (falsy for ""), HuggingFace or Workdir.

  Raises:
    FileNotFoundError: a workdir without a complete checkpoint.
  """
  if not init_from:
    return Source()
  for prefix, kind in PREFIXES.items():
    if init_from.startswith(prefix):
      return kind(init_from)
  return Workdir(init_from)


def _names(cls) -> str:
  """A config class's name, or "A or B" for a tuple of them."""
  return " or ".join(c.__name__ for c in (cls if isinstance(cls, tuple) else (cls,)))


def _from_json(cls, fields: dict):
  """cls(**fields) from a checkpoint's JSON model signature (checkpoint.model_signature):
  nested config dataclasses (e.g. DecoderConfig's AttentionOptions, Rope, LocalLayers) are
  rebuilt from their dicts and lists become tuples, so the config equals the one saved."""
  hints = typing.get_type_hints(cls)

  def value(hint, x):
    if x is None:
      return None
    options = (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType)
               else (hint,))
    for option in options:
      if dataclasses.is_dataclass(option) and isinstance(x, dict):
        return _from_json(option, x)
      if typing.get_origin(option) is tuple and isinstance(x, list):
        return tuple(x)
    return x

  return cls(**{f.name: value(hints[f.name], fields[f.name]) for f in dataclasses.fields(cls)
                if f.name in fields})


def _loop_view(path: str, shape) -> dict[str, tuple[Any, ...]]:
  """A parameter's path(s) and shape(s) in the Python-loop layout: a stacked
  "blocks/layers/p" of shape (L, ...) is L paths "blocks/layer_{i}/p" of shape (...)."""
  layers = checkpoint.layer_paths(path, shape[0] if len(shape) else 0)
  if layers is None:
    return {path: tuple(shape)}
  return {p: tuple(shape[1:]) for p in layers}
