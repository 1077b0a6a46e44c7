"""ZeRO-1: optimizer state sharded over the data axis, on 8 host devices and 2 processes."""

import re
import sys
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import run_two_processes
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rmsprop_jax
from rmsprop_jax.sharding import DEFAULT_MIN_SIZE

needs_8 = pytest.mark.skipif(
  jax.device_count() < 8, reason="needs 8 devices (tests/conftest.py forces 8 host CPUs)"
)

# Shapes chosen so that each splits differently over 8 devices: the largest
# divisible dimension (w: 32, k: 24), a vector, and leaves that stay put.
SHAPES = {"w": (16, 32), "k": (3, 3, 8, 24), "b": (32,), "odd": (5, 7), "s": ()}
SPLIT_SPEC = {"w": P(None, "data"), "k": P(None, None, None, "data"), "b": P("data")}


def _params(shapes=SHAPES, seed=0):
  rng = np.random.default_rng(seed)
  return {k: jnp.asarray(0.3 * rng.normal(size=s), jnp.float32) for k, s in shapes.items()}


def _mesh(shape=(8,), names=("data",)):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


def _specs(shardings):
  return jax.tree.map(lambda s: s.spec, shardings)


def _param_slots(shardings, params):
  """Every sub-tree of ``shardings`` with the params' dict structure (nu, mu, mu of adam, ...)."""
  found = []

  def walk(node):
    if isinstance(node, dict) and set(node) == set(params):
      found.append(node)
    elif isinstance(node, (tuple, list)):
      for child in node:
        walk(child)

  walk(shardings)
  return found


OPTIMIZERS = {
  "rmsprop": lambda: rmsprop_jax.rmsprop(0.01),
  "rmsprop centered with momentum": lambda: rmsprop_jax.rmsprop(0.01, momentum=0.9, centered=True),
  "rmsprop nesterov, bf16 nu, decoupled weight decay": lambda: rmsprop_jax.rmsprop(
    0.01,
    momentum=0.9,
    nesterov=True,
    nu_dtype=jnp.bfloat16,
    weight_decay=1e-2,
    weight_decay_mode="decoupled",
  ),
  "pytorch preset": lambda: rmsprop_jax.presets.pytorch(lr=0.01, momentum=0.9, centered=True),
  "keras preset with clipnorm (a chain)": lambda: rmsprop_jax.presets.keras(clipnorm=1.0),
  "tf1 preset": lambda: rmsprop_jax.presets.tf1(0.01, momentum=0.9),
  "optax.adam": lambda: optax.adam(1e-3),
  "optax.chain(clip, rmsprop)": lambda: optax.chain(
    optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(0.01, momentum=0.9)
  ),
  "optax.MultiSteps(rmsprop)": lambda: optax.MultiSteps(rmsprop_jax.rmsprop(0.01, momentum=0.9), 4),
  "inject_hyperparams(rmsprop)": lambda: optax.inject_hyperparams(rmsprop_jax.rmsprop)(
    learning_rate=0.01, momentum=0.9
  ),
}


