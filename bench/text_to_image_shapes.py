"""Text-to-image on coloured-shape scenes, scored by a rule-based checker: are the named
colours, shapes and their relation in the picture?

  python bench/text_to_image_shapes.py [--workdir=workdirs/t2i_shapes_bench] [--out]

1. `train.text_to_image --config=configs/text_to_image.py:shapes` from scratch, timed from
   launch to exit (skipped when the workdir holds a run: rerun to resume).
2. Prompts: captions of scenes drawn with a seed no training scene used
   (fmjax.data.captions.shapes), in the training grammar and in two rephrasings (PHRASINGS),
   SAMPLES images each, guidance from the recipe.
3. fmjax.data.captions.check_scene on every image: the share with both colours present, with
   the named shapes, in the named relation, and all three (the issue's target: 0.8).

Prints one JSON line per result; --out appends them to bench/results/text_to_image_shapes.jsonl.
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

import numpy as np  # noqa: E402

import machine  # noqa: E402  (bench/machine.py)
from fmjax.data import captions  # noqa: E402

SAMPLES = 4
NUM_PROMPTS = 50
# The training grammar, and rephrasings of it the captions never used.
PHRASINGS = ("{c}", "a picture with {c}", "{c}, on a dark background")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "t2i_shapes_bench"))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", action="store_true", help="append to bench/results/")
  args = p.parse_args(argv)
  os.makedirs(args.workdir, exist_ok=True)
  common = {"machine": machine.machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
  lines = []
  t2i = os.path.join(args.workdir, "t2i")
  if not os.path.exists(os.path.join(t2i, "checkpoints")):
    load = machine.Load()
    began = time.monotonic()
    with open(os.path.join(args.workdir, "t2i.log"), "a") as log:
      proc = subprocess.run([sys.executable, "-m", "train.text_to_image",
                             "--config=configs/text_to_image.py:shapes", f"--workdir={t2i}"],
                            cwd=REPO, stdout=log, stderr=log)
    if proc.returncode:
      raise SystemExit(f"train.text_to_image failed; see {args.workdir}/t2i.log")
    lines.append({"impl": "fmjax", "model": "text_to_image shapes", "what": "train end to end",
                  "wall_s": round(time.monotonic() - began, 1), **load.fields(), **common})

  from train import sample_images
  gen = sample_images.Generator(t2i)
  s = gen.config.sample
  _, scenes = captions.shapes(NUM_PROMPTS, image_size=gen.vq.config.image_size,
                              seed=10_000 + args.seed)  # no training or eval scene's seed
  for phrasing in PHRASINGS:
    prompts = [phrasing.format(c=c) for c in scenes]
    load = machine.Load()
    images = gen.sample(prompts, SAMPLES, seed=args.seed, scale=float(s.guidance),
                        temperature=float(s.temperature), top_k=int(s.top_k))
    checks = [captions.check_scene(image, scene) for scene, group in zip(scenes, images)
              for image in group]
    share = {k: round(float(np.mean([c[k] for c in checks])), 3)
             for k in ("colours", "shapes", "relation", "all")}
    lines.append({"impl": "fmjax", "model": "text_to_image shapes", "what": "generated scenes",
                  "phrasing": phrasing, "prompts": len(prompts), "samples_per_prompt": SAMPLES,
                  "guidance": float(s.guidance), **share, "target": 0.8, **load.fields(),
                  **common})
    sample_images.write_samples(os.path.join(args.workdir, f"samples_{PHRASINGS.index(phrasing)}"),
                                prompts, images)
  for line in lines:
    print(json.dumps(line))
  if args.out:
    header = {"command": "python bench/text_to_image_shapes.py " + " ".join(argv or sys.argv[1:]),
              **common}
    with open(os.path.join(REPO, "bench", "results", "text_to_image_shapes.jsonl"), "a") as f:
      f.write("".join(json.dumps(line) + "\n" for line in [header, *lines]))


if __name__ == "__main__":
  main()
