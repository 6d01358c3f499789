"""Images from captions with a trained text_to_image workdir, optionally reranked by CLIP.

  python -m train.sample_images --workdir=DIR --prompts=FILE --out=OUTDIR \
      [--num_candidates=N] [--clip_workdir=CLIPDIR] [--guidance=S] [--seed=S] \
      [--temperature=T] [--top_k=K]

FILE holds one prompt per line (blank lines skipped). For each prompt N candidates are
sampled (classifier-free guidance S, default the run's config.sample.guidance) and decoded by
the run's image tokenizer; with --clip_workdir (a train.clip workdir) the candidate whose
CLIP embedding is closest to the prompt's is kept, else the first. OUTDIR gets 00000.png,
00001.png, ... in prompt order, grid.png (every prompt's pick, in order) and index.jsonl:
one {"prompt", "file", "clip_score" (null without CLIP)} per prompt. The same seed gives the
same images. Bad input (no such file, no prompts, no checkpoint) is one `error:` line on
stderr and exit status 2.
"""

import json
import os
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags
from absl import logging as absl_logging

from fmjax import data as fdata
from fmjax import errors, guidance
from fmjax.models import text_to_image as t2i
from train import common
from train import text_to_image as program

FLAGS = flags.FLAGS  # --workdir is train.common's


def define_flags() -> None:
  """The command line's flags, defined when this runs as the program (not on import: other
  programs, train.sample among them, define --seed, --temperature and --top_k too)."""
  flags.DEFINE_string("prompts", None, "a text file, one prompt per line")
  flags.DEFINE_string("out", None, "the folder the PNGs, grid.png and index.jsonl go to")
  flags.DEFINE_integer("num_candidates", 1, "samples per prompt; the best by CLIP is kept")
  flags.DEFINE_string("clip_workdir", None, "a train.clip workdir to rerank the candidates")
  flags.DEFINE_float("guidance", None, "guidance scale (default: the run's sample.guidance)")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_float("temperature", None, "softmax temperature (default: the run's)")
  flags.DEFINE_integer("top_k", None,
                       "sample among the k most likely codes (default: the run's)")


