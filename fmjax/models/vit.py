"""ViT: a Transformer encoder over image patches (Dosovitskiy et al. 2021, "An Image is Worth
16x16 Words: Transformers for Image Recognition at Scale").

Shape key: B batch, T tokens ([CLS] + patches), D width, F MLP width, N heads, H head dim,
P patch size, C channels, K classes. Images are channels-last: (B, S, S, C), S = image_size.

image -> (S/P)^2 patches of P x P x C, each flattened and projected to D   (eq. 1: x_p E)
      -> [CLS] token prepended (pool="cls"; none for pool="gap") + learned positions E_pos
      -> dropout -> L pre-LN bidirectional blocks with exact-GELU MLPs     (eqs. 2-3)
      -> final LayerNorm                                                    (eq. 4)
      -> the [CLS] output, or the mean over patch outputs (pool="gap")
      -> zero-initialised Dense(K) head                                     (section 3.1)
Fine-tuning at another resolution keeps P, so the patch grid changes; the learned positions
are then resized over the grid by `resize_posemb` (section 3.2).
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from fmjax import transformer
from fmjax.layers import Dense, Norm, partitioned
from fmjax.runtime import Runtime
from fmjax.transformer import BlockConfig, TransformerStack

POOLS = ("cls", "gap")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """The architecture; how it runs (kernel, remat, scan, dtypes, dropout) is a Runtime."""
  image_size: int = 224  # S: square images S x S
  patch_size: int = 16  # P: must divide S
  num_channels: int = 3
  num_classes: int = 1000  # K; 0: no head, the model returns the pooled (B, D) representation
  pool: str = "cls"  # "cls": the [CLS] token's output | "gap": mean of the patch outputs
  num_layers: int = 12
  num_heads: int = 12
  embed_dim: int = 768
  mlp_dim: int = 3072
  norm_eps: float = 1e-6  # the reference implementation's; HF checkpoints say 1e-12

  def __post_init__(self):
    transformer.check_config(
        self, positive=("image_size", "patch_size", "num_channels", "num_layers", "num_heads",
                        "embed_dim", "mlp_dim"), choices={"pool": POOLS})
    if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or \
        self.num_classes < 0:
      raise ValueError(f"ViTConfig.num_classes={self.num_classes!r}: must be an integer >= 0 "
                       "(0: no head)")
    if self.image_size % self.patch_size:
      raise ValueError(f"ViTConfig.image_size={self.image_size} is not a multiple of "
                       f"patch_size={self.patch_size}; patches must tile the image")

  @property
  def head_dim(self) -> int:
    """H, the width of one attention head: embed_dim // num_heads."""
    return self.embed_dim // self.num_heads

  @property
  def grid(self) -> int:
    """Patches per side, S / P."""
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    """T: the patches, plus the [CLS] token with pool="cls"."""
    return self.grid ** 2 + (self.pool == "cls")

  def block(self, runtime: Runtime) -> BlockConfig:
    """The BlockConfig of ViT's layers: bidirectional, pre-LN, LayerNorm, exact erf GELU.

    Args:
      runtime: how the model runs (its dropout rates, attention kernel and dtypes go in).

    Returns:
      The BlockConfig shared by the num_layers blocks.
    """
    return BlockConfig(
        num_heads=self.num_heads, head_dim=self.head_dim, mlp_dim=self.mlp_dim, causal=False,
        pre_ln=True, norm="layer", norm_eps=self.norm_eps, mlp_activation="gelu",
        **runtime.block_fields())


PRESETS = {
    # MNIST-sized: 28 x 28 x 1 in 7 x 7 patches (16 tokens + [CLS]); seconds on a CPU.
    "tiny": ViTConfig(image_size=28, patch_size=7, num_channels=1, num_classes=10,
                      num_layers=2, num_heads=2, embed_dim=32, mlp_dim=64),
    # The paper's table 1 widths, at 224 x 224 with 16 x 16 patches (Ti from Touvron et al.).
    "ti16": ViTConfig(num_layers=12, num_heads=3, embed_dim=192, mlp_dim=768),  # 5.7M
    "s16": ViTConfig(num_layers=12, num_heads=6, embed_dim=384, mlp_dim=1536),  # 22M
    "b16": ViTConfig(),  # 86M
}


