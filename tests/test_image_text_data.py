"""Image-text data for text-to-image and CLIP: the bundled MNIST subset, digit captions in many
phrasings, MNIST caption pairs, folders with one caption file per image, and the rule-based
checker of generated coloured-shape scenes (fmjax/data/captions.py)."""

import collections
import gzip
import pathlib
import re

import numpy as np
import pytest

from fmjax.data import captions
from fmjax.data.text import DataError

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "data" / "mnist_tiny"
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
IMAGES, LABELS = TINY / "t10k-images-idx3-ubyte.gz", TINY / "t10k-labels-idx1-ubyte.gz"


def _naive_idx(path):
  """An IDX file read by hand: big-endian header (magic, dims), then uint8 records."""
  raw = gzip.open(path).read() if str(path).endswith(".gz") else open(path, "rb").read()
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
  return int.from_bytes(raw[:4], "big"), np.frombuffer(raw[4 + 4 * ndim:], np.uint8).reshape(dims)


# -- the bundled MNIST subset -----------------------------------------------------------------

def test_bundled_mnist_is_the_first_1024_test_images():
  magic, images = _naive_idx(IMAGES)
  label_magic, labels = _naive_idx(LABELS)
  assert (magic, label_magic) == (2051, 2049)
  assert images.shape == (1024, 28, 28) and labels.shape == (1024,)
  # The class counts of the first 1,024 t10k labels (the official file's, not fmjax's).
  np.testing.assert_array_equal(np.bincount(labels), [87, 130, 118, 108, 113, 89, 89, 102, 91, 97])
  assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # MNIST's famous first row
  if SHARED_MNIST.is_dir():  # byte for byte the head of the full test set
    np.testing.assert_array_equal(images, _naive_idx(SHARED_MNIST / IMAGES.name)[1][:1024])
    np.testing.assert_array_equal(labels, _naive_idx(SHARED_MNIST / LABELS.name)[1][:1024])


def test_mnist_files_finds_gzip_or_plain(tmp_path):
  assert captions.mnist_files(str(TINY)) == (str(IMAGES), str(LABELS))
  (tmp_path / "train-images-idx3-ubyte").write_bytes(gzip.open(IMAGES).read())
  (tmp_path / "train-labels-idx1-ubyte").write_bytes(gzip.open(LABELS).read())
  assert captions.mnist_files(str(tmp_path), "train") == (
      str(tmp_path / "train-images-idx3-ubyte"), str(tmp_path / "train-labels-idx1-ubyte"))
  with pytest.raises(DataError, match=r"no t10k-images-idx3-ubyte.gz"):
    captions.mnist_files(str(tmp_path))


# -- digit captions ---------------------------------------------------------------------------

def _digits_named(caption):
  """The digits a caption names, as words or numerals (whole words only: "someone" is not 1)."""
  text = caption.lower()
  return {d for d, word in enumerate(captions.DIGIT_WORDS)
          if re.search(rf"\b({word}|{d})\b", text)}


def test_digit_phrasings_cover_every_digit_in_words_and_numerals():
  assert captions.DIGIT_WORDS == ("zero", "one", "two", "three", "four", "five", "six", "seven",
                                  "eight", "nine")
  templates = captions.DIGIT_TEMPLATES
  assert len(set(templates)) == len(templates) >= 15
  for label in range(10):
    phrasings = captions.digit_phrasings(label)
    assert len(set(phrasings)) == len(phrasings) == 2 * len(templates)
    words = [p for p in phrasings if re.search(rf"\b{captions.DIGIT_WORDS[label]}\b", p)]
    numerals = [p for p in phrasings if re.search(rf"\b{label}\b", p)]
    assert len(words) == len(numerals) == len(templates)  # each template in both forms
    for p in phrasings:  # names its digit and no other
      assert _digits_named(p) == {label}, p
  # The examples, and the articles by sound: "a one", "an eight", "an 8".
  assert {"a handwritten seven", "the digit 7", "the number seven", "7", "an image of a 7",
          "seven", "a picture of the number 7"} <= set(captions.digit_phrasings(7))
  assert "an image of a one" in captions.digit_phrasings(1)
  assert {"an eight", "an 8", "an image of an 8"} <= set(captions.digit_phrasings(8))
  with pytest.raises(ValueError, match="label=10"):
    captions.digit_phrasings(10)


