"""Train CLIP, a contrastive image-text dual encoder (fmjax/models/clip.py).

  python -m train.clip --config=configs/clip.py:digits --workdir=DIR

Data (config.data.kind): "digits", MNIST IDX files in the folder config.data.train_path
(t10k-images-idx3-ubyte[.gz] and the labels), each digit captioned in one of many phrasings
(fmjax.data.captions.digit_caption): the first num_train to train, the next num_eval to
evaluate; "shapes", generated scenes of coloured shapes with their captions; "folder", images
with one caption each in <stem>.txt (config.data.train_path, and eval_path or the last
num_eval of it held out). Images are fitted to the ViT's image_size and num_channels and fed
as pixels in [-1, 1]; training crops them at random (config.data.crop_padding). The captions'
SentencePiece vocabulary is learned on the training captions (lower-cased) and saved in
DIR/tokenizer; each caption is its ids and EOS (fmjax.models.clip.tokenize).

Training minimises CLIP's symmetric cross-entropy over each batch's image-text pairs. Every
eval_every steps: eval/loss, eval/i2t_accuracy and eval/t2i_accuracy (in-batch top-1
retrieval) over the held-out pairs and, for digits, eval/zero_shot_accuracy: each held-out
image's nearest class embedding (the mean embedding of ZERO_SHOT_TEMPLATES filled with the
digit's word and numeral) against its label. Rerunning resumes.

Other programs score images with a trained workdir through `load_clip` and
fmjax.models.clip.score (e.g. train/sample_images.py reranks generated candidates).
"""

import dataclasses
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fmjax import sharding, sources, trainer
from fmjax import data as fdata
from fmjax.data import captions as fcaptions
from fmjax.data import images as fimages
from fmjax.models import clip, vit
from train import common

# Zero-shot prompts for digits, each filled with the word and the numeral ("seven", "7").
ZERO_SHOT_TEMPLATES = ("a photo of the digit {}", "the number {}", "a handwritten {}",
                       "an image of the digit {}", "{}", "a picture of a {}")


@dataclasses.dataclass
class Split:
  """Image-caption pairs: images (n, S, S, C) uint8, n captions, labels (n,) or None."""
  images: np.ndarray
  captions: list
  labels: np.ndarray | None = None


# Data -------------------------------------------------------------------------------------------

def _grey_or_rgb(images: np.ndarray, channels: int) -> np.ndarray:
  if images.shape[-1] == channels:
    return images
  if images.shape[-1] == 1:
    return np.repeat(images, channels, axis=-1)
  return np.round(images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
                  ).astype(np.uint8)[..., None]


def load_digits(config, size: int, channels: int):
  """MNIST digits with phrased captions: (train, eval, zero-shot class names)."""
  d = config.data
  if not d.train_path:
    raise ValueError("config.data.kind='digits' reads MNIST IDX files from the folder "
                     "config.data.train_path; set it (e.g. ../shared/data/mnist)")
  paths = fcaptions.mnist_files(d.train_path)
  split = lambda start, stop: Split(*_reorder(fcaptions.digits(
      *paths, start=start, stop=stop, image_size=size, seed=config.seed), channels))
  train = split(0, d.num_train)
  held_out = split(d.num_train, d.num_train + d.num_eval)
  if len(held_out.captions) < d.num_eval:
    raise ValueError(f"{paths[0]} holds {d.num_train + len(held_out.captions)} images, fewer "
                     f"than config.data.num_train + num_eval = {d.num_train + d.num_eval}; "
                     "lower them")
  names = [(word, str(i)) for i, word in enumerate(fcaptions.DIGIT_WORDS)]
  return train, held_out, names


def _reorder(digits, channels: int):
  images, labels, captions = digits
  return _grey_or_rgb(images, channels), captions, labels


def load_shapes(config, size: int, channels: int):
  """Generated coloured-shape scenes: (train, eval, None)."""
  d = config.data
  make = lambda n, seed: fcaptions.shapes(n, image_size=size, seed=seed)
  (train, train_captions), (held, held_captions) = (make(d.num_train, config.seed),
                                                    make(d.num_eval, config.seed + 1))
  return (Split(_grey_or_rgb(train, channels), train_captions),
          Split(_grey_or_rgb(held, channels), held_captions), None)


