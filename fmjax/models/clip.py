"""CLIP: a contrastive image-text dual encoder (Radford et al. 2021, "Learning Transferable
Visual Models From Natural Language Supervision").

Shape key: B batch, T text length, D width, E joint embedding width, K classes, P prompts.

image (B, S, S, C) -> ViTEncoder -> [CLS] output (pool="cls") or patch mean ("gap") (B, D_img)
                   -> linear projection, no bias -> L2-normalise = I (B, E)
text (B, T) ids    -> token embedding + learned positions -> Transformer stack (padding
                      masked; causal or not) -> final LayerNorm -> pool (B, D_txt)
                   -> linear projection, no bias -> L2-normalise = X (B, E)
logits = exp(t) * I @ X.T (B images x B texts), t the learned log inverse temperature,
         initialised to log(1 / 0.07) and clamped so exp(t) <= 100 (section 2.5)
loss   = (CE(logits, arange(B)) + CE(logits.T, arange(B))) / 2   (figure 3's pseudocode)

The text tower pools the last real token (pool="eos": `tokenize` ends every text with EOS,
so that is the EOS token, CLIP's choice, the one token that has seen the whole text under a
causal mask) or the mean over the real tokens (pool="mean"). CLIP clips the parameter t after
each step; here the clamp is in the forward pass (jnp.minimum), which gives the same logits
and stops t's gradient while it is clamped.

Zero-shot classification (section 3.1.4): each class's prompts ("a photo of the digit {}"
with "seven" and "7", ...) embedded, averaged and renormalised (`zero_shot_classifier`);
an image's class is its nearest class embedding (`zero_shot_predict`).
"""

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import transformer
from fmjax.layers import Dense, Embed, Norm, partitioned
from fmjax.models import vit
from fmjax.runtime import Runtime
from fmjax.transformer import BlockConfig, TransformerStack

POOLS = ("eos", "mean")
MAX_LOGIT_SCALE = 100.0  # exp(t) is clamped here, as in CLIP


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The text tower; how it runs is a Runtime."""
  vocab_size: int = 256  # V
  vocab_multiple: int = 128  # table rows padded to a multiple (see layers.Embed)
  max_length: int = 16  # T at most: the learned positions
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 64  # D of the text tower
  mlp_dim: int = 256
  causal: bool = False  # CLIP's own text tower is causal (and pools EOS)
  pool: str = "eos"  # "eos": the last real token | "mean": the mean over real tokens

  def __post_init__(self):
    transformer.check_config(
        self, positive=("vocab_size", "vocab_multiple", "max_length", "num_layers",
                        "num_heads", "embed_dim", "mlp_dim"), choices={"pool": POOLS})

  def block(self, runtime: Runtime) -> BlockConfig:
    """The BlockConfig of the text layers: pre-LN, LayerNorm, GELU, padding masked.

    Args:
      runtime: how the model runs (dropout, kernel, dtypes).

    Returns:
      The BlockConfig shared by the num_layers blocks.
    """
    return BlockConfig(num_heads=self.num_heads, head_dim=self.embed_dim // self.num_heads,
                       mlp_dim=self.mlp_dim, causal=self.causal, pre_ln=True,
                       mlp_activation="gelu", **runtime.block_fields())


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """The architecture: both towers and the joint embedding space."""
  text: TextConfig = TextConfig()
  image: vit.ViTConfig = vit.ViTConfig(image_size=32, patch_size=8, num_channels=3,
                                       num_classes=0, num_layers=2, num_heads=4, embed_dim=64,
                                       mlp_dim=256)
  embed_dim: int = 64  # E, the joint space
  init_temperature: float = 0.07  # logit_scale starts at log(1 / init_temperature)

  def __post_init__(self):
    transformer.check_config(self, positive=("embed_dim",))
    if self.image.num_classes != 0:
      raise ValueError(f"CLIPConfig.image.num_classes={self.image.num_classes}: the image tower "
                       "has no classifier head; set it to 0")
    if not (isinstance(self.init_temperature, (int, float)) and
            1 / MAX_LOGIT_SCALE <= self.init_temperature < math.inf):
      raise ValueError(f"CLIPConfig.init_temperature={self.init_temperature!r}: must be a "
                       f"number >= {1 / MAX_LOGIT_SCALE} (the logit scale is at most "
                       f"{MAX_LOGIT_SCALE:g}); CLIP uses 0.07")


PRESETS = {
    # 32 x 32 RGB in 8 x 8 patches, 2 + 2 layers 64 wide: seconds on a CPU.
    "tiny": CLIPConfig(),
    # MNIST padded to 32 x 32 grey in 8 x 8 patches (configs/clip.py:digits).
    "digits": CLIPConfig(
        text=TextConfig(num_layers=2, num_heads=4, embed_dim=64, mlp_dim=256),
        image=vit.ViTConfig(image_size=32, patch_size=8, num_channels=1, num_classes=0,
                            pool="gap", num_layers=4, num_heads=4, embed_dim=64, mlp_dim=256),
        embed_dim=64),
}


def get_config(name: str, **overrides) -> CLIPConfig:
  """A preset by name with field overrides, e.g. get_config("tiny", embed_dim=32).

  Args:
    name: a key of PRESETS: "tiny" or "digits".
    **overrides: CLIPConfig fields to replace (text= and image= take whole configs).

  Returns:
    The CLIPConfig.

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown CLIP preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def normalize(x):
  """x / ||x|| over the last axis, in float32 (a zero row stays zero).

  Args:
    x: (..., E) float.

  Returns:
    (..., E) float32 rows of unit L2 norm.
  """
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), 1e-12))


