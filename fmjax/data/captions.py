"""Image-caption pairs: a local builder of coloured-shape scenes, and caption folders.

`shapes(n, image_size=, seed=)` draws n images of two coloured shapes, one above the other
or side by side, each with the caption that describes it, e.g. "a red circle above a blue
square" or "a green triangle left of a yellow square". Every image is a pure function of
(seed, index), so a held-out set is just another seed. It is the captioning program's
default data (train/caption.py) and needs nothing downloaded.

`read_caption_folder(root)` reads real pairs: root/captions.tsv with lines
"<image file>\\t<caption>", images beside it (any format Pillow opens).
`read_text_folder(root)` reads the other common layout: each image with a sibling
`<stem>.txt` holding its caption.

`digits(images_path, labels_path)` pairs MNIST digits with captions drawn from many
phrasings (`digit_caption`: "a handwritten seven", "the digit 7", "an image of an 8", ...),
so a text-to-image model learns the digit, not one sentence.

`check_scene(image, caption)` is the rule-based judge of a generated scene: does it hold
the named colours, with the named shapes, in the named relation?
"""

import os

import numpy as np

from fmjax.data.images import _open_image, read_idx_dataset, resize_image
from fmjax.data.text import DataError

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 230),
           "yellow": (230, 210, 40), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("above", "left of")


def _mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
  """(size, size) bool: the pixels of `shape` centred at (cx, cy) with radius r."""
  y, x = np.mgrid[0:size, 0:size] + 0.5
  if shape == "circle":
    return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
  if shape == "square":
    return (np.abs(x - cx) <= r * 0.85) & (np.abs(y - cy) <= r * 0.85)
  # triangle, apex up: the half-width grows from 0 at the top to r at the bottom
  top = cy - r
  return (y >= top) & (y <= cy + r) & (np.abs(x - cx) <= (y - top) / 2)


def shape_scene(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, str]:
  """One (image (S, S, 3) uint8, caption) pair drawn with `rng`.

  Args:
    rng: the generator every choice (colours, shapes, relation, sizes, noise) is drawn from.
    image_size: S, the image side in pixels.

  Returns:
    (image (S, S, 3) uint8, caption), e.g. "a red circle above a blue square".
  """
  s = image_size
  colours = rng.choice(len(COLOURS), 2, replace=False)
  kinds = rng.integers(0, len(SHAPES), 2)
  relation = RELATIONS[int(rng.integers(0, len(RELATIONS)))]
  r = s * rng.uniform(0.14, 0.2)
  jitter = lambda: rng.uniform(-0.06, 0.06) * s
  # The first shape is above (or left of) the second.
  near, far, across = 0.27 * s, 0.73 * s, rng.uniform(0.3, 0.7) * s
  centres = ([(across + jitter(), near + jitter()), (across + jitter(), far + jitter())]
             if relation == "above" else
             [(near + jitter(), across + jitter()), (far + jitter(), across + jitter())])
  image = rng.integers(0, 40, (s, s, 3)).astype(np.uint8)  # dark noisy background
  names = list(COLOURS)
  for (cx, cy), colour, kind in zip(centres, colours, kinds):
    image[_mask(SHAPES[kind], s, cx, cy, r)] = COLOURS[names[colour]]
  caption = (f"a {names[colours[0]]} {SHAPES[kinds[0]]} {relation} "
             f"a {names[colours[1]]} {SHAPES[kinds[1]]}")
  return image, caption


def shapes(n: int, *, image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, list[str]]:
  """n generated scenes; scene i depends only on (seed, i).

  Args:
    n: how many scenes.
    image_size: S, the image side in pixels.
    seed: the data seed; scene i is drawn with np.random.default_rng([seed, i]).

  Returns:
    (images (n, S, S, 3) uint8, n captions).
  """
  pairs = [shape_scene(np.random.default_rng([seed, i]), image_size) for i in range(n)]
  return np.stack([p[0] for p in pairs]), [p[1] for p in pairs]