@needs_8
@pytest.mark.parametrize("make_opt", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_every_param_shaped_state_leaf_is_split_over_data_and_the_rest_stays(make_opt):
  opt, params = make_opt(), _params()
  shardings = rmsprop_jax.state_shardings(opt, params, _mesh(), min_size=0)
  slots = _param_slots(shardings, params)
  assert slots, "no state tree of the params' structure found"
  for slot in slots:
    assert {k: s.spec for k, s in slot.items()} == {**SPLIT_SPEC, "odd": P(), "s": P()}
  n_split = sum(len(slot) - 2 for slot in slots)
  all_specs = jax.tree.leaves(_specs(shardings), is_leaf=lambda x: isinstance(x, P))
  assert sum(s != P() for s in all_specs) == n_split  # counts and scalars stay replicated
  assert jax.tree.structure(shardings) == jax.tree.structure(jax.eval_shape(opt.init, params))


@needs_8
def test_each_device_holds_an_eighth_and_20_steps_match_the_replicated_state():
  mesh = _mesh()
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 16)).astype(np.float32)
  y = rng.normal(size=(64, 8)).astype(np.float32)
  params = _params({"w1": (16, 32), "b1": (32,), "w2": (32, 8), "b2": (8,)})
  opt = rmsprop_jax.rmsprop(0.01, momentum=0.9, centered=True)
  replicated = NamedSharding(mesh, P())
  p_sh = jax.tree.map(lambda _: replicated, params)
  batch = NamedSharding(mesh, P("data"))
  s_sh = rmsprop_jax.state_shardings(opt, params, mesh, min_size=32)

  def loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None] - y) ** 2)

  def step(p, s, x, y):
    updates, s = opt.update(jax.grad(loss)(p, x, y), s, p)
    return optax.apply_updates(p, updates), s

  xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
  zero1 = jax.jit(
    step, in_shardings=(p_sh, s_sh, batch, batch), out_shardings=(p_sh, s_sh), donate_argnums=(0, 1)
  )
  plain = jax.jit(step, donate_argnums=(0, 1))
  host = jax.tree.map(np.asarray, params)  # two independent copies: both runs donate
  p1 = jax.device_put(host, replicated)
  s1 = jax.jit(opt.init, out_shardings=s_sh)(p1)
  p0 = jax.device_put(host, replicated)
  s0 = opt.init(p0)
  for field in ("nu", "mu", "trace"):
    for name in ("w1", "b1", "w2"):  # b2 has 8 elements < min_size: kept whole
      leaf = getattr(s1, field)[name]
      shards = leaf.addressable_shards
      assert len(shards) == 8
      assert all(sh.data.nbytes * 8 == leaf.nbytes for sh in shards), (field, name)
    assert all(sh.data.nbytes == 32 for sh in getattr(s1, field)["b2"].addressable_shards)
  assert {sh.data.nbytes for sh in s0.nu["w1"].addressable_shards} == {16 * 32 * 4}
  for _ in range(20):
    p1, s1 = zero1(p1, s1, xs, ys)
    p0, s0 = plain(p0, s0, xs, ys)
  assert s1.nu["w1"].sharding.spec == P(None, "data")  # still sharded after 20 donated steps
  for name in params:
    assert p1[name].sharding.is_fully_replicated
    np.testing.assert_allclose(p1[name], p0[name], rtol=1e-5, atol=1e-6, err_msg=name)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@needs_8
def test_on_a_data_x_model_mesh_the_state_is_split_over_both():
  mesh = _mesh((4, 2), ("data", "model"))
  param_specs = {
    "w": P(None, "model"),  # data goes to the free dimension
    "v": P("model", None),  # ... whichever it is
    "fsdp": P("data", None),  # already split over data: not split twice
    "both": P(("data", "model")),  # a tuple entry
    "b": P(),  # 32 elements, under min_size: kept whole
  }
  shapes = {"w": (16, 32), "v": (32, 16), "fsdp": (16, 8), "both": (64,), "b": (32,)}
  params = jax.device_put(_params(shapes), {k: NamedSharding(mesh, spec) for k, spec in param_specs.items()})
  opt = rmsprop_jax.rmsprop(0.01, momentum=0.9)
  shardings = rmsprop_jax.state_shardings(opt, params, mesh, min_size=64)
  expected = {
    "w": P("data", "model"),
    "v": P("model", "data"),
    "fsdp": P("data"),
    "both": P(("data", "model")),
    "b": P(),
  }
  assert _specs(shardings.nu) == expected and _specs(shardings.trace) == expected
  state = jax.jit(opt.init, out_shardings=shardings)(params)
  assert {sh.data.shape for sh in state.nu["w"].addressable_shards} == {(4, 16)}
  assert {sh.data.shape for sh in state.trace["v"].addressable_shards} == {(16, 4)}
  step = jax.jit(lambda g, s, p: opt.update(g, s, p), out_shardings=(None, shardings))
  _, state = step(params, state, params)
  assert _specs(jax.tree.map(lambda a: a.sharding, state.nu)) == expected


