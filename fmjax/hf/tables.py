"""Name and layout tables between Hugging Face checkpoints and fmjax parameters.

One `Architecture` per HF `model_type` (bert, gpt2, vit): a table of `Rule`s (HF tensor name <-> fmjax parameter
path(s) and how the array is laid out), the config.json <-> fmjax config maps, and the HF
classes it corresponds to. Adding a model (e.g. ViT) means adding one more table here and an
entry in `ARCHITECTURES`; `fmjax/hf/weights.py` does the reading, checking and writing.
`TASKS` (at the end) says which `Variant` each task of `from_pretrained(task=...)` builds from
each architecture; a new task head is a new Variant and a new row there.

HF names are *canonical*: as the task class saves them (BertForPreTraining: "bert.*", "cls.*";
GPT2LMHeadModel: "transformer.*", "lm_head.*"). Base-model checkpoints (BertModel, GPT2Model)
lack the prefix and are normalised on load. fmjax paths are "/"-joined, for the unscanned stack
("blocks/layer_{i}/..."); "{i}" in a rule stands for every layer index.

Layouts (torch stores a Linear weight as (out, in), GPT-2's Conv1D as (in, out); fmjax kernels
are (in..., out...) with heads split out, e.g. query (D, N, H) and attention output (N, H, D)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import numpy as np

from fmjax.models.bert import (BertConfig, BertEncoder, BertForMaskedLM, BertForPreTraining,
                               BertForQuestionAnswering, BertForSequenceClassification)
from fmjax.models.gpt import GPT, GPTConfig
from fmjax.models.vit import ViT, ViTConfig, ViTEncoder


class Layout:
  """How an HF tensor lays out one fmjax parameter; each layout below is one such rule."""

  def hf_shape(self, shape):
    """The HF tensor's shape for an fmjax parameter of `shape`.

    Args:
      shape: the fmjax parameter's shape, e.g. (D, N, H) for a query kernel.

    Returns:
      The HF shape, a tuple, e.g. (N * H, D) for the torch Linear that holds it.
    """
    raise NotImplementedError

  def to_fmjax(self, w, shape):
    """An HF array in fmjax's layout.

    Args:
      w: the HF numpy array, of shape `hf_shape(shape)`.
      shape: the fmjax parameter's shape.

    Returns:
      The same values as a numpy array of `shape` (dtype kept).
    """
    raise NotImplementedError

  def to_hf(self, x):
    """An fmjax parameter in HF's layout (the inverse of `to_fmjax`).

    Args:
      x: the fmjax parameter, a numpy array.

    Returns:
      The same values as a numpy array of shape `hf_shape(x.shape)` (dtype kept).
    """
    raise NotImplementedError


class Same(Layout):
  """Identical layout: embeddings (V, D), LayerNorm scales and offsets, (D,) biases."""

  def hf_shape(self, shape):
    return tuple(shape)

  def to_fmjax(self, w, shape):
    return w

  def to_hf(self, x):
    return x


class Flat(Layout):
  """A bias flattened in HF: (N * H,) <-> fmjax (N, H)."""

  def hf_shape(self, shape):
    return (math.prod(shape),)

  def to_fmjax(self, w, shape):
    return w.reshape(shape)

  def to_hf(self, x):
    return x.reshape(-1)


@dataclasses.dataclass(frozen=True)
class Matrix(Layout):
  """A weight matrix: HF's 2-d (out, in) or (in, out) <-> fmjax's kernel with heads split out.

  Attributes:
    n_in: how many leading axes of fmjax's kernel are inputs, e.g. 1 for a query kernel
      (D, N, H), 2 for the attention output (N, H, D).
    transpose: HF stores (out, in) (torch.nn.Linear); False for GPT-2's Conv1D, which stores
      (in, out).
  """
  n_in: int = 1
  transpose: bool = True

  def hf_shape(self, shape):
    i, o = math.prod(shape[:self.n_in]), math.prod(shape[self.n_in:])
    return (o, i) if self.transpose else (i, o)

  def to_fmjax(self, w, shape):
    return (w.T if self.transpose else w).reshape(shape)

  def to_hf(self, x):
    m = x.reshape(math.prod(x.shape[:self.n_in]), -1)
    return m.T if self.transpose else m


@dataclasses.dataclass(frozen=True)
class Unsqueezed(Layout):
  """A tensor HF keeps with `n` leading axes of size 1.

  ViT's [CLS] token (1, 1, D) and position embeddings (1, T, D) <-> fmjax (D,) and (T, D).

  Attributes:
    n: the number of leading size-1 axes in HF.
  """
  n: int

  def hf_shape(self, shape):
    return (1,) * self.n + tuple(shape)

  def to_fmjax(self, w, shape):
    return w.reshape(shape)

  def to_hf(self, x):
    return x.reshape(self.hf_shape(x.shape))


class Conv2d(Layout):
  """A torch Conv2d weight (out, in, kh, kw) <-> fmjax's patch projection kernel (kh, kw, in, out).

  fmjax's kernel is the Dense over a flattened (row, column, channel) patch.
  """

  def hf_shape(self, shape):
    kh, kw, i, o = shape
    return (o, i, kh, kw)

  def to_fmjax(self, w, shape):
    return w.transpose(2, 3, 1, 0)

  def to_hf(self, x):
    return x.transpose(3, 2, 0, 1)


SAME, FLAT, LINEAR = Same(), Flat(), Matrix()
CONV1D = Matrix(transpose=False)


@dataclasses.dataclass(frozen=True)
class Rule:
  """One HF tensor holding one fmjax parameter, or several concatenated along the last HF axis.

  Several: GPT-2's fused query|key|value projection.

  Attributes:
    hf: the canonical HF tensor name, e.g. "bert.embeddings.word_embeddings.weight".
    fm: the "/"-joined fmjax parameter path(s) it holds, in concatenation order.
    layout: the `Layout` of each part.
  """
  hf: str
  fm: tuple[str, ...]
  layout: Any

  def hf_shape(self, shapes):
    """The HF tensor's shape for fmjax parameters of `shapes`.

    Args:
      shapes: one fmjax shape per path of `fm`.

    Returns:
      The parts' HF shapes joined along the last axis, a tuple.
    """
    parts = [self.layout.hf_shape(s) for s in shapes]
    return parts[0][:-1] + (sum(p[-1] for p in parts),)

  def to_fmjax(self, w, shapes):
    """Splits an HF array into the fmjax parameters of `fm`.

    Args:
      w: the HF numpy array, of shape `hf_shape(shapes)`.
      shapes: one fmjax shape per path of `fm`.

    Returns:
      A list of numpy arrays, one per path, of the given shapes.
    """
    pieces = np.split(w, np.cumsum([self.layout.hf_shape(s)[-1] for s in shapes])[:-1], axis=-1)
    return [self.layout.to_fmjax(p, s) for p, s in zip(pieces, shapes)]

  def to_hf(self, xs):
    """Joins fmjax parameters into the HF tensor (the inverse of `to_fmjax`).

    Args:
      xs: numpy arrays, one per path of `fm`.

    Returns:
      The HF numpy array, their HF layouts concatenated along the last axis.
    """
    return np.concatenate([self.layout.to_hf(x) for x in xs], axis=-1)


def rule(hf: str, fm: str | tuple[str, ...], layout=SAME) -> Rule:
  """A `Rule`, for writing tables tersely.

  Args:
    hf: the canonical HF tensor name; "{i}" stands for every layer index.
    fm: an fmjax parameter path, or a tuple of them for a fused tensor.
    layout: a `Layout` (default SAME).

  Returns:
    Rule(hf, fm as a tuple, layout).
  """
  return Rule(hf, (fm,) if isinstance(fm, str) else tuple(fm), layout)


def expand(rules, num_layers: int) -> list[Rule]:
  """Per-layer rules ("{i}" in the names) repeated for every layer.

  Args:
    rules: `Rule`s, some with "{i}" in their names.
    num_layers: the number of layers.

  Returns:
    The rules, each "{i}" rule replaced by num_layers rules for i = 0, 1, ... in order.
  """
  out = []
  for r in rules:
    if "{i}" not in r.hf:
      out.append(r)
      continue
    for i in range(num_layers):
      out.append(Rule(r.hf.format(i=i), tuple(p.format(i=i) for p in r.fm), r.layout))
  return out


@dataclasses.dataclass(frozen=True)
class Labels:
  """Where a classifier keeps its label count.

  Attributes:
    build: build(config, num_labels, **kwargs) makes the module (kwargs: what else the module
      takes).
    count: count(module) reads the label count back.
  """
  build: Callable[..., nn.Module]
  count: Callable[[nn.Module], int]


@dataclasses.dataclass(frozen=True)
class Variant:
  """One fmjax module and the HF class it corresponds to.

  Attributes:
    hf_class: the transformers class name, e.g. "BertForSequenceClassification".
    module: the fmjax module class.
    rules: fmjax config -> its `Rule`s, "{i}" not yet expanded.
      root: where the module's params sit in the canonical fmjax tree ("bert" for BertEncoder,
      whose params read_weights returns as {"bert": ...}); "" for the whole tree.
    base_model: HF's base class, saved without the base prefix (BertModel, GPT2Model).
    head: canonical name prefixes of its task head: loaded when the checkpoint has them,
      initialised (seeded) when it has none of them (a classifier built on a pretrained
      encoder).
    labels: for a head sized by a label count (classifiers); None otherwise.
  """
  hf_class: str
  module: type[nn.Module]
  root: str
  base_model: bool
  rules: Callable[[Any], list[Rule]]  # fmjax config -> rules, "{i}" not yet expanded
  head: tuple[str, ...] = ()
  labels: Labels | None = None

  def make(self, config, num_labels: int | None = None, **kwargs) -> nn.Module:
    """The fmjax module, given its label count when it has labels.

    Args:
      config: the fmjax model config, e.g. a BertConfig.
      num_labels: the label count of a classifier; ignored when the variant has no labels.
      **kwargs: other fields of the module (e.g. runtime settings).

    Returns:
      The (unbound) flax module.
    """
    if self.labels is None:
      return self.module(config, **kwargs)
    return self.labels.build(config, num_labels, **kwargs)


@dataclasses.dataclass(frozen=True)
class Architecture:
  """Everything fmjax.hf knows about one HF model_type.

  Attributes:
    model_type: config.json's "model_type", e.g. "bert".
      prefix: the base model's name prefix in canonical names ("bert.").
    heads: name prefixes of tensors outside the base model ("cls.").
    tied: HF name -> the HF name it is a copy of (output layers tied to the embedding); such
      a tensor is optional in a checkpoint and, if present, must equal its source.
    ignored: HF name -> whether it is a buffer, not a parameter.
    variants: every Variant, for export (found by the fmjax module's class).
    config_from_hf: config.json's dict -> the fmjax config.
    config_to_hf: the fmjax config -> config.json's architecture fields.
    variant: (fmjax config, set of canonical names in the checkpoint) -> Variant to build.
    modality: "text" (token ids in) or "image".
    example_input: fmjax config -> the example input model.init needs; None: a (1, 1) batch
      of token ids.
    owns: fmjax config -> whether save_pretrained writes it as this model_type (several
      model_types share one fmjax module: the decoder families of fmjax/hf/decoders.py).
  """
  model_type: str
  prefix: str
  heads: tuple[str, ...]
  tied: dict[str, str]
  ignored: Callable[[str], bool]
  variants: tuple[Variant, ...]
  config_from_hf: Callable[[dict], Any]
  config_to_hf: Callable[[Any], dict]
  variant: Callable[[Any, set[str]], Variant]
  modality: str = "text"  # "text" (token ids in) or "image"
  # fmjax config -> the example input model.init needs; None: a (1, 1) batch of token ids.
  example_input: Callable[[Any], Any] | None = None
  owns: Callable[[Any], bool] = lambda config: True

  def canonical(self, name: str) -> str:
    """A checkpoint name in canonical form: TF-era LayerNorm gamma/beta renamed, prefix added.

    Args:
      name: a tensor name as a checkpoint stores it, e.g. "encoder.layer.0.output.LayerNorm.gamma"
        (a BertModel's).

    Returns:
      The canonical name, e.g. "bert.encoder.layer.0.output.LayerNorm.weight": ".gamma" ->
      ".weight", ".beta" -> ".bias", and the base prefix added to names outside the heads.
    """
    if name.endswith(".gamma"):
      name = name[:-len("gamma")] + "weight"
    elif name.endswith(".beta"):
      name = name[:-len("beta")] + "bias"
    if not name.startswith((self.prefix, *self.heads)):
      name = self.prefix + name
    return name


def _get(hf: dict, key: str, default):
  value = hf.get(key, default)
  return default if value is None else value


def num_labels_of(hf: dict) -> int:
  """A config.json's label count as transformers reads it.

  Args:
    hf: the parsed config.json.

  Returns:
    id2label's length, else num_labels, else 2 (transformers' default, which older configs
    leave out).
  """
  labels = hf.get("id2label")
  return len(labels) if labels else int(_get(hf, "num_labels", 2))


def labels_to_hf(num_labels: int, id2label=None) -> dict:
  """config.json's label fields for a classifier.

  Args:
    num_labels: the classifier's label count (1: a regression head).
    id2label: the label names, a list or an {index: name} dict covering 0..num_labels-1;
      None: "LABEL_0", "LABEL_1", ...

  Returns:
    {"num_labels", "id2label" ({"0": name, ...}), "label2id" ({name: 0, ...})} plus, for one
    label, "problem_type": "regression" (transformers' MSE loss).

  Raises:
    ValueError: id2label does not name exactly the labels 0..num_labels-1.
  """
  if id2label is None:
    names = [f"LABEL_{i}" for i in range(num_labels)]
  else:
    items = id2label.items() if hasattr(id2label, "items") else enumerate(id2label)
    by_index = {int(i): str(n) for i, n in items}
    if sorted(by_index) != list(range(num_labels)):
      raise ValueError(f"id2label={id2label!r} does not name labels 0..{num_labels - 1} of this "
                       f"model's num_labels={num_labels}; give one name per label")
    names = [by_index[i] for i in range(num_labels)]
  out = {"num_labels": num_labels, "id2label": {str(i): n for i, n in enumerate(names)},
         "label2id": {n: i for i, n in enumerate(names)}}
  if num_labels == 1:
    out["problem_type"] = "regression"
  return out


def _require(hf: dict, key: str, allowed, what: str):
  """ValueError unless config.json's `key` (or its HF default, allowed[0]) is in `allowed`."""
  value = hf.get(key, allowed[0])
  if value not in allowed:
    raise ValueError(f"config.json has {key}={value!r}, but fmjax's {what} supports only "
                     f"{key} in {list(allowed)}; this checkpoint's architecture differs")
  return value


# --- BERT (Devlin et al. 2019): HF BertModel / BertForPreTraining <-> fmjax.models.bert. ---

_BERT_LAYER = "bert.encoder.layer.{i}."
_BERT_BLOCK = "bert/blocks/layer_{i}/"
_BERT_ENCODER = [
    rule("bert.embeddings.word_embeddings.weight", "bert/word_embeddings/embedding"),
    rule("bert.embeddings.position_embeddings.weight", "bert/position_embeddings/embedding"),
    rule("bert.embeddings.token_type_embeddings.weight", "bert/token_type_embeddings/embedding"),
    rule("bert.embeddings.LayerNorm.weight", "bert/ln_embed/scale"),
    rule("bert.embeddings.LayerNorm.bias", "bert/ln_embed/bias"),
    *[r for name in ("query", "key", "value") for r in (
        rule(_BERT_LAYER + f"attention.self.{name}.weight", _BERT_BLOCK + f"attn/{name}/kernel",
             LINEAR),
        rule(_BERT_LAYER + f"attention.self.{name}.bias", _BERT_BLOCK + f"attn/{name}/bias",
             FLAT))],
    rule(_BERT_LAYER + "attention.output.dense.weight", _BERT_BLOCK + "attn/out/kernel",
         Matrix(n_in=2)),
    rule(_BERT_LAYER + "attention.output.dense.bias", _BERT_BLOCK + "attn/out/bias"),
    rule(_BERT_LAYER + "attention.output.LayerNorm.weight", _BERT_BLOCK + "ln_attn/scale"),
    rule(_BERT_LAYER + "attention.output.LayerNorm.bias", _BERT_BLOCK + "ln_attn/bias"),
    rule(_BERT_LAYER + "intermediate.dense.weight", _BERT_BLOCK + "mlp/wi/kernel", LINEAR),
    rule(_BERT_LAYER + "intermediate.dense.bias", _BERT_BLOCK + "mlp/wi/bias"),
    rule(_BERT_LAYER + "output.dense.weight", _BERT_BLOCK + "mlp/wo/kernel", LINEAR),
    rule(_BERT_LAYER + "output.dense.bias", _BERT_BLOCK + "mlp/wo/bias"),
    rule(_BERT_LAYER + "output.LayerNorm.weight", _BERT_BLOCK + "ln_mlp/scale"),
    rule(_BERT_LAYER + "output.LayerNorm.bias", _BERT_BLOCK + "ln_mlp/bias"),
]
_BERT_POOLER = [  # BertModel's; HF's BertForMaskedLM and BertForQuestionAnswering have none
    rule("bert.pooler.dense.weight", "bert/pooler/kernel", LINEAR),
    rule("bert.pooler.dense.bias", "bert/pooler/bias"),
]
_BERT_MLM = [  # MLM transform + output bias (the decoder is tied to the word embedding)
    rule("cls.predictions.transform.dense.weight", "mlm_dense/kernel", LINEAR),
    rule("cls.predictions.transform.dense.bias", "mlm_dense/bias"),
    rule("cls.predictions.transform.LayerNorm.weight", "mlm_ln/scale"),
    rule("cls.predictions.transform.LayerNorm.bias", "mlm_ln/bias"),
    rule("cls.predictions.bias", "mlm_bias"),
]
_BERT_NSP = [rule("cls.seq_relationship.weight", "nsp_dense/kernel", LINEAR),
             rule("cls.seq_relationship.bias", "nsp_dense/bias")]
_BERT_CLASSIFIER = [rule("classifier.weight", "classifier/dense/kernel", LINEAR),  # (C, D)
                    rule("classifier.bias", "classifier/dense/bias")]
_BERT_SPAN = [rule("qa_outputs.weight", "qa_outputs/dense/kernel", LINEAR),  # (2, D): start, end
              rule("qa_outputs.bias", "qa_outputs/dense/bias")]


def _bert_config(hf: dict) -> BertConfig:
  _require(hf, "hidden_act", ("gelu", "gelu_python"), "BERT (exact erf GELU)")
  _require(hf, "position_embedding_type", ("absolute",), "BERT (learned absolute positions)")
  _require(hf, "is_decoder", (False,), "BERT (a bidirectional encoder)")
  _require(hf, "add_cross_attention", (False,), "BERT (no cross-attention)")
  _require(hf, "tie_word_embeddings", (True,), "BERT (MLM decoder tied to the word embedding)")
  d, n = _get(hf, "hidden_size", 768), _get(hf, "num_attention_heads", 12)
  if d % n:
    raise ValueError(f"config.json has hidden_size={d} not divisible by num_attention_heads={n}")
  return BertConfig(
      vocab_size=_get(hf, "vocab_size", 30522), max_len=_get(hf, "max_position_embeddings", 512),
      type_vocab_size=_get(hf, "type_vocab_size", 2), num_layers=_get(hf, "num_hidden_layers", 12),
      num_heads=n, embed_dim=d, mlp_dim=_get(hf, "intermediate_size", 3072),
      norm_eps=_get(hf, "layer_norm_eps", 1e-12))


def _bert_hf_config(c: BertConfig) -> dict:
  return {
      "vocab_size": c.vocab_size, "hidden_size": c.embed_dim, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "intermediate_size": c.mlp_dim, "hidden_act": "gelu",
      # Dropout is fmjax's Runtime, not the architecture: written as BERT trains (0.1).
      "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
      "max_position_embeddings": c.max_len, "type_vocab_size": c.type_vocab_size,
      "layer_norm_eps": c.norm_eps, "position_embedding_type": "absolute",
      "initializer_range": 0.02, "tie_word_embeddings": True}


_BERT_PRETRAINING = Variant("BertForPreTraining", BertForPreTraining, root="", base_model=False,
                            rules=lambda c: _BERT_ENCODER + _BERT_POOLER + _BERT_MLM + _BERT_NSP)
_BERT_ENCODER_ONLY = Variant("BertModel", BertEncoder, root="bert", base_model=True,
                             rules=lambda c: _BERT_ENCODER + _BERT_POOLER)
_BERT_MASKED_LM = Variant("BertForMaskedLM", BertForMaskedLM, root="", base_model=False,
                          rules=lambda c: _BERT_ENCODER + _BERT_MLM, head=("cls.predictions.",))
_BERT_SEQUENCE_CLASSIFIER = Variant(
    "BertForSequenceClassification", BertForSequenceClassification, root="", base_model=False,
    rules=lambda c: _BERT_ENCODER + _BERT_POOLER + _BERT_CLASSIFIER, head=("classifier.",),
    labels=Labels(build=BertForSequenceClassification, count=lambda m: m.num_labels))
_BERT_QUESTION_ANSWERING = Variant(
    "BertForQuestionAnswering", BertForQuestionAnswering, root="", base_model=False,
    rules=lambda c: _BERT_ENCODER + _BERT_SPAN, head=("qa_outputs.",))


def _bert_variant(config: BertConfig, names: set[str]) -> Variant:
  """The class the checkpoint was saved from, told by its heads."""
  has = lambda prefix: any(n.startswith(prefix) for n in names)
  if has("cls.predictions.") and has("cls.seq_relationship."):
    return _BERT_PRETRAINING
  if has("cls.predictions."):
    return _BERT_MASKED_LM
  if has("classifier."):
    return _BERT_SEQUENCE_CLASSIFIER
  if has("qa_outputs."):
    return _BERT_QUESTION_ANSWERING
  return _BERT_ENCODER_ONLY


BERT = Architecture(
    model_type="bert", prefix="bert.", heads=("cls.", "classifier.", "qa_outputs."),
    tied={"cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
          "cls.predictions.decoder.bias": "cls.predictions.bias"},
    ignored=lambda name: name == "bert.embeddings.position_ids",
    variants=(_BERT_PRETRAINING, _BERT_ENCODER_ONLY, _BERT_MASKED_LM, _BERT_SEQUENCE_CLASSIFIER,
              _BERT_QUESTION_ANSWERING),
    config_from_hf=_bert_config, config_to_hf=_bert_hf_config, variant=_bert_variant)


# --- GPT-2 (Radford et al. 2019): HF GPT2LMHeadModel / GPT2Model <-> fmjax.models.gpt.GPT. ---

_GPT2_LAYER = "transformer.h.{i}."
_GPT2_BLOCK = "blocks/layer_{i}/"
_QKV = ("query", "key", "value")
_GPT2 = [
    rule("transformer.wte.weight", "wte/embedding"),
    rule("transformer.wpe.weight", "wpe/embedding"),
    rule(_GPT2_LAYER + "ln_1.weight", _GPT2_BLOCK + "ln_attn/scale"),
    rule(_GPT2_LAYER + "ln_1.bias", _GPT2_BLOCK + "ln_attn/bias"),
    rule(_GPT2_LAYER + "attn.c_attn.weight", [_GPT2_BLOCK + f"attn/{n}/kernel" for n in _QKV],
         CONV1D),  # (D, 3 D) = [query | key | value]
    rule(_GPT2_LAYER + "attn.c_attn.bias", [_GPT2_BLOCK + f"attn/{n}/bias" for n in _QKV], FLAT),
    rule(_GPT2_LAYER + "attn.c_proj.weight", _GPT2_BLOCK + "attn/out/kernel",
         Matrix(n_in=2, transpose=False)),
    rule(_GPT2_LAYER + "attn.c_proj.bias", _GPT2_BLOCK + "attn/out/bias"),
    rule(_GPT2_LAYER + "ln_2.weight", _GPT2_BLOCK + "ln_mlp/scale"),
    rule(_GPT2_LAYER + "ln_2.bias", _GPT2_BLOCK + "ln_mlp/bias"),
    rule(_GPT2_LAYER + "mlp.c_fc.weight", _GPT2_BLOCK + "mlp/wi/kernel", CONV1D),
    rule(_GPT2_LAYER + "mlp.c_fc.bias", _GPT2_BLOCK + "mlp/wi/bias"),
    rule(_GPT2_LAYER + "mlp.c_proj.weight", _GPT2_BLOCK + "mlp/wo/kernel", CONV1D),
    rule(_GPT2_LAYER + "mlp.c_proj.bias", _GPT2_BLOCK + "mlp/wo/bias"),
    rule("transformer.ln_f.weight", "ln_f/scale"),
    rule("transformer.ln_f.bias", "ln_f/bias"),
]
_GPT2_LM_HEAD = rule("lm_head.weight", "lm_head/kernel", LINEAR)  # only when untied

# HF activation_function <-> fmjax mlp_activation ("gelu_new" is the tanh approximation).
_GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu",
                     "relu": "relu", "silu": "silu", "swish": "silu"}
_GPT2_ACTIVATION_NAMES = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}


