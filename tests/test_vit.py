"""ViT (fmjax/models/vit.py), its data (fmjax/data/images.py), its program
(train/classify_images.py, configs/vit.py) and its Hugging Face interop, pinned by numbers:
patch embedding = reshape + matmul = a stride-P convolution, position-embedding resizing =
scipy.ndimage.zoom(order=1), parameter counts = formula = published counts, CLS vs GAP by
hand, 8 simulated devices = 1, transformers' outputs to 1e-5, exact export round trips.
"""

import gzip
import json
import os
import pathlib
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from fmjax import hf
from fmjax.data import DataError, images
from fmjax.data.batches import ExampleBatchIterator
from fmjax.models import vit
from fmjax.runtime import Runtime

REPO = pathlib.Path(__file__).resolve().parents[1]
VIT_DIR = REPO / "tests" / "golden" / "hf" / "vit"
MNIST = REPO.parent / "shared" / "data" / "mnist"  # where configs/vit.py looks
ATOL = 1e-5  # float32 vs transformers' float32 PyTorch outputs


def init(model, x, seed=0):
  return nn.meta.unbox(model.init(jax.random.key(seed), x)["params"])


def apply(model, params, x, **kwargs):
  """Eager: op-by-op primitives are compiled once and shared by every call here, which costs
  less CPU in this file than one jit per distinct call."""
  return model.apply({"params": params}, x, **kwargs)


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


# The model ------------------------------------------------------------------------------------

