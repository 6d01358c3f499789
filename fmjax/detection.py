"""Set prediction for object detection: boxes, Hungarian matching and DETR's loss (Carion et
al. 2020, "End-to-End Object Detection with Transformers", section 3.1).

Shape key: B batch, Q object queries, M target boxes (padded; `valid` marks the real ones),
K classes (the class head has K + 1 outputs, the last one "no object"), L decoder layers.

Box formats: "cxcywh" (centre, width, height; DETR's normalised [0, 1] predictions), "xyxy"
(corners) and "xywh" (COCO's top-left corner, width, height, in pixels). The functions take
numpy arrays (data pipelines) or jax arrays (the loss) and return the same kind.

The loss: per example, the queries are matched one-to-one to the real targets by the
assignment of least cost (scipy's linear_sum_assignment, on the host through
jax.pure_callback)

  cost(q, m) = -w_class * p_q(class_m) + w_l1 * |b_q - b_m|_1 - w_giou * GIoU(b_q, b_m)

then the matched queries learn their target's class and box and every other query learns
"no object" (its cross-entropy weighted by no_object_weight):

  loss = w_class * CE + w_l1 * L1 / num_boxes + w_giou * (1 - GIoU) / num_boxes

with DETR's weights (1, 5, 2) for both the cost and the loss, no_object_weight 0.1, and
num_boxes the real targets in the batch. With auxiliary decoding losses (section 3.2) each
decoder layer's predictions are matched and scored on their own and the losses summed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment


def _xp(x):
  return np if isinstance(x, np.ndarray) else jnp


def cxcywh_to_xyxy(boxes):
  """(..., 4) centre, width, height -> (..., 4) corners x0, y0, x1, y1.

  Args:
    boxes: (..., 4) numpy or jax array.

  Returns:
    (..., 4), the same kind of array.
  """
  cx, cy, w, h = (boxes[..., i] for i in range(4))
  return _xp(boxes).stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes):
  """(..., 4) corners x0, y0, x1, y1 -> (..., 4) centre, width, height.

  Args:
    boxes: (..., 4) numpy or jax array.

  Returns:
    (..., 4), the same kind of array.
  """
  x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
  return _xp(boxes).stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=-1)


def xywh_to_xyxy(boxes):
  """(..., 4) COCO x, y (top-left), width, height -> (..., 4) corners.

  Args:
    boxes: (..., 4) numpy or jax array.

  Returns:
    (..., 4), the same kind of array.
  """
  x, y, w, h = (boxes[..., i] for i in range(4))
  return _xp(boxes).stack([x, y, x + w, y + h], axis=-1)


def xyxy_to_xywh(boxes):
  """(..., 4) corners -> (..., 4) COCO x, y (top-left), width, height.

  Args:
    boxes: (..., 4) numpy or jax array.

  Returns:
    (..., 4), the same kind of array.
  """
  x0, y0, x1, y1 = (boxes[..., i] for i in range(4))
  return _xp(boxes).stack([x0, y0, x1 - x0, y1 - y0], axis=-1)


def box_area(boxes):
  """(..., 4) xyxy boxes -> (...) areas (0 for an inverted box).

  Args:
    boxes: (..., 4) xyxy, numpy or jax.

  Returns:
    (...) areas.
  """
  xp = _xp(boxes)
  return xp.maximum(boxes[..., 2] - boxes[..., 0], 0) * xp.maximum(boxes[..., 3] - boxes[..., 1], 0)


def box_iou(a, b):
  """Pairwise intersection over union of xyxy boxes.

  Args:
    a: (..., N, 4) xyxy boxes.
    b: (..., M, 4) xyxy boxes (the same leading dims).

  Returns:
    (iou, union), each (..., N, M).
  """
  xp = _xp(a)
  lo = xp.maximum(a[..., :, None, :2], b[..., None, :, :2])  # (..., N, M, 2)
  hi = xp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
  inter = xp.prod(xp.maximum(hi - lo, 0), axis=-1)
  union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
  return inter / xp.maximum(union, 1e-12), union


def generalized_box_iou(a, b):
  """Pairwise generalised IoU (Rezatofighi et al. 2019): IoU - (|C| - |A u B|) / |C|, C the
  smallest box enclosing both; in [-1, 1], 1 only for equal boxes.

  Args:
    a: (..., N, 4) xyxy boxes.
    b: (..., M, 4) xyxy boxes.

  Returns:
    (..., N, M) generalised IoU.
  """
  xp = _xp(a)
  iou, union = box_iou(a, b)
  lo = xp.minimum(a[..., :, None, :2], b[..., None, :, :2])
  hi = xp.maximum(a[..., :, None, 2:], b[..., None, :, 2:])
  hull = xp.prod(xp.maximum(hi - lo, 0), axis=-1)
  return iou - (hull - union) / xp.maximum(hull, 1e-12)


def _assign(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Host side of `hungarian_match`, for any leading dims: (..., Q, M), (..., M) -> (..., M)."""
  cost, valid = np.asarray(cost), np.asarray(valid)
  lead, (q, m) = cost.shape[:-2], cost.shape[-2:]
  cost, valid = cost.reshape(-1, q, m), valid.reshape(-1, m)
  out = np.full(valid.shape, -1, np.int32)
  for i in range(len(cost)):
    cols = np.flatnonzero(valid[i])
    if len(cols):
      rows, picked = linear_sum_assignment(cost[i][:, cols])
      out[i, cols[picked]] = rows
  return out.reshape(*lead, m)


