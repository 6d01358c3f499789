"""Issue 20: the detection pieces, by hand and against brute force (fast, in-process).

Boxes, IoU and GIoU by hand; the Hungarian matcher against every assignment of small cost
matrices; DETR's set loss by hand, permutation-invariant, summed over decoder layers; the
model's parameter count from its formula and its logical axes; the sine positions and patch
mask by hand; the COCO reader's one-line errors; resize/pad/flip moving the boxes by hand;
perfect detections scoring mAP 1.0 through the program's COCOeval path.
"""

import itertools
import json
import math
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import detection as det
from fmjax.data import coco
from fmjax.data.text import DataError
from fmjax.models import detr
from fmjax.transformer import BlockConfig, DecoderBlock
from train import detect


def test_box_formats_by_hand():
  cxcywh = np.array([0.5, 0.5, 0.2, 0.4])
  np.testing.assert_allclose(det.cxcywh_to_xyxy(cxcywh), [0.4, 0.3, 0.6, 0.7])
  np.testing.assert_allclose(det.xyxy_to_cxcywh(np.array([0.4, 0.3, 0.6, 0.7])), cxcywh)
  np.testing.assert_allclose(det.xywh_to_xyxy(np.array([10., 20, 30, 40])), [10, 20, 40, 60])
  np.testing.assert_allclose(det.xyxy_to_xywh(np.array([10., 20, 40, 60])), [10, 20, 30, 40])
  assert isinstance(det.cxcywh_to_xyxy(jnp.asarray(cxcywh)), jax.Array)
  assert isinstance(det.cxcywh_to_xyxy(cxcywh), np.ndarray)


def test_iou_and_giou_by_hand():
  a = np.array([[0., 0, 2, 2]])
  b = np.array([[1., 1, 3, 3], [2., 0, 3, 1], [0., 0, 2, 2]])
  iou, union = det.box_iou(a, b)
  np.testing.assert_allclose(iou, [[1 / 7, 0, 1]], atol=1e-12)
  np.testing.assert_allclose(union, [[7, 5, 4]])
  # Hulls: 3 x 3 = 9, 3 x 2 = 6, the box itself.
  np.testing.assert_allclose(det.generalized_box_iou(a, b),
                             [[1 / 7 - 2 / 9, 0 - 1 / 6, 1]], atol=1e-12)
  g = det.generalized_box_iou(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  np.testing.assert_allclose(g, [[1 / 7 - 2 / 9, -1 / 6, 1]], atol=1e-6)


def brute_force(cost, valid):
  cols = np.flatnonzero(valid)
  q = cost.shape[0]
  if len(cols) == 0:
    return 0.0
  return min(sum(cost[r, c] for r, c in zip(rows, cols))
             for rows in itertools.permutations(range(q), len(cols)))


def test_matcher_equals_brute_force():
  rng = np.random.default_rng(0)
  cost = rng.normal(size=(8, 5, 4)).astype(np.float32)
  valid = rng.random((8, 4)) < 0.6
  valid[0] = False  # no targets
  valid[1] = True  # all of them
  match = np.asarray(jax.jit(det.hungarian_match)(cost, valid))
  for i in range(8):
    cols = np.flatnonzero(valid[i])
    assert (match[i][~valid[i]] == -1).all()
    rows = match[i][cols]
    assert len(set(rows.tolist())) == len(rows) and (rows >= 0).all()  # one-to-one
    np.testing.assert_allclose(cost[i][rows, cols].sum(), brute_force(cost[i], valid[i]),
                               rtol=1e-6)


def test_matcher_with_more_targets_than_queries_leaves_the_costliest_out():
  cost = np.array([[[0., 5, 1]], ])  # (1, Q=1, M=3)
  match = det.hungarian_match(jnp.asarray(cost), jnp.ones((1, 3), bool))
  np.testing.assert_array_equal(match, [[0, -1, -1]])


def test_set_loss_by_hand():
  box = jnp.array([[[0.5, 0.5, 0.2, 0.2]]])  # (B=1, M=1, 4)
  logits = jnp.array([[[2.0, 0.0], [0.0, 1.0]]])  # (1, Q=2, K+1=2): K=1 class
  boxes = jnp.array([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.05, 0.05]]])
  set_loss = jax.jit(det.set_loss)
  loss, parts = set_loss(logits, boxes, jnp.array([[0]]), box, jnp.array([[True]]))
  ce0, ce1 = math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))
  want_ce = (ce0 + 0.1 * ce1) / 1.1  # the no-object query weighted 0.1
  np.testing.assert_allclose(parts["loss_ce"], want_ce, rtol=1e-6)
  np.testing.assert_allclose(parts["loss_l1"], 0, atol=1e-7)
  np.testing.assert_allclose(parts["loss_giou"], 0, atol=1e-6)
  np.testing.assert_allclose(loss, want_ce, rtol=1e-6)
  # Query 1 matched instead: L1 = 0.4 + 0.4 + 0.15 + 0.15 = 1.1 (num_boxes 1), weight 5.
  swapped = boxes[:, ::-1]
  _, parts = set_loss(logits[:, ::-1], swapped, jnp.array([[0]]), box, jnp.array([[True]]))
  np.testing.assert_allclose(parts["loss_l1"], 0, atol=1e-7)  # the matcher follows the box