def test_digit_caption_draws_every_phrasing_and_casing():
  rng = np.random.default_rng(0)
  drawn = [captions.digit_caption(3, rng) for _ in range(3000)]
  bare = collections.Counter(c.rstrip(".").lower() for c in drawn)
  assert set(bare) == set(captions.digit_phrasings(3))  # all 48 phrasings, nothing else
  numeral = np.mean([bool(re.search(r"\b3\b", c)) for c in drawn])
  capital = np.mean([c[0].isupper() for c in drawn if c[0].isalpha()])
  stop = np.mean([c.endswith(".") for c in drawn])
  # Binomial(3000, p) stays within 4 standard deviations (<= 0.037 at p = 1/2).
  assert abs(numeral - 0.5) < 0.04 and abs(capital - 0.25) < 0.04 and abs(stop - 0.25) < 0.04
  # A pure function of the generator's state.
  assert captions.digit_caption(3, np.random.default_rng([5, 9])) == \
      captions.digit_caption(3, np.random.default_rng([5, 9]))


# -- MNIST caption pairs ----------------------------------------------------------------------

def test_digits_pads_reads_labels_and_captions_by_index():
  raw_images, raw_labels = _naive_idx(IMAGES)[1], _naive_idx(LABELS)[1]
  images, labels, texts = captions.digits(str(IMAGES), str(LABELS), start=100, stop=164)
  assert images.shape == (64, 32, 32, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(images[:, 2:30, 2:30, 0], raw_images[100:164])  # centred
  assert images[:, :2].max() == images[:, 30:].max() == 0
  assert images[:, :, :2].max() == images[:, :, 30:].max() == 0
  np.testing.assert_array_equal(labels, raw_labels[100:164])
  assert [_digits_named(t) for t in texts] == [{int(l)} for l in labels]
  # Caption i is drawn with default_rng([seed, i]), i the index in the file.
  assert texts == [captions.digit_caption(int(l), np.random.default_rng([0, 100 + k]))
                   for k, l in enumerate(labels)]
  assert captions.digits(str(IMAGES), str(LABELS), stop=164)[2][100:] == texts
  other = captions.digits(str(IMAGES), str(LABELS), start=100, stop=164, seed=1)[2]
  assert sum(a != b for a, b in zip(other, texts)) > 48
  # Odd padding puts the extra row and column after the digit.
  odd = captions.digits(str(IMAGES), str(LABELS), stop=4, image_size=31)[0]
  np.testing.assert_array_equal(odd[:, 1:29, 1:29, 0], raw_images[:4])


def test_digits_small_sizes_resize_and_plain_files_read(tmp_path):
  plain_images, plain_labels = tmp_path / "images", tmp_path / "labels"
  plain_images.write_bytes(gzip.open(IMAGES).read())
  plain_labels.write_bytes(gzip.open(LABELS).read())
  images, labels, texts = captions.digits(str(plain_images), str(plain_labels), image_size=16)
  assert images.shape == (1024, 16, 16, 1) and len(labels) == len(texts) == 1024
  # A bilinear shrink keeps the ink: mean brightness within 5% of the original's.
  raw = _naive_idx(IMAGES)[1].astype(float)
  assert abs(images.mean() / raw.mean() - 1) < 0.05
  with pytest.raises(DataError, match=r"\[5, 5\) holds no examples"):
    captions.digits(str(IMAGES), str(LABELS), start=5, stop=5)
  with pytest.raises(DataError, match="not within its 1024 examples"):
    captions.digits(str(IMAGES), str(LABELS), stop=2000)
  with pytest.raises(DataError, match="labels file given as the images file"):
    captions.digits(str(LABELS), str(LABELS))


# -- folders of images with one caption file each ---------------------------------------------

def _png(path, colour, size=(20, 12)):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.new("RGB", size, colour).save(path)


def test_read_text_folder_pairs_each_image_with_its_text(tmp_path):
  _png(tmp_path / "b.png", (0, 0, 255))
  _png(tmp_path / "a.JPG", (255, 0, 0), size=(8, 8))
  _png(tmp_path / "c.webp", (0, 255, 0), size=(30, 40))
  (tmp_path / "a.txt").write_text("  a red\n square \n")
  (tmp_path / "b.txt").write_text("a blue rectangle")
  (tmp_path / "c.txt").write_text("green")
  (tmp_path / "notes.md").write_text("not an image")
  (tmp_path / "sub").mkdir()
  _png(tmp_path / "sub" / "z.png", (9, 9, 9))  # sub-folders are not read
  images, texts = captions.read_text_folder(str(tmp_path), image_size=8)
  assert texts == ["a red square", "a blue rectangle", "green"]  # sorted by file name
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
  # Solid colours survive the resize (JPEG within a few levels).
  np.testing.assert_allclose(images.reshape(3, -1, 3).mean(1),
                             [[255, 0, 0], [0, 0, 255], [0, 255, 0]], atol=4)
  grey = captions.read_text_folder(str(tmp_path), image_size=4, channels=1)[0]
  assert grey.shape == (3, 4, 4, 1)
  # ITU-R 601 luma of pure blue: 0.114 * 255 = 29.07
  assert abs(int(grey[1, 0, 0, 0]) - 29) <= 1


def test_read_text_folder_errors_name_the_file(tmp_path):
  with pytest.raises(DataError, match=f"{tmp_path}: no image files"):
    captions.read_text_folder(str(tmp_path), image_size=8)
  with pytest.raises(DataError, match="no such folder"):
    captions.read_text_folder(str(tmp_path / "missing"), image_size=8)
  _png(tmp_path / "one.png", (1, 2, 3))
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'one.png'}: no caption file "
                                                f"{tmp_path / 'one.txt'}")):
    captions.read_text_folder(str(tmp_path), image_size=8)
  (tmp_path / "one.txt").write_text(" \n\t")
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'one.txt'}: empty caption")):
    captions.read_text_folder(str(tmp_path), image_size=8)
  (tmp_path / "one.txt").write_text("a caption")
  (tmp_path / "two.png").write_bytes(b"not a png")
  (tmp_path / "two.txt").write_text("broken")
  with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'two.png'}: not a readable image")):
    captions.read_text_folder(str(tmp_path), image_size=8)


