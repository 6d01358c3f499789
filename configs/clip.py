"""CLIP recipes: a contrastive image-text dual encoder (fmjax/models/clip.py), trained by
train/clip.py.

Run:
  python -m train.clip --config=configs/clip.py:digits --workdir=workdirs/clip_digits

Variants:
  tiny    the first 1,024 MNIST t10k digits bundled in data/mnist_tiny (768 to train, 256
          held out), each with a caption in one of 48 phrasings ("a handwritten seven",
          "the digit 7", ...); 32 x 32 grey images in 8 x 8 patches, towers of 2 layers 32
          wide; seconds on a CPU; the tests run it. It learns (in-batch retrieval above
          chance), it does not classify well.
  digits  MNIST t10k from config.data.train_path (default ../shared/data/mnist): the first
          8,000 images to train, the last 2,000 to evaluate, captions as above; a 4-layer ViT
          over 8 x 8 patches and a 2-layer text tower, 64 wide, 1,500 steps of 128.
          eval/zero_shot_accuracy, the share of the 2,000 held-out digits whose nearest class
          embedding (ZERO_SHOT_TEMPLATES in train/clip.py, with the word and the numeral)
          names their label: 0.9595 in 5 min 11 s of wall time on the shared 2-core VM (load
          ~5.5; 0.80 at step 500, 0.95 with prompt phrasings never seen in training); 3,000
          steps gave 0.9745 in 14 min.
  shapes  generated scenes of two coloured shapes with their captions ("a red circle above a
          blue square", fmjax/data/captions.py), 32 x 32 RGB, 4,096 to train and 512 held
          out: in-batch retrieval 0.76 image->text, 0.77 text->image (batches of 64) in
          2 min 49 s.
Your own image-caption pairs: --config.data.kind=folder --config.data.train_path=DIR (every
image in DIR with its caption in <stem>.txt beside it; --config.data.eval_path=DIR2 for a
held-out folder, else the last data.num_eval images are held out), on the shapes recipe or
any other (the ViT's image_size and num_channels decide how images are read).
Evaluation: eval/loss (the symmetric contrastive loss), eval/i2t_accuracy and
eval/t2i_accuracy (in-batch top-1 retrieval over batches of train.batch_size; with digit
captions many pairs of a batch share a class, so these stay well below 1), and with labelled
digits eval/zero_shot_accuracy. The captions' SentencePiece vocabulary is learned on the
training captions (lower-cased) and saved in WORKDIR/tokenizer.
"""

import ml_collections

from configs.common import base_config, model_config
from fmjax.models import clip

VARIANTS = ("tiny", "digits", "shapes")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  config = base_config()
  preset = clip.get_config("digits" if variant == "digits" else "tiny")
  # The joint space (config.model), the text tower (config.text), the ViT (config.vit).
  config.model = ml_collections.ConfigDict({"embed_dim": preset.embed_dim,
                                            "init_temperature": preset.init_temperature})
  config.text = model_config(preset.text)
  config.text.vocab_size = -1  # -1: the tokenizer's
  config.vit = model_config(preset.image)

  d = config.data = ml_collections.ConfigDict()
  d.kind = "digits"  # digits (MNIST IDX folder) | shapes (generated) | folder (images + .txt)
  d.train_path = "data/mnist_tiny"  # digits: the IDX folder; folder: the image folder
  d.eval_path = ""  # folder only: a held-out folder; empty: the last num_eval of train_path
  d.num_train, d.num_eval = 768, 256  # digits: the first num_train, then num_eval; shapes: counts
  d.vocab_size = 200  # SentencePiece pieces learned on the training captions (~ one a word)
  d.crop_padding = 2  # training: zero-pad this many pixels and crop back at random (0: off)

  t = config.train
  t.learning_rate, t.warmup_steps, t.decay, t.end_factor = 1e-3, 50, "cosine", 0.0
  t.b2, t.weight_decay, t.batch_size = 0.98, 0.05, 64
  t.best_metric = "eval/loss"
  if variant == "tiny":
    for tower in (config.text, config.vit):
      tower.embed_dim, tower.mlp_dim, tower.num_layers = 32, 64, 2
    config.vit.num_channels = 1
    config.model.embed_dim = 32
    t.learning_rate, t.warmup_steps = 2e-3, 30
    t.steps, t.log_every, t.eval_every, t.save_every = 300, 50, 150, 150
  elif variant == "digits":
    d.train_path = "../shared/data/mnist"
    d.num_train, d.num_eval = 8000, 2000
    t.batch_size, t.learning_rate, t.warmup_steps = 128, 1e-3, 100
    t.steps, t.log_every, t.eval_every, t.save_every = 1500, 100, 500, 500
    t.best_metric = "eval/zero_shot_accuracy"
  else:  # shapes
    d.kind, d.train_path, d.crop_padding = "shapes", "", 0
    d.num_train, d.num_eval, d.vocab_size = 4096, 512, 80
    t.steps, t.log_every, t.eval_every, t.save_every = 1500, 100, 500, 500
  return config
