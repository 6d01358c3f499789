"""Text to image: a VQ-VAE image tokenizer, then a caption-to-image-codes Transformer with
classifier-free guidance (dalle-mini's recipe; configs/text_to_image.py has the variants).

  python -m train.text_to_image --config=configs/text_to_image.py:digits --workdir=DIR

Data (config.data.train_path): an MNIST folder (t10k IDX files; captions in many phrasings
from the labels, fmjax.data.captions.digits), a folder of images each with a <stem>.txt
caption (read_text_folder), or "" for generated shapes scenes. The last data.num_eval
images are held out (shapes: num_eval more scenes from another seed).

Phase 1 trains the image tokenizer (fmjax.models.vqvae, config.vq with config.vq_train's
train keys) in DIR/tokenizer_vq, its own resumable run, skipped once finished; or
config.tokenizer_from names a finished one (a text_to_image workdir or its tokenizer_vq).
Phase 2 encodes every image to codes once (DIR/codes_train.npy, DIR/codes_eval.npy), learns
a SentencePiece vocabulary on the training captions (DIR/tokenizer) and trains the generator
in DIR (fmjax.models.text_to_image): cross-entropy of the codes given the caption, a share
train.caption_dropout of the captions replaced by the null (empty) caption. Each evaluation
reports eval/loss and eval/accuracy on the held-out codes and draws config.sample.prompts
(guided by sample.guidance) into DIR/samples/step_XXXXXX.png and TensorBoard. Rerunning
resumes; `python -m train.sample_images --workdir=DIR ...` samples from the result.
"""

import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fmjax import guidance, heads, sharding, trainer
from fmjax import workdir as fworkdir
from fmjax import data as fdata
from fmjax.data import captions as fcaptions
from fmjax.data.text import DataError
from fmjax.models import seq2seq, vqvae
from fmjax.models import text_to_image as t2i
from train import common


# Data ---------------------------------------------------------------------------------------

def _mnist_files(path: str):
  try:
    return fcaptions.mnist_files(path)
  except DataError:
    return None


def load_data(config):
  """(train images, train captions, eval images, eval captions); images (n, S, S, C) uint8
  at config.vq's image_size and channels, captions lower-cased with data.lowercase."""
  d, v = config.data, config.vq
  if not d.train_path:
    train = fcaptions.shapes(d.num_train, image_size=v.image_size, seed=config.seed)
    held = fcaptions.shapes(d.num_eval, image_size=v.image_size, seed=config.seed + 10**6)
    images, texts, n_train = (np.concatenate([train[0], held[0]]), train[1] + held[1],
                              d.num_train)
  else:
    mnist = _mnist_files(d.train_path)
    if mnist:
      images, labels, texts = fcaptions.digits(*mnist, image_size=v.image_size,
                                               seed=config.seed)
      n_train = len(images) - d.num_eval
      if n_train >= 1 and (d.captions_per_image > 1 or d.filler_words > 0):
        images, texts = _more_captions(images, labels, texts, n_train, config)
    else:
      images, texts = fcaptions.read_text_folder(d.train_path, image_size=v.image_size,
                                                 channels=1 if v.channels == 1 else 3)
    n_train = len(images) - d.num_eval
    if n_train < 1:
      raise ValueError(f"--config.data.num_eval={d.num_eval}: {d.train_path} holds "
                       f"{len(images)} images; hold out fewer than that")
  if images.shape[-1] != v.channels:  # grey digits for an RGB tokenizer, or the other way
    images = (np.repeat(images, v.channels, -1) if images.shape[-1] == 1 else
              images.mean(-1, keepdims=True).round().astype(np.uint8))
  texts = [t.lower() for t in texts] if d.lowercase else list(texts)
  return images[:n_train], texts[:n_train], images[n_train:], texts[n_train:]


def _more_captions(images, labels, texts, n_train: int, config):
  """MNIST's training images each data.captions_per_image times, each copy with its own
  caption, and a share data.filler_words of the captions with 1-3 FILLER_WORDS inserted;
  the held-out images (after the first n_train) keep their one plain caption."""
  d = config.data
  captions = []
  for k in range(d.captions_per_image):
    for i in range(n_train):
      rng = np.random.default_rng([config.seed, 7, k, i])
      text = texts[i] if k == 0 else fcaptions.digit_caption(int(labels[i]), rng)
      captions.append(fcaptions.with_filler(text, rng) if rng.random() < d.filler_words
                      else text)
  train = np.concatenate([images[:n_train]] * d.captions_per_image)
  return (np.concatenate([train, images[n_train:]]),
          captions + list(texts[n_train:]))