def read_caption_folder(root: str, *, image_size: int) -> tuple[np.ndarray, list[str]]:
  """root/captions.tsv ("<image file>\\t<caption>" per line) and its images, in file order.

  Args:
    root: the folder holding captions.tsv; image file names are relative to it.
    image_size: S; each image is converted to RGB and fitted to S x S (`resize_image`).

  Returns:
    (images (n, S, S, 3) uint8, n captions, stripped).

  Raises:
    DataError: no captions.tsv, a malformed line, a missing or unreadable image, or no pairs.
  """
  index = os.path.join(root, "captions.tsv")
  if not os.path.isfile(index):
    raise DataError(f"{index}: no such file; a caption folder holds captions.tsv with lines "
                    "'<image file>\\t<caption>' and the images beside it")
  images, captions = [], []
  with open(index, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip("\n")
      if not line:
        continue
      name, sep, caption = line.partition("\t")
      if not sep or not caption.strip():
        raise DataError(f"{index}:{number}: expected '<image file>\\t<caption>', got {line!r}")
      path = os.path.join(root, name)
      if not os.path.isfile(path):
        raise DataError(f"{index}:{number}: image {path} does not exist")
      images.append(_open_image(path, image_size, 3))
      captions.append(caption.strip())
  if not captions:
    raise DataError(f"{index} lists no images")
  return np.stack(images), captions


# -- digit captions -------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# "{d}" is the digit, as a word or a numeral; "{a}" is the article "a"/"an" that goes before it
# ("a one", "an eight", "an 8": a numeral takes the article of its spoken word).
DIGIT_TEMPLATES = (
    "{d}", "the digit {d}", "the number {d}", "{a} {d}", "a handwritten {d}",
    "an image of {a} {d}", "a picture of the number {d}", "a photo of the digit {d}",
    "a drawing of {a} {d}", "handwritten digit {d}", "the handwritten number {d}",
    "a scan of a handwritten {d}", "{d}, written by hand", "digit {d}", "number {d}",
    "a black and white image of the digit {d}", "a sketch of the numeral {d}",
    "{a} {d} drawn by hand", "a grayscale picture of {a} {d}", "the figure {d}",
    "this is the number {d}", "someone wrote {a} {d}", "a hand-drawn {d}",
    "{a} {d} written in white ink on black",
)


# Words a caption may gain at random (train/text_to_image's data.filler_words): the generator
# then learns that only the digit's word or numeral matters, whatever else a prompt says. No
# number words or numerals among them.
FILLER_WORDS = tuple("""please show me draw make give create render generate paint picture
image photo photograph sketch drawing scan doodle illustration style art simple clean neat
messy bold thin thick small big large tiny huge nice good great lovely cute plain black white
dark bright grey gray ink pen pencil chalk marker paper board screen here now just really very
quite some this that my your our their its it is was be can could would should will want like
need see look find get put write wrote written showing shown with without on in at of for from
to by about over under into onto and or but so then also too again only still even not no yes
the a an some any every each kind sort type version example sample single centred centered
handwriting handwritten hand digit number numeral figure symbol character glyph mark sign
written-out please-draw quick slow careful random""".split())


def with_filler(caption: str, rng: np.random.Generator, *, max_words: int = 3) -> str:
  """The caption with 1..max_words FILLER_WORDS inserted at random word positions.

  Args:
    caption: e.g. "the digit 7".
    rng: the generator the count, the words and the positions are drawn with.
    max_words: the most words inserted.

  Returns:
    e.g. "the neat digit 7 please".
  """
  words = caption.split()
  for _ in range(int(rng.integers(1, max_words + 1))):
    words.insert(int(rng.integers(0, len(words) + 1)),
                 FILLER_WORDS[int(rng.integers(0, len(FILLER_WORDS)))])
  return " ".join(words)


def digit_phrasings(label: int) -> list[str]:
  """Every phrasing of one digit: each template with the word, then with the numeral.

  Args:
    label: the digit, 0-9.

  Returns:
    2 * len(DIGIT_TEMPLATES) lower-case captions, e.g. "the digit seven", "the digit 7".

  Raises:
    ValueError: a label outside 0-9.
  """
  if not 0 <= int(label) <= 9:
    raise ValueError(f"label={label}: a digit caption needs a label 0-9")
  word = DIGIT_WORDS[int(label)]
  article = "an" if word == "eight" else "a"  # "a one" (spoken "wun"), "an eight", "an 8"
  return [t.format(d=d, a=article) for d in (word, str(int(label))) for t in DIGIT_TEMPLATES]


def digit_caption(label: int, rng: np.random.Generator) -> str:
  """One caption of an MNIST digit: a random template, word or numeral, and casing.

  The template and the form (word or numeral) are uniform; a quarter of the captions start
  with a capital and a quarter end with a full stop, so prompts typed by people are in range.

  Args:
    label: the digit, 0-9.
    rng: the generator the choices are drawn from.

  Returns:
    the caption, e.g. "a handwritten seven", "The digit 7", "an image of an 8.".
  """
  phrasings = digit_phrasings(label)
  caption = phrasings[int(rng.integers(len(phrasings)))]
  if rng.random() < 0.25:
    caption = caption[0].upper() + caption[1:]
  if rng.random() < 0.25:
    caption += "."
  return caption


def mnist_files(folder: str, prefix: str = "t10k") -> tuple[str, str]:
  """The image and label IDX files of an MNIST folder (gzip or plain).

  Args:
    folder: the folder, e.g. ../shared/data/mnist.
    prefix: the split's file prefix, "t10k" or "train".

  Returns:
    (images_path, labels_path): folder/<prefix>-images-idx3-ubyte[.gz] and the labels.

  Raises:
    DataError: either file is missing.
  """
  paths = []
  for kind in ("images-idx3", "labels-idx1"):
    names = [f"{prefix}-{kind}-ubyte{ext}" for ext in (".gz", "")]
    found = [os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))]
    if not found:
      raise DataError(f"{folder}: no {names[0]} (or {names[1]}); an MNIST folder holds the IDX "
                      f"files {prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz")
    paths.append(found[0])
  return paths[0], paths[1]


