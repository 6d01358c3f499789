"""The VQ-VAE image tokenizer (fmjax/models/vqvae.py) and its codebook maths (fmjax/codebook.py).

Proofs: on a 2-code example the assignments equal brute force and the commitment and
straight-through gradients equal hand-computed values; one EMA step, a dead-code restart, k-means
and perplexity/usage equal hand computations; encode/decode agree with __call__; the train
step's post_update hook sees the whole (accumulated) batch and is undone on a non-finite step;
`fit` runs it; and a tiny run lowers the reconstruction error and uses > 1/4 of the codes.
"""

import sys
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fmjax import codebook, training
from fmjax.data.captions import shapes
from fmjax.models import vqvae

REPO = pathlib.Path(__file__).resolve().parents[1]

# Two codes and three 2-D vectors, the example every hand computation below uses.
E = np.array([[0.0, 0.0], [1.0, 1.0]])
Z = np.array([[0.2, 0.1], [0.9, 0.6], [0.4, 0.7]])


def test_two_code_assignments_equal_brute_force():
  brute = [min(range(len(E)), key=lambda k: sum((z[d] - E[k][d]) ** 2 for d in range(2)))
           for z in Z.tolist()]
  assert brute == [0, 1, 1]  # squared distances (0.05, 1.45), (1.17, 0.17), (0.65, 0.45)
  assert codebook.nearest(jnp.asarray(Z, jnp.float32), jnp.asarray(E, jnp.float32)).tolist() == brute
  rng = np.random.default_rng(0)  # and on random data, ties aside
  z, e = rng.normal(size=(200, 5)), rng.normal(size=(7, 5))
  brute = ((z[:, None] - e[None]) ** 2).sum(-1).argmin(-1)
  np.testing.assert_array_equal(codebook.nearest(jnp.asarray(z, jnp.float32),
                                                 jnp.asarray(e, jnp.float32)), brute)


def test_two_code_gradients_by_hand():
  """Commitment: d/dz of 0.25 * mean (z - e)^2 over the 6 elements = (z - e) / 12.
  Straight-through: a downstream loss sum(w * z_q^2) has value sum(w e^2) and d/dz = 2 w e,
  the gradient at e copied onto z. The codebook gets no gradient from either."""
  z, e = jnp.asarray(Z, jnp.float32), jnp.asarray(E, jnp.float32)
  w = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  e_of_z = np.array([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])  # codes 0, 1, 1

  commit = lambda z, e: codebook.quantize(z, e, 0.25)[2]
  np.testing.assert_allclose(commit(z, e), 0.25 * (0.04 + 0.01 + 0.01 + 0.16 + 0.36 + 0.09) / 6,
                             rtol=1e-6)
  g_z, g_e = jax.grad(commit, argnums=(0, 1))(z, e)
  np.testing.assert_allclose(g_z, [[0.2 / 12, 0.1 / 12], [-0.1 / 12, -0.4 / 12],
                                   [-0.6 / 12, -0.3 / 12]], rtol=1e-5)
  np.testing.assert_array_equal(g_e, 0.0)

  def downstream(z, e):
    z_q, codes, _ = codebook.quantize(z, e, 0.25)
    return jnp.sum(w * z_q ** 2), (z_q, codes)
  (value, (z_q, codes)), (g_z, g_e) = jax.value_and_grad(downstream, (0, 1), has_aux=True)(z, e)
  assert codes.tolist() == [0, 1, 1]
  np.testing.assert_allclose(z_q, e_of_z, atol=1e-7)
  np.testing.assert_allclose(value, 3 + 4 + 5 + 6, rtol=1e-6)
  np.testing.assert_allclose(g_z, [[0.0, 0.0], [6.0, 8.0], [10.0, 12.0]], rtol=1e-6)
  np.testing.assert_array_equal(g_e, 0.0)


