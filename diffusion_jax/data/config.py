"""The data section as a frozen dataclass: what the data code reads (configs/default.py holds the
defaults and meanings)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """The fields of the config's `data` section that the pipeline reads.

  `make_source` and `make_train_iterator` read these by attribute, so any object with them works
  (a ConfigDict section in tests and scripts); a run hands them this frozen copy.
  """

  dataset: str
  path: str
  image_size: int
  split: str
  data_dir: str
  manual_dir: str
  random_flip: bool
  num_examples: int
  exclude_classes: str
  read_threads: int
  prefetch: int
