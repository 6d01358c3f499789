"""Image classification data: IDX files (MNIST's format), folders of images, tfds datasets.

Shape key: N examples, S image side, C channels.

Every reader gives an indexable source of examples {"image": (S, S, C) uint8, "label": ()
int32} that fmjax.data.ExampleBatchIterator batches:

  read_idx_dataset  MNIST-style IDX image + label files (gzip or plain), an index range of
                    them, in memory (an ArraySource)
  ImageFolder       root/<class>/<image>, one sub-folder per class (labels in sorted folder
                    order), decoded with Pillow on access
  TfdsImages        a tfds catalog dataset (mnist, cifar10, imagenet2012) via tfds.data_source
  Subset            an index range of any source; `load_arrays` decodes one into memory

`resize_image` fits any image to S x S (shorter side to S, then the centre crop) and
`random_crop_flip` is the training augmentation; the program seeds it from (seed, example
index, epoch), so augmented batches are reproducible and resume exactly.
"""

from __future__ import annotations

import gzip
import os

import numpy as np

from fmjax.data.batches import ArraySource
from fmjax.data.text import DataError

# IDX type codes (http://yann.lecun.com/exdb/mnist/): data is big-endian.
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"),
              0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str) -> np.ndarray:
  """One IDX file (gzip-compressed or plain, told apart by content) as a numpy array.

  Args:
    path: the IDX file, e.g. train-images-idx3-ubyte.gz.

  Returns:
    The array with the header's dimensions and type (native byte order), e.g. (N, 28, 28)
    uint8 for MNIST images, (N,) uint8 for its labels.

  Raises:
    DataError: naming the file, for a bad magic number, an unknown type code, or a data
      size that disagrees with the header's dimensions.
  """
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
  except FileNotFoundError:
    raise DataError(f"{path}: no such IDX file") from None
  except (OSError, EOFError) as e:  # a truncated or corrupt gzip stream
    raise DataError(f"{path}: cannot decompress ({e}); the download is incomplete or corrupt") \
        from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    magic = raw[:4].hex() or "(empty file)"
    raise DataError(f"{path}: magic number {magic} is not an IDX header (two zero bytes, a "
                    "type code, the number of dimensions, e.g. 00000803 for MNIST images); "
                    "is this an MNIST-style IDX file?")
  code, ndim = raw[2], raw[3]
  if code not in _IDX_TYPES:
    raise DataError(f"{path}: IDX type code 0x{code:02x} is not one of "
                    f"{[f'0x{c:02x}' for c in _IDX_TYPES]}; the file is corrupt")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: {len(raw)} bytes, too short for an IDX header of {ndim} dimensions")
  dims = tuple(int(x) for x in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = _IDX_TYPES[code]
  expected = int(np.prod(dims)) * dtype.itemsize
  if len(raw) - header != expected:
    raise DataError(f"{path}: the header promises dimensions {dims} ({expected} bytes of "
                    f"{dtype.name}) but the file holds {len(raw) - header} bytes of data; the "
                    "file is truncated or corrupt")
  return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _index_range(n: int, start: int, stop: int, what: str) -> slice:
  """[start, stop) of n examples; stop 0 means n."""
  stop = n if stop == 0 else stop
  if not 0 <= start < stop <= n:
    raise DataError(f"{what}: index range [{start}, {stop}) is not within its {n} examples; "
                    f"choose 0 <= start < stop <= {n} (stop 0: to the end)")
  return slice(start, stop)


def read_idx_dataset(images_path: str, labels_path: str, *, start: int = 0,
                     stop: int = 0) -> ArraySource:
  """Images and labels from a pair of IDX files, examples [start, stop) (stop 0: to the end).

  Args:
    images_path: the IDX file of images, (N, S, S) or (N, S, S, C) uint8.
    labels_path: the IDX file of labels, (N,) integers.
    start: the first example kept.
    stop: one past the last example kept; 0: to the end.

  Returns:
    ArraySource of {"image": (S, S, C) uint8 (C = 1 for 3-d image files), "label": int32}.

  Raises:
    DataError: a bad file (see read_idx), images that are not (N, S, S[, C]) uint8, labels
      that are not (N,) non-negative integers, or image and label counts that differ.
  """
  images, labels = read_idx(images_path), read_idx(labels_path)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.dtype != np.uint8:
    raise DataError(f"{images_path}: IDX array of shape {images.shape} and type {images.dtype}; "
                    "images must be (N, height, width) or (N, height, width, channels) unsigned "
                    "bytes (was the labels file given as the images file?)")
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise DataError(f"{labels_path}: IDX array of shape {labels.shape} and type {labels.dtype}; "
                    "labels must be one integer per image (was the images file given as the "
                    "labels file?)")
  if len(images) != len(labels):
    raise DataError(f"{images_path} holds {len(images)} images but {labels_path} holds "
                    f"{len(labels)} labels; they must be the two halves of one dataset")
  if labels.min(initial=0) < 0:
    raise DataError(f"{labels_path}: label {int(labels.min())} is negative; labels are class "
                    "ids 0, 1, ...")
  keep = _index_range(len(images), start, stop, images_path)
  return ArraySource({"image": np.ascontiguousarray(images[keep]),
                      "label": labels[keep].astype(np.int32)})


def check_labels(parts, num_classes: int | None = None) -> int:
  """Checks class labels against the model's classes; returns the number of classes.

  A label byte of 200 among MNIST's 0..9 would otherwise silently make a 201-class model:
  with `num_classes` given, every label must be below it; without, the class count is 1 +
  the largest label, and every class below it must occur (no gap such as {0..9, 200}).

  Args:
    parts: (name, labels, first) triples, one per label source: its name for messages
      (e.g. the IDX labels file), its (N,) integer labels, and the index its first label
      has in that source (labels [first, first + N) of the file).
    num_classes: the classes the model has, or None to take them from the labels.

  Returns:
    num_classes, or 1 + the largest label.

  Raises:
    DataError: a label >= num_classes, or (num_classes None) class ids that never occur
      below the largest label; names the source, the first offending index and its label.
      Its `function` and `argument` are "check_labels", "num_classes".
  """
  parts = [(name, np.asarray(labels), first) for name, labels, first in parts]
  seen = np.unique(np.concatenate([labels for _, labels, _ in parts] or [np.zeros(0, int)]))
  if not len(seen):
    raise DataError(f"{', '.join(name for name, _, _ in parts) or 'check_labels'}: no labels "
                    "to check", function="check_labels", argument="num_classes")
  first_bad = lambda bound: next(
      (name, first + int(np.argmax(labels >= bound)), int(labels[labels >= bound][0]))
      for name, labels, first in parts if (labels >= bound).any())
  if num_classes is not None:
    if seen[-1] >= num_classes:
      name, index, label = first_bad(num_classes)
      raise DataError(f"{name}: label {label} at index {index} is not a class id below "
                      f"num_classes={num_classes}; fix the labels, or raise num_classes",
                      function="check_labels", argument="num_classes")
    return num_classes
  missing = np.setdiff1d(np.arange(seen[-1] + 1), seen)
  if len(missing):
    name, index, label = first_bad(missing[0] + 1)
    if len(missing) == 1:
      absent = f"class {missing[0]} never occurs"
    elif missing[-1] - missing[0] + 1 == len(missing):
      absent = f"classes {missing[0]}..{missing[-1]} ({len(missing)} of them) never occur"
    else:
      absent = (f"{len(missing)} classes ({', '.join(map(str, missing[:4]))}, ...) never "
                "occur")
    raise DataError(
        f"{name}: label {label} at index {index} would make {int(seen[-1]) + 1} classes, but "
        f"{absent} in the labels; fix the labels, or give num_classes if those classes are "
        "really absent from these examples", function="check_labels", argument="num_classes")
  return int(seen[-1]) + 1


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
  """(h, w, C) uint8 -> (size, size, C): the shorter side scaled to `size`, then the centre crop.

  Args:
    image: (h, w, C) uint8, C = 1 or 3.
    size: S, the side of the output.

  Returns:
    (S, S, C) uint8, resized bilinearly (Pillow); an image already S x S is returned as it is.
  """
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
  out = np.asarray(pil.resize((nw, nh), Image.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  out = out[top:top + size, left:left + size]
  return out[..., None] if out.ndim == 2 else out


def random_crop_flip(image: np.ndarray, rng: np.random.Generator, *, padding: int,
                     flip: bool) -> np.ndarray:
  """The training augmentation: random crop of the zero-padded image, then a random mirror.

  Zero-pads by `padding` pixels on every side and crops back to the image's size at a random
  offset, then mirrors left-right with probability 1/2 if `flip`.

  Args:
    image: (S, S, C) uint8.
    rng: the example's generator (seed it from (seed, index, epoch) for exact resumes).
    padding: the pad width in pixels; 0: no crop.
    flip: whether to mirror at random.

  Returns:
    (S, S, C) uint8, contiguous.
  """
  if padding > 0:
    h, w = image.shape[:2]
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    top, left = rng.integers(0, 2 * padding + 1, size=2)
    image = padded[top:top + h, left:left + w]
  if flip and rng.random() < 0.5:
    image = image[:, ::-1]
  return np.ascontiguousarray(image)


def _open_image(path: str, size: int, channels: int) -> np.ndarray:
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as pil:
      pil = pil.convert("RGB" if channels == 3 else "L")
      array = np.asarray(pil)
  except (UnidentifiedImageError, OSError, ValueError) as e:
    raise DataError(f"{path}: not a readable image ({type(e).__name__}: {e}); remove or "
                    "replace the file") from None
  return resize_image(array[..., None] if array.ndim == 2 else array, size)


class ImageFolder:
  """Images in root/<class>/<file>, one sub-folder per class; label i is the i-th class
  folder in sorted order. Files are decoded (Pillow) and resized on access.

  Args:
    root: the folder of class folders.
    image_size: S; every image is fitted to S x S (`resize_image`).
    channels: 3 (RGB) or 1 (grey); images are converted.
    classes: the class names in label order (e.g. the training folder's, for an eval folder);
      default: root's sub-folders, sorted.
  Raises:
    DataError: root is not a folder, has no class folders, a class folder holds no files,
      or `classes` names a folder root lacks.
  """

  def __init__(self, root: str, *, image_size: int, channels: int = 3,
               classes: list[str] | None = None):
    if channels not in (1, 3):
      raise ValueError(f"channels={channels}: images are read as 1 (grey) or 3 (RGB) channels")
    if not os.path.isdir(root):
      raise DataError(f"{root}: no such folder of class folders (expected root/<class>/<image>)")
    found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not found:
      raise DataError(f"{root}: no class sub-folders; put each class's images in a folder of "
                      "its own (root/<class>/<image>)")
    if classes is not None and found != list(classes):
      raise DataError(f"{root}: class folders {found} differ from the training classes "
                      f"{list(classes)}; both splits need the same class folders")
    self.root, self.image_size, self.channels = root, image_size, channels
    self.classes = found
    self.files, labels = [], []
    for label, name in enumerate(found):
      folder = os.path.join(root, name)
      files = sorted(e.path for e in os.scandir(folder)
                     if e.is_file() and not e.name.startswith("."))
      if not files:
        raise DataError(f"{folder}: class folder {name!r} holds no image files; add its images "
                        "or remove the folder")
      self.files += files
      labels += [label] * len(files)
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    return {"image": _open_image(self.files[i], self.image_size, self.channels),
            "label": self.labels[i]}


class TfdsImages:
  """A tfds catalog image dataset (features "image" and "label") through tfds.data_source,
  images fitted to S x S on access.

  Args:
    name: e.g. "mnist", "cifar10", "imagenet2012".
    split: e.g. "train", "test", "validation".
    image_size, channels: as ImageFolder (grey images are repeated to 3 channels, colour
      ones averaged to 1).
    data_dir: tfds data_dir; empty: the tfds default.
    manual_dir: where manually downloaded archives are (imagenet2012's ILSVRC2012_img_*.tar).
  """

  def __init__(self, name: str, split: str, *, image_size: int, channels: int = 3,
               data_dir: str = "", manual_dir: str = ""):
    import tensorflow_datasets as tfds  # the data machinery, imported only when asked for
    kwargs = {}
    if manual_dir:
      kwargs["download_and_prepare_kwargs"] = {
          "download_config": tfds.download.DownloadConfig(manual_dir=manual_dir)}
    self.source = tfds.data_source(name, split=split, data_dir=data_dir or None, **kwargs)
    self.name, self.split, self.image_size, self.channels = name, split, image_size, channels

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    record = self.source[i]
    image = np.asarray(record["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[2] != self.channels:
      image = (np.repeat(image, self.channels, axis=2) if image.shape[2] == 1 else
               image.mean(axis=2, keepdims=True).round().astype(np.uint8))
    label = int(record["label"])
    if label < 0:
      raise DataError(f"tfds:{self.name}/{self.split}[{i}] has label {label}: an unlabelled "
                      "split (use one with labels for training and evaluation)")
    return {"image": resize_image(image, self.image_size), "label": np.int32(label)}


class Subset:
  """Examples [start, stop) of a source (stop 0: to its end).

  Args:
    source: indexable (len + __getitem__), e.g. an ImageFolder.
    start: the first example kept.
    stop: one past the last example kept; 0: to the end.
    name: what to call the source in error messages.

  Raises:
    DataError: a range not within the source's examples.
  """

  def __init__(self, source, start: int = 0, stop: int = 0, *, name: str = "the source"):
    self.source = source
    self.range = _index_range(len(source), start, stop, name)

  def __len__(self) -> int:
    return self.range.stop - self.range.start

  def __getitem__(self, i: int):
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self.source[self.range.start + i]


def load_arrays(source) -> dict[str, np.ndarray]:
  """Every example of a source decoded into memory.

  Args:
    source: indexable (len + __getitem__) of {"image": (S, S, C) uint8, "label": () int32}
      examples (any keys are stacked alike).

  Returns:
    {"image": (N, S, S, C), "label": (N,)}; for an ArraySource, its arrays themselves.
  """
  if isinstance(source, ArraySource):
    return source.arrays
  examples = [source[i] for i in range(len(source))]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
