"""Image data sets for the examples, read from local files only.

Nothing here downloads. ``load_digits_split`` uses the copy of the UCI digits that
ships inside scikit-learn, and ``load_mnist`` reads files that the user already has.
Both return images flattened to float32 rows with pixel values in [0, 1].
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

# Magic numbers of the IDX files that make up MNIST. The third byte 0x08 is the
# element type (unsigned byte) and the fourth byte is the number of dimensions.
IDX_LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension (count)
IDX_IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions (count, rows, columns)

MNIST_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

_DOWNLOAD_HINT = (
    "Download MNIST yourself (the four IDX files, gzipped or not, or Keras' mnist.npz) "
    "and pass the folder or the .npz file."
)


class ImageDataset(NamedTuple):
    """A train/test split of flattened images with pixel values in [0, 1]."""

    x_train: np.ndarray  # shape=(n_train, pixels), dtype=float32
    y_train: np.ndarray | None  # shape=(n_train,), dtype=int64, or None if unlabeled
    x_test: np.ndarray  # shape=(n_test, pixels), dtype=float32
    y_test: np.ndarray | None  # shape=(n_test,), dtype=int64, or None if unlabeled


def load_digits_split(test_fraction: float = 0.2, seed: int = 0) -> ImageDataset:
    """Load scikit-learn's bundled 8x8 digits (1797 x 64) and split them into train and test.

    Pixel values 0..16 are divided by 16. The split is stratified by digit class and
    fixed by ``seed``.

    Raises:
        ValueError: if ``test_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(
            f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}."
        )

    # Imported here so that load_mnist works without scikit-learn installed.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32)
    labels = labels.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        labels,
        test_size=test_fraction,
        random_state=seed,
        stratify=labels,
    )
    return ImageDataset(x_train, y_train, x_test, y_test)