def _gpt2_config(hf: dict) -> GPTConfig:
  act = _require(hf, "activation_function", tuple(_GPT2_ACTIVATIONS), "GPT")
  # fmjax's GPT hard-codes LayerNorm eps 1e-5 (GPT-2's value) and the 1/sqrt(H) logit scale.
  _require(hf, "layer_norm_epsilon", (1e-5,), "GPT (LayerNorm epsilon fixed at 1e-5)")
  _require(hf, "scale_attn_weights", (True,), "GPT (attention logits scaled by 1/sqrt(H))")
  _require(hf, "scale_attn_by_inverse_layer_idx", (False,), "GPT (no per-layer logit scaling)")
  _require(hf, "add_cross_attention", (False,), "GPT (no cross-attention)")
  d, n = _get(hf, "n_embd", 768), _get(hf, "n_head", 12)
  if d % n:
    raise ValueError(f"config.json has n_embd={d} not divisible by n_head={n}")
  return GPTConfig(
      vocab_size=_get(hf, "vocab_size", 50257), max_len=_get(hf, "n_positions", 1024),
      num_layers=_get(hf, "n_layer", 12), num_heads=n, embed_dim=d,
      mlp_dim=_get(hf, "n_inner", 4 * d), mlp_activation=_GPT2_ACTIVATIONS[act],
      tie_embeddings=bool(_get(hf, "tie_word_embeddings", True)))


