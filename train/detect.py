"""Object detection with DETR and a ViT backbone (fmjax.models.detr, fmjax.detection).

  python -m train.detect --config=configs/detect.py:shapes --workdir=DIR [--config.a.b=v]

Data (config.data), one of:
  train_path + eval_path  COCO-format JSON files (images[].file_name relative to the JSON's
                          folder, or to image_dir);
  tfds_name               coco/2017 through tfds (train_split, eval_split, data_dir), read
                          record by record; tfds's labels are the category ids;
  neither                 generated shapes scenes (fmjax.data.coco.write_shapes) in DIR/data,
                          shapes_train and shapes_eval of them, held out from each other.
Images are resized to fit config.model.image_size, padded (with a pixel mask) and, in
training, shrunk by a random scale in [min_scale, 1] and flipped (seeded by (seed, image,
epoch): resuming is exact). config.model.num_classes -1 takes the training categories.

Every eval_every steps and at the end, COCOeval (pycocotools) scores the eval set's
detections: eval/mAP (AP at IoU .50:.95), eval/AP50, eval/AP75 in metrics.jsonl; the
detections go to DIR/predictions/eval.json as a COCO results file (image and category ids
of the input JSON, [x, y, w, h] in its pixels) and a picture to DIR/predictions/eval.png.
The best evaluation's params are kept (DIR/best) and scored into DIR/eval_results.json;
with data.predict_path (a folder of images) they box every image into
DIR/predictions/<folder>.json. Rerunning resumes.

config.init_from (a classify_images workdir, or hf:DIRECTORY of a Hugging Face ViT) starts
the backbone from a pretrained ViT: its widths and weights, the positions resized to this
run's patch grid; the encoder, decoder and heads start fresh.
"""

import contextlib
import io
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from fmjax import detection, errors, trainer
from fmjax import data as fdata
from fmjax.data import coco
from fmjax.models import detr, vit
from train import common

# What a pretrained ViT does not bring: everything but the backbone (and decoder_i).
NEW_PARAMS = ("encoder", "queries", "ln_dec", "class_head", "box_0", "box_1", "box_2")
DRAW_THRESHOLD = 0.5  # predicted boxes drawn in the PNGs: those scoring at least this
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


# Data -------------------------------------------------------------------------------------------

def load_sets(config, workdir: str):
  """(train, eval) CocoSets (the given JSON files, or the generated shapes scenes), or
  TfdsCoco splits."""
  d = config.data
  if d.tfds_name:
    return (coco.TfdsCoco(d.tfds_name, d.train_split, data_dir=d.data_dir),
            coco.TfdsCoco(d.tfds_name, d.eval_split, data_dir=d.data_dir, with_truth=True))
  if bool(d.train_path) != bool(d.eval_path):
    raise ValueError("set both --config.data.train_path and --config.data.eval_path (COCO "
                     "JSON files), or neither for the generated shapes scenes")
  if d.train_path:
    train = coco.read_coco(d.train_path, d.image_dir)
    return train, coco.read_coco(d.eval_path, d.image_dir, categories=train.category_ids)
  folder = os.path.join(workdir, "data")
  paths = []
  for name, n, seed in (("train", d.shapes_train, config.seed), ("eval", d.shapes_eval,
                                                                config.seed + 10**6)):
    path = os.path.join(folder, f"{name}.json")
    if not os.path.exists(path) and jax.process_index() == 0:
      coco.write_shapes(folder, n, seed=seed, name=name)
    paths.append(path)
  train = coco.read_coco(paths[0])
  return train, coco.read_coco(paths[1], categories=train.category_ids)


# Backbone fields a pretrained ViT (init_from) brings; the rest are this run's.
BACKBONE_FIELDS = {"backbone_layers": "num_layers", "num_heads": "num_heads",
                   "embed_dim": "embed_dim", "mlp_dim": "mlp_dim", "patch_size": "patch_size",
                   "num_channels": "num_channels", "norm_eps": "norm_eps"}


def model_config(config, num_classes: int, source: vit.ViTConfig | None = None):
  """config.model, num_classes -1 taking the data's; with a pretrained ViT its widths."""
  fields = dict(config.model)
  if fields["num_classes"] == -1:
    fields["num_classes"] = num_classes
  if source is not None:
    fields.update({ours: getattr(source, theirs) for ours, theirs in BACKBONE_FIELDS.items()})
  return common.as_flags(detr.DETRConfig, "config.model", **fields)


