"""Image classification recipes for a Vision Transformer (Dosovitskiy et al. 2021).

Run:
  python -m train.classify_images --config=configs/vit.py:mnist --workdir=workdirs/vit_mnist

Variants:
  tiny          2 layers x 32 wide, 400 steps on 2,048 MNIST t10k images (../shared/data/mnist),
                ~0.7 eval/accuracy on 250 held-out ones; seconds on a laptop CPU; the tests
                run it.
  mnist         MNIST t10k, first 8,000 images to train, last 2,000 to evaluate: 6 layers x 64
                wide over 7 x 7 patches, 30 epochs: 0.9845 eval/accuracy in 460 s on the
                shared 2-core VM (bench/RESULTS.md; the bar is 0.97 within 10 minutes).
  cifar10       ViT-Ti/4 (Ti widths, 4 x 4 patches of 32 x 32) from scratch on tfds cifar10,
                crops, flips, label smoothing and mixup; sized for an accelerator, not run here.
  imagenet2012  ViT-B/16 from scratch on tfds imagenet2012 (the archives in data.manual_dir):
                the paper's table 3 settings (batch 4096, lr 3e-3, weight decay 0.3, dropout
                0.1, 300 epochs, 10k warmup steps); pod-scale, not run here. Preprocessing is
                resize + centre crop with pad-crop and flip, not the paper's Inception crop.
Fine-tune instead of training from scratch with --config.init_from=WORKDIR or hf:DIRECTORY
(e.g. a transformers ViTForImageClassification directory), typically with a lower
learning_rate; another image size resizes the position embeddings.
"""

import ml_collections

from configs.common import base_config, lora_config, model_config
from fmjax.models import vit

VARIANTS = ("tiny", "mnist", "cifar10", "imagenet2012")
MNIST = "../shared/data/mnist/t10k-{}-idx{}-ubyte.gz"


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
  config = base_config()
  config.model = model_config(vit.get_config("tiny"))
  config.model.num_classes = -1  # -1: the number of classes in the data
  # LoRA (--config.lora.rank=8): adapters train, the encoder stays frozen, the head trains.
  config.lora = lora_config()

  d = config.data = ml_collections.ConfigDict()
  # Exactly one source: IDX files, folders of class folders, or a tfds catalog name.
  d.train_images, d.train_labels = "", ""  # IDX (gzip or plain)
  d.eval_images, d.eval_labels = "", ""  # empty: the train files (with the eval range)
  d.train_dir, d.eval_dir = "", ""  # root/<class>/<image>, read with Pillow
  d.tfds_name = ""  # e.g. mnist, cifar10, imagenet2012
  d.train_split, d.eval_split = "train", "test"
  d.data_dir = ""  # tfds data_dir; empty: the tfds default
  d.manual_dir = ""  # tfds manual_dir (imagenet2012's ILSVRC2012_img_train.tar and _val.tar)
  d.train_start, d.train_stop = 0, 0  # the examples [start, stop) of each split; stop 0: all
  d.eval_start, d.eval_stop = 0, 0
  d.in_memory = True  # decode every image once up front (small datasets)
  d.crop_padding = 4  # training: zero-pad this many pixels and crop back at random (0: off)
  d.flip = True  # training: left-right flips
  d.eval_batch_size = 0  # 0: train.batch_size

  t = config.train
  t.decay, t.end_factor, t.b1, t.b2, t.weight_decay = "cosine", 0.0, 0.9, 0.999, 0.05
  t.learning_rate, t.batch_size, t.grad_clip = 1e-3, 128, 1.0
  t.epochs = 0.0  # with train.steps=0: steps = epochs x train examples / batch_size
  t.warmup_fraction = 0.05  # >0: warmup_steps = fraction x steps
  t.label_smoothing = 0.0
  t.mixup_alpha = 0.0  # >0: mixup with Beta(alpha, alpha) weights
  t.log_every, t.eval_every, t.save_every = 50, 500, 500
  t.best_metric = "eval/accuracy"

  if variant in ("tiny", "mnist"):
    d.train_images, d.train_labels = MNIST.format("images", 3), MNIST.format("labels", 1)
    d.flip = False  # a mirrored digit is another glyph
    d.crop_padding = 2
  if variant == "tiny":
    d.train_stop, d.eval_start, d.eval_stop = 2048, 8000, 8250
    d.crop_padding = 0
    t.steps, t.batch_size, t.learning_rate, t.warmup_fraction = 400, 64, 5e-3, 0.1
    t.log_every, t.eval_every, t.save_every = 50, 200, 200
  elif variant == "mnist":
    config.model.update(num_layers=6, num_heads=4, embed_dim=64, mlp_dim=128)
    d.train_stop, d.eval_start = 8000, 8000
    t.steps, t.epochs, t.batch_size, t.learning_rate, t.warmup_fraction = 0, 30.0, 128, 2e-3, 0.05
    t.label_smoothing = 0.1
    t.log_every, t.eval_every, t.save_every = 50, 250, 250
  elif variant == "cifar10":
    config.model = model_config(vit.get_config("ti16", image_size=32, patch_size=4,
                                               num_classes=10))
    d.tfds_name = "cifar10"
    t.steps, t.epochs, t.batch_size, t.learning_rate, t.warmup_fraction = 0, 200.0, 512, 1e-3, 0.05
    t.label_smoothing, t.mixup_alpha = 0.1, 0.2
    t.log_every, t.eval_every, t.save_every = 100, 2000, 2000
  elif variant == "imagenet2012":
    config.model = model_config(vit.get_config("b16"))
    config.runtime.dropout_rate = 0.1
    d.tfds_name, d.eval_split, d.in_memory, d.crop_padding = "imagenet2012", "validation", False, 16
    t.steps, t.epochs, t.batch_size, t.learning_rate, t.weight_decay = 0, 300.0, 4096, 3e-3, 0.3
    t.warmup_fraction, t.warmup_steps = 0.0, 10_000
    t.log_every, t.eval_every, t.save_every = 100, 5000, 5000
  return config