def _gpt2_hf_config(c: GPTConfig) -> dict:
  checks = [  # (field, value, ok, what GPT-2 needs)
      ("position", c.position, c.position == "learned", "'learned'"),
      ("norm", c.norm, c.norm == "layer", "'layer'"),
      ("gated_mlp", c.gated_mlp, not c.gated_mlp, "False"),
      ("use_bias", c.use_bias, c.use_bias, "True"),
      ("num_kv_heads", c.num_kv_heads, c.num_kv_heads in (None, c.num_heads),
       f"None or num_heads={c.num_heads}"),
      ("mlp_activation", c.mlp_activation, c.mlp_activation in _GPT2_ACTIVATION_NAMES,
       f"one of {sorted(_GPT2_ACTIVATION_NAMES)}")]
  for field, value, ok, needed in checks:
    if not ok:
      raise ValueError(f"GPTConfig.{field}={value!r} has no GPT-2 equivalent in transformers "
                       f"(GPT-2 needs {field} = {needed}); only GPT-2-shaped GPTs can be exported")
  return {
      "vocab_size": c.vocab_size, "n_positions": c.max_len, "n_embd": c.embed_dim,
      "n_layer": c.num_layers, "n_head": c.num_heads, "n_inner": c.mlp_dim,
      "activation_function": _GPT2_ACTIVATION_NAMES[c.mlp_activation],
      "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.0,  # GPT-2's (Runtime's in fmjax)
      "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
      "tie_word_embeddings": c.tie_embeddings, "initializer_range": 0.02,
      "bos_token_id": None, "eos_token_id": None}  # fmjax's GPT does not know its tokenizer


