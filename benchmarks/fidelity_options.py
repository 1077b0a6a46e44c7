"""The fidelity case's 8-bit rows under other code maps and rounding rules (benchmarks/README.md).

`python benchmarks/fidelity_options.py OPTIONS [PROBLEMS] [VARIANTS]`, OPTIONS a comma-separated
list (empty for the package as it is), each patching `rmsprop_jax.quantize` in this process:

* `nu=CODE` / `signed=CODE`: another map for `nu` / the signed moments (`quantize.CODES`);
* `ld`: rounding bits low-discrepancy across steps per element, `h(i ^ c) + key` with the key
  `h(seed, leaf) + count * 0x9E3779B9` (the golden ratio times 2**32): each element's bits
  advance by the golden ratio each step from a hashed offset;
* `hybrid`: the `nu` codes rounded to nearest where that moves the code, stochastically where
  the nearest code is the old one.

Prints, per problem and variant, the mean over 3 seeds of the params' relative L2 distance to the
float32 run after 400 steps, the final loss vs float32 and the per-seed distances.
"""

import sys

import jax.numpy as jnp
import numpy as np
from jax import lax

from rmsprop_jax import fidelity as F
from rmsprop_jax import quantize as Q

opts = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else []
problems = sys.argv[2].split(",") if len(sys.argv) > 2 else list(F.PROBLEMS)
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["plain", "momentum 0.9"]
PHI = np.uint32(0x9E3779B9)
for o in opts:
  if o.startswith("nu="):
    Q.NU_CODE = o[3:]
  elif o.startswith("signed="):
    Q.SIGNED_CODE = o[7:]
  elif o == "ld":
    # key = h(seed, leaf) + count * phi; bits = mix(idx ^ c) + key
    def stream_keys(seed, count, leaf_indices):
      return [stream_key(seed, count, i) for i in leaf_indices]

    def stream_key(seed, count, leaf_index):
      k = Q._mix32(lax.add(Q._as_u32(seed), Q._u32(0x9E3779B9)))
      k = Q._mix32(lax.add(k, Q._u32(0x85EBCA6B * (int(leaf_index) + 1))))
      return lax.add(k, lax.mul(Q._as_u32(count), PHI))

    def bits_from_key(key, shape, *, out_sharding=None):
      idx = Q._global_index(tuple(shape), out_sharding)
      return lax.add(Q._mix32(lax.bitwise_xor(idx, Q._u32(0x2545F491))), key)

    Q.stream_keys, Q.stream_key, Q.bits_from_key = stream_keys, stream_key, bits_from_key
  elif o == "hybrid":
    orig = Q.ema_update

    def ema_update(q, x, decay, one_minus_decay=None, *, bits=None, code=None, scale=None, orig=orig):
      st = orig(q, x, decay, one_minus_decay, bits=bits, code=code, scale=scale)
      if bits is None:
        return st
      nr = orig(q, x, decay, one_minus_decay, bits=None, code=code, scale=scale)
      # nearest where it moves the code, stochastic where nearest stays
      return Q.QuantizedArray(jnp.where(nr.codes == q.codes, st.codes, nr.codes), st.scale, st.code)

    Q.ema_update = ema_update
  else:
    raise SystemExit(o)


def range_check(label):
  """Step size vs float32's where a block's nu spreads (lognormal gradient scales, sigma 1 and 2)."""
  import jax

  import rmsprop_jax

  for sigma in (1.0, 2.0):
    for decay in (0.99, 0.999):
      shape = (32, 256)
      key = jax.random.key(3)
      s = jnp.exp(sigma * jax.random.normal(jax.random.fold_in(key, 99), shape))
      tx = {
        "f": rmsprop_jax.scale_by_rms(decay, eps=1e-8),
        "q": rmsprop_jax.scale_by_rms(decay, eps=1e-8, state_bits=8, min_quantize_size=1),
      }

      @jax.jit
      def go(s=s, tx=tx, decay=decay, key=key, shape=shape):
        def body(st, t):
          g = 1e-3 * s * jax.random.normal(jax.random.fold_in(key, t), shape)
          out = {k: tx[k].update(g, st[k]) for k in tx}
          return {k: v[1] for k, v in out.items()}, out["q"][0] / out["f"][0]

        init = {k: t.init(jnp.zeros(shape)) for k, t in tx.items()}
        return jax.lax.scan(body, init, jnp.arange(int(3 / (1 - decay))))[1]

      r = np.asarray(go()[-int(1 / (1 - decay)) :]).ravel()
      r = r[np.isfinite(r)]
      rms = 100 * np.sqrt(np.mean((r - 1) ** 2))
      print(f"{label:<28}sigma {sigma} decay {decay}: step rms {rms:6.2f}%  max {r.max():6.2f}", flush=True)


if problems == ["range"]:
  range_check(sys.argv[1] or "as is")
  problems = []
for problem in problems:
  for variant in variants:
    d, losses = [], []
    for seed in range(3):
      prob = F.make_problem(problem, seed, False, 400)
      ref = F.run_jax(F.ours_opt(variant, None, seed), prob)
      out = F.compare(F.run_jax(F.ours_opt(variant, "8-bit", seed), prob), ref)
      d.append(out["distance"])
      losses.append(out["loss_rel"])
    seeds = " ".join(f"{v:.2e}" for v in d)
    head = f"{sys.argv[1] or 'as is':<28}{problem:<15}{variant:<14}"
    print(f"{head}{np.mean(d):10.2e}{100 * np.mean(losses):+9.2f}%  {seeds}", flush=True)