def epoch_batch_indices(
    num_examples: int, batch_size: int, steps: int, seed: int
) -> np.ndarray:
    """Return a ``(steps, batch_size)`` array of example indices, shuffled once per epoch.

    Each epoch is a fresh permutation cut into full batches. The few examples left
    over at the end of an epoch are skipped in that epoch only.
    """
    if batch_size > num_examples:
        raise ValueError(
            f"batch size {batch_size} is larger than the {num_examples} training "
            "examples; pass a smaller --batch-size."
        )
    rng = np.random.default_rng(seed)
    batches_per_epoch = num_examples // batch_size
    epochs = -(-steps // batches_per_epoch)
    batches = [
        rng.permutation(num_examples)[: batches_per_epoch * batch_size].reshape(
            batches_per_epoch, batch_size
        )
        for _ in range(epochs)
    ]
    return np.concatenate(batches)[:steps].astype(np.int32)


def load_mnist(path: str | Path) -> ImageDataset:
    """Load MNIST from a folder of IDX files or from a Keras-style ``mnist.npz``.

    A folder must contain the four standard IDX files (``train-images-idx3-ubyte``,
    ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``),
    each plain or gzipped with a ``.gz`` suffix. A folder without them that contains
    ``mnist.npz`` is read as that file. An ``.npz`` file must contain ``x_train`` and
    ``x_test``; ``y_train`` and ``y_test`` are optional.

    Images of any count and size are accepted and flattened, so the real set gives
    train 60000 x 784 and test 10000 x 784. Integer pixels are divided by 255.

    Raises:
        FileNotFoundError: if ``path`` or one of the IDX files does not exist.
        ValueError: if a file is not valid IDX or npz data of the expected kind.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"MNIST path {str(path)!r} does not exist. {_DOWNLOAD_HINT}"
        )

    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(
                f"MNIST path {str(path)!r} is a file but not an .npz archive. "
                "Pass the folder that contains the IDX files, or a Keras-style mnist.npz."
            )
        return _load_mnist_npz(path)

    if not _find_idx_file(path, MNIST_IDX_FILES["train_images"]) and (path / "mnist.npz").is_file():
        return _load_mnist_npz(path / "mnist.npz")
    return _load_mnist_idx_folder(path)


def read_idx(path: str | Path, expected_magic: int) -> np.ndarray:
    """Read one uint8 IDX file, plain or gzipped, and return its array with the header's shape.

    Raises:
        ValueError: if the magic number differs from ``expected_magic``, the header is
            cut short, or the data length differs from the one that the header's dimensions require.
    """
    path = Path(path)
    raw = _read_bytes(path)
    kind = "labels" if expected_magic == IDX_LABELS_MAGIC else "images"

    if len(raw) < 4:
        raise ValueError(
            f"{path} is not a valid IDX file: it has {len(raw)} bytes, fewer than the "
            f"4-byte magic number. Expected MNIST {kind} (magic {expected_magic}); "
            "the file may be truncated, so download it again."
        )
    magic = int.from_bytes(raw[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{path} has IDX magic number {magic}, expected {expected_magic} for MNIST "
            f"{kind}. Check that the file is the right one and not renamed or corrupted."
        )

    ndim = raw[3]
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(
            f"{path} is truncated: its header needs {header_size} bytes for {ndim} "
            f"dimensions, but the file has {len(raw)}. Download the file again."
        )
    shape = tuple(
        int.from_bytes(raw[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim)
    )

    expected_size = header_size + int(np.prod(shape, dtype=np.int64))
    if len(raw) < expected_size:
        raise ValueError(
            f"{path} is truncated: its header gives shape {shape}, which needs "
            f"{expected_size} bytes, but the file has {len(raw)}. Download the file again."
        )
    if len(raw) > expected_size:
        raise ValueError(
            f"{path} has {len(raw) - expected_size} bytes after the data for shape "
            f"{shape}. Expected exactly {expected_size} bytes; the file may be corrupted."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _read_bytes(path: Path) -> bytes:
    """Return the file's bytes, decompressed when the name ends in ``.gz``."""
    if path.suffix != ".gz":
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as error:
        # gzip raises BadGzipFile (an OSError) for a bad header and EOFError for a
        # stream cut short.
        raise ValueError(
            f"{path} is not a valid gzip file ({error}). Download the file again, "
            "or decompress it and remove the .gz suffix."
        ) from error


def _find_idx_file(folder: Path, name: str) -> Path | None:
    """Return the plain or gzipped file ``name`` in ``folder``, preferring the plain one."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _load_mnist_idx_folder(folder: Path) -> ImageDataset:
    arrays = {}
    for key, name in MNIST_IDX_FILES.items():
        file = _find_idx_file(folder, name)
        if file is None:
            raise FileNotFoundError(
                f"{name} (or {name}.gz) not found in MNIST folder {str(folder)!r}. "
                f"Expected the four IDX files {', '.join(MNIST_IDX_FILES.values())} "
                f"(each plain or .gz), or an mnist.npz. {_DOWNLOAD_HINT}"
            )
        magic = IDX_IMAGES_MAGIC if key.endswith("images") else IDX_LABELS_MAGIC
        arrays[key] = (file, read_idx(file, magic))

    for split in ("train", "test"):
        images_file, images = arrays[f"{split}_images"]
        labels_file, labels = arrays[f"{split}_labels"]
        if len(images) != len(labels):
            raise ValueError(
                f"{images_file} has {len(images)} images but {labels_file} has "
                f"{len(labels)} labels. The files must come from the same release."
            )

    return ImageDataset(
        x_train=_flatten_pixels(arrays["train_images"][1], arrays["train_images"][0], "images"),
        y_train=arrays["train_labels"][1].astype(np.int64),
        x_test=_flatten_pixels(arrays["test_images"][1], arrays["test_images"][0], "images"),
        y_test=arrays["test_labels"][1].astype(np.int64),
    )


def _load_mnist_npz(file: Path) -> ImageDataset:
    try:
        archive = np.load(file, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{file} could not be read as an .npz archive ({error}). "
            "Download the file again."
        ) from error

    with archive:
        missing = [key for key in ("x_train", "x_test") if key not in archive.files]
        if missing:
            raise ValueError(
                f"{file} has no {' or '.join(missing)}. Expected a Keras-style "
                f"mnist.npz with arrays x_train and x_test (and optionally y_train, "
                f"y_test); found {sorted(archive.files)}."
            )
        arrays = {key: archive[key] for key in archive.files}

    labels = {}
    for split in ("train", "test"):
        label_key = f"y_{split}"
        if label_key not in arrays:
            labels[split] = None
            continue
        count = len(arrays[f"x_{split}"])
        label_array = np.asarray(arrays[label_key]).reshape(-1)
        if len(label_array) != count:
            raise ValueError(
                f"{file}: {label_key} has {len(label_array)} labels but x_{split} has "
                f"{count} images. The arrays must have the same length."
            )
        labels[split] = label_array.astype(np.int64)

    return ImageDataset(
        x_train=_flatten_pixels(arrays["x_train"], file, "x_train"),
        y_train=labels["train"],
        x_test=_flatten_pixels(arrays["x_test"], file, "x_test"),
        y_test=labels["test"],
    )


def _flatten_pixels(images: np.ndarray, source: Path, name: str) -> np.ndarray:
    """Flatten images to rows and scale them to float32 values in [0, 1].

    Integer images are read as 0..255. Floating-point images are taken as already
    scaled and are rejected if any value lies outside [0, 1].
    """
    images = np.asarray(images)
    if images.ndim < 2:
        raise ValueError(
            f"{source}: {name} has shape {images.shape}, expected at least 2 dimensions "
            "(count, pixels) or (count, rows, columns)."
        )
    rows = images.reshape(len(images), -1)

    if np.issubdtype(rows.dtype, np.integer):
        return rows.astype(np.float32) / np.float32(255.0)
    if np.issubdtype(rows.dtype, np.floating):
        if rows.size and (rows.min() < 0.0 or rows.max() > 1.0):
            raise ValueError(
                f"{source}: {name} has floating-point pixels in [{rows.min()}, {rows.max()}], "
                "expected values in [0, 1]. Store integers 0..255 or scale the images first."
            )
        return rows.astype(np.float32)
    raise ValueError(
        f"{source}: {name} has dtype {rows.dtype}, expected integer (0..255) or "
        "floating-point (0..1) pixels."
    )
