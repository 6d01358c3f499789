"""Object detection data in COCO's format: the JSON reader, the model's input (resize, pad,
mask, flips and scale jitter that move the boxes) and a generated shapes-with-boxes set.

A COCO JSON holds `images` [{id, file_name, width, height}], `annotations` [{id, image_id,
category_id, bbox: [x, y, w, h] in pixels, iscrowd}] and `categories` [{id, name}];
file_name is relative to `image_dir` (default: the JSON's folder). The model sees each image
resized so that its longer side is S (times a random scale in training), flipped at random,
placed at the top-left of an S x S canvas with a pixel mask (False on the padding), and its
boxes as (cx, cy, w, h) divided by S; `to_pixels` maps predicted boxes back.
"""

import dataclasses
import json
import os

import numpy as np

from fmjax import detection
from fmjax.data.text import DataError

# Boxes may overhang the image by this many pixels (rounding in exporters), no more.
TOLERANCE = 1.0


@dataclasses.dataclass
class CocoSet:
  """A checked COCO-format set.

  Attributes:
    path: the JSON file.
    coco: the parsed JSON (the ground truth COCOeval scores against).
    image_ids: (N,) int, the images in file order.
    files: N image paths.
    sizes: (N, 2) int, (height, width) of each image.
    boxes: N arrays (n_i, 4) float32, COCO xywh in pixels (crowd boxes left out).
    labels: N arrays (n_i,) int32, class indices into `category_ids`.
    category_ids: the categories' ids, sorted; class k is category_ids[k].
    category_names: their names.
  """
  path: str
  coco: dict
  image_ids: np.ndarray
  files: list
  sizes: np.ndarray
  boxes: list
  labels: list
  category_ids: list
  category_names: list

  def __len__(self) -> int:
    return len(self.files)


def read_coco(path: str, image_dir: str = "", *, categories: list | None = None) -> CocoSet:
  """Reads and checks a COCO-format JSON file.

  Args:
    path: the JSON file.
    image_dir: the folder `file_name`s are relative to; "" for the JSON's folder.
    categories: the category ids of the classes (another split's `category_ids`), so an
      eval set maps ids to the same classes; None: this file's, sorted.

  Returns:
    The CocoSet.

  Raises:
    DataError: one line naming the file and the offending image or annotation id: a box
      outside its image or with no area, an unknown category or image id, a missing image
      file, malformed JSON or missing keys.
  """
  try:
    with open(path) as f:
      coco = json.load(f)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not JSON ({e}); give a COCO-format annotation file") from None
  missing = [k for k in ("images", "annotations", "categories") if not isinstance(
      coco, dict) or k not in coco]
  if missing:
    raise DataError(f"{path}: no {missing} key(s); a COCO-format file has images, annotations "
                    "and categories")
  folder = image_dir or os.path.dirname(os.path.abspath(path))
  ids = sorted(c["id"] for c in coco["categories"]) if categories is None else list(categories)
  names = {c["id"]: c.get("name", str(c["id"])) for c in coco["categories"]}
  index = {cid: k for k, cid in enumerate(ids)}
  images = {}
  for im in coco["images"]:
    if not all(k in im for k in ("id", "file_name")):
      raise DataError(f"{path}: image {im!r} lacks an id or a file_name")
    images[im["id"]] = im
  boxes = {i: [] for i in images}
  labels = {i: [] for i in images}
  for a in coco["annotations"]:
    aid = a.get("id", "?")
    where = f"{path}: annotation id {aid}"
    if a.get("image_id") not in images:
      raise DataError(f"{where}: image_id {a.get('image_id')!r} is not among the images")
    if a.get("category_id") not in index:
      raise DataError(f"{where}: category_id {a.get('category_id')!r} is not one of the "
                      f"categories {ids}")
    bbox = a.get("bbox")
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4 or \
        not all(isinstance(v, (int, float)) for v in bbox):
      raise DataError(f"{where}: bbox {bbox!r} is not [x, y, width, height]")
    im = images[a["image_id"]]
    x, y, w, h = bbox
    width, height = im.get("width", np.inf), im.get("height", np.inf)
    if w <= 0 or h <= 0 or x < -TOLERANCE or y < -TOLERANCE or x + w > width + TOLERANCE or \
        y + h > height + TOLERANCE:
      raise DataError(f"{where}: bbox {list(bbox)} lies outside image {a['image_id']}'s "
                      f"{width} x {height} pixels (or has no area); fix or drop the "
                      "annotation")
    if not a.get("iscrowd", 0):
      boxes[a["image_id"]].append(bbox)
      labels[a["image_id"]].append(index[a["category_id"]])
  files, sizes = [], []
  for iid, im in images.items():
    file = os.path.join(folder, im["file_name"])
    if not os.path.isfile(file):
      first = next((a.get("id") for a in coco["annotations"] if a["image_id"] == iid), None)
      raise DataError(f"{path}: image id {iid}: no file {file}"
                      f"{f' (annotation id {first})' if first is not None else ''}; "
                      "pass the folder the file names are relative to (image_dir) or fix "
                      "file_name")
    files.append(file)
    sizes.append((im.get("height", 0), im.get("width", 0)))
  return CocoSet(
      path=path, coco=coco, image_ids=np.asarray(list(images)), files=files,
      sizes=np.asarray(sizes, np.int64),
      boxes=[np.asarray(boxes[i], np.float32).reshape(-1, 4) for i in images],
      labels=[np.asarray(labels[i], np.int32) for i in images],
      category_ids=ids, category_names=[names.get(i, str(i)) for i in ids])