def tokenizer_settings(config) -> list[str]:
  """The keys a workdir's tokenizer, codes and checkpoints depend on (fixed on resume)."""
  del config
  return ["data.vocab_size", "data.lowercase", "data.max_length", "data.train_path",
          "data.captions_per_image", "data.filler_words",
          "tokenizer_from", "vq.image_size", "vq.channels", "vq.codebook_size"]




def encode_text(tok, texts, max_length: int):
  """(ids (n, L) int32, mask (n, L) bool): each caption's pieces (cut to L - 1) and EOS;
  "" encodes to the null caption (EOS alone, t2i.null_caption)."""
  ids = np.full((len(texts), max_length), tok.pad_id, np.int32)
  mask = np.zeros((len(texts), max_length), bool)
  for row, pieces in enumerate(tok.encode_batch(list(texts))):
    pieces = list(pieces)[:max_length - 1] + [tok.eos_id]
    ids[row, :len(pieces)], mask[row, :len(pieces)] = pieces, True
  return ids, mask


# Phase 1: the image tokenizer ---------------------------------------------------------------

def vq_workdir(config, workdir: str) -> str:
  """Where the run's image tokenizer is: config.tokenizer_from (or its tokenizer_vq/), else
  DIR/tokenizer_vq."""
  source = config.get("tokenizer_from", "")
  if not source:
    return os.path.join(workdir, "tokenizer_vq")
  nested = os.path.join(source, "tokenizer_vq")
  return nested if os.path.isdir(nested) else source


def phase_config(config) -> ml_collections.ConfigDict:
  """The run config of phase 1: config.train with config.vq_train's keys, no init_from."""
  sub = ml_collections.ConfigDict(config.to_dict())
  sub.train.update(dict(config.vq_train))
  sub.init_from = ""
  return sub


def _steps_done(directory: str) -> int:
  try:
    return common.sources.Workdir(directory).step
  except FileNotFoundError:
    return 0


def _vq_flops(c) -> float:
  """Rough training FLOPs of one image: 3 x 2 x (3 x 3 convolutions) of both halves."""
  side, flops = c.image_size, 0.0
  for w in c.widths:
    side //= 2
    flops += side * side * 9 * w * w * (1 + 2 * c.res_blocks)
  return 6.0 * 2 * flops