def test_patch_embedding_is_a_matmul_over_flattened_patches_and_a_strided_conv():
  c = vit.ViTConfig(image_size=12, patch_size=4, num_channels=3, num_classes=0, num_layers=1,
                    num_heads=1, embed_dim=5, mlp_dim=8)
  x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
  params = init(vit.ViTEncoder(c), x)
  params["patch_embed"]["bias"] = jnp.arange(5.0) / 10  # a bias that shows
  got = apply(vit.ViTEncoder(c), params, x, method=vit.ViTEncoder.embed_patches)
  kernel = np.asarray(params["patch_embed"]["kernel"])  # (P, P, C, D)
  assert kernel.shape == (4, 4, 3, 5)
  xn = np.asarray(x)
  want = np.stack([np.stack([xn[b, 4 * i:4 * i + 4, 4 * j:4 * j + 4, :].reshape(-1)
                             @ kernel.reshape(48, 5) + np.arange(5.0) / 10
                             for i in range(3) for j in range(3)]) for b in range(2)])
  assert got.shape == (2, 9, 5)  # row-major over the 3 x 3 grid
  np.testing.assert_allclose(got, want, atol=1e-5)
  conv = jax.lax.conv_general_dilated(x, kernel, (4, 4), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(got, conv.reshape(2, 9, 5) + np.arange(5.0) / 10, atol=1e-5)


def test_wrong_image_shape_is_refused_with_the_expected_one():
  c = vit.get_config("tiny")
  with pytest.raises(ValueError, match=r"images have shape \(1, 32, 32, 1\) but this ViT takes "
                                       r"\(B, 28, 28, 1\).*resize_posemb"):
    vit.ViT(c).init(jax.random.key(0), jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="image_size=30 is not a multiple of patch_size=7"):
    vit.get_config("tiny", image_size=30)
  with pytest.raises(ValueError, match=r"ViTConfig.pool='mean' is not one of \['cls', 'gap'\]"):
    vit.get_config("tiny", pool="mean")


def test_resize_posemb_keeps_cls_and_grid_values_and_matches_scipy_zoom():
  scipy_ndimage = pytest.importorskip("scipy.ndimage")
  rng = np.random.default_rng(0)
  posemb = rng.normal(size=(1 + 4 * 4, 6)).astype(np.float32)  # [CLS] + a 4 x 4 grid
  np.testing.assert_array_equal(vit.resize_posemb(posemb, 4), posemb)  # same grid: identity
  up = vit.resize_posemb(posemb, 7)  # g -> 2g - 1, corner-aligned
  assert up.shape == (1 + 49, 6) and up.dtype == np.float32
  np.testing.assert_array_equal(up[0], posemb[0])  # [CLS] kept
  grid, new = posemb[1:].reshape(4, 4, 6), up[1:].reshape(7, 7, 6)
  np.testing.assert_array_equal(new[::2, ::2], grid)  # every source value at the even positions
  np.testing.assert_allclose(new[1::2, ::2], (grid[:-1] + grid[1:]) / 2, atol=1e-6)  # midpoints
  for old, size in ((4, 7), (4, 10), (4, 3)):  # up, up by a non-integer factor, down
    zoom = scipy_ndimage.zoom(posemb[1:].reshape(old, old, 6).astype(np.float64),
                              (size / old, size / old, 1), order=1)
    np.testing.assert_allclose(vit.resize_posemb(posemb, size)[1:].reshape(size, size, 6), zoom,
                               atol=1e-6)
  gap = vit.resize_posemb(posemb[1:], (2, 5), num_prefix=0)  # no [CLS], non-square target
  assert gap.shape == (10, 6)
  np.testing.assert_array_equal(gap.reshape(2, 5, 6)[[0, 0, -1, -1], [0, -1, 0, -1]],
                                grid[[0, 0, -1, -1], [0, -1, 0, -1]])  # the corners stay
  with pytest.raises(ValueError, match="not a square grid; pass old_grid"):
    vit.resize_posemb(posemb[:-1], 5)


@pytest.mark.parametrize("name,pool,classes,published", [
    ("tiny", "cls", 10, None), ("tiny", "gap", 10, None), ("tiny", "cls", 0, None),
    # timm's vit_{tiny,small,base}_patch16_224 (ImageNet-1k heads): 5.7M, 22.1M, 86.6M
    ("ti16", "cls", 1000, 5_717_416), ("s16", "cls", 1000, 22_050_664),
    ("b16", "cls", 1000, 86_567_656)])
def test_num_params_closed_form(name, pool, classes, published):
  c = vit.get_config(name, pool=pool, num_classes=classes)
  x = jax.ShapeDtypeStruct((1, c.image_size, c.image_size, c.num_channels), jnp.float32)
  abstract = jax.eval_shape(vit.ViT(c).init, jax.random.key(0), x)["params"]
  assert count(nn.meta.unbox(abstract)) == vit.num_params(c)
  if published:
    assert vit.num_params(c) == published
  encoder = nn.meta.unbox(abstract)["encoder"]
  assert ("cls" in encoder) == (pool == "cls")
  assert encoder["posemb"].shape == (c.grid ** 2 + (pool == "cls"), c.embed_dim)
  assert vit.flops_per_token(c) > 6 * (vit.num_params(c) - c.num_tokens * c.embed_dim
                                       - c.embed_dim * classes) * 0.9


@pytest.mark.parametrize("pool", ["cls", "gap"])
def test_cls_takes_token_zero_and_gap_the_mean_of_the_patches(pool):
  c = vit.get_config("tiny", pool=pool, num_classes=3)
  x = jax.random.normal(jax.random.key(2), (2, 28, 28, 1))
  params = init(vit.ViT(c), x)
  head = jax.random.normal(jax.random.key(3), (c.embed_dim, 3))
  params["head"] = {"kernel": head, "bias": jnp.array([0.1, -0.2, 0.3])}
  tokens = apply(vit.ViTEncoder(c), params["encoder"], x)
  assert tokens.shape == (2, 16 + (pool == "cls"), c.embed_dim)
  pooled = tokens[:, 0] if pool == "cls" else tokens.mean(axis=1)
  np.testing.assert_allclose(apply(vit.ViT(c), params, x),
                             pooled @ head + params["head"]["bias"], atol=1e-5)
  features = vit.ViT(vit.get_config("tiny", pool=pool, num_classes=0))
  np.testing.assert_allclose(apply(features, {"encoder": params["encoder"]}, x), pooled,
                             atol=1e-6)
  if pool == "cls":  # the [CLS] output sees every patch: changing one patch moves it
    y = x.at[:, :7, :7].add(1.0)
    moved = apply(vit.ViTEncoder(c), params["encoder"], y)[:, 0]
    assert float(jnp.abs(moved - tokens[:, 0]).min()) > 1e-4


def test_head_starts_at_zero_so_first_logits_are_zero():
  c = vit.get_config("tiny")
  x = jnp.ones((2, 28, 28, 1))
  params = init(vit.ViT(c), x)
  assert not np.any(params["head"]["kernel"]) and not np.any(params["head"]["bias"])
  np.testing.assert_array_equal(apply(vit.ViT(c), params, x), np.zeros((2, 10)))


# Hugging Face interop -------------------------------------------------------------------------

def vit_reference():
  return dict(np.load(VIT_DIR / "reference.npz"))


def test_hf_vit_for_image_classification_matches_transformers():
  ref = vit_reference()
  model, variables = hf.from_pretrained(VIT_DIR)
  assert isinstance(model, vit.ViT)
  c = model.config
  assert (c.image_size, c.patch_size, c.num_channels, c.num_classes, c.embed_dim, c.num_layers,
          c.num_heads, c.mlp_dim, c.pool, c.norm_eps) == (16, 4, 3, 5, 32, 2, 2, 64, "cls", 1e-12)
  logits = apply(model, variables["params"], ref["images"])
  assert np.abs(np.asarray(logits) - ref["logits"]).max() <= ATOL
  hidden = apply(vit.ViTEncoder(c), variables["params"]["encoder"], ref["images"])
  assert np.abs(np.asarray(hidden) - ref["last_hidden_state"]).max() <= ATOL
  assert np.abs(ref["logits"]).max() > 0.1  # the golden is not trivially near zero


def test_hf_vit_model_directory_loads_as_encoder_and_ignores_its_pooler(tmp_path):
  """A ViTModel checkpoint (no "vit." prefix, a pooler) -> ViTEncoder with the same outputs."""
  ref = vit_reference()
  tensors = safetensors.numpy.load_file(VIT_DIR / "model.safetensors")
  base = {k[len("vit."):]: v for k, v in tensors.items() if k.startswith("vit.")}
  base["pooler.dense.weight"] = np.ones((32, 32), np.float32)
  base["pooler.dense.bias"] = np.ones((32,), np.float32)
  config = json.loads((VIT_DIR / "config.json").read_text())
  config["architectures"] = ["ViTModel"]
  tmp_path.joinpath("config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(base, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # the pooler is expected, not "ignored tensors"
    model, variables = hf.from_pretrained(tmp_path)
  assert isinstance(model, vit.ViTEncoder)
  assert np.abs(np.asarray(apply(model, variables["params"], ref["images"]))
                - ref["last_hidden_state"]).max() <= ATOL
  _, params = hf.read_weights(tmp_path, runtime=Runtime(scan_layers=True))  # stacked for nn.scan
  assert params["encoder"]["blocks"]["layers"]["attn"]["query"]["kernel"].shape == (2, 32, 2, 16)


def test_hf_vit_export_round_trip_is_exact(tmp_path):
  model, variables = hf.from_pretrained(VIT_DIR)
  hf.save_pretrained(model, variables, tmp_path)
  golden = safetensors.numpy.load_file(VIT_DIR / "model.safetensors")
  exported = safetensors.numpy.load_file(tmp_path / "model.safetensors")
  assert exported.keys() == golden.keys()
  for name in golden:  # the very tensors transformers wrote, names and layouts included
    assert exported[name].dtype == golden[name].dtype, name
    np.testing.assert_array_equal(exported[name], golden[name], err_msg=name)
  written = json.loads((tmp_path / "config.json").read_text())
  assert written["architectures"] == ["ViTForImageClassification"]
  assert (written["model_type"], written["image_size"], written["patch_size"],
          len(written["id2label"])) == ("vit", 16, 4, 5)
  config, params = hf.read_weights(tmp_path)
  assert config == model.config
  flat = lambda t: {jax.tree_util.keystr(p): np.asarray(x)
                    for p, x in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(params), flat(variables["params"])
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  encoder = vit.ViTEncoder(model.config)  # the encoder alone exports as a ViTModel
  hf.save_pretrained(encoder, {"params": variables["params"]["encoder"]}, tmp_path / "base")
  names = set(safetensors.numpy.load_file(tmp_path / "base" / "model.safetensors"))
  assert names == {k[len("vit."):] for k in golden if k.startswith("vit.")}
  gap = vit.ViT(vit.get_config("tiny", pool="gap"))
  with pytest.raises(ValueError, match="pool='gap' has no equivalent in transformers"):
    hf.save_pretrained(gap, init(gap, jnp.zeros((1, 28, 28, 1))), tmp_path / "gap")


def test_hf_vit_shape_mismatch_names_tensor_and_config(tmp_path):
  tensors = safetensors.numpy.load_file(VIT_DIR / "model.safetensors")
  config = json.loads((VIT_DIR / "config.json").read_text())
  config["image_size"] = 20  # 5 x 5 patches: 26 positions, but the weights hold 17
  tmp_path.joinpath("config.json").write_text(json.dumps(config))
  safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"tensor 'vit.embeddings.position_embeddings' has shape "
                                       r"\(1, 17, 32\), but config.json \(image_size=20, "
                                       r"patch_size=4.*needs \(1, 26, 32\)"):
    hf.read_weights(tmp_path)


# Data -----------------------------------------------------------------------------------------

def write_idx(path, array, compress=True):
  codes = {np.dtype("u1"): 0x08, np.dtype(">i4"): 0x0C}
  array = np.asarray(array)
  array = array.astype(">i4") if array.dtype.kind == "i" else array.astype("u1")
  raw = bytes([0, 0, codes[array.dtype], array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  raw += array.tobytes()
  pathlib.Path(path).write_bytes(gzip.compress(raw) if compress else raw)
  return str(path)


def test_idx_reader_gzip_and_plain_ranges_and_errors(tmp_path):
  x = np.arange(5 * 3 * 2, dtype=np.uint8).reshape(5, 3, 2)
  y = np.array([3, 1, 4, 1, 5])
  gz, plain = write_idx(tmp_path / "x.gz", x), write_idx(tmp_path / "x", x, compress=False)
  np.testing.assert_array_equal(images.read_idx(gz), x)
  np.testing.assert_array_equal(images.read_idx(plain), x)
  labels = write_idx(tmp_path / "y", y.astype(np.int32), compress=False)
  source = images.read_idx_dataset(gz, labels, start=1, stop=4)
  assert len(source) == 3 and source[0]["image"].shape == (3, 2, 1)
  np.testing.assert_array_equal(source.arrays["label"], [1, 4, 1])
  np.testing.assert_array_equal(source[2]["image"][..., 0], x[3])

  bad = tmp_path / "bad"
  bad.write_bytes(b"\x08\x03\x00\x00" + bytes(20))
  with pytest.raises(DataError, match=f"^{bad}: magic number 08030000 is not an IDX header"):
    images.read_idx(str(bad))
  short = tmp_path / "short.gz"
  short.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes()
                                  + bytes(7)))
  with pytest.raises(DataError, match=rf"^{short}: the header promises dimensions \(10,\) "
                                      r"\(10 bytes of uint8\) but the file holds 7 bytes"):
    images.read_idx(str(short))
  few = write_idx(tmp_path / "few", y[:4].astype(np.int32))
  with pytest.raises(DataError, match=f"^{gz} holds 5 images but {few} holds 4 labels"):
    images.read_idx_dataset(gz, few)
  with pytest.raises(DataError, match=rf"{gz}: index range \[2, 9\) is not within its 5 "):
    images.read_idx_dataset(gz, labels, start=2, stop=9)
  with pytest.raises(DataError, match=f"^{labels}: IDX array of shape \\(5,\\).*images must be"):
    images.read_idx_dataset(labels, labels)


def png(path, array):
  from PIL import Image
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(path)


def test_image_folder_reads_classes_in_order_and_names_bad_files(tmp_path):
  rng = np.random.default_rng(0)
  red = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
  png(tmp_path / "ok" / "cat" / "a.png", red)
  png(tmp_path / "ok" / "dog" / "b.png", red[:, :20].mean(-1).astype(np.uint8))  # grey, square
  folder = images.ImageFolder(str(tmp_path / "ok"), image_size=10, channels=3)
  assert folder.classes == ["cat", "dog"] and len(folder) == 2
  first, second = folder[0], folder[1]
  assert first["image"].shape == second["image"].shape == (10, 10, 3)
  assert (int(first["label"]), int(second["label"])) == (0, 1)
  np.testing.assert_array_equal(second["image"][..., 0], second["image"][..., 2])  # grey -> RGB
  # The shorter side scaled to 10, then the centre crop: (20, 30) -> (10, 15) -> columns 2..11.
  from PIL import Image
  want = np.asarray(Image.fromarray(red).resize((15, 10), Image.BILINEAR))[:, 2:12]
  np.testing.assert_array_equal(first["image"], want)

  (tmp_path / "ok" / "dog" / "broken.png").write_text("not an image")
  folder = images.ImageFolder(str(tmp_path / "ok"), image_size=10)
  with pytest.raises(DataError, match=f"^{tmp_path / 'ok' / 'dog' / 'broken.png'}: not a "
                                      "readable image"):
    images.load_arrays(folder)
  (tmp_path / "ok" / "empty").mkdir()
  with pytest.raises(DataError, match=f"^{tmp_path / 'ok' / 'empty'}: class folder 'empty' "
                                      "holds no image files"):
    images.ImageFolder(str(tmp_path / "ok"), image_size=10)
  with pytest.raises(DataError, match="no class sub-folders"):
    images.ImageFolder(str(tmp_path / "ok" / "cat"), image_size=10)


def test_tfds_catalog_records_map_to_examples(monkeypatch):
  """mnist, cifar10 and imagenet2012 through tfds.data_source (stubbed: no network here),
  feature names as the tfds catalog has them; imagenet's manual_dir reaches tfds."""
  import tensorflow_datasets as tfds
  rng = np.random.default_rng(1)
  records = {
      ("mnist", "test"): [{"image": rng.integers(0, 256, (28, 28, 1), dtype=np.uint8),
                           "label": 7}],
      ("cifar10", "train"): [{"id": b"train_1", "image": rng.integers(0, 256, (32, 32, 3),
                                                                      dtype=np.uint8),
                              "label": 3}],
      ("imagenet2012", "validation"): [{"file_name": b"x.JPEG", "label": 999,
                                        "image": rng.integers(0, 256, (40, 60, 3), np.uint8)}],
  }
  calls = []

  def data_source(name, split, data_dir=None, **kwargs):
    calls.append((name, split, data_dir, kwargs))
    return records[(name, split)]
  monkeypatch.setattr(tfds, "data_source", data_source)
  mnist = images.TfdsImages("mnist", "test", image_size=28, channels=1)
  np.testing.assert_array_equal(mnist[0]["image"], records[("mnist", "test")][0]["image"])
  assert int(mnist[0]["label"]) == 7
  rgb = images.TfdsImages("mnist", "test", image_size=28, channels=3)[0]["image"]
  assert rgb.shape == (28, 28, 3) and np.array_equal(rgb[..., 1], mnist[0]["image"][..., 0])
  cifar = images.TfdsImages("cifar10", "train", image_size=32, data_dir="/d")
  assert cifar[0]["image"].shape == (32, 32, 3) and int(cifar[0]["label"]) == 3
  imagenet = images.TfdsImages("imagenet2012", "validation", image_size=20, manual_dir="/m")
  assert imagenet[0]["image"].shape == (20, 20, 3) and int(imagenet[0]["label"]) == 999
  assert [c[:3] for c in calls] == [("mnist", "test", None), ("mnist", "test", None),
                                    ("cifar10", "train", "/d"),
                                    ("imagenet2012", "validation", None)]
  manual = calls[-1][3]["download_and_prepare_kwargs"]["download_config"].manual_dir
  assert str(manual) == "/m"


def test_augmentation_is_a_seeded_pad_crop_and_flip():
  image = np.arange(4 * 4, dtype=np.uint8).reshape(4, 4, 1) + 1
  same = images.random_crop_flip(image, np.random.default_rng(0), padding=0, flip=False)
  np.testing.assert_array_equal(same, image)
  seen = set()
  for seed in range(40):
    out = images.random_crop_flip(image, np.random.default_rng(seed), padding=1, flip=True)
    assert out.shape == image.shape
    again = images.random_crop_flip(image, np.random.default_rng(seed), padding=1, flip=True)
    np.testing.assert_array_equal(out, again)  # a pure function of the generator
    padded = np.pad(image[..., 0], 1)
    windows = {(r, c, f): (padded[r:r + 4, c:c + 4][:, ::-1] if f else padded[r:r + 4, c:c + 4])
               for r in range(3) for c in range(3) for f in (0, 1)}
    match = [k for k, w in windows.items() if np.array_equal(w, out[..., 0])]
    assert match, "not a window of the padded image"
    seen.update(match)
  assert len({k[2] for k in seen}) == 2 and len({k[:2] for k in seen}) >= 7  # flips and offsets


def test_program_transform_is_seeded_by_index_and_epoch_so_resume_is_exact():
  from configs import vit as vit_configs
  from fmjax.data import ArraySource
  from train import classify_images
  config = vit_configs.get_config("tiny")
  config.data.crop_padding, config.data.flip = 2, True
  rng = np.random.default_rng(0)
  source = ArraySource({"image": rng.integers(0, 256, (10, 8, 8, 1), dtype=np.uint8),
                        "label": np.arange(10, dtype=np.int32)})
  make = lambda: ExampleBatchIterator(source, batch_size=4, seed=0,
                                      transform=classify_images.make_augment(config))
  first = make()
  batches = [next(first) for _ in range(6)]  # crosses into the third epoch
  resumed = make()
  resumed.set_state({"step": 4})
  for a, b in zip(batches[4:], [next(resumed), next(resumed)]):
    np.testing.assert_array_equal(a["image"], b["image"])
  assert not np.array_equal(batches[0]["image"], source.arrays["image"][batches[0]["label"]])


# The program ----------------------------------------------------------------------------------

def start(env, workdir, *overrides, config="configs/vit.py:tiny", devices=None):
  """The program as a subprocess (subprocess.Popen): .communicate() waits for it."""
  cmd = [sys.executable, "-m", "train.classify_images", f"--config={config}",
         f"--workdir={workdir}", *overrides]
  if devices:
    env = {**env, "FMJAX_CPU_DEVICES": str(devices)}
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def finish(proc):
  stdout, stderr = proc.communicate(timeout=600)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def program(env, workdir, *overrides, **kwargs):
  return finish(start(env, workdir, *overrides, **kwargs))


def check_ok(proc):
  assert proc.returncode == 0, proc.stderr[-3000:]


def metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """96 random 28 x 28 grey images with labels 0..9, as gzip IDX files."""
  root = tmp_path_factory.mktemp("idx")
  rng = np.random.default_rng(0)
  x = write_idx(root / "images.gz", rng.integers(0, 256, (96, 28, 28), dtype=np.uint8))
  y = write_idx(root / "labels.gz", (np.arange(96) % 10).astype(np.int32))
  return (f"--config.data.train_images={x}", f"--config.data.train_labels={y}",
          "--config.data.train_stop=64", "--config.data.eval_start=64",
          "--config.data.eval_stop=0")


@pytest.mark.slow
def test_tiny_program_learns_mnist_and_scores_every_eval_image(env, tmp_path):
  proc = program(env, tmp_path / "tiny")  # 400 steps on 2,048 images, 250 held out
  check_ok(proc)
  evals = [r for r in metrics(tmp_path / "tiny") if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [200, 400]
  assert evals[-1]["eval/accuracy"] > 0.6  # 0.69 here; chance is 0.1
  assert evals[-1]["eval/loss"] < 1.2  # from ln(10) = 2.30
  results = json.load(open(tmp_path / "tiny" / "eval_results.json"))
  best = json.load(open(tmp_path / "tiny" / "best" / "best.json"))
  assert results["eval/accuracy"] == best["metrics"]["eval/accuracy"] == max(
      r["eval/accuracy"] for r in evals)
  assert round(results["eval/accuracy"] * 250, 6).is_integer()  # all 250: none dropped
  assert "2048 train and 250 eval images of (28, 28, 1), 10 classes" in proc.stderr


@pytest.mark.slow
def test_eight_devices_equal_one_with_augmentation_and_mixup(env, tmp_path, synthetic):
  common = (*synthetic, "--config.model.num_layers=1", "--config.train.steps=2", "--config.train.log_every=1",
            "--config.train.eval_every=2", "--config.train.batch_size=32",
            "--config.train.label_smoothing=0.1", "--config.train.mixup_alpha=0.4",
            "--config.data.crop_padding=2", "--config.data.flip=True")
  one = start(env, tmp_path / "one", *common)  # both at once: start-up is mostly one core
  eight = finish(start(env, tmp_path / "eight", *common, "--config.mesh.data=2",
                       "--config.mesh.fsdp=4", devices=8))
  one = finish(one)
  check_ok(one)
  check_ok(eight)
  assert "x 8 devices" in eight.stderr and "'fsdp': 4" in eight.stderr
  a, b = metrics(tmp_path / "one"), metrics(tmp_path / "eight")
  assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
  assert a[0]["train/loss"] != a[1]["train/loss"]
  for ra, rb in zip(a, b):
    for key in ("train/loss", "grad_norm", "eval/loss", "eval/accuracy"):
      if key in ra:
        assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-5), key


@pytest.mark.slow
def test_bad_idx_file_is_one_error_line(env, tmp_path, synthetic):
  bad = tmp_path / "bad-images.gz"
  bad.write_bytes(gzip.compress(b"\x00\x01\x08\x03" + bytes(64)))
  proc = program(env, tmp_path / "w", *synthetic, f"--config.data.train_images={bad}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {bad}: magic number 00010803 is not an IDX header (two zero bytes, a type code, "
      "the number of dimensions, e.g. 00000803 for MNIST images); is this an MNIST-style IDX "
      "file?")
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_finetune_from_hf_at_another_image_size_resizes_positions(tmp_path):
  """init_from=hf: a 16 x 16 ViT fine-tuned at 32 x 32 on a folder of 3 classes: positions
  resized by resize_posemb, a fresh zero head for 3 classes, every other weight as loaded
  (learning rate 0). Run in-process: train.classify_images.run is the program."""
  from configs import vit as vit_configs
  from fmjax import checkpoint
  from train import classify_images
  rng = np.random.default_rng(0)
  for split, n in (("train", 4), ("eval", 2)):
    for label in ("a", "b", "c"):
      for i in range(n):
        png(tmp_path / split / label / f"{i}.png", rng.integers(0, 256, (24, 24, 3), np.uint8))
  config = vit_configs.get_config("tiny")
  config.init_from = f"hf:{VIT_DIR}"
  config.model.image_size = 32
  config.data.update(train_images="", train_labels="", train_dir=str(tmp_path / "train"),
                     eval_dir=str(tmp_path / "eval"), eval_start=0, eval_stop=0, train_stop=0)
  config.train.update(steps=1, batch_size=4, learning_rate=0.0, log_every=1, eval_every=1,
                      allow_nonpositive_learning_rate=True)
  workdir = tmp_path / "run"
  final = classify_images.run(config, str(workdir))
  assert set(final) == {"eval/accuracy", "eval/loss"}
  assert final["eval/loss"] == pytest.approx(np.log(3), abs=1e-6)  # zero head: uniform
  _, source = hf.read_weights(VIT_DIR)
  _, meta, _ = checkpoint.read_latest(str(workdir))
  assert meta["model"]["image_size"] == 32 and meta["model"]["num_classes"] == 3
  assert meta["model"]["embed_dim"] == 32 and meta["model"]["norm_eps"] == 1e-12  # the source's
  restored = checkpoint.restore_params(str(workdir), 1, {
      p: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
          jax.devices()[0])) for p, x in checkpoint.read_latest(str(workdir))[2].items()})
  theirs = checkpoint.flatten_params(source)
  resized = vit.resize_posemb(theirs["encoder/posemb"], 8)
  np.testing.assert_array_equal(restored["encoder/posemb"], resized)  # (1 + 64, 32)
  assert restored["head/kernel"].shape == (32, 3) and not np.any(restored["head/kernel"])
  for path, x in theirs.items():
    if path.startswith("encoder/") and path != "encoder/posemb":
      np.testing.assert_array_equal(restored[path], x, err_msg=path)