def _all_gathers(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(dtype, shape) of every array an all-gather produces in compiled HLO text."""
  out = []
  for line in hlo.splitlines():
    m = re.search(r"=\s*(.*?)\s+all-gather(?:-start)?\(", line)
    if m:
      out += [
        (d, tuple(int(x) for x in dims.split(",") if x))
        for d, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1))
      ]
  return out


@needs_8
@pytest.mark.xla_current  # the partitioner's collectives in the compiled HLO: the current releases
def test_the_compiled_step_gathers_params_or_updates_never_the_state():
  mesh = _mesh()
  params = _params({"w1": (16, 32), "b1": (32,), "w2": (32, 8)})
  # bfloat16 nu: an all-gather of it would show as a bf16 array; mu and trace
  # gathered would double the gathered elements beyond one copy of the params.
  opt = rmsprop_jax.rmsprop(0.01, momentum=0.9, centered=True, nu_dtype=jnp.bfloat16)
  replicated = NamedSharding(mesh, P())
  p_sh = jax.tree.map(lambda _: replicated, params)
  batch = NamedSharding(mesh, P("data"))
  s_sh = rmsprop_jax.state_shardings(opt, params, mesh, min_size=0)

  def step(p, s, x):
    grads = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]))(p)
    updates, s = opt.update(grads, s, p)
    return optax.apply_updates(p, updates), s

  x = jax.ShapeDtypeStruct((64, 16), jnp.float32, sharding=batch)
  p_abs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), params)
  s_abs = jax.eval_shape(opt.init, params)
  hlo = (
    jax.jit(step, in_shardings=(p_sh, s_sh, batch), out_shardings=(p_sh, s_sh), donate_argnums=(0, 1))
    .lower(p_abs, s_abs, x)
    .compile()
    .as_text()
  )
  gathered = _all_gathers(hlo)
  assert gathered, "expected the updated params to be all-gathered"
  assert {d for d, _ in gathered} == {"f32"}, gathered
  assert sorted(shape for _, shape in gathered) == sorted(p.shape for p in params.values())


@needs_8
def test_eager_and_jitted_updates_keep_the_zero1_layout():
  mesh = _mesh()
  params = jax.device_put(_params(), NamedSharding(mesh, P()))
  opt = rmsprop_jax.rmsprop(0.01, momentum=0.9, centered=True)
  shardings = rmsprop_jax.state_shardings(opt, params, mesh, min_size=0)
  state = jax.jit(opt.init, out_shardings=shardings)(params)
  for update in (opt.update, jax.jit(opt.update)):  # our cached compiled call, and a user's jit
    _, new = update(params, state, params)
    for field in ("nu", "mu", "trace"):
      specs = _specs(jax.tree.map(lambda a: a.sharding, getattr(new, field)))
      assert specs == _specs(getattr(shardings, field)), (update, field)


@needs_8
def test_abstract_params_give_the_same_shardings_as_concrete_ones():
  mesh = _mesh((4, 2), ("data", "model"))
  sharding = NamedSharding(mesh, P(None, "model"))
  params = {"w": jax.device_put(jnp.zeros((16, 32)), sharding), "b": jnp.zeros(32)}
  abstract = {
    "w": jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=sharding),
    "b": jax.ShapeDtypeStruct((32,), jnp.float32),  # no sharding: replicated
  }
  opt = optax.adam(1e-3)
  got = _specs(rmsprop_jax.state_shardings(opt, abstract, mesh, min_size=0))
  assert got == _specs(rmsprop_jax.state_shardings(opt, params, mesh, min_size=0))
  assert got[0].mu == {"w": P("data", "model"), "b": P("data")}


@needs_8
def test_default_min_size_keeps_biases_and_norm_scales_whole():
  assert DEFAULT_MIN_SIZE == 2**14
  params = {
    "kernel": jnp.zeros((3, 3, 64, 128)),
    "scale": jnp.zeros(8192),
    "bias": jnp.zeros(1000),
    "head": jnp.zeros((512, 1000)),
  }
  s = rmsprop_jax.state_shardings(
    rmsprop_jax.rmsprop(1e-3), jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params), _mesh()
  )
  assert _specs(s.nu) == {
    "kernel": P(None, None, None, "data"),
    "scale": P(),
    "bias": P(),
    "head": P(None, "data"),  # 1000 is divisible by 8 and larger than 512
  }


@needs_8
def test_axis_may_be_a_tuple_of_mesh_axes():
  mesh = _mesh((2, 4), ("replica", "data"))
  params = {"w": jnp.zeros((16, 32))}
  s = rmsprop_jax.state_shardings(optax.adam(1e-3), params, mesh, ("replica", "data"), min_size=0)
  assert s[0].nu["w"].spec == P(None, ("replica", "data"))
  assert s[0].nu["w"].shard_shape((16, 32)) == (16, 4)


class QuantizedArray(NamedTuple):
  """The shape of 8-bit state to come: codes like the param, per-block scales."""

  codes: Any
  scale: Any


def _quantized_moment(block: int = 64) -> optax.GradientTransformation:
  def init(params):
    def quantize(p):
      return QuantizedArray(jnp.zeros(p.shape, jnp.int8), jnp.ones((p.size // block,), jnp.float32))

    return (jnp.zeros([], jnp.int32), jax.tree.map(quantize, params))

  return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


@needs_8
def test_quantized_state_codes_follow_the_param_and_scales_are_split_on_their_own():
  mesh = _mesh((4, 2), ("data", "model"))
  params = {
    "w": jax.device_put(jnp.zeros((64, 32)), NamedSharding(mesh, P(None, "model"))),
    "b": jnp.zeros(64),
  }
  count, moment = rmsprop_jax.state_shardings(_quantized_moment(), params, mesh, min_size=16)
  assert count.spec == P()
  assert _specs(moment) == {
    "w": QuantizedArray(codes=P("data", "model"), scale=P("data")),  # 32 scales: split
    "b": QuantizedArray(codes=P("data"), scale=P()),  # 1 scale: kept whole
  }


@needs_8
def test_a_chain_state_is_not_mistaken_for_a_tuple_of_params():
  params = (jnp.zeros((16, 32)), jnp.zeros(32))  # a 2-tuple, like a chain's state
  opt = optax.chain(optax.clip_by_global_norm(1.0), rmsprop_jax.rmsprop(0.01))
  clip_state, rms_state = rmsprop_jax.state_shardings(opt, params, _mesh(), min_size=0)
  assert clip_state == optax.EmptyState()
  assert _specs(rms_state.nu) == (P(None, "data"), P("data"))
  assert rms_state.count.spec == P()


@needs_8
@pytest.mark.parametrize(
  "kwargs, error, message",
  [
    ({"axis": "batch"}, ValueError, r"axis 'batch' is not an axis of mesh; its axes are \('data',\)"),
    ({"axis": ("data", "data")}, ValueError, "axis names a mesh axis twice"),
    ({"axis": 0}, TypeError, "axis must be a mesh axis name or a tuple of them, got 0"),
    ({"min_size": -1}, ValueError, "min_size must be >= 0, got -1"),
    ({"min_size": 1.5}, TypeError, "min_size must be an int, got 1.5"),
    ({"mesh": "data"}, TypeError, "mesh must be a jax.sharding.Mesh, got str"),
    ({"params": {"w": "zeros"}}, TypeError, r"params\['w'\] is a str"),
  ],
  ids=[
    "an unknown axis",
    "an axis twice",
    "an axis that is no name",
    "a negative min_size",
    "a float min_size",
    "no mesh",
    "params that are no arrays",
  ],
)
def test_bad_arguments_are_named_in_the_error(kwargs, error, message):
  args = {"opt": rmsprop_jax.rmsprop(0.01), "params": {"w": jnp.zeros(8)}, "mesh": _mesh(), **kwargs}
  with pytest.raises(error, match=message):
    rmsprop_jax.state_shardings(**args)


@needs_8
def test_params_on_another_mesh_or_unfit_for_the_optimizer_are_refused():
  other = jax.make_mesh((2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)
  params = {"w": jax.device_put(jnp.zeros((8, 8)), NamedSharding(other, P("x")))}
  with pytest.raises(ValueError, match=r"params\['w'\] is sharded over a mesh with axes"):
    rmsprop_jax.state_shardings(rmsprop_jax.rmsprop(0.01), params, _mesh())
  with pytest.raises(TypeError, match=r"params\['step'\] has dtype int32"):  # the optimizer's own check
    rmsprop_jax.state_shardings(rmsprop_jax.rmsprop(0.01), {"step": jnp.zeros(8, jnp.int32)}, _mesh())


@pytest.mark.slow
def test_two_processes_with_zero1_state_hold_half_each_and_agree_with_one(tmp_path):
  worker = Path(__file__).with_name("multiprocess_worker.py")
  r0, r1 = run_two_processes(worker, tmp_path, "zero1")

  sys.path.insert(0, str(worker.parent))
  from multiprocess_worker import FEATURES, STEPS, problem

  d = FEATURES["zero1"]
  for r in (r0, r1):
    for field in ("nu", "mu", "trace"):
      assert r[f"state_{field}_w"] == d // 2  # each process holds half of every state leaf
  assert {int(r0["state_nu_w_start"]), int(r1["state_nu_w_start"])} == {0, d // 2}

  x, y = problem(d)
  opt = rmsprop_jax.rmsprop(0.05, momentum=0.9, centered=True)
  params = {"w": jnp.zeros(d), "b": jnp.zeros(())}
  state = opt.init(params)
  for _ in range(STEPS):
    grads = jax.grad(lambda p: jnp.mean((x @ p["w"] + p["b"] - y) ** 2))(params)
    updates, state = opt.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  for k in ("w", "b"):
    np.testing.assert_array_equal(r0[k], r1[k])
    np.testing.assert_allclose(r0[k], params[k], rtol=1e-5, atol=1e-6)
  for r in (r0, r1):
    lo = int(r["state_nu_w_start"])
    np.testing.assert_allclose(r["state_nu_w_slice"], state.nu["w"][lo : lo + d // 2], rtol=1e-5, atol=1e-7)


@needs_8
def test_bench_scale_out_case_measures_an_eighth_of_the_state_per_device():
  from rmsprop_jax import bench

  out = bench.run_case("scale_out", "zero1", quick=True)
  assert out["time_s"] > 0 and out["n_devices"] == 8
  assert out["state_bytes_per_device"] < out["state_bytes"] / 4  # small leaves stay whole
  by = out["by_devices"]
  for name, per in by["zero1"].items():
    assert per["1"] == by["replicated"][name]
    assert per["8"] < per["4"] < per["2"] < per["1"]
  fake = {
    "bandwidth_Bps": 40e9,
    "cases": {
      "scale_out": {
        impl: [{**out, "time_s": t, "state_bytes_per_device": b}]
        for impl, t, b in (("replicated", 0.02, 800), ("zero1", 0.01, 100))
      }
    },
  }
  (row,) = bench.summarize(fake)
  assert row["ratio_zero1_vs_replicated"] == 0.5 and row["state_bytes_ratio"] == 0.125
  text = bench.format_table([row], fake)
  assert "zero1 / replicated: step time 0.50, state bytes per device 0.125" in text


@needs_8
def test_a_factored_optimizer_keeps_the_param_spec_where_a_moment_is_param_shaped():
  mesh = _mesh((4, 2), ("data", "model"))
  params = {
    "big": jax.device_put(jnp.zeros((256, 256)), NamedSharding(mesh, P(None, "model"))),
    "vec": jax.device_put(jnp.zeros(512), NamedSharding(mesh, P("model"))),
  }
  factored = rmsprop_jax.state_shardings(optax.adafactor(1e-3), params, mesh, min_size=0)[0]
  assert factored.v["vec"].spec == P("model")  # a full moment: the param's spec, no free dim for data
  assert factored.v["big"].spec == P()  # a (1,) placeholder: replicated
  assert factored.v_row["big"].spec == P("data")  # a factor: its own shape, split over data
