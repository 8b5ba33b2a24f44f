"""Data sets for the benchmarks, read from local files or from scikit-learn's bundled copies.

Nothing here downloads. Every loader returns float32 arrays and raises
``FileNotFoundError`` for a missing path and ``ValueError`` for a file whose
content is not what the benchmark expects, with the path and the expected
layout in the message.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import NamedTuple

import numpy as np

CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_IMAGE_SHAPE = (3, 32, 32)  # channels first, as stored in the pickle batches

# Key names in Hinton & Salakhutdinov's CURVES file (digs3pts_1.mat): one image
# of 28 x 28 pixels in [0, 1] per row.
CURVES_TRAIN_KEY = "bdata"
CURVES_TEST_KEY = "bdatatest"


class BinaryDataset(NamedTuple):
  """Features and {0, 1} labels of a binary classification set."""

  features: np.ndarray  # shape=(examples, features), dtype=float32
  labels: np.ndarray  # shape=(examples,), dtype=float32, values 0.0 or 1.0


class ImageSplit(NamedTuple):
  """Train and test images, and integer labels when the set has them."""

  x_train: np.ndarray  # shape=(n_train, ...), dtype=float32, values in [0, 1]
  y_train: np.ndarray | None  # shape=(n_train,), dtype=int32
  x_test: np.ndarray  # shape=(n_test, ...), dtype=float32, values in [0, 1]
  y_test: np.ndarray | None  # shape=(n_test,), dtype=int32


def _require_path(path: str | Path, what: str, expected: str) -> Path:
  path = Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(
        f"{what} path {str(path)!r} does not exist. Expected {expected}."
    )
  return path


def digits_binary(threshold: int = 5) -> BinaryDataset:
  """Load scikit-learn's bundled digits (1797 x 64) as the binary task digit < threshold.

  Pixels 0..16 are divided by 16, so features lie in [0, 1] like the scaled
  Gisette features. Label 1 marks a digit below ``threshold``.
  """
  if not 1 <= threshold <= 9:
    raise ValueError(f"threshold must be in 1..9, got {threshold}.")
  from sklearn.datasets import load_digits

  images, digits = load_digits(return_X_y=True)
  labels = (digits < threshold).astype(np.float32)
  return BinaryDataset((images / 16.0).astype(np.float32), labels)


def load_svmlight_binary(path: str | Path) -> BinaryDataset:
  """Read a binary classification set in svmlight/libsvm format, such as Gisette.

  Features become a dense float32 matrix, so Gisette (6000 x 5000) takes
  120 MB. Labels must take exactly two values: {-1, 1} and {0, 1} map to
  {0, 1} with the larger value as 1.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is not svmlight text or its labels are not binary.
  """
  path = _require_path(path, "svmlight", "a libsvm/svmlight text file such as gisette_scale")
  if path.is_dir():
    raise ValueError(f"svmlight path {str(path)!r} is a folder; pass the data file itself.")
  from sklearn.datasets import load_svmlight_file

  try:
    features, targets = load_svmlight_file(str(path), dtype=np.float32)
  except (ValueError, UnicodeDecodeError) as error:
    raise ValueError(
        f"{path} could not be read as svmlight text ({error}). Expected lines"
        " 'label index:value index:value ...'."
    ) from error

  values = np.unique(targets)
  if values.size != 2 or not (set(values) <= {-1.0, 1.0} or set(values) <= {0.0, 1.0}):
    raise ValueError(
        f"{path} has labels {values[:10].tolist()}, expected a binary task with"
        " labels {-1, 1} or {0, 1}."
    )
  labels = (targets == values.max()).astype(np.float32)
  return BinaryDataset(np.asarray(features.todense(), dtype=np.float32), labels)


def load_curves(path: str | Path) -> ImageSplit:
  """Read the CURVES set from a MATLAB file laid out as digs3pts_1.mat.

  The file contains ``bdata`` (train, 20000 x 784) and ``bdatatest`` (test,
  10000 x 784), one image per row with values in [0, 1]. Images of another
  count or size are accepted. CURVES has no labels.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: the file is not a MATLAB file, lacks a key, or holds values
      outside [0, 1].
  """
  path = _require_path(path, "CURVES", "a .mat file with arrays 'bdata' and 'bdatatest'")
  from scipy.io import loadmat

  try:
    contents = loadmat(str(path))
  except (ValueError, TypeError, OSError) as error:
    raise ValueError(
        f"{path} could not be read as a MATLAB .mat file ({error})."
    ) from error

  arrays = {}
  for key in (CURVES_TRAIN_KEY, CURVES_TEST_KEY):
    if key not in contents:
      found = sorted(name for name in contents if not name.startswith("__"))
      raise ValueError(
          f"{path} has no array {key!r}; found {found}. Expected the CURVES"
          f" layout: {CURVES_TRAIN_KEY!r} (train) and {CURVES_TEST_KEY!r} (test),"
          " one image per row."
      )
    array = np.asarray(contents[key], dtype=np.float32)
    if array.ndim != 2 or array.shape[0] == 0:
      raise ValueError(
          f"{path}: {key!r} has shape {array.shape}, expected (images, pixels)."
      )
    if array.min() < 0.0 or array.max() > 1.0:
      raise ValueError(
          f"{path}: {key!r} has values in [{array.min()}, {array.max()}],"
          " expected pixel values in [0, 1]."
      )
    arrays[key] = array

  if arrays[CURVES_TRAIN_KEY].shape[1] != arrays[CURVES_TEST_KEY].shape[1]:
    raise ValueError(
        f"{path}: train images have {arrays[CURVES_TRAIN_KEY].shape[1]} pixels but"
        f" test images have {arrays[CURVES_TEST_KEY].shape[1]}."
    )
  return ImageSplit(arrays[CURVES_TRAIN_KEY], None, arrays[CURVES_TEST_KEY], None)


def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
  """Return the images (NHWC, float32 in [0, 1]) and labels of one pickle batch."""
  try:
    with open(file, "rb") as handle:
      batch = pickle.load(handle, encoding="bytes")
  except (pickle.UnpicklingError, EOFError, ValueError) as error:
    raise ValueError(
        f"{file} could not be unpickled ({error}). Expected a CIFAR-10 python"
        " batch; download and extract cifar-10-python.tar.gz again."
    ) from error
  if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(
        f"{file} is not a CIFAR-10 batch: expected a dict with keys b'data' and"
        f" b'labels', found {keys}."
    )

  data = np.asarray(batch[b"data"])
  labels = np.asarray(batch[b"labels"], dtype=np.int64)
  pixels = int(np.prod(CIFAR_IMAGE_SHAPE))
  if data.ndim != 2 or data.shape[1] != pixels or data.dtype != np.uint8:
    raise ValueError(
        f"{file}: b'data' has shape {data.shape} and dtype {data.dtype}, expected"
        f" uint8 rows of {pixels} values (3 x 32 x 32, channels first)."
    )
  if len(labels) != len(data):
    raise ValueError(
        f"{file} has {len(data)} images but {len(labels)} labels."
    )
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise ValueError(
        f"{file} has labels in [{labels.min()}, {labels.max()}], expected 0..9."
    )
  images = data.reshape(-1, *CIFAR_IMAGE_SHAPE).transpose(0, 2, 3, 1)
  return images.astype(np.float32) / np.float32(255.0), labels.astype(np.int32)


def load_cifar10(path: str | Path) -> ImageSplit:
  """Read CIFAR-10 from the folder of python pickle batches.

  The folder (``cifar-10-batches-py`` once extracted) must contain
  ``data_batch_1`` .. ``data_batch_5`` and ``test_batch``. Images come back
  as (N, 32, 32, 3) float32 in [0, 1]; the full set is 50000 train and 10000
  test images, 720 MB in float32.

  Raises:
    FileNotFoundError: the folder or one of the six batch files is missing.
    ValueError: a file is not a CIFAR-10 python batch.
  """
  folder = _require_path(
      path, "CIFAR-10", "the folder cifar-10-batches-py with data_batch_1..5 and test_batch"
  )
  if not folder.is_dir():
    raise ValueError(
        f"CIFAR-10 path {str(folder)!r} is a file; pass the folder that contains"
        " data_batch_1..5 and test_batch."
    )
  missing = [
      name for name in (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
      if not (folder / name).is_file()
  ]
  if missing:
    raise FileNotFoundError(
        f"CIFAR-10 folder {str(folder)!r} lacks {', '.join(missing)}. Expected the"
        " python version's batches data_batch_1..5 and test_batch."
    )

  train = [_read_cifar_batch(folder / name) for name in CIFAR_TRAIN_BATCHES]
  x_test, y_test = _read_cifar_batch(folder / CIFAR_TEST_BATCH)
  return ImageSplit(
      np.concatenate([images for images, _ in train]),
      np.concatenate([labels for _, labels in train]),
      x_test,
      y_test,
  )


def digits_images(test_fraction: float = 0.2, seed: int = 0) -> ImageSplit:
  """Load the bundled digits as 8 x 8 x 1 images with a stratified train/test split."""
  from examples import datasets

  split = datasets.load_digits_split(test_fraction=test_fraction, seed=seed)
  return ImageSplit(
      split.x_train.reshape(-1, 8, 8, 1),
      split.y_train.astype(np.int32),
      split.x_test.reshape(-1, 8, 8, 1),
      split.y_test.astype(np.int32),
  )
