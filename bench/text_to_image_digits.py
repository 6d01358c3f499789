"""Text-to-image on MNIST, measured end to end: does a generated "seven" look like a seven to
a classifier the generator never saw?

  python bench/text_to_image_digits.py [--workdir=workdirs/t2i_bench] [--out]

1. An MNIST classifier, trained on its own by `train.classify_images`
   (configs/vit.py:mnist: t10k images 0-7,999, held-out accuracy ~0.98), never used to train
   or select the generator.
2. `train.text_to_image --config=configs/text_to_image.py:digits` from scratch, timed from
   launch to exit (tokenizer phase, code caching, generator: the issue's 45-minute target).
3. Prompts in phrasings the training captions never used (PROMPTS: none is among
   fmjax.data.captions.DIGIT_TEMPLATES' phrasings), SAMPLES images each, guidance from the
   recipe; the classifier labels each image. Reported: the share labelled as the prompted
   digit, per digit too; how much same-prompt samples differ (mean pairwise pixel distance,
   relative to real MNIST pairs of the same digit, and the share of distinct samples).
4. The image tokenizer's held-out reconstruction PSNR and codebook usage (its metrics.jsonl),
   and, with --clip_workdir, a train.clip digits run's zero-shot accuracy.

Each step is skipped when its workdir already holds a finished run (rerun to resume). Prints
one JSON line per result; --out appends them to bench/results/text_to_image_digits.jsonl.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

import machine  # noqa: E402  (bench/machine.py)
from fmjax import sharding, sources  # noqa: E402
from fmjax.data import captions  # noqa: E402
from fmjax.models import vit  # noqa: E402

# Phrasings outside the training captions' templates (checked in main).
PROMPTS = ("handwritten number {d}", "please show me {a} {d}", "the numeral {d}",
           "mnist digit {d}", "{d} on a black background")
SAMPLES = 8  # images per prompt: 10 digits x 5 phrasings x 8 = 400


def run_program(args, log_path) -> float:
  """Runs `python -m ARGS`, its output to log_path; returns the wall seconds."""
  began = time.monotonic()
  with open(log_path, "a") as log:
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=log, stderr=log)
  if proc.returncode:
    raise SystemExit(f"{' '.join(args)} failed ({proc.returncode}); see {log_path}")
  return time.monotonic() - began


def finished(workdir: str) -> bool:
  """Whether a program's workdir holds its final results (eval_results.json or a report)."""
  return os.path.exists(os.path.join(workdir, "eval_results.json"))


def load_classifier(workdir: str):
  """(predict(images uint8 (B, S, S, 1)) -> labels, image_size) of a classify_images run."""
  source = sources.parse(workdir)
  c = source.architecture(vit.ViTConfig)
  model = vit.ViT(c, source.runtime())
  x = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), x)
  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  import flax.linen as nn
  shardings = sharding.shardings_of(abstract, mesh, sharding.get_rules("dp"))["params"]
  params = source.load(nn.meta.unbox(abstract)["params"], shardings)  # the final step's
  apply = jax.jit(lambda p, images: model.apply({"params": p}, images, train=False).argmax(-1))

  def predict(images):
    return np.asarray(apply(params, images.astype(np.float32) / 127.5 - 1.0))
  return predict, c.image_size


def fit_to(images: np.ndarray, size: int) -> np.ndarray:
  """(N, S, S, 1) -> (N, size, size, 1): a centre crop (the generator's 32 x 32 digits are
  MNIST's 28 x 28 padded by 2) or a pad."""
  s = images.shape[1]
  if s > size:
    lo = (s - size) // 2
    return images[:, lo:lo + size, lo:lo + size]
  lo = (size - s) // 2
  return np.pad(images, ((0, 0), (lo, size - s - lo), (lo, size - s - lo), (0, 0)))