# -- the scene checker ------------------------------------------------------------------------

def test_parse_scene_caption():
  assert captions.parse_scene_caption("a red circle above a blue square") == (
      "red", "circle", "above", "blue", "square")
  assert captions.parse_scene_caption("A green triangle to the left of the white circle.") == (
      "green", "triangle", "left of", "white", "circle")
  assert captions.parse_scene_caption("a yellow square right of a red triangle")[2] == "right of"
  for bad in ("a red circle", "a purple circle above a blue square",
              "a red hexagon above a blue square", "a red circle near a blue square",
              "red circle above blue square", "a red circle above a blue square please",
              "a red circle left a blue square", ""):
    with pytest.raises(ValueError, match="is not a scene caption"):
      captions.parse_scene_caption(bad)


def _wrong_captions(caption, rng):
  """Captions that contradict the scene: each swaps or replaces one part."""
  c1, s1, rel, c2, s2 = captions.parse_scene_caption(caption)
  other = lambda options, x: rng.choice([o for o in options if o != x])
  absent = [c for c in captions.COLOURS if c not in (c1, c2)]
  return {
      "colours swapped": f"a {c2} {s1} {rel} a {c1} {s2}",
      "colour absent": f"a {c1} {s1} {rel} a {rng.choice(absent)} {s2}",
      "first shape": f"a {c1} {other(captions.SHAPES, s1)} {rel} a {c2} {s2}",
      "second shape": f"a {c1} {s1} {rel} a {c2} {other(captions.SHAPES, s2)}",
      "relation swapped": f"a {c1} {s1} {'left of' if rel == 'above' else 'above'} a {c2} {s2}",
      "objects swapped": f"a {c2} {s2} {rel} a {c1} {s1}",
  }


