"""Vector quantization with a codebook: the maths of a VQ-VAE's bottleneck, one copy.

Shape key: N vectors, D their width, K codes. Pure functions of arrays, float32:
  nearest       the nearest code by L2 distance (the assignment)
  quantize      the straight-through estimator z + sg(e - z) and the commitment loss
                beta * mean (z - sg(e))^2 (van den Oord et al. 2017, eq. 3)
  code_stats    perplexity and usage of the codes in a batch
  ema_update    the codebook as an exponential moving average of its assigned vectors, with
                Laplace-smoothed counts (van den Oord et al. 2017, appendix A.1; Razavi et al.
                2019, VQ-VAE-2)
  restart_dead  dead codes re-seeded from the batch (Dhariwal et al. 2020, Jukebox)
  kmeans        Lloyd's k-means, to initialise a codebook from a first batch
fmjax/models/vqvae.py assembles them into the image tokenizer.
"""

import jax
import jax.numpy as jnp


def nearest(z, codebook):
  """The nearest code of each vector by squared L2 distance (ties: the lower index).

  Args:
    z: (N, D) float vectors.
    codebook: (K, D) float codes.

  Returns:
    (N,) int32 code indices.
  """
  dot = jnp.einsum("nd,kd->nk", z, codebook, precision=jax.lax.Precision.HIGHEST)
  d = (z ** 2).sum(-1, keepdims=True) - 2 * dot + (codebook ** 2).sum(-1)  # (N, K)
  return jnp.argmin(d, axis=-1).astype(jnp.int32)


def quantize(z, codebook, commitment: float):
  """Nearest codes, the straight-through output and the commitment loss.

  Args:
    z: (..., D) float32 encoder outputs.
    codebook: (K, D) float32.
    commitment: beta.

  Returns:
    (z_q (..., D) = z + sg(e - z): e's value with z's gradient, codes (...) int32,
    beta * mean((z - sg(e))^2) over every element: a float32 scalar).
  """
  codes = nearest(z.reshape(-1, z.shape[-1]), codebook).reshape(z.shape[:-1])
  e = jax.lax.stop_gradient(jnp.take(codebook, codes, axis=0))
  return z + jax.lax.stop_gradient(e - z), codes, commitment * jnp.mean((z - e) ** 2)


def code_stats(codes, codebook_size: int):
  """How evenly a batch uses the codebook.

  Args:
    codes: int code indices, any shape.
    codebook_size: K.

  Returns:
    (perplexity exp(-sum_k p_k log p_k) of the codes' frequencies p (1 to K), usage: the share
    of the K codes used at least once), float32 scalars.
  """
  counts = jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.float32)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.exp(entropy), jnp.mean((counts > 0).astype(jnp.float32))


def ema_update(stats: dict, z, *, decay: float, epsilon: float) -> dict:
  """One EMA step of the codebook (VQ-VAE appendix A.1, with Laplace-smoothed counts).

  N_k <- decay N_k + (1 - decay) n_k;  m_k <- decay m_k + (1 - decay) sum_{z -> k} z;
  e_k = m_k / N'_k with N'_k = (N_k + epsilon) / (sum N + K epsilon) * sum N.

  Args:
    stats: {"codebook" (K, D), "ema_count" (K,), "ema_sum" (K, D)} float32.
    z: (N, D) float32 encoder outputs, assigned to their nearest codes of stats["codebook"].
    decay: gamma.
    epsilon: the Laplace smoothing constant.

  Returns:
    The new stats (same keys).
  """
  k = stats["codebook"].shape[0]
  onehot = jax.nn.one_hot(nearest(z, stats["codebook"]), k, dtype=jnp.float32)  # (N, K)
  count = decay * stats["ema_count"] + (1 - decay) * onehot.sum(0)
  total = jnp.einsum("nk,nd->kd", onehot, z, precision=jax.lax.Precision.HIGHEST)
  ema_sum = decay * stats["ema_sum"] + (1 - decay) * total
  n = count.sum()
  smoothed = (count + epsilon) / (n + k * epsilon) * n
  return {"codebook": ema_sum / smoothed[:, None], "ema_count": count, "ema_sum": ema_sum}


def restart_dead(stats: dict, z, rng, *, below: float) -> dict:
  """Re-seeds each dead code (EMA count < below x the mean count) with a random row of z.

  A re-seeded code gets the mean count (and sum = row x mean count), so it has as long as an
  average code would take to fall below the threshold again to attract vectors.

  Args:
    stats: {"codebook" (K, D), "ema_count" (K,), "ema_sum" (K, D)} float32.
    z: (N, D) float32 encoder outputs of the current batch.
    rng: picks the rows (uniformly, independently per code).
    below: the threshold as a share of the mean EMA count.

  Returns:
    The new stats; live codes unchanged.
  """
  count = stats["ema_count"]
  mean = count.mean()
  dead = count < below * mean  # (K,)
  picks = z[jax.random.randint(rng, count.shape, 0, z.shape[0])]  # (K, D)
  return {"codebook": jnp.where(dead[:, None], picks, stats["codebook"]),
          "ema_count": jnp.where(dead, mean, count),
          "ema_sum": jnp.where(dead[:, None], picks * mean, stats["ema_sum"])}


def kmeans(z, k: int, rng, iters: int):
  """Lloyd's k-means, seeded with k distinct rows of z (with replacement if N < k).

  Args:
    z: (N, D) float32.
    k: the number of centroids.
    rng: picks the seeds.
    iters: Lloyd iterations (an empty cluster keeps its centroid).

  Returns:
    (centroids (k, D), counts (k,) float32 of z's rows nearest to each).
  """
  n = z.shape[0]
  centroids = z[jax.random.choice(rng, n, (k,), replace=n < k)]

  def step(c, _):
    onehot = jax.nn.one_hot(nearest(z, c), k, dtype=jnp.float32)
    counts = onehot.sum(0)
    sums = jnp.einsum("nk,nd->kd", onehot, z, precision=jax.lax.Precision.HIGHEST)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], c), None

  centroids, _ = jax.lax.scan(step, centroids, None, length=iters)
  return centroids, jax.nn.one_hot(nearest(z, centroids), k, dtype=jnp.float32).sum(0)
