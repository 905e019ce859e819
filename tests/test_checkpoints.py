"""CheckpointStore's retention: the newest `keep`, plus every multiple of `keep_every` for good."""

import numpy as np

from diffusion_jax.runtime import checkpoints


def test_keeps_the_newest_and_the_periodic_ones(tmp_path):
  store = checkpoints.CheckpointStore(str(tmp_path / "checkpoints"), keep=2, keep_every=4)
  for step in range(1, 11):
    store.save(step, {"w": np.full((2,), step, np.float32)}, {"step": step})
    store.wait()
  assert store.all_steps() == [4, 8, 9, 10]
  state, meta = store.restore(8, {"w": np.zeros((2,), np.float32)})
  np.testing.assert_array_equal(state["w"], [8, 8])
  assert meta["step"] == 8
  store.close()
  # Without keep_every only the newest `keep` remain.
  plain = checkpoints.CheckpointStore(str(tmp_path / "plain"), keep=2)
  for step in range(1, 6):
    plain.save(step, {"w": np.zeros((2,), np.float32)}, {"step": step})
    plain.wait()
  assert plain.all_steps() == [4, 5]
  plain.close()


def test_a_state_field_added_since_the_save_restores_as_none(tmp_path):
  # A checkpoint written before the train state gained a field that is None in this run (e.g.
  # the autoencoder's discriminator) restores, with the field None.
  import jax

  store = checkpoints.CheckpointStore(str(tmp_path))
  store.save(1, {"params": np.arange(3.0), "t_history": None}, {"step": 1})
  store.wait()
  abstract = {
    "params": jax.ShapeDtypeStruct((3,), np.float64),
    "t_history": None,
    "discriminator": None,
  }
  state, meta = store.restore(1, abstract)
  store.close()
  assert state["discriminator"] is None and meta == {"step": 1}
  np.testing.assert_array_equal(state["params"], np.arange(3.0))
