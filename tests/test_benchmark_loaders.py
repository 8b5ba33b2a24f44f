"""Tests for the benchmark data loaders, on small files that each test writes."""

import pickle

import numpy as np
import pytest
from scipy import io as scipy_io
from sklearn.datasets import dump_svmlight_file

from benchmarks import loaders


def write_cifar_folder(folder, images_per_batch=3, seed=0, skip=()):
  """Write the six CIFAR-10 python batches with random uint8 images; return the arrays."""
  rng = np.random.default_rng(seed)
  written = {}
  for name in (*loaders.CIFAR_TRAIN_BATCHES, loaders.CIFAR_TEST_BATCH):
    data = rng.integers(0, 256, size=(images_per_batch, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=images_per_batch).tolist()
    written[name] = (data, labels)
    if name in skip:
      continue
    with open(folder / name, "wb") as handle:
      pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"x"}, handle)
  return written


# svmlight


def test_svmlight_plus_minus_labels(tmp_path):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(7, 5)).astype(np.float32)
  features[features < 0.3] = 0.0
  labels = np.array([1, -1, -1, 1, 1, -1, 1])
  path = tmp_path / "small.svm"
  dump_svmlight_file(features, labels, str(path))

  data = loaders.load_svmlight_binary(path)

  assert data.features.dtype == np.float32
  assert data.features.shape == (7, 5)
  np.testing.assert_allclose(data.features, features, rtol=1e-6)
  np.testing.assert_array_equal(data.labels, (labels > 0).astype(np.float32))


def test_svmlight_zero_one_labels_kept(tmp_path):
  path = tmp_path / "small.svm"
  dump_svmlight_file(np.eye(4), np.array([0, 1, 1, 0]), str(path))
  np.testing.assert_array_equal(loaders.load_svmlight_binary(path).labels, [0, 1, 1, 0])


def test_svmlight_multiclass_labels_rejected(tmp_path):
  path = tmp_path / "multi.svm"
  dump_svmlight_file(np.eye(3), np.array([0, 1, 2]), str(path))
  with pytest.raises(ValueError, match="binary"):
    loaders.load_svmlight_binary(path)


def test_svmlight_malformed_text_rejected(tmp_path):
  path = tmp_path / "broken.svm"
  path.write_text("this is not svmlight\n1 2:x\n")
  with pytest.raises(ValueError, match="svmlight"):
    loaders.load_svmlight_binary(path)


