"""Flax NNX and Equinox train with our optimizer: the code of docs/integrations.md.

Each section of the page is a script; it is run as written, then its results are checked
against ``optax.rmsprop`` trained the same way (the page checks the weights itself too).
"""

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest
from docs_code import DOCS, blocks, run
from flax import nnx

import rmsprop_jax

PAGE = DOCS / "integrations.md"
STEPS = 25  # train(..., steps=25) on the page


def run_section(section: str) -> dict:
  code = [b for b in blocks(PAGE) if b.section == section]
  assert code, f"docs/integrations.md has no code under '## {section}'"
  return run(code, "docs_integrations_" + section.lower().replace(" ", "_"))


@pytest.fixture(scope="module")
def flax_run():
  return run_section("Flax NNX")


@pytest.fixture(scope="module")
def eqx_run():
  return run_section("Equinox")


def test_flax_nnx_optimizer_gives_optax_rmsprop_weights(flax_run):
  ns = flax_run
  ours, ref = nnx.state(ns["flax_model"], nnx.Param), nnx.state(ns["flax_reference"], nnx.Param)
  chex.assert_trees_all_close(ours, ref, rtol=1e-6, atol=0)
  assert ns["flax_optimizer"].step[...] == STEPS


def test_flax_nnx_training_lowers_the_loss(flax_run):
  ns = flax_run
  fresh = ns["MLP"](nnx.Rngs(0))
  first = jnp.mean((fresh(ns["x"]) - ns["y"]) ** 2)
  assert ns["flax_loss"] < 0.5 * first


def test_flax_nnx_state_reads_like_optax_state(flax_run):
  ns = flax_run
  ours = rmsprop_jax.diagnostics.find_state(ns["flax_optimizer"].opt_state)
  assert int(ours.count) == STEPS
  # The same nu as optax.rmsprop's, trained alongside.
  _, ref_optimizer, _ = ns["train"](optax.rmsprop(1e-2))
  ref_nu = optax.tree_utils.tree_get(ref_optimizer.opt_state, "nu")
  chex.assert_trees_all_close(ours.nu, ref_nu, rtol=1e-6, atol=0)
  params = nnx.state(ns["flax_model"], nnx.Param)
  assert [a.shape for a in jax.tree.leaves(ours.nu)] == [p.shape for p in jax.tree.leaves(params)]


def test_equinox_filter_jit_gives_optax_rmsprop_weights(eqx_run):
  ns = eqx_run
  ours = eqx.filter(ns["eqx_model"], eqx.is_array)
  ref = eqx.filter(ns["eqx_reference"], eqx.is_array)
  chex.assert_trees_all_close(ours, ref, rtol=1e-6, atol=0)
  assert int(ns["eqx_state"].count) == STEPS
  chex.assert_trees_all_equal_shapes(ns["eqx_state"].nu, ours)


def test_equinox_training_lowers_the_loss(eqx_run):
  ns = eqx_run
  fresh = eqx.nn.MLP(4, 1, width_size=16, depth=1, key=jax.random.key(0))
  first = ns["loss_fn"](fresh, ns["x"], ns["y"])
  assert ns["eqx_loss"] < 0.5 * first
