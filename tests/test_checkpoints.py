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
