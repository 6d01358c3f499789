"""Restores a GPT workdir's latest checkpoint onto a mesh of this process's devices and saves
its params as .npz (run by tests/test_multihost.py with N simulated CPU devices).

  python tests/restore_on_mesh.py WORKDIR DATA FSDP TENSOR RULES OUT.npz
"""

import json
import os
import sys

devices = os.environ.get("FMJAX_CPU_DEVICES", "1")
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from fmjax import checkpoint, sharding, trainer, training  # noqa: E402
from fmjax.models import gpt  # noqa: E402


def main(workdir, data, fsdp, tensor, rules, out):
  config = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
  _, meta, _ = checkpoint.read_latest(workdir)
  model = gpt.GPT(gpt.GPTConfig(**meta["model"]))
  tx, _ = trainer.optimizer_from_config(config.train)
  init = training.init_fn(model, tx, jnp.zeros((1, config.data.seq_len), jnp.int32))
  mesh = sharding.make_mesh({"data": int(data), "fsdp": int(fsdp), "tensor": int(tensor)})
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.shardings_of(abstract, mesh, sharding.get_rules(rules))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1)
  state, _ = ckpt.restore(checkpoint.abstract_with_shardings(nn.meta.unbox(abstract), shardings))
  ckpt.close()
  flat = checkpoint.flatten_params(state.params)
  specs = {k: str(v.sharding.spec) for k, v in flat.items()}
  np.savez(out, **{k: np.asarray(v) for k, v in flat.items()})
  json.dump({"devices": jax.device_count(), "specs": specs, "step": int(state.step)},
            open(out + ".json", "w"))


if __name__ == "__main__":
  main(*sys.argv[1:])