def random_problem(seed, b=3, q=6, m=4, k=3, layers=2):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  valid = jnp.asarray(rng.random((b, m)) < 0.7).at[:, 0].set(True)
  return (f(layers, b, q, k + 1), jax.nn.sigmoid(f(layers, b, q, 4)),
          jnp.asarray(rng.integers(0, k, (b, m))), jax.nn.sigmoid(f(b, m, 4)) * 0.5 + 0.25, valid)


def test_loss_is_permutation_invariant_and_sums_the_layers():
  logits, boxes, labels, tboxes, valid = random_problem(1)
  perm = np.random.default_rng(2).permutation(logits.shape[2])
  tperm = np.array([2, 0, 3, 1])

  @jax.jit
  def losses():  # one compilation for every loss below
    return (det.detr_loss(logits, boxes, labels, tboxes, valid),
            det.detr_loss(logits[:, :, perm], boxes[:, :, perm], labels, tboxes, valid)[0],
            det.detr_loss(logits, boxes, labels[:, tperm], tboxes[:, tperm], valid[:, tperm])[0],
            [det.set_loss(logits[i], boxes[i], labels, tboxes, valid) for i in range(2)])
  (loss, parts), loss_p, loss_t, per_layer = losses()
  np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
  np.testing.assert_allclose(loss_t, loss, rtol=1e-5)
  np.testing.assert_allclose(loss, per_layer[0][0] + per_layer[1][0], rtol=1e-5)
  for name, value in parts.items():
    np.testing.assert_allclose(value, per_layer[1][1][name], rtol=1e-5)


def test_loss_gradients_reach_logits_and_boxes():
  logits, boxes, labels, tboxes, valid = random_problem(3)
  g_logits, g_boxes = jax.jit(jax.grad(
      lambda lg, bx: det.detr_loss(lg, bx, labels, tboxes, valid)[0], argnums=(0, 1)))(
          logits, boxes)
  assert np.isfinite(g_logits).all() and np.isfinite(g_boxes).all()
  assert np.abs(g_boxes).sum() > 0 and np.abs(g_logits).sum() > 0


