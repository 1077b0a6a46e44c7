"""The bench's measurements: timing, the worker processes and the driver that runs them.

A worker is ``python -m rmsprop_jax.bench CASE IMPL [IMPL ...] [--quick]``: with
one implementation it runs :func:`run_case`, with several :func:`run_paired`,
and prints one JSON line, the numbers of each implementation.
``python -m rmsprop_jax.bench --bandwidth`` prints the triad bandwidth.
:func:`collect` runs the workers of each case in fresh processes, alternating
their order; the in-process cases run in its own process.
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

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rmsprop_jax import state_shardings
from rmsprop_jax.bench import cases as cs
from rmsprop_jax.bench import gpt
from rmsprop_jax.bench.report import ours_key, paired_ratio
from rmsprop_jax.xla_stats import donated_step, narrow_moment_bytes, peak_bytes, xla_bytes_accessed

Numbers = dict[str, Any]


def median_time(
  launch: Callable[[], Any],
  iters: int,
  warmup: int = 2,
  wait: Callable[[Any], Any] = jax.block_until_ready,
  min_sample_s: float = 2e-3,
) -> float:
  """Median seconds per call of ``launch`` (which returns what ``wait`` blocks on).

  Each sample runs enough calls back to back, then waits once, to last at least
  ``min_sample_s``: a step of microseconds (a GPU) is timed by its throughput,
  not by the host's launch latency per call. The CPU steps here take longer,
  so each of their samples is one call.
  """
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
  n = (1 << 20) if quick else (1 << 25)
  arrays = [jnp.ones(n, jnp.float32), jnp.ones(n, jnp.float32)]
  triad = jax.jit(lambda a, b: a + 1.5 * b, donate_argnums=0)

  def call() -> jax.Array:
    arrays[0] = triad(arrays[0], arrays[1])
    return arrays[0]

  t = median_time(call, 3 if quick else 15)
  return 3 * 4 * n / t


def state_bytes(state: Any) -> int:
  """Bytes of a state's arrays (or of their ``jax.ShapeDtypeStruct`` s)."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(state)))


def _header(case: str, impl: str, shapes: list[tuple[int, ...]]) -> Numbers:
  return {
    "case": case,
    "impl": impl,
    "device": jax.devices()[0].device_kind,
    "n_params": cs.n_params(shapes),
    "n_leaves": len(shapes),
  }


def _donated_call(compiled: jax.stages.Compiled, params: Any, state: Any, *rest: Any) -> Callable[[], Any]:
  """A call of a compiled step on its own params and state, which each call replaces."""
  carry = [params, state]

  def call() -> list[Any]:
    carry[0], carry[1] = compiled(carry[0], carry[1], *rest)
    return carry

  return call


def _setup(case: str, impl: str, quick: bool) -> tuple[Numbers, Callable[[], Any] | None, int]:
  """Builds one JAX (case, implementation) of a step-time case in this process and compiles it.

  Returns the numbers known without timing (sizes, state bytes, compile time or,
  eager, the first call's time, XLA's bytes, the minimal bytes of a step), a
  ``call`` that runs the timed unit on its own donated params and state, and
  the steps one call makes (a call's time is divided by it). ``call`` is None
  for ``compile_600``, whose time is its compile.
  """
  shapes = cs.case_shapes(case, quick)
  out = _header(case, impl, shapes)
  params, grads = cs.make_tree(shapes), cs.make_tree(shapes, seed=1)
  opt = cs.make_opt(impl, cs.case_options(case))
  state = opt.init(params)
  out["state_bytes"] = state_bytes(state)
  step = donated_step(opt)

  if case == "eager_update":

    def eager() -> Any:
      return opt.update(grads, state, params)[0]

    t0 = time.perf_counter()
    jax.block_until_ready(eager())
    out["first_call_s"] = time.perf_counter() - t0
    return out, eager, 1

  length = 20 if quick else 200
  if case == "many_leaves_scan":

    def scanned(p: Any, s: Any, g: Any) -> Any:
      body = lambda carry, _: (step(carry[0], carry[1], g), None)
      return jax.lax.scan(body, (p, s), None, length=length)[0]

    fn = jax.jit(scanned, donate_argnums=(0, 1))
  else:
    fn, length = jax.jit(step, donate_argnums=(0, 1)), 1
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
    # The minimal traffic of a plain step: read g, p, nu; write p, nu.
    nu_b = {"ours_bf16": 2, "ours_8bit": 1 + 4 / 256}.get(impl, 4)
    out["bytes_per_step"] = int(out["n_params"] * (3 * 4 + 2 * nu_b))
  return out, _donated_call(compiled, params, state, grads), length