def load_folder(config, size: int, channels: int):
  """Images with <stem>.txt captions: (train, eval, None)."""
  d = config.data
  if not d.train_path:
    raise ValueError("config.data.kind='folder' reads images and their <stem>.txt captions "
                     "from config.data.train_path; set it")
  images, captions = fcaptions.read_text_folder(d.train_path, image_size=size, channels=channels)
  if d.eval_path:
    held, held_captions = fcaptions.read_text_folder(d.eval_path, image_size=size,
                                                     channels=channels)
    return Split(images, captions), Split(held, held_captions), None
  if len(captions) <= d.num_eval:
    raise ValueError(f"{d.train_path} holds {len(captions)} images: too few to hold out "
                     f"config.data.num_eval={d.num_eval} and train on the rest; lower num_eval "
                     "or give a held-out folder as config.data.eval_path")
  cut = len(captions) - d.num_eval
  return (Split(images[:cut], captions[:cut]), Split(images[cut:], captions[cut:]), None)


LOADERS = {"digits": load_digits, "shapes": load_shapes, "folder": load_folder}


def tokenizer_settings(config) -> list[str]:
  """The config keys that decide the tokenizer common.caption_tokenizer makes (fixed on resume)."""
  del config
  return ["data.vocab_size", "data.kind"]




def encode(split: Split, tok, max_length: int) -> dict[str, np.ndarray]:
  """The arrays of the examples: uint8 images, caption tokens and masks (and labels)."""
  tokens, mask = clip.tokenize(tok, split.captions, max_length)
  arrays = {"images": split.images, "tokens": tokens, "mask": mask}
  return arrays if split.labels is None else {**arrays, "label": np.asarray(split.labels)}


def make_augment(config):
  """The training transform: a random crop of the zero-padded image, seeded by (seed, index,
  epoch) so resuming is exact; None without crop_padding."""
  padding = config.data.crop_padding
  if not padding:
    return None

  def augment(example, index, epoch):
    rng = np.random.default_rng([config.seed, index, epoch])
    return {**example, "images": fimages.random_crop_flip(example["images"], rng,
                                                         padding=padding, flip=False)}
  return augment


def pixels(images):
  """uint8 images -> float32 in [-1, 1], the model's input."""
  return images.astype(jnp.float32) / 127.5 - 1.0


# Model ------------------------------------------------------------------------------------------

def model_config(config, tok) -> clip.CLIPConfig:
  """The CLIPConfig of config.model, config.text and config.vit (text vocab_size -1: the
  tokenizer's; tok None: a stand-in size, to check the config before the data is read)."""
  text = dict(config.text)
  if text["vocab_size"] == -1:
    text["vocab_size"] = tok.vocab_size if tok is not None else 1
  elif tok is not None and text["vocab_size"] < tok.vocab_size:
    raise ValueError(f"config.text.vocab_size={text['vocab_size']} is smaller than the "
                     f"tokenizer's vocabulary ({tok.vocab_size}); use -1 to take the tokenizer's")
  return common.as_flags(
      clip.CLIPConfig, "config.model", text=common.as_flags(clip.TextConfig, "config.text", **text),
      image=common.as_flags(vit.ViTConfig, "config.vit", **config.vit), **config.model)


def make_loss_fn(model):
  def loss_fn(params, batch, rng, train):
    logits = model.apply({"params": params}, pixels(batch["images"]), batch["tokens"],
                         batch["mask"], train=train, rngs={"dropout": rng})
    i2t, t2i = clip.retrieval_accuracy(logits)
    scale = jnp.exp(jnp.minimum(params["logit_scale"], np.log(clip.MAX_LOGIT_SCALE)))
    return clip.contrastive_loss(logits), {"i2t_accuracy": i2t, "t2i_accuracy": t2i,
                                           "logit_scale": scale}
  return loss_fn


def make_zero_shot(model, tok, classnames, batch_size: int, held_out: dict):
  """(predict_fn, score_fn) of eval/zero_shot_accuracy over every held-out labelled image."""
  def predict_fn(params, batch):
    classes = clip.zero_shot_classifier(model, params, tok, classnames, ZERO_SHOT_TEMPLATES)
    images = model.apply({"params": params}, pixels(batch["images"]), method="encode_image")
    return {"label": clip.zero_shot_predict(images, classes)}

  def score_fn(predict):
    images, labels = held_out["images"], held_out["label"]
    predicted = []
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      padded = np.zeros((batch_size, *images.shape[1:]), images.dtype)
      padded[:len(chunk)] = chunk
      predicted.append(predict({"images": padded})["label"][:len(chunk)])
    return {"eval/zero_shot_accuracy": float(np.mean(np.concatenate(predicted) == labels))}
  return predict_fn, score_fn