def digits(images_path: str, labels_path: str, *, start: int = 0, stop: int | None = None,
           image_size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """MNIST digits [start, stop) with one caption each.

  Args:
    images_path: the IDX file of images, (N, 28, 28) uint8 (gzip or plain).
    labels_path: the IDX file of labels, (N,).
    start: the first example kept.
    stop: one past the last example kept; None: to the end.
    image_size: S. S >= 28 pads the 28 x 28 digit with black, centred ((S - 28) // 2 above
      and left); S < 28 resizes it bilinearly (`resize_image`).
    seed: the caption seed; example i (its index in the file, so a split's captions do not
      depend on where it starts) is captioned with np.random.default_rng([seed, i]).

  Returns:
    (images (n, S, S, 1) uint8, labels (n,) int32, n captions).

  Raises:
    DataError: a bad file or range (see `read_idx_dataset`), or a label that is not 0-9.
  """
  if stop is not None and stop <= start:
    raise DataError(f"{images_path}: the range [{start}, {stop}) holds no examples; choose "
                    "start < stop (stop None: to the end)")
  source = read_idx_dataset(images_path, labels_path, start=start, stop=stop or 0)
  images, labels = source.arrays["image"], source.arrays["label"]
  if labels.max(initial=0) > 9:
    raise DataError(f"{labels_path}: label {int(labels.max())} is not a digit 0-9")
  h, w = images.shape[1:3]
  if image_size >= max(h, w):
    top, left = (image_size - h) // 2, (image_size - w) // 2
    images = np.pad(images, ((0, 0), (top, image_size - h - top),
                             (left, image_size - w - left), (0, 0)))
  else:
    images = np.stack([resize_image(image, image_size) for image in images])
  captions = [digit_caption(int(label), np.random.default_rng([seed, start + k]))
              for k, label in enumerate(labels)]
  return np.ascontiguousarray(images), labels, captions


# -- image folders with one caption file per image ------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


def read_text_folder(root: str, *, image_size: int,
                     channels: int = 3) -> tuple[np.ndarray, list[str]]:
  """Every image in root (sorted by name) with its caption in the sibling `<stem>.txt`.

  Args:
    root: the folder; image files are those ending in IMAGE_EXTENSIONS (any case), other
      files and sub-folders are ignored.
    image_size: S; each image is fitted to S x S (`resize_image`).
    channels: 3 (RGB) or 1 (grey); images are converted.

  Returns:
    (images (n, S, S, C) uint8, n captions: each file's text, whitespace collapsed).

  Raises:
    DataError: root is not a folder or holds no images; an image without a caption file, or
      with an empty one; an unreadable image. Each message names the file.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels={channels}: images are read as 1 (grey) or 3 (RGB) channels")
  if not os.path.isdir(root):
    raise DataError(f"{root}: no such folder (expected images, each with a <stem>.txt caption)")
  files = sorted(e.path for e in os.scandir(root) if e.is_file() and not e.name.startswith(".")
                 and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS)
  if not files:
    raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}); put the images "
                    "there, each with a <stem>.txt caption beside it")
  images, captions = [], []
  for path in files:
    text_path = os.path.splitext(path)[0] + ".txt"
    if not os.path.isfile(text_path):
      raise DataError(f"{path}: no caption file {text_path}; write the image's caption there")
    with open(text_path, encoding="utf-8") as f:
      caption = " ".join(f.read().split())
    if not caption:
      raise DataError(f"{text_path}: empty caption for {path}; write the image's caption there")
    images.append(_open_image(path, image_size, channels))
    captions.append(caption)
  return np.stack(images), captions


# -- the rule-based scene checker -----------------------------------------------------------

_BACKGROUND = (20, 20, 20)  # the mean of shape_scene's dark noise
# relation -> (the axis of (dy, dx) it is about, the sign of object 2 minus object 1 on it)
_RELATIONS = {"above": (0, 1), "below": (0, -1), "left of": (1, 1), "right of": (1, -1)}


def parse_scene_caption(caption: str) -> tuple[str, str, str, str, str]:
  """The parts of a shapes caption, "a red circle above a blue square".

  Case, a final full stop, "an"/"the" for "a", and "to the left of" for "left of" are
  accepted; the relation may also be "below" or "right of".

  Args:
    caption: the caption.

  Returns:
    (colour1, shape1, relation, colour2, shape2), relation one of "above", "below", "left of",
    "right of".

  Raises:
    ValueError: the caption is not of that form, or names a colour or shape not in COLOURS,
      SHAPES.
  """
  words = caption.lower().strip().rstrip(".").replace("to the ", "").split()
  relation = " ".join(words[3:5]) if words[3:4] in (["left"], ["right"]) else " ".join(words[3:4])
  rest = words[3 + len(relation.split()):]
  if (len(words) < 7 or len(rest) != 3 or words[0] not in ("a", "an", "the")
      or rest[0] not in ("a", "an", "the") or relation not in _RELATIONS
      or {words[1], rest[1]} - set(COLOURS) or {words[2], rest[2]} - set(SHAPES)):
    raise ValueError(f"{caption!r} is not a scene caption 'a <colour> <shape> <relation> a "
                     f"<colour> <shape>' with colours {list(COLOURS)}, shapes {list(SHAPES)} "
                     f"and relations {list(_RELATIONS)}")
  return words[1], words[2], relation, rest[1], rest[2]


def _blobs(image: np.ndarray, colour: str, max_distance: float, min_area: float) -> list:
  """The 8-connected components of `colour`'s pixels, largest first, at least min_area big."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  palette = np.asarray([_BACKGROUND, *COLOURS.values()], np.float32)  # (P, 3)
  distance = np.linalg.norm(image[:, :, None, :].astype(np.float32) - palette, axis=-1)
  nearest = np.where(distance.min(-1) <= max_distance, distance.argmin(-1), -1)
  labels, n = ndimage.label(nearest == 1 + list(COLOURS).index(colour), np.ones((3, 3)))
  blobs = [labels == k for k in range(1, n + 1)]
  return sorted((b for b in blobs if b.sum() >= min_area), key=lambda b: -b.sum())


def _shape_of(blob: np.ndarray) -> str:
  """circle, square or triangle, from the fill ratio of the bounding box and how bottom-heavy
  the blob is (shape_scene's triangles point up: 3/4 of their area in the lower half)."""
  ys, xs = np.nonzero(blob)
  height = ys.max() - ys.min() + 1
  extent = len(ys) / (height * (xs.max() - xs.min() + 1))  # square 1, circle pi/4, triangle 1/2
  lower = np.mean(ys + 0.5 > ys.min() + height / 2)  # square, circle 1/2, triangle 3/4
  # Thresholds: every blob of 3,000 generated 32 x 32 scenes right, and most of them still
  # right after a Gaussian blur of 1 pixel (a decoder's softness).
  if extent < 0.64 or (lower > 0.56 and extent < 0.85):
    return "triangle"
  return "square" if extent >= 0.91 else "circle"


def check_scene(image: np.ndarray, caption: str, *, max_distance: float = 90.0,
                min_area: float = 0.015) -> dict[str, bool]:
  """Whether an image shows its shapes caption, judged by rules (no learned model).

  Each pixel takes the nearest colour of COLOURS or the dark background, if within
  `max_distance` (RGB, Euclidean); a named object is the largest 8-connected blob of its
  colour (the two largest, ordered along the relation's axis, when both objects share one
  colour). Its shape follows from its bounding box: filled (extent >= 0.91) a square, half
  filled or bottom-heavy a triangle, else a circle. The relation holds when the centroids
  differ more along its axis than across it, in its direction.

  Args:
    image: (S, S, 3) uint8.
    caption: a caption `parse_scene_caption` accepts.
    max_distance: the largest RGB distance from a pixel to the colour it is counted as.
    min_area: the smallest blob, as a share of the image's pixels.

  Returns:
    {"colours": both objects found as blobs of at least min_area, "shapes": each has its
    named shape, "relation": the centroids are in the named relation, "all": all three}.
    "shapes" and "relation" are False when "colours" is.

  Raises:
    ValueError: a caption that does not parse, or an image that is not (S, S, 3).
  """
  colour1, shape1, relation, colour2, shape2 = parse_scene_caption(caption)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"image of shape {image.shape}; check_scene needs one (S, S, 3) image")
  area = min_area * image.shape[0] * image.shape[1]
  axis, sign = _RELATIONS[relation]
  centre = lambda blob: np.argwhere(blob).mean(0)  # (y, x)
  if colour1 == colour2:
    found = _blobs(image, colour1, max_distance, area)[:2]
    found.sort(key=lambda b: sign * centre(b)[axis])
  else:
    found = [(_blobs(image, c, max_distance, area) or [None])[0] for c in (colour1, colour2)]
  if len(found) < 2 or any(b is None for b in found):
    return {"colours": False, "shapes": False, "relation": False, "all": False}
  shapes_ok = _shape_of(found[0]) == shape1 and _shape_of(found[1]) == shape2
  delta = centre(found[1]) - centre(found[0])  # (dy, dx) from object 1 to object 2
  along, across = sign * delta[axis], abs(delta[1 - axis])
  relation_ok = bool(along > across)
  return {"colours": True, "shapes": shapes_ok, "relation": relation_ok,
          "all": shapes_ok and relation_ok}
