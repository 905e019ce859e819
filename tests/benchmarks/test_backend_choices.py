"""benchmarks/backend_choices.py: each per-backend speed path flipped, the result unchanged."""

import math

import jax
import numpy as np
import pytest

from benchmarks import backend_choices

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.mark.parametrize("name", sorted(backend_choices.CHOICES))
def test_flipped_config_negates_one_choice(tiny_config, name):
  config = tiny_config()
  defaults = backend_choices.flipped_config(config, None).model.fast
  flipped = backend_choices.flipped_config(config, name).model.fast
  assert "auto" not in (defaults[name], flipped[name])
  assert {k: flipped[k] != defaults[k] for k in backend_choices.CHOICES} == {
    k: k == name for k in backend_choices.CHOICES
  }
  assert config.model.fast[name] == "auto"  # the caller's config is left as it was


def test_a_flipped_choice_changes_the_program_not_the_step(tiny_config):
  config = tiny_config({"model.dropout": 0.1, "train.warmup_steps": 0, "train.batch_size": 4})
  programs = {flip: backend_choices.build(config, flip) for flip in (None, "skips_in_parts")}
  texts = {flip: compiled.as_text() for flip, (compiled, _) in programs.items()}
  assert texts[None] != texts["skips_in_parts"]
  initial = jax.device_get(programs[None][1][0].params)  # both start from the same state
  times, losses = backend_choices.time_rounds(programs, rounds=1, calls=2)
  assert all(len(t) == 1 and t[0] > 0 for t in times.values())
  # Four steps each (a warm-up round and a timed one, of 2 calls): the same updates up to float
  # rounding, relative to how far the steps moved the parameters.
  states = {flip: jax.device_get(args[0]) for flip, (_, args) in programs.items()}
  assert int(states[None].step) == int(states["skips_in_parts"].step) == 4
  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  start, plain, parts = (
    flat(t) for t in (initial, states[None].params, states["skips_in_parts"].params)
  )
  assert np.linalg.norm(parts - plain) < 1e-2 * np.linalg.norm(plain - start)
  assert math.isclose(losses[None], losses["skips_in_parts"], rel_tol=1e-4)


def test_steps_per_call_runs_that_many_steps_a_call(tiny_config):
  config = tiny_config({"train.warmup_steps": 0, "train.batch_size": 4})
  compiled, args = backend_choices.build(config, None, steps_per_call=3)
  assert args[1]["image"].shape[:2] == (3, 4)
  times, _ = backend_choices.time_rounds({"defaults": (compiled, args)}, 1, 2, steps_per_call=3)
  # A warm-up round and a timed one, of 2 calls of 3 steps.
  assert int(jax.device_get(args[0].step)) == 12
  assert len(times["defaults"]) == 1 and times["defaults"][0] > 0
