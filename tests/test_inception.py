"""The FID Inception-v3 against pytorch-fid (tests/fixtures/fid_inception); its torch-free reader.

The reference features were computed by pytorch-fid 0.3.0 (PyTorch) with the random weights of
`tests/fixtures/fid_inception/weights.py` on the state dict's real names and shapes
(`state_dict_shapes.json`); `make_fixture.py` there rewrites them. No torch is needed here.
"""

import json
import os
import pathlib
import pickle
import zipfile

import jax
import numpy as np
import pytest
import safetensors.numpy

from diffusion_jax.models.inception import INPUT_SIZE, resize_bilinear
from diffusion_jax.pretrained import inception
from diffusion_jax.pretrained.files import WeightsError
from tests.fixtures.fid_inception import weights

pytestmark = pytest.mark.usefixtures("fast_compile")

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "fid_inception"


@pytest.fixture(scope="module")
def reference():
  with np.load(FIXTURES / "reference.npz") as data:
    return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def shapes():
  return json.loads((FIXTURES / "state_dict_shapes.json").read_text())


@pytest.fixture(scope="module")
def state_dict(shapes):
  return weights.random_state_dict(shapes)


@pytest.fixture(scope="module")
def weights_file(state_dict, shapes, tmp_path_factory):
  """The random weights as an .npz of the whole state dict, batch norm counters included."""
  counters = {name: np.int64(0) for name in shapes if name.endswith("num_batches_tracked")}
  path = tmp_path_factory.mktemp("fid_inception") / "weights.npz"
  np.savez(path, **state_dict, **counters)
  return path


@pytest.fixture(scope="module")
def network(weights_file):
  """(jitted (params, images) -> (pool, logits), params) of the loaded model."""
  model, params = inception.load_fid_inception(weights_file)
  return jax.jit(lambda p, x: model.apply({"params": p}, x, logits=True)), params


@pytest.fixture(scope="module")
def outputs(network):
  """(pool, logits) of the fixture's images in IMAGE_SHAPES order, from one compilation.

  Each batch is resized to 299x299 first, so that all share one compilation; the model leaves
  299x299 images as they are.
  """
  apply, params = network
  images = weights.images()
  batch = np.concatenate(
    [resize_bilinear(images[name], (INPUT_SIZE, INPUT_SIZE)) for name in weights.IMAGE_SHAPES]
  )
  return jax.device_get(apply(params, batch))


def _relative_l2(x, y):
  return float(np.linalg.norm(np.asarray(x) - y) / np.linalg.norm(y))


def _one_line_error(call) -> str:
  with pytest.raises(WeightsError) as info:
    call()
  message = str(info.value)
  assert "\n" not in message
  return message