def open_image(path: str, channels: int) -> np.ndarray:
  """An image file as (H, W, C) uint8 (C = 1: grey, 3: RGB).

  Args:
    path: a PNG, JPEG or other file Pillow reads.
    channels: 1 or 3.

  Returns:
    (H, W, channels) uint8.
  """
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im.convert("L" if channels == 1 else "RGB")).reshape(
        im.height, im.width, channels)


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """(H, W, C) uint8 -> (height, width, C) uint8, bilinear (Pillow).

  Args:
    image: (H, W, C) uint8.
    height, width: the new size.

  Returns:
    (height, width, C) uint8.
  """
  from PIL import Image
  c = image.shape[2]
  im = Image.fromarray(image[..., 0] if c == 1 else image)
  return np.asarray(im.resize((width, height), Image.BILINEAR)).reshape(height, width, c)


def prepare(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, *, size: int,
            max_boxes: int, scale: float = 1.0, flip: bool = False) -> dict:
  """One image and its boxes as the model's fixed-shape input.

  The image is resized by r = scale * size / max(H, W), mirrored left-right when `flip`,
  and placed at the top-left of a size x size canvas; the boxes move with it.

  Args:
    image: (H, W, C) uint8.
    boxes: (n, 4) COCO xywh in the image's pixels.
    labels: (n,) int class indices.
    size: S, the canvas side.
    max_boxes: M; the boxes are padded to M (n > M: the first M are kept).
    scale: scale jitter, in (0, 1].
    flip: mirror left-right.

  Returns:
    {"image": (S, S, C) uint8, "mask": (S, S) bool, "boxes": (M, 4) float32 cxcywh / S,
    "labels": (M,) int32, "valid": (M,) bool, "ratio": (2,) float32 canvas pixels per image
    pixel along x and y (r, up to rounding)}.
  """
  h, w = image.shape[:2]
  r = scale * size / max(h, w)
  nh, nw = max(1, min(size, round(h * r))), max(1, min(size, round(w * r)))
  small = resize(image, nh, nw)
  xyxy = detection.xywh_to_xyxy(np.asarray(boxes, np.float32).reshape(-1, 4)) * \
      np.array([nw / w, nh / h, nw / w, nh / h], np.float32)
  if flip:
    small = small[:, ::-1]
    xyxy = np.stack([nw - xyxy[:, 2], xyxy[:, 1], nw - xyxy[:, 0], xyxy[:, 3]], axis=-1)
  canvas = np.zeros((size, size, image.shape[2]), np.uint8)
  canvas[:nh, :nw] = small
  mask = np.zeros((size, size), bool)
  mask[:nh, :nw] = True
  n = min(len(xyxy), max_boxes)
  out = np.zeros((max_boxes, 4), np.float32)
  out[:n] = detection.xyxy_to_cxcywh(np.clip(xyxy[:n], 0, size)) / size
  lab = np.zeros(max_boxes, np.int32)
  lab[:n] = labels[:n]
  return {"image": canvas, "mask": mask, "boxes": out, "labels": lab,
          "valid": np.arange(max_boxes) < n, "ratio": np.array([nw / w, nh / h], np.float32)}


def to_pixels(boxes: np.ndarray, ratio, size: int) -> np.ndarray:
  """Predicted cxcywh / S boxes on the canvas -> COCO xywh in the original image's pixels.

  Args:
    boxes: (..., 4) cxcywh in [0, 1] of the canvas.
    ratio: the `prepare` ratios (canvas pixels per image pixel along x and y), (..., 2).
    size: S.

  Returns:
    (..., 4) float xywh in the image's pixels.
  """
  rx, ry = (np.asarray(ratio, np.float64)[..., i, None] for i in range(2))
  xyxy = detection.cxcywh_to_xyxy(np.asarray(boxes, np.float64)) * size
  return detection.xyxy_to_xywh(xyxy / np.concatenate([rx, ry, rx, ry], axis=-1))