def hungarian_match(cost, valid):
  """The one-to-one assignment of least total cost, per example, computed on the host.

  Args:
    cost: (..., Q, M) float matching costs of query q for target m.
    valid: (..., M) bool, False on padding targets (never matched).

  Returns:
    (..., M) int32: the query matched to each target; -1 for padding (and, with more real
    targets than queries, for the targets left over). No gradient flows through it.
  """
  cost = jax.lax.stop_gradient(cost).astype(jnp.float32)
  out = jax.ShapeDtypeStruct(valid.shape, jnp.int32)
  return jax.pure_callback(_assign, out, cost, valid, vmap_method="broadcast_all")


@dataclasses.dataclass(frozen=True)
class LossWeights:
  """DETR's weights, the same for the matching cost and the loss (section 4, "Training").

  Attributes:
    class_weight: the classification term (cost: minus the target class's probability).
    l1_weight: the L1 distance of normalised cxcywh boxes.
    giou_weight: the generalised IoU term.
    no_object_weight: the cross-entropy weight of queries matched to nothing.
  """
  class_weight: float = 1.0
  l1_weight: float = 5.0
  giou_weight: float = 2.0
  no_object_weight: float = 0.1


def match_cost(logits, boxes, labels, target_boxes, weights: LossWeights = LossWeights()):
  """DETR's matching cost of every query against every target.

  Args:
    logits: (..., Q, K + 1) class logits.
    boxes: (..., Q, 4) predicted cxcywh boxes.
    labels: (..., M) int target classes in [0, K).
    target_boxes: (..., M, 4) cxcywh target boxes.
    weights: the cost weights.

  Returns:
    (..., Q, M) float32 cost.
  """
  prob = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # (..., Q, K+1)
  index = jnp.broadcast_to(labels[..., None, :], (*prob.shape[:-1], labels.shape[-1]))
  p_target = jnp.take_along_axis(prob, index, axis=-1)  # (..., Q, M)
  l1 = jnp.abs(boxes[..., :, None, :] - target_boxes[..., None, :, :]).sum(-1)
  giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes))
  return (-weights.class_weight * p_target + weights.l1_weight * l1
          - weights.giou_weight * giou)


def set_loss(logits, boxes, labels, target_boxes, valid, weights: LossWeights = LossWeights()):
  """DETR's set loss of one set of predictions (one decoder layer) against the targets.

  Args:
    logits: (B, Q, K + 1) class logits; index K is "no object".
    boxes: (B, Q, 4) predicted cxcywh boxes (normalised).
    labels: (B, M) int target classes in [0, K) (anything on padding).
    target_boxes: (B, M, 4) cxcywh target boxes (anything on padding).
    valid: (B, M) bool, True for real targets.
    weights: the cost and loss weights.

  Returns:
    (loss, parts): the scalar loss and {"loss_ce", "loss_l1", "loss_giou"} (unweighted).
  """
  logits, boxes = logits.astype(jnp.float32), boxes.astype(jnp.float32)
  target_boxes = target_boxes.astype(jnp.float32)
  q, k = logits.shape[-2], logits.shape[-1] - 1
  match = hungarian_match(match_cost(logits, boxes, labels, target_boxes, weights), valid)
  matched = valid & (match >= 0)  # (B, M)
  # assign[b, q, m]: query q is matched to target m; a 0/1 matrix keeps the loss gather-free.
  assign = (match[:, None, :] == jnp.arange(q)[None, :, None]) & matched[:, None, :]
  assign = assign.astype(jnp.float32)  # (B, Q, M)
  is_object = assign.sum(-1)  # (B, Q), 1 for a matched query
  target_class = jnp.where(is_object > 0, jnp.einsum("bqm,bm->bq", assign, labels.astype(
      jnp.float32)).round().astype(jnp.int32), k)  # (B, Q)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(log_probs, target_class[..., None], axis=-1)[..., 0]  # (B, Q)
  w = jnp.where(is_object > 0, 1.0, weights.no_object_weight)
  loss_ce = (w * ce).sum() / w.sum()
  num_boxes = jnp.maximum(matched.sum(), 1).astype(jnp.float32)
  target_q = jnp.einsum("bqm,bmc->bqc", assign, target_boxes)  # (B, Q, 4) matched targets
  loss_l1 = (jnp.abs(boxes - target_q).sum(-1) * is_object).sum() / num_boxes
  giou = generalized_box_iou(cxcywh_to_xyxy(boxes)[..., None, :],
                             cxcywh_to_xyxy(target_q)[..., None, :])[..., 0, 0]  # (B, Q)
  loss_giou = ((1.0 - giou) * is_object).sum() / num_boxes
  loss = (weights.class_weight * loss_ce + weights.l1_weight * loss_l1
          + weights.giou_weight * loss_giou)
  return loss, {"loss_ce": loss_ce, "loss_l1": loss_l1, "loss_giou": loss_giou}


def detr_loss(logits, boxes, labels, target_boxes, valid, weights: LossWeights = LossWeights()):
  """The set loss of every decoder layer's predictions, summed (auxiliary decoding losses).

  Args:
    logits: (L, B, Q, K + 1) class logits of each decoder layer (the last is the output).
    boxes: (L, B, Q, 4) cxcywh boxes of each layer.
    labels, target_boxes, valid: the targets, as for `set_loss`.
    weights: the cost and loss weights.

  Returns:
    (loss, parts): the sum over layers, and the last layer's {"loss_ce", "loss_l1",
    "loss_giou"}.
  """
  per_layer = jax.vmap(lambda lg, bx: set_loss(lg, bx, labels, target_boxes, valid, weights))
  losses, parts = per_layer(logits, boxes)
  return losses.sum(), {name: value[-1] for name, value in parts.items()}
