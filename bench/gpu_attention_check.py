"""On an NVIDIA GPU: the cuDNN attention kernel against XLA's, sliding windows included.

  JAX_DEFAULT_MATMUL_PRECISION=highest python bench/gpu_attention_check.py

fmjax's `auto` never picks cuDNN for a sliding window or soft-capping (tests/test_decoders.py
pins that choice); `impl="cudnn"` still takes a window, as a dense (T, S) mask. This runs that
path where it exists: causal, padding, segments and windows of 1, 7 and 64 at T = S = 256
(bf16 inputs, GQA 8 query heads over 2 kv heads), forward and gradients of sum(w * out),
against impl="xla" on the same bf16 inputs computed in fp32. Prints one JSON object per case
(max abs errors, and `ok` against bf16-sized tolerances) and a last line with the device.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.machine import machine  # noqa: E402
from fmjax import attention  # noqa: E402


def run(impl, q, k, v, w, **kwargs):
  def f(q, k, v):
    out = attention.dot_product_attention(q, k, v, impl=impl, **kwargs)
    return jnp.sum(w * out.astype(jnp.float32)), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return np.asarray(out, np.float32), [np.asarray(g, np.float32) for g in grads]


def main():
  rng = np.random.default_rng(0)
  B, T, N, K, H = 2, 256, 8, 2, 64
  q, k, v = (jnp.asarray(rng.normal(size=s), jnp.bfloat16)
             for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
  w = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
  lengths = jnp.asarray([T, 200])
  segments = jnp.asarray(np.repeat([[1, 2, 3, 4]], B, 0).repeat(T // 4, 1))
  cases = {
      "causal": dict(causal=True),
      "causal_padding": dict(causal=True, kv_mask=jnp.arange(T)[None] < lengths[:, None]),
      "causal_segments": dict(causal=True, q_segment_ids=segments, kv_segment_ids=segments),
      **{f"causal_window_{n}": dict(causal=True, window=n) for n in (1, 7, 64)},
      "window_7_padding": dict(causal=True, window=7,
                               kv_mask=jnp.arange(T)[None] < lengths[:, None]),
  }
  all_ok = True
  for name, kwargs in cases.items():
    row = {"case": name}
    try:
      ref, ref_grads = run("xla", q.astype(jnp.float32), k.astype(jnp.float32),
                           v.astype(jnp.float32), w, **kwargs)
      out, grads = run("cudnn", q, k, v, w, **kwargs)
      row["out_max_err"] = float(np.abs(out - ref).max())
      row["grad_max_err"] = [float(np.abs(g - r).max()) for g, r in zip(grads, ref_grads)]
      row["grad_scale"] = [float(np.abs(r).max()) for r in ref_grads]
      row["ok"] = bool(row["out_max_err"] < 3e-2 and all(
          e <= 3e-2 * max(s, 1.0) for e, s in zip(row["grad_max_err"], row["grad_scale"])))
    except Exception as e:  # noqa: BLE001 -- a kernel that refuses is a result too
      row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
      row["ok"] = False
    all_ok &= row["ok"]
    print(json.dumps(row), flush=True)
  print(json.dumps({"device": str(jax.devices()[0]), "device_kind": jax.devices()[0].device_kind,
                    "jax": jax.__version__, "all_ok": all_ok, "machine": machine()}), flush=True)


if __name__ == "__main__":
  main()