class TextEncoder(nn.Module):
  """Token embedding, learned positions, the Transformer stack, final LayerNorm and pooling."""
  config: TextConfig
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, tokens, mask, *, train: bool = False):
    """Pooled text representations.

    Args:
      tokens: (B, T) int ids, T <= max_length.
      mask: (B, T) bool, True on real tokens (a prefix of each row), False on padding.
      train: enables dropout.

    Returns:
      (B, D) pooled representations in the compute dtype.

    Raises:
      ValueError: T > max_length.
    """
    c, rt = self.config, self.runtime
    t = tokens.shape[1]
    if t > c.max_length:
      raise ValueError(f"tokens have length {t} but the text tower has {c.max_length} "
                       "positions (TextConfig.max_length); truncate the texts (`tokenize`)")
    embed = Embed(c.vocab_size, c.embed_dim, embedding_init=nn.initializers.normal(0.02),
                  dtype=rt.compute_dtype, param_dtype=rt.params_dtype,
                  pad_to_multiple=c.vocab_multiple, name="embed")
    posemb = self.param("posemb", partitioned(nn.initializers.normal(0.01), (None, "embed")),
                        (c.max_length, c.embed_dim), rt.params_dtype)  # (T_max, D)
    x = embed(tokens) + jnp.asarray(posemb[:t], rt.compute_dtype)[None]
    x = nn.Dropout(rt.dropout_rate)(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    x = TransformerStack(c.block(rt), c.num_layers, scan=rt.scan_layers,
                         remat_policy=rt.remat_policy, name="blocks")(x, kv_mask=mask,
                                                                       train=train)
    x = Norm("layer", epsilon=1e-5, dtype=rt.compute_dtype, param_dtype=rt.params_dtype,
             name="ln_final")(x)  # (B, T, D)
    if c.pool == "mean":
      weights = mask.astype(x.dtype)[..., None]
      return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
    last = jnp.maximum(jnp.sum(mask, axis=1) - 1, 0)  # (B,) the EOS: the last real token
    return jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]


