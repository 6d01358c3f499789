"""Image-caption pairs: a local builder of coloured-shape scenes, and caption folders.

`shapes(n, image_size=, seed=)` draws n images of two coloured shapes, one above the other
or side by side, each with the caption that describes it, e.g. "a red circle above a blue
square" or "a green triangle left of a yellow square". Every image is a pure function of
(seed, index), so a held-out set is just another seed. It is the captioning program's
default data (train/caption.py) and needs nothing downloaded.

`read_caption_folder(root)` reads real pairs: root/captions.tsv with lines
"<image file>\\t<caption>", images beside it (any format Pillow opens).
"""

import os

import numpy as np

from fmjax.data.images import _open_image
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
