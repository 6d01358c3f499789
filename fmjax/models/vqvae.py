"""VQ-VAE: a convolutional image tokenizer with an EMA-learned codebook (van den Oord et al. 2017,
"Neural Discrete Representation Learning"; the EMA codebook of its appendix A.1 and of Razavi
et al. 2019, VQ-VAE-2; dead-code restarts as in Dhariwal et al. 2020, Jukebox).

Shape key: B batch, S image size, C channels, G grid size (S / 2^len(widths)), D code_dim,
K codebook_size, N = B * G * G encoder vectors. Images are channels-last floats in [-1, 1].

image (B, S, S, C) -> encoder: 3x3 conv stem; per width a stride-2 4x4 conv + res_blocks residual
      blocks (GroupNorm, swish, 3x3 conv, twice); GroupNorm, swish, 1x1 conv to D -> z (B, G, G, D)
   -> quantizer: k = argmin_k ||z - e_k||^2 (the codes, row-major over the grid), e = e_k;
      straight-through z_q = z + sg(e - z): the decoder's gradient is copied onto z  (eq. 3)
   -> decoder: 3x3 conv; per width, reversed: residual blocks, nearest x2 upsampling, 3x3 conv;
      GroupNorm, swish, 3x3 conv to C -> reconstruction (B, S, S, C)
loss = mean (x - recon)^2 + beta mean (z - sg(e))^2    (eq. 3 without its codebook term)
The codebook gets no gradient: it is the exponential moving average of the encoder outputs
assigned to each code (fmjax.codebook.ema_update), applied after each optimizer step by
`make_post_update`, which also re-seeds dead codes (codebook.restart_dead) and, on the first
step, initialises the codebook by k-means on that batch's encoder outputs (codebook.kmeans). `trainable` freezes the codebook and its
statistics for the optimizer. They are float32 whatever the runtime's dtypes.
The network is small (a few million weights): every parameter is replicated (no logical axes)
and the batch carries the parallelism.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.codebook import code_stats, ema_update, kmeans, nearest, quantize, restart_dead
from fmjax.runtime import Runtime

CODEBOOK = ("codebook", "ema_count", "ema_sum")  # the params post_update owns


@dataclasses.dataclass(frozen=True)
class VQConfig:
  """The architecture and the codebook's learning rule (how it runs is a Runtime)."""
  image_size: int = 32  # S
  channels: int = 3  # C
  widths: tuple[int, ...] = (64, 128)  # one stride-2 stage per entry: G = S / 2**len(widths)
  res_blocks: int = 1  # residual blocks per stage, in the encoder and in the decoder
  groups: int = 8  # GroupNorm groups; must divide every width
  codebook_size: int = 512  # K
  code_dim: int = 64  # D
  commitment: float = 0.25  # beta
  ema_decay: float = 0.99  # gamma of the EMA codebook
  epsilon: float = 1e-5  # Laplace smoothing of the EMA counts
  restart_below: float = 0.1  # a code whose EMA count < this x the mean count is re-seeded
  kmeans_iters: int = 5  # Lloyd iterations of the first-batch codebook initialisation

  def __post_init__(self):
    object.__setattr__(self, "widths", tuple(self.widths))  # lists from config files
    for name in ("image_size", "channels", "groups", "codebook_size", "code_dim"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"VQConfig.{name}={value!r}: must be an integer >= 1")
    for name in ("res_blocks", "kmeans_iters"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"VQConfig.{name}={value!r}: must be an integer >= 0")
    if not self.widths or any(not isinstance(w, int) or w < 1 or w % self.groups
                              for w in self.widths):
      raise ValueError(f"VQConfig.widths={self.widths!r}: give one or more positive widths, "
                       f"each a multiple of groups={self.groups}")
    if self.image_size % 2 ** len(self.widths):
      raise ValueError(f"VQConfig.image_size={self.image_size} is not a multiple of "
                       f"2**len(widths)={2 ** len(self.widths)}; each width halves the image")
    if not 0 <= self.ema_decay < 1 or self.commitment < 0 or self.epsilon <= 0 or \
        self.restart_below < 0:
      raise ValueError(f"VQConfig: ema_decay={self.ema_decay} must be in [0, 1), commitment="
                       f"{self.commitment} and restart_below={self.restart_below} >= 0, "
                       f"epsilon={self.epsilon} > 0")

  @property
  def grid_size(self) -> int:
    """G, the code grid's side: image_size / 2**len(widths)."""
    return self.image_size // 2 ** len(self.widths)

  @property
  def num_tokens(self) -> int:
    """G * G, the codes per image."""
    return self.grid_size ** 2


