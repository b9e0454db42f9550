"""A `RandomAccessSource` over a prepared tensorflow-datasets dataset (no TensorFlow).

tfds data sources read ArrayRecord files with random access and need no TensorFlow at read
time. Preparing a dataset is an offline step (`tfds build --file_format=array_record`, or
a builder's `download_and_prepare(file_format="array_record")`) done once into an explicit
`data_dir`; nothing here downloads. tfds is an optional extra (`pip install
"jaxrepro[data]"`), imported only when a `TfdsSource` is built.
"""

from collections.abc import Sequence

import numpy as np


class TfdsSource:
  """Records of one split of a prepared tfds dataset, as dicts of numpy arrays.

  Args:
    name: the dataset name (`"mnist"`, `"tiny_points:1.0.0"`).
    split: the split (`"train"`, `"test[:10%]"`).
    data_dir: the directory the dataset was prepared into (required: no default lookup,
      so a run never depends on what happens to be in `~/tensorflow_datasets`).
    keys: the features to keep (default: all).
  """

  def __init__(self, name: str, split: str, data_dir: str, *,
               keys: Sequence[str] | None = None):
    try:
      import tensorflow_datasets as tfds
    except ImportError as e:
      raise ImportError('TfdsSource needs tensorflow-datasets: pip install "jaxrepro[data]"'
                        ) from e
    builder = tfds.builder(name, data_dir=data_dir)
    # builder(...).as_data_source finds local datasets that tfds.data_source can miss
    # (tensorflow/datasets#5665).
    self._source = builder.as_data_source(split=split)
    self.keys = tuple(keys) if keys is not None else None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    record = self._source[index]
    keys = self.keys if self.keys is not None else tuple(record)
    return {k: np.asarray(record[k]) for k in keys}