def train_vq(config, directory: str, train_images, eval_images, workdir: str):
  """Phase 1: trains the VQ-VAE in `directory` (resumable; returns at once when done).

  From its first step the run's `workdir` is kept whatever happens next: a run stopped (or
  failing) in phase 1 would otherwise remove the new workdir, tokenizer_vq/ with it."""
  c = common.as_flags(vqvae.VQConfig, "config.vq", **config.vq)
  sub = phase_config(config)
  if _steps_done(directory) >= sub.train.steps:
    return
  model = vqvae.VQVAE(c, common.runtime(config))
  t = sub.train
  train_data = fdata.ExampleBatchIterator(
      fdata.ArraySource({"images": train_images}), batch_size=t.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_data = lambda: fdata.example_batches(
      fdata.ArraySource({"images": eval_images}), t.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count())
  task = common.Task(
      model=model, model_config=c, loss_fn=vqvae.make_loss_fn(model), train_data=train_data,
      eval_data=eval_data, example_batch=train_data.batch_at(0),
      init_args=lambda b: (np.zeros(b["images"].shape, np.float32),),
      flops_per_example=_vq_flops(c), tokens_per_example=c.num_tokens,
      trainable=vqvae.trainable, post_update=vqvae.make_post_update(model))
  os.makedirs(directory, exist_ok=True)
  lock = fworkdir.held(workdir)
  if lock is not None:
    lock.keep()
  common.fit(sub, directory, task, source=common.sources.Source())


def restore(model, source, *example_args):
  """The params of `source` (a fmjax.sources.Source) for `model`, on one device."""
  abstract = jax.eval_shape(model.init, jax.random.key(0), *example_args)
  mesh = sharding.make_mesh({}, devices=jax.devices()[:1])
  shardings = sharding.shardings_of(abstract, mesh, sharding.get_rules("dp"))["params"]
  return source.load(nn.meta.unbox(abstract)["params"], shardings)


def load_vq(directory: str):
  """(VQVAE, params) of a tokenizer_vq workdir's latest checkpoint, on one device."""
  source = common.sources.parse(directory)
  c = source.architecture(vqvae.VQConfig)
  model = vqvae.VQVAE(c)
  return model, restore(model, source, jnp.zeros((1, c.image_size, c.image_size, c.channels)))


def encode_images(model, params, images, batch_size: int = 256) -> np.ndarray:
  """(n, N) int32 codes of uint8 images (n, S, S, C)."""
  encode = jax.jit(lambda p, x: model.apply({"params": p}, x.astype(jnp.float32) / 127.5 - 1,
                                            method="encode"))
  out = [np.asarray(encode(params, images[i:i + batch_size]))
         for i in range(0, len(images), batch_size)]
  return np.concatenate(out).astype(np.int32)


def cached_codes(workdir: str, name: str, model, params, images) -> np.ndarray:
  """The images' codes, from DIR/codes_<name>.npy when it holds them, else encoded and saved."""
  path = os.path.join(workdir, f"codes_{name}.npy")
  if os.path.exists(path):
    codes = np.load(path)
    if codes.shape == (len(images), model.config.num_tokens):
      return codes
  codes = encode_images(model, params, images)
  if jax.process_index() == 0:
    np.save(path + ".tmp.npy", codes)
    os.replace(path + ".tmp.npy", path)
  return codes


def to_pixels(images) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(images) + 1) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images, cols: int, *, min_side: int = 64, gap: int = 2) -> np.ndarray:
  """(n, S, S, C) uint8 -> one (H, W, C) picture, `cols` per row, each scaled up by an integer
  factor to at least min_side pixels, separated by `gap` grey pixels."""
  n, s = images.shape[:2]
  zoom = max(1, -(-min_side // s))
  images = images.repeat(zoom, 1).repeat(zoom, 2)
  side = s * zoom + gap
  rows = -(-n // cols)
  sheet = np.full((rows * side + gap, cols * side + gap, images.shape[-1]), 128, np.uint8)
  for i, image in enumerate(images):
    r, c = divmod(i, cols)
    sheet[gap + r * side:(r + 1) * side, gap + c * side:(c + 1) * side] = image
  return sheet


# Phase 2: the generator ---------------------------------------------------------------------

def make_loss_fn(model, caption_dropout: float, null_id: int):
  """Cross-entropy of the codes given the caption; in training a share of the captions is
  the null caption (caption dropout)."""
  def loss_fn(params, batch, rng, train):
    text, mask, codes = batch["text"], batch["text_mask"], batch["codes"]
    drop_rng, rng = jax.random.split(rng)
    if train:
      text, mask = t2i.drop_captions(text, mask, drop_rng, caption_dropout, null_id)
    logits = model.apply({"params": params}, text, mask,
                         t2i.image_inputs(codes, model.config.bos_id), train=train,
                         rngs={"dropout": rng})
    return heads.sequence_loss(logits, codes, jnp.ones(codes.shape, jnp.float32))
  return loss_fn


def make_predict_fn(model, s, null_id: int, seed: int):
  """Sampled codes of batch {"text", "text_mask", "seed" (B,)}, seeded by seed and seed[0]."""
  def predict_fn(params, batch):
    rng = jax.random.fold_in(jax.random.key(seed), batch["seed"][0])
    return {"codes": guidance.sample_image_tokens(
        model, params, batch["text"], batch["text_mask"], rng, null_id=null_id,
        guidance=float(s.guidance), temperature=float(s.temperature), top_k=int(s.top_k))}
  return predict_fn


def make_images_fn(tok, config, vq_model, vq_params):
  """At each evaluation: sample.per_prompt images of each of sample.prompts, one row each."""
  s = config.sample
  prompts = [p.lower() if config.data.lowercase else p for p in s.prompts]
  text, mask = encode_text(tok, [p for p in prompts for _ in range(s.per_prompt)],
                           config.data.max_length)
  rows = -(-len(text) // jax.device_count()) * jax.device_count()  # a whole global batch
  batch = {"text": np.resize(text, (rows, text.shape[1])),
           "text_mask": np.resize(mask, (rows, mask.shape[1])),
           "seed": np.zeros(rows, np.int32)}
  decode = jax.jit(lambda p, codes: vq_model.apply({"params": p}, codes, method="decode"))

  def images_fn(predict):
    codes = predict(batch)["codes"][:len(text)]
    return {"samples": image_grid(to_pixels(decode(vq_params, codes)), s.per_prompt)}
  return images_fn


def generator_config(config, tok, vq: vqvae.VQConfig) -> t2i.TextToImageConfig:
  """config.model with the tokenizer's vocabulary (-1) and the image tokenizer's codes."""
  fields = {**dict(config.model), "codebook_size": vq.codebook_size, "grid_size": vq.grid_size}
  return common.model_config(t2i.TextToImageConfig, fields, tok)


@common.holds_workdir
def run(config, workdir: str):
  common.prepare_workdir(config, workdir)
  common.refuse_changed_settings(config, workdir, tokenizer_settings)
  if config.init_from:
    raise ValueError(f"--config.init_from={config.init_from!r}: text_to_image trains its "
                     "generator from fresh weights; a finished image tokenizer is "
                     "--config.tokenizer_from")
  d, t = config.data, config.train
  train_images, train_texts, eval_images, eval_texts = load_data(config)
  trainer.log.info("%d train and %d eval images (%s), %d x %d x %d",
                          len(train_images), len(eval_images), d.train_path or "shapes",
                          *train_images.shape[1:])
  vq_dir = vq_workdir(config, workdir)
  if not config.tokenizer_from:
    train_vq(config, vq_dir, train_images, eval_images, workdir)
  vq_model, vq_params = load_vq(vq_dir)
  if vq_model.config.image_size != config.vq.image_size or \
      vq_model.config.channels != config.vq.channels:
    raise ValueError(f"--config.tokenizer_from={config.tokenizer_from}: its images are "
                     f"{vq_model.config.image_size} x {vq_model.config.image_size} x "
                     f"{vq_model.config.channels}; set --config.vq.image_size and "
                     "--config.vq.channels to match")
  codes = {name: cached_codes(workdir, name, vq_model, vq_params, images)
           for name, images in (("train", train_images), ("eval", eval_images))}

  tok = common.caption_tokenizer(workdir, train_texts, d.vocab_size)
  c = generator_config(config, tok, vq_model.config)
  model = t2i.TextToImage(c, common.runtime(config))
  arrays = {}
  for name, texts in (("train", train_texts), ("eval", eval_texts)):
    text, mask = encode_text(tok, texts, d.max_length)
    arrays[name] = {"text": text, "text_mask": mask, "codes": codes[name]}
  train_data = fdata.ExampleBatchIterator(
      fdata.ArraySource(arrays["train"]), batch_size=t.batch_size, seed=config.seed,
      process_index=jax.process_index(), process_count=jax.process_count())
  eval_data = lambda: fdata.example_batches(
      fdata.ArraySource(arrays["eval"]), t.batch_size, process_index=jax.process_index(),
      process_count=jax.process_count())
  task = common.Task(
      model=model, model_config=c, loss_fn=make_loss_fn(model, t.caption_dropout, tok.eos_id),
      train_data=train_data, eval_data=eval_data, example_batch=train_data.batch_at(0),
      init_args=lambda b: (b["text"], b["text_mask"], b["codes"]),
      flops_per_example=seq2seq.flops_per_example(c.seq2seq, d.max_length, c.num_tokens),
      tokens_per_example=c.num_tokens,
      predict_fn=make_predict_fn(model, config.sample, tok.eos_id, config.seed),
      images_fn=make_images_fn(tok, config, vq_model, vq_params))
  _, last = common.fit(config, workdir, task, source=common.sources.Source())
  common.report(workdir, last)
  print(f"  samples:     {os.path.join(workdir, 'samples')}\n"
        f"  image tokenizer: {vq_dir}")
  return last


if __name__ == "__main__":
  common.main(run, sys.argv)