PRESETS = {
    # Seconds on a CPU: 16 x 16 RGB -> a 4 x 4 grid of 64 codes.
    "tiny": VQConfig(image_size=16, widths=(32, 32), codebook_size=64, code_dim=16),
    # MNIST padded to 32 x 32 -> an 8 x 8 grid of 256 codes. 3 minutes on a shared 2-core CPU
    # (~460 steps of 64): held-out PSNR ~25 dB, all 256 codes used, perplexity ~180.
    "digits": VQConfig(channels=1, widths=(16, 32), codebook_size=256, code_dim=32),
    "base": VQConfig(),  # 32 x 32 RGB -> 8 x 8 of 512 codes
}


def get_config(name: str, **overrides) -> VQConfig:
  """A preset by name with field overrides, e.g. get_config("tiny", channels=1).

  Args:
    name: a key of PRESETS: "tiny", "digits" or "base".
    **overrides: VQConfig fields to replace.

  Returns:
    The VQConfig (validated by its __post_init__).

  Raises:
    ValueError: an unknown preset name, or an invalid field value.
  """
  if name not in PRESETS:
    raise ValueError(f"unknown VQ-VAE preset {name!r}; choose from {sorted(PRESETS)}")
  return dataclasses.replace(PRESETS[name], **overrides)


class ResBlock(nn.Module):
  """x + conv(swish(norm(conv(swish(norm(x)))))), 3x3 convs keeping the width."""
  width: int
  groups: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """Applies the block.

    Args:
      x: (B, h, w, width).

    Returns:
      (B, h, w, width).
    """
    h = x
    for i in range(2):
      h = nn.swish(nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype,
                                param_dtype=self.param_dtype, name=f"norm_{i}")(h))
      h = nn.Conv(self.width, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype,
                  name=f"conv_{i}")(h)
    return x + h


