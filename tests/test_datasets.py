"""Tests for the example data loaders, on small IDX and npz files written per test."""

import gzip
import struct

import numpy as np
import pytest

from examples import datasets

IMAGE_SHAPE = (3, 4)
TRAIN_COUNT = 5
TEST_COUNT = 2


def idx_bytes(magic: int, array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: big-endian magic, one uint32 per dimension, data."""
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_file(path, payload: bytes, compress: bool):
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_split(rng, count):
    images = rng.integers(0, 256, size=(count, *IMAGE_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, size=count, dtype=np.uint8)
    return images, labels


def write_mnist_folder(folder, compress: bool, seed: int = 0):
    """Write the four MNIST IDX files into ``folder`` and return the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count, prefix in (("train", TRAIN_COUNT, "train"), ("test", TEST_COUNT, "t10k")):
        images, labels = make_split(rng, count)
        write_file(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(2051, images), compress)
        write_file(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(2049, labels), compress)
        arrays[split] = (images, labels)
    return arrays


def check_matches(dataset, arrays):
    pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    for split, x, y in (
        ("train", dataset.x_train, dataset.y_train),
        ("test", dataset.x_test, dataset.y_test),
    ):
        images, labels = arrays[split]
        assert x.shape == (len(images), pixels)
        assert x.dtype == np.float32
        np.testing.assert_allclose(x, images.reshape(len(images), -1) / 255.0, rtol=1e-6)
        assert y is not None
        np.testing.assert_array_equal(y, labels)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_mnist_idx_folder_round_trip(tmp_path, compress):
    arrays = write_mnist_folder(tmp_path, compress)

    dataset = datasets.load_mnist(tmp_path)

    check_matches(dataset, arrays)
    assert dataset.x_train.min() >= 0.0
    assert dataset.x_train.max() <= 1.0


def test_mnist_idx_folder_mixed_compression(tmp_path):
    arrays = write_mnist_folder(tmp_path, compress=True)
    plain = tmp_path / "train-images-idx3-ubyte"
    plain.write_bytes(gzip.decompress((tmp_path / "train-images-idx3-ubyte.gz").read_bytes()))
    (tmp_path / "train-images-idx3-ubyte.gz").unlink()

    check_matches(datasets.load_mnist(str(tmp_path)), arrays)


def test_mnist_idx_prefers_plain_over_gzip(tmp_path):
    arrays = write_mnist_folder(tmp_path, compress=False)
    other = np.zeros((TRAIN_COUNT, *IMAGE_SHAPE), dtype=np.uint8)
    write_file(tmp_path / "train-images-idx3-ubyte", idx_bytes(2051, other), compress=True)

    dataset = datasets.load_mnist(tmp_path)

    check_matches(dataset, arrays)


def test_read_idx_keeps_header_shape(tmp_path):
    images = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    path = write_file(tmp_path / "images", idx_bytes(2051, images), compress=False)

    loaded = datasets.read_idx(path, datasets.IDX_IMAGES_MAGIC)

    assert loaded.shape == (2, 3, 5)
    np.testing.assert_array_equal(loaded, images)


def test_mnist_npz_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    train_images, train_labels = make_split(rng, TRAIN_COUNT)
    test_images, test_labels = make_split(rng, TEST_COUNT)
    path = tmp_path / "mnist.npz"
    np.savez(
        path, x_train=train_images, y_train=train_labels, x_test=test_images, y_test=test_labels
    )

    dataset = datasets.load_mnist(path)

    check_matches(
        dataset, {"train": (train_images, train_labels), "test": (test_images, test_labels)}
    )


def test_mnist_npz_found_inside_folder(tmp_path):
    images = np.full((TRAIN_COUNT, *IMAGE_SHAPE), 255, dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=images, x_test=images[:TEST_COUNT])

    dataset = datasets.load_mnist(tmp_path)

    assert dataset.x_train.shape == (TRAIN_COUNT, 12)
    assert np.all(dataset.x_train == 1.0)


def test_mnist_npz_without_labels(tmp_path):
    images = np.zeros((TRAIN_COUNT, 12), dtype=np.uint8)
    path = tmp_path / "unlabelled.npz"
    np.savez(path, x_train=images, x_test=images[:TEST_COUNT])

    dataset = datasets.load_mnist(path)

    assert dataset.y_train is None
    assert dataset.y_test is None
    assert dataset.x_test.shape == (TEST_COUNT, 12)


def test_mnist_npz_float_pixels_kept(tmp_path):
    images = np.linspace(0.0, 1.0, TRAIN_COUNT * 12).reshape(TRAIN_COUNT, 12)
    path = tmp_path / "float.npz"
    np.savez(path, x_train=images, x_test=images[:TEST_COUNT])

    dataset = datasets.load_mnist(path)

    assert dataset.x_train.dtype == np.float32
    np.testing.assert_allclose(dataset.x_train, images, rtol=1e-6)


def test_mnist_npz_float_pixels_out_of_range(tmp_path):
    images = np.full((TRAIN_COUNT, 12), 255.0)
    path = tmp_path / "unscaled.npz"
    np.savez(path, x_train=images, x_test=images[:TEST_COUNT])

    with pytest.raises(ValueError, match=r"expected values in \[0, 1\]"):
        datasets.load_mnist(path)


def test_missing_folder_raises(tmp_path):
    missing = tmp_path / "no-such-folder"

    with pytest.raises(FileNotFoundError, match="does not exist") as error:
        datasets.load_mnist(missing)

    assert "no-such-folder" in str(error.value)
    assert "Download" in str(error.value)


def test_missing_idx_file_raises(tmp_path):
    write_mnist_folder(tmp_path, compress=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()

    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte") as error:
        datasets.load_mnist(tmp_path)

    assert "train-images-idx3-ubyte" in str(error.value)


def test_empty_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        datasets.load_mnist(tmp_path)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_bad_magic_raises(tmp_path, compress):
    write_mnist_folder(tmp_path, compress)
    labels = np.zeros(TRAIN_COUNT, dtype=np.uint8)
    # A label file where an image file is expected: magic 2049 instead of 2051.
    path = write_file(tmp_path / "train-images-idx3-ubyte", idx_bytes(2049, labels), compress)

    with pytest.raises(ValueError, match="magic number 2049, expected 2051") as error:
        datasets.load_mnist(tmp_path)

    assert path.name in str(error.value)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_truncated_data_raises(tmp_path, compress):
    write_mnist_folder(tmp_path, compress=False)
    images = np.zeros((TRAIN_COUNT, *IMAGE_SHAPE), dtype=np.uint8)
    payload = idx_bytes(2051, images)[:-7]
    (tmp_path / "train-images-idx3-ubyte").unlink()
    path = write_file(tmp_path / "train-images-idx3-ubyte", payload, compress)

    with pytest.raises(ValueError, match="truncated") as error:
        datasets.load_mnist(tmp_path)

    assert path.name in str(error.value)
    assert str(len(payload)) in str(error.value)


def test_truncated_header_raises(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(struct.pack(">I", 2049)[:3])

    with pytest.raises(ValueError, match="fewer than the 4-byte magic number"):
        datasets.read_idx(path, datasets.IDX_LABELS_MAGIC)


def test_truncated_dimensions_raise(tmp_path):
    path = tmp_path / "images"
    path.write_bytes(struct.pack(">II", 2051, TRAIN_COUNT))

    with pytest.raises(ValueError, match="header needs 16 bytes"):
        datasets.read_idx(path, datasets.IDX_IMAGES_MAGIC)


def test_trailing_bytes_raise(tmp_path):
    labels = np.zeros(TRAIN_COUNT, dtype=np.uint8)
    path = tmp_path / "labels"
    path.write_bytes(idx_bytes(2049, labels) + b"\x00\x00")

    with pytest.raises(ValueError, match="2 bytes after the data"):
        datasets.read_idx(path, datasets.IDX_LABELS_MAGIC)


def test_cut_gzip_stream_raises(tmp_path):
    write_mnist_folder(tmp_path, compress=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-10])

    with pytest.raises(ValueError, match="not a valid gzip file") as error:
        datasets.load_mnist(tmp_path)

    assert path.name in str(error.value)


def test_image_label_count_mismatch_raises(tmp_path):
    write_mnist_folder(tmp_path, compress=False)
    labels = np.zeros(TEST_COUNT + 1, dtype=np.uint8)
    write_file(tmp_path / "t10k-labels-idx1-ubyte", idx_bytes(2049, labels), compress=False)

    with pytest.raises(ValueError, match=f"{TEST_COUNT} images but .* {TEST_COUNT + 1} labels"):
        datasets.load_mnist(tmp_path)


@pytest.mark.parametrize("missing", ["x_train", "x_test"])
def test_npz_missing_key_raises(tmp_path, missing):
    arrays = {"x_train": np.zeros((2, 4), np.uint8), "x_test": np.zeros((1, 4), np.uint8)}
    del arrays[missing]
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)

    with pytest.raises(ValueError, match=f"has no {missing}") as error:
        datasets.load_mnist(path)

    assert "mnist.npz" in str(error.value)
    assert "x_train and x_test" in str(error.value)


def test_npz_label_count_mismatch_raises(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(
        path,
        x_train=np.zeros((3, 4), np.uint8),
        y_train=np.zeros(2, np.uint8),
        x_test=np.zeros((1, 4), np.uint8),
    )

    with pytest.raises(ValueError, match="y_train has 2 labels but x_train has 3 images"):
        datasets.load_mnist(path)


def test_corrupt_npz_raises(tmp_path):
    path = tmp_path / "mnist.npz"
    path.write_bytes(b"not a zip archive")

    with pytest.raises(ValueError, match="could not be read as an .npz archive"):
        datasets.load_mnist(path)


def test_other_file_type_raises(tmp_path):
    path = tmp_path / "mnist.csv"
    path.write_text("0,0,0\n")

    with pytest.raises(ValueError, match="not an .npz archive"):
        datasets.load_mnist(path)


def test_digits_split_shapes_and_range():
    dataset = datasets.load_digits_split(test_fraction=0.2, seed=0)

    assert dataset.x_train.shape == (1437, 64)
    assert dataset.x_test.shape == (360, 64)
    assert dataset.x_train.dtype == np.float32
    assert dataset.x_test.dtype == np.float32
    assert dataset.x_train.min() == 0.0
    assert dataset.x_train.max() == 1.0
    assert dataset.y_train.shape == (1437,)
    assert set(np.unique(dataset.y_test)) == set(range(10))


def test_digits_split_follows_seed():
    first = datasets.load_digits_split(seed=3)
    again = datasets.load_digits_split(seed=3)
    other = datasets.load_digits_split(seed=4)

    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)
    assert not np.array_equal(first.x_train, other.x_train)


def test_digits_split_covers_every_image_once():
    from sklearn.datasets import load_digits

    dataset = datasets.load_digits_split(test_fraction=0.5, seed=1)
    combined = np.concatenate([dataset.x_train, dataset.x_test])
    expected = (load_digits().data / 16.0).astype(np.float32)

    assert len(dataset.x_test) == 899
    # Every image lands in exactly one split, so the rows and their counts are unchanged.
    combined_rows, combined_counts = np.unique(combined, axis=0, return_counts=True)
    expected_rows, expected_counts = np.unique(expected, axis=0, return_counts=True)
    np.testing.assert_array_equal(combined_rows, expected_rows)
    np.testing.assert_array_equal(combined_counts, expected_counts)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_digits_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="test_fraction must be strictly between 0 and 1"):
        datasets.load_digits_split(test_fraction=fraction)


def test_batch_indices_shuffle_each_epoch():
    indices = datasets.epoch_batch_indices(num_examples=10, batch_size=3, steps=7, seed=0)

    assert indices.shape == (7, 3)
    # Three full batches per epoch: within an epoch no example repeats.
    for epoch in range(2):
        epoch_indices = indices[3 * epoch : 3 * epoch + 3].ravel()
        assert len(set(epoch_indices.tolist())) == 9
    assert indices.min() >= 0
    assert indices.max() < 10
    np.testing.assert_array_equal(
        indices, datasets.epoch_batch_indices(10, 3, 7, seed=0)
    )
    assert not np.array_equal(indices, datasets.epoch_batch_indices(10, 3, 7, seed=1))


def test_batch_indices_reject_oversized_batch():
    with pytest.raises(ValueError, match="batch size 11 is larger than the 10 training examples"):
        datasets.epoch_batch_indices(num_examples=10, batch_size=11, steps=1, seed=0)