_GPT2_LM = Variant("GPT2LMHeadModel", GPT, root="", base_model=False,
                   rules=lambda c: _GPT2 + ([] if c.tie_embeddings else [_GPT2_LM_HEAD]))

GPT2 = Architecture(
    model_type="gpt2", prefix="transformer.", heads=("lm_head.",),
    tied={"lm_head.weight": "transformer.wte.weight"},
    ignored=lambda name: name.endswith((".attn.bias", ".attn.masked_bias")),  # causal-mask buffers
    variants=(_GPT2_LM,), config_from_hf=_gpt2_config, config_to_hf=_gpt2_hf_config,
    variant=lambda config, names: _GPT2_LM)


# --- ViT (Dosovitskiy et al. 2021): HF ViTModel / ViTForImageClassification <-> fmjax.models.vit. ---

_VIT_LAYER = "vit.encoder.layer.{i}."
_VIT_BLOCK = "encoder/blocks/layer_{i}/"
_VIT_ENCODER = [
    rule("vit.embeddings.patch_embeddings.projection.weight", "encoder/patch_embed/kernel",
         Conv2d()),  # (D, C, P, P)
    rule("vit.embeddings.patch_embeddings.projection.bias", "encoder/patch_embed/bias"),
    rule("vit.embeddings.cls_token", "encoder/cls", Unsqueezed(2)),
    rule("vit.embeddings.position_embeddings", "encoder/posemb", Unsqueezed(1)),
    *[r for name in _QKV for r in (
        rule(_VIT_LAYER + f"attention.attention.{name}.weight", _VIT_BLOCK + f"attn/{name}/kernel",
             LINEAR),
        rule(_VIT_LAYER + f"attention.attention.{name}.bias", _VIT_BLOCK + f"attn/{name}/bias",
             FLAT))],
    rule(_VIT_LAYER + "attention.output.dense.weight", _VIT_BLOCK + "attn/out/kernel",
         Matrix(n_in=2)),
    rule(_VIT_LAYER + "attention.output.dense.bias", _VIT_BLOCK + "attn/out/bias"),
    rule(_VIT_LAYER + "layernorm_before.weight", _VIT_BLOCK + "ln_attn/scale"),
    rule(_VIT_LAYER + "layernorm_before.bias", _VIT_BLOCK + "ln_attn/bias"),
    rule(_VIT_LAYER + "intermediate.dense.weight", _VIT_BLOCK + "mlp/wi/kernel", LINEAR),
    rule(_VIT_LAYER + "intermediate.dense.bias", _VIT_BLOCK + "mlp/wi/bias"),
    rule(_VIT_LAYER + "output.dense.weight", _VIT_BLOCK + "mlp/wo/kernel", LINEAR),
    rule(_VIT_LAYER + "output.dense.bias", _VIT_BLOCK + "mlp/wo/bias"),
    rule(_VIT_LAYER + "layernorm_after.weight", _VIT_BLOCK + "ln_mlp/scale"),
    rule(_VIT_LAYER + "layernorm_after.bias", _VIT_BLOCK + "ln_mlp/bias"),
    rule("vit.layernorm.weight", "encoder/ln_final/scale"),
    rule("vit.layernorm.bias", "encoder/ln_final/bias"),
]
_VIT_HEAD = [rule("classifier.weight", "head/kernel", LINEAR), rule("classifier.bias", "head/bias")]