@common.holds_workdir
def run(config, workdir: str):
  common.prepare_workdir(config, workdir)
  common.refuse_changed_settings(config, workdir, tokenizer_settings)
  if config.init_from:  # the tokenizer is learned per run: another run's ids would not match
    raise ValueError(f"config.init_from={config.init_from!r}: clip trains from fresh weights; "
                     "leave config.init_from empty")
  d, t = config.data, config.train
  if d.kind not in LOADERS:
    raise ValueError(f"config.data.kind={d.kind!r} is not one of {sorted(LOADERS)}")
  model_config(config, None)  # the architecture's own checks, before the data is read
  train_split, eval_split, classnames = LOADERS[d.kind](config, config.vit.image_size,
                                                        config.vit.num_channels)
  tok = common.caption_tokenizer(workdir, train_split.captions, config.data.vocab_size,
                               lowercase=True)
  c = model_config(config, tok)
  model = clip.CLIP(c, common.runtime(config))
  length = c.text.max_length
  train_arrays, eval_arrays = (encode(s, tok, length) for s in (train_split, eval_split))
  trainer.log.info("%d train and %d eval pairs; %d pieces", len(train_split.captions),
                   len(eval_split.captions), tok.vocab_size)
  train_data = fdata.ExampleBatchIterator(
      fdata.ArraySource(train_arrays), batch_size=t.batch_size, seed=config.seed,
      transform=make_augment(config), process_index=jax.process_index(),
      process_count=jax.process_count())
  eval_data = lambda: fdata.example_batches(
      fdata.ArraySource(eval_arrays), t.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  predict_fn = score_fn = None
  if classnames is not None:
    predict_fn, score_fn = make_zero_shot(model, tok, classnames, t.batch_size, eval_arrays)
  task = common.Task(
      model=model, model_config=c, loss_fn=make_loss_fn(model), train_data=train_data,
      eval_data=eval_data, example_batch=train_data.batch_at(0),
      init_args=lambda b: (pixels(b["images"]), b["tokens"], b["mask"]),
      flops_per_example=clip.flops_per_example(c, length), tokens_per_example=length,
      predict_fn=predict_fn, score_fn=score_fn)
  _, last = common.fit(config, workdir, task, source=common.sources.Source())
  common.report(workdir, last)
  summary = {k: round(float(v), 4) for k, v in last.items()
             if k in ("eval/i2t_accuracy", "eval/t2i_accuracy", "eval/zero_shot_accuracy")}
  if summary and jax.process_index() == 0:
    print("  " + ", ".join(f"{k}={v}" for k, v in summary.items()))
  return last


def load_clip(workdir: str):
  """A trained CLIP workdir, ready to score images: its best params (DIR/best, kept with
  train.best_metric) or else its latest checkpoint, on one device.

  Args:
    workdir: a workdir of this program.

  Returns:
    (model, params, tokenizer, image_size, channels): score with
    fmjax.models.clip.score(model, params, images, *clip.tokenize(tokenizer, texts,
    model.config.text.max_length)), images (B, image_size, image_size, channels) in [-1, 1].

  Raises:
    FileNotFoundError: no checkpoint or no tokenizer in workdir.
    ValueError: the workdir holds another kind of model.
  """
  source = sources.parse(workdir)
  if not isinstance(source, sources.Workdir):
    raise ValueError(f"{workdir!r} is not a workdir of train.clip")
  config = source.architecture(clip.CLIPConfig)
  model = clip.CLIP(config, source.runtime())
  c = config.image
  images = jnp.zeros((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
  tokens = jnp.zeros((1, config.text.max_length), jnp.int32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images, tokens, tokens > 0)
  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  shardings = sharding.shardings_of(abstract, mesh, sharding.get_rules("dp"))["params"]
  params = source.load(nn.meta.unbox(abstract)["params"], shardings)
  params = trainer.best_params(workdir, params)
  return model, params, source.tokenizer(), c.image_size, c.num_channels


if __name__ == "__main__":
  common.main(run, sys.argv)