class CLIP(nn.Module):
  """The dual encoder: towers "image" (ViTEncoder) and "text", projections, logit_scale."""
  config: CLIPConfig
  runtime: Runtime = Runtime()

  def setup(self):
    c, rt = self.config, self.runtime
    self.image = vit.ViTEncoder(c.image, rt)
    self.text = TextEncoder(c.text, rt)
    proj = lambda: Dense(c.embed_dim, ("embed", None), use_bias=False,
                         kernel_init=nn.initializers.lecun_normal(), dtype=rt.compute_dtype,
                         param_dtype=rt.params_dtype)
    self.image_proj, self.text_proj = proj(), proj()
    self.logit_scale = self.param(
        "logit_scale", partitioned(nn.initializers.constant(-math.log(c.init_temperature)), ()),
        (), jnp.float32)

  def encode_image(self, images, *, train: bool = False):
    """Image embeddings.

    Args:
      images: (B, S, S, C) float in [-1, 1], channels last (S, C the ViT's).
      train: enables dropout.

    Returns:
      (B, E) float32, each row of unit L2 norm.
    """
    x = self.image(images, train=train)  # (B, T, D_img)
    pooled = x[:, 0] if self.config.image.pool == "cls" else x.mean(axis=1)
    return normalize(self.image_proj(pooled))

  def encode_text(self, tokens, mask, *, train: bool = False):
    """Text embeddings.

    Args:
      tokens: (B, T) int ids, each text ending in EOS (`tokenize`).
      mask: (B, T) bool, False on padding.
      train: enables dropout.

    Returns:
      (B, E) float32, each row of unit L2 norm.
    """
    return normalize(self.text_proj(self.text(tokens, mask, train=train)))

  def scale(self):
    """exp(logit_scale), clamped at MAX_LOGIT_SCALE.

    Returns:
      A float32 scalar.
    """
    return jnp.exp(jnp.minimum(self.logit_scale, math.log(MAX_LOGIT_SCALE)))

  def __call__(self, images, tokens, mask, *, train: bool = False):
    """Image-text similarity logits of every pair in the batch.

    Args:
      images: (B, S, S, C) float in [-1, 1].
      tokens, mask: (B', T) int ids and (B', T) bool, False on padding.
      train: enables dropout.

    Returns:
      (B, B') float32: scale * cos(image i, text j).
    """
    image = self.encode_image(images, train=train)
    text = self.encode_text(tokens, mask, train=train)
    return self.scale() * jnp.einsum("BE,CE->BC", image, text)


def contrastive_loss(logits):
  """CLIP's symmetric cross-entropy: image i's text is text i and text i's image is image i.

  Args:
    logits: (B, B) float, rows images, columns texts.

  Returns:
    The float32 scalar (CE(rows) + CE(columns)) / 2, each CE a mean over the batch.
  """
  logits = logits.astype(jnp.float32)
  diagonal = jnp.diagonal(logits)
  image_to_text = jnp.mean(jax.nn.logsumexp(logits, axis=1) - diagonal)
  text_to_image = jnp.mean(jax.nn.logsumexp(logits, axis=0) - diagonal)
  return (image_to_text + text_to_image) / 2


def retrieval_accuracy(logits):
  """In-batch top-1 retrieval: the share of images whose best text is their own, and of texts.

  Args:
    logits: (B, B) float, rows images, columns texts.

  Returns:
    (image->text accuracy, text->image accuracy), float32 scalars.
  """
  target = jnp.arange(logits.shape[0])
  return (jnp.mean(jnp.argmax(logits, axis=1) == target, dtype=jnp.float32),
          jnp.mean(jnp.argmax(logits, axis=0) == target, dtype=jnp.float32))