class TfdsCoco:
  """A tfds COCO split (e.g. coco/2017) read through tfds.data_source, record by record, with
  the attributes of a CocoSet that training and evaluation read.

  Records hold "image", "image/id" and "objects" {"bbox": (n, 4) normalised [ymin, xmin,
  ymax, xmax], "label": (n,) in [0, 80), "is_crowd"}; the classes are tfds's labels and the
  category ids the results file names are those labels.

  Args:
    name: the tfds name, e.g. "coco/2017".
    split: e.g. "train", "validation".
    data_dir: tfds data_dir; "" for the default.
    with_truth: read every record once now for `coco` and `image_ids` (evaluation).
  """

  def __init__(self, name: str, split: str, *, data_dir: str = "", with_truth: bool = False):
    import tensorflow_datasets as tfds  # the data machinery, imported only when asked for
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None)
    self.path = f"tfds:{name}/{split}"
    try:
      names = list(self.source.dataset_info.features["objects"]["label"].names)
    except (AttributeError, KeyError, TypeError):
      names = [str(k) for k in range(80)]
    self.category_ids, self.category_names = list(range(len(names))), names
    self.image_ids, self.coco = np.arange(len(self.source)), None
    if with_truth:
      images, annotations = [], []
      for i in range(len(self.source)):
        record, (image, boxes, labels, crowd) = self.source[i], self.read(i)
        iid = int(record.get("image/id", i))
        images.append({"id": iid, "width": image.shape[1], "height": image.shape[0]})
        annotations += [{"id": len(annotations) + 1, "image_id": iid, "category_id": int(lab),
                         "bbox": [float(v) for v in box], "iscrowd": int(c)}
                        for box, lab, c in zip(boxes, labels, crowd)]
      self.image_ids = np.asarray([im["id"] for im in images])
      self.coco = {"images": images, "annotations": annotations,
                   "categories": [{"id": k, "name": n} for k, n in enumerate(names)]}

  def __len__(self) -> int:
    return len(self.source)

  def read(self, i: int):
    """Record i, crowd boxes included.

    Args:
      i: the record's index in the split.

    Returns:
      (image (H, W, 3) uint8, boxes (n, 4) xywh pixels, labels (n,) int32, crowd (n,) bool).
    """
    record = self.source[i]
    image = np.asarray(record["image"], np.uint8)
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
    h, w = image.shape[:2]
    objects = record["objects"]
    yxyx = np.asarray(objects["bbox"], np.float32).reshape(-1, 4) * np.array([h, w, h, w])
    boxes = detection.xyxy_to_xywh(yxyx[:, [1, 0, 3, 2]])
    crowd = np.asarray(objects.get("is_crowd", np.zeros(len(boxes))), bool).reshape(-1)
    return image, boxes, np.asarray(objects["label"], np.int32).reshape(-1), crowd

  def load(self, i: int):
    """Record i for training, crowd boxes left out.

    Args:
      i: the record's index in the split.

    Returns:
      (image (H, W, 3) uint8, boxes (n, 4) xywh pixels, labels (n,) int32).
    """
    image, boxes, labels, crowd = self.read(i)
    return image, boxes[~crowd], labels[~crowd]


