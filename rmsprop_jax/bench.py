"""Benchmarks: ours against optax.rmsprop (and torch RMSprop) on this machine.

``python -m rmsprop_jax bench`` runs every case in several fresh processes. On
a small shared VM whole processes of the same program differ by 20-40% (the
load changes between them), so the ratio against optax is paired: each process
builds optax and ours, then times them in turn, round after round, reversing
the order every other round and from one process to the next (identical code
differs by up to 10% in one process depending on what was built first); a
process's ratio is the median of its rounds' ratios, and the reported ratio
the median of the processes' ratios, with their spread. ``compile_600`` (a
first compile) and ``scale_out`` (8 host devices) run one implementation per
process, torch always runs in processes of its own. Also reported: each
implementation's median time over processes and its spread, compile times,
state bytes and the share of the streaming memory bandwidth measured in the
same run.

Model-scale cases (issue 20), each for plain RMSProp and for centered with
momentum (``_cm``), each storage of ours (float32, bfloat16 ``nu``, 8-bit)
against ``optax.rmsprop`` with the same options, one implementation per fresh
process: ``init_eager`` / ``init_jit``, the first call of ``opt.init`` /
``jax.jit(opt.init)`` on a 99M-param tree of 56 transformer leaves made under
``jit`` (and how many XLA constant-folding warnings it printed);
``compile_200_leaves`` / ``compile_600_leaves``, trace + compile of the
jitted, donated step on 200 / 600 leaves of 256x1024 (from abstract shapes);
``peak_bytes`` (also ``_momentum``), the peak bytes per parameter
(arguments, temporaries and outputs that reuse no donated buffer, by XLA's
memory analysis: deterministic, one process) of the optimizer step and of a
whole MLP train step (6 layers of 2048x2048, batch 32), with the train
step's target: optax's float32 peak minus the state bytes saved.
``step_8bit_<option>``: the 8-bit step time with each option of
``OPTIONS`` against optax's float32 step with the same options (paired, as
``big_tree``). Groups select several cases: ``--cases init compile peak
step_8bit``.

A worker process is ``python -m rmsprop_jax.bench CASE IMPL [IMPL ...] [--quick]``;
it prints one JSON line, the numbers of each implementation.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

# case -> (description, implementations compared, target ratio ours/optax)
CASES: dict[str, tuple[str, tuple[str, ...], str]] = {
  "big_tree": ("conv-net-like tree (16M params), jitted step, donated", ("optax", "ours", "torch"), "<= 1.0"),
  "big_tree_bf16": ("same, ours with nu_dtype=bfloat16", ("optax", "ours_bf16"), "<= 0.85"),
  "big_tree_8bit": ("same, ours with state_bits=8", ("optax", "ours_8bit"), "<= 1.0"),
  "many_leaves_scan": ("600 leaves x 1,000 params, per step inside lax.scan", ("optax", "ours"), "<= 1.0"),
  "many_leaves_step": ("600 leaves x 1,000 params, one jitted step per call", ("optax", "ours"), "-"),
  "compile_600": ("compile time of the 600-leaf jitted step", ("optax", "ours"), "<= 1.0"),
  "eager_update": ("un-jitted update, 100 leaves x 20k params", ("optax", "ours"), "<= 0.15"),
  "one_big_leaf": ("one 16M-param leaf, jitted step, donated", ("optax", "ours"), "<= 1.0"),
  "scale_out": (
    "8 host devices, data-parallel step, state replicated vs sharded over data (ZeRO-1)",
    ("replicated", "zero1"),
    "-",
  ),
}

# Option sets of the model-scale cases, by the suffix of a case's name: ours and
# optax's equivalent (``_optax_equivalent``) are built with the same options.
OPTIONS: dict[str, dict[str, Any]] = {
  "plain": {},
  "momentum": {"momentum": 0.9},
  "nesterov": {"momentum": 0.9, "nesterov": True},
  "centered": {"centered": True},
  "cm": {"centered": True, "momentum": 0.9},
  "wd_coupled": {"weight_decay": 1e-2},
  "wd_decoupled": {"weight_decay": 1e-2, "weight_decay_mode": "decoupled"},
  "eps_outside": {"eps_in_sqrt": False},
  "lr_after_momentum": {"momentum": 0.9, "lr_inside_momentum": False},
  "bias_correction": {"bias_correction": True},
}

# Each storage of ours against optax.rmsprop (float32) with the same options.
STORAGE_IMPLS = ("optax", "ours", "ours_bf16", "ours_8bit")

# Model-scale cases (issue 20), each for plain and for centered+momentum ("_cm"):
# the first call of init on a 99M-param tree, eager and jitted; trace + compile
# of the donated step on 200 and 600 leaves of 256x1024; peak bytes per param of
# the optimizer step and of a whole train step (deterministic: one process).
SCALE_CASES: dict[str, tuple[str, tuple[str, ...], str]] = {}
for _suffix, _opt in (("", "plain"), ("_cm", "cm")):
  _with = "" if _opt == "plain" else ", centered+momentum"
  SCALE_CASES |= {
    f"init_eager{_suffix}": (
      f"first eager opt.init(params), 99M params in 56 transformer leaves made under jit{_with}",
      STORAGE_IMPLS,
      "<= 1.5",
    ),
    f"init_jit{_suffix}": (f"first jax.jit(opt.init)(params), same tree{_with}", STORAGE_IMPLS, "<= 1.5"),
    f"compile_200_leaves{_suffix}": (
      f"trace + compile of the donated step, 200 leaves of 256x1024{_with}",
      STORAGE_IMPLS,
      "<= 1.5 (float32 <= 1.0)",
    ),
    f"compile_600_leaves{_suffix}": (
      f"trace + compile of the donated step, 600 leaves of 256x1024{_with}",
      STORAGE_IMPLS,
      "<= 1.5 (float32 <= 1.0)",
    ),
  }
for _suffix, _opt in (("", "plain"), ("_momentum", "momentum"), ("_cm", "cm")):
  SCALE_CASES[f"peak_bytes{_suffix}"] = (
    f"peak bytes per param (memory_analysis), optimizer step and MLP train step, {_opt}",
    STORAGE_IMPLS,
    "train: <= optax - state saved + 0.3 (+ copy)",
  )
STEP_8BIT_CASES: dict[str, tuple[str, tuple[str, ...], str]] = {
  f"step_8bit_{name}": (
    f"conv-net tree (16M params), donated step, 8-bit state vs optax float32, {name}",
    ("optax", "ours_8bit"),
    "<= 1.3",
  )
  for name in OPTIONS
}
CASES |= SCALE_CASES | STEP_8BIT_CASES
del _suffix, _opt, _with

# Names that select several cases at once (``--cases init step_8bit``).
CASE_GROUPS: dict[str, tuple[str, ...]] = {
  group: tuple(c for c in CASES if c.startswith(prefix))
  for group, prefix in (
    ("init", "init_"),
    ("compile", "compile_"),
    ("peak", "peak_bytes"),
    ("step_8bit", "step_8bit_"),
  )
}

# Cases that need several devices, and how many: their workers (and only
# theirs) run on that many host CPU devices (--xla_force_host_platform_device_count).
HOST_DEVICES: dict[str, int] = {"scale_out": 8}

# Cases run one implementation per fresh process: a first compile (or a first
# init), and the multi-device case. Every other case times its JAX
# implementations paired, in one process (``run_paired``); torch always runs in
# processes of its own.
UNPAIRED: frozenset[str] = frozenset({"compile_600", *HOST_DEVICES, *SCALE_CASES})

# Cases whose numbers are deterministic (bytes, not times): one process each.
DETERMINISTIC: frozenset[str] = frozenset(c for c in SCALE_CASES if c.startswith("peak_bytes"))


def case_options(case: str) -> str:
  """The option set (a key of OPTIONS) a case builds its optimizers with."""
  if case.startswith("step_8bit_"):
    return case[len("step_8bit_") :]
  for suffix, name in (("_cm", "cm"), ("_momentum", "momentum")):
    if case in SCALE_CASES and case.endswith(suffix):
      return name
  return "plain"


# ----------------------------------------------------------------- trees


def conv_net_shapes(quick: bool = False) -> list[tuple[int, ...]]:
  """Leaf shapes of a ResNet-like model: 3x3 convs, norm scales/biases, a head."""
  widths, depth = ((8, 16, 32, 64), 2) if quick else ((64, 128, 256, 512), 4)
  shapes: list[tuple[int, ...]] = [(7, 7, 3, widths[0])]
  prev = widths[0]
  for i, w in enumerate(widths):
    n = depth + (2 if i == len(widths) - 1 else 0)
    for _ in range(n):
      shapes += [(3, 3, prev, w), (w,), (w,)]
      prev = w
  shapes += [(prev, 1000), (1000,)]
  return shapes


def _tree(shapes, dtype="float32", seed=0):
  """Standard-normal leaves, drawn with NumPy (jax.random would compile per shape)."""
  import jax.numpy as jnp
  import numpy as np

  rng = np.random.default_rng(seed)
  return {
    f"p{i:03d}": jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype=jnp.dtype(dtype))
    for i, s in enumerate(shapes)
  }


def _case_shapes(case: str, quick: bool) -> list[tuple[int, ...]]:
  if case.startswith("big_tree") or case == "scale_out":
    return conv_net_shapes(quick)
  if case in ("many_leaves_scan", "many_leaves_step", "compile_600"):
    return [(1000,)] * (60 if quick else 600)
  if case == "eager_update":
    return [(20_000,)] * (10 if quick else 100)
  if case == "one_big_leaf":
    return [(1 << 14 if quick else 1 << 24,)]
  if case.startswith("step_8bit_"):  # quick: a few quantized leaves and a bias
    return [(64, 256), (64, 256), (256,)] if quick else conv_net_shapes()
  if case.startswith("init_"):
    return transformer_shapes(quick)
  if case.startswith("compile_") and case in SCALE_CASES:
    n = int(case.split("_")[1])
    return [(16, 64) if quick else (256, 1024)] * (n // 10 if quick else n)
  if case.startswith("peak_bytes"):
    return mlp_shapes(quick)
  raise ValueError(f"unknown case {case!r}; choose from {sorted(CASES)}")


def transformer_shapes(quick: bool = False) -> list[tuple[int, ...]]:
  """56 leaves of a 6-layer transformer (99.1M params): embedding, per layer a
  norm scale, q/k/v/o projections, a norm scale, the MLP (with its bias), and a
  final norm scale."""
  vocab, d, ffn, layers = (512, 64, 256, 6) if quick else (23040, 1024, 4096, 6)
  shapes: list[tuple[int, ...]] = [(vocab, d)]
  for _ in range(layers):
    shapes += [(d,), (d, d), (d, d), (d, d), (d, d), (d,), (d, ffn), (ffn,), (ffn, d)]
  return shapes + [(d,)]


def mlp_shapes(quick: bool = False) -> list[tuple[int, ...]]:
  """An MLP of 6 layers of 2048x2048 (25.2M params), weights and biases."""
  width = 64 if quick else 2048
  return [s for _ in range(6) for s in ((width, width), (width,))]


def _make_opt(impl: str, options: str = "plain"):
  """An implementation (optax, or ours in a storage) with the named OPTIONS."""
  import jax.numpy as jnp

  from rmsprop_jax import rmsprop

  kw = OPTIONS[options]
  if impl == "optax":
    return _optax_equivalent(kw)
  storage = {"ours": {}, "ours_bf16": {"nu_dtype": jnp.bfloat16}, "ours_8bit": {"state_bits": 8}}
  if impl not in storage:
    raise ValueError(impl)
  return rmsprop(1e-3, **kw, **storage[impl])


def _optax_equivalent(kw: dict[str, Any]):
  """optax's float32 RMSProp with the options ``kw`` of :func:`rmsprop_jax.rmsprop`.

  ``optax.rmsprop`` where it has the option; PyTorch's order (learning rate
  after the buffer) and weight decay as chains of optax's own transformations.
  """
  import optax

  lr = 1e-3
  kw = dict(kw)
  wd = kw.pop("weight_decay", 0.0)
  mode = kw.pop("weight_decay_mode", "coupled")
  if kw.pop("lr_inside_momentum", True):
    core = optax.rmsprop(lr, **kw)
  else:  # the buffer accumulates unscaled steps, the learning rate scales its output
    momentum, nesterov = kw.pop("momentum"), kw.pop("nesterov", False)
    scale = optax.scale_by_stddev if kw.pop("centered", False) else optax.scale_by_rms
    core = optax.chain(scale(**kw), optax.trace(momentum, nesterov), optax.scale(-lr))
  if not wd:
    return core
  if mode == "coupled":
    return optax.chain(optax.add_decayed_weights(wd), core)
  return optax.chain(core, optax.add_decayed_weights(-lr * wd))


# ----------------------------------------------------------------- timing


def _median_time(
  launch: Callable[[], Any],
  iters: int,
  warmup: int = 2,
  wait: Callable[[Any], Any] | None = None,
  min_sample_s: float = 2e-3,
) -> float:
  """Median seconds per call of ``launch`` (which returns what ``wait`` blocks on).

  Each sample runs enough calls back to back, then waits once, to last at least
  ``min_sample_s``: a step of microseconds (a GPU) is timed by its throughput,
  not by the host's launch latency per call. The CPU steps here take longer,
  so each of their samples is one call.
  """
  if wait is None:
    import jax

    wait = jax.block_until_ready
  for _ in range(warmup):
    wait(launch())
  t0 = time.perf_counter()
  wait(launch())
  reps = min(1000, max(1, math.ceil(min_sample_s / max(time.perf_counter() - t0, 1e-9))))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    for _ in range(reps):
      out = launch()
    wait(out)
    times.append((time.perf_counter() - t0) / reps)
  return statistics.median(times)


def measure_bandwidth(quick: bool = False) -> float:
  """Streaming bandwidth (bytes/s): an XLA triad ``a = a + 1.5 * b`` in place.

  ``a`` is donated, as the optimizer steps' buffers are, so the number is not
  diluted by page faults on fresh output buffers: 12 bytes per element moved.
  """
  import jax
  import jax.numpy as jnp

  n = (1 << 20) if quick else (1 << 25)
  arrays = [jnp.ones(n, jnp.float32), jnp.ones(n, jnp.float32)]
  triad = jax.jit(lambda a, b: a + 1.5 * b, donate_argnums=0)

  def call():
    arrays[0] = triad(arrays[0], arrays[1])
    return arrays[0]

  t = _median_time(call, 3 if quick else 15)
  return 3 * 4 * n / t


def _state_bytes(state) -> int:
  """Bytes of a state's arrays (or of their ``jax.ShapeDtypeStruct`` s)."""
  import jax
  import numpy as np

  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def xla_bytes_accessed(compiled) -> float | None:
  """Bytes a compiled program reads and writes per call, by XLA's cost analysis.

  Deterministic (no timing noise): two programs with the same figure stream
  the same memory, so at the memory roofline they take the same time.
  """
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):  # older JAX: one dict per computation
    cost = cost[0] if cost else None
  if not cost or "bytes accessed" not in cost:
    return None
  return float(cost["bytes accessed"])