def test_model_parameter_count_axes_and_outputs():
  c = detr.get_config("tiny")
  model = detr.DETR(c)
  x = jnp.zeros((2, 32, 32, 3))
  mask = jnp.ones((2, 32, 32), bool).at[1, :, 16:].set(False)
  # Shapes only (no compilation): the count pins every parameter's shape.
  out, variables = jax.eval_shape(model.init_with_output, jax.random.PRNGKey(0), x, mask)
  leaves = jax.tree.leaves(variables["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert all(isinstance(v, nn.Partitioned) and len(v.names) == len(v.value.shape)
             for v in leaves)
  params = nn.unbox(variables["params"])
  assert sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == detr.num_params(c)
  assert out["logits"].shape == (2, 2, 8, 4) and out["boxes"].shape == (2, 2, 8, 4)


def test_sine_positions_and_patch_mask_by_hand():
  pos = detr.sine_positions(2, 4)  # one frequency (1.0); centres at pi/2 and 3pi/2
  np.testing.assert_allclose(pos[1], [1, 0, -1, 0], atol=1e-6)  # row 0, column 1
  np.testing.assert_allclose(pos[2], [-1, 0, 1, 0], atol=1e-6)  # row 1, column 0
  mask = np.zeros((1, 4, 4), bool)
  mask[0, :3, :1] = True
  np.testing.assert_array_equal(detr.patch_mask(jnp.asarray(mask), 2), [[True, False, True, False]])


def test_decoder_block_without_causality_lets_the_first_query_see_the_last():
  block = BlockConfig(num_heads=2, head_dim=4, mlp_dim=16)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 3, 8))
  memory = jax.random.normal(jax.random.PRNGKey(1), (1, 5, 8))
  both = jnp.concatenate([x, x.at[0, 2].set(memory[0, 0])])  # not a shift: LN removes those

  @jax.jit
  def outputs():  # one compilation
    params = DecoderBlock(block).init(jax.random.PRNGKey(2), x, memory, None)
    return [DecoderBlock(block, causal=causal).apply(
        params, both, jnp.concatenate([memory, memory]), None)[0] for causal in (True, False)]
  for y, changes in zip(outputs(), (False, True)):
    assert (not np.allclose(y[0, 0], y[1, 0])) == changes


def write_json(tmp_path, images, annotations, categories=({"id": 7, "name": "a"},)):
  for im in images:
    if not os.path.exists(tmp_path / im["file_name"]):
      from PIL import Image
      Image.new("RGB", (im["width"], im["height"])).save(tmp_path / im["file_name"])
  path = tmp_path / "set.json"
  path.write_text(json.dumps({"images": images, "annotations": annotations,
                              "categories": list(categories)}))
  return str(path)


IMAGE = {"id": 3, "file_name": "a.png", "width": 40, "height": 20}


@pytest.mark.parametrize("annotation, words", [
    ({"bbox": [30, 0, 15, 5]}, "lies outside image 3's 40 x 20"),
    ({"bbox": [0, 0, 0, 5]}, "has no area"),
    ({"category_id": 8}, "category_id 8 is not one of the categories [7]"),
    ({"image_id": 4}, "image_id 4 is not among the images"),
    ({"bbox": [0, 0, 5]}, "is not [x, y, width, height]"),
])
def test_bad_annotations_are_one_line_naming_file_and_id(tmp_path, annotation, words):
  path = write_json(tmp_path, [IMAGE], [{"id": 11, "image_id": 3, "category_id": 7,
                                         "bbox": [1, 1, 5, 5], **annotation}])
  with pytest.raises(DataError) as e:
    coco.read_coco(path)
  assert f"{path}: annotation id 11: " in str(e.value) and words in str(e.value)
  assert "\n" not in str(e.value)


def test_missing_image_names_file_and_annotation(tmp_path):
  path = write_json(tmp_path, [IMAGE], [{"id": 11, "image_id": 3, "category_id": 7,
                                         "bbox": [1, 1, 5, 5]}])
  os.remove(tmp_path / "a.png")
  with pytest.raises(DataError, match=r"image id 3: no file .*a.png \(annotation id 11\)"):
    coco.read_coco(path)


