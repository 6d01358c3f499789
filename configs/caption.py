"""Image captioning recipes: a ViT encoder and the translation model's text decoder, which
cross-attends to the image's patch tokens (fmjax/models/seq2seq.py ImageCaptioner).

Run:
  python -m train.caption --config=configs/caption.py:shapes --workdir=workdirs/shapes

Variants:
  tiny    generated scenes of two coloured shapes ("a red circle above a blue square",
          fmjax/data/captions.py), 32 x 32 images in 8 x 8 patches, a 2-layer ViT and a
          2-layer decoder 64 wide; seconds on a CPU; the tests run it.
  shapes  the same scenes, more of them and longer: eval/accuracy (next caption token,
          teacher forced, on 512 held-out scenes) 0.969, exact captions 0.77, in 77 s
          (bench/RESULTS.md; the bar is 0.9).
Real image-caption pairs: --config.data.train_folder=DIR --config.data.eval_folder=DIR, each
holding captions.tsv ("<image file>\\t<caption>" lines) and the images.
Evaluation: eval/loss, eval/accuracy, eval/exact_match (greedy captions equal to the
reference) and eval/bleu; WORKDIR/predictions/eval.tsv holds the greedy captions.
"""

import ml_collections

from configs.common import base_config, model_config
from fmjax.models import seq2seq, vit

VARIANTS = ("tiny", "shapes")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  config = base_config()
  # The text decoder (its encoder fields are unused: the encoder is config.vit).
  config.model = model_config(seq2seq.get_config("tiny", encoder_layers=0))
  config.model.vocab_size = -1  # -1: the tokenizer's
  config.vit = model_config(vit.get_config("tiny", image_size=32, patch_size=8, num_channels=3,
                                           num_classes=0, pool="gap", num_heads=4,
                                           embed_dim=64, mlp_dim=256))

  d = config.data = ml_collections.ConfigDict()
  d.train_folder, d.eval_folder = "", ""  # caption folders; empty: generated scenes
  d.num_train, d.num_eval = 4096, 512  # generated scenes (eval uses another seed)
  d.vocab_size = 80  # SentencePiece pieces learned on the training captions (one per word)
  d.max_length = 12  # caption tokens, EOS included

  t = config.train
  t.learning_rate, t.warmup_steps, t.decay, t.end_factor = 2e-3, 50, "cosine", 0.05
  t.b2, t.weight_decay = 0.98, 0.0
  t.batch_size, t.label_smoothing = 64, 0.0
  t.best_metric = "eval/accuracy"
  if variant == "tiny":
    d.num_train, d.num_eval = 2048, 256
    t.steps, t.log_every, t.eval_every, t.save_every = 150, 25, 75, 75
  else:
    t.steps, t.log_every, t.eval_every, t.save_every = 1200, 100, 300, 300
  return config
