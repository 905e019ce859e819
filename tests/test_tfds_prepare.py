"""The real tfds path: a local builder prepared to array_record and read back; bad preparations."""

import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from diffusion_jax.data import make_source, make_train_iterator, tfds_prepare
from diffusion_jax.runtime.errors import ConfigError
from tests import tiny_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_config(**overrides):
  fields = default.get_config().data.to_dict()
  fields.update({"image_size": tiny_tfds.SIDE, "random_flip": False, **overrides})
  return types.SimpleNamespace(**fields)


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
  """A tfds data_dir where the project itself prepared the tiny data set (with TensorFlow)."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  assert not tfds.builder(tiny_tfds.NAME, data_dir=data_dir).is_prepared()
  make_source(data_config(dataset=tiny_tfds.NAME, data_dir=data_dir))
  return data_dir


def test_a_local_builder_is_prepared_to_array_record_and_read_back(prepared_dir):
  builder = tfds.builder(tiny_tfds.NAME, data_dir=prepared_dir)
  assert builder.is_prepared()
  files = os.listdir(builder.data_dir)
  assert any(".array_record-" in f for f in files), files

  source = make_source(data_config(dataset=tiny_tfds.NAME, data_dir=prepared_dir))
  assert len(source) == tiny_tfds.NUM_EXAMPLES
  assert source.num_classes == 3 and source.class_names == list(tiny_tfds.CLASS_NAMES)
  # tfds' split order is a shuffle of the keys; every generated example comes back exactly once.
  read = sorted((source[i] for i in range(len(source))), key=lambda e: int(e["image"][0, 0, 2]))
  expected = sorted(
    (tiny_tfds.expected_example(i) for i in range(tiny_tfds.NUM_EXAMPLES)),
    key=lambda e: int(e["image"][0, 0, 2]),
  )
  for got, want in zip(read, expected, strict=True):
    np.testing.assert_array_equal(got["image"], want["image"])
    assert got["label"] == want["label"]

  config = data_config(dataset=tiny_tfds.NAME, data_dir=prepared_dir)
  batch = next(make_train_iterator(config, global_batch_size=4, seed=0))
  assert batch["image"].shape == (4, tiny_tfds.SIDE, tiny_tfds.SIDE, 3)


def test_a_copied_data_set_is_read_without_importing_tensorflow(prepared_dir, tmp_path):
  copied = str(tmp_path / "copied")  # The README's third route: prepared elsewhere, copied here.
  shutil.copytree(os.path.join(prepared_dir, tiny_tfds.NAME), os.path.join(copied, tiny_tfds.NAME))
  script = (
    "import sys, types\n"
    "from tests import tiny_tfds\n"
    "from tests.test_tfds_prepare import data_config\n"
    "from diffusion_jax.data import make_source, make_train_iterator\n"
    f"config = data_config(dataset=tiny_tfds.NAME, data_dir={copied!r})\n"
    "assert tiny_tfds.NUM_EXAMPLES == len(make_source(config))\n"
    "source = make_source(config)\n"
    "[source[i] for i in range(len(source))]\n"
    "next(make_train_iterator(config, global_batch_size=4, seed=0))\n"
    "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorflow'))\n"
  )
  result = subprocess.run(
    [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.fixture
def no_proxy(monkeypatch):
  monkeypatch.setattr(tfds_prepare.urllib.request, "getproxies", dict)


def test_offline_preparation_fails_at_once_without_tfds_retries(tmp_path, monkeypatch, no_proxy):
  probed = []

  def unreachable(host, port, timeout=5.0):
    probed.append((host, port))
    return False

  def must_not_run(*args, **kwargs):
    raise AssertionError("tfds' download started although the host is unreachable")

  monkeypatch.setattr(tfds_prepare, "_reachable", unreachable)
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", must_not_run)
  with pytest.raises(ConfigError) as excinfo:
    make_source(data_config(dataset="cifar10", data_dir=str(tmp_path)))
  message = str(excinfo.value)
  assert "\n" not in message and message.startswith("data.dataset='cifar10' is not prepared")
  assert "www.cs.toronto.edu" in message and "manual_dir" in message
  assert probed == [("www.cs.toronto.edu", 443)]


@pytest.mark.parametrize("wrong", ["size", "checksum"])
def test_a_wrong_archive_in_manual_dir_is_named(tmp_path, monkeypatch, no_proxy, wrong):
  monkeypatch.setattr(tfds_prepare, "_reachable", lambda *a, **k: pytest.fail("probed the host"))
  manual_dir = tmp_path / "manual"
  manual_dir.mkdir()
  archive = manual_dir / "cifar-10-binary.tar.gz"
  with open(archive, "wb") as f:
    if wrong == "size":
      f.write(b"an html error page, not the archive")
    else:  # The official size, all zeros (sparse): only the checksum tells.
      f.truncate(170052171)
  with pytest.raises(ConfigError) as excinfo:
    make_source(
      data_config(dataset="cifar10", data_dir=str(tmp_path / "d"), manual_dir=str(manual_dir))
    )
  message = str(excinfo.value)
  assert "\n" not in message and message.startswith("data.manual_dir: ")
  assert f"{archive} is not the official archive of 'cifar10'" in message
  assert "expected cifar-10-binary.tar.gz of 170,052,171 bytes" in message
  assert ("its checksum differs" in message) == (wrong == "checksum")