def _ours_key(med: dict[str, Any]) -> str:
  """Which of our implementations a case compares with optax."""
  return next((k for k in ("ours_bf16", "ours_8bit") if k in med), "ours")


def _bytes_per_step(params, nu_bytes_per_elem: float) -> int:
  """Minimal traffic of a plain RMSProp step: read g, p, nu; write p, nu."""
  import jax

  n = sum(x.size for x in jax.tree.leaves(params))
  return int(n * (3 * 4 + 2 * nu_bytes_per_elem))


def _header(case: str, impl: str, shapes: list[tuple[int, ...]]) -> dict[str, Any]:
  import jax

  return {
    "case": case,
    "impl": impl,
    "device": jax.devices()[0].device_kind,
    "n_params": sum(math.prod(s) for s in shapes),
    "n_leaves": len(shapes),
  }


def _setup(case: str, impl: str, quick: bool) -> tuple[dict[str, Any], Callable[[], Any] | None, int]:
  """Builds one JAX (case, implementation) in this process and compiles it.

  Returns the numbers known without timing (sizes, state bytes, compile time or,
  eager, the first call's time, XLA's bytes, the minimal bytes of a step), a
  ``call`` that runs the timed unit on its own donated params and state, and
  the steps one call makes (a call's time is divided by it). ``call`` is None
  for ``compile_600``, whose time is its compile.
  """
  import jax
  import optax

  shapes = _case_shapes(case, quick)
  out = _header(case, impl, shapes)
  params = _tree(shapes)
  grads = _tree(shapes, seed=1)
  opt = _make_opt(impl, case_options(case))
  state = opt.init(params)
  out["state_bytes"] = _state_bytes(state)

  def step(p, s, g):
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  if case == "eager_update":

    def eager():
      u, _ = opt.update(grads, state, params)
      return u

    t0 = time.perf_counter()
    jax.block_until_ready(eager())
    out["first_call_s"] = time.perf_counter() - t0
    return out, eager, 1

  length = 1
  if case == "many_leaves_scan":
    length = 20 if quick else 200

    def scanned(p, s, g):
      def body(carry, _):
        p, s = carry
        return step(p, s, g), None

      return jax.lax.scan(body, (p, s), None, length=length)[0]

    fn = jax.jit(scanned, donate_argnums=(0, 1))
  else:
    fn = jax.jit(step, donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = fn.lower(params, state, grads).compile()
  out["compile_s"] = time.perf_counter() - t0
  if case != "many_leaves_scan":  # a loop's cost is not counted per iteration
    nbytes = xla_bytes_accessed(compiled)
    if nbytes is not None:
      out["xla_bytes_per_param"] = nbytes / out["n_params"]
  if case == "compile_600":
    out["time_s"] = out["compile_s"]
    return out, None, 1
  if case in ("big_tree", "big_tree_bf16", "big_tree_8bit", "one_big_leaf"):
    nu_b = {"ours_bf16": 2, "ours_8bit": 1 + 4 / 256}.get(impl, 4)
    out["bytes_per_step"] = _bytes_per_step(params, nu_b)
  carry = [params, state]

  def call():
    carry[0], carry[1] = compiled(carry[0], carry[1], grads)
    return carry

  return out, call, length


def run_case(case: str, impl: str, quick: bool = False) -> dict[str, Any]:
  """Runs one (case, implementation) in this process; returns its numbers."""
  iters = 3 if quick else 20
  shapes = _case_shapes(case, quick)
  if impl == "torch":
    return {**_header(case, impl, shapes), **_run_torch(shapes, iters)}
  if case == "scale_out":
    return {**_header(case, impl, shapes), **_run_scale_out(impl, quick, iters)}
  if case in SCALE_CASES:
    run = {"init": _run_init, "comp": _run_compile, "peak": _run_peak}[case[:4]]
    return {**_header(case, impl, shapes), **run(case, impl, shapes)}
  out, call, steps = _setup(case, impl, quick)
  if call is not None:
    out["time_s"] = _median_time(call, iters) / steps
  return out


def run_paired(
  case: str, impls: tuple[str, ...], quick: bool = False, rounds: int | None = None, iters: int | None = None
) -> dict[str, dict[str, Any]]:
  """Times several JAX implementations of a step-time case in this process, paired.

  All are built and compiled first, in the order given (so a later compile may
  find warm caches), then timed in turn, round after round, the order reversed
  on odd rounds (AB BA AB ...); each round is a ``_median_time`` of ``iters``
  samples per implementation. Within a round all see the same machine load, so
  their ratio holds steady where the times of whole processes drift. Returns,
  per implementation, ``run_case``'s numbers with ``time_s`` the median over
  rounds and ``round_s`` the time of each round.
  """
  if case in UNPAIRED:
    raise ValueError(f"{case!r} runs one implementation per process (run_case)")
  rounds = rounds or (2 if quick else 8)
  iters = iters or (3 if quick else 5)
  built = {impl: _setup(case, impl, quick) for impl in impls}
  round_s: dict[str, list[float]] = {impl: [] for impl in impls}
  for r in range(rounds):
    for impl in impls if r % 2 == 0 else impls[::-1]:
      _, call, steps = built[impl]
      assert call is not None, f"{case!r} has no timed call"  # only UNPAIRED cases have none
      round_s[impl].append(_median_time(call, iters, warmup=1) / steps)
  return {
    impl: {**out, "time_s": statistics.median(round_s[impl]), "round_s": round_s[impl]}
    for impl, (out, _, _) in built.items()
  }


def _run_torch(shapes, iters) -> dict[str, Any]:
  """torch.optim.RMSprop(foreach=True) on the device JAX uses (CPU or CUDA)."""
  import jax

  try:
    import torch
  except ImportError:
    return {"skipped": "torch is not installed"}
  on_gpu = jax.default_backend() == "gpu"
  if on_gpu and not torch.cuda.is_available():
    return {"skipped": "JAX runs on a GPU but this torch has no CUDA: no like-for-like timing"}
  device = "cuda" if on_gpu else "cpu"
  sync = torch.cuda.synchronize if on_gpu else (lambda: None)
  torch.manual_seed(0)
  params = [torch.randn(s, device=device) for s in shapes]
  for p in params:
    p.grad = torch.randn_like(p)
  opt = torch.optim.RMSprop(params, lr=1e-3, foreach=True)

  t = _median_time(opt.step, iters, wait=lambda _: sync())
  return {"time_s": t, "torch_device": device, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------- model scale (issue 20)


def _params_made_under_jit(shapes):
  """Params as a Flax or plain-JAX model makes them: the outputs of a ``jax.jit``
  (values from a cheap formula: a random initializer would only add its own
  compile time, and init does not read the values)."""
  import jax
  import jax.numpy as jnp

  def make():
    return {
      f"p{i:03d}": 0.02 * jnp.cos(jax.lax.iota(jnp.float32, math.prod(s)).reshape(s) * 1e-3 + i)
      for i, s in enumerate(shapes)
    }

  return jax.block_until_ready(jax.jit(make)())


def _run_init(case: str, impl: str, shapes) -> dict[str, Any]:
  """The first call of ``opt.init`` (eager) or ``jax.jit(opt.init)`` (tracing,
  compiling and running it), then a second call (compiled, cached)."""
  import jax

  params = _params_made_under_jit(shapes)
  opt = _make_opt(impl, case_options(case))
  init = jax.jit(opt.init) if case.startswith("init_jit") else opt.init
  t0 = time.perf_counter()
  state = jax.block_until_ready(init(params))
  first = time.perf_counter() - t0
  out = {"time_s": first, "state_bytes": _state_bytes(state)}
  del state
  t0 = time.perf_counter()
  jax.block_until_ready(init(params))
  out["second_call_s"] = time.perf_counter() - t0
  return out


def _abstract(shapes):
  import jax
  import jax.numpy as jnp

  return {f"p{i:03d}": jax.ShapeDtypeStruct(s, jnp.float32) for i, s in enumerate(shapes)}


def _donated_step(opt):
  import optax

  def step(params, state, grads):
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _run_compile(case: str, impl: str, shapes) -> dict[str, Any]:
  """Trace + lower, and compile, of the jitted, donated step (nothing allocated)."""
  import jax

  params = _abstract(shapes)
  opt = _make_opt(impl, case_options(case))
  state = jax.eval_shape(opt.init, params)
  fn = jax.jit(_donated_step(opt), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  lowered = fn.lower(params, state, params)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {"time_s": t2 - t0, "trace_lower_s": t1 - t0, "xla_compile_s": t2 - t1}


def narrow_moment_bytes(state) -> int:
  """Bytes of the moments stored narrower than float32 (8-bit codes and their
  scales, bfloat16 arrays): the copy of each that a step may make (issue 20, item 4)."""
  import jax
  import jax.numpy as jnp

  from rmsprop_jax.quantize import QuantizedArray

  total = 0
  for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QuantizedArray)):
    if isinstance(x, QuantizedArray):
      total += x.codes.size * x.codes.dtype.itemsize + x.scale.size * x.scale.dtype.itemsize
    elif jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize < 4:
      total += x.size * x.dtype.itemsize
  return total


def peak_bytes(compiled) -> dict[str, int]:
  """Peak bytes of a compiled program from XLA's memory analysis.

  Arguments (donated or not) + temporaries + outputs that do not reuse a
  donated argument's buffer: everything alive at once at worst.
  """
  m = compiled.memory_analysis()
  peak = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return {"peak": int(peak), "temp": int(m.temp_size_in_bytes), "arguments": int(m.argument_size_in_bytes)}


def _mlp_train_step(opt):
  import jax
  import jax.numpy as jnp
  import optax

  def loss(params, x, y):
    h = x
    ws = list(params.values())
    for i in range(0, len(ws), 2):
      h = h @ ws[i] + ws[i + 1][None, :]
      if i + 2 < len(ws):
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  def step(params, state, x, y):
    grads = jax.grad(loss)(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _run_peak(case: str, impl: str, shapes) -> dict[str, Any]:
  """Peak bytes per param of the donated optimizer step and of a whole MLP train
  step (batch 32), compiled from abstract shapes (deterministic, no timing)."""
  import jax
  import jax.numpy as jnp

  params = _abstract(shapes)
  n = sum(math.prod(s) for s in shapes)
  opt = _make_opt(impl, case_options(case))
  state = jax.eval_shape(opt.init, params)
  batch = jax.ShapeDtypeStruct((32, shapes[0][0]), jnp.float32)
  step = jax.jit(_donated_step(opt), donate_argnums=(0, 1)).lower(params, state, params).compile()
  train = jax.jit(_mlp_train_step(opt), donate_argnums=(0, 1)).lower(params, state, batch, batch).compile()
  per = lambda b: b / n
  return {
    "state_bytes_per_param": per(_state_bytes(state)),
    "narrow_copy_bytes_per_param": per(narrow_moment_bytes(state)),
    "step": {k: per(v) for k, v in peak_bytes(step).items()},
    "train": {k: per(v) for k, v in peak_bytes(train).items()},
  }


def _summarize_scale(case: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """A row of a model-scale case: per storage its numbers and the ratio to optax's."""
  row = _row(case, runs)
  if case.startswith("peak_bytes"):
    # Deterministic: the first process's numbers. The train-step target: optax's
    # float32 peak minus the state bytes ours saves.
    per = {impl: rs[0] for impl, rs in runs.items() if rs}
    opt = per.get("optax")
    row["peak"] = {}
    for impl, r in per.items():
      entry = {"step": r["step"]["peak"], "train": r["train"]["peak"], "step_temp": r["step"]["temp"]}
      entry |= {"state": r["state_bytes_per_param"], "copy": r["narrow_copy_bytes_per_param"]}
      if opt is not None:
        saved = opt["state_bytes_per_param"] - r["state_bytes_per_param"]
        entry["train_target"] = opt["train"]["peak"] - saved
        entry["train_excess"] = r["train"]["peak"] - entry["train_target"]
      row["peak"][impl] = entry
    return row
  med = row["median_s"]
  if "optax" in med:
    row["ratio_vs_optax"] = {impl: t / med["optax"] for impl, t in med.items() if impl != "optax"}
  for key in ("second_call_s", "trace_lower_s", "xla_compile_s", "xla_constant_folding_warnings"):
    vals = {impl: statistics.median([r[key] for r in rs]) for impl, rs in runs.items() if rs and key in rs[0]}
    if vals:
      row[key] = vals
  return row


def _format_scale(rows: list[dict[str, Any]]) -> list[str]:
  """The model-scale rows: times and ratios per storage, then peak bytes."""
  impls = STORAGE_IMPLS
  lines: list[str] = []
  timed = [r for r in rows if not r["case"].startswith("peak_bytes")]
  if timed:
    lines += [
      "",
      "model scale: seconds (median over processes) and ratio to optax.rmsprop with the same options",
      f"{'case':<24}" + "".join(f"{i:>20}" for i in impls) + f"{'target':>26}",
    ]
    for r in timed:
      med, ratio = r["median_s"], r.get("ratio_vs_optax", {})
      cells = []
      for i in impls:
        t = med.get(i, math.nan)
        cells.append(f"{t:.2f} s" if i == "optax" else f"{t:.2f} s ({ratio.get(i, math.nan):.2f}x)")
      lines.append(f"{r['case']:<24}" + "".join(f"{c:>20}" for c in cells) + f"{r['target']:>26}")
    warned = {
      r["case"]: r["xla_constant_folding_warnings"] for r in timed if r.get("xla_constant_folding_warnings")
    }
    warned = {c: {i: n for i, n in w.items() if n} for c, w in warned.items()}
    lines += [f"  XLA constant-folding warnings in {c}: {w}" for c, w in warned.items() if w]
  peaks = [r for r in rows if r["case"].startswith("peak_bytes")]
  if peaks:
    lines += [
      "",
      "peak bytes per param (arguments + temporaries + outputs not aliased, memory_analysis):",
      f"{'case':<20}{'impl':<11}{'state':>7}{'step':>8}{'step temp':>11}{'train':>8}"
      f"{'train target':>14}{'excess':>8}{'copy allowed':>14}",
    ]
    for r in peaks:
      for impl, e in r["peak"].items():
        lines.append(
          f"{r['case']:<20}{impl:<11}{e['state']:>7.2f}{e['step']:>8.2f}{e['step_temp']:>11.2f}"
          f"{e['train']:>8.2f}{e.get('train_target', math.nan):>14.2f}{e.get('train_excess', math.nan):>8.2f}"
          f"{e['copy']:>14.2f}"
        )
    lines.append(
      "  train target: optax's float32 train-step peak minus the state bytes saved; excess: ours"
      " minus target (issue 20: <= 0.3 plus the copy of the narrow moments allowed)"
    )
  return lines


# ----------------------------------------------------------------- scale out (ZeRO-1)


def _host_devices_env(n: int) -> dict[str, str]:
  """Environment for a worker on ``n`` host CPU devices (the flag appended last wins)."""
  flags = os.environ.get("XLA_FLAGS", "")
  return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip(), "JAX_PLATFORMS": "cpu"}


def _scale_out_opt():
  from rmsprop_jax import rmsprop

  return rmsprop(1e-3, momentum=0.9)  # nu and trace: two copies of the model


def state_bytes_per_device(state_shapes, shardings) -> int:
  """Bytes of state on the fullest device, from the shardings alone (nothing allocated)."""
  import jax
  import numpy as np

  return int(
    sum(
      math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
      for x, sh in zip(jax.tree.leaves(state_shapes), jax.tree.leaves(shardings))
    )
  )


def scale_out_table(quick: bool = False, devices: tuple[int, ...] = (1, 2, 4, 8)) -> dict[str, Any]:
  """Per-device bytes of params and state on 1, 2, 4, 8 devices, for the big tree.

  Computed from ``state_shardings`` and ``jax.eval_shape`` (no memory used),
  for three RMSProp variants: nu only, nu and trace, nu, mu and trace.
  """
  import jax

  from rmsprop_jax import rmsprop, state_shardings

  shapes = conv_net_shapes(quick)
  params = {f"p{i:03d}": jax.ShapeDtypeStruct(s, "float32") for i, s in enumerate(shapes)}
  variants = {
    "rmsprop": rmsprop(1e-3),
    "momentum": rmsprop(1e-3, momentum=0.9),
    "centered+momentum": rmsprop(1e-3, momentum=0.9, centered=True),
  }
  n_params = sum(math.prod(s) for s in shapes)
  table: dict[str, Any] = {
    "n_params": n_params,
    "params_bytes_per_device": 4 * n_params,
    "replicated": {},
    "zero1": {},
  }
  for name, opt in variants.items():
    state = jax.eval_shape(opt.init, params)
    table["replicated"][name] = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
    table["zero1"][name] = {}
    for n in devices:
      if n > jax.device_count():
        continue
      mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
      table["zero1"][name][str(n)] = state_bytes_per_device(state, state_shardings(opt, params, mesh))
  return table


def _bytes_on_each_device(tree) -> dict[str, int]:
  import jax

  per: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per[str(shard.device)] = per.get(str(shard.device), 0) + shard.data.nbytes
  return per


def _run_scale_out(impl: str, quick: bool, iters: int) -> dict[str, Any]:
  """A data-parallel step on 8 devices: params replicated, state replicated or ZeRO-1.

  Each device brings its own gradient (as after its share of the batch); the
  step averages them (the data-parallel all-reduce), updates and applies.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from rmsprop_jax import state_shardings

  n = HOST_DEVICES["scale_out"]
  if jax.device_count() < n:
    raise RuntimeError(
      f"scale_out needs {n} devices, found {jax.device_count()}; run it with"
      f" XLA_FLAGS=--xla_force_host_platform_device_count={n}"
    )
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  replicated, per_device = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  shapes = conv_net_shapes(quick)
  opt = _scale_out_opt()
  params = jax.device_put(_tree(shapes), replicated)
  rng = np.random.default_rng(1)

  def local_grads(shape):
    g = rng.standard_normal(shape, dtype=np.float32)

    def shard(idx):  # device i's gradient: g * (1 + 0.1 i)
      return (g * (1 + 0.1 * idx[0].start))[None]

    return jax.make_array_from_callback((n, *shape), per_device, shard)

  grads = {k: local_grads(s) for k, s in zip(params, shapes)}
  if impl == "zero1":
    s_sh = state_shardings(opt, params, mesh)
  elif impl == "replicated":
    s_sh = jax.tree.map(lambda _: replicated, jax.eval_shape(opt.init, params))
  else:
    raise ValueError(impl)
  p_sh = jax.tree.map(lambda _: replicated, params)
  g_sh = jax.tree.map(lambda _: per_device, grads)
  state = jax.jit(opt.init, out_shardings=s_sh)(params)

  def step(p, s, g):
    g = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)  # the all-reduce over data
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  fn = jax.jit(step, in_shardings=(p_sh, s_sh, g_sh), out_shardings=(p_sh, s_sh), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = fn.lower(params, state, grads).compile()
  out: dict[str, Any] = {
    "compile_s": time.perf_counter() - t0,
    "n_devices": n,
    "state_bytes": _state_bytes(state),
    "state_bytes_per_device": max(_bytes_on_each_device(state).values()),
    "params_bytes_per_device": max(_bytes_on_each_device(params).values()),
  }
  carry = [params, state]

  def call():
    carry[0], carry[1] = compiled(carry[0], carry[1], grads)
    return carry

  out["time_s"] = _median_time(call, max(3, iters // 2))  # steps of ~1 s on 2 CPU cores
  if impl == "zero1":
    out["by_devices"] = scale_out_table(quick)
  return out


def _medians(runs: dict[str, list[dict[str, Any]]]) -> tuple[dict[str, float], dict[str, float]]:
  """Per implementation: the median over processes of their times, and the spread."""
  med, spread = {}, {}
  for impl, rs in runs.items():
    ts = [r["time_s"] for r in rs if "time_s" in r]
    if ts:
      med[impl] = statistics.median(ts)
      spread[impl] = (max(ts) - min(ts)) / med[impl] if med[impl] else 0.0
  return med, spread


def paired_ratio(ours: dict[str, Any], optax: dict[str, Any]) -> float | None:
  """One process's ratio ours / optax: the median of the ratios of its rounds."""
  if "round_s" not in ours or "round_s" not in optax:
    return None
  return statistics.median(a / b for a, b in zip(ours["round_s"], optax["round_s"]))


def _row(case: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """A summary row: the case, its target, and each implementation's median and spread."""
  med, spread = _medians(runs)
  return {"case": case, "what": CASES[case][0], "target": CASES[case][2], "median_s": med, "spread": spread}


def _summarize_scale_out(case: str, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  row = _row(case, runs)
  med = row["median_s"]
  row |= {
    "state_bytes_per_device": {i: rs[0]["state_bytes_per_device"] for i, rs in runs.items()},
    "params_bytes_per_device": runs["replicated"][0]["params_bytes_per_device"],
    "compile_s": {i: statistics.median([r["compile_s"] for r in rs]) for i, rs in runs.items()},
  }
  row["ratio_zero1_vs_replicated"] = med["zero1"] / med["replicated"]
  row["state_bytes_ratio"] = (
    row["state_bytes_per_device"]["zero1"] / row["state_bytes_per_device"]["replicated"]
  )
  if "by_devices" in runs["zero1"][0]:
    row["by_devices"] = runs["zero1"][0]["by_devices"]
  return row


def _format_scale_out(r: dict[str, Any]) -> list[str]:
  med, sb = r["median_s"], r["state_bytes_per_device"]
  lines = [
    "",
    f"{r['case']}: {r['what']} (rmsprop momentum=0.9)",
    f"  {'state':<11}{'step (ms)':>11}{'spread':>8}{'state MB / device':>19}"
    f"{'params MB / device':>20}{'compile (s)':>13}",
  ]
  for impl in ("replicated", "zero1"):
    lines.append(
      f"  {impl:<11}{med[impl] * 1e3:>11.2f}{r['spread'][impl] * 100:>7.0f}%"
      f"{sb[impl] / 1e6:>19.2f}{r['params_bytes_per_device'] / 1e6:>20.2f}"
      f"{r['compile_s'][impl]:>13.2f}"
    )
  lines.append(
    f"  zero1 / replicated: step time {r['ratio_zero1_vs_replicated']:.2f},"
    f" state bytes per device {r['state_bytes_ratio']:.3f}"
  )
  by = r.get("by_devices")
  if by:
    ns = list(next(iter(by["zero1"].values())))
    lines.append(
      f"  state MB per device with ZeRO-1 ({by['n_params'] / 1e6:.1f}M params,"
      f" {by['params_bytes_per_device'] / 1e6:.1f} MB of params per device):"
    )
    lines.append(f"  {'devices':<20}" + "".join(f"{n:>9}" for n in ns) + f"{'replicated':>12}")
    for name, per in by["zero1"].items():
      lines.append(
        f"  {name:<20}"
        + "".join(f"{per[n] / 1e6:>9.2f}" for n in ns)
        + f"{by['replicated'][name] / 1e6:>12.2f}"
      )
  return lines


# ----------------------------------------------------------------- driver


def _worker(case: str, impls: tuple[str, ...], quick: bool) -> dict[str, dict[str, Any]]:
  """One fresh process: ``run_case`` for one implementation, ``run_paired`` for several."""
  cmd = [sys.executable, "-m", "rmsprop_jax.bench", case, *impls] + (["--quick"] if quick else [])
  env = dict(os.environ)
  if case in HOST_DEVICES:
    env.update(_host_devices_env(HOST_DEVICES[case]))
  res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
  if res.returncode != 0:
    raise RuntimeError(f"bench worker {case}/{'+'.join(impls)} failed:\n{res.stderr[-3000:]}")
  out = json.loads(res.stdout.strip().splitlines()[-1])
  if case in SCALE_CASES:  # XLA warns on stderr when it constant-folds for seconds
    for r in out.values():
      r["xla_constant_folding_warnings"] = res.stderr.count("Constant folding an instruction")
  return out


# Cases with a driver and a table of their own, run in this process and only when named:
# ``fidelity`` (rmsprop_jax/fidelity.py), low-precision runs against their float32 runs.
IN_PROCESS: tuple[str, ...] = ("fidelity",)


def expand_cases(cases: list[str] | None) -> list[str]:
  """Case names, with each group name (CASE_GROUPS) replaced by its cases."""
  out: list[str] = []
  for c in cases or CASES:
    for case in CASE_GROUPS.get(c, (c,)):
      if case not in CASES and case not in IN_PROCESS:
        raise ValueError(
          f"unknown case {case!r}; choose from {sorted(CASES)} or a group {sorted(CASE_GROUPS)}"
        )
      if case not in out:
        out.append(case)
  return out


def _bandwidth_worker(quick: bool) -> float:
  cmd = [sys.executable, "-m", "rmsprop_jax.bench", "--bandwidth"] + (["--quick"] if quick else [])
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True)
  return float(res.stdout.strip().splitlines()[-1])


def collect(
  repeats: int = 5, quick: bool = False, cases: list[str] | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
  """Runs each case in ``repeats`` rounds of fresh processes, alternating their order.

  A step-time case runs its JAX implementations together in one process
  (``run_paired``), torch in another; ``compile_600`` and ``scale_out`` run one
  implementation per process. Returns the raw runs: per case and
  implementation, one dict per process, in the order of the processes.
  """
  cases = expand_cases(cases)
  repeats = 1 if quick else repeats
  bws = [_bandwidth_worker(quick) for _ in range(max(1, min(repeats, 3)))]
  results: dict[str, Any] = {"bandwidth_Bps": statistics.median(bws), "cases": {}}
  for case in cases:
    impls = CASES[case][1]
    runs: dict[str, list[dict[str, Any]]] = {i: [] for i in impls}
    paired = () if case in UNPAIRED else tuple(i for i in impls if i != "torch")
    groups = ([paired] if paired else []) + [(i,) for i in impls if i not in paired]
    for r in range(1 if case in DETERMINISTIC else repeats):
      for group in groups if r % 2 == 0 else groups[::-1]:
        for impl, out in _worker(case, group if r % 2 == 0 else group[::-1], quick).items():
          runs[impl].append(out)
          t = out.get("time_s")
          shown = (
            "deterministic" if t is None else f"{t:9.3f} s" if case in SCALE_CASES else f"{t * 1e3:9.3f} ms"
          )
          log(f"  {case:<18} {impl:<10} run {r + 1}/{repeats}: {shown}")
        if len(group) > 1:
          ours = _ours_key(runs)
          ratio = paired_ratio(runs[ours][-1], runs["optax"][-1])
          log(f"  {case:<18} {'paired':<10} run {r + 1}/{repeats}: {ours}/optax {ratio:.3f}")
    results["cases"][case] = runs
  return results


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per case: medians, spreads, ratios ours/optax and ours/torch."""
  rows = []
  bw = results["bandwidth_Bps"]
  for case, runs in results["cases"].items():
    if case in HOST_DEVICES:
      rows.append(_summarize_scale_out(case, runs))
      continue
    if case in SCALE_CASES:
      rows.append(_summarize_scale(case, runs))
      continue
    row = _row(case, runs)
    med = row["median_s"]
    ours_key = _ours_key(med)
    maybe = [paired_ratio(a, b) for a, b in zip(runs.get(ours_key, []), runs.get("optax", []))]
    pairs = [r for r in maybe if r is not None]
    if pairs and len(pairs) == len(maybe):  # each process's paired ratio; their median
      row["ratio_vs_optax"] = statistics.median(pairs)
      row["paired_ratios"] = pairs
      row["ratio_spread"] = (max(pairs) - min(pairs)) / row["ratio_vs_optax"]
    elif "optax" in med and ours_key in med:  # separate processes: the ratio of medians
      row["ratio_vs_optax"] = med[ours_key] / med["optax"]
    if "torch" in med and ours_key in med:
      row["speedup_vs_torch"] = med["torch"] / med[ours_key]
    first = runs[ours_key][0]
    if "bytes_per_step" in first:
      row["pct_bandwidth"] = 100 * first["bytes_per_step"] / med[ours_key] / bw
      opt_first = runs["optax"][0]
      row["pct_bandwidth_optax"] = 100 * opt_first["bytes_per_step"] / med["optax"] / bw
    xb = {i: rs[0]["xla_bytes_per_param"] for i, rs in runs.items() if rs and "xla_bytes_per_param" in rs[0]}
    if xb:
      row["xla_bytes_per_param"] = xb
      if "optax" in xb and ours_key in xb:
        row["xla_bytes_ratio"] = xb[ours_key] / xb["optax"]
    comp = {
      i: statistics.median([r["compile_s"] for r in rs])
      for i, rs in runs.items()
      if rs and "compile_s" in rs[0]
    }
    if comp:
      row["compile_s"] = comp
    sb = {i: rs[0]["state_bytes"] for i, rs in runs.items() if rs and "state_bytes" in rs[0]}
    if sb:
      row["state_bytes"] = sb
      if "optax" in sb and ours_key in sb:
        row["state_bytes_ratio"] = sb[ours_key] / sb["optax"]
    rows.append(row)
  return rows


def format_table(rows: list[dict[str, Any]], results: dict[str, Any]) -> str:
  lines = [
    f"streaming bandwidth (XLA triad, this run): {results['bandwidth_Bps'] / 1e9:.1f} GB/s",
    "",
    f"{'case':<18}{'ours (ms)':>11}{'optax (ms)':>12}{'ours/optax':>12}{'ratio spread':>14}{'target':>9}"
    f"{'spread':>8}{'% bw':>7}{'vs torch':>10}{'compile ours/optax (s)':>24}{'state ours/optax':>18}"
    f"{'XLA bytes ours/optax':>22}",
  ]
  for r in (r for r in rows if r["case"] not in HOST_DEVICES and r["case"] not in SCALE_CASES):
    med = r["median_s"]
    ours_key = _ours_key(med)
    comp = r.get("compile_s", {})
    comp_s = f"{comp.get(ours_key, float('nan')):.2f}/{comp.get('optax', float('nan')):.2f}" if comp else "-"
    sb = r.get("state_bytes_ratio")
    xb = r.get("xla_bytes_per_param", {})
    xb_s = f"{xb[ours_key]:.1f}/{xb['optax']:.1f} B" if ours_key in xb and "optax" in xb else "-"
    rs_s = f"{r['ratio_spread'] * 100:.0f}%" if "ratio_spread" in r else "-"
    lines.append(
      f"{r['case']:<18}{med.get(ours_key, float('nan')) * 1e3:>11.3f}"
      f"{med.get('optax', float('nan')) * 1e3:>12.3f}{r.get('ratio_vs_optax', float('nan')):>12.3f}"
      f"{rs_s:>14}{r['target']:>9}{max(r['spread'].values()) * 100:>7.0f}%"
      f"{r.get('pct_bandwidth', float('nan')):>7.0f}"
      f"{(str(round(r['speedup_vs_torch'], 1)) + 'x') if 'speedup_vs_torch' in r else '-':>10}"
      f"{comp_s:>24}{(f'{sb:.2f}' if sb else '-'):>18}{xb_s:>22}"
    )
  skipped = sorted(
    {r["skipped"] for runs in results["cases"].values() for r in runs.get("torch", []) if "skipped" in r}
  )
  lines += [f"torch: {why}" for why in skipped]
  lines += [line for r in rows if r["case"] in HOST_DEVICES for line in _format_scale_out(r)]
  lines += _format_scale([r for r in rows if r["case"] in SCALE_CASES])
  lines.append("")
  lines.append(
    "ours/optax: paired, optax and ours built and timed in turn, round after round, in one"
    " process; per process the median of the rounds' ratios, then the median over processes"
    " (compile_600: ratio of medians over processes, one implementation per process);"
    " ratio spread: (max-min)/median of the per-process ratios; spread: (max-min)/median of"
    " the per-process times; % bw: minimal bytes of a step / time / triad bandwidth;"
    " vs torch: torch.optim.RMSprop(foreach=True) time / ours (medians over processes of"
    " their own); XLA bytes: bytes read and"
    " written per parameter per step by XLA's cost analysis of the compiled step"
    " (deterministic)."
  )
  return "\n".join(lines)


def main(
  repeats: int = 5, quick: bool = False, cases: list[str] | None = None, json_path: str | None = None
) -> dict[str, Any]:
  """Entry point of ``python -m rmsprop_jax bench``."""
  names = expand_cases(cases)
  own = [c for c in names if c in IN_PROCESS]
  timed = [c for c in names if c not in IN_PROCESS]
  out: dict[str, Any] = {}
  if timed:
    results = collect(repeats=repeats, quick=quick, cases=timed)
    rows = summarize(results)
    print()
    print(format_table(rows, results))
    out = {"rows": rows, "raw": results}
  if "fidelity" in own:
    from rmsprop_jax import fidelity

    out["fidelity"] = fidelity.run(quick=quick, log=print)
    print()
    print(fidelity.format_table(out["fidelity"]))
  if json_path:
    with open(json_path, "w") as f:
      json.dump(out, f, indent=1)
  return out


def _cli(argv: list[str]) -> None:
  quick = "--quick" in argv
  argv = [a for a in argv if a != "--quick"]
  if argv == ["--bandwidth"]:
    print(measure_bandwidth(quick))
    return
  case, *impls = argv
  if len(impls) == 1:
    print(json.dumps({impls[0]: run_case(case, impls[0], quick)}))
  else:
    print(json.dumps(run_paired(case, tuple(impls), quick)))


if __name__ == "__main__":
  _cli(sys.argv[1:])