def read_prompts(path: str) -> list[str]:
  """The non-blank lines of a prompts file, stripped."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--prompts={path}: no such file; write one prompt per line there")
  try:
    with open(path, encoding="utf-8") as f:
      prompts = [line.strip() for line in f.read().splitlines()]
  except UnicodeDecodeError as e:
    raise ValueError(f"--prompts={path}: not UTF-8 text ({e.reason} at byte {e.start}); save "
                     "it as UTF-8, one prompt per line") from None
  prompts = [p for p in prompts if p]
  if not prompts:
    raise ValueError(f"--prompts={path} holds no prompts; write one prompt per line")
  return prompts


class Generator:
  """A text_to_image workdir: its generator, caption tokenizer and image tokenizer.

  Args:
    workdir: the workdir (its latest checkpoint, tokenizer/ and config.json).
  """

  def __init__(self, workdir: str):
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing; train first with python -m "
                              f"train.text_to_image --config=... --workdir={workdir}")
    with open(path) as f:
      self.config = ml_collections.ConfigDict(json.load(f))
    source = common.sources.parse(workdir)
    self.model = t2i.TextToImage(source.architecture(t2i.TextToImageConfig))
    self.tok = fdata.load_tokenizer(os.path.join(workdir, "tokenizer"))
    length = self.config.data.max_length
    text = np.zeros((1, length), np.int32)
    self.params = program.restore(self.model, source, text, text > 0,
                                  np.zeros((1, self.model.config.num_tokens), np.int32))
    self.vq, self.vq_params = program.load_vq(program.vq_workdir(self.config, workdir))
    self._sample = {}

  def sample(self, prompts, num: int, *, seed: int, scale: float, temperature: float,
             top_k: int) -> np.ndarray:
    """(P, num, S, S, C) uint8: `num` images of each prompt."""
    texts = [p.lower() if self.config.data.lowercase else p for p in prompts]
    text, mask = program.encode_text(self.tok, [t for t in texts for _ in range(num)],
                                     self.config.data.max_length)
    key = (scale, temperature, top_k)
    if key not in self._sample:
      def sample(params, vq_params, text, mask, rng):
        codes = guidance.sample_image_tokens(self.model, params, text, mask, rng,
                                             null_id=self.tok.eos_id, guidance=scale,
                                             temperature=temperature, top_k=top_k)
        return self.vq.apply({"params": vq_params}, codes, method="decode")
      self._sample[key] = jax.jit(sample)
    images = self._sample[key](self.params, self.vq_params, text, mask, jax.random.key(seed))
    return program.to_pixels(images).reshape(len(prompts), num, *images.shape[1:])


def clip_scorer(clip_workdir: str):
  """(prompt, images (n, S, S, C) uint8) -> (n,) CLIP cosine similarities, from a train.clip
  workdir (train.clip.load_clip, fmjax.models.clip.score)."""
  try:
    from fmjax.models import clip as fclip
    from train import clip as clip_program
  except ImportError as e:
    raise ValueError(f"--clip_workdir needs the CLIP program (train/clip.py and "
                     f"fmjax/models/clip.py), which this checkout lacks ({e}); leave "
                     "--clip_workdir out to keep the first candidate") from None
  model, params, tok, size, channels = clip_program.load_clip(clip_workdir)

  def score(prompt: str, images) -> np.ndarray:
    from PIL import Image
    if images.shape[1] != size:
      images = np.stack([np.asarray(Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x)
                                    .resize((size, size), Image.BILINEAR)) for x in images])
      images = images.reshape(*images.shape[:3], -1)
    if images.shape[-1] != channels:
      images = (np.repeat(images, channels, -1) if images.shape[-1] == 1 else
                images.mean(-1, keepdims=True))
    tokens, mask = fclip.tokenize(tok, [prompt] * len(images), model.config.text.max_length)
    return np.asarray(fclip.score(model, params, images.astype(np.float32) / 127.5 - 1.0,
                                  tokens, mask))
  return score


def write_samples(out: str, prompts, candidates, scorer=None) -> list[dict]:
  """Picks each prompt's candidate (the best by `scorer`, else the first) and writes
  NNNNN.png, grid.png and index.jsonl to `out`.

  Args:
    out: the output folder (made if missing).
    prompts: P prompts.
    candidates: (P, N, S, S, C) uint8.
    scorer: (prompt, (N, S, S, C) uint8) -> (N,) scores, higher better; or None.

  Returns:
    The index rows written, {"prompt", "file", "clip_score"} per prompt.
  """
  from PIL import Image
  os.makedirs(out, exist_ok=True)
  rows, picks = [], []
  for i, (prompt, images) in enumerate(zip(prompts, candidates)):
    scores = None if scorer is None else np.asarray(scorer(prompt, images), np.float64)
    best = 0 if scores is None else int(np.argmax(scores))
    image = images[best]
    name = f"{i:05d}.png"
    with errors.writing(os.path.join(out, name), "a sample"):
      Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
          os.path.join(out, name))
    picks.append(image)
    rows.append({"prompt": prompt, "file": name,
                 "clip_score": None if scores is None else float(scores[best])})
  grid = program.image_grid(np.stack(picks), min(len(picks), 8))
  Image.fromarray(grid.squeeze(-1) if grid.shape[-1] == 1 else grid).save(
      os.path.join(out, "grid.png"))
  with errors.writing(os.path.join(out, "index.jsonl"), "the index"), \
      open(os.path.join(out, "index.jsonl"), "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))
  return rows


def sample_images(workdir: str, prompts_path: str, out: str, *, num_candidates: int = 1,
                  clip_workdir: str | None = None, scale: float | None = None, seed: int = 0,
                  temperature: float | None = None, top_k: int | None = None,
                  scorer=None) -> list[dict]:
  """The program: prompts -> one image each in `out` (see the module docstring).

  scorer: a stand-in for CLIP's (as write_samples takes it); clip_workdir builds CLIP's.
  """
  if num_candidates < 1:
    raise ValueError(f"--num_candidates={num_candidates}: must be at least 1")
  prompts = read_prompts(prompts_path)
  if clip_workdir:
    scorer = clip_scorer(clip_workdir)
  gen = Generator(workdir)
  s = gen.config.sample
  candidates = gen.sample(
      prompts, num_candidates, seed=seed,
      scale=float(s.guidance if scale is None else scale),
      temperature=float(s.temperature if temperature is None else temperature),
      top_k=int(s.top_k if top_k is None else top_k))
  return write_samples(out, prompts, candidates, scorer)


def main(argv):
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's restore chatter
  if len(argv) > 1:
    common.fail(f"unexpected arguments {argv[1:]}")
  if FLAGS.workdir is None or FLAGS.prompts is None or FLAGS.out is None:
    common.fail("--workdir=DIR (a text_to_image workdir), --prompts=FILE and --out=OUTDIR are "
                "required")
  try:
    rows = sample_images(FLAGS.workdir, FLAGS.prompts, FLAGS.out,
                         num_candidates=FLAGS.num_candidates, clip_workdir=FLAGS.clip_workdir,
                         scale=FLAGS.guidance, seed=FLAGS.seed, temperature=FLAGS.temperature,
                         top_k=FLAGS.top_k)
  except common.EXPECTED_ERRORS as e:
    if os.environ.get("FMJAX_DEBUG"):
      raise
    common.fail(str(e))
  print(f"{len(rows)} images in {FLAGS.out} (grid.png, index.jsonl)")


if __name__ == "__main__":
  define_flags()
  app.run(main, sys.argv, flags_parser=common.parse_flags)