class Detections:
  """A CocoSet as an indexable source of `prepare`d examples (decoded once, in memory), or a
  TfdsCoco (read record by record).

  Args:
    data: the CocoSet or TfdsCoco.
    size: S.
    channels: C.
    max_boxes: M.
    augment: ((min_scale, 1) scale jitter, flip) for training, or None (evaluation).
    seed: with augment, example i of epoch e draws from the generator of (seed, i, e).
  """

  def __init__(self, data: CocoSet, *, size: int, channels: int, max_boxes: int,
               augment: tuple | None = None, seed: int = 0):
    self.data, self.size, self.max_boxes = data, size, max_boxes
    self.augment, self.seed = augment, seed
    self.images, self.truncated = None, 0
    if isinstance(data, TfdsCoco):
      return
    # Decoded once at the canvas's scale: jitter only shrinks, so nothing is lost.
    self.images, self.boxes, sides = [], [], []
    for file, b in zip(data.files, data.boxes):
      im = open_image(file, channels)
      h, w = im.shape[:2]
      sides.append((w, h))
      r = min(1.0, size / max(h, w))
      nh, nw = max(1, round(h * r)), max(1, round(w * r))
      self.images.append(resize(im, nh, nw) if (nh, nw) != (h, w) else im)
      self.boxes.append(b * np.array([nw / w, nh / h, nw / w, nh / h], np.float32))
    # prepare's ratio is per decoded pixel; this makes it per original pixel.
    self.scale_back = np.asarray([(im.shape[1] / w, im.shape[0] / h)
                                  for im, (w, h) in zip(self.images, sides)], np.float32)
    self.truncated = sum(max(0, len(b) - max_boxes) for b in data.boxes)

  def __len__(self) -> int:
    return len(self.images)

  def example(self, i: int, epoch: int = 0) -> dict:
    """Example i, augmented with the draw of (seed, i, epoch) when training.

    Args:
      i: the image index.
      epoch: the epoch (augmentation only).

    Returns:
      `prepare`'s dict plus "index" (int32 i); "ratio" maps to the original image's pixels.
    """
    scale, flip = 1.0, False
    if self.augment is not None:
      rng = np.random.default_rng([self.seed, i, epoch])
      scale, flip = rng.uniform(self.augment[0], 1.0), bool(self.augment[1] and rng.random() < 0.5)
    if self.images is None:
      image, boxes, labels = self.data.load(i)
      ex = prepare(image, boxes, labels, size=self.size, max_boxes=self.max_boxes,
                   scale=scale, flip=flip)
    else:
      ex = prepare(self.images[i], self.boxes[i], self.data.labels[i], size=self.size,
                   max_boxes=self.max_boxes, scale=scale, flip=flip)
      ex["ratio"] = ex["ratio"] * self.scale_back[i]
    ex["index"] = np.int32(i)
    return ex

  def __getitem__(self, i: int) -> dict:
    return self.example(int(i))


SHAPES = ("circle", "square", "triangle")


def write_shapes(folder: str, num_images: int, *, seed: int, min_side: int = 48,
                 max_side: int = 80, max_objects: int = 4, name: str = "shapes") -> str:
  """Writes a generated shapes-with-boxes set: PNG scenes of circles, squares and triangles
  of random colours and sizes on a noisy background, with COCO-format annotations.

  Images are min_side..max_side pixels on each side (not square), objects 12..45% of the
  shorter side, at most max_objects per image and overlapping each other by IoU <= 0.1.

  Args:
    folder: where the JSON and the PNGs go (created).
    num_images: N.
    seed: the generator's seed.
    min_side, max_side: the image sides' range.
    max_objects: at most this many objects per image (at least one).
    name: the JSON's name, `folder/name.json`; the PNGs are `name_i.png`.

  Returns:
    The JSON's path.
  """
  from PIL import Image, ImageDraw
  os.makedirs(folder, exist_ok=True)
  rng = np.random.default_rng(seed)
  images, annotations = [], []
  for i in range(num_images):
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    background = rng.integers(0, 256, size=3)
    pixels = np.clip(background + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    im = Image.fromarray(pixels)
    draw = ImageDraw.Draw(im)
    placed = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
      for _attempt in range(20):
        side = float(rng.uniform(0.12, 0.45) * min(w, h))
        x, y = float(rng.uniform(0, w - side)), float(rng.uniform(0, h - side))
        box = np.array([x, y, x + side, y + side])
        if not placed or detection.box_iou(box[None], np.stack(placed))[0].max() <= 0.1:
          break
      else:
        continue
      placed.append(box)
      kind = int(rng.integers(len(SHAPES)))
      colour = tuple(int(v) for v in (background + 128 + rng.integers(-60, 60, 3)) % 256)
      x0, y0, x1, y1 = box
      if SHAPES[kind] == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=colour)
      elif SHAPES[kind] == "square":
        draw.rectangle([x0, y0, x1, y1], fill=colour)
      else:
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=colour)
      annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": kind + 1,
                          "bbox": [round(x0, 2), round(y0, 2), round(side, 2), round(side, 2)],
                          "area": round(side * side, 2), "iscrowd": 0})
    file = f"{name}_{i}.png"
    im.save(os.path.join(folder, file))
    images.append({"id": i + 1, "file_name": file, "width": w, "height": h})
  path = os.path.join(folder, f"{name}.json")
  with open(path, "w") as f:
    json.dump({"images": images, "annotations": annotations,
               "categories": [{"id": k + 1, "name": s} for k, s in enumerate(SHAPES)]}, f)
  return path