def get_config(name: str, **overrides) -> ViTConfig:
  """A preset by name with field overrides, e.g. get_config("s16", num_classes=10).

  Args:
    name: a key of PRESETS: "tiny", "ti16", "s16" or "b16".
    **overrides: ViTConfig fields to replace.

  Returns:
    The ViTConfig (validated by its __post_init__).

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown ViT preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


def patchify(images, patch_size: int):
  """(B, S, S, C) -> (B, S/P, S/P, P, P, C): patch (i, j) is images[:, iP:(i+1)P, jP:(j+1)P].

  Args:
    images: (B, S, S, C) channels-last images (any dtype; height and width may differ, each
      a multiple of P).
    patch_size: P.

  Returns:
    (B, S/P, S/P, P, P, C) in the images' dtype.
  """
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  return x.transpose(0, 1, 3, 2, 4, 5)


class ViTEncoder(nn.Module):
  """Patch embedding, [CLS] token, positions, pre-LN stack and final LayerNorm: Hugging Face's
  ViTModel without its pooler (the paper's pre-training pre-logits layer)."""
  config: ViTConfig
  runtime: Runtime = Runtime()

  def setup(self):
    c, rt = self.config, self.runtime
    dtype, param_dtype = rt.compute_dtype, rt.params_dtype
    # x_p E over the flattened (row, column, channel) patch: a P x P, stride-P convolution.
    self.patch_embed = Dense(
        c.embed_dim, (None, None, None, "embed"), axis=(-3, -2, -1),
        kernel_init=nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=-1),
        dtype=dtype, param_dtype=param_dtype)
    if c.pool == "cls":
      self.cls = self.param("cls", partitioned(nn.initializers.zeros, ("embed",)),
                            (c.embed_dim,), param_dtype)
    self.posemb = self.param("posemb", partitioned(nn.initializers.normal(0.02), (None, "embed")),
                             (c.num_tokens, c.embed_dim), param_dtype)  # (T, D)
    self.dropout = nn.Dropout(rt.dropout_rate)
    self.blocks = TransformerStack(c.block(rt), c.num_layers, scan=rt.scan_layers,
                                   remat_policy=rt.remat_policy)
    self.ln_final = Norm("layer", epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype)

  def embed_patches(self, images):
    """(B, S, S, C) float images -> (B, (S/P)^2, D) patch embeddings, row-major over the grid.

    Args:
      images: (B, S, S, C) float, channels last, S = image_size, C = num_channels.

    Returns:
      (B, (S/P)^2, D) in the compute dtype.

    Raises:
      ValueError: the images are not (B, image_size, image_size, num_channels).
    """
    c = self.config
    want = (c.image_size, c.image_size, c.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(
          f"images have shape {tuple(images.shape)} but this ViT takes (B, {want[0]}, {want[1]}, "
          f"{want[2]}) (image_size={c.image_size}, num_channels={c.num_channels}, channels "
          "last); resize the images, or to fine-tune at another size set image_size and resize "
          "the position embeddings with fmjax.models.vit.resize_posemb")
    x = self.patch_embed(patchify(images, c.patch_size))  # (B, S/P, S/P, D)
    return x.reshape(x.shape[0], -1, c.embed_dim)

  def __call__(self, images, *, train: bool = False):
    """Token representations after the final LayerNorm.

    Args:
      images: (B, S, S, C) float, channels last (e.g. pixels scaled to [-1, 1]).
      train: enables dropout.
    Returns:
      (B, T, D) in the compute dtype; token 0 is [CLS] when pool="cls".
    """
    c = self.config
    x = self.embed_patches(images)  # (B, T', D), T' = (S/P)^2
    if c.pool == "cls":
      cls = jnp.broadcast_to(jnp.asarray(self.cls, x.dtype), (x.shape[0], 1, c.embed_dim))
      x = jnp.concatenate([cls, x], axis=1)  # (B, T, D)
    x = x + jnp.asarray(self.posemb, x.dtype)[None]
    x = self.dropout(x, deterministic=not train)
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    x = self.blocks(x, train=train)  # bidirectional: every patch sees every patch
    return self.ln_final(x)


class ViT(nn.Module):
  """The classifier: ViTEncoder (submodule "encoder"), pooling and the head ("head").
  With pool="cls" it is Hugging Face's ViTForImageClassification."""
  config: ViTConfig
  runtime: Runtime = Runtime()

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    """Class logits of a batch of images.

    Args:
      images: (B, S, S, C) float, channels last (e.g. pixels scaled to [-1, 1]).
      train: enables dropout.

    Returns:
      (B, K) float32 logits; with num_classes = 0, the (B, D) pooled representation in the
      compute dtype.
    """
    c, rt = self.config, self.runtime
    x = ViTEncoder(c, rt, name="encoder")(images, train=train)  # (B, T, D)
    pooled = x[:, 0] if c.pool == "cls" else x.mean(axis=1)  # (B, D)
    if c.num_classes == 0:
      return pooled
    # Zero-initialised, as the paper's fine-tuning head and the reference code's.
    return Dense(c.num_classes, ("embed", None), kernel_init=nn.initializers.zeros,
                 dtype=rt.compute_dtype, param_dtype=rt.params_dtype, name="head")(pooled).astype(jnp.float32)


def _interpolation_matrix(n_new: int, n_old: int) -> np.ndarray:
  """(n_new, n_old) weights of corner-aligned linear interpolation: new sample j sits at old
  coordinate j * (n_old - 1) / (n_new - 1), so both ends map onto both ends."""
  x = np.arange(n_new) * ((n_old - 1) / (n_new - 1) if n_new > 1 else 0.0)
  lo = np.minimum(np.floor(x).astype(int), n_old - 1)
  hi = np.minimum(lo + 1, n_old - 1)
  frac = x - lo
  m = np.zeros((n_new, n_old))
  np.add.at(m, (np.arange(n_new), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_new), hi), frac)
  return m


