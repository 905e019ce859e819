"""LPIPS on VGG16 against the lpips package (tests/fixtures/lpips/reference.json), and its loader.

The reference distances were computed by lpips 0.1.4 (PyTorch) with the random weights of
`tests/fixtures/lpips/weights.py`; `make_fixture.py` there rewrites them. No torch is needed here.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusion_jax.models import lpips
from tests.fixtures.lpips import weights

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "lpips" / "reference.json"


@pytest.fixture(scope="module")
def reference():
  return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def state_dict(reference):
  return weights.random_state_dict(reference["weights_seed"])


@pytest.fixture(scope="module")
def images(reference):
  return weights.image_pairs(reference["images_seed"], reference["num_pairs"], reference["size"])


@pytest.fixture(scope="module")
def distance():
  """Jitted (params, x0, x1) -> [B] distances of `LPIPS()`, compiled once per input shape."""

  def apply(params, x0, x1):
    # Full float32 convolutions also on GPUs, whose default is TF32 (errors near 1e-3).
    with jax.default_matmul_precision("highest"):
      return lpips.LPIPS().apply({"params": params}, x0, x1)

  return jax.jit(apply)


@pytest.fixture(scope="module")
def params(state_dict):
  return lpips.state_dict_to_params(state_dict)


@pytest.fixture(scope="module")
def distances(params, images, distance):
  """[B] distances of the image pairs with the fixture's weights."""
  return np.asarray(distance(params, *images))


def test_matches_the_lpips_package(reference, distances):
  d = distances.astype(np.float64)
  assert d.shape == (reference["num_pairs"],)
  np.testing.assert_allclose(d, reference["distances"], rtol=1e-4)
  np.testing.assert_allclose(d, reference["distances_float64"], rtol=1e-4)


def test_is_zero_on_equal_images_and_symmetric(params, images, distance, distances):
  x0, x1 = images
  np.testing.assert_allclose(distance(params, x0, x0), 0.0, atol=1e-7)
  np.testing.assert_allclose(distance(params, x1, x0), distances, rtol=1e-6)


def test_unit_normalize_matches_lpips_and_has_finite_gradients():
  x = jnp.asarray([[[[3.0, 4.0], [0.0, 0.0]]]])  # [1, 1, 2, 2]: one pixel of norm 5, one zero
  np.testing.assert_allclose(lpips.unit_normalize(x), [[[[0.6, 0.8], [0.0, 0.0]]]], rtol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(lpips.unit_normalize(x)))(x)
  assert np.all(np.isfinite(grad))


def test_vgg16_features_shapes():
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda x: lpips.VGG16Features().init_with_output(jax.random.key(0), x), x)
  feats, variables = shapes
  assert [f.shape for f in feats] == [
    (1, 32 // 2**k, 32 // 2**k, c) for k, c in enumerate(lpips.CHANNELS)
  ]
  assert len(variables["params"]) == 13


def test_weight_map_round_trip(state_dict, params):
  assert [key for key, _, _ in lpips.WEIGHT_MAP] == list(state_dict)
  back = lpips.params_to_state_dict(params)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  init = jax.eval_shape(
    lambda: lpips.LPIPS().init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3))
    )
  )["params"]
  assert jax.tree.map(lambda a: a.shape, init) == jax.tree.map(lambda a: a.shape, params)


def test_load_lpips_round_trip(tmp_path, state_dict, params, images, distance, distances):
  path = tmp_path / "lpips_vgg.npz"
  np.savez(path, **state_dict)
  module, loaded = lpips.load_lpips(path)
  assert module == lpips.LPIPS()
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  np.testing.assert_array_equal(distance(loaded, *images), distances)


def _drop(state):
  return {k: v for k, v in state.items() if k != "net.slice3.12.bias"}


def _extra(state):
  return {**state, "lins.0.model.1.weight": state["lin0.model.1.weight"]}


def _reshape(state):
  return {**state, "lin2.model.1.weight": state["lin2.model.1.weight"].reshape(256, 1, 1, 1)}


@pytest.mark.parametrize(
  "edit, key",
  [
    (_drop, "net.slice3.12.bias"),
    (_extra, "lins.0.model.1.weight"),
    (_reshape, "lin2.model.1.weight"),
  ],
)
def test_load_lpips_names_the_bad_key(tmp_path, state_dict, edit, key):
  path = tmp_path / "bad.npz"
  np.savez(path, **edit(state_dict))
  with pytest.raises(ValueError) as error:
    lpips.load_lpips(path)
  message = str(error.value)
  assert "\n" not in message and repr(key) in message and str(path) in message, message


@pytest.mark.parametrize("content", [b"", b"not an archive", b"PK\x03\x04 truncated", "npy"])
def test_load_lpips_rejects_a_damaged_file_in_one_line(tmp_path, content):
  path = tmp_path / "damaged.npz"
  if content == "npy":
    with open(path, "wb") as f:
      np.save(f, np.zeros(3))
  else:
    path.write_bytes(content)
  with pytest.raises(ValueError, match="not a readable .npz") as error:
    lpips.load_lpips(path)
  assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_load_lpips_says_how_to_make_a_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_lpips.py") as error:
    lpips.load_lpips(tmp_path / "missing.npz")
  assert "\n" not in str(error.value)