def run_case(case: str, impl: str, quick: bool = False) -> Numbers:
  """Runs one (case, implementation) in this process; returns its numbers."""
  iters = 3 if quick else 20
  shapes = cs.case_shapes(case, quick)
  if impl == "torch":
    return {**_header(case, impl, shapes), **_run_torch(shapes, iters)}
  if case == "scale_out":
    return {**_header(case, impl, shapes), **_run_scale_out(impl, quick, iters)}
  if case in cs.TRAIN_STEP_CASES:
    return {**_header(case, impl, shapes), **_run_train_step(case, impl, quick)}
  if case in cs.SCALE_CASES:
    run = {"init": _run_init, "comp": _run_compile, "peak": _run_peak}[case[:4]]
    return {**_header(case, impl, shapes), **run(case, impl, shapes)}
  out, call, steps = _setup(case, impl, quick)
  if call is not None:
    out["time_s"] = median_time(call, iters) / steps
  return out


def run_paired(
  case: str, impls: tuple[str, ...], quick: bool = False, rounds: int | None = None, iters: int | None = None
) -> dict[str, Numbers]:
  """Times several JAX implementations of a step-time case in this process, paired.

  All are built and compiled first, in the order given (so a later compile may
  find warm caches), then timed in turn, round after round, the order reversed
  on odd rounds (AB BA AB ...); each round is a :func:`median_time` of ``iters``
  samples per implementation. Within a round all see the same machine load, so
  their ratio holds steady where the times of whole processes drift. Returns,
  per implementation, :func:`run_case`'s numbers with ``time_s`` the median over
  rounds and ``round_s`` the time of each round.
  """
  if case in cs.UNPAIRED:
    raise ValueError(f"{case!r} runs one implementation per process (run_case)")
  rounds = rounds or (2 if quick else 8)
  iters = iters or (3 if quick else 5)
  built = {impl: _setup(case, impl, quick) for impl in impls}
  round_s: dict[str, list[float]] = {impl: [] for impl in impls}
  for r in range(rounds):
    for impl in impls if r % 2 == 0 else impls[::-1]:
      _, call, steps = built[impl]
      assert call is not None, f"{case!r} has no timed call"  # only UNPAIRED cases have none
      round_s[impl].append(median_time(call, iters, warmup=1) / steps)
  return {
    impl: {**out, "time_s": statistics.median(round_s[impl]), "round_s": round_s[impl]}
    for impl, (out, _, _) in built.items()
  }


def _run_torch(shapes: list[tuple[int, ...]], iters: int) -> Numbers:
  """torch.optim.RMSprop(foreach=True) on the device JAX uses (CPU or CUDA)."""
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
  opt = torch.optim.RMSprop(params, lr=cs.LEARNING_RATE, foreach=True)
  t = median_time(opt.step, iters, wait=lambda _: sync())
  return {"time_s": t, "torch_device": device, "threads": torch.get_num_threads()}


# ----------------------------------------------------------------- model scale


def _params_made_under_jit(shapes: list[tuple[int, ...]]) -> Any:
  """Params as a Flax or plain-JAX model makes them: the outputs of a ``jax.jit``
  (values from a cheap formula: a random initializer would only add its own
  compile time, and init does not read the values)."""

  def make() -> dict[str, jax.Array]:
    return {
      f"p{i:03d}": 0.02 * jnp.cos(jax.lax.iota(jnp.float32, math.prod(s)).reshape(s) * 1e-3 + i)
      for i, s in enumerate(shapes)
    }

  return jax.block_until_ready(jax.jit(make)())