def resize_posemb(posemb, new_grid, *, num_prefix: int = 1, old_grid=None) -> np.ndarray:
  """Learned position embeddings for another patch grid (fine-tuning at another resolution,
  section 3.2): the grid part is resized bilinearly, the [CLS] position is kept as it is.

  Corner-aligned, like the reference implementation's scipy.ndimage.zoom(order=1): the four
  corner patches keep their embeddings, resizing to the same grid is the identity, and
  g -> 2g - 1 keeps every source embedding at the even positions (the odd ones are the means
  of their two neighbours).

  Args:
    posemb: (T, D): num_prefix leading rows ([CLS]), then the grid row-major; numpy or jax.
    new_grid: patches per side, an int (square) or (rows, columns).
    num_prefix: rows before the grid: 1 with a [CLS] token (pool="cls"), 0 for pool="gap".
    old_grid: (rows, columns) of posemb's grid; default square.
  Returns:
    (num_prefix + rows * columns, D) numpy array in posemb's dtype.
  """
  posemb = np.asarray(posemb)
  prefix, grid = posemb[:num_prefix], posemb[num_prefix:]
  n, d = grid.shape
  if old_grid is None:
    side = int(round(np.sqrt(n)))
    if side * side != n:
      raise ValueError(f"posemb has {n} grid rows after {num_prefix} prefix row(s), not a "
                       "square grid; pass old_grid=(rows, columns)")
    old_grid = (side, side)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f"old_grid={tuple(old_grid)} needs {old_grid[0] * old_grid[1]} rows but "
                     f"posemb has {n} after {num_prefix} prefix row(s)")
  new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
  rows = _interpolation_matrix(new_grid[0], old_grid[0])  # (h', h)
  cols = _interpolation_matrix(new_grid[1], old_grid[1])  # (w', w)
  resized = np.einsum("ih,hwd,jw->ijd", rows, grid.reshape(*old_grid, d).astype(np.float64), cols)
  return np.concatenate([prefix, resized.reshape(-1, d).astype(posemb.dtype)], axis=0)


def num_params(c: ViTConfig) -> int:
  """Closed-form parameter count of `ViT(c)` (the head included when num_classes > 0).

  Args:
    c: the config.

  Returns:
    The number of parameters.
  """
  d, f, l, k = c.embed_dim, c.mlp_dim, c.num_layers, c.num_classes
  embeddings = c.patch_size ** 2 * c.num_channels * d + d  # patch projection with bias
  embeddings += c.num_tokens * d + (d if c.pool == "cls" else 0)  # positions, [CLS]
  attn = 4 * (d * d + d)  # query, key, value, out with biases
  mlp = d * f + f + f * d + d
  total = embeddings + l * (attn + mlp + 2 * 2 * d) + 2 * d  # + the final LayerNorm
  return total + (d * k + k if k else 0)


def flops_per_token(c: ViTConfig) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style.

  6 * (block matmul params + the patch projection) + 12 * L * T * D for attention. The
  per-image head is ignored. Multiply by num_tokens for FLOPs per image.

  Args:
    c: the config (T = c.num_tokens).

  Returns:
    FLOPs per token, a float.
  """
  d, f, l = c.embed_dim, c.mlp_dim, c.num_layers
  matmul = l * (4 * d * d + 2 * d * f) + c.patch_size ** 2 * c.num_channels * d
  return 6.0 * matmul + 12.0 * l * c.num_tokens * d
