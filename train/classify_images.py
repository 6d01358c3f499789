"""Image classification with a Vision Transformer (fmjax.models.vit).

  python -m train.classify_images --config=configs/vit.py:mnist --workdir=DIR [--config.a.b=v]

Data (config.data), exactly one of:
  train_images + train_labels  IDX files (MNIST's format, gzip or plain); evaluation reads
                               eval_images + eval_labels, or else the same files;
  train_dir + eval_dir         folders with one sub-folder of images per class;
  tfds_name                    a tfds catalog dataset (mnist, cifar10, imagenet2012 with
                               manual_dir) through tfds.data_source;
each cut to the index ranges [train_start, train_stop) and [eval_start, eval_stop) (stop 0:
to the end). Images are fitted to config.model.image_size and fed as pixels in [-1, 1].

Training augments each example (random crop of the zero-padded image, left-right flip; seeded
by (seed, example index, epoch), so resuming is exact), smooths the labels and optionally
mixes each image with its batch neighbour (mixup). Every eval_every steps and at the end,
eval/accuracy (top-1) and eval/loss are computed over every eval example; the best
evaluation's params are kept in DIR/best and scored into DIR/eval_results.json. Rerunning
resumes.

config.init_from (a workdir of this program, or hf:DIRECTORY of a Hugging Face ViT) starts
from a pretrained ViT: its architecture with this run's image size and classes. At another
image size the position embeddings are resized (vit.resize_posemb), and a head for another
number of classes is replaced by a fresh zero one (the paper's fine-tuning, section 3.2):
an fmjax.sources.Adapted source, read when the run starts.

LoRA (config.lora.rank > 0, fmjax.lora): adapters on the encoder's attention and MLP
projections train with the head, the encoder's own weights frozen; the memory plan counts
optimizer state and gradients for those only.
"""

import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fmjax import errors, lora, memory, trainer
from fmjax import data as fdata
from fmjax.data import images
from fmjax.models import vit
from train import common

# Architecture fields a run sets on a pretrained ViT (init_from): the rest is the source's.
RUN_FIELDS = ("image_size", "num_classes")


# Data -------------------------------------------------------------------------------------------

def load_data(config, image_size: int, channels: int):
  """(train source, eval source, class names or None), sources of {"image", "label"}."""
  d = config.data
  given = [k for k in ("train_images", "train_dir", "tfds_name") if d[k]]
  if len(given) != 1:
    raise ValueError(f"config.data sets {given or 'none'} of train_images (IDX files), "
                     "train_dir (image folders) and tfds_name (tfds catalog): set exactly one")
  classes = None
  if d.train_images:
    if not d.train_labels:
      raise ValueError("config.data.train_images is set but train_labels is not: give the "
                       "IDX labels file that goes with the images")
    train = images.read_idx_dataset(d.train_images, d.train_labels, start=d.train_start,
                                    stop=d.train_stop)
    eval_ = images.read_idx_dataset(d.eval_images or d.train_images,
                                    d.eval_labels or d.train_labels, start=d.eval_start,
                                    stop=d.eval_stop)
    if not d.eval_images and _overlap(d, len(train.arrays["label"])):
      trainer.log.warning("the train and eval index ranges of %s overlap", d.train_images)
    train, eval_ = (fit_arrays(s.arrays, image_size, channels) for s in (train, eval_))
  elif d.train_dir:
    if not d.eval_dir:
      raise ValueError("config.data.train_dir is set but eval_dir is not: give a folder of "
                       "held-out images with the same class sub-folders")
    train = images.ImageFolder(d.train_dir, image_size=image_size, channels=channels)
    eval_ = images.ImageFolder(d.eval_dir, image_size=image_size, channels=channels,
                               classes=train.classes)
    classes = train.classes
    train = images.Subset(train, d.train_start, d.train_stop, name=d.train_dir)
    eval_ = images.Subset(eval_, d.eval_start, d.eval_stop, name=d.eval_dir)
  else:
    kw = dict(image_size=image_size, channels=channels, data_dir=d.data_dir,
              manual_dir=d.manual_dir)
    train = images.Subset(images.TfdsImages(d.tfds_name, d.train_split, **kw), d.train_start,
                          d.train_stop, name=f"tfds:{d.tfds_name}/{d.train_split}")
    eval_ = images.Subset(images.TfdsImages(d.tfds_name, d.eval_split, **kw), d.eval_start,
                          d.eval_stop, name=f"tfds:{d.tfds_name}/{d.eval_split}")
  if d.in_memory:  # decode once: every read error surfaces now, and epochs cost no decoding
    train, eval_ = (fdata.ArraySource(images.load_arrays(s)) for s in (train, eval_))
  return train, eval_, classes


def _overlap(d, n: int) -> bool:
  stop = lambda s: n if s == 0 else s
  return max(d.train_start, d.eval_start) < min(stop(d.train_stop), stop(d.eval_stop))