def _square(hf: dict, key: str, default: int) -> int:
  value = _get(hf, key, default)
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"config.json has {key}={value!r}; fmjax's ViT supports only square "
                       f"{key.split('_')[0]}s")
    value = value[0]
  return int(value)


def _vit_config(hf: dict) -> ViTConfig:
  _require(hf, "hidden_act", ("gelu",), "ViT (exact erf GELU)")
  _require(hf, "qkv_bias", (True,), "ViT (query, key and value with biases)")
  num_classes = num_labels_of(hf)
  return ViTConfig(
      image_size=_square(hf, "image_size", 224), patch_size=_square(hf, "patch_size", 16),
      num_channels=_get(hf, "num_channels", 3), num_classes=num_classes, pool="cls",
      num_layers=_get(hf, "num_hidden_layers", 12), num_heads=_get(hf, "num_attention_heads", 12),
      embed_dim=_get(hf, "hidden_size", 768), mlp_dim=_get(hf, "intermediate_size", 3072),
      norm_eps=_get(hf, "layer_norm_eps", 1e-12))


def _vit_hf_config(c: ViTConfig) -> dict:
  if c.pool != "cls":
    raise ValueError(f"ViTConfig.pool={c.pool!r} has no equivalent in transformers, whose ViT "
                     "classifies from the [CLS] token (pool='cls'); only those can be exported")
  return {
      "hidden_size": c.embed_dim, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "intermediate_size": c.mlp_dim, "hidden_act": "gelu",
      "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,  # ViT's (Runtime's in fmjax)
      "initializer_range": 0.02,
      "layer_norm_eps": c.norm_eps, "image_size": c.image_size, "patch_size": c.patch_size,
      "num_channels": c.num_channels, "qkv_bias": True, "encoder_stride": c.patch_size,
      "id2label": {str(i): f"LABEL_{i}" for i in range(c.num_classes)},
      "label2id": {f"LABEL_{i}": i for i in range(c.num_classes)}}


