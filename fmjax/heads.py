"""Task heads on top of an encoder, and their losses: usable from any JAX code.

Shape key: B batch, T length, D width, C classes (num_labels).

  ClassificationHead  pooled (B, D) -> dropout -> Dense(C)  -> logits (B, C)
                      (C = 1: a regression score, as BERT's STS-B recipe)
  SpanHead            tokens (B, T, D) -> Dense(2) -> start and end logits (B, T) each
                      (extractive QA: the answer is the span [start, end] of the input)

  sequence_loss       next-token logits (B, T, V) of a decoder -> label-smoothed cross-entropy
  causal_lm_loss      next-token logits (B, T, V) of a language model -> cross-entropy, accuracy
  causal_lm_loss_fn   a GPT-style model -> the loss_fn(params, batch, rng, train) that
                      fmjax.training.make_train_step and fmjax.trainer.Task take

The losses take per-example `weights` (1 for real examples, 0 for the rows that pad the
last evaluation batch) and return (loss, metrics) like fmjax.training.cross_entropy.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fmjax.layers import Dense, Dtype
from fmjax.training import cross_entropy


class ClassificationHead(nn.Module):
  """dropout -> Dense(num_labels) over a pooled representation."""
  num_labels: int
  dropout_rate: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pooled, *, train: bool = False):
    """Classification (or regression) logits of a pooled representation.

    Args:
      pooled: (B, D) float, e.g. BERT's pooled [CLS] output.
      train: apply dropout (needs a "dropout" rng).

    Returns:
      (B, C) float32 logits, C = num_labels (scores when num_labels == 1).
    """
    x = nn.Dropout(self.dropout_rate)(pooled, deterministic=not train)
    return Dense(self.num_labels, ("embed", None), dtype=self.dtype,
                 param_dtype=self.param_dtype, name="dense")(x).astype(jnp.float32)


class SpanHead(nn.Module):
  """Start and end scores for every token (BERT's SQuAD output layer)."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, sequence):
    """Start and end logits of every token.

    Args:
      sequence: (B, T, D) float, the encoder's token outputs.

    Returns:
      (start_logits, end_logits), each (B, T) float32.
    """
    logits = Dense(2, ("embed", None), dtype=self.dtype, param_dtype=self.param_dtype,
                   name="dense")(sequence).astype(jnp.float32)
    return logits[..., 0], logits[..., 1]


def classification_loss(logits, labels, weights=None):
  """Mean cross-entropy over examples with weight > 0.

  Args:
    logits: (B, C) float; computed in float32.
    labels: (B,) int class ids in [0, C).
    weights: (B,) float, or None for all ones; weight 0 rows do not count.

  Returns:
    (loss, {"loss", "accuracy"}): float32 scalars, the weighted means.
  """
  loss, acc, _ = cross_entropy(logits, labels, weights)
  return loss, {"loss": loss, "accuracy": acc}


def regression_loss(scores, targets, weights=None):
  """Mean squared error over examples with weight > 0.

  Args:
    scores: (B, 1) or (B,) float predictions.
    targets: (B,) float.
    weights: (B,) float, or None for all ones; weight 0 rows do not count.

  Returns:
    (loss, {"loss"}): the float32 scalar weighted mean of (score - target)**2.
  """
  scores = scores.reshape(targets.shape).astype(jnp.float32)
  weights = jnp.ones(targets.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  loss = (jnp.square(scores - targets.astype(jnp.float32)) * weights).sum() / jnp.maximum(
      weights.sum(), 1e-8)
  return loss, {"loss": loss}


def span_loss(start_logits, end_logits, start_positions, end_positions, weights=None):
  """The mean of the start and end cross-entropies over token positions (BERT's SQuAD loss).

  Args:
    start_logits, end_logits: (B, T) float.
    start_positions, end_positions: (B,) int (0, the [CLS] token, when the answer is outside
      the window).
    weights: (B,) float, or None for all ones; weight 0 rows do not count.

  Returns:
    (loss, {"loss", "start_accuracy", "end_accuracy"}): float32 scalars.
  """
  start, start_acc, _ = cross_entropy(start_logits, start_positions, weights)
  end, end_acc, _ = cross_entropy(end_logits, end_positions, weights)
  loss = (start + end) / 2
  return loss, {"loss": loss, "start_accuracy": start_acc, "end_accuracy": end_acc}


def sequence_loss(logits, targets, weights, label_smoothing: float = 0.0):
  """Label-smoothed cross-entropy per target token.

  Szegedy et al. 2016; Vaswani et al. use eps = 0.1: the target gets 1 - eps of the
  probability mass, eps is spread evenly over the vocabulary: the real ids only, not the
  padded ones a model masks to -inf (layers.Embed).

  Args:
    logits: (B, T, V) or (B, T, Vp) float, padded ids at -inf; computed in float32.
    targets: (B, T) int target ids.
    weights: (B, T) float, 0 on padding.
    label_smoothing: eps in [0, 1); 0 is plain cross-entropy.

  Returns:
    (loss, {"loss", "nll" (unsmoothed), "accuracy" (argmax == target)}): float32 scalars,
    means over the weighted tokens.
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # (B, T)
  real = logits != -jnp.inf  # (B, T, V) False on padded vocabulary ids
  uniform = jnp.where(real, logp, 0.0).sum(-1) / real.sum(-1)  # mean log-prob over real ids
  smoothed = (1.0 - label_smoothing) * nll - label_smoothing * uniform
  weights = weights.astype(jnp.float32)
  mean = lambda x: (x * weights).sum() / jnp.maximum(weights.sum(), 1.0)
  loss = mean(smoothed)
  return loss, {"loss": loss, "nll": mean(nll),
                "accuracy": mean((logits.argmax(-1) == targets).astype(jnp.float32))}


def causal_lm_loss(logits, targets, weights=None):
  """Next-token cross-entropy of a causal language model, in float32.

  Args:
    logits: (B, T, V) scores at each position for the token that follows it.
    targets: (B, T) int, the following tokens (inputs shifted left by one, as
      fmjax.data.LMBatchIterator makes them).
    weights: (B, T) float, 0 where a position does not count (e.g. padding), or None.
  Returns:
    (loss, {"loss", "accuracy"}): the weighted mean of -log p(target) over positions, and how
    often the argmax is the target.
  """
  loss, accuracy, _ = cross_entropy(logits, targets, weights)
  return loss, {"loss": loss, "accuracy": accuracy}


def causal_lm_loss_fn(model: nn.Module):
  """The training loss of a causal LM over packed windows, for make_train_step / fit.

  Args:
    model: e.g. fmjax.GPT(config); called as model.apply({"params": params}, inputs,
      positions=..., segment_ids=..., train=..., rngs={"dropout": rng}).
  Returns:
    loss_fn(params, batch, rng, train) -> (loss, {"loss", "accuracy"}), where batch holds
    "inputs", "targets", "positions" and "segment_ids", each (B, T) int (fmjax.data's LM
    batches), and optionally "weights" (B, T).
  """
  def loss_fn(params, batch, rng, train):
    logits = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                         segment_ids=batch["segment_ids"], train=train, rngs={"dropout": rng})
    return causal_lm_loss(logits, batch["targets"], batch.get("weights"))
  return loss_fn