def fit_arrays(arrays, image_size: int, channels: int) -> fdata.ArraySource:
  """In-memory images fitted to (image_size, image_size, channels) (grey repeated to RGB)."""
  x = arrays["image"]
  if x.shape[3] != channels:
    if x.shape[3] != 1:
      raise ValueError(f"the images have {x.shape[3]} channels but config.model.num_channels="
                       f"{channels}; only grey images convert (to RGB)")
    x = np.repeat(x, channels, axis=3)
  if x.shape[1:3] != (image_size, image_size):
    x = np.stack([images.resize_image(im, image_size) for im in x])
  return fdata.ArraySource({**arrays, "image": x})


def make_augment(config):
  """The training transform: (example, index, epoch) -> example, seeded by all three."""
  d = config.data
  if not d.crop_padding and not d.flip:
    return None

  def augment(example, index, epoch):
    rng = np.random.default_rng([config.seed, index, epoch])
    return {**example, "image": images.random_crop_flip(example["image"], rng,
                                                       padding=d.crop_padding, flip=d.flip)}
  return augment


def gather(source, index) -> dict[str, np.ndarray]:
  if isinstance(source, fdata.ArraySource):
    return {k: v[index] for k, v in source.arrays.items()}
  examples = [source[int(i)] for i in index]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def label_source(d, split: str) -> str:
  """What holds the split's labels, for messages: the IDX file, the folder or the tfds split."""
  if d.train_images:
    return d.eval_labels or d.train_labels if split == "eval" else d.train_labels
  if d.train_dir:
    return d[f"{split}_dir"]
  return f"tfds:{d.tfds_name}/{d[f'{split}_split']}"


def labels_of(source) -> np.ndarray:
  """Every example's label, without decoding images where the source allows."""
  if isinstance(source, fdata.ArraySource):
    return source.arrays["label"]
  if isinstance(source, images.Subset):
    return labels_of(source.source)[source.range]
  if isinstance(source, images.ImageFolder):
    return source.labels
  return np.asarray([source[i]["label"] for i in range(len(source))])


# Model ------------------------------------------------------------------------------------------

def model_config(config, num_classes: int, source: vit.ViTConfig | None) -> vit.ViTConfig:
  """config.model (num_classes -1: the data's `num_classes`), or with init_from the source's
  architecture with this run's RUN_FIELDS."""
  fields = dict(config.model)
  unknown = set(fields) - {f.name for f in dataclasses.fields(vit.ViTConfig)}
  if unknown:
    raise ValueError(f"config.model has keys {sorted(unknown)} that ViTConfig does not know")
  if fields["num_classes"] == -1:
    fields["num_classes"] = num_classes
  if source is not None:
    fields = {**dataclasses.asdict(source), **{k: fields[k] for k in RUN_FIELDS}}
  return common.as_flags(vit.ViTConfig, "config.model", **fields)


def adapt(source, c: vit.ViTConfig):
  """The source, or when its position grid or number of classes differ from `c`'s, an
  fmjax.sources.Adapted one: positions resized over the grid, a mismatched head dropped
  (the run starts a fresh one)."""
  if not source:
    return source
  shapes = source.shapes()
  posemb = shapes.get("encoder/posemb")
  head = shapes.get("head/kernel")
  resize = posemb is not None and tuple(posemb) != (c.num_tokens, c.embed_dim)
  drop_head = head is not None and tuple(head) != (c.embed_dim, c.num_classes)
  if not (resize or drop_head):
    return source

  def fit_to_model(params):
    if resize:
      params["encoder/posemb"] = vit.resize_posemb(params["encoder/posemb"], c.grid,
                                                   num_prefix=int(c.pool == "cls"))
    return {p: x for p, x in params.items() if not (drop_head and p.startswith("head/"))}
  note = ", ".join(
      ([f"positions resized {tuple(posemb)} -> {(c.num_tokens, c.embed_dim)}"] if resize else [])
      + ([f"head {tuple(head)} replaced by a fresh one for {c.num_classes} classes"]
         if drop_head else []))
  return common.sources.Adapted(source, fit_to_model, note)


# Loss, predictions and metrics ------------------------------------------------------------------

def pixels(x):
  """uint8 images -> float32 in [-1, 1] (the reference code's and HF ViT's input range)."""
  return x.astype(jnp.float32) / 127.5 - 1.0


def make_loss_fn(model, num_classes: int, label_smoothing: float, mixup_alpha: float):
  """Cross-entropy against smoothed (and, training with mixup_alpha > 0, mixed) targets."""
  def loss_fn(params, batch, rng, train):
    x = pixels(batch["image"])  # (B, S, S, C)
    targets = jax.nn.one_hot(batch["label"], num_classes)  # (B, K)
    if train:
      targets = optax.smooth_labels(targets, label_smoothing)
      if mixup_alpha > 0:  # Zhang et al. 2018; the partner is the batch neighbour
        rng, mix = jax.random.split(rng)
        lam = jax.random.beta(mix, mixup_alpha, mixup_alpha)
        x = lam * x + (1 - lam) * jnp.roll(x, 1, axis=0)
        targets = lam * targets + (1 - lam) * jnp.roll(targets, 1, axis=0)
    logits = model.apply({"params": params}, x, train=train, rngs={"dropout": rng})
    weights = batch.get("weight", jnp.ones(logits.shape[:1], jnp.float32))
    total = jnp.maximum(weights.sum(), 1e-8)
    loss = (optax.softmax_cross_entropy(logits, targets) * weights).sum() / total
    correct = (logits.argmax(-1) == batch["label"]).astype(jnp.float32)
    return loss, {"loss": loss, "accuracy": (correct * weights).sum() / total}
  return loss_fn