def test_features_and_logits_match_pytorch_fid(outputs, reference):
  pool, logits = outputs
  assert pool.shape == (5, 2048) and logits.shape == (5, 1008)
  assert pool.dtype == np.float32 and logits.dtype == np.float32
  errors = {
    "pool": _relative_l2(pool, reference["pool"]),
    "logits": _relative_l2(logits, reference["logits"]),
    "pool_vs_f64": _relative_l2(pool, reference["pool_f64"]),
    "logits_vs_f64": _relative_l2(logits, reference["logits_f64"]),
  }
  print("relative L2 to pytorch-fid:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert max(errors.values()) < 1e-4, errors


def test_model_resizes_its_input(network, reference):
  # The whole path on the 37x45 images, the resize inside the compiled model.
  apply, params = network
  pool, logits = jax.device_get(apply(params, weights.images()["small"]))
  assert _relative_l2(pool, reference["pool"][:3]) < 1e-4
  assert _relative_l2(logits, reference["logits"][:3]) < 1e-4


@pytest.mark.parametrize("name", list(weights.IMAGE_SHAPES))
def test_resize_matches_torch_interpolate(reference, name):
  expected = reference[f"resize:{name}"]
  got = resize_bilinear(weights.images()[name], expected.shape[1:3])
  np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_resize_differs_from_antialiased_jax_resize_when_shrinking(reference):
  # Why resize_bilinear exists: jax.image.resize widens its kernel when downsampling.
  expected = reference["resize:large"]
  jax_resized = jax.image.resize(weights.images()["large"], expected.shape, "bilinear")
  assert np.abs(jax_resized - expected).max() > 1e-2


def test_identity_resize_is_exact():
  x = weights.images()["small"]
  np.testing.assert_array_equal(resize_bilinear(x, x.shape[1:3]), x)


def test_weight_map_covers_the_state_dict(shapes):
  mapped = {name: list(shape) for name, _, shape in inception.weight_map()}
  expected = {k: v for k, v in shapes.items() if not k.endswith("num_batches_tracked")}
  assert mapped == expected
  assert shapes["fc.weight"] == [1008, 2048]


def test_state_dict_round_trip(weights_file, state_dict):
  _, params = inception.load_fid_inception(weights_file)
  leaves = jax.tree.leaves(params)
  assert all(leaf.dtype == np.float32 for leaf in leaves)
  assert sum(leaf.size for leaf in leaves) == sum(v.size for v in state_dict.values())
  back = inception.fid_inception_state_dict(params)
  assert back.keys() == state_dict.keys()
  for name, tensor in state_dict.items():
    np.testing.assert_array_equal(back[name], tensor, err_msg=name)


@pytest.mark.parametrize("file", ["tiny_zip.pth", "tiny_legacy.pth"])
def test_reads_torch_files_as_torch_saved_them(reference, file):
  tensors = inception.read_torch_state_dict(str(FIXTURES / file))
  expected = {k[len("tiny:") :]: v for k, v in reference.items() if k.startswith("tiny:")}
  assert tensors.keys() == expected.keys()
  for name, value in expected.items():
    assert tensors[name].dtype == value.dtype and tensors[name].shape == value.shape, name
    np.testing.assert_array_equal(tensors[name], value, err_msg=name)
  assert tensors["view.t"].flags.c_contiguous


def test_missing_file_says_where_to_get_it(tmp_path):
  path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  message = _one_line_error(lambda: inception.load_fid_inception(path))
  assert str(path) in message and inception.URL in message


def test_missing_tensor(tmp_path, state_dict):
  path = tmp_path / "partial.npz"
  np.savez(path, **{k: v for k, v in state_dict.items() if k != "Conv2d_1a_3x3.conv.weight"})
  message = _one_line_error(lambda: inception.load_fid_inception(path))
  assert "missing tensor 'Conv2d_1a_3x3.conv.weight'" in message and str(path) in message


def test_wrong_shape(tmp_path, state_dict):
  path = tmp_path / "wrong.npz"
  np.savez(path, **{**state_dict, "Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
  message = _one_line_error(lambda: inception.load_fid_inception(path))
  assert "'Conv2d_1a_3x3.conv.weight' has shape (32, 3, 5, 5)" in message
  assert "(32, 3, 3, 3)" in message


def test_unexpected_tensor(tmp_path, state_dict):
  path = tmp_path / "extra.safetensors"
  safetensors.numpy.save_file({**state_dict, "AuxLogits.fc.bias": np.zeros(1008, np.float32)}, path)
  message = _one_line_error(lambda: inception.load_fid_inception(path))
  assert "unexpected tensor 'AuxLogits.fc.bias'" in message


class _RunsCode:
  def __reduce__(self):
    return (os.system, ("echo this must not run",))


@pytest.mark.parametrize("layout", ["zip", "legacy"])
def test_pickle_asking_for_another_class_is_refused(tmp_path, layout):
  path = tmp_path / "evil.pth"
  payload = pickle.dumps({"x": _RunsCode()}, protocol=2)
  if layout == "zip":
    with zipfile.ZipFile(path, "w") as archive:
      archive.writestr("evil/data.pkl", payload)
  else:
    path.write_bytes(payload)
  message = _one_line_error(lambda: inception.load_fid_inception(path))
  assert f"{os.system.__module__}.system" in message and "not loaded" in message


def test_damaged_file(tmp_path):
  path = tmp_path / "damaged.pth"
  path.write_bytes((FIXTURES / "tiny_zip.pth").read_bytes()[:1000])
  message = _one_line_error(lambda: inception.read_torch_state_dict(str(path)))
  assert "not a readable torch file" in message
