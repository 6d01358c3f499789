"""Text to image tokens: the encoder-decoder Transformer of seq2seq.py over a caption and the
codes of a discrete image tokenizer (vqvae.py), as dalle-mini does with BART and a VQGAN
(Dayma et al. 2021; DALL-E, Ramesh et al. 2021, is the decoder-only form of the same idea).

Shape key: B batch, S caption length, N image tokens (a G x G grid, row-major), D width,
K codebook size, Vp the image vocabulary K + 1 (BOS) padded to vocab_multiple.

caption ids -> embedding * sqrt(D) + sinusoidal positions -> bidirectional blocks -> norm
            = memory (B, S, D)                                       (Seq2Seq's encoder)
image codes [BOS, c_0 .. c_{N-2}] -> embedding * sqrt(D) + row[t // G] + col[t % G]
            -> DecoderBlocks (causal self-attention, cross-attention over memory, MLP)
            -> norm -> tied output projection -> (B, N, Vp) logits of c_0 .. c_{N-1}
                                                 (seq2seq.TextDecoder with a 2-D position table)

Positions: decoder input t predicts the code of grid cell t, so it carries that cell's
learned row and column embeddings (the BOS input carries cell (0, 0)'s). BOS (id K) and the
padded ids are -inf in every output: only codes 0 .. K-1 can be predicted or sampled.

The null caption is the empty caption as fmjax's tokenizers encode it: one EOS token
(`null_id`) alone in column 0, the rest padding. Training replaces a share of the captions
with it (`drop_captions`, caption dropout); classifier-free guidance (fmjax/guidance.py)
decodes the same null caption beside each prompt.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax import transformer
from fmjax.layers import ACTIVATIONS, Norm, partitioned
from fmjax.models.seq2seq import (Seq2SeqConfig, TextDecoder, _arange, _check_runtime,
                                  _Decodes, _embed_tokens, _table)
from fmjax.runtime import Runtime
from fmjax.transformer import TransformerStack


@dataclasses.dataclass(frozen=True)
class TextToImageConfig:
  """The architecture; how it runs (kernel, dtypes, dropout) is a Runtime."""
  vocab_size: int = 1000  # the caption vocabulary (-1 in a run config: the tokenizer's)
  codebook_size: int = 256  # K, the image tokenizer's codes; BOS is id K
  grid_size: int = 8  # G, the tokenizer's code grid side: N = G * G image tokens
  vocab_multiple: int = 128  # table rows padded to a multiple (tensor parallelism)
  encoder_layers: int = 2
  decoder_layers: int = 4
  num_heads: int = 4
  embed_dim: int = 256
  mlp_dim: int = 1024
  mlp_activation: str = "gelu"

  def __post_init__(self):
    transformer.check_config(
        self, positive=("vocab_size", "codebook_size", "grid_size", "encoder_layers",
                        "decoder_layers", "num_heads", "embed_dim", "mlp_dim"),
        choices={"mlp_activation": tuple(ACTIVATIONS)})

  @property
  def num_tokens(self) -> int:
    """N, the image tokens per image: grid_size ** 2."""
    return self.grid_size ** 2

  @property
  def bos_id(self) -> int:
    """The image decoder's start token: codebook_size (one past the last code)."""
    return self.codebook_size

  @property
  def seq2seq(self) -> Seq2SeqConfig:
    """The encoder-decoder's Seq2SeqConfig: target vocabulary K + 1, the captions' as source."""
    return Seq2SeqConfig(
        vocab_size=self.codebook_size + 1, vocab_multiple=self.vocab_multiple,
        source_vocab_size=self.vocab_size, encoder_layers=self.encoder_layers,
        decoder_layers=self.decoder_layers, num_heads=self.num_heads,
        embed_dim=self.embed_dim, mlp_dim=self.mlp_dim, mlp_activation=self.mlp_activation)

  def block(self, causal: bool, runtime: Runtime) -> transformer.BlockConfig:
    """The BlockConfig of the encoder's (causal=False) or decoder's (causal=True) layers.

    Args:
      causal: True for the decoder's self-attention, False for the encoder.
      runtime: how the model runs.

    Returns:
      Seq2SeqConfig.block of `seq2seq`.
    """
    return self.seq2seq.block(causal, runtime)


PRESETS = {
    "tiny": TextToImageConfig(vocab_size=64, codebook_size=32, grid_size=4, encoder_layers=1,
                              decoder_layers=2, num_heads=4, embed_dim=64, mlp_dim=128),
    # MNIST digits on a 2-core CPU (configs/text_to_image.py:digits).
    "small": TextToImageConfig(vocab_size=256, codebook_size=128, grid_size=8, encoder_layers=2,
                               decoder_layers=4, num_heads=4, embed_dim=192, mlp_dim=768),
    "base": TextToImageConfig(),
}