def backbone_source(weights, source: vit.ViTConfig, c: detr.DETRConfig):
  """A ViT classifier's weights (a classify_images workdir or a Hugging Face ViT) as the
  DETR backbone's: encoder/* -> backbone/*, the [CLS] token, its position and the head left
  out, the positions resized to this run's patch grid (vit.resize_posemb)."""
  prefix = int(source.pool == "cls")

  def to_backbone(params):
    out = {"backbone/" + p[len("encoder/"):]: x for p, x in params.items()
           if p.startswith("encoder/") and p != "encoder/cls"}
    out["backbone/posemb"] = vit.resize_posemb(params["encoder/posemb"][prefix:], c.grid,
                                               num_prefix=0)
    return out
  return common.sources.Adapted(weights, to_backbone, f"ViT encoder -> DETR backbone, "
                                f"positions resized to {c.grid} x {c.grid} patches")


# Loss, predictions and scores -------------------------------------------------------------------

def pixels(x):
  """uint8 images -> float32 in [-1, 1]."""
  return x.astype(jnp.float32) / 127.5 - 1.0


def make_loss_fn(model, weights: detection.LossWeights):
  """DETR's set loss summed over the decoder layers; metrics: the last layer's parts."""
  def loss_fn(params, batch, rng, train):
    out = model.apply({"params": params}, pixels(batch["image"]), batch["mask"], train=train,
                      rngs={"dropout": rng})
    loss, parts = detection.detr_loss(out["logits"], out["boxes"], batch["labels"],
                                      batch["boxes"], batch["valid"], weights)
    return loss, {"loss": loss, **parts}
  return loss_fn


def make_predict_fn(model):
  """The last decoder layer's detections: each query's best real class, its probability and
  its box."""
  def predict_fn(params, batch):
    out = model.apply({"params": params}, pixels(batch["image"]), batch["mask"], train=False)
    probs = jax.nn.softmax(out["logits"][-1], axis=-1)[..., :-1]  # (B, Q, K): no "no object"
    return {"scores": probs.max(-1), "labels": probs.argmax(-1), "boxes": out["boxes"][-1]}
  return predict_fn


def collect(predict, examples, batch_size: int) -> dict[str, np.ndarray]:
  """predict's outputs for every example of `examples` (coco.Detections or a list of
  prepared dicts), in order, plus their "ratio"."""
  n = len(examples)
  outputs = []
  for b in fdata.padded_batches({"index": np.arange(n), "weight": np.ones(n, np.float32)},
                                batch_size, process_index=jax.process_index(),
                                process_count=jax.process_count()):
    rows = [examples[int(i)] for i in b["index"]]
    batch = {k: np.stack([r[k] for r in rows]) for k in ("image", "mask")}
    outputs.append({**predict(batch), "ratio": np.stack([r["ratio"] for r in rows])})
  return {k: np.concatenate([o[k] for o in outputs])[:n] for k in outputs[0]}


def to_results(pred: dict, image_ids, category_ids, size: int) -> list[dict]:
  """Detections as a COCO results list [{image_id, category_id, bbox (xywh pixels), score}]."""
  boxes = coco.to_pixels(pred["boxes"], pred["ratio"][:, None], size)  # (N, Q, 4)
  return [{"image_id": int(image_ids[i]), "category_id": int(category_ids[pred["labels"][i, q]]),
           "bbox": [round(float(v), 2) for v in boxes[i, q]],
           "score": round(float(pred["scores"][i, q]), 5)}
          for i in range(len(boxes)) for q in range(boxes.shape[1])]