def test_svmlight_missing_file_rejected(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    loaders.load_svmlight_binary(tmp_path / "gisette_scale")


def test_svmlight_folder_rejected(tmp_path):
  with pytest.raises(ValueError, match="folder"):
    loaders.load_svmlight_binary(tmp_path)


# CURVES


def test_curves_mat_file_read(tmp_path):
  rng = np.random.default_rng(1)
  train, test = rng.random((6, 16)), rng.random((4, 16))
  path = tmp_path / "digs3pts_1.mat"
  scipy_io.savemat(path, {"bdata": train, "bdatatest": test})

  split = loaders.load_curves(path)

  np.testing.assert_allclose(split.x_train, train.astype(np.float32))
  np.testing.assert_allclose(split.x_test, test.astype(np.float32))
  assert split.x_train.dtype == np.float32
  assert split.y_train is None
  assert split.y_test is None


def test_curves_missing_key_named(tmp_path):
  path = tmp_path / "curves.mat"
  scipy_io.savemat(path, {"bdata": np.zeros((2, 4))})
  with pytest.raises(ValueError, match="bdatatest"):
    loaders.load_curves(path)


def test_curves_out_of_range_rejected(tmp_path):
  path = tmp_path / "curves.mat"
  scipy_io.savemat(path, {"bdata": np.full((2, 4), 255.0), "bdatatest": np.zeros((2, 4))})
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    loaders.load_curves(path)


def test_curves_pixel_count_mismatch_rejected(tmp_path):
  path = tmp_path / "curves.mat"
  scipy_io.savemat(path, {"bdata": np.zeros((2, 4)), "bdatatest": np.zeros((2, 5))})
  with pytest.raises(ValueError, match="pixels"):
    loaders.load_curves(path)


def test_curves_not_matlab_rejected(tmp_path):
  path = tmp_path / "curves.mat"
  path.write_bytes(b"\x00\x01 not a MATLAB file at all" * 10)
  with pytest.raises(ValueError, match="MATLAB"):
    loaders.load_curves(path)


def test_curves_missing_file_rejected(tmp_path):
  with pytest.raises(FileNotFoundError, match="bdata"):
    loaders.load_curves(tmp_path / "digs3pts_1.mat")


# CIFAR-10


def test_cifar_batches_read_as_nhwc(tmp_path):
  written = write_cifar_folder(tmp_path)

  split = loaders.load_cifar10(tmp_path)

  assert split.x_train.shape == (15, 32, 32, 3)
  assert split.x_test.shape == (3, 32, 32, 3)
  assert split.x_train.dtype == np.float32
  first, labels = written["data_batch_1"]
  # Stored channel-first: red plane, then green, then blue, each row-major.
  row, column = 5, 7
  for channel in range(3):
    expected = first[0, channel * 1024 + row * 32 + column] / 255.0
    assert split.x_train[0, row, column, channel] == pytest.approx(expected)
  np.testing.assert_array_equal(split.y_train[:3], labels)
  np.testing.assert_array_equal(split.y_test, written["test_batch"][1])


def test_cifar_missing_batch_named(tmp_path):
  write_cifar_folder(tmp_path, skip=("data_batch_4",))
  with pytest.raises(FileNotFoundError, match="data_batch_4"):
    loaders.load_cifar10(tmp_path)


def test_cifar_corrupt_pickle_rejected(tmp_path):
  write_cifar_folder(tmp_path)
  (tmp_path / "data_batch_2").write_bytes(b"\x80\x04garbage")
  with pytest.raises(ValueError, match="data_batch_2"):
    loaders.load_cifar10(tmp_path)


def test_cifar_wrong_image_size_rejected(tmp_path):
  write_cifar_folder(tmp_path)
  with open(tmp_path / "test_batch", "wb") as handle:
    pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, handle)
  with pytest.raises(ValueError, match="3072"):
    loaders.load_cifar10(tmp_path)


def test_cifar_wrong_keys_rejected(tmp_path):
  write_cifar_folder(tmp_path)
  with open(tmp_path / "test_batch", "wb") as handle:
    pickle.dump({"images": []}, handle)
  with pytest.raises(ValueError, match="b'labels'"):
    loaders.load_cifar10(tmp_path)


def test_cifar_file_instead_of_folder(tmp_path):
  file = tmp_path / "data_batch_1"
  file.write_bytes(b"")
  with pytest.raises(ValueError, match="folder"):
    loaders.load_cifar10(file)


def test_cifar_missing_folder_rejected(tmp_path):
  with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
    loaders.load_cifar10(tmp_path / "cifar-10-batches-py")


# Bundled digits


def test_digits_binary_task():
  data = loaders.digits_binary()
  assert data.features.shape == (1797, 64)
  assert data.features.min() >= 0.0
  assert data.features.max() <= 1.0
  assert set(np.unique(data.labels)) == {0.0, 1.0}
  # Digits 0..4 are about half of the set.
  assert 0.45 < data.labels.mean() < 0.55


def test_digits_binary_threshold_checked():
  with pytest.raises(ValueError, match="threshold"):
    loaders.digits_binary(threshold=0)


def test_digits_images_shapes():
  split = loaders.digits_images()
  assert split.x_train.shape[1:] == (8, 8, 1)
  assert len(split.x_train) + len(split.x_test) == 1797
  assert split.y_train.dtype == np.int32