def _run_init(case: str, impl: str, shapes: list[tuple[int, ...]]) -> Numbers:
  """The first call of ``opt.init`` (eager) or ``jax.jit(opt.init)`` (tracing,
  compiling and running it), then a second call (compiled, cached)."""
  params = _params_made_under_jit(shapes)
  opt = cs.make_opt(impl, cs.case_options(case))
  init = jax.jit(opt.init) if case.startswith("init_jit") else opt.init
  t0 = time.perf_counter()
  state = jax.block_until_ready(init(params))
  out = {"time_s": time.perf_counter() - t0, "state_bytes": state_bytes(state)}
  del state
  t0 = time.perf_counter()
  jax.block_until_ready(init(params))
  out["second_call_s"] = time.perf_counter() - t0
  return out


def _run_compile(case: str, impl: str, shapes: list[tuple[int, ...]]) -> Numbers:
  """Trace + lower, and compile, of the jitted, donated step (nothing allocated)."""
  params = cs.abstract_tree(shapes)
  opt = cs.make_opt(impl, cs.case_options(case))
  state = jax.eval_shape(opt.init, params)
  fn = jax.jit(donated_step(opt), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  lowered = fn.lower(params, state, params)
  t1 = time.perf_counter()
  lowered.compile()
  t2 = time.perf_counter()
  return {"time_s": t2 - t0, "trace_lower_s": t1 - t0, "xla_compile_s": t2 - t1}


def _mlp_train_step(opt: optax.GradientTransformation) -> Callable[..., tuple[Any, Any]]:
  """A whole train step of an MLP of ``mlp_shapes``: gradients, update, apply."""

  def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    ws = list(params.values())
    for i in range(0, len(ws), 2):
      h = h @ ws[i] + ws[i + 1][None, :]
      if i + 2 < len(ws):
        h = jax.nn.relu(h)
    return jnp.mean((h - y) ** 2)

  def step(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any]:
    return donated_step(opt)(params, state, jax.grad(loss)(params, x, y))

  return step


def _run_peak(case: str, impl: str, shapes: list[tuple[int, ...]]) -> Numbers:
  """Peak bytes per param of the donated optimizer step and of a whole MLP train
  step (batch 32), compiled from abstract shapes (deterministic, no timing)."""
  params = cs.abstract_tree(shapes)
  n = cs.n_params(shapes)
  opt = cs.make_opt(impl, cs.case_options(case))
  state = jax.eval_shape(opt.init, params)
  batch = jax.ShapeDtypeStruct((32, shapes[0][0]), jnp.float32)
  step = jax.jit(donated_step(opt), donate_argnums=(0, 1)).lower(params, state, params).compile()
  train = jax.jit(_mlp_train_step(opt), donate_argnums=(0, 1)).lower(params, state, batch, batch).compile()
  return {
    "state_bytes_per_param": state_bytes(state) / n,
    "narrow_copy_bytes_per_param": narrow_moment_bytes(state) / n,
    "step": {k: v / n for k, v in peak_bytes(step).items()},
    "train": {k: v / n for k, v in peak_bytes(train).items()},
  }


def gpt_train_step(opt: optax.GradientTransformation, cfg: gpt.GPTConfig) -> Callable[..., Any]:
  """``step(params, state, tokens, targets) -> (params, state, loss)``: the loss and its
  gradients, ``opt.update``, ``optax.apply_updates``."""

  def step(params: Any, state: Any, tokens: jax.Array, targets: jax.Array) -> tuple[Any, Any, jax.Array]:
    loss, grads = jax.value_and_grad(gpt.loss)(params, tokens, targets, cfg)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  return step


def _run_train_step(case: str, impl: str, quick: bool) -> Numbers:
  """The whole train step of the GPT of ``bench.gpt``: compile, step time and peak bytes.

  Params and state are made under ``jax.jit``, as a model's are; the batch is
  random token ids. Lower and compile are timed on the first ``jit`` of the
  donated step in this process; the step time is the median of ``iters`` steps
  after a warm-up step (the first steps of a process fault in fresh pages).
  """
  cfg = cs.gpt_config(quick)
  scanned = "_scanned" in case
  params = jax.block_until_ready(jax.jit(lambda k: gpt.init_params(k, cfg, scanned))(jax.random.key(0)))
  opt = cs.make_opt(impl, cs.case_options(case))
  state = jax.block_until_ready(jax.jit(opt.init)(params))
  rng = np.random.default_rng(0)
  tokens, targets = (
    jnp.asarray(rng.integers(0, cfg.vocab, (cfg.batch, cfg.context)), jnp.int32) for _ in "xy"
  )
  fn = jax.jit(gpt_train_step(opt, cfg), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  lowered = fn.lower(params, state, tokens, targets)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  n = cs.n_params(cs.case_shapes(case, quick))
  out: Numbers = {
    "compile_s": t2 - t0,
    "lower_s": t1 - t0,
    "xla_compile_s": t2 - t1,
    "state_bytes": state_bytes(state),
    "peak_bytes_per_param": {k: v / n for k, v in peak_bytes(compiled).items()},
  }
  losses, step_s = [], []
  for i in range(1 + (2 if quick else 3)):  # a warm-up step, then the timed ones
    t0 = time.perf_counter()
    params, state, loss = compiled(params, state, tokens, targets)
    losses.append(float(loss))
    if i:
      step_s.append(time.perf_counter() - t0)
  return out | {"time_s": statistics.median(step_s), "step_s": step_s, "losses": losses}


# ----------------------------------------------------------------- scale out (ZeRO-1)


def state_bytes_per_device(state_shapes: Any, shardings: Any) -> int:
  """Bytes of state on the fullest device, from the shardings alone (nothing allocated)."""
  return int(
    sum(
      math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
      for x, sh in zip(jax.tree.leaves(state_shapes), jax.tree.leaves(shardings))
    )
  )


def scale_out_table(quick: bool = False, devices: tuple[int, ...] = (1, 2, 4, 8)) -> Numbers:
  """Per-device bytes of params and state on 1, 2, 4, 8 devices, for the big tree.

  Computed from ``state_shardings`` and ``jax.eval_shape`` (no memory used),
  for three RMSProp variants: nu only, nu and trace, nu, mu and trace.
  """
  from rmsprop_jax import rmsprop

  shapes = cs.conv_net_shapes(quick)
  params = cs.abstract_tree(shapes)
  variants = {
    "rmsprop": rmsprop(cs.LEARNING_RATE),
    "momentum": cs.scale_out_opt(),
    "centered+momentum": rmsprop(cs.LEARNING_RATE, momentum=0.9, centered=True),
  }
  n = cs.n_params(shapes)
  table: Numbers = {"n_params": n, "params_bytes_per_device": 4 * n, "replicated": {}, "zero1": {}}
  for name, opt in variants.items():
    state = jax.eval_shape(opt.init, params)
    table["replicated"][name] = state_bytes(state)
    table["zero1"][name] = {}
    for k in devices:
      if k <= jax.device_count():
        mesh = jax.make_mesh((k,), ("data",), devices=jax.devices()[:k])
        table["zero1"][name][str(k)] = state_bytes_per_device(state, state_shardings(opt, params, mesh))
  return table


def _most_bytes_on_a_device(tree: Any) -> int:
  per: dict[str, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per[str(shard.device)] = per.get(str(shard.device), 0) + shard.data.nbytes
  return max(per.values())


def _run_scale_out(impl: str, quick: bool, iters: int) -> Numbers:
  """A data-parallel step on 8 devices: params replicated, state replicated or ZeRO-1.

  Each device brings its own gradient (as after its share of the batch); the
  step averages them (the data-parallel all-reduce), updates and applies.
  """
  n = cs.HOST_DEVICES["scale_out"]
  if jax.device_count() < n:
    raise RuntimeError(
      f"scale_out needs {n} devices, found {jax.device_count()}; run it with"
      f" XLA_FLAGS=--xla_force_host_platform_device_count={n}"
    )
  mesh = jax.make_mesh((n,), ("data",), devices=jax.devices()[:n])
  replicated, per_device = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  shapes = cs.conv_net_shapes(quick)
  opt = cs.scale_out_opt()
  params = jax.device_put(cs.make_tree(shapes), replicated)
  rng = np.random.default_rng(1)

  def local_grads(shape: tuple[int, ...]) -> jax.Array:
    g = rng.standard_normal(shape, dtype=np.float32)

    def shard(idx: Any) -> np.ndarray:  # device i's gradient: g * (1 + 0.1 i)
      return (g * (1 + 0.1 * idx[0].start))[None]

    return jax.make_array_from_callback((n, *shape), per_device, shard)

  grads = {k: local_grads(s) for k, s in zip(params, shapes)}
  if impl == "zero1":
    s_sh = state_shardings(opt, params, mesh)
  elif impl == "replicated":
    s_sh = jax.tree.map(lambda _: replicated, jax.eval_shape(opt.init, params))
  else:
    raise ValueError(f"impl must be 'replicated' or 'zero1', got {impl!r}")
  p_sh = jax.tree.map(lambda _: replicated, params)
  g_sh = jax.tree.map(lambda _: per_device, grads)
  state = jax.jit(opt.init, out_shardings=s_sh)(params)

  def step(p: Any, s: Any, g: Any) -> tuple[Any, Any]:
    g = jax.tree.map(lambda x: jnp.mean(x, axis=0), g)  # the all-reduce over data
    return donated_step(opt)(p, s, g)

  fn = jax.jit(step, in_shardings=(p_sh, s_sh, g_sh), out_shardings=(p_sh, s_sh), donate_argnums=(0, 1))
  t0 = time.perf_counter()
  compiled = fn.lower(params, state, grads).compile()
  out: Numbers = {
    "compile_s": time.perf_counter() - t0,
    "n_devices": n,
    "state_bytes": state_bytes(state),
    "state_bytes_per_device": _most_bytes_on_a_device(state),
    "params_bytes_per_device": _most_bytes_on_a_device(params),
  }
  # eight devices' steps are slow on a few host cores: half the samples
  out["time_s"] = median_time(_donated_call(compiled, params, state, grads), max(3, iters // 2))
  if impl == "zero1":
    out["by_devices"] = scale_out_table(quick)
  return out


# ----------------------------------------------------------------- processes


def _run_worker(args: list[str], env: dict[str, str] | None = None, timeout: int = 1800) -> tuple[str, str]:
  """Runs ``python -m rmsprop_jax.bench ARGS`` in a fresh process; returns its last line and stderr."""
  cmd = [sys.executable, "-m", "rmsprop_jax.bench", *args]
  res = subprocess.run(
    cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=timeout
  )
  if res.returncode != 0:
    raise RuntimeError(f"bench worker {' '.join(args)} failed:\n{res.stderr[-3000:]}")
  return res.stdout.strip().splitlines()[-1], res.stderr


def host_devices_env(n: int) -> dict[str, str]:
  """Environment for a worker on ``n`` host CPU devices (the flag appended last wins)."""
  flags = os.environ.get("XLA_FLAGS", "")
  return {"XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={n}".strip(), "JAX_PLATFORMS": "cpu"}


def worker(case: str, impls: tuple[str, ...], quick: bool) -> dict[str, Numbers]:
  """One fresh process: :func:`run_case` for one implementation, :func:`run_paired` for several."""
  env = host_devices_env(cs.HOST_DEVICES[case]) if case in cs.HOST_DEVICES else None
  line, stderr = _run_worker([case, *impls, *(["--quick"] if quick else [])], env)
  out = json.loads(line)
  if case in cs.SCALE_CASES:  # XLA warns on stderr when it constant-folds for seconds
    for r in out.values():
      r["xla_constant_folding_warnings"] = stderr.count("Constant folding an instruction")
  return out


def bandwidth_worker(quick: bool) -> float:
  """:func:`measure_bandwidth` in a fresh process."""
  line, _ = _run_worker(["--bandwidth", *(["--quick"] if quick else [])], timeout=600)
  return float(line)


def _run_case_in_processes(case: str, repeats: int, quick: bool, log: Callable[[str], None]) -> Any:
  """Per implementation, one dict of numbers per process, in the order of the processes."""
  impls = cs.CASES[case][1]
  runs: dict[str, list[Numbers]] = {i: [] for i in impls}
  paired = () if case in cs.UNPAIRED else tuple(i for i in impls if i != "torch")
  groups = ([paired] if paired else []) + [(i,) for i in impls if i not in paired]
  for r in range(repeats):
    for group in groups if r % 2 == 0 else groups[::-1]:
      for impl, out in worker(case, group if r % 2 == 0 else group[::-1], quick).items():
        runs[impl].append(out)
        t = out.get("time_s")
        shown = (
          "deterministic" if t is None else f"{t:9.3f} s" if case in cs.SCALE_CASES else f"{t * 1e3:9.3f} ms"
        )
        if case in cs.TRAIN_STEP_CASES:
          shown += f", compile {out['compile_s']:.2f} s"
        log(f"  {case:<18} {impl:<10} run {r + 1}/{repeats}: {shown}")
      if len(group) > 1:
        ours = ours_key(runs)
        log(
          f"  {case:<18} {'paired':<10} run {r + 1}/{repeats}:"
          f" {ours}/optax {paired_ratio(runs[ours][-1], runs['optax'][-1]):.3f}"
        )
  return runs


def collect(
  repeats: int | None = None,
  quick: bool = False,
  cases: list[str] | None = None,
  log: Callable[[str], None] = print,
) -> Numbers:
  """Runs each case in ``repeats`` rounds of fresh processes, alternating their order.

  A step-time case runs its JAX implementations together in one process
  (:func:`run_paired`), torch in another; ``compile_600``, the model-scale cases
  and ``scale_out`` run one implementation per process; an in-process case runs
  here. ``repeats``: processes per implementation, ``cases.CASE_REPEATS`` (or
  ``DEFAULT_REPEATS``) when None; one when ``quick`` and for deterministic cases.
  ``cases``: names or groups, ``DEFAULT_CASES`` when None. Returns the raw
  runs: per case and implementation, one dict per process, in the order of the
  processes; per in-process case, its results.
  """
  names = cs.expand_cases(cases)

  def repeats_of(case: str) -> int:
    if quick or case in cs.DETERMINISTIC:
      return 1
    return repeats or cs.CASE_REPEATS.get(case, cs.DEFAULT_REPEATS)

  results: Numbers = {"cases": {}, "in_process": {}}
  if any(c in cs.CASES and c not in cs.TRAIN_STEP_CASES for c in names):  # the step cases' % bw
    bws = [bandwidth_worker(quick) for _ in range(1 if quick else min(repeats or cs.DEFAULT_REPEATS, 3))]
    results["bandwidth_Bps"] = statistics.median(bws)
  elif not quick and (train := [c for c in names if c in cs.TRAIN_STEP_CASES]):
    # A discarded process first: the first process of a run reads Python and the XLA
    # libraries from a cold disk cache, which the bandwidth runs warm for the other cases.
    worker(train[0], ("optax",), quick=True)
  for case in names:
    if case in cs.IN_PROCESS:
      log(f"  {case:<18} in process")
      results["in_process"][case] = cs.IN_PROCESS[case].run(quick)
    else:
      results["cases"][case] = _run_case_in_processes(case, repeats_of(case), quick, log)
  return results


def cli(argv: list[str]) -> None:
  """The worker: ``CASE IMPL [IMPL ...] [--quick]`` or ``--bandwidth [--quick]``."""
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