class VQVAE(nn.Module):
  """Encoder, codebook and decoder; see the module docstring."""
  config: VQConfig
  runtime: Runtime = Runtime()

  def setup(self):
    c, rt = self.config, self.runtime
    k = dict(dtype=rt.compute_dtype, param_dtype=rt.params_dtype)
    conv = lambda f, size, **kw: nn.Conv(f, (size, size), **k, **kw)
    norm = lambda: nn.GroupNorm(c.groups, epsilon=1e-6, **k)
    res = lambda w: [ResBlock(w, c.groups, **k) for _ in range(c.res_blocks)]
    # Encoder: stem, then per width a stride-2 conv (halves the side) and residual blocks.
    self.stem = conv(c.widths[0], 3)
    self.down = [conv(w, 4, strides=(2, 2), padding=((1, 1), (1, 1))) for w in c.widths]
    self.down_res = [res(w) for w in c.widths]
    self.enc_norm, self.to_code = norm(), conv(c.code_dim, 1)
    # Decoder, run from the last width back: residual blocks, x2 upsampling, conv.
    self.from_code = conv(c.widths[-1], 3)
    self.up_res = [res(w) for w in c.widths]
    self.up = [conv(c.widths[max(i - 1, 0)], 3) for i in range(len(c.widths))]
    self.dec_norm, self.to_image = norm(), conv(c.channels, 3)
    f32 = jnp.float32  # the codebook and its statistics stay float32 under any runtime
    self.codebook = self.param("codebook", nn.initializers.normal(1.0),
                               (c.codebook_size, c.code_dim), f32)
    self.ema_count = self.param("ema_count", nn.initializers.zeros, (c.codebook_size,), f32)
    self.ema_sum = self.param("ema_sum", nn.initializers.zeros, (c.codebook_size, c.code_dim), f32)

  def latents(self, images):
    """The encoder's outputs z, before quantization.

    Args:
      images: (B, S, S, C) float in [-1, 1].

    Returns:
      (B, G, G, D) float32.

    Raises:
      ValueError: the images are not (B, image_size, image_size, channels).
    """
    c = self.config
    want = (c.image_size, c.image_size, c.channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
      raise ValueError(f"images have shape {tuple(images.shape)} but this VQ-VAE takes (B, "
                       f"{want[0]}, {want[1]}, {want[2]}) (image_size={c.image_size}, "
                       f"channels={c.channels}, channels last); resize the images or the config")
    x = self.stem(images.astype(self.runtime.compute_dtype))
    for down, blocks in zip(self.down, self.down_res):
      x = down(x)  # halves the side
      for block in blocks:
        x = block(x)
    return self.to_code(nn.swish(self.enc_norm(x))).astype(jnp.float32)

  def reconstruct(self, z_q):
    """The decoder: quantized latents to images, unclipped.

    Args:
      z_q: (B, G, G, D) float.

    Returns:
      (B, S, S, C) float32, not clipped (the training loss sees the raw output).
    """
    x = self.from_code(z_q.astype(self.runtime.compute_dtype))
    for i in reversed(range(len(self.config.widths))):
      for block in self.up_res[i]:
        x = block(x)
      x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
      x = self.up[i](x)
    return self.to_image(nn.swish(self.dec_norm(x))).astype(jnp.float32)

  def __call__(self, images, *, train: bool = False):
    """Encode, quantize (straight-through), decode.

    Args:
      images: (B, S, S, C) float in [-1, 1].
      train: unused (no dropout); kept for the shared model interface.

    Returns:
      (recon (B, S, S, C) float32, unclipped; aux {"codes" (B, G*G) int32, "commitment_loss",
      "perplexity", "usage"} (scalars float32; see fmjax.codebook.quantize, code_stats)).
    """
    del train
    z = self.latents(images)
    z_q, codes, commit = quantize(z, self.codebook, self.config.commitment)
    perplexity, usage = code_stats(codes, self.config.codebook_size)
    return self.reconstruct(z_q), {"codes": codes.reshape(codes.shape[0], -1),
                                   "commitment_loss": commit, "perplexity": perplexity,
                                   "usage": usage}

  def encode(self, images):
    """Images to codes.

    Args:
      images: (B, S, S, C) float in [-1, 1].

    Returns:
      (B, G*G) int32 code indices, row-major over the grid.
    """
    z = self.latents(images)
    return nearest(z.reshape(-1, z.shape[-1]), self.codebook).reshape(z.shape[0], -1)

  def decode(self, codes):
    """Codes to images.

    Args:
      codes: (B, G*G) int code indices in [0, K), row-major over the grid.

    Returns:
      (B, S, S, C) float32 clipped to [-1, 1].
    """
    g = self.config.grid_size
    z_q = jnp.take(self.codebook, codes.reshape(codes.shape[0], g, g), axis=0)
    return jnp.clip(self.reconstruct(z_q), -1.0, 1.0)


def _images(batch):
  """batch["images"] as float32 in [-1, 1] (uint8 pixels are scaled, floats taken as they are)."""
  x = batch["images"]
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 127.5 - 1.0
  return x.astype(jnp.float32)


def make_loss_fn(model: VQVAE):
  """The training loss: reconstruction MSE (on [-1, 1]) plus the commitment loss.

  Args:
    model: the VQVAE.

  Returns:
    loss_fn(params, batch, rng, train) -> (loss, metrics) for fmjax.training: batch["images"]
    (B, S, S, C) float in [-1, 1] (or uint8 pixels); metrics (batch means, float32) "mse" and
    "psnr" (the mean per-image PSNR in dB) of the clipped reconstruction with images scaled to
    [0, 1] (so "mse" is a quarter of the loss's term), "commitment_loss", "perplexity", "usage".
  """
  def loss_fn(params, batch, rng, train):
    del rng  # deterministic
    x = _images(batch)
    recon, aux = model.apply({"params": params}, x, train=train)
    loss = jnp.mean((recon - x) ** 2) + aux["commitment_loss"]
    err = (jnp.clip(recon, -1.0, 1.0) - x) / 2  # on [0, 1]
    per_image = jnp.mean(err ** 2, axis=(1, 2, 3))  # (B,)
    psnr = jnp.mean(-10.0 * jnp.log10(jnp.maximum(per_image, 1e-10)))
    return loss, {"mse": per_image.mean(), "psnr": psnr,
                  **{k: aux[k] for k in ("commitment_loss", "perplexity", "usage")}}
  return loss_fn


def make_post_update(model: VQVAE):
  """The codebook's own update, run after each optimizer step (fmjax.trainer.Task.post_update).

  It encodes the step's batch with the updated encoder, then: on the first step (all EMA counts
  still 0) sets the codebook to k-means centroids of those encoder outputs (fmjax.codebook.kmeans,
  seeded with rows of the batch); after that takes one EMA step (codebook.ema_update); then
  re-seeds dead codes from the batch (codebook.restart_dead).

  Args:
    model: the VQVAE.

  Returns:
    post_update(params, batch, rng) -> params: only "codebook", "ema_count" and "ema_sum" change.
  """
  c = model.config

  def post_update(params, batch, rng):
    z = model.apply({"params": params}, _images(batch), method="latents")
    z = jax.lax.stop_gradient(z.reshape(-1, c.code_dim))  # (N, D)
    stats = {k: params[k] for k in CODEBOOK}
    seed_rng, restart_rng = jax.random.split(rng)

    def first(stats):
      centroids, counts = kmeans(z, c.codebook_size, seed_rng, c.kmeans_iters)
      return {"codebook": centroids, "ema_count": counts, "ema_sum": centroids * counts[:, None]}

    stats = jax.lax.cond(stats["ema_count"].sum() == 0, first,
                         lambda s: ema_update(s, z, decay=c.ema_decay, epsilon=c.epsilon), stats)
    stats = restart_dead(stats, z, restart_rng, below=c.restart_below)
    return {**params, **stats}
  return post_update


def trainable(params):
  """False on the codebook and its EMA statistics (post_update owns them), True elsewhere.

  Args:
    params: the VQVAE's params (boxed or not).

  Returns:
    The same tree with a Python bool at each leaf, for Task.trainable / make_train_step.
  """
  return {k: jax.tree_util.tree_map(lambda _: k not in CODEBOOK, v,
                                    is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
          for k, v in params.items()}
