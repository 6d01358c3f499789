"""DETR with a ViT backbone: object detection as set prediction (Carion et al. 2020,
"End-to-End Object Detection with Transformers").

Shape key: B batch, S image side, P patch size, G = S/P patches per side, D width, Q object
queries, K classes, L decoder layers. Images are channels-last (B, S, S, C) with a pixel mask
(B, S, S), False on the padding that fills a resized image out to the square.

image -> ViT encoder (fmjax.models.vit.ViTEncoder, pool="gap": no [CLS]) -> (B, G^2, D)
         patch features, the backbone (the paper's ResNet, section 3.2)
      -> + fixed 2-D sine positions -> encoder_layers bidirectional blocks whose keys skip
         all-padding patches                                       (the Transformer encoder)
      -> Q learned object queries through decoder_layers DecoderBlocks: self-attention among
         the queries (not causal: the set has no order), cross-attention over the encoder
         output                                                    (the Transformer decoder)
      -> after every decoder layer (auxiliary losses, section 3.2), a shared LayerNorm, then
         the class head Dense(K + 1) (+1: "no object") and the box head, a 3-layer ReLU MLP
         to sigmoid (cx, cy, w, h) normalised by the image side.
The loss and the matching live in fmjax.detection. Departures from the paper: the sine
positions are added once, to the encoder's input, not to every layer's queries and keys, and
the object queries are the decoder's input (the paper adds them to zeros at every layer).
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fmjax import transformer
from fmjax.layers import Dense, Norm, partitioned
from fmjax.models import vit
from fmjax.runtime import Runtime
from fmjax.transformer import DecoderBlock, TransformerStack


@dataclasses.dataclass(frozen=True)
class DETRConfig:
  """The architecture; how it runs (kernel, remat, scan, dtypes, dropout) is a Runtime."""
  image_size: int = 512  # S: images are resized and padded to S x S
  patch_size: int = 16  # P
  num_channels: int = 3
  num_classes: int = 91  # K, without "no object"
  backbone_layers: int = 12  # ViT layers
  encoder_layers: int = 6  # Transformer encoder layers over the patch features (0: none)
  decoder_layers: int = 6
  num_queries: int = 100  # Q: at most Q objects per image
  num_heads: int = 6
  embed_dim: int = 384  # D, shared by the backbone, the encoder and the decoder
  mlp_dim: int = 1536
  norm_eps: float = 1e-6

  def __post_init__(self):
    transformer.check_config(self, positive=(
        "image_size", "patch_size", "num_channels", "num_classes", "backbone_layers",
        "decoder_layers", "num_queries", "num_heads", "embed_dim", "mlp_dim"))
    if isinstance(self.encoder_layers, bool) or not isinstance(self.encoder_layers, int) or \
        self.encoder_layers < 0:
      raise ValueError(f"DETRConfig.encoder_layers={self.encoder_layers!r}: must be an integer "
                       ">= 0")
    if self.embed_dim % 4:
      raise ValueError(f"DETRConfig.embed_dim={self.embed_dim} is not a multiple of 4: the 2-D "
                       "sine positions give D/4 sines and D/4 cosines per axis")
    self.vit()  # the backbone's checks (patches that tile the image)

  def vit(self) -> vit.ViTConfig:
    """The backbone's ViTConfig: no [CLS] token, no head.

    Returns:
      A ViTConfig with pool="gap" and num_classes=0.
    """
    return vit.ViTConfig(
        image_size=self.image_size, patch_size=self.patch_size, num_channels=self.num_channels,
        num_classes=0, pool="gap", num_layers=self.backbone_layers, num_heads=self.num_heads,
        embed_dim=self.embed_dim, mlp_dim=self.mlp_dim, norm_eps=self.norm_eps)

  @property
  def grid(self) -> int:
    """G, patches per side."""
    return self.image_size // self.patch_size


PRESETS = {
    # Seconds on a CPU: 32 x 32 images in 8 x 8 patches (16 tokens), 8 queries.
    "tiny": DETRConfig(image_size=32, patch_size=8, num_classes=3, backbone_layers=1,
                       encoder_layers=1, decoder_layers=2, num_queries=8, num_heads=2,
                       embed_dim=32, mlp_dim=64),
    # The generated shapes scenes on a CPU: 64 x 64 in 8 x 8 patches.
    "small": DETRConfig(image_size=64, patch_size=8, num_classes=3, backbone_layers=3,
                        encoder_layers=2, decoder_layers=3, num_queries=12, num_heads=4,
                        embed_dim=128, mlp_dim=256),
    # ViT-S/16 widths at DETR's 6 + 6 layers, 100 queries (COCO on an accelerator).
    "s16": DETRConfig(),
}


def get_config(name: str, **overrides) -> DETRConfig:
  """A preset by name with field overrides, e.g. get_config("tiny", num_classes=5).

  Args:
    name: a key of PRESETS.
    **overrides: DETRConfig fields to replace.

  Returns:
    The DETRConfig.

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown DETR preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def sine_positions(grid: int, dim: int, temperature: float = 10_000.0) -> np.ndarray:
  """DETR's fixed 2-D sine positions of a grid x grid patch grid, row-major.

  Each axis gets D/2 features: the patch centre's coordinate, normalised to (0, 2 pi), times
  D/4 frequencies temperature^(-4i/D), as sin and cos; the row's features come first.

  Args:
    grid: G, patches per side.
    dim: D, a multiple of 4.
    temperature: the frequencies' base.

  Returns:
    (G * G, D) float32.
  """
  coord = (np.arange(grid) + 0.5) / grid * 2 * np.pi  # (G,)
  freq = temperature ** (-np.arange(dim // 4) * 4.0 / dim)  # (D/4,)
  angle = coord[:, None] * freq[None]  # (G, D/4)
  axis = np.concatenate([np.sin(angle), np.cos(angle)], axis=-1)  # (G, D/2)
  rows = np.broadcast_to(axis[:, None], (grid, grid, dim // 2))
  cols = np.broadcast_to(axis[None, :], (grid, grid, dim // 2))
  return np.concatenate([rows, cols], axis=-1).reshape(grid * grid, dim).astype(np.float32)


def patch_mask(mask, patch_size: int):
  """(B, S, S) pixel mask -> (B, G^2) patch mask: a patch is real if any of its pixels is.

  Args:
    mask: (B, S, S) bool, False on padding pixels.
    patch_size: P.

  Returns:
    (B, G^2) bool, row-major like the patches.
  """
  b, h, w = mask.shape
  p = patch_size
  return mask.reshape(b, h // p, p, w // p, p).any(axis=(2, 4)).reshape(b, -1)


class DETR(nn.Module):
  """Backbone ("backbone"), encoder ("encoder"), queries ("queries"), decoder ("decoder_i"),
  the shared decoder norm ("ln_dec") and heads ("class_head", "box_0".."box_2")."""
  config: DETRConfig
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, images, mask=None, *, train: bool = False):
    """Class logits and boxes of every decoder layer.

    Args:
      images: (B, S, S, C) float, channels last (pixels scaled to [-1, 1]).
      mask: (B, S, S) bool, False on padding pixels; None: no padding.
      train: enables dropout.

    Returns:
      {"logits": (L, B, Q, K + 1), "boxes": (L, B, Q, 4) cxcywh in [0, 1]}, float32; index
      -1 of L is the model's output, the others feed the auxiliary losses.
    """
    c, rt = self.config, self.runtime
    dtype, param_dtype = rt.compute_dtype, rt.params_dtype
    block = c.vit().block(rt)  # bidirectional pre-LN blocks, as the backbone's
    keys = None if mask is None else patch_mask(mask, c.patch_size)  # (B, G^2)
    x = vit.ViTEncoder(c.vit(), rt, name="backbone")(images, train=train)  # (B, G^2, D)
    x = x + jnp.asarray(sine_positions(c.grid, c.embed_dim), x.dtype)[None]
    if c.encoder_layers:
      x = TransformerStack(block, c.encoder_layers, scan=rt.scan_layers,
                           remat_policy=rt.remat_policy, name="encoder")(
                               x, kv_mask=keys, train=train)
    queries = self.param("queries", partitioned(nn.initializers.normal(1.0), (None, "embed")),
                         (c.num_queries, c.embed_dim), param_dtype)  # (Q, D)
    y = jnp.broadcast_to(jnp.asarray(queries, dtype), (x.shape[0], *queries.shape))  # (B, Q, D)
    outputs = []
    for i in range(c.decoder_layers):
      y, _ = DecoderBlock(block, causal=False, name=f"decoder_{i}")(y, x, keys, train=train)
      outputs.append(y)
    y = Norm("layer", epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype,
             name="ln_dec")(jnp.stack(outputs))  # (L, B, Q, D)
    dense = lambda features, axes, name, **kw: Dense(
        features, axes, dtype=dtype, param_dtype=param_dtype, name=name, **kw)
    logits = dense(c.num_classes + 1, ("embed", None), "class_head")(y)
    h = nn.relu(dense(c.embed_dim, ("embed", "mlp"), "box_0")(y))
    h = nn.relu(dense(c.embed_dim, ("mlp", "embed"), "box_1")(h))
    boxes = nn.sigmoid(dense(4, ("embed", None), "box_2")(h).astype(jnp.float32))
    return {"logits": logits.astype(jnp.float32), "boxes": boxes}


def num_params(c: DETRConfig) -> int:
  """Closed-form parameter count of `DETR(c)`.

  Args:
    c: the config.

  Returns:
    The number of parameters.
  """
  d, f, k = c.embed_dim, c.mlp_dim, c.num_classes
  backbone = vit.num_params(c.vit())
  layer = 4 * (d * d + d) + d * f + f + f * d + d + 2 * 2 * d  # attention, MLP, two norms
  decoder_layer = layer + 4 * (d * d + d) + 2 * d  # + cross-attention and its norm
  heads = 2 * d + (d * (k + 1) + k + 1) + 2 * (d * d + d) + d * 4 + 4
  return (backbone + c.encoder_layers * layer + c.decoder_layers * decoder_layer
          + c.num_queries * d + heads)


def flops_per_image(c: DETRConfig) -> float:
  """Training FLOPs per image (forward + backward = 3x forward), PaLM appendix B style.

  Args:
    c: the config.

  Returns:
    FLOPs per image, a float: the backbone's, plus 6 x matmul params x tokens and 12 x L x
    T x S x D-style attention terms for the encoder and decoder.
  """
  d, f, t, q = c.embed_dim, c.mlp_dim, c.grid ** 2, c.num_queries
  backbone = vit.flops_per_token(c.vit()) * t
  encoder = c.encoder_layers * (6.0 * (4 * d * d + 2 * d * f) * t + 12.0 * t * t * d)
  decoder = c.decoder_layers * (6.0 * (8 * d * d + 2 * d * f) * q + 12.0 * q * (q + t) * d)
  return backbone + encoder + decoder