def tokenize(tokenizer, texts: Sequence[str], max_length: int):
  """Texts as the text tower's input: each text's ids (the first max_length - 1) and EOS.

  Args:
    tokenizer: an fmjax.data tokenizer (encode_batch, eos_id, pad_id).
    texts: the texts.
    max_length: T, the padded length (the text tower's max_length).

  Returns:
    (tokens (B, T) int32 padded with pad_id, mask (B, T) bool True on the real tokens).
  """
  ids = [row[:max_length - 1] + [tokenizer.eos_id] for row in tokenizer.encode_batch(list(texts))]
  tokens = np.full((len(ids), max_length), tokenizer.pad_id, np.int32)
  mask = np.zeros((len(ids), max_length), bool)
  for i, row in enumerate(ids):
    tokens[i, :len(row)], mask[i, :len(row)] = row, True
  return tokens, mask


def class_embeddings(prompt_embeddings):
  """Zero-shot class embeddings from the embeddings of each class's prompts.

  Args:
    prompt_embeddings: (K, P, E) unit-norm embeddings of P prompts for each of K classes.

  Returns:
    (K, E) float32: each class's mean prompt embedding, renormalised.
  """
  return normalize(jnp.mean(jnp.asarray(prompt_embeddings, jnp.float32), axis=1))


def zero_shot_classifier(model, params, tokenizer, classnames, templates: Sequence[str]):
  """CLIP's zero-shot classifier: every template filled with every name of a class.

  Args:
    model, params: a CLIP module and its parameters.
    tokenizer: the texts' tokenizer (see `tokenize`).
    classnames: one entry per class: a name, or a sequence of names (e.g. ("seven", "7")).
    templates: prompts with "{}" for the name, e.g. "a photo of the digit {}".

  Returns:
    (K, E) float32 class embeddings (`class_embeddings`).
  """
  names = [(n,) if isinstance(n, str) else tuple(n) for n in classnames]
  if len({len(n) for n in names}) != 1:
    raise ValueError(f"classnames give {sorted({len(n) for n in names})} names per class; "
                     "give every class the same number of names")
  prompts = [t.format(n) for class_names in names for n in class_names for t in templates]
  tokens, mask = tokenize(tokenizer, prompts, model.config.text.max_length)
  text = model.apply({"params": params}, tokens, mask, method="encode_text")
  return class_embeddings(text.reshape(len(names), -1, text.shape[-1]))


def zero_shot_predict(image_embeddings, class_embeddings_):
  """The nearest class of each image.

  Args:
    image_embeddings: (B, E) unit-norm image embeddings.
    class_embeddings_: (K, E) unit-norm class embeddings.

  Returns:
    (B,) int32 class indices: argmax over k of cos(image, class k).
  """
  return jnp.argmax(jnp.einsum("BE,KE->BK", image_embeddings, class_embeddings_),
                    axis=1).astype(jnp.int32)


def score(model, params, images, tokens, mask):
  """How well each image matches its text: the cosine of their embeddings (e.g. to rank
  generated candidates).

  Args:
    model, params: a CLIP module and its parameters.
    images: (B, S, S, C) float in [-1, 1], the model's image size and channels.
    tokens, mask: (B, T) int ids and (B, T) bool (`tokenize`); row i is image i's text.

  Returns:
    (B,) float32 cosine similarities in [-1, 1].
  """
  image = model.apply({"params": params}, images, method="encode_image")
  text = model.apply({"params": params}, tokens, mask, method="encode_text")
  return jnp.sum(image * text, axis=-1)


def flops_per_example(c: CLIPConfig, text_length: int) -> float:
  """Training FLOPs of one image-text pair: both towers (6 x matmul params x tokens plus
  attention), projections; the B x B logits are left out.

  Args:
    c: the config.
    text_length: T, the padded text length.

  Returns:
    FLOPs per example, a float.
  """
  t = c.text
  text = 6.0 * t.num_layers * (4 * t.embed_dim ** 2 + 2 * t.embed_dim * t.mlp_dim) * text_length
  text += 12.0 * t.num_layers * text_length ** 2 * t.embed_dim
  projections = 6.0 * c.embed_dim * (t.embed_dim + c.image.embed_dim)
  return vit.flops_per_token(c.image) * c.image.num_tokens + text + projections
