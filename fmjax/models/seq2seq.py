"""Encoder-decoder Transformer (Vaswani et al. 2017, "Attention Is All You Need"), for
translation, and the same text decoder over a ViT encoder for image captioning.

Shape key: B batch, S source length, T target length, D width, F MLP width, N heads,
H head dim, V vocab.

source ids -> embedding * sqrt(D) + sinusoidal positions -> dropout
           -> L_enc bidirectional blocks (source padding masked) -> final norm  = memory (B, S, D)
target ids -> embedding * sqrt(D) + sinusoidal positions -> dropout
           -> L_dec DecoderBlocks: causal self-attention, cross-attention over memory, MLP
           -> final norm -> logits through the target embedding (tied output, section 3.4)

With one shared vocabulary (source_vocab_size=0) the encoder, the decoder and the output
share one embedding table, as in the paper's WMT models. Blocks are pre-LN (Xiong et al.
2020) rather than the paper's post-LN: they train without a long warmup.

Decoding (fmjax/generate.py, `generate_tokens(..., source=model.encode(...))`): the first
`decode` call gets the encoded source, projects each layer's cross-attention keys and values
into the cache once, and every later step reads them back.
"""

import dataclasses
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fmjax import transformer
from fmjax.layers import ACTIVATIONS, Embed, Norm, round_up
from fmjax.models import vit
from fmjax.runtime import Runtime
from fmjax.transformer import BlockConfig, DecoderBlock, TransformerStack, init_decoder_cache


@dataclasses.dataclass(frozen=True)
class Seq2SeqConfig:
  """The architecture; how it runs (kernel, dtypes, dropout) is a Runtime. The paper trains
  with dropout 0.1: Runtime(dropout_rate=0.1)."""
  vocab_size: int = 32000  # V of the target side (and of the source when shared)
  vocab_multiple: int = 128  # table rows padded to a multiple (tensor parallelism); see Embed
  source_vocab_size: int = 0  # 0: one vocabulary and embedding for source, target and output
  encoder_layers: int = 6
  decoder_layers: int = 6
  num_heads: int = 8
  embed_dim: int = 512
  mlp_dim: int = 2048
  mlp_activation: str = "relu"
  pre_ln: bool = True

  def __post_init__(self):
    transformer.check_config(
        self, positive=("vocab_size", "decoder_layers", "num_heads", "embed_dim", "mlp_dim"),
        choices={"mlp_activation": tuple(ACTIVATIONS)})
    for field in ("source_vocab_size", "encoder_layers"):  # 0 allowed: shared / no encoder
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Seq2SeqConfig.{field}={value!r}: must be an integer >= 0")

  @property
  def padded_vocab_size(self) -> int:
    """Vp, the rows of the embedding and LM head: vocab_size rounded up to vocab_multiple."""
    return round_up(self.vocab_size, self.vocab_multiple)

  @property
  def head_dim(self) -> int:
    """H, the width of one attention head: embed_dim // num_heads."""
    return self.embed_dim // self.num_heads

  def block(self, causal: bool, runtime: Runtime) -> BlockConfig:
    """The BlockConfig of the encoder's (causal=False) or decoder's (causal=True) layers.

    Args:
      causal: True for the decoder's self-attention, False for the encoder.
      runtime: how the model runs (its dropout rates, attention kernel and dtypes go in).

    Returns:
      The BlockConfig: LayerNorm, pre_ln and mlp_activation from this config.
    """
    return BlockConfig(
        num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim, causal=causal,
        pre_ln=self.pre_ln, mlp_activation=self.mlp_activation, **runtime.block_fields())


PRESETS = {
    "tiny": Seq2SeqConfig(vocab_size=256, encoder_layers=2, decoder_layers=2, num_heads=4,
                          embed_dim=64, mlp_dim=256),
    # Multi30k on a 2-core CPU (configs/translate.py:multi30k).
    "small": Seq2SeqConfig(vocab_size=8000, encoder_layers=3, decoder_layers=3, num_heads=4,
                           embed_dim=256, mlp_dim=1024),
    "base": Seq2SeqConfig(),  # the paper's base model: 6 + 6 layers, 512 wide, 8 heads, F 2048
}


