"""A tiny tfds image data set, prepared locally, for the test of the real tfds path.

Imported as `tests.tiny_tfds`, so that tfds resolves its code path the way it does for its own
data sets (through `importlib_resources`), and registered under `NAME` when imported.
"""

import numpy as np
import tensorflow_datasets as tfds

NAME = "diffusion_jax_tiny_images"
NUM_EXAMPLES = 6
SIDE = 8
CLASS_NAMES = ("red", "green", "blue")


def expected_example(index: int) -> dict:
  """Example `index` as generated: an 8x8 image with one bright channel, and its label."""
  label = index % len(CLASS_NAMES)
  image = np.full((SIDE, SIDE, 3), 10 * index, np.uint8)
  image[..., label] = 200 + index
  image[index % SIDE, :, :] = 255  # A white row: the images differ in space too.
  return {"image": image, "label": label}


class DiffusionJaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """Six 8x8 RGB images with three class labels, generated without any download."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Image(shape=(SIDE, SIDE, 3)),
          "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }
      ),
      supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples(range(NUM_EXAMPLES))}

  def _generate_examples(self, indices):
    for index in indices:
      yield index, expected_example(index)