def test_ema_step_by_hand():
  """decay 0.9, epsilon 0.1; codes of Z: 0, 1, 1 (n = 1, 2)."""
  stats = {"codebook": jnp.asarray(E, jnp.float32), "ema_count": jnp.array([2.0, 1.0]),
           "ema_sum": jnp.array([[0.2, 0.0], [1.0, 1.2]])}
  new = codebook.ema_update(stats, jnp.asarray(Z, jnp.float32), decay=0.9, epsilon=0.1)
  count = [0.9 * 2 + 0.1 * 1, 0.9 * 1 + 0.1 * 2]  # [1.9, 1.1]
  total = [[0.9 * 0.2 + 0.1 * 0.2, 0.9 * 0.0 + 0.1 * 0.1],  # code 0: z_0
           [0.9 * 1.0 + 0.1 * 1.3, 0.9 * 1.2 + 0.1 * 1.3]]  # code 1: z_1 + z_2
  smoothed = [(1.9 + 0.1) / 3.2 * 3, (1.1 + 0.1) / 3.2 * 3]  # n = 3, K epsilon = 0.2
  np.testing.assert_allclose(new["ema_count"], count, rtol=1e-6)
  np.testing.assert_allclose(new["ema_sum"], total, rtol=1e-6)
  np.testing.assert_allclose(new["codebook"], [[0.2 / 1.875, 0.01 / 1.875],
                                               [1.03 / 1.125, 1.21 / 1.125]], rtol=1e-5)
  np.testing.assert_allclose(smoothed, [1.875, 1.125])


def test_a_dead_code_is_reseeded_from_the_batch():
  z = jnp.asarray(np.random.default_rng(0).normal(size=(50, 2)), jnp.float32)
  stats = {"codebook": jnp.array([[0.0, 0.0], [9.0, 9.0], [1.0, 1.0]]),
           "ema_count": jnp.array([4.0, 0.05, 2.0]),  # mean 2.0167: code 1 < 0.03 x mean
           "ema_sum": jnp.array([[0.0, 0.0], [0.45, 0.45], [2.0, 2.0]])}
  new = codebook.restart_dead(stats, z, jax.random.key(3), below=0.03)
  mean = 6.05 / 3
  for k in (0, 2):  # live codes untouched
    for name in stats:
      np.testing.assert_array_equal(new[name][k], stats[name][k])
  row = np.asarray(new["codebook"][1])
  assert any(np.array_equal(row, r) for r in np.asarray(z))  # one of the batch's vectors
  np.testing.assert_allclose(new["ema_count"][1], mean, rtol=1e-6)
  np.testing.assert_allclose(new["ema_sum"][1], row * mean, rtol=1e-6)
  alive = codebook.restart_dead(stats, z, jax.random.key(3), below=0.02)  # 0.05 > 0.0403
  for name in stats:
    np.testing.assert_array_equal(alive[name], stats[name])


def test_kmeans_finds_two_separated_clusters():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(30, 3)) * 0.1 + 5, rng.normal(size=(20, 3)) * 0.1 - 5
  centroids, counts = codebook.kmeans(jnp.asarray(np.concatenate([a, b]), jnp.float32), 2,
                                      jax.random.key(0), 3)
  order = np.argsort(-np.asarray(centroids)[:, 0])
  np.testing.assert_allclose(np.asarray(centroids)[order], [a.mean(0), b.mean(0)], rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts)[order], [30, 20])


def test_perplexity_and_usage_by_hand():
  perplexity, usage = codebook.code_stats(jnp.array([[0, 0], [1, 2]]), 4)  # p = .5, .25, .25, 0
  np.testing.assert_allclose(perplexity, np.exp(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25))),
                             rtol=1e-6)
  np.testing.assert_allclose(usage, 0.75)
  perplexity, usage = codebook.code_stats(jnp.arange(8), 8)  # uniform: perplexity K
  np.testing.assert_allclose([perplexity, usage], [8.0, 1.0], rtol=1e-6)


@pytest.fixture(scope="module")
def tiny():
  """(model, params) of the tiny preset, initialised once."""
  model = vqvae.VQVAE(vqvae.get_config("tiny"))
  init = jax.jit(lambda rng: model.init(rng, jnp.zeros((1, 16, 16, 3)))["params"])
  return model, nn.meta.unbox(init(jax.random.key(0)))


def test_config_grid_and_errors(tiny):
  assert (vqvae.get_config("tiny").grid_size, vqvae.get_config("tiny").num_tokens) == (4, 16)
  assert (vqvae.VQConfig().grid_size, vqvae.VQConfig().num_tokens) == (8, 64)
  assert vqvae.get_config("tiny", widths=[32, 32, 32]).widths == (32, 32, 32)
  with pytest.raises(ValueError, match="image_size=18 is not a multiple of 2"):
    vqvae.get_config("tiny", image_size=18)
  with pytest.raises(ValueError, match="multiple of groups=8"):
    vqvae.get_config("tiny", widths=(32, 12))
  with pytest.raises(ValueError, match="unknown VQ-VAE preset 'huge'"):
    vqvae.get_config("huge")
  model, params = tiny
  with pytest.raises(ValueError, match=r"images have shape \(2, 16, 16, 1\) but this VQ-VAE"):
    jax.eval_shape(lambda x: model.apply({"params": params}, x), jnp.zeros((2, 16, 16, 1)))