def get_config(name: str, **overrides) -> Seq2SeqConfig:
  """A preset by name with field overrides, e.g. get_config("base", vocab_size=37000).

  Args:
    name: a key of PRESETS: "tiny", "small" or "base".
    **overrides: Seq2SeqConfig fields to replace.

  Returns:
    The Seq2SeqConfig (validated by its __post_init__).

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown Seq2Seq preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def sinusoidal_positions(positions, dim: int):
  """Section 3.5: PE(p, 2i) = sin(p / 10000^(2i/D)), PE(p, 2i+1) = cos(...).

  Args:
    positions: (B, T) int positions.
    dim: D, even.

  Returns:
    (B, T, D) float32, sines and cosines interleaved.
  """
  inv = 10_000.0 ** (-np.arange(0, dim, 2) / dim)  # (D/2,)
  angle = positions[..., None].astype(jnp.float32) * inv  # (B, T, D/2)
  return jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1).reshape(*positions.shape, dim)


def _embed_tokens(embed, ids, positions, dim, position_embed=None):
  x = embed(ids) * jnp.asarray(np.sqrt(dim), embed.dtype)  # (B, T, D)
  pos = (sinusoidal_positions(positions, dim) if position_embed is None
         else position_embed(positions))  # (B, T, D)
  return x + pos.astype(x.dtype)


def _arange(ids):
  return jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)


def _table(c: Seq2SeqConfig, rt: Runtime, vocab: int) -> Embed:
  return Embed(vocab, c.embed_dim, embedding_init=nn.initializers.normal(c.embed_dim ** -0.5),
               dtype=rt.compute_dtype, param_dtype=rt.params_dtype,
               pad_to_multiple=c.vocab_multiple)


def _check_runtime(model: str, rt: Runtime) -> None:
  if rt.scan_layers or rt.remat_policy != "none":
    raise ValueError(f"{model} runs its decoder layers in a Python loop without remat; got "
                     f"Runtime(scan_layers={rt.scan_layers}, remat_policy={rt.remat_policy!r}): "
                     "use scan_layers=False and remat_policy='none'")


class TextDecoder(nn.Module):
  """Target embedding, positions, DecoderBlocks, final norm and the tied output projection.

  `embed` is the target embedding table (owned by the parent, shared with the encoder when
  the vocabulary is). `position_embed` (owned by the parent too) maps (B, T) positions to
  (B, T, D) embeddings in place of the sinusoids: text_to_image.py's 2-D image-grid table."""
  config: Seq2SeqConfig
  embed: Embed
  runtime: Runtime = Runtime()
  position_embed: Callable | None = None

  @nn.compact
  def __call__(self, tokens, memory, memory_mask, *, positions=None, train: bool = False,
               cache=None, cache_index=None, kv_mask=None):
    """Target logits given the encoder output (teacher forcing, or one decoding step).

    Args:
      tokens: (B, T) int target ids (the decoder inputs, shifted right).
      memory: (B, S, D) float, the encoder output; while decoding, given on the first step
        only (None after: it is in the cache).
      memory_mask: (B, S) bool, False on source padding.
      positions: (B, T) int positions; default arange.
      train: enables dropout.
      cache: {"layer_i": {"self", "cross"}} from `init_decoder_cache` while decoding, or None.
      cache_index: int scalar, the target cache slot of the first of the T tokens.
      kv_mask: (B, S_tgt) bool, False for target cache slots holding padding, or None.

    Returns:
      (B, T, Vp) float32 logits (Vp: vocab_size padded to vocab_multiple, the padded ids
      -inf, see layers.Embed), or (logits, cache) with a cache.
    """
    c, rt = self.config, self.runtime
    positions = _arange(tokens) if positions is None else positions
    x = nn.Dropout(rt.dropout_rate)(_embed_tokens(self.embed, tokens, positions, c.embed_dim,
                                                  self.position_embed), deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    new_cache = None if cache is None else {}
    for i in range(c.decoder_layers):
      name = f"layer_{i}"
      x, layer_cache = DecoderBlock(c.block(True, rt), name=name)(
          x, memory, memory_mask, positions=positions, kv_mask=kv_mask, train=train,
          cache=None if cache is None else cache[name], cache_index=cache_index)
      if cache is not None:
        new_cache[name] = layer_cache
    x = Norm("layer", epsilon=1e-5, dtype=rt.compute_dtype, param_dtype=rt.params_dtype,
             name="ln_final")(x)
    logits = self.embed.attend(x).astype(jnp.float32)
    return logits if cache is None else (logits, new_cache)


class _Decodes:
  """`decode` and `init_cache` for fmjax.generate, shared by Seq2Seq and ImageCaptioner.

  The cache is the decoder layers' caches plus "source_mask", the (B, 1, S, 1) padding mask
  of the memory, laid out like a cache buffer so that beam search gathers its rows too.
  """

  def decode(self, tokens, cache, *, index, positions, kv_mask, source=None):
    """One decoding step (T tokens at cache slots index..index+T-1; T = 1 after the first).

    Args:
      tokens: (B, T) target ids. cache: from `init_cache`.
      index, positions, kv_mask: as GPT.decode (target slots).
      source: `encode`'s output, on the first call only: fills the cross-attention cache.
    Returns:
      (logits (B, Vp) float32 of the last token, cache).
    """
    memory = None if source is None else source["memory"]
    mask = cache["source_mask"][:, 0, :, 0]  # (B, S)
    layers = {k: v for k, v in cache.items() if k != "source_mask"}
    logits, layers = self.decoder(tokens, memory, mask, positions=positions, cache=layers,
                                  cache_index=index, kv_mask=kv_mask)
    return logits[:, -1], {**layers, "source_mask": cache["source_mask"]}

  def init_cache(self, *, batch: int, length: int, source):
    """Empty caches for `length` target slots over the encoded `source` (B = batch rows)."""
    c = self.config
    mask = source["mask"]  # (B, S)
    cache = init_decoder_cache(c.block(True, self.runtime), c.decoder_layers, batch=batch,
                               length=length, source_length=mask.shape[1])
    return {**cache, "source_mask": mask[:, None, :, None]}


class Seq2Seq(_Decodes, nn.Module):
  """The translation model: encoder, decoder, shared or separate embeddings."""
  config: Seq2SeqConfig
  runtime: Runtime = Runtime()

  def setup(self):
    c, rt = self.config, self.runtime
    _check_runtime("Seq2Seq", rt)
    self.embed = _table(c, rt, c.vocab_size)  # the target's, and the source's when shared
    if c.source_vocab_size:
      self.source_embed = _table(c, rt, c.source_vocab_size)
    self.dropout = nn.Dropout(rt.dropout_rate)
    self.encoder = TransformerStack(c.block(False, rt), c.encoder_layers)
    self.ln_encoder = Norm("layer", epsilon=1e-5, dtype=rt.compute_dtype,
                           param_dtype=rt.params_dtype)
    self.decoder = TextDecoder(c, self.embed, rt)

  def encode(self, source, source_mask, *, train: bool = False):
    """Encodes the source: embeddings, the bidirectional stack and the final norm.

    Args:
      source: (B, S) int source ids.
      source_mask: (B, S) bool, False on padding.
      train: enables dropout.

    Returns:
      {"memory": (B, S, D) in the compute dtype, "mask": source_mask}.
    """
    c = self.config
    embed = self.source_embed if c.source_vocab_size else self.embed
    x = _embed_tokens(embed, source, _arange(source), c.embed_dim)
    x = nn.with_logical_constraint(self.dropout(x, deterministic=not train),
                                   ("batch", "length", "act_embed"))
    x = self.encoder(x, kv_mask=source_mask, train=train)
    return {"memory": self.ln_encoder(x), "mask": source_mask}

  def __call__(self, source, source_mask, target_in, *, train: bool = False):
    """Teacher-forced logits of the decoder inputs given the source.

    Args:
      source: (B, S) int source ids.
      source_mask: (B, S) bool, False on padding.
      target_in: (B, T) int decoder inputs (the targets shifted right).
      train: enables dropout.

    Returns:
      (B, T, Vp) float32 logits, the padded ids -inf.
    """
    encoded = self.encode(source, source_mask, train=train)
    return self.decoder(target_in, encoded["memory"], encoded["mask"], train=train)


class ImageCaptioner(_Decodes, nn.Module):
  """A ViT encoder (fmjax/models/vit.py, no head) and the text decoder over its tokens."""
  config: Seq2SeqConfig  # the decoder (encoder fields unused)
  vit_config: vit.ViTConfig
  runtime: Runtime = Runtime()  # the encoder's and the decoder's

  def setup(self):
    c, rt = self.config, self.runtime
    _check_runtime("ImageCaptioner", rt)
    if self.vit_config.embed_dim != c.embed_dim:
      raise ValueError(f"the ViT width {self.vit_config.embed_dim} differs from the decoder's "
                       f"embed_dim {c.embed_dim}; make them equal")
    self.encoder = vit.ViTEncoder(self.vit_config, rt)
    self.embed = _table(c, rt, c.vocab_size)
    self.decoder = TextDecoder(c, self.embed, rt)

  def encode(self, images, *, train: bool = False):
    """Encodes the images with the ViT encoder.

    Args:
      images: (B, image_size, image_size, C) float, channels last.
      train: enables dropout.

    Returns:
      {"memory": (B, S, D) in the compute dtype, S the ViT's num_tokens, "mask": (B, S) all
      True}.
    """
    memory = self.encoder(images, train=train)
    return {"memory": memory, "mask": jnp.ones(memory.shape[:2], bool)}

  def __call__(self, images, target_in, *, train: bool = False):
    """Teacher-forced caption logits given the images.

    Args:
      images: (B, image_size, image_size, C) float, channels last.
      target_in: (B, T) int decoder inputs (the caption shifted right).
      train: enables dropout.

    Returns:
      (B, T, Vp) float32 logits, the padded ids -inf.
    """
    encoded = self.encode(images, train=train)
    return self.decoder(target_in, encoded["memory"], encoded["mask"], train=train)


def num_params(c: Seq2SeqConfig) -> int:
  """Closed-form count of Seq2Seq's stored parameters.

  Biases and LayerNorms included; each vocabulary padded to vocab_multiple.

  Args:
    c: the config.

  Returns:
    The number of parameters.
  """
  d, f = c.embed_dim, c.mlp_dim
  vocab = c.padded_vocab_size + (
      round_up(c.source_vocab_size, c.vocab_multiple) if c.source_vocab_size else 0)
  attn = 4 * d * d + 4 * d
  mlp = 2 * d * f + f + d
  encoder = c.encoder_layers * (attn + mlp + 4 * d) + 2 * d
  decoder = c.decoder_layers * (2 * attn + mlp + 6 * d) + 2 * d
  return encoder + decoder + vocab * d


def flops_per_example(c: Seq2SeqConfig, source_len: int, target_len: int) -> float:
  """Training FLOPs of one (source, target) pair: 6 x matmul parameters x tokens + attention.

  The output projection is counted over the padded vocabulary, as computed.

  Args:
    c: the config.
    source_len: S, the source length.
    target_len: T, the target length.

  Returns:
    FLOPs per example, a float.
  """
  d, f = c.embed_dim, c.mlp_dim
  enc = c.encoder_layers * (4 * d * d + 2 * d * f) * source_len
  dec = (c.decoder_layers * (4 * d * d + 2 * d * f) + d * c.padded_vocab_size) * target_len
  cross = c.decoder_layers * 2 * d * d * (target_len + source_len)
  attention = 2 * d * (c.encoder_layers * source_len ** 2 + c.decoder_layers * (
      target_len ** 2 + 2 * target_len * source_len))
  return 6.0 * (enc + dec + cross) + 3.0 * attention
