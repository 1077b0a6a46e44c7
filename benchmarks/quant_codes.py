"""Which 8-bit code map, block scale and rounding for RMSProp's state?

Measures, for each candidate storage of the second moment ``nu``:

1. accuracy: an EMA of ``g**2`` stored in 8 bits (or bfloat16) for
   thousands of steps next to the float32 EMA of the same gradients, under
   five gradient models; the bias and spread of ``nu`` and of the step size
   ``1 / sqrt(nu + eps)`` the update divides by;
2. training parity: an MLP on the digits data, a few hundred steps, with a
   prototype 8-bit RMSProp written here on :mod:`rmsprop_jax.quantize`;
3. speed: that prototype's jitted, donated step on the bench's big tree
   (16.2M params) against ``optax.rmsprop``, XLA's bytes per parameter
   beside it, and the per-block maximum alone, computed several ways.

Run: ``python benchmarks/quant_codes.py`` (about 5 minutes on 2 cores;
``--quick`` for a smoke run, ``--sections accuracy,speed`` for a subset,
``--json out.json`` to keep the raw numbers). Results: ``quant_codes.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from rmsprop_jax import quantize as qz
from rmsprop_jax.bench import conv_net_shapes, make_tree
from rmsprop_jax.xla_stats import xla_bytes_accessed

EPS = 1e-8
MAPS = qz.CODES


# ----------------------------------------------------------------- one leaf


def store_nu(
  state, g2, decay, count, leaf: int, *, storage: str, code: str | None = None, scale: str = "bound"
):
  """One EMA step of ``nu`` into its storage; returns (state, fresh, stored).

  ``fresh`` is the float32 EMA before rounding, ``stored`` what the state now
  holds (dequantized). ``storage``: "f32", "bf16_nearest", "bf16_stochastic"
  or "q8". ``scale`` (q8): "exact" (block absmax of the new nu), "bound" (EMA
  of the block maximum of g**2: an upper bound on every nu in the block, from
  the gradient alone), "naive" (``max`` over a (blocks, 256) reshape).
  """
  one_minus = 1 - decay
  if storage == "q8":
    nu = decay * qz.dequantize(state, code=code) + one_minus * g2
    if scale == "bound":
      s = decay * state.scale + one_minus * qz.block_absmax(g2)
    elif scale == "naive" and nu.size % 256 == 0 and (nu.size // nu.shape[0]) % 256 == 0:
      s = jnp.max(nu.reshape(-1, 256), axis=1).reshape(qz.scale_shape(nu.shape))
    else:
      s = qz.block_absmax(nu)
    bits = qz.random_bits(0, count, leaf, nu.shape)
    state = qz.quantize(nu, signed=False, bits=bits, code=code, scale=s)
    return state, nu, qz.dequantize(state, code=code)
  nu = decay * state.astype(jnp.float32) + one_minus * g2
  if storage == "f32":
    return nu, nu, nu
  bits = qz.random_bits(0, count, leaf, nu.shape) if storage == "bf16_stochastic" else None
  state = qz.round_to(nu, jnp.bfloat16, bits)
  return state, nu, state.astype(jnp.float32)


def init_nu(p, *, storage: str, code: str | None = None, min_size: int = qz.MIN_QUANTIZE_SIZE):
  zeros = jnp.zeros(p.shape, jnp.float32)
  if storage == "q8" and p.size >= min_size:
    return qz.quantize(zeros, signed=False, code=code)
  if storage.startswith("bf16"):
    return zeros.astype(jnp.bfloat16)
  return zeros


# ----------------------------------------------------------------- prototype optimizer


class LowPrecisionState(NamedTuple):
  count: jax.Array
  nu: Any


def rmsprop_lowp(
  learning_rate: float,
  decay: float = 0.9,
  eps: float = EPS,
  *,
  storage: str = "q8",
  code: str = "float",
  scale: str = "bound",
  denominator: str = "stored",
) -> optax.GradientTransformation:
  """RMSProp with ``nu`` stored in 8 bits or bfloat16 (a prototype).

  ``denominator``: "stored" divides by the stored value (XLA updates the
  codes in place and the step reads them once), "floor" by
  ``max(stored, (1 - decay) g**2)`` (a lower bound of the true nu: the step
  never exceeds ``lr / sqrt(1 - decay)``), "fresh" by the float32 nu before
  rounding.
  """

  def init(params):
    return LowPrecisionState(
      jnp.zeros([], jnp.int32), jax.tree.map(lambda p: init_nu(p, storage=storage, code=code), params)
    )

  def update(grads, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(grads)
    nus = treedef.flatten_up_to(state.nu)
    out_u, out_nu = [], []
    for i, (g, nu) in enumerate(zip(leaves, nus)):
      g32 = g.astype(jnp.float32)
      g2 = g32 * g32
      kind = "q8" if isinstance(nu, qz.QuantizedArray) else ("f32" if storage == "q8" else storage)
      nu, fresh, stored = store_nu(nu, g2, decay, state.count, i, storage=kind, code=code, scale=scale)
      den = {"stored": stored, "fresh": fresh, "floor": jnp.maximum(stored, (1 - decay) * g2)}[denominator]
      out_u.append((-learning_rate * g32 * lax.rsqrt(den + eps)).astype(g.dtype))
      out_nu.append(nu)
    return treedef.unflatten(out_u), LowPrecisionState(state.count + 1, treedef.unflatten(out_nu))

  return optax.GradientTransformation(init, update)


# ----------------------------------------------------------------- 1. accuracy

GRADIENTS = {
  "normal": "g ~ N(0, 1), the same scale everywhere",
  "spread": "g ~ s_i N(0, 1), s_i lognormal (sigma 1) per element",
  "wide": "g ~ s_i N(0, 1), s_i lognormal (sigma 2): nu spans ~7 decades in a block",
  "heavy": "g ~ s_i t(3), Student-t with 3 degrees of freedom, s_i lognormal (sigma 1)",
  "sparse": "g ~ s_i N(0, 1) on 5% of the elements each step (else 0), s_i lognormal (sigma 1)",
}


def _grad_fn(kind: str, n: int):
  s1 = jnp.exp(jax.random.normal(jax.random.key(11), (n,)))
  s2 = jnp.exp(2 * jax.random.normal(jax.random.key(12), (n,)))

  def grad(t):
    k = jax.random.fold_in(jax.random.key(0), t)
    if kind == "normal":
      return jax.random.normal(k, (n,))
    if kind == "spread":
      return s1 * jax.random.normal(k, (n,))
    if kind == "wide":
      return s2 * jax.random.normal(k, (n,))
    if kind == "heavy":
      return s1 * jax.random.t(k, 3.0, (n,))
    k1, k2 = jax.random.split(k)
    return jnp.where(jax.random.bernoulli(k1, 0.05, (n,)), s1 * jax.random.normal(k2, (n,)), 0.0)

  return grad


def ema_accuracy(storage: str, code: str, scale: str, gradients: str, decays, steps: int, n: int):
  """Runs the EMA for every decay (vmapped); statistics over the last quarter."""
  grad = _grad_fn(gradients, n)
  tail = steps // 4

  def run(decay):
    def body(t, carry):
      ref, st, acc = carry
      g2 = jnp.square(grad(t))
      ref = decay * ref + (1 - decay) * g2
      st, fresh, stored = store_nu(st, g2, decay, t, 0, storage=storage, code=code, scale=scale)
      rs = lax.rsqrt(ref + EPS)
      r = {
        "stored": lax.rsqrt(stored + EPS) / rs,
        "floor": lax.rsqrt(jnp.maximum(stored, (1 - decay) * g2) + EPS) / rs,
        "fresh": lax.rsqrt(fresh + EPS) / rs,
      }
      on = (t >= steps - tail).astype(jnp.float32)
      new = {}
      for k, v in r.items():
        new[k + "_sum"] = acc[k + "_sum"] + on * jnp.sum(v - 1)
        new[k + "_sq"] = acc[k + "_sq"] + on * jnp.sum(jnp.square(v - 1))
        new[k + "_max"] = jnp.maximum(acc[k + "_max"], on * jnp.max(v))
      new["nu_sum"] = acc["nu_sum"] + on * jnp.sum(stored)
      new["ref_sum"] = acc["ref_sum"] + on * jnp.sum(ref)
      new["nu_sq"] = acc["nu_sq"] + on * jnp.sum(jnp.square(stored / (ref + 1e-30) - 1))
      new["zero"] = acc["zero"] + on * jnp.sum((stored == 0) & (ref > 0))
      return ref, st, new

    zeros = jnp.zeros((n,), jnp.float32)
    keys = [k + s for k in ("stored", "floor", "fresh") for s in ("_sum", "_sq", "_max")]
    acc = {k: jnp.float32(0) for k in keys + ["nu_sum", "ref_sum", "nu_sq", "zero"]}
    _, _, acc = lax.fori_loop(
      0, steps, body, (zeros, init_nu(zeros, storage=storage, code=code, min_size=0), acc)
    )
    return acc

  out = jax.jit(jax.vmap(run))(jnp.asarray(decays, jnp.float32))
  m = n * tail
  res = []
  for i, d in enumerate(decays):
    a = {k: float(v[i]) for k, v in out.items()}
    row = {"decay": d, "nu_bias": a["nu_sum"] / a["ref_sum"] - 1, "nu_rel_rms": math.sqrt(a["nu_sq"] / m)}
    row["zero_frac"] = a["zero"] / m
    for k in ("stored", "floor", "fresh"):
      row[k] = {
        "step_bias": a[k + "_sum"] / m,
        "step_rel_rms": math.sqrt(a[k + "_sq"] / m),
        "step_max_ratio": a[k + "_max"],
      }
    res.append(row)
  return res


def ema_signed_accuracy(code: str, gradients: str, decays, steps: int, n: int):
  """EMA of g (a first moment / momentum buffer) in signed 8-bit codes."""
  grad = _grad_fn(gradients, n)
  tail = steps // 4

  def run(decay):
    def body(t, carry):
      ref, st, err2, ref2, bias = carry
      g = grad(t)
      ref = decay * ref + (1 - decay) * g
      mu = decay * qz.dequantize(st, code=code) + (1 - decay) * g
      st = qz.quantize(mu, signed=True, bits=qz.random_bits(0, t, 1, mu.shape), code=code)
      on = (t >= steps - tail).astype(jnp.float32)
      d = qz.dequantize(st, code=code) - ref
      return (
        ref,
        st,
        err2 + on * jnp.sum(d * d),
        ref2 + on * jnp.sum(ref * ref),
        bias + on * jnp.sum(d * jnp.sign(ref)),
      )

    zeros = jnp.zeros((n,), jnp.float32)
    z = jnp.float32(0)
    return lax.fori_loop(0, steps, body, (zeros, qz.quantize(zeros, signed=True, code=code), z, z, z))[2:]

  err2, ref2, bias = jax.jit(jax.vmap(run))(jnp.asarray(decays, jnp.float32))
  return [
    {
      "decay": d,
      "rel_rms": math.sqrt(float(e) / float(r)),
      "bias_toward_sign": float(b) / math.sqrt(float(r) * n * tail),
    }
    for d, e, r, b in zip(decays, err2, ref2, bias)
  ]


SIGNED_MAPS = qz.CODES


def section_signed(quick: bool, log) -> dict:
  n = 4096
  steps = 400 if quick else 2000
  decays = (0.9, 0.99, 0.999)
  out = {"n": n, "steps": steps, "rows": []}
  for code in SIGNED_MAPS:
    for gk in ("normal", "wide", "heavy", "sparse"):
      rows = ema_signed_accuracy(code, gk, decays, steps, n)
      out["rows"] += [{"code": code, "gradients": gk, **r} for r in rows]
      log(f"  signed {code:8s} {gk:6s} rel. RMS " + " / ".join(f"{100 * r['rel_rms']:.1f}%" for r in rows))
  return out


def format_signed(sg: dict) -> str:
  lines = [
    f"EMA of g (a first moment) in signed 8-bit codes, stochastic rounding, {sg['steps']} steps, {sg['n']}"
    " elements; relative RMS error ||mu_8bit - mu_f32|| / ||mu_f32|| over the last quarter."
    " Cells: decay 0.9 / 0.99 / 0.999.",
    "",
    "| code | " + " | ".join(("normal", "wide", "heavy", "sparse")) + " |",
    "|---|---|---|---|---|",
  ]
  table: dict[str, dict[str, list]] = {}
  for r in sg["rows"]:
    table.setdefault(r["code"], {}).setdefault(r["gradients"], []).append(r)
  for code, by in table.items():
    cells = [
      " / ".join(f"{100 * r['rel_rms']:.1f}" for r in by[g]) for g in ("normal", "wide", "heavy", "sparse")
    ]
    lines.append(f"| {code} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


ACCURACY_CONFIGS = (
  [("bf16_nearest", "-", "-"), ("bf16_stochastic", "-", "-")]
  + [("q8", c, "exact") for c in MAPS]
  + [("q8", c, "bound") for c in ("float_e5", "float_e4")]
)


def section_accuracy(quick: bool, log) -> dict:
  n = 4096 if quick else 8192
  steps = 400 if quick else 1500
  decays = (0.9, 0.99, 0.999)
  out = {"n": n, "steps": steps, "rows": []}
  for storage, code, scale in ACCURACY_CONFIGS:
    for gk in GRADIENTS:
      t0 = time.perf_counter()
      rows = ema_accuracy(storage, code, scale, gk, decays, steps, n)
      for r in rows:
        out["rows"].append({"storage": storage, "code": code, "scale": scale, "gradients": gk, **r})
      log(f"  accuracy {storage:15s} {code:8s} {scale:5s} {gk:6s} {time.perf_counter() - t0:5.1f} s")
  return out


def format_accuracy(acc: dict) -> str:
  lines = [
    f"EMA of g**2 over {acc['steps']} steps, {acc['n']} elements (blocks of 256), statistics over the last"
    " quarter; step = 1/sqrt(nu + 1e-8) with the stored nu, relative to the float32 EMA of the same"
    " gradients. Cells: decay 0.9 / 0.99 / 0.999.",
    "",
    "| storage | scale | gradients | nu bias % | nu rel. RMS % | step bias % | step rel. RMS % |"
    " max step ratio | step rel. RMS % (floor) | max ratio (floor) |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  groups: dict[tuple, list] = {}
  for r in acc["rows"]:
    groups.setdefault((r["storage"], r["code"], r["scale"], r["gradients"]), []).append(r)

  def cell(rs, f, fmt="{:.2f}"):
    return " / ".join(fmt.format(f(r)) for r in rs)

  for (storage, code, scale, gk), rs in groups.items():
    name = storage if storage != "q8" else f"8-bit {code}"
    lines.append(
      f"| {name} | {scale} | {gk} | {cell(rs, lambda r: 100 * r['nu_bias'])} |"
      f" {cell(rs, lambda r: 100 * r['nu_rel_rms'], '{:.1f}')} |"
      f" {cell(rs, lambda r: 100 * r['stored']['step_bias'])} |"
      f" {cell(rs, lambda r: 100 * r['stored']['step_rel_rms'], '{:.1f}')} |"
      f" {cell(rs, lambda r: r['stored']['step_max_ratio'], '{:.3g}')} |"
      f" {cell(rs, lambda r: 100 * r['floor']['step_rel_rms'], '{:.1f}')} |"
      f" {cell(rs, lambda r: r['floor']['step_max_ratio'], '{:.3g}')} |"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------- 2. training parity

TRAIN_CONFIGS = {
  "float32": dict(storage="f32"),
  "bf16 nearest": dict(storage="bf16_nearest"),
  "bf16 stochastic": dict(storage="bf16_stochastic"),
  "8-bit float_e5, bound": dict(storage="q8", code="float_e5", scale="bound"),
  "8-bit float_e5, exact": dict(storage="q8", code="float_e5", scale="exact"),
  "8-bit float_e4, exact": dict(storage="q8", code="float_e4", scale="exact"),
  "8-bit dynamic, exact": dict(storage="q8", code="dynamic", scale="exact"),
  "8-bit sqrt, exact": dict(storage="q8", code="sqrt", scale="exact"),
  "8-bit linear, exact": dict(storage="q8", code="linear", scale="exact"),
}


def section_training(quick: bool, log) -> dict:
  from rmsprop_jax import demo

  data = demo.load_digits(0)
  x_tr, y_tr, x_te, y_te = (jnp.asarray(a) for a in data)
  steps = 100 if quick else 500
  batches = jnp.asarray(np.random.default_rng(0).integers(0, len(x_tr), size=(steps, 64)))
  params0 = demo.init_mlp(jax.random.key(0), (x_tr.shape[1], 256, 256, 10))
  out = {"steps": steps, "rows": []}
  for decay in (0.9, 0.999):
    ref_curve = None
    for name, cfg in TRAIN_CONFIGS.items():
      opt = rmsprop_lowp(1e-3, decay, **cfg)

      @jax.jit
      def train(params, opt=opt):
        def step(carry, idx):
          p, s = carry
          loss, g = jax.value_and_grad(demo.loss_fn)(p, x_tr[idx], y_tr[idx])
          u, s = opt.update(g, s, p)
          return (optax.apply_updates(p, u), s), loss

        (p, _), losses = lax.scan(step, (params, opt.init(params)), batches)
        return p, losses

      p, losses = train(params0)
      losses = np.asarray(losses)
      curve = np.convolve(losses, np.ones(20) / 20, mode="valid")
      ref_curve = curve if ref_curve is None else ref_curve
      row = {
        "decay": decay,
        "config": name,
        "final_train_loss": float(demo.loss_fn(p, x_tr, y_tr)),
        "test_accuracy": float(jnp.mean(jnp.argmax(demo.mlp(p, x_te), -1) == y_te)),
        "max_curve_gap": float(np.max(np.abs(curve - ref_curve)) / ref_curve[0]),
        "mean_curve_gap": float(np.mean(np.abs(curve - ref_curve)) / ref_curve[0]),
      }
      out["rows"].append(row)
      log(
        f"  training decay {decay} {name:22s} loss {row['final_train_loss']:.4f}"
        f" acc {row['test_accuracy']:.3f}"
      )
  return out


def format_training(tr: dict) -> str:
  lines = [
    f"MLP 64-256-256-10 on digits, batch 64, {tr['steps']} steps, lr 1e-3, eps 1e-8, same data order;"
    " leaves >= 4096 params in 8 bits (the two big weight matrices), step divides by the stored nu."
    " Curve gap: |smoothed loss - float32's| (20-step moving average) over float32's initial loss,"
    " the largest and the mean over the run.",
    "",
    "| decay | nu storage | final train loss | test accuracy | max curve gap | mean curve gap |",
    "|---|---|---|---|---|---|",
  ]
  for r in tr["rows"]:
    lines.append(
      f"| {r['decay']} | {r['config']} | {r['final_train_loss']:.2e} | {r['test_accuracy']:.3f} |"
      f" {100 * r['max_curve_gap']:.2f}% | {100 * r['mean_curve_gap']:.2f}% |"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------- 3. speed

SPEED_CONFIGS = {
  "optax float32": None,
  "optax float32 (again)": None,
  "bf16 nearest": dict(storage="bf16_nearest"),
  "bf16 stochastic": dict(storage="bf16_stochastic"),
  "8-bit float_e5, bound": dict(storage="q8", code="float_e5", scale="bound"),
  "8-bit float_e5, bound, floor": dict(storage="q8", code="float_e5", scale="bound", denominator="floor"),
  "8-bit float_e5, exact": dict(storage="q8", code="float_e5", scale="exact"),
  "8-bit float_e5, bound, fresh": dict(storage="q8", code="float_e5", scale="bound", denominator="fresh"),
  "8-bit float_e5, naive max": dict(storage="q8", code="float_e5", scale="naive"),
  "8-bit float_e4, bound": dict(storage="q8", code="float_e4", scale="bound"),
  "8-bit sqrt, bound": dict(storage="q8", code="sqrt", scale="bound"),
  "8-bit linear, bound": dict(storage="q8", code="linear", scale="bound"),
  "8-bit dynamic, bound": dict(storage="q8", code="dynamic", scale="bound"),
}


def _state_bytes(state) -> int:
  return int(sum(x.nbytes for x in jax.tree.leaves(state)))


def section_speed(quick: bool, log, rounds: int = 7) -> dict:
  shapes = conv_net_shapes(quick)
  params = make_tree(shapes)
  grads = make_tree(shapes, seed=1)
  n = sum(math.prod(s) for s in shapes)
  compiled, carry, info = {}, {}, {}
  for name, cfg in SPEED_CONFIGS.items():
    opt = optax.rmsprop(1e-3) if cfg is None else rmsprop_lowp(1e-3, **cfg)

    def step(p, s, g, opt=opt):
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s

    p = jax.tree.map(jnp.copy, params)
    s = opt.init(p)
    c = jax.jit(step, donate_argnums=(0, 1)).lower(p, s, grads).compile()
    compiled[name], carry[name] = c, [p, s]
    info[name] = {"xla_bytes_per_param": xla_bytes_accessed(c) / n, "state_bytes": _state_bytes(s)}
  wall = {k: [] for k in compiled}
  cpu = {k: [] for k in compiled}
  names = list(compiled)
  for r in range(2 if quick else rounds):
    for name in names if r % 2 == 0 else names[::-1]:
      c, cr = compiled[name], carry[name]
      cr[0], cr[1] = c(cr[0], cr[1], grads)
      jax.block_until_ready(cr)
      reps = 1 if "dynamic" in name else 4
      for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        cr[0], cr[1] = c(cr[0], cr[1], grads)
        jax.block_until_ready(cr)
        wall[name].append(time.perf_counter() - t0)
        cpu[name].append(time.process_time() - c0)
  base = statistics.median(wall["optax float32"])
  base_cpu = statistics.median(cpu["optax float32"])
  base_bytes = info["optax float32"]["state_bytes"]
  rows = []
  for name in names:
    w = wall[name]
    med = statistics.median(w)
    q1, q3 = np.percentile(w, [25, 75])
    rows.append(
      {
        "config": name,
        "median_ms": 1e3 * med,
        "ratio": med / base,
        "iqr_ratio": [q1 / base, q3 / base],
        "min_ratio": min(w) / min(wall["optax float32"]),
        "cpu_ratio": statistics.median(cpu[name]) / base_cpu,
        "xla_bytes_per_param": info[name]["xla_bytes_per_param"],
        "state_ratio": info[name]["state_bytes"] / base_bytes,
      }
    )
    log(
      f"  speed {name:28s} {1e3 * med:8.2f} ms  x{med / base:5.2f}"
      f"  bytes/param {rows[-1]['xla_bytes_per_param']:.1f}"
    )
  return {"n_params": n, "rows": rows}


def format_speed(sp: dict) -> str:
  lines = [
    f"Jitted step (update + apply_updates, params and state donated) on the big tree ({sp['n_params']:,}"
    " params), alternating configurations each round. Ratios to the first optax row; IQR: quartiles of"
    " the per-call times over optax's median; min: fastest call over optax's fastest; CPU: process CPU"
    " time per call (both threads) over optax's.",
    "",
    "| configuration | median ms | / optax | IQR / optax | min / optax | CPU / optax | XLA bytes/param |"
    " state / float32 |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for r in sp["rows"]:
    lines.append(
      f"| {r['config']} | {r['median_ms']:.2f} | {r['ratio']:.2f} |"
      f" {r['iqr_ratio'][0]:.2f}-{r['iqr_ratio'][1]:.2f} | {r['min_ratio']:.2f} | {r['cpu_ratio']:.2f} |"
      f" {r['xla_bytes_per_param']:.1f} | {r['state_ratio']:.3f} |"
    )
  return "\n".join(lines)


# ----------------------------------------------------------------- 3b. per-block maximum alone


def _sel(a, b):
  return lax.select(lax.gt(a, b), a, b)


BLOCKMAX = {
  "reshape + max": lambda v: jnp.max(jnp.abs(v).reshape(-1, 256), axis=1),
  "tree of maximum over halves": None,
  "two-stage float (32x8, select then max)": lambda v: jnp.max(
    lax.reduce(jnp.abs(v).reshape(-1, 32, 8), np.float32(0), _sel, (1,)), axis=1
  ),
  "qz.block_absmax (int bits, two-stage)": None,
}


def _tree_max(v):
  v = jnp.abs(v).reshape(-1, 256)
  while v.shape[1] > 1:
    h = v.shape[1] // 2
    v = jnp.maximum(v[:, :h], v[:, h:])
  return v[:, 0]


def section_blockmax(quick: bool, log, rounds: int = 9) -> dict:
  n = (1 << 16) if quick else (1 << 24)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((n // 4096, 4096), dtype=np.float32))
  fns = dict(BLOCKMAX)
  fns["tree of maximum over halves"] = _tree_max
  fns["qz.block_absmax (int bits, two-stage)"] = lambda v: qz.block_absmax(v).reshape(-1)
  comp = {k: jax.jit(lambda v, s, f=f: 0.9 * s + 0.1 * f(v), donate_argnums=1) for k, f in fns.items()}
  state = {k: jnp.zeros((n // 256,), jnp.float32) for k in fns}
  times = {k: [] for k in fns}
  names = list(fns)
  for r in range(2 if quick else rounds):
    for k in names if r % 2 == 0 else names[::-1]:
      state[k] = comp[k](x, state[k])
      state[k].block_until_ready()
      t0 = time.perf_counter()
      state[k] = comp[k](x, state[k])
      state[k].block_until_ready()
      times[k].append(time.perf_counter() - t0)
  want = np.abs(np.asarray(x)).reshape(-1, 256).max(1)
  rows = []
  for k in names:
    ok = bool(np.array_equal(np.asarray(fns[k](x)), want))
    rows.append({"method": k, "median_ms": 1e3 * statistics.median(times[k]), "correct": ok})
    log(f"  block max {k:42s} {rows[-1]['median_ms']:8.2f} ms  correct={ok}")
  return {"n": n, "rows": rows}


def format_blockmax(bm: dict) -> str:
  lines = [
    f"Per-block maximum of |x| alone, {bm['n']:,} float32 values, folded into a donated scale"
    " (median ms per call).",
    "",
    "| method | ms | GB/s of x read |",
    "|---|---|---|",
  ]
  for r in bm["rows"]:
    lines.append(f"| {r['method']} | {r['median_ms']:.2f} | {4 * bm['n'] / r['median_ms'] / 1e6:.1f} |")
  return "\n".join(lines)


# ----------------------------------------------------------------- driver

SECTIONS = {
  "accuracy": (section_accuracy, format_accuracy),
  "signed": (section_signed, format_signed),
  "training": (section_training, format_training),
  "speed": (section_speed, format_speed),
  "blockmax": (section_blockmax, format_blockmax),
}


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="small sizes, a smoke run")
  ap.add_argument(
    "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS)
  )
  ap.add_argument("--json", default=None, help="write the raw numbers here")
  args = ap.parse_args(argv)
  results: dict[str, Any] = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  t_all = time.perf_counter()
  for name in args.sections.split(","):
    t0 = time.perf_counter()
    print(f"== {name}", flush=True)
    results[name] = SECTIONS[name][0](args.quick, lambda s: print(s, flush=True))
    results[name]["seconds"] = time.perf_counter() - t0
  print(f"\n(total {time.perf_counter() - t_all:.0f} s)\n")
  for name in args.sections.split(","):
    print(f"### {name}\n\n{SECTIONS[name][1](results[name])}\n")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)
  return results


if __name__ == "__main__":
  main()