def test_encode_decode_agree_with_call(tiny):
  model, params = tiny
  x = jax.random.uniform(jax.random.key(1), (3, 16, 16, 3), minval=-1, maxval=1)

  def run(v, x):  # one compilation for all four entry points
    codes = model.apply(v, x, method="encode")
    return (model.apply(v, x), codes, model.apply(v, x, method="latents"),
            model.apply(v, codes, method="decode"))
  (recon, aux), codes, z, images = jax.jit(run)({"params": params}, x)
  assert codes.shape == (3, 16) and codes.dtype == jnp.int32
  np.testing.assert_array_equal(codes, aux["codes"])
  z = np.asarray(z).reshape(3, 16, -1)  # row-major grid
  brute = ((z[..., None, :] - np.asarray(params["codebook"])) ** 2).sum(-1).argmin(-1)
  np.testing.assert_array_equal(codes, brute)
  assert images.shape == (3, 16, 16, 3) and images.dtype == jnp.float32
  assert float(jnp.abs(images).max()) <= 1.0
  np.testing.assert_allclose(images, jnp.clip(recon, -1, 1), atol=1e-5)
  assert aux["commitment_loss"].shape == () and 1 <= float(aux["perplexity"]) <= 16


def test_trainable_freezes_the_codebook_only(tiny):
  _, params = tiny
  flat = {jax.tree_util.keystr(k): v for k, v in
          jax.tree_util.tree_leaves_with_path(vqvae.trainable(params))}
  assert sorted(k for k, v in flat.items() if not v) == ["['codebook']", "['ema_count']",
                                                         "['ema_sum']"]
  assert len(flat) == len(jax.tree_util.tree_leaves(params))