def test_prepare_resizes_pads_and_flips_the_boxes_by_hand():
  image = np.zeros((20, 40, 3), np.uint8)
  image[:10, :10] = 255  # the boxed square, top-left
  ex = coco.prepare(image, np.array([[0., 0, 10, 10]]), np.array([2]), size=32, max_boxes=3)
  # r = 32 / 40 = 0.8: the 40 x 20 image becomes 32 x 16, the box 8 x 8 at the origin.
  np.testing.assert_allclose(ex["boxes"][0], np.array([4, 4, 8, 8]) / 32, rtol=1e-6)
  assert ex["valid"].tolist() == [True, False, False] and ex["labels"][0] == 2
  assert ex["mask"][:16].all() and not ex["mask"][16:].any()
  assert ex["image"][1:7, 1:7].min() == 255 and ex["image"][16:].max() == 0  # edges blur
  flipped = coco.prepare(image, np.array([[0., 0, 10, 10]]), np.array([2]), size=32,
                         max_boxes=3, flip=True)
  np.testing.assert_allclose(flipped["boxes"][0], np.array([28, 4, 8, 8]) / 32, rtol=1e-6)
  assert flipped["image"][1:7, 25:31].min() == 255
  half = coco.prepare(image, np.array([[0., 0, 10, 10]]), np.array([2]), size=32,
                      max_boxes=3, scale=0.5)
  np.testing.assert_allclose(half["boxes"][0], np.array([2, 2, 4, 4]) / 32, rtol=1e-6)
  for e in (ex, half):  # back to the image's pixels
    np.testing.assert_allclose(coco.to_pixels(e["boxes"][:1], e["ratio"], 32),
                               [[0, 0, 10, 10]], atol=1e-4)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
  folder = tmp_path_factory.mktemp("shapes")
  return coco.read_coco(coco.write_shapes(str(folder), 12, seed=5, name="eval"))


def test_training_examples_are_a_function_of_seed_image_and_epoch(shapes):
  a = coco.Detections(shapes, size=32, channels=3, max_boxes=4, augment=(0.5, True), seed=1)
  b = coco.Detections(shapes, size=32, channels=3, max_boxes=4, augment=(0.5, True), seed=1)
  for i, epoch in ((0, 0), (3, 2)):
    for key, value in a.example(i, epoch).items():
      np.testing.assert_array_equal(value, b.example(i, epoch)[key])
  assert any(not np.array_equal(a.example(i, 0)["boxes"], a.example(i, 1)["boxes"])
             for i in range(len(shapes)))


def perfect(shapes, shift: float = 0.0):
  """The eval examples' own boxes as predictions (score 1), shifted by `shift` widths."""
  examples = coco.Detections(shapes, size=64, channels=3, max_boxes=5)
  rows = [examples[i] for i in range(len(examples))]
  boxes = np.stack([r["boxes"] for r in rows])
  boxes[..., 0] += shift * boxes[..., 2]
  pred = {"boxes": boxes, "labels": np.stack([r["labels"] for r in rows]),
          "scores": np.stack([r["valid"] for r in rows]).astype(np.float32),
          "ratio": np.stack([r["ratio"] for r in rows])}
  return detect.to_results(pred, shapes.image_ids, shapes.category_ids, 64)


def test_perfect_detections_score_map_one_through_cocoeval(shapes):
  results = perfect(shapes)
  assert {r["image_id"] for r in results} <= {im["id"] for im in shapes.coco["images"]}
  scores = detect.coco_scores(shapes.coco, results)
  assert scores == pytest.approx({"eval/mAP": 1.0, "eval/AP50": 1.0, "eval/AP75": 1.0})
  # Shifted by 30% of their width: IoU 0.7/1.3 = 0.54, found at .50 but not at .75.
  shifted = detect.coco_scores(shapes.coco, perfect(shapes, 0.3))
  assert shifted["eval/AP50"] == pytest.approx(1.0) and shifted["eval/AP75"] == 0.0
  assert 0.05 < shifted["eval/mAP"] < 0.2
  assert detect.coco_scores(shapes.coco, [])["eval/mAP"] == 0.0


