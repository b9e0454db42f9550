"""Tests of the source protocol, deterministic batching and the tfds adapter."""

import numpy as np
import pytest

from jaxrepro.launch.data import source as source_lib


def make_arrays(n=10):
  rng = np.random.default_rng(0)
  return {"x": rng.normal(size=(n, 3)).astype(np.float32), "label": np.arange(n) % 2}


def test_each_epoch_reads_every_record_once():
  n, bs = 10, 4
  idx = np.concatenate([source_lib.batch_indices(n, bs, s, seed=3) for s in range(5)])
  assert sorted(idx[:10]) == list(range(10))  # epoch 0
  assert sorted(idx[10:20]) == list(range(10))  # epoch 1 (batches straddle the boundary)
  assert not np.array_equal(idx[:10], idx[10:20])  # a new permutation per epoch


def test_batches_are_a_function_of_seed_and_step():
  a = source_lib.batch_indices(100, 8, 7, seed=1)
  np.testing.assert_array_equal(a, source_lib.batch_indices(100, 8, 7, seed=1))
  assert not np.array_equal(a, source_lib.batch_indices(100, 8, 7, seed=2))
  np.testing.assert_array_equal(source_lib.batch_indices(10, 4, 1, 0, shuffle=False),
                                [4, 5, 6, 7])


def test_host_batches_stack_steps():
  src = source_lib.ArraySource(make_arrays())
  batches = source_lib.host_batches(src, 4, seed=0)(start_step=2, n=3)
  assert batches["x"].shape == (3, 4, 3)
  idx = source_lib.batch_indices(10, 4, 3, seed=0)
  np.testing.assert_array_equal(batches["label"][1], make_arrays()["label"][idx])


def test_array_source_rejects_ragged_arrays():
  with pytest.raises(ValueError, match="equal lengths"):
    source_lib.ArraySource({"a": np.zeros(3), "b": np.zeros(4)})


def test_protocol_is_structural():
  assert isinstance(source_lib.ArraySource(make_arrays()), source_lib.RandomAccessSource)


def test_tfds_source_is_interchangeable_with_array_source(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  from jaxrepro.launch.data import tfds_source

  arrays = make_arrays()

  class TinyPoints(tfds.core.GeneratorBasedBuilder):
    """A 10-record dataset prepared locally into tmp_path (no download)."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "x": tfds.features.Tensor(shape=(3,), dtype=np.float32),
          "label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(len(arrays["x"])):
        yield i, {"x": arrays["x"][i], "label": int(arrays["label"][i])}

  builder = TinyPoints(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  src = tfds_source.TfdsSource("tiny_points", "train", str(tmp_path))
  assert len(src) == 10
  # tfds may store records in another order: compare as the same set of records, then
  # check that deterministic batching reads the same records from both sources.
  by_label_x = {tuple(np.round(src[i]["x"], 6)): int(src[i]["label"]) for i in range(10)}
  for x, label in zip(arrays["x"], arrays["label"]):
    assert by_label_x[tuple(np.round(x, 6))] == label
  batch = source_lib.load_batch(src, source_lib.batch_indices(10, 4, 0, seed=0))
  assert batch["x"].shape == (4, 3) and batch["x"].dtype == np.float32