def coco_scores(ground_truth: dict, results: list[dict]) -> dict[str, float]:
  """COCOeval's bbox AP of `results` against a COCO-format ground truth dict.

  Args:
    ground_truth: the parsed annotation JSON (area and iscrowd filled in when absent).
    results: COCO results [{image_id, category_id, bbox, score}].

  Returns:
    {"eval/mAP": AP@[.50:.95], "eval/AP50", "eval/AP75"}; 0 for no detections.
  """
  from pycocotools.coco import COCO
  from pycocotools.cocoeval import COCOeval
  if not results:
    return {"eval/mAP": 0.0, "eval/AP50": 0.0, "eval/AP75": 0.0}
  gt = dict(ground_truth)
  gt["annotations"] = [{"area": a["bbox"][2] * a["bbox"][3], "iscrowd": 0, **a}
                       for a in ground_truth["annotations"]]
  with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
    truth = COCO()
    truth.dataset = gt
    truth.createIndex()
    evaluator = COCOeval(truth, truth.loadRes(results), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  ap, ap50, ap75 = (max(float(v), 0.0) for v in evaluator.stats[:3])  # -1: no such objects
  return {"eval/mAP": ap, "eval/AP50": ap50, "eval/AP75": ap75}


def draw(path: str, examples, pred: dict | None, names, *, count: int = 16, zoom: int = 3):
  """A PNG grid of up to `count` canvases: true boxes green, predictions (score >=
  DRAW_THRESHOLD) red with their class and score."""
  from PIL import Image, ImageDraw
  n = min(count, len(examples))
  size = examples[0]["image"].shape[0] * zoom
  cols = min(n, 4)
  sheet = Image.new("RGB", (cols * size, -(-n // cols) * size))
  for i in range(n):
    ex = examples[i]
    im = Image.fromarray(ex["image"].squeeze(-1) if ex["image"].shape[-1] == 1 else ex["image"])
    im = im.convert("RGB").resize((size, size), Image.NEAREST)
    pen = ImageDraw.Draw(im)
    boxes = [(b, "lime", "") for b, v in zip(ex.get("boxes", ()), ex.get("valid", ())) if v]
    if pred is not None:
      boxes += [(b, "red", f"{names[lab]} {s:.2f}") for b, lab, s in zip(
          pred["boxes"][i], pred["labels"][i], pred["scores"][i]) if s >= DRAW_THRESHOLD]
    for box, colour, text in boxes:
      x0, y0, x1, y1 = (float(v) * size for v in detection.cxcywh_to_xyxy(np.asarray(box)))
      pen.rectangle([x0, y0, x1, y1], outline=colour)
      if text:
        pen.text((x0 + 1, y0 + 1), text, fill=colour)
    sheet.paste(im, ((i % cols) * size, (i // cols) * size))
  with errors.writing(path, "the predictions picture"):
    sheet.save(path)


def write_json(path: str, value, what: str) -> None:
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with errors.writing(path, what), open(path, "w") as f:
    json.dump(value, f)


def evaluate(predict, workdir: str, eval_set: coco.CocoSet, examples, batch_size: int,
             size: int) -> dict[str, float]:
  """Scores the eval set, writing predictions/eval.json and predictions/eval.png."""
  pred = collect(predict, examples, batch_size)
  results = to_results(pred, eval_set.image_ids, eval_set.category_ids, size)
  write_json(os.path.join(workdir, "predictions", "eval.json"), results, "the eval detections")
  if jax.process_index() == 0:
    draw(os.path.join(workdir, "predictions", "eval.png"),
         [examples[i] for i in range(min(16, len(examples)))], pred, eval_set.category_names)
  return coco_scores(eval_set.coco, results)


def predict_folder(predict, workdir: str, folder: str, c: detr.DETRConfig, category_ids, names,
                   batch_size: int) -> str:
  """Boxes every image of `folder` into predictions/<folder>.json (+ .png); returns the path."""
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_SUFFIXES))
  if not files:
    raise ValueError(f"--config.data.predict_path={folder}: no images "
                     f"({', '.join(IMAGE_SUFFIXES)})")
  examples = [coco.prepare(coco.open_image(os.path.join(folder, f), c.num_channels),
                           np.zeros((0, 4)), np.zeros(0, np.int32), size=c.image_size,
                           max_boxes=1) for f in files]
  pred = collect(predict, examples, batch_size)
  boxes = coco.to_pixels(pred["boxes"], pred["ratio"][:, None], c.image_size)
  out = [{"file_name": f, "category_id": int(category_ids[pred["labels"][i, q]]),
          "category": names[pred["labels"][i, q]],
          "bbox": [round(float(v), 2) for v in boxes[i, q]],
          "score": round(float(pred["scores"][i, q]), 5)}
         for i, f in enumerate(files) for q in range(boxes.shape[1])
         if pred["scores"][i, q] >= DRAW_THRESHOLD]
  name = os.path.basename(os.path.normpath(folder)) or "predict"
  path = os.path.join(workdir, "predictions", f"{name}.json")
  write_json(path, out, "the predictions")
  if jax.process_index() == 0:
    draw(os.path.join(workdir, "predictions", f"{name}.png"),
         [{k: v for k, v in e.items() if k not in ("boxes", "valid")} for e in examples[:16]],
         pred, names)
  return path


# The program ------------------------------------------------------------------------------------

@common.holds_workdir
def run(config, workdir: str):
  common.prepare_workdir(config, workdir)
  d, t = config.data, config.train
  weights = common.sources.parse(config.init_from)
  source = weights.architecture(vit.ViTConfig)  # a classify_images workdir or hf:DIR
  train_set, eval_set = load_sets(config, workdir)
  c = model_config(config, len(train_set.category_ids), source)
  if source is not None:
    weights = backbone_source(weights, source, c)
  if c.num_classes < len(train_set.category_ids):
    raise ValueError(f"--config.model.num_classes={c.num_classes} but {train_set.path} has "
                     f"{len(train_set.category_ids)} categories; use -1 to take the data's")
  kw = dict(size=c.image_size, channels=c.num_channels, max_boxes=d.max_boxes)
  train_examples = coco.Detections(train_set, augment=(d.min_scale, d.flip), seed=config.seed,
                                   **kw)
  eval_examples = coco.Detections(eval_set, **kw)
  for examples, data in ((train_examples, train_set), (eval_examples, eval_set)):
    if examples.truncated:
      trainer.log.warning("%s: %d boxes beyond --config.data.max_boxes=%d per image are left "
                          "out", data.path, examples.truncated, d.max_boxes)
  trainer.log.info("%d train and %d eval images, %d categories (%s), canvas %d x %d",
                   len(train_set), len(eval_set), len(train_set.category_ids),
                   ", ".join(train_set.category_names[:10]), c.image_size, c.image_size)
  model = detr.DETR(c, common.runtime(config))
  schedule = common.resolve_schedule(t, len(train_set))
  train_data = fdata.ExampleBatchIterator(
      fdata.ArraySource({"index": np.arange(len(train_set))}), batch_size=t.batch_size,
      seed=config.seed, transform=lambda ex, i, epoch: train_examples.example(i, epoch),
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_batch = d.eval_batch_size or t.batch_size
  loss_weights = detection.LossWeights(**config.loss)
  evaluate_with = lambda predict: evaluate(predict, workdir, eval_set, eval_examples,
                                           eval_batch, c.image_size)
  task = common.Task(
      model=model, model_config=c, loss_fn=make_loss_fn(model, loss_weights),
      train_data=train_data, eval_data=None, example_batch=train_data.batch_at(0),
      init_args=lambda b: (np.zeros(b["image"].shape, np.float32), np.ones(b["mask"].shape,
                                                                           bool)),
      flops_per_example=detr.flops_per_image(c), tokens_per_example=c.grid ** 2,
      predict_fn=make_predict_fn(model), score_fn=evaluate_with,
      new_params=NEW_PARAMS + tuple(f"decoder_{i}" for i in range(c.decoder_layers)))
  state, last = common.fit(config, workdir, task, schedule=schedule, source=weights)

  params = trainer.best_params(workdir, state.params)
  predict = trainer.make_predict(task.predict_fn, params)
  final = evaluate_with(predict)
  write_json(os.path.join(workdir, "eval_results.json"), {"best_metric": t.best_metric, **final},
             "evaluation results")
  if d.predict_path:
    path = predict_folder(predict, workdir, d.predict_path, c, train_set.category_ids,
                          train_set.category_names, eval_batch)
    trainer.log.info("boxed the images of %s into %s", d.predict_path, path)
  common.report(workdir, {**last, **final})
  print("  " + ", ".join(f"{k}={v:.4f}" for k, v in final.items()))
  return final


if __name__ == "__main__":
  common.main(run, sys.argv)