def test_tfds_coco_records_become_pixel_boxes_and_ground_truth(monkeypatch):
  """coco/2017 through tfds.data_source (stubbed: no network here), features as the tfds
  catalog has them: normalised [ymin, xmin, ymax, xmax] boxes, crowd boxes kept out of
  training but in the ground truth."""
  import tensorflow_datasets as tfds
  record = {"image": np.zeros((20, 40, 3), np.uint8), "image/id": 139,
            "objects": {"bbox": np.array([[0.5, 0.25, 1.0, 0.5], [0, 0, 0.5, 0.5]], np.float32),
                        "label": np.array([2, 0]), "is_crowd": np.array([False, True])}}
  monkeypatch.setattr(tfds, "data_source", lambda name, split, data_dir=None: [record])
  data = coco.TfdsCoco("coco/2017", "validation", with_truth=True)
  image, boxes, labels = data.load(0)
  np.testing.assert_allclose(boxes, [[10, 10, 10, 10]])  # x = 0.25 * 40, y = 0.5 * 20
  assert labels.tolist() == [2] and data.image_ids.tolist() == [139]
  assert [(a["bbox"], a["iscrowd"]) for a in data.coco["annotations"]] == [
      ([10, 10, 10, 10], 0), ([0, 0, 20, 10], 1)]
  ex = coco.Detections(data, size=32, channels=3, max_boxes=2)[0]
  np.testing.assert_allclose(ex["boxes"][0], np.array([12, 12, 8, 8]) / 32, rtol=1e-6)


def test_a_pretrained_vit_becomes_the_backbone():
  """init_from=hf:<the golden ViT>: its widths, its encoder as the backbone with positions
  resized to this run's grid ([CLS] and head left out); shapes equal the DETR's own."""
  import pathlib
  import ml_collections
  from fmjax import checkpoint, sources
  from fmjax.models import vit
  vit_dir = pathlib.Path(__file__).resolve().parent / "golden" / "hf" / "vit"
  weights = sources.parse(f"hf:{vit_dir}")
  source = weights.architecture(vit.ViTConfig)
  config = ml_collections.ConfigDict({"model": dict(detr.get_config("tiny").__dict__)})
  c = detect.model_config(config, 3, source)
  assert (c.embed_dim, c.backbone_layers, c.patch_size) == (
      source.embed_dim, source.num_layers, source.patch_size)
  adapted = detect.backbone_source(weights, source, c).read()
  ours = jax.eval_shape(detr.DETR(c).init, jax.random.PRNGKey(0),
                        jnp.zeros((1, c.image_size, c.image_size, c.num_channels)))
  ours = {p: x.shape for p, x in checkpoint.flatten_params(nn.unbox(ours["params"])).items()}
  backbone = {p: s for p, s in ours.items() if p.startswith("backbone/")}
  assert {p: x.shape for p, x in adapted.items()} == backbone
  theirs = checkpoint.flatten_params(weights.read())
  np.testing.assert_array_equal(adapted["backbone/patch_embed/kernel"],
                                theirs["encoder/patch_embed/kernel"])
  assert not any(p.startswith(detect.NEW_PARAMS) for p in backbone)


def test_detect_config_keys_are_checked_before_any_work():
  from configs import detect as detect_configs
  from train import checks
  for key, value, words in (("data.min_scale", 0.0, "must be a number in (0, 1]"),
                            ("data.max_boxes", 0, "must be an integer >= 1"),
                            ("model.num_queries", 0, "must be an integer >= 1"),
                            ("loss.no_object_weight", -0.1, "must be a number >= 0")):
    config = detect_configs.get_config("tiny")
    section, name = key.split(".")
    config[section][name] = value
    with pytest.raises(ValueError, match=rf"--config\.{key}={value}: {re.escape(words)}"):
      checks.validate(config)