def test_check_scene_accepts_generated_scenes_and_rejects_wrong_captions():
  images, texts = captions.shapes(400, image_size=32, seed=123)
  right = [captions.check_scene(image, text) for image, text in zip(images, texts)]
  for key in ("colours", "shapes", "relation", "all"):
    assert np.mean([r[key] for r in right]) >= 0.97, key
  rng = np.random.default_rng(0)
  rejected = collections.defaultdict(list)
  for image, text in zip(images, texts):
    for kind, wrong in _wrong_captions(text, rng).items():
      rejected[kind].append(not captions.check_scene(image, wrong)["all"])
  for kind, values in rejected.items():
    assert np.mean(values) >= 0.97, kind
  # Pixel noise (what a decoder adds) does not change the verdict.
  noisy = np.clip(images[:100] + rng.normal(0, 15, images[:100].shape), 0, 255).astype(np.uint8)
  assert np.mean([captions.check_scene(i, t)["all"] for i, t in zip(noisy, texts)]) >= 0.97


# Drawn by hand: R a 7 x 7 square, Y a 9 x 9 disc, B a triangle pointing up, G a 2-pixel speck.
HAND = """
........................
........................
...RRRRRRR..............
...RRRRRRR..............
...RRRRRRR..............
...RRRRRRR..............
...RRRRRRR..............
...RRRRRRR..............
...RRRRRRR..............
........................
........................
........................
.....YYYYY........B.....
....YYYYYYY.......B.....
...YYYYYYYYY.....BBB....
...YYYYYYYYY.....BBB....
...YYYYYYYYY....BBBBB...
...YYYYYYYYY....BBBBB...
...YYYYYYYYY...BBBBBBB..
....YYYYYYY....BBBBBBB..
.....YYYYY....BBBBBBBBB.
........................
......................GG
........................
"""
# Off-palette paint, as a person (or a decoder) would use.
PAINT = {".": (12, 8, 16), "R": (200, 55, 45), "Y": (240, 200, 70), "B": (35, 95, 210),
         "G": (40, 180, 60)}


def test_check_scene_on_a_hand_drawn_image():
  rows = HAND.split()
  image = np.array([[PAINT[ch] for ch in row] for row in rows], np.uint8)
  assert image.shape == (24, 24, 3)
  verdict = lambda caption: captions.check_scene(image, caption)
  yes = {"colours": True, "shapes": True, "relation": True, "all": True}
  assert verdict("a red square above a yellow circle") == yes
  assert verdict("A yellow circle to the left of a blue triangle.") == yes
  assert verdict("a blue triangle right of a yellow circle") == yes
  assert verdict("a yellow circle below a red square") == yes
  assert verdict("a red circle above a yellow circle") == {
      "colours": True, "shapes": False, "relation": True, "all": False}
  assert verdict("a yellow circle left of a blue square") == {
      "colours": True, "shapes": False, "relation": True, "all": False}
  assert verdict("a yellow circle above a red square") == {
      "colours": True, "shapes": True, "relation": False, "all": False}
  assert verdict("a red square left of a yellow circle") == {
      "colours": True, "shapes": True, "relation": False, "all": False}
  no = {"colours": False, "shapes": False, "relation": False, "all": False}
  assert verdict("a white square above a yellow circle") == no  # no white at all
  assert verdict("a green square above a yellow circle") == no  # 2 pixels: below min_area
  # Both objects of one colour: the two largest blobs, ordered along the relation.
  two_red = image.copy()
  two_red[np.all(image == PAINT["Y"], -1)] = PAINT["R"]
  assert captions.check_scene(two_red, "a red square above a red circle")["all"]
  assert not captions.check_scene(two_red, "a red circle above a red square")["shapes"]
  with pytest.raises(ValueError, match=r"\(S, S, 3\)"):
    captions.check_scene(image[..., 0], "a red square above a yellow circle")


def test_filler_words_are_inserted_around_the_caption_and_name_no_number():
  assert not set(captions.FILLER_WORDS) & set(captions.DIGIT_WORDS)
  assert not any(ch.isdigit() for word in captions.FILLER_WORDS for ch in word)
  rng = np.random.default_rng(0)
  counts = set()
  for _ in range(200):
    out = captions.with_filler("the digit 7", rng).split()
    added = len(out) - 3
    counts.add(added)
    rest = iter(out)  # the caption's own words stay, in order
    assert all(any(w == x for x in rest) for w in ("the", "digit", "7"))
  assert counts == {1, 2, 3}