def spread(images: np.ndarray) -> float:
  """Mean pairwise L2 distance between images (N, ...) in [0, 1]."""
  x = images.reshape(len(images), -1).astype(np.float64) / 255.0
  d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
  return float(d[np.triu_indices(len(x), 1)].mean())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "t2i_bench"))
  p.add_argument("--clip_workdir", default=None, help="a train.clip digits workdir to report")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", action="store_true", help="append to bench/results/")
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  templates = {t.format(d="X", a="a") for t in captions.DIGIT_TEMPLATES}
  templates |= {t.format(d="X", a="an") for t in captions.DIGIT_TEMPLATES}
  assert not templates & {t.format(d="X", a="a") for t in PROMPTS}, "a prompt was trained on"
  common = {"machine": machine.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
  lines = []

  classifier = os.path.join(args.workdir, "classifier")
  if not finished(classifier):
    run_program(["train.classify_images", "--config=configs/vit.py:mnist",
                 f"--workdir={classifier}"], os.path.join(args.workdir, "classifier.log"))
  with open(os.path.join(classifier, "eval_results.json")) as f:
    classifier_accuracy = json.load(f)["eval/accuracy"]

  t2i = os.path.join(args.workdir, "t2i")
  wall = None
  if not os.path.exists(os.path.join(t2i, "checkpoints")):
    load = machine.Load()
    wall = run_program(["train.text_to_image", "--config=configs/text_to_image.py:digits",
                        f"--workdir={t2i}"], os.path.join(args.workdir, "t2i.log"))
    lines.append({"impl": "fmjax", "model": "text_to_image digits", "what": "train end to end",
                  "wall_s": round(wall, 1), "target_s": 45 * 60, **load.fields(), **common})
  vq_rows = [json.loads(line) for line in open(os.path.join(t2i, "tokenizer_vq",
                                                             "metrics.jsonl"))]
  vq_eval = [r for r in vq_rows if any(k.startswith("eval/") for k in r)][-1]
  lines.append({"impl": "fmjax", "model": "text_to_image digits", "what": "image tokenizer",
                **{k: v for k, v in vq_eval.items() if k.startswith("eval/") or k == "step"},
                **common})

  from train import sample_images
  gen = sample_images.Generator(t2i)
  s = gen.config.sample
  prompts, labels = [], []
  for digit in range(10):
    word = captions.DIGIT_WORDS[digit]
    article = "an" if word == "eight" else "a"
    for i, template in enumerate(PROMPTS):
      prompts.append(template.format(d=word if i % 2 == 0 else str(digit), a=article))
      labels.append(digit)
  load = machine.Load()
  began = time.monotonic()
  images = gen.sample(prompts, SAMPLES, seed=args.seed, scale=float(s.guidance),
                      temperature=float(s.temperature), top_k=int(s.top_k))  # (P, N, S, S, 1)
  sample_s = time.monotonic() - began
  predict, size = load_classifier(classifier)
  flat = fit_to(images.reshape(-1, *images.shape[2:]), size)
  predicted = np.concatenate([predict(flat[i:i + 100]) for i in range(0, len(flat), 100)])
  expected = np.repeat(labels, SAMPLES)
  correct = predicted == expected
  per_digit = {str(d): round(float(correct[expected == d].mean()), 3) for d in range(10)}

  from fmjax.data import images as fimages
  held_out = fimages.read_idx_dataset(
      os.path.join(REPO, "..", "shared", "data", "mnist", "t10k-images-idx3-ubyte.gz"),
      os.path.join(REPO, "..", "shared", "data", "mnist", "t10k-labels-idx1-ubyte.gz"),
      start=8000).arrays
  real, real_labels = held_out["image"], held_out["label"]
  rng = np.random.default_rng(args.seed)
  same = [spread(images[p]) for p in range(len(prompts))]
  real_same = [spread(real[rng.choice(np.flatnonzero(real_labels == d), SAMPLES, False)])
               for d in labels]
  distinct = np.mean([len({x.tobytes() for x in images[p]}) / SAMPLES
                      for p in range(len(prompts))])
  lines.append({
      "impl": "fmjax", "model": "text_to_image digits", "what": "generated digits",
      "prompts": len(prompts), "samples_per_prompt": SAMPLES, "guidance": float(s.guidance),
      "temperature": float(s.temperature), "top_k": int(s.top_k), "seed": args.seed,
      "classifier": "train.classify_images configs/vit.py:mnist",
      "classifier_heldout_accuracy": round(float(classifier_accuracy), 4),
      "prompted_digit_share": round(float(correct.mean()), 4), "per_digit": per_digit,
      "same_prompt_spread_vs_real": round(float(np.mean(same) / np.mean(real_same)), 3),
      "distinct_share": round(float(distinct), 3), "sample_s": round(sample_s, 1),
      "target": 0.9, **load.fields(), **common})
  if args.clip_workdir:
    rows = [json.loads(line) for line in open(os.path.join(args.clip_workdir,
                                                           "metrics.jsonl"))]
    clip_eval = [r for r in rows if "eval/zero_shot_accuracy" in r][-1]
    lines.append({"impl": "fmjax", "model": "clip digits", "what": "zero-shot MNIST",
                  "step": clip_eval["step"],
                  **{k: v for k, v in clip_eval.items() if k.startswith("eval/")}, **common})
  out_dir = os.path.join(args.workdir, "samples")
  sample_images.write_samples(out_dir, prompts, images)
  for line in lines:
    print(json.dumps(line))
  if args.out:
    header = {"command": "python bench/text_to_image_digits.py " + " ".join(argv or sys.argv[1:]),
              **common}
    with open(os.path.join(REPO, "bench", "results", "text_to_image_digits.jsonl"), "a") as f:
      f.write("".join(json.dumps(line) + "\n" for line in [header, *lines]))


if __name__ == "__main__":
  main()
