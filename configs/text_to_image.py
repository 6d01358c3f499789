"""Text-to-image recipes: a VQ-VAE image tokenizer (fmjax/models/vqvae.py), then an
encoder-decoder Transformer from caption tokens to its image codes with classifier-free
guidance (fmjax/models/text_to_image.py, fmjax/guidance.py); dalle-mini's recipe, small.

Run:
  python -m train.text_to_image --config=configs/text_to_image.py:digits --workdir=workdirs/t2i
  python -m train.sample_images --workdir=workdirs/t2i --prompts=prompts.txt --out=OUT

Phase 1 trains the tokenizer in WORKDIR/tokenizer_vq (config.vq, config.vq_train), or takes
a finished one from --config.tokenizer_from=DIR (a text_to_image workdir or its tokenizer_vq);
phase 2 encodes the images to codes once (WORKDIR/codes_*.npy) and trains the generator in
WORKDIR. Both phases resume. Each evaluation writes eval/loss (held-out codes) and a sample
grid for config.sample.prompts (one row per prompt) to WORKDIR/samples/step_XXXXXX.png and
TensorBoard.

Variants:
  tiny    the bundled 1,024 MNIST digits (data/mnist_tiny) at 16 x 16, a 4 x 4 code grid, a
          tiny tokenizer and generator; seconds on a CPU; the tests run it.
  digits  MNIST t10k (config.data.train_path, default ../shared/data/mnist: the last
          num_eval images held out) at 32 x 32, each training image captioned 4 times in
          many phrasings ("a handwritten seven", "the digit 7", ...;
          fmjax.data.captions.digit_caption), half the captions with random filler words,
          an 8 x 8 grid of 128 codes, a 2 + 4 layer generator 192 wide, guidance 3.
          Measured (bench/text_to_image_digits.py, bench/RESULTS.md): 25.5 min end to end on
          the 2-core CPU; an independent classifier reads 0.91 of the images generated for
          unseen phrasings as the prompted digit.
  shapes  generated scenes of two coloured shapes ("a red circle above a blue square",
          fmjax.data.captions.shapes), 32 x 32 RGB.
Your own images: --config.data.train_path=FOLDER of images, each with a <stem>.txt caption
(any variant; the last num_eval images are held out).
"""

import ml_collections

from configs.common import base_config, model_config
from fmjax.models import text_to_image, vqvae

VARIANTS = ("tiny", "digits", "shapes")

DIGIT_PROMPTS = tuple(f"a handwritten {w}" for w in ("zero", "one", "two", "three", "four",
                                                    "five", "six", "seven", "eight", "nine"))
SHAPE_PROMPTS = ("a red circle above a blue square", "a green triangle left of a red square",
                 "a blue square below a yellow circle", "a yellow triangle right of a green circle")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  config = base_config()
  # A finished tokenizer: a text_to_image workdir (its tokenizer_vq/) or a tokenizer_vq
  # folder; "" trains one in WORKDIR/tokenizer_vq first.
  config.tokenizer_from = ""

  # The generator; vocab_size -1 is the caption tokenizer's; codebook_size and grid_size
  # come from the image tokenizer (config.vq), so they are not keys here.
  config.model = model_config(text_to_image.get_config("small" if variant != "tiny" else "tiny"))
  config.model.vocab_size = -1
  del config.model["codebook_size"], config.model["grid_size"]
  # The image tokenizer: its image_size and channels are the data's.
  config.vq = model_config(vqvae.get_config(
      "digits", widths=(32, 64), codebook_size=128, code_dim=32, groups=8))

  # Phase 1 (the tokenizer): these train keys replace config.train's; the rest are shared.
  v = config.vq_train = ml_collections.ConfigDict()
  v.steps, v.batch_size, v.learning_rate, v.warmup_steps = 500, 64, 2e-3, 50
  v.weight_decay, v.log_every, v.eval_every, v.save_every = 0.0, 100, 500, 500

  d = config.data = ml_collections.ConfigDict()
  # An MNIST folder (IDX files t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz), a folder
  # of images with one <stem>.txt caption each, or "" for generated shapes scenes.
  d.train_path = "../shared/data/mnist"
  d.num_train = 8192  # generated shapes scenes (the eval ones use another seed)
  d.num_eval = 1000  # held out: the last num_eval images of a folder or MNIST file
  d.vocab_size = 96  # SentencePiece pieces learned on the training captions
  d.max_length = 16  # caption tokens, EOS included (longer captions are cut)
  d.lowercase = True  # captions and prompts lower-cased ("The Digit 7" == "the digit 7")
  # MNIST: captions per training image (each a copy with its own phrasing), and the share of
  # captions given 1-3 random filler words ("the neat digit 7 please"), so that a prompt's
  # other words do not matter, only its digit.
  d.captions_per_image, d.filler_words = 1, 0.0

  s = config.sample = ml_collections.ConfigDict()
  s.prompts = DIGIT_PROMPTS  # the fixed prompts of the sample grid at each evaluation
  s.per_prompt = 4  # images per prompt in the grid
  s.guidance = 3.0  # classifier-free guidance: cond + guidance * (cond - uncond); 0: none
  s.temperature = 1.0
  s.top_k = 0  # 0: every code

  t = config.train
  t.learning_rate, t.warmup_steps, t.decay, t.end_factor = 1e-3, 100, "cosine", 0.05
  t.b2, t.weight_decay, t.batch_size = 0.98, 0.01, 64
  t.caption_dropout = 0.15  # share of captions replaced by the null (empty) caption
  t.steps, t.log_every, t.eval_every, t.save_every, t.eval_batches = 1500, 100, 500, 500, 8

  if variant == "tiny":
    config.vq = model_config(vqvae.get_config("tiny", channels=1, widths=(16, 16),
                                              codebook_size=32, code_dim=16, groups=4))
    v.steps, v.batch_size, v.log_every, v.eval_every, v.save_every = 40, 32, 20, 40, 40
    d.train_path, d.num_eval, d.vocab_size = "data/mnist_tiny", 128, 64
    s.prompts, s.per_prompt = ("a handwritten seven", "the digit 1"), 2
    t.batch_size, t.learning_rate, t.warmup_steps = 32, 3e-3, 10
    t.steps, t.log_every, t.eval_every, t.save_every, t.eval_batches = 60, 20, 60, 30, 2
    d.captions_per_image, d.filler_words = 2, 0.5
  elif variant == "digits":
    d.captions_per_image, d.filler_words = 4, 0.5
    d.max_length, d.vocab_size = 32, 160  # room for the filler words
  elif variant == "shapes":
    config.vq.channels = 3
    d.train_path, d.vocab_size = "", 80
    s.prompts = SHAPE_PROMPTS
  return config