_VIT_CLASSIFIER = Variant(
    "ViTForImageClassification", ViT, root="", base_model=False,
    rules=lambda c: _VIT_ENCODER + (_VIT_HEAD if c.num_classes else []), head=("classifier.",),
    labels=Labels(build=lambda c, n, **kw: ViT(dataclasses.replace(c, num_classes=n), **kw),
                  count=lambda m: m.config.num_classes))
# HF's ViTModel also has a pooler, tanh(Dense([CLS])): the paper's pre-training pre-logits
# layer, which ViTForImageClassification drops. fmjax's encoder has none: it is not read, and
# an exported ViTModel lacks it (transformers then initialises a fresh one).
_VIT_ENCODER_ONLY = Variant("ViTModel", ViTEncoder, root="encoder", base_model=True,
                            rules=lambda c: _VIT_ENCODER)


def _vit_example_input(c: ViTConfig):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.num_channels), np.float32)


VIT = Architecture(
    model_type="vit", prefix="vit.", heads=("classifier.",), tied={},
    ignored=lambda name: name.startswith("vit.pooler.") or name == "vit.embeddings.mask_token",
    variants=(_VIT_CLASSIFIER, _VIT_ENCODER_ONLY), config_from_hf=_vit_config,
    config_to_hf=_vit_hf_config,
    variant=lambda config, names: (_VIT_CLASSIFIER if any(n.startswith("classifier.")
                                                          for n in names) else _VIT_ENCODER_ONLY),
    modality="image", example_input=_vit_example_input)


# The decoder families (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text) have their
# own table module, fmjax/hf/decoders.py; fmjax/hf/weights.py joins both registries.
ARCHITECTURES = {a.model_type: a for a in (BERT, GPT2, VIT)}

# from_pretrained(task=...): task -> {model_type: the Variant it builds}. A checkpoint without
# the task's head (e.g. a BertModel for "classification") gets a freshly initialised one.
TASKS = {
    "causal_lm": {"gpt2": _GPT2_LM},  # GPT with its (tied) LM head
    "masked_lm": {"bert": _BERT_MASKED_LM},  # logits at every position, or the masked ones
    "classification": {"bert": _BERT_SEQUENCE_CLASSIFIER},  # num_labels; 1 = regression
    "question_answering": {"bert": _BERT_QUESTION_ANSWERING},  # start and end logits
    "image_classification": {"vit": _VIT_CLASSIFIER},  # num_labels classes
}