def make_predict_fn(model):
  def predict_fn(params, batch):
    return {"logits": model.apply({"params": params}, pixels(batch["image"]), train=False)}
  return predict_fn


def collect(predict, source, batch_size: int) -> np.ndarray:
  """Logits (N, K) for every example of `source`, in order (the last batch padded)."""
  n = len(source)
  index = {"index": np.arange(n), "weight": np.ones(n, np.float32)}
  outputs = []
  for b in fdata.padded_batches(index, batch_size, process_index=jax.process_index(),
                                process_count=jax.process_count()):
    outputs.append(predict({**gather(source, b["index"]), "weight": b["weight"]})["logits"])
  return np.concatenate(outputs)[:n]


def score(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """eval/accuracy (top-1) and eval/loss (plain cross-entropy) over every example."""
  z = logits - logits.max(-1, keepdims=True)
  log_probs = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return {"eval/accuracy": float(np.mean(logits.argmax(-1) == labels)),
          "eval/loss": float(-np.take_along_axis(log_probs, labels[:, None], 1).mean())}


# The program ------------------------------------------------------------------------------------

@common.holds_workdir
def run(config, workdir: str):
  common.prepare_workdir(config, workdir)
  d, t = config.data, config.train
  weights = common.sources.parse(config.init_from)
  source = weights.architecture(vit.ViTConfig)
  # The image size is always this run's; the channels are the pretrained model's.
  channels = (source or config.model).num_channels
  size = config.model.image_size
  train_source, eval_source, classes = load_data(config, size, channels)
  labels = labels_of(eval_source)
  # A label outside the classes (a byte of 200 among MNIST's 0..9) is named, not learned.
  parts = ([] if d.tfds_name and not d.in_memory else
           [(label_source(d, "train"), labels_of(train_source), d.train_start)]) + [
               (label_source(d, "eval"), labels, d.eval_start)]
  given = (config.model.num_classes if config.model.num_classes != -1 else
           len(classes) if classes else None)  # folders: one class each, present or not
  num_classes = images.check_labels(parts, given)
  c = model_config(config, num_classes, source)
  weights = adapt(weights, c)
  example = (np.zeros((1, size, size, channels), np.float32),)
  # config.lora.rank > 0: adapters on the frozen encoder; the head trains in full.
  _, adapted, spec = common.adapters(config, vit.ViT(c, common.runtime(config)), example,
                                     keep=("head",))
  build = lambda rt: vit.ViT(c, rt) if spec is None else lora.LoraModel(vit.ViT(c, rt), spec)
  runtime, accum_steps, memory_note = common.plan_memory(
      config, build, example,
      memory.Shape(num_layers=c.num_layers, embed_dim=c.embed_dim, mlp_dim=c.mlp_dim,
                   num_heads=c.num_heads, vocab_size=c.num_classes, seq_len=c.num_tokens,
                   batch_size=t.batch_size, logit_positions=1),
      common.runtime(config), length_flag=None, trainable=adapted.get("trainable"))
  model = build(runtime)
  n_train = len(train_source)
  trainer.log.info("%d train and %d eval images of %s, %d classes%s", n_train, len(eval_source),
                   (size, size, channels), c.num_classes,
                   f" ({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
                   if classes else "")
  schedule = common.resolve_schedule(t, n_train, accum_steps=accum_steps)  # steps, or epochs

  train_data = fdata.ExampleBatchIterator(
      train_source, batch_size=t.batch_size, seed=config.seed, transform=make_augment(config),
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_batch = d.eval_batch_size or t.batch_size
  task = common.Task(
      model=model, model_config=c,
      loss_fn=make_loss_fn(model, c.num_classes, t.label_smoothing, t.mixup_alpha),
      train_data=train_data, eval_data=None, example_batch=train_data.batch_at(0),
      init_args=lambda b: (np.zeros(b["image"].shape, np.float32),),
      flops_per_example=vit.flops_per_token(c) * c.num_tokens, tokens_per_example=c.num_tokens,
      predict_fn=make_predict_fn(model),
      score_fn=lambda predict: score(collect(predict, eval_source, eval_batch), labels),
      new_params=("head",) + adapted.pop("new_params", ()), notes=(memory_note,), **adapted)
  state, last = common.fit(config, workdir, task, schedule=schedule, source=weights)

  # The final score from the best evaluation's params (the last ones without best_metric).
  params = trainer.best_params(workdir, state.params)
  final = score(collect(trainer.make_predict(task.predict_fn, params), eval_source, eval_batch),
                labels)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "eval_results.json")
    with errors.writing(path, "evaluation results"), open(path, "w") as f:
      json.dump({"best_metric": t.best_metric, **final}, f, indent=1)
  common.report(workdir, {**last, **final})
  return final


if __name__ == "__main__":
  common.main(run, sys.argv)