def test_post_update_initialises_by_kmeans_then_takes_ema_steps(tiny):
  model, params = tiny
  c = model.config
  post = jax.jit(vqvae.make_post_update(model))
  batch = {"images": shapes(8, image_size=16)[0]}  # uint8 pixels: scaled to [-1, 1]
  z = jax.jit(lambda p, x: model.apply({"params": p}, x, method="latents"))(
      params, batch["images"] / 127.5 - 1.0).reshape(-1, c.code_dim)
  rng = jax.random.key(5)
  first = post(params, batch, rng)
  seed_rng, restart_rng = jax.random.split(rng)
  centroids, counts = codebook.kmeans(z, c.codebook_size, seed_rng, c.kmeans_iters)
  want = codebook.restart_dead({"codebook": centroids, "ema_count": counts,
                                "ema_sum": centroids * counts[:, None]}, z, restart_rng,
                               below=c.restart_below)
  second = post(first, batch, rng)
  want2 = codebook.restart_dead(
      codebook.ema_update(want, z, decay=c.ema_decay, epsilon=c.epsilon), z, restart_rng,
      below=c.restart_below)
  for name in vqvae.CODEBOOK:
    np.testing.assert_allclose(first[name], want[name], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(second[name], want2[name], rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(first["stem"]["kernel"], params["stem"]["kernel"])
  assert float(first["ema_count"].sum()) >= 8 * 16  # the batch's 128 vectors, plus restarts


def test_train_step_post_update_sees_the_whole_batch_and_is_undone_when_nonfinite():
  """SGD(0.1) on loss = sum(w * mean_batch(x)): w' = w - 0.1 mean(x); post_update then writes
  seen = sum of the whole batch + 100 sum(w'), into a frozen leaf."""
  params = {"w": jnp.array([1.0, 2.0]), "seen": jnp.zeros(())}
  tx = optax.sgd(0.1)
  trainable = lambda p: {"w": True, "seen": False}
  loss_fn = lambda p, b, r, t: (jnp.sum(p["w"] * b["x"].mean(0)), {})
  post = lambda p, b, r: {"w": p["w"], "seen": b["x"].sum() + 100 * p["w"].sum()}
  x = np.arange(8, dtype=np.float32).reshape(4, 2)
  state = training.TrainingState(step=jnp.zeros((), jnp.int32), params=params,
                                 opt_state=tx.init(training.partition(params, trainable)[0]))
  step = jax.jit(training.make_train_step(loss_fn, tx, accum_steps=2, trainable=trainable,
                                          post_update=post))
  new, metrics = step(state, {"x": x}, jax.random.key(0))
  w = np.array([1.0, 2.0]) - 0.1 * x.mean(0)  # [0.7, 1.6]
  np.testing.assert_allclose(new.params["w"], w, rtol=1e-6)
  np.testing.assert_allclose(new.params["seen"], 28.0 + 100 * w.sum(), rtol=1e-6)
  bad = x.copy()
  bad[0, 0] = np.nan
  same, metrics = step(new, {"x": bad}, jax.random.key(0))
  assert int(metrics["nonfinite"]) == 1
  np.testing.assert_allclose(same.params["seen"], 28.0 + 100 * w.sum(), rtol=1e-6)


def test_fit_applies_the_tasks_post_update(tmp_path, monkeypatch):
  """fit hands Task.post_update to the train step: here it pins the bias at 7 after each step."""
  sys.path.insert(0, str(REPO))
  from configs.common import base_config
  from fmjax import metrics, trainer
  monkeypatch.setattr(metrics, "peak_flops_per_device", lambda device=None, **_: (1e13, "test"))

  class Data:
    step = 0

    def __next__(self):
      self.step += 1
      x = np.random.default_rng(self.step).normal(size=(4, 3)).astype(np.float32)
      return {"x": x, "y": x.sum(1, keepdims=True)}

    def get_state(self):
      return {"step": self.step}

    def set_state(self, state):
      self.step = state["step"]

  model = nn.Dense(1)
  loss_fn = lambda p, b, r, t: (jnp.mean((model.apply({"params": p}, b["x"]) - b["y"]) ** 2), {})
  task = trainer.Task(model=model, model_config={"features": 1}, loss_fn=loss_fn,
                      train_data=Data(), eval_data=None, example_batch=next(Data()),
                      init_args=lambda b: (b["x"],), flops_per_example=1.0, tokens_per_example=1,
                      post_update=lambda p, b, r: {**p, "bias": jnp.full_like(p["bias"], 7.0)})
  config = base_config()
  config.mesh.data = -1
  t = config.train
  t.steps, t.batch_size, t.learning_rate, t.warmup_steps, t.decay = 2, 4, 0.1, 0, "constant"
  t.log_every, t.eval_every, t.save_every = 1, 1000, 1000
  state, _ = trainer.fit(config, str(tmp_path), task)
  assert int(state.step) == 2
  np.testing.assert_array_equal(np.asarray(state.params["bias"]), [7.0])


def test_tiny_training_lowers_the_error_and_uses_the_codebook(tiny):
  """150 steps of 32 scenes (16 x 16) on the tiny preset: held-out MSE falls well below the
  untrained model's, and the held-out scenes use more than a quarter of the 64 codes."""
  images = shapes(320, image_size=16, seed=0)[0]
  train, held_out = images[:256], {"images": images[256:]}
  model, params = tiny
  tx, _ = training.make_optimizer(learning_rate=3e-3, total_steps=150, warmup_steps=10,
                                  weight_decay=0.0)
  state = training.TrainingState(  # what training.init_fn builds, from the fixture's params
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state=tx.init(training.partition(params, vqvae.trainable)[0]))
  loss_fn = vqvae.make_loss_fn(model)
  step = jax.jit(training.make_train_step(loss_fn, tx, trainable=vqvae.trainable,
                                          post_update=vqvae.make_post_update(model)))
  evaluate = jax.jit(training.make_eval_step(loss_fn))
  before = evaluate(state.params, held_out)
  rng = np.random.default_rng(0)
  for _ in range(150):
    state, _ = step(state, {"images": train[rng.integers(0, 256, 32)]}, jax.random.key(1))
  after = evaluate(state.params, held_out)
  assert float(after["eval/mse"]) < 0.25 * float(before["eval/mse"]), (before, after)
  assert float(after["eval/psnr"]) > float(before["eval/psnr"]) + 6
  assert float(after["eval/usage"]) > 0.25, after
  assert float(after["eval/perplexity"]) > 8, after