def get_config(name: str, **overrides) -> TextToImageConfig:
  """A preset by name with field overrides, e.g. get_config("small", codebook_size=256).

  Args:
    name: a key of PRESETS: "tiny", "small" or "base".
    **overrides: TextToImageConfig fields to replace.

  Returns:
    The TextToImageConfig (validated by its __post_init__).

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown TextToImage preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


class GridPositions(nn.Module):
  """Learned 2-D positions: position t is grid cell (t // G, t % G), embedded row + column."""
  grid_size: int
  embed_dim: int
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, positions):
    """The embeddings of grid positions.

    Args:
      positions: (B, T) int in [0, G * G), cell t = (t // G, t % G).

    Returns:
      (B, T, D) float: row[t // G] + col[t % G].
    """
    # As large as the token embeddings (unit scale after * sqrt(D)) once row and col add up.
    init = partitioned(nn.initializers.normal(0.5), (None, "embed"))
    shape = (self.grid_size, self.embed_dim)
    row = self.param("row", init, shape, self.param_dtype)  # (G, D)
    col = self.param("col", init, shape, self.param_dtype)  # (G, D)
    return row[positions // self.grid_size] + col[positions % self.grid_size]


def mask_bos(logits, bos_id: int):
  """The logits with BOS set to -inf: a start token is never a prediction.

  Args:
    logits: (..., Vp) float.
    bos_id: the BOS id (TextToImageConfig.bos_id).

  Returns:
    The logits, -inf at bos_id.
  """
  return logits.at[..., bos_id].set(-jnp.inf)


class TextToImage(_Decodes, nn.Module):
  """Caption encoder and image-token decoder; `decode`/`init_cache` serve fmjax.generate."""
  config: TextToImageConfig
  runtime: Runtime = Runtime()

  def setup(self):
    c, rt = self.config, self.runtime
    _check_runtime("TextToImage", rt)
    s = c.seq2seq
    self.text_embed = _table(s, rt, c.vocab_size)
    self.dropout = nn.Dropout(rt.dropout_rate)
    self.encoder = TransformerStack(c.block(False, rt), c.encoder_layers)
    self.ln_encoder = Norm("layer", epsilon=1e-5, dtype=rt.compute_dtype,
                           param_dtype=rt.params_dtype)
    self.embed = _table(s, rt, c.codebook_size + 1)  # the codes and BOS
    self.positions = GridPositions(c.grid_size, c.embed_dim, rt.params_dtype)
    self.decoder = TextDecoder(s, self.embed, rt, position_embed=self.positions)

  def encode(self, text, text_mask, *, train: bool = False):
    """Encodes the captions: embeddings, the bidirectional stack and the final norm.

    Args:
      text: (B, S) int caption ids.
      text_mask: (B, S) bool, False on padding.
      train: enables dropout.

    Returns:
      {"memory": (B, S, D) in the compute dtype, "mask": text_mask}.
    """
    x = _embed_tokens(self.text_embed, text, _arange(text), self.config.embed_dim)
    x = nn.with_logical_constraint(self.dropout(x, deterministic=not train),
                                   ("batch", "length", "act_embed"))
    x = self.encoder(x, kv_mask=text_mask, train=train)
    return {"memory": self.ln_encoder(x), "mask": text_mask}

  def __call__(self, text, text_mask, image_in, *, train: bool = False):
    """Teacher-forced logits of the image codes given the captions.

    Args:
      text: (B, S) int caption ids.
      text_mask: (B, S) bool, False on padding.
      image_in: (B, N) int decoder inputs, `image_inputs(codes)`: BOS then the codes shifted
        right.
      train: enables dropout.

    Returns:
      (B, N, Vp) float32 logits of the codes, -inf at BOS and the padded ids.
    """
    encoded = self.encode(text, text_mask, train=train)
    logits = self.decoder(image_in, encoded["memory"], encoded["mask"], train=train)
    return mask_bos(logits, self.config.bos_id)

  def decode(self, tokens, cache, *, index, positions, kv_mask, source=None):
    """One decoding step, as seq2seq's (see fmjax.generate), BOS masked out of the logits.

    Args:
      tokens: (B, T) image ids (BOS first).
      cache: from `init_cache`.
      index, positions, kv_mask: as GPT.decode; positions are grid cells.
      source: `encode`'s output, on the first call only.

    Returns:
      (logits (B, Vp) float32 of the next code, cache).
    """
    logits, cache = _Decodes.decode(self, tokens, cache, index=index, positions=positions,
                                    kv_mask=kv_mask, source=source)
    return mask_bos(logits, self.config.bos_id), cache


def image_inputs(codes, bos_id: int):
  """The decoder inputs of image codes: BOS, then the codes shifted right by one.

  Args:
    codes: (B, N) int image codes, row-major over the grid.
    bos_id: TextToImageConfig.bos_id.

  Returns:
    (B, N) int32: [BOS, c_0, ..., c_{N-2}] per row.
  """
  codes = jnp.asarray(codes, jnp.int32)
  return jnp.concatenate([jnp.full_like(codes[:, :1], bos_id), codes[:, :-1]], axis=1)


def null_caption(batch: int, length: int, null_id: int):
  """The null caption (the empty caption) of caption dropout and guidance.

  Args:
    batch: B rows.
    length: S, the caption length.
    null_id: its one token: the tokenizer's EOS id (what "" encodes to).

  Returns:
    (text (B, S) int32: null_id then 0s, mask (B, S) bool: True in column 0 only).
  """
  text = jnp.zeros((batch, length), jnp.int32).at[:, 0].set(null_id)
  return text, jnp.arange(length)[None, :].repeat(batch, 0) == 0


def drop_captions(text, text_mask, rng, rate: float, null_id: int):
  """Caption dropout: each row's caption becomes the null caption with probability `rate`.

  Args:
    text: (B, S) int caption ids.
    text_mask: (B, S) bool.
    rng: PRNG key.
    rate: the share of captions dropped, in [0, 1).
    null_id: the null caption's token (see `null_caption`).

  Returns:
    (text, text_mask), the dropped rows replaced by the null caption.
  """
  if not 0 <= rate < 1:
    raise ValueError(f"caption dropout rate={rate!r}: must be in [0, 1)")
  if rate == 0:
    return text, text_mask
  null_text, null_mask = null_caption(*text.shape, null_id)
  drop = jax.random.bernoulli(rng, rate, (text.shape[0], 1))  # (B, 1)
  return jnp.where(drop, null_text, text), jnp.where(drop, null_mask, text_mask)
